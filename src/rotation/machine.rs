//! The persisted state machine of one rotation run, and the retire that
//! follows it after the grace period.
//!
//! ```text
//!   Generate --ok--> Apply --ok--> Verify --ok--> Promote --> (finished: succeeded)
//!      ^               |             |                         + retire scheduled
//!      +---- retry ----+-------------+  (fresh value, back-off with jitter)
//!                      |             |
//!                      +-- last attempt failed --> Rollback --> (finished: failed)
//! ```
//!
//! Each transition is written (`rotation/run/<path>`, through the broker)
//! and made durable before the next step starts, so a crash or a restart
//! resumes at the recorded step; provider steps are idempotent, and
//! `Generate` stores the new value as the secret's `pending` version before
//! anything touches the target. `current` changes only in `Promote`, which
//! is reached only after `Verify` passed for that very version: a value
//! that did not verify never becomes current. `Rollback` puts `current`
//! back on the target (for a strategy whose apply may have replaced it)
//! and drops `pending`.
//!
//! Every step is an audit record (identity `rotation-broker`, the run id as
//! request id, generated values as HMACs only) and a metric.
//!
//! No storage of its own: it reads and writes secrets through
//! `secrets::SecretStore` and its records through the [`super::Broker`],
//! whose [`super::RotationDeps`] are all it uses. Time comes from the
//! broker's clock, so a paused tokio clock drives back-off and grace.
//!
//! # Test-only fault point
//!
//! `KEYWARD_TEST_CRASH_AFTER=<step>` (generate, apply, verify, promote,
//! rollback, retire), read once when the broker is made, kills the process
//! with SIGKILL right after that step has been made durable. It exists for
//! the crash tests and is DANGER for anything else: never set it on a real
//! server.

use std::sync::OnceLock;

use super::policy::secret_references;
use super::provider::{Provider, ProviderError, ProviderSettings, RotationInput};
use super::reads::Setter;
use super::record::{RetireRecord, RotationStep, RunRecord, RunState, StepOutcome, StepRecord};
use super::schedule::RetryBackoff;
use super::{Broker, RotationError};
use crate::audit::{AuditEvent, Outcome};
use crate::clock::{Clock, Shutdown};
use crate::policy::{Authorized, Capability};
use crate::secrecy::{SecretBytes, SecretData};
use crate::secrets::{PutRequest, SecretPath, SecretStore, SecretsError, Selector, Stage};

/// The audit identity of the broker's own actions.
pub const BROKER_IDENTITY: &str = "rotation-broker";

// ---------------------------------------------------------------- fault point

static DANGER_TEST_CRASH_AFTER: OnceLock<Option<String>> = OnceLock::new();

/// Reads `KEYWARD_TEST_CRASH_AFTER` once (see the module doc).
pub fn init_danger_test_fault_point() {
    DANGER_TEST_CRASH_AFTER.get_or_init(|| {
        let step = std::env::var("KEYWARD_TEST_CRASH_AFTER")
            .ok()
            .filter(|s| !s.is_empty());
        if let Some(step) = &step {
            tracing::warn!(step = %step, "DANGER: test fault point set; the process kills itself after this rotation step");
        }
        step
    });
}

/// Kills the process (SIGKILL) if the fault point names `step`.
fn danger_test_fault_point(step: RotationStep) {
    let armed = DANGER_TEST_CRASH_AFTER
        .get()
        .and_then(Option::as_deref)
        .is_some_and(|s| s == step.name());
    if armed {
        tracing::error!(step = step.name(), "test fault point: killing the process");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        std::process::abort();
    }
}

