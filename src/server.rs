//! The server: opens storage, barrier, audit and metrics, then serves the
//! gRPC services (plus health and reflection) over TLS until shutdown.
//!
//! `Server::open` does everything that can fail on bad configuration before a
//! port is used; `Server::serve` takes bound listeners and a shutdown future,
//! so tests pass their own (port 0, a oneshot) and `main` passes signals.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server as TonicServer, ServerTlsConfig};

use crate::api::auth::AuthService;
use crate::api::governance::GovernanceService;
use crate::api::identities::IdentitiesService;
use crate::api::policies::PoliciesService;
use crate::api::rotation::RotationService;
use crate::api::secrets::SecretsService;
use crate::api::sys::{publish_health, SysService};
use crate::audit::AuditLog;
use crate::barrier::{Barrier, BarrierOptions};
use crate::config::ServerConfig;
use crate::core::Core;
use crate::metrics::Metrics;
use crate::proto::v1::auth_server::AuthServer;
use crate::proto::v1::governance_server::GovernanceServer;
use crate::proto::v1::identities_server::IdentitiesServer;
use crate::proto::v1::policies_server::PoliciesServer;
use crate::proto::v1::rotation_server::RotationServer;
use crate::proto::v1::secrets_server::SecretsServer;
use crate::proto::v1::sys_server::SysServer;
use crate::storage::SledBackend;

/// How long in-flight calls may take to finish after shutdown begins.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// How often the tokens of expired identities are looked for.
pub const IDENTITY_SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How often the in-memory usage table is written (also at seal and shutdown).
pub const USAGE_PERSIST_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open storage: {0}")]
    Storage(String),
    #[error("cannot open the audit log: {0}")]
    Audit(String),
    #[error("cannot read TLS file {0}: {1}")]
    TlsFile(std::path::PathBuf, std::io::Error),
    #[error("oidc.ca_file: {0}")]
    OidcCa(String),
    #[error("gRPC server failed: {0}")]
    Transport(String),
}

pub struct Server {
    core: Arc<Core>,
    config: ServerConfig,
}

