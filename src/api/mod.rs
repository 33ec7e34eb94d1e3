//! api: the gRPC services. Each file maps one service's protobuf to domain
//! types and calls the core; this file holds what every service shares: the
//! per-call life cycle (`Call`) and the one mapping of domain errors to gRPC
//! status codes. No business rule lives here.

pub mod auth;
pub mod governance;
pub mod identities;
pub mod login;
pub mod policies;
pub mod rotation;
pub mod secrets;
pub mod sys;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Request, Status};
use zeroize::Zeroizing;

use crate::audit::{AuditError, AuditEvent, Outcome};
use crate::barrier::BarrierError;
use crate::core::{AuthError, Authorized, Caller, Core, CoreError};
use crate::identity::login::LoginError;
use crate::identity::IdentityError;
use crate::policy::{Capability, PolicyError};
use crate::policy_store::PolicyStoreError;
use crate::secrets::{InputError, SecretsError};
use crate::token::TokenError;

/// A domain error on its way to the wire: a code and a message that is safe
/// to show (no secret material ever reaches one).
#[derive(Debug)]
pub struct Failure {
    code: Code,
    message: String,
}

impl Failure {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(Code::Internal, "internal error; see the server log")
    }
}

impl From<BarrierError> for Failure {
    fn from(e: BarrierError) -> Self {
        match e {
            BarrierError::Sealed => Self::new(Code::Unavailable, "the vault is sealed"),
            BarrierError::NotInitialized => {
                Self::new(Code::Unavailable, "the vault is not initialized")
            }
            BarrierError::AlreadyInitialized => Self::new(Code::FailedPrecondition, e.to_string()),
            BarrierError::InvalidSealParameters(_)
            | BarrierError::MalformedShare(_)
            | BarrierError::ShareOfAnotherVault
            | BarrierError::DuplicateShare
            | BarrierError::WrongShares => Self::new(Code::InvalidArgument, e.to_string()),
            other => Self::internal(other),
        }
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingToken | AuthError::BadToken | AuthError::SourceNotAllowed => {
                Self::new(Code::Unauthenticated, e.to_string())
            }
            AuthError::Denied => Self::new(Code::PermissionDenied, e.to_string()),
            AuthError::Barrier(b) => b.into(),
            other => Self::internal(other),
        }
    }
}

impl From<TokenError> for Failure {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Invalid | TokenError::SourceNotAllowed => {
                Self::new(Code::Unauthenticated, e.to_string())
            }
            TokenError::NotFound => Self::new(Code::NotFound, e.to_string()),
            TokenError::ParentInvalid => Self::new(Code::Unauthenticated, e.to_string()),
            TokenError::NotSubset(_) | TokenError::CidrNotSubset => {
                Self::new(Code::PermissionDenied, e.to_string())
            }
            TokenError::UnknownPolicy(_) | TokenError::InvalidRequest(_) => {
                Self::new(Code::InvalidArgument, e.to_string())
            }
            TokenError::Barrier(b) => b.into(),
            TokenError::Corrupt | TokenError::Random => Self::internal(e),
        }
    }
}

impl From<PolicyStoreError> for Failure {
    fn from(e: PolicyStoreError) -> Self {
        match e {
            PolicyStoreError::RootImmutable => Self::new(Code::InvalidArgument, e.to_string()),
            PolicyStoreError::NotFound => Self::new(Code::NotFound, e.to_string()),
            PolicyStoreError::Policy(p) => p.into(),
            PolicyStoreError::Barrier(b) => b.into(),
            PolicyStoreError::Corrupt(_) => Self::internal(e),
        }
    }
}

impl From<PolicyError> for Failure {
    fn from(e: PolicyError) -> Self {
        Self::new(Code::InvalidArgument, e.to_string())
    }
}

impl From<AuditError> for Failure {
    fn from(e: AuditError) -> Self {
        tracing::error!(error = %e, "audit log write failed; refusing the request");
        Self::new(
            Code::Unavailable,
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
        Self::new(Code::InvalidArgument, e.to_string())
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
            | SecretsError::Destroyed(_) => Self::new(Code::NotFound, e.to_string()),
            SecretsError::CasMismatch { .. } => Self::new(Code::FailedPrecondition, e.to_string()),
            SecretsError::Barrier(b) => b.into(),
            SecretsError::Corrupt => Self::internal(e),
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
            | IdentityError::UnknownIssuer(_) => Self::new(Code::InvalidArgument, e.to_string()),
            IdentityError::NotFound => Self::new(Code::NotFound, e.to_string()),
            IdentityError::AlreadyExists(_) | IdentityError::BindingTaken(_) => {
                Self::new(Code::AlreadyExists, e.to_string())
            }
            IdentityError::Barrier(b) => b.into(),
            IdentityError::Corrupt | IdentityError::Tokens(_) => Self::internal(e),
        }
    }
}

