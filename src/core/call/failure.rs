//! The request seam's one error: what went wrong, as a kind every transport
//! maps to its own codes (`api` to gRPC status codes, an HTTP layer to
//! Vault's JSON errors), and a message that is safe to show.
//!
//! The business rules of failing live here, once: which domain error is a
//! "not found", which a refusal, which an internal error (logged, answered
//! with a generic message). The audit record names a failure by the gRPC
//! code name (`NOT_FOUND`, ...), the audit format's vocabulary; that mapping
//! is [`FailureKind::code_name`]. No gRPC or HTTP type is named here.

use crate::audit::{AuditError, Outcome};
use crate::barrier::BarrierError;
use crate::core::auth::AuthError;
use crate::core::CoreError;
use crate::federation::delegation::DelegationError;
use crate::identity::login::LoginError;
use crate::identity::IdentityError;
use crate::pki::PkiError;
use crate::policy::PolicyError;
use crate::policy_store::PolicyStoreError;
use crate::secrets::{InputError, SecretsError};
use crate::storage::StorageError;
use crate::token::TokenError;

/// What kind of failure ended a call, independent of the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The request is malformed or breaks a rule of its input.
    InvalidInput,
    /// The thing named does not exist (or the stage or version asked for).
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The caller is known but not allowed.
    Denied,
    /// No credential, or one that is not valid (here, from this address).
    Unauthenticated,
    /// The vault cannot serve now: sealed, the audit log cannot be written,
    /// a provider cannot be reached, the server is stopping.
    Unavailable,
    /// The stored state does not allow it: a check-and-set that lost, an
    /// init of an initialised vault.
    Conflict,
    /// A system keyward acts on (a rotation provider's target) refused.
    Upstream,
    /// Too many attempts: a login locked out by the brute-force limit.
    Exhausted,
    /// A stream cut off because its reader fell behind, or a write that
    /// lost to other nodes' writes of the same record at every try; start
    /// again.
    Aborted,
    /// The call ended without an answer (the client went away, or a bug).
    Cancelled,
    /// A fault of the server; the detail is in the server log only.
    Internal,
}

impl FailureKind {
    /// Every kind, for tests that check a mapping is total.
    pub const ALL: [FailureKind; 12] = [
        FailureKind::InvalidInput,
        FailureKind::NotFound,
        FailureKind::AlreadyExists,
        FailureKind::Denied,
        FailureKind::Unauthenticated,
        FailureKind::Unavailable,
        FailureKind::Conflict,
        FailureKind::Upstream,
        FailureKind::Exhausted,
        FailureKind::Aborted,
        FailureKind::Cancelled,
        FailureKind::Internal,
    ];

    /// The name audit records and request metrics give this kind: the gRPC
    /// code name, as the audit format has always written it. `api` maps each
    /// kind to the code of the same name (a test there holds them together).
    pub fn code_name(self) -> &'static str {
        match self {
            FailureKind::InvalidInput => "INVALID_ARGUMENT",
            FailureKind::NotFound => "NOT_FOUND",
            FailureKind::AlreadyExists => "ALREADY_EXISTS",
            FailureKind::Denied => "PERMISSION_DENIED",
            FailureKind::Unauthenticated => "UNAUTHENTICATED",
            FailureKind::Unavailable => "UNAVAILABLE",
            FailureKind::Conflict | FailureKind::Upstream => "FAILED_PRECONDITION",
            FailureKind::Exhausted => "RESOURCE_EXHAUSTED",
            FailureKind::Aborted => "ABORTED",
            FailureKind::Cancelled => "CANCELLED",
            FailureKind::Internal => "INTERNAL",
        }
    }

    /// How the audit log counts a call that ended so: a refusal of who the
    /// caller is or what they may do is `denied`, anything else `failed`.
    pub fn outcome(self) -> Outcome {
        match self {
            FailureKind::Denied | FailureKind::Unauthenticated => Outcome::Denied,
            _ => Outcome::Failed,
        }
    }
}

/// A failed call on its way to the wire: a kind and a message that is safe
/// to show (no secret material ever reaches one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    kind: FailureKind,
    message: String,
}

/// The most bytes of a failure's message: part of a message can come from
/// the request (a name the caller sent, serde's words on a body), and the
/// message is what the audit record keeps, also of a call that names
/// nobody. Longer ones are cut at a character boundary and end in `...`.
pub const MAX_MESSAGE_BYTES: usize = 1024;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: bounded(message.into()),
        }
    }

    /// A fault of the server: `detail` goes to the log, the caller gets a
    /// generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(FailureKind::Internal, "internal error; see the server log")
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(FailureKind::InvalidInput, message)
    }

    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.code_name(), self.message)
    }
}

