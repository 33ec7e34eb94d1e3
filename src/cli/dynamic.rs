//! `keyward dynamic role ...`, `keyward creds` and `keyward lease ...`.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Value};

use super::common::{connect, rfc3339, text_or_null};
use super::output::{emit, Format};
use super::{Global, UsageError};
use keyward::client::DynamicRoleSpec;
use keyward::duration;
use keyward::proto::v1::{DynamicRole, Lease};

#[derive(Subcommand)]
pub enum DynamicCommand {
    /// Dynamic roles: how to make a database user for one requester.
    #[command(subcommand)]
    Role(RoleCommand),
}

#[derive(Subcommand)]
pub enum RoleCommand {
    /// Define (or replace) a role. Needs admin on dynamic/NAME and read on the admin secret.
    Put {
        name: String,
        /// postgres, mysql, redis, or a registered plugin that serves Create/Revoke.
        #[arg(long)]
        provider: String,
        /// admin_secret=PATH, roles=R1,R2 (postgres, mysql), acl=RULES (redis); a
        /// plugin's own keys (admin_secret optional).
        #[arg(long = "config")]
        config: Vec<String>,
        /// Default lease TTL.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Longest a lease may live, renewals included.
        #[arg(long, default_value = "24h")]
        max_ttl: String,
    },
    Get {
        name: String,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum LeaseCommand {
    /// One lease (yours, or with read on sys/leases/ID).
    Lookup { id: String },
    /// Leases under a prefix (e.g. dynamic/app).
    List {
        #[arg(long, default_value = "")]
        prefix: String,
        /// Only those whose revocation on the target is failing.
        #[arg(long)]
        failed: bool,
    },
    /// Extend a lease (never past its max TTL or its token's end).
    Renew {
        id: String,
        #[arg(long)]
        increment: Option<String>,
    },
    /// Revoke a lease now, or every lease under --prefix.
    Revoke {
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        id: Option<String>,
        #[arg(long)]
        prefix: Option<String>,
    },
}

fn duration_arg(flag: &str, text: &str) -> Result<std::time::Duration> {
    duration::parse(text).map_err(|e| UsageError(format!("{flag}: {e}")).into())
}

fn role_json(r: &DynamicRole) -> Value {
    let config: serde_json::Map<String, Value> = r
        .config
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "name": r.name, "provider": r.provider, "config": config,
        "ttl": duration::format(std::time::Duration::from_secs(r.ttl_seconds)),
        "max_ttl": duration::format(std::time::Duration::from_secs(r.max_ttl_seconds)),
        "created_at": rfc3339(&r.created_at), "set_by": text_or_null(&r.set_by),
    })
}

pub fn lease_json(l: &Lease) -> Value {
    json!({
        "lease_id": l.lease_id, "role": l.role, "provider": l.provider, "username": l.username,
        "identity": l.identity, "accessor": l.accessor,
        "created_at": rfc3339(&l.created_at), "expires_at": rfc3339(&l.expires_at),
        "max_expires_at": rfc3339(&l.max_expires_at), "renewable": l.renewable,
        "revoking": l.revoking, "failures": l.failures, "last_error": text_or_null(&l.last_error),
    })
}

pub async fn dynamic(g: &Global, format: Format, cmd: DynamicCommand) -> Result<()> {
    let client = connect(g).await?;
    let DynamicCommand::Role(cmd) = cmd;
    match cmd {
        RoleCommand::Put {
            name,
            provider,
            config,
            ttl,
            max_ttl,
        } => {
            let mut map = BTreeMap::new();
            for (i, pair) in config.iter().enumerate() {
                let Some((k, v)) = pair.split_once('=') else {
                    return Err(UsageError(format!("--config {} is not KEY=VALUE", i + 1)).into());
                };
                if map.insert(k.to_owned(), v.to_owned()).is_some() {
                    return Err(UsageError(format!("--config {k} is given twice")).into());
                }
            }
            let spec = DynamicRoleSpec {
                name,
                provider,
                config: map,
                ttl: duration_arg("--ttl", &ttl)?,
                max_ttl: duration_arg("--max-ttl", &max_ttl)?,
            };
            let r = client.dynamic_role_put(&spec).await?;
            emit(format, &role_json(&r));
        }
        RoleCommand::Get { name } => {
            let r = client.dynamic_role_get(&name).await?;
            emit(format, &role_json(&r));
        }
        RoleCommand::List => {
            let names = client.dynamic_role_list().await?;
            emit(format, &json!({ "roles": names }));
        }
        RoleCommand::Delete { name } => {
            client.dynamic_role_delete(&name).await?;
            emit(format, &json!({ "name": name, "deleted": true }));
        }
    }
    Ok(())
}

pub async fn creds(g: &Global, format: Format, role: &str, ttl: Option<String>) -> Result<()> {
    let client = connect(g).await?;
    let ttl = ttl.map(|t| duration_arg("--ttl", &t)).transpose()?;
    let c = client.creds(role, ttl).await?;
    emit(
        format,
        &json!({
            "lease_id": c.lease_id, "username": c.username, "password": c.password,
            "host": c.host, "port": c.port, "database": text_or_null(&c.database),
            "expires_at": rfc3339(&c.expires_at), "renewable": c.renewable,
        }),
    );
    Ok(())
}

pub async fn lease(g: &Global, format: Format, cmd: LeaseCommand) -> Result<()> {
    let client = connect(g).await?;
    match cmd {
        LeaseCommand::Lookup { id } => emit(format, &lease_json(&client.lease_lookup(&id).await?)),
        LeaseCommand::List { prefix, failed } => {
            let leases = client.lease_list(&prefix, failed).await?;
            let list: Vec<Value> = leases.iter().map(lease_json).collect();
            emit(format, &json!({ "leases": list }));
        }
        LeaseCommand::Renew { id, increment } => {
            let inc = increment
                .map(|t| duration_arg("--increment", &t))
                .transpose()?;
            emit(format, &lease_json(&client.lease_renew(&id, inc).await?));
        }
        LeaseCommand::Revoke { id, prefix } => {
            let (revoked, pending) = match (id, prefix) {
                (Some(id), None) => client.lease_revoke(&id).await?,
                (None, Some(p)) => client.lease_revoke_prefix(&p).await?,
                _ => return Err(UsageError("give a lease id or --prefix".into()).into()),
            };
            emit(format, &json!({ "revoked": revoked, "pending": pending }));
        }
    }
    Ok(())
}
