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
//! shutdown it stops taking work; workers stop at their next step boundary.
//!
//! No storage of its own: it goes through the [`super::Broker`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::machine::{self, Driven, RetireRecord, RunRecord};
use super::{DUE, RETIRE};
use crate::clock::Shutdown;
use crate::core::Core;

/// Wall time until this module takes the core's `Clock` (the rotation work
/// of issue 11 does); not paused by tests.
fn now_ms() -> u64 {
    crate::clock::Clock::system().now_ms()
}

/// The longest the sleeper sleeps without looking at the indexes.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Index entries read per look.
const HEAD: usize = 256;
/// How much later a retire is tried again when a run on the same secret is
/// in progress (on a worker or recorded in `rotation/run/<path>`).
pub const RETIRE_POSTPONE: Duration = Duration::from_secs(2);

/// Whether a run on `path` is on a worker or recorded. A storage error
/// counts as a run, so the retire waits rather than risk the target.
fn run_on_path(core: &Core, path: &str) -> bool {
    core.rotation.is_in_flight(path) || !matches!(core.rotation.active_run_by_path(path), Ok(None))
}

/// Starts the sleeper. Returns `false` if shutdown already began.
pub fn start(core: &Arc<Core>) -> bool {
    let Some(guard) = core.rotation.task_guard() else {
        return false;
    };
    let core = core.clone();
    tokio::spawn(
        async move {
            sleeper(&core).await;
            drop(guard);
        }
        .instrument(tracing::info_span!("rotation_scheduler")),
    );
    true
}

async fn acquire(semaphore: &Arc<Semaphore>, stop: &mut Shutdown) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        permit = semaphore.clone().acquire_owned() => permit.ok(),
        _ = stop.wait() => None,
    }
}