impl Server {
    pub fn open(config: ServerConfig) -> Result<Self, ServerError> {
        std::fs::create_dir_all(&config.storage_path)
            .map_err(|e| ServerError::Storage(format!("{}: {e}", config.storage_path.display())))?;
        let backend = SledBackend::open(&config.storage_path)
            .map_err(|e| ServerError::Storage(e.to_string()))?;
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default())
            .map_err(|e| ServerError::Storage(e.to_string()))?;
        if let Some(dir) = config.audit_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ServerError::Audit(format!("{}: {e}", dir.display())))?;
        }
        let audit = AuditLog::open(&config.audit_path, crate::clock::Clock::system())
            .map_err(|e| ServerError::Audit(e.to_string()))?;
        let metrics = Arc::new(Metrics::new());
        let mut core = Core::new(Arc::new(barrier), audit, metrics, config.limits);
        core.set_oidc_ca(config.oidc_ca.as_deref())
            .map_err(|e| ServerError::OidcCa(e.to_string()))?;
        let core = Arc::new(core);
        core.refresh_gauges();
        Ok(Self { core, config })
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls for at
    /// most `DRAIN_DEADLINE`.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        publish_health(&health, self.core.is_sealed()).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Transport(e.to_string()))?;

        let mut builder = TonicServer::builder();
        if let Some(tls) = &self.config.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| ServerError::TlsFile(p.to_owned(), e))
            };
            let mut tls_config = ServerTlsConfig::new()
                .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
            if let Some(ca) = &tls.client_ca {
                tls_config = tls_config
                    .client_ca_root(Certificate::from_pem(read(ca)?))
                    .client_auth_optional(true);
            }
            builder = builder
                .tls_config(tls_config)
                .map_err(|e| ServerError::Transport(e.to_string()))?;
        }

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let core_for_signal = self.core.clone();
        let signal = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            // Rotation workers stop at a step boundary; Watch streams end.
            core_for_signal.begin_shutdown();
        };
        tokio::spawn(signal);
        // -- rotation (issue 4): the scheduler runs while unsealed --
        crate::rotation::scheduler::start(&self.core);

        if let Some(listener) = metrics_listener {
            let core = self.core.clone();
            let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || core.refresh_gauges());
            let mut rx = stop_rx.clone();
            let metrics = self.core.metrics.clone();
            tokio::spawn(async move {
                crate::metrics::serve(listener, metrics, refresh, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
            });
        }

        {
            // Revokes the tokens of identities whose expiry passed (tokens
            // also carry that expiry as a hard limit; this is the sweep).
            let core = self.core.clone();
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    // Sleep until the next identity expiry (at most
                    // IDENTITY_SWEEP_EVERY), or until an expiry is set.
                    let wait = match core.identities.next_expiry_ms() {
                        Ok(Some(at)) => {
                            Duration::from_millis(at.saturating_sub(crate::core::now_ms()))
                                .clamp(Duration::from_millis(50), IDENTITY_SWEEP_EVERY)
                        }
                        _ => IDENTITY_SWEEP_EVERY,
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = core.identities.expiry_changed() => continue,
                        _ = rx.wait_for(|s| *s) => return,
                    }
                    if core.is_sealed() {
                        continue;
                    }
                    let core = core.clone();
                    let swept = tokio::task::spawn_blocking(move || {
                        core.identities
                            .sweep_expired(&core.tokens, crate::core::now_ms())
                    })
                    .await;
                    match swept {
                        Ok(Ok(0)) => {}
                        Ok(Ok(n)) => {
                            tracing::info!(revoked = n, "tokens of expired identities revoked")
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "identity expiry sweep failed"),
                        Err(e) => tracing::warn!(error = %e, "identity expiry sweep panicked"),
                    }
                }
            });
        }
        // Token expiry: one sleeper over the time-ordered index.
        let sweeper = tokio::spawn(self.core.tokens.clone().run_sweeper(stop_rx.clone()));
        // Usage: kept in memory on the request path, written periodically.
        let usage_writer = {
            let core = self.core.clone();
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(USAGE_PERSIST_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = async { let _ = rx.wait_for(|s| *s).await; } => return,
                    }
                    core.persist_usage().await;
                }
            })
        };

        let router = builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(SysServer::new(SysService::new(
                self.core.clone(),
                health.clone(),
            )))
            .add_service(SecretsServer::new(SecretsService::new(self.core.clone())))
            .add_service(AuthServer::new(AuthService::new(self.core.clone())))
            .add_service(PoliciesServer::new(PoliciesService::new(self.core.clone())))
            // -- identities, tokens, policies, login, governance (issue 3) go here --
            .add_service(IdentitiesServer::new(IdentitiesService::new(
                self.core.clone(),
            )))
            .add_service(GovernanceServer::new(GovernanceService::new(
                self.core.clone(),
            )))
            // -- rotation (issue 4) goes here --
            .add_service(RotationServer::new(RotationService::new(self.core.clone())));
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut rx = stop_rx.clone();
        let serving = router.serve_with_incoming_shutdown(incoming, async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        tokio::pin!(serving);
        let mut rx = stop_rx;
        tokio::select! {
            result = &mut serving => {
                sweeper.abort();
                usage_writer.abort();
                return result.map_err(|e| ServerError::Transport(e.to_string()));
            }
            _ = async { let _ = rx.wait_for(|s| *s).await; } => {}
        }
        tracing::info!("shutting down: draining in-flight calls");
        match tokio::time::timeout(DRAIN_DEADLINE, serving).await {
            Ok(result) => result.map_err(|e| ServerError::Transport(e.to_string()))?,
            Err(_) => tracing::warn!("drain deadline passed; closing remaining calls"),
        }
        // The background tasks hold the store: wait for them to let go.
        let _ = sweeper.await;
        let _ = usage_writer.await;
        self.core.persist_usage().await;
        // -- rotation (issue 4): wait for workers to reach a step boundary --
        self.core.rotation.wait_stopped(DRAIN_DEADLINE).await;
        if let Err(e) = self.core.audit.sync() {
            tracing::error!(error = %e, "could not flush the audit log at shutdown");
        }
        Ok(())
    }
}
