//! What the dashboard's pages show, gathered from the domain through the
//! same handles the gRPC handlers use, under the caller's own rights.
//!
//! The page itself is authorized by its handler (`read` on
//! `sys/governance` for the overview, `read` on `identity/<name>` for an
//! identity). Within a page, a part that the matching API call would
//! authorize on another resource is shown only if the caller's policies
//! allow that call (checked with the caller's compiled set, as
//! `api::lifecycle` hides read paths): the lists of expiring certificates
//! (`list` on `sys/pki/certs`) and leases (`list` on `sys/leases`),
//! attestations (`list` on `identity`), and each secret path of a read set
//! (`list` or `read` on `secret/<path>`). A part left out says so and names
//! the right it needs.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use super::page::{bar_chart, card, esc, identity_link, section, table, when};
use crate::config::GovernanceConfig;
use crate::core::auth::Caller;
use crate::core::call::Failure;
use crate::core::Core;
use crate::governance::{self, Inputs, UsageEntry, EXPIRING_WITHIN_MS};
use crate::identity::IdentityRecord;
use crate::lifecycle::attest::{status_of, AttestState};
use crate::policy::{Capability, Policy};

/// What the dashboard says of anomalies, for the whole vault (`None`) or
/// one identity: the events of the last week that anomaly detection
/// (`src/anomaly/`) keeps, for a caller with `read` on `sys/anomalies` (the
/// right `keyward anomalies list` needs).
pub enum Anomalies {
    /// The caller may not read `sys/anomalies`.
    Hidden,
    /// `(when, identity, what)`, newest first.
    Found(Vec<(u64, String, String)>),
}

/// How far back the dashboard lists anomalies, and how many at most.
const ANOMALIES_SINCE_MS: u64 = 7 * 86_400_000;
const ANOMALIES_SHOWN: usize = 50;

/// The anomalies the dashboard shows; see [`Anomalies`].
pub fn anomalies(core: &Core, caller: &Caller, identity: Option<&str>) -> Anomalies {
    if !may(caller, "sys/anomalies", Capability::Read) {
        return Anomalies::Hidden;
    }
    let since = core.clock().now_ms().saturating_sub(ANOMALIES_SINCE_MS);
    let mut list: Vec<(u64, String, String)> = core
        .anomalies
        .list(identity, since, ANOMALIES_SHOWN)
        .into_iter()
        .map(|e| {
            let what = format!("{}: {} ({})", e.kind.as_str(), e.detail, e.response);
            (e.at_ms, e.identity.unwrap_or_default(), what)
        })
        .collect();
    list.reverse();
    Anomalies::Found(list)
}

fn anomaly_section(out: &mut String, found: Anomalies) {
    let inner = match found {
        Anomalies::Hidden => hidden("read on sys/anomalies"),
        Anomalies::Found(list) => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|(at, who, what)| {
                    let who = if who.is_empty() {
                        esc("(no identity)")
                    } else {
                        identity_link(who)
                    };
                    vec![esc(&when(*at)), who, esc(what)]
                })
                .collect();
            format!(
                "<p>Last 7 days: <strong data-testid=\"anomalies-count\">{}</strong></p>{}",
                list.len(),
                table(&["When", "Identity", "What"], &rows, "No anomalies.")
            )
        }
    };
    section(out, "Recent anomalies", "anomalies", &inner);
}

fn may(caller: &Caller, resource: &str, cap: Capability) -> bool {
    caller.set.check(resource, cap).is_some()
}

fn hidden(needs: &str) -> String {
    format!(
        "<p class=\"muted\" data-testid=\"hidden\">Not shown: your token needs {}.</p>",
        esc(needs)
    )
}

fn names(list: &[String]) -> String {
    if list.is_empty() {
        return "<p class=\"muted\">None.</p>".into();
    }
    let links: Vec<String> = list.iter().map(|n| identity_link(n)).collect();
    format!("<p>{}</p>", links.join(", "))
}

