//! Reading secrets on someone's behalf: who set a rotation policy
//! ([`Setter`]), and the one question the broker asks before it reads a
//! secret a policy names ([`ReadCheck`]: may this setter read that secret
//! now?).
//!
//! A policy's secret reference (the admin secret of a database provider, or
//! whatever key an external provider's `Describe` names) is read by the
//! broker and handed to a provider. The broker holds no authority of its
//! own for that: it reads only what the identity that set the policy may
//! read, checked when the policy is set (`rotation set` needs `read` on
//! `secret/<ref>`) and again at every run and retire, so a revoked grant
//! stops the next run before the value is read. Each read (or refusal) is
//! an audit record naming the setter and the path, never the value.
//!
//! The answer comes from the policy store and the identity inventory, which
//! `core` wires in: rotation names neither `core` nor the gate, only this
//! trait. No storage of its own.

/// Who set a rotation policy: the identity of the token that set it and
/// the policies that token held. Names only; nothing secret.
///
/// A run reads a reference only while the setter holds `read` on it
/// through these policies *and*, for an identity of the inventory, while
/// that identity is enabled, unexpired and still holds each of them. So
/// the broker never reads more than the setter could at set time, nor more
/// than the identity can now.
///
/// Records written before setters were recorded have an empty identity:
/// [`Setter::is_known`] is false and the broker refuses to read references
/// for them until the policy is set again (the safe reading: nobody
/// authorised those reads, so none is done; policies without a reference,
/// such as `random`, run as before).
///
/// A token of the root lineage (identity `root`) that does not hold the
/// `root` policy also records its accessor: its authority ends with the
/// token, so a run reads a reference only while that token is live (not
/// revoked, not expired). A token holding the `root` policy records none
/// (its authority is the vault's own, and revoking the initial root token
/// after setup must not stop rotations); "" also in older records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Setter {
    pub identity: String,
    pub policies: Vec<String>,
    /// The accessor of the setting token, or "" (see above).
    pub accessor: String,
}

impl Setter {
    pub fn new(identity: impl Into<String>, policies: Vec<String>) -> Self {
        Self {
            identity: identity.into(),
            policies,
            accessor: String::new(),
        }
    }

    /// The same setter, bound to the life of the token `accessor` ("" for
    /// none).
    pub fn with_accessor(mut self, accessor: impl Into<String>) -> Self {
        self.accessor = accessor.into();
        self
    }

    /// Whether the record says who set the policy.
    pub fn is_known(&self) -> bool {
        !self.identity.is_empty()
    }
}

/// Why a setter may not read a secret now. Messages name the identity and
/// the resource, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadRefused {
    #[error("the identity `{0}` that set this policy no longer exists")]
    NoIdentity(String),
    #[error("the identity `{0}` that set this policy is disabled or expired")]
    Inactive(String),
    #[error("the token that set this policy (accessor {0}) was revoked or has expired; set the policy again")]
    TokenGone(String),
    #[error("`{identity}`, who set this policy, may no longer read {resource}")]
    Denied { identity: String, resource: String },
    /// The policies or identities could not be read (sealed, storage):
    /// nothing is decided; the run is tried again later.
    #[error("cannot check who may read {0} now")]
    Unavailable(String),
}

impl ReadRefused {
    /// Whether asking again later may give another answer without anyone
    /// changing a grant.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// "May this setter read this resource now?", answered from the current
/// policies and identities. Implemented by `core`.
pub trait ReadCheck: Send + Sync {
    /// `Ok` if `setter` may read `resource` (`secret/<path>`) now (and,
    /// when it records a token accessor, that token is still live).
    fn may_read(&self, setter: &Setter, resource: &str) -> Result<(), ReadRefused>;
}

/// A [`ReadCheck`] that refuses every read: for brokers (tests, tools)
/// whose policies name no secret.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReads;

impl ReadCheck for NoReads {
    fn may_read(&self, setter: &Setter, resource: &str) -> Result<(), ReadRefused> {
        Err(ReadRefused::Denied {
            identity: setter.identity.clone(),
            resource: resource.to_owned(),
        })
    }
}
