//! Randomness for the handshake's public values: the server's random, the session ticket's
//! age offset and nonces.
//!
//! ring's generator makes one `getrandom` system call per draw, four per resumed handshake:
//! about 1 % of the relay's CPU in a reconnect storm (bench/RESULTS.md). A thread's own ChaCha12
//! generator (rand's `ThreadRng`, seeded and reseeded from the operating system) draws without
//! one. The secrets of a handshake do not come from here: its X25519 key pair draws from
//! aws-lc's generator ([`crate::kx`]), and long-lived keys (the ticket keys) from the operating
//! system.

use rand::RngCore;
use rustls::crypto::{GetRandomFailed, SecureRandom};

/// A [`SecureRandom`] drawing from the calling thread's generator.
pub static THREAD_RANDOM: &dyn SecureRandom = &ThreadRandom;

#[derive(Debug)]
struct ThreadRandom;

impl SecureRandom for ThreadRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        fill(buf).map_err(|_| GetRandomFailed)
    }
}

/// Fills `buf` from the calling thread's generator.
pub fn fill(buf: &mut [u8]) -> Result<(), rand::Error> {
    rand::thread_rng().try_fill_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_differ_and_fill_the_whole_buffer() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        THREAD_RANDOM.fill(&mut a).unwrap();
        THREAD_RANDOM.fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
        // Every byte position is written: over a few draws, none stays zero throughout.
        let mut seen = [0u8; 64];
        for _ in 0..8 {
            let mut draw = [0u8; 64];
            fill(&mut draw).unwrap();
            for (s, d) in seen.iter_mut().zip(draw) {
                *s |= d;
            }
        }
        assert!(seen.iter().all(|b| *b != 0), "{seen:?}");
    }
}
