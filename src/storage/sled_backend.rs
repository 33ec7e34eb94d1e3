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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError, RwLock};

use super::{format, Backend, BatchOp, CasOutcome, KeyValues, StorageError};

/// How long an open waits for the folder lock (see `SledBackend::open`).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A `Backend` over a sled database folder.
pub struct SledBackend {
    db: sled::Db,
    /// While a snapshot runs: the value each key had when it began, kept by
    /// the first write to the key after that (see `export`). Every write
    /// holds the read side of this lock from its pre-image to its write; a
    /// snapshot takes the write side only to begin and to end.
    capture: RwLock<Option<Mutex<Captured>>>,
}

/// What a running snapshot keeps.
#[derive(Default)]
struct Captured {
    /// Key -> its value when the snapshot began (`None`: it did not exist)
    /// and whether the walk had already handed the key out when it was kept.
    kept: BTreeMap<Vec<u8>, (Option<Vec<u8>>, bool)>,
    /// The last key the walk handed out.
    cursor: Option<Vec<u8>>,
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
                    format::check_and_migrate(&db)?;
                    keep_private(path.as_ref())?;
                    return Ok(Self {
                        db,
                        capture: RwLock::new(None),
                    });
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

    /// Runs `write` under the capture lock, keeping the pre-image of each
    /// of `keys` first if a snapshot is running and the key has none yet.
    fn captured<T>(
        &self,
        keys: &mut dyn Iterator<Item = &[u8]>,
        write: impl FnOnce() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let capture = self.capture.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(map) = capture.as_ref() {
            for key in keys {
                let known = map
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .kept
                    .contains_key(key);
                if !known {
                    // The first write after the snapshot began: no other
                    // write to this key happened since, so this is the value
                    // the key had then. A racing first writer may read the
                    // same value; `or_insert` keeps one.
                    let before = self.get(key)?;
                    let mut captured = map.lock().unwrap_or_else(PoisonError::into_inner);
                    let passed = captured
                        .cursor
                        .as_deref()
                        .is_some_and(|cursor| key <= cursor);
                    captured
                        .kept
                        .entry(key.to_vec())
                        .or_insert((before, passed));
                }
            }
        }
        let out = write();
        drop(capture);
        out
    }

    /// A point-in-time copy of every key and value, handed to `sink` one
    /// pair at a time, while writes go on; returns the number of pairs.
    ///
    /// Consistency: beginning takes the capture lock's write side, so it
    /// waits for the writes in flight and stops new ones for that moment
    /// only; the instant it holds the lock is the snapshot's point in time
    /// T0. From then on every write keeps, before it changes a key, the
    /// key's value at T0 (the first write after T0 to a key reads it; no
    /// write came between). The walk reads each live pair and then looks
    /// for a kept value: a live value written after T0 was written after
    /// its pre-image was kept, so the walk finds the pre-image and hands it
    /// out instead. The walk notes the last key it handed out (the cursor,
    /// under the same mutex as the kept values); a key first written after
    /// the walk passed it was handed out already, with its value at T0 (no
    /// write to it came between). A key kept before the walk reached it and
    /// not met by the walk (removed after T0, perhaps made again after the
    /// walk passed its place) is handed out at the end from its kept value;
    /// keys made after T0 (kept as absent) are skipped. Every key of T0 is
    /// thus handed out once, with its value at T0, and no other key.
    /// The pairs are not in key order.
    pub fn export(&self, sink: &mut crate::storage::ExportSink<'_>) -> Result<u64, StorageError> {
        {
            let mut capture = self.capture.write().unwrap_or_else(PoisonError::into_inner);
            if capture.is_some() {
                return Err(StorageError::Busy(
                    "a snapshot is already running; try again when it has finished".into(),
                ));
            }
            *capture = Some(Mutex::new(Captured::default()));
        }
        let mut met = std::collections::BTreeSet::new();
        let result = self.walk(sink, &mut met);
        let captured = self
            .capture
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut count = result?;
        let captured = captured
            .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
            .unwrap_or_default();
        for (key, (before, passed)) in captured.kept {
            if let Some(value) = before {
                if !passed && !met.contains(&key) {
                    sink(&key, &value)?;
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// The walk of `export`; `met` gets the keys it found a kept value for.
    fn walk(
        &self,
        sink: &mut crate::storage::ExportSink<'_>,
        met: &mut std::collections::BTreeSet<Vec<u8>>,
    ) -> Result<u64, StorageError> {
        let mut count = 0u64;
        for item in self.db.iter() {
            let (key, live) = item.map_err(|e| sled_error("export", e))?;
            let kept = {
                let capture = self.capture.read().unwrap_or_else(PoisonError::into_inner);
                capture.as_ref().and_then(|map| {
                    let mut captured = map.lock().unwrap_or_else(PoisonError::into_inner);
                    captured.cursor = Some(key.to_vec());
                    captured
                        .kept
                        .get(key.as_ref())
                        .map(|(before, _)| before.clone())
                })
            };
            let value = match kept {
                // Changed since T0: its value then, or absent then.
                Some(Some(before)) => {
                    met.insert(key.to_vec());
                    before
                }
                Some(None) => continue,
                None => live.to_vec(),
            };
            sink(&key, &value)?;
            count += 1;
        }
        Ok(count)
    }

    /// Records the format version of restored pairs and migrates them to
    /// this binary's (see `format`).
    pub fn restore_format(&self, version: u32) -> Result<(), StorageError> {
        format::write(&self.db, version)?;
        format::check_and_migrate(&self.db)
    }

    /// Whether the store holds no key at all.
    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }

    /// Removes every key (a forced restore); the format version stays.
    pub fn clear(&self) -> Result<(), StorageError> {
        self.captured(&mut std::iter::empty(), || {
            self.db.clear().map_err(|e| sled_error("clear", e))
        })
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
        self.captured(&mut std::iter::once(key), || {
            self.db
                .insert(key, value)
                .map(|_| ())
                .map_err(|e| sled_error("put", e))
        })
    }

    fn delete(&self, key: &[u8]) -> Result<(), StorageError> {
        self.captured(&mut std::iter::once(key), || {
            self.db
                .remove(key)
                .map(|_| ())
                .map_err(|e| sled_error("delete", e))
        })
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
        let swapped = self.captured(&mut std::iter::once(key), || {
            self.db
                .compare_and_swap(key, expected, new)
                .map_err(|e| sled_error("compare_and_swap", e))
        })?;
        match swapped {
            Ok(()) => Ok(CasOutcome::Swapped),
            Err(conflict) => Ok(CasOutcome::Conflict {
                current: conflict.current.map(|v| v.to_vec()),
            }),
        }
    }

    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let keys: Vec<Vec<u8>> = ops
            .iter()
            .map(|op| match op {
                BatchOp::Put(key, _) | BatchOp::Delete(key) => key.clone(),
            })
            .collect();
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                BatchOp::Put(key, value) => batch.insert(key, value),
                BatchOp::Delete(key) => batch.remove(key),
            }
        }
        self.captured(&mut keys.iter().map(Vec::as_slice), || {
            self.db
                .apply_batch(batch)
                .map_err(|e| sled_error("batch", e))
        })
    }

