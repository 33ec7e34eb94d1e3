//! The embedded default backend: one sled database, one default tree.
//!
//! sled 0.34 calls are synchronous. Reads and single writes touch its page
//! cache and are cheap; `flush` does disk I/O and an fsync, so async callers
//! go through `GroupCommit`, which runs it in `spawn_blocking` and shares it.
//! An atomic batch is not cheap: sled seals and writes its log buffer before
//! and after the batch (two synchronous writes) while holding a lock that
//! excludes every other operation; the hot paths use `apply_in_order`.
//!
//! `apply_in_order` keeps the trait's default (one insert or remove after
//! another). Its prefix promise rests on sled's recovery, which replays the
//! log in order and stops at the first gap or torn message, so a write that
//! survived a crash has every write logged before it.
//!
//! Known limit: sled writes a log message larger than a quarter of a segment
//! (128 KiB here: a large secret version, or a leaf holding several) to a
//! file of its own under `blobs/` and never syncs that file. A killed
//! process loses nothing (the kernel holds the file), but after a power
//! loss such a value can be missing while later writes survive.

use std::path::Path;

use super::{Backend, BatchOp, CasOutcome, KeyValues, StorageError};

/// How long an open waits for the folder lock (see `SledBackend::open`).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A `Backend` over a sled database folder.
pub struct SledBackend {
    db: sled::Db,
}

impl std::fmt::Debug for SledBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledBackend").finish_non_exhaustive()
    }
}

/// Maps a sled error to ours. sled's messages name files, offsets and the
/// failed I/O, never a stored key or value.
fn sled_error(operation: &'static str, error: sled::Error) -> StorageError {
    match error {
        sled::Error::Corruption { .. } => StorageError::Corrupt(format!("{operation}: {error}")),
        other => StorageError::Io(format!("{operation}: {other}")),
    }
}

/// Makes a missing storage folder (and missing parents) with mode 0700. An
/// existing folder is left as it is: whether it may be used is the opener's
/// decision (the server refuses one open to other users).
fn prepare_folder(path: &Path) -> Result<(), StorageError> {
    let named = |e: std::io::Error| StorageError::Io(format!("{}: {e}", path.display()));
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(path).map_err(named)
        }
        Err(e) => Err(named(e)),
    }
}

