//! The request seam: one call from arrival to answer, whatever the
//! transport. A handler (gRPC in `api`, later HTTP) describes the request in
//! a [`RequestMeta`], then reads top to bottom: [`Call::begin`] (seal and
//! token), [`Call::check`] the parsed input, [`Call::authorize`] (the proof a
//! domain write requires), act through the domain and [`Call::check`] its
//! result, [`Call::ok`] (record). Every way out writes the audit record
//! before the answer leaves, and a call dropped without an answer is still
//! audited (`Drop`). If the audit record cannot be written, the call fails.
//! A call that changes state ([`class`]) also writes a request record before
//! it acts: at `begin` for token calls, through [`Call::record_request`] for
//! open ones; its answer is then the outcome record. A call that names
//! nobody and changed nothing is recorded through
//! `AuditLog::append_unauthenticated`, which counts repeats.
//!
//! Errors are [`Failure`]s: a transport-neutral [`FailureKind`] and a safe
//! message. The mapping of domain errors to kinds is in `failure.rs`; a
//! transport maps kinds to its own codes once (`api::grpc_code`).
//!
//! Owns no storage prefix; it reaches the domain only through `Core`.

mod failure;

pub use failure::{Failure, FailureKind};

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use zeroize::Zeroizing;

use crate::audit::{AuditEvent, Outcome, Phase};
use crate::barrier::BarrierError;
use crate::policy::{Authorized, Capability};

use super::auth::{AuthError, Caller};
use super::offload::Work;
use super::Core;

/// Whether a call needs a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Status, unseal, init and login: answered without a token (init,
    /// unseal and status even while sealed).
    Open,
    /// Everything else: the vault must be unsealed and the token valid.
    Token,
}

/// Whether a method changes state. A change writes two audit records under
/// its request id: `"phase":"request"` before it acts (if that record
/// cannot be written, the call does not act and answers `UNAVAILABLE`) and
/// `"phase":"outcome"` with its answer. A read writes one record, without
/// a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Read,
    Change,
}

/// The class of every method, in one place. A method missing here is a read.
pub fn class(method: &str) -> Class {
    match method {
        "keyward.v1.Secrets/Put"
        | "keyward.v1.Secrets/Delete"
        | "keyward.v1.Secrets/Undelete"
        | "keyward.v1.Secrets/Destroy"
        | "keyward.v1.Auth/Login"
        | "keyward.v1.Auth/IssueToken"
        | "keyward.v1.Auth/RenewToken"
        | "keyward.v1.Auth/RevokeToken"
        | "keyward.v1.Auth/ExchangeToken"
        | "keyward.v1.Federation/PutOidcRole"
        | "keyward.v1.Federation/IdentityToken"
        | "keyward.v1.Federation/RotateOidcKey"
        | "keyward.v1.Rotation/SetPolicy"
        | "keyward.v1.Rotation/DeletePolicy"
        | "keyward.v1.Rotation/Rotate"
        | "keyward.v1.Rotation/RegisterProvider"
        | "keyward.v1.Policies/Put"
        | "keyward.v1.Policies/Delete"
        | "keyward.v1.Identities/Create"
        | "keyward.v1.Identities/Update"
        | "keyward.v1.Identities/Delete"
        | "keyward.v1.Identities/Disable"
        | "keyward.v1.Identities/Enable"
        | "keyward.v1.Identities/BindCert"
        | "keyward.v1.Identities/BindOidc"
        | "keyward.v1.Identities/Unbind"
        | "keyward.v1.Identities/CreateSecretId"
        | "keyward.v1.Identities/RevokeSecretId"
        | "keyward.v1.Identities/PutOidcIssuer"
        | "keyward.v1.Identities/SetMetadata"
        | "keyward.v1.Sys/Init"
        | "keyward.v1.Sys/Unseal"
        | "keyward.v1.Sys/Seal"
        | "keyward.v1.Sys/RotateKey"
        | "keyward.v1.Dynamic/PutRole"
        | "keyward.v1.Dynamic/DeleteRole"
        | "keyward.v1.Dynamic/Creds"
        | "keyward.v1.Leases/Renew"
        | "keyward.v1.Leases/Revoke"
        | "keyward.v1.Pki/Init"
        | "keyward.v1.Pki/IntermediateCsr"
        | "keyward.v1.Pki/IntermediateSetSigned"
        | "keyward.v1.Pki/PutRole"
        | "keyward.v1.Pki/DeleteRole"
        | "keyward.v1.Pki/Issue"
        | "keyward.v1.Pki/Sign"
        | "keyward.v1.Pki/Revoke"
        | "keyward.v1.Lifecycle/Decommission"
        | "keyward.v1.Lifecycle/Attest"
        | "keyward.v1.Lifecycle/Suggest" => Class::Change,
        _ => Class::Read,
    }
}

/// Where [`Call::begin`] leaves the request record of a change: written
/// there for token calls, which are authenticated by then; an open call
/// (login, init, unseal) writes it itself with [`Call::record_request`]
/// once it knows it will act, so that a failed login stays one record; a
/// seal writes it with [`Call::record_request_or_log`].
fn requested_at_begin(method: &str, access: Access) -> bool {
    access == Access::Token && class(method) == Class::Change && method != "keyward.v1.Sys/Seal"
}

/// What the seam needs to know of a request, read from the transport's
/// metadata by the transport's layer.
pub struct RequestMeta {
    /// The method as audit records and metrics name it, e.g.
    /// `keyward.v1.Secrets/Get`.
    pub method: &'static str,
    /// From [`request_id`].
    pub request_id: String,
    /// The peer address.
    pub source: Option<SocketAddr>,
    /// The bearer token, if one was sent (see [`bearer`]).
    pub token: Option<Zeroizing<String>>,
    /// The transport's mark of a change (`api::detach`): set once the call
    /// acts, so that a client that leaves from then on does not stop it.
    pub acting: Option<Acting>,
}

