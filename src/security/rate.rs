//! A token bucket per client address, for the write rate limit (429 with `Retry-After`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept before full (idle) ones are dropped: bounds memory under a flood from many
/// addresses.
const MAX_TRACKED: usize = 10_000;

pub struct RateLimiter {
    /// Tokens added per second.
    rate: f64,
    /// The most tokens a bucket holds: the burst allowed after a pause.
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for the client at `ip` (an IPv6 client by its /64, see
    /// [`super::client_key`]); `Err(seconds)` when there is none, with when one will be.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let ip = super::client_key(ip);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_per_address() {
        let r = RateLimiter::new(1, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(r.check(a).is_ok());
        }
        assert_eq!(r.check(a), Err(1));
        assert!(r.check(b).is_ok(), "another address has its own bucket");
    }

    #[test]
    fn an_ipv6_client_has_one_bucket_for_its_64_prefix() {
        let r = RateLimiter::new(1, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(r.check(ip("2001:db8:0:1::1")).is_ok());
        assert!(r.check(ip("2001:db8:0:1::2")).is_ok());
        assert_eq!(r.check(ip("2001:db8:0:1:abcd::9")), Err(1));
        assert!(
            r.check(ip("2001:db8:0:2::1")).is_ok(),
            "another /64 is another client"
        );
    }
}
