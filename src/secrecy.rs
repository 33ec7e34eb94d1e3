//! Types for secret material: zeroized on drop, `Debug` prints `[redacted]`,
//! no `Display` and no `Serialize`. Every module that holds a secret value,
//! key or token in memory holds it in one of these.

use std::collections::BTreeMap;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Secret bytes: a field value, a password, a key. Compared in constant
/// time (see the `PartialEq` impl).
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes themselves; the caller must not log or copy them carelessly.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The bytes as UTF-8, if they are.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl From<&str> for SecretBytes {
    fn from(text: &str) -> Self {
        Self(text.as_bytes().to_vec())
    }
}

impl From<String> for SecretBytes {
    fn from(text: String) -> Self {
        Self(text.into_bytes())
    }
}

/// Equal in time that depends on the lengths only, never on where the
/// contents first differ: both sides are MACed under a key chosen at random
/// per process and the tags compared by `ring::hmac::verify`, which
/// compares in constant time ("double HMAC"). An attacker timing it learns
/// nothing of either value, even if the tag comparison leaked, since they
/// cannot compute the tags. (ring's own `constant_time` module is
/// deprecated and makes no promises.)
impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        let key = compare_key();
        let tag = ring::hmac::sign(key, &self.0);
        ring::hmac::verify(key, &other.0, tag.as_ref()).is_ok()
    }
}

impl Eq for SecretBytes {}

/// The process's key for comparing secrets. If the system's random source
/// failed, an all-zero key: the tag comparison is constant time anyway.
fn compare_key() -> &'static ring::hmac::Key {
    use std::sync::OnceLock;
    static KEY: OnceLock<ring::hmac::Key> = OnceLock::new();
    KEY.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[0; 32]))
    })
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The fields of one secret version: field name (not secret) to value (secret).
pub type SecretData = BTreeMap<String, SecretBytes>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_is_by_content() {
        let a = SecretBytes::from("hunter2");
        assert_eq!(a, SecretBytes::from("hunter2"));
        assert_ne!(a, SecretBytes::from("hunter3"));
        assert_ne!(a, SecretBytes::from("hunter2 "));
        assert_ne!(a, SecretBytes::default());
        assert_eq!(SecretBytes::default(), SecretBytes::new(Vec::new()));
        let mut one = SecretData::new();
        one.insert("password".into(), SecretBytes::from("x"));
        let mut other = SecretData::new();
        other.insert("password".into(), SecretBytes::from("y"));
        assert_ne!(one, other);
        other.insert("password".into(), SecretBytes::from("x"));
        assert_eq!(one, other);
    }

    #[test]
    fn debug_hides_the_value() {
        let mut data = SecretData::new();
        data.insert("password".into(), SecretBytes::from("hunter2-very-secret"));
        let shown = format!("{data:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password"));
    }
}
