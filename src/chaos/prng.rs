//! A small seeded pseudo-random generator (SplitMix64). The chaos run draws its fault
//! schedule and every client's choices from it, so one seed gives one schedule. Not for
//! anything that needs unpredictability.

/// SplitMix64 (Steele, Lea and Flood): one 64-bit state, good enough statistics for picking
/// nodes, faults and delays, and trivially reproducible.
#[derive(Debug, Clone)]
pub struct Prng {
    state: u64,
}

impl Prng {
    pub fn new(seed: u64) -> Self {
        Prng { state: seed }
    }

    /// An independent stream for one consumer (a client task, the scheduler), so that the
    /// order in which tasks run does not change what each of them draws.
    pub fn fork(seed: u64, stream: u64) -> Self {
        let mut p = Prng::new(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        p.next_u64();
        p
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0). The modulo bias is below 2^-40 for the small `n` used here.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no value to return");
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// The slice in a random order (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_other_seed_other_numbers() {
        let a: Vec<u64> = (0..8)
            .map({
                let mut p = Prng::new(42);
                move |_| p.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..8)
            .map({
                let mut p = Prng::new(42);
                move |_| p.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..8)
            .map({
                let mut p = Prng::new(43);
                move |_| p.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(Prng::fork(42, 1).next_u64(), Prng::fork(42, 2).next_u64());
    }

    #[test]
    fn ranges_hold_and_cover() {
        let mut p = Prng::new(7);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let v = p.between(3, 7);
            assert!((3..=7).contains(&v));
            seen[(v - 3) as usize] = true;
        }
        assert!(
            seen.iter().all(|s| *s),
            "every value of a small range comes up"
        );
        let hits = (0..10_000).filter(|_| p.chance(0.25)).count();
        assert!(
            (2000..3000).contains(&hits),
            "chance(0.25) hit {hits} of 10000"
        );
    }
}
