//! The scheduler: one sleeper over the time-ordered indexes
//! (`rotation/due/...` for rotations, `rotation/retire/...` for retires,
//! both keyed by the big-endian due time), a bounded pool of workers, and a
//! concurrency limit per provider.
//!
//! The sleeper reads only the head of each index, hands what is due to free
//! workers (claiming a batch in storage, then one flush for all), and then
//! sleeps until the earliest future entry, a wake-up (policy set, manual
//! trigger, unseal, seal, shutdown) or at most [`MAX_SLEEP`]. So 100,000
//! policies that are not due cost one index read per wake-up and nothing in
//! between. When every worker is busy it waits for one to be free, leaving
//! the backlog in the index, not in memory.
//!
//! It runs only while the vault is unsealed; after an unseal it first
//! resumes every run recorded in `rotation/run/` (see `machine`). On
//! shutdown it stops taking work; workers stop at their next step boundary,
//! and the task [`start`] returns ends once they all have.
//!
//! Every sleep is on the broker's clock, so a paused tokio clock drives the
//! scheduler. No storage of its own: it goes through the [`super::Broker`].

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::machine::{self, Driven};
use super::record::{RetireRecord, RunRecord};
use super::{Broker, IndexEntry, DUE, RETIRE};
use crate::clock::Shutdown;

/// The longest the sleeper sleeps without looking at the indexes.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);
/// How often a sealed vault is looked at again (an unseal through another
/// path than `Broker::on_unseal` still gets noticed).
const SEALED_LOOK: Duration = Duration::from_secs(5);
/// The longest sleep on a shared store (etcd): runs and due entries that
/// other nodes record are seen within it.
pub const SHARED_LOOK: Duration = Duration::from_secs(2);
/// Index entries read per look.
const HEAD: usize = 256;
/// How much later a retire is tried again when a run on the same secret is
/// in progress (on a worker or recorded in `rotation/run/<path>`).
pub const RETIRE_POSTPONE: Duration = Duration::from_secs(2);

/// Starts the sleeper, which hands due rotations and retires to workers
/// until `shutdown`. The task ends once the sleeper and every worker (manual
/// triggers' included) have stopped: the server awaits it, with a deadline.
/// A second start does nothing but return a finished task.
pub fn start(broker: Broker, shutdown: Shutdown) -> JoinHandle<()> {
    if !broker.set_shutdown(shutdown.clone()) {
        tracing::warn!("the rotation scheduler is already running");
        return tokio::spawn(async {});
    }
    let guard = broker.task_guard();
    tokio::spawn(
        async move {
            if guard.is_some() {
                sleeper(&broker, &shutdown).await;
            }
            drop(guard);
            broker.close_and_wait().await;
            tracing::debug!("rotation scheduler and workers stopped");
        }
        .instrument(tracing::info_span!("rotation_scheduler")),
    )
}

/// A permit of `semaphore`, or `None` if shutdown came first.
async fn acquire(semaphore: &Arc<Semaphore>, shutdown: &Shutdown) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        permit = semaphore.clone().acquire_owned() => permit.ok(),
        _ = shutdown.wait() => None,
    }
}

/// What one look at the indexes found.
#[derive(Debug, Default)]
struct Pass {
    /// The earliest future entry.
    next: Option<u64>,
    /// Every worker was busy: wait for one, then look again.
    busy: bool,
    /// A full head was due: look again at once.
    more: bool,
}

impl Pass {
    fn due_at(&mut self, at: u64) {
        self.next = Some(self.next.map_or(at, |n| n.min(at)));
    }
}

