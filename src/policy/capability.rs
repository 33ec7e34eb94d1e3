//! Capabilities: the verbs a policy rule grants, and a set of them in one word.

use std::fmt;
use std::str::FromStr;

/// One verb a rule grants on the resources its path matches.
///
/// Capabilities are independent: `admin` does not imply `write`, `write` does
/// not imply `read`. `deny` is not a verb but a veto: a matching rule holding
/// it refuses every capability on that resource, whatever other rules grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Capability {
    Read = 0,
    List = 1,
    Write = 2,
    Delete = 3,
    Destroy = 4,
    Rotate = 5,
    Issue = 6,
    Admin = 7,
    Deny = 8,
    /// Record an owner's attestation of an identity (`identity/<name>`).
    Attest = 9,
    /// Match candidate values against stored fingerprints (`sys/scan`).
    Scan = 10,
}

impl Capability {
    /// Every capability, in the canonical order used when writing a policy back.
    pub const ALL: [Capability; 11] = [
        Capability::Read,
        Capability::List,
        Capability::Write,
        Capability::Delete,
        Capability::Destroy,
        Capability::Rotate,
        Capability::Issue,
        Capability::Admin,
        Capability::Deny,
        Capability::Attest,
        Capability::Scan,
    ];

    /// The word used in policy files and on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::List => "list",
            Capability::Write => "write",
            Capability::Delete => "delete",
            Capability::Destroy => "destroy",
            Capability::Rotate => "rotate",
            Capability::Issue => "issue",
            Capability::Admin => "admin",
            Capability::Deny => "deny",
            Capability::Attest => "attest",
            Capability::Scan => "scan",
        }
    }

    const fn bit(self) -> u16 {
        1 << (self as u8)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not one of the capabilities.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability {word:?}; expected one of read, list, write, delete, destroy, rotate, issue, admin, deny, attest, scan")]
pub struct UnknownCapability {
    /// The refused word (policy text is not secret), cut to 64 characters.
    pub word: String,
}

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        Capability::ALL
            .into_iter()
            .find(|cap| cap.as_str() == word)
            .ok_or_else(|| UnknownCapability {
                word: word.chars().take(64).collect(),
            })
    }
}

/// A set of capabilities as a bitset; copying and testing cost one word.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CapabilitySet(u16);

impl CapabilitySet {
    pub const EMPTY: CapabilitySet = CapabilitySet(0);

    /// Every capability except `deny`: what the built-in `root` policy grants.
    pub const ALL_GRANTS: CapabilitySet = CapabilitySet(0x7ff & !Capability::Deny.bit());

    pub const fn new() -> Self {
        Self::EMPTY
    }

    pub const fn contains(self, cap: Capability) -> bool {
        self.0 & cap.bit() != 0
    }

    pub fn insert(&mut self, cap: Capability) {
        self.0 |= cap.bit();
    }

    pub const fn with(self, cap: Capability) -> Self {
        Self(self.0 | cap.bit())
    }

    pub const fn union(self, other: CapabilitySet) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The capabilities in canonical order.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL
            .into_iter()
            .filter(move |cap| self.contains(*cap))
    }
}

impl FromIterator<Capability> for CapabilitySet {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Self {
        let mut set = CapabilitySet::EMPTY;
        for cap in iter {
            set.insert(cap);
        }
        set
    }
}

impl fmt::Debug for CapabilitySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        for cap in Capability::ALL {
            assert_eq!(cap.as_str().parse::<Capability>().unwrap(), cap);
            assert_eq!(cap.to_string(), cap.as_str());
        }
    }

    #[test]
    fn unknown_word_is_named() {
        let err = "reed".parse::<Capability>().unwrap_err();
        assert_eq!(err.word, "reed");
        assert!(err.to_string().contains("\"reed\""), "{err}");
        // Case matters: policy files are lower case.
        assert!("Read".parse::<Capability>().is_err());
        assert!("".parse::<Capability>().is_err());
    }

    #[test]
    fn set_operations() {
        let set: CapabilitySet = [Capability::Read, Capability::List, Capability::Read]
            .into_iter()
            .collect();
        assert_eq!(set.len(), 2);
        assert!(set.contains(Capability::Read));
        assert!(!set.contains(Capability::Write));
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [Capability::Read, Capability::List]
        );
        let both = set.union(CapabilitySet::new().with(Capability::Deny));
        assert!(both.contains(Capability::Deny));
        assert!(CapabilitySet::EMPTY.is_empty());
        assert_eq!(CapabilitySet::ALL_GRANTS.len(), 10);
        assert!(!CapabilitySet::ALL_GRANTS.contains(Capability::Deny));
        assert_eq!(format!("{set:?}"), "{Read, List}");
    }
}
