//! Rotation: the broker that changes credentials on a schedule, safely.
//!
//! A rotation runs the four provider steps in the manner of AWS Secrets
//! Manager: `generate` the new value (stored as the secret's `pending`
//! version), `apply` it on the target, `verify` that it works, `promote` it
//! to `current` (the old one becomes `previous`), and after the grace period
//! `retire` the previous value on the target.
//!
//! - `provider`: the contract a provider implements; `providers`: the
//!   built-in ones and the registry that finds one by name.
//! - `schedule`: [`schedule::Schedule`], jitter, [`schedule::RetryBackoff`]
//!   (durations are `crate::duration`'s one grammar).
//! - `policy`: checked rotation policies and their stored form.
//! - `record`: runs and retires, their typed state and versioned stored form.
//! - `machine`: the persisted state machine of one run, and retire.
//! - `reads`: who set a policy, and the check that they may still read the
//!   secret it names ([`reads::ReadCheck`]).
//! - `scheduler`: the one sleeper over the due index and the worker pool.
//! - this file: the [`Broker`] that owns the storage prefix and the shared
//!   state, and [`RotationDeps`], the handles it uses.
//!
//! # Dependencies
//!
//! The broker takes exactly what it uses, in [`RotationDeps`]: the secret
//! store (values are read and written through it), the audit log (every
//! step is a record), the barrier (its own prefix, seal state, flushes),
//! the clock, and a [`reads::ReadCheck`] (may a policy's setter still read
//! the secret it names?). It never sees `core`; the server starts its scheduler with a
//! [`crate::clock::Shutdown`] ([`scheduler::start`]).
//!
//! # Storage prefix `rotation/` (through the barrier only)
//!
//! - `rotation/policy/<path>`: a [`policy::PolicyRecord`];
//! - `rotation/due/<16 hex digits: due ms, big-endian>/<path>`: the due index (empty values);
//! - `rotation/retire/<16 hex digits>/<path>`: retires waiting for their grace period;
//! - `rotation/run/<path>`: the run in progress ([`record::RunRecord`]), the resume point;
//! - `rotation/history/<path>#<run id>`: finished runs, newest 50 per secret kept;
//! - `rotation/provider/<name>`: registered external providers.
//!
//! Secret values are read and written only through `secrets::SecretStore`
//! (never under `secrets/` directly); providers never see storage. Policy
//! records and indexes change together in one atomic batch, under one lock
//! held only across the read-modify-write (no await under it).

pub mod gauges;
pub mod machine;
pub mod policy;
pub mod provider;
pub mod providers;
pub mod reads;
pub mod record;
pub mod schedule;
pub mod scheduler;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tokio::sync::{broadcast, Notify, Semaphore};

use crate::audit::{AuditError, AuditEvent, AuditLog, Outcome};
use crate::barrier::{Barrier, BarrierError, PlainOp};
use crate::clock::{Clock, Shutdown};
use crate::metrics::Metrics;
use crate::secrets::{SecretPath, SecretStore, SecretsError};

use policy::{PolicyRecord, PolicySpec, RotationPolicyError};
use provider::{Provider, ProviderError};
use providers::{Registry, RegistryError};
use reads::ReadCheck;
use record::{
    RecordError, RetireRecord, RotationStep, RunRecord, RunState, StepOutcome, StepRecord, Trigger,
};
use schedule::{RetryBackoff, ScheduleError};

pub(crate) const POLICY: &str = "rotation/policy/";
pub(crate) const DUE: &str = "rotation/due/";
pub(crate) const RETIRE: &str = "rotation/retire/";
pub(crate) const RUN: &str = "rotation/run/";
pub(crate) const HISTORY: &str = "rotation/history/";
pub(crate) const PROVIDER: &str = "rotation/provider/";
/// Finished runs kept per secret.
pub const HISTORY_KEPT: usize = 50;

/// Errors of the broker. Messages never hold a secret value.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Policy(#[from] RotationPolicyError),
    #[error("no rotation policy on this secret")]
    NoPolicy,
    #[error("no such rotation run")]
    NoRun,
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("stored rotation record is corrupt")]
    Corrupt,
    #[error("the server is shutting down")]
    Stopping,
}

/// Sizes of the worker pool and how rotations are retried.
#[derive(Debug, Clone, Copy)]
pub struct BrokerOptions {
    /// Rotations running at once.
    pub workers: usize,
    /// Rotations running at once against one provider that has a target
    /// (every provider but `random`).
    pub per_provider: usize,
    pub backoff: RetryBackoff,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            workers: 16,
            per_provider: 4,
            backoff: RetryBackoff::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    provider: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
    outcome: String,
}

