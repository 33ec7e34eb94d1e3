//! The proof of a policy check. A domain write takes an [`Authorized`]
//! (`SecretStore::put`, `PolicyStore::delete`, ...) and refuses one made for
//! another resource or capability; only [`PolicySet::authorize`] mints one
//! for a caller, so a write cannot happen without the check having granted
//! it. The one exception, for the server acting on its own behalf, is
//! [`Authorized::for_broker`], visible inside the crate only.
//!
//! [`PolicySet::authorize`]: super::PolicySet::authorize

use super::capability::Capability;

/// Proof that `capability` on `resource` was granted.
///
/// Its fields are private and it has no public constructor: code outside
/// this module (and outside the crate entirely) can hold, pass and read one,
///
/// ```
/// use keyward::policy::{Authorized, Capability};
///
/// fn may_write(proof: &Authorized, resource: &str) -> bool {
///     proof.grants(Capability::Write, resource)
/// }
/// ```
///
/// but not make one, neither by a struct literal
///
/// ```compile_fail
/// use keyward::policy::{Authorized, Capability};
///
/// let forged = Authorized {
///     resource: "secret/app/db".into(),
///     capability: Capability::Write,
/// };
/// ```
///
/// nor through the broker's constructor, which is the crate's own:
///
/// ```compile_fail,E0624
/// use keyward::policy::{Authorized, Capability};
///
/// let forged = Authorized::for_broker("secret/app/db".into(), Capability::Write);
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct Authorized {
    resource: String,
    capability: Capability,
    by: Grantor,
}

/// Who granted: a rule of a policy set, or the server itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grantor {
    /// Rule `rule` (from 0, in file order) of policy `policy` (from 0, in
    /// the order of the set).
    Rule { policy: u16, rule: u16 },
    /// The rotation broker, writing a value it rotated.
    Broker,
}

impl Authorized {
    /// Minted by `PolicySet::authorize` when rule `rule` of policy `policy`
    /// granted.
    pub(super) fn granted(resource: &str, capability: Capability, policy: u16, rule: u16) -> Self {
        Self {
            resource: resource.to_owned(),
            capability,
            by: Grantor::Rule { policy, rule },
        }
    }

    /// A proof for the rotation broker writing on its own behalf (a rotated
    /// value as `pending`), where no caller's policy is checked: the caller
    /// who set the rotation policy was checked for `read` and `write` on the
    /// secret then. Only the rotation broker (`rotation::machine`) may call
    /// this; request handlers always go through `Call::authorize`.
    pub(crate) fn for_broker(resource: String, capability: Capability) -> Self {
        Self {
            resource,
            capability,
            by: Grantor::Broker,
        }
    }

    /// The resource path the grant is for, e.g. `secret/app/db`.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    pub fn capability(&self) -> Capability {
        self.capability
    }

    /// Whether this proof is for exactly `capability` on `resource`.
    pub fn grants(&self, capability: Capability, resource: &str) -> bool {
        self.capability == capability && self.resource == resource
    }

    /// Whether this proof is for exactly `capability` on `root/rest` (for
    /// stores that know their resource root and the path below it, so
    /// checking costs no allocation).
    pub fn grants_under(&self, capability: Capability, root: &str, rest: &str) -> bool {
        self.capability == capability
            && self
                .resource
                .strip_prefix(root)
                .and_then(|r| r.strip_prefix('/'))
                == Some(rest)
    }

    /// The granting rule as (policy index in its set, rule index in its
    /// policy); `None` for the broker's own proof.
    pub fn rule(&self) -> Option<(u16, u16)> {
        match self.by {
            Grantor::Rule { policy, rule } => Some((policy, rule)),
            Grantor::Broker => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_is_for_one_capability_on_one_resource() {
        let proof = Authorized::granted("secret/app/db", Capability::Write, 1, 2);
        assert!(proof.grants(Capability::Write, "secret/app/db"));
        assert!(!proof.grants(Capability::Read, "secret/app/db"));
        assert!(!proof.grants(Capability::Write, "secret/app/db2"));
        assert!(proof.grants_under(Capability::Write, "secret", "app/db"));
        assert!(!proof.grants_under(Capability::Write, "secret", "app"));
        assert!(!proof.grants_under(Capability::Write, "secre", "t/app/db"));
        assert!(!proof.grants_under(Capability::Write, "policy", "app/db"));
        assert_eq!(proof.rule(), Some((1, 2)));
        let broker = Authorized::for_broker("secret/app/db".into(), Capability::Write);
        assert!(broker.grants_under(Capability::Write, "secret", "app/db"));
        assert_eq!(broker.rule(), None);
    }
}
