//! The login throttle's figures on `/metrics`, on a shared store (etcd),
//! where the throttle counts are shared between nodes (`shared_throttle`).
//!
//! No storage prefix of its own: it reads `identities/throttle/` through
//! [`SharedThrottle::stored_figures`] and this node's in-memory throttle,
//! both at most once per [`REFRESH_EVERY`] (before a scrape). Registered through
//! the generic `metrics` API, as every domain's gauges are; the counters
//! live in [`SharedThrottle`] and are registered as they are. Labels carry
//! only the kind of key (`role_source`, `source`), never a role-id, an
//! address or a tag.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::login::Login;
use super::shared_throttle::SharedThrottle;
use crate::clock::Clock;
use crate::metrics::{Metrics, Refresh, RefreshEvery};

/// The stored records are read (one scan of at most `slots` records) at
/// most this often; scrapes in between reuse the last figures.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Sets the throttle's gauges before a scrape.
pub struct ThrottleRefresh {
    login: Arc<Login>,
    shared: Arc<SharedThrottle>,
    clock: Clock,
    every: RefreshEvery,
    records: Gauge,
    entries: Gauge,
    stored_locked: Gauge,
    locked: Family<KindLabels, Gauge>,
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl ThrottleRefresh {
    /// Registers the shared throttle's counters and gauges with `metrics`
    /// and the refresh that sets the gauges; nothing on a single node (no
    /// shared throttle).
    pub fn register(login: Arc<Login>, metrics: &Metrics, clock: Clock) {
        let Some(shared) = login.shared() else {
            return;
        };
        for (name, help, counter) in shared.counters() {
            metrics.register(name, help, counter);
        }
        let refresh = Self {
            login,
            shared,
            clock,
            every: RefreshEvery::new(REFRESH_EVERY),
            records: Gauge::default(),
            entries: Gauge::default(),
            stored_locked: Gauge::default(),
            locked: Family::default(),
        };
        metrics.register(
            "login_throttle_shared_records",
            "login throttle records in the shared store (at most one per slot)",
            refresh.records.clone(),
        );
        metrics.register(
            "login_throttle_shared_entries",
            "live entries (role-id and source pairs, sources) in the shared login throttle records",
            refresh.entries.clone(),
        );
        metrics.register(
            "login_throttle_shared_locked",
            "entries of the shared login throttle records locked out now",
            refresh.stored_locked.clone(),
        );
        metrics.register(
            "login_throttle_locked",
            "keys this node refuses as locked out now, by kind (role_source: a role-id from \
             one source; source: a source address), with lock-outs read from other nodes",
            refresh.locked.clone(),
        );
        metrics.on_scrape(Arc::new(refresh));
    }
}

impl Refresh for ThrottleRefresh {
    fn refresh(&self, _metrics: &Metrics) {
        let now = self.clock.now_ms();
        // Both figures cost a pass: over this node's throttle table (up to
        // its 100,000 entries, under the lock every login takes) and over
        // the stored records. /metrics needs no token, so they are made at
        // most once per REFRESH_EVERY whatever the scrape rate.
        if !self.every.due(now) {
            return;
        }
        let (pairs, sources) = self.login.locked(now);
        self.locked
            .get_or_create(&KindLabels {
                kind: "role_source",
            })
            .set(gauge_value(pairs));
        self.locked
            .get_or_create(&KindLabels { kind: "source" })
            .set(gauge_value(sources));
        match self.shared.stored_figures(now) {
            Ok(figures) => {
                self.records.set(gauge_value(figures.records));
                self.entries.set(gauge_value(figures.entries));
                self.stored_locked.set(gauge_value(figures.locked));
            }
            // Sealed, or the store unreachable: the gauges keep their last
            // values, and the next scrape tries again.
            Err(error) => {
                self.every.reset();
                tracing::debug!(%error, "login throttle gauges not refreshed");
            }
        }
    }
}
