//! `keyward identity decommission|attest|attestations|reads` and
//! `keyward policy suggest`.

use anyhow::Result;
use clap::Args;
use serde_json::{json, Value};

use super::common::{connect, rfc3339};
use super::output::{emit, Format};
use super::{Global, UsageError};
use keyward::proto::v1::{AttestationStatus, DecommissionResponse, SuggestResponse};

#[derive(Args)]
pub struct DecommissionArgs {
    pub name: String,
    /// Show what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args)]
pub struct AttestArgs {
    pub name: String,
    /// Why it is still needed (shown in reports).
    #[arg(long, default_value = "")]
    pub note: String,
}

#[derive(Args)]
pub struct SuggestArgs {
    /// The identity whose use is read.
    pub identity: String,
    /// Only reads within this long (e.g. 30d).
    #[arg(long)]
    pub since: Option<String>,
    /// Store the suggestion as a new policy of this name (needs `write` on
    /// policy/NAME).
    #[arg(long)]
    pub apply: Option<String>,
}

fn decommission_json(d: &DecommissionResponse) -> Value {
    let rotated: Vec<Value> = d
        .rotated
        .iter()
        .map(|r| json!({"path": r.path, "run_id": r.run_id}))
        .collect();
    json!({
        "name": d.name, "run_id": d.run_id, "dry_run": d.dry_run, "done": d.done,
        "revoked_tokens": d.revoked_tokens, "revoked_secret_ids": d.revoked_secret_ids,
        "revoked_leases": d.revoked_leases, "revoked_certificates": d.revoked_certificates,
        "removed_bindings": d.removed_bindings,
        "rotated": rotated, "not_rotatable": d.not_rotatable,
        "readable_never_read": d.readable_never_read,
        "read_set_truncated": d.read_set_dropped > 0, "read_set_dropped": d.read_set_dropped,
        "requested_by": d.requested_by, "hidden_paths": d.hidden_paths,
    })
}

fn attestation_json(s: &AttestationStatus) -> Value {
    json!({
        "name": s.name, "owner": s.owner, "disabled": s.disabled, "state": s.state,
        "attested_by": s.attested_by, "attested_at": rfc3339(&s.attested_at), "note": s.note,
        "due_at": rfc3339(&s.due_at), "overdue_at": rfc3339(&s.overdue_at),
    })
}

fn suggest_json(s: &SuggestResponse) -> Value {
    let rules: Vec<Value> = s
        .rules
        .iter()
        .map(|r| json!({"path": r.path, "capabilities": r.capabilities, "why": r.why}))
        .collect();
    let generalised: Vec<Value> = s
        .generalised
        .iter()
        .map(|g| json!({"rule": g.rule, "paths": g.paths}))
        .collect();
    json!({
        "identity": s.name, "policy": s.document, "rules": rules, "generalised": generalised,
        "diff": {"added": s.added, "removed": s.removed},
        "review": s.review,
        "applied_as": if s.applied_as.is_empty() { Value::Null } else { json!(s.applied_as) },
    })
}

pub async fn decommission(g: &Global, format: Format, args: DecommissionArgs) -> Result<()> {
    let done = connect(g)
        .await?
        .identity_decommission(&args.name, args.dry_run)
        .await?;
    emit(format, &decommission_json(&done));
    Ok(())
}

pub async fn attest(g: &Global, format: Format, args: AttestArgs) -> Result<()> {
    let status = connect(g)
        .await?
        .identity_attest(&args.name, &args.note)
        .await?;
    emit(format, &attestation_json(&status));
    Ok(())
}

pub async fn attestations(g: &Global, format: Format) -> Result<()> {
    let all = connect(g).await?.identity_attestations().await?;
    let due: Vec<&str> = all
        .iter()
        .filter(|s| s.state == "due")
        .map(|s| s.name.as_str())
        .collect();
    let overdue: Vec<&str> = all
        .iter()
        .filter(|s| s.state == "overdue")
        .map(|s| s.name.as_str())
        .collect();
    emit(
        format,
        &json!({
            "identities": all.iter().map(attestation_json).collect::<Vec<_>>(),
            "due": due, "overdue": overdue,
        }),
    );
    Ok(())
}

pub async fn reads(g: &Global, format: Format, name: String) -> Result<()> {
    let r = connect(g).await?.identity_reads(&name).await?;
    let paths: Vec<Value> = r
        .paths
        .iter()
        .map(|p| {
            json!({"path": p.path, "first_read": rfc3339(&p.first_read),
                   "last_read": rfc3339(&p.last_read)})
        })
        .collect();
    emit(
        format,
        &json!({"name": r.name, "paths": paths, "dropped": r.dropped, "hidden": r.hidden}),
    );
    Ok(())
}

pub async fn suggest(g: &Global, format: Format, args: SuggestArgs) -> Result<()> {
    let since = match &args.since {
        None => 0,
        Some(text) => keyward::duration::parse(text)
            .map_err(|e| UsageError(format!("--since: {e}")))?
            .as_secs()
            .max(1),
    };
    let s = connect(g)
        .await?
        .policy_suggest(&args.identity, since, args.apply.as_deref())
        .await?;
    // `--format toml` (the default) prints the policy file, its reasons as
    // comments and the diff on stderr; `--format json` everything as JSON.
    if matches!(format, Format::Json) {
        emit(Format::Json, &suggest_json(&s));
    } else {
        print!("{}", s.document);
        for g in &s.generalised {
            eprintln!(
                "# generalised: {} stands for {} paths",
                g.rule,
                g.paths.len()
            );
        }
        for r in &s.removed {
            eprintln!("- {r}");
        }
        for a in &s.added {
            eprintln!("+ {a}");
        }
        for r in &s.review {
            eprintln!("# review (exercised; only reads are recorded per path): {r}");
        }
        if !s.applied_as.is_empty() {
            eprintln!("# stored as policy {}", s.applied_as);
        }
    }
    Ok(())
}
