//! Deterministic pseudo-random numbers and bytes for test inputs: the same
//! seed gives the same test on every run and every machine.

/// xorshift64*: a small deterministic generator for test inputs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed` (which must not be 0: xorshift
    /// stays at 0 forever).
    pub fn new(seed: u64) -> Self {
        assert_ne!(seed, 0, "xorshift seed 0");
        Rng(seed)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `len` deterministic pseudo-random bytes from `seed` (the top byte of a
/// 64-bit linear congruential generator).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    const MUL: u64 = 6364136223846793005;
    const ADD: u64 = 1442695040888963407;
    let mut x = seed.wrapping_mul(MUL).wrapping_add(ADD);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(MUL).wrapping_add(ADD);
            (x >> 56) as u8
        })
        .collect()
}

/// The splitmix64 finalizer: a well-mixed 64-bit function of `x`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic pseudo-random bytes for guest range `[offset, offset +
/// len)`: byte `p` depends only on `(seed, p)`, so data that lands at the
/// wrong place is detected, not only data that is wrong.
pub fn pattern_at(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    let key = splitmix64(seed ^ 0x5eed_0000_0000_0000);
    (offset..offset + len)
        .map(|p| (splitmix64(key ^ (p / 8)) >> ((p % 8) * 8)) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic_and_spread() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let draws: Vec<u64> = (0..100).map(|_| a.below(10)).collect();
        assert!(draws
            .iter()
            .zip((0..100).map(|_| b.below(10)))
            .all(|(x, y)| *x == y));
        assert!((0..10).all(|d| draws.contains(&d)));
        assert_eq!(noise(64, 3), noise(64, 3));
        assert_ne!(noise(64, 3), noise(64, 4));
        // Position-keyed: a slice of a longer pattern is the pattern there.
        assert_eq!(pattern_at(5, 100, 50)[10..], pattern_at(5, 110, 40)[..]);
        assert_ne!(pattern_at(5, 100, 50), pattern_at(6, 100, 50));
    }
}
