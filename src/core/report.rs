//! Gathers the governance report's inputs from the domain modules (the
//! identity store, usage, policies, tokens, login failures) and refreshes
//! the governance gauges. The figures themselves are `governance::report`'s.

use std::collections::HashMap;
use std::time::Duration;

use super::{now_ms, Core};
use crate::governance::{self, Inputs, LongLivedToken, Report, UsageEntry};
use crate::identity::IdentityError;
use crate::policy::Policy;

/// The governance gauges are recomputed at most this often (at a scrape).
pub const GAUGES_EVERY: Duration = Duration::from_secs(30);

impl Core {
    /// The governance report now. `dormant_after_ms` / `long_ttl` of 0 take
    /// the defaults (30 days, 24 hours).
    pub fn governance_report(
        &self,
        dormant_after_ms: u64,
        long_ttl: Duration,
    ) -> Result<Report, IdentityError> {
        let now = now_ms();
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
            .long_lived(long_ttl, now)
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
            now_ms: now,
        }))
    }

    /// Sets the governance gauges from a fresh report (at each scrape).
    pub(crate) fn refresh_governance_gauges(&self) {
        if self.is_sealed() || !self.metrics.governance.due(GAUGES_EVERY) {
            return;
        }
        match self.governance_report(0, Duration::ZERO) {
            Ok(report) => self.metrics.governance.set(&report),
            Err(e) => tracing::warn!(error = %e, "governance gauges not refreshed"),
        }
        match self.rotation.rotation_summary(now_ms()) {
            Ok(summary) => self.metrics.governance.set_rotation(&summary),
            Err(e) => tracing::warn!(error = %e, "rotation gauges not refreshed"),
        }
    }
}
