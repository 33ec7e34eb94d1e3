//! The rotation broker's gauges: overdue rotations, failed rotations and
//! the compliance rate, set from [`Broker::rotation_summary`] before a scrape.
//!
//! Registered through the generic `metrics` API, as every domain's gauges are.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

use super::{Broker, RotationSummary};
use crate::clock::Clock;
use crate::metrics::{Metrics, Refresh, RefreshEvery};

/// The summary reads every policy record: scrapes reuse it this long.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default)]
pub struct RotationGauges {
    overdue: Gauge,
    failed: Gauge,
    /// Per mille, so an integer gauge carries three decimals.
    compliance_permille: Gauge,
}

impl RotationGauges {
    pub fn register(metrics: &Metrics) -> Self {
        let gauges = Self::default();
        metrics.register(
            "rotations_overdue",
            "Secrets whose scheduled rotation is overdue",
            gauges.overdue.clone(),
        );
        metrics.register(
            "rotation_failed",
            "Secrets whose last rotation failed",
            gauges.failed.clone(),
        );
        metrics.register(
            "rotation_compliance_permille",
            "Share of rotation policies that ran on schedule, in thousandths",
            gauges.compliance_permille.clone(),
        );
        gauges
    }

    pub fn set(&self, summary: &RotationSummary) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.overdue.set(n(summary.overdue.len()));
        self.failed.set(n(summary.last_failures.len()));
        self.compliance_permille
            .set((summary.compliance * 1000.0).round() as i64);
    }
}

/// Sets the rotation gauges before a scrape (at most every [`REFRESH_EVERY`]).
pub struct RotationRefresh {
    broker: Arc<Broker>,
    gauges: RotationGauges,
    clock: Clock,
    every: RefreshEvery,
}

impl RotationRefresh {
    /// Registers the gauges with `metrics` and the refresh to run before each scrape.
    pub fn register(broker: Arc<Broker>, metrics: &Metrics, clock: Clock) {
        let gauges = RotationGauges::register(metrics);
        metrics.on_scrape(Arc::new(Self {
            broker,
            gauges,
            clock,
            every: RefreshEvery::new(REFRESH_EVERY),
        }));
    }
}

impl Refresh for RotationRefresh {
    fn refresh(&self, _metrics: &Metrics) {
        let now = self.clock.now_ms();
        if !self.every.due(now) {
            return;
        }
        match self.broker.rotation_summary(now) {
            Ok(summary) => self.gauges.set(&summary),
            // Sealed, say: the gauges keep their last values until it can.
            Err(e) => {
                self.every.reset();
                tracing::debug!(error = %e, "rotation gauges not refreshed");
            }
        }
    }
}
