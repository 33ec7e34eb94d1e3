//! Decommission: the offboarding of an identity as one persisted run.
//!
//! Steps, each written before the next starts (`lifecycle/decommission/<name>`):
//! 1. plan: what it read (the read set) split into secrets with a rotation
//!    policy (`to_rotate`) and without (`not_rotatable`); what its policies
//!    let it read that it never did (`readable_never_read`, not rotated);
//! 2. revoke: disable the identity (its tokens and secret-ids go with it,
//!    in the identity store's crash order), remove its certificate and OIDC
//!    bindings, and ask every [`CredentialRevoker`] (leases, certificates);
//! 3. rotate: trigger a rotation of each secret in `to_rotate` through the
//!    broker (it runs as `rotation-broker`; a record
//!    `keyward.lifecycle/DecommissionRotate` under the rotation's run id names
//!    the decommission that caused it), one at a time, the run saved after
//!    each trigger;
//! 4. done.
//!
//! Crash order: every prefix is harmless. A crash after the plan resumes at
//! revoke (idempotent: a disabled identity has nothing left to revoke); a
//! crash between two triggers resumes with the secrets not yet triggered
//! (a trigger on a secret whose rotation is still running returns that
//! run); a rotation triggered but not yet spawned is resumed by the broker
//! itself. The server's resume task drives every unfinished run after an
//! unseal. Counts are what each step revoked when it ran: a step that ran
//! twice (a crash before its save) reports what its second run found.
//!
//! A finished run is kept: asking again answers the same result and changes
//! nothing.

use prost::Message;

use super::{CredentialKind, Lifecycle, LifecycleError, LIFECYCLE_IDENTITY};
use crate::audit::{AuditEvent, Outcome};
use crate::identity::{IdentityError, IdentityName, IdentityRecord, Unbind};
use crate::policy::Capability;
use crate::rotation::machine::BROKER_IDENTITY;
use crate::rotation::RotationError;
use crate::secrets::{ListPrefix, SecretPath};

const RUN_PREFIX: &str = "lifecycle/decommission/";

/// How far a run got.
pub const STEP_PLANNED: u32 = 0;
pub const STEP_REVOKED: u32 = 1;
pub const STEP_DONE: u32 = 2;

/// A rotation a decommission triggered.
#[derive(Clone, PartialEq, Message)]
pub struct RotatedSecret {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(string, tag = "2")]
    pub run_id: String,
}

/// A decommission run: its resume point, then its result.
#[derive(Clone, PartialEq, Message)]
pub struct DecommissionRun {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub identity: String,
    /// Who asked for it (identity name).
    #[prost(string, tag = "3")]
    pub requested_by: String,
    #[prost(string, tag = "4")]
    pub request_id: String,
    #[prost(uint64, tag = "5")]
    pub started_ms: u64,
    #[prost(uint32, tag = "6")]
    pub step: u32,
    #[prost(uint32, tag = "7")]
    pub revoked_tokens: u32,
    #[prost(uint32, tag = "8")]
    pub revoked_secret_ids: u32,
    #[prost(uint32, tag = "9")]
    pub revoked_leases: u32,
    #[prost(uint32, tag = "10")]
    pub revoked_certificates: u32,
    /// Read secrets with a rotation policy, in order.
    #[prost(string, repeated, tag = "11")]
    pub to_rotate: Vec<String>,
    #[prost(message, repeated, tag = "12")]
    pub rotated: Vec<RotatedSecret>,
    #[prost(string, repeated, tag = "13")]
    pub not_rotatable: Vec<String>,
    #[prost(string, repeated, tag = "14")]
    pub readable_never_read: Vec<String>,
    #[prost(uint64, tag = "15")]
    pub finished_ms: u64,
    /// Paths dropped from the identity's read set to keep its bound: if not
    /// zero, `readable_never_read` may hold secrets it did read.
    #[prost(uint64, tag = "16")]
    pub read_set_dropped: u64,
    /// Certificate and OIDC bindings removed.
    #[prost(uint32, tag = "17")]
    pub removed_bindings: u32,
}

impl DecommissionRun {
    pub fn is_done(&self) -> bool {
        self.step == STEP_DONE
    }
}

