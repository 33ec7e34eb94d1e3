//! `keyward rotation ...`, `keyward rotate` and `keyward provider ...`.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{json, Value};

use super::common::{connect, rfc3339, text_or_null};
use super::output::{emit, Format};
use super::{Global, ProviderCommand, RotationCommand, UsageError};
use keyward::client::{RotationPolicySpec, ScheduleSpec};
use keyward::duration;
use keyward::proto::v1::{RotationPolicy, RotationRun};

fn duration_arg(flag: &str, text: &str) -> Result<std::time::Duration> {
    duration::parse(text).map_err(|e| UsageError(format!("{flag}: {e}")).into())
}

/// `KEY=VALUE` pairs; the value is never echoed in an error.
fn config_pairs(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (i, pair) in pairs.iter().enumerate() {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(UsageError(format!("--config {} is not KEY=VALUE", i + 1)).into());
        };
        if map.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(UsageError(format!("--config {k} is given twice")).into());
        }
    }
    Ok(map)
}

pub fn policy_json(p: &RotationPolicy) -> Value {
    let schedule = if p.cron.is_empty() {
        json!({"every": duration::format(std::time::Duration::from_secs(p.every_seconds))})
    } else {
        json!({"cron": p.cron})
    };
    let config: serde_json::Map<String, Value> = p
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "path": p.path, "provider": p.provider, "schedule": schedule,
        "grace": duration::format(std::time::Duration::from_secs(p.grace_seconds)),
        "config": config, "next_due": rfc3339(&p.next_due), "last_run": rfc3339(&p.last_run),
        "last_state": text_or_null(&p.last_state), "last_error": text_or_null(&p.last_error),
        "last_success": rfc3339(&p.last_success), "created_at": rfc3339(&p.created_at),
        "set_by": text_or_null(&p.set_by),
    })
}

pub fn run_json(r: &RotationRun) -> Value {
    let steps: Vec<Value> = r
        .steps
        .iter()
        .map(|s| {
            json!({"step": s.step, "attempt": s.attempt, "outcome": s.outcome, "version": s.version,
                   "message": text_or_null(&s.message),
                   "at": rfc3339(&s.at)})
        })
        .collect();
    json!({"path": r.path, "version": r.version, "state": r.state, "steps": steps,
           "run_id": r.run_id, "trigger": r.trigger,
           "started_at": rfc3339(&r.started_at), "finished_at": rfc3339(&r.finished_at)})
}

pub async fn rotation(g: &Global, format: Format, cmd: RotationCommand) -> Result<()> {
    match cmd {
        RotationCommand::Set {
            path,
            provider,
            every,
            cron,
            grace,
            config,
        } => {
            let schedule = match (every, cron) {
                (Some(every), None) => ScheduleSpec::Every(duration_arg("--every", &every)?),
                (None, Some(cron)) => ScheduleSpec::Cron(cron),
                _ => return Err(UsageError("give one of --every D and --cron EXPR".into()).into()),
            };
            let spec = RotationPolicySpec {
                provider,
                schedule,
                grace: duration_arg("--grace", &grace)?,
                settings: config_pairs(&config)?,
            };
            let p = connect(g).await?.set_rotation_policy(&path, &spec).await?;
            emit(format, &policy_json(&p));
        }
        RotationCommand::Get { path } => {
            let p = connect(g).await?.rotation_policy(&path).await?;
            emit(format, &policy_json(&p));
        }
        RotationCommand::List { due, failed } => {
            let list = connect(g).await?.rotation_policies(due, failed).await?;
            let policies: Vec<Value> = list.iter().map(policy_json).collect();
            emit(format, &json!({"policies": policies}));
        }
        RotationCommand::History { path } => {
            let runs = connect(g).await?.rotation_history(&path).await?;
            let runs: Vec<Value> = runs.iter().map(run_json).collect();
            emit(format, &json!({"path": path, "runs": runs}));
        }
        RotationCommand::Delete { path } => {
            connect(g).await?.delete_rotation_policy(&path).await?;
            emit(format, &json!({"path": path, "deleted": true}));
        }
    }
    Ok(())
}

pub async fn rotate(g: &Global, format: Format, path: &str, no_wait: bool) -> Result<()> {
    let run = connect(g).await?.rotate(path, !no_wait).await?;
    emit(format, &run_json(&run));
    if run.state == "failed" {
        anyhow::bail!("the rotation of {path} failed; current is unchanged");
    }
    Ok(())
}

pub async fn provider(g: &Global, format: Format, cmd: ProviderCommand) -> Result<()> {
    match cmd {
        ProviderCommand::Register {
            name,
            endpoint,
            plugin_ca,
            replace,
        } => {
            let ca = match plugin_ca {
                Some(p) => Some(
                    std::fs::read(&p)
                        .map_err(|e| UsageError(format!("--plugin-ca {}: {e}", p.display())))?,
                ),
                None => None,
            };
            let client = connect(g).await?;
            let r = if replace {
                client.replace_provider(&name, &endpoint, ca).await?
            } else {
                client.register_provider(&name, &endpoint, ca).await?
            };
            emit(
                format,
                &json!({"name": r.name, "description": r.description, "settings": r.settings}),
            );
        }
    }
    Ok(())
}
