//! Governance: the questions asked of non-human identities, answered from
//! the inventory, the usage record, the policies, the token store and the
//! login failure counts. [`report`] is a pure function of those inputs (time
//! is a parameter); the `Governance` service gathers them, and
//! [`GovernanceGauges`] exports the same numbers as Prometheus gauges.
//!
//! Owns no storage prefix and touches no storage. The rotation figures of the
//! report (overdue rotations, compliance, failures) belong to the rotation
//! broker and are not computed here.

use std::collections::{BTreeMap, HashMap, HashSet};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::identity::login::FailedLogins;
use crate::identity::{is_dormant, last_used_ms, IdentityKind, IdentityRecord, SecretIdRecord};
use crate::metrics::Metrics;
use crate::policy::Policy;

/// Dormant after this long unused, when the request says nothing.
pub const DEFAULT_DORMANT_AFTER_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// Tokens whose allowed life exceeds this are long-lived, by default.
pub const DEFAULT_LONG_TTL_SECS: u64 = 24 * 60 * 60;
/// Credentials expiring within this are "expiring soon".
pub const EXPIRING_WITHIN_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// What `usage` knows of one identity.
#[derive(Debug, Clone, Default)]
pub struct UsageEntry {
    pub identity: String,
    pub last_used_ms: u64,
    /// `(policy, rule path)` pairs that allowed at least one request.
    pub exercised: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongLivedToken {
    pub accessor: String,
    pub identity: String,
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiringCredential {
    /// `identity` or `secret-id`.
    pub kind: &'static str,
    pub name: String,
    pub identity: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnusedGrants {
    pub identity: String,
    /// `policy: path [caps]` for each granting rule never exercised.
    pub rules: Vec<String>,
}

/// Everything the report is made of.
pub struct Inputs<'a> {
    pub identities: &'a [IdentityRecord],
    pub secret_ids: &'a [SecretIdRecord],
    pub usage: &'a [UsageEntry],
    /// Policies by name (an unknown name counts as having no rules).
    pub policies: &'a HashMap<String, Policy>,
    pub long_lived: Vec<LongLivedToken>,
    pub failed_logins: Vec<FailedLogins>,
    pub dormant_after_ms: u64,
    pub now_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub identities_total: u64,
    /// Every kind, zero counts included, in kind order.
    pub by_kind: Vec<(String, u64)>,
    pub unowned: Vec<String>,
    pub dormant: Vec<String>,
    pub unused_grants: Vec<UnusedGrants>,
    pub long_lived: Vec<LongLivedToken>,
    pub expiring_soon: Vec<ExpiringCredential>,
    pub failed_logins: Vec<FailedLogins>,
    /// Filled by federation (`Core::governance_report`): identity tokens
    /// issued as (role, audience, count), and delegated tokens by agent and
    /// by delegator, highest count first.
    pub identity_tokens_issued: Vec<(String, String, u64)>,
    pub delegations_by_agent: Vec<(String, u64)>,
    pub delegations_by_delegator: Vec<(String, u64)>,
}

impl Report {
    pub fn unused_grant_count(&self) -> u64 {
        self.unused_grants
            .iter()
            .map(|g| g.rules.len() as u64)
            .sum()
    }

    pub fn failed_login_count(&self) -> u64 {
        self.failed_logins.iter().map(|f| f.count).sum()
    }
}

/// Builds the report. Lists come out sorted by name.
pub fn report(inputs: Inputs<'_>) -> Report {
    let now = inputs.now_ms;
    let usage: HashMap<&str, &UsageEntry> = inputs
        .usage
        .iter()
        .map(|u| (u.identity.as_str(), u))
        .collect();

    let mut by_kind: BTreeMap<IdentityKind, u64> =
        IdentityKind::ALL.into_iter().map(|k| (k, 0)).collect();
    let mut unowned = Vec::new();
    let mut dormant = Vec::new();
    let mut unused_grants = Vec::new();
    let mut expiring_soon = Vec::new();

    for record in inputs.identities {
        if let Ok(kind) = record.kind() {
            *by_kind.entry(kind).or_insert(0) += 1;
        }
        if record.owner.trim().is_empty() {
            unowned.push(record.name.clone());
        }
        let entry = usage.get(record.name.as_str());
        let last = last_used_ms(record, entry.map(|u| u.last_used_ms));
        if is_dormant(record, last, inputs.dormant_after_ms, now) {
            dormant.push(record.name.clone());
        }
        let exercised: HashSet<(&str, &str)> = entry
            .map(|u| {
                u.exercised
                    .iter()
                    .map(|(p, r)| (p.as_str(), r.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let mut rules = Vec::new();
        for name in &record.policies {
            let Some(policy) = inputs.policies.get(name) else {
                continue;
            };
            for rule in policy.rules().iter().filter(|r| !r.is_deny()) {
                if !exercised.contains(&(name.as_str(), rule.path())) {
                    let caps: Vec<&str> = rule.capabilities().iter().map(|c| c.as_str()).collect();
                    rules.push(format!("{name}: {} [{}]", rule.path(), caps.join(", ")));
                }
            }
        }
        if !rules.is_empty() {
            unused_grants.push(UnusedGrants {
                identity: record.name.clone(),
                rules,
            });
        }
        if expiring(record.expires_at_ms, now) {
            expiring_soon.push(ExpiringCredential {
                kind: "identity",
                name: record.name.clone(),
                identity: record.name.clone(),
                expires_at_ms: record.expires_at_ms,
            });
        }
    }
    for sid in inputs.secret_ids {
        if expiring(sid.expires_at_ms, now) {
            expiring_soon.push(ExpiringCredential {
                kind: "secret-id",
                name: sid.handle.clone(),
                identity: sid.identity.clone(),
                expires_at_ms: sid.expires_at_ms,
            });
        }
    }
    expiring_soon.sort_by(|a, b| (a.expires_at_ms, &a.name).cmp(&(b.expires_at_ms, &b.name)));
    let mut long_lived = inputs.long_lived;
    long_lived.sort_by(|a, b| (&a.identity, &a.accessor).cmp(&(&b.identity, &b.accessor)));

    Report {
        identities_total: inputs.identities.len() as u64,
        by_kind: by_kind
            .into_iter()
            .map(|(k, n)| (k.as_str().to_owned(), n))
            .collect(),
        unowned,
        dormant,
        unused_grants,
        long_lived,
        expiring_soon,
        failed_logins: inputs.failed_logins,
        identity_tokens_issued: Vec::new(),
        delegations_by_agent: Vec::new(),
        delegations_by_delegator: Vec::new(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// The report's figures as gauges, set from a fresh report before a scrape
/// (see `core::report`). Counts only: no label names an identity or a
/// source address.
#[derive(Debug, Clone, Default)]
pub struct GovernanceGauges {
    identities: Family<KindLabels, Gauge>,
    unowned: Gauge,
    dormant: Gauge,
    unused_grants: Gauge,
    identities_with_unused_grants: Gauge,
    long_lived_tokens: Gauge,
    expiring: Family<KindLabels, Gauge>,
    failed_logins: Gauge,
    failed_login_sources: Gauge,
}

impl GovernanceGauges {
    /// Registers the gauges with `metrics`; set them with [`GovernanceGauges::set`].
    pub fn register(metrics: &Metrics) -> Self {
        let gauges = Self::default();
        metrics.register(
            "identities",
            "Identities in the inventory by kind",
            gauges.identities.clone(),
        );
        metrics.register(
            "identities_unowned",
            "Identities with no owner",
            gauges.unowned.clone(),
        );
        metrics.register(
            "identities_dormant",
            "Identities unused for 30 days or more",
            gauges.dormant.clone(),
        );
        metrics.register(
            "unused_grants",
            "Granting policy rules that their identity never exercised",
            gauges.unused_grants.clone(),
        );
        metrics.register(
            "identities_with_unused_grants",
            "Identities holding at least one grant they never used",
            gauges.identities_with_unused_grants.clone(),
        );
        metrics.register(
            "long_lived_tokens",
            "Live tokens whose allowed life exceeds 24 hours",
            gauges.long_lived_tokens.clone(),
        );
        metrics.register(
            "credentials_expiring_soon",
            "Identities and secret-ids expiring within 7 days, by kind",
            gauges.expiring.clone(),
        );
        metrics.register(
            "failed_logins",
            "Failed logins since the server started",
            gauges.failed_logins.clone(),
        );
        metrics.register(
            "failed_login_sources",
            "Distinct (identity, source address) pairs with failed logins",
            gauges.failed_login_sources.clone(),
        );
        gauges
    }

    /// Sets every gauge from `report`.
    pub fn set(&self, report: &Report) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let u = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (kind, count) in &report.by_kind {
            self.identities
                .get_or_create(&KindLabels { kind: kind.clone() })
                .set(u(*count));
        }
        self.unowned.set(n(report.unowned.len()));
        self.dormant.set(n(report.dormant.len()));
        self.unused_grants.set(u(report.unused_grant_count()));
        self.identities_with_unused_grants
            .set(n(report.unused_grants.len()));
        self.long_lived_tokens.set(n(report.long_lived.len()));
        for kind in ["identity", "secret-id"] {
            let count = report
                .expiring_soon
                .iter()
                .filter(|e| e.kind == kind)
                .count();
            self.expiring
                .get_or_create(&KindLabels {
                    kind: kind.to_owned(),
                })
                .set(n(count));
        }
        self.failed_logins.set(u(report.failed_login_count()));
        self.failed_login_sources.set(n(report.failed_logins.len()));
    }
}

fn expiring(expires_at_ms: u64, now_ms: u64) -> bool {
    expires_at_ms != 0 && expires_at_ms > now_ms && expires_at_ms - now_ms <= EXPIRING_WITHIN_MS
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 60 * 60 * 1000;
    const NOW: u64 = 100 * DAY;

    fn identity(name: &str, kind: &str, owner: &str, policies: &[&str]) -> IdentityRecord {
        IdentityRecord {
            name: name.into(),
            kind: kind.into(),
            owner: owner.into(),
            policies: policies.iter().map(|p| (*p).to_owned()).collect(),
            created_at_ms: NOW - 60 * DAY,
            ..Default::default()
        }
    }

    #[test]
    fn report_of_a_known_fixture() {
        let mut ci = identity("ci", "ci-runner", "platform", &["app-read"]);
        ci.expires_at_ms = NOW + 3 * DAY;
        let mut bot = identity("bot", "bot", "", &["app-read"]);
        bot.last_login_ms = NOW - DAY;
        let idle = identity("idle", "ci-runner", "team", &[]);
        let identities = vec![bot, ci, idle];
        let secret_ids = vec![
            SecretIdRecord {
                identity: "ci".into(),
                handle: "sid_a".into(),
                expires_at_ms: NOW + DAY,
                ..Default::default()
            },
            SecretIdRecord {
                identity: "ci".into(),
                handle: "sid_b".into(),
                expires_at_ms: NOW + 30 * DAY,
                ..Default::default()
            },
        ];
        let policy = Policy::parse(
            "app-read",
            "[[rule]]\npath = \"secret/app/**\"\ncapabilities = [\"read\"]\n\n[[rule]]\npath = \"secret/app/meta\"\ncapabilities = [\"list\"]\n\n[[rule]]\npath = \"secret/app/admin/**\"\ncapabilities = [\"deny\"]\n",
        )
        .unwrap();
        let policies: HashMap<String, Policy> = [("app-read".to_owned(), policy)].into();
        let usage = vec![UsageEntry {
            identity: "ci".into(),
            last_used_ms: NOW - 2 * DAY,
            exercised: vec![("app-read".into(), "secret/app/**".into())],
        }];
        let r = report(Inputs {
            identities: &identities,
            secret_ids: &secret_ids,
            usage: &usage,
            policies: &policies,
            long_lived: vec![LongLivedToken {
                accessor: "kwa_x".into(),
                identity: "ci".into(),
                ttl_seconds: 7 * 86400,
            }],
            failed_logins: vec![FailedLogins {
                identity: "ci".into(),
                source: "10.0.0.1".into(),
                count: 3,
            }],
            dormant_after_ms: 30 * DAY,
            now_ms: NOW,
        });
        assert_eq!(r.identities_total, 3);
        let kinds: HashMap<_, _> = r.by_kind.iter().cloned().collect();
        assert_eq!(kinds["ci-runner"], 2);
        assert_eq!(kinds["bot"], 1);
        assert_eq!(kinds["ai-agent"], 0);
        assert_eq!(r.unowned, vec!["bot"]);
        assert_eq!(r.dormant, vec!["idle"], "never used, created 60 days ago");
        assert_eq!(
            r.unused_grants,
            vec![
                UnusedGrants {
                    identity: "bot".into(),
                    rules: vec![
                        "app-read: secret/app/** [read]".into(),
                        "app-read: secret/app/meta [list]".into()
                    ],
                },
                UnusedGrants {
                    identity: "ci".into(),
                    rules: vec!["app-read: secret/app/meta [list]".into()],
                },
            ],
            "deny rules are not grants; exercised rules are not listed"
        );
        let expiring: Vec<(&str, &str)> = r
            .expiring_soon
            .iter()
            .map(|e| (e.kind, e.name.as_str()))
            .collect();
        assert_eq!(expiring, vec![("secret-id", "sid_a"), ("identity", "ci")]);
        assert_eq!(r.long_lived.len(), 1);
        assert_eq!(r.failed_login_count(), 3);
        assert_eq!(r.unused_grant_count(), 3);
    }

    #[test]
    fn dormancy_counts_from_the_latest_use() {
        let mut a = identity("a", "bot", "o", &[]);
        a.created_at_ms = NOW - 10 * DAY;
        let r = |usage: &[UsageEntry], after| {
            report(Inputs {
                identities: std::slice::from_ref(&a),
                secret_ids: &[],
                usage,
                policies: &HashMap::new(),
                long_lived: vec![],
                failed_logins: vec![],
                dormant_after_ms: after,
                now_ms: NOW,
            })
            .dormant
        };
        assert_eq!(r(&[], 5 * DAY), vec!["a"]);
        assert!(r(&[], 11 * DAY).is_empty());
        let used = [UsageEntry {
            identity: "a".into(),
            last_used_ms: NOW - DAY,
            exercised: vec![],
        }];
        assert!(r(&used, 5 * DAY).is_empty());
    }
}
