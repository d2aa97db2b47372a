//! Deterministic test data and a seeded generator.

use bytes::Bytes;

/// Deterministic pseudo-random bytes (xorshift) for test data: the same seed gives the same
/// bytes, different seeds differ, so misplaced data cannot match by accident.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A seeded xorshift64* generator: reproducible workloads without a random-number crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`; any seed works (zero included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_repeats_for_a_seed_and_differs_between_seeds() {
        assert_eq!(pattern(7, 4096), pattern(7, 4096));
        assert_ne!(pattern(7, 4096), pattern(8, 4096));
        assert_eq!(pattern(7, 100)[..], pattern(7, 4096)[..100]);
    }

    #[test]
    fn rng_replays_its_seed_and_stays_below_the_bound() {
        let (mut a, mut b) = (Rng::new(0), Rng::new(0));
        let run: Vec<u64> = (0..100).map(|_| a.below(10)).collect();
        assert_eq!(run, (0..100).map(|_| b.below(10)).collect::<Vec<_>>());
        assert!(run.iter().all(|&x| x < 10));
        assert_ne!(Rng::new(1).next(), Rng::new(2).next());
    }
}