/// Sets what sled made directly in the folder to the owner alone: files
/// 0600, folders 0700 (the folder's own mode is the opener's concern).
fn keep_private(path: &Path) -> Result<(), StorageError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let named = |e: std::io::Error| StorageError::Io(format!("{}: {e}", path.display()));
        for entry in std::fs::read_dir(path).map_err(named)? {
            let entry = entry.map_err(named)?;
            let meta = entry.metadata().map_err(named)?;
            let mode = meta.permissions().mode() & 0o7777;
            let private = if meta.is_dir() { 0o700 } else { 0o600 };
            if mode & 0o077 != 0 && (meta.is_dir() || meta.is_file()) {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(private))
                    .map_err(named)?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

impl SledBackend {
    /// Opens (or creates) the sled database in the folder `path`. sled locks
    /// the folder: an open while another process holds it fails with `Io`
    /// after `LOCK_WAIT`. The wait is there because sled lets go of the lock
    /// only when the background work of a dropped database has ended, a
    /// moment after the drop: a reopen in the same process (a restart in
    /// tests or the start-up bench) would otherwise fail now and then.
    ///
    /// A missing folder is made with mode 0700, and the files sled makes
    /// directly in it are set to 0600 (folders 0700). An existing folder's
    /// own mode is never changed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        prepare_folder(path.as_ref())?;
        let started = std::time::Instant::now();
        loop {
            match sled::Config::new().path(path.as_ref()).open() {
                Ok(db) => {
                    keep_private(path.as_ref())?;
                    return Ok(Self { db });
                }
                // sled says so only in the message (kind `Other`).
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && started.elapsed() < LOCK_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(sled_error("open", e)),
            }
        }
    }

    fn collect(
        iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
        operation: &'static str,
    ) -> Result<KeyValues, StorageError> {
        iter.map(|item| {
            item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| sled_error(operation, e))
        })
        .collect()
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| sled_error("get", e))
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.db
            .insert(key, value)
            .map(|_| ())
            .map_err(|e| sled_error("put", e))
    }

    fn delete(&self, key: &[u8]) -> Result<(), StorageError> {
        self.db
            .remove(key)
            .map(|_| ())
            .map_err(|e| sled_error("delete", e))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StorageError> {
        Self::collect(self.db.scan_prefix(prefix), "scan_prefix")
    }

    fn scan_range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<KeyValues, StorageError> {
        // An empty or inverted range holds nothing; do not hand it to sled.
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        Self::collect(self.db.range(start..end).take(limit), "scan_range")
    }

    fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, StorageError> {
        match self
            .db
            .compare_and_swap(key, expected, new)
            .map_err(|e| sled_error("compare_and_swap", e))?
        {
            Ok(()) => Ok(CasOutcome::Swapped),
            Err(conflict) => Ok(CasOutcome::Conflict {
                current: conflict.current.map(|v| v.to_vec()),
            }),
        }
    }

    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                BatchOp::Put(key, value) => batch.insert(key, value),
                BatchOp::Delete(key) => batch.remove(key),
            }
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| sled_error("batch", e))
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| sled_error("flush", e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, SledBackend) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path().join("db")).unwrap();
        (dir, backend)
    }

    #[test]
    fn get_put_delete() {
        let (_dir, db) = open();
        assert_eq!(db.get(b"a").unwrap(), None);
        db.put(b"a", b"1").unwrap();
        assert_eq!(db.get(b"a").unwrap(), Some(b"1".to_vec()));
        db.put(b"a", b"2").unwrap();
        assert_eq!(db.get(b"a").unwrap(), Some(b"2".to_vec()));
        db.delete(b"a").unwrap();
        assert_eq!(db.get(b"a").unwrap(), None);
        // Deleting a missing key is not an error.
        db.delete(b"a").unwrap();
    }

    #[test]
    fn scans_are_ordered_and_bounded() {
        let (_dir, db) = open();
        for key in ["b/2", "a/1", "b/1", "b/3", "c/1", "b"] {
            db.put(key.as_bytes(), key.as_bytes()).unwrap();
        }
        let keys = |pairs: Vec<(Vec<u8>, Vec<u8>)>| {
            pairs
                .into_iter()
                .map(|(k, v)| {
                    assert_eq!(k, v);
                    String::from_utf8(k).unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(db.scan_prefix(b"b/").unwrap()), ["b/1", "b/2", "b/3"]);
        assert_eq!(keys(db.scan_prefix(b"").unwrap()).len(), 6);
        assert_eq!(
            keys(db.scan_range(b"b/", b"c", 10).unwrap()),
            ["b/1", "b/2", "b/3"]
        );
        assert_eq!(keys(db.scan_range(b"b/", b"c", 2).unwrap()), ["b/1", "b/2"]);
        assert_eq!(keys(db.scan_range(b"b/2", b"b/3", 10).unwrap()), ["b/2"]);
        assert!(db.scan_range(b"c", b"a", 10).unwrap().is_empty());
        assert!(db.scan_range(b"a", b"z", 0).unwrap().is_empty());
    }

    #[test]
    fn compare_and_swap_reports_the_current_value() {
        let (_dir, db) = open();
        assert_eq!(
            db.compare_and_swap(b"k", None, Some(b"1")).unwrap(),
            CasOutcome::Swapped
        );
        assert_eq!(
            db.compare_and_swap(b"k", None, Some(b"2")).unwrap(),
            CasOutcome::Conflict {
                current: Some(b"1".to_vec())
            }
        );
        assert_eq!(
            db.compare_and_swap(b"k", Some(b"1"), Some(b"2")).unwrap(),
            CasOutcome::Swapped
        );
        assert_eq!(
            db.compare_and_swap(b"k", Some(b"2"), None).unwrap(),
            CasOutcome::Swapped
        );
        assert_eq!(
            db.compare_and_swap(b"k", Some(b"2"), None).unwrap(),
            CasOutcome::Conflict { current: None }
        );
        assert_eq!(db.get(b"k").unwrap(), None);
    }

    #[test]
    fn batch_applies_every_operation() {
        let (_dir, db) = open();
        db.put(b"gone", b"x").unwrap();
        db.batch(vec![
            BatchOp::Put(b"a".to_vec(), b"1".to_vec()),
            BatchOp::Put(b"b".to_vec(), b"2".to_vec()),
            BatchOp::Delete(b"gone".to_vec()),
        ])
        .unwrap();
        assert_eq!(db.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(db.get(b"b").unwrap(), Some(b"2".to_vec()));
        assert_eq!(db.get(b"gone").unwrap(), None);
    }

    #[test]
    fn data_survives_reopen_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let db = SledBackend::open(&path).unwrap();
            db.put(b"k", b"v").unwrap();
            db.flush().unwrap();
        }
        let db = SledBackend::open(&path).unwrap();
        assert_eq!(db.get(b"k").unwrap(), Some(b"v".to_vec()));
    }
}
