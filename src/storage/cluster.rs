//! Leadership among the keyward nodes of one store, and the fence that
//! binds a leader's background writes to its term.
//!
//! Background work that must happen once per vault (rotation, sweepers,
//! expiry, recertification, CRL and OIDC key rotation, decommission runs,
//! anomaly detection) runs on the leader only. The server asks a
//! [`Leadership`] whether this node leads and starts or stops that work
//! when the answer changes; it never learns how the answer is made.
//!
//! - On sled (one node) [`AlwaysLeader`] answers yes, for good.
//! - On etcd (`etcd_leader`) a node leads while it holds a key under the
//!   prefix, created only if absent and attached to an etcd lease that it
//!   keeps alive.
//!
//! # The fence
//!
//! A leader can be deposed without knowing it: paused (SIGSTOP, a long GC
//! in a VM, a frozen container) past its lease while another node became
//! leader. When it runs again its workers may try to finish a step. So the
//! server runs the leader's tasks inside [`fenced`], which puts a [`Fence`]
//! (the leader key and the revision at which this node created it) in a
//! task-local. The etcd backend adds to every write made under it a
//! comparison on that key's create revision, in the same transaction: once
//! the key is gone (lease expired) or belongs to another node, the write is
//! refused ([`FENCED`]) and nothing of it is applied. [`check_fence`] asks the
//! same question without writing: a rotation step calls it before it acts
//! on a target.
//!
//! The fence follows a task into tasks it spawns only where the spawner
//! carries it ([`carry`], or [`blocking`] for a `spawn_blocking` body); a
//! write made from a thread it was not carried to is not fenced (see the
//! README's list of what a deposed leader can still do).

use std::future::Future;
use std::sync::Arc;

use super::StorageError;

/// The marker in the error of a write refused by the fence.
pub const FENCED: &str = "fenced: this node is no longer the cluster leader";

/// One leader term: the leader key (the raw etcd key) and its create
/// revision, which no later term can share.
#[derive(Clone)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
    /// Asks the store whether the term still holds (no write).
    check: Arc<dyn Fn() -> Result<(), StorageError> + Send + Sync>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl Fence {
    pub fn new(
        key: Vec<u8>,
        revision: i64,
        check: Arc<dyn Fn() -> Result<(), StorageError> + Send + Sync>,
    ) -> Self {
        Self {
            key,
            revision,
            check,
        }
    }

    /// Whether the term still holds, asked of the store.
    pub fn check(&self) -> Result<(), StorageError> {
        (self.check)()
    }
}

tokio::task_local! {
    static FENCE: Option<Fence>;
}

thread_local! {
    /// The fence of a blocking closure run by [`blocking`].
    static BLOCKING: std::cell::RefCell<Option<Fence>> = const { std::cell::RefCell::new(None) };
}

/// The fence of the task (or [`blocking`] closure) this runs in, if any.
pub fn current() -> Option<Fence> {
    FENCE
        .try_with(Clone::clone)
        .ok()
        .flatten()
        .or_else(|| BLOCKING.with(|b| b.borrow().clone()))
}

/// Runs `work` on this (blocking) thread under `fence`: for the body of a
/// `spawn_blocking` that a fenced task starts.
pub fn blocking<T>(fence: Option<Fence>, work: impl FnOnce() -> T) -> T {
    struct Restore(Option<Fence>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let old = self.0.take();
            BLOCKING.with(|b| *b.borrow_mut() = old);
        }
    }
    let old = BLOCKING.with(|b| b.replace(fence));
    let _restore = Restore(old);
    work()
}

/// Runs `work` under `fence` (no fence for `None`).
pub async fn fenced<F: Future>(fence: Option<Fence>, work: F) -> F::Output {
    FENCE.scope(fence, work).await
}

/// Wraps `work` so that it runs under the fence of the caller's task: for
/// tasks a fenced task spawns.
pub fn carry<F: Future>(work: F) -> impl Future<Output = F::Output> {
    FENCE.scope(current(), work)
}

/// Asks the store whether this task's leader term still holds; `Ok` when
/// the task runs under no fence (a single node, or request-path work).
pub fn check_fence() -> Result<(), StorageError> {
    match current() {
        Some(fence) => fence.check(),
        None => Ok(()),
    }
}