/// Shared by a change's call and its transport (`api::detach`): the call
/// sets it when it begins to act (its request record is written, or
/// queued); the transport, when the client left after that, lets the call
/// run to its end and says so (`client_left`), so that a wait that only
/// served the client (a Rotate's `wait`) can end early.
#[derive(Clone, Default)]
pub struct Acting(Arc<ActingState>);

#[derive(Default)]
struct ActingState {
    acting: AtomicBool,
    left: AtomicBool,
    /// The client left once the call acted, and the transport could not
    /// keep the call (no slot, or shutting down): it ends where it stands.
    stopped: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Acting {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the call has begun to act.
    pub fn is_acting(&self) -> bool {
        self.0.acting.load(Ordering::Acquire)
    }

    /// The call begins to act (crate-visible for the transport's tests).
    pub(crate) fn set_acting(&self) {
        self.0.acting.store(true, Ordering::Release);
    }

    /// The transport: the client left; the call runs on without it.
    pub fn client_left(&self) {
        self.0.left.store(true, Ordering::Release);
        self.0.wake.notify_one();
    }

    /// The transport: the client left once the call acted, and the call
    /// is stopped where it stands; its record says its effect is unknown.
    pub fn stopped(&self) {
        self.0.stopped.store(true, Ordering::Release);
    }

    fn was_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::Acquire)
    }

    /// Whether the client left while the call acted.
    pub fn has_left(&self) -> bool {
        self.0.left.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for RequestMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMeta")
            .field("method", &self.method)
            .field("request_id", &self.request_id)
            .field("source", &self.source)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// The request id of a call: the client's own (`x-request-id`), if it is 1
/// to 64 ASCII letters, digits and dashes, else a new one ([`server_id`]).
pub fn request_id(given: Option<&str>) -> String {
    let given = given.filter(|v| {
        !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    match given {
        Some(id) => id.to_owned(),
        None => server_id(),
    }
}

/// An id unique to this process run and chosen by no client: a random
/// prefix chosen at start-up and a counter (no system call per request,
/// unlike a UUID). Made request ids and the `call` of a change's records.
fn server_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    // `{prefix}-{n:x}`, by hand: `format!` costs more than the copy.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = String::with_capacity(prefix.len() + 17);
    id.push_str(prefix);
    id.push('-');
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        let nibble = ((n >> (i * 4)) & 0xf) as u8;
        id.push(char::from(b"0123456789abcdef"[usize::from(nibble)]));
    }
    id
}

/// The token of an `authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<Zeroizing<String>> {
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))?;
    Some(Zeroizing::new(token.trim().to_owned()))
}

/// One request from arrival to answer. Every path out of a handler goes
/// through `fail` or `ok`, which write the audit record (before the answer
/// leaves) and the metrics; a call dropped before either is audited as
/// `CANCELLED`.
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
    /// The request record of this change is written: the answer is its outcome.
    requested: bool,
    /// The server's id of this change, in both its records (`call`); made
    /// with its request record (a read has none).
    call_id: Option<String>,
    /// The capability the call was authorized for (anomaly baselines).
    capability: Option<Capability>,
    /// See [`Acting`].
    acting: Option<Acting>,
}

impl Call {
    /// Starts a call: for `Access::Token`, checks the seal and the token. A
    /// refusal is audited before it is returned.
    pub async fn begin(
        core: &Arc<Core>,
        meta: RequestMeta,
        access: Access,
    ) -> Result<Self, Failure> {
        let mut call = Self {
            core: core.clone(),
            method: meta.method,
            request_id: meta.request_id,
            source: meta.source,
            token: meta.token,
            caller: None,
            subject: None,
            resource: None,
            started: Instant::now(),
            finished: false,
            requested: false,
            call_id: None,
            capability: None,
            acting: meta.acting,
        };
        if access == Access::Token {
            if core.is_sealed() {
                return Err(call.fail(BarrierError::Sealed));
            }
            let authenticated = match call.token.as_deref() {
                None => Err(AuthError::MissingToken),
                Some(token) => {
                    // The cache fence is taken here, at the request's start,
                    // without holding a runtime thread while etcd answers.
                    let fresh = core.barrier.cache_fence_async().await;
                    (core.gate).authenticate_fenced(token, call.source.map(|s| s.ip()), fresh)
                }
            };
            let caller = match authenticated {
                Ok(caller) => caller,
                Err(e) => return Err(call.fail(e)),
            };
            let counted = caller.counted_use;
            call.caller = Some(caller);
            // A counted use is on disk before the call acts, so a crash
            // cannot hand the use back. A change has acted from the spent
            // use on (its last use revokes the token): if its client
            // leaves during this wait, it runs to its end and its records
            // show the use (`api::detach`).
            if counted {
                if class(call.method) == Class::Change {
                    call.mark_acting();
                }
                if let Err(e) = core.barrier.durable().await {
                    return Err(call.fail(e));
                }
            }
            if requested_at_begin(call.method, access) {
                call.record_request_async().await?;
            }
        }
        Ok(call)
    }

    /// From here on the call acts: its transport lets it run to its end if
    /// the client leaves (`api::detach`).
    fn mark_acting(&self) {
        if let Some(acting) = &self.acting {
            acting.set_acting();
        }
    }

    /// Gives this change its server id (`call` in its two records), once.
    fn name_call(&mut self) {
        if self.call_id.is_none() {
            self.call_id = Some(server_id());
        }
    }

    /// Whether the client left while the call acted (see [`Acting`]).
    pub fn client_left(&self) -> bool {
        self.acting.as_ref().is_some_and(Acting::has_left)
    }