/// Who asked for a decommission, for its records.
#[derive(Debug, Clone)]
pub struct Requester<'a> {
    pub identity: &'a str,
    pub request_id: &'a str,
}

fn run_key(identity: &str) -> String {
    format!("{RUN_PREFIX}{identity}")
}

fn danger_test_fault_point(after: &str) {
    // Read on every call: only the crash tests set it, on a child server.
    let armed = std::env::var("KEYWARD_TEST_DECOMMISSION_CRASH_AFTER")
        .ok()
        .is_some_and(|s| s == after);
    if armed {
        tracing::error!(after, "test fault point: killing the process");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        std::process::abort();
    }
}

impl Lifecycle {
    /// The stored run of `identity`, if any.
    pub fn decommission_run(
        &self,
        identity: &str,
    ) -> Result<Option<DecommissionRun>, LifecycleError> {
        match self.deps.barrier.get(&run_key(identity))? {
            None => Ok(None),
            Some(raw) => DecommissionRun::decode(raw.as_slice())
                .map(Some)
                .map_err(|_| LifecycleError::Corrupt),
        }
    }

    fn save(&self, run: &DecommissionRun) -> Result<(), LifecycleError> {
        self.deps
            .barrier
            .put(&run_key(&run.identity), &run.encode_to_vec())?;
        Ok(())
    }

    async fn save_durable(&self, run: &DecommissionRun) -> Result<(), LifecycleError> {
        self.save(run)?;
        self.deps.barrier.durable().await?;
        Ok(())
    }

    /// Decommissions `name` (see the module doc), or with `dry_run` says
    /// what it would do and changes nothing. A finished run is answered
    /// again as it was; an unfinished one is resumed.
    pub async fn decommission(
        &self,
        name: &IdentityName,
        who: Requester<'_>,
        dry_run: bool,
    ) -> Result<DecommissionRun, LifecycleError> {
        let _driving = self.driving.lock().await;
        if let Some(run) = self.decommission_run(name.as_str())? {
            if run.is_done() || dry_run {
                return Ok(run);
            }
            return self.drive(run).await;
        }
        let record = self
            .deps
            .identities
            .get(name.as_str())?
            .ok_or(IdentityError::NotFound)?;
        let now = self.deps.clock.now_ms();
        let mut run = self.plan(&record, now)?;
        run.requested_by = who.identity.to_owned();
        run.request_id = who.request_id.to_owned();
        if dry_run {
            // What the revoke step would find now. Tokens are not counted
            // (the token store keeps no per-identity count; a dry run does
            // not scan them): `revoked_tokens` stays 0.
            run.revoked_secret_ids =
                u32::try_from(self.deps.identities.list_secret_ids(name, now)?.len())
                    .unwrap_or(u32::MAX);
            for revoker in &self.deps.revokers {
                let n = revoker.count_identity(name.as_str()).map_err(|message| {
                    LifecycleError::Revoker {
                        kind: revoker.kind().as_str(),
                        message,
                    }
                })?;
                match revoker.kind() {
                    CredentialKind::Lease => run.revoked_leases += n,
                    CredentialKind::Certificate => run.revoked_certificates += n,
                }
            }
            run.removed_bindings = bindings_of(&record).len() as u32;
            run.rotated = run
                .to_rotate
                .iter()
                .map(|p| RotatedSecret {
                    path: p.clone(),
                    run_id: String::new(),
                })
                .collect();
            run.id = String::new();
            return Ok(run);
        }
        self.save_durable(&run).await?;
        self.drive(run).await
    }

