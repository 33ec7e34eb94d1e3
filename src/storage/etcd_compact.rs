//! Compaction of etcd's history by the elected leader.
//!
//! etcd keeps every revision of every key until it is compacted, so token
//! uses, login throttle batches and ordinary writes grow its database for
//! ever unless someone compacts it. keyward does so by default: every node
//! runs one sampler on the backend's runtime, and the leader compacts.
//!
//! - Every `compact_every` (5 min by default) each node reads the cluster's
//!   current revision and keeps `(when, revision)`, `when` in wall-clock
//!   milliseconds. Followers sample too, so a node that becomes leader after
//!   a failover can compact at once from what it saw while it followed.
//! - On the leader only (the [`LeaderView`] says so), the same pass then
//!   compacts at the newest sample at least `compact_retain` old (1 h by
//!   default): everything written in the last `compact_retain` keeps its
//!   history, older superseded revisions go. `compact_retain = 0` compacts
//!   at the revision just read.
//!
//! # The samples survive restarts: `PREFIX m/compaction`
//!
//! The leader keeps the samples in etcd too, so that a leader that just
//! started (every node restarted, say) compacts at the right revision at
//! once instead of after `compact_retain` of fresh samples. At each of its
//! passes it reads the stored samples, merges them with its own, and writes
//! the merged list back when it changed, before it compacts. The list is
//! bounded: samples closer than 9/10 of `compact_every` to the previous one
//! are left out (at most one per `compact_every`, whatever the number of
//! restarts), the samples older than the one compacted at are pruned, and
//! it never holds more than [`MAX_SAMPLES`].
//!
//! The record is plaintext (times and revisions are not secret, and the
//! barrier is not open when a node starts), like `PREFIX m/format`, and a
//! damaged one is ignored and replaced. Only the leader writes it, in a
//! transaction fenced by its term (`create_revision(PREFIX l/leader) ==
//! term`, as the backend fences leader writes): a deposed leader's write is
//! refused and it does not compact in that pass. Followers never write it.
//!
//! Format: `KWC1` then one line per sample, `\n<ms> <revision>`, oldest first.
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
//! from a fresh revision, emptying the caches (`Coherence::reset`). It
//! ignores `PREFIX m/compaction` (it hands out data keys only).

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, Compare, CompareOp, GetOptions, Txn, TxnOp};
use tokio::sync::watch;

use super::cluster::LeaderView;
use super::etcd_backend::{observe, RequestDurations};

/// The bound on each request of a pass.
const REQUEST_BOUND: Duration = Duration::from_secs(5);
/// The most samples kept, in memory and in etcd (a tiny `compact_every`
/// with a long retention).
const MAX_SAMPLES: usize = 4096;
/// The stored record's magic.
const MAGIC: &str = "KWC1";
/// The stored record's key, under the prefix.
pub(super) const SAMPLES_KEY: &[u8] = b"m/compaction";

/// What the sampler needs.
pub(super) struct Compactor {
    pub client: Client,
    /// Any key: a read of it tells the cluster's revision.
    pub probe: Vec<u8>,
    /// `PREFIX m/compaction`.
    pub samples_key: Vec<u8>,
    pub every: Duration,
    pub retain: Duration,
    pub view: watch::Receiver<LeaderView>,
    pub durations: RequestDurations,
    pub node_id: String,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The wall clock in ms since the Unix epoch (samples are compared across
/// processes, so not a monotonic `Instant`).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, ms)
}

/// The sampler's memory: revisions seen, oldest first, and the last
/// revision this node compacted at.
#[derive(Default, Debug)]
struct Samples {
    seen: VecDeque<(u64, i64)>,
    compacted: i64,
}

impl Samples {
    /// The least distance between two kept samples: 9/10 of `every`, so a
    /// pass that runs a little early still keeps its sample.
    fn spacing(every_ms: u64) -> u64 {
        every_ms - every_ms / 10
    }