impl From<BarrierError> for Failure {
    fn from(e: BarrierError) -> Self {
        match e {
            BarrierError::Sealed => Self::new(FailureKind::Unavailable, "the vault is sealed"),
            BarrierError::NotInitialized => {
                Self::new(FailureKind::Unavailable, "the vault is not initialized")
            }
            BarrierError::AlreadyInitialized => Self::new(FailureKind::Conflict, e.to_string()),
            // A shared store that lost its quorum: the caller may try again
            // later. The message names the operation and the store's reason
            // (never a key or value).
            BarrierError::Storage(StorageError::Unavailable(_)) => {
                Self::new(FailureKind::Unavailable, e.to_string())
            }
            // A restored store whose snapshot fails its HMAC: the vault stays
            // sealed, and the caller is told why (the message names the file).
            BarrierError::SnapshotRejected(_) => Self::new(FailureKind::Conflict, e.to_string()),
            BarrierError::InvalidSealParameters(_)
            | BarrierError::MalformedShare(_)
            | BarrierError::ShareOfAnotherVault
            | BarrierError::DuplicateShare
            | BarrierError::WrongShares => Self::invalid(e.to_string()),
            other => Self::internal(other),
        }
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingToken | AuthError::BadToken | AuthError::SourceNotAllowed => {
                Self::new(FailureKind::Unauthenticated, e.to_string())
            }
            AuthError::Denied | AuthError::ExchangeOnly => {
                Self::new(FailureKind::Denied, e.to_string())
            }
            AuthError::Barrier(b) => b.into(),
            other => Self::internal(other),
        }
    }
}

impl From<TokenError> for Failure {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Invalid | TokenError::SourceNotAllowed => {
                Self::new(FailureKind::Unauthenticated, e.to_string())
            }
            TokenError::NotFound => Self::new(FailureKind::NotFound, e.to_string()),
            TokenError::ParentInvalid | TokenError::ActorInvalid => {
                Self::new(FailureKind::Unauthenticated, e.to_string())
            }
            TokenError::NotSubset(_) | TokenError::CidrNotSubset => {
                Self::new(FailureKind::Denied, e.to_string())
            }
            TokenError::UnknownPolicy(_) | TokenError::InvalidRequest(_) => {
                Self::invalid(e.to_string())
            }
            TokenError::Contended => Self::new(FailureKind::Aborted, e.to_string()),
            TokenError::Barrier(b) => b.into(),
            TokenError::Corrupt | TokenError::Random => Self::internal(e),
        }
    }
}

impl From<crate::federation::issuer::IssuerError> for Failure {
    fn from(e: crate::federation::issuer::IssuerError) -> Self {
        use crate::federation::issuer::IssuerError as E;
        match e {
            E::NotConfigured | E::MissingMetadata { .. } => {
                Self::new(FailureKind::Conflict, e.to_string())
            }
            E::NoRole => Self::new(FailureKind::NotFound, e.to_string()),
            E::BadRole(_)
            | E::UnknownAudience(_)
            | E::AudienceNeeded
            | E::TtlTooLong { .. }
            | E::CallerExpiring => Self::invalid(e.to_string()),
            E::NotAnIdentity => Self::new(FailureKind::Denied, e.to_string()),
            E::Barrier(b) => b.into(),
            E::Crypto | E::Corrupt => Self::internal(e),
        }
    }
}

impl From<DelegationError> for Failure {
    fn from(e: DelegationError) -> Self {
        match e {
            DelegationError::SubjectInvalid => {
                Self::new(FailureKind::Unauthenticated, e.to_string())
            }
            DelegationError::Root => Self::invalid(e.to_string()),
            DelegationError::NotExchangeOnly
            | DelegationError::NotNamedActor
            | DelegationError::Chained
            | DelegationError::ActorKind { .. }
            | DelegationError::ActorUnknown
            | DelegationError::NotSubset(_) => Self::new(FailureKind::Denied, e.to_string()),
        }
    }
}

impl From<PolicyStoreError> for Failure {
    fn from(e: PolicyStoreError) -> Self {
        match e {
            PolicyStoreError::RootImmutable => Self::invalid(e.to_string()),
            PolicyStoreError::NotFound => Self::new(FailureKind::NotFound, e.to_string()),
            PolicyStoreError::Policy(p) => p.into(),
            PolicyStoreError::Barrier(b) => b.into(),
            PolicyStoreError::Corrupt(_) | PolicyStoreError::WrongProof => Self::internal(e),
        }
    }
}

