//! Usage recording: per identity, when it last used a token and which policy
//! rules granted its requests, for governance ("grants never exercised",
//! "dormant identities").
//!
//! Storage prefix `usage/` (through the barrier only; this module must not
//! touch any other prefix): `usage/<hex identity name>` -> `UsageRecord`.
//!
//! The request path only updates memory (one mutex, no disk write); `persist`
//! writes the identities changed since the last call, periodically and at seal
//! and shutdown. `load` reads the stored records after an unseal (one record
//! per identity, not per token).
//!
//! The periodic writer ([`Usage::run_flusher`]) is a background task of the
//! server that holds this handle (the table and the barrier) and nothing else.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;

use crate::barrier::{Barrier, BarrierError, PlainOp};
use crate::clock::{Clock, Shutdown};

const PREFIX: &str = "usage/";

/// What one identity has done, as governance reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityUsage {
    pub identity: String,
    pub last_used_ms: u64,
    /// (policy, rule path) pairs that granted at least one request, sorted.
    pub exercised: Vec<(String, String)>,
}

#[derive(Clone, PartialEq, Message)]
struct UsageRecord {
    #[prost(string, tag = "1")]
    identity: String,
    #[prost(uint64, tag = "2")]
    last_used_ms: u64,
    #[prost(message, repeated, tag = "3")]
    exercised: Vec<ExercisedRule>,
}

#[derive(Clone, PartialEq, Message)]
struct ExercisedRule {
    #[prost(string, tag = "1")]
    policy: String,
    #[prost(string, tag = "2")]
    path: String,
}

#[derive(Default)]
struct Entry {
    last_used_ms: u64,
    exercised: HashSet<(Arc<str>, Arc<str>)>,
    dirty: bool,
}

/// A cheap handle: clones share one table.
#[derive(Clone)]
pub struct Usage {
    inner: Arc<Inner>,
}

struct Inner {
    barrier: Arc<Barrier>,
    table: Mutex<HashMap<String, Entry>>,
}

