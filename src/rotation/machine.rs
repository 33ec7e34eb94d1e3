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
//! `secrets::SecretStore` and its records through the [`super::Broker`].
//!
//! # Test-only fault point
//!
//! `KEYWARD_TEST_CRASH_AFTER=<step>` (generate, apply, verify, promote,
//! rollback, retire), read once when the broker is made, kills the process
//! with SIGKILL right after that step has been made durable. It exists for
//! the crash tests and is DANGER for anything else: never set it on a real
//! server.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use prost::Message;

use super::provider::{Provider, ProviderError, ProviderSettings, RotationInput};
use super::RotationError;
use crate::audit::{AuditEvent, Outcome};
use crate::clock::Shutdown;
use crate::core::Core;
use crate::secrecy::{SecretBytes, SecretData};
use crate::secrets::{PutRequest, SecretPath, SecretsError, Selector, Stage};

/// Wall time until this module takes the core's `Clock` (the rotation work
/// of issue 11 does); not paused by tests.
fn now_ms() -> u64 {
    crate::clock::Clock::system().now_ms()
}

/// The audit identity of the broker's own actions.
pub const BROKER_IDENTITY: &str = "rotation-broker";

/// The steps of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Step {
    Generate = 0,
    Apply = 1,
    Verify = 2,
    Promote = 3,
    Rollback = 4,
    Retire = 5,
}

/// One step as it happened.
#[derive(Clone, PartialEq, Message)]
pub struct StepRecord {
    #[prost(string, tag = "1")]
    pub step: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
    /// ok | failed | skipped
    #[prost(string, tag = "3")]
    pub outcome: String,
    #[prost(uint64, tag = "4")]
    pub version: u64,
    #[prost(string, tag = "5")]
    pub message: String,
    #[prost(uint64, tag = "6")]
    pub at_ms: u64,
}

/// A run: its resume point while it runs (`rotation/run/<path>`), its
/// record once finished (`rotation/history/...`). It holds a copy of the
/// policy it started with, so a policy change does not alter a run midway.
#[derive(Clone, PartialEq, Message)]
pub struct RunRecord {
    #[prost(string, tag = "1")]
    pub run_id: String,
    #[prost(string, tag = "2")]
    pub path: String,
    #[prost(string, tag = "3")]
    pub provider: String,
    #[prost(btree_map = "string, string", tag = "4")]
    pub settings: BTreeMap<String, String>,
    #[prost(uint64, tag = "5")]
    pub grace_seconds: u64,
    /// schedule | manual
    #[prost(string, tag = "6")]
    pub trigger: String,
    #[prost(uint64, tag = "7")]
    pub due_ms: u64,
    #[prost(uint64, tag = "8")]
    pub started_ms: u64,
    #[prost(enumeration = "Step", tag = "9")]
    pub step: i32,
    /// From 1.
    #[prost(uint32, tag = "10")]
    pub attempt: u32,
    #[prost(uint64, tag = "11")]
    pub pending_version: u64,
    /// The next attempt does not start before this (back-off).
    #[prost(uint64, tag = "12")]
    pub not_before_ms: u64,
    /// running | succeeded | failed
    #[prost(string, tag = "13")]
    pub state: String,
    #[prost(message, repeated, tag = "14")]
    pub steps: Vec<StepRecord>,
    #[prost(uint64, tag = "15")]
    pub finished_ms: u64,
    /// The current version after the run.
    #[prost(uint64, tag = "16")]
    pub version: u64,
    #[prost(string, tag = "17")]
    pub last_error: String,
}

/// A retire waiting for its grace period (`rotation/retire/<ms>/<path>`).
#[derive(Clone, PartialEq, Message)]
pub struct RetireRecord {
    #[prost(string, tag = "1")]
    pub run_id: String,
    #[prost(string, tag = "2")]
    pub path: String,
    #[prost(string, tag = "3")]
    pub provider: String,
    #[prost(btree_map = "string, string", tag = "4")]
    pub settings: BTreeMap<String, String>,
    #[prost(uint64, tag = "5")]
    pub previous_version: u64,
    #[prost(uint64, tag = "6")]
    pub retire_at_ms: u64,
}