/// The one sleeper: resumes recorded runs, hands out what is due, sleeps.
async fn sleeper(broker: &Broker, shutdown: &Shutdown) {
    while !shutdown.is_triggered() {
        if broker.is_sealed() {
            tokio::select! {
                _ = broker.woken() => {}
                _ = shutdown.wait() => {}
                _ = broker.clock().sleep(SEALED_LOOK) => {}
            }
            continue;
        }
        // On a shared store other nodes record runs (a manual trigger on
        // a follower): the leader looks them up on every pass.
        if broker.take_resume_needed() {
            resume_recorded(broker).await;
        } else if broker.is_shared_store() {
            if let Ok(runs) = broker.active_runs() {
                for run in runs {
                    spawn_run(broker, run, None);
                }
            }
        }
        broker.count_pass();
        let now = broker.clock().now_ms();
        let mut pass = Pass::default();
        dispatch_retires(broker, now, &mut pass);
        if !pass.busy {
            dispatch_due(broker, now, &mut pass).await;
        }
        rest(broker, shutdown, &pass).await;
    }
    tracing::debug!("rotation sleeper stopped");
}

/// After a start or an unseal (or a worker stopped on a storage error):
/// reconnects external providers and resumes every recorded run.
async fn resume_recorded(broker: &Broker) {
    broker.reload_external().await;
    match broker.active_runs() {
        Ok(runs) => {
            if !runs.is_empty() {
                tracing::info!(runs = runs.len(), "resuming rotations");
            }
            for run in runs {
                spawn_run(broker, run, None);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read rotations in progress");
            broker.set_resume_needed();
        }
    }
}

/// Waits after a pass: for a free worker when all were busy, not at all
/// when more is due, else until the next entry (at most [`MAX_SLEEP`]), a
/// wake-up or shutdown.
async fn rest(broker: &Broker, shutdown: &Shutdown, pass: &Pass) {
    if pass.busy {
        let permit = tokio::select! {
            p = acquire(broker.workers(), shutdown) => p,
            _ = broker.woken() => None,
        };
        drop(permit);
        return;
    }
    if pass.more {
        return;
    }
    let clock = broker.clock();
    let longest = if broker.is_shared_store() {
        SHARED_LOOK
    } else {
        MAX_SLEEP
    };
    let latest = clock.now_ms() + longest.as_millis() as u64;
    let until = pass.next.map_or(latest, |at| at.min(latest));
    tokio::select! {
        _ = clock.sleep_until_ms(until) => {}
        _ = broker.woken() => {}
        _ = shutdown.wait() => {}
    }
}

/// Whether a run on `path` is on a worker or recorded. A storage error
/// counts as a run, so the retire waits rather than risk the target.
fn run_on_path(broker: &Broker, path: &str) -> bool {
    broker.is_in_flight(path) || !matches!(broker.active_run_by_path(path), Ok(None))
}

/// Moves a retire [`RETIRE_POSTPONE`] later; returns when it is due.
fn postpone(broker: &Broker, key: &str, record: &RetireRecord) -> u64 {
    let at = broker.clock().now_ms() + RETIRE_POSTPONE.as_millis() as u64;
    if let Err(e) = broker.postpone_retire(key, record, at) {
        tracing::warn!(path = %record.path, error = %e, "cannot postpone a retire");
    }
    at
}

/// Hands the due retires to free workers; a retire whose secret has a run
/// in progress is postponed.
fn dispatch_retires(broker: &Broker, now: u64, pass: &mut Pass) {
    let head = match broker.index_head(RETIRE, HEAD) {
        Ok(head) => head,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the retire index");
            return;
        }
    };
    pass.more |= head.len() == HEAD;
    for IndexEntry {
        key, due_ms, value, ..
    } in head
    {
        if due_ms > now {
            pass.due_at(due_ms);
            pass.more = false;
            break;
        }
        if broker.is_in_flight(&retire_flight(&key)) {
            continue;
        }
        let Ok(permit) = broker.workers().clone().try_acquire_owned() else {
            pass.busy = true;
            break;
        };
        match RetireRecord::decode(value.as_slice()) {
            Ok(record) if run_on_path(broker, &record.path) => {
                drop(permit);
                tracing::debug!(path = %record.path, "a run is in progress; retire postponed");
                pass.due_at(postpone(broker, &key, &record));
            }
            Ok(record) => spawn_retire(broker, key, record, permit),
            Err(_) => {
                tracing::warn!(key = %key, "dropping a corrupt retire entry");
                let _ = broker.deps().barrier.delete(&key);
            }
        }
    }
}

