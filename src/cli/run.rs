//! Carries out one parsed command: `run` hands each command group to its
//! function here or in `serve`, `ident`, `rotation` and `bench`.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::common::{connect, expiry, options, parse_fields, printable, rfc3339, text_or_null};
use super::output::{emit, Format};
use super::{
    AuditCommand, BenchArgs, BenchMode, Cli, Command, Global, OperatorCommand, PolicyCommand,
    SecretCommand, TokenCommand, UsageError,
};
use keyward::client::{IssueOptions, PutOptions, Secret};
use keyward::proto::v1::SecretMetadata;

pub async fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    let format = g.format;
    match cli.command {
        Command::Dev {
            listen,
            metrics_listen,
            http_listen,
            data,
        } => super::serve::dev(&listen, &metrics_listen, &http_listen, &data).await,
        Command::Server {
            config,
            insecure_plaintext,
        } => super::serve::server(&config, insecure_plaintext).await,
        Command::Operator(cmd) => operator(&g, format, cmd).await,
        Command::Status => status(&g, format).await,
        Command::Secret(cmd) => secret(&g, format, cmd).await,
        Command::Audit(cmd) => audit(&g, format, cmd).await,
        Command::Policy(cmd) => policy(&g, format, cmd).await,
        Command::Token(cmd) => token(&g, format, cmd).await,
        Command::Identity(cmd) => super::ident::identity(&g, format, cmd).await,
        Command::OidcIssuer(cmd) => super::ident::oidc_issuer(&g, format, cmd).await,
        Command::Login(cmd) => super::ident::login(&g, format, cmd).await,
        Command::Oidc(cmd) => super::federation::oidc(&g, format, cmd).await,
        Command::Report(args) => super::ident::report(&g, format, args).await,
        Command::Rotation(cmd) => super::rotation::rotation(&g, format, cmd).await,
        Command::Rotate { path, no_wait } => {
            super::rotation::rotate(&g, format, &path, no_wait).await
        }
        Command::Provider(cmd) => super::rotation::provider(&g, format, cmd).await,
        Command::Dynamic(cmd) => super::dynamic::dynamic(&g, format, cmd).await,
        Command::Creds { role, ttl } => super::dynamic::creds(&g, format, &role, ttl).await,
        Command::Lease(cmd) => super::dynamic::lease(&g, format, cmd).await,
        Command::Pki(cmd) => super::pki::pki(&g, format, cmd).await,
        Command::Bench(args) => bench(&g, format, args).await,
        Command::Certs { out } => certs(format, &out),
        Command::Snapshot(cmd) => super::ops::snapshot(format, cmd),
        Command::Scan(args) => super::scan::scan(&g, format, args).await,
        Command::Anomalies(cmd) => super::anomalies::anomalies(&g, format, cmd).await,
        Command::Migrate { from, to } => super::migrate::migrate(format, &from, &to),
    }
}

async fn operator(g: &Global, format: Format, cmd: OperatorCommand) -> Result<()> {
    let client = connect(g).await?;
    match cmd {
        OperatorCommand::Init { shares, threshold } => {
            let r = client.init(shares, threshold).await?;
            emit(
                format,
                &json!({"shares": r.shares, "root_token": r.root_token}),
            );
        }
        OperatorCommand::Unseal { share, reset } => {
            let r = match (share, reset) {
                (_, true) => client.unseal_reset().await?,
                (Some(share), false) => client.unseal(&share).await?,
                (None, false) => return Err(UsageError("give a SHARE (or --reset)".into()).into()),
            };
            emit(
                format,
                &json!({"sealed": r.sealed, "progress": r.progress, "threshold": r.threshold}),
            );
        }
        OperatorCommand::Seal => {
            client.seal().await?;
            emit(format, &json!({"sealed": true}));
        }
        OperatorCommand::RotateKey => {
            let term = client.rotate_key().await?;
            emit(format, &json!({"term": term}));
        }
        OperatorCommand::Snapshot(cmd) => super::ops::snapshot_save(g, format, cmd).await?,
    }
    Ok(())
}

