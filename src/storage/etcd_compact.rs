//! Compaction of etcd's history by the elected leader.
//!
//! etcd keeps every revision of every key until it is compacted, so token
//! uses, login throttle batches and ordinary writes grow its database for
//! ever unless someone compacts it. keyward does so by default: every node
//! runs one sampler on the backend's runtime, and the leader compacts.
//!
//! - Every `compact_every` (5 min by default) each node reads the cluster's
//!   current revision and keeps `(when, revision)`. Followers sample too, so
//!   a node that becomes leader after a failover can compact at once from
//!   what it saw while it followed.
//! - On the leader only (the [`LeaderView`] says so), the same pass then
//!   compacts at the newest sample at least `compact_retain` old (1 h by
//!   default): everything written in the last `compact_retain` keeps its
//!   history, older superseded revisions go. `compact_retain = 0` compacts
//!   at the revision just read.
//!
//! A compaction is not a transaction, so it cannot carry the leader's fence.
//! It needs none: a deposed leader that compacts late compacts at a
//! revision at least `compact_retain` old, which the new leader would also
//! compact, and etcd refuses a revision at or below one already compacted
//! (that answer is taken as "done").
//!
//! The watch that feeds the caches (`etcd_watch`) survives it: a watch that
//! has received every event is never cancelled by a compaction; one that
//! lags behind the compacted revision is cancelled by etcd and starts again
//! from a fresh revision, emptying the caches (`Coherence::reset`).

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use super::cluster::LeaderView;
use super::etcd_backend::{observe, RequestDurations};

/// The bound on each request of a pass.
const REQUEST_BOUND: Duration = Duration::from_secs(5);
/// The most samples kept (a tiny `compact_every` with a long retention).
const MAX_SAMPLES: usize = 4096;

/// What the sampler needs.
pub(super) struct Compactor {
    pub client: Client,
    /// Any key: a read of it tells the cluster's revision.
    pub probe: Vec<u8>,
    pub every: Duration,
    pub retain: Duration,
    pub view: watch::Receiver<LeaderView>,
    pub durations: RequestDurations,
    pub node_id: String,
}

/// The sampler's memory: revisions seen, oldest first, and the last
/// revision this node compacted at.
#[derive(Default)]
struct Samples {
    seen: VecDeque<(Instant, i64)>,
    compacted: i64,
}

impl Samples {
    /// Records `revision` seen at `now`; the revision to compact at, if
    /// any sample is at least `retain` old and newer than the last
    /// compaction. Samples older than it are dropped (it is kept: it may
    /// be the answer again if no newer one ages in time).
    fn record(&mut self, now: Instant, revision: i64, retain: Duration) -> Option<i64> {
        self.seen.push_back((now, revision));
        while self.seen.len() > MAX_SAMPLES {
            self.seen.pop_front();
        }
        let old_enough = self
            .seen
            .iter()
            .rposition(|(at, _)| now.saturating_duration_since(*at) >= retain)?;
        self.seen.drain(..old_enough);
        let target = self.seen.front().map(|(_, r)| *r)?;
        (target > self.compacted).then_some(target)
    }
}

impl Compactor {
    /// Runs passes every `every` until the task is dropped.
    pub(super) async fn run(mut self) {
        let mut samples = Samples::default();
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = self.pass(&mut samples).await {
                tracing::warn!(%error, "etcd compaction pass failed; trying again next pass");
            }
        }
    }

    /// One pass: sample the revision; on the leader, compact.
    async fn pass(&mut self, samples: &mut Samples) -> Result<(), String> {
        let mut kv = self.client.kv_client();
        let answer = tokio::time::timeout(
            REQUEST_BOUND,
            kv.get(
                self.probe.clone(),
                Some(GetOptions::new().with_keys_only().with_limit(1)),
            ),
        )
        .await
        .map_err(|_| "revision read: no answer".to_owned())?
        .map_err(|e| format!("revision read: {e}"))?;
        let revision = answer.header().map_or(0, |h| h.revision());
        let Some(target) = samples.record(Instant::now(), revision, self.retain) else {
            return Ok(());
        };
        if !self.view.borrow().is_leader {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let compacted = tokio::time::timeout(
            REQUEST_BOUND,
            kv.compact(target, Some(CompactionOptions::new())),
        )
        .await;
        observe(&self.durations, "compact", started.elapsed().as_secs_f64());
        match compacted {
            Ok(Ok(_)) => {
                samples.compacted = target;
                tracing::info!(node = %self.node_id, revision = target, "compacted etcd history");
                Ok(())
            }
            // Someone (etcd's own auto-compaction, or an earlier leader)
            // compacted past it already: nothing to do.
            Ok(Err(e))
                if e.to_string()
                    .contains("required revision has been compacted") =>
            {
                samples.compacted = target;
                Ok(())
            }
            Ok(Err(e)) => Err(format!("compact: {e}")),
            Err(_) => Err("compact: no answer".to_owned()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn compacts_at_the_newest_sample_old_enough_and_never_twice() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hour = Duration::from_secs(3600);
        let mut samples = Samples::default();
        // Nothing is an hour old yet.
        assert_eq!(samples.record(at(0), 10, hour), None);
        assert_eq!(samples.record(at(1800), 20, hour), None);
        // At 1 h the first sample is old enough.
        assert_eq!(samples.record(at(3600), 30, hour), Some(10));
        samples.compacted = 10;
        // At 1 h 15 m still only the first: no second compaction at it.
        assert_eq!(samples.record(at(4500), 40, hour), None);
        // At 1 h 30 m the sample of 30 min is old enough.
        assert_eq!(samples.record(at(5400), 50, hour), Some(20));
        assert_eq!(samples.seen.front().map(|s| s.1), Some(20));
    }

    #[test]
    fn no_retention_compacts_at_the_revision_just_read() {
        let t0 = Instant::now();
        let mut samples = Samples::default();
        assert_eq!(samples.record(t0, 7, Duration::ZERO), Some(7));
        samples.compacted = 7;
        // No write since: the same revision is not compacted again.
        assert_eq!(
            samples.record(t0 + Duration::from_secs(1), 7, Duration::ZERO),
            None
        );
        assert_eq!(
            samples.record(t0 + Duration::from_secs(2), 9, Duration::ZERO),
            Some(9)
        );
        assert_eq!(samples.seen.len(), 1);
    }
}
