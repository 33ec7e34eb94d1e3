//! `keyward.v1.Secrets`: versioned key/value secrets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use super::{begin, Access, Failure, FailureKind};
use crate::config::ServerLimits;
use crate::core::auth::Caller;
use crate::core::offload::Work;
use crate::core::Core;
use crate::policy::Capability;
use crate::proto::v1::secrets_server::Secrets;
use crate::proto::v1::*;
use crate::secrecy::{SecretBytes, SecretData};
use crate::secrets::{ListPrefix, PutRequest, SecretPath, Selector, Stage, WatchFilter, Watched};

/// The most paths and prefixes one `Watch` may name.
pub const MAX_WATCHED: usize = 256;

pub struct SecretsService {
    core: Arc<Core>,
    watches: Arc<OpenWatches>,
}

impl SecretsService {
    /// The service, with the default Watch limit per identity.
    pub fn new(core: Arc<Core>) -> Self {
        Self {
            core,
            watches: Arc::new(OpenWatches::new(
                ServerLimits::default().max_watch_per_identity,
            )),
        }
    }

    /// At most `limit` open `Watch` streams per identity
    /// (`limits.max_watch_per_identity`).
    pub fn with_watch_limit(mut self, limit: usize) -> Self {
        self.watches = Arc::new(OpenWatches::new(limit));
        self
    }
}

