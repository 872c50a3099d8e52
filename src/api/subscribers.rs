//! Caps on event-stream subscribers, per node and per client address: a client that opens
//! streams without end gets 503 instead of the node's memory, and other clients keep theirs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use warp::http::StatusCode;

use super::ApiError;

/// Seconds a refused subscriber is told to wait before it tries again.
const RETRY_AFTER_SECS: u64 = 5;

/// Counts the open streams of a node.
pub struct SubscriberSlots {
    max_total: usize,
    max_per_address: usize,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// Open streams by client ([`crate::security::client_key`]: an IPv6 client by its /64);
    /// a client with none has no entry.
    by_address: HashMap<IpAddr, usize>,
}

/// One open stream's place; given back when dropped (the stream ends or the client leaves).
pub struct SubscriberSlot {
    counts: Arc<Mutex<Counts>>,
    address: Option<IpAddr>,
}

impl SubscriberSlots {
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        SubscriberSlots {
            max_total,
            max_per_address,
            counts: Arc::default(),
        }
    }

    /// The streams open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    /// A place for one more stream from `address`, or 503 when the node or the address is at
    /// its limit (`limits.max_subscribers`, `limits.max_subscribers_per_address`).
    pub fn acquire(&self, address: Option<IpAddr>) -> Result<SubscriberSlot, ApiError> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total {
            return Err(refuse(format!(
                "this node serves its limit of {} event streams (limits.max_subscribers); try another node or later",
                self.max_total
            )));
        }
        let address = address.map(crate::security::client_key);
        if let Some(key) = address {
            let n = counts.by_address.entry(key).or_insert(0);
            if *n >= self.max_per_address {
                return Err(refuse(format!(
                    "{} holds its limit of {} event streams on this node (limits.max_subscribers_per_address)",
                    crate::security::client_label(key),
                    self.max_per_address
                )));
            }
            *n += 1;
        }
        counts.total += 1;
        Ok(SubscriberSlot {
            counts: self.counts.clone(),
            address,
        })
    }
}

fn refuse(message: String) -> ApiError {
    ApiError {
        retry_after: Some(RETRY_AFTER_SECS),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            message,
        )
    }
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total -= 1;
        if let Some(ip) = self.address {
            if let Some(n) = counts.by_address.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.by_address.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_per_node_and_gives_places_back() {
        let slots = SubscriberSlots::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.acquire(Some(a)).unwrap();
        let _a2 = slots.acquire(Some(a)).unwrap();
        let e = slots.acquire(Some(a)).err().unwrap();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after, Some(RETRY_AFTER_SECS));
        let _b1 = slots.acquire(Some(b)).unwrap();
        // The node is full now, whoever asks.
        assert_eq!(
            slots.acquire(Some(b)).err().unwrap().code,
            "too_many_subscribers"
        );
        drop(a1);
        let _a3 = slots.acquire(Some(a)).unwrap();
        assert!(slots.counts.lock().unwrap().by_address.len() == 2);
    }

    #[test]
    fn an_ipv6_client_is_capped_by_its_64_prefix() {
        let slots = SubscriberSlots::new(10, 2);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let _a = slots.acquire(ip("2001:db8:0:1::1")).unwrap();
        let _b = slots.acquire(ip("2001:db8:0:1::2")).unwrap();
        let e = slots.acquire(ip("2001:db8:0:1:ffff::3")).err().unwrap();
        assert!(e.message.contains("2001:db8:0:1::/64"), "{}", e.message);
        // Another /64 is another client.
        let _c = slots.acquire(ip("2001:db8:0:2::1")).unwrap();
    }
}