/// Whether `error` is a refusal by the fence.
pub fn is_fenced(error: &StorageError) -> bool {
    matches!(error, StorageError::Io(message) if message.contains(FENCED))
}

/// What a node knows of the leadership at one moment.
#[derive(Clone, Debug, Default)]
pub struct LeaderView {
    /// This node holds the leadership (and `fence` is its term).
    pub is_leader: bool,
    /// The leader's node id, when known.
    pub leader: Option<String>,
    /// The store answered the last question about the leadership. A node
    /// that cannot reach its store is never leader.
    pub reachable: bool,
    /// The term this node holds; `None` when it is not leader, and on a
    /// single node (nothing to fence against).
    pub fence: Option<Fence>,
}

/// One etcd member's health, as `keyward status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointHealth {
    pub endpoint: String,
    pub healthy: bool,
    /// The member's answer (version, leader flag) or why it did not answer.
    pub detail: String,
}

/// The leadership of this node, as the server sees it.
pub trait Leadership: Send + Sync + 'static {
    /// This node's id (`cluster.node_id`).
    fn node_id(&self) -> &str;
    /// The current view; changes are sent on it.
    fn watch(&self) -> tokio::sync::watch::Receiver<LeaderView>;
    /// Whether this node is the only one (sled): its leadership never
    /// changes and needs no fence.
    fn is_single_node(&self) -> bool {
        false
    }
    /// Each store endpoint's health (blocking: asks every member, each
    /// within a short bound).
    fn endpoints(&self) -> Vec<EndpointHealth> {
        Vec::new()
    }
    /// Gives the leadership up at shutdown, so another node takes over at
    /// once instead of after the lease (best effort).
    fn resign(&self) {}
}

/// The leadership of a single node (sled): always the leader.
pub struct AlwaysLeader {
    node_id: String,
    view: tokio::sync::watch::Sender<LeaderView>,
}

impl AlwaysLeader {
    pub fn new(node_id: impl Into<String>) -> Self {
        let node_id = node_id.into();
        let (view, _) = tokio::sync::watch::channel(LeaderView {
            is_leader: true,
            leader: Some(node_id.clone()),
            reachable: true,
            fence: None,
        });
        Self { node_id, view }
    }
}

impl Leadership for AlwaysLeader {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<LeaderView> {
        self.view.subscribe()
    }

    fn is_single_node(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fence(revision: i64, ok: bool) -> Fence {
        Fence::new(
            b"kw/l/leader".to_vec(),
            revision,
            Arc::new(move || {
                if ok {
                    Ok(())
                } else {
                    Err(StorageError::Io(format!("check: {FENCED}")))
                }
            }),
        )
    }

    #[tokio::test]
    async fn the_fence_is_seen_inside_its_scope_and_carried_into_spawned_tasks() {
        assert!(current().is_none());
        assert!(check_fence().is_ok());
        fenced(Some(fence(7, false)), async {
            assert_eq!(current().unwrap().revision, 7);
            let refused = check_fence().unwrap_err();
            assert!(is_fenced(&refused), "{refused}");
            let carried = tokio::spawn(carry(async { current().map(|f| f.revision) }));
            assert_eq!(carried.await.unwrap(), Some(7));
            let plain = tokio::spawn(async { current().map(|f| f.revision) });
            assert_eq!(
                plain.await.unwrap(),
                None,
                "a plain spawn does not carry it"
            );
            let fence = current();
            let on_thread = tokio::task::spawn_blocking(move || {
                blocking(fence, || current().map(|f| f.revision))
            });
            assert_eq!(on_thread.await.unwrap(), Some(7));
            let after = tokio::task::spawn_blocking(|| current().map(|f| f.revision));
            assert_eq!(after.await.unwrap(), None, "the thread is left without it");
        })
        .await;
        assert!(current().is_none());
    }

    #[tokio::test]
    async fn a_single_node_always_leads_without_a_fence() {
        let one = AlwaysLeader::new("kw1");
        let view = one.watch().borrow().clone();
        assert!(view.is_leader && view.reachable && view.fence.is_none());
        assert_eq!(view.leader.as_deref(), Some("kw1"));
        assert!(one.is_single_node());
    }
}
