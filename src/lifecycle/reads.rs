//! The read set: per identity, the secret paths it read and when it last
//! read each, kept so that a decommission knows what must be presumed
//! exposed, and a suggestion knows what was used.
//!
//! Storage (through the barrier, under this module's prefix only):
//! - `lifecycle/reads/<hex identity>/<secret path>` -> [`ReadEntry`];
//! - `lifecycle/reads-dropped/<hex identity>` -> how many paths were dropped
//!   to keep the bound ([`MAX_PATHS_PER_IDENTITY`]).
//!
//! # Durability, and why it does not slow `Get`
//!
//! Membership is what a decommission needs: "did it ever read this path?".
//! The first read of a path by an identity writes its entry and waits for
//! the store's flush (group commit: concurrent first reads share one flush)
//! before the answer leaves, so a read that was answered is in the set after
//! a `kill -9`. Every later read of the same path by the same identity only
//! updates the time in memory (one hash lookup under a mutex, no I/O); those
//! times are written by the periodic flusher and at shutdown, so after a
//! `kill -9` a `last_read` may be up to one flush interval old — the set
//! itself is exact. Steady-state traffic (a service reading the same few
//! secrets) therefore costs no write at all.
//!
//! We chose this over rebuilding the set from the audit log's tail at
//! start-up: that would tie start-up to parsing a log that is rotated,
//! shipped to syslog or pruned by other features, and a rebuild needs a
//! watermark written in step with the usage flush, which is where the
//! minute was lost in the first place.
//!
//! # The bound
//!
//! At most [`MAX_PATHS_PER_IDENTITY`] paths are kept per identity; beyond
//! that the least recently read path is dropped, and the count of dropped
//! paths is kept. A decommission of an identity that ever dropped a path
//! says so (`read_set_truncated`): the paths it lists as never read may
//! then have been read, and the operator should treat them as exposed.
//!
//! An identity's entries are loaded into memory the first time it reads
//! after a start (one prefix scan), never all at start-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;

use crate::barrier::{Barrier, BarrierError, PlainOp};
use crate::clock::{Clock, Shutdown};

const PREFIX: &str = "lifecycle/reads/";
const DROPPED: &str = "lifecycle/reads-dropped/";

/// Most secret paths kept per identity (the least recently read is dropped).
pub const MAX_PATHS_PER_IDENTITY: usize = 4096;

/// One path an identity read.
#[derive(Clone, PartialEq, Message)]
pub struct ReadEntry {
    #[prost(uint64, tag = "1")]
    pub first_ms: u64,
    #[prost(uint64, tag = "2")]
    pub last_ms: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    first_ms: u64,
    last_ms: u64,
    /// `last_ms` moved since it was written.
    dirty: bool,
}

#[derive(Default)]
struct Reads {
    paths: HashMap<String, Slot>,
}

/// What an identity read: paths (sorted) with first and last read times,
/// and how many paths were dropped to keep the bound.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityReads {
    pub paths: Vec<(String, u64, u64)>,
    pub dropped: u64,
}

/// A cheap handle: clones share one table.
#[derive(Clone)]
pub struct ReadSet {
    inner: Arc<Inner>,
}

struct Inner {
    barrier: Arc<Barrier>,
    max_paths: usize,
    table: Mutex<HashMap<String, Reads>>,
}

impl ReadSet {
    pub fn new(barrier: Arc<Barrier>) -> Self {
        Self::with_bound(barrier, MAX_PATHS_PER_IDENTITY)
    }

