//! The lifecycle of a non-human identity, beyond the vault's own records:
//! what it read ([`reads`]), its decommission ([`decommission`]), its
//! owners' attestations ([`attest`]) and the narrow policy its use suggests
//! ([`suggest`]).
//!
//! Storage prefix `lifecycle/` (through the barrier only; this module never
//! reads another module's prefix, it calls that module):
//! - `lifecycle/reads/...`, `lifecycle/reads-dropped/...`: the read set
//!   ([`reads`]);
//! - `lifecycle/decommission/<name>`: a decommission run
//!   ([`decommission::DecommissionRun`]), the resume point;
//! - `lifecycle/attest/<name>`: the last attestation
//!   ([`attest::Attestation`]).
//!
//! It takes exactly the handles it uses, in [`LifecycleDeps`]; it never
//! sees `core`. Leases and certificates are revoked through
//! [`CredentialRevoker`]s registered by the modules that own them.

pub mod attest;
pub mod decommission;
pub mod reads;
pub mod suggest;

use std::sync::Arc;

use crate::audit::{AuditError, AuditLog};
use crate::barrier::{Barrier, BarrierError};
use crate::clock::Clock;
use crate::identity::{IdentityError, IdentityStore, TokenRevoker};
use crate::policy_store::{PolicyStore, PolicyStoreError};
use crate::rotation::{Broker, RotationError};
use crate::secrets::{SecretStore, SecretsError};

pub use reads::ReadSet;

/// The audit identity of what the lifecycle does on its own (a resumed
/// decommission, an identity disabled for want of attestation).
pub const LIFECYCLE_IDENTITY: &str = "lifecycle";

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    #[error(transparent)]
    Rotation(#[from] RotationError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Policies(#[from] PolicyStoreError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("could not revoke the identity's {kind}: {message}")]
    Revoker { kind: &'static str, message: String },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("stored lifecycle record is corrupt")]
    Corrupt,
}

/// What kind of credential a [`CredentialRevoker`] revokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    Lease,
    Certificate,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Lease => "leases",
            CredentialKind::Certificate => "certificates",
        }
    }
}

/// The seam for credentials other modules own (dynamic-credential leases,
/// issued certificates): a decommission asks each registered revoker to
/// revoke everything the identity holds. Must be idempotent (a resumed
/// decommission asks again).
pub trait CredentialRevoker: Send + Sync {
    fn kind(&self) -> CredentialKind;
    /// Revokes every credential of `identity`; returns how many.
    fn revoke_identity(&self, identity: &str, now_ms: u64) -> Result<u32, String>;
    /// How many live credentials `identity` holds (for a dry run).
    fn count_identity(&self, identity: &str) -> Result<u32, String>;
}

/// What the lifecycle uses, and nothing more.
#[derive(Clone)]
pub struct LifecycleDeps {
    /// The `lifecycle/` prefix, the seal state and flushes.
    pub barrier: Arc<Barrier>,
    /// Records of what it does on its own and of rotations it causes.
    pub audit: Arc<AuditLog>,
    pub clock: Clock,
    /// Disable, bindings, secret-ids, the inventory.
    pub identities: Arc<IdentityStore>,
    /// Revokes an identity's tokens.
    pub tokens: Arc<dyn TokenRevoker + Send + Sync>,
    /// The identity's policies, to know what it could read.
    pub policies: PolicyStore,
    /// Secret paths (never values), to list what was readable.
    pub secrets: Arc<SecretStore>,
    /// Rotations a decommission triggers.
    pub broker: Broker,
    pub reads: ReadSet,
    /// Leases and certificates (registered by their modules; none yet).
    pub revokers: Vec<Arc<dyn CredentialRevoker>>,
}

/// The lifecycle: a cheap handle over its deps.
#[derive(Clone)]
pub struct Lifecycle {
    deps: Arc<LifecycleDeps>,
    /// One decommission drives at a time (they are rare; a request and the
    /// start-up resume never interleave on one identity).
    driving: Arc<tokio::sync::Mutex<()>>,
}

impl Lifecycle {
    pub fn new(deps: LifecycleDeps) -> Self {
        Self {
            deps: Arc::new(deps),
            driving: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    pub fn deps(&self) -> &LifecycleDeps {
        &self.deps
    }
}