impl From<LoginError> for Failure {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Locked(_) => Self::new(Code::ResourceExhausted, e.to_string()),
            LoginError::KeysUnavailable(_) => Self::new(Code::Unavailable, e.to_string()),
            LoginError::Identity(i) => i.into(),
            LoginError::Invalid
            | LoginError::NoCertificate
            | LoginError::UnboundCertificate
            | LoginError::UnboundToken
            | LoginError::Ambiguous
            | LoginError::Oidc(_) => Self::new(Code::Unauthenticated, e.to_string()),
        }
    }
}

// -- rotation (issue 4) --
impl From<crate::rotation::policy::PolicyError> for Failure {
    fn from(e: crate::rotation::policy::PolicyError) -> Self {
        use crate::rotation::policy::PolicyError;
        match e {
            PolicyError::Path(i) => i.into(),
            PolicyError::UnknownProvider(_) => Self::new(Code::NotFound, e.to_string()),
            other => Self::new(Code::InvalidArgument, other.to_string()),
        }
    }
}

impl From<crate::rotation::RotationError> for Failure {
    fn from(e: crate::rotation::RotationError) -> Self {
        use crate::rotation::provider::{ProviderError, RegistryError};
        use crate::rotation::RotationError;
        match e {
            RotationError::Policy(p) => p.into(),
            RotationError::NoPolicy | RotationError::NoRun => {
                Self::new(Code::NotFound, e.to_string())
            }
            RotationError::Secrets(s) => s.into(),
            RotationError::Barrier(b) => b.into(),
            RotationError::Audit(a) => a.into(),
            RotationError::Provider(ProviderError::InvalidSettings(m)) => {
                Self::new(Code::InvalidArgument, m)
            }
            RotationError::Provider(ProviderError::Unreachable(m)) => {
                Self::new(Code::Unavailable, format!("provider unreachable: {m}"))
            }
            RotationError::Provider(p) => Self::new(Code::FailedPrecondition, p.to_string()),
            RotationError::Registry(r @ RegistryError::NameTaken(_)) => {
                Self::new(Code::AlreadyExists, r.to_string())
            }
            RotationError::Registry(r) => Self::new(Code::InvalidArgument, r.to_string()),
            RotationError::Stopping => Self::new(Code::Unavailable, e.to_string()),
            RotationError::Corrupt => Self::internal(e),
        }
    }
}

/// The gRPC name of a code, as audit records and metrics write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Whether a call needs a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Status, unseal and init: answered sealed and without a token.
    Open,
    /// Everything else: the vault must be unsealed and the token valid.
    Token,
}

/// One RPC from arrival to answer. Every path out of a handler goes through
/// `fail` or `ok`, which write the audit record (before the answer leaves)
/// and the metrics; if the audit record cannot be written, the call fails.
pub struct Call {
    core: Arc<Core>,
    method: &'static str,
    request_id: String,
    source: Option<SocketAddr>,
    token: Option<Zeroizing<String>>,
    caller: Option<Caller>,
    /// Who a tokenless call (a login) authenticated as: (identity, new accessor).
    subject: Option<(String, String)>,
    resource: Option<String>,
    started: Instant,
    finished: bool,
}

/// A request id unique to this process run: a random prefix chosen at
/// start-up and a counter (no system call per request, unlike a UUID).
fn next_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    format!("{prefix}-{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn request_id<T>(req: &Request<T>) -> String {
    let given = req
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    match given {
        Some(id) => id.to_owned(),
        None => next_request_id(),
    }
}

fn bearer<T>(req: &Request<T>) -> Option<Zeroizing<String>> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(Zeroizing::new(token.trim().to_owned()))
}

impl Call {
    /// Starts a call: for `Access::Token`, checks the seal and the token.
    pub async fn begin<T>(
        core: &Arc<Core>,
        method: &'static str,
        access: Access,
        req: &Request<T>,
    ) -> Result<Self, Status> {
        let mut call = Self {
            core: core.clone(),
            method,
            request_id: request_id(req),
            source: req.remote_addr(),
            token: bearer(req),
            caller: None,
            subject: None,
            resource: None,
            started: Instant::now(),
            finished: false,
        };
        if access == Access::Token {
            if core.is_sealed() {
                return Err(call.fail(BarrierError::Sealed));
            }
            let authenticated = match call.token.as_deref() {
                None => Err(AuthError::MissingToken),
                Some(token) => core.gate.authenticate(token, call.source.map(|s| s.ip())),
            };
            match authenticated {
                Ok(caller) => {
                    let counted = caller.counted_use;
                    call.caller = Some(caller);
                    // A counted use is on disk before the call acts, so a
                    // crash cannot hand the use back.
                    if counted {
                        if let Err(e) = core.barrier.durable().await {
                            return Err(call.fail(e));
                        }
                    }
                }
                Err(e) => return Err(call.fail(e)),
            }
        }
        Ok(call)
    }

