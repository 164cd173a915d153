//! Named random streams derived from a run's seed.
//!
//! Every random choice in a run comes from one ChaCha8 stream per subsystem:
//! the seed selects the key, the stream name (hashed) selects ChaCha's 64-bit
//! stream id. Adding a draw to one subsystem therefore shifts no other.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The stream `name` of run `seed`.
pub fn stream(seed: u64, name: &str) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(xxhash_rust::xxh3::xxh3_64(name.as_bytes()));
    rng
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_are_independent_and_reproducible() {
        let a1: Vec<u64> = (0..4).map(|_| 0).scan(stream(7, "device"), |r, _| Some(r.random())).collect();
        let a2: Vec<u64> = (0..4).map(|_| 0).scan(stream(7, "device"), |r, _| Some(r.random())).collect();
        let b: Vec<u64> = (0..4).map(|_| 0).scan(stream(7, "memory"), |r, _| Some(r.random())).collect();
        let c: Vec<u64> = (0..4).map(|_| 0).scan(stream(8, "device"), |r, _| Some(r.random())).collect();
        assert_eq!(a1, a2);
        assert_ne!(a1, b);
        assert_ne!(a1, c);
    }
}