    /// A set keeping at most `max_paths` per identity (tests use a small one).
    pub fn with_bound(barrier: Arc<Barrier>, max_paths: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                barrier,
                max_paths: max_paths.max(1),
                table: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Reads>> {
        // Nothing panics under this lock; a poisoned one still holds a
        // consistent table.
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that `identity` was answered a read of `path` at `now_ms`.
    /// A path new to the identity is on disk when this returns; a known one
    /// costs a lookup (its time is written by [`Self::flush`]).
    pub async fn note(&self, identity: &str, path: &str, now_ms: u64) -> Result<(), BarrierError> {
        if self.note_sync(identity, path, now_ms)? {
            self.inner.barrier.durable().await?;
        }
        Ok(())
    }

    /// The synchronous part of [`Self::note`]: whether a write was made
    /// that must be flushed before the answer.
    fn note_sync(&self, identity: &str, path: &str, now_ms: u64) -> Result<bool, BarrierError> {
        let mut table = self.lock();
        // The common case first, in one lookup of each table: a path this
        // identity has read before.
        if let Some(slot) = table
            .get_mut(identity)
            .and_then(|reads| reads.paths.get_mut(path))
        {
            if now_ms > slot.last_ms {
                slot.last_ms = now_ms;
                slot.dirty = true;
            }
            return Ok(false);
        }
        if !table.contains_key(identity) {
            let loaded = self.load(identity)?;
            table.insert(identity.to_owned(), loaded);
        }
        let Some(reads) = table.get_mut(identity) else {
            return Ok(false);
        };
        if let Some(slot) = reads.paths.get_mut(path) {
            if now_ms > slot.last_ms {
                slot.last_ms = now_ms;
                slot.dirty = true;
            }
            return Ok(false);
        }
        let entry = ReadEntry {
            first_ms: now_ms,
            last_ms: now_ms,
        }
        .encode_to_vec();
        let new_key = entry_key(identity, path);
        // Over the bound: drop the least recently read path.
        let evict = if reads.paths.len() >= self.inner.max_paths {
            reads
                .paths
                .iter()
                .min_by_key(|(p, s)| (s.last_ms, p.as_str()))
                .map(|(p, _)| p.clone())
        } else {
            None
        };
        let evict_key = evict.as_deref().map(|p| entry_key(identity, p));
        let dropped_key = dropped_key(identity);
        let dropped_value;
        let mut ops = vec![PlainOp::Put(&new_key, &entry)];
        if let Some(k) = &evict_key {
            let before = self.dropped(identity)?;
            dropped_value = (before + 1).to_be_bytes();
            ops.push(PlainOp::Delete(k));
            ops.push(PlainOp::Put(&dropped_key, &dropped_value));
        }
        self.inner.barrier.batch(&ops)?;
        if let Some(p) = evict {
            reads.paths.remove(&p);
        }
        reads.paths.insert(
            path.to_owned(),
            Slot {
                first_ms: now_ms,
                last_ms: now_ms,
                dirty: false,
            },
        );
        Ok(true)
    }

    fn load(&self, identity: &str) -> Result<Reads, BarrierError> {
        let prefix = identity_prefix(identity);
        let mut reads = Reads::default();
        for (key, raw) in self.inner.barrier.scan_prefix(&prefix)? {
            let Some(path) = key.strip_prefix(&prefix) else {
                continue;
            };
            let Ok(entry) = ReadEntry::decode(raw.as_slice()) else {
                tracing::warn!("skipping a corrupt read-set entry");
                continue;
            };
            reads.paths.insert(
                path.to_owned(),
                Slot {
                    first_ms: entry.first_ms,
                    last_ms: entry.last_ms,
                    dirty: false,
                },
            );
        }
        Ok(reads)
    }

    fn dropped(&self, identity: &str) -> Result<u64, BarrierError> {
        Ok(self
            .inner
            .barrier
            .get(&dropped_key(identity))?
            .and_then(|raw| <[u8; 8]>::try_from(raw.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// What `identity` read (stored entries, with the fresher times held in
    /// memory).
    pub fn of(&self, identity: &str) -> Result<IdentityReads, BarrierError> {
        let mut merged: HashMap<String, Slot> = self.load(identity)?.paths;
        if let Some(reads) = self.lock().get(identity) {
            for (path, slot) in &reads.paths {
                merged.insert(path.clone(), *slot);
            }
        }
        let mut paths: Vec<(String, u64, u64)> = merged
            .into_iter()
            .map(|(p, s)| (p, s.first_ms, s.last_ms))
            .collect();
        paths.sort();
        Ok(IdentityReads {
            paths,
            dropped: self.dropped(identity)?,
        })
    }

    /// Writes the read times that moved since the last call; returns how many.
    /// The table is copied and let go before the writes (several etcd
    /// transactions for many paths), so reads noting a path never wait for
    /// them; a slot read again meanwhile stays marked for the next call.
    pub fn persist(&self) -> Result<usize, BarrierError> {
        let mut records = Vec::new();
        let mut written = Vec::new();
        for (identity, reads) in self.lock().iter() {
            for (path, slot) in reads.paths.iter().filter(|(_, s)| s.dirty) {
                let value = ReadEntry {
                    first_ms: slot.first_ms,
                    last_ms: slot.last_ms,
                }
                .encode_to_vec();
                records.push((entry_key(identity, path), value));
                written.push((identity.clone(), path.clone(), slot.last_ms));
            }
        }
        let ops: Vec<PlainOp<'_>> = records
            .iter()
            .map(|(k, v)| PlainOp::Put(k, v.as_slice()))
            .collect();
        // In batches that fit the store; a failure writes all again.
        self.inner.barrier.batch_in_chunks(&ops)?;
        let mut table = self.lock();
        for (identity, path, last_ms) in written {
            if let Some(slot) = table
                .get_mut(&identity)
                .and_then(|reads| reads.paths.get_mut(&path))
            {
                if slot.last_ms == last_ms {
                    slot.dirty = false;
                }
            }
        }
        Ok(records.len())
    }

    /// [`Self::persist`] and a flush; nothing while sealed; a failure is
    /// logged (the times are advisory, membership is already durable).
    pub async fn flush(&self) {
        if self.inner.barrier.status().sealed {
            return;
        }
        let written = match self.persist() {
            Ok(n) => self.inner.barrier.durable().await.map(|()| n),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not persist read times");
        }
    }

    /// The periodic writer of read times, until `shutdown`.
    pub async fn run_flusher(self, clock: Clock, every: Duration, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = clock.sleep(every) => {}
                _ = shutdown.wait() => break,
            }
            self.flush().await;
        }
        self.flush().await;
    }
}

fn identity_prefix(identity: &str) -> String {
    format!("{PREFIX}{}/", hex::encode(identity.as_bytes()))
}

fn entry_key(identity: &str, path: &str) -> String {
    format!("{}{path}", identity_prefix(identity))
}

fn dropped_key(identity: &str) -> String {
    format!("{DROPPED}{}", hex::encode(identity.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::barrier::BarrierOptions;
    use crate::storage::SledBackend;

    fn barrier(dir: &std::path::Path) -> Arc<Barrier> {
        let backend = SledBackend::open(dir).unwrap();
        Arc::new(Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap())
    }

    #[tokio::test]
    async fn first_reads_are_stored_at_once_and_the_bound_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let b = barrier(dir.path());
        let share = b.init(1, 1).unwrap().remove(0);
        b.unseal(&share.0).unwrap();
        let reads = ReadSet::with_bound(b.clone(), 2);
        reads.note("svc", "app/a", 10).await.unwrap();
        reads.note("svc", "app/b", 20).await.unwrap();
        reads.note("svc", "app/a", 30).await.unwrap();
        // A fresh handle (a restart without any flush) sees both paths.
        let fresh = ReadSet::with_bound(b.clone(), 2);
        let seen = fresh.of("svc").unwrap();
        assert_eq!(
            seen.paths.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
            ["app/a", "app/b"]
        );
        assert_eq!(seen.paths[0].2, 10, "the later time is not flushed yet");
        assert_eq!(reads.of("svc").unwrap().paths[0].2, 30);
        assert_eq!(reads.persist().unwrap(), 1);
        assert_eq!(fresh.of("svc").unwrap().paths[0].2, 30);
        // A third path drops the least recently read one (app/b at 20).
        reads.note("svc", "app/c", 40).await.unwrap();
        let after = ReadSet::new(b).of("svc").unwrap();
        assert_eq!(
            after.paths.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
            ["app/a", "app/c"]
        );
        assert_eq!(after.dropped, 1);
        assert!(reads.of("other").unwrap().paths.is_empty());
    }

    /// A persist clears what it wrote, and only that: a later read of the
    /// path is written by the next one.
    #[tokio::test]
    async fn a_persist_clears_the_slots_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let b = barrier(dir.path());
        let share = b.init(1, 1).unwrap().remove(0);
        b.unseal(&share.0).unwrap();
        let reads = ReadSet::with_bound(b.clone(), 8);
        reads.note("svc", "app/a", 10).await.unwrap();
        reads.note("svc", "app/a", 20).await.unwrap();
        reads.note("ci", "app/b", 30).await.unwrap();
        reads.note("ci", "app/b", 35).await.unwrap();
        assert_eq!(reads.persist().unwrap(), 2);
        assert_eq!(reads.persist().unwrap(), 0);
        reads.note("svc", "app/a", 40).await.unwrap();
        assert_eq!(reads.persist().unwrap(), 1);
        assert_eq!(ReadSet::new(b).of("svc").unwrap().paths[0].2, 40);
    }
}