/// The overview page's body.
pub fn overview(
    core: &Core,
    caller: &Caller,
    settings: &GovernanceConfig,
    now: u64,
) -> Result<String, Failure> {
    let report = core.governance_report(0, Duration::ZERO)?;
    let rotation = core.rotation.rotation_summary(now)?;
    let pki = core.pki.figures(EXPIRING_WITHIN_MS, now)?;
    let identities = core.identities.all()?;

    let mut by_owner: BTreeMap<String, u64> = BTreeMap::new();
    for i in &identities {
        let owner = i.owner.trim();
        let key = if owner.is_empty() {
            "(no owner)".to_owned()
        } else {
            owner.to_owned()
        };
        *by_owner.entry(key).or_insert(0) += 1;
    }

    let attest = if may(caller, "identity", Capability::List) {
        Some(core.lifecycle.attestations(settings, now)?)
    } else {
        None
    };
    let certs = if may(caller, crate::pki::CERTS_RESOURCE, Capability::List) {
        Some(core.pki.list(Some(EXPIRING_WITHIN_MS), now)?)
    } else {
        None
    };
    let leases = if may(caller, "sys/leases", Capability::List) {
        let mut l: Vec<_> = core
            .leases
            .list("", false)?
            .into_iter()
            .filter(|l| l.expires_ms > now && l.expires_ms - now <= EXPIRING_WITHIN_MS)
            .collect();
        l.sort_by_key(|l| l.expires_ms);
        Some(l)
    } else {
        None
    };

    let mut out = String::from("<h1>Overview</h1><div class=\"cards\">");
    card(
        &mut out,
        "identities",
        "identities-total",
        report.identities_total,
        false,
    );
    card(
        &mut out,
        "unowned",
        "unowned-count",
        report.unowned.len() as u64,
        true,
    );
    card(
        &mut out,
        "dormant (30 days unused)",
        "dormant-count",
        report.dormant.len() as u64,
        true,
    );
    card(
        &mut out,
        "unused grants",
        "unused-grants-count",
        report.unused_grant_count(),
        true,
    );
    card(
        &mut out,
        "long-lived tokens (over 24 h)",
        "long-lived-count",
        report.long_lived.len() as u64,
        true,
    );
    card(
        &mut out,
        "rotations overdue",
        "rotations-overdue-count",
        rotation.overdue.len() as u64,
        true,
    );
    card(
        &mut out,
        "rotations failing",
        "rotations-failing-count",
        rotation.last_failures.len() as u64,
        true,
    );
    if let Some(a) = &attest {
        let due = a.iter().filter(|s| s.state != AttestState::Current).count();
        card(
            &mut out,
            "attestations due",
            "attestations-due-count",
            due as u64,
            true,
        );
    }
    card(
        &mut out,
        "identities and secret-ids expiring (7 days)",
        "expiring-count",
        report.expiring_soon.len() as u64,
        true,
    );
    card(
        &mut out,
        "certificates expiring (7 days)",
        "certificates-expiring-count",
        pki.expiring_soon,
        true,
    );
    if let Some(l) = &leases {
        card(
            &mut out,
            "leases expiring (7 days)",
            "leases-expiring-count",
            l.len() as u64,
            false,
        );
    }
    out.push_str("</div>");

    let kinds: Vec<(String, u64)> = report.by_kind.clone();
    let owners: Vec<(String, u64)> = by_owner.into_iter().collect();
    section(
        &mut out,
        "Inventory by kind",
        "inventory-kind",
        &bar_chart("Identities by kind", "chart-kind", &kinds),
    );
    section(
        &mut out,
        "Inventory by owner",
        "inventory-owner",
        &bar_chart("Identities by owner", "chart-owner", &owners),
    );
    section(&mut out, "Unowned", "unowned", &names(&report.unowned));
    section(&mut out, "Dormant", "dormant", &names(&report.dormant));
    let rows: Vec<Vec<String>> = report
        .unused_grants
        .iter()
        .map(|g| {
            vec![
                identity_link(&g.identity),
                g.rules
                    .iter()
                    .map(|r| esc(r))
                    .collect::<Vec<_>>()
                    .join("<br>"),
            ]
        })
        .collect();
    section(
        &mut out,
        "Unused grants",
        "unused-grants",
        &table(
            &["Identity", "Rules never exercised"],
            &rows,
            "Every grant was used.",
        ),
    );
    // A token's identity may be no identity record (the root token's):
    // linked only when there is a page to go to.
    let known: std::collections::HashSet<&str> =
        identities.iter().map(|i| i.name.as_str()).collect();
    let rows: Vec<Vec<String>> = report
        .long_lived
        .iter()
        .map(|t| {
            let life = if t.ttl_seconds == u64::MAX {
                "no expiry".to_owned()
            } else {
                format!("{} h", t.ttl_seconds / 3600)
            };
            let who = if known.contains(t.identity.as_str()) {
                identity_link(&t.identity)
            } else {
                esc(&t.identity)
            };
            vec![who, esc(&t.accessor), esc(&life)]
        })
        .collect();
    section(
        &mut out,
        "Long-lived tokens",
        "long-lived",
        &table(&["Identity", "Accessor", "Allowed life"], &rows, "None."),
    );

    let failures: HashMap<&str, &str> = rotation
        .last_failures
        .iter()
        .map(|(p, m)| (p.as_str(), m.as_str()))
        .collect();
    let mut rows: Vec<Vec<String>> = rotation
        .overdue
        .iter()
        .map(|(path, due)| {
            vec![
                esc(path),
                format!("overdue since {}", esc(&when(*due))),
                esc(failures.get(path.as_str()).copied().unwrap_or("")),
            ]
        })
        .collect();
    for (path, message) in &rotation.last_failures {
        if !rotation.overdue.iter().any(|(p, _)| p == path) {
            rows.push(vec![esc(path), "failing".into(), esc(message)]);
        }
    }
    let mut inner = format!(
        "<p>Compliance: <span data-testid=\"rotation-compliance\">{:.0}</span>% of rotation \
         policies on schedule.</p>",
        rotation.compliance * 100.0
    );
    inner.push_str(&table(
        &["Secret", "State", "Last failure"],
        &rows,
        "No rotation is overdue or failing.",
    ));
    section(&mut out, "Rotations", "rotations", &inner);

    let inner = match &attest {
        None => hidden("list on identity"),
        Some(a) => {
            let rows: Vec<Vec<String>> = a
                .iter()
                .filter(|s| s.state != AttestState::Current)
                .map(|s| {
                    vec![
                        identity_link(&s.identity),
                        esc(&s.owner),
                        esc(s.state.as_str()),
                        esc(&when(s.due_at_ms)),
                    ]
                })
                .collect();
            table(
                &["Identity", "Owner", "State", "Due since"],
                &rows,
                "No attestation is due.",
            )
        }
    };
    section(&mut out, "Attestations due", "attestations", &inner);

    let mut inner = String::new();
    let rows: Vec<Vec<String>> = report
        .expiring_soon
        .iter()
        .map(|e| {
            vec![
                esc(e.kind),
                esc(&e.name),
                identity_link(&e.identity),
                esc(&when(e.expires_at_ms)),
            ]
        })
        .collect();
    inner.push_str(&table(
        &["Kind", "Name", "Identity", "Expires"],
        &rows,
        "No identity or secret-id expires within 7 days.",
    ));
    match &certs {
        None => inner.push_str(&hidden("list on sys/pki/certs to list certificates")),
        Some(c) => {
            let rows: Vec<Vec<String>> = c
                .iter()
                .map(|c| {
                    vec![
                        "certificate".into(),
                        esc(&c.serial),
                        esc(&c.identity),
                        esc(&when(c.not_after_ms)),
                    ]
                })
                .collect();
            inner.push_str(&table(
                &["Kind", "Serial", "Identity", "Expires"],
                &rows,
                "No certificate expires within 7 days.",
            ));
        }
    }
    match &leases {
        None => inner.push_str(&hidden("list on sys/leases to list leases")),
        Some(l) => {
            let rows: Vec<Vec<String>> = l
                .iter()
                .map(|l| {
                    vec![
                        "lease".into(),
                        esc(&l.id),
                        esc(&l.identity),
                        esc(&when(l.expires_ms)),
                    ]
                })
                .collect();
            inner.push_str(&table(
                &["Kind", "Lease", "Identity", "Expires"],
                &rows,
                "No lease expires within 7 days.",
            ));
        }
    }
    section(&mut out, "Credentials expiring soon", "expiring", &inner);
    anomaly_section(&mut out, anomalies(core, caller, None));
    Ok(out)
}

