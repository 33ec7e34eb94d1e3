//! Governance figures of federation: identity tokens issued per (role,
//! audience), and delegated tokens made per (agent, delegator).
//!
//! The request path only updates memory (one mutex, no disk write). The
//! tables are written through the barrier as one record,
//! `federation/figures`, when they changed: periodically by
//! [`Figures::run_flusher`], and at seal and shutdown (`Core::persist_usage`).
//! [`Figures::load`] merges the stored record after an unseal, so a restart
//! keeps the counts.
//!
//! Bounds, so that no caller can grow memory, storage or a scrape:
//! - each table keeps at most [`TABLE_CAP`] distinct pairs; a pair first seen
//!   past that is counted under ([`OTHER`], [`OTHER`]);
//! - each metric label takes at most [`LABEL_CAP`] distinct values; the
//!   rest are counted under the value [`OTHER`], so a family has at most
//!   `(LABEL_CAP + 1)^2` series.
//!
//! [`OTHER`] starts with `_`, which no role or identity name may, so it is
//! never mistaken for one.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;

use crate::barrier::{Barrier, BarrierError};
use crate::clock::{Clock, Shutdown};
use crate::metrics::Metrics;

const KEY: &str = "federation/figures";
/// Distinct pairs kept per table (report and storage).
pub const TABLE_CAP: usize = 1000;
/// Distinct values per metric label.
pub const LABEL_CAP: usize = 32;
/// What the values past a cap are counted under.
pub const OTHER: &str = "_other";

#[derive(Clone, PartialEq, Message)]
struct PairCount {
    #[prost(string, tag = "1")]
    a: String,
    #[prost(string, tag = "2")]
    b: String,
    #[prost(uint64, tag = "3")]
    count: u64,
}

