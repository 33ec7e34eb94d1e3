//! Leader election on etcd: a lease and a key created only if absent.
//!
//! Every node runs one loop on the backend's own runtime:
//!
//! - **follower**: it reads `PREFIX l/leader` every [`POLL`]. While the key
//!   exists its value names the leader. Once it is gone the node grants a
//!   lease of [`LEASE_TTL`] and, in one transaction, creates the key with
//!   its node id on that lease if the key is still absent. One node wins;
//!   the others read the winner's id.
//! - **leader**: it keeps the lease alive every [`KEEP_ALIVE_EVERY`], and
//!   after each renewal reads the key (a linearizable read). It steps down
//!   when etcd answers that the lease is gone (TTL 0), when the key no
//!   longer holds its term, or when no keep-alive was answered for
//!   so long that the lease may have expired in etcd ([`LEASE_TTL`] from the
//!   last answered keep-alive, less [`MARGIN`]). That last bound is kept
//!   on time: a keep-alive that hangs is given up when it comes, so a
//!   leader that cannot renew steps down then, whatever its requests do. It
//!   then revokes the lease (best effort) and becomes a follower.
//!
//! The term is the key's create revision: a new key (another term) always
//! has a larger one, so a [`Fence`] on it cannot be satisfied by a later
//! leader's key. At shutdown the leader revokes its lease, which deletes
//! the key: another node takes over within [`POLL`].
//!
//! When the leader is killed, its key lives until the lease expires in etcd
//! (at most [`LEASE_TTL`] after its last keep-alive), and a follower sees it
//! gone within [`POLL`]: a new leader within `LEASE_TTL + POLL` plus one
//! transaction (about 3.5 s on loopback), the bound the README states.
//!
//! The view is `reachable: false` once a request of the loop has gone
//! unanswered (failed, or still out) for [`RIDE_OUT`] with no answer since:
//! the server then reports NOT_SERVING. It is the storage calls' own bound
//! (`etcd_backend`), so a blip they ride out does not flip health, and a
//! small watcher task checks it every [`REACH_CHECK`], so a leader and a
//! follower say it within the same bound whatever request each is waiting
//! on.
//!
//! The loop also runs the sampler that compacts etcd's history while this
//! node leads (`etcd_compact`, unless `storage.etcd.compact_every` is off).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use tokio::time::Instant;

use super::cluster::{EndpointHealth, Fence, LeaderView, Leadership};
use super::etcd_backend::{connect_options, RIDE_OUT};
use super::etcd_compact::Compactor;
use super::{EtcdBackend, EtcdOptions, StorageError};

/// The lease of a leader term.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often a leader renews its lease.
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(1);
/// How often a follower looks at the leader key.
pub const POLL: Duration = Duration::from_millis(500);
/// How long before the lease's end (as this node counts it) a leader that
/// cannot renew steps down.
pub const MARGIN: Duration = Duration::from_millis(750);
/// The bound on each request of the loop.
const REQUEST_BOUND: Duration = Duration::from_secs(2);
/// How often the watcher compares the unanswered time with [`RIDE_OUT`].
const REACH_CHECK: Duration = Duration::from_millis(100);
/// The bound on one endpoint's health question.
const HEALTH_BOUND: Duration = Duration::from_secs(2);

/// The leadership of one node on etcd. Dropping it stops its loop.
pub struct EtcdLeadership {
    node_id: String,
    view: watch::Receiver<LeaderView>,
    backend: Arc<EtcdBackend>,
    options: EtcdOptions,
    /// Set at shutdown: the loop revokes its lease and ends.
    stop: Arc<tokio::sync::Notify>,
    stopped: watch::Receiver<bool>,
}

