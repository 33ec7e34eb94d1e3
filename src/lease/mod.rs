//! Leases: a credential made for one token on a system keyward does not
//! own (a database user), with an expiry, and the one sleeper that revokes
//! it on that system when the expiry comes.
//!
//! Storage prefix `leases/` (through the barrier, encrypted like every
//! value; this module touches no other prefix):
//! - `leases/rec/<lease id>` -> the [`LeaseRecord`];
//! - `leases/exp/<16 hex digits, ms>/<lease id>` -> empty: the time-ordered
//!   index the sleeper reads from its start (one key per lease);
//! - `leases/tok/<token accessor>/<lease id>` -> empty: the leases of a token,
//!   read when the token is revoked;
//! - `leases/failed/<lease id>` -> the last error text: leases whose
//!   revocation on the target failed and is being retried.
//!
//! Nothing is loaded at start-up: the sleeper reads the first key of
//! `leases/exp/` and sleeps until it is due.
//!
//! A lease id is `dynamic/<role>/<24 random letters and digits>`, so the
//! leases of a role are one prefix of `leases/rec/`.
//!
//! Order of a revocation (sleeper, `revoke`, token hook): under the write
//! lock the record is marked `revoking` (a renew is refused from then on)
//! and its expiry entry moved to now; the [`Revoker`] then acts on the
//! target without the lock; on success every key of the lease goes in one
//! atomic batch; on failure the attempt count and the error are written, the
//! lease enters `leases/failed/` and its expiry entry moves to the next try
//! (back-off from 1 s doubling to 5 min), forever: a lease is never
//! forgotten, across restarts too.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prost::Message;
use tokio::sync::Notify;

use crate::barrier::{Barrier, BarrierError, PlainOp};
use crate::clock::{Clock, Shutdown};

mod identity;

const REC_PREFIX: &str = "leases/rec/";
const EXP_PREFIX: &str = "leases/exp/";
/// The first key after every `leases/exp/...` key (`0` follows `/`).
const EXP_END: &str = "leases/exp0";
const TOK_PREFIX: &str = "leases/tok/";
const FAILED_PREFIX: &str = "leases/failed/";
/// Due leases revoked per sleeper round, at most this many at once.
const SWEEP_BATCH: usize = 64;
/// Revocations on targets running at the same time in one round.
const SWEEP_PARALLEL: usize = 16;
/// The longest the sleeper sleeps without looking again.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// Back-off of a failed revocation: 1 s, doubling, at most this.
const MAX_BACKOFF_MS: u64 = 300_000;
/// Longest error text kept in a record.
const MAX_ERROR_LEN: usize = 512;

/// # Test-only fault point
///
/// `KEYWARD_TEST_LEASE_CRASH_AFTER=<step>` (`recorded`: the lease is on
/// disk, no user made yet; `created`: the user is made, no answer sent;
/// `marked`: a revocation is marked on disk, the target not yet touched),
/// read once, kills the process with SIGKILL at that point. It exists for
/// the crash tests and is DANGER for anything else: never set it on a real
/// server.
static DANGER_TEST_CRASH_AFTER: OnceLock<Option<String>> = OnceLock::new();

