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
        if broker.take_resume_needed() {
            resume_recorded(broker).await;
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
    let latest = clock.now_ms() + MAX_SLEEP.as_millis() as u64;
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
    tokio::spawn(
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
    );
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
    tokio::spawn(
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
    );
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
