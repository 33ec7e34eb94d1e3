//! Gathers the governance report's inputs from the domain modules (the
//! identity store, usage, policies, tokens, login failures), and registers
//! the gauges that are read from the store before a scrape: the barrier's,
//! governance's (defined in `governance`) and rotation's (`rotation::gauges`).
//! The figures themselves are `governance::report`'s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Core, Usage};
use crate::barrier::Barrier;
use crate::clock::Clock;
use crate::governance::{self, GovernanceGauges, Inputs, LongLivedToken, Report, UsageEntry};
use crate::identity::login::Login;
use crate::identity::{IdentityError, IdentityStore};
use crate::metrics::{Metrics, Refresh, RefreshEvery};
use crate::policy::Policy;
use crate::policy_store::PolicyStore;
use crate::rotation::gauges::RotationRefresh;
use crate::token::TokenStore;

/// The governance gauges are recomputed at most this often (at a scrape).
pub const GAUGES_EVERY: Duration = Duration::from_secs(30);

/// The handles the governance report reads, and nothing else.
#[derive(Clone)]
pub struct GovernanceSources {
    pub identities: Arc<IdentityStore>,
    pub usage: Usage,
    pub policies: PolicyStore,
    pub tokens: TokenStore,
    pub login: Arc<Login>,
}

impl GovernanceSources {
    /// The governance report at `now_ms`. `dormant_after_ms` / `long_ttl`
    /// of 0 take the defaults (30 days, 24 hours).
    pub fn report(
        &self,
        now_ms: u64,
        dormant_after_ms: u64,
        long_ttl: Duration,
    ) -> Result<Report, IdentityError> {
        let dormant_after_ms = if dormant_after_ms == 0 {
            governance::DEFAULT_DORMANT_AFTER_MS
        } else {
            dormant_after_ms
        };
        let long_ttl = if long_ttl.is_zero() {
            Duration::from_secs(governance::DEFAULT_LONG_TTL_SECS)
        } else {
            long_ttl
        };
        let identities = self.identities.all()?;
        let secret_ids = self.identities.secret_ids()?;
        let usage: Vec<UsageEntry> = self
            .usage
            .snapshot()
            .into_iter()
            .map(|u| UsageEntry {
                identity: u.identity,
                last_used_ms: u.last_used_ms,
                exercised: u.exercised,
            })
            .collect();
        let mut policies: HashMap<String, Policy> = HashMap::new();
        for name in identities.iter().flat_map(|i| i.policies.iter()) {
            if policies.contains_key(name) {
                continue;
            }
            let policy = if name == crate::policy::ROOT_POLICY {
                Some(Policy::root())
            } else {
                self.policies
                    .get(name)
                    .map_err(|e| IdentityError::Tokens(e.to_string()))?
            };
            if let Some(p) = policy {
                policies.insert(name.clone(), p);
            }
        }
        let long_lived = self
            .tokens
            .long_lived(long_ttl, now_ms)
            .map_err(|e| IdentityError::Tokens(e.to_string()))?
            .into_iter()
            .map(|t| LongLivedToken {
                accessor: t.accessor,
                identity: t.identity,
                ttl_seconds: t.ttl_seconds,
            })
            .collect();
        Ok(governance::report(Inputs {
            identities: &identities,
            secret_ids: &secret_ids,
            usage: &usage,
            policies: &policies,
            long_lived,
            failed_logins: self.login.failed_logins(),
            dormant_after_ms,
            now_ms,
        }))
    }
}

/// Sets the governance gauges from a fresh report before a scrape, at most
/// every [`GAUGES_EVERY`] (the report scans every identity and token).
struct GovernanceRefresh {
    sources: GovernanceSources,
    barrier: Arc<Barrier>,
    gauges: GovernanceGauges,
    clock: Clock,
    every: RefreshEvery,
}

impl Refresh for GovernanceRefresh {
    fn refresh(&self, _metrics: &Metrics) {
        if self.barrier.status().sealed {
            return;
        }
        let now = self.clock.now_ms();
        if !self.every.due(now) {
            return;
        }
        match self.sources.report(now, 0, Duration::ZERO) {
            Ok(report) => self.gauges.set(&report),
            Err(e) => {
                self.every.reset();
                tracing::warn!(error = %e, "governance gauges not refreshed");
            }
        }
    }
}

/// Sets the seal and barrier key gauges before a scrape.
struct BarrierRefresh {
    barrier: Arc<Barrier>,
}

impl Refresh for BarrierRefresh {
    fn refresh(&self, metrics: &Metrics) {
        let status = self.barrier.status();
        metrics.set_sealed(status.sealed);
        metrics.set_barrier_encryptions(status.key_term, status.term_encryptions);
    }
}

impl Core {
    /// The handles the governance report reads.
    pub fn governance_sources(&self) -> GovernanceSources {
        GovernanceSources {
            identities: self.identities.clone(),
            usage: self.usage.clone(),
            policies: self.policies.clone(),
            tokens: self.tokens.clone(),
            login: self.login.clone(),
        }
    }

    /// The governance report now. `dormant_after_ms` / `long_ttl` of 0 take
    /// the defaults (30 days, 24 hours).
    pub fn governance_report(
        &self,
        dormant_after_ms: u64,
        long_ttl: Duration,
    ) -> Result<Report, IdentityError> {
        self.governance_sources()
            .report(self.clock.now_ms(), dormant_after_ms, long_ttl)
    }

    /// Registers the gauges read from the store (barrier, governance,
    /// rotation) to be set before each scrape, and sets the barrier's now.
    /// Called once, by `Server::open`.
    pub(crate) fn publish_gauges(&self) {
        let barrier = Arc::new(BarrierRefresh {
            barrier: self.barrier.clone(),
        });
        barrier.refresh(&self.metrics);
        self.metrics.on_scrape(barrier);
        self.metrics.on_scrape(Arc::new(GovernanceRefresh {
            sources: self.governance_sources(),
            barrier: self.barrier.clone(),
            gauges: GovernanceGauges::register(&self.metrics),
            clock: self.clock.clone(),
            every: RefreshEvery::new(GAUGES_EVERY),
        }));
        RotationRefresh::register(self.rotation.clone(), &self.metrics, self.clock.clone());
    }
}
