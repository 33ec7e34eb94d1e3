//! Audit: the tamper-evident log of every request (DESIGN.md, "Audit and governance").
//!
//! Storage: an append-only JSON-lines file (`[audit] path`, `DIR/audit.log` for `keyward dev`),
//! not the KV store. This module owns no storage prefix and must not touch the barrier or the
//! backend; it never sees a secret in clear beyond the call that HMACs it.
//!
//! # Record
//!
//! One line per request, fields in this order, optional fields left out when `None` or empty:
//!
//! ```text
//! {"seq":N,"time":"2025-01-02T03:04:05.678Z","request_id":"..","method":"..","resource":"..",
//!  "identity":"..","accessor":"..","actor_identity":"..","actor_accessor":"..",
//!  "subject_accessor":"..","source":"..","outcome":"allowed|denied|failed","code":"OK",
//!  "error":"..","token":"hmac-sha256:<hex>","data":{"field":"hmac-sha256:<hex>"},
//!  "prev":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! On a node of a cluster (etcd) `"node":"<cluster.node_id>"` follows `time` in every record
//! ([`AuditLog::set_node_id`]); a single node's records have no `node`.
//!
//! Tokens and field values appear only as `hmac-sha256:<hex>` under the audit key
//! ([`AuditLog::set_hmac_key`], set at unseal and cleared at seal); while no key is set they are
//! recorded as `"unavailable"`. The raw bytes are never written. `keyward audit hash VALUE`
//! computes the same HMAC ([`AuditLog::hmac`]) to search the log for a value.
//!
//! # Canonical bytes and the chain
//!
//! `seq` starts at 1 and grows by one per record. The *body* of a record is the exact line text
//! from its opening `{` up to, and not including, the `,"hash":` that ends the line: it ends with
//! `"prev":"<hex>"`. The line is the body followed by `,"hash":"<hex>"}` and `\n`, with no other
//! bytes, so the body is found by cutting the last 75 bytes of a line (without its newline).
//!
//! `hash = lower-case hex( SHA-256( prev_raw || body ) )`, where `prev_raw` is the 32 raw bytes
//! of the previous record's hash (32 zero bytes for record 1, whose `prev` is 64 `0`s). The
//! verifier hashes the bytes as they are in the file, so it never re-serialises a record and
//! any change of a byte, of the order or of the number of records breaks the chain.
//!
//! A SHA-256 chain needs no key: someone who can rewrite the file can rewrite every record after
//! an edit. [`AuditLog::head`] is the hash of the newest record; copying it elsewhere (a log
//! line, another system) from time to time anchors the chain against such a rewrite.
//!
//! # Durability
//!
//! [`AuditLog::append`] and [`AuditLog::append_async`] return only once the record is in the
//! file (the page cache: it survives a crash of the process). There is no fsync per record: a
//! power loss may lose the newest records. [`AuditLog::sync`] flushes to disk (at shutdown). If
//! the write fails the chain does not advance, a partial write is cut off again, and every
//! caller whose record it held gets the error and must fail its request (fail closed). If the
//! partial write cannot be cut off, every later append fails until the log is reopened.
//!
//! # Batches
//!
//! A caller renders its record (HMACs included) without any lock and queues it; whoever then
//! holds the chain writes every queued record with one `write_all`, numbering and chaining them
//! in queue order, and tells each caller the outcome. An async caller ([`AuditLog::append_async`])
//! queues its record and yields once before it writes, so the other calls ready on its thread
//! queue theirs meanwhile; one that finds the chain busy waits for its answer without holding a
//! thread. Under load a `write` carries many records; a lone caller only yields once. Whoever lets go of the chain looks at the
//! queue again, and a caller that goes away during its yield (a cancelled request) writes the queue as it is dropped, so no
//! record is left behind waiting for a later caller. The time in a record is taken when its batch is
//! written, so times never go back along the chain.
//!
//! One process writes a log file at a time; [`verify_file`] may read it while it is written.
//!
//! # Resuming and verifying
//!
//! [`AuditLog::open`] reads only the last line, from the end of the file, to continue `seq` and
//! the chain. It refuses a file whose last line is torn (no newline) or does not check out:
//! the operator runs `keyward audit verify` and moves the file aside (a new file starts a new
//! chain at `seq` 1).
//!
//! [`verify_file`] walks every line and reports in `first_bad` the `seq` the chain expected at the
//! first line that fails. A good chain has `seq` = line number, so this is also the 1-based line
//! number: an edited record `n` gives `n`; a deleted record `n` gives `n` (the missing one: the
//! line in its place holds `n + 1`); records `n` and `n + 1` swapped give `n`; an inserted record
//! gives its own line number; a truncated last line gives its line number.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, TryLockError};

use chrono::{DateTime, Datelike, Timelike, Utc};
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::clock::Clock;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The longest line [`verify_file`] and [`AuditLog::open`] accept.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Written in place of an HMAC while no audit key is set (sealed).
pub const UNAVAILABLE: &str = "unavailable";

const HMAC_PREFIX: &[u8] = b"hmac-sha256:";
/// The names of the fields a record of a call can have, which a note's
/// own fields may not take ([`AuditLog::append_note`]): `audit verify` and
/// the log's reopening refuse a record with a name twice.
const RESERVED: &[&str] = &[
    "seq",
    "time",
    "node",
    "request_id",
    "method",
    "resource",
    "identity",
    "accessor",
    "actor_identity",
    "actor_accessor",
    "subject_accessor",
    "source",
    "outcome",
    "code",
    "error",
    "phase",
    "call",
    "token",
    "data",
    "prev",
    "hash",
];

const HASH_KEY: &[u8] = b",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = HASH_KEY.len() + 64 + 2;
/// A record buffer that grew past this is given back after the append.
const KEEP_BUFFER: usize = 64 * 1024;
/// What a rendered record's fields usually fit in.
const FIELDS_CAPACITY: usize = 512;
const TAIL_CHUNK: u64 = 8 * 1024;
/// How many unauthenticated calls per (source, method, outcome, code) are
/// written one by one in a window before the rest are counted.
pub const AGGREGATE_AFTER: u32 = 10;
/// How long repeats of an unauthenticated call are counted before their
/// aggregate record is written.
pub const AGGREGATE_WINDOW_MS: u64 = 60_000;
/// The most (source, method, outcome, code) tallies kept at once; a full
/// table is written out and emptied.
pub const MAX_AGGREGATES: usize = 4096;
/// How often, at most, a call looks for windows that have ended.
const SWEEP_EVERY_MS: u64 = 1_000;

/// Errors of the audit log. Messages name the file and the broken rule, never a value.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}", path = .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("audit log {path}: {reason}; run `keyward audit verify` and move the file aside", path = .path.display())]
    Corrupt { path: PathBuf, reason: &'static str },
    #[error("audit log write failed: {0}")]
    Write(io::Error),
    #[error("audit log is unusable after a failed write that could not be undone; reopen it")]
    Broken,
    #[error("the audit key is not set (the vault is sealed)")]
    NoKey,
    /// A second sink (syslog) did not take a record.
    #[error("audit sink failed: {0}")]
    Sink(String),
    /// A note's extra field had the name of a field every record has (a
    /// record with a name twice would not verify).
    #[error("audit note field {0:?} has a reserved name")]
    ReservedField(String),
}

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Authorized and done.
    Allowed,
    /// Refused: no or bad credentials, policy, rate limit.
    Denied,
    /// Authorized but failed (bad input, missing, internal error).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// Which record of a state-changing call this is. Reads write one record,
/// without a phase; a call that changes state writes its `request` before it
/// acts (and does not act if that fails) and its `outcome` after, both under
/// the same `request_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Request,
    Outcome,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Outcome => "outcome",
        }
    }
}

/// One request, as `core` hands it to the log. `token` and `values` are secret: they are
/// only ever written as HMACs, and `Debug` shows neither.
#[derive(Clone, Copy)]
pub struct AuditEvent<'a> {
    pub request_id: &'a str,
    /// The gRPC method, e.g. `keyward.v1.Secrets/Get`.
    pub method: &'a str,
    /// e.g. `secret/app/db`.
    pub resource: Option<&'a str>,
    pub identity: Option<&'a str>,
    pub accessor: Option<&'a str>,
    /// A delegated token's actor chain: `identity` acts for nobody but is
    /// the subject; these name the agent acting for it.
    pub actor: Option<AuditActor<'a>>,
    /// The peer address.
    pub source: Option<&'a str>,
    pub outcome: Outcome,
    /// The gRPC code name: `OK`, `NOT_FOUND`, ...
    pub code: &'a str,
    /// The non-secret error message.
    pub error: Option<&'a str>,
    /// The raw token: recorded only as an HMAC.
    pub token: Option<&'a [u8]>,
    /// Field name -> value: values recorded only as HMACs. Names should be unique.
    pub values: &'a [(&'a str, &'a [u8])],
    /// The server's own id of a state-changing call, the same in its
    /// request and outcome records (`"call"`, right after `phase`; written
    /// only in a record with a phase). `audit verify` pairs the two records
    /// on it: `request_id` is the client's choice, and another caller may
    /// send the same one.
    pub call: Option<&'a str>,
}

