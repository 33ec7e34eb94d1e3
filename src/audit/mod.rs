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
//!  "identity":"..","accessor":"..","source":"..","outcome":"allowed|denied|failed","code":"OK",
//!  "error":"..","token":"hmac-sha256:<hex>","data":{"field":"hmac-sha256:<hex>"},
//!  "prev":"<64 hex>","hash":"<64 hex>"}
//! ```
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
//! [`AuditLog::append`] writes the whole line with one `write_all` on an `O_APPEND` file before
//! it returns, so the record is in the file (the page cache) and survives a crash of the process.
//! There is no fsync per record: a power loss may lose the newest records. [`AuditLog::sync`]
//! flushes to disk (at shutdown). If the write fails the chain does not advance, a partial line
//! is cut off again, and the caller must fail the request (fail closed). If the partial line
//! cannot be cut off, every later append fails until the log is reopened.
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

use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use chrono::{DateTime, Datelike, Timelike, Utc};
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The longest line [`verify_file`] and [`AuditLog::open`] accept.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Written in place of an HMAC while no audit key is set (sealed).
pub const UNAVAILABLE: &str = "unavailable";

const HMAC_PREFIX: &[u8] = b"hmac-sha256:";
const HASH_KEY: &[u8] = b",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = HASH_KEY.len() + 64 + 2;
/// A record buffer that grew past this is given back after the append.
const KEEP_BUFFER: usize = 64 * 1024;
const TAIL_CHUNK: u64 = 8 * 1024;

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
            .field("source", &self.source)
            .field("outcome", &self.outcome)
            .field("code", &self.code)
            .field("error", &self.error)
            .field("token", &self.token.map(|_| "[redacted]"))
            .field("values", &fields)
            .finish()
    }
}

/// The result of [`verify_file`]; serialises as `{"records", "ok", "first_bad"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Lines in the file, a torn last line included.
    pub records: u64,
    pub ok: bool,
    /// The `seq` expected at the first line that fails (its 1-based line number).
    pub first_bad: Option<u64>,
    /// Why that line fails, for humans; not part of the JSON.
    #[serde(skip)]
    pub reason: Option<&'static str>,
}

/// The tail of the chain and the file it is written to.
struct Chain {
    file: File,
    /// `seq` of the newest record, 0 for an empty file.
    seq: u64,
    /// Hash of the newest record, zeros for an empty file.
    head: [u8; 32],
    /// Bytes written so far: where to cut a partial line back to.
    len: u64,
    /// The record being built, reused across appends.
    buf: Vec<u8>,
    /// A partial line could not be cut off: refuse to write after it.
    broken: bool,
}

/// The append side of the audit log. Share it behind an `Arc`.
pub struct AuditLog {
    path: PathBuf,
    chain: Mutex<Chain>,
    key: RwLock<Option<Zeroizing<[u8; 32]>>>,
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
    pub fn open(path: &Path) -> Result<Self, AuditError> {
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
        Ok(Self {
            path: path.to_owned(),
            chain: Mutex::new(Chain {
                file,
                seq,
                head,
                len,
                buf: Vec::with_capacity(1024),
                broken: false,
            }),
            key: RwLock::new(None),
        })
    }

    /// Sets the audit HMAC key (at unseal) or clears it (`None`, at seal). The old key is zeroized.
    pub fn set_hmac_key(&self, key: Option<Zeroizing<[u8; 32]>>) {
        let mut slot = self.key.write().unwrap_or_else(PoisonError::into_inner);
        *slot = key;
    }

    /// Writes one record before returning. An error means the caller must fail the request.
    pub fn append(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        // HMACs first, outside the chain lock: a large value must not hold up other requests.
        let (token, values) = {
            let key = self.hmac_key();
            let token = event
                .token
                .filter(|token| !token.is_empty())
                .map(|token| key.as_ref().map(|key| hmac::sign(key, token)));
            let values: Vec<Option<hmac::Tag>> = event
                .values
                .iter()
                .map(|(_, value)| key.as_ref().map(|key| hmac::sign(key, value)))
                .collect();
            (token, values)
        };

        let mut guard = self.lock_chain();
        let chain = &mut *guard;
        if chain.broken {
            return Err(AuditError::Broken);
        }
        let seq = chain.seq + 1;
        chain.buf.clear();
        write_body(
            &mut chain.buf,
            seq,
            Utc::now(),
            event,
            token.as_ref(),
            &values,
            &chain.head,
        );
        let hash = chain_hash(&chain.head, &chain.buf);
        chain.buf.extend_from_slice(HASH_KEY);
        push_hex(&mut chain.buf, &hash);
        chain.buf.extend_from_slice(b"\"}\n");

        let result = chain.file.write_all(&chain.buf);
        let written = chain.buf.len() as u64;
        if chain.buf.capacity() > KEEP_BUFFER {
            chain.buf = Vec::with_capacity(1024);
        }
        match result {
            Ok(()) => {
                chain.seq = seq;
                chain.head = hash;
                chain.len += written;
                Ok(())
            }
            Err(error) => {
                // Cut off whatever part of the line reached the file, so the next record
                // starts on a line of its own.
                if chain.file.set_len(chain.len).is_err() {
                    chain.broken = true;
                }
                tracing::error!(path = %self.path.display(), %error, "audit write failed");
                Err(AuditError::Write(error))
            }
        }
    }