impl EtcdLeadership {
    /// Starts the election loop for `node_id` on `backend`'s runtime.
    pub fn start(
        backend: Arc<EtcdBackend>,
        options: &EtcdOptions,
        node_id: &str,
    ) -> Result<Self, StorageError> {
        let (client, runtime) = backend
            .client_and_runtime()
            .ok_or_else(|| StorageError::Io("etcd: the backend is closed".into()))?;
        let (tx, view) = watch::channel(LeaderView::default());
        let stop = Arc::new(tokio::sync::Notify::new());
        let (stopped_tx, stopped) = watch::channel(false);
        let key = backend.leader_key();
        let checker = backend.clone();
        let check_key = key.clone();
        let term_check =
            move |revision: i64| -> Arc<dyn Fn() -> Result<(), StorageError> + Send + Sync> {
                let backend = checker.clone();
                let key = check_key.clone();
                Arc::new(move || backend.check_term(key.clone(), revision))
            };
        // etcd's history is compacted by the leader (see `etcd_compact`).
        let compactor = options.compact_every.map(|every| Compactor {
            client: client.clone(),
            probe: key.clone(),
            samples_key: [options.prefix.as_bytes(), super::etcd_compact::SAMPLES_KEY].concat(),
            every,
            retain: options.compact_retain,
            view: view.clone(),
            durations: backend.request_durations(),
            node_id: node_id.to_owned(),
        });
        let election = Election {
            client,
            key,
            node_id: node_id.to_owned(),
            view: tx,
            term_check: Box::new(term_check),
            reach: Arc::new(std::sync::Mutex::new(Reach {
                unanswered_since: None,
                storage_lost: backend.lost_flag(),
            })),
            compactor,
        };
        let stop_signal = stop.clone();
        runtime.spawn(async move {
            election.run(stop_signal).await;
            let _ = stopped_tx.send(true);
        });
        Ok(Self {
            node_id: node_id.to_owned(),
            view,
            backend,
            options: options.clone(),
            stop,
            stopped,
        })
    }
}

impl Drop for EtcdLeadership {
    fn drop(&mut self) {
        self.stop.notify_one();
    }
}

impl Leadership for EtcdLeadership {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn watch(&self) -> watch::Receiver<LeaderView> {
        self.view.clone()
    }

    fn endpoints(&self) -> Vec<EndpointHealth> {
        let Some((_, runtime)) = self.backend.client_and_runtime() else {
            return Vec::new();
        };
        let options = self.options.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let asks = options.endpoints.iter().map(|endpoint| {
                let options = options.clone();
                let endpoint = endpoint.clone();
                async move { endpoint_health(&options, endpoint).await }
            });
            let _ = tx.send(futures_join_all(asks).await);
        });
        super::off_worker(|| rx.recv_timeout(HEALTH_BOUND * 3).unwrap_or_default())
    }

    fn resign(&self) {
        self.stop.notify_one();
        let mut stopped = self.stopped.clone();
        let wait = async move {
            let _ = tokio::time::timeout(REQUEST_BOUND * 2, stopped.wait_for(|s| *s)).await;
        };
        if let Some((_, runtime)) = self.backend.client_and_runtime() {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            runtime.spawn(async move {
                wait.await;
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(REQUEST_BOUND * 3);
        }
    }
}

/// Runs every future at once (on the current runtime) and returns their
/// outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        if let Ok(found) = handle.await {
            out.push(found);
        }
    }
    out
}