/// Who acted with a delegated token (RFC 8693 `act`), written after the
/// accessor as `"actor_identity"`, `"actor_accessor"`, `"subject_accessor"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditActor<'a> {
    pub identity: &'a str,
    pub accessor: &'a str,
    /// The subject's token, which the delegated token was made from.
    pub subject_accessor: &'a str,
}

impl fmt::Debug for AuditEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<&str> = self.values.iter().map(|(name, _)| *name).collect();
        f.debug_struct("AuditEvent")
            .field("request_id", &self.request_id)
            .field("method", &self.method)
            .field("resource", &self.resource)
            .field("identity", &self.identity)
            .field("accessor", &self.accessor)
            .field("actor", &self.actor)
            .field("source", &self.source)
            .field("outcome", &self.outcome)
            .field("code", &self.code)
            .field("error", &self.error)
            .field("token", &self.token.map(|_| "[redacted]"))
            .field("values", &fields)
            .field("call", &self.call)
            .finish()
    }
}

/// The result of [`verify_file`]; serialises as
/// `{"records", "ok", "first_bad", "unanswered", "in_flight_at_end"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Lines in the file, a torn last line included.
    pub records: u64,
    pub ok: bool,
    /// The `seq` expected at the first line that fails (its 1-based line number).
    pub first_bad: Option<u64>,
    /// Request records (`"phase":"request"`) with no outcome, followed by a
    /// change call that began and ended after them: a change whose result
    /// was never recorded. Up to the first bad line.
    pub unanswered: Vec<Unanswered>,
    /// Request records with no outcome after which no change call began
    /// and ended: in flight when the log was read, or cut off by a crash.
    pub in_flight_at_end: Vec<Unanswered>,
    /// Why that line fails, for humans; not part of the JSON.
    #[serde(skip)]
    pub reason: Option<&'static str>,
}

/// A request record without its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unanswered {
    pub seq: u64,
    pub request_id: String,
}

/// Where else records go and when the file rotates (`audit.*` of the config).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditOptions {
    /// Rotate before a write would take the file past this many bytes; 0: never.
    pub max_bytes: u64,
    /// Rotated files kept (the oldest beyond are removed); 0: keep all.
    pub max_files: u32,
    /// Also send every record to this local syslog socket (a unix
    /// datagram socket, `/dev/log` by default when `audit.syslog = true`).
    pub syslog: Option<PathBuf>,
}

/// The `method` of the record that begins a file continuing the chain of
/// the file before it (after a rotation or a reopen).
pub const CONTINUE_METHOD: &str = "keyward.audit/Continue";

/// How long a syslog send may block (the receiver's queue is full) before it fails.
const SYSLOG_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// `<PRI>` of every syslog datagram: facility authpriv (10), severity info (6).
const SYSLOG_PRI: &[u8] = b"<86>keyward: ";

/// The tail of the chain and the file it is written to.
struct Chain {
    file: File,
    /// The syslog socket, connected; `None` until the first send (and
    /// after a failed one, which reconnects at the next).
    syslog: Option<std::os::unix::net::UnixDatagram>,
    /// The number the next rotated file gets (`<path>.000001`, ...).
    next_rotated: u64,
    /// `seq` of the newest record, 0 for an empty file.
    seq: u64,
    /// Hash of the newest record, zeros for an empty file.
    head: [u8; 32],
    /// Bytes written so far: where to cut a partial line back to.
    len: u64,
    /// The record being built, reused across appends.
    buf: Vec<u8>,
    /// The second of the last record's time and its text up to the seconds
    /// (`2025-01-02T03:04:05`): most records share it with the one before.
    second: Option<(u64, [u8; 19])>,
    /// A partial line could not be cut off: refuse to write after it.
    broken: bool,
    /// `seq` and hash of the last record in `buf` once rendered.
    pending: (u64, [u8; 32]),
}

/// Why a new file begins.
#[derive(Clone, Copy)]
enum Reason {
    /// `audit.max_bytes` was reached.
    Rotate,
    /// The file was reopened (SIGHUP) and is a new one.
    Reopen,
}

/// A record waiting for the chain: its body between the time and `prev`
/// (`,"request_id":` up to the end of `data`), and where its outcome goes.
struct Queued {
    fields: Vec<u8>,
    done: oneshot::Sender<Result<(), AuditError>>,
}

/// A token's audit HMAC, remembered between calls with the same token (the
/// verified-token cache keeps one per cached token) so that a call does not
/// compute it again. It is bound to the generation of the audit key it was
/// made under: [`AuditLog::set_hmac_key`] (seal, unseal, any key change)
/// starts a new generation, and a remembered HMAC of another generation is
/// computed afresh, so a record never carries an HMAC under an old key.
/// Holds no secret (the HMAC is what the log records); `Debug` shows nothing.
#[derive(Default)]
pub struct TokenMac {
    slot: Mutex<Option<(u64, [u8; 32])>>,
}

impl fmt::Debug for TokenMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenMac")
    }
}

impl TokenMac {
    pub fn new() -> Self {
        Self::default()
    }

    /// The remembered HMAC if it is of `generation`; else HMAC of `token`
    /// under `key` (which is of `generation`), remembered.
    fn get_or_sign(&self, generation: u64, key: &hmac::Key, token: &[u8]) -> [u8; 32] {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match *slot {
            Some((made, tag)) if made == generation => tag,
            _ => {
                let mut tag = [0u8; 32];
                tag.copy_from_slice(hmac::sign(key, token).as_ref());
                *slot = Some((generation, tag));
                tag
            }
        }
    }
}

/// The append side of the audit log. Share it behind an `Arc`.
pub struct AuditLog {
    path: PathBuf,
    clock: Clock,
    options: AuditOptions,
    chain: Mutex<Chain>,
    /// Records rendered and waiting for whoever holds `chain` next.
    queue: Mutex<Vec<Queued>>,
    /// The audit HMAC key, expanded once (ring keeps the inner and outer
    /// hash states; like its AES key schedules they are not zeroized on
    /// drop, see README "Security model").
    key: RwLock<Option<hmac::Key>>,
    /// Bumped by every [`Self::set_hmac_key`], under `key`'s write lock: a
    /// [`TokenMac`] made under an older key is never used.
    key_generation: AtomicU64,
    /// Repeats of unauthenticated calls, counted until their window ends.
    aggregates: Mutex<Aggregates>,
    /// When any append next looks for ended windows ([`Self::write_ended_windows`]).
    next_sweep_ms: AtomicU64,
    /// `,"node":"<id>"`, written after `time` in every record once set
    /// ([`Self::set_node_id`]): a cluster node's id.
    node: std::sync::OnceLock<Vec<u8>>,
}

/// What repeats of unauthenticated calls are counted under.
#[derive(Clone, PartialEq, Eq, Hash)]
struct AggregateKey {
    /// The peer's address without its port: a new connection per call
    /// counts under the same key.
    source: String,
    method: String,
    outcome: Outcome,
    code: String,
}

/// One key in its window: `written` calls written one by one, then `count`
/// calls counted, the last at `last_ms`.
#[derive(Clone, Copy)]
struct Tally {
    window_start_ms: u64,
    written: u32,
    last_ms: u64,
    count: u64,
}

#[derive(Default)]
struct Aggregates {
    tallies: HashMap<AggregateKey, Tally>,
    next_sweep_ms: u64,
}

impl Aggregates {
    /// Takes out the tallies whose window has ended; those with repeats are
    /// returned, to be written.
    fn sweep(&mut self, now: u64) -> Vec<(AggregateKey, Tally)> {
        self.next_sweep_ms = now.saturating_add(SWEEP_EVERY_MS);
        let mut due = Vec::new();
        self.tallies.retain(|key, tally| {
            let open = now.saturating_sub(tally.window_start_ms) < AGGREGATE_WINDOW_MS;
            if !open && tally.count > 0 {
                due.push((key.clone(), *tally));
            }
            open
        });
        due
    }
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key_set = self
            .key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("key_set", &key_set)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log at `path`, creating it with mode 0600, or resumes it from its last record.
    /// Records carry the time `clock` gives.
    pub fn open(path: &Path, clock: Clock) -> Result<Self, AuditError> {
        Self::open_with(path, clock, AuditOptions::default())
    }