    /// Step 1: what it read and what it could read.
    fn plan(
        &self,
        record: &IdentityRecord,
        now_ms: u64,
    ) -> Result<DecommissionRun, LifecycleError> {
        let reads = self.deps.reads.of(&record.name)?;
        let mut to_rotate: Vec<String> = Vec::new();
        let mut not_rotatable: Vec<String> = Vec::new();
        for (path, _, _) in &reads.paths {
            let Ok(parsed) = SecretPath::parse(path) else {
                continue;
            };
            if self.deps.broker.policy(&parsed)?.is_some() {
                to_rotate.push(path.clone());
            } else {
                not_rotatable.push(path.clone());
            }
        }
        let compiled = self.deps.policies.compiled_set(&record.policies)?;
        // A read set that dropped paths to keep its bound cannot say what
        // was never read (an identity could read one secret, then many
        // others to push it out): every readable secret is then presumed
        // read, and rotated if it can be.
        let truncated = reads.dropped > 0;
        let everything =
            ListPrefix::parse("").map_err(|e| LifecycleError::Invalid(e.to_string()))?;
        let read: std::collections::HashSet<&str> =
            reads.paths.iter().map(|(p, _, _)| p.as_str()).collect();
        let readable_never_read = self.deps.secrets.list(&everything, |path| {
            !read.contains(path)
                && compiled
                    .check(&format!("secret/{path}"), Capability::Read)
                    .is_some()
        })?;
        let mut readable_never_read = readable_never_read;
        if truncated {
            for path in std::mem::take(&mut readable_never_read) {
                let Ok(parsed) = SecretPath::parse(&path) else {
                    continue;
                };
                if self.deps.broker.policy(&parsed)?.is_some() {
                    to_rotate.push(path);
                } else {
                    not_rotatable.push(path);
                }
            }
            to_rotate.sort();
            not_rotatable.sort();
        }
        Ok(DecommissionRun {
            id: format!("decom-{}", uuid::Uuid::now_v7().simple()),
            identity: record.name.clone(),
            started_ms: now_ms,
            step: STEP_PLANNED,
            to_rotate,
            not_rotatable,
            readable_never_read,
            read_set_dropped: reads.dropped,
            ..Default::default()
        })
    }