/// `KEYWARD_TEST_STOP_AT=generated`, read once: the process stops itself
/// (SIGSTOP) after generating a value and before storing it, as a leader
/// frozen mid-step would. For the fencing test only; DANGER anywhere else.
fn danger_test_stop_point(point: &str) {
    static STOP_AT: OnceLock<Option<String>> = OnceLock::new();
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let armed = STOP_AT
        .get_or_init(|| {
            std::env::var("KEYWARD_TEST_STOP_AT")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .as_deref()
        == Some(point);
    // Once per process.
    if armed && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tracing::error!(point, "test stop point: stopping the process (SIGSTOP)");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status();
        tracing::warn!(point, "test stop point: continued");
    }
}

// ---------------------------------------------------------------- audit

/// The audit record of one step (and its metric). `failed` is the reason
/// the step failed; generated values appear as HMACs only.
fn audit_step(
    broker: &Broker,
    run_id: &str,
    path: &str,
    step: RotationStep,
    failed: Option<&str>,
    values: &SecretData,
) -> Result<(), RotationError> {
    let resource = format!("rotation/{path}");
    let method = format!("keyward.rotation/{}", step.name());
    let refs: Vec<(&str, &[u8])> = values
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose()))
        .collect();
    broker.deps().audit.append(&AuditEvent {
        request_id: run_id,
        method: &method,
        resource: Some(&resource),
        identity: Some(BROKER_IDENTITY),
        accessor: None,
        actor: None,
        source: None,
        outcome: if failed.is_some() {
            Outcome::Failed
        } else {
            Outcome::Allowed
        },
        code: if failed.is_some() { "ABORTED" } else { "OK" },
        error: failed,
        token: None,
        values: &refs,
        call: None,
    })?;
    Ok(())
}

// ---------------------------------------------------------------- reading secrets