    /// [`Self::open`] with rotation and a syslog sink.
    pub fn open_with(path: &Path, clock: Clock, options: AuditOptions) -> Result<Self, AuditError> {
        finish_rotation(path)?;
        let io_err = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        let (seq, head, len) = if meta.is_file() {
            warn_if_readable_by_others(path, &meta);
            let len = meta.len();
            let (seq, head) = resume(&file, len, path)?;
            (seq, head, len)
        } else {
            // A device or a pipe: nothing to resume (tests write to /dev/full).
            (0, [0; 32], 0)
        };
        let rotated = rotated_files(path);
        let next_rotated = rotated.last().map_or(1, |(number, _)| number + 1);
        // A new file after rotated ones (the current one was moved away
        // while the server was down) continues their chain.
        let continued = match rotated.last() {
            Some((_, last)) if len == 0 && meta.is_file() => {
                let last_file = File::open(last).map_err(|source| AuditError::Io {
                    path: last.clone(),
                    source,
                })?;
                let last_len = last_file
                    .metadata()
                    .map_err(|source| AuditError::Io {
                        path: last.clone(),
                        source,
                    })?
                    .len();
                Some((
                    resume(&last_file, last_len, last)?,
                    last.file_name().map(ToOwned::to_owned),
                ))
            }
            _ => None,
        };
        let (seq, head) = match &continued {
            Some(((seq, head), _)) => (*seq, *head),
            None => (seq, head),
        };
        let log = Self {
            path: path.to_owned(),
            clock,
            options,
            chain: Mutex::new(Chain {
                file,
                syslog: None,
                next_rotated,
                seq,
                head,
                len,
                buf: Vec::with_capacity(1024),
                second: None,
                broken: false,
                pending: (seq, head),
            }),
            queue: Mutex::new(Vec::new()),
            key: RwLock::new(None),
            key_generation: AtomicU64::new(0),
            node: std::sync::OnceLock::new(),
            aggregates: Mutex::new(Aggregates::default()),
            next_sweep_ms: AtomicU64::new(0),
        };
        if let Some((_, previous)) = continued {
            let fields = continue_fields(Reason::Reopen, previous.as_deref());
            log.append_rendered(fields)?;
        }
        Ok(log)
    }

