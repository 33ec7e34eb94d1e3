//! Snapshots: a logical, point-in-time copy of the whole store, and its restore.
//!
//! Owns no storage prefix. A snapshot holds only what the store holds: every
//! key and value as stored (ciphertext made by the barrier, and the seal
//! configuration `sys/seal` with the keyring `sys/keyring`, itself encrypted
//! under the root key that no store holds). Consistency comes from the
//! backend's `export` (see `storage::SledBackend::export`).
//!
//! # File format
//!
//! ```text
//! keyward-snapshot 1\n
//! {header JSON}\n
//! content: per pair, key length (u32 BE) || key || value length (u32 BE) || value
//! ```
//!
//! The header: `format` (1), `store_format` (the storage format version of
//! the pairs), `keyward_version`, `vault_id`, `key_term`, `keys` (pairs),
//! `content_bytes`, `sha256` (of the content, hex), `created_at` (RFC 3339)
//! and `hmac`: HMAC-SHA256, under the key the keyring derives for
//! `snapshot/hmac`, of the signed text ([`Header::signed_text`]) which
//! names every other header field. The SHA-256 catches damage and is checked
//! by `restore` before anything is written; the HMAC catches an alteration
//! by someone without the vault's keys (who can re-hash the content, never
//! re-sign it), and is checked at the restored vault's first unseal, the
//! first moment the keys exist (see `barrier::restore`).

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::Path;

use ring::digest;
use serde::{Deserialize, Serialize};

use crate::barrier::restore::{self as mark, RestoreMarker, SNAPSHOT_PURPOSE};
use crate::barrier::{Barrier, BarrierError};
use crate::storage::{format, Backend, SledBackend, StorageError};

/// The first line of every snapshot file.
pub const MAGIC: &[u8] = b"keyward-snapshot 1\n";
/// The snapshot format this binary writes and reads.
pub const FORMAT: u32 = 1;
/// The longest header line read.
const MAX_HEADER: u64 = 64 * 1024;
/// The longest key or value a pair may declare (sled keeps far less).
const MAX_ITEM: u32 = 64 * 1024 * 1024;
const SEAL_KEY: &[u8] = b"sys/seal";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot file {0}: {1}")]
    Io(String, io::Error),
    #[error("the snapshot is damaged: {0}; nothing was written")]
    Damaged(String),
    #[error(
        "the snapshot has format {found}, newer than this binary reads ({supported}); nothing was written"
    )]
    NewerFormat { found: u32, supported: u32 },
    #[error("the target store is not empty: restore into an empty folder, or add --force to replace what it holds")]
    NotEmpty,
    #[error("{0} holds files that are not a keyward store; --force replaces only a store")]
    NotAStore(String),
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The header of a snapshot file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub format: u32,
    pub store_format: u32,
    pub keyward_version: String,
    pub vault_id: String,
    pub key_term: u32,
    pub keys: u64,
    pub content_bytes: u64,
    pub sha256: String,
    pub created_at: String,
    pub hmac: String,
}

impl Header {
    /// The text the HMAC covers: every field but `hmac`, one per line.
    pub fn signed_text(&self) -> String {
        format!(
            "keyward-snapshot/{}\nstore_format={}\nkeyward_version={}\nvault_id={}\nkey_term={}\n\
             keys={}\ncontent_bytes={}\nsha256={}\ncreated_at={}\n",
            self.format,
            self.store_format,
            self.keyward_version,
            self.vault_id,
            self.key_term,
            self.keys,
            self.content_bytes,
            self.sha256,
            self.created_at
        )
    }
}

/// A snapshot made on the server: its header and the content, in an
/// unlinked temporary file (gone when dropped, and after a crash).
pub struct Taken {
    pub header: Header,
    content: File,
}

impl std::fmt::Debug for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taken")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl Taken {
    /// The first bytes of the file: the magic line and the header line.
    pub fn head(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        // A struct of strings and numbers always serialises.
        out.extend_from_slice(&serde_json::to_vec(&self.header).unwrap_or_default());
        out.push(b'\n');
        out
    }

    /// Bytes of the whole file.
    pub fn file_bytes(&self) -> u64 {
        self.head().len() as u64 + self.header.content_bytes
    }

    /// The content, read from its start.
    pub fn content(mut self) -> io::Result<File> {
        self.content.rewind()?;
        Ok(self.content)
    }
}