    /// `hmac-sha256:<hex>` of `value` under the audit key, as the log records it.
    pub fn hmac(&self, value: &[u8]) -> Result<String, AuditError> {
        let key = self.hmac_key().ok_or(AuditError::NoKey)?;
        let tag = hmac::sign(&key, value);
        Ok(format!("hmac-sha256:{}", hex::encode(tag.as_ref())))
    }

    /// The hash of the newest record (64 `0`s for an empty log): anchor it elsewhere.
    pub fn head(&self) -> String {
        hex::encode(self.lock_chain().head)
    }

    /// Flushes the file to disk (at shutdown; appends do not).
    pub fn sync(&self) -> Result<(), AuditError> {
        let chain = self.lock_chain();
        chain.file.sync_data().map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn hmac_key(&self) -> Option<hmac::Key> {
        let slot = self.key.read().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref()
            .map(|key| hmac::Key::new(hmac::HMAC_SHA256, &key[..]))
    }

    fn lock_chain(&self) -> MutexGuard<'_, Chain> {
        // Nothing under this lock panics; should something, the state is still whole
        // (it only changes after a successful write).
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
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
    #[serde(rename = "request_id")]
    _request_id: serde::de::IgnoredAny,
    #[serde(rename = "method")]
    _method: serde::de::IgnoredAny,
    #[serde(rename = "outcome")]
    _outcome: Outcome,
    #[serde(rename = "code")]
    _code: serde::de::IgnoredAny,
}

struct CheckedRecord {
    seq: u64,
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
        seq: head.seq,
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
    let mut line = Vec::with_capacity(1024);
    let mut records = 0u64;
    let mut prev = [0u8; 32];
    let failure = loop {
        line.clear();
        let read = reader
            .by_ref()
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            break None;
        }
        records += 1;
        let Some(text) = line.strip_suffix(b"\n") else {
            let reason = if line.len() > MAX_RECORD_BYTES {
                "record is too long"
            } else {
                "truncated record (no newline at the end)"
            };
            break Some((records, reason, false));
        };
        let checked = match check_record(text) {
            Ok(checked) => checked,
            Err(reason) => break Some((records, reason, true)),
        };
        if checked.seq != records {
            break Some((records, "seq is not the previous seq + 1", true));
        }
        if checked.prev != prev {
            break Some((records, "prev is not the hash of the previous record", true));
        }
        prev = checked.hash;
    };
    let Some((first_bad, reason, at_line_start)) = failure else {
        return Ok(VerifyReport {
            records,
            ok: true,
            first_bad: None,
            reason: None,
        });
    };
    records += count_lines(&mut reader, at_line_start)?;
    Ok(VerifyReport {
        records,
        ok: false,
        first_bad: Some(first_bad),
        reason: Some(reason),
    })
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

/// Writes the body of a record (everything before `,"hash":`) into `buf`.
fn write_body(
    buf: &mut Vec<u8>,
    seq: u64,
    time: DateTime<Utc>,
    event: &AuditEvent<'_>,
    token: Option<&Option<hmac::Tag>>,
    values: &[Option<hmac::Tag>],
    prev: &[u8; 32],
) {
    buf.extend_from_slice(b"{\"seq\":");
    push_u64(buf, seq);
    buf.extend_from_slice(b",\"time\":\"");
    push_time(buf, time);
    buf.extend_from_slice(b"\",\"request_id\":");
    push_json_str(buf, event.request_id);
    buf.extend_from_slice(b",\"method\":");
    push_json_str(buf, event.method);
    push_optional(buf, b"resource", event.resource);
    push_optional(buf, b"identity", event.identity);
    push_optional(buf, b"accessor", event.accessor);
    push_optional(buf, b"source", event.source);
    buf.extend_from_slice(b",\"outcome\":\"");
    buf.extend_from_slice(event.outcome.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"code\":");
    push_json_str(buf, event.code);
    push_optional(buf, b"error", event.error);
    if let Some(tag) = token {
        buf.extend_from_slice(b",\"token\":");
        push_protected(buf, tag.as_ref());
    }
    if !event.values.is_empty() {
        buf.extend_from_slice(b",\"data\":{");
        for (i, ((name, _), tag)) in event.values.iter().zip(values).enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            push_json_str(buf, name);
            buf.push(b':');
            push_protected(buf, tag.as_ref());
        }
        buf.push(b'}');
    }
    buf.extend_from_slice(b",\"prev\":\"");
    push_hex(buf, prev);
    buf.push(b'"');
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
fn push_protected(buf: &mut Vec<u8>, tag: Option<&hmac::Tag>) {
    buf.push(b'"');
    match tag {
        Some(tag) => push_hmac(buf, tag),
        None => buf.extend_from_slice(UNAVAILABLE.as_bytes()),
    }
    buf.push(b'"');
}

fn push_hmac(buf: &mut Vec<u8>, tag: &hmac::Tag) {
    buf.extend_from_slice(HMAC_PREFIX);
    push_hex(buf, tag.as_ref());
}

fn push_hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &byte in bytes {
        buf.push(DIGITS[usize::from(byte >> 4)]);
        buf.push(DIGITS[usize::from(byte & 0x0f)]);
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
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