    /// Resolves when the client leaves while the call acts; never for a
    /// call whose transport does not tell.
    pub async fn client_gone(&self) {
        match &self.acting {
            Some(acting) => {
                while !acting.has_left() {
                    acting.0.wake.notified().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Writes the request record of a change before it acts; a call that
    /// cannot write it ends (audited if possible) with `UNAVAILABLE` and must
    /// not act. Once per call; a read writes nothing here.
    pub fn record_request(&mut self) -> Result<(), Failure> {
        if self.requested || class(self.method) == Class::Read {
            return Ok(());
        }
        self.name_call();
        let mut text = AddrText::default();
        let source = self.source.map(|s| text.format(s));
        let event = self.event(Outcome::Allowed, "OK", None, &[], source);
        let written =
            self.core
                .audit
                .append_phase_with(&event, Some(Phase::Request), self.audit_mac());
        self.requested_or_end(written)
    }

    /// [`Self::record_request`] for async callers: the record goes through
    /// the log's batched writer (`AuditLog::append_async_with`), which
    /// answers once this record is written, so the call still does not act
    /// before its request record is in the log.
    ///
    /// The call counts as requested from the first poll on: that poll queues
    /// the record, and a queued record is written even if this future is
    /// dropped (a client that went away). A call dropped meanwhile is then
    /// recorded as the outcome of that request (`CANCELLED`), never as a
    /// record of no phase that would leave the request open in
    /// `audit verify`. If the record cannot be written, the call ends as
    /// `record_request`'s does.
    pub async fn record_request_async(&mut self) -> Result<(), Failure> {
        if self.requested || class(self.method) == Class::Read {
            return Ok(());
        }
        self.requested = true;
        self.mark_acting();
        self.name_call();
        let mut text = AddrText::default();
        let source = self.source.map(|s| text.format(s));
        let event = self.event(Outcome::Allowed, "OK", None, &[], source);
        let written = self
            .core
            .audit
            .append_async_with(&event, Some(Phase::Request), self.audit_mac())
            .await;
        self.requested_or_end(written)
    }

    /// After the request record was tried: marks it written, or ends the
    /// call (`UNAVAILABLE`) when it was not, with a record of no phase
    /// (there is no request for it to answer).
    fn requested_or_end(
        &mut self,
        written: Result<(), crate::audit::AuditError>,
    ) -> Result<(), Failure> {
        match written {
            Ok(()) => {
                self.requested = true;
                self.mark_acting();
                Ok(())
            }
            Err(e) => {
                self.requested = false;
                let failure = Failure::from(e);
                let kind = failure.kind();
                // Its own record most likely fails too; the answer is
                // `UNAVAILABLE` either way.
                let _ = self.finish(
                    kind.outcome(),
                    kind.code_name(),
                    Some(failure.message()),
                    &[],
                );
                Err(failure)
            }
        }
    }

    /// [`Self::record_request`] for the one change that goes ahead without
    /// the log: sealing is the safe direction, so an operator can seal a
    /// vault whose audit log cannot be written. The failure goes to the
    /// server log.
    pub fn record_request_or_log(&mut self) {
        // It goes ahead either way, so it acts from here whatever the log
        // says: a client that leaves now does not stop it (`api::detach`).
        self.mark_acting();
        self.name_call();
        let source = self.source.map(|s| s.to_string());
        let event = self.event(Outcome::Allowed, "OK", None, &[], source.as_deref());
        match self.core.audit.append_phase(&event, Some(Phase::Request)) {
            Ok(()) => self.requested = true,
            Err(e) => tracing::error!(
                method = self.method,
                request_id = %self.request_id,
                error = %e,
                "audit request record not written; going ahead"
            ),
        }
    }

    /// The authenticated caller (`Access::Token` calls).
    pub fn caller(&self) -> Option<&Caller> {
        self.caller.as_ref()
    }

    /// Notes a secret read in the read set (issue 13) of the caller's
    /// identity and, for a delegated token, of its actor's too: what an
    /// agent reads on a subject's behalf is the agent's read as well, so
    /// decommissioning either one rotates it. A path new to an identity is
    /// on disk before the answer; a known one is a lookup in memory. Every
    /// transport's read goes through here (gRPC `Get`, HTTPS KV read).
    pub async fn note_read(&mut self, path: &str) -> Result<(), Failure> {
        let Some(caller) = &self.caller else {
            return Ok(());
        };
        let now = self.core.clock().now_ms();
        let mut noted = self.core.reads.note(&caller.identity, path, now).await;
        if let (Ok(()), Some(actor)) = (&noted, &caller.actor) {
            if actor.actor_identity != caller.identity {
                noted = (self.core.reads)
                    .note(&actor.actor_identity, path, now)
                    .await;
            }
        }
        self.check(noted)
    }

    /// Runs `work` on the blocking pool, not on the thread that serves this
    /// call's connection (see [`crate::core::offload`]): for a call that
    /// reads a whole table or prefix. It takes one of the caller's turns of
    /// `kind` ([`Caller::turn_owner`]). Once the turn has come (a wait of
    /// up to 10 s), the caller is checked again before `work` starts: its
    /// token as it stands then, and the capability this call was
    /// authorized for against the token's policies as they stand then
    /// ([`recheck`]). A token revoked or expired meanwhile is
    /// `UNAUTHENTICATED`, a policy narrowed meanwhile `PERMISSION_DENIED`.
    /// A refusal (no turn in time, or the second check) or a failure of
    /// `work` is audited as this call's outcome.
    pub async fn off_thread<T, E, F>(&mut self, kind: Work, work: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        E: Into<Failure> + Send + 'static,
        F: FnOnce(&Core) -> Result<T, E> + Send + 'static,
    {
        self.off_thread_as(kind, move |core, _| work(core)).await
    }

    /// [`Self::off_thread`] for a work that filters what it reads by the
    /// caller's policies: it is given the caller as checked once its turn
    /// came (`None` for a call without a token). The call keeps its first
    /// caller for its audit record (the same token).
    pub async fn off_thread_as<T, E, F>(&mut self, kind: Work, work: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        E: Into<Failure> + Send + 'static,
        F: FnOnce(&Core, Option<&Caller>) -> Result<T, E> + Send + 'static,
    {
        let core = Arc::clone(&self.core);
        let caller = self.caller.clone();
        let authorized = self.authorized();
        let owner = self.caller.as_ref().map_or("", Caller::turn_owner);
        let pool = self.core.offload.of(kind);
        let done = pool
            .run(owner, move || {
                let authorized = authorized.as_ref().map(|(c, r)| (*c, r.as_str()));
                let fresh = recheck(&core, caller.as_ref(), authorized)?;
                work(&core, fresh.as_ref()).map_err(Into::into)
            })
            .await;
        self.check(done.and_then(|worked| worked))
    }

    /// The capability and resource this call was authorized for, if it was.
    fn authorized(&self) -> Option<(Capability, String)> {
        self.capability.zip(self.resource.clone())
    }

    /// The authenticated caller, or an audited `UNAUTHENTICATED` for a call
    /// that has none.
    pub fn require_caller(&mut self) -> Result<Caller, Failure> {
        match &self.caller {
            Some(caller) => Ok(caller.clone()),
            None => Err(self.fail(AuthError::MissingToken)),
        }
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The peer address.
    pub fn source(&self) -> Option<SocketAddr> {
        self.source
    }

    /// Refuses (audited, `Denied`) unless the caller holds `root` or every
    /// one of `policies`: nobody hands an identity more than they hold.
    pub fn require_policy_subset(&mut self, policies: &[String]) -> Result<(), Failure> {
        let allowed = self
            .caller
            .as_ref()
            // A delegated token hands no policies on (its actor's side
            // would not bind the identity it names).
            .is_some_and(|c| {
                c.actor.is_none()
                    && (c.is_root() || policies.iter().all(|p| c.policies.contains(p)))
            });
        if allowed {
            Ok(())
        } else {
            Err(self.fail(AuthError::Denied))
        }
    }

    /// Passes a result through: parsed input before the check, the domain's
    /// answer after it. An error ends the call (audited, then returned).
    pub fn check<T, E: Into<Failure>>(&mut self, result: Result<T, E>) -> Result<T, Failure> {
        result.map_err(|e| self.fail(e))
    }

    /// Checks the caller's policies for `capability` on `resource`, which
    /// becomes the call's audited resource. The proof is what a domain write
    /// requires.
    pub fn authorize(
        &mut self,
        capability: Capability,
        resource: String,
    ) -> Result<Authorized, Failure> {
        let decision = match &self.caller {
            Some(caller) => self.core.gate.authorize(caller, capability, &resource),
            None => Err(AuthError::MissingToken),
        };
        self.resource = Some(resource);
        self.capability = Some(capability);
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

    /// Ends the call with an error: audits it and hands back what to answer
    /// (`Unavailable` instead, if the audit record cannot be written).
    pub fn fail(&mut self, error: impl Into<Failure>) -> Failure {
        let failure = error.into();
        let kind = failure.kind();
        match self.finish(
            kind.outcome(),
            kind.code_name(),
            Some(failure.message()),
            &[],
        ) {
            Ok(()) => failure,
            Err(audit_down) => audit_down,
        }
    }

    /// Ends the call successfully; `values` are the secret values it carried
    /// (written to the audit log only as HMACs).
    pub fn ok(mut self, values: &[(&str, &[u8])]) -> Result<(), Failure> {
        self.finish(Outcome::Allowed, "OK", None, values)
    }

    /// `ok` for the busiest calls (reads, token issue): the audit record
    /// shares one `write` with the records of concurrent calls
    /// (`AuditLog::append_async`), and the call still answers only once its
    /// own record is written.
    pub async fn ok_async(mut self, values: &[(&str, &[u8])]) -> Result<(), Failure> {
        self.finished = true;
        let mut text = AddrText::default();
        let source = self.source.map(|s| text.format(s));
        let event = self.event(Outcome::Allowed, "OK", None, values, source);
        let written = if self.unidentified() {
            self.core.audit.append_unauthenticated(&event)
        } else {
            self.core
                .audit
                .append_async_with(&event, self.phase(), self.audit_mac())
                .await
        };
        let answered = self.after_audit("OK", written.map_err(Failure::from));
        // The call ends here (`self` is consumed): its identity, accessor and
        // resource move into the observation instead of being copied.
        let caller = self.caller.take();
        let subject = self.subject.take();
        let resource = self.resource.take();
        let code = match &answered {
            Ok(()) => "OK",
            Err(f) => f.kind().code_name(),
        };
        let (identity, accessor) = match (caller, subject) {
            (Some(c), _) => (Some(c.identity), Some(c.accessor)),
            (None, Some((identity, accessor))) => (Some(identity), Some(accessor)),
            (None, None) => (None, None),
        };
        self.send_observation(identity, accessor, resource, code);
        answered
    }

    fn finish(
        &mut self,
        outcome: Outcome,
        code: &'static str,
        error: Option<&str>,
        values: &[(&str, &[u8])],
    ) -> Result<(), Failure> {
        self.finished = true;
        let mut text = AddrText::default();
        let source = self.source.map(|s| text.format(s));
        let event = self.event(outcome, code, error, values, source);
        let written = if self.unidentified() {
            self.core.audit.append_unauthenticated(&event)
        } else {
            self.core
                .audit
                .append_phase_with(&event, self.phase(), self.audit_mac())
        };
        let answered = self.after_audit(code, written.map_err(Failure::from));
        self.observe(&answered, code);
        answered
    }

    /// Hands the answered call to the anomaly detector: copies its
    /// identity, accessor and resource into an observation and queues it
    /// without waiting (`Anomalies::observe`; a full queue drops it). Only
    /// calls the detector uses are copied: those of an identity, and failed
    /// authentications.
    fn observe(&self, answered: &Result<(), Failure>, code: &'static str) {
        let code = match answered {
            Ok(()) => code,
            Err(f) => f.kind().code_name(),
        };
        let (identity, accessor) = match (&self.caller, &self.subject) {
            (Some(c), _) => (Some(&c.identity), Some(&c.accessor)),
            (None, Some((identity, accessor))) => (Some(identity), Some(accessor)),
            (None, None) => (None, None),
        };
        if identity.is_none() && code != "UNAUTHENTICATED" && self.method != "keyward.v1.Auth/Login"
        {
            return;
        }
        self.send_observation(
            identity.cloned(),
            accessor.cloned(),
            self.resource.clone(),
            code,
        );
    }

    /// Queues the observation of this call's answer (see [`Self::observe`]):
    /// only calls of an identity, failed authentications and logins.
    fn send_observation(
        &self,
        identity: Option<String>,
        accessor: Option<String>,
        resource: Option<String>,
        code: &'static str,
    ) {
        if identity.is_none() && code != "UNAUTHENTICATED" && self.method != "keyward.v1.Auth/Login"
        {
            return;
        }
        self.core.anomalies.observe(crate::anomaly::Observation {
            at_ms: self.core.clock().now_ms(),
            identity,
            accessor,
            source: self.source.map(|s| s.ip()),
            method: self.method,
            resource,
            capability: self.capability.map(Capability::as_str),
            code,
        });
    }

    /// The remembered audit HMAC of this call's token: the caller was
    /// authenticated with `self.token`, so the cache entry it came from is
    /// that token's.
    fn audit_mac(&self) -> Option<&crate::audit::TokenMac> {
        self.caller.as_ref()?.audit_mac.as_deref()
    }

    /// A call that names nobody and changed nothing (a bad or missing token,
    /// a failed login, a status): its record may be counted into an
    /// aggregate (`AuditLog::append_unauthenticated`), so that a loop of
    /// them cannot fill the disk.
    fn unidentified(&self) -> bool {
        self.caller.is_none() && self.subject.is_none() && !self.requested
    }

    /// The phase of the answer's record: `outcome` after a request record.
    fn phase(&self) -> Option<Phase> {
        self.requested.then_some(Phase::Outcome)
    }

    /// The audit record of this call's answer.
    fn event<'a>(
        &'a self,
        outcome: Outcome,
        code: &'static str,
        error: Option<&'a str>,
        values: &'a [(&'a str, &'a [u8])],
        source: Option<&'a str>,
    ) -> AuditEvent<'a> {
        let (identity, accessor) = match (&self.caller, &self.subject) {
            (Some(c), _) => (Some(c.identity.as_str()), Some(c.accessor.as_str())),
            (None, Some((identity, accessor))) => {
                (Some(identity.as_str()), Some(accessor.as_str()))
            }
            (None, None) => (None, None),
        };
        AuditEvent {
            request_id: &self.request_id,
            method: self.method,
            resource: self.resource.as_deref(),
            identity,
            accessor,
            actor: self
                .caller
                .as_ref()
                .and_then(|c| c.actor.as_ref())
                .map(|a| crate::audit::AuditActor {
                    identity: &a.actor_identity,
                    accessor: &a.actor_accessor,
                    subject_accessor: &a.subject_accessor,
                }),
            source,
            outcome,
            code,
            error,
            token: self.token.as_deref().map(|t| t.as_bytes()),
            values,
            call: self.call_id.as_deref(),
        }
    }

    /// Counts the call in the metrics under the code it answers with (an
    /// audit failure turns any answer into that failure).
    fn after_audit(&self, code: &'static str, written: Result<(), Failure>) -> Result<(), Failure> {
        let code = match &written {
            Ok(()) => code,
            Err(f) => f.kind().code_name(),
        };
        self.core
            .metrics
            .observe_request(self.method, code, self.started.elapsed());
        written
    }
}

/// A peer address as text, on the stack: the audit record's `source`
/// without a `String` a call.
struct AddrText {
    buf: [u8; 64],
    len: usize,
}

impl Default for AddrText {
    fn default() -> Self {
        Self {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl AddrText {
    /// One ASCII byte (an IPv4 text is at most 21 bytes: no overflow).
    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    /// `value` in decimal, no leading zeros.
    fn push_decimal(&mut self, value: u32) {
        let mut digits = [0u8; 10];
        let mut at = digits.len();
        let mut rest = value;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        for &digit in &digits[at..] {
            self.push(digit);
        }
    }

    /// `addr` as `Display` writes it (at most 64 bytes: an IPv6 address with
    /// a scope id and a port).
    fn format(&mut self, addr: SocketAddr) -> &str {
        self.len = 0;
        match addr {
            // The common case by hand (`a.b.c.d:port`): the formatting
            // machinery costs more than the digits.
            SocketAddr::V4(v4) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    self.push_decimal(u32::from(octet));
                }
                self.push(b':');
                self.push_decimal(u32::from(v4.port()));
            }
            SocketAddr::V6(_) => {
                if write!(self, "{addr}").is_err() {
                    self.len = 0;
                }
            }
        }
        // Only whole `&str`s were copied in, so this is UTF-8.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            // A handler returned without answering through `ok` or `fail`
            // (a bug, or the client went away mid-call): still audit it.
            let kind = FailureKind::Cancelled;
            let message = if self.acting.as_ref().is_some_and(Acting::was_stopped) {
                // `api::detach` could not keep a change whose client left
                // after it acted: it may have changed something.
                "the client left after the call began to act, and the call was stopped where it \
                 stood (no room to finish it, or shutting down): what it changed is not known"
            } else {
                "call ended without an answer"
            };
            let _ = self.finish(kind.outcome(), kind.code_name(), Some(message), &[]);
        }
    }
}

/// The second check of [`Call::off_thread`], on the blocking thread once
/// the call's turn has come: the caller as its token stands now
/// ([`Gate::recheck`](super::auth::Gate::recheck)), allowed `authorized`
/// by its policies as they stand now. It records no use of a grant: the
/// first check did.
fn recheck(
    core: &Core,
    caller: Option<&Caller>,
    authorized: Option<(Capability, &str)>,
) -> Result<Option<Caller>, Failure> {
    let Some(caller) = caller else {
        return Ok(None);
    };
    let fresh = core.gate.recheck(caller)?;
    if let Some((capability, resource)) = authorized {
        if fresh.set.check(resource, capability).is_none() {
            return Err(AuthError::Denied.into());
        }
    }
    Ok(Some(fresh))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::audit::AuditLog;
    use crate::barrier::{Barrier, BarrierOptions};
    use crate::clock::Clock;
    use crate::metrics::Metrics;
    use crate::secrets::DataLimits;
    use crate::storage::SledBackend;
    use crate::token::TokenRequest;

    struct Vault {
        _dir: tempfile::TempDir,
        core: Arc<Core>,
        audit: PathBuf,
        root: String,
        share: Zeroizing<String>,
    }

    async fn vault() -> Vault {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path().join("data")).unwrap();
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
        let audit = dir.path().join("audit.log");
        let core = Arc::new(Core::new(
            Arc::new(barrier),
            AuditLog::open(&audit, crate::clock::Clock::system()).unwrap(),
            Arc::new(Metrics::new()),
            DataLimits::default(),
            crate::clock::Clock::system(),
            crate::clock::Shutdown::never(),
        ));
        let init = core.init(1, 1).await.unwrap();
        core.unseal(&init.shares[0].0).await.unwrap();
        Vault {
            root: init.root_token.expose().to_owned(),
            share: init.shares[0].0.clone(),
            _dir: dir,
            core,
            audit,
        }
    }

    /// A token that holds no policy: it authenticates, and may do nothing.
    fn powerless_token(core: &Core) -> String {
        token_with_uses(core, 0)
    }

    /// [`powerless_token`] good for `uses` calls (0: unlimited).
    fn token_with_uses(core: &Core, uses: u32) -> String {
        let issued = core
            .tokens
            .issue(
                TokenRequest {
                    identity: "svc".into(),
                    policies: Vec::new(),
                    ttl: Duration::from_secs(60),
                    max_ttl: Duration::ZERO,
                    hard_expiry_ms: None,
                    uses,
                    cidrs: Vec::new(),
                    parent_accessor: None,
                    method: "token",
                },
                Clock::system().now_ms(),
            )
            .unwrap();
        issued.token.expose().to_owned()
    }

    fn meta(request_id: &str, token: Option<&str>) -> RequestMeta {
        RequestMeta {
            acting: None,
            method: "keyward.v1.Secrets/Put",
            request_id: request_id.to_owned(),
            source: Some("127.0.0.1:40000".parse().unwrap()),
            token: token.map(|t| Zeroizing::new(t.to_owned())),
        }
    }

    /// The answer's audit record of `request_id` (exactly one; a change
    /// also has its request record, which is not returned).
    fn record(audit: &Path, request_id: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(audit).unwrap();
        let mut found: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|r| r["request_id"] == request_id && r["phase"] != "request")
            .collect();
        assert_eq!(found.len(), 1, "records of {request_id}: {found:?}");
        found.remove(0)
    }

    /// An operator's unseal acts only on a sealed vault, decided under the
    /// seal lock, and its request record (`before`) comes first: on an
    /// unsealed vault nothing runs; a record that fails stops it.
    #[tokio::test]
    async fn an_unseal_records_first_and_acts_only_on_a_sealed_vault() {
        let v = vault().await;
        let mut recorded = 0;
        let open = v
            .core
            .unseal_if_sealed(Some("not a share"), || {
                recorded += 1;
                Ok::<(), ()>(())
            })
            .await
            .unwrap()
            .unwrap();
        assert!(!open.sealed);
        assert_eq!(recorded, 0, "an unsealed vault: nothing to record");

        v.core.seal().await;
        let refused = v
            .core
            .unseal_if_sealed(Some(&v.share), || Err("no record"))
            .await;
        assert_eq!(refused.err(), Some("no record"));
        assert!(
            v.core.is_sealed(),
            "a share whose record failed is not given"
        );

        let core = v.core.clone();
        let status = v
            .core
            .unseal_if_sealed(Some(&v.share), || {
                assert!(core.is_sealed(), "recorded before the share is given");
                recorded += 1;
                Ok::<(), ()>(())
            })
            .await
            .unwrap()
            .unwrap();
        assert!(!status.sealed);
        assert_eq!(recorded, 1);
    }

    /// A seal goes ahead when its request record cannot be written, so it
    /// acts from there either way.
    #[tokio::test]
    async fn a_seal_acts_from_its_request_even_with_the_log_down() {
        let v = vault().await;
        // The log's path now names a device every write to fails on (the
        // reopen's own first record fails already).
        std::fs::remove_file(&v.audit).unwrap();
        std::os::unix::fs::symlink("/dev/full", &v.audit).unwrap();
        assert!(v.core.audit.reopen().is_err());
        let acting = Acting::new();
        let mut m = meta("req-seal", Some(&v.root));
        m.method = "keyward.v1.Sys/Seal";
        m.acting = Some(acting.clone());
        let mut call = Call::begin(&v.core, m, Access::Token).await.unwrap();
        assert!(!acting.is_acting());
        call.record_request_or_log();
        assert!(acting.is_acting(), "a seal acts though its record failed");
        assert!(!call.requested, "no request record was written");
    }

    /// A use-limited token's use is spent at the token check, before the
    /// call waits for it to be durable: a change has acted from there on
    /// (so a client that leaves during that wait does not stop it), a read
    /// has not.
    #[tokio::test]
    async fn a_change_acts_from_its_spent_use_on() {
        let v = vault().await;
        let token = token_with_uses(&v.core, 5);
        for (method, acts) in [
            ("keyward.v1.Secrets/Put", true),
            ("keyward.v1.Secrets/Get", false),
        ] {
            let acting = Acting::new();
            let mut m = meta(&format!("req-use-{acts}"), Some(&token));
            m.method = method;
            m.acting = Some(acting.clone());
            let mut begin = Box::pin(Call::begin(&v.core, m, Access::Token));
            // The first poll spends the use and stops at the durability
            // wait (the group commit runs on a task of its own).
            let first = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(begin.as_mut(), cx).is_ready())
            });
            assert!(
                !first.await,
                "{method}: waits for the spent use to be durable"
            );
            assert_eq!(acting.is_acting(), acts, "{method}");
            drop(begin.await.unwrap());
        }
    }

    /// The transport's mark (`api::detach`): set once a change acts, never
    /// by a read; a change the transport had to stop after it acted says
    /// so in its record instead of a plain `CANCELLED`.
    #[tokio::test]
    async fn the_acting_mark_follows_the_request_record() {
        let v = vault().await;
        let read = Acting::new();
        let mut m = meta("req-read", Some(&v.root));
        m.method = "keyward.v1.Secrets/Get";
        m.acting = Some(read.clone());
        drop(Call::begin(&v.core, m, Access::Token).await.unwrap());
        assert!(!read.is_acting(), "a read never acts");

        let left = Acting::new();
        let mut m = meta("req-left", Some(&v.root));
        m.acting = Some(left.clone());
        let call = Call::begin(&v.core, m, Access::Token).await.unwrap();
        assert!(
            left.is_acting(),
            "a token change acts from its request record on"
        );
        assert!(!call.client_left());
        left.client_left();
        assert!(call.client_left());
        tokio::time::timeout(Duration::from_secs(30), call.client_gone())
            .await
            .expect("the call hears that its client left");
        left.stopped();
        drop(call);
        let r = record(&v.audit, "req-left");
        assert_eq!(r["code"], "CANCELLED");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("what it changed is not known"),
            "{r}"
        );
        let plain = Acting::new();
        let mut m = meta("req-plain", Some(&v.root));
        m.acting = Some(plain);
        drop(Call::begin(&v.core, m, Access::Token).await.unwrap());
        let r = record(&v.audit, "req-plain");
        assert_eq!(r["error"], "call ended without an answer");
    }