/// Kills the process (SIGKILL) if the fault point names `step`.
pub fn danger_test_fault_point(step: &str) {
    let armed = DANGER_TEST_CRASH_AFTER
        .get_or_init(|| {
            std::env::var("KEYWARD_TEST_LEASE_CRASH_AFTER")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .as_deref()
        .is_some_and(|s| s == step);
    if armed {
        tracing::error!(step, "test fault point: killing the process");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        std::process::abort();
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("no such lease")]
    NotFound,
    #[error("the lease is being revoked; it cannot be renewed")]
    Revoking,
    #[error("the lease has expired; it cannot be renewed")]
    Expired,
    #[error("invalid lease request: {0}")]
    Invalid(String),
    #[error("stored lease record is corrupt")]
    Corrupt,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

/// One lease, under `leases/rec/<id>`. Holds no password: only what is
/// needed to find and revoke the user.
#[derive(Clone, PartialEq, Message)]
pub struct LeaseRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    /// The accessor of the token that holds it.
    #[prost(string, tag = "2")]
    pub accessor: String,
    #[prost(string, tag = "3")]
    pub identity: String,
    /// The dynamic role it was issued from.
    #[prost(string, tag = "4")]
    pub role: String,
    /// `postgres`, `mysql`, `redis`.
    #[prost(string, tag = "5")]
    pub provider: String,
    /// The user made on the target.
    #[prost(string, tag = "6")]
    pub username: String,
    #[prost(string, tag = "7")]
    pub host: String,
    #[prost(uint32, tag = "8")]
    pub port: u32,
    #[prost(string, tag = "9")]
    pub database: String,
    /// The secret whose login made the user (and revokes it).
    #[prost(string, tag = "10")]
    pub admin_secret: String,
    #[prost(uint64, tag = "11")]
    pub created_ms: u64,
    #[prost(uint64, tag = "12")]
    pub expires_ms: u64,
    /// Renewals never go past this: the role's max TTL from creation, and
    /// the token's own end.
    #[prost(uint64, tag = "13")]
    pub max_expiry_ms: u64,
    /// The role's TTL: the default renew increment.
    #[prost(uint64, tag = "14")]
    pub ttl_ms: u64,
    /// Revocation has started: the lease can no longer be renewed.
    #[prost(bool, tag = "15")]
    pub revoking: bool,
    /// Failed revocation attempts so far.
    #[prost(uint32, tag = "16")]
    pub failures: u32,
    #[prost(string, tag = "17")]
    pub last_error: String,
    /// A plugin role's `--config` pairs, for its `Revoke` (no secret among
    /// them; empty for the built-in providers).
    #[prost(btree_map = "string, string", tag = "18")]
    pub settings: std::collections::BTreeMap<String, String>,
}

/// Acts on the target of a lease: removes the user it names. Idempotent
/// (a user already gone is success). The dynamic module implements it.
pub trait Revoker: Send + Sync {
    fn revoke<'a>(&'a self, lease: &'a LeaseRecord) -> BoxFuture<'a, Result<(), String>>;
}

/// What became of one revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The user is gone and so is the lease.
    Done,
    /// The target refused or could not be reached: the sleeper retries.
    Pending(String),
}

/// A cheap handle: clones share one store.
#[derive(Clone)]
pub struct LeaseStore {
    inner: Arc<Inner>,
}

struct Inner {
    barrier: Arc<Barrier>,
    clock: Clock,
    revoker: OnceLock<Arc<dyn Revoker>>,
    /// Every read-modify-write of a record.
    writes: Mutex<()>,
    wake: Notify,
}

fn rec_key(id: &str) -> String {
    format!("{REC_PREFIX}{id}")
}

fn exp_key(at_ms: u64, id: &str) -> String {
    format!("{EXP_PREFIX}{at_ms:016x}/{id}")
}

fn tok_key(accessor: &str, id: &str) -> String {
    format!("{TOK_PREFIX}{accessor}/{id}")
}

fn failed_key(id: &str) -> String {
    format!("{FAILED_PREFIX}{id}")
}

fn parse_exp_key(key: &str) -> Option<(u64, &str)> {
    let rest = key.strip_prefix(EXP_PREFIX)?;
    let (time, id) = rest.split_once('/')?;
    Some((u64::from_str_radix(time, 16).ok()?, id))
}

fn backoff_ms(failures: u32) -> u64 {
    1000u64
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(MAX_BACKOFF_MS)
}

fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_ERROR_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Checks a lease prefix (`dynamic` or `dynamic/<role>`...): segments of
/// `[A-Za-z0-9_-]`, no empty one; returns it without a trailing `/`.
pub fn check_prefix(prefix: &str) -> Result<&str, LeaseError> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    let ok = !trimmed.is_empty()
        && trimmed.len() <= 256
        && trimmed.split('/').all(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(trimmed)
    } else {
        Err(LeaseError::Invalid(
            "a lease prefix is segments of letters, digits, '_' and '-' joined by '/' (e.g. dynamic/app)".into(),
        ))
    }
}