#[derive(Clone, PartialEq, Message)]
struct FiguresRecord {
    /// (role, audience, count).
    #[prost(message, repeated, tag = "1")]
    issued: Vec<PairCount>,
    /// (agent, delegator, count).
    #[prost(message, repeated, tag = "2")]
    delegations: Vec<PairCount>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuedLabels {
    role: String,
    audience: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DelegationLabels {
    agent: String,
    delegator: String,
}

/// The values one label has taken, up to [`LABEL_CAP`].
#[derive(Default)]
struct LabelValues(HashSet<String>);

impl LabelValues {
    fn admit(&mut self, value: &str) -> String {
        if self.0.contains(value) {
            return value.to_owned();
        }
        if self.0.len() < LABEL_CAP {
            self.0.insert(value.to_owned());
            return value.to_owned();
        }
        OTHER.to_owned()
    }
}

/// One table of pair counts, with its metric labels.
#[derive(Default)]
struct Table {
    counts: BTreeMap<(String, String), u64>,
    first: LabelValues,
    second: LabelValues,
}

impl Table {
    /// The key a new count of (a, b) goes under.
    fn key(&self, a: &str, b: &str) -> (String, String) {
        let key = (a.to_owned(), b.to_owned());
        if self.counts.contains_key(&key) || self.counts.len() < TABLE_CAP {
            key
        } else {
            (OTHER.to_owned(), OTHER.to_owned())
        }
    }

    /// Adds `n` to (a, b); returns the metric labels to add it to.
    fn add(&mut self, a: &str, b: &str, n: u64) -> (String, String) {
        let key = self.key(a, b);
        let labels = (self.first.admit(&key.0), self.second.admit(&key.1));
        let count = self.counts.entry(key).or_insert(0);
        *count = count.saturating_add(n);
        labels
    }

    fn wire(&self) -> Vec<PairCount> {
        self.counts
            .iter()
            .map(|((a, b), count)| PairCount {
                a: a.clone(),
                b: b.clone(),
                count: *count,
            })
            .collect()
    }

    /// Sums by the first (`by_first`) or the second member, sorted by
    /// count (highest first), then name.
    fn sums(&self, by_first: bool) -> Vec<(String, u64)> {
        let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
        for ((a, b), count) in &self.counts {
            let key = if by_first { a } else { b };
            let sum = sums.entry(key.as_str()).or_insert(0);
            *sum = sum.saturating_add(*count);
        }
        let mut out: Vec<(String, u64)> =
            sums.into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
        out.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
        out
    }
}

#[derive(Default)]
struct State {
    issued: Table,
    delegations: Table,
    dirty: bool,
}

/// The figures of one vault; clones share one table.
#[derive(Clone)]
pub struct Figures {
    inner: Arc<Inner>,
}

struct Inner {
    barrier: Arc<Barrier>,
    state: Mutex<State>,
    issued: Family<IssuedLabels, Counter>,
    delegations: Family<DelegationLabels, Counter>,
}

/// The figures as the governance report shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FiguresReport {
    /// (role, audience, count), by role then audience.
    pub identity_tokens: Vec<(String, String, u64)>,
    /// (agent, count), highest first.
    pub delegations_by_agent: Vec<(String, u64)>,
    /// (delegator, count), highest first.
    pub delegations_by_delegator: Vec<(String, u64)>,
}

impl Figures {
    /// Registers `keyward_identity_tokens_issued_total{role,audience}` and
    /// `keyward_delegations_total{agent,delegator}`.
    pub fn new(barrier: Arc<Barrier>, metrics: &Metrics) -> Self {
        let issued = Family::<IssuedLabels, Counter>::default();
        let delegations = Family::<DelegationLabels, Counter>::default();
        metrics.register(
            "identity_tokens_issued",
            "Identity tokens (JWTs) issued, by OIDC role and audience (at most 32 values per label, the rest under _other)",
            issued.clone(),
        );
        metrics.register(
            "delegations",
            "Delegated tokens made by token exchange, by agent (the actor) and delegator (the subject) (at most 32 values per label, the rest under _other)",
            delegations.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                barrier,
                state: Mutex::new(State::default()),
                issued,
                delegations,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an identity token of `role` for `audience`.
    pub fn count_issued(&self, role: &str, audience: &str) {
        let (role, audience) = {
            let mut state = self.state();
            state.dirty = true;
            state.issued.add(role, audience, 1)
        };
        self.inner
            .issued
            .get_or_create(&IssuedLabels { role, audience })
            .inc();
    }

    /// Counts a delegated token made for `agent`, acting for `delegator`.
    pub fn count_delegation(&self, agent: &str, delegator: &str) {
        let (agent, delegator) = {
            let mut state = self.state();
            state.dirty = true;
            state.delegations.add(agent, delegator, 1)
        };
        self.inner
            .delegations
            .get_or_create(&DelegationLabels { agent, delegator })
            .inc();
    }

    /// The figures now.
    pub fn report(&self) -> FiguresReport {
        let state = self.state();
        FiguresReport {
            identity_tokens: state
                .issued
                .counts
                .iter()
                .map(|((role, audience), n)| (role.clone(), audience.clone(), *n))
                .collect(),
            delegations_by_agent: state.delegations.sums(true),
            delegations_by_delegator: state.delegations.sums(false),
        }
    }

    /// Writes the tables if they changed since the last call; returns
    /// whether it wrote.
    pub fn persist(&self) -> Result<bool, BarrierError> {
        let record = {
            let mut state = self.state();
            if !state.dirty {
                return Ok(false);
            }
            state.dirty = false;
            FiguresRecord {
                issued: state.issued.wire(),
                delegations: state.delegations.wire(),
            }
        };
        let written = self.inner.barrier.put(KEY, &record.encode_to_vec());
        if written.is_err() {
            // Try again next time.
            self.state().dirty = true;
        }
        written.map(|()| true)
    }

    /// Writes the changed tables and waits for disk; nothing while sealed.
    /// A failure is logged: the figures are advisory and must not block a
    /// seal or a shutdown.
    pub async fn flush(&self) {
        if self.inner.barrier.status().sealed {
            return;
        }
        let written = match self.persist() {
            Ok(true) => self.inner.barrier.durable().await,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not persist the federation figures");
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

    /// Merges the stored record into memory (after an unseal): a stored
    /// count above the one in memory raises it, and the metric with it.
    pub fn load(&self) -> Result<(), BarrierError> {
        let Some(raw) = self.inner.barrier.get(KEY)? else {
            return Ok(());
        };
        let Ok(record) = FiguresRecord::decode(raw.as_slice()) else {
            tracing::warn!("skipping a corrupt federation figures record");
            return Ok(());
        };
        let mut raised_issued = Vec::new();
        let mut raised_delegations = Vec::new();
        {
            let mut guard = self.state();
            let State {
                issued,
                delegations,
                ..
            } = &mut *guard;
            for (table, stored, raised) in [
                (issued, &record.issued, &mut raised_issued),
                (delegations, &record.delegations, &mut raised_delegations),
            ] {
                for p in stored {
                    let now = table
                        .counts
                        .get(&(p.a.clone(), p.b.clone()))
                        .copied()
                        .unwrap_or(0);
                    if p.count > now {
                        let labels = table.add(&p.a, &p.b, p.count - now);
                        raised.push((labels, p.count - now));
                    }
                }
            }
        }
        for ((role, audience), n) in raised_issued {
            self.inner
                .issued
                .get_or_create(&IssuedLabels { role, audience })
                .inc_by(n);
        }
        for ((agent, delegator), n) in raised_delegations {
            self.inner
                .delegations
                .get_or_create(&DelegationLabels { agent, delegator })
                .inc_by(n);
        }
        Ok(())
    }
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

    fn scrape(metrics: &Metrics) -> String {
        metrics.encode()
    }

    #[test]
    fn counts_survive_persist_and_load_and_raise_the_metrics() {
        let (_dir, barrier) = barrier();
        let metrics = Metrics::new();
        let figures = Figures::new(barrier.clone(), &metrics);
        figures.count_issued("cloud", "sts.example");
        figures.count_issued("cloud", "sts.example");
        figures.count_issued("cloud", "b.example");
        figures.count_delegation("agent-1", "alice");
        figures.count_delegation("agent-1", "bob");
        figures.count_delegation("agent-2", "alice");
        let report = figures.report();
        assert_eq!(
            report.identity_tokens,
            vec![
                ("cloud".into(), "b.example".into(), 1),
                ("cloud".into(), "sts.example".into(), 2)
            ]
        );
        assert_eq!(
            report.delegations_by_agent,
            vec![("agent-1".into(), 2), ("agent-2".into(), 1)]
        );
        assert_eq!(
            report.delegations_by_delegator,
            vec![("alice".into(), 2), ("bob".into(), 1)]
        );
        assert!(figures.persist().unwrap());
        assert!(!figures.persist().unwrap(), "nothing changed since");

        // A new process: the stored counts come back, metrics included.
        let metrics2 = Metrics::new();
        let fresh = Figures::new(barrier, &metrics2);
        fresh.load().unwrap();
        assert_eq!(fresh.report(), report);
        let text = scrape(&metrics2);
        assert!(
            text.contains(
                "keyward_identity_tokens_issued_total{role=\"cloud\",audience=\"sts.example\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("keyward_delegations_total{agent=\"agent-1\",delegator=\"alice\"} 1"),
            "{text}"
        );
        // Loading again (a second unseal) counts nothing twice.
        fresh.load().unwrap();
        assert_eq!(fresh.report(), report);
        assert!(scrape(&metrics2).contains(
            "keyward_identity_tokens_issued_total{role=\"cloud\",audience=\"sts.example\"} 2"
        ));
    }

    #[test]
    fn label_values_and_pairs_are_capped() {
        let (_dir, barrier) = barrier();
        let metrics = Metrics::new();
        let figures = Figures::new(barrier, &metrics);
        for i in 0..(LABEL_CAP + 10) {
            figures.count_delegation(&format!("agent-{i}"), "alice");
        }
        let text = scrape(&metrics);
        let series = text
            .lines()
            .filter(|l| l.starts_with("keyward_delegations_total{"))
            .count();
        assert_eq!(series, LABEL_CAP + 1, "{text}");
        assert!(
            text.contains("keyward_delegations_total{agent=\"_other\",delegator=\"alice\"} 10"),
            "{text}"
        );
        // The report keeps every agent, up to the table cap.
        assert_eq!(figures.report().delegations_by_agent.len(), LABEL_CAP + 10);
        for i in 0..(TABLE_CAP + 5) {
            figures.count_issued(&format!("r{i}"), "aud");
        }
        let report = figures.report();
        assert_eq!(report.identity_tokens.len(), TABLE_CAP + 1);
        assert!(report
            .identity_tokens
            .contains(&(OTHER.into(), OTHER.into(), 5)));
        let text = scrape(&metrics);
        let series = text
            .lines()
            .filter(|l| l.starts_with("keyward_identity_tokens_issued_total{"))
            .count();
        assert!(series <= (LABEL_CAP + 1) * (LABEL_CAP + 1), "{series}");
    }
}