    #[tokio::test]
    async fn a_denied_call_is_audited_with_the_grpc_code_name() {
        let v = vault().await;
        let token = powerless_token(&v.core);
        let mut call = Call::begin(&v.core, meta("req-denied", Some(&token)), Access::Token)
            .await
            .unwrap();
        let refused = call
            .authorize(Capability::Write, "secret/app/db".into())
            .unwrap_err();
        assert_eq!(refused.kind(), FailureKind::Denied);
        drop(call);
        let r = record(&v.audit, "req-denied");
        assert_eq!(r["code"], "PERMISSION_DENIED");
        assert_eq!(r["outcome"], "denied");
        assert_eq!(r["resource"], "secret/app/db");
        assert_eq!(r["identity"], "svc");
        assert_eq!(r["method"], "keyward.v1.Secrets/Put");
        assert_eq!(r["source"], "127.0.0.1:40000");
        assert!(!r.to_string().contains(&token));
    }

    #[tokio::test]
    async fn a_call_without_a_token_is_refused_and_audited() {
        let v = vault().await;
        let refused = Call::begin(&v.core, meta("req-anon", None), Access::Token)
            .await
            .err()
            .unwrap();
        assert_eq!(refused.kind(), FailureKind::Unauthenticated);
        let r = record(&v.audit, "req-anon");
        assert_eq!(r["code"], "UNAUTHENTICATED");
        assert_eq!(r["outcome"], "denied");
    }