impl LeaseStore {
    pub fn new(barrier: Arc<Barrier>, clock: Clock) -> Self {
        Self {
            inner: Arc::new(Inner {
                barrier,
                clock,
                revoker: OnceLock::new(),
                writes: Mutex::new(()),
                wake: Notify::new(),
            }),
        }
    }

    /// Who removes users on targets (set once, by the owner of the
    /// providers, before the sleeper runs).
    pub fn set_revoker(&self, revoker: Arc<dyn Revoker>) {
        let _ = self.inner.revoker.set(revoker);
    }

    fn barrier(&self) -> &Barrier {
        &self.inner.barrier
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new lease with its index entries, durably: the caller
    /// makes the user on the target only after this returns.
    pub async fn create(&self, record: &LeaseRecord) -> Result<(), LeaseError> {
        let bytes = record.encode_to_vec();
        let rec = rec_key(&record.id);
        let exp = exp_key(record.expires_ms, &record.id);
        let tok = tok_key(&record.accessor, &record.id);
        self.barrier().batch(&[
            PlainOp::Put(&rec, &bytes),
            PlainOp::Put(&exp, b""),
            PlainOp::Put(&tok, b""),
        ])?;
        self.barrier().durable().await?;
        self.wake_if_before(record.expires_ms);
        Ok(())
    }

    /// Writes the account a plugin made (name, address) into its lease,
    /// durably; the rest of the stored record is kept. A lease revoked
    /// meanwhile is left as it is (its revocation went by the lease id).
    pub async fn set_account(&self, account: &LeaseRecord) -> Result<(), LeaseError> {
        {
            let _guard = self.lock();
            let Some(mut record) = self.get(&account.id)? else {
                return Ok(());
            };
            record.username = account.username.clone();
            record.host = account.host.clone();
            record.port = account.port;
            record.database = account.database.clone();
            self.barrier()
                .put(&rec_key(&account.id), &record.encode_to_vec())?;
        }
        self.barrier().durable().await?;
        Ok(())
    }

    fn wake_if_before(&self, _at_ms: u64) {
        // One sleeper, woken for any new entry: it reads the first key
        // again, one scan, and sleeps until that one.
        self.inner.wake.notify_one();
    }

    pub fn get(&self, id: &str) -> Result<Option<LeaseRecord>, LeaseError> {
        match self.barrier().get(&rec_key(id))? {
            Some(raw) => Ok(Some(
                LeaseRecord::decode(raw.as_slice()).map_err(|_| LeaseError::Corrupt)?,
            )),
            None => Ok(None),
        }
    }

    /// Leases whose id starts with `prefix/` (a whole segment), or all of
    /// them for an empty prefix; with `failed_only`, those whose revocation
    /// is failing.
    pub fn list(&self, prefix: &str, failed_only: bool) -> Result<Vec<LeaseRecord>, LeaseError> {
        let mut out = Vec::new();
        if failed_only {
            let scan = if prefix.is_empty() {
                FAILED_PREFIX.to_owned()
            } else {
                format!("{FAILED_PREFIX}{prefix}/")
            };
            for key in self.barrier().scan_keys(&scan)? {
                if let Some(id) = key.strip_prefix(FAILED_PREFIX) {
                    if let Some(r) = self.get(id)? {
                        out.push(r);
                    }
                }
            }
            return Ok(out);
        }
        let scan = if prefix.is_empty() {
            REC_PREFIX.to_owned()
        } else {
            format!("{REC_PREFIX}{prefix}/")
        };
        for (_, raw) in self.barrier().scan_prefix(&scan)? {
            out.push(LeaseRecord::decode(raw.as_slice()).map_err(|_| LeaseError::Corrupt)?);
        }
        Ok(out)
    }

    /// How many leases are failing to be revoked (for the metric and the
    /// governance report).
    pub fn failed_count(&self) -> Result<usize, LeaseError> {
        Ok(self.barrier().scan_keys(FAILED_PREFIX)?.len())
    }

    /// Extends a lease by `increment` (the role's TTL if `None`) from now,
    /// never past its max expiry nor `cap_ms` (the holder token's end; 0 for
    /// none). Returns the new record.
    pub async fn renew(
        &self,
        id: &str,
        increment: Option<Duration>,
        cap_ms: u64,
    ) -> Result<LeaseRecord, LeaseError> {
        let now = self.inner.clock.now_ms();
        let record = {
            let _guard = self.lock();
            let mut record = self.get(id)?.ok_or(LeaseError::NotFound)?;
            if record.revoking {
                return Err(LeaseError::Revoking);
            }
            if now >= record.expires_ms {
                return Err(LeaseError::Expired);
            }
            let inc = increment.map_or(record.ttl_ms, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            });
            let mut until = now.saturating_add(inc).min(record.max_expiry_ms);
            if cap_ms != 0 {
                until = until.min(cap_ms);
            }
            // Never shorter than now: a renew does not end a lease.
            let until = until.max(record.expires_ms);
            if until != record.expires_ms {
                let old = exp_key(record.expires_ms, id);
                record.expires_ms = until;
                let bytes = record.encode_to_vec();
                let rec = rec_key(id);
                let new = exp_key(until, id);
                self.barrier().batch(&[
                    PlainOp::Put(&rec, &bytes),
                    PlainOp::Put(&new, b""),
                    PlainOp::Delete(&old),
                ])?;
            }
            record
        };
        self.barrier().durable().await?;
        Ok(record)
    }