/// Claims the due rotations free workers can take (one batch in storage,
/// one flush for all), then starts them.
async fn dispatch_due(broker: &Broker, now: u64, pass: &mut Pass) {
    let head = match broker.index_head(DUE, HEAD) {
        Ok(head) => head,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the due index");
            return;
        }
    };
    pass.more |= head.len() == HEAD;
    let mut claimed: Vec<(RunRecord, OwnedSemaphorePermit)> = Vec::new();
    for IndexEntry {
        key, due_ms, path, ..
    } in head
    {
        if due_ms > now {
            pass.due_at(due_ms);
            pass.more = false;
            break;
        }
        let Ok(permit) = broker.workers().clone().try_acquire_owned() else {
            pass.busy = true;
            break;
        };
        match broker.claim_due(&key, due_ms, &path, now) {
            Ok(Some(run)) => claimed.push((run, permit)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %path, error = %e, "cannot claim a due rotation");
                break;
            }
        }
    }
    if claimed.is_empty() {
        return;
    }
    if let Err(e) = broker.deps().barrier.durable().await {
        tracing::warn!(error = %e, "cannot make rotation claims durable");
        broker.set_resume_needed();
        return;
    }
    for (run, permit) in claimed {
        spawn_run(broker, run, Some(permit));
    }
}

fn retire_flight(key: &str) -> String {
    format!("retire:{key}")
}

/// Runs (or resumes) `run` on a worker. A run already on a worker is left
/// to it. Without a `permit`, the task waits for a free worker. Before the
/// scheduler started, or after shutdown, nothing starts: the run stays
/// recorded and is resumed at the next start.
pub fn spawn_run(broker: &Broker, run: RunRecord, permit: Option<OwnedSemaphorePermit>) {
    let Some(shutdown) = broker.shutdown() else {
        return;
    };
    if !broker.claim_in_flight(&run.path) {
        return;
    }
    let Some(guard) = broker.task_guard() else {
        broker.release_in_flight(&run.path);
        return;
    };
    let broker = broker.clone();
    let span = tracing::info_span!("rotation", path = %run.path, run = %run.run_id);
    // The worker writes under the leader term's fence, whoever spawned it
    // (the sleeper, or a request on this node).
    let fence = broker.fence();
    tokio::spawn(crate::storage::cluster::fenced(
        fence,
        async move {
            let _guard = guard;
            let finished = run_on_worker(&broker, &run, permit, &shutdown).await;
            broker.release_in_flight(&run.path);
            broker.announce_finished(&run);
            if finished {
                // A run started (trigger or schedule) while this one was
                // finishing found the path busy and was left to us.
                if let Ok(Some(next)) = broker.active_run_by_path(&run.path) {
                    if next.run_id != run.run_id {
                        spawn_run(&broker, next, None);
                    }
                }
            }
        }
        .instrument(span),
    ));
}

/// Takes a worker and the provider's limit, then drives the run; true if
/// it finished (succeeded or failed).
async fn run_on_worker(
    broker: &Broker,
    run: &RunRecord,
    permit: Option<OwnedSemaphorePermit>,
    shutdown: &Shutdown,
) -> bool {
    let worker = match permit {
        Some(p) => Some(p),
        None => acquire(broker.workers(), shutdown).await,
    };
    if worker.is_none() {
        return false;
    }
    let _provider_permit = match broker.provider_limit(&run.provider) {
        Some(limit) => match acquire(&limit, shutdown).await {
            Some(p) => Some(p),
            None => return false,
        },
        None => None,
    };
    match machine::drive(broker, run.clone(), shutdown).await {
        Ok(Driven::Finished(_)) => true,
        Ok(Driven::Interrupted) => false,
        Err(e) => {
            tracing::warn!(error = %e, "rotation stopped; it resumes later");
            broker.set_resume_needed();
            false
        }
    }
}