    /// Sets the audit HMAC key (at unseal) or clears it (`None`, at seal). The old key is zeroized.
    pub fn set_hmac_key(&self, key: Option<Zeroizing<[u8; 32]>>) {
        let key = key.map(|key| hmac::Key::new(hmac::HMAC_SHA256, &key[..]));
        let mut slot = self.key.write().unwrap_or_else(PoisonError::into_inner);
        *slot = key;
        // Under the write lock: a reader holding the read lock sees the key
        // and its generation together.
        self.key_generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes one record before returning. An error means the caller must fail the request.
    ///
    /// Blocks the thread while another batch is written; async callers use
    /// [`Self::append_async`], which lets their records share a `write`.
    pub fn append(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        self.append_phase(event, None)
    }

    /// [`Self::append`] of one record of a state-changing call (`phase`).
    pub fn append_phase(
        &self,
        event: &AuditEvent<'_>,
        phase: Option<Phase>,
    ) -> Result<(), AuditError> {
        self.append_phase_with(event, phase, None)
    }

    /// [`Self::append_phase`] with the token's HMAC remembered in `mac`
    /// (see [`TokenMac`]); `mac` must belong to `event.token`.
    pub fn append_phase_with(
        &self,
        event: &AuditEvent<'_>,
        phase: Option<Phase>,
        mac: Option<&TokenMac>,
    ) -> Result<(), AuditError> {
        self.write_ended_windows();
        let fields = self.render(event, phase, mac);
        self.append_rendered(fields)
    }

    /// Writes one rendered record (and whatever is queued) before returning.
    fn append_rendered(&self, fields: Vec<u8>) -> Result<(), AuditError> {
        let mut chain = self.lock_chain();
        let queued = self.take_queue();
        let result = self.write_records(
            &mut chain,
            queued
                .iter()
                .map(|q| q.fields.as_slice())
                .chain(std::iter::once(fields.as_slice())),
        );
        drop(chain);
        answer(queued, &result);
        self.drain();
        result
    }

    /// Writes one record, in a batch with the records of other callers, and
    /// returns once it is written. An error means the caller must fail the
    /// request. The record is queued when the future is first polled; a
    /// future dropped after that does not take its record back: it is
    /// written then, or by whoever holds the chain.
    pub async fn append_async(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        self.append_async_phase(event, None).await
    }

    /// [`Self::append_async`] of one record of a state-changing call (`phase`).
    pub async fn append_async_phase(
        &self,
        event: &AuditEvent<'_>,
        phase: Option<Phase>,
    ) -> Result<(), AuditError> {
        self.append_async_with(event, phase, None).await
    }

    /// [`Self::append_async_phase`] with the token's HMAC remembered in
    /// `mac` (see [`TokenMac`]); `mac` must belong to `event.token`.
    pub async fn append_async_with(
        &self,
        event: &AuditEvent<'_>,
        phase: Option<Phase>,
        mac: Option<&TokenMac>,
    ) -> Result<(), AuditError> {
        self.write_ended_windows();
        let fields = self.render(event, phase, mac);
        let (done, outcome) = oneshot::channel();
        self.lock_queue().push(Queued { fields, done });
        {
            let _drain = DrainOnDrop(self);
            // Let the other calls that are ready on this thread run up to their
            // own record first, so that one `write` takes them all.
            tokio::task::yield_now().await;
        }
        // The sender is answered before it is dropped; should it not be, fail closed.
        outcome.await.unwrap_or(Err(AuditError::Broken))
    }

    /// Records a call that carries no identity (a bad or missing token, a
    /// failed login, a status or other open call that changed nothing), so
    /// that a loop of them cannot grow the log without bound. The first
    /// [`AGGREGATE_AFTER`] such calls per (source address, method, outcome,
    /// code) in a window of [`AGGREGATE_WINDOW_MS`] are written as usual;
    /// the repeats are counted in memory and written as one aggregate
    /// record (`"aggregate":true,"count":N,"window_start","window_end"`)
    /// when the window has ended (looked for by any later append, at most
    /// once a second), when the table of [`MAX_AGGREGATES`] keys is full, or
    /// at [`Self::flush_aggregates`] (at shutdown, through [`Self::sync`]). The written records plus the
    /// counts of the aggregate records are exactly the calls made.
    ///
    /// An error means this call's own record could not be written: the
    /// caller fails the request, as for [`Self::append`].
    pub fn append_unauthenticated(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        let now = self.clock.now_ms();
        let key = AggregateKey {
            source: event.source.map(source_host).unwrap_or_default().to_owned(),
            method: event.method.to_owned(),
            outcome: event.outcome,
            code: event.code.to_owned(),
        };
        let mut due = Vec::new();
        let counted = {
            let mut aggregates = self.lock_aggregates();
            if now >= aggregates.next_sweep_ms {
                due = aggregates.sweep(now);
            }
            let (counted, open) = match aggregates.tallies.get_mut(&key) {
                Some(tally) if now.saturating_sub(tally.window_start_ms) < AGGREGATE_WINDOW_MS => {
                    if tally.written < AGGREGATE_AFTER {
                        (false, true)
                    } else {
                        tally.count += 1;
                        tally.last_ms = tally.last_ms.max(now);
                        (true, true)
                    }
                }
                _ => (false, false),
            };
            if !open {
                if let Some(tally) = aggregates.tallies.remove(&key) {
                    if tally.count > 0 {
                        due.push((key.clone(), tally));
                    }
                }
                if aggregates.tallies.len() >= MAX_AGGREGATES {
                    due.extend(aggregates.tallies.drain().filter(|(_, t)| t.count > 0));
                }
            }
            counted
        };
        if !due.is_empty() {
            // On failure the counts are kept and written with a later record.
            let _ = self.write_aggregates(due);
        }
        if counted {
            return Ok(());
        }
        self.append(event)?;
        let mut aggregates = self.lock_aggregates();
        if let Some(tally) = aggregates.tallies.get_mut(&key) {
            tally.written = tally.written.saturating_add(1);
        } else if aggregates.tallies.len() < MAX_AGGREGATES {
            aggregates.tallies.insert(
                key,
                Tally {
                    window_start_ms: now,
                    written: 1,
                    last_ms: now,
                    count: 0,
                },
            );
        }
        Ok(())
    }

    /// Writes every counted repeat as its aggregate record now and empties
    /// the table. Should the write fail, the counts are kept for the next try.
    pub fn flush_aggregates(&self) -> Result<(), AuditError> {
        let due: Vec<_> = self
            .lock_aggregates()
            .tallies
            .drain()
            .filter(|(_, tally)| tally.count > 0)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        self.write_aggregates(due)
    }

    /// Writes one aggregate record per tally in one batch; on failure the
    /// counts go back into the table (added to any counted meanwhile).
    fn write_aggregates(&self, due: Vec<(AggregateKey, Tally)>) -> Result<(), AuditError> {
        let mut chain = self.lock_chain();
        let queued = self.take_queue();
        let rendered: Vec<Vec<u8>> = due
            .iter()
            .map(|(key, tally)| render_aggregate(key, tally))
            .collect();
        let result = self.write_records(
            &mut chain,
            queued
                .iter()
                .map(|q| q.fields.as_slice())
                .chain(rendered.iter().map(Vec::as_slice)),
        );
        drop(chain);
        answer(queued, &result);
        self.drain();
        if result.is_err() {
            let mut aggregates = self.lock_aggregates();
            for (key, tally) in due {
                let kept = aggregates.tallies.entry(key).or_insert(Tally {
                    written: AGGREGATE_AFTER,
                    count: 0,
                    ..tally
                });
                kept.count += tally.count;
                kept.window_start_ms = kept.window_start_ms.min(tally.window_start_ms);
                kept.last_ms = kept.last_ms.max(tally.last_ms);
            }
        }
        result
    }

    /// Writes the aggregates whose window has ended, looked for at most once
    /// per [`SWEEP_EVERY_MS`] by any append, so that counts do not wait for
    /// the next unauthenticated call.
    fn write_ended_windows(&self) {
        let now = self.clock.now_ms();
        if now < self.next_sweep_ms.load(Ordering::Relaxed) {
            return;
        }
        self.next_sweep_ms
            .store(now.saturating_add(SWEEP_EVERY_MS), Ordering::Relaxed);
        let due = self.lock_aggregates().sweep(now);
        if !due.is_empty() {
            // On failure the counts are kept and written with a later record.
            let _ = self.write_aggregates(due);
        }
    }

    fn lock_aggregates(&self) -> MutexGuard<'_, Aggregates> {
        // Counting and draining cannot panic half-way.
        self.aggregates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the queued records if the chain is free; otherwise its holder
    /// will, as it looks at the queue again after letting go of the chain.
    fn drain(&self) {
        loop {
            let mut chain = match self.chain.try_lock() {
                Ok(chain) => chain,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            let queued = self.take_queue();
            if !queued.is_empty() {
                let result =
                    self.write_records(&mut chain, queued.iter().map(|q| q.fields.as_slice()));
                drop(chain);
                answer(queued, &result);
            } else {
                drop(chain);
            }
            // A caller that queued while the chain was held left its record to us.
            if self.lock_queue().is_empty() {
                return;
            }
        }
    }

    /// The HMACs of an event's token and values, and the part of its record
    /// from `,"request_id":` to the end of `data`. Takes no chain lock: a large
    /// value must not hold up other requests.
    ///
    /// With `mac`, the token's HMAC is taken from it when it was made under
    /// the current key (the generation is read under the same read lock as
    /// the key), else computed and kept there.
    fn render(
        &self,
        event: &AuditEvent<'_>,
        phase: Option<Phase>,
        mac: Option<&TokenMac>,
    ) -> Vec<u8> {
        let key = self.key.read().unwrap_or_else(PoisonError::into_inner);
        let token = event.token.filter(|token| !token.is_empty());
        let token_tag = match (key.as_ref(), token, mac) {
            (Some(key), Some(token), Some(mac)) => {
                let generation = self.key_generation.load(Ordering::Relaxed);
                Some(mac.get_or_sign(generation, key, token))
            }
            _ => None,
        };
        let mut fields = Vec::with_capacity(FIELDS_CAPACITY);
        write_fields(&mut fields, event, key.as_ref(), phase, token_tag.as_ref());
        fields
    }

    /// From now on every record carries `"node":"<id>"` right after
    /// `time`: which node of a cluster wrote it (each node writes its own
    /// file and chain). Set once, before the first request; later calls do
    /// nothing. A file without the field (one node, or older files)
    /// verifies as before: the verifier hashes bytes and ignores fields it
    /// does not check.
    pub fn set_node_id(&self, id: &str) {
        let mut field = b",\"node\":".to_vec();
        push_json_str(&mut field, id);
        let _ = self.node.set(field);
    }

    /// Numbers, times and chains `records` (each as [`Self::render`] made it)
    /// and writes them with one `write_all`: all of them or none.
    fn write_records<'a>(
        &self,
        chain: &mut Chain,
        records: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), AuditError> {
        if chain.broken {
            return Err(AuditError::Broken);
        }
        let records: Vec<&[u8]> = records.collect();
        let now_ms = self.clock.now_ms();
        self.render_batch(chain, &records, now_ms);
        let max = self.options.max_bytes;
        if max > 0 && chain.len > 0 && chain.len + chain.buf.len() as u64 > max {
            // The batch would take the file past its size: the next file
            // begins (or the request fails; nothing is dropped).
            self.rotate(chain, now_ms, Reason::Rotate)?;
            self.render_batch(chain, &records, now_ms);
        }
        let result = self.write_batch(chain);
        if chain.buf.capacity() > KEEP_BUFFER {
            chain.buf = Vec::with_capacity(1024);
        }
        result
    }

    /// Numbers, times and chains `records` into `chain.buf` (the chain's
    /// state is not changed); `chain.pending` gets the new tail.
    fn render_batch(&self, chain: &mut Chain, records: &[&[u8]], now_ms: u64) {
        let mut seq = chain.seq;
        let mut head = chain.head;
        chain.buf.clear();
        for fields in records {
            seq += 1;
            let start = chain.buf.len();
            chain.buf.extend_from_slice(b"{\"seq\":");
            push_u64(&mut chain.buf, seq);
            chain.buf.extend_from_slice(b",\"time\":\"");
            push_time_ms(&mut chain.buf, now_ms, &mut chain.second);
            chain.buf.push(b'"');
            if let Some(node) = self.node.get() {
                chain.buf.extend_from_slice(node);
            }
            chain.buf.extend_from_slice(fields);
            chain.buf.extend_from_slice(b",\"prev\":\"");
            push_hex(&mut chain.buf, &head);
            chain.buf.push(b'"');
            head = chain_hash(&head, &chain.buf[start..]);
            chain.buf.extend_from_slice(HASH_KEY);
            push_hex(&mut chain.buf, &head);
            chain.buf.extend_from_slice(b"\"}\n");
        }
        chain.pending = (seq, head);
    }

    /// Writes `chain.buf` (rendered by [`Self::render_batch`]) to the file
    /// and then to syslog; advances the chain once the file holds it.
    fn write_batch(&self, chain: &mut Chain) -> Result<(), AuditError> {
        let (seq, head) = chain.pending;
        let result = chain.file.write_all(&chain.buf);
        let written = chain.buf.len() as u64;
        match result {
            Ok(()) => {
                chain.seq = seq;
                chain.head = head;
                chain.len += written;
                // The file holds the records (the chain goes on); a sink
                // that refuses them fails the request all the same.
                self.send_syslog(chain)
            }
            Err(error) => {
                // Cut off whatever part of the batch reached the file, so the next record
                // starts on a line of its own.
                if chain.file.set_len(chain.len).is_err() {
                    chain.broken = true;
                }
                tracing::error!(path = %self.path.display(), %error, "audit write failed");
                Err(AuditError::Write(error))
            }
        }
    }

    /// Sends the records in `chain.buf` to syslog, one datagram each, if
    /// configured. A send the socket refuses (no listener, a full queue for
    /// [`SYSLOG_SEND_TIMEOUT`], a record over its datagram size) is a
    /// failure; one reconnect is tried first (a restarted syslog daemon
    /// makes a new socket).
    fn send_syslog(&self, chain: &mut Chain) -> Result<(), AuditError> {
        let Some(socket_path) = &self.options.syslog else {
            return Ok(());
        };
        let mut datagram = Vec::new();
        let mut lines = chain.buf.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        let mut line = lines.next();
        let mut retried = false;
        while let Some(record) = line {
            datagram.clear();
            datagram.extend_from_slice(SYSLOG_PRI);
            datagram.extend_from_slice(record);
            let sent = match &chain.syslog {
                Some(socket) => socket.send(&datagram).map(|_| ()),
                None => Err(io::Error::new(io::ErrorKind::NotConnected, "not connected")),
            };
            match sent {
                Ok(()) => line = lines.next(),
                Err(error) => {
                    chain.syslog = None;
                    if retried {
                        tracing::error!(socket = %socket_path.display(), %error, "audit syslog send failed");
                        return Err(AuditError::Sink(format!(
                            "syslog socket {}: {error}",
                            socket_path.display()
                        )));
                    }
                    retried = true;
                    chain.syslog = connect_syslog(socket_path).ok();
                }
            }
        }
        Ok(())
    }

    /// Begins a new file that continues the chain: its first record
    /// ([`CONTINUE_METHOD`]) carries the hash of the last record before it.
    /// Rotation: the new file is made (`<path>.new`) and its first record
    /// written before the current file is renamed to `<path>.NNNNNN` and the
    /// new one put in its place; any failure leaves the current file and
    /// the chain as they were, and the caller's request fails.
    fn rotate(&self, chain: &mut Chain, now_ms: u64, reason: Reason) -> Result<(), AuditError> {
        let fresh = path_with(&self.path, ".new");
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| AuditError::Io { path, source }
        };
        // The next number free: a numbered file that appeared since the
        // count (copied back, say) is never replaced by the rename below.
        let number = rotated_files(&self.path)
            .last()
            .map_or(chain.next_rotated, |(last, _)| {
                chain.next_rotated.max(last + 1)
            });
        let rotated = path_with(&self.path, &format!(".{number:06}"));
        if rotated.exists() {
            return Err(AuditError::Io {
                path: rotated,
                source: io::Error::new(io::ErrorKind::AlreadyExists, "rotated file exists"),
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&fresh)
            .map_err(io_err(&fresh))?;
        let fields = continue_fields(reason, rotated.file_name());
        self.render_batch(chain, &[fields.as_slice()], now_ms);
        let (seq, head) = chain.pending;
        let undo = |error: AuditError| {
            let _ = std::fs::remove_file(&fresh);
            tracing::error!(path = %self.path.display(), %error, "audit rotation failed");
            error
        };
        if let Err(e) = file.write_all(&chain.buf) {
            return Err(undo(AuditError::Io {
                path: fresh.clone(),
                source: e,
            }));
        }
        if let Err(e) = chain.file.sync_data() {
            return Err(undo(AuditError::Io {
                path: self.path.clone(),
                source: e,
            }));
        }
        if let Err(e) = std::fs::rename(&self.path, &rotated) {
            return Err(undo(AuditError::Io {
                path: rotated.clone(),
                source: e,
            }));
        }
        if let Err(e) = std::fs::rename(&fresh, &self.path) {
            let _ = std::fs::rename(&rotated, &self.path);
            return Err(undo(AuditError::Io {
                path: self.path.clone(),
                source: e,
            }));
        }
        chain.file = file;
        chain.seq = seq;
        chain.head = head;
        chain.len = chain.buf.len() as u64;
        chain.next_rotated = number + 1;
        tracing::info!(path = %self.path.display(), rotated = %rotated.display(), "audit log rotated");
        self.prune();
        self.send_syslog(chain)
    }

    /// Removes the oldest rotated files beyond `audit.max_files`.
    fn prune(&self) {
        let keep = self.options.max_files as usize;
        if keep == 0 {
            return;
        }
        let files = rotated_files(&self.path);
        let extra = files.len().saturating_sub(keep);
        for (_, path) in files.into_iter().take(extra) {
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "old audit file not removed");
            }
        }
    }