/// What `keyward report` shows of rotation (see [`Broker::rotation_summary`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RotationSummary {
    /// Secrets past their due time by more than the tolerance, with the due time.
    pub overdue: Vec<(String, u64)>,
    /// The share of rotation policies that ran on schedule (1.0 with none).
    pub compliance: f64,
    /// Secrets whose last rotation failed, with its message.
    pub last_failures: Vec<(String, String)>,
}

/// A run that finished, for `Rotate` callers waiting on it.
#[derive(Debug, Clone)]
pub struct RunFinished {
    pub path: String,
    pub run_id: String,
}

/// One entry of the due or retire index.
#[derive(Debug, Clone)]
pub(crate) struct IndexEntry {
    pub key: String,
    pub due_ms: u64,
    pub path: String,
    pub value: Vec<u8>,
}

/// A registered external provider, as stored.
#[derive(Clone, PartialEq, Message)]
pub struct ProviderRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub endpoint: String,
    #[prost(bytes = "vec", tag = "3")]
    pub ca_pem: Vec<u8>,
}

/// Who replaces a registered provider, for the audit record of the
/// replacement ([`Broker::register_external`]).
#[derive(Debug, Clone, Copy)]
pub struct Replacing<'a> {
    pub identity: &'a str,
    pub accessor: &'a str,
    pub request_id: &'a str,
}

/// What the broker uses, and nothing more.
pub struct RotationDeps {
    /// Secret values: read, written as `pending`, promoted, cleared.
    pub secrets: Arc<SecretStore>,
    /// One record per step, as `rotation-broker`.
    pub audit: Arc<AuditLog>,
    /// The `rotation/` prefix, the seal state and flushes.
    pub barrier: Arc<Barrier>,
    /// Wall time for records and due times, and every sleep.
    pub clock: Clock,
    /// Whether a policy's setter may read a secret now: asked before every
    /// read of a secret reference.
    pub reads: Arc<dyn ReadCheck>,
}

/// The rotation broker: a cheap handle (clones share one state), held by
/// `core` for the request path and cloned into the scheduler and each
/// worker.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

struct Shared {
    deps: RotationDeps,
    options: BrokerOptions,
    registry: RwLock<Registry>,
    external: RwLock<BTreeMap<String, Arc<dyn Provider>>>,
    /// Serialises every read-modify-write of policy records and indexes.
    records: Mutex<()>,
    /// Serialises provider registrations (held across the plugin's
    /// `Describe`, so an async lock).
    registrations: tokio::sync::Mutex<()>,
    /// Wakes the sleeper: a policy changed, a run was triggered, unseal, stop.
    wake: Notify,
    /// Runs (by path) and retires (by `retire:` + index key) with a worker.
    in_flight: Mutex<HashSet<String>>,
    workers: Arc<Semaphore>,
    per_provider: Mutex<HashMap<String, Arc<Semaphore>>>,
    finished: broadcast::Sender<RunFinished>,
    /// Active runs must be looked up and resumed (after unseal, or after a
    /// worker stopped on a storage error).
    resume_needed: AtomicBool,
    run_counter: AtomicU64,
    /// Passes of the sleeper over the indexes (for the benchmark and tests).
    sleeper_passes: AtomicU64,
    runs: Family<RunLabels, Counter>,
    steps: Family<StepLabels, Counter>,
    /// Held by the sleeper and every worker; the scheduler's task ends
    /// when all have dropped theirs (see [`scheduler::start`]).
    guard: Mutex<Option<tokio::sync::mpsc::Sender<()>>>,
    guard_rx: Mutex<Option<tokio::sync::mpsc::Receiver<()>>>,
    /// The server's shutdown (on a cluster: the leader term's), given
    /// when the scheduler starts, with the term's fence; workers select on
    /// it and write under the fence. No worker starts before it is set. A
    /// later start replaces it once it has fired (leadership regained).
    shutdown: Mutex<Option<(Shutdown, Option<crate::storage::cluster::Fence>)>>,
}

