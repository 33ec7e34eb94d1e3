//! A backend on an etcd v3 cluster (`[storage] backend = "etcd"`), so that
//! several keyward nodes share one store that etcd replicates with Raft.
//!
//! # Keys
//!
//! Every key lives under the configured prefix (`storage.etcd.prefix`,
//! `keyward/` by default), so several vaults can share a cluster:
//! `PREFIX d/KEY` holds the barrier's value for `KEY` (ciphertext, or the
//! plaintext seal configuration), `PREFIX m/format` the store's format
//! version (a big-endian u32, as `format` keeps it in sled's meta tree).
//!
//! # Calling async etcd from the synchronous trait
//!
//! `Backend` is synchronous and is called from async handlers (on worker
//! threads of a multi-thread runtime), from `spawn_blocking`, from plain
//! threads and, in tests, from current-thread runtimes. The etcd client is
//! async. The backend therefore owns a small runtime of its own (one worker
//! thread, `keyward-etcd`) that alone runs the client; a call spawns its
//! request there and waits for the answer on a std channel:
//!
//! - on a worker of a multi-thread runtime the wait is wrapped in
//!   `tokio::task::block_in_place`, so the caller's other tasks move to
//!   another worker while it waits;
//! - anywhere else (a current-thread runtime, a blocking-pool thread, a
//!   thread with no runtime) it simply blocks the thread. `block_in_place`
//!   would panic on a current-thread runtime, and it is not needed: the
//!   request runs on the backend's own runtime, which never waits for the
//!   caller's, so the wait cannot deadlock; it stalls that one runtime for
//!   the round trip, as any synchronous I/O would.
//!
//! # When etcd cannot answer: what is sent again, and the deadline
//!
//! Every storage call is bounded by keyward's own deadline,
//! [`CALL_DEADLINE`] (6 s), retries included: a request still out when it
//! passes is given up, and the call fails as [`StorageError::Unavailable`]
//! (UNAVAILABLE to callers) saying so. Without it the first call after the
//! quorum was lost waited out the etcd client's own timeout
//! (`REQUEST_TIMEOUT`, 10 s) before its retries began. `WAIT_BOUND` on the
//! caller's wait is a last guard past that deadline.
//!
//! The client asks etcd for a leader on every request, so a member cut off
//! from its quorum refuses at once ("no leader") instead of holding the
//! request until it times out. For [`RIDE_OUT`] (5 s, long enough for an
//! etcd election after a member died) a failed request is sent again, after
//! a short pause, when sending it twice is harmless:
//!
//! - **Reads** (`get`, scans and `export`, the caches' epoch read behind
//!   `cache_fence`, the fence check, the format check) are sent again after
//!   any failure that means "etcd could not answer": not sent, "no leader",
//!   a connection broken while the request was out ("transport error", a
//!   member killed), "leader changed", a timeout. A read changes nothing, so
//!   the second try cannot do harm, and the client's balancer sends it to a
//!   member that answers. A try of a read that hangs (a follower waiting on
//!   a leader that died) is given up after `READ_TRY` (3 s) and sent again.
//!   One member of three killed under reads therefore fails no read. (The format check's write is a create-if-absent whose
//!   outcome is read back, so sending it twice is harmless too.)
//! - **Writes** (`put`, `delete`, `batch`, `batch_if`, `apply_in_order`,
//!   `compare_and_swap`, the fenced writes) are sent again only when they
//!   were certainly not applied: not sent (the TCP connection was refused)
//!   or refused for "no leader". A write whose outcome is unknown (a
//!   connection broken mid-request, "leader changed", no answer before the
//!   deadline) is never sent again, and its error says it may have been
//!   applied. That holds for the guarded ones too: a compare-and-swap or a
//!   guarded transaction sent twice after its first try was applied finds
//!   its own value and reports a conflict, so the caller would read again and
//!   apply its change a second time (a use counted twice, a version written
//!   twice); a plain put sent again could overwrite a later write of another
//!   node.
//!
//! When a call runs out of retries or meets the deadline with nothing
//! answered, the quorum counts as lost: for the next [`RIDE_OUT`], unless a
//! request succeeds meanwhile (the node's own, or one of its election loop,
//! which clears the mark), calls are tried once (a request makes several
//! calls, and each would otherwise wait out the retries again; a try that
//! could not reach its member is made again on another, a few times at most,
//! as it says nothing of the quorum). The election
//! loop (`etcd_leader`) uses the same [`RIDE_OUT`] before its node says
//! NOT_SERVING, so a blip the storage calls ride out does not flip health.
//! Dropping the backend shuts its runtime down in the background (allowed
//! from async code, where a plain runtime drop would panic).
//!
//! # Semantics against the trait
//!
//! - `put`, `delete`, `batch`, `apply_in_order` return once etcd answered,
//!   that is once the change is committed on a quorum: `flush` is a no-op.
//! - `batch` is one etcd transaction. etcd refuses a transaction with more
//!   than 128 operations or a request over 1.5 MiB (its defaults); such a
//!   batch cannot be split without losing its atomicity, so it is refused
//!   whole ([`StorageError::Io`] naming the limit), never half applied.
//!   Several operations on one key in a batch are folded to the last one
//!   (etcd refuses a transaction naming a key twice; the outcome is the same).
//! - `apply_in_order` sends consecutive chunks within those limits, each
//!   one transaction, one after another: a failure keeps a prefix of whole
//!   chunks, which is what the trait promises.
//! - `compare_and_swap` is a transaction comparing the key's value (or, for
//!   "absent", its version with 0); when the comparison fails the same
//!   transaction reads the current value.
//! - Scans and `export` page through the range 512 keys at a time, every
//!   page read at the revision of the first, so a scan is one consistent
//!   view even while writes go on (etcd keeps that revision as long as no
//!   compaction passes it; a compacted revision is an error, never a mix).
//! - When etcd has raised its NOSPACE alarm (the backend quota is full),
//!   every write fails with an error saying so; reads go on.
//!
//! Error messages name the operation and etcd's reason, never a key or value.
//!
//! # Caches (`storage::coherence`, `etcd_watch`)
//!
//! Every write of a key under a prefix a cache tracks also writes
//! `PREFIX m/epoch` (empty) in the same transaction, so the epoch's
//! revision is that of the last tracked change. A watch on the prefix feeds
//! the caches' invalidations; [`Backend::cache_fence`] lets a request use
//! them once the watch has delivered the epoch read after the request began.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp, TxnOpResponse,
};