impl From<PolicyError> for Failure {
    fn from(e: PolicyError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<AuditError> for Failure {
    fn from(e: AuditError) -> Self {
        tracing::error!(error = %e, "audit log write failed; refusing the request");
        Self::new(
            FailureKind::Unavailable,
            "the audit log cannot be written; request refused",
        )
    }
}

impl From<CoreError> for Failure {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Barrier(b) => b.into(),
            CoreError::Auth(a) => a.into(),
            CoreError::Audit(a) => a.into(),
        }
    }
}

impl From<InputError> for Failure {
    fn from(e: InputError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<SecretsError> for Failure {
    fn from(e: SecretsError) -> Self {
        match e {
            SecretsError::Input(i) => i.into(),
            SecretsError::NotFound
            | SecretsError::NoSuchVersion(_)
            | SecretsError::NoSuchStage(_)
            | SecretsError::Deleted(_)
            | SecretsError::Destroyed(_) => Self::new(FailureKind::NotFound, e.to_string()),
            SecretsError::CasMismatch { .. } | SecretsError::Contended => {
                Self::new(FailureKind::Conflict, e.to_string())
            }
            SecretsError::Barrier(b) => b.into(),
            SecretsError::Corrupt | SecretsError::WrongProof => Self::internal(e),
            // Said in the record, not only in the server log: the write
            // may have been applied.
            SecretsError::WriteStopped => Self::new(FailureKind::Internal, e.to_string()),
        }
    }
}

impl From<PkiError> for Failure {
    fn from(e: PkiError) -> Self {
        match e {
            PkiError::Invalid(_) | PkiError::NoCa | PkiError::OutlivesIdentity => {
                Self::invalid(e.to_string())
            }
            PkiError::NameNotAllowed(_) => Self::new(FailureKind::Denied, e.to_string()),
            PkiError::NoRole(_) | PkiError::NoCert(_) => {
                Self::new(FailureKind::NotFound, e.to_string())
            }
            PkiError::HolderChanged => Self::new(FailureKind::Aborted, e.to_string()),
            PkiError::CaExists | PkiError::InactiveIdentity => {
                Self::new(FailureKind::Conflict, e.to_string())
            }
            PkiError::Barrier(b) => b.into(),
            other => Self::internal(other),
        }
    }
}

impl From<IdentityError> for Failure {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::InvalidName
            | IdentityError::InvalidKind(_)
            | IdentityError::Invalid(_)
            | IdentityError::UnknownPolicy(_)
            | IdentityError::UnknownIssuer(_) => Self::invalid(e.to_string()),
            IdentityError::NotFound
            | IdentityError::NoSuchBinding
            | IdentityError::NoSuchSecretId => Self::new(FailureKind::NotFound, e.to_string()),
            IdentityError::AlreadyExists(_) | IdentityError::BindingTaken(_) => {
                Self::new(FailureKind::AlreadyExists, e.to_string())
            }
            IdentityError::PoliciesChanged
            | IdentityError::Disabled(_)
            | IdentityError::Expired(_) => Self::new(FailureKind::Conflict, e.to_string()),
            IdentityError::Contended => Self::new(FailureKind::Aborted, e.to_string()),
            IdentityError::Barrier(b) => b.into(),
            IdentityError::Corrupt | IdentityError::Tokens(_) | IdentityError::Certificates(_) => {
                Self::internal(e)
            }
        }
    }
}

impl From<LoginError> for Failure {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Locked(_) | LoginError::Busy => {
                Self::new(FailureKind::Exhausted, e.to_string())
            }
            LoginError::KeysUnavailable(_) => Self::new(FailureKind::Unavailable, e.to_string()),
            LoginError::Identity(i) => i.into(),
            LoginError::Inventory(p) => p.into(),
            LoginError::Invalid
            | LoginError::NoCertificate
            | LoginError::UnboundCertificate
            | LoginError::CertificateRefused
            | LoginError::IssuedForAnother
            | LoginError::UnboundToken
            | LoginError::Ambiguous
            | LoginError::Oidc(_) => Self::new(FailureKind::Unauthenticated, e.to_string()),
        }
    }
}

impl From<crate::rotation::policy::RotationPolicyError> for Failure {
    fn from(e: crate::rotation::policy::RotationPolicyError) -> Self {
        use crate::rotation::policy::RotationPolicyError as PolicyError;
        match e {
            PolicyError::Path(i) => i.into(),
            PolicyError::UnknownProvider(_) => Self::new(FailureKind::NotFound, e.to_string()),
            other => Self::invalid(other.to_string()),
        }
    }
}

