//! `keyward.v1.Sys`: init, unseal, seal, status, key rotation, audit hash.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{begin, Access, Failure};
use crate::core::Core;
use crate::policy::Capability;
use crate::proto::v1::sys_server::Sys;
use crate::proto::v1::*;

const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct SysService {
    core: Arc<Core>,
    health: tonic_health::server::HealthReporter,
    /// Where a snapshot's content is staged (an unlinked file) while it is
    /// streamed: the storage folder, so a snapshot never lands in a tmpfs.
    snapshot_dir: std::path::PathBuf,
    /// The node's leadership, for the cluster fields of `Status`.
    cluster: Option<Arc<dyn crate::storage::cluster::Leadership>>,
    /// The last probe of the etcd endpoints and when it was made.
    endpoints: Arc<tokio::sync::Mutex<Option<EndpointProbe>>>,
}

impl SysService {
    pub fn new(core: Arc<Core>, health: tonic_health::server::HealthReporter) -> Self {
        Self {
            core,
            health,
            snapshot_dir: std::env::temp_dir(),
            cluster: None,
            endpoints: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Reports this node's id, the leader and the store's endpoints in `Status`.
    pub fn with_cluster(mut self, cluster: Arc<dyn crate::storage::cluster::Leadership>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Fills the cluster fields of `status`. The endpoints are probed at
    /// most once per `ENDPOINT_PROBE_EVERY` whatever the number of callers
    /// (`Status` needs no token), and concurrent callers share one probe.
    async fn cluster_status(&self, status: &mut StatusResponse) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let view = cluster.watch().borrow().clone();
        status.node_id = cluster.node_id().to_owned();
        status.leader = view.leader.unwrap_or_default();
        status.is_leader = view.is_leader;
        if cluster.is_single_node() {
            return;
        }
        let mut probe = self.endpoints.lock().await;
        let fresh = probe
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < ENDPOINT_PROBE_EVERY);
        if !fresh {
            let asked = cluster.clone();
            let found = tokio::task::spawn_blocking(move || asked.endpoints())
                .await
                .unwrap_or_default();
            let found = found
                .into_iter()
                .map(|e| EtcdEndpoint {
                    endpoint: e.endpoint,
                    healthy: e.healthy,
                    detail: e.detail,
                })
                .collect();
            *probe = Some((std::time::Instant::now(), found));
        }
        if let Some((_, endpoints)) = probe.as_ref() {
            status.etcd_endpoints = endpoints.clone();
        }
    }

    /// Stages snapshots in `dir` (the server passes its storage folder).
    pub fn with_snapshot_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.snapshot_dir = dir;
        self
    }
}

/// The last probe of the etcd endpoints, and when it was made.
type EndpointProbe = (std::time::Instant, Vec<EtcdEndpoint>);

/// How often `Status` may probe the etcd endpoints.
const ENDPOINT_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How much of a snapshot file one streamed chunk carries.
const SNAPSHOT_CHUNK: usize = 256 * 1024;

fn snapshot_failure(e: crate::snapshot::SnapshotError) -> Failure {
    match e {
        crate::snapshot::SnapshotError::Barrier(b) => b.into(),
        crate::snapshot::SnapshotError::Storage(crate::storage::StorageError::Busy(message)) => {
            Failure::new(crate::core::call::FailureKind::Conflict, message)
        }
        other => Failure::internal(other),
    }
}

/// Tells the health service whether the vault can serve.
pub async fn publish_health(health: &tonic_health::server::HealthReporter, sealed: bool) {
    use tonic_health::ServingStatus;
    let status = if sealed {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    };
    for name in ["", "keyward.v1.Secrets", "keyward.v1.Sys"] {
        health.set_service_status(name, status).await;
    }
}

fn status_message(core: &Core) -> StatusResponse {
    let s = core.status();
    StatusResponse {
        sealed: s.sealed,
        initialized: s.initialized,
        version: VERSION.to_owned(),
        progress: s.progress,
        threshold: s.threshold,
        shares: s.shares,
        key_term: s.key_term,
        audit_head: core.audit.head(),
        ..StatusResponse::default()
    }
}