/// One member's `Status`, over a connection to it alone.
async fn endpoint_health(options: &EtcdOptions, endpoint: String) -> EndpointHealth {
    let asked = async {
        let connect = connect_options(options).map_err(|e| e.to_string())?;
        let mut client = Client::connect([endpoint.clone()], Some(connect))
            .await
            .map_err(|e| e.to_string())?;
        client.status().await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(HEALTH_BOUND, asked).await {
        Ok(Ok(status)) => {
            let leads = status.header().map(|h| h.member_id()) == Some(status.leader());
            EndpointHealth {
                endpoint,
                healthy: true,
                detail: format!(
                    "etcd {}{}",
                    status.version(),
                    if leads { ", raft leader" } else { "" }
                ),
            }
        }
        Ok(Err(error)) => EndpointHealth {
            endpoint,
            healthy: false,
            detail: error,
        },
        Err(_) => EndpointHealth {
            endpoint,
            healthy: false,
            detail: format!("no answer within {} s", HEALTH_BOUND.as_secs()),
        },
    }
}

type TermCheck = Box<dyn Fn(i64) -> Arc<dyn Fn() -> Result<(), StorageError> + Send + Sync> + Send>;

/// The election loop's state.
struct Election {
    client: Client,
    key: Vec<u8>,
    node_id: String,
    view: watch::Sender<LeaderView>,
    term_check: TermCheck,
    /// Whether the loop's requests are answered (shared with the watcher).
    reach: Arc<std::sync::Mutex<Reach>>,
    /// Started with the loop and stopped with it.
    compactor: Option<Compactor>,
}

/// Whether etcd answers the loop's requests.
#[derive(Default)]
struct Reach {
    /// When the first request sent since the last answer was sent; `None`
    /// while every request sent has been answered.
    unanswered_since: Option<Instant>,
    /// The storage calls' mark that the quorum counts as lost
    /// (`etcd_backend`), cleared by every answer counted here (linearizable
    /// reads, a lease grant and a transaction, all through etcd's quorum;
    /// keep-alives, which a leader that lost its quorum may still answer,
    /// never count): such an answer means etcd has its quorum again, and
    /// the node's storage calls go back to riding out a blip at the moment
    /// its health says SERVING again (before, a call made in the
    /// [`RIDE_OUT`] after the last refusal was tried once, and a first try
    /// that met a member's connection not yet made again failed).
    storage_lost: super::etcd_backend::LostFlag,
}

impl Reach {
    /// A request is about to be sent.
    fn asked(&mut self) {
        self.unanswered_since.get_or_insert_with(Instant::now);
    }

    /// etcd answered a request.
    fn answered(&mut self) {
        self.unanswered_since = None;
        self.storage_lost.answered();
    }

    /// Whether etcd counts as reachable: nothing has gone unanswered for
    /// [`RIDE_OUT`].
    fn reachable(&self) -> bool {
        self.unanswered_since
            .is_none_or(|since| since.elapsed() < RIDE_OUT)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Flips the view's `reachable` when [`Reach`] says so, every
/// [`REACH_CHECK`], while the loop may be waiting on a request.
async fn watch_reach(reach: Arc<std::sync::Mutex<Reach>>, view: watch::Sender<LeaderView>) {
    loop {
        tokio::time::sleep(REACH_CHECK).await;
        let reachable = lock(&reach).reachable();
        view.send_if_modified(|view| {
            let changed = view.reachable != reachable;
            view.reachable = reachable;
            changed
        });
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one follower look found.
enum Look {
    Leader(String),
    Vacant,
}

impl Election {
    async fn run(mut self, stop: Arc<tokio::sync::Notify>) {
        let _compacting = self
            .compactor
            .take()
            .map(|compactor| AbortOnDrop(tokio::spawn(compactor.run())));
        let _watching = AbortOnDrop(tokio::spawn(watch_reach(
            self.reach.clone(),
            self.view.clone(),
        )));
        loop {
            let step = async {
                match self.look().await {
                    Ok(Look::Leader(leader)) => {
                        self.publish(false, Some(leader), None);
                        tokio::time::sleep(POLL).await;
                        None
                    }
                    Ok(Look::Vacant) => match self.campaign().await {
                        Ok(Some(won)) => Some(won),
                        Ok(None) => None,
                        Err(error) => {
                            tracing::debug!(%error, "leader campaign failed");
                            self.unanswered();
                            tokio::time::sleep(POLL).await;
                            None
                        }
                    },
                    Err(error) => {
                        tracing::debug!(%error, "cannot read the leader key");
                        self.unanswered();
                        tokio::time::sleep(POLL).await;
                        None
                    }
                }
            };
            let won = tokio::select! {
                won = step => won,
                () = stop.notified() => return,
            };
            if let Some((lease, revision, asked)) = won {
                let resigned = self.lead(lease, revision, asked, &stop).await;
                self.publish(false, None, None);
                let mut lease_client = self.client.lease_client();
                let _ = tokio::time::timeout(REQUEST_BOUND, lease_client.revoke(lease)).await;
                if resigned {
                    tracing::info!(node = %self.node_id, "resigned the cluster leadership");
                    return;
                }
            }
        }
    }

    /// Publishes a view (if it changed).
    fn publish(&mut self, is_leader: bool, leader: Option<String>, fence: Option<Fence>) {
        let reachable = lock(&self.reach).reachable();
        self.view.send_if_modified(|view| {
            let changed = view.is_leader != is_leader
                || view.leader != leader
                || view.reachable != reachable
                || view.fence.as_ref().map(|f| f.revision) != fence.as_ref().map(|f| f.revision);
            if changed {
                *view = LeaderView {
                    is_leader,
                    leader: leader.clone(),
                    reachable,
                    fence: fence.clone(),
                };
            }
            changed
        });
    }

    /// A request failed: the view says so once they all have for a while.
    fn unanswered(&mut self) {
        let (leader, fence) = {
            let view = self.view.borrow();
            (view.leader.clone(), view.fence.clone())
        };
        let is_leader = fence.is_some();
        self.publish(is_leader, leader, fence);
    }

    async fn look(&mut self) -> Result<Look, String> {
        let mut kv = self.client.kv_client();
        lock(&self.reach).asked();
        let answer = tokio::time::timeout(REQUEST_BOUND, kv.get(self.key.clone(), None))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        lock(&self.reach).answered();
        Ok(match answer.kvs().first() {
            Some(kv) => Look::Leader(String::from_utf8_lossy(kv.value()).into_owned()),
            None => Look::Vacant,
        })
    }

    /// Whether the leader key still holds the term `revision`: a
    /// linearizable read, bounded by `bound`. This is the request that
    /// counts as answered for a leader (see [`Reach`]): a keep-alive can be
    /// answered by an etcd leader that has not yet seen it lost its quorum,
    /// a linearizable read cannot, so a leader and a follower count etcd as
    /// lost after the same kind of request went unanswered.
    async fn holds(&mut self, revision: i64, bound: Instant) -> Result<bool, String> {
        let mut kv = self.client.kv_client();
        let answer = tokio::time::timeout_at(bound, kv.get(self.key.clone(), None))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        lock(&self.reach).answered();
        Ok(answer
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == revision))
    }

    /// Grants a lease and creates the key on it if still absent: the
    /// lease, the key's create revision and when the lease was asked for
    /// (its TTL counts from no earlier) when this node won.
    async fn campaign(&mut self) -> Result<Option<(i64, i64, Instant)>, String> {
        let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(3);
        let asked = Instant::now();
        let mut lease_client = self.client.lease_client();
        lock(&self.reach).asked();
        let granted = tokio::time::timeout(REQUEST_BOUND, lease_client.grant(ttl, None))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        lock(&self.reach).answered();
        let lease = granted.id();
        let txn = Txn::new()
            .when([Compare::version(self.key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                self.key.clone(),
                self.node_id.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(self.key.clone(), Some(GetOptions::new()))]);
        let mut kv = self.client.kv_client();
        let answer = match tokio::time::timeout(REQUEST_BOUND, kv.txn(txn)).await {
            Ok(Ok(answer)) => answer,
            other => {
                let _ = tokio::time::timeout(REQUEST_BOUND, lease_client.revoke(lease)).await;
                return Err(match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_owned(),
                });
            }
        };
        lock(&self.reach).answered();
        if answer.succeeded() {
            let revision = answer.header().map_or(0, |h| h.revision());
            return Ok(Some((lease, revision, asked)));
        }
        let _ = tokio::time::timeout(REQUEST_BOUND, lease_client.revoke(lease)).await;
        let holder = answer.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        self.publish(false, holder, None);
        Ok(None)
    }

    /// Leads until the term ends (false) or `stop` (true).
    ///
    /// The step-down time (the lease's end as this node counts it, less
    /// [`MARGIN`]) bounds every wait of the loop, so a keep-alive that hangs
    /// cannot keep a leader that cannot renew past it.
    async fn lead(
        &mut self,
        lease: i64,
        revision: i64,
        asked: Instant,
        stop: &tokio::sync::Notify,
    ) -> bool {
        let fence = Fence::new(self.key.clone(), revision, (self.term_check)(revision));
        let mut step_down_at = asked + LEASE_TTL - MARGIN;
        tracing::info!(node = %self.node_id, term = revision, "became the cluster leader");
        self.publish(true, Some(self.node_id.clone()), Some(fence.clone()));
        let mut lease_client = self.client.lease_client();
        let mut stream = None;
        loop {
            let pause =
                tokio::time::sleep_until(step_down_at.min(Instant::now() + KEEP_ALIVE_EVERY));
            tokio::select! {
                () = pause => {}
                () = stop.notified() => return true,
            }
            if Instant::now() >= step_down_at {
                tracing::warn!(node = %self.node_id, "lease not renewed in time: stepping down");
                return false;
            }
            // No request of the loop is waited for past the step-down time.
            let bound = step_down_at.min(Instant::now() + REQUEST_BOUND);
            if stream.is_none() {
                lock(&self.reach).asked();
                match tokio::time::timeout_at(bound, lease_client.keep_alive(lease)).await {
                    Ok(Ok(opened)) => stream = Some(opened),
                    _ => {
                        self.unanswered();
                        continue;
                    }
                }
            }
            let Some((keeper, answers)) = stream.as_mut() else {
                continue;
            };
            let sent = Instant::now();
            lock(&self.reach).asked();
            match tokio::time::timeout_at(bound, keep_alive_once(keeper, answers)).await {
                Ok(Ok(answer)) if answer.ttl() > 0 => {
                    let ttl = Duration::from_secs(u64::try_from(answer.ttl()).unwrap_or(0));
                    step_down_at = sent + ttl - MARGIN;
                    match self.holds(revision, bound).await {
                        Ok(true) => {
                            self.publish(true, Some(self.node_id.clone()), Some(fence.clone()));
                        }
                        Ok(false) => {
                            tracing::warn!(
                                node = %self.node_id,
                                "the leader key no longer holds this term: stepping down"
                            );
                            return false;
                        }
                        Err(error) => {
                            tracing::debug!(%error, "cannot read the leader key");
                            self.unanswered();
                        }
                    }
                }
                Ok(Ok(_)) => {
                    tracing::warn!(node = %self.node_id, "the leader lease expired: stepping down");
                    return false;
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "lease keep-alive failed");
                    stream = None;
                    self.unanswered();
                }
                Err(_) => {
                    stream = None;
                    self.unanswered();
                }
            }
        }
    }
}

/// One renewal of a lease on its keep-alive stream: the request, then
/// etcd's answer (its `ttl` is 0 when etcd no longer knows the lease).
pub(super) async fn keep_alive_once(
    keeper: &mut etcd_client::LeaseKeeper,
    answers: &mut etcd_client::LeaseKeepAliveStream,
) -> Result<etcd_client::LeaseKeepAliveResponse, String> {
    keeper.keep_alive().await.map_err(|e| e.to_string())?;
    answers
        .message()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "keep-alive stream ended".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn etcd_counts_as_lost_once_a_request_went_unanswered_for_the_ride_out() {
        let mut reach = Reach::default();
        assert!(reach.reachable());
        reach.asked();
        tokio::time::advance(RIDE_OUT - Duration::from_millis(1)).await;
        // Another request sent meanwhile does not move the start.
        reach.asked();
        assert!(reach.reachable());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!reach.reachable());
        reach.answered();
        assert!(reach.reachable());
        reach.asked();
        tokio::time::advance(RIDE_OUT / 2).await;
        assert!(reach.reachable());
    }

    #[test]
    fn an_answer_to_the_loop_clears_the_storage_calls_lost_mark() {
        let lost = super::super::etcd_backend::LostFlag::default();
        lost.ran_out(Instant::now());
        assert!(lost.known());
        let mut reach = Reach {
            unanswered_since: None,
            storage_lost: lost.clone(),
        };
        reach.answered();
        assert!(!lost.known());
    }
}