/// Retires on a worker. The retire holds the secret's path in flight too,
/// so no run starts on the secret while it touches the target; a run
/// started meanwhile is left to it and started when it is done.
fn spawn_retire(broker: &Broker, key: String, record: RetireRecord, permit: OwnedSemaphorePermit) {
    let Some(shutdown) = broker.shutdown() else {
        return;
    };
    let flight = retire_flight(&key);
    if !broker.claim_in_flight(&flight) {
        return;
    }
    if !broker.claim_in_flight(&record.path) {
        // A run is on a worker: try again after it.
        broker.release_in_flight(&flight);
        postpone(broker, &key, &record);
        return;
    }
    let Some(guard) = broker.task_guard() else {
        broker.release_in_flight(&record.path);
        broker.release_in_flight(&flight);
        return;
    };
    let broker = broker.clone();
    let span = tracing::info_span!("rotation_retire", path = %record.path, run = %record.run_id);
    let fence = broker.fence();
    tokio::spawn(crate::storage::cluster::fenced(
        fence,
        async move {
            let _guard = guard;
            let _worker = permit;
            let path = record.path.clone();
            retire_on_worker(&broker, &key, record, &shutdown).await;
            broker.release_in_flight(&path);
            broker.release_in_flight(&flight);
            // A run recorded while the retire held the path found it busy
            // and was left to us.
            if let Ok(Some(next)) = broker.active_run_by_path(&path) {
                spawn_run(&broker, next, None);
            }
            broker.wake();
        }
        .instrument(span),
    ));
}

/// Takes the provider's limit and retires, unless a run was recorded on the
/// secret between the look and the claim (then the retire is postponed).
async fn retire_on_worker(broker: &Broker, key: &str, record: RetireRecord, shutdown: &Shutdown) {
    let _provider_permit = match broker.provider_limit(&record.provider) {
        Some(limit) => match acquire(&limit, shutdown).await {
            Some(p) => Some(p),
            None => return,
        },
        None => None,
    };
    if !matches!(broker.active_run_by_path(&record.path), Ok(None)) {
        postpone(broker, key, &record);
        return;
    }
    if let Err(e) = machine::retire(broker, key, record, shutdown).await {
        tracing::warn!(error = %e, "retire stopped; it is tried again later");
    }
}