use super::cluster::{self, Fence};
use super::coherence::Coherence;
use super::etcd_combine::{Claim, Combiner, Write, WriteHold};
pub use super::etcd_members::ReadLeaseMetrics;
use super::read_cache::{ReadCache, ReadCacheFigures, ReadCacheMetrics};
use super::{
    format, Backend, BatchOp, CasOutcome, EtcdOptions, Expected, ExportSink, KeyValues,
    StorageError,
};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB), less room for framing.
pub const MAX_REQUEST_BYTES: usize = 1_572_864 - 4096;
/// Keys per page of a scan.
const PAGE: i64 = 512;
/// The bound on one etcd request (the client's own timeout); keyward's
/// [`CALL_DEADLINE`] is shorter and cuts a request first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long etcd may fail to answer before keyward gives up: storage calls
/// send a failed request again for this long (see the module doc on which
/// ones), and the election loop says NOT_SERVING once its requests have gone
/// unanswered for this long (`etcd_leader`). Long enough to cover an etcd
/// leader election after a member died; one constant, so that a blip the
/// storage calls ride out does not flip health.
pub const RIDE_OUT: Duration = Duration::from_secs(5);
/// keyward's own deadline on one storage call, its retries included: a
/// request still out when it passes is given up (UNAVAILABLE).
pub const CALL_DEADLINE: Duration = Duration::from_secs(6);
/// The bound on one try of a read: a read that hangs (a follower waiting
/// on a leader that died) is given up and sent again, within the deadline.
const READ_TRY: Duration = Duration::from_secs(3);
/// The bound on waiting for an answer from the backend's runtime: a last
/// guard a little past [`CALL_DEADLINE`].
const WAIT_BOUND: Duration = Duration::from_secs(8);

/// Marks an error of a request that never reached etcd (see `call`).
const NOT_SENT: &str = "an etcd member could not be reached, the request was not sent";
/// While the quorum is known lost (see `Sender::send`), how many tries that
/// were not sent (a connection to a member that is down could not be made)
/// a call makes before it gives up. Such a try proves nothing about the
/// quorum; a reachable member's answer does. Refused connections come back
/// at once, so a cluster that is really gone is still answered within
/// about 0.3 s (pauses of 20 to 100 ms); five make it unlikely that every
/// try meets the same member that is down.
const LOST_NOT_SENT_TRIES: u64 = 5;
/// Marks an error of a request that an etcd member refused because it has
/// no leader (the client asks for a leader on every request): nothing was
/// applied.
const NO_LEADER: &str = "etcd has no leader";
/// Which failed requests `call` sends again (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Resend {
    /// A read (or a request harmless to send twice): after any failure
    /// that means etcd could not answer.
    Read,
    /// A write: only when it was certainly not applied (not sent, or
    /// refused for "no leader").
    IfNotApplied,
}

impl Resend {
    /// Whether a request that failed with `StorageError::Unavailable(message)`
    /// is sent again.
    fn allows(self, message: &str) -> bool {
        match self {
            Self::Read => true,
            Self::IfNotApplied => message.contains(NOT_SENT) || message.contains(NO_LEADER),
        }
    }
}

/// The largest answer the client decodes: a page of a scan is halved until
/// its answer fits (one value is at most etcd's 1.5 MiB request limit).
pub(super) const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Where the data keys start, under the prefix.
const DATA: &[u8] = b"d/";
/// The format version's key, under the prefix.
const FORMAT_KEY: &[u8] = b"m/format";
/// The change marker of tracked prefixes, under the prefix (see the module doc).
const EPOCH_KEY: &[u8] = b"m/epoch";
/// The read-lease roll, under the prefix (see `storage::members`).
const ROLL: &[u8] = b"m/node/";

/// A `Backend` on an etcd cluster. See the module doc.
pub struct EtcdBackend {
    client: Client,
    runtime: Option<tokio::runtime::Runtime>,
    /// `PREFIX d/`.
    data: Vec<u8>,
    /// `PREFIX m/format`.
    format_key: Vec<u8>,
    /// Leadership and request timings (see "Leadership, fence, timings").
    extra: Extra,
    /// `PREFIX m/epoch`.
    epoch_key: Vec<u8>,
    /// What the caches of this node register with (see `coherence`).
    coherence: std::sync::Arc<Coherence>,
    /// When a request last ran out of retries with nothing answered since
    /// (see `call`).
    lost: LostFlag,
    /// Values of the prefixes asked for by `cache_reads` (`read_cache`).
    read_cache: std::sync::Arc<ReadCache>,
    /// Requests sent to etcd by `call` (each try counts): round trips.
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Gathers concurrent unfenced writes into one transaction
    /// (`etcd_combine`); set once the runtime runs.
    combiner: Option<Combiner>,
    /// This node's read lease (0: none now), given up on `Drop`
    /// (`etcd_members`).
    lease: std::sync::Arc<std::sync::atomic::AtomicI64>,
    closing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    read_lease_metrics: ReadLeaseMetrics,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend").finish_non_exhaustive()
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        // Stop trusting the caches, then give the read lease up, so that
        // the other nodes' writers need not wait for it to run out.
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.coherence.left();
        let lease = self.lease.load(std::sync::atomic::Ordering::SeqCst);
        if let (Some(runtime), true) = (&self.runtime, lease != 0) {
            let mut leases = self.client.lease_client();
            let (tx, rx) = mpsc::sync_channel(1);
            runtime.spawn(async move {
                let _ = leases.revoke(lease).await;
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(std::time::Duration::from_secs(1));
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Maps an etcd client error to ours; the messages of etcd name the failed
/// check (`etcdserver: mvcc: database space exceeded`), never a key or value.
///
/// A cluster that cannot answer is [`StorageError::Unavailable`]: a member
/// that could not be reached, one without a leader (quorum lost, or an
/// election under way), or no answer in time. Only the last may have
/// applied a write, and its message says so.
pub(super) fn etcd_error(operation: &'static str, error: etcd_client::Error) -> StorageError {
    if let etcd_client::Error::GRpcStatus(status) = &error {
        let message = status.message();
        if message.contains("database space exceeded") || message.contains("NOSPACE") {
            return StorageError::Io(format!(
                "{operation}: the etcd cluster is out of space (NOSPACE alarm): writes are \
                 refused until an operator compacts and defragments etcd (or raises \
                 --quota-backend-bytes) and disarms the alarm; reads go on"
            ));
        }
        if status.code() == tonic::Code::Unavailable && message.contains("tcp connect error") {
            return StorageError::Unavailable(format!("{operation}: {NOT_SENT}: {message}"));
        }
        if message.contains("etcdserver: no leader") {
            return StorageError::Unavailable(format!(
                "{operation}: {NO_LEADER} (fewer than a majority of its members can reach \
                 each other: quorum lost, or an election is under way); nothing was applied"
            ));
        }
        // The connection to the member broke while the request was out
        // (the member was killed): tonic says Unknown, "transport error".
        let broken = status.code() == tonic::Code::Unknown && message.contains("transport error");
        if broken
            || matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            )
        {
            return StorageError::Unavailable(format!(
                "{operation}: etcd did not answer ({:?}: {message}); a write may or may not \
                 have been applied",
                status.code()
            ));
        }
        return StorageError::Io(format!(
            "{operation}: etcd answered {:?}: {message}",
            status.code()
        ));
    }
    if let etcd_client::Error::TransportError(_) = &error {
        return StorageError::Unavailable(format!(
            "{operation}: etcd could not be reached ({error}); a write may or may not have \
             been applied"
        ));
    }
    StorageError::Io(format!("{operation}: etcd: {error}"))
}

/// The first key after every key starting with `prefix` (etcd's range end);
/// empty when there is none (all bytes 0xff).
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, StorageError> {
    std::fs::read(path)
        .map_err(|e| StorageError::Io(format!("etcd TLS file {}: {e}", path.display())))
}

/// The size etcd counts for one operation, roughly: key, value, framing.
fn op_bytes(op: &BatchOp) -> usize {
    match op {
        BatchOp::Put(key, value) => key.len() + value.len() + 16,
        BatchOp::Delete(key) => key.len() + 16,
    }
}

/// Keeps the last operation on each key, in the order of those last
/// operations (etcd refuses a transaction that names a key twice).
fn fold(ops: Vec<BatchOp>) -> Vec<BatchOp> {
    let key = |op: &BatchOp| match op {
        BatchOp::Put(k, _) | BatchOp::Delete(k) => k.clone(),
    };
    let mut last = std::collections::HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        last.insert(key(op), i);
    }
    ops.into_iter()
        .enumerate()
        .filter(|(i, op)| last.get(&key(op)) == Some(i))
        .map(|(_, op)| op)
        .collect()
}

/// The client's options for `options`: timeouts, keep-alive and TLS.
pub(super) fn connect_options(options: &EtcdOptions) -> Result<ConnectOptions, StorageError> {
    // A member without a leader refuses at once ("no leader") instead of
    // holding the request until it times out (see `call`).
    let mut connect = ConnectOptions::new()
        .with_require_leader(true)
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    if let Some(ca) = &options.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read_file(ca)?));
        match (&options.cert, &options.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
            }
            (None, None) => {}
            _ => {
                return Err(StorageError::Io(
                    "etcd: storage.etcd.cert and storage.etcd.key go together".into(),
                ))
            }
        }
        connect = connect.with_tls(tls);
    } else if options.cert.is_some() || options.key.is_some() {
        return Err(StorageError::Io(
            "etcd: a client certificate needs storage.etcd.ca".into(),
        ));
    }
    Ok(connect)
}

