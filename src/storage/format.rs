//! The store's format version, kept beside the data (sled tree `keyward-meta`,
//! key `format`, a big-endian u32), never among the barrier's keys.
//!
//! | version | release | what it holds |
//! | --- | --- | --- |
//! | 1 | 0.2.1 (no marker) | token records of 0.2.1, rotation runs with string states |
//! | 2 | 0.3.0 | rotation runs as typed records (`format = 1` in the record) |
//! | 3 | 0.3.x, this one | `sys/seal-restore`: a restored store checks its snapshot's HMAC at its first unseal |
//!
//! A store with no marker and no data is new: it gets [`CURRENT`]. A store
//! with data and no marker was written by 0.2.1 (version 1). A version newer
//! than [`CURRENT`] is refused, naming both ([`StorageError::NewerFormat`]):
//! an older binary would misread or skip what it does not know (a 0.3.0
//! binary would unseal a restored vault without checking its snapshot).
//!
//! Migration runs one step at a time: a step rewrites what it must (each
//! rewrite is idempotent), flushes, and only then records its version and
//! flushes again. A crash inside a step leaves the old version recorded, so
//! the next open runs that step again. Steps 1 -> 2 and 2 -> 3 rewrite
//! nothing: 0.3 reads 0.2.1's records as they are (rotation runs are
//! decoded in either form) and a store that was never restored holds no
//! `sys/seal-restore`; they record the version, so that no older binary
//! opens the store afterwards.

use super::StorageError;

/// The format this binary writes.
pub const CURRENT: u32 = 3;
/// The version of a store that has data but no marker (0.2.1).
pub const UNMARKED: u32 = 1;

const META_TREE: &[u8] = b"keyward-meta";
const FORMAT_KEY: &[u8] = b"format";

fn io(operation: &'static str) -> impl Fn(sled::Error) -> StorageError {
    move |e| StorageError::Io(format!("{operation}: {e}"))
}

/// The version recorded in `db`, [`UNMARKED`] for a store with data and no
/// marker, `None` for an empty store with no marker.
pub(crate) fn read(db: &sled::Db) -> Result<Option<u32>, StorageError> {
    let meta = db.open_tree(META_TREE).map_err(io("format version"))?;
    match meta.get(FORMAT_KEY).map_err(io("format version"))? {
        Some(bytes) => {
            let raw: [u8; 4] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| StorageError::Corrupt("the format version is not 4 bytes".into()))?;
            Ok(Some(u32::from_be_bytes(raw)))
        }
        None if db.is_empty() => Ok(None),
        None => Ok(Some(UNMARKED)),
    }
}

/// Records `version` and flushes.
pub(crate) fn write(db: &sled::Db, version: u32) -> Result<(), StorageError> {
    let meta = db.open_tree(META_TREE).map_err(io("format version"))?;
    meta.insert(FORMAT_KEY, &version.to_be_bytes())
        .map_err(io("format version"))?;
    meta.flush().map_err(io("format version"))?;
    Ok(())
}

/// Refuses a newer format, migrates an older one, marks a new store.
pub(crate) fn check_and_migrate(db: &sled::Db) -> Result<(), StorageError> {
    let found = match read(db)? {
        None => return write(db, CURRENT),
        Some(found) => found,
    };
    if found > CURRENT {
        return Err(StorageError::NewerFormat {
            found,
            supported: CURRENT,
        });
    }
    if found == 0 {
        return Err(StorageError::Corrupt("the format version is 0".into()));
    }
    for from in found..CURRENT {
        migrate_step(db, from)?;
        db.flush().map_err(io("migration"))?;
        write(db, from + 1)?;
        tracing::info!(from, to = from + 1, "storage format migrated");
    }
    Ok(())
}

/// Rewrites what version `from + 1` stores differently from `from`.
fn migrate_step(_db: &sled::Db, from: u32) -> Result<(), StorageError> {
    match from {
        // 1 -> 2: rotation run records stay as they are (decoded in either
        // form). 2 -> 3: only restored stores hold the new record.
        1 | 2 => Ok(()),
        _ => Err(StorageError::Corrupt(format!(
            "no migration from format version {from}"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::storage::{Backend, SledBackend};

    #[test]
    fn a_new_store_is_marked_current() {
        let dir = tempfile::tempdir().unwrap();
        drop(SledBackend::open(dir.path()).unwrap());
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(read(&db).unwrap(), Some(CURRENT));
    }

    #[test]
    fn an_unmarked_store_with_data_is_migrated_from_version_1() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(b"secrets/x", b"v".as_ref()).unwrap();
            db.flush().unwrap();
            assert_eq!(read(&db).unwrap(), Some(UNMARKED));
        }
        let backend = SledBackend::open(dir.path()).unwrap();
        assert_eq!(backend.get(b"secrets/x").unwrap(), Some(b"v".to_vec()));
        drop(backend);
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(read(&db).unwrap(), Some(CURRENT));
    }

    #[test]
    fn a_crash_mid_migration_migrates_again() {
        // A crash after step 1 -> 2 recorded 2: the next open runs 2 -> 3.
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(b"k", b"v".as_ref()).unwrap();
            write(&db, 2).unwrap();
        }
        drop(SledBackend::open(dir.path()).unwrap());
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(read(&db).unwrap(), Some(CURRENT));
    }

    #[test]
    fn a_newer_store_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            write(&db, CURRENT + 1).unwrap();
        }
        let error = SledBackend::open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(&format!("format version {}", CURRENT + 1)),
            "{error}"
        );
        assert!(error.contains(&format!("version {CURRENT}")), "{error}");
    }
}