impl RunRecord {
    pub fn start(
        run_id: String,
        policy: &super::policy::PolicyRecord,
        trigger: &str,
        due_ms: u64,
        now_ms: u64,
    ) -> Self {
        Self {
            run_id,
            path: policy.path.clone(),
            provider: policy.provider.clone(),
            settings: policy.settings.clone(),
            grace_seconds: policy.grace_seconds,
            trigger: trigger.to_owned(),
            due_ms,
            started_ms: now_ms,
            step: Step::Generate as i32,
            attempt: 1,
            state: "running".into(),
            ..Self::default()
        }
    }

    pub fn current_step(&self) -> Step {
        Step::try_from(self.step).unwrap_or(Step::Rollback)
    }

    fn record(&mut self, step: Step, outcome: &str, version: u64, message: String) -> StepRecord {
        let r = StepRecord {
            step: step.name().to_owned(),
            attempt: self.attempt,
            outcome: outcome.to_owned(),
            version,
            message,
            at_ms: now_ms(),
        };
        self.steps.push(r.clone());
        r
    }
}

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
fn danger_test_fault_point(step: Step) {
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

// ---------------------------------------------------------------- audit

fn audit_step(
    core: &Core,
    run_id: &str,
    path: &str,
    step: Step,
    failed: Option<&str>,
    values: &SecretData,
) -> Result<(), RotationError> {
    let resource = format!("rotation/{path}");
    let method = format!("keyward.rotation/{}", step.name());
    let refs: Vec<(&str, &[u8])> = values
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose()))
        .collect();
    core.audit.append(&AuditEvent {
        request_id: run_id,
        method: &method,
        resource: Some(&resource),
        identity: Some(BROKER_IDENTITY),
        accessor: None,
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
    })?;
    Ok(())
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