/// Appends one pair to `out` and the digest.
fn frame(
    out: &mut impl Write,
    sha: &mut digest::Context,
    key: &[u8],
    value: &[u8],
) -> io::Result<u64> {
    let mut written = 0u64;
    for part in [key, value] {
        let len = u32::try_from(part.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a stored item is over 4 GiB"))?
            .to_be_bytes();
        out.write_all(&len)?;
        out.write_all(part)?;
        sha.update(&len);
        sha.update(part);
        written += 4 + part.len() as u64;
    }
    Ok(written)
}

/// Takes a snapshot of the unsealed vault behind `barrier`; the content
/// goes to an unlinked file made in `scratch_dir` (mode 0600). Blocking:
/// run it on a blocking thread.
pub fn take(
    barrier: &Barrier,
    scratch_dir: &Path,
    now_rfc3339: String,
) -> Result<Taken, SnapshotError> {
    let (vault_id, key_term) = barrier.snapshot_identity()?;
    let hmac_key = barrier.derive_key(SNAPSHOT_PURPOSE)?;
    let scratch = scratch_dir.join(format!(".snapshot-{}.tmp", uuid::Uuid::new_v4()));
    let named = |e: io::Error| SnapshotError::Io(scratch.display().to_string(), e);
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&scratch)
            .map_err(named)?
    };
    // Unlinked at once: the handle keeps it while the snapshot is streamed.
    std::fs::remove_file(&scratch).map_err(named)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut sha = digest::Context::new(&digest::SHA256);
    let mut content_bytes = 0u64;
    let mut io_failure = None;
    let keys = barrier.export(
        &mut |key, value| match frame(&mut out, &mut sha, key, value) {
            Ok(n) => {
                content_bytes += n;
                Ok(())
            }
            Err(e) => {
                let message = e.to_string();
                io_failure = Some(e);
                Err(StorageError::Io(format!(
                    "snapshot scratch file: {message}"
                )))
            }
        },
    );
    if let Some(e) = io_failure {
        return Err(named(e));
    }
    let keys = keys?;
    let content = out.into_inner().map_err(|e| named(e.into_error()))?;
    let mut header = Header {
        format: FORMAT,
        store_format: format::CURRENT,
        keyward_version: env!("CARGO_PKG_VERSION").to_owned(),
        vault_id,
        key_term,
        keys,
        content_bytes,
        sha256: hex::encode(sha.finish().as_ref()),
        created_at: now_rfc3339,
        hmac: String::new(),
    };
    header.hmac = mark::sign(&hmac_key, header.signed_text().as_bytes());
    Ok(Taken { header, content })
}

/// Reads the magic line and the header; leaves `reader` at the content.
fn read_header(reader: &mut impl BufRead) -> Result<Header, SnapshotError> {
    let mut magic = vec![0u8; MAGIC.len()];
    reader.read_exact(&mut magic).map_err(|_| {
        SnapshotError::Damaged("it does not begin with the snapshot magic line".into())
    })?;
    if magic != MAGIC {
        return Err(SnapshotError::Damaged(
            "it does not begin with the snapshot magic line (keyward-snapshot 1)".into(),
        ));
    }
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_HEADER)
        .read_until(b'\n', &mut line)
        .map_err(|e| SnapshotError::Damaged(format!("the header cannot be read: {e}")))?;
    if line.pop() != Some(b'\n') {
        return Err(SnapshotError::Damaged(
            "the header line is cut off or too long".into(),
        ));
    }
    let header: Header = serde_json::from_slice(&line)
        .map_err(|_| SnapshotError::Damaged("the header is not a snapshot header".into()))?;
    if header.format != FORMAT {
        return Err(SnapshotError::NewerFormat {
            found: header.format,
            supported: FORMAT,
        });
    }
    // Version 0 was never written: a store marked so opens nowhere. Refused
    // here, before anything is written (the header is not under the
    // SHA-256, and its HMAC is checked only at the first unseal).
    if header.store_format == 0 {
        return Err(SnapshotError::Damaged(
            "its header names store format 0, which no release writes".into(),
        ));
    }
    if header.store_format > format::CURRENT {
        return Err(SnapshotError::Storage(StorageError::NewerFormat {
            found: header.store_format,
            supported: format::CURRENT,
        }));
    }
    Ok(header)
}

/// Where `walk` hands each pair.
type PairSink<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), SnapshotError> + 'a;