async fn status(g: &Global, format: Format) -> Result<()> {
    let r = connect(g).await?.status().await?;
    emit(
        format,
        &json!({
            "sealed": r.sealed, "initialized": r.initialized, "version": r.version,
            "progress": r.progress, "threshold": r.threshold, "shares": r.shares,
            "key_term": r.key_term, "audit_head": r.audit_head,
            "node_id": r.node_id, "leader": r.leader, "is_leader": r.is_leader,
            "etcd_endpoints": r.etcd_endpoints.iter().map(|e| json!({
                "endpoint": e.endpoint, "healthy": e.healthy, "detail": e.detail,
            })).collect::<Vec<_>>(),
        }),
    );
    Ok(())
}

async fn audit(g: &Global, format: Format, cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::Verify { files } => super::ops::audit_verify(format, &files)?,
        AuditCommand::Hash { value } => {
            let hash = connect(g).await?.audit_hash(&value).await?;
            emit(format, &json!({"hash": hash}));
        }
    }
    Ok(())
}

async fn bench(g: &Global, format: Format, args: BenchArgs) -> Result<()> {
    match args.mode.clone() {
        Some(BenchMode::Startup {
            tokens,
            dir,
            write_seconds,
            open_only,
        }) => super::bench::startup(tokens, dir, write_seconds, open_only, format).await,
        Some(BenchMode::Snapshot { dir }) => super::ops::bench_snapshot(&dir, format).await,
        Some(BenchMode::Instructions {
            requests,
            http,
            issue,
            keep,
        }) => {
            let counted = super::bench::Counted { http, issue };
            super::bench::instructions(&args, requests, counted, keep.as_deref(), format).await
        }
        None => super::bench::run(&options(g), &args, format).await,
    }
}

fn certs(format: Format, out: &Path) -> Result<()> {
    let paths = keyward::pki::ensure_dev_certs(out)?;
    emit(
        format,
        &json!({"ca": paths.ca, "server": paths.server, "server_key": paths.server_key,
                "client": paths.client, "client_key": paths.client_key}),
    );
    Ok(())
}

async fn secret(g: &Global, format: Format, cmd: SecretCommand) -> Result<()> {
    match cmd {
        SecretCommand::Put {
            path,
            fields,
            cas,
            max_versions,
            owner,
        } => {
            let data = parse_fields(&fields)?;
            let client = connect(g).await?;
            let version = client
                .put(
                    &path,
                    &data,
                    PutOptions {
                        cas,
                        max_versions,
                        owner,
                    },
                )
                .await?;
            emit(format, &json!({"path": path, "version": version}));
        }
        SecretCommand::Get {
            path,
            version,
            stage,
            field,
        } => {
            let s = connect(g)
                .await?
                .get_with(&path, version, stage.as_deref())
                .await?;
            match field {
                Some(name) => write_field(&s, &name)?,
                None => emit(format, &secret_json(&s)),
            }
        }
        SecretCommand::List { prefix } => {
            let paths = connect(g).await?.list(&prefix).await?;
            emit(format, &json!({"paths": paths}));
        }
        SecretCommand::Metadata { path } => {
            let m = connect(g).await?.metadata(&path).await?;
            emit(format, &metadata_json(&m));
        }
        SecretCommand::Delete { path, version } => {
            connect(g).await?.delete(&path, version).await?;
            emit(format, &json!({"path": path, "deleted": version}));
        }
        SecretCommand::Undelete { path, version } => {
            connect(g).await?.undelete(&path, version).await?;
            emit(format, &json!({"path": path, "undeleted": version}));
        }
        SecretCommand::Destroy { path, version } => {
            connect(g).await?.destroy(&path, version).await?;
            emit(format, &json!({"path": path, "destroyed": version}));
        }
    }
    Ok(())
}

/// `secret get --field NAME`: the raw bytes, no newline added.
fn write_field(s: &Secret, name: &str) -> Result<()> {
    let value = s
        .data
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("version {} has no field {name}", s.version))?;
    let mut out = std::io::stdout().lock();
    out.write_all(value.expose())?;
    out.flush()?;
    Ok(())
}

fn secret_json(s: &Secret) -> Value {
    let data: serde_json::Map<String, Value> = s
        .data
        .iter()
        .map(|(k, v)| (k.clone(), printable(v)))
        .collect();
    json!({"path": s.path, "version": s.version, "stage": s.stage, "data": data,
           "created_at": rfc3339(&s.created_at)})
}