    /// Reopens the file at the log's path (on SIGHUP, after logrotate moved
    /// the file away). If the path still names the file being written,
    /// nothing changes. If it names a new empty file (or none, which is
    /// made), that file continues the chain: its first record carries the
    /// hash of the last record of the moved file. A non-empty file that is
    /// not ours is refused, and writing goes on in the old one.
    pub fn reopen(&self) -> Result<(), AuditError> {
        let reopened = self.reopen_file();
        // Every way out of `reopen_file` let go of the chain; what was queued
        // while it was held is written now (see `head`).
        self.drain();
        reopened
    }

    /// [`Self::reopen`] under the chain's lock.
    fn reopen_file(&self) -> Result<(), AuditError> {
        let mut chain = self.lock_chain();
        let io_err = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io_err)?;
        let (new, old) = (
            file.metadata().map_err(io_err)?,
            chain.file.metadata().map_err(io_err)?,
        );
        {
            use std::os::unix::fs::MetadataExt;
            if new.dev() == old.dev() && new.ino() == old.ino() {
                return Ok(());
            }
        }
        if new.len() != 0 {
            return Err(AuditError::Corrupt {
                path: self.path.clone(),
                reason: "reopen found another non-empty file at the audit path; still writing to the moved file",
            });
        }
        let queued = self.take_queue();
        let now_ms = self.clock.now_ms();
        let fields = continue_fields(Reason::Reopen, None);
        self.render_batch(&mut chain, &[fields.as_slice()], now_ms);
        let previous = std::mem::replace(&mut chain.file, file);
        let previous_len = chain.len;
        chain.len = 0;
        let result = self.write_batch(&mut chain);
        if result.is_err() {
            chain.file = previous;
            chain.len = previous_len;
        } else {
            let _ = previous.sync_data();
            tracing::info!(path = %self.path.display(), "audit log reopened: a new file continues the chain");
        }
        let batch = self.write_records(&mut chain, queued.iter().map(|q| q.fields.as_slice()));
        drop(chain);
        answer(queued, &batch);
        result
    }

    /// Writes a record of the server itself (no request): `method`,
    /// `resource`, outcome `allowed`, and `fields` as extra string fields
    /// (names must not be those of a record's own fields).
    pub fn append_note(
        &self,
        method: &str,
        resource: &str,
        fields: &[(&str, &str)],
    ) -> Result<(), AuditError> {
        if let Some((name, _)) = fields.iter().find(|(name, _)| RESERVED.contains(name)) {
            return Err(AuditError::ReservedField((*name).to_owned()));
        }
        let mut buf = Vec::with_capacity(FIELDS_CAPACITY);
        buf.extend_from_slice(b",\"request_id\":\"system\",\"method\":");
        push_json_str(&mut buf, method);
        push_optional(&mut buf, b"resource", Some(resource));
        buf.extend_from_slice(b",\"outcome\":\"allowed\",\"code\":\"OK\"");
        for (name, value) in fields {
            buf.push(b',');
            push_json_str(&mut buf, name);
            buf.push(b':');
            push_json_str(&mut buf, value);
        }
        self.append_rendered(buf)
    }

    fn take_queue(&self) -> Vec<Queued> {
        std::mem::take(&mut *self.lock_queue())
    }

    fn lock_queue(&self) -> MutexGuard<'_, Vec<Queued>> {
        // Pushing and taking cannot panic half-way.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `hmac-sha256:<hex>` of `value` under the audit key, as the log records it.
    pub fn hmac(&self, value: &[u8]) -> Result<String, AuditError> {
        let key = self.key.read().unwrap_or_else(PoisonError::into_inner);
        let tag = hmac::sign(key.as_ref().ok_or(AuditError::NoKey)?, value);
        Ok(format!("hmac-sha256:{}", hex::encode(tag.as_ref())))
    }

    /// The hash of the newest record (64 `0`s for an empty log): anchor it elsewhere.
    pub fn head(&self) -> String {
        let head = hex::encode(self.lock_chain().head);
        // A caller that queued while the chain was held here left its record
        // to the holder (`drain`): write it now, not at some later append.
        self.drain();
        head
    }

    /// Writes the counted repeats ([`Self::flush_aggregates`]) and flushes
    /// the file to disk (at shutdown; appends do not).
    pub fn sync(&self) -> Result<(), AuditError> {
        self.drain();
        let flushed = self.flush_aggregates();
        let synced = self.lock_chain().file.sync_data();
        // What was queued while the chain was held (see `head`).
        self.drain();
        synced.map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })?;
        flushed
    }

    /// The chain, for writing or reading its head. Whoever takes it must call
    /// [`Self::drain`] after letting go: an async append that found it held
    /// left its record in the queue for the holder (`head`, `sync`, `reopen`
    /// and every writer do).
    fn lock_chain(&self) -> MutexGuard<'_, Chain> {
        // Nothing under this lock panics; should something, the state is still whole
        // (it only changes after a successful write).
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The fields of the record that begins a continuing file.
fn continue_fields(reason: Reason, previous: Option<&std::ffi::OsStr>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(FIELDS_CAPACITY);
    buf.extend_from_slice(b",\"request_id\":\"system\",\"method\":");
    push_json_str(&mut buf, CONTINUE_METHOD);
    buf.extend_from_slice(b",\"outcome\":\"allowed\",\"code\":\"OK\",\"reason\":");
    push_json_str(
        &mut buf,
        match reason {
            Reason::Rotate => "rotate",
            Reason::Reopen => "reopen",
        },
    );
    if let Some(previous) = previous {
        push_optional(
            &mut buf,
            b"previous_file",
            Some(&previous.to_string_lossy()),
        );
    }
    buf
}