    /// Marks a lease for revocation now: `revoking`, its expiry entry moved
    /// to now (so the sleeper retries it if this process stops). Returns the
    /// record, `None` if there is no such lease.
    fn mark_revoking(&self, id: &str, now_ms: u64) -> Result<Option<LeaseRecord>, LeaseError> {
        let _guard = self.lock();
        let Some(mut record) = self.get(id)? else {
            return Ok(None);
        };
        if record.revoking && record.expires_ms <= now_ms {
            return Ok(Some(record));
        }
        let old = exp_key(record.expires_ms, id);
        record.revoking = true;
        record.expires_ms = record.expires_ms.min(now_ms);
        let bytes = record.encode_to_vec();
        let rec = rec_key(id);
        let new = exp_key(record.expires_ms, id);
        let mut ops = vec![PlainOp::Put(&rec, &bytes), PlainOp::Put(&new, b"")];
        if old != new {
            ops.push(PlainOp::Delete(&old));
        }
        self.barrier().batch(&ops)?;
        Ok(Some(record))
    }

    /// Revokes a lease now: marks it (durably), removes the user on the
    /// target and then the lease. A target that refuses or is down leaves
    /// the lease failing, retried by the sleeper.
    pub async fn revoke(&self, id: &str) -> Result<Option<Revoked>, LeaseError> {
        let now = self.inner.clock.now_ms();
        let Some(record) = self.mark_revoking(id, now)? else {
            return Ok(None);
        };
        self.barrier().durable().await?;
        danger_test_fault_point("marked");
        self.attempt(record).await.map(Some)
    }

