//! Carries out one parsed command.

use std::io::{Read, Write};
use std::net::SocketAddr;

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use super::output::{emit, Format};
use super::{
    AuditCommand, Cli, Command, Global, OperatorCommand, PolicyCommand, SecretCommand,
    TokenCommand, UsageError,
};
use keyward::client::{Client, ClientOptions, IssueOptions, PutOptions};
use keyward::secrecy::{SecretBytes, SecretData};

fn options(g: &Global) -> ClientOptions {
    ClientOptions {
        addr: g.addr.clone(),
        token: g.token.clone(),
        ca_cert: g.ca_cert.clone(),
        client_cert: g.client_cert.clone(),
        client_key: g.client_key.clone(),
        connect_timeout: None,
    }
}

pub(super) async fn connect(g: &Global) -> Result<Client> {
    Ok(Client::connect(options(g)).await?)
}

pub(super) fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Value {
    match ts {
        Some(t) => chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
            .map(|d| Value::String(d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or(Value::Null),
        None => Value::Null,
    }
}

/// A field value for printing: text as is, other bytes as `base64:...`.
fn printable(v: &SecretBytes) -> Value {
    match v.expose_str() {
        Some(s) => Value::String(s.to_owned()),
        None => Value::String(format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(v.expose())
        )),
    }
}

fn parse_addr(text: &str, what: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        UsageError(format!(
            "{what} must be HOST:PORT with an IP address, e.g. 127.0.0.1:8270"
        ))
        .into()
    })
}

