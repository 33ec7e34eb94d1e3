//! `keyward dev` and `keyward server`: the two commands that run a server in
//! this process until SIGINT or SIGTERM, logging to stderr.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use super::UsageError;

/// `keyward dev`: a dev server with its certificates and one unseal share in
/// `data`; prints the `export` lines that point a shell at it.
pub(super) async fn dev(
    listen: &str,
    metrics_listen: &str,
    http_listen: &str,
    data: &Path,
) -> Result<()> {
    init_tracing();
    let listen = parse_addr(listen, "--listen")?;
    let metrics = if metrics_listen == "off" {
        None
    } else {
        Some(parse_addr(metrics_listen, "--metrics-listen")?)
    };
    let http = if http_listen == "off" {
        None
    } else {
        Some(parse_addr(http_listen, "--http-listen")?)
    };
    let threads = dev_listen_threads()?;
    let mut vault =
        keyward::dev::open_with(data, metrics, keyward::clock::Clock::system(), |config| {
            config.listen_threads = threads
        })
        .await?;
    let listener = bind(listen).await?;
    let metrics_listener = bind_optional(metrics).await?;
    let http_listener = bind_optional(http).await?;
    print_dev_exports(&vault, &listener, metrics_listener.as_ref())?;
    if let Some(http_listener) = http_listener {
        print_vault_exports(&vault, &http_listener)?;
        tracing::info!(https = %http_listener.local_addr()?, "serving the Vault-compatible API");
        vault.server = vault.server.with_http_listener(http_listener);
    }
    tracing::info!(addr = %listener.local_addr()?, "serving");
    vault
        .server
        .serve(listener, metrics_listener, shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// `listen_threads` of a dev server: `KEYWARD_LISTEN_THREADS` if set, else
/// the default of a sled server (a lane per core).
fn dev_listen_threads() -> Result<usize> {
    use keyward::config::{parse_listen_threads, StorageBackend};
    let value = std::env::var("KEYWARD_LISTEN_THREADS").ok();
    parse_listen_threads(value.as_deref(), &StorageBackend::Sled)
        .map_err(|e| UsageError(format!("KEYWARD_LISTEN_THREADS: {e}")).into())
}

/// What a shell needs to talk to the dev server (the root token included:
/// a dev server is for one person's experiments).
fn print_dev_exports(
    vault: &keyward::dev::DevVault,
    listener: &TcpListener,
    metrics_listener: Option<&TcpListener>,
) -> Result<()> {
    let bound = listener.local_addr()?;
    let data_dir = std::fs::canonicalize(&vault.data_dir).unwrap_or(vault.data_dir.clone());
    let ca = std::fs::canonicalize(&vault.certs.ca).unwrap_or(vault.certs.ca.clone());
    let mut out = std::io::stdout().lock();
    writeln!(out, "keyward dev server: data in {}", data_dir.display())?;
    if let Some(m) = metrics_listener {
        writeln!(out, "metrics: http://{}/metrics", m.local_addr()?)?;
    }
    writeln!(out, "Run these in your shell to use it:")?;
    writeln!(out, "export KEYWARD_ADDR=https://{bound}")?;
    writeln!(out, "export KEYWARD_CACERT={}", ca.display())?;
    writeln!(out, "export KEYWARD_TOKEN={}", vault.credentials.root_token)?;
    out.flush()?;
    Ok(())
}

/// What the `vault` and `bao` CLIs (and hvac) need to reach the dev
/// server's Vault-compatible API.
fn print_vault_exports(vault: &keyward::dev::DevVault, listener: &TcpListener) -> Result<()> {
    let bound = listener.local_addr()?;
    let ca = std::fs::canonicalize(&vault.certs.ca).unwrap_or(vault.certs.ca.clone());
    let mut out = std::io::stdout().lock();
    writeln!(out, "For Vault clients (vault, bao, hvac):")?;
    writeln!(out, "export VAULT_ADDR=https://{bound}")?;
    writeln!(out, "export VAULT_CACERT={}", ca.display())?;
    writeln!(out, "export VAULT_TOKEN={}", vault.credentials.root_token)?;
    out.flush()?;
    Ok(())
}

/// `keyward server --config FILE`: a production server; it starts sealed
/// (or uninitialised).
pub(super) async fn server(config: &Path, insecure_plaintext: bool) -> Result<()> {
    init_tracing();
    let mut config = keyward::config::load_file(config)?;
    if insecure_plaintext {
        config.tls = None;
    } else if config.tls.is_none() {
        return Err(UsageError(
            "tls.cert and tls.key are required (or --insecure-plaintext for local experiments)"
                .into(),
        )
        .into());
    }
    let listen = config.listen;
    let metrics = config.metrics_listen;
    let http = config.http_listen;
    let mut server = keyward::server::Server::open(config)?;
    let listener = bind(listen).await?;
    let metrics_listener = bind_optional(metrics).await?;
    if let Some(http_listener) = bind_optional(http).await? {
        tracing::info!(https = %http_listener.local_addr()?, "serving the Vault-compatible API");
        server = server.with_http_listener(http_listener);
    }
    if insecure_plaintext {
        tracing::warn!("serving WITHOUT TLS (--insecure-plaintext): tokens and secrets cross the network in clear");
    }
    tracing::info!(addr = %listener.local_addr()?, sealed = server.core().is_sealed(), "serving");
    server
        .serve(listener, metrics_listener, shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

fn parse_addr(text: &str, what: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        UsageError(format!(
            "{what} must be HOST:PORT with an IP address, e.g. 127.0.0.1:8270"
        ))
        .into()
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

async fn bind_optional(addr: Option<SocketAddr>) -> Result<Option<TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(bind(addr).await?)),
        None => Ok(None),
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
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