    /// Revokes every lease under `prefix` (a checked prefix, see
    /// [`check_prefix`]); returns (revoked, still pending).
    pub async fn revoke_prefix(&self, prefix: &str) -> Result<(u32, u32), LeaseError> {
        let now = self.inner.clock.now_ms();
        let ids: Vec<String> = self
            .barrier()
            .scan_keys(&format!("{REC_PREFIX}{prefix}/"))?
            .into_iter()
            .filter_map(|k| k.strip_prefix(REC_PREFIX).map(str::to_owned))
            .collect();
        let mut marked = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(r) = self.mark_revoking(id, now)? {
                marked.push(r);
            }
        }
        // Every lease is marked on disk before any target is touched.
        self.barrier().durable().await?;
        self.attempt_all(marked).await
    }

    /// Runs revocations `SWEEP_PARALLEL` at a time; returns (done, pending).
    async fn attempt_all(&self, records: Vec<LeaseRecord>) -> Result<(u32, u32), LeaseError> {
        let mut done = 0u32;
        let mut pending = 0u32;
        let mut first_error = None;
        let mut queue = records.into_iter();
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < SWEEP_PARALLEL {
                let Some(record) = queue.next() else { break };
                let store = self.clone();
                // Under the sweeper's fence (the leader term), if any.
                running.spawn(crate::storage::cluster::carry(async move {
                    store.attempt(record).await
                }));
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            match joined {
                Ok(Ok(Revoked::Done)) => done += 1,
                Ok(Ok(Revoked::Pending(_))) => pending += 1,
                Ok(Err(e)) => {
                    pending += 1;
                    first_error.get_or_insert(e);
                }
                Err(_) => pending += 1,
            }
        }
        match first_error {
            Some(e) if done == 0 && pending > 0 => Err(e),
            _ => Ok((done, pending)),
        }
    }

    /// One revocation attempt of a marked lease.
    async fn attempt(&self, record: LeaseRecord) -> Result<Revoked, LeaseError> {
        let outcome = match self.inner.revoker.get() {
            Some(revoker) => revoker.revoke(&record).await,
            None => Err("no revoker is configured".to_owned()),
        };
        match outcome {
            Ok(()) => {
                self.forget(&record)?;
                Ok(Revoked::Done)
            }
            Err(message) => {
                self.note_failure(&record.id, &message)?;
                Ok(Revoked::Pending(message))
            }
        }
    }

    /// Deletes every key of a revoked lease, atomically.
    fn forget(&self, record: &LeaseRecord) -> Result<(), LeaseError> {
        let _guard = self.lock();
        let current = self.get(&record.id)?;
        let expires = current.as_ref().map_or(record.expires_ms, |r| r.expires_ms);
        let rec = rec_key(&record.id);
        let exp = exp_key(expires, &record.id);
        let exp_seen = exp_key(record.expires_ms, &record.id);
        let tok = tok_key(&record.accessor, &record.id);
        let failed = failed_key(&record.id);
        let mut ops = vec![
            PlainOp::Delete(&rec),
            PlainOp::Delete(&exp),
            PlainOp::Delete(&tok),
            PlainOp::Delete(&failed),
        ];
        if exp_seen != exp {
            ops.push(PlainOp::Delete(&exp_seen));
        }
        self.barrier().batch(&ops)?;
        Ok(())
    }

    /// Writes a failed attempt: count, error, `leases/failed/`, and the
    /// expiry entry moved to the next try.
    fn note_failure(&self, id: &str, message: &str) -> Result<(), LeaseError> {
        let now = self.inner.clock.now_ms();
        let _guard = self.lock();
        let Some(mut record) = self.get(id)? else {
            return Ok(());
        };
        let old = exp_key(record.expires_ms, id);
        record.failures = record.failures.saturating_add(1);
        record.last_error = cut(message);
        record.revoking = true;
        record.expires_ms = now.saturating_add(backoff_ms(record.failures));
        let bytes = record.encode_to_vec();
        let rec = rec_key(id);
        let new = exp_key(record.expires_ms, id);
        let failed = failed_key(id);
        let mut ops = vec![
            PlainOp::Put(&rec, &bytes),
            PlainOp::Put(&new, b""),
            PlainOp::Put(&failed, record.last_error.as_bytes()),
        ];
        if old != new {
            ops.push(PlainOp::Delete(&old));
        }
        self.barrier().batch(&ops)?;
        tracing::warn!(lease = %id, failures = record.failures, error = %record.last_error,
            "lease revocation failed; retrying");
        // The sleeper may be sleeping past the retry time.
        self.inner.wake.notify_one();
        Ok(())
    }

    /// The token hook: the leases of these (revoked) tokens are marked for
    /// revocation now and the sleeper is woken. Storage errors are logged:
    /// the leases still end at their own expiry, never after the token's.
    pub fn tokens_revoked(&self, accessors: &[&str]) {
        let now = self.inner.clock.now_ms();
        let mut any = false;
        for accessor in accessors {
            let prefix = format!("{TOK_PREFIX}{accessor}/");
            let keys = match self.barrier().scan_keys(&prefix) {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::warn!(error = %e, "leases of a revoked token not read");
                    continue;
                }
            };
            for key in keys {
                if let Some(id) = key.strip_prefix(&prefix) {
                    match self.mark_revoking(id, now) {
                        Ok(_) => any = true,
                        Err(e) => tracing::warn!(lease = %id, error = %e,
                            "lease of a revoked token not marked"),
                    }
                }
            }
        }
        if any {
            self.inner.wake.notify_one();
        }
    }

    /// One round of the sleeper: revokes what is due at `now_ms` (at most
    /// `SWEEP_BATCH`); returns the next expiry ahead, and whether more is due.
    pub async fn sweep(&self, now_ms: u64) -> Result<(Option<u64>, bool), LeaseError> {
        let head = self
            .barrier()
            .scan_range(EXP_PREFIX, EXP_END, SWEEP_BATCH)?;
        let mut due = Vec::new();
        let mut next = None;
        for (key, _) in &head {
            let Some((at, id)) = parse_exp_key(key) else {
                self.barrier().delete(key)?;
                continue;
            };
            if at > now_ms {
                next = Some(at);
                break;
            }
            match self.get(id)? {
                // Renewed since (a stale entry): drop it.
                Some(r) if r.expires_ms != at => self.barrier().delete(key)?,
                Some(_) => {
                    if let Some(r) = self.mark_revoking(id, now_ms)? {
                        due.push(r);
                    }
                }
                None => self.barrier().delete(key)?,
            }
        }
        let full = head.len() == SWEEP_BATCH && next.is_none();
        if !due.is_empty() {
            self.barrier().durable().await?;
            self.attempt_all(due).await?;
            // Failed attempts moved their entries: read the head again.
            next = self.first_at()?;
        }
        Ok((next, full))
    }

    /// The time of the first entry of the expiry index.
    fn first_at(&self) -> Result<Option<u64>, LeaseError> {
        let head = self.barrier().scan_range(EXP_PREFIX, EXP_END, 1)?;
        Ok(head
            .first()
            .and_then(|(k, _)| parse_exp_key(k))
            .map(|(at, _)| at))
    }

    /// The sleeper: sleeps until the first expiry in the index (or a wake:
    /// a new lease, a revoked token), revokes what is due, until `shutdown`.
    pub async fn run_sweeper(self, shutdown: Shutdown) {
        loop {
            if shutdown.is_triggered() {
                return;
            }
            let now = self.inner.clock.now_ms();
            let wait = match self.sweep(now).await {
                Ok((_, true)) => Some(Duration::ZERO),
                Ok((Some(next), false)) => {
                    // Failed attempts may have moved entries before `next`.
                    Some(Duration::from_millis(next.saturating_sub(now)).min(MAX_SLEEP))
                }
                Ok((None, false)) => None,
                Err(LeaseError::Barrier(BarrierError::Sealed))
                | Err(LeaseError::Barrier(BarrierError::NotInitialized)) => {
                    Some(Duration::from_secs(5))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease sweep failed; retrying");
                    Some(Duration::from_secs(5))
                }
            };
            let sleep = async {
                match wait {
                    Some(d) => self.inner.clock.sleep(d).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.inner.wake.notified() => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

impl crate::token::RevokeListener for LeaseStore {
    fn tokens_revoked(&self, accessors: &[&str]) {
        LeaseStore::tokens_revoked(self, accessors);
    }
}

/// The lease gauge: leases whose revocation is failing, read from
/// `leases/failed/` before a scrape.
pub struct LeaseGauges {
    failed: prometheus_client::metrics::gauge::Gauge,
    leases: LeaseStore,
}

impl LeaseGauges {
    pub fn register(metrics: &crate::metrics::Metrics, leases: LeaseStore) -> Arc<Self> {
        let gauges = Arc::new(Self {
            failed: Default::default(),
            leases,
        });
        metrics.register(
            "lease_revocations_failing",
            "Leases whose revocation on the target failed and is being retried",
            gauges.failed.clone(),
        );
        metrics.on_scrape(gauges.clone());
        gauges
    }
}

impl crate::metrics::Refresh for LeaseGauges {
    fn refresh(&self, _metrics: &crate::metrics::Metrics) {
        if let Ok(n) = self.leases.failed_count() {
            self.failed.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests;