impl Usage {
    pub fn new(barrier: Arc<Barrier>) -> Self {
        Self {
            inner: Arc::new(Inner {
                barrier,
                table: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Notes a use by `identity` at `now_ms` and, for a granted request, the
    /// rule that granted it. Allocates only the first time an identity or a
    /// rule is seen.
    pub fn record(&self, identity: &str, grant: Option<(&Arc<str>, &Arc<str>)>, now_ms: u64) {
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match table.get_mut(identity) {
            Some(entry) => entry,
            None => table.entry(identity.to_owned()).or_default(),
        };
        if now_ms > entry.last_used_ms {
            entry.last_used_ms = now_ms;
            entry.dirty = true;
        }
        if let Some((policy, path)) = grant {
            let key = (policy.clone(), path.clone());
            if !entry.exercised.contains(&key) {
                entry.exercised.insert(key);
                entry.dirty = true;
            }
        }
    }

    /// Every identity seen, in name order.
    pub fn snapshot(&self) -> Vec<IdentityUsage> {
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<IdentityUsage> = table
            .iter()
            .map(|(identity, entry)| usage_of(identity, entry))
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// The last use of every identity seen: what [`Self::snapshot`] holds
    /// without the rules, for a listing. The lock, which every
    /// authorization's [`Self::record`] waits for, is held for one copy of
    /// each name, not the rules' copies and a sort.
    pub fn last_uses(&self) -> HashMap<String, u64> {
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .iter()
            .map(|(identity, entry)| (identity.clone(), entry.last_used_ms))
            .collect()
    }

    /// One identity's entry of [`Self::snapshot`], if it was seen: a
    /// lookup, not a copy of the table (which every authorization's
    /// [`Self::record`] waits for while it is held).
    pub fn of(&self, identity: &str) -> Option<IdentityUsage> {
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        table.get(identity).map(|entry| usage_of(identity, entry))
    }

    /// Forgets an identity (it was deleted), in memory and in storage.
    pub fn forget(&self, identity: &str) -> Result<(), BarrierError> {
        self.inner
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(identity);
        self.inner.barrier.delete(&key(identity))
    }

    /// Writes the identities changed since the last call; returns how many.
    pub fn persist(&self) -> Result<usize, BarrierError> {
        let records: Vec<(String, Vec<u8>)> = {
            let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
            table
                .iter_mut()
                .filter(|(_, e)| e.dirty)
                .map(|(identity, entry)| {
                    entry.dirty = false;
                    let mut exercised: Vec<ExercisedRule> = entry
                        .exercised
                        .iter()
                        .map(|(p, r)| ExercisedRule {
                            policy: p.to_string(),
                            path: r.to_string(),
                        })
                        .collect();
                    exercised.sort_by(|a, b| (&a.policy, &a.path).cmp(&(&b.policy, &b.path)));
                    let record = UsageRecord {
                        identity: identity.clone(),
                        last_used_ms: entry.last_used_ms,
                        exercised,
                    };
                    (key(identity), record.encode_to_vec())
                })
                .collect()
        };
        let ops: Vec<PlainOp<'_>> = records
            .iter()
            .map(|(k, v)| PlainOp::Put(k, v.as_slice()))
            .collect();
        // In batches that fit the store; a failure writes all again.
        let written = self.inner.barrier.batch_in_chunks(&ops);
        if written.is_err() {
            // Try again next time.
            let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
            for (k, _) in &records {
                if let Some(entry) = identity_of(k).and_then(|id| table.get_mut(&id)) {
                    entry.dirty = true;
                }
            }
        }
        written.map(|()| records.len())
    }

    /// Writes the changed identities and waits for disk; nothing while
    /// sealed. A failure is logged: usage is advisory and must not block a
    /// seal or a shutdown.
    pub async fn flush(&self) {
        if self.inner.barrier.status().sealed {
            return;
        }
        let written = match self.persist() {
            Ok(n) => self.inner.barrier.durable().await.map(|()| n),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not persist token usage");
        }
    }

    /// The periodic writer: flushes every `every` until `shutdown` (the
    /// server flushes once more after its calls have drained).
    pub async fn run_flusher(self, clock: Clock, every: Duration, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = clock.sleep(every) => {}
                _ = shutdown.wait() => return,
            }
            self.flush().await;
        }
    }

    /// Merges the stored records into memory (after an unseal).
    pub fn load(&self) -> Result<(), BarrierError> {
        let stored = self.inner.barrier.scan_prefix(PREFIX)?;
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        for (_, raw) in stored {
            let Ok(record) = UsageRecord::decode(raw.as_slice()) else {
                tracing::warn!("skipping a corrupt usage record");
                continue;
            };
            let entry = table.entry(record.identity).or_default();
            entry.last_used_ms = entry.last_used_ms.max(record.last_used_ms);
            for rule in record.exercised {
                entry
                    .exercised
                    .insert((Arc::from(rule.policy), Arc::from(rule.path)));
            }
        }
        Ok(())
    }
}

/// An entry as [`Usage::snapshot`] gives it: the rules it exercised, sorted.
fn usage_of(identity: &str, entry: &Entry) -> IdentityUsage {
    let mut exercised: Vec<(String, String)> = entry
        .exercised
        .iter()
        .map(|(p, r)| (p.to_string(), r.to_string()))
        .collect();
    exercised.sort();
    IdentityUsage {
        identity: identity.to_owned(),
        last_used_ms: entry.last_used_ms,
        exercised,
    }
}

fn key(identity: &str) -> String {
    format!("{PREFIX}{}", hex::encode(identity.as_bytes()))
}

fn identity_of(key: &str) -> Option<String> {
    let bytes = hex::decode(key.strip_prefix(PREFIX)?).ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::barrier::BarrierOptions;
    use crate::storage::SledBackend;

    fn barrier() -> (tempfile::TempDir, Arc<Barrier>) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path()).unwrap();
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
        let shares = barrier.init(1, 1).unwrap();
        barrier.unseal(&shares[0].0).unwrap();
        (dir, Arc::new(barrier))
    }

    #[test]
    fn records_last_use_and_rules_and_survives_persist_load() {
        let (_dir, barrier) = barrier();
        let usage = Usage::new(barrier.clone());
        let policy: Arc<str> = Arc::from("app");
        let path: Arc<str> = Arc::from("secret/app/**");
        usage.record("svc", None, 10);
        usage.record("svc", Some((&policy, &path)), 20);
        usage.record("svc", Some((&policy, &path)), 15);
        usage.record("bot", None, 5);
        let snap = usage.snapshot();
        assert_eq!(
            snap,
            vec![
                IdentityUsage {
                    identity: "bot".into(),
                    last_used_ms: 5,
                    exercised: vec![]
                },
                IdentityUsage {
                    identity: "svc".into(),
                    last_used_ms: 20,
                    exercised: vec![("app".into(), "secret/app/**".into())]
                },
            ]
        );
        // One identity's entry is the snapshot's, and nothing for one unseen.
        assert_eq!(usage.of("svc").as_ref(), Some(&snap[1]));
        assert_eq!(usage.of("bot").as_ref(), Some(&snap[0]));
        assert_eq!(usage.of("nobody"), None);
        let last: HashMap<String, u64> = snap
            .iter()
            .map(|u| (u.identity.clone(), u.last_used_ms))
            .collect();
        assert_eq!(usage.last_uses(), last);
        assert_eq!(usage.persist().unwrap(), 2);
        assert_eq!(usage.persist().unwrap(), 0, "nothing changed since");
        let fresh = Usage::new(barrier);
        fresh.load().unwrap();
        assert_eq!(fresh.snapshot(), snap);
        fresh.forget("bot").unwrap();
        let again = Usage::new(fresh.inner.barrier.clone());
        again.load().unwrap();
        assert_eq!(again.snapshot().len(), 1);
    }
}