    /// The authenticated caller (`Access::Token` calls).
    pub fn caller(&self) -> Option<&Caller> {
        self.caller.as_ref()
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Refuses (audited, `PERMISSION_DENIED`) unless the caller holds `root`
    /// or every one of `policies`: nobody hands an identity more than they hold.
    pub fn require_policy_subset(&mut self, policies: &[String]) -> Result<(), Status> {
        let allowed = self.caller.as_ref().is_some_and(|c| {
            c.policies.iter().any(|p| p == crate::policy::ROOT_POLICY)
                || policies.iter().all(|p| c.policies.contains(p))
        });
        if allowed {
            Ok(())
        } else {
            Err(self.fail(AuthError::Denied))
        }
    }

    /// Parses a piece of input; a refusal is audited and answered.
    pub fn parse<T, E: Into<Failure>>(&mut self, parsed: Result<T, E>) -> Result<T, Status> {
        parsed.map_err(|e| self.fail(e))
    }

    /// Checks the caller's policies for `capability` on `resource`.
    pub fn authorize(
        &mut self,
        capability: Capability,
        resource: String,
    ) -> Result<Authorized, Status> {
        let decision = match &self.caller {
            Some(caller) => self.core.gate.authorize(caller, capability, &resource),
            None => Err(AuthError::MissingToken),
        };
        self.resource = Some(resource);
        decision.map_err(|e| self.fail(e))
    }

    /// Names, for the audit record, the identity and token accessor a login
    /// call produced.
    pub fn set_subject(&mut self, identity: &str, accessor: &str) {
        self.subject = Some((identity.to_owned(), accessor.to_owned()));
    }

    /// Records the resource of a call that needs no policy check.
    pub fn set_resource(&mut self, resource: impl Into<String>) {
        self.resource = Some(resource.into());
    }

    /// Maps a domain result; an error is audited and answered.
    pub fn check<T, E: Into<Failure>>(&mut self, result: Result<T, E>) -> Result<T, Status> {
        result.map_err(|e| self.fail(e))
    }

    /// Ends the call with an error.
    pub fn fail(&mut self, error: impl Into<Failure>) -> Status {
        let failure = error.into();
        let outcome = match failure.code {
            Code::PermissionDenied | Code::Unauthenticated => Outcome::Denied,
            _ => Outcome::Failed,
        };
        match self.finish(outcome, failure.code, Some(&failure.message), &[]) {
            Ok(()) => Status::new(failure.code, failure.message),
            Err(status) => status,
        }
    }

    /// Ends the call successfully; `values` are the secret values it carried
    /// (written to the audit log only as HMACs).
    pub fn ok(mut self, values: &[(&str, &[u8])]) -> Result<(), Status> {
        self.finish(Outcome::Allowed, Code::Ok, None, values)
    }

    /// `ok` for the busiest calls: the audit record shares one `write` with
    /// the records of other calls (`AuditLog::append_async`), and the call
    /// still answers only once its record is written.
    pub async fn ok_async(mut self, values: &[(&str, &[u8])]) -> Result<(), Status> {
        self.finished = true;
        let source = self.source.map(|s| s.to_string());
        let event = self.event(Outcome::Allowed, Code::Ok, None, values, source.as_deref());
        let written = self.core.audit.append_async(&event).await;
        self.after_audit(Code::Ok, written)
    }

    fn finish(
        &mut self,
        outcome: Outcome,
        code: Code,
        error: Option<&str>,
        values: &[(&str, &[u8])],
    ) -> Result<(), Status> {
        self.finished = true;
        let source = self.source.map(|s| s.to_string());
        let event = self.event(outcome, code, error, values, source.as_deref());
        let written = self.core.audit.append(&event);
        self.after_audit(code, written)
    }

    fn event<'a>(
        &'a self,
        outcome: Outcome,
        code: Code,
        error: Option<&'a str>,
        values: &'a [(&'a str, &'a [u8])],
        source: Option<&'a str>,
    ) -> AuditEvent<'a> {
        AuditEvent {
            request_id: &self.request_id,
            method: self.method,
            resource: self.resource.as_deref(),
            identity: self
                .caller
                .as_ref()
                .map(|c| c.identity.as_str())
                .or(self.subject.as_ref().map(|s| s.0.as_str())),
            accessor: self
                .caller
                .as_ref()
                .map(|c| c.accessor.as_str())
                .or(self.subject.as_ref().map(|s| s.1.as_str())),
            source,
            outcome,
            code: code_name(code),
            error,
            token: self.token.as_deref().map(|t| t.as_bytes()),
            values,
        }
    }

    /// The metrics of a call whose record was written (or not).
    fn after_audit(&self, code: Code, written: Result<(), AuditError>) -> Result<(), Status> {
        let code = if written.is_ok() {
            code
        } else {
            Code::Unavailable
        };
        self.core
            .metrics
            .observe_request(self.method, code_name(code), self.started.elapsed());
        written.map_err(|e| {
            let f = Failure::from(e);
            Status::new(f.code, f.message)
        })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            // A handler returned without answering through `ok` or `fail`
            // (a bug, or the client went away mid-call): still audit it.
            let _ = self.finish(
                Outcome::Failed,
                Code::Cancelled,
                Some("call ended without an answer"),
                &[],
            );
        }
    }
}