/// A secret's version by stage, `None` if it has none.
fn staged(
    secrets: &SecretStore,
    path: &SecretPath,
    stage: Stage,
) -> Result<Option<SecretData>, RotationError> {
    match secrets.get(path, Selector::Stage(stage)) {
        Ok(v) => Ok(Some(v.data)),
        Err(SecretsError::NotFound | SecretsError::NoSuchStage(_)) => Ok(None),
        Err(SecretsError::Deleted(_) | SecretsError::Destroyed(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Why a step cannot go on, and whether a later attempt may succeed.
#[derive(Debug, Clone)]
struct StepFailure {
    message: String,
    retryable: bool,
}

impl StepFailure {
    fn new(error: &impl ToString, retryable: bool) -> Self {
        Self {
            message: error.to_string(),
            retryable,
        }
    }
}

/// The audit record of a secret reference read (or refused) on behalf of
/// the policy's setter: names the setter and the path, never the value.
fn audit_reference(
    broker: &Broker,
    run_id: &str,
    setter: &Setter,
    resource: &str,
    refused: Option<&str>,
) -> Result<(), RotationError> {
    broker.deps().audit.append(&AuditEvent {
        request_id: run_id,
        method: "keyward.rotation/ReadReference",
        resource: Some(resource),
        identity: Some(if setter.is_known() {
            setter.identity.as_str()
        } else {
            "unknown"
        }),
        accessor: None,
        actor: None,
        source: None,
        outcome: if refused.is_some() {
            Outcome::Denied
        } else {
            Outcome::Allowed
        },
        code: if refused.is_some() {
            "PERMISSION_DENIED"
        } else {
            "OK"
        },
        error: refused,
        token: None,
        values: &[],
        call: None,
    })?;
    Ok(())
}

/// The admin secret the settings name, if the provider takes one. It is
/// read only if the policy's setter may read it now (the broker's
/// [`super::reads::ReadCheck`]), and the read or the refusal is audited in
/// the setter's name. A policy that does not record its setter (set by an
/// older keyward) has no reference read at all.
fn admin_secret(
    broker: &Broker,
    run_id: &str,
    provider: &dyn Provider,
    settings: &ProviderSettings,
    setter: &Setter,
) -> Result<Result<Option<SecretData>, StepFailure>, RotationError> {
    let references = match secret_references(provider, settings) {
        Ok(r) => r,
        Err(e) => return Ok(Err(StepFailure::new(&e, false))),
    };
    let Some(path) = references.into_iter().next() else {
        return Ok(Ok(None));
    };
    let resource = path.resource();
    let decision = if setter.is_known() {
        broker
            .deps()
            .reads
            .may_read(setter, &resource)
            .map_err(|e| StepFailure::new(&e, e.is_retryable()))
    } else {
        Err(StepFailure::new(
            &format!(
                "this policy does not record who set it (set before keyward recorded setters); set it again (`keyward rotation set`) to let the broker read {resource}"
            ),
            false,
        ))
    };
    let refused = decision.as_ref().err().map(|f| f.message.as_str());
    audit_reference(broker, run_id, setter, &resource, refused)?;
    if let Err(refusal) = decision {
        tracing::warn!(resource = %resource, setter = %setter.identity, reason = %refusal.message, "secret reference not read");
        return Ok(Err(StepFailure {
            message: format!("secret reference not read: {}", refusal.message),
            retryable: refusal.retryable,
        }));
    }
    match staged(&broker.deps().secrets, &path, Stage::Current)? {
        Some(data) => Ok(Ok(Some(data))),
        None => Ok(Err(StepFailure::new(
            &ProviderError::InvalidSecret(format!(
                "the admin secret {path} has no current version"
            )),
            false,
        ))),
    }
}

/// Waits until the clock reads `until_ms`; false if shutdown came first.
async fn sleep_until(clock: &Clock, until_ms: u64, shutdown: &Shutdown) -> bool {
    if shutdown.is_triggered() {
        return false;
    }
    tokio::select! {
        _ = clock.sleep_until_ms(until_ms) => !shutdown.is_triggered(),
        _ = shutdown.wait() => false,
    }
}

// ---------------------------------------------------------------- the run

/// How a drive ended.
#[derive(Debug)]
pub enum Driven {
    /// Finished (succeeded or failed); the record is in the history.
    Finished(Box<RunRecord>),
    /// Shutdown came: the run stays recorded and resumes at the next start.
    Interrupted,
}

/// After one step: go on with the next, or the run is over.
enum Flow {
    Next,
    Done(Driven),
}

/// What every step of one run reads; the run record itself is passed
/// beside it, mutably.
struct RunContext<'a> {
    broker: &'a Broker,
    path: SecretPath,
    settings: ProviderSettings,
    backoff: RetryBackoff,
}

impl RunContext<'_> {
    fn secrets(&self) -> &SecretStore {
        &self.broker.deps().secrets
    }

    fn now_ms(&self) -> u64 {
        self.broker.clock().now_ms()
    }

    /// Persists the run and makes it durable; then the fault point.
    async fn persist(&self, run: &RunRecord, after: RotationStep) -> Result<(), RotationError> {
        self.broker.save_run(run)?;
        self.broker.deps().barrier.durable().await?;
        danger_test_fault_point(after);
        Ok(())
    }

    /// A step that worked: audited, counted, recorded, the run moved on to
    /// `next` and persisted.
    async fn step_ok(
        &self,
        run: &mut RunRecord,
        step: RotationStep,
        version: u64,
        values: &SecretData,
        next: RotationStep,
    ) -> Result<(), RotationError> {
        audit_step(self.broker, &run.run_id, &run.path, step, None, values)?;
        self.broker.count_step(step, StepOutcome::Ok);
        run.record(step, StepOutcome::Ok, version, String::new(), self.now_ms());
        run.step = next;
        self.persist(run, step).await
    }
}

/// Runs (or resumes) a rotation to its end, or to a step boundary when
/// shutdown comes. A storage or audit error stops it where it is; it is
/// resumed later from its record.
pub async fn drive(
    broker: &Broker,
    mut run: RunRecord,
    shutdown: &Shutdown,
) -> Result<Driven, RotationError> {
    let cx = RunContext {
        broker,
        path: SecretPath::parse(&run.path).map_err(|_| RotationError::Corrupt)?,
        settings: ProviderSettings::new(run.settings.clone())?,
        backoff: broker.options().backoff,
    };
    loop {
        if shutdown.is_triggered() {
            return Ok(Driven::Interrupted);
        }
        let backing_off = run.step == RotationStep::Generate;
        if backing_off && !sleep_until(broker.clock(), run.not_before_ms, shutdown).await {
            return Ok(Driven::Interrupted);
        }
        if let Flow::Done(driven) = run_step(&cx, &mut run).await? {
            return Ok(driven);
        }
    }
}

/// Whether this worker's leader term still holds (always, on a single
/// node). Asked before every step, so a leader deposed while paused does
/// not act on a target once it runs again; the step's record afterwards is
/// a fenced write, refused as well if the term ended during the step.
fn check_fence() -> Result<(), RotationError> {
    crate::storage::cluster::check_fence().map_err(|e| RotationError::Barrier(e.into()))
}

/// Runs the step the record is at.
async fn run_step(cx: &RunContext<'_>, run: &mut RunRecord) -> Result<Flow, RotationError> {
    check_fence()?;
    let step = run.step;
    let rolling_back = step == RotationStep::Rollback;
    let Some(provider) = cx.broker.provider(&run.provider) else {
        if rolling_back {
            // Nothing can be put back on a target we cannot reach.
            return finish_failed(cx, run, false).await.map(Flow::Done);
        }
        let e = ProviderError::Internal(format!("provider `{}` is not registered", run.provider));
        failed_attempt(cx, run, step, 0, &StepFailure::new(&e, false)).await?;
        return Ok(Flow::Next);
    };
    if step == RotationStep::Promote {
        // Promote calls no provider: nothing is read for it.
        return promote(cx, run).await;
    }
    let setter = run.setter.clone();
    let admin = admin_secret(
        cx.broker,
        &run.run_id,
        provider.as_ref(),
        &cx.settings,
        &setter,
    )?;
    let admin = match admin {
        Ok(a) => a,
        Err(e) if rolling_back => {
            tracing::warn!(path = %cx.path, error = %e.message, "rollback without admin secret");
            // If this attempt reached the target, its value may be live
            // there and current could not be put back: keep it as pending
            // rather than lose it.
            let attempt = run.attempt;
            let applied = run
                .steps
                .iter()
                .any(|s| s.step == RotationStep::Apply && s.attempt == attempt);
            if applied {
                let version = run.pending_version;
                let message = format!(
                    "current not restored on the target ({}); pending version {version} is kept",
                    e.message
                );
                let now = cx.now_ms();
                run.record(
                    RotationStep::Rollback,
                    StepOutcome::Failed,
                    version,
                    message,
                    now,
                );
            }
            return finish_failed(cx, run, applied).await.map(Flow::Done);
        }
        Err(e) => {
            let version = run.pending_version;
            failed_attempt(cx, run, step, version, &e).await?;
            return Ok(Flow::Next);
        }
    };
    let current = staged(cx.secrets(), &cx.path, Stage::Current)?;
    let input = RotationInput {
        settings: &cx.settings,
        admin: admin.as_ref(),
        current: current.as_ref(),
    };
    match step {
        RotationStep::Generate => generate(cx, run, provider.as_ref(), &input).await?,
        RotationStep::Apply | RotationStep::Verify => {
            apply_or_verify(cx, run, provider.as_ref(), &input).await?
        }
        RotationStep::Promote => return promote(cx, run).await,
        RotationStep::Rollback => {
            rollback(cx, run, provider.as_ref(), &input).await;
            return finish_failed(cx, run, false).await.map(Flow::Done);
        }
        RotationStep::Retire => {
            // A run record never rests at Retire (retires have their own
            // records): end it rather than act on the target.
            return finish_failed(cx, run, false).await.map(Flow::Done);
        }
    }
    Ok(Flow::Next)
}

/// Generate: a new value, stored as `pending` before anything touches
/// the target.
async fn generate(
    cx: &RunContext<'_>,
    run: &mut RunRecord,
    provider: &dyn Provider,
    input: &RotationInput<'_>,
) -> Result<(), RotationError> {
    let step = RotationStep::Generate;
    let value = match provider.generate(input).await {
        Ok(value) => value,
        Err(e) => {
            let retry = e.is_retryable() || matches!(e, ProviderError::Internal(_));
            return failed_attempt(cx, run, step, 0, &StepFailure::new(&e, retry)).await;
        }
    };
    danger_test_stop_point("generated");
    let version = cx.secrets().put(
        &Authorized::for_broker(cx.path.resource(), Capability::Write),
        PutRequest {
            path: cx.path.clone(),
            data: value.clone(),
            cas: None,
            max_versions: None,
            owner: None,
            stage: Stage::Pending,
        },
        cx.now_ms(),
    )?;
    run.pending_version = version;
    cx.step_ok(run, step, version, &value, RotationStep::Apply)
        .await
}

/// Apply (make pending valid on the target) or verify (log in with it).
async fn apply_or_verify(
    cx: &RunContext<'_>,
    run: &mut RunRecord,
    provider: &dyn Provider,
    input: &RotationInput<'_>,
) -> Result<(), RotationError> {
    let step = run.step;
    let version = run.pending_version;
    let pending = match cx.secrets().get(&cx.path, Selector::Version(version)) {
        Ok(v) => v.data,
        Err(e) => {
            // The pending value is gone (destroyed by hand?): a fresh one
            // is needed.
            let e = ProviderError::InvalidSecret(format!(
                "the pending version {version} cannot be read: {e}"
            ));
            return failed_attempt(cx, run, step, version, &StepFailure::new(&e, true)).await;
        }
    };
    let (result, next) = if step == RotationStep::Apply {
        (provider.apply(input, &pending).await, RotationStep::Verify)
    } else {
        (
            provider.verify(input, &pending).await,
            RotationStep::Promote,
        )
    };
    match result {
        Ok(()) => {
            cx.step_ok(run, step, version, &SecretData::new(), next)
                .await
        }
        Err(e) => {
            let retry = !matches!(e, ProviderError::InvalidSettings(_));
            failed_attempt(cx, run, step, version, &StepFailure::new(&e, retry)).await
        }
    }
}

/// Records a failed attempt: another attempt after a back-off with a fresh
/// value, or the rollback after the last one.
async fn failed_attempt(
    cx: &RunContext<'_>,
    run: &mut RunRecord,
    step: RotationStep,
    version: u64,
    failure: &StepFailure,
) -> Result<(), RotationError> {
    let message = failure.message.clone();
    let retryable = failure.retryable;
    let failed = Some(message.as_str());
    audit_step(
        cx.broker,
        &run.run_id,
        &run.path,
        step,
        failed,
        &SecretData::new(),
    )?;
    cx.broker.count_step(step, StepOutcome::Failed);
    tracing::warn!(path = %run.path, step = step.name(), attempt = run.attempt, error = %message, "rotation step failed");
    let now = cx.now_ms();
    run.record(step, StepOutcome::Failed, version, message.clone(), now);
    run.last_error = format!("{} (attempt {}): {message}", step.name(), run.attempt);
    if retryable && run.attempt < cx.backoff.attempts() {
        let wait = cx.backoff.delay(run.attempt);
        run.attempt += 1;
        run.step = RotationStep::Generate;
        run.not_before_ms = now + wait.as_millis() as u64;
    } else {
        run.step = RotationStep::Rollback;
    }
    cx.broker.save_run(run)?;
    cx.broker.deps().barrier.durable().await?;
    Ok(())
}

/// Promotes pending and ends the run (scheduling the retire of the value it
/// replaced). When there is nothing to promote (the pending version was
/// changed or removed outside the run) that is a failed attempt, and the
/// run goes on to the rollback.
async fn promote(cx: &RunContext<'_>, run: &mut RunRecord) -> Result<Flow, RotationError> {
    let Some(previous) = promote_pending(cx, run).await? else {
        return Ok(Flow::Next);
    };
    cx.secrets().durable().await?;
    let step = RotationStep::Promote;
    audit_step(
        cx.broker,
        &run.run_id,
        &run.path,
        step,
        None,
        &SecretData::new(),
    )?;
    cx.broker.count_step(step, StepOutcome::Ok);
    let now = cx.now_ms();
    run.record(
        step,
        StepOutcome::Ok,
        run.pending_version,
        String::new(),
        now,
    );
    run.state = RunState::Succeeded;
    run.finished_ms = now;
    run.version = run.pending_version;
    run.last_error.clear();
    let retire = (previous != 0 && previous != run.pending_version).then(|| RetireRecord {
        run_id: run.run_id.clone(),
        path: run.path.clone(),
        provider: run.provider.clone(),
        settings: run.settings.clone(),
        previous_version: previous,
        retire_at_ms: now + run.grace_seconds * 1000,
        set_by: run.setter.identity.clone(),
        set_by_policies: run.setter.policies.clone(),
        set_by_accessor: run.setter.accessor.clone(),
    });
    cx.broker.finish_run(run, retire.as_ref())?;
    cx.broker.deps().barrier.durable().await?;
    cx.broker.count_run(&run.provider, RunState::Succeeded);
    danger_test_fault_point(step);
    Ok(Flow::Done(Driven::Finished(Box::new(run.clone()))))
}

/// Makes pending current; the version it replaced (`previous`), or `None`
/// when there was nothing to promote (recorded, and the run sent to the
/// rollback).
async fn promote_pending(
    cx: &RunContext<'_>,
    run: &mut RunRecord,
) -> Result<Option<u64>, RotationError> {
    let meta = match cx.secrets().metadata(&cx.path) {
        Ok(m) => m,
        Err(e @ SecretsError::NotFound) => return promote_failed(cx, run, &e).await,
        Err(e) => return Err(e.into()),
    };
    if meta.current == run.pending_version {
        // Promoted before a crash; the record did not say so yet.
        return Ok(Some(meta.previous));
    }
    let promoted = cx
        .secrets()
        .promote_pending(&cx.path, run.pending_version, cx.now_ms());
    match promoted {
        Ok(_) => Ok(Some(meta.current)),
        Err(e @ (SecretsError::NoSuchStage(_) | SecretsError::NotFound)) => {
            promote_failed(cx, run, &e).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Records a promote that found nothing to promote and sends the run to the
/// rollback (current is put back on the target there).
async fn promote_failed(
    cx: &RunContext<'_>,
    run: &mut RunRecord,
    error: &SecretsError,
) -> Result<Option<u64>, RotationError> {
    let step = RotationStep::Promote;
    let version = run.pending_version;
    let message = format!("the pending version {version} cannot be promoted: {error}");
    let failed = Some(message.as_str());
    audit_step(
        cx.broker,
        &run.run_id,
        &run.path,
        step,
        failed,
        &SecretData::new(),
    )?;
    cx.broker.count_step(step, StepOutcome::Failed);
    tracing::warn!(path = %run.path, error = %message, "rotation step failed");
    run.record(
        step,
        StepOutcome::Failed,
        version,
        message.clone(),
        cx.now_ms(),
    );
    run.last_error = format!("promote (attempt {}): {message}", run.attempt);
    run.step = RotationStep::Rollback;
    cx.broker.save_run(run)?;
    cx.broker.deps().barrier.durable().await?;
    Ok(None)
}

/// Puts `current` back on the target (a single-user apply may have replaced
/// its password before verify failed) and records how that went.
/// Idempotent.
async fn rollback(
    cx: &RunContext<'_>,
    run: &mut RunRecord,
    provider: &dyn Provider,
    input: &RotationInput<'_>,
) {
    tracing::debug!(path = %cx.path, "rolling back: restoring current on the target");
    let (outcome, message) = restore_current(provider, input).await;
    let now = cx.now_ms();
    run.record(RotationStep::Rollback, outcome, 0, message, now);
}

/// Applies and verifies `current` on the target: the rollback's outcome.
async fn restore_current(
    provider: &dyn Provider,
    input: &RotationInput<'_>,
) -> (StepOutcome, String) {
    let Some(current) = input.current else {
        return (
            StepOutcome::Skipped,
            "no current version to restore".to_owned(),
        );
    };
    match provider.apply(input, current).await {
        Ok(()) => match provider.verify(input, current).await {
            Ok(()) => (StepOutcome::Ok, String::new()),
            Err(e) => (
                StepOutcome::Failed,
                format!("current does not verify after rollback: {e}"),
            ),
        },
        Err(ProviderError::InvalidSecret(m)) => (StepOutcome::Skipped, format!("skipped: {m}")),
        Err(e) => (
            StepOutcome::Failed,
            format!("could not restore current on the target: {e}"),
        ),
    }
}

/// Ends a failed run: drops pending (unless `keep_pending`: it may be the
/// value live on the target), records the failure (history, policy, audit,
/// metrics).
async fn finish_failed(
    cx: &RunContext<'_>,
    run: &mut RunRecord,
    keep_pending: bool,
) -> Result<Driven, RotationError> {
    if !keep_pending {
        tracing::debug!(path = %cx.path, "rotation failed; dropping pending");
        match cx.secrets().clear_pending(&cx.path, cx.now_ms()) {
            Ok(()) | Err(SecretsError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let last = run.steps.last().cloned();
    let reason = match &last {
        Some(s) if s.outcome == StepOutcome::Failed => s.message.clone(),
        _ => run.last_error.clone(),
    };
    let step = RotationStep::Rollback;
    audit_step(
        cx.broker,
        &run.run_id,
        &run.path,
        step,
        Some(&reason),
        &SecretData::new(),
    )?;
    let outcome = last.map_or(StepOutcome::Ok, |s| s.outcome);
    cx.broker.count_step(step, outcome);
    run.state = RunState::Failed;
    run.finished_ms = cx.now_ms();
    run.version = cx
        .secrets()
        .metadata(&cx.path)
        .map(|m| m.current)
        .unwrap_or(0);
    if run.last_error.is_empty() {
        run.last_error = "the rotation failed".into();
    }
    cx.broker.finish_run(run, None)?;
    cx.broker.deps().barrier.durable().await?;
    tracing::debug!(path = %cx.path, "rotation failed; recorded");
    cx.broker.count_run(&run.provider, RunState::Failed);
    danger_test_fault_point(step);
    Ok(Driven::Finished(Box::new(run.clone())))
}

// ---------------------------------------------------------------- retire

/// The `username` of `previous` if one of `others` has the same one.
fn shared_username<'a>(
    previous: &'a SecretData,
    others: [Option<&SecretData>; 2],
) -> Option<&'a str> {
    let user = previous.get("username").and_then(SecretBytes::expose_str)?;
    others
        .into_iter()
        .flatten()
        .any(|o| o.get("username").and_then(SecretBytes::expose_str) == Some(user))
        .then_some(user)
}

/// Retires the version a promotion replaced, after its grace period.
/// Retryable failures are tried again with back-off; the outcome is added
/// to the run's history either way and the retire entry removed.
pub async fn retire(
    broker: &Broker,
    key: &str,
    record: RetireRecord,
    shutdown: &Shutdown,
) -> Result<(), RotationError> {
    let path = SecretPath::parse(&record.path).map_err(|_| RotationError::Corrupt)?;
    let settings = ProviderSettings::new(record.settings.clone())?;
    let backoff = broker.options().backoff;
    let mut attempt = 1;
    let step = loop {
        if shutdown.is_triggered() {
            return Err(RotationError::Stopping);
        }
        check_fence()?;
        let outcome = retire_once(broker, &record, &path, &settings).await;
        let failed = outcome.as_ref().err().map(|f| f.message.clone());
        audit_step(
            broker,
            &record.run_id,
            &record.path,
            RotationStep::Retire,
            failed.as_deref(),
            &SecretData::new(),
        )?;
        let retry = outcome.as_ref().is_err_and(|f| f.retryable);
        if retry && attempt < backoff.attempts() {
            broker.count_step(RotationStep::Retire, StepOutcome::Failed);
            let at = broker.clock().now_ms() + backoff.delay(attempt).as_millis() as u64;
            if !sleep_until(broker.clock(), at, shutdown).await {
                return Err(RotationError::Stopping);
            }
            attempt += 1;
            continue;
        }
        break retire_step(broker, &record, attempt, outcome);
    };
    broker.finish_retire(key, &record, step)?;
    broker.deps().barrier.durable().await?;
    danger_test_fault_point(RotationStep::Retire);
    Ok(())
}

/// The last attempt's step record (and its metric).
fn retire_step(
    broker: &Broker,
    record: &RetireRecord,
    attempt: u32,
    outcome: Result<Option<String>, StepFailure>,
) -> StepRecord {
    let (outcome, message) = match outcome {
        Ok(note) => (StepOutcome::Ok, note.unwrap_or_default()),
        Err(f) => (StepOutcome::Failed, f.message),
    };
    broker.count_step(RotationStep::Retire, outcome);
    StepRecord {
        step: RotationStep::Retire,
        attempt,
        outcome,
        version: record.previous_version,
        message,
        at_ms: broker.clock().now_ms(),
    }
}

/// One attempt at the retire: `Ok(Some(note))` when there was nothing to
/// do on the target, and why.
async fn retire_once(
    broker: &Broker,
    record: &RetireRecord,
    path: &SecretPath,
    settings: &ProviderSettings,
) -> Result<Option<String>, StepFailure> {
    // A failure of the provider is tried again if the target may come back
    // or refused (the grace period may still hold a lock on it).
    let provider_failure = |e: ProviderError| {
        let retry = e.is_retryable() || matches!(e, ProviderError::Refused(_));
        StepFailure::new(&e, retry)
    };
    let internal = |e: RotationError| StepFailure::new(&e, false);
    let secrets = &broker.deps().secrets;
    let provider = broker.provider(&record.provider).ok_or_else(|| {
        provider_failure(ProviderError::Internal(format!(
            "provider `{}` is not registered",
            record.provider
        )))
    })?;
    let setter = record.setter();
    let admin = admin_secret(broker, &record.run_id, provider.as_ref(), settings, &setter)
        .map_err(internal)??;
    let current = staged(secrets, path, Stage::Current).map_err(internal)?;
    let Ok(previous) = secrets.get(path, Selector::Version(record.previous_version)) else {
        // Destroyed or pruned: nothing left to retire with.
        return Err(provider_failure(ProviderError::InvalidSecret(format!(
            "version {} cannot be read",
            record.previous_version
        ))));
    };
    let pending = staged(secrets, path, Stage::Pending).map_err(internal)?;
    let others = [current.as_ref(), pending.as_ref()];
    if let Some(user) = shared_username(&previous.data, others) {
        // Never lock out a user that is current or about to be.
        return Ok(Some(format!(
            "nothing retired: user `{user}` is in the current or pending value"
        )));
    }
    let input = RotationInput {
        settings,
        admin: admin.as_ref(),
        current: current.as_ref(),
    };
    provider
        .retire(&input, &previous.data)
        .await
        .map(|()| None)
        .map_err(provider_failure)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> SecretData {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), SecretBytes::from(*v)))
            .collect()
    }

    #[test]
    fn a_user_in_current_or_pending_is_never_retired() {
        let previous = data(&[("username", "a"), ("password", "p1")]);
        let other = data(&[("username", "b")]);
        let same = data(&[("username", "a")]);
        assert_eq!(shared_username(&previous, [Some(&other), None]), None);
        assert_eq!(
            shared_username(&previous, [Some(&other), Some(&same)]),
            Some("a")
        );
        assert_eq!(shared_username(&data(&[]), [Some(&same), None]), None);
    }
}