/// The governance report of one identity alone (its unused grants), from
/// the same pure function as the whole report.
fn unused_rules(core: &Core, record: &IdentityRecord, now: u64) -> Result<Vec<String>, Failure> {
    let usage: Vec<UsageEntry> = core
        .usage
        .of(&record.name)
        .into_iter()
        .map(|u| UsageEntry {
            identity: u.identity,
            last_used_ms: u.last_used_ms,
            exercised: u.exercised,
        })
        .collect();
    let mut policies: HashMap<String, Policy> = HashMap::new();
    for name in &record.policies {
        let policy = if name == crate::policy::ROOT_POLICY {
            Some(Policy::root())
        } else {
            core.policies.get(name)?
        };
        if let Some(p) = policy {
            policies.insert(name.clone(), p);
        }
    }
    let r = governance::report(Inputs {
        identities: std::slice::from_ref(record),
        secret_ids: &[],
        usage: &usage,
        policies: &policies,
        long_lived: vec![],
        failed_logins: vec![],
        dormant_after_ms: governance::DEFAULT_DORMANT_AFTER_MS,
        now_ms: now,
    });
    Ok(r.unused_grants.into_iter().flat_map(|g| g.rules).collect())
}

/// One identity's page body.
pub fn identity(
    core: &Core,
    caller: &Caller,
    settings: &GovernanceConfig,
    record: &IdentityRecord,
    now: u64,
) -> Result<String, Failure> {
    let name = record.name.as_str();
    let reads = core.reads.of(name)?;
    let unused = unused_rules(core, record, now)?;
    let attestation = core.lifecycle.attestation(name)?;
    let status = status_of(record, attestation.as_ref(), settings, now);
    let decommission = core.lifecycle.decommission_run(name)?;
    // From the identity's expiry index: a page never reads every token.
    let tokens = core.tokens.live_count_of(name, now)?;

    let mut out = format!(
        "<h1>Identity <span data-testid=\"identity-name\">{}</span></h1><section><table>",
        esc(name)
    );
    let owner = if record.owner.trim().is_empty() {
        "<span class=\"error\">none</span>".to_owned()
    } else {
        esc(&record.owner)
    };
    let rows = [
        ("Kind", esc(&record.kind), "identity-kind"),
        ("Owner", owner, "identity-owner"),
        (
            "Description",
            esc(&record.description),
            "identity-description",
        ),
        (
            "Policies",
            esc(&record.policies.join(", ")),
            "identity-policies",
        ),
        (
            "Created",
            esc(&when(record.created_at_ms)),
            "identity-created",
        ),
        (
            "Last login",
            esc(&when(record.last_login_ms)),
            "identity-last-login",
        ),
        (
            "Expires",
            esc(&if record.expires_at_ms == 0 {
                "never".to_owned()
            } else {
                when(record.expires_at_ms)
            }),
            "identity-expires",
        ),
        (
            "State",
            if record.disabled {
                "disabled".into()
            } else {
                "enabled".into()
            },
            "identity-state",
        ),
        ("Live tokens", tokens.to_string(), "identity-tokens"),
    ];
    for (label, value, testid) in rows {
        let _ = write!(
            out,
            "<tr><th>{label}</th><td data-testid=\"{testid}\">{value}</td></tr>"
        );
    }
    out.push_str("</table></section>");

    let mut shown = Vec::new();
    let mut hidden_paths = 0usize;
    for (path, first, last) in &reads.paths {
        let resource = format!("secret/{path}");
        if may(caller, &resource, Capability::List) || may(caller, &resource, Capability::Read) {
            shown.push(vec![esc(path), esc(&when(*first)), esc(&when(*last))]);
        } else {
            hidden_paths += 1;
        }
    }
    let mut inner = format!(
        "<p><span data-testid=\"reads-count\">{}</span> secret paths read.</p>",
        shown.len()
    );
    inner.push_str(&table(
        &["Secret", "First read", "Last read"],
        &shown,
        "It has read no secret you may see.",
    ));
    if hidden_paths > 0 {
        let _ = write!(
            inner,
            "<p class=\"muted\" data-testid=\"reads-hidden\">{hidden_paths} more that your \
             token may not see (it needs list or read on them).</p>"
        );
    }
    if reads.dropped > 0 {
        let _ = write!(
            inner,
            "<p class=\"muted\">{} older paths were dropped to keep the read set's bound.</p>",
            reads.dropped
        );
    }
    section(&mut out, "What it read", "reads", &inner);

    let rows: Vec<Vec<String>> = unused.iter().map(|r| vec![esc(r)]).collect();
    let mut inner = format!(
        "<p><span data-testid=\"unused-rules-count\">{}</span> granting rules never exercised.</p>",
        unused.len()
    );
    inner.push_str(&table(&["Rule"], &rows, "Every granting rule was used."));
    section(&mut out, "Rules unused", "unused-rules", &inner);

    let mut rows: Vec<Vec<String>> = vec![vec![
        "created".into(),
        esc(&when(record.created_at_ms)),
        String::new(),
    ]];
    if let Some(a) = &attestation {
        rows.push(vec![
            "attested".into(),
            esc(&when(a.at_ms)),
            format!("by {}: {}", esc(&a.by), esc(&a.note)),
        ]);
    }
    rows.push(vec![
        format!(
            "attestation <span data-testid=\"attestation-state\">{}</span>",
            esc(status.state.as_str())
        ),
        esc(&when(status.due_at_ms)),
        format!("overdue from {}", esc(&when(status.overdue_at_ms))),
    ]);
    if let Some(run) = &decommission {
        let state = if run.is_done() {
            "decommissioned"
        } else {
            "decommission in progress"
        };
        rows.push(vec![
            format!("<span data-testid=\"decommission-state\">{state}</span>"),
            esc(&when(run.started_ms)),
            format!(
                "by {}; revoked {} tokens, {} secret-ids, {} leases, {} certificates; \
                 {} secrets rotated",
                esc(&run.requested_by),
                run.revoked_tokens,
                run.revoked_secret_ids,
                run.revoked_leases,
                run.revoked_certificates,
                run.rotated.len()
            ),
        ]);
    }
    section(
        &mut out,
        "Lifecycle events",
        "lifecycle",
        &table(&["Event", "When", "Detail"], &rows, ""),
    );
    anomaly_section(&mut out, anomalies(core, caller, Some(name)));
    Ok(out)
}