    /// Takes in samples read from etcd: merged by time, then thinned to the
    /// spacing (the older of two close samples stays: it ages first).
    fn merge(&mut self, stored: &[(u64, i64)], every_ms: u64) {
        let mut all: Vec<(u64, i64)> = self
            .seen
            .iter()
            .copied()
            .chain(stored.iter().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        let spacing = Self::spacing(every_ms);
        let mut kept: VecDeque<(u64, i64)> = VecDeque::with_capacity(all.len());
        for sample in all {
            match kept.back() {
                Some((at, _)) if sample.0.saturating_sub(*at) < spacing => {}
                _ => kept.push_back(sample),
            }
        }
        while kept.len() > MAX_SAMPLES {
            kept.pop_front();
        }
        self.seen = kept;
    }

    /// Records `revision` seen at `now_ms` (left out when closer than the
    /// spacing to the newest sample, unless `retain_ms` is 0); the revision
    /// to compact at, if any sample is at least `retain_ms` old and newer
    /// than the last compaction. Samples older than it are dropped (it is
    /// kept: it may be the answer again if no newer one ages in time).
    fn record(&mut self, now_ms: u64, revision: i64, every_ms: u64, retain_ms: u64) -> Option<i64> {
        let spaced = self
            .seen
            .back()
            .is_none_or(|(at, _)| now_ms.saturating_sub(*at) >= Self::spacing(every_ms));
        if spaced || retain_ms == 0 {
            self.seen.push_back((now_ms, revision));
        }
        while self.seen.len() > MAX_SAMPLES {
            self.seen.pop_front();
        }
        let old_enough = self
            .seen
            .iter()
            .rposition(|(at, _)| now_ms.saturating_sub(*at) >= retain_ms)?;
        self.seen.drain(..old_enough);
        let target = self.seen.front().map(|(_, r)| *r)?;
        (target > self.compacted).then_some(target)
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = String::from(MAGIC);
        for (at, revision) in &self.seen {
            out.push_str(&format!("\n{at} {revision}"));
        }
        out.into_bytes()
    }
}

/// The samples of a stored record; `None` when it is damaged.
fn decode(raw: &[u8]) -> Option<Vec<(u64, i64)>> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut lines = text.split('\n');
    if lines.next()? != MAGIC {
        return None;
    }
    let mut out = Vec::new();
    for line in lines {
        let (at, revision) = line.split_once(' ')?;
        out.push((at.parse().ok()?, revision.parse().ok()?));
        if out.len() > MAX_SAMPLES {
            return None;
        }
    }
    Some(out)
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

    /// The stored samples (empty when there are none or they are damaged).
    async fn stored(
        &self,
        kv: &mut etcd_client::KvClient,
    ) -> Result<(Vec<(u64, i64)>, Option<Vec<u8>>), String> {
        let answer = tokio::time::timeout(REQUEST_BOUND, kv.get(self.samples_key.clone(), None))
            .await
            .map_err(|_| "samples read: no answer".to_owned())?
            .map_err(|e| format!("samples read: {e}"))?;
        let Some(raw) = answer.kvs().first().map(|kv| kv.value().to_vec()) else {
            return Ok((Vec::new(), None));
        };
        match decode(&raw) {
            Some(samples) => Ok((samples, Some(raw))),
            None => {
                tracing::warn!("the stored compaction samples are damaged; replacing them");
                Ok((Vec::new(), Some(raw)))
            }
        }
    }

    /// One pass: sample the revision; on the leader, merge the stored
    /// samples, store the result, and compact.
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
        let (every_ms, retain_ms) = (ms(self.every), ms(self.retain));
        let fence = {
            let view = self.view.borrow();
            view.fence.clone().filter(|_| view.is_leader)
        };
        let Some(fence) = fence else {
            // A follower samples in memory only.
            samples.record(wall_ms(), revision, every_ms, retain_ms);
            return Ok(());
        };
        let (stored, raw) = self.stored(&mut kv).await?;
        samples.merge(&stored, every_ms);
        let target = samples.record(wall_ms(), revision, every_ms, retain_ms);
        let encoded = samples.encode();
        if raw.as_deref() != Some(encoded.as_slice()) {
            let compare =
                Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.revision);
            let written = tokio::time::timeout(
                REQUEST_BOUND,
                kv.txn(Txn::new().when([compare]).and_then([TxnOp::put(
                    self.samples_key.clone(),
                    encoded,
                    None,
                )])),
            )
            .await
            .map_err(|_| "samples write: no answer".to_owned())?
            .map_err(|e| format!("samples write: {e}"))?;
            if !written.succeeded() {
                return Err(format!(
                    "samples write: {}: nothing was written, no compaction",
                    super::cluster::FENCED
                ));
            }
        }
        let Some(target) = target else {
            return Ok(());
        };
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