impl From<crate::rotation::RotationError> for Failure {
    fn from(e: crate::rotation::RotationError) -> Self {
        use crate::rotation::provider::ProviderError;
        use crate::rotation::providers::RegistryError;
        use crate::rotation::RotationError;
        match e {
            RotationError::Policy(p) => p.into(),
            RotationError::NoPolicy | RotationError::NoRun => {
                Self::new(FailureKind::NotFound, e.to_string())
            }
            RotationError::Secrets(s) => s.into(),
            RotationError::Barrier(b) => b.into(),
            RotationError::Audit(a) => a.into(),
            RotationError::Provider(ProviderError::InvalidSettings(m)) => Self::invalid(m),
            RotationError::Provider(ProviderError::Unreachable(m)) => Self::new(
                FailureKind::Unavailable,
                format!("provider unreachable: {m}"),
            ),
            RotationError::Provider(p) => Self::new(FailureKind::Upstream, p.to_string()),
            RotationError::Registry(r @ RegistryError::NameTaken(_)) => {
                Self::new(FailureKind::AlreadyExists, r.to_string())
            }
            RotationError::Registry(r) => Self::invalid(r.to_string()),
            RotationError::Stopping => Self::new(FailureKind::Unavailable, e.to_string()),
            RotationError::Corrupt => Self::internal(e),
        }
    }
}

impl From<crate::lease::LeaseError> for Failure {
    fn from(e: crate::lease::LeaseError) -> Self {
        use crate::lease::LeaseError;
        match e {
            LeaseError::NotFound => Self::new(FailureKind::NotFound, e.to_string()),
            LeaseError::Revoking | LeaseError::Expired => {
                Self::new(FailureKind::Conflict, e.to_string())
            }
            LeaseError::Invalid(m) => Self::invalid(m),
            LeaseError::Barrier(b) => b.into(),
            LeaseError::Corrupt => Self::internal(e),
        }
    }
}

impl From<crate::dynamic::DynamicError> for Failure {
    fn from(e: crate::dynamic::DynamicError) -> Self {
        use crate::dynamic::DynamicError;
        use crate::rotation::provider::ProviderError;
        match e {
            DynamicError::Invalid(m) => Self::invalid(m),
            DynamicError::UnknownRole(_) => Self::new(FailureKind::NotFound, e.to_string()),
            DynamicError::AdminSecret(m) => Self::new(FailureKind::Conflict, m),
            DynamicError::Target(ProviderError::Unreachable(m)) => {
                Self::new(FailureKind::Unavailable, format!("target unreachable: {m}"))
            }
            DynamicError::Target(ProviderError::InvalidSecret(m)) => {
                Self::new(FailureKind::Conflict, format!("invalid admin secret: {m}"))
            }
            DynamicError::Target(p) => Self::new(FailureKind::Upstream, p.to_string()),
            DynamicError::Lease(l) => l.into(),
            DynamicError::Barrier(b) => b.into(),
            DynamicError::Corrupt => Self::internal(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message that carries what the caller sent cannot make the audit
    /// record large: it is cut (at a character boundary) and says so.
    #[test]
    fn a_long_message_is_cut_at_a_character_boundary() {
        let long = format!("x{}", "é".repeat(4000));
        let failure = Failure::invalid(long);
        let message = failure.message();
        assert!(message.len() <= MAX_MESSAGE_BYTES + 3, "{}", message.len());
        assert!(message.ends_with("..."));
        assert!(message.starts_with("xé"));
        let short = Failure::invalid("short");
        assert_eq!(short.message(), "short");
    }

    /// A restored store whose snapshot fails its HMAC says so to the caller
    /// (a conflict with the stored state, gRPC `FAILED_PRECONDITION`, HTTP
    /// 400), never as an opaque internal error.
    /// A store that cannot answer (etcd without a quorum) is UNAVAILABLE
    /// with the store's reason, not an opaque internal error.
    #[test]
    fn an_unavailable_store_is_unavailable_with_its_reason() {
        let why = "put: etcd has no leader";
        let failure = Failure::from(BarrierError::Storage(StorageError::Unavailable(
            why.to_owned(),
        )));
        assert_eq!(failure.kind(), FailureKind::Unavailable);
        assert!(failure.message().contains(why), "{}", failure.message());
        let other = Failure::from(BarrierError::Storage(StorageError::Io("disk".into())));
        assert_eq!(other.kind(), FailureKind::Internal);
    }

    #[test]
    fn a_rejected_snapshot_is_a_conflict_with_its_message() {
        let why = "the snapshot vault.snap failed its HMAC check";
        let failure = Failure::from(BarrierError::SnapshotRejected(why.to_owned()));
        assert_eq!(failure.kind(), FailureKind::Conflict);
        assert!(failure.message().contains(why), "{}", failure.message());
    }
}