/// A secret's version by stage, `None` if it has none.
fn staged(
    core: &Core,
    path: &SecretPath,
    stage: Stage,
) -> Result<Option<SecretData>, RotationError> {
    match core.secrets.get(path, Selector::Stage(stage)) {
        Ok(v) => Ok(Some(v.data)),
        Err(SecretsError::NotFound | SecretsError::NoSuchStage(_)) => Ok(None),
        Err(SecretsError::Deleted(_) | SecretsError::Destroyed(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The admin secret the settings name, if the provider takes one.
fn admin_secret(
    core: &Core,
    provider: &dyn Provider,
    settings: &ProviderSettings,
) -> Result<Result<Option<SecretData>, ProviderError>, RotationError> {
    let Some(path) = provider.admin_secret(settings) else {
        return Ok(Ok(None));
    };
    let Ok(path) = SecretPath::parse(path) else {
        return Ok(Err(ProviderError::InvalidSettings(
            "`admin_secret` is not a secret path".into(),
        )));
    };
    match staged(core, &path, Stage::Current)? {
        Some(data) => Ok(Ok(Some(data))),
        None => Ok(Err(ProviderError::InvalidSecret(format!(
            "the admin secret {path} has no current version"
        )))),
    }
}

/// Waits until `until_ms`, or returns false if shutdown came first.
async fn sleep_until(until_ms: u64, stop: &mut Shutdown) -> bool {
    let now = now_ms();
    if until_ms <= now {
        return !stop.is_triggered();
    }
    let wait = std::time::Duration::from_millis(until_ms - now);
    let slept = tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.wait() => false,
    };
    slept && !stop.is_triggered()
}

/// Persists the run and makes it durable; then the fault point.
async fn persist(core: &Core, run: &RunRecord, after: Step) -> Result<(), RotationError> {
    core.rotation.save_run(run)?;
    core.barrier.durable().await?;
    danger_test_fault_point(after);
    Ok(())
}

/// Runs (or resumes) a rotation to its end, or to a step boundary when
/// shutdown comes. A storage or audit error stops it where it is; it is
/// resumed later from its record.
pub async fn drive(
    core: &Arc<Core>,
    mut run: RunRecord,
    mut stop: Shutdown,
) -> Result<Driven, RotationError> {
    let path = SecretPath::parse(&run.path).map_err(|_| RotationError::Corrupt)?;
    let settings = ProviderSettings::new(run.settings.clone())?;
    let backoff = core.rotation.options().backoff;
    loop {
        if stop.is_triggered() {
            return Ok(Driven::Interrupted);
        }
        let step = run.current_step();
        if step == Step::Generate && !sleep_until(run.not_before_ms, &mut stop).await {
            return Ok(Driven::Interrupted);
        }
        let provider = match core.rotation.provider(&run.provider) {
            Some(p) => p,
            None if step == Step::Rollback => {
                // Nothing can be put back on a target we cannot reach.
                return finish_failed(core, run, &path).await;
            }
            None => {
                let e = ProviderError::Internal(format!(
                    "provider `{}` is not registered",
                    run.provider
                ));
                failed_attempt(core, &mut run, step, 0, &e, false, &backoff).await?;
                continue;
            }
        };
        let admin = match admin_secret(core, provider.as_ref(), &settings)? {
            Ok(a) => a,
            Err(e) if step == Step::Rollback => {
                tracing::warn!(path = %path, error = %e, "rollback without admin secret");
                return finish_failed(core, run, &path).await;
            }
            Err(e) => {
                let version = run.pending_version;
                failed_attempt(core, &mut run, step, version, &e, false, &backoff).await?;
                continue;
            }
        };
        let current = staged(core, &path, Stage::Current)?;
        let input = RotationInput {
            settings: &settings,
            admin: admin.as_ref(),
            current: current.as_ref(),
        };
        match step {
            Step::Generate => match provider.generate(&input).await {
                Ok(value) => {
                    let version = core.secrets.put(
                        PutRequest {
                            path: path.clone(),
                            data: value.clone(),
                            cas: None,
                            max_versions: None,
                            owner: None,
                            stage: Stage::Pending,
                        },
                        now_ms(),
                    )?;
                    audit_step(core, &run.run_id, &run.path, step, None, &value)?;
                    core.rotation.count_step(step.name(), "ok");
                    run.pending_version = version;
                    run.record(step, "ok", version, String::new());
                    run.step = Step::Apply as i32;
                    persist(core, &run, step).await?;
                }
                Err(e) => {
                    let retry = e.is_retryable() || matches!(e, ProviderError::Internal(_));
                    failed_attempt(core, &mut run, step, 0, &e, retry, &backoff).await?;
                }
            },
            Step::Apply | Step::Verify => {
                let pending = match core
                    .secrets
                    .get(&path, Selector::Version(run.pending_version))
                {
                    Ok(v) => v.data,
                    Err(e) => {
                        // The pending value is gone (destroyed by hand?): a
                        // fresh one is needed.
                        let e = ProviderError::InvalidSecret(format!(
                            "the pending version {} cannot be read: {e}",
                            run.pending_version
                        ));
                        let version = run.pending_version;
                        failed_attempt(core, &mut run, step, version, &e, true, &backoff).await?;
                        continue;
                    }
                };
                let result = if step == Step::Apply {
                    provider.apply(&input, &pending).await
                } else {
                    provider.verify(&input, &pending).await
                };
                match result {
                    Ok(()) => {
                        audit_step(core, &run.run_id, &run.path, step, None, &SecretData::new())?;
                        core.rotation.count_step(step.name(), "ok");
                        run.record(step, "ok", run.pending_version, String::new());
                        run.step = if step == Step::Apply {
                            Step::Verify as i32
                        } else {
                            Step::Promote as i32
                        };
                        persist(core, &run, step).await?;
                    }
                    Err(e) => {
                        let retry = !matches!(e, ProviderError::InvalidSettings(_));
                        let version = run.pending_version;
                        failed_attempt(core, &mut run, step, version, &e, retry, &backoff).await?;
                    }
                }
            }
            Step::Promote => {
                if let Some(driven) = promote(core, &mut run, &path).await? {
                    return Ok(driven);
                }
                // Nothing to promote: on to the rollback.
            }
            Step::Rollback => {
                return rollback(core, run, provider.as_ref(), &input, &path).await;
            }
            Step::Retire => {
                // A run record never rests at Retire; treat as finished.
                return finish_failed(core, run, &path).await;
            }
        }
    }
}

/// Records a failed attempt: another attempt after a back-off with a fresh
/// value, or the rollback after the last one.
async fn failed_attempt(
    core: &Core,
    run: &mut RunRecord,
    step: Step,
    version: u64,
    error: &ProviderError,
    retryable: bool,
    backoff: &super::schedule::RetryBackoff,
) -> Result<(), RotationError> {
    let message = error.to_string();
    audit_step(
        core,
        &run.run_id,
        &run.path,
        step,
        Some(&message),
        &SecretData::new(),
    )?;
    core.rotation.count_step(step.name(), "failed");
    tracing::warn!(path = %run.path, step = step.name(), attempt = run.attempt, error = %message, "rotation step failed");
    run.record(step, "failed", version, message.clone());
    run.last_error = format!("{} (attempt {}): {message}", step.name(), run.attempt);
    if retryable && run.attempt < backoff.attempts() {
        let wait = backoff.delay(run.attempt);
        run.attempt += 1;
        run.step = Step::Generate as i32;
        run.not_before_ms = now_ms() + wait.as_millis() as u64;
    } else {
        run.step = Step::Rollback as i32;
    }
    core.rotation.save_run(run)?;
    core.barrier.durable().await?;
    Ok(())
}

/// Promotes pending. `None` when there was nothing to promote (the pending
/// version was changed or removed outside the run): recorded as a failed
/// attempt, and the run goes on to the rollback.
async fn promote(
    core: &Arc<Core>,
    run: &mut RunRecord,
    path: &SecretPath,
) -> Result<Option<Driven>, RotationError> {
    let meta = match core.secrets.metadata(path) {
        Ok(m) => m,
        Err(e @ SecretsError::NotFound) => return promote_failed(core, run, &e).await,
        Err(e) => return Err(e.into()),
    };
    let previous = if meta.current == run.pending_version {
        // Promoted before a crash; the record did not say so yet.
        meta.previous
    } else {
        let before = meta.current;
        match core
            .secrets
            .promote_pending(path, run.pending_version, now_ms())
        {
            Ok(_) => {}
            Err(e @ (SecretsError::NoSuchStage(_) | SecretsError::NotFound)) => {
                return promote_failed(core, run, &e).await;
            }
            Err(e) => return Err(e.into()),
        }
        before
    };
    core.secrets.durable().await?;
    audit_step(
        core,
        &run.run_id,
        &run.path,
        Step::Promote,
        None,
        &SecretData::new(),
    )?;
    core.rotation.count_step("promote", "ok");
    run.record(Step::Promote, "ok", run.pending_version, String::new());
    let now = now_ms();
    run.state = "succeeded".into();
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
    });
    core.rotation.finish_run(run, retire.as_ref())?;
    core.barrier.durable().await?;
    core.rotation.count_run(&run.provider, "succeeded");
    danger_test_fault_point(Step::Promote);
    Ok(Some(Driven::Finished(Box::new(run.clone()))))
}

/// Records a promote that found nothing to promote and sends the run to the
/// rollback (current is put back on the target there).
async fn promote_failed(
    core: &Core,
    run: &mut RunRecord,
    error: &SecretsError,
) -> Result<Option<Driven>, RotationError> {
    let message = format!(
        "the pending version {} cannot be promoted: {error}",
        run.pending_version
    );
    audit_step(
        core,
        &run.run_id,
        &run.path,
        Step::Promote,
        Some(&message),
        &SecretData::new(),
    )?;
    core.rotation.count_step("promote", "failed");
    tracing::warn!(path = %run.path, error = %message, "rotation step failed");
    let version = run.pending_version;
    run.record(Step::Promote, "failed", version, message.clone());
    run.last_error = format!("promote (attempt {}): {message}", run.attempt);
    run.step = Step::Rollback as i32;
    core.rotation.save_run(run)?;
    core.barrier.durable().await?;
    Ok(None)
}

async fn rollback(
    core: &Arc<Core>,
    mut run: RunRecord,
    provider: &dyn Provider,
    input: &RotationInput<'_>,
    path: &SecretPath,
) -> Result<Driven, RotationError> {
    // Put `current` back on the target: a single-user apply may have
    // replaced its password before verify failed. Idempotent.
    tracing::debug!(path = %path, "rolling back: restoring current on the target");
    let message = match input.current {
        None => Some("no current version to restore".to_owned()),
        Some(current) => match provider.apply(input, current).await {
            Ok(()) => match provider.verify(input, current).await {
                Ok(()) => None,
                Err(e) => Some(format!("current does not verify after rollback: {e}")),
            },
            Err(ProviderError::InvalidSecret(m)) => Some(format!("skipped: {m}")),
            Err(e) => Some(format!("could not restore current on the target: {e}")),
        },
    };
    finish_failed(core, run_with_rollback(&mut run, message), path).await
}

fn run_with_rollback(run: &mut RunRecord, message: Option<String>) -> RunRecord {
    let outcome = match &message {
        None => "ok",
        Some(m) if m.starts_with("skipped") || m.starts_with("no current") => "skipped",
        Some(_) => "failed",
    };
    run.record(Step::Rollback, outcome, 0, message.unwrap_or_default());
    run.clone()
}

async fn finish_failed(
    core: &Arc<Core>,
    mut run: RunRecord,
    path: &SecretPath,
) -> Result<Driven, RotationError> {
    tracing::debug!(path = %path, "rotation failed; dropping pending");
    match core.secrets.clear_pending(path, now_ms()) {
        Ok(()) | Err(SecretsError::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    let last = run.steps.last().cloned();
    let failed_msg = last
        .as_ref()
        .filter(|s| s.outcome == "failed")
        .map(|s| s.message.clone());
    audit_step(
        core,
        &run.run_id,
        &run.path,
        Step::Rollback,
        Some(failed_msg.as_deref().unwrap_or(run.last_error.as_str())),
        &SecretData::new(),
    )?;
    core.rotation.count_step(
        "rollback",
        last.map(|s| s.outcome).as_deref().unwrap_or("ok"),
    );
    run.state = "failed".into();
    run.finished_ms = now_ms();
    run.version = core.secrets.metadata(path).map(|m| m.current).unwrap_or(0);
    if run.last_error.is_empty() {
        run.last_error = "the rotation failed".into();
    }
    core.rotation.finish_run(&run, None)?;
    core.barrier.durable().await?;
    tracing::debug!(path = %path, "rotation failed; recorded");
    core.rotation.count_run(&run.provider, "failed");
    danger_test_fault_point(Step::Rollback);
    Ok(Driven::Finished(Box::new(run)))
}

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
    core: &Arc<Core>,
    key: &str,
    record: RetireRecord,
    mut stop: Shutdown,
) -> Result<(), RotationError> {
    let path = SecretPath::parse(&record.path).map_err(|_| RotationError::Corrupt)?;
    let settings = ProviderSettings::new(record.settings.clone())?;
    let backoff = core.rotation.options().backoff;
    let mut attempt = 1;
    let step = loop {
        if stop.is_triggered() {
            return Err(RotationError::Stopping);
        }
        let outcome: Result<Option<String>, ProviderError> = async {
            let provider = core.rotation.provider(&record.provider).ok_or_else(|| {
                ProviderError::Internal(format!("provider `{}` is not registered", record.provider))
            })?;
            let admin = admin_secret(core, provider.as_ref(), &settings)
                .map_err(|e| ProviderError::Internal(e.to_string()))??;
            let current = staged(core, &path, Stage::Current)
                .map_err(|e| ProviderError::Internal(e.to_string()))?;
            let previous = match core
                .secrets
                .get(&path, Selector::Version(record.previous_version))
            {
                Ok(v) => v.data,
                // Destroyed or pruned: nothing left to retire with.
                Err(_) => {
                    return Err(ProviderError::InvalidSecret(format!(
                        "version {} cannot be read",
                        record.previous_version
                    )))
                }
            };
            let pending = staged(core, &path, Stage::Pending)
                .map_err(|e| ProviderError::Internal(e.to_string()))?;
            if let Some(user) = shared_username(&previous, [current.as_ref(), pending.as_ref()]) {
                // Never lock out a user that is current or about to be.
                return Ok(Some(format!(
                    "nothing retired: user `{user}` is in the current or pending value"
                )));
            }
            let input = RotationInput {
                settings: &settings,
                admin: admin.as_ref(),
                current: current.as_ref(),
            };
            provider.retire(&input, &previous).await.map(|()| None)
        }
        .await;
        match outcome {
            Ok(note) => {
                audit_step(
                    core,
                    &record.run_id,
                    &record.path,
                    Step::Retire,
                    None,
                    &SecretData::new(),
                )?;
                core.rotation.count_step("retire", "ok");
                break StepRecord {
                    step: "retire".into(),
                    attempt,
                    outcome: "ok".into(),
                    version: record.previous_version,
                    message: note.unwrap_or_default(),
                    at_ms: now_ms(),
                };
            }
            Err(e) => {
                let message = e.to_string();
                audit_step(
                    core,
                    &record.run_id,
                    &record.path,
                    Step::Retire,
                    Some(&message),
                    &SecretData::new(),
                )?;
                core.rotation.count_step("retire", "failed");
                let retry = e.is_retryable() || matches!(e, ProviderError::Refused(_));
                if retry && attempt < backoff.attempts() {
                    let wait = backoff.delay(attempt);
                    attempt += 1;
                    if !sleep_until(now_ms() + wait.as_millis() as u64, &mut stop).await {
                        return Err(RotationError::Stopping);
                    }
                    continue;
                }
                break StepRecord {
                    step: "retire".into(),
                    attempt,
                    outcome: "failed".into(),
                    version: record.previous_version,
                    message,
                    at_ms: now_ms(),
                };
            }
        }
    };
    core.rotation.finish_retire(key, &record, step)?;
    core.barrier.durable().await?;
    danger_test_fault_point(Step::Retire);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_steps_have_names() {
        let mut run = RunRecord {
            run_id: "r1".into(),
            path: "app/db".into(),
            step: Step::Verify as i32,
            attempt: 2,
            ..RunRecord::default()
        };
        run.record(Step::Apply, "ok", 3, String::new());
        let back = RunRecord::decode(run.encode_to_vec().as_slice()).ok();
        assert_eq!(back.as_ref(), Some(&run));
        assert_eq!(run.current_step(), Step::Verify);
        let names: Vec<&str> = [
            Step::Generate,
            Step::Apply,
            Step::Verify,
            Step::Promote,
            Step::Rollback,
            Step::Retire,
        ]
        .iter()
        .map(|s| s.name())
        .collect();
        assert_eq!(
            names,
            ["generate", "apply", "verify", "promote", "rollback", "retire"]
        );
    }
}