    /// Steps 2 to 4, from wherever `run` stopped.
    async fn drive(&self, mut run: DecommissionRun) -> Result<DecommissionRun, LifecycleError> {
        if run.step == STEP_PLANNED {
            self.revoke(&mut run)?;
            run.step = STEP_REVOKED;
            self.save_durable(&run).await?;
            danger_test_fault_point("revoke");
        }
        if run.step == STEP_REVOKED {
            let pending: Vec<String> = run
                .to_rotate
                .iter()
                .filter(|p| !run.rotated.iter().any(|r| &r.path == *p))
                .filter(|p| !run.not_rotatable.contains(p))
                .cloned()
                .collect();
            for path in pending {
                let Ok(parsed) = SecretPath::parse(&path) else {
                    continue;
                };
                let now = self.deps.clock.now_ms();
                match self.deps.broker.trigger(&parsed, now) {
                    Ok((rotation, _new)) => {
                        let note = format!(
                            "caused by decommission {} of identity {} (requested by {})",
                            run.id, run.identity, run.requested_by
                        );
                        let resource = format!("rotation/{path}");
                        self.deps.audit.append(&AuditEvent {
                            request_id: &rotation.run_id,
                            method: "keyward.lifecycle/DecommissionRotate",
                            resource: Some(&resource),
                            identity: Some(BROKER_IDENTITY),
                            accessor: None,
                            actor: None,
                            source: None,
                            outcome: Outcome::Allowed,
                            code: "OK",
                            error: Some(&note),
                            token: None,
                            values: &[],
                            call: None,
                        })?;
                        run.rotated.push(RotatedSecret {
                            path: path.clone(),
                            run_id: rotation.run_id.clone(),
                        });
                        self.save_durable(&run).await?;
                        crate::rotation::scheduler::spawn_run(&self.deps.broker, rotation, None);
                        danger_test_fault_point("rotate-1");
                    }
                    Err(RotationError::NoPolicy) => {
                        // The policy went away since the plan.
                        run.not_rotatable.push(path.clone());
                        self.save(&run)?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            run.step = STEP_DONE;
            run.finished_ms = self.deps.clock.now_ms();
            self.save_durable(&run).await?;
        }
        Ok(run)
    }

    /// Step 2: disable (tokens, secret-ids), bindings, other credentials.
    fn revoke(&self, run: &mut DecommissionRun) -> Result<(), LifecycleError> {
        let name = IdentityName::parse(&run.identity)?;
        let now = self.deps.clock.now_ms();
        let disabled =
            self.deps
                .identities
                .set_disabled(&name, true, false, self.deps.tokens.as_ref(), now);
        let record = match disabled {
            Ok((record, tokens, secret_ids)) => {
                run.revoked_tokens += tokens;
                run.revoked_secret_ids += secret_ids;
                Some(record)
            }
            // Deleted since the plan: its delete revoked its tokens,
            // secret-ids and bindings; what it read is still rotated.
            Err(IdentityError::NotFound) => None,
            Err(e) => return Err(e.into()),
        };
        for binding in record.as_ref().map(bindings_of).unwrap_or_default() {
            match self.deps.identities.unbind(&name, &binding) {
                Ok(_) => run.removed_bindings += 1,
                Err(IdentityError::NoSuchBinding) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for revoker in &self.deps.revokers {
            let n = revoker
                .revoke_identity(&run.identity, now)
                .map_err(|message| LifecycleError::Revoker {
                    kind: revoker.kind().as_str(),
                    message,
                })?;
            match revoker.kind() {
                CredentialKind::Lease => run.revoked_leases += n,
                CredentialKind::Certificate => run.revoked_certificates += n,
            }
        }
        Ok(())
    }

    /// Drives every unfinished run (after an unseal); returns how many.
    pub async fn resume_decommissions(&self) -> Result<usize, LifecycleError> {
        let mut resumed = 0;
        for (_, raw) in self.deps.barrier.scan_prefix(RUN_PREFIX)? {
            let Ok(run) = DecommissionRun::decode(raw.as_slice()) else {
                tracing::warn!("skipping a corrupt decommission run");
                continue;
            };
            if run.is_done() {
                continue;
            }
            let _driving = self.driving.lock().await;
            // Read again under the lock: a request may have finished it.
            let Some(run) = self.decommission_run(&run.identity)? else {
                continue;
            };
            if run.is_done() {
                continue;
            }
            let resource = format!("identity/{}", run.identity);
            self.deps.audit.append(&AuditEvent {
                request_id: &run.id,
                method: "keyward.lifecycle/DecommissionResume",
                resource: Some(&resource),
                identity: Some(LIFECYCLE_IDENTITY),
                accessor: None,
                actor: None,
                source: None,
                outcome: Outcome::Allowed,
                code: "OK",
                error: None,
                token: None,
                values: &[],
                call: None,
            })?;
            tracing::info!(identity = %run.identity, run = %run.id, "resuming a decommission");
            self.drive(run).await?;
            resumed += 1;
        }
        Ok(resumed)
    }
}

impl Lifecycle {
    /// Resumes unfinished decommissions once after each unseal (checked
    /// every [`RESUME_CHECK`]), until `shutdown`.
    pub async fn run_resumer(self, shutdown: crate::clock::Shutdown) {
        let mut resumed = false;
        loop {
            let sealed = self.deps.barrier.status().sealed;
            if sealed {
                resumed = false;
            } else if !resumed {
                match self.resume_decommissions().await {
                    Ok(_) => resumed = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not resume decommissions; trying again");
                        // Not every second: each attempt writes an audit record.
                        tokio::select! {
                            _ = self.deps.clock.sleep(RESUME_RETRY) => {}
                            _ = shutdown.wait() => return,
                        }
                    }
                }
            }
            tokio::select! {
                _ = self.deps.clock.sleep(RESUME_CHECK) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

/// How long the resumer waits after a failed resume.
pub const RESUME_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// How often the resumer looks at the seal.
pub const RESUME_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The bindings an identity logs in with, as `unbind` names them.
fn bindings_of(record: &IdentityRecord) -> Vec<Unbind> {
    let mut out = Vec::new();
    for b in &record.cert_bindings {
        if b.spiffe_id.is_empty() {
            out.push(Unbind::CertSubject(b.subject.clone()));
        } else {
            out.push(Unbind::CertSpiffe(b.spiffe_id.clone()));
        }
    }
    let mut issuers: Vec<String> = record
        .oidc_bindings
        .iter()
        .map(|b| b.issuer.clone())
        .collect();
    issuers.sort();
    issuers.dedup();
    out.extend(issuers.into_iter().map(Unbind::OidcIssuer));
    out
}