async fn sleeper(core: &Arc<Core>) {
    let broker = &core.rotation;
    let mut stop = core.shutdown_signal();
    loop {
        if stop.is_triggered() {
            break;
        }
        if core.is_sealed() {
            tokio::select! {
                _ = broker.wake.notified() => {}
                _ = stop.wait() => {}
                // An unseal through another path still gets noticed.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        }
        if broker.resume_needed.swap(false, Ordering::SeqCst) {
            broker.reload_external().await;
            match broker.active_runs() {
                Ok(runs) => {
                    if !runs.is_empty() {
                        tracing::info!(runs = runs.len(), "resuming rotations");
                    }
                    for run in runs {
                        spawn_run(core, run, None);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read rotations in progress");
                    broker.resume_needed.store(true, Ordering::SeqCst);
                }
            }
        }

        broker.sleeper_passes.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let mut next: Option<u64> = None;
        let mut busy = false;
        let mut more = false;

        // Retires.
        match broker.index_head(RETIRE, HEAD) {
            Ok(head) => {
                more |= head.len() == HEAD;
                for super::IndexEntry {
                    key,
                    due_ms: ms,
                    value,
                    ..
                } in head
                {
                    if ms > now {
                        next = Some(next.map_or(ms, |n| n.min(ms)));
                        more = false;
                        break;
                    }
                    let flight = format!("retire:{key}");
                    if broker.is_in_flight(&flight) {
                        continue;
                    }
                    let Ok(permit) = broker.workers.clone().try_acquire_owned() else {
                        busy = true;
                        break;
                    };
                    match RetireRecord::decode(value.as_slice()) {
                        Ok(record) if run_on_path(core, &record.path) => {
                            drop(permit);
                            let at = now + RETIRE_POSTPONE.as_millis() as u64;
                            tracing::debug!(path = %record.path, "a run is in progress; retire postponed");
                            if let Err(e) = broker.postpone_retire(&key, &record, at) {
                                tracing::warn!(path = %record.path, error = %e, "cannot postpone a retire");
                            }
                            next = Some(next.map_or(at, |n| n.min(at)));
                        }
                        Ok(record) => spawn_retire(core, key, record, permit),
                        Err(_) => {
                            tracing::warn!(key = %key, "dropping a corrupt retire entry");
                            let _ = core.barrier.delete(&key);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the retire index"),
        }

        // Rotations.
        if !busy {
            match broker.index_head(DUE, HEAD) {
                Ok(head) => {
                    more |= head.len() == HEAD;
                    let mut claimed: Vec<(RunRecord, OwnedSemaphorePermit)> = Vec::new();
                    for super::IndexEntry {
                        key,
                        due_ms: ms,
                        path,
                        ..
                    } in head
                    {
                        if ms > now {
                            next = Some(next.map_or(ms, |n| n.min(ms)));
                            more = false;
                            break;
                        }
                        let Ok(permit) = broker.workers.clone().try_acquire_owned() else {
                            busy = true;
                            break;
                        };
                        match broker.claim_due(&key, ms, &path, now) {
                            Ok(Some(run)) => claimed.push((run, permit)),
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(path = %path, error = %e, "cannot claim a due rotation");
                                break;
                            }
                        }
                    }
                    if !claimed.is_empty() {
                        // One flush for the whole batch of claims.
                        if let Err(e) = core.barrier.durable().await {
                            tracing::warn!(error = %e, "cannot make rotation claims durable");
                            broker.resume_needed.store(true, Ordering::SeqCst);
                        } else {
                            for (run, permit) in claimed {
                                spawn_run(core, run, Some(permit));
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the due index"),
            }
        }

        if busy {
            // Wait for a free worker, then look again.
            let permit = tokio::select! {
                p = acquire(&broker.workers, &mut stop) => p,
                _ = broker.wake.notified() => None,
            };
            drop(permit);
            continue;
        }
        if more {
            continue;
        }
        let wait = match next {
            Some(ms) => Duration::from_millis(ms.saturating_sub(now_ms())).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = broker.wake.notified() => {}
            _ = stop.wait() => {}
        }
    }
    tracing::debug!("rotation scheduler stopped");
}

/// Runs (or resumes) `run` on a worker. A run already on a worker is left
/// to it. Without a `permit`, the task waits for a free worker.
pub fn spawn_run(core: &Arc<Core>, run: RunRecord, permit: Option<OwnedSemaphorePermit>) {
    let broker = &core.rotation;
    if !broker.claim_in_flight(&run.path) {
        return;
    }
    let Some(guard) = broker.task_guard() else {
        broker.release_in_flight(&run.path);
        return;
    };
    let core = core.clone();
    let span = tracing::info_span!("rotation", path = %run.path, run = %run.run_id);
    tokio::spawn(
        async move {
            let _guard = guard;
            let broker = &core.rotation;
            let mut stop = core.shutdown_signal();
            let path = run.path.clone();
            let worker = match permit {
                Some(p) => Some(p),
                None => acquire(&broker.workers, &mut stop).await,
            };
            let limit = broker.provider_limit(&run.provider);
            let provider_permit = match &limit {
                Some(s) if worker.is_some() => acquire(s, &mut stop).await,
                _ => None,
            };
            let ready = worker.is_some() && (limit.is_none() || provider_permit.is_some());
            let mut finished = false;
            if ready {
                match machine::drive(&core, run.clone(), stop).await {
                    Ok(Driven::Finished(_)) => finished = true,
                    Ok(Driven::Interrupted) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "rotation stopped; it resumes later");
                        broker.resume_needed.store(true, Ordering::SeqCst);
                    }
                }
            }
            drop(provider_permit);
            drop(worker);
            broker.release_in_flight(&path);
            broker.announce_finished(&run);
            if finished {
                // A run started (trigger or schedule) while this one was
                // finishing found the path busy and was left to us.
                if let Ok(Some(next)) = broker.active_run_by_path(&path) {
                    if next.run_id != run.run_id {
                        spawn_run(&core, next, None);
                    }
                }
            }
        }
        .instrument(span),
    );
}

/// Retires on a worker. The retire holds the secret's path in flight too,
/// so no run starts on the secret while it touches the target; a run
/// started meanwhile is left to it and started when it is done.
fn spawn_retire(core: &Arc<Core>, key: String, record: RetireRecord, permit: OwnedSemaphorePermit) {
    let broker = &core.rotation;
    let flight = format!("retire:{key}");
    if !broker.claim_in_flight(&flight) {
        return;
    }
    if !broker.claim_in_flight(&record.path) {
        // A run is on a worker: try again after it.
        broker.release_in_flight(&flight);
        let at = now_ms() + RETIRE_POSTPONE.as_millis() as u64;
        if let Err(e) = broker.postpone_retire(&key, &record, at) {
            tracing::warn!(path = %record.path, error = %e, "cannot postpone a retire");
        }
        return;
    }
    let Some(guard) = broker.task_guard() else {
        broker.release_in_flight(&record.path);
        broker.release_in_flight(&flight);
        return;
    };
    let core = core.clone();
    let span = tracing::info_span!("rotation_retire", path = %record.path, run = %record.run_id);
    tokio::spawn(
        async move {
            let _guard = guard;
            let _worker = permit;
            let broker = &core.rotation;
            let mut stop = core.shutdown_signal();
            let limit = broker.provider_limit(&record.provider);
            let provider_permit = match &limit {
                Some(s) => acquire(s, &mut stop).await,
                None => None,
            };
            let path = record.path.clone();
            if limit.is_none() || provider_permit.is_some() {
                if matches!(broker.active_run_by_path(&path), Ok(None)) {
                    if let Err(e) = machine::retire(&core, &key, record, stop).await {
                        tracing::warn!(error = %e, "retire stopped; it is tried again later");
                    }
                } else {
                    // A run was recorded between the look and the claim.
                    let at = now_ms() + RETIRE_POSTPONE.as_millis() as u64;
                    if let Err(e) = broker.postpone_retire(&key, &record, at) {
                        tracing::warn!(error = %e, "cannot postpone a retire");
                    }
                }
            }
            drop(provider_permit);
            broker.release_in_flight(&path);
            broker.release_in_flight(&flight);
            // A run recorded while the retire held the path found it busy
            // and was left to us.
            if let Ok(Some(next)) = broker.active_run_by_path(&path) {
                spawn_run(&core, next, None);
            }
            broker.wake.notify_one();
        }
        .instrument(span),
    );
}
