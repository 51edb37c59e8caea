//! TLS key exchange on X25519 computed by aws-lc-rs, for the providers that are otherwise ring's.
//!
//! Every TLS 1.3 handshake, a resumed one included, makes a fresh X25519 key pair and one
//! agreement on each side. ring's X25519 took 59 µs for the two on this project's benchmark
//! machine and aws-lc-rs' 32 µs; in a relay's reconnect storm the key exchange was a fifth of
//! the relay's CPU (bench/RESULTS.md, "Restarts with session resumption"). Everything else —
//! ciphers, hashes, signatures, the session tickets — stays on ring.
//!
//! Written here rather than taken from rustls' `aws_lc_rs` feature: with both of rustls' provider
//! features on, rustls can no longer choose a process default provider, and the crates that rely
//! on that default (rumqttd's own TLS listener among them) would stop at their first handshake.

use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

use aws_lc_rs::agreement;

/// Ephemeral ECDH on curve25519 (RFC 7748), first in every provider chukei builds.
pub static X25519: &dyn SupportedKxGroup = &X25519Group;

#[derive(Debug)]
struct X25519Group;

impl SupportedKxGroup for X25519Group {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let key = agreement::PrivateKey::generate(&agreement::X25519)
            .map_err(|_| Error::General("X25519: no key pair could be made".into()))?;
        let public = key
            .compute_public_key()
            .map_err(|_| Error::General("X25519: no public key could be made".into()))?;
        Ok(Box::new(X25519Exchange { key, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// One side's key pair, for one handshake.
struct X25519Exchange {
    key: agreement::PrivateKey,
    public: agreement::PublicKey,
}

impl ActiveKeyExchange for X25519Exchange {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        // TLS 1.3 allows only the 32-byte form; aws-lc-rs would take others.
        if peer.len() != 32 {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
        agreement::agree(
            &self.key,
            peer,
            Error::from(PeerMisbehaved::InvalidKeyShare),
            |secret| Ok(SharedSecret::from(secret)),
        )
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_ref()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// ring's provider with [`X25519`] in place of ring's own.
pub fn ring_with_fast_x25519() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    for group in &mut provider.kx_groups {
        if group.name() == NamedGroup::X25519 {
            *group = X25519;
        }
    }
    provider
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides of an exchange agree, whichever library computed each side; a wrong-sized or
    /// all-zero (low-order) share is refused.
    #[test]
    fn agrees_with_rings_x25519_and_refuses_bad_shares() {
        let ring_group = rustls::crypto::ring::kx_group::X25519;
        let ours = X25519.start().unwrap();
        let theirs = ring_group.start().unwrap();
        let ours_pub = ours.pub_key().to_vec();
        let a = ours.complete(theirs.pub_key()).unwrap();
        let b = theirs.complete(&ours_pub).unwrap();
        assert_eq!(a.secret_bytes(), b.secret_bytes());
        assert_eq!(a.secret_bytes().len(), 32);

        let short = X25519.start().unwrap().complete(&[9u8; 31]).err();
        assert!(matches!(short, Some(Error::PeerMisbehaved(_))), "{short:?}");
        let zero = X25519.start().unwrap().complete(&[0u8; 32]).err();
        assert!(matches!(zero, Some(Error::PeerMisbehaved(_))), "{zero:?}");
    }

    #[test]
    fn the_provider_keeps_rings_other_groups_and_puts_ours_first() {
        let p = ring_with_fast_x25519();
        let names: Vec<NamedGroup> = p.kx_groups.iter().map(|g| g.name()).collect();
        let ring_names: Vec<NamedGroup> = rustls::crypto::ring::default_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(names, ring_names);
        assert_eq!(names[0], NamedGroup::X25519);
        assert!(std::ptr::addr_eq(p.kx_groups[0], X25519));
    }
}