    fn export(&self, sink: &mut crate::storage::ExportSink<'_>) -> Result<u64, StorageError> {
        SledBackend::export(self, sink)
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

    /// Writes made while the export walks (from its sink, so the order is
    /// fixed) change nothing in what it hands out: every key as it was at
    /// the start, once, and no key made after.
    #[test]
    fn export_is_the_store_at_its_start_whatever_is_written_meanwhile() {
        let (_dir, db) = open();
        for key in ["a", "b", "c", "d", "e", "f", "g"] {
            db.put(key.as_bytes(), format!("{key}0").as_bytes())
                .unwrap();
        }
        let mut out = std::collections::BTreeMap::new();
        let mut writes_done = false;
        let count = db
            .export(&mut |key, value| {
                assert!(
                    out.insert(key.to_vec(), value.to_vec()).is_none(),
                    "a key handed out twice"
                );
                if !writes_done {
                    writes_done = true;
                    // After the walk's first key ("a"):
                    db.put(b"a", b"a1").unwrap(); // already walked
                    db.put(b"c", b"c1").unwrap(); // not walked yet
                    db.delete(b"d").unwrap(); // removed before the walk gets there
                    db.delete(b"e").unwrap(); // removed, then made again
                    db.put(b"e", b"e1").unwrap();
                    db.put(b"bb", b"new").unwrap(); // made after the start
                    db.batch(vec![
                        BatchOp::Put(b"f".to_vec(), b"f1".to_vec()),
                        BatchOp::Delete(b"g".to_vec()),
                    ])
                    .unwrap();
                    assert_eq!(
                        db.compare_and_swap(b"b", Some(b"b0"), Some(b"b1")).unwrap(),
                        CasOutcome::Swapped
                    );
                }
                Ok(())
            })
            .unwrap();
        let expected: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
            ["a", "b", "c", "d", "e", "f", "g"]
                .iter()
                .map(|k| (k.as_bytes().to_vec(), format!("{k}0").into_bytes()))
                .collect();
        assert_eq!(out, expected);
        assert_eq!(count, 7);
        // The writes themselves happened, and a second export sees them.
        assert_eq!(db.get(b"c").unwrap(), Some(b"c1".to_vec()));
        let mut second = 0;
        db.export(&mut |_, _| {
            second += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(second, 6, "a b bb c e f");
        // One snapshot at a time: a second one while one runs is refused.
        db.export(&mut |_, _| {
            let nested = db.export(&mut |_, _| Ok(()));
            assert!(matches!(nested, Err(StorageError::Busy(_))), "{nested:?}");
            Ok(())
        })
        .unwrap();
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