/// The open `Watch` streams of each identity. Counted per identity, not per
/// token: a caller could otherwise mint child tokens (which keep its
/// identity) to open as many as it likes.
struct OpenWatches {
    limit: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open watch; its count goes back when the stream ends.
struct WatchSlot {
    watches: Arc<OpenWatches>,
    identity: String,
}

impl OpenWatches {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more watch of `identity`, or `None` at the limit.
    fn take(self: &Arc<Self>, identity: &str) -> Option<WatchSlot> {
        // Nothing panics under this lock; a poisoned one still counts right.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(identity.to_owned()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(WatchSlot {
            watches: self.clone(),
            identity: identity.to_owned(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.identity) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

/// The identity of the root token and of every token it issues (never an
/// inventory name: `IdentityName` refuses it, and no name has a space).
pub(super) const ROOT_LINEAGE: &str = "root";

/// Whether a listed path may be shown to `caller`: only if it could list or
/// read that path on its own. A list answers secret paths only (never
/// folders), so nothing is said about a path the caller is denied. A check,
/// not an authorization: no usage is recorded for the paths it lets through.
pub(crate) fn visible_to(caller: &Caller, path: &str) -> bool {
    let resource = format!("secret/{path}");
    caller.set.check(&resource, Capability::List).is_some()
        || caller.set.check(&resource, Capability::Read).is_some()
}

pub(crate) fn timestamp(ms: u64) -> Option<prost_types::Timestamp> {
    (ms != 0).then(|| prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

/// How often a `Watch` checks its token again between events.
pub const WATCH_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// How a `Watch` ends when its token no longer holds.
fn watch_ended(e: crate::core::AuthError) -> Status {
    use crate::core::AuthError;
    let failure = match e {
        AuthError::Barrier(_) | AuthError::Corrupt => Failure::new(
            FailureKind::Unavailable,
            "the token cannot be checked again; watch again",
        ),
        _ => Failure::new(
            FailureKind::Unauthenticated,
            "the token was revoked or has expired; the watch ended",
        ),
    };
    failure.into()
}

#[tonic::async_trait]
impl Secrets for SecretsService {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<WatchEvent, Status>>;

    /// New `current` versions of the named paths and of the paths under the
    /// named prefixes. Each event is checked again against the caller's
    /// policies as they stand then (`read` on that path), so a prefix never
    /// leaks a path the caller may not read. The token is checked again on
    /// each event and every [`WATCH_RECHECK`]: once it is revoked or expired
    /// the stream ends with UNAUTHENTICATED. Ends at shutdown, or with
    /// ABORTED if the watcher fell behind. An identity may hold at most
    /// `limits.max_watch_per_identity` open watches, over all its tokens:
    /// one more is RESOURCE_EXHAUSTED.
    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Secrets/Watch", Access::Token, &req).await?;
        let r = req.into_inner();
        if r.paths.is_empty() && r.prefixes.is_empty() {
            let refused = Failure::invalid("name at least one path or prefix to watch");
            return Err(call.fail(refused).into());
        }
        if r.paths.len() + r.prefixes.len() > MAX_WATCHED {
            let refused = Failure::invalid(format!(
                "at most {MAX_WATCHED} paths and prefixes per watch"
            ));
            return Err(call.fail(refused).into());
        }
        let mut filter = WatchFilter::default();
        for p in &r.paths {
            let path = call.check(SecretPath::parse(p))?;
            call.authorize(Capability::Read, path.resource())?;
            filter.add_path(&path);
        }
        for p in &r.prefixes {
            let prefix = call.check(ListPrefix::parse(p))?;
            call.authorize(Capability::Read, prefix.resource())?;
            filter.add_prefix(&prefix);
        }
        let mut caller = call.require_caller()?;
        // Every token the root token issues is `root`: counting them as one
        // identity would let one low-privileged token handed out by an
        // operator use up the budget of all the others (and of root). That
        // lineage is counted per token root issued, children included.
        let budget = if caller.identity == ROOT_LINEAGE {
            let head = self.core.tokens.lineage_head(&caller.accessor);
            format!("{ROOT_LINEAGE} {}", call.check(head)?)
        } else {
            caller.identity.clone()
        };
        let Some(slot) = self.watches.take(&budget) else {
            let refused = Failure::new(
                FailureKind::Exhausted,
                format!(
                    "this identity has {} watches open, the most allowed \
                     (limits.max_watch_per_identity); end one first",
                    self.watches.limit
                ),
            );
            return Err(call.fail(refused).into());
        };
        // Subscribe before answering, so nothing after the answer is missed.
        let mut watch = self.core.secrets.watch(filter, self.core.shutdown_signal());
        call.ok(&[])?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let core = self.core.clone();
        let stop = core.shutdown_signal();
        tokio::spawn(async move {
            // Held while the stream lasts.
            let _slot = slot;
            let mut tick = tokio::time::interval(WATCH_RECHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let change = tokio::select! {
                    _ = tick.tick() => None,
                    watched = watch.next() => Some(watched),
                    _ = tx.closed() => break,
                };
                let change = match change {
                    None => None,
                    Some(Watched::Changed(change)) => Some(change),
                    Some(Watched::FellBehind) => {
                        let behind = Failure::new(
                            FailureKind::Aborted,
                            "the watcher fell behind; read the secrets again and watch again",
                        );
                        let _ = tx.send(Err(behind.into())).await;
                        break;
                    }
                    Some(Watched::Ended) => break,
                };
                // The token as it stands now: revoked, expired or narrowed
                // since the watch began (on each event and every tick).
                match core.gate.refresh(&caller) {
                    Ok(fresh) => caller = fresh,
                    Err(e) => {
                        let _ = tx.send(Err(watch_ended(e))).await;
                        break;
                    }
                }
                let Some(change) = change else { continue };
                let allowed = core
                    .gate
                    .authorize(&caller, Capability::Read, &change.path.resource())
                    .is_ok();
                if !allowed {
                    continue;
                }
                let event = WatchEvent {
                    path: change.path.to_string(),
                    version: change.version,
                    created_at: timestamp(change.at_ms),
                };
                // A client that stops reading must not hold the task past
                // shutdown.
                let sent = tokio::select! {
                    sent = tx.send(Ok(event)) => sent.is_ok(),
                    _ = stop.wait() => false,
                };
                if !sent {
                    break;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn put(
        &self,
        req: Request<PutSecretRequest>,
    ) -> Result<Response<PutSecretResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Secrets/Put", Access::Token, &req).await?;
        let mut r = req.into_inner();
        let path = call.check(SecretPath::parse(&r.path))?;
        let proof = call.authorize(Capability::Write, path.resource())?;
        let data: SecretData = std::mem::take(&mut r.data)
            .into_iter()
            .map(|(k, v)| (k, SecretBytes::new(v)))
            .collect();
        let put = PutRequest {
            path: path.clone(),
            data,
            cas: r.cas,
            max_versions: r.max_versions,
            owner: r.owner,
            stage: Stage::Current,
        };
        let values: Vec<(String, SecretBytes)> = put
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let fresh = call.caller().is_some_and(|c| c.fresh);
        let version = call.check(
            self.core
                .secrets
                .put_async(proof, put, self.core.clock().now_ms(), fresh)
                .await,
        )?;
        call.check(self.core.secrets.durable().await)?;
        let refs: Vec<(&str, &[u8])> = values
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        call.ok_async(&refs).await?;
        Ok(Response::new(PutSecretResponse {
            path: path.to_string(),
            version,
        }))
    }

    async fn get(
        &self,
        req: Request<GetSecretRequest>,
    ) -> Result<Response<GetSecretResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Secrets/Get", Access::Token, &req).await?;
        let r = req.into_inner();
        let path = call.check(SecretPath::parse(&r.path))?;
        let selector = match (r.version, r.stage.as_deref()) {
            (Some(v), _) if v != 0 => Selector::Version(v),
            (_, stage) => Selector::Stage(call.check(Stage::parse(stage.unwrap_or("")))?),
        };
        call.authorize(Capability::Read, path.resource())?;
        let fresh = call.caller().is_some_and(|c| c.fresh);
        let found = call.check(self.core.secrets.get_fenced(&path, selector, fresh))?;
        call.note_read(path.as_str()).await?;
        let refs: Vec<(&str, &[u8])> = found
            .data
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        call.ok_async(&refs).await?;
        drop(refs);
        Ok(Response::new(GetSecretResponse {
            path: path.into_string(),
            version: found.version,
            stage: found
                .stage
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            // The names move; each value is copied once into the answer and
            // its `SecretBytes` zeroized here.
            data: found
                .data
                .into_iter()
                .map(|(k, v)| (k, v.expose().to_vec()))
                .collect(),
            created_at: timestamp(found.created_at_ms),
        }))
    }

    /// The secret paths under a prefix (the caller needs `list` on the
    /// prefix) that the caller could list or read one by one: a path under
    /// a denied part of the prefix is left out.
    async fn list(
        &self,
        req: Request<ListSecretsRequest>,
    ) -> Result<Response<ListSecretsResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Secrets/List", Access::Token, &req).await?;
        let prefix = call.check(ListPrefix::parse(&req.get_ref().prefix))?;
        call.authorize(Capability::List, prefix.resource())?;
        call.require_caller()?;
        // It reads every path under the prefix: off the connection's thread,
        // filtered by the caller's policies as they stand once its turn came.
        let paths = call
            .off_thread_as(Work::Listing, move |core, caller| {
                core.secrets.list(&prefix, |path| {
                    caller.is_some_and(|caller| visible_to(caller, path))
                })
            })
            .await?;
        call.ok(&[])?;
        Ok(Response::new(ListSecretsResponse { paths }))
    }

    async fn metadata(
        &self,
        req: Request<SecretMetadataRequest>,
    ) -> Result<Response<SecretMetadata>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Secrets/Metadata",
            Access::Token,
            &req,
        )
        .await?;
        let path = call.check(SecretPath::parse(&req.get_ref().path))?;
        call.authorize(Capability::Read, path.resource())?;
        let meta = call.check(self.core.secrets.metadata(&path))?;
        call.ok(&[])?;
        Ok(Response::new(SecretMetadata {
            path: path.to_string(),
            current_version: meta.current,
            newest_version: meta.newest,
            max_versions: meta.max_versions,
            owner: meta.owner.clone(),
            created_at: timestamp(meta.created_at_ms),
            updated_at: timestamp(meta.updated_at_ms),
            versions: meta
                .versions
                .iter()
                .map(|v| crate::proto::v1::SecretVersion {
                    version: v.version,
                    created_at: timestamp(v.created_at_ms),
                    deleted_at: timestamp(v.deleted_at_ms),
                    destroyed: v.destroyed,
                    stage: meta
                        .stage_of(v.version)
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn delete(
        &self,
        req: Request<DeleteSecretRequest>,
    ) -> Result<Response<DeleteSecretResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Secrets/Delete", Access::Token, &req).await?;
        let path = call.check(SecretPath::parse(&req.get_ref().path))?;
        let proof = call.authorize(Capability::Delete, path.resource())?;
        call.check(self.core.secrets.delete(
            &proof,
            &path,
            req.get_ref().version,
            self.core.clock().now_ms(),
        ))?;
        call.check(self.core.secrets.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(DeleteSecretResponse {}))
    }

    async fn undelete(
        &self,
        req: Request<UndeleteSecretRequest>,
    ) -> Result<Response<UndeleteSecretResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Secrets/Undelete",
            Access::Token,
            &req,
        )
        .await?;
        let path = call.check(SecretPath::parse(&req.get_ref().path))?;
        let proof = call.authorize(Capability::Write, path.resource())?;
        call.check(self.core.secrets.undelete(
            &proof,
            &path,
            req.get_ref().version,
            self.core.clock().now_ms(),
        ))?;
        call.check(self.core.secrets.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(UndeleteSecretResponse {}))
    }

    async fn destroy(
        &self,
        req: Request<DestroySecretRequest>,
    ) -> Result<Response<DestroySecretResponse>, Status> {
        let mut call = begin(
            &self.core,
            "keyward.v1.Secrets/Destroy",
            Access::Token,
            &req,
        )
        .await?;
        let path = call.check(SecretPath::parse(&req.get_ref().path))?;
        let proof = call.authorize(Capability::Destroy, path.resource())?;
        call.check(self.core.secrets.destroy(
            &proof,
            &path,
            req.get_ref().version,
            self.core.clock().now_ms(),
        ))?;
        call.check(self.core.secrets.durable().await)?;
        call.ok(&[])?;
        Ok(Response::new(DestroySecretResponse {}))
    }
}