/// Walks the content: checks its framing, length, pair count and SHA-256
/// against the header, and hands each pair to `each`.
fn walk(
    reader: &mut impl Read,
    header: &Header,
    each: &mut PairSink<'_>,
) -> Result<(), SnapshotError> {
    let damaged = |what: &str| SnapshotError::Damaged(what.to_owned());
    let mut sha = digest::Context::new(&digest::SHA256);
    let mut read = 0u64;
    let mut pairs = 0u64;
    let mut key = Vec::new();
    let mut value = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match read_full(reader, &mut len) {
            Ok(0) => break,
            Ok(4) => {}
            Ok(_) => return Err(damaged("the content ends inside a pair")),
            Err(e) => return Err(SnapshotError::Io("content".into(), e)),
        }
        for (i, item) in [&mut key, &mut value].into_iter().enumerate() {
            if i == 1
                && read_full(reader, &mut len)
                    .map_err(|e| SnapshotError::Io("content".into(), e))?
                    != 4
            {
                return Err(damaged("the content ends inside a pair"));
            }
            let n = u32::from_be_bytes(len);
            if n > MAX_ITEM || read + 4 + u64::from(n) > header.content_bytes {
                return Err(damaged(
                    "a pair is longer than the content the header names",
                ));
            }
            item.resize(n as usize, 0);
            if read_full(reader, item).map_err(|e| SnapshotError::Io("content".into(), e))?
                != item.len()
            {
                return Err(damaged("the content ends inside a pair"));
            }
            sha.update(&len);
            sha.update(item);
            read += 4 + u64::from(n);
        }
        pairs += 1;
        each(&key, &value)?;
    }
    if read != header.content_bytes {
        return Err(damaged("the content is not as long as the header says"));
    }
    if hex::encode(sha.finish().as_ref()) != header.sha256 {
        return Err(damaged(
            "the SHA-256 of the content does not match the header",
        ));
    }
    if pairs != header.keys {
        return Err(damaged("the number of keys does not match the header"));
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match reader.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// Checks a snapshot file end to end (magic, header, framing, length, key
/// count, SHA-256, a seal record of the vault the header names) without
/// writing anything; returns its header.
pub fn check(file: &Path) -> Result<Header, SnapshotError> {
    let named = |e| SnapshotError::Io(file.display().to_string(), e);
    let mut reader = BufReader::with_capacity(1 << 20, File::open(file).map_err(named)?);
    let header = read_header(&mut reader)?;
    let mut seal_ok = false;
    walk(&mut reader, &header, &mut |key, value| {
        if key == SEAL_KEY {
            let seal: serde_json::Value = serde_json::from_slice(value)
                .map_err(|_| SnapshotError::Damaged("its seal configuration is not JSON".into()))?;
            seal_ok =
                seal.get("vault_id").and_then(|v| v.as_str()) == Some(header.vault_id.as_str());
        }
        Ok(())
    })?;
    if !seal_ok {
        return Err(SnapshotError::Damaged(
            "it holds no seal configuration of the vault its header names".into(),
        ));
    }
    Ok(header)
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub snapshot: String,
    pub vault_id: String,
    pub keys: u64,
    pub sha256: String,
    pub created_at: String,
}

/// Restores `file` into the sled folder `target` (offline: no server may
/// hold it). The whole file is checked first ([`check`]); a damaged file
/// writes nothing. The target must be empty unless `force`, which removes
/// what it holds. The restore mark (`barrier::restore`) is written before
/// the first pair and completed after the last, so the vault it makes
/// checks the snapshot's HMAC at its first unseal and a restore cut short
/// never opens.
pub fn restore(file: &Path, target: &Path, force: bool) -> Result<Restored, SnapshotError> {
    let header = check(file)?;
    // A folder holding anything but a keyward store is never written into;
    // one holding anything at all needs --force.
    if let Ok(entries) = std::fs::read_dir(target) {
        if entries.count() > 0 {
            if !force {
                return Err(SnapshotError::NotEmpty);
            }
            if !target.join("db").is_file() || !target.join("conf").is_file() {
                return Err(SnapshotError::NotAStore(target.display().to_string()));
            }
        }
    }
    let backend = SledBackend::open(target)?;
    if !backend.is_empty() {
        if !force {
            return Err(SnapshotError::NotEmpty);
        }
        backend.clear()?;
    }
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string());
    let mut marker = RestoreMarker {
        state: mark::WRITING.to_owned(),
        snapshot: name.clone(),
        sha256: header.sha256.clone(),
        signed: header.signed_text(),
        hmac: header.hmac.clone(),
    };
    mark::write_marker(&backend, &marker)?;
    let named = |e| SnapshotError::Io(file.display().to_string(), e);
    let mut reader = BufReader::with_capacity(1 << 20, File::open(file).map_err(named)?);
    let again = read_header(&mut reader)?;
    if again != header {
        return Err(SnapshotError::Damaged(
            "the file changed while it was restored".into(),
        ));
    }
    // The file is read again: a change since `check` fails the SHA-256 at
    // the end and leaves the mark `writing` (the vault will not unseal).
    walk(&mut reader, &header, &mut |key, value| {
        if key == mark::MARKER_KEY.as_bytes() {
            return Ok(());
        }
        Ok(backend.put(key, value)?)
    })?;
    backend.flush()?;
    backend.restore_format(header.store_format)?;
    marker.state = mark::RESTORED.to_owned();
    mark::write_marker(&backend, &marker)?;
    Ok(Restored {
        snapshot: name,
        vault_id: header.vault_id,
        keys: header.keys,
        sha256: header.sha256,
        created_at: header.created_at,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