/// Finishes or undoes a rotation a crash cut short: a `<path>.new` with no file at `path` becomes the
/// file (the current one had been renamed to its number); one beside an
/// existing file is removed (the rotation had not renamed anything).
fn finish_rotation(path: &Path) -> Result<(), AuditError> {
    let fresh = path_with(path, ".new");
    if !fresh.is_file() {
        return Ok(());
    }
    let outcome = if path.exists() {
        std::fs::remove_file(&fresh)
    } else {
        std::fs::rename(&fresh, path)
    };
    outcome.map_err(|source| AuditError::Io {
        path: fresh.clone(),
        source,
    })?;
    tracing::warn!(path = %path.display(), "an audit rotation cut short by a crash was completed or undone");
    Ok(())
}

/// `path` with `suffix` added to its file name.
fn path_with(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// The rotated files of the log at `path` (`<name>.NNNNNN`), oldest first.
pub fn rotated_files(path: &Path) -> Vec<(u64, PathBuf)> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name().to_string_lossy().into_owned();
            let digits = file.strip_prefix(&name)?.strip_prefix('.')?;
            if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((digits.parse().ok()?, entry.path()))
        })
        .collect();
    out.sort();
    out
}

fn connect_syslog(path: &Path) -> io::Result<std::os::unix::net::UnixDatagram> {
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.connect(path)?;
    socket.set_write_timeout(Some(SYSLOG_SEND_TIMEOUT))?;
    Ok(socket)
}

/// Writes the queue when dropped: an async caller's record is written even if
/// its future is dropped while it yields.
struct DrainOnDrop<'a>(&'a AuditLog);

impl Drop for DrainOnDrop<'_> {
    fn drop(&mut self) {
        self.0.drain();
    }
}

/// Tells every queued caller the outcome of the write that held its record.
fn answer(queued: Vec<Queued>, result: &Result<(), AuditError>) {
    for q in queued {
        // A caller that gave up is not waiting; its record was written all the same.
        let _ = q.done.send(match result {
            Ok(()) => Ok(()),
            Err(error) => Err(error.for_another_caller()),
        });
    }
}

impl AuditError {
    /// The same failure, for another caller whose record was in the same write.
    fn for_another_caller(&self) -> AuditError {
        match self {
            AuditError::Write(error) => {
                AuditError::Write(io::Error::new(error.kind(), error.to_string()))
            }
            AuditError::NoKey => AuditError::NoKey,
            AuditError::Sink(message) => AuditError::Sink(message.clone()),
            // Nothing else fails a write; whatever it is, the record is not written.
            _ => AuditError::Broken,
        }
    }
}

fn warn_if_readable_by_others(path: &Path, meta: &Metadata) {
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "audit log is accessible to group or others; 0600 is expected"
        );
    }
}

/// Reads the last line of the file, from the end, and returns its `seq` and hash.
fn resume(file: &File, len: u64, path: &Path) -> Result<(u64, [u8; 32]), AuditError> {
    if len == 0 {
        return Ok((0, [0; 32]));
    }
    let io_err = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let corrupt = |reason| AuditError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1).map_err(io_err)?;
    if last[0] != b'\n' {
        return Err(corrupt("the last record is torn (no newline at the end)"));
    }
    // Find the newline before the last line.
    let end = len - 1;
    let mut start = end;
    let mut chunk = vec![0u8; TAIL_CHUNK as usize];
    let line_start = loop {
        if start == 0 {
            break 0;
        }
        if end - start > MAX_RECORD_BYTES as u64 {
            return Err(corrupt("the last record is too long"));
        }
        let from = start.saturating_sub(TAIL_CHUNK);
        let piece = &mut chunk[..(start - from) as usize];
        file.read_exact_at(piece, from).map_err(io_err)?;
        if let Some(i) = piece.iter().rposition(|&b| b == b'\n') {
            break from + i as u64 + 1;
        }
        start = from;
    };
    let mut line = vec![0u8; (end - line_start) as usize];
    file.read_exact_at(&mut line, line_start).map_err(io_err)?;
    let record = check_record(&line).map_err(corrupt)?;
    Ok((record.seq, record.hash))
}

/// The chain-relevant part of a record; the other required fields are checked for presence.
#[derive(Deserialize)]
struct RecordHead {
    seq: u64,
    prev: String,
    hash: String,
    #[serde(rename = "time")]
    _time: serde::de::IgnoredAny,
    request_id: String,
    #[serde(default)]
    phase: Option<String>,
    method: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    call: Option<String>,
    #[serde(rename = "outcome")]
    _outcome: Outcome,
    #[serde(rename = "code")]
    _code: serde::de::IgnoredAny,
}

struct CheckedRecord {
    /// A record that begins a file continuing the chain of another.
    continues: bool,
    seq: u64,
    request_id: String,
    /// What pairs a request record with its outcome besides the request
    /// id, which the client chooses (see [`OpenRequests`]).
    caller: CallKey,
    phase: Option<String>,
    prev: [u8; 32],
    hash: [u8; 32],
}

/// Checks one line (without its newline) on its own: its shape, its JSON and its hash
/// against its own `prev`. The caller checks `seq` and `prev` against the previous record.
fn check_record(line: &[u8]) -> Result<CheckedRecord, &'static str> {
    if line.is_empty() {
        return Err("empty line");
    }
    if line.len() < SUFFIX_LEN {
        return Err("record is too short");
    }
    let (body, suffix) = line.split_at(line.len() - SUFFIX_LEN);
    if !suffix.starts_with(HASH_KEY) || !suffix.ends_with(b"\"}") {
        return Err("record does not end with its hash");
    }
    let hash_hex = &suffix[HASH_KEY.len()..HASH_KEY.len() + 64];
    let hash = decode_hash(hash_hex).ok_or("hash is not 64 lower-case hex digits")?;
    let head: RecordHead =
        serde_json::from_slice(line).map_err(|_| "record is not a valid audit record")?;
    if head.hash.as_bytes() != hash_hex {
        return Err("record has two hash fields");
    }
    let prev = decode_hash(head.prev.as_bytes()).ok_or("prev is not 64 lower-case hex digits")?;
    if chain_hash(&prev, body) != hash {
        return Err("hash does not match the record");
    }
    Ok(CheckedRecord {
        continues: head.method == CONTINUE_METHOD,
        seq: head.seq,
        request_id: head.request_id,
        caller: match head.call {
            Some(call) => CallKey::Call(call),
            None => CallKey::Peer {
                method: head.method,
                source: head.source,
            },
        },
        phase: head.phase,
        prev,
        hash,
    })
}

/// Walks the whole file and checks every record and link of the chain.
pub fn verify_file(path: &Path) -> Result<VerifyReport, AuditError> {
    let io_err = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    verify_reader(BufReader::with_capacity(64 * 1024, file)).map_err(io_err)
}

/// [`verify_file`] over bytes in memory: the entry point of the audit fuzz
/// target and its corpus replay. Not an API: hidden from docs.
#[doc(hidden)]
pub fn verify_bytes(bytes: &[u8]) -> io::Result<VerifyReport> {
    verify_reader(bytes)
}

