//! The mark a snapshot restore leaves in the store, and its check at unseal.
//!
//! Storage: `sys/seal-restore` (under the barrier's reserved `sys/seal`
//! prefix, plaintext JSON like `sys/seal`: it holds no key and no value,
//! only the snapshot's name, its signed header text and that header's
//! HMAC). A restore runs offline, with no key, so it cannot check the HMAC
//! itself: it writes this mark (`writing` before the first pair, `restored`
//! after the last), and the first unseal checks the HMAC under the key
//! derived for [`SNAPSHOT_PURPOSE`] from the keyring it has just opened. A
//! match removes the mark; a mismatch (someone re-hashed an altered
//! snapshot) leaves the vault sealed with a message, and so does a mark
//! still `writing` (the restore did not finish).

use ring::hmac;
use serde::{Deserialize, Serialize};

use super::{derive_from_root, BarrierError, Key};
use crate::storage::{Backend, StorageError};

/// Where the mark is kept.
pub const MARKER_KEY: &str = "sys/seal-restore";
/// The derivation purpose of the snapshot HMAC key.
pub const SNAPSHOT_PURPOSE: &str = "snapshot/hmac";

/// The mark of a restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreMarker {
    /// `writing` while pairs are written, `restored` once all are.
    pub state: String,
    /// The snapshot's file name, for messages and the audit log.
    pub snapshot: String,
    /// The snapshot's SHA-256 (hex), for the audit log.
    pub sha256: String,
    /// The header text the HMAC covers.
    pub signed: String,
    /// HMAC-SHA256 of `signed` (hex).
    pub hmac: String,
}

impl RestoreMarker {
    /// A field of the signed header text (`created_at`, `key_term`, ...).
    pub fn signed_field(&self, name: &str) -> Option<&str> {
        self.signed
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
    }
}

pub const WRITING: &str = "writing";
pub const RESTORED: &str = "restored";

/// Writes the mark and flushes.
pub fn write_marker(backend: &dyn Backend, marker: &RestoreMarker) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec(marker)
        .map_err(|e| StorageError::Corrupt(format!("restore mark: {e}")))?;
    backend.put(MARKER_KEY.as_bytes(), &bytes)?;
    backend.flush()
}

/// The mark, if the store was restored and not unsealed since.
pub fn read_marker(backend: &dyn Backend) -> Result<Option<RestoreMarker>, StorageError> {
    match backend.get(MARKER_KEY.as_bytes())? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|_| StorageError::Corrupt("sys/seal-restore is not a restore mark".into())),
    }
}

/// The HMAC a snapshot header carries: HMAC-SHA256 under `key`, hex.
pub fn sign(key: &[u8; 32], signed: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hex::encode(hmac::sign(&key, signed).as_ref())
}

/// At unseal, with the keyring just opened: a restored store opens only if
/// its snapshot's HMAC is this vault's. Removes the mark when it is.
pub(crate) fn check_at_unseal(
    backend: &dyn Backend,
    derivation_root: &Key,
) -> Result<(), BarrierError> {
    let Some(marker) = read_marker(backend)? else {
        return Ok(());
    };
    if marker.state != RESTORED {
        return Err(BarrierError::SnapshotRejected(format!(
            "the restore of snapshot {} did not finish: restore it again with --force",
            marker.snapshot
        )));
    }
    let key = derive_from_root(derivation_root, SNAPSHOT_PURPOSE)?;
    let tag = hex::decode(&marker.hmac).unwrap_or_default();
    let verified = hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, &key[..]),
        marker.signed.as_bytes(),
        &tag,
    );
    if verified.is_err() {
        tracing::error!(snapshot = %marker.snapshot, "restored snapshot refused: its HMAC is not this vault's");
        return Err(BarrierError::SnapshotRejected(format!(
            "this store was restored from snapshot {}, whose HMAC does not match this vault's \
             keys: the snapshot was altered after it was taken; the vault stays sealed",
            marker.snapshot
        )));
    }
    backend.delete(MARKER_KEY.as_bytes())?;
    backend.flush()?;
    tracing::info!(snapshot = %marker.snapshot, "restored snapshot verified at unseal");
    Ok(())
}