    const HOUR: u64 = 3_600_000;
    const EVERY: u64 = 300_000;

    #[test]
    fn compacts_at_the_newest_sample_old_enough_and_never_twice() {
        let t0 = 1_800_000_000_000u64;
        let at = |s: u64| t0 + s * 1000;
        let mut samples = Samples::default();
        // Nothing is an hour old yet.
        assert_eq!(samples.record(at(0), 10, EVERY, HOUR), None);
        assert_eq!(samples.record(at(1800), 20, EVERY, HOUR), None);
        // At 1 h the first sample is old enough.
        assert_eq!(samples.record(at(3600), 30, EVERY, HOUR), Some(10));
        samples.compacted = 10;
        // At 1 h 15 m still only the first: no second compaction at it.
        assert_eq!(samples.record(at(4500), 40, EVERY, HOUR), None);
        // At 1 h 30 m the sample of 30 min is old enough.
        assert_eq!(samples.record(at(5400), 50, EVERY, HOUR), Some(20));
        assert_eq!(samples.seen.front().map(|s| s.1), Some(20));
    }

    #[test]
    fn no_retention_compacts_at_the_revision_just_read() {
        let t0 = 1_800_000_000_000u64;
        let mut samples = Samples::default();
        assert_eq!(samples.record(t0, 7, 1000, 0), Some(7));
        samples.compacted = 7;
        // No write since: the same revision is not compacted again.
        assert_eq!(samples.record(t0 + 1000, 7, 1000, 0), None);
        assert_eq!(samples.record(t0 + 2000, 9, 1000, 0), Some(9));
        assert_eq!(samples.seen.len(), 1);
    }

    #[test]
    fn samples_are_spaced_by_compact_every_and_survive_a_round_trip() {
        let t0 = 1_800_000_000_000u64;
        let mut samples = Samples::default();
        samples.record(t0, 10, EVERY, HOUR);
        // A restart a minute later: no second sample.
        samples.record(t0 + 60_000, 11, EVERY, HOUR);
        // A pass a little early still samples.
        samples.record(t0 + EVERY - 1000, 12, EVERY, HOUR);
        let stored: Vec<(u64, i64)> = samples.seen.iter().copied().collect();
        assert_eq!(stored, vec![(t0, 10), (t0 + EVERY - 1000, 12)]);
        assert_eq!(decode(&samples.encode()), Some(stored.clone()));
        assert_eq!(decode(b"KWC1\n12 x"), None);
        assert_eq!(decode(b"nope"), None);
        assert_eq!(decode(b"KWC1"), Some(Vec::new()));

        // A node that just started, with one sample of its own, takes in
        // the stored ones and compacts at the stored revision an hour old.
        let mut fresh = Samples::default();
        fresh.record(t0 + HOUR, 90, EVERY, HOUR);
        fresh.merge(&stored, EVERY);
        assert_eq!(fresh.seen.len(), 3);
        assert_eq!(fresh.record(t0 + HOUR + 1000, 91, EVERY, HOUR), Some(10));
        // Pruned past the one compacted at; the close sample was not added.
        let kept: Vec<(u64, i64)> = fresh.seen.iter().copied().collect();
        assert_eq!(
            kept,
            vec![(t0, 10), (t0 + EVERY - 1000, 12), (t0 + HOUR, 90)]
        );
    }

    #[test]
    fn many_restarts_keep_the_list_bounded() {
        let t0 = 1_800_000_000_000u64;
        let mut stored: Vec<(u64, i64)> = Vec::new();
        // A restart every 10 s for 3 h, 5 min between samples, 1 h kept.
        for i in 0..1080u64 {
            let mut node = Samples::default();
            node.merge(&stored, EVERY);
            node.record(t0 + i * 10_000, i64::try_from(i).unwrap(), EVERY, HOUR);
            stored = node.seen.iter().copied().collect();
            assert!(stored.len() <= 15, "{}", stored.len());
        }
    }
}