fn verify_reader<R: BufRead>(mut reader: R) -> io::Result<VerifyReport> {
    let mut walk = Walk::default();
    let failure = walk.file(&mut reader, false)?;
    let (unanswered, in_flight_at_end) = walk.calls.unanswered();
    let Some(bad) = failure else {
        return Ok(VerifyReport {
            records: walk.records,
            ok: true,
            first_bad: None,
            unanswered,
            in_flight_at_end,
            reason: None,
        });
    };
    let records = walk.records + count_lines(&mut reader, bad.at_line_start)?;
    Ok(VerifyReport {
        records,
        ok: false,
        first_bad: Some(bad.expected_seq),
        unanswered,
        in_flight_at_end,
        reason: Some(bad.reason),
    })
}

/// The state of a walk along the chain, over one file or several.
#[derive(Default)]
struct Walk {
    /// Lines read so far, over all files.
    records: u64,
    /// Whether a first record was read (the chain's start is known).
    started: bool,
    /// The `seq` the next record must carry, once started.
    next_seq: u64,
    /// The hash the next record's `prev` must be.
    prev: [u8; 32],
    calls: OpenRequests,
}

/// The first line of a walk that fails.
struct Bad {
    /// Its 1-based line number in its file.
    line: u64,
    /// The `seq` the chain expected there.
    expected_seq: u64,
    reason: &'static str,
    at_line_start: bool,
}

impl Walk {
    /// Walks one file. The chain's first file begins at `seq` 1 with a
    /// `prev` of zeros, or with a continuing record ([`CONTINUE_METHOD`]:
    /// the files before it are not given). A later file (`continues`) must
    /// begin where the file before it ended.
    fn file<R: BufRead>(&mut self, reader: &mut R, continues: bool) -> io::Result<Option<Bad>> {
        let mut line = Vec::with_capacity(1024);
        let mut in_file = 0u64;
        loop {
            line.clear();
            let read = reader
                .by_ref()
                .take(MAX_RECORD_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)?;
            if read == 0 {
                return Ok(None);
            }
            self.records += 1;
            in_file += 1;
            let expected_seq = if self.started { self.next_seq } else { 1 };
            let bad = |reason, at_line_start| {
                Ok(Some(Bad {
                    line: in_file,
                    expected_seq,
                    reason,
                    at_line_start,
                }))
            };
            let Some(text) = line.strip_suffix(b"\n") else {
                let reason = if line.len() > MAX_RECORD_BYTES {
                    "record is too long"
                } else {
                    "truncated record (no newline at the end)"
                };
                return bad(reason, false);
            };
            let checked = match check_record(text) {
                Ok(checked) => checked,
                Err(reason) => return bad(reason, true),
            };
            if !self.started {
                self.started = true;
                if checked.continues {
                    self.next_seq = checked.seq;
                    self.prev = checked.prev;
                } else {
                    self.next_seq = 1;
                }
            }
            if in_file == 1
                && continues
                && (checked.seq != self.next_seq || checked.prev != self.prev)
            {
                return bad(
                    "the file does not continue the file before it: a file is missing or the \
                     files are out of order",
                    true,
                );
            }
            if checked.seq != self.next_seq {
                return bad("seq is not the previous seq + 1", true);
            }
            if checked.prev != self.prev {
                return bad("prev is not the hash of the previous record", true);
            }
            self.prev = checked.hash;
            self.next_seq = checked.seq + 1;
            self.calls.note(checked);
        }
    }
}

/// The result of [`verify_files`]; serialises as `{"records", "ok",
/// "first_bad", "file", "line", "reason", "files", "unanswered",
/// "in_flight_at_end"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// Lines in all files (after a failure, the rest of that file is counted too).
    pub records: u64,
    pub ok: bool,
    /// The `seq` the chain expected at the first line that fails.
    pub first_bad: Option<u64>,
    /// The file holding that line, as given.
    pub file: Option<String>,
    /// Its 1-based line number in that file.
    pub line: Option<u64>,
    pub reason: Option<&'static str>,
    /// `seq` of the chain's first and last record checked.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub unanswered: Vec<Unanswered>,
    pub in_flight_at_end: Vec<Unanswered>,
}

/// Checks `paths`, in the order given, as one chain: each file after the
/// first must begin with the record that follows the last record of the
/// file before it. Names the file and line of the first failure; a missing
/// middle file or two files swapped fail at the first record of the file
/// after the gap. Files made by rotation sort by name
/// (`audit.log.000001`, ...), before the current `audit.log`.
pub fn verify_files(paths: &[PathBuf]) -> Result<ChainReport, AuditError> {
    let mut walk = Walk::default();
    for (i, path) in paths.iter().enumerate() {
        let io_err = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let failure = walk.file(&mut reader, i > 0).map_err(io_err)?;
        if let Some(bad) = failure {
            let rest = count_lines(&mut reader, bad.at_line_start).map_err(io_err)?;
            let (unanswered, in_flight_at_end) = walk.calls.unanswered();
            return Ok(ChainReport {
                records: walk.records + rest,
                ok: false,
                first_bad: Some(bad.expected_seq),
                file: Some(path.display().to_string()),
                line: Some(bad.line),
                reason: Some(bad.reason),
                first_seq: None,
                last_seq: None,
                unanswered,
                in_flight_at_end,
            });
        }
    }
    let (unanswered, in_flight_at_end) = walk.calls.unanswered();
    Ok(ChainReport {
        records: walk.records,
        ok: true,
        first_bad: None,
        file: None,
        line: None,
        reason: None,
        first_seq: walk.started.then_some(walk.next_seq - walk.records),
        last_seq: walk.started.then_some(walk.next_seq - 1),
        unanswered,
        in_flight_at_end,
    })
}

/// The request records of state-changing calls still waiting for their
/// outcome, while [`verify_reader`] walks the chain.
///
/// A request and its outcome are paired on the request id *and* on what no
/// caller chooses: the server's id of the call (`call`, since 0.6.14), or,
/// in records written before it, the method and the peer address with its
/// port (so the connection). The request id alone is the client's
/// (`x-request-id`): paired on it alone, any caller could answer another's
/// open request by reusing its id, and a change cut short by a crash would
/// vanish from `unanswered`.
#[derive(Default)]
struct OpenRequests {
    /// (request_id, caller) -> the `seq`s of its request records with no
    /// outcome yet (a client may reuse its own request id).
    open: HashMap<(String, CallKey), Vec<u64>>,
    /// The newest request record whose outcome was found.
    last_answered: u64,
}

/// What a request record and its outcome record share and a caller cannot
/// set to another caller's: see [`OpenRequests`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum CallKey {
    /// The server's id of the call.
    Call(String),
    /// Records without one (written before 0.6.14).
    Peer {
        method: String,
        source: Option<String>,
    },
}