    #[tokio::test]
    async fn a_domain_failure_is_audited_with_its_kind() {
        let v = vault().await;
        let mut call = Call::begin(&v.core, meta("req-missing", Some(&v.root)), Access::Token)
            .await
            .unwrap();
        let path = call
            .check(crate::secrets::SecretPath::parse("app/db"))
            .unwrap();
        call.authorize(Capability::Read, path.resource()).unwrap();
        let missing = v
            .core
            .secrets
            .get(&path, crate::secrets::Selector::Version(1));
        let failed = call.check(missing).unwrap_err();
        assert_eq!(failed.kind(), FailureKind::NotFound);
        let r = record(&v.audit, "req-missing");
        assert_eq!(r["code"], "NOT_FOUND");
        assert_eq!(r["outcome"], "failed");
        assert_eq!(r["identity"], "root");
    }

    /// A change whose client goes away while its request record waits in
    /// the log's queue (polled once, then dropped): the record is written,
    /// and the call's own record is that request's outcome (`CANCELLED`),
    /// so `audit verify` finds no request left open.
    #[tokio::test]
    async fn a_change_dropped_while_its_request_record_is_queued_leaves_no_request_open() {
        let v = vault().await;
        tokio::select! {
            biased;
            _ = Call::begin(&v.core, meta("req-gone", Some(&v.root)), Access::Token) => {
                panic!("the request record was written without a yield")
            }
            _ = std::future::ready(()) => {}
        }
        // One whole change after it, so the dropped one is not the last.
        let mut call = Call::begin(&v.core, meta("req-next", Some(&v.root)), Access::Token)
            .await
            .unwrap();
        call.authorize(Capability::Write, "secret/app/db".into())
            .unwrap();
        call.ok(&[]).unwrap();
        let text = std::fs::read_to_string(&v.audit).unwrap();
        let gone: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|r| r["request_id"] == "req-gone")
            .collect();
        assert_eq!(gone.len(), 2, "{gone:?}");
        assert_eq!(gone[0]["phase"], "request");
        assert_eq!(gone[1]["phase"], "outcome");
        assert_eq!(gone[1]["code"], "CANCELLED");
        let report = crate::audit::verify_file(&v.audit).unwrap();
        assert!(report.ok, "{report:?}");
        assert!(report.unanswered.is_empty(), "{:?}", report.unanswered);
        assert!(
            report.in_flight_at_end.is_empty(),
            "{:?}",
            report.in_flight_at_end
        );
    }

    #[tokio::test]
    async fn a_call_dropped_without_an_answer_is_still_audited() {
        let v = vault().await;
        let mut call = Call::begin(&v.core, meta("req-dropped", Some(&v.root)), Access::Token)
            .await
            .unwrap();
        call.authorize(Capability::Write, "secret/app/db".into())
            .unwrap();
        drop(call);
        let r = record(&v.audit, "req-dropped");
        assert_eq!(r["code"], "CANCELLED");
        assert_eq!(r["outcome"], "failed");
        assert_eq!(r["resource"], "secret/app/db");
    }

    #[tokio::test]
    async fn an_answered_call_is_audited_once() {
        let v = vault().await;
        let mut call = Call::begin(&v.core, meta("req-ok", Some(&v.root)), Access::Token)
            .await
            .unwrap();
        call.authorize(Capability::Write, "secret/app/db".into())
            .unwrap();
        call.ok(&[("password", b"hunter2")]).unwrap();
        let r = record(&v.audit, "req-ok");
        assert_eq!(r["code"], "OK");
        assert_eq!(r["outcome"], "allowed");
        assert!(!r.to_string().contains("hunter2"));
    }

    /// Every method keyward serves is a change (in `class`) or one of
    /// these reads, so a new method that writes cannot be left a read by
    /// accident: a change writes a request record before it acts and runs
    /// to its end when its client leaves (`api::detach`).
    #[test]
    fn every_served_method_is_classed_on_purpose() {
        use prost::Message as _;
        const READS: &[&str] = &[
            "keyward.v1.Auth/LookupToken",
            "keyward.v1.Dynamic/GetRole",
            "keyward.v1.Dynamic/ListRoles",
            "keyward.v1.Federation/Discovery",
            "keyward.v1.Federation/GetOidcRole",
            "keyward.v1.Governance/ListAnomalies",
            "keyward.v1.Governance/Report",
            "keyward.v1.Governance/WatchAnomalies",
            "keyward.v1.Identities/Get",
            "keyward.v1.Identities/List",
            "keyward.v1.Identities/ListOidcIssuers",
            "keyward.v1.Identities/ListSecretIds",
            "keyward.v1.Leases/List",
            "keyward.v1.Leases/Lookup",
            "keyward.v1.Lifecycle/Attestations",
            "keyward.v1.Lifecycle/Reads",
            "keyward.v1.Pki/Ca",
            "keyward.v1.Pki/Crl",
            "keyward.v1.Pki/GetRole",
            "keyward.v1.Pki/List",
            "keyward.v1.Pki/ListRoles",
            "keyward.v1.Policies/Get",
            "keyward.v1.Policies/List",
            "keyward.v1.Rotation/GetPolicy",
            "keyward.v1.Rotation/History",
            "keyward.v1.Rotation/ListPolicies",
            "keyward.v1.Scan/Match",
            "keyward.v1.Secrets/Get",
            "keyward.v1.Secrets/List",
            "keyward.v1.Secrets/Metadata",
            "keyward.v1.Secrets/Watch",
            "keyward.v1.Sys/AuditHash",
            "keyward.v1.Sys/SnapshotSave",
            "keyward.v1.Sys/Status",
        ];
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = 0;
        for file in set.file.iter().filter(|f| f.package() == "keyward.v1") {
            for service in &file.service {
                for method in &service.method {
                    let name = format!("keyward.v1.{}/{}", service.name(), method.name());
                    let change = class(&name) == Class::Change;
                    let read = READS.contains(&name.as_str());
                    assert!(change != read, "{name}: a change and a read, or neither");
                    served += 1;
                }
            }
        }
        assert_eq!(served, READS.len() + 50, "a listed method is not served");
    }

    #[test]
    fn request_ids_are_kept_when_well_formed_and_made_otherwise() {
        assert_eq!(request_id(Some("abc-123")), "abc-123");
        for bad in ["", "a b", "ä", &"x".repeat(65)] {
            let made = request_id(Some(bad));
            assert_ne!(made, bad);
            assert!(!made.is_empty());
        }
        assert_ne!(request_id(None), request_id(None));
        // A made id is the run's prefix, a dash and the counter in hex.
        let a = request_id(None);
        let b = request_id(None);
        let (prefix_a, count_a) = a.split_once('-').unwrap();
        let (prefix_b, count_b) = b.split_once('-').unwrap();
        assert_eq!(prefix_a, prefix_b);
        assert_eq!(prefix_a.len(), 12);
        let (count_a, count_b) = (
            u64::from_str_radix(count_a, 16).unwrap(),
            u64::from_str_radix(count_b, 16).unwrap(),
        );
        assert!(count_b > count_a);
        assert_eq!(format!("{prefix_a}-{count_a:x}"), a);
    }

    #[test]
    fn bearer_takes_the_token_of_the_header() {
        assert_eq!(
            bearer("Bearer kwt_x").as_deref().map(String::as_str),
            Some("kwt_x")
        );
        assert_eq!(
            bearer("bearer kwt_x ").as_deref().map(String::as_str),
            Some("kwt_x")
        );
        assert!(bearer("Basic abc").is_none());
    }

    #[test]
    fn a_source_address_is_written_as_display_writes_it() {
        let addrs = [
            "0.0.0.0:0",
            "127.0.0.1:50123",
            "255.255.255.255:65535",
            "10.0.100.9:8",
            "192.168.1.20:443",
            "[::1]:9",
            "[fe80::1%3]:65535",
            "[2001:db8::ff00:42:8329]:1234",
        ];
        for text in addrs {
            let addr: SocketAddr = text.parse().unwrap();
            let mut buf = AddrText::default();
            assert_eq!(buf.format(addr), addr.to_string());
            // Reused: the earlier text does not linger.
            assert_eq!(buf.format(addr), addr.to_string());
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut buf = AddrText::default();
        for _ in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let ip = std::net::Ipv4Addr::from((rng >> 16) as u32);
            let addr = SocketAddr::from((ip, rng as u16));
            assert_eq!(buf.format(addr), addr.to_string());
        }
    }
}