impl EtcdBackend {
    /// Connects to the cluster and checks (or writes) the format version.
    /// The connection is made lazily by the client: an unreachable cluster
    /// shows as the format check's error after `REQUEST_TIMEOUT`.
    pub fn open(options: &EtcdOptions) -> Result<Self, StorageError> {
        if options.endpoints.is_empty() {
            return Err(StorageError::Io("etcd: no endpoints configured".into()));
        }
        let connect = connect_options(options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keyward-etcd")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Io(format!("etcd: cannot start its runtime: {e}")))?;
        let endpoints = options.endpoints.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(Client::connect(endpoints, Some(connect)).await);
        });
        let client = wait(rx)?.map_err(|e| etcd_error("connect", e))?;
        let prefix = options.prefix.as_bytes();
        let mut backend = Self {
            client,
            runtime: Some(runtime),
            data: [prefix, DATA].concat(),
            format_key: [prefix, FORMAT_KEY].concat(),
            extra: Extra::new(prefix),
            epoch_key: [prefix, EPOCH_KEY].concat(),
            coherence: std::sync::Arc::new(Coherence::with_interval(options.fence_interval)),
            lost: LostFlag::default(),
            read_cache: std::sync::Arc::new(ReadCache::new(
                options.read_cache_bytes,
                options.read_cache_entries,
            )),
            sent: std::sync::Arc::default(),
            combiner: None,
            lease: std::sync::Arc::default(),
            closing: std::sync::Arc::default(),
            read_lease_metrics: ReadLeaseMetrics::default(),
        };
        if let Some(runtime) = &backend.runtime {
            backend.combiner = Some(Combiner::start(
                runtime.handle(),
                backend.sender(),
                backend.epoch_key.clone(),
            ));
        }
        backend.check_format()?;
        if let Some(runtime) = &backend.runtime {
            runtime.spawn(super::etcd_watch::run(super::etcd_watch::Feed {
                client: backend.client.clone(),
                prefix: prefix.to_vec(),
                data: backend.data.clone(),
                roll: [prefix, ROLL].concat(),
                epoch: backend.epoch_key.clone(),
                coherence: backend.coherence.clone(),
            }));
            if options.read_lease {
                runtime.spawn(super::etcd_members::run(super::etcd_members::Lessee {
                    client: backend.client.clone(),
                    roll: [prefix, ROLL].concat(),
                    epoch_key: backend.epoch_key.clone(),
                    coherence: backend.coherence.clone(),
                    lease: backend.lease.clone(),
                    closing: backend.closing.clone(),
                    metrics: backend.read_lease_metrics.clone(),
                }));
            }
        }
        Ok(backend)
    }

    /// Runs `work` with a client on the backend's runtime and waits for it
    /// (see the module doc on why this cannot deadlock).
    ///
    /// A failed request is sent again for up to [`RIDE_OUT`] when `resend`
    /// allows it (see the module doc: reads after any "etcd could not
    /// answer", writes only when certainly not applied), and the whole call
    /// ends by [`CALL_DEADLINE`]. When the retries run out, or the deadline
    /// passes with no answer, the error is [`StorageError::Unavailable`], and
    /// for the next [`RIDE_OUT`], unless a request succeeds meanwhile,
    /// requests are tried once.
    fn call<T, F, Fut>(
        &self,
        operation: &'static str,
        resend: Resend,
        work: F,
    ) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<T, StorageError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.start(operation, resend, work, move |out| {
            let _ = tx.send(out);
        })?;
        wait(rx)?
    }

    /// [`Self::call`] for async callers: the same request, retries and
    /// deadline, awaited instead of waited for on a parked thread.
    async fn call_async<T, F, Fut>(
        &self,
        operation: &'static str,
        resend: Resend,
        work: F,
    ) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<T, StorageError>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.start(operation, resend, work, move |out| {
            let _ = tx.send(out);
        })?;
        match tokio::time::timeout(WAIT_BOUND, rx).await {
            Ok(Ok(out)) => out,
            _ => Err(no_answer()),
        }
    }

    /// Spawns `work` on the backend's runtime with the retries and deadline
    /// of [`Self::call`]; `reply` gets the outcome there.
    fn start<T, F, Fut>(
        &self,
        operation: &'static str,
        resend: Resend,
        work: F,
        reply: impl FnOnce(Result<T, StorageError>) + Send + 'static,
    ) -> Result<(), StorageError>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<T, StorageError>> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| StorageError::Io("etcd: the backend is closed".into()))?;
        let sender = self.sender();
        runtime.spawn(async move { reply(sender.send(operation, resend, work).await) });
        Ok(())
    }

    fn sender(&self) -> Sender {
        Sender {
            client: self.client.clone(),
            lost: self.lost.clone(),
            sent: self.sent.clone(),
        }
    }

    fn data_key(&self, key: &[u8]) -> Vec<u8> {
        [self.data.as_slice(), key].concat()
    }

    /// The store's format version: written on a new (empty) prefix, refused
    /// when newer than this binary's.
    fn check_format(&self) -> Result<(), StorageError> {
        let key = self.format_key.clone();
        let data = self.data.clone();
        let current = format::CURRENT.to_be_bytes().to_vec();
        let found = self.call(
            "format version",
            Resend::Read,
            move |mut client| async move {
                let stored = client
                    .get(key.clone(), None)
                    .await
                    .map_err(|e| etcd_error("format version", e))?;
                if let Some(kv) = stored.kvs().first() {
                    return Ok(Some(kv.value().to_vec()));
                }
                let any = client
                    .get(
                        data.clone(),
                        Some(
                            GetOptions::new()
                                .with_range(prefix_end(&data))
                                .with_limit(1)
                                .with_keys_only(),
                        ),
                    )
                    .await
                    .map_err(|e| etcd_error("format version", e))?;
                if !any.kvs().is_empty() {
                    return Err(StorageError::Corrupt(
                        "the etcd prefix holds data but no format version".into(),
                    ));
                }
                // Written only if still absent: two nodes starting at once agree.
                client
                    .txn(
                        Txn::new()
                            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(key, current, None)]),
                    )
                    .await
                    .map_err(|e| etcd_error("format version", e))?;
                Ok(None)
            },
        )?;
        if let Some(bytes) = found {
            let raw: [u8; 4] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| StorageError::Corrupt("the format version is not 4 bytes".into()))?;
            let version = u32::from_be_bytes(raw);
            if version > format::CURRENT {
                return Err(StorageError::NewerFormat {
                    found: version,
                    supported: format::CURRENT,
                });
            }
        }
        Ok(())
    }

    /// The store's format version, as recorded (`migrate` copies it).
    pub fn set_format_version(&self, version: u32) -> Result<(), StorageError> {
        let key = self.format_key.clone();
        self.call(
            "format version",
            Resend::IfNotApplied,
            move |mut client| async move {
                client
                    .put(key, version.to_be_bytes().to_vec(), None)
                    .await
                    .map_err(|e| etcd_error("format version", e))?;
                Ok(())
            },
        )
    }

    /// Whether no data key exists under the prefix (`migrate` refuses to
    /// copy into a prefix that holds a vault already).
    pub fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self
            .scan_range_raw(self.data.clone(), prefix_end(&self.data), 1)?
            .is_empty())
    }

    /// Pages through `[start, end)` (raw etcd keys; an empty `end` means the
    /// end of the data keys), at most `limit` pairs, all at one revision.
    fn scan_range_raw(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<KeyValues, StorageError> {
        let strip = self.data.len();
        let end = if end.is_empty() {
            prefix_end(&self.data)
        } else {
            end
        };
        let mut out: KeyValues = Vec::new();
        self.scan_pages(start, end, limit, &mut |key, value| {
            out.push((key[strip..].to_vec(), value));
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands every pair of `[start, end)` to `sink`, page by page at the
    /// revision of the first page; returns the count.
    fn scan_pages(
        &self,
        mut start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
        sink: &mut dyn FnMut(Vec<u8>, Vec<u8>) -> Result<(), StorageError>,
    ) -> Result<u64, StorageError> {
        let mut revision = 0i64;
        let mut handed = 0u64;
        let mut left = limit;
        while left > 0 {
            let page = PAGE.min(i64::try_from(left).unwrap_or(PAGE));
            let range_end = end.clone();
            let from = start.clone();
            let (kvs, more, rev) = self.call("scan", Resend::Read, move |client| async move {
                let mut kv = client
                    .kv_client()
                    .max_decoding_message_size(MAX_ANSWER_BYTES);
                let mut page = page;
                let mut answer = loop {
                    let mut options = GetOptions::new()
                        .with_range(range_end.clone())
                        .with_limit(page);
                    if revision > 0 {
                        options = options.with_revision(revision);
                    }
                    match kv.get(from.clone(), Some(options)).await {
                        Ok(answer) => break answer,
                        // The page's values are too large for one answer.
                        Err(etcd_client::Error::GRpcStatus(status))
                            if status.code() == tonic::Code::OutOfRange && page > 1 =>
                        {
                            page /= 2;
                        }
                        Err(e) => return Err(etcd_error("scan", e)),
                    }
                };
                let rev = answer.header().map_or(0, |h| h.revision());
                let more = answer.more();
                let kvs: Vec<(Vec<u8>, Vec<u8>)> = answer
                    .take_kvs()
                    .into_iter()
                    .map(|kv| {
                        let (k, v) = kv.into_key_value();
                        (k, v)
                    })
                    .collect();
                Ok((kvs, more, rev))
            })?;
            if revision == 0 {
                revision = rev;
            }
            let Some(last) = kvs.last().map(|(k, _)| k.clone()) else {
                break;
            };
            left = left.saturating_sub(kvs.len());
            for (key, value) in kvs {
                sink(key, value)?;
                handed += 1;
            }
            if !more {
                break;
            }
            // The next page starts just after the last key.
            start = [last.as_slice(), &[0u8]].concat();
        }
        Ok(handed)
    }

    /// Whether any of `ops` is under a tracked prefix (the epoch is then
    /// written in the same transaction).
    fn bumps(&self, ops: &[BatchOp]) -> bool {
        ops.iter().any(|op| match op {
            BatchOp::Put(key, _) | BatchOp::Delete(key) => self.coherence.tracks(key),
        })
    }

    /// The keys of `ops` under a tracked prefix (barrier keys).
    fn tracked_keys(&self, ops: &[BatchOp]) -> Vec<Vec<u8>> {
        ops.iter()
            .filter_map(|op| match op {
                BatchOp::Put(key, _) | BatchOp::Delete(key) => {
                    self.coherence.tracks(key).then(|| key.clone())
                }
            })
            .collect()
    }

    /// After this node's write of the tracked `keys` applied at `revision`:
    /// its caches take it, and the other nodes with a read lease
    /// acknowledge it (or leave the roll) before its caller is answered
    /// (`Coherence::settle`).
    fn settle(&self, revision: i64, keys: Vec<Vec<u8>>) -> Result<(), StorageError> {
        if keys.is_empty() || revision <= 0 {
            return Ok(());
        }
        let _timer = self.time("ack_wait");
        let deadline = std::time::Instant::now() + super::etcd_members::ACK_WAIT;
        // The wait parks the thread: not a runtime worker's, unannounced.
        let settled = super::off_worker(|| self.coherence.settle(revision, keys, deadline));
        settled.map_err(|why| {
            StorageError::Unavailable(format!(
                "etcd: the write was applied, but {why} within {} s; until it is confirmed, \
                 other nodes may answer with what it replaced",
                super::etcd_members::ACK_WAIT.as_secs()
            ))
        })
    }

    /// The epoch's write, to go in a transaction that changes a tracked key.
    fn epoch_op(&self) -> TxnOp {
        TxnOp::put(self.epoch_key.clone(), Vec::new(), None)
    }

    /// The revision of the last tracked change: one linearizable read.
    fn read_epoch(&self) -> Result<i64, StorageError> {
        let _timer = self.time("cache_fence");
        self.call(
            "cache fence",
            Resend::Read,
            epoch_read(self.epoch_key.clone()),
        )
    }

    /// [`Self::read_epoch`] for async callers.
    async fn read_epoch_async(&self) -> Result<i64, StorageError> {
        let _timer = self.time("cache_fence");
        self.call_async(
            "cache fence",
            Resend::Read,
            epoch_read(self.epoch_key.clone()),
        )
        .await
    }

    /// The transaction operations of `ops`, with the epoch bump when one of
    /// them is under a tracked prefix.
    fn write_ops(&self, ops: Vec<BatchOp>) -> Vec<TxnOp> {
        let write = self.unguarded(ops, "batch");
        let mut txn_ops = write.ops;
        if write.bump {
            txn_ops.push(self.epoch_op());
        }
        txn_ops
    }

    /// `ops` as a write for the combiner, with nothing compared.
    fn unguarded(&self, ops: Vec<BatchOp>, operation: &'static str) -> Write {
        let bump = self.bumps(&ops);
        // etcd counts its keys, the prefix with them.
        let bytes = ops.iter().map(op_bytes).sum::<usize>() + ops.len() * self.data.len();
        let mut keys = Vec::with_capacity(ops.len());
        let ops = ops
            .into_iter()
            .map(|op| match op {
                BatchOp::Put(key, value) => {
                    let key = self.data_key(&key);
                    keys.push(key.clone());
                    TxnOp::put(key, value, None)
                }
                BatchOp::Delete(key) => {
                    let key = self.data_key(&key);
                    keys.push(key.clone());
                    TxnOp::delete(key, None)
                }
            })
            .collect();
        Write {
            operation,
            compares: Vec::new(),
            ops,
            bump,
            keys,
            bytes,
            claim: Claim::default(),
        }
    }

    /// Sends `write` through the combiner and waits for its outcome:
    /// applied at a revision, or a comparison failed.
    fn combined(&self, write: Write) -> Result<Option<i64>, StorageError> {
        let combiner = self
            .combiner
            .as_ref()
            .ok_or_else(|| StorageError::Io("etcd: the backend is closed".into()))?;
        let (operation, claim) = (write.operation, write.claim.clone());
        let (tx, rx) = mpsc::sync_channel(1);
        combiner.submit(write, move |out| {
            let _ = tx.send(out);
        })?;
        match wait(rx) {
            Ok(out) => out,
            // Not out yet: it never will be (a write sent after its caller
            // was answered could overwrite one acknowledged meanwhile).
            Err(_) if claim.give_up() => Err(StorageError::Unavailable(format!(
                "{operation}: etcd: the write waited too long for its turn and was not sent; \
                 nothing of it was applied"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Sends `ops` (within the limits) as one transaction (gathered with
    /// other writes when no fence applies: `etcd_combine`).
    fn txn(&self, ops: Vec<BatchOp>, operation: &'static str) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        let tracked = self.tracked_keys(&ops);
        let revision = match cluster::current() {
            Some(fence) => self.fenced(self.write_ops(ops), fence, operation)?,
            None => self.combined(self.unguarded(ops, operation))?.unwrap_or(0),
        };
        self.settle(revision, tracked)
    }
}

/// The mark of a lost quorum that a node's storage calls share (see
/// [`Sender::send`]), cleared by any answer through etcd's quorum: the
/// calls' own, or one of the election loop's (`etcd_leader`).
#[derive(Clone, Default)]
pub(super) struct LostFlag(std::sync::Arc<std::sync::Mutex<LostState>>);

#[derive(Default)]
struct LostState {
    /// When a call last ran out of retries; `None` once anything was
    /// answered since.
    lost_at: Option<tokio::time::Instant>,
    /// When etcd last answered.
    answered_at: Option<tokio::time::Instant>,
}

impl LostFlag {
    /// Whether the quorum counts as lost now: a call ran out of retries in
    /// the last [`RIDE_OUT`] and nothing was answered since.
    pub(super) fn known(&self) -> bool {
        lock(&self.0)
            .lost_at
            .is_some_and(|at| at.elapsed() < RIDE_OUT)
    }

    /// A call begun at `started` ran out of retries. It marks the quorum
    /// lost only if nothing was answered since it began: an answer it did
    /// not see (the election loop's, or another call's) says the quorum was
    /// back while it tried, and a mark set then would make the calls that
    /// follow try once and fail, while etcd answers.
    pub(super) fn ran_out(&self, started: tokio::time::Instant) {
        let mut state = lock(&self.0);
        if state.answered_at.is_none_or(|at| at < started) {
            state.lost_at = Some(tokio::time::Instant::now());
        }
    }

    /// etcd answered a request through its quorum.
    pub(super) fn answered(&self) {
        let mut state = lock(&self.0);
        state.lost_at = None;
        state.answered_at = Some(tokio::time::Instant::now());
    }
}

/// What sends requests to etcd: the client, and the state its retries
/// share (see [`EtcdBackend::call`]). Cloned into tasks on the backend's
/// runtime (`start`, the write combiner).
#[derive(Clone)]
pub(super) struct Sender {
    client: Client,
    lost: LostFlag,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Sender {
    /// Sends `work` with the retries and deadline of [`EtcdBackend::call`].
    pub(super) async fn send<T, F, Fut>(
        &self,
        operation: &'static str,
        resend: Resend,
        work: F,
    ) -> Result<T, StorageError>
    where
        F: FnOnce(Client) -> Fut + Clone,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        let started = tokio::time::Instant::now();
        let deadline = started + CALL_DEADLINE;
        let known_lost = self.lost.known();
        let mut tries = 0u64;
        loop {
            self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let attempt = (work.clone())(self.client.clone());
            let bound = match resend {
                Resend::Read => deadline.min(tokio::time::Instant::now() + READ_TRY),
                Resend::IfNotApplied => deadline,
            };
            let result = match tokio::time::timeout_at(bound, attempt).await {
                Ok(result) => result,
                // A read that hung: sent again while the deadline allows.
                Err(_) if tokio::time::Instant::now() < deadline => {
                    Err(StorageError::Unavailable(format!(
                        "{operation}: etcd did not answer within {} s",
                        READ_TRY.as_secs()
                    )))
                }
                Err(_) => {
                    self.lost.ran_out(started);
                    break Err(past_deadline(operation, resend));
                }
            };
            match result {
                Err(StorageError::Unavailable(message)) if resend.allows(&message) => {
                    if !Resend::IfNotApplied.allows(&message) {
                        // A read that met a member as it died (rare):
                        // logged so that an operator (and the tests)
                        // can see it was answered by another member.
                        tracing::info!(operation, reason = %message, "etcd read sent again");
                    }
                    // While the loss is known, a try that was never sent
                    // (the client picked a member that is down) says
                    // nothing of the quorum: it is made again on another
                    // member, a few times at most.
                    let another_member = message.contains(NOT_SENT) && tries < LOST_NOT_SENT_TRIES;
                    if (known_lost && !another_member) || started.elapsed() >= RIDE_OUT {
                        self.lost.ran_out(started);
                        let retried = if known_lost {
                            "tried once (a member that could not be reached not counted), \
                             as no request has succeeded since the last ran out of retries"
                                .to_owned()
                        } else {
                            format!("still so after {} s of retries", RIDE_OUT.as_secs())
                        };
                        break Err(StorageError::Unavailable(format!(
                            "{message}; {retried}: the etcd cluster has lost its quorum \
                             or cannot be reached"
                        )));
                    }
                    tries += 1;
                    let pause = Duration::from_millis((20 * tries).min(250));
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    tokio::time::sleep(pause.min(left)).await;
                }
                Ok(answer) => {
                    self.lost.answered();
                    break Ok(answer);
                }
                other => break other,
            }
        }
    }
}

/// The epoch's read: the revision of its last write (0 when never written).
fn epoch_read(
    key: Vec<u8>,
) -> impl FnOnce(
    Client,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<i64, StorageError>> + Send>,
> + Clone
       + Send
       + 'static {
    move |mut client: Client| {
        Box::pin(async move {
            let answer = client
                .get(key, Some(GetOptions::new().with_keys_only()))
                .await
                .map_err(|e| etcd_error("cache fence", e))?;
            Ok(answer.kvs().first().map_or(0, |kv| kv.mod_revision()))
        })
    }
}

/// The error of a call that [`CALL_DEADLINE`] ended.
fn past_deadline(operation: &'static str, resend: Resend) -> StorageError {
    let applied = match resend {
        Resend::Read => "",
        Resend::IfNotApplied => "; a write may or may not have been applied",
    };
    StorageError::Unavailable(format!(
        "{operation}: etcd did not answer within keyward's deadline of {} s{applied}: the etcd \
         cluster has lost its quorum or cannot be reached",
        CALL_DEADLINE.as_secs()
    ))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// No answer came back from the backend's runtime within `WAIT_BOUND`.
fn no_answer() -> StorageError {
    StorageError::Unavailable(
        "etcd: no answer from the etcd client in time; a write may or may not have been applied"
            .into(),
    )
}

/// Waits for an answer from the backend's runtime (see the module doc).
fn wait<T>(rx: mpsc::Receiver<T>) -> Result<T, StorageError> {
    super::off_worker(|| rx.recv_timeout(WAIT_BOUND).map_err(|_| no_answer()))
}

impl EtcdBackend {
    /// One linearizable read of `key` (a barrier key): its value and the
    /// revision that wrote it.
    fn get_with_revision(&self, key: &[u8]) -> Result<Option<(Vec<u8>, i64)>, StorageError> {
        let _timer = self.time("get");
        let key = self.data_key(key);
        self.call("get", Resend::Read, move |mut client| async move {
            let mut answer = client
                .get(key, None)
                .await
                .map_err(|e| etcd_error("get", e))?;
            Ok(answer.take_kvs().into_iter().next().map(|kv| {
                let revision = kv.mod_revision();
                (kv.into_key_value().1, revision)
            }))
        })
    }

    /// Stops the write combiner from sending until the guard is dropped
    /// (tests: writes queued meanwhile go together; `etcd_combine`).
    #[doc(hidden)]
    pub fn hold_writes(&self) -> Option<WriteHold> {
        self.combiner.as_ref().map(Combiner::hold)
    }

    /// Writes waiting in the combiner (tests, with [`Self::hold_writes`]).
    #[doc(hidden)]
    pub fn writes_queued(&self) -> usize {
        self.combiner.as_ref().map_or(0, Combiner::queued)
    }

    /// The read cache's metrics, for `/metrics`.
    pub fn read_cache_metrics(&self) -> ReadCacheMetrics {
        self.read_cache.metrics()
    }

    /// The read lease's metrics, for `/metrics`.
    pub fn read_lease_metrics(&self) -> ReadLeaseMetrics {
        self.read_lease_metrics.clone()
    }
}

impl Backend for EtcdBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.get_with_revision(key)?.map(|(value, _)| value))
    }

    /// A fresh request (its fence held) is answered from the read cache
    /// when it holds the key; any other read goes to etcd, and what it
    /// returns is inserted under the insert rule (`read_cache`).
    fn get_fenced(&self, key: &[u8], fresh: bool) -> Result<Option<Vec<u8>>, StorageError> {
        if !self.read_cache.covers(key) {
            return self.get(key);
        }
        if fresh {
            if let Some(value) = self.read_cache.get(key) {
                return Ok(Some(value));
            }
        }
        let ticket = self.read_cache.ticket();
        let found = self.get_with_revision(key)?;
        Ok(found.map(|(value, revision)| {
            self.read_cache.insert(key, &value, revision, ticket);
            value
        }))
    }

    fn cache_reads(&self, prefix: &str) {
        let (on_change, on_reset) = (self.read_cache.clone(), self.read_cache.clone());
        if !self.read_cache.add_prefix(prefix) {
            return;
        }
        self.coherence.track_revisions(
            prefix,
            std::sync::Arc::new(move |key: &[u8], revision: i64| on_change.changed(key, revision)),
            std::sync::Arc::new(move || on_reset.reset()),
        );
    }

    fn read_cache_figures(&self) -> Option<ReadCacheFigures> {
        Some(self.read_cache.figures())
    }

    /// One transaction's operations, less the one the change marker may
    /// take (see `batch`).
    fn max_batch_ops(&self) -> usize {
        MAX_TXN_OPS - 1
    }

    fn max_batch_bytes(&self) -> usize {
        MAX_REQUEST_BYTES
    }

    fn requests_sent(&self) -> Option<u64> {
        Some(self.sent.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        if key.len() + value.len() > MAX_REQUEST_BYTES {
            return Err(StorageError::Io(format!(
                "put: the value is larger than etcd's request limit ({MAX_REQUEST_BYTES} bytes)"
            )));
        }
        let _timer = self.time("put");
        self.txn(vec![BatchOp::Put(key.to_vec(), value.to_vec())], "put")
    }

    fn delete(&self, key: &[u8]) -> Result<(), StorageError> {
        let _timer = self.time("delete");
        self.txn(vec![BatchOp::Delete(key.to_vec())], "delete")
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StorageError> {
        let _timer = self.time("scan");
        let start = self.data_key(prefix);
        let end = prefix_end(&start);
        self.scan_range_raw(start, end, usize::MAX)
    }

    fn scan_range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<KeyValues, StorageError> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let _timer = self.time("scan");
        self.scan_range_raw(self.data_key(start), self.data_key(end), limit)
    }

    fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, StorageError> {
        let _timer = self.time("compare_and_swap");
        let bump = self.coherence.tracks(key);
        let tracked = if bump { vec![key.to_vec()] } else { Vec::new() };
        let epoch = self.epoch_op();
        let key = self.data_key(key);
        let compare = match expected {
            Some(value) => Compare::value(key.clone(), CompareOp::Equal, value.to_vec()),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        };
        let write = match new {
            Some(value) => TxnOp::put(key.clone(), value.to_vec(), None),
            None => TxnOp::delete(key.clone(), None),
        };
        // Under a fence the same transaction also compares the leader
        // key, and on failure reads it to tell a lost term from a conflict.
        let fence = cluster::current();
        let mut compares = vec![compare];
        let mut otherwise = vec![TxnOp::get(key, None)];
        if let Some(fence) = &fence {
            compares.push(fence_compare(fence));
            otherwise.push(TxnOp::get(fence.key.clone(), None));
        }
        let term = fence.as_ref().map(|f| f.revision);
        let writes = if bump {
            vec![write, epoch]
        } else {
            vec![write]
        };
        let outcome = self.call(
            "compare_and_swap",
            Resend::IfNotApplied,
            move |mut client| async move {
                let answer = client
                    .txn(
                        Txn::new()
                            .when(compares)
                            .and_then(writes)
                            .or_else(otherwise),
                    )
                    .await
                    .map_err(|e| etcd_error("compare_and_swap", e))?;
                if answer.succeeded() {
                    let revision = answer.header().map_or(0, |h| h.revision());
                    return Ok((CasOutcome::Swapped, revision));
                }
                let mut reads = answer.op_responses().into_iter().filter_map(|r| match r {
                    TxnOpResponse::Get(mut get) => Some(get.take_kvs().into_iter().next()),
                    _ => None,
                });
                let current = reads.next().flatten().map(|kv| kv.into_key_value().1);
                if let Some(revision) = term {
                    let holder = reads.next().flatten().map(|kv| kv.create_revision());
                    if holder != Some(revision) {
                        return Err(fenced_error("compare_and_swap"));
                    }
                }
                Ok((CasOutcome::Conflict { current }, 0))
            },
        )?;
        self.settle(outcome.1, tracked)?;
        Ok(outcome.0)
    }

    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let _timer = self.time("batch");
        let ops = fold(ops);
        let bytes: usize = ops.iter().map(op_bytes).sum();
        // The epoch's write takes one of etcd's operations.
        let room = MAX_TXN_OPS - usize::from(self.bumps(&ops));
        if ops.len() > room || bytes > MAX_REQUEST_BYTES {
            return Err(StorageError::Io(format!(
                "batch: {} operations of {bytes} bytes exceed one etcd transaction \
                 ({MAX_TXN_OPS} operations, {MAX_REQUEST_BYTES} bytes); an atomic batch cannot \
                 be split, so nothing was written",
                ops.len()
            )));
        }
        self.txn(ops, "batch")
    }

    /// One transaction: the values of `expect` compared (and, under a
    /// leader's fence, its term), then `ops` and the change marker. What it
    /// wrote under a cached prefix goes into the read cache at the
    /// transaction's revision, under the insert rule (a ticket taken
    /// before it was sent).
    fn batch_if(&self, expect: Expected, ops: Vec<BatchOp>) -> Result<bool, StorageError> {
        // Timed as a batch: it is one, with comparisons.
        let _timer = self.time("batch");
        let ops = fold(ops);
        let bytes: usize = ops.iter().map(op_bytes).sum::<usize>()
            + expect
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 16)
                .sum::<usize>();
        if ops.len() > MAX_TXN_OPS - usize::from(self.bumps(&ops)) || bytes > MAX_REQUEST_BYTES {
            return Err(StorageError::Io(format!(
                "batch_if: {} operations of {bytes} bytes exceed one etcd transaction \
                 ({MAX_TXN_OPS} operations, {MAX_REQUEST_BYTES} bytes); nothing was written",
                ops.len()
            )));
        }
        let cached: Vec<(Vec<u8>, Vec<u8>, super::read_cache::Ticket)> = ops
            .iter()
            .filter_map(|op| match op {
                BatchOp::Put(key, value) if self.read_cache.covers(key) => {
                    Some((key.clone(), value.clone(), self.read_cache.ticket()))
                }
                _ => None,
            })
            .collect();
        let mut compared = Vec::with_capacity(expect.len());
        let compares: Vec<Compare> = expect
            .into_iter()
            .map(|(key, value)| {
                let key = self.data_key(&key);
                compared.push(key.clone());
                match value {
                    Some(value) => Compare::value(key, CompareOp::Equal, value),
                    None => Compare::version(key, CompareOp::Equal, 0),
                }
            })
            .collect();
        let tracked = self.tracked_keys(&ops);
        let fence = cluster::current();
        let written = match fence {
            None => {
                let ops_len = ops.len();
                let mut write = self.unguarded(ops, "batch_if");
                write.compares = compares;
                write.bytes = bytes + (ops_len + compared.len()) * self.data.len();
                write.keys.extend(compared);
                self.combined(write)?
            }
            Some(fence) => self.fenced_if(compares, ops, fence)?,
        };
        let Some(revision) = written else {
            return Ok(false);
        };
        // The caches take the write first (what it replaced goes), then
        // what it wrote goes into the read cache, under the insert rule.
        let settled = self.settle(revision, tracked);
        if revision > 0 {
            for (key, value, ticket) in cached {
                self.read_cache.insert(&key, &value, revision, ticket);
            }
        }
        settled.map(|()| true)
    }

    fn apply_in_order(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let _timer = self.time("apply_in_order");
        let mut chunk: Vec<BatchOp> = Vec::new();
        let mut chunk_bytes = 0usize;
        for op in ops {
            let size = op_bytes(&op);
            if size > MAX_REQUEST_BYTES {
                // Stop before it: the earlier operations are a prefix.
                self.txn(fold(std::mem::take(&mut chunk)), "apply_in_order")?;
                return Err(StorageError::Io(format!(
                    "apply_in_order: an operation is larger than etcd's request limit \
                     ({MAX_REQUEST_BYTES} bytes)"
                )));
            }
            // One operation is left for the epoch's write.
            if chunk.len() == MAX_TXN_OPS - 1 || chunk_bytes + size > MAX_REQUEST_BYTES {
                self.txn(fold(std::mem::take(&mut chunk)), "apply_in_order")?;
                chunk_bytes = 0;
            }
            chunk_bytes += size;
            chunk.push(op);
        }
        self.txn(fold(chunk), "apply_in_order")
    }

    /// A no-op: an answered etcd write is committed on a quorum already.
    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Every data pair at one etcd revision (the first page's), while
    /// writes go on.
    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StorageError> {
        let strip = self.data.len();
        self.scan_pages(
            self.data.clone(),
            prefix_end(&self.data),
            usize::MAX,
            &mut |key, value| sink(&key[strip..], &value),
        )
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn coherence(&self) -> Option<&Coherence> {
        Some(&self.coherence)
    }

    fn cache_fence(&self) -> bool {
        if self.coherence.leased() {
            return true;
        }
        let read = || self.read_epoch();
        super::off_worker(|| self.coherence.fence(&read))
    }

    fn cache_fence_async(&self) -> super::FenceFuture<'_> {
        Box::pin(async move {
            // A request's whole wait: the shared read and the watch's
            // catching up (the read alone is timed as `cache_fence`).
            if self.coherence.leased() {
                return true;
            }
            let _timer = self.time("fence_wait");
            self.coherence.fence_async(|| self.read_epoch_async()).await
        })
    }
}

// ---------------------------------------------------------------- leadership, fence, timings

/// The leader key, under the prefix (outside the data keys).
const LEADER_KEY: &[u8] = b"l/leader";

/// The label of `keyward_etcd_request_duration_seconds`: the trait call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct EtcdOpLabels {
    op: std::borrow::Cow<'static, str>,
}

/// Request durations by trait call (a histogram family the server registers).
pub type RequestDurations = prometheus_client::metrics::family::Family<
    EtcdOpLabels,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

/// Buckets of the request durations: 250 µs to 10 s (etcd's own bound).
const DURATION_BUCKETS: [f64; 13] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

fn duration_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(DURATION_BUCKETS)
}

/// What the backend keeps beside the client for leadership and metrics.
struct Extra {
    prefix: Vec<u8>,
    durations: RequestDurations,
}

impl Extra {
    fn new(prefix: &[u8]) -> Self {
        Self {
            prefix: prefix.to_vec(),
            durations: RequestDurations::new_with_constructor(duration_histogram),
        }
    }
}

/// Observes one trait call's duration when dropped.
struct Timer<'a> {
    op: &'static str,
    started: std::time::Instant,
    durations: &'a RequestDurations,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.durations
            .get_or_create(&EtcdOpLabels {
                op: std::borrow::Cow::Borrowed(self.op),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Observes one request's duration under `op`, for requests made outside
/// the trait calls (the leader's compaction).
pub(super) fn observe(durations: &RequestDurations, op: &'static str, seconds: f64) {
    durations
        .get_or_create(&EtcdOpLabels {
            op: std::borrow::Cow::Borrowed(op),
        })
        .observe(seconds);
}

/// The comparison that holds while `fence`'s term does.
fn fence_compare(fence: &Fence) -> Compare {
    Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.revision)
}

fn fenced_error(operation: &'static str) -> StorageError {
    StorageError::Io(format!(
        "{operation}: {}: its leader term ended (lease expired or another node leads), \
         nothing was written",
        cluster::FENCED
    ))
}

impl EtcdBackend {
    fn time(&self, op: &'static str) -> Timer<'_> {
        Timer {
            op,
            started: std::time::Instant::now(),
            durations: &self.extra.durations,
        }
    }

    /// The request durations by trait call, for `/metrics`.
    pub fn request_durations(&self) -> RequestDurations {
        self.extra.durations.clone()
    }

    /// The raw etcd key whose holder leads (`PREFIX l/leader`).
    pub fn leader_key(&self) -> Vec<u8> {
        [self.extra.prefix.as_slice(), LEADER_KEY].concat()
    }

    /// The mark of a lost quorum that `call` keeps; the election loop
    /// clears it when etcd answers one of its requests.
    pub(super) fn lost_flag(&self) -> LostFlag {
        self.lost.clone()
    }

    /// A client on the backend's runtime, and that runtime (for `etcd_leader`).
    pub(super) fn client_and_runtime(&self) -> Option<(Client, tokio::runtime::Handle)> {
        self.runtime
            .as_ref()
            .map(|runtime| (self.client.clone(), runtime.handle().clone()))
    }

    /// `batch_if` under a leader's fence: the same transaction also
    /// compares the leader key, and on failure reads it to tell a lost term
    /// (an error) from a failed comparison.
    fn fenced_if(
        &self,
        mut compares: Vec<Compare>,
        ops: Vec<BatchOp>,
        fence: Fence,
    ) -> Result<Option<i64>, StorageError> {
        compares.push(fence_compare(&fence));
        let otherwise = vec![TxnOp::get(fence.key.clone(), None)];
        let term = fence.revision;
        let txn_ops = self.write_ops(ops);
        self.call(
            "batch_if",
            Resend::IfNotApplied,
            move |mut client| async move {
                let answer = client
                    .txn(
                        Txn::new()
                            .when(compares)
                            .and_then(txn_ops)
                            .or_else(otherwise),
                    )
                    .await
                    .map_err(|e| etcd_error("batch_if", e))?;
                if answer.succeeded() {
                    return Ok(Some(answer.header().map_or(0, |h| h.revision())));
                }
                let holder = answer
                    .op_responses()
                    .into_iter()
                    .find_map(|r| match r {
                        TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
                        _ => None,
                    })
                    .map(|kv| kv.create_revision());
                if holder != Some(term) {
                    return Err(fenced_error("batch_if"));
                }
                Ok(None)
            },
        )
    }

    /// Sends `ops` as one transaction that applies only while `fence`'s
    /// term holds; a lost term is [`cluster::FENCED`] and nothing is written.
    /// The revision it applied at.
    fn fenced(
        &self,
        ops: Vec<TxnOp>,
        fence: Fence,
        operation: &'static str,
    ) -> Result<i64, StorageError> {
        let compare = fence_compare(&fence);
        self.call(
            operation,
            Resend::IfNotApplied,
            move |mut client| async move {
                let answer = client
                    .txn(Txn::new().when([compare]).and_then(ops))
                    .await
                    .map_err(|e| etcd_error(operation, e))?;
                if answer.succeeded() {
                    Ok(answer.header().map_or(0, |h| h.revision()))
                } else {
                    Err(fenced_error(operation))
                }
            },
        )
    }

    /// Whether the term (`key` created at `revision`) still holds: a
    /// transaction that only compares.
    pub fn check_term(&self, key: Vec<u8>, revision: i64) -> Result<(), StorageError> {
        let _timer = self.time("fence_check");
        let compare = Compare::create_revision(key, CompareOp::Equal, revision);
        self.call("fence check", Resend::Read, move |mut client| async move {
            let answer = client
                .txn(Txn::new().when([compare]))
                .await
                .map_err(|e| etcd_error("fence check", e))?;
            if answer.succeeded() {
                Ok(())
            } else {
                Err(fenced_error("fence check"))
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_lost_mark_lasts_the_ride_out_unless_etcd_answers() {
        let lost = LostFlag::default();
        assert!(!lost.known());
        lost.ran_out(tokio::time::Instant::now());
        assert!(lost.known());
        tokio::time::advance(RIDE_OUT - Duration::from_millis(1)).await;
        assert!(lost.known());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!lost.known(), "the mark ends after the ride-out");
        lost.ran_out(tokio::time::Instant::now());
        lost.answered();
        assert!(!lost.known(), "an answer clears it");
    }

    /// A call that began before an answer it did not see (the election
    /// loop's) and ran out of retries after it does not mark the quorum
    /// lost again: the calls that follow would be tried once while etcd
    /// answers. A call begun after the answer still marks it.
    #[tokio::test(start_paused = true)]
    async fn a_call_begun_before_an_answer_does_not_mark_the_quorum_lost_again() {
        let lost = LostFlag::default();
        let before = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        lost.answered();
        tokio::time::advance(Duration::from_millis(10)).await;
        let after = tokio::time::Instant::now();
        tokio::time::advance(RIDE_OUT).await;
        lost.ran_out(before);
        assert!(!lost.known(), "a stale failure set the mark again");
        lost.ran_out(after);
        assert!(lost.known(), "a failure begun after the answer counts");
    }

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"kw/d/"), b"kw/d0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), Vec::<u8>::new());
    }

    #[test]
    fn reads_are_sent_again_after_any_unanswered_request_writes_only_when_unapplied() {
        let not_sent = format!("put: {NOT_SENT}: tcp connect error");
        let no_leader = format!("put: {NO_LEADER} (...); nothing was applied");
        let broken = "put: etcd did not answer (Unknown: transport error); a write may or may \
                      not have been applied";
        let changed = "put: etcd did not answer (Unavailable: etcdserver: leader changed); a \
                       write may or may not have been applied";
        for message in [&not_sent, &no_leader] {
            assert!(Resend::Read.allows(message));
            assert!(Resend::IfNotApplied.allows(message));
        }
        for message in [broken, changed] {
            assert!(Resend::Read.allows(message));
            assert!(!Resend::IfNotApplied.allows(message), "{message}");
        }
    }

    #[test]
    fn the_call_deadline_ends_the_retries() {
        // The last try starts before the ride-out ends and the deadline cuts
        // it; the wait on the caller's side outlasts both.
        assert!(RIDE_OUT < CALL_DEADLINE);
        assert!(CALL_DEADLINE < WAIT_BOUND);
        assert!(CALL_DEADLINE < REQUEST_TIMEOUT);
    }

    #[test]
    fn fold_keeps_the_last_operation_per_key() {
        let ops = vec![
            BatchOp::Put(b"a".to_vec(), b"1".to_vec()),
            BatchOp::Put(b"b".to_vec(), b"1".to_vec()),
            BatchOp::Delete(b"a".to_vec()),
        ];
        let folded = fold(ops);
        assert_eq!(folded.len(), 2);
        assert!(matches!(&folded[0], BatchOp::Put(k, _) if k == b"b"));
        assert!(matches!(&folded[1], BatchOp::Delete(k) if k == b"a"));
    }
}