impl OpenRequests {
    fn note(&mut self, record: CheckedRecord) {
        let key = (record.request_id, record.caller);
        match record.phase.as_deref() {
            Some("request") => self.open.entry(key).or_default().push(record.seq),
            Some("outcome") => {
                if let Some(seqs) = self.open.get_mut(&key) {
                    if !seqs.is_empty() {
                        let request = seqs.remove(0);
                        self.last_answered = self.last_answered.max(request);
                    }
                    if seqs.is_empty() {
                        self.open.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }

    /// The requests with no outcome, in log order: those before the newest
    /// answered request (a later change began and ended while they never
    /// did), and those after it (in flight at the end of the log).
    fn unanswered(self) -> (Vec<Unanswered>, Vec<Unanswered>) {
        let mut all: Vec<Unanswered> = self
            .open
            .into_iter()
            .flat_map(|((request_id, _), seqs)| {
                seqs.into_iter().map(move |seq| Unanswered {
                    seq,
                    request_id: request_id.clone(),
                })
            })
            .collect();
        all.sort_by_key(|u| u.seq);
        let last_answered = self.last_answered;
        all.into_iter().partition(|u| u.seq < last_answered)
    }
}

/// Counts the lines (a last one without newline included) left in `reader`.
fn count_lines<R: BufRead>(reader: &mut R, mut at_line_start: bool) -> io::Result<u64> {
    let mut lines = 0;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(lines);
        }
        for &byte in chunk {
            if at_line_start {
                lines += 1;
            }
            at_line_start = byte == b'\n';
        }
        let used = chunk.len();
        reader.consume(used);
    }
}

fn chain_hash(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(prev);
    context.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

fn decode_hash(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Writes the part of a record's body between the time and `prev` into `buf`:
/// `,"request_id":` up to the end of `data`, the token and values as HMACs
/// under `key` (`"unavailable"` without one).
/// `token_tag`, when given, is the token's HMAC under `key`, already computed.
fn write_fields(
    buf: &mut Vec<u8>,
    event: &AuditEvent<'_>,
    key: Option<&hmac::Key>,
    phase: Option<Phase>,
    token_tag: Option<&[u8; 32]>,
) {
    let protected = |value: &[u8]| key.map(|key| hmac::sign(key, value));
    buf.extend_from_slice(b",\"request_id\":");
    push_json_str(buf, event.request_id);
    buf.extend_from_slice(b",\"method\":");
    push_json_str(buf, event.method);
    push_optional(buf, b"resource", event.resource);
    push_optional(buf, b"identity", event.identity);
    push_optional(buf, b"accessor", event.accessor);
    if let Some(actor) = &event.actor {
        push_optional(buf, b"actor_identity", Some(actor.identity));
        push_optional(buf, b"actor_accessor", Some(actor.accessor));
        push_optional(buf, b"subject_accessor", Some(actor.subject_accessor));
    }
    push_optional(buf, b"source", event.source);
    buf.extend_from_slice(b",\"outcome\":\"");
    buf.extend_from_slice(event.outcome.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"code\":");
    push_json_str(buf, event.code);
    push_optional(buf, b"error", event.error);
    if let Some(phase) = phase {
        buf.extend_from_slice(b",\"phase\":\"");
        buf.extend_from_slice(phase.as_str().as_bytes());
        buf.push(b'"');
        push_optional(buf, b"call", event.call);
    }
    if let Some(token) = event.token.filter(|token| !token.is_empty()) {
        buf.extend_from_slice(b",\"token\":");
        match token_tag {
            Some(tag) => push_protected(buf, Some(&tag[..])),
            None => push_protected(buf, protected(token).as_ref().map(|tag| tag.as_ref())),
        }
    }
    if !event.values.is_empty() {
        buf.extend_from_slice(b",\"data\":{");
        for (i, (name, value)) in event.values.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            push_json_str(buf, name);
            buf.push(b':');
            push_protected(buf, protected(value).as_ref().map(|tag| tag.as_ref()));
        }
        buf.push(b'}');
    }
}

/// The address of a `host:port` source without its port.
fn source_host(source: &str) -> &str {
    match source.parse::<std::net::SocketAddr>() {
        Ok(_) => source
            .rsplit_once(':')
            .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(source),
        Err(_) => source,
    }
}

/// The fields of an aggregate record, between the time and `prev`.
fn render_aggregate(key: &AggregateKey, tally: &Tally) -> Vec<u8> {
    let mut buf = Vec::with_capacity(FIELDS_CAPACITY);
    buf.extend_from_slice(b",\"request_id\":\"aggregate\",\"method\":");
    push_json_str(&mut buf, &key.method);
    push_optional(&mut buf, b"source", Some(&key.source));
    buf.extend_from_slice(b",\"outcome\":\"");
    buf.extend_from_slice(key.outcome.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"code\":");
    push_json_str(&mut buf, &key.code);
    buf.extend_from_slice(b",\"aggregate\":true,\"count\":");
    push_u64(&mut buf, tally.count);
    buf.extend_from_slice(b",\"window_start\":\"");
    push_time_ms(&mut buf, tally.window_start_ms, &mut None);
    buf.extend_from_slice(b"\",\"window_end\":\"");
    push_time_ms(&mut buf, tally.last_ms, &mut None);
    buf.push(b'"');
    buf
}

fn push_optional(buf: &mut Vec<u8>, name: &[u8], value: Option<&str>) {
    if let Some(value) = value.filter(|value| !value.is_empty()) {
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(name);
        buf.extend_from_slice(b"\":");
        push_json_str(buf, value);
    }
}

/// `"hmac-sha256:<hex>"`, or `"unavailable"` without a key.
fn push_protected(buf: &mut Vec<u8>, tag: Option<&[u8]>) {
    buf.push(b'"');
    match tag {
        Some(tag) => push_hmac(buf, tag),
        None => buf.extend_from_slice(UNAVAILABLE.as_bytes()),
    }
    buf.push(b'"');
}

fn push_hmac(buf: &mut Vec<u8>, tag: &[u8]) {
    buf.extend_from_slice(HMAC_PREFIX);
    push_hex(buf, tag);
}

fn push_hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Through a stack buffer, one `extend` per 32 bytes: a `push` per digit
    // checks the capacity each time (the HMACs and chain hashes are 32).
    let mut text = [0u8; 64];
    for chunk in bytes.chunks(32) {
        for (pair, &byte) in text.chunks_exact_mut(2).zip(chunk) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        buf.extend_from_slice(&text[..chunk.len() * 2]);
    }
}

fn push_u64(buf: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

fn push_padded(buf: &mut Vec<u8>, value: u32, width: usize) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for _ in (digits.len() - at)..width {
        buf.push(b'0');
    }
    buf.extend_from_slice(&digits[at..]);
}

/// [`push_time`] of `now_ms` (milliseconds since the epoch), reusing the text up
/// to the seconds from `second` when the second is the same.
fn push_time_ms(buf: &mut Vec<u8>, now_ms: u64, second: &mut Option<(u64, [u8; 19])>) {
    let secs = now_ms / 1000;
    let prefix = match second {
        Some((at, prefix)) if *at == secs => *prefix,
        _ => {
            let mut text = Vec::with_capacity(24);
            let time = i64::try_from(now_ms)
                .ok()
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .unwrap_or_default();
            push_time(&mut text, time);
            // `YYYY-MM-DDTHH:MM:SS.mmmZ`; a year past 9999 is longer and not kept.
            let (Some(head), 24) = (text.get(..19), text.len()) else {
                buf.extend_from_slice(&text);
                return;
            };
            let mut prefix = [0u8; 19];
            prefix.copy_from_slice(head);
            *second = Some((secs, prefix));
            prefix
        }
    };
    buf.extend_from_slice(&prefix);
    buf.push(b'.');
    push_padded(buf, (now_ms % 1000) as u32, 3);
    buf.push(b'Z');
}

/// RFC 3339, UTC, milliseconds: `2025-01-02T03:04:05.678Z`.
fn push_time(buf: &mut Vec<u8>, time: DateTime<Utc>) {
    // Years before 0 do not occur on a running clock; clamp rather than print a sign.
    push_padded(buf, u32::try_from(time.year()).unwrap_or(0), 4);
    buf.push(b'-');
    push_padded(buf, time.month(), 2);
    buf.push(b'-');
    push_padded(buf, time.day(), 2);
    buf.push(b'T');
    push_padded(buf, time.hour(), 2);
    buf.push(b':');
    push_padded(buf, time.minute(), 2);
    buf.push(b':');
    push_padded(buf, time.second(), 2);
    buf.push(b'.');
    // A leap second shows as nanosecond >= 1e9; keep it within the second.
    push_padded(buf, (time.nanosecond() / 1_000_000).min(999), 3);
    buf.push(b'Z');
}

/// A JSON string: `"` and `\` escaped, every control character escaped, so a record
/// is always one line whatever the caller passes.
fn push_json_str(buf: &mut Vec<u8>, text: &str) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    buf.push(b'"');
    // Nearly every byte of a record's strings is plain: skip them eight at
    // a time, then go byte by byte from the first word that needs care.
    let plain = plain_prefix(bytes);
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate().skip(plain) {
        let short: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f | 0x7f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            buf.extend_from_slice(b"\\u00");
            buf.push(DIGITS[usize::from(byte >> 4)]);
            buf.push(DIGITS[usize::from(byte & 0x0f)]);
        } else {
            buf.extend_from_slice(short);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
    buf.push(b'"');
}

/// How many leading bytes of `bytes` (a multiple of 8) need no escaping
/// in [`push_json_str`]: none is a control character (below 0x20, or
/// 0x7f), `"` or `\`. Eight bytes at a time, in a `u64` (the test holds it
/// to a byte-by-byte check); it may stop early, never late.
fn plain_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    /// A byte of `word` is zero (exact: no false positive, no miss).
    fn has_zero(word: u64) -> bool {
        (word.wrapping_sub(ONES) & !word & HIGH) != 0
    }
    let mut done = 0;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // Bytes of 0x80 and above are plain (UTF-8 text passes as is); for
        // the others, below 0x20 is a control character.
        let ascii = !w & HIGH;
        let control = (w & !HIGH).wrapping_sub(0x2020_2020_2020_2020) & ascii & HIGH;
        if control != 0
            || has_zero(w ^ (ONES * u64::from(b'"')))
            || has_zero(w ^ (ONES * u64::from(b'\\')))
            || has_zero(w ^ (ONES * 0x7f))
        {
            break;
        }
        done += 8;
    }
    done
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