fn metadata_json(m: &SecretMetadata) -> Value {
    let versions: Vec<Value> = m
        .versions
        .iter()
        .map(|v| {
            json!({"version": v.version, "created_at": rfc3339(&v.created_at),
                   "deleted_at": rfc3339(&v.deleted_at), "destroyed": v.destroyed,
                   "stage": text_or_null(&v.stage)})
        })
        .collect();
    json!({"path": m.path, "current_version": m.current_version, "newest_version": m.newest_version,
           "max_versions": m.max_versions, "owner": m.owner, "created_at": rfc3339(&m.created_at),
           "updated_at": rfc3339(&m.updated_at), "versions": versions})
}

async fn policy(g: &Global, format: Format, cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Put { name, file } => {
            let document = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the policy from stdin")?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| UsageError(format!("cannot read {}: {e}", file.display())))?
            };
            let rules = connect(g).await?.policy_put(&name, &document).await?;
            emit(format, &json!({"name": name, "rules": rules}));
        }
        PolicyCommand::Get { name } => {
            let document = connect(g).await?.policy_get(&name).await?;
            match format {
                Format::Json => emit(format, &json!({"name": name, "document": document})),
                Format::Table => print!("{document}"),
            }
        }
        PolicyCommand::List => {
            let names = connect(g).await?.policy_list().await?;
            emit(format, &json!({"policies": names}));
        }
        PolicyCommand::Delete { name } => {
            connect(g).await?.policy_delete(&name).await?;
            emit(format, &json!({"name": name, "deleted": true}));
        }
        PolicyCommand::Suggest(args) => super::lifecycle::suggest(g, format, args).await?,
    }
    Ok(())
}

/// A token's details; a root token's expiries are `null` ("never").
fn token_info_json(format: Format, i: &keyward::proto::v1::TokenInfo) -> Value {
    json!({
        "accessor": i.accessor, "identity": i.identity, "policies": i.policies,
        "created_at": rfc3339(&i.created_at), "expires_at": expiry(format, &i.expires_at),
        "max_expires_at": expiry(format, &i.max_expires_at),
        "uses_left": if i.uses_left == 0 { Value::Null } else { json!(i.uses_left) },
        "cidrs": i.cidrs,
        "parent_accessor": text_or_null(&i.parent_accessor),
        "method": i.method,
        "may_act": text_or_null(&i.may_act),
        "actor": if i.actor_accessor.is_empty() { Value::Null } else {
            json!({"identity": i.actor_identity, "accessor": i.actor_accessor})
        },
    })
}

async fn token(g: &Global, format: Format, cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Issue {
            policies,
            ttl,
            max_ttl,
            uses,
            cidrs,
            may_act,
        } => {
            let options = IssueOptions {
                policies,
                ttl: ttl.map(|t| t.as_duration()),
                max_ttl: max_ttl.map(|t| t.as_duration()),
                uses: uses.unwrap_or(0),
                cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            };
            if let Some(agent) = may_act {
                return super::federation::issue_may_act(g, format, options, &agent).await;
            }
            let r = connect(g).await?.issue_token(options).await?;
            emit(
                format,
                &json!({"token": r.token, "accessor": r.accessor, "expires_at": rfc3339(&r.expires_at), "policies": r.policies}),
            );
        }
        TokenCommand::Lookup { token, accessor } => {
            let client = connect(g).await?;
            let info = match (token, accessor) {
                (Some(t), _) => client.lookup_token(&t).await?,
                (None, Some(a)) => client.lookup_accessor(&a).await?,
                (None, None) => client.lookup_self().await?,
            };
            emit(format, &token_info_json(format, &info));
        }
        TokenCommand::Exchange(args) => super::federation::exchange(g, format, args).await?,
        TokenCommand::Renew { increment } => {
            let info = connect(g)
                .await?
                .renew_self(increment.map(|t| t.as_duration()))
                .await?;
            emit(format, &token_info_json(format, &info));
        }
        TokenCommand::Revoke { token, accessor } => {
            let client = connect(g).await?;
            let revoked = match (token, accessor) {
                (Some(t), _) => client.revoke_token(&t).await?,
                (None, Some(a)) => client.revoke_accessor(&a).await?,
                (None, None) => client.revoke_self().await?,
            };
            emit(format, &json!({"revoked": revoked}));
        }
    }
    Ok(())
}
