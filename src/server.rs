//! The server: opens storage, barrier, audit and metrics, then serves the
//! gRPC services (plus health and reflection) over TLS until shutdown.
//!
//! `Server::open` does everything that can fail on bad configuration before a
//! port is used; `Server::serve` takes bound listeners and a shutdown future,
//! so tests pass their own (port 0, a oneshot) and `main` passes signals.
//!
//! The server owns the one [`ShutdownTrigger`] and the one task set
//! ([`tasks::Tasks`]): each background task gets a clone of the signal and
//! only the handles it uses (never the `Core`), and is awaited at shutdown
//! within [`DRAIN_DEADLINE`].

mod lanes;
mod leader;
mod limits;
mod tasks;
mod tls;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::Server as TonicServer;
use tower::layer::util::{Identity as NoLayer, Stack};
use tower::util::MapResponseLayer;

use crate::api::auth::AuthService;
use crate::api::detach::{self, Changes};
use crate::api::governance::GovernanceService;
use crate::api::identities::IdentitiesService;
use crate::api::pki::PkiService;
use crate::api::policies::PoliciesService;
use crate::api::rotation::RotationService;
use crate::api::secrets::SecretsService;
use crate::api::sys::{publish_health, SysService};
use crate::audit::AuditLog;
use crate::barrier::{Barrier, BarrierOptions};
use crate::clock::{Clock, Shutdown, ShutdownTrigger};
use crate::config::{ServerConfig, ServerLimits, MAX_LOCAL_ERROR_RESETS};
use crate::core::Core;
use crate::metrics::Metrics;
use crate::proto::v1::auth_server::AuthServer;
use crate::proto::v1::governance_server::GovernanceServer;
use crate::proto::v1::identities_server::IdentitiesServer;
use crate::proto::v1::pki_server::PkiServer;
use crate::proto::v1::policies_server::PoliciesServer;
use crate::proto::v1::rotation_server::RotationServer;
use crate::proto::v1::secrets_server::SecretsServer;
use crate::proto::v1::sys_server::SysServer;
use crate::storage::cluster::{AlwaysLeader, Leadership};
use crate::storage::SledBackend;

pub use tasks::Tasks;

/// How long in-flight calls may take to finish after shutdown begins.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// How much longer than `DRAIN_DEADLINE` the server waits for its lanes
/// to drain (each applies the deadline itself, on its own thread).
const LANE_DRAIN_SLACK: Duration = Duration::from_secs(2);
/// How often the in-memory usage table is written (also at seal and shutdown).
pub const USAGE_PERSIST_EVERY: Duration = Duration::from_secs(60);
/// How long a new connection may take to finish its TLS handshake; it holds
/// a connection slot (`limits.max_connections`) until then.
pub const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Reopens the audit file at each SIGHUP until shutdown (see `AuditLog::reopen`).
async fn reopen_audit_on_hangup(audit: Arc<AuditLog>, shutdown: crate::clock::Shutdown) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP: the audit file is not reopened on it");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            got = hangup.recv() => {
                if got.is_none() {
                    return;
                }
                match audit.reopen() {
                    Ok(()) => tracing::info!("SIGHUP: audit file reopened"),
                    Err(error) => tracing::error!(%error, "SIGHUP: audit file not reopened"),
                }
            }
        }
    }
}

/// Serves the connections of `incoming` (over TLS with `tls`) until
/// `shutdown` fires, then drains their calls for at most `drain` more. The
/// shared runtime's listener and each lane (`lanes`) serve this way.
async fn serve_connections(
    router: GrpcRouter,
    incoming: impl tokio_stream::Stream<Item = std::io::Result<limits::Admitted>> + Send + 'static,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: &Shutdown,
    drain: Duration,
) -> Result<(), tonic::transport::Error> {
    let stop = {
        let shutdown = shutdown.clone();
        async move { shutdown.wait().await }
    };
    let serving: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(config) => {
            Box::pin(router.serve_with_incoming_shutdown(tls::accept(incoming, config), stop))
        }
        None => Box::pin(router.serve_with_incoming_shutdown(incoming, stop)),
    };
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => result,
        () = shutdown.wait() => match tokio::time::timeout(drain, &mut serving).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!("drain deadline passed; closing remaining calls");
                Ok(())
            }
        },
    }
}