/// The scheduler and the state machine on a real (temporary) store, with
/// tokio's clock paused: grace periods, back-off and schedules pass without
/// sleeping, and what is asserted is read from the records' own times.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::audit::AuditLog;
    use crate::barrier::{Barrier, BarrierOptions};
    use crate::clock::{Clock, ShutdownTrigger};
    use crate::metrics::Metrics;
    use crate::rotation::policy::PolicySpec;
    use crate::rotation::provider::{
        BoxFuture, Provider, ProviderError, ProviderSettings, RotationInput,
    };
    use crate::rotation::record::{RotationStep, RunState, StepOutcome, Trigger};
    use crate::rotation::schedule::Schedule;
    use crate::rotation::{BrokerOptions, RotationDeps};
    use crate::secrecy::{SecretBytes, SecretData};
    use crate::secrets::{DataLimits, PutRequest, SecretPath, Selector, Stage};
    use crate::storage::SledBackend;

    /// 2026-01-01T00:00:00Z.
    const START_MS: u64 = 1_767_225_600_000;
    const HOUR: Duration = Duration::from_secs(3600);
    /// A bound on paused time, so a broken scheduler fails the test.
    const PATIENCE: Duration = Duration::from_secs(10 * 3600);

    struct Fixture {
        _dir: tempfile::TempDir,
        broker: Broker,
        stop: ShutdownTrigger,
        task: JoinHandle<()>,
    }

    impl Fixture {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let backend = SledBackend::open(dir.path().join("data")).unwrap();
            let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
            let shares = barrier.init(1, 1).unwrap();
            barrier.unseal(&shares[0].0).unwrap();
            let barrier = Arc::new(barrier);
            let audit = AuditLog::open(&dir.path().join("audit.log"), Clock::system()).unwrap();
            audit.set_hmac_key(Some(barrier.derive_key("audit/hmac").unwrap()));
            let deps = RotationDeps {
                secrets: Arc::new(crate::secrets::SecretStore::new(
                    barrier.clone(),
                    DataLimits::default(),
                )),
                audit: Arc::new(audit),
                barrier,
                clock: Clock::starting_at(START_MS),
                reads: Arc::new(crate::rotation::reads::NoReads),
            };
            let broker = Broker::new(deps, &Metrics::new(), BrokerOptions::default());
            broker
                .install_external("alwaysfails", Arc::new(FailsVerify))
                .unwrap();
            let stop = ShutdownTrigger::new();
            let task = start(broker.clone(), stop.signal());
            Self {
                _dir: dir,
                broker,
                stop,
                task,
            }
        }

        fn now(&self) -> u64 {
            self.broker.clock().now_ms()
        }

        /// A secret with `password` = `initial`, rotated by `provider` every
        /// hour with `grace`, its first run due now.
        fn secret(&self, name: &str, provider: &str, grace: Duration) -> SecretPath {
            let path = SecretPath::parse(name).unwrap();
            let data: SecretData = [("password".to_owned(), SecretBytes::from("initial"))]
                .into_iter()
                .collect();
            let put = PutRequest {
                path: path.clone(),
                data,
                cas: None,
                max_versions: None,
                owner: None,
                stage: Stage::Current,
            };
            let proof = crate::policy::Authorized::for_broker(
                path.resource(),
                crate::policy::Capability::Write,
            );
            self.broker
                .deps()
                .secrets
                .put(&proof, put, self.now())
                .unwrap();
            let spec = PolicySpec::parse(
                path.as_str(),
                provider,
                Schedule::every(HOUR).unwrap(),
                grace,
                Default::default(),
                &self.broker.registry(),
            )
            .unwrap();
            let now = self.now();
            self.broker.set_policy_due_at(&spec, now, now).unwrap();
            path
        }

        /// Waits (on the paused clock) for a finished run of `path` that
        /// `done` accepts.
        async fn run_where(
            &self,
            path: &SecretPath,
            done: impl Fn(&RunRecord) -> bool,
        ) -> RunRecord {
            let deadline = self.now() + PATIENCE.as_millis() as u64;
            loop {
                let history = self.broker.history(path).unwrap();
                if let Some(run) = history.into_iter().find(|r| done(r)) {
                    return run;
                }
                assert!(self.now() < deadline, "gave up waiting on {path}");
                self.broker.clock().sleep(Duration::from_millis(100)).await;
            }
        }

        async fn stop(self) {
            self.stop.trigger();
            tokio::time::timeout(PATIENCE, self.task)
                .await
                .expect("the scheduler stops")
                .unwrap();
        }
    }

    fn has(run: &RunRecord, step: RotationStep) -> Option<&crate::rotation::record::StepRecord> {
        run.steps.iter().find(|s| s.step == step)
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_rotation_runs_and_its_retire_waits_for_the_grace_period() {
        let f = Fixture::start();
        let grace = Duration::from_secs(600);
        let path = f.secret("app/key", "random", grace);

        let run = f.run_where(&path, |r| r.state != RunState::Running).await;
        assert_eq!(run.state, RunState::Succeeded, "{:?}", run.steps);
        assert_eq!(run.trigger, Trigger::Schedule);
        let kinds: Vec<_> = run.steps.iter().map(|s| (s.step, s.outcome)).collect();
        assert_eq!(
            kinds[..4],
            [
                (RotationStep::Generate, StepOutcome::Ok),
                (RotationStep::Apply, StepOutcome::Ok),
                (RotationStep::Verify, StepOutcome::Ok),
                (RotationStep::Promote, StepOutcome::Ok),
            ]
        );
        let secrets = &f.broker.deps().secrets;
        let current = secrets.get(&path, Selector::Stage(Stage::Current)).unwrap();
        assert_eq!(current.version, 2);
        let password = current.data.get("password").map(SecretBytes::expose);
        assert_ne!(password, Some(&b"initial"[..]));

        // The retire follows on its own, not before the grace period.
        let retired = f
            .run_where(&path, |r| has(r, RotationStep::Retire).is_some())
            .await;
        let promoted_at = has(&retired, RotationStep::Promote).unwrap().at_ms;
        let retire = has(&retired, RotationStep::Retire).unwrap();
        assert_eq!((retire.outcome, retire.version), (StepOutcome::Ok, 1));
        assert!(
            retire.at_ms >= promoted_at + grace.as_millis() as u64,
            "retired at {} before the grace period ended ({promoted_at} + {grace:?})",
            retire.at_ms
        );

        // The next scheduled run comes an hour (plus jitter) after the first.
        let second = f
            .run_where(&path, |r| {
                r.run_id != run.run_id && r.state != RunState::Running
            })
            .await;
        assert_eq!(second.state, RunState::Succeeded);
        assert!(second.started_ms >= run.started_ms + HOUR.as_millis() as u64);
        f.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_value_that_never_verifies_is_rolled_back_after_three_attempts() {
        let f = Fixture::start();
        let path = f.secret("app/db", "alwaysfails", Duration::ZERO);
        let run = f.run_where(&path, |r| r.state != RunState::Running).await;
        assert_eq!(run.state, RunState::Failed, "{:?}", run.steps);
        let verifies: Vec<_> = run
            .steps
            .iter()
            .filter(|s| s.step == RotationStep::Verify)
            .collect();
        assert_eq!(verifies.len(), 3, "{:?}", run.steps);
        assert!(verifies.iter().all(|s| s.outcome == StepOutcome::Failed));
        let mut versions: Vec<u64> = verifies.iter().map(|s| s.version).collect();
        versions.dedup();
        assert_eq!(versions.len(), 3, "a fresh value each attempt");
        // The back-off waited between attempts (on the clock).
        assert!(verifies[1].at_ms > verifies[0].at_ms);
        // The rollback restored current, which verifies: one outcome.
        let rollback = run.steps.last().unwrap();
        assert_eq!(
            (rollback.step, rollback.outcome),
            (RotationStep::Rollback, StepOutcome::Ok),
            "{:?}",
            run.steps
        );
        let secrets = &f.broker.deps().secrets;
        let current = secrets.get(&path, Selector::Stage(Stage::Current)).unwrap();
        assert_eq!(current.version, 1, "current never moved");
        assert!(secrets.get(&path, Selector::Stage(Stage::Pending)).is_err());
        let policy = f.broker.policy(&path).unwrap().unwrap();
        assert_eq!(policy.last_state(), Ok(Some(RunState::Failed)));
        f.stop().await;
    }

    /// Generates `new-<n>` values that never verify; the current value
    /// (what a rollback restores) does.
    struct FailsVerify;

    impl Provider for FailsVerify {
        fn name(&self) -> &str {
            "alwaysfails"
        }

        fn validate(&self, _: &ProviderSettings) -> Result<(), ProviderError> {
            Ok(())
        }

        fn admin_secret_key(&self) -> Option<String> {
            None
        }

        fn generate<'a>(
            &'a self,
            _: &'a RotationInput<'a>,
        ) -> BoxFuture<'a, Result<SecretData, ProviderError>> {
            Box::pin(async {
                Ok([("password".to_owned(), SecretBytes::from("never-works"))]
                    .into_iter()
                    .collect())
            })
        }

        fn apply<'a>(
            &'a self,
            _: &'a RotationInput<'a>,
            _: &'a SecretData,
        ) -> BoxFuture<'a, Result<(), ProviderError>> {
            Box::pin(async { Ok(()) })
        }

        fn verify<'a>(
            &'a self,
            input: &'a RotationInput<'a>,
            pending: &'a SecretData,
        ) -> BoxFuture<'a, Result<(), ProviderError>> {
            Box::pin(async move {
                let password = |d: &'a SecretData| d.get("password").map(SecretBytes::expose);
                if input.current.and_then(password) == password(pending) {
                    Ok(())
                } else {
                    Err(ProviderError::Refused("login refused".into()))
                }
            })
        }

        fn retire<'a>(
            &'a self,
            _: &'a RotationInput<'a>,
            _: &'a SecretData,
        ) -> BoxFuture<'a, Result<(), ProviderError>> {
            Box::pin(async { Ok(()) })
        }
    }
}