/// Tells the health service the node cannot serve: it lost its store.
pub async fn publish_not_serving(health: &tonic_health::server::HealthReporter) {
    for name in ["", "keyward.v1.Secrets", "keyward.v1.Sys"] {
        health
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

#[tonic::async_trait]
impl Sys for SysService {
    type SnapshotSaveStream = tokio_stream::wrappers::ReceiverStream<Result<SnapshotChunk, Status>>;

    /// Takes the snapshot (the server goes on serving: see
    /// `storage::SledBackend::export`), records the call, then streams the
    /// file: the first chunk carries the magic line, the header and the size.
    async fn snapshot_save(
        &self,
        req: Request<SnapshotSaveRequest>,
    ) -> Result<Response<Self::SnapshotSaveStream>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Sys/SnapshotSave",
            Access::Token,
            &req,
        )
        .await?;
        call.authorize(Capability::Admin, "sys/snapshot".into())?;
        let barrier = self.core.barrier.clone();
        let dir = self.snapshot_dir.clone();
        let now = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(
            i64::try_from(self.core.clock().now_ms()).unwrap_or(0),
        )
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let taken = tokio::task::spawn_blocking(move || crate::snapshot::take(&barrier, &dir, now))
            .await
            .map_err(Failure::internal)
            .and_then(|taken| taken.map_err(snapshot_failure));
        let taken = call.check(taken)?;
        tracing::info!(keys = taken.header.keys, sha256 = %taken.header.sha256, "snapshot taken");
        call.ok(&[])?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut first = SnapshotChunk {
                data: taken.head(),
                total_bytes: taken.file_bytes(),
                keys: taken.header.keys,
                sha256: taken.header.sha256.clone(),
            };
            let mut content = match taken.content() {
                Ok(content) => content,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("snapshot: {e}"))));
                    return;
                }
            };
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            loop {
                let n = match content.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(format!("snapshot: {e}"))));
                        return;
                    }
                };
                if n == 0 {
                    break;
                }
                first.data.extend_from_slice(&buf[..n]);
                let chunk = std::mem::take(&mut first);
                // The caller went away: stop reading.
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return;
                }
            }
            if !first.data.is_empty() {
                let _ = tx.blocking_send(Ok(first));
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn init(&self, req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Sys/Init", Access::Open, &req).await?;
        call.set_resource("sys/init");
        let r = req.into_inner();
        let shares = call.check(
            u8::try_from(r.shares)
                .map_err(|_| Failure::invalid("shares must be between 1 and 255")),
        )?;
        let threshold = call.check(
            u8::try_from(r.threshold)
                .map_err(|_| Failure::invalid("threshold must be between 1 and shares")),
        )?;
        if !self.core.status().initialized {
            // A change: recorded before it acts. An init of an initialized
            // vault changes nothing and stays one (aggregatable) record.
            call.record_request()?;
        }
        let out = call.check(self.core.init(shares, threshold).await)?;
        call.ok(&[])?;
        Ok(Response::new(InitResponse {
            shares: out.shares.iter().map(|s| s.0.as_str().to_owned()).collect(),
            root_token: out.root_token.expose().to_owned(),
        }))
    }

    async fn unseal(
        &self,
        req: Request<UnsealRequest>,
    ) -> Result<Response<UnsealResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Sys/Unseal", Access::Open, &req).await?;
        call.set_resource("sys/unseal");
        let r = req.into_inner();
        // A share or a reset changes the unseal progress: recorded before it
        // acts, decided under the seal lock (a seal cannot come between).
        // On an unsealed vault unseal changes nothing and stays one
        // (aggregatable) record.
        let share = (!r.reset).then_some(r.share.as_str());
        let unsealed = self
            .core
            .unseal_if_sealed(share, || call.record_request())
            .await?;
        let status = call.check(unsealed)?;
        publish_health(&self.health, status.sealed).await;
        call.ok(&[])?;
        Ok(Response::new(UnsealResponse {
            sealed: status.sealed,
            progress: status.progress,
            threshold: status.threshold,
        }))
    }

    async fn seal(&self, req: Request<SealRequest>) -> Result<Response<SealResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Sys/Seal", Access::Token, &req).await?;
        call.authorize(Capability::Admin, "sys/seal".into())?;
        // Sealing is the safe direction: a caller allowed to seal seals even
        // when the audit log cannot be written (the failure goes to the
        // server log). The request record goes first, while the audit key
        // still gives the caller's HMACs.
        call.record_request_or_log();
        self.core.seal().await;
        publish_health(&self.health, true).await;
        if let Err(e) = call.ok(&[]) {
            tracing::error!(error = %e.message(), "sealed; its audit outcome record was not written");
        }
        Ok(Response::new(SealResponse {}))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Sys/Status", Access::Open, &req).await?;
        call.set_resource("sys/status");
        let mut status = status_message(&self.core);
        self.cluster_status(&mut status).await;
        call.ok(&[])?;
        Ok(Response::new(status))
    }

    async fn rotate_key(
        &self,
        req: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Sys/RotateKey", Access::Token, &req).await?;
        call.authorize(Capability::Admin, "sys/keyring".into())?;
        let term = call.check(self.core.rotate_key().await)?;
        call.ok(&[])?;
        Ok(Response::new(RotateKeyResponse { term }))
    }

    async fn audit_hash(
        &self,
        req: Request<AuditHashRequest>,
    ) -> Result<Response<AuditHashResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Sys/AuditHash", Access::Token, &req).await?;
        call.authorize(Capability::Read, "sys/audit-hash".into())?;
        let r = req.into_inner();
        let hash = call.check(self.core.audit.hmac(r.value.as_bytes()))?;
        call.ok(&[("value", r.value.as_bytes())])?;
        Ok(Response::new(AuditHashResponse { hash }))
    }
}