/// The gRPC router with the transport's layers (see `limits`).
type GrpcRouter = Router<
    Stack<
        Changes,
        Stack<MapResponseLayer<fn(limits::GrpcResponse) -> limits::GrpcResponse>, NoLayer>,
    >,
>;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open storage: {0}")]
    Storage(String),
    #[error(
        "the storage folder {0} is open to other users (mode {1:04o}): chmod 700 it, or name \
         a new folder (keyward makes it with mode 0700)"
    )]
    StorageFolderOpen(std::path::PathBuf, u32),
    #[error("cannot open the audit log: {0}")]
    Audit(String),
    #[error("cannot read TLS file {0}: {1}")]
    TlsFile(std::path::PathBuf, std::io::Error),
    #[error(
        "the TLS key file {0} is open to other users (mode {1:04o}): make it readable by its \
         owner only (chmod 600), or by root and one group (root-owned, chmod 640)"
    )]
    KeyFileOpen(std::path::PathBuf, u32),
    #[error("oidc.ca_file: {0}")]
    OidcCa(String),
    #[error("gRPC server failed: {0}")]
    Transport(String),
}

pub struct Server {
    core: Arc<Core>,
    config: ServerConfig,
    /// The one shutdown signal: every task and long stream holds a clone.
    shutdown: ShutdownTrigger,
    /// The HTTPS listener (`http.listen`), served beside gRPC if given.
    http_listener: Option<TcpListener>,
    /// Whether this node leads (always, on sled): leader-only tasks run
    /// while it does (see `cluster`).
    leadership: Arc<dyn Leadership>,
    /// The changes running as their own task (`api::detach`), over both
    /// listeners; shutdown waits for them before it closes the audit log.
    changes: Changes,
}

impl Server {
    /// Opens the server on the system clock.
    pub fn open(config: ServerConfig) -> Result<Self, ServerError> {
        Self::open_with_clock(config, Clock::system())
    }