/// Parses FIELD=VALUE, FIELD=@file and FIELD=- (stdin, once).
fn parse_fields(args: &[String]) -> Result<SecretData> {
    let mut data = SecretData::new();
    let mut stdin_used = false;
    for (i, arg) in args.iter().enumerate() {
        // Never echo the argument: it may be a value typed without its name.
        let Some((name, value)) = arg.split_once('=') else {
            return Err(UsageError(format!("field argument {} is not FIELD=VALUE", i + 1)).into());
        };
        let bytes = if value == "-" {
            if stdin_used {
                return Err(UsageError("only one field can read stdin".into()).into());
            }
            stdin_used = true;
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            buf
        } else if let Some(file) = value.strip_prefix('@') {
            std::fs::read(file).with_context(|| format!("reading {file} for field {name}"))?
        } else {
            value.as_bytes().to_vec()
        };
        if data
            .insert(name.to_owned(), SecretBytes::new(bytes))
            .is_some()
        {
            return Err(UsageError(format!("field {name} is given twice")).into());
        }
    }
    Ok(data)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYWARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

pub async fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    let format = g.format;
    match cli.command {
        Command::Dev {
            listen,
            metrics_listen,
            data,
        } => {
            init_tracing();
            let listen = parse_addr(&listen, "--listen")?;
            let metrics = if metrics_listen == "off" {
                None
            } else {
                Some(parse_addr(&metrics_listen, "--metrics-listen")?)
            };
            let vault = keyward::dev::open(&data, metrics).await?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let metrics_listener = match metrics {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding {addr}"))?,
                ),
                None => None,
            };
            let bound = listener.local_addr()?;
            let data_dir = std::fs::canonicalize(&vault.data_dir).unwrap_or(vault.data_dir.clone());
            let ca = std::fs::canonicalize(&vault.certs.ca).unwrap_or(vault.certs.ca.clone());
            let mut out = std::io::stdout().lock();
            writeln!(out, "keyward dev server: data in {}", data_dir.display())?;
            if let Some(m) = &metrics_listener {
                writeln!(out, "metrics: http://{}/metrics", m.local_addr()?)?;
            }
            writeln!(out, "Run these in your shell to use it:")?;
            writeln!(out, "export KEYWARD_ADDR=https://{bound}")?;
            writeln!(out, "export KEYWARD_CACERT={}", ca.display())?;
            writeln!(out, "export KEYWARD_TOKEN={}", vault.credentials.root_token)?;
            out.flush()?;
            drop(out);
            tracing::info!(addr = %bound, "serving");
            vault
                .server
                .serve(listener, metrics_listener, shutdown_signal())
                .await?;
            tracing::info!("stopped");
        }
        Command::Server {
            config,
            insecure_plaintext,
        } => {
            init_tracing();
            let config = keyward::config::load_file(&config)?;
            if config.tls.is_none() && !insecure_plaintext {
                return Err(UsageError(
                    "tls.cert and tls.key are required (or --insecure-plaintext for local experiments)"
                        .into(),
                )
                .into());
            }
            let server = keyward::server::Server::open(if insecure_plaintext {
                keyward::config::ServerConfig {
                    tls: None,
                    ..config.clone()
                }
            } else {
                config.clone()
            })?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            let metrics_listener = match config.metrics_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding {addr}"))?,
                ),
                None => None,
            };
            if insecure_plaintext {
                tracing::warn!("serving WITHOUT TLS (--insecure-plaintext): tokens and secrets cross the network in clear");
            }
            tracing::info!(addr = %listener.local_addr()?, sealed = server.core().is_sealed(), "serving");
            server
                .serve(listener, metrics_listener, shutdown_signal())
                .await?;
            tracing::info!("stopped");
        }
        Command::Operator(op) => {
            let client = connect(&g).await?;
            match op {
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
                        (None, false) => {
                            return Err(UsageError("give a SHARE (or --reset)".into()).into())
                        }
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
            }
        }
        Command::Status => {
            let r = connect(&g).await?.status().await?;
            emit(
                format,
                &json!({
                    "sealed": r.sealed, "initialized": r.initialized, "version": r.version,
                    "progress": r.progress, "threshold": r.threshold, "shares": r.shares,
                    "key_term": r.key_term, "audit_head": r.audit_head,
                }),
            );
        }
        Command::Secret(cmd) => secret(&g, format, cmd).await?,
        Command::Audit(AuditCommand::Verify { file }) => {
            let report = keyward::audit::verify_file(&file)?;
            let ok = report.ok;
            emit(format, &serde_json::to_value(&report)?);
            if !ok {
                anyhow::bail!(
                    "the audit chain is broken at record {}",
                    report
                        .first_bad
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "?".into())
                );
            }
        }
        Command::Audit(AuditCommand::Hash { value }) => {
            let hash = connect(&g).await?.audit_hash(&value).await?;
            emit(format, &json!({"hash": hash}));
        }
        Command::Policy(cmd) => policy(&g, format, cmd).await?,
        Command::Token(cmd) => token(&g, format, cmd).await?,
        // -- identities, tokens, policies, login, report (issue 3) go here --
        Command::Identity(cmd) => super::ident::identity(&g, format, cmd).await?,
        Command::OidcIssuer(cmd) => super::ident::oidc_issuer(&g, format, cmd).await?,
        Command::Login(cmd) => super::ident::login(&g, format, cmd).await?,
        Command::Report(args) => super::ident::report(&g, format, args).await?,

        // -- rotation, providers (issue 4) go here --
        Command::Rotation(cmd) => super::rotation::rotation(&g, format, cmd).await?,
        Command::Rotate { path, no_wait } => {
            super::rotation::rotate(&g, format, &path, no_wait).await?
        }
        Command::Provider(cmd) => super::rotation::provider(&g, format, cmd).await?,
        Command::Bench(args) => match args.mode.clone() {
            Some(super::BenchMode::Startup {
                tokens,
                dir,
                write_seconds,
                open_only,
            }) => super::bench::startup(tokens, dir, write_seconds, open_only, format).await?,
            None => super::bench::run(&options(&g), &args, format).await?,
        },
        Command::Certs { out } => {
            let paths = keyward::pki::ensure_dev_certs(&out)?;
            emit(
                format,
                &json!({"ca": paths.ca, "server": paths.server, "server_key": paths.server_key, "client": paths.client, "client_key": paths.client_key}),
            );
        }
    }
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
            let client = connect(g).await?;
            let s = client.get_with(&path, version, stage.as_deref()).await?;
            if let Some(name) = field {
                let value = s
                    .data
                    .get(&name)
                    .ok_or_else(|| anyhow::anyhow!("version {} has no field {name}", s.version))?;
                let mut out = std::io::stdout().lock();
                out.write_all(value.expose())?;
                out.flush()?;
                return Ok(());
            }
            let data: serde_json::Map<String, Value> = s
                .data
                .iter()
                .map(|(k, v)| (k.clone(), printable(v)))
                .collect();
            emit(
                format,
                &json!({"path": s.path, "version": s.version, "stage": s.stage, "data": data, "created_at": rfc3339(&s.created_at)}),
            );
        }
        SecretCommand::List { prefix } => {
            let paths = connect(g).await?.list(&prefix).await?;
            emit(format, &json!({"paths": paths}));
        }
        SecretCommand::Metadata { path } => {
            let m = connect(g).await?.metadata(&path).await?;
            let versions: Vec<Value> = m
                .versions
                .iter()
                .map(|v| {
                    json!({"version": v.version, "created_at": rfc3339(&v.created_at), "deleted_at": rfc3339(&v.deleted_at),
                           "destroyed": v.destroyed, "stage": if v.stage.is_empty() { Value::Null } else { Value::String(v.stage.clone()) }})
                })
                .collect();
            emit(
                format,
                &json!({"path": m.path, "current_version": m.current_version, "newest_version": m.newest_version,
                        "max_versions": m.max_versions, "owner": m.owner, "created_at": rfc3339(&m.created_at),
                        "updated_at": rfc3339(&m.updated_at), "versions": versions}),
            );
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
    }
    Ok(())
}

fn token_info_json(i: &keyward::proto::v1::TokenInfo) -> Value {
    json!({
        "accessor": i.accessor, "identity": i.identity, "policies": i.policies,
        "created_at": rfc3339(&i.created_at), "expires_at": rfc3339(&i.expires_at),
        "max_expires_at": rfc3339(&i.max_expires_at),
        "uses_left": if i.uses_left == 0 { Value::Null } else { json!(i.uses_left) },
        "cidrs": i.cidrs,
        "parent_accessor": if i.parent_accessor.is_empty() { Value::Null } else { json!(i.parent_accessor) },
        "method": i.method,
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
        } => {
            let r = connect(g)
                .await?
                .issue_token(IssueOptions {
                    policies,
                    ttl: ttl.map(|t| t.as_duration()),
                    max_ttl: max_ttl.map(|t| t.as_duration()),
                    uses: uses.unwrap_or(0),
                    cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
                })
                .await?;
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
            emit(format, &token_info_json(&info));
        }
        TokenCommand::Renew { increment } => {
            let info = connect(g)
                .await?
                .renew_self(increment.map(|t| t.as_duration()))
                .await?;
            emit(format, &token_info_json(&info));
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
