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
        let mut report =
            self.governance_sources()
                .report(self.clock.now_ms(), dormant_after_ms, long_ttl)?;
        let figures = self.federation.figures.report();
        report.identity_tokens_issued = figures.identity_tokens;
        report.delegations_by_agent = figures.delegations_by_agent;
        report.delegations_by_delegator = figures.delegations_by_delegator;
        Ok(report)
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::barrier::BarrierOptions;
    use crate::identity::login::ThrottleConfig;
    use crate::identity::{IdentityKind, IdentityName, NewIdentity, PolicyCatalog};
    use crate::oidc::JwksCache;
    use crate::storage::SledBackend;

    struct AnyPolicy;
    impl PolicyCatalog for AnyPolicy {
        fn policy_exists(&self, _name: &str) -> Result<bool, IdentityError> {
            Ok(true)
        }
    }

    fn identity(name: &str) -> NewIdentity {
        NewIdentity {
            name: IdentityName::parse(name).unwrap(),
            kind: IdentityKind::Bot,
            owner: "team".into(),
            description: String::new(),
            policies: vec![],
            expires_at_ms: 0,
        }
    }

    /// Dormancy follows the clock: on a paused clock, an identity unused for
    /// longer than the threshold is dormant, one used since is not, and
    /// after the default 30 days without use both are.
    #[tokio::test(start_paused = true)]
    async fn dormancy_follows_the_paused_clock() {
        const DAY: Duration = Duration::from_secs(86_400);
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path()).unwrap();
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
        let shares = barrier.init(1, 1).unwrap();
        barrier.unseal(&shares[0].0).unwrap();
        let barrier = Arc::new(barrier);
        let clock = Clock::starting_at(1_700_000_000_000);
        let policies = PolicyStore::new(barrier.clone());
        let sources = GovernanceSources {
            identities: Arc::new(IdentityStore::new(barrier.clone())),
            usage: Usage::new(barrier.clone()),
            tokens: TokenStore::new(barrier, Arc::new(policies.clone()), clock.clone()),
            policies,
            login: Arc::new(Login::new(
                JwksCache::files_only(),
                ThrottleConfig::default(),
            )),
        };
        for name in ["idle", "used"] {
            sources
                .identities
                .create(identity(name), &AnyPolicy, clock.now_ms())
                .unwrap();
        }
        let dormant = |after: Duration| {
            let after_ms = after.as_millis() as u64;
            sources
                .report(clock.now_ms(), after_ms, Duration::ZERO)
                .unwrap()
                .dormant
        };
        assert!(dormant(Duration::from_secs(2)).is_empty(), "just made");

        tokio::time::advance(Duration::from_secs(3)).await;
        sources.usage.record("used", None, clock.now_ms());
        assert_eq!(dormant(Duration::from_secs(2)), vec!["idle"]);

        tokio::time::advance(29 * DAY).await;
        assert!(dormant(Duration::ZERO).is_empty(), "under 30 days");
        tokio::time::advance(DAY + Duration::from_secs(1)).await;
        assert_eq!(dormant(Duration::ZERO), vec!["idle", "used"]);
    }
}