impl Broker {
    pub fn new(deps: RotationDeps, metrics: &Metrics, options: BrokerOptions) -> Self {
        machine::init_danger_test_fault_point();
        let runs = Family::<RunLabels, Counter>::default();
        let steps = Family::<StepLabels, Counter>::default();
        metrics.register(
            "rotations",
            "Finished rotations by provider and outcome (succeeded, failed)",
            runs.clone(),
        );
        metrics.register(
            "rotation_steps",
            "Rotation steps by step and outcome (ok, failed, skipped)",
            steps.clone(),
        );
        let (guard, guard_rx) = tokio::sync::mpsc::channel(1);
        let shared = Shared {
            deps,
            registry: RwLock::new(Registry::with_builtin()),
            external: RwLock::new(BTreeMap::new()),
            records: Mutex::new(()),
            registrations: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            in_flight: Mutex::new(HashSet::new()),
            workers: Arc::new(Semaphore::new(options.workers.max(1))),
            per_provider: Mutex::new(HashMap::new()),
            finished: broadcast::channel(1024).0,
            resume_needed: AtomicBool::new(true),
            run_counter: AtomicU64::new(0),
            sleeper_passes: AtomicU64::new(0),
            runs,
            steps,
            guard: Mutex::new(Some(guard)),
            guard_rx: Mutex::new(Some(guard_rx)),
            shutdown: Mutex::new(None),
            options,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The handles the broker was made with.
    pub fn deps(&self) -> &RotationDeps {
        &self.shared.deps
    }

    /// The broker's clock (records' wall time, every sleep).
    pub fn clock(&self) -> &Clock {
        &self.shared.deps.clock
    }

    fn barrier(&self) -> &Barrier {
        &self.shared.deps.barrier
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.barrier().status().sealed
    }

    /// Wakes the sleeper to look at its indexes now.
    pub(crate) fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Resolves at the next [`Broker::wake`] (or one made before, not yet seen).
    pub(crate) async fn woken(&self) {
        self.shared.wake.notified().await;
    }

    /// The worker pool.
    pub(crate) fn workers(&self) -> &Arc<Semaphore> {
        &self.shared.workers
    }

    /// Whether recorded runs must be looked up and resumed; clears the flag.
    pub(crate) fn take_resume_needed(&self) -> bool {
        self.shared.resume_needed.swap(false, Ordering::SeqCst)
    }

    /// Asks the sleeper to look up and resume recorded runs.
    pub(crate) fn set_resume_needed(&self) {
        self.shared.resume_needed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn count_pass(&self) {
        self.shared.sleeper_passes.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the server's shutdown for the workers, with the fence of
    /// the caller's task (the leader term's, on a cluster); false if the
    /// scheduler is running already. After a shutdown that has fired (this
    /// node led before), the scheduler may start again: the guard is armed
    /// anew and recorded runs are resumed.
    pub(crate) fn set_shutdown(&self, shutdown: Shutdown) -> bool {
        let mut slot = self
            .shared
            .shutdown
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            None => {}
            Some((old, _)) if old.is_triggered() => {
                let (guard, guard_rx) = tokio::sync::mpsc::channel(1);
                *self
                    .shared
                    .guard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(guard);
                *self
                    .shared
                    .guard_rx
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(guard_rx);
                self.shared.resume_needed.store(true, Ordering::SeqCst);
            }
            Some(_) => return false,
        }
        *slot = Some((shutdown, crate::storage::cluster::current()));
        true
    }

    /// The server's shutdown; `None` before the scheduler started.
    pub(crate) fn shutdown(&self) -> Option<Shutdown> {
        self.shared
            .shutdown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(shutdown, _)| shutdown.clone())
    }

    /// The fence the workers write under (the leader term's); `None` on a
    /// single node.
    pub(crate) fn fence(&self) -> Option<crate::storage::cluster::Fence> {
        self.shared
            .shutdown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|(_, fence)| fence.clone())
    }

    /// Whether other nodes share the store (etcd): runs they record are
    /// looked up by this node's sleeper on every pass.
    pub(crate) fn is_shared_store(&self) -> bool {
        self.barrier().is_shared_store()
    }

    pub fn options(&self) -> &BrokerOptions {
        &self.shared.options
    }

    /// How many times the scheduler has looked at its indexes so far.
    pub fn sleeper_passes(&self) -> u64 {
        self.shared.sleeper_passes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.shared
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A snapshot of the providers: built-in and registered.
    pub fn registry(&self) -> Registry {
        self.shared
            .registry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn provider(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.shared
            .registry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
    }

    /// Called after an unseal: active runs are resumed by the sleeper.
    pub fn on_unseal(&self) {
        self.shared.resume_needed.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Called after a seal: the sleeper waits for the next unseal.
    pub fn on_seal(&self) {
        self.wake();
    }

    pub(crate) fn subscribe_finished(&self) -> broadcast::Receiver<RunFinished> {
        self.shared.finished.subscribe()
    }

    pub(crate) fn announce_finished(&self, run: &RunRecord) {
        let _ = self.shared.finished.send(RunFinished {
            path: run.path.clone(),
            run_id: run.run_id.clone(),
        });
    }

    /// Counts a finished run by its end state.
    pub(crate) fn count_run(&self, provider: &str, state: RunState) {
        self.shared
            .runs
            .get_or_create(&RunLabels {
                provider: provider.to_owned(),
                outcome: state.as_str().to_owned(),
            })
            .inc();
    }

    pub(crate) fn count_step(&self, step: RotationStep, outcome: StepOutcome) {
        self.shared
            .steps
            .get_or_create(&StepLabels {
                step: step.name().to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    /// Marks `key` as having a worker; false if one already has it.
    pub(crate) fn claim_in_flight(&self, key: &str) -> bool {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned())
    }

    pub(crate) fn release_in_flight(&self, key: &str) {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    pub(crate) fn is_in_flight(&self, key: &str) -> bool {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    /// The concurrency limit of one provider (`random` has none but the pool's).
    pub(crate) fn provider_limit(&self, provider: &str) -> Option<Arc<Semaphore>> {
        if provider == "random" {
            return None;
        }
        let mut map = self
            .shared
            .per_provider
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(
            map.entry(provider.to_owned())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(self.shared.options.per_provider.max(1)))
                })
                .clone(),
        )
    }

    pub(crate) fn new_run_id(&self, now_ms: u64) -> String {
        let n = self.shared.run_counter.fetch_add(1, Ordering::Relaxed);
        let salt = schedule::random_below(1 << 24);
        format!("{now_ms:016x}-{salt:06x}{n:06x}")
    }

    /// A guard the shutdown waits for; `None` once shutdown began.
    pub(crate) fn task_guard(&self) -> Option<tokio::sync::mpsc::Sender<()>> {
        self.shared
            .guard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// After shutdown: no new worker starts, and this resolves once the
    /// sleeper and every worker have stopped (each at a step boundary).
    pub(crate) async fn close_and_wait(&self) {
        self.shared
            .guard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let rx = self
            .shared
            .guard_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut rx) = rx {
            // `None` once every guard is dropped; nothing is ever sent.
            while rx.recv().await.is_some() {}
        }
    }

    // ------------------------------------------------------------ policies

    /// Checks a policy as [`PolicySpec::parse`] does, after asking its
    /// provider to describe itself again (an external plugin's `Describe`),
    /// so its secret reference is the one the provider names now. The
    /// caller must then hold `read` on each of
    /// [`PolicySpec::referenced_secrets`].
    pub async fn check_policy(
        &self,
        path: &SecretPath,
        provider: &str,
        schedule: schedule::Schedule,
        grace: std::time::Duration,
        settings: BTreeMap<String, String>,
    ) -> Result<PolicySpec, RotationError> {
        let found = self
            .provider(provider)
            .ok_or_else(|| RotationPolicyError::UnknownProvider(provider.to_owned()))?;
        found.describe().await?;
        Ok(PolicySpec::parse(
            path.as_str(),
            provider,
            schedule,
            grace,
            settings,
            &self.registry(),
        )?)
    }

    /// Sets (or replaces) a policy; its first run is due at the schedule's
    /// next time after `now_ms`, with jitter. The policy records
    /// `spec.setter`, whose `read` every run checks again.
    pub fn set_policy(
        &self,
        spec: &PolicySpec,
        now_ms: u64,
    ) -> Result<PolicyRecord, RotationError> {
        let next_due = spec
            .schedule
            .next_due(now_ms)
            .map_err(RotationPolicyError::from)?;
        self.set_policy_due_at(spec, next_due, now_ms)
    }

    /// Sets (or replaces) a policy whose first run is due at `next_due` (an
    /// import that keeps an existing schedule; the benchmark).
    pub fn set_policy_due_at(
        &self,
        spec: &PolicySpec,
        next_due: u64,
        now_ms: u64,
    ) -> Result<PolicyRecord, RotationError> {
        let _guard = self.lock();
        let old = self.policy(&spec.path)?;
        let mut record = PolicyRecord::from_spec(spec, next_due, now_ms);
        let mut ops_keys = Vec::new();
        if let Some(old) = &old {
            record.created_at_ms = old.created_at_ms;
            record.last_run_ms = old.last_run_ms;
            record.last_state = old.last_state.clone();
            record.last_error = old.last_error.clone();
            record.last_success_ms = old.last_success_ms;
            record.last_due_ms = old.last_due_ms;
            record.last_on_time = old.last_on_time;
            ops_keys.push(due_key(old.next_due_ms, &old.path));
        }
        let bytes = record.encode_to_vec();
        let pkey = policy_key(&spec.path);
        let dkey = due_key(next_due, &record.path);
        let mut ops: Vec<PlainOp<'_>> = ops_keys.iter().map(|k| PlainOp::Delete(k)).collect();
        ops.push(PlainOp::Put(&pkey, &bytes));
        ops.push(PlainOp::Put(&dkey, b""));
        self.barrier().batch(&ops)?;
        self.wake();
        Ok(record)
    }

    pub fn policy(&self, path: &SecretPath) -> Result<Option<PolicyRecord>, RotationError> {
        match self.barrier().get(&policy_key(path))? {
            None => Ok(None),
            Some(raw) => decode_policy(raw.as_slice()).map(Some),
        }
    }

    pub fn policies(&self) -> Result<Vec<PolicyRecord>, RotationError> {
        self.barrier()
            .scan_prefix(POLICY)?
            .into_iter()
            .map(|(_, raw)| decode_policy(raw.as_slice()))
            .collect()
    }

    /// Removes the policy and its due entry. A run in progress finishes;
    /// a retire already scheduled still happens.
    pub fn delete_policy(&self, path: &SecretPath) -> Result<(), RotationError> {
        let _guard = self.lock();
        let old = self.policy(path)?.ok_or(RotationError::NoPolicy)?;
        let pkey = policy_key(path);
        let dkey = due_key(old.next_due_ms, &old.path);
        self.barrier()
            .batch(&[PlainOp::Delete(&pkey), PlainOp::Delete(&dkey)])?;
        self.wake();
        Ok(())
    }

    /// Finished runs of a secret, newest first.
    pub fn history(&self, path: &SecretPath) -> Result<Vec<RunRecord>, RotationError> {
        let mut runs: Vec<RunRecord> = self
            .barrier()
            .scan_prefix(&history_prefix(path))?
            .into_iter()
            .map(|(_, raw)| decode_run(raw.as_slice()))
            .collect::<Result<_, _>>()?;
        if let Some(active) = self.active_run(path)? {
            runs.push(active);
        }
        runs.sort_by(|a, b| b.run_id.cmp(&a.run_id));
        Ok(runs)
    }

    /// The run in progress on a secret, if any.
    pub fn active_run(&self, path: &SecretPath) -> Result<Option<RunRecord>, RotationError> {
        match self.barrier().get(&run_key(path.as_str()))? {
            None => Ok(None),
            Some(raw) => decode_run(raw.as_slice()).map(Some),
        }
    }

    pub(crate) fn active_run_by_path(
        &self,
        path: &str,
    ) -> Result<Option<RunRecord>, RotationError> {
        match self.barrier().get(&run_key(path))? {
            None => Ok(None),
            Some(raw) => decode_run(raw.as_slice()).map(Some),
        }
    }

    /// One finished run by id.
    pub fn finished_run(
        &self,
        path: &SecretPath,
        run_id: &str,
    ) -> Result<Option<RunRecord>, RotationError> {
        match self.barrier().get(&history_key(path.as_str(), run_id))? {
            None => Ok(None),
            Some(raw) => decode_run(raw.as_slice()).map(Some),
        }
    }

    /// Starts a manual run, or returns the one already in progress. The
    /// caller spawns it (`scheduler::spawn_run`) and awaits `durable`.
    pub fn trigger(
        &self,
        path: &SecretPath,
        now_ms: u64,
    ) -> Result<(RunRecord, bool), RotationError> {
        let _guard = self.lock();
        let mut policy = self.policy(path)?.ok_or(RotationError::NoPolicy)?;
        if let Some(active) = self.active_run(path)? {
            return Ok((active, false));
        }
        let run = RunRecord::start(self.new_run_id(now_ms), &policy, Trigger::Manual, 0, now_ms);
        policy.set_last_state(RunState::Running);
        policy.last_run_ms = now_ms;
        let rkey = run_key(&run.path);
        let pkey = policy_key(path);
        let (rbytes, pbytes) = (run.encode(), policy.encode_to_vec());
        self.barrier()
            .batch(&[PlainOp::Put(&rkey, &rbytes), PlainOp::Put(&pkey, &pbytes)])?;
        Ok((run, true))
    }

    /// Claims a due entry for a scheduled run: writes the run, moves the due
    /// entry to the next occurrence. `None` when the entry was stale or a run
    /// is still in progress on the secret (that occurrence is skipped, the
    /// next one stays scheduled).
    pub(crate) fn claim_due(
        &self,
        key: &str,
        due_ms: u64,
        path: &str,
        now_ms: u64,
    ) -> Result<Option<RunRecord>, RotationError> {
        let _guard = self.lock();
        let Ok(secret_path) = SecretPath::parse(path) else {
            self.barrier().delete(key)?;
            return Ok(None);
        };
        let Some(mut policy) = self.policy(&secret_path)? else {
            self.barrier().delete(key)?;
            return Ok(None);
        };
        if policy.next_due_ms != due_ms {
            self.barrier().delete(key)?;
            return Ok(None);
        }
        let schedule = policy.schedule().map_err(RotationPolicyError::from)?;
        // The next occurrence counts from now, so a long outage does not
        // cause a burst of catch-up runs.
        // A schedule with no next run within the search bound (an old
        // stored expression) leaves the policy never due: no due entry.
        let next_due = match schedule.next_due(now_ms.max(due_ms)) {
            Ok(next) => next,
            Err(ScheduleError::NoNextRun) => {
                tracing::warn!(
                    path,
                    cron = schedule.cron_expression(),
                    "rotation schedule has no next run within the search bound; \
                     the policy is never due again"
                );
                0
            }
            Err(e) => return Err(RotationPolicyError::from(e).into()),
        };
        let active = self.barrier().get(&run_key(path))?.is_some();
        policy.next_due_ms = next_due;
        let run = if active {
            None
        } else {
            policy.last_due_ms = due_ms;
            policy.last_on_time = now_ms <= due_ms + policy.tolerance_ms(now_ms);
            policy.set_last_state(RunState::Running);
            policy.last_run_ms = now_ms;
            Some(RunRecord::start(
                self.new_run_id(now_ms),
                &policy,
                Trigger::Schedule,
                due_ms,
                now_ms,
            ))
        };
        let pkey = policy_key(&secret_path);
        let nkey = due_key(next_due, path);
        let rkey = run_key(path);
        let pbytes = policy.encode_to_vec();
        let rbytes = run.as_ref().map(RunRecord::encode);
        let mut ops = vec![PlainOp::Delete(key), PlainOp::Put(&pkey, &pbytes)];
        if next_due != 0 {
            ops.push(PlainOp::Put(&nkey, b""));
        }
        if let Some(bytes) = &rbytes {
            ops.push(PlainOp::Put(&rkey, bytes));
        }
        self.barrier().batch(&ops)?;
        Ok(run)
    }

    /// Saves a run in progress (the resume point).
    pub(crate) fn save_run(&self, run: &RunRecord) -> Result<(), RotationError> {
        self.barrier().put(&run_key(&run.path), &run.encode())?;
        Ok(())
    }

    /// Ends a run: moves it to the history, records the outcome on the
    /// policy, and (after a promotion) schedules the retire, in one batch.
    pub(crate) fn finish_run(
        &self,
        run: &RunRecord,
        retire: Option<&RetireRecord>,
    ) -> Result<(), RotationError> {
        let _guard = self.lock();
        let path = SecretPath::parse(&run.path).map_err(|_| RotationError::Corrupt)?;
        let policy = self.policy(&path)?.map(|mut p| {
            p.set_last_state(run.state);
            p.last_run_ms = run.started_ms;
            if run.state == RunState::Succeeded {
                p.last_success_ms = run.finished_ms;
                p.last_error.clear();
            } else {
                p.last_error = run.last_error.clone();
            }
            p
        });
        let rkey = run_key(&run.path);
        let hkey = history_key(&run.path, &run.run_id);
        let pkey = policy_key(&path);
        let hbytes = run.encode();
        let pbytes = policy.as_ref().map(Message::encode_to_vec);
        let retire_key_text = retire.map(|r| retire_key(r.retire_at_ms, &r.path));
        let retire_bytes = retire.map(Message::encode_to_vec);
        let old: Vec<String> = {
            let mut keys = self.barrier().scan_keys(&history_prefix(&path))?;
            keys.retain(|k| k != &hkey);
            let excess = (keys.len() + 1).saturating_sub(HISTORY_KEPT);
            keys.truncate(excess);
            keys
        };
        let mut ops = vec![PlainOp::Delete(&rkey), PlainOp::Put(&hkey, &hbytes)];
        if let Some(bytes) = &pbytes {
            ops.push(PlainOp::Put(&pkey, bytes));
        }
        if let (Some(k), Some(v)) = (&retire_key_text, &retire_bytes) {
            ops.push(PlainOp::Put(k, v));
        }
        ops.extend(old.iter().map(|k| PlainOp::Delete(k)));
        self.barrier().batch(&ops)?;
        if retire.is_some() {
            self.wake();
        }
        Ok(())
    }

    /// Ends a retire: appends its step to the run's history and drops the
    /// retire entry.
    pub(crate) fn finish_retire(
        &self,
        key: &str,
        retire: &RetireRecord,
        step: StepRecord,
    ) -> Result<(), RotationError> {
        let _guard = self.lock();
        let hkey = history_key(&retire.path, &retire.run_id);
        let updated = match self.barrier().get(&hkey)? {
            Some(raw) => {
                let mut run = decode_run(raw.as_slice())?;
                run.steps.push(step);
                Some(run.encode())
            }
            None => None,
        };
        let mut ops = vec![PlainOp::Delete(key)];
        if let Some(bytes) = &updated {
            ops.push(PlainOp::Put(&hkey, bytes));
        }
        self.barrier().batch(&ops)?;
        Ok(())
    }

    /// Moves a retire entry to `at_ms`: a run on the same secret is in
    /// progress, and a retire must not touch the target while it is.
    pub(crate) fn postpone_retire(
        &self,
        key: &str,
        retire: &RetireRecord,
        at_ms: u64,
    ) -> Result<(), RotationError> {
        let _guard = self.lock();
        if self.barrier().get(key)?.is_none() {
            // Finished (or postponed) meanwhile.
            return Ok(());
        }
        let mut moved = retire.clone();
        moved.retire_at_ms = at_ms;
        let new_key = retire_key(at_ms, &moved.path);
        let bytes = moved.encode_to_vec();
        if new_key == key {
            self.barrier().put(key, &bytes)?;
        } else {
            self.barrier()
                .batch(&[PlainOp::Delete(key), PlainOp::Put(&new_key, &bytes)])?;
        }
        Ok(())
    }

    /// Runs in progress, to resume.
    pub(crate) fn active_runs(&self) -> Result<Vec<RunRecord>, RotationError> {
        self.barrier()
            .scan_prefix(RUN)?
            .into_iter()
            .map(|(_, raw)| decode_run(raw.as_slice()))
            .collect()
    }

    /// The first entries of an index (`DUE` or `RETIRE`), in time order.
    pub(crate) fn index_head(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<IndexEntry>, RotationError> {
        let end = format!("{}\u{7f}", prefix.trim_end_matches('/'));
        let mut out = Vec::new();
        for (key, value) in self.barrier().scan_range(prefix, &end, limit)? {
            let Some(rest) = key.strip_prefix(prefix) else {
                continue;
            };
            let Some((ms, path)) = rest.split_once('/') else {
                continue;
            };
            let Ok(ms) = u64::from_str_radix(ms, 16) else {
                continue;
            };
            let path = path.to_owned();
            out.push(IndexEntry {
                key,
                due_ms: ms,
                path,
                value: value.to_vec(),
            });
        }
        Ok(out)
    }

    // ------------------------------------------------------------ providers

    /// Connects to an external provider and registers it under `name`; it
    /// is kept across restarts and reconnected at unseal.
    ///
    /// Everything is checked before anything changes: the name, the
    /// endpoint, whether the name is taken, and the plugin's `Describe`. A
    /// name that is taken is refused ([`RegistryError::NameTaken`]) unless
    /// `replace` says who replaces it (the caller holds `admin` on the
    /// whole collection; `api` checks that); a built-in provider is never
    /// replaced. A replacement is audited, with the old and the new
    /// endpoint, before it takes effect: if that record cannot be written,
    /// nothing changes. Registrations are serialised.
    pub async fn register_external(
        &self,
        name: &str,
        endpoint: &str,
        ca_pem: Option<&[u8]>,
        replace: Option<Replacing<'_>>,
    ) -> Result<Arc<providers::ExternalProvider>, RotationError> {
        Registry::check_name(name)?;
        if Registry::with_builtin().get(name).is_some() {
            return Err(RegistryError::NameTaken(name.to_owned()).into());
        }
        providers::PluginEndpoint::parse(endpoint)?;
        let _registering = self.shared.registrations.lock().await;
        let key = format!("{PROVIDER}{name}");
        let old = match self.barrier().get(&key)? {
            Some(raw) => Some(ProviderRecord::decode(raw.as_slice()).map_err(|_| {
                tracing::error!(provider = %name, "cannot read a stored provider registration");
                RotationError::Corrupt
            })?),
            None => None,
        };
        let live = self
            .shared
            .external
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name);
        if (old.is_some() || live) && replace.is_none() {
            return Err(RegistryError::NameTaken(name.to_owned()).into());
        }
        let provider =
            Arc::new(providers::ExternalProvider::connect(name, endpoint, ca_pem).await?);
        if let Some(who) = replace {
            let before = old.as_ref().map_or("none", |o| o.endpoint.as_str());
            let note = format!("provider endpoint replaced: `{before}` -> `{endpoint}`");
            let resource = format!("sys/rotation/providers/{name}");
            self.shared.deps.audit.append(&AuditEvent {
                request_id: who.request_id,
                method: "keyward.rotation/ReplaceProvider",
                resource: Some(&resource),
                identity: Some(who.identity),
                accessor: Some(who.accessor),
                actor: None,
                source: None,
                outcome: Outcome::Allowed,
                code: "OK",
                error: Some(&note),
                token: None,
                values: &[],
                call: None,
            })?;
            tracing::info!(provider = %name, old = %before, new = %endpoint, identity = %who.identity, "rotation provider endpoint replaced");
        }
        let record = ProviderRecord {
            name: name.to_owned(),
            endpoint: endpoint.to_owned(),
            ca_pem: ca_pem.map(<[u8]>::to_vec).unwrap_or_default(),
        };
        self.barrier().put(&key, &record.encode_to_vec())?;
        self.install_external(name, provider.clone())?;
        Ok(provider)
    }

    /// Puts `provider` in the registry under `name` (replacing one of that
    /// name). The new registry is built and checked first: a refused
    /// provider leaves everything as it was.
    fn install_external(
        &self,
        name: &str,
        provider: Arc<dyn Provider>,
    ) -> Result<(), RotationError> {
        let mut external = self
            .shared
            .external
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = external.clone();
        next.insert(name.to_owned(), provider);
        let mut registry = Registry::with_builtin();
        for p in next.values() {
            registry.register(p.clone())?;
        }
        *external = next;
        *self
            .shared
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner) = registry;
        Ok(())
    }

    /// Reconnects the registered external providers (after unseal). A plugin
    /// that does not answer is logged and tried again at the next unseal.
    pub(crate) async fn reload_external(&self) {
        let records = match self.barrier().scan_prefix(PROVIDER) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read registered rotation providers");
                return;
            }
        };
        for (_, raw) in records {
            let Ok(record) = ProviderRecord::decode(raw.as_slice()) else {
                continue;
            };
            if self.provider(&record.name).is_some() {
                continue;
            }
            let ca = (!record.ca_pem.is_empty()).then_some(record.ca_pem.as_slice());
            match providers::ExternalProvider::connect(&record.name, &record.endpoint, ca).await {
                Ok(p) => {
                    if let Err(e) = self.install_external(&record.name, Arc::new(p)) {
                        tracing::warn!(provider = %record.name, error = %e, "cannot register provider");
                    }
                }
                Err(e) => {
                    tracing::warn!(provider = %record.name, error = %e, "rotation provider not reachable")
                }
            }
        }
    }

    // ------------------------------------------------------------ governance

    /// Overdue secrets, the compliance rate (the share of policies that are
    /// not overdue, whose last scheduled run started on time and whose last
    /// run did not fail) and the last failure of each failing secret.
    pub fn rotation_summary(&self, now_ms: u64) -> Result<RotationSummary, RotationError> {
        let policies = self.policies()?;
        let mut overdue = Vec::new();
        let mut last_failures = Vec::new();
        let mut on_schedule = 0usize;
        for p in &policies {
            let late = p.is_overdue(now_ms);
            if late {
                overdue.push((p.path.clone(), p.next_due_ms));
            }
            let failed = p.last_state()? == Some(RunState::Failed);
            if failed {
                last_failures.push((p.path.clone(), p.last_error.clone()));
            }
            let started_on_time = p.last_due_ms == 0 || p.last_on_time;
            if !late && !failed && started_on_time {
                on_schedule += 1;
            }
        }
        let compliance = if policies.is_empty() {
            1.0
        } else {
            on_schedule as f64 / policies.len() as f64
        };
        Ok(RotationSummary {
            overdue,
            compliance,
            last_failures,
        })
    }
}

/// Reads a stored run; an unreadable one is logged (with why) and corrupt.
fn decode_run(raw: &[u8]) -> Result<RunRecord, RotationError> {
    RunRecord::decode(raw).map_err(corrupt)
}

/// Reads a stored policy, its last state checked like a run's.
fn decode_policy(raw: &[u8]) -> Result<PolicyRecord, RotationError> {
    let policy = PolicyRecord::decode(raw).map_err(|_| corrupt(RecordError::Malformed))?;
    policy.last_state()?;
    Ok(policy)
}

fn corrupt(e: RecordError) -> RotationError {
    tracing::error!(error = %e, "cannot read a stored rotation record");
    RotationError::Corrupt
}

impl From<RecordError> for RotationError {
    fn from(e: RecordError) -> Self {
        corrupt(e)
    }
}

pub(crate) fn policy_key(path: &SecretPath) -> String {
    format!("{POLICY}{path}")
}

pub(crate) fn due_key(ms: u64, path: &str) -> String {
    format!("{DUE}{ms:016x}/{path}")
}

pub(crate) fn retire_key(ms: u64, path: &str) -> String {
    format!("{RETIRE}{ms:016x}/{path}")
}

pub(crate) fn run_key(path: &str) -> String {
    format!("{RUN}{path}")
}

fn history_prefix(path: &SecretPath) -> String {
    format!("{HISTORY}{path}#")
}

pub(crate) fn history_key(path: &str, run_id: &str) -> String {
    format!("{HISTORY}{path}#{run_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_sort_by_time() {
        let a = due_key(999, "zzz");
        let b = due_key(1000, "aaa");
        let c = due_key(u64::MAX / 2, "a");
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(a, "rotation/due/00000000000003e7/zzz");
    }

    #[test]
    fn a_policy_with_an_unknown_last_state_is_corrupt() {
        let mut policy = PolicyRecord {
            path: "app/db".into(),
            ..Default::default()
        };
        assert!(decode_policy(&policy.encode_to_vec()).is_ok());
        policy.set_last_state(RunState::Failed);
        let back = decode_policy(&policy.encode_to_vec()).map(|p| p.last_state());
        assert!(matches!(back, Ok(Ok(Some(RunState::Failed)))));
        policy.last_state = "paused".into();
        assert!(matches!(
            decode_policy(&policy.encode_to_vec()),
            Err(RotationError::Corrupt)
        ));
    }
}