    /// Opens the server; every part of it reads `clock`.
    ///
    /// An existing storage folder open to other users is refused, and so is
    /// a TLS key file others can read; a missing storage folder is made with
    /// mode 0700 (`SledBackend::open`), and so is a missing audit folder.
    pub fn open_with_clock(config: ServerConfig, clock: Clock) -> Result<Self, ServerError> {
        check_storage_folder(&config.storage_path)?;
        if let Some(tls) = &config.tls {
            check_key_file(&tls.key)?;
        }
        #[cfg_attr(not(feature = "etcd"), allow(unused_mut))]
        let mut etcd_durations = None;
        let (backend, leadership): (Arc<dyn crate::storage::Backend>, Arc<dyn Leadership>) =
            match &config.storage_backend {
                crate::config::StorageBackend::Sled => (
                    Arc::new(
                        SledBackend::open(&config.storage_path)
                            .map_err(|e| ServerError::Storage(e.to_string()))?,
                    ),
                    Arc::new(AlwaysLeader::new(config.node_id.clone())),
                ),
                #[cfg(feature = "etcd")]
                crate::config::StorageBackend::Etcd(options) => {
                    let etcd = Arc::new(
                        crate::storage::EtcdBackend::open(options)
                            .map_err(|e| ServerError::Storage(e.to_string()))?,
                    );
                    etcd_durations = Some((
                        etcd.request_durations(),
                        etcd.read_cache_metrics(),
                        etcd.read_lease_metrics(),
                    ));
                    let leadership = crate::storage::EtcdLeadership::start(
                        etcd.clone(),
                        options,
                        &config.node_id,
                    )
                    .map_err(|e| ServerError::Storage(e.to_string()))?;
                    (etcd, Arc::new(leadership))
                }
                #[cfg(not(feature = "etcd"))]
                crate::config::StorageBackend::Etcd(_) => {
                    return Err(ServerError::Storage(crate::storage::NO_ETCD.to_owned()))
                }
            };
        // A store made by `snapshot restore` and not unsealed since.
        let restored = crate::barrier::restore::read_marker(backend.as_ref())
            .map_err(|e| ServerError::Storage(e.to_string()))?;
        let barrier = Barrier::new(backend, BarrierOptions::default())
            .map_err(|e| ServerError::Storage(e.to_string()))?;
        if let Some(dir) = config.audit_path.parent() {
            create_private_dirs(dir)
                .map_err(|e| ServerError::Audit(format!("{}: {e}", dir.display())))?;
        }
        let audit = AuditLog::open_with(&config.audit_path, clock.clone(), config.audit.clone())
            .map_err(|e| ServerError::Audit(e.to_string()))?;
        if !leadership.is_single_node() {
            // Each node of a cluster writes its own chain; its id is in
            // every record.
            audit.set_node_id(&config.node_id);
        }
        if let Some(marker) = restored {
            // The restored vault's audit log begins with where it came from.
            audit
                .append_note(
                    "keyward.v1.Sys/SnapshotRestore",
                    "sys/snapshot",
                    &[
                        ("snapshot", &marker.snapshot),
                        ("sha256", &marker.sha256),
                        // When the snapshot was taken: a restore of an old
                        // one (a rollback) shows as such in the audit log.
                        (
                            "snapshot_created_at",
                            marker.signed_field("created_at").unwrap_or("?"),
                        ),
                        (
                            "snapshot_key_term",
                            marker.signed_field("key_term").unwrap_or("?"),
                        ),
                        ("hmac_check", "at the first unseal"),
                    ],
                )
                .map_err(|e| ServerError::Audit(e.to_string()))?;
        }
        let metrics = Arc::new(Metrics::new());
        #[cfg(feature = "etcd")]
        if let Some((durations, cache, lease)) = etcd_durations {
            metrics.register(
                "etcd_request_duration_seconds",
                "etcd requests by storage call (get, put, delete, scan, batch, \
                 apply_in_order, compare_and_swap, fence_check, cache_fence), in seconds; \
                 fence_wait: a request's whole wait at the cache fence (its shared read \
                 and the watch catching up); ack_wait: a tracked write's wait for the \
                 other nodes' read-lease acknowledgements",
                durations,
            );
            metrics.register(
                "etcd_read_cache_entries",
                "entries in the read cache of secrets (stored ciphertext)",
                cache.entries,
            );
            metrics.register(
                "etcd_read_cache_bytes",
                "bytes held by the read cache of secrets (keys, values, overhead)",
                cache.bytes,
            );
            metrics.register(
                "etcd_read_cache_hits",
                "reads answered by the read cache",
                cache.hits,
            );
            metrics.register(
                "etcd_read_cache_misses",
                "reads of fresh requests the read cache could not answer",
                cache.misses,
            );
            metrics.register(
                "etcd_read_cache_evicted",
                "entries pushed out of the read cache by its bounds",
                cache.evicted,
            );
            metrics.register(
                "etcd_read_cache_invalidated",
                "read cache entries removed by a change the etcd watch delivered",
                cache.invalidated,
            );
            metrics.register(
                "etcd_read_cache_refused",
                "read cache inserts refused because the key changed during the read",
                cache.refused,
            );
            metrics.register(
                "etcd_read_lease",
                "1 while this node holds a read lease: its requests use the caches with \
                 no fence read",
                lease.serving,
            );
            metrics.register(
                "etcd_read_lease_nodes",
                "nodes holding a read lease (this one included), as this node's watch shows",
                lease.nodes,
            );
            metrics.register(
                "etcd_read_lease_given_up",
                "read leases this node gave up (watch down or lagging, lease expired)",
                lease.given_up,
            );
        }
        #[cfg(not(feature = "etcd"))]
        let _: Option<()> = etcd_durations;
        let shutdown = ShutdownTrigger::new();
        let mut core = Core::new(
            Arc::new(barrier),
            audit,
            metrics,
            config.limits,
            clock,
            shutdown.signal(),
        );
        core.set_oidc(&config.oidc)
            .map_err(|e| ServerError::OidcCa(e.to_string()))?;
        core.federation.set_config(config.federation.clone());
        core.anomalies.configure(config.anomaly.clone());
        let core = Arc::new(core);
        core.publish_gauges();
        let changes = Changes::new(detach::MAX_DETACHED);
        changes.register(&core.metrics);
        Ok(Self {
            core,
            config,
            shutdown,
            http_listener: None,
            leadership,
            changes,
        })
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The server's shutdown trigger, for tools that run the core without
    /// serving it (the trigger stops what the core started).
    pub fn shutdown_trigger(&self) -> &ShutdownTrigger {
        &self.shutdown
    }

    /// Also serves the HTTPS listener (Vault-compatible API, `src/http/`)
    /// on `listener`, with the gRPC listener's certificate and limits.
    pub fn with_http_listener(mut self, listener: TcpListener) -> Self {
        self.http_listener = Some(listener);
        self
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls and the
    /// background tasks, each for at most `DRAIN_DEADLINE`.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let (router, health) = self.router().await?;
        let mut tasks = self.start_tasks(metrics_listener, health.clone());
        if let Some(listener) = self.http_listener.take() {
            self.start_http(&mut tasks, listener, health)?;
        }
        let (served, lanes) = self.serve_until(router, listener, shutdown).await;
        self.stop(tasks).await;
        // Last: what calls started on a lane ran until the server stopped.
        if let Some(lanes) = lanes {
            lanes.release().await;
        }
        served
    }

    /// The gRPC services, health and reflection (as `grpc.reflection.v1`
    /// and, for the tools that still ask for it, `v1alpha`), over TLS if
    /// configured, within the configured limits.
    async fn router(
        &self,
    ) -> Result<(GrpcRouter, tonic_health::server::HealthReporter), ServerError> {
        let limits: ServerLimits = self.config.server_limits;
        let max = limits.max_request_bytes;
        let (health, health_service) = tonic_health::server::health_reporter();
        publish_health(&health, self.core.is_sealed()).await;
        let health_for_http = health.clone();
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let transport = |e: tonic_reflection::server::Error| ServerError::Transport(e.to_string());
        let reflection_v1 = reflection().build_v1().map_err(transport)?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(transport)?;
        let mut builder = TonicServer::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_max_pending_accept_reset_streams(Some(limits.max_pending_reset_streams()))
            .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .layer(MapResponseLayer::new(
                limits::oversized_is_exhausted as fn(_) -> _,
            ))
            .layer(self.changes.clone());
        let core = &self.core;
        let secrets =
            SecretsService::new(core.clone()).with_watch_limit(limits.max_watch_per_identity);
        let router = builder
            .add_service(health_service.max_decoding_message_size(max))
            .add_service(reflection_v1.max_decoding_message_size(max))
            .add_service(reflection_v1alpha.max_decoding_message_size(max))
            .add_service(
                SysServer::new(
                    SysService::new(core.clone(), health)
                        .with_snapshot_dir(self.config.storage_path.clone())
                        .with_cluster(self.leadership.clone()),
                )
                .max_decoding_message_size(max),
            )
            .add_service(SecretsServer::new(secrets).max_decoding_message_size(max))
            .add_service(
                AuthServer::new(AuthService::new(core.clone())).max_decoding_message_size(max),
            )
            .add_service(
                PoliciesServer::new(PoliciesService::new(core.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                IdentitiesServer::new(IdentitiesService::new(core.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                GovernanceServer::new(GovernanceService::new(core.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                RotationServer::new(RotationService::new(core.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                crate::proto::v1::dynamic_server::DynamicServer::new(
                    crate::api::dynamic::DynamicService::new(core.clone()),
                )
                .max_decoding_message_size(max),
            )
            .add_service(
                crate::proto::v1::leases_server::LeasesServer::new(
                    crate::api::leases::LeasesService::new(core.clone()),
                )
                .max_decoding_message_size(max),
            )
            .add_service(
                PkiServer::new(PkiService::new(core.clone())).max_decoding_message_size(max),
            )
            .add_service(
                crate::proto::v1::lifecycle_server::LifecycleServer::new(
                    crate::api::lifecycle::LifecycleService::new(
                        core.clone(),
                        self.config.governance,
                    ),
                )
                .max_decoding_message_size(max),
            )
            .add_service(
                crate::proto::v1::federation_server::FederationServer::new(
                    crate::api::federation::FederationService::new(core.clone()),
                )
                .max_decoding_message_size(max),
            )
            .add_service(
                crate::proto::v1::scan_server::ScanServer::new(crate::api::scan::ScanService::new(
                    core.clone(),
                ))
                .max_decoding_message_size(max),
            );
        Ok((router, health_for_http))
    }

    /// Starts the HTTPS listener as the task `http-listener`: the gRPC
    /// listener's certificate (plain HTTP only with `--insecure-plaintext`),
    /// its limits, and the gRPC health service told of HTTP seals.
    fn start_http(
        &self,
        tasks: &mut Tasks,
        listener: TcpListener,
        health: tonic_health::server::HealthReporter,
    ) -> Result<(), ServerError> {
        // The gRPC listener's configuration, run-time client trust included
        // (so `auth/cert/login` accepts what the PKI issues, and refuses what
        // it revoked, as `login cert` does), offering HTTP/1.1 beside h2.
        let tls = match &self.config.tls {
            Some(tls) => {
                let mut config = (*tls::server_config(tls, self.core.pki.trust())?).clone();
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                Some(Arc::new(config))
            }
            None => None,
        };
        let hook = move |sealed: bool| {
            let health = health.clone();
            tokio::spawn(async move { publish_health(&health, sealed).await });
        };
        let state = crate::http::HttpState::new(self.core.clone(), self.config.server_limits)
            .with_seal_hook(Arc::new(hook));
        let state = state.with_governance(self.config.governance);
        let router = crate::http::router(state);
        let limits = self.config.server_limits;
        let changes = self.changes.clone();
        tasks.spawn("http-listener", move |shutdown| {
            crate::http::listen::serve(listener, tls, router, limits, changes, shutdown)
        });
        Ok(())
    }

    /// Starts the background tasks, each with the handles it uses: those
    /// of every node here, the leader's through `leader::LeaderWork` (at
    /// once on a single node, else whenever this node leads).
    fn start_tasks(
        &self,
        metrics_listener: Option<TcpListener>,
        health: tonic_health::server::HealthReporter,
    ) -> Tasks {
        let core = &self.core;
        let clock = core.clock().clone();
        let mut tasks = Tasks::new(self.shutdown.signal());
        if let Some(listener) = metrics_listener {
            let metrics = core.metrics.clone();
            tasks.spawn("metrics-listener", move |shutdown| {
                crate::metrics_http::serve(listener, metrics, shutdown)
            });
        }
        // Usage: kept in memory on the request path, written periodically.
        // Every node counts its own requests, so every node writes them.
        let usage = core.usage.clone();
        tasks.spawn("usage-flush", move |shutdown| {
            usage.run_flusher(clock, USAGE_PERSIST_EVERY, shutdown)
        });
        // SIGHUP reopens the audit file (logrotate moved it).
        let audit = core.audit.clone();
        tasks.spawn("audit-reopen", move |shutdown| {
            reopen_audit_on_hangup(audit, shutdown)
        });
        // Lifecycle (issue 13): read times, counted on each node.
        let lifecycle_clock = core.clock().clone();
        let reads = core.reads.clone();
        tasks.spawn("read-set-flush", move |shutdown| {
            reads.run_flusher(lifecycle_clock, USAGE_PERSIST_EVERY, shutdown)
        });
        let governance = self.config.governance;
        crate::lifecycle::attest::AttestGauges::register(
            core.lifecycle.clone(),
            governance,
            &core.metrics,
        );
        // Federation figures: counted in memory, written periodically.
        let figures = core.federation.figures.clone();
        let figures_clock = core.clock().clone();
        tasks.spawn("federation-figures-flush", move |shutdown| {
            figures.run_flusher(figures_clock, USAGE_PERSIST_EVERY, shutdown)
        });
        // Anomaly detection (issue 13): the worker that owns the baselines.
        // It reads this node's own queue of request events, so it runs on
        // every node.
        let anomalies = core.anomalies.clone();
        let anomaly_deps = core.anomaly_deps();
        tasks.spawn("anomaly-detector", move |shutdown| {
            anomalies.run(anomaly_deps, shutdown)
        });
        // On a shared store (etcd): login throttle counts shared with the
        // other nodes, written in bounded batches.
        crate::identity::throttle_metrics::ThrottleRefresh::register(
            core.login.clone(),
            &core.metrics,
            core.clock().clone(),
        );
        if let Some(shared) = core.login.shared() {
            let throttle_clock = core.clock().clone();
            tasks.spawn("login-throttle-flush", move |shutdown| {
                shared.run_flusher(throttle_clock, shutdown)
            });
        }
        // What must run once per vault: on the leader only.
        let work = leader::LeaderWork::new(core, governance);
        let gauge = leader::register_gauge(&core.metrics);
        if self.leadership.is_single_node() {
            gauge.set(1);
            work.spawn_into(&mut tasks, None);
        } else {
            let leadership = self.leadership.clone();
            let core = core.clone();
            tasks.spawn("leader-supervisor", move |shutdown| {
                leader::supervise(leadership, work, gauge, core, health, shutdown)
            });
        }
        tasks
    }

    /// Serves calls until `shutdown` resolves (or the server's own trigger
    /// fires), then lets in-flight calls finish within `DRAIN_DEADLINE`.
    /// Served on lanes, it also returns them, to be released once the
    /// server has stopped.
    async fn serve_until(
        &self,
        router: GrpcRouter,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> (Result<(), ServerError>, Option<lanes::Lanes>) {
        let gate = limits::ConnectionGate::new(self.config.server_limits.max_connections);
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .filter_map(move |accepted| match accepted {
                Ok(stream) => gate.admit(stream).map(Ok),
                Err(e) => Some(Err(e)),
            });
        // TLS is keyward's own (server/tls.rs): the client-certificate trust
        // store changes at run time (PKI).
        let tls = match &self.config.tls {
            Some(tls) => match tls::server_config(tls, self.core.pki.trust()) {
                Ok(config) => Some(config),
                Err(e) => return (Err(e), None),
            },
            None => None,
        };
        if self.config.listen_threads > 0 {
            return self.serve_on_lanes(router, incoming, tls, shutdown).await;
        }
        let signal = self.shutdown.signal();
        let serving = serve_connections(router, incoming, tls, &signal, DRAIN_DEADLINE);
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => {
                return (result.map_err(|e| ServerError::Transport(e.to_string())), None);
            }
            () = shutdown => {}
        }
        tracing::info!("shutting down: draining in-flight calls");
        self.begin_shutdown();
        // It drains within `DRAIN_DEADLINE` of the signal `begin_shutdown` fired.
        let served = serving
            .await
            .map_err(|e| ServerError::Transport(e.to_string()));
        (served, None)
    }

    /// [`Server::serve_until`] with the connections served on
    /// `listen_threads` lanes (`lanes`): this runtime accepts and hands
    /// each admitted connection over; each lane drains its own calls.
    async fn serve_on_lanes(
        &self,
        router: GrpcRouter,
        incoming: impl tokio_stream::Stream<Item = std::io::Result<limits::Admitted>>,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: impl Future<Output = ()>,
    ) -> (Result<(), ServerError>, Option<lanes::Lanes>) {
        if matches!(
            self.config.storage_backend,
            crate::config::StorageBackend::Etcd(_)
        ) {
            tracing::warn!(
                lanes = self.config.listen_threads,
                "listen_threads on etcd: a call waiting for etcd holds up the other calls of its \
                 lane (0, the default on etcd, serves on the shared runtime)"
            );
        }
        let setup = lanes::LaneSetup {
            router,
            tls,
            shutdown: self.shutdown.signal(),
            drain: DRAIN_DEADLINE,
        };
        let mut lanes =
            match lanes::Lanes::start(self.config.listen_threads, &setup, &self.core.metrics) {
                Ok(lanes) => lanes,
                Err(e) => {
                    let e = format!("cannot start a serving thread: {e}");
                    return (Err(ServerError::Transport(e)), None);
                }
            };
        drop(setup);
        {
            // The listener closes as the shutdown begins, before the drain:
            // new clients are refused at once and can go elsewhere.
            let signal = self.shutdown.signal();
            tokio::pin!(incoming);
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    accepted = incoming.next() => match accepted {
                        Some(Ok(conn)) => {
                            if !lanes.hand_off(conn) {
                                // Only a panic ends a lane early: a server
                                // that cannot serve stops, rather than
                                // accept and close every connection.
                                tracing::error!("every lane has stopped: shutting down");
                                break;
                            }
                        }
                        Some(Err(e)) => tracing::debug!(error = %e, "accept failed"),
                        None => break,
                    },
                    () = &mut shutdown => break,
                    () = signal.wait() => break,
                }
            }
        }
        tracing::info!("shutting down: draining in-flight calls");
        self.begin_shutdown();
        // Each lane keeps the drain deadline on its own clock; this bound
        // holds even if a lane's thread is stuck in a call that blocks it.
        let served =
            match tokio::time::timeout(DRAIN_DEADLINE + LANE_DRAIN_SLACK, lanes.drain()).await {
                Ok(result) => result.map_err(ServerError::Transport),
                Err(_) => {
                    tracing::warn!("a lane did not finish draining in time");
                    Ok(())
                }
            };
        (served, Some(lanes))
    }

    /// Tells every task and stream to stop; rotation workers stop at a step
    /// boundary. Idempotent.
    fn begin_shutdown(&self) {
        self.shutdown.trigger();
        self.core.rotation.on_seal();
    }

    /// Stops the background tasks, then writes what is kept in memory.
    async fn stop(&self, tasks: Tasks) {
        self.begin_shutdown();
        // The HTTPS listener drains with the tasks; then the changes whose
        // clients left (`api::detach`) may still run, on their own tasks.
        tasks.drain(DRAIN_DEADLINE).await;
        if !self.changes.settled(DRAIN_DEADLINE).await {
            tracing::warn!(
                running = self.changes.running(),
                "drain deadline passed with changes whose clients left still running"
            );
        }
        // A write those changes handed to the blocking pool
        // (`SecretStore::put_async`) ends before the audit log's last flush.
        if !self.core.secrets.writes_settled(DRAIN_DEADLINE).await {
            tracing::warn!("drain deadline passed with a secret write still running");
        }
        // The calls have drained and the tasks let go of the store.
        self.core.persist_usage().await;
        if let Err(e) = self.core.audit.sync() {
            tracing::error!(error = %e, "could not flush the audit log at shutdown");
        }
    }
}

/// Refuses an existing storage folder that group or others may enter, list
/// or write (a missing one is made with mode 0700 by `SledBackend::open`).
/// Its mode is never changed: keyward does not lock down what it did not
/// create.
fn check_storage_folder(path: &std::path::Path) -> Result<(), ServerError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ServerError::Storage(format!("{}: {e}", path.display()))),
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(ServerError::StorageFolderOpen(path.to_owned(), mode));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Refuses a TLS private key file that other users can read: it must be
/// its owner's alone, or (as PostgreSQL allows) owned by root and readable
/// by one group besides. Its mode is never changed.
fn check_key_file(path: &std::path::Path) -> Result<(), ServerError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| ServerError::TlsFile(path.to_owned(), e))?;
        let mode = meta.mode() & 0o7777;
        let owner_only = mode & 0o077 == 0;
        let root_and_group = meta.uid() == 0 && mode & 0o037 == 0;
        if !(owner_only || root_and_group) {
            return Err(ServerError::KeyFileOpen(path.to_owned(), mode));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Creates `dir` and its missing parents with mode 0700 (an existing folder
/// is left as it is: keyward does not change what it did not create).
fn create_private_dirs(dir: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}
