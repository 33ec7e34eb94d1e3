//! The discovery scan's fingerprint index on a shared store (etcd), held in
//! memory by each node and kept right by the store's change feed
//! (`storage::coherence`), in place of `scan/fp/` records.
//!
//! Why: on etcd every operation of a write's transaction costs about 30 µs
//! of CPU on the members together, and a Put wrote two for the scan alone
//! (the new version's fingerprint record and the delete of the one of the
//! version losing its stage). The metadata record already lists every
//! staged version's fingerprints (`VersionRecord::prints`, since 0.6.6), so
//! since 0.6.10 a version written on etcd has no fingerprint record: its
//! metadata is the only copy, and a Match looks its values up here.
//!
//! **What it holds.** For each secret, the fingerprints of its staged,
//! not destroyed versions, as its metadata lists them (a version whose
//! metadata lists none, written on sled or by a node of 0.6.5 or older,
//! has them from its `scan/ver/` list if there is one, else from its
//! values, when its metadata is read).
//! Nothing else: tags are HMACs under a key only the unsealed keyring
//! gives, the same bytes the store already holds.
//!
//! **Why a Match sees every acknowledged write.** A Match takes the
//! request fence (`Barrier::cache_fence`): once it says yes, the watch has
//! delivered every change to a metadata record acknowledged before the
//! Match began, and each delivered change marked its path *dirty* here. The
//! Match then reads each dirty path's metadata anew (the mark is taken off
//! before the read, so a change delivered during the read marks it again
//! for the next Match) and only then looks its values up. A new watch
//! session (`reset`) may have missed changes, so it marks the whole index
//! unbuilt: the next Match reads every metadata record, after clearing the
//! marks, so a change delivered meanwhile is read again next time. When
//! the fence says no (watch down or behind), the Match reads every
//! metadata record itself and the index stays unbuilt.
//!
//! **Bounds.** Nothing is held until the first Match. Dirty marks are at
//! most [`MIN_DIRTY_LIMIT`] or 1/128 of the indexed paths; past that the
//! index forgets its marks and the next Match rebuilds it (one read of
//! everything costs less than that many single reads). A refresh that
//! fails or panics leaves the index unbuilt. One Match at a time refreshes
//! and reads the index (a lock); the Scan service runs at most a few
//! Matches at once per node, on the blocking pool, never on a runtime
//! worker, and skips one whose client left before it started. Holders are
//! kept per tag and path, so a value that many secrets share costs a change
//! of one of them a map removal. A secret whose metadata does not decrypt
//! or decode is left out (and logged by path), so one damaged record does
//! not stop every Match.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A fingerprint: HMAC-SHA256 of one value.
pub(super) type Tag = [u8; 32];

/// Dirty paths remembered before the index is dropped for a rebuild: this
/// many, or 1/128 of the paths the index holds if that is more. A marked
/// path costs a read of its own (a round trip to etcd), a path in a full
/// read a share of one range read, about a hundred times less: past the
/// limit one read of everything costs less.
pub(super) const MIN_DIRTY_LIMIT: usize = 1024;
/// The share of indexed paths that may be marked (see [`MIN_DIRTY_LIMIT`]).
const DIRTY_SHARE: usize = 128;

/// A secret's staged versions and the fingerprints each holds.
pub(super) type PathPrints = Vec<(u64, Vec<Tag>)>;

#[derive(Default)]
struct Marks {
    /// The entries stand for every metadata change the watch delivered,
    /// except the paths in `dirty` (false: rebuild before use).
    built: bool,
    dirty: HashSet<String>,
    /// Bumped by every reset, so a rebuild that a reset overtook is not
    /// trusted afterwards.
    resets: u64,
    /// Paths the index held after its last refresh (for the dirty limit).
    indexed: usize,
}

/// Each tag's holders: path, then the versions (at most the three staged).
/// Keyed by path, so a value many secrets share (`port=5432`) costs each
/// change of one of them a map removal, not a walk over all of them.
#[derive(Default)]
struct Entries {
    by_tag: HashMap<Tag, HashMap<Arc<str>, Vec<u64>>>,
    by_path: HashMap<Arc<str>, Vec<Tag>>,
}

impl Entries {
    fn remove_path(&mut self, path: &str) {
        let Some((path, tags)) = self.by_path.remove_entry(path) else {
            return;
        };
        for tag in tags {
            if let Some(holders) = self.by_tag.get_mut(&tag) {
                holders.remove(&path);
                if holders.is_empty() {
                    self.by_tag.remove(&tag);
                }
            }
        }
    }

    fn set_path(&mut self, path: &str, prints: PathPrints) {
        self.remove_path(path);
        if prints.iter().all(|(_, tags)| tags.is_empty()) {
            return;
        }
        let path: Arc<str> = Arc::from(path);
        let mut all = Vec::new();
        for (version, tags) in prints {
            for tag in tags {
                let versions = self
                    .by_tag
                    .entry(tag)
                    .or_default()
                    .entry(Arc::clone(&path))
                    .or_default();
                if !versions.contains(&version) {
                    versions.push(version);
                }
                all.push(tag);
            }
        }
        all.sort_unstable();
        all.dedup();
        self.by_path.insert(path, all);
    }

    fn rebuilt(all: Vec<(String, PathPrints)>) -> Self {
        let mut entries = Self::default();
        for (path, prints) in all {
            entries.set_path(&path, prints);
        }
        entries
    }
}

/// How a Match reads the store for the index.
pub(super) trait Source {
    /// Every secret's staged fingerprints.
    fn all(&self) -> Result<Vec<(String, PathPrints)>, super::SecretsError>;
    /// One secret's (empty when it is gone).
    fn one(&self, path: &str) -> Result<PathPrints, super::SecretsError>;
}

/// Marks the index unbuilt when dropped (a refresh that did not finish).
struct Unbuilt<'a>(&'a PrintIndex, bool);

impl Drop for Unbuilt<'_> {
    fn drop(&mut self) {
        if self.1 {
            lock(&self.0.marks).built = false;
        }
    }
}

#[derive(Default)]
pub(super) struct PrintIndex {
    marks: Mutex<Marks>,
    entries: Mutex<Entries>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PrintIndex {
    /// The watch delivered a change of `key` (a barrier key under the
    /// metadata prefix `meta`).
    pub fn changed(&self, meta: &str, key: &str) {
        let Some(path) = key.strip_prefix(meta) else {
            return;
        };
        let mut marks = lock(&self.marks);
        if !marks.built {
            return;
        }
        if marks.dirty.len() >= MIN_DIRTY_LIMIT.max(marks.indexed / DIRTY_SHARE) {
            marks.built = false;
            marks.dirty = HashSet::new();
            return;
        }
        marks.dirty.insert(path.to_owned());
    }

    /// A new watch session: changes may have been missed.
    pub fn reset(&self) {
        let mut marks = lock(&self.marks);
        marks.built = false;
        marks.dirty = HashSet::new();
        marks.resets += 1;
    }

    /// The vault was sealed: drops every tag and path held, after any Match
    /// reading the index now, and reads everything at the next Match (an
    /// unsealed one: a sealed store reads nothing).
    pub fn forget(&self) {
        self.reset();
        *lock(&self.entries) = Entries::default();
    }

    /// The (path, version) pairs holding each of `tags`, for a request
    /// whose fence said `fresh`, after bringing the index up to date.
    pub fn lookup(
        &self,
        tags: &[Tag],
        fresh: bool,
        source: &dyn Source,
    ) -> Result<Vec<Vec<(String, u64)>>, super::SecretsError> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let mut entries = lock(&self.entries);
        // Marks taken by a refresh that fails or panics are gone: the index
        // is then unbuilt, so the next lookup reads everything.
        let mut unbuilt = Unbuilt(self, true);
        self.refresh(&mut entries, fresh, source)?;
        unbuilt.1 = false;
        lock(&self.marks).indexed = entries.by_path.len();
        Ok(tags
            .iter()
            .map(|tag| {
                let mut hits: Vec<(String, u64)> = entries
                    .by_tag
                    .get(tag)
                    .into_iter()
                    .flatten()
                    .flat_map(|(p, versions)| versions.iter().map(|v| (p.to_string(), *v)))
                    .collect();
                hits.sort_unstable();
                hits
            })
            .collect())
    }

    fn refresh(
        &self,
        entries: &mut Entries,
        fresh: bool,
        source: &dyn Source,
    ) -> Result<(), super::SecretsError> {
        if !fresh {
            // The feed cannot be trusted now: read everything, and leave
            // the index unbuilt for the next Match.
            lock(&self.marks).built = false;
            *entries = Entries::rebuilt(source.all()?);
            return Ok(());
        }
        let (dirty, resets) = {
            let mut marks = lock(&self.marks);
            if marks.built {
                (Some(std::mem::take(&mut marks.dirty)), marks.resets)
            } else {
                marks.built = true;
                marks.dirty = HashSet::new();
                (None, marks.resets)
            }
        };
        match dirty {
            Some(paths) => {
                for path in paths {
                    let prints = source.one(&path)?;
                    entries.set_path(&path, prints);
                }
            }
            None => {
                *entries = Entries::rebuilt(source.all()?);
                if lock(&self.marks).resets != resets {
                    lock(&self.marks).built = false;
                }
            }
        }
        Ok(())
    }

    /// Paths with fingerprints in the index (tests).
    #[cfg(test)]
    pub fn paths(&self) -> usize {
        lock(&self.entries).by_path.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A store of metadata as the index reads it, counting the reads.
    #[derive(Default)]
    struct Fake {
        secrets: RefCell<HashMap<String, PathPrints>>,
        all_reads: RefCell<usize>,
        one_reads: RefCell<Vec<String>>,
        fail: RefCell<bool>,
    }

    impl Source for Fake {
        fn all(&self) -> Result<Vec<(String, PathPrints)>, super::super::SecretsError> {
            if *self.fail.borrow() {
                return Err(super::super::SecretsError::Corrupt);
            }
            *self.all_reads.borrow_mut() += 1;
            Ok(self
                .secrets
                .borrow()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        fn one(&self, path: &str) -> Result<PathPrints, super::super::SecretsError> {
            if *self.fail.borrow() {
                return Err(super::super::SecretsError::Corrupt);
            }
            self.one_reads.borrow_mut().push(path.to_owned());
            Ok(self.secrets.borrow().get(path).cloned().unwrap_or_default())
        }
    }

    fn tag(n: u8) -> Tag {
        [n; 32]
    }

    const META: &str = "secrets/meta/";

    fn hits(index: &PrintIndex, fake: &Fake, t: u8, fresh: bool) -> Vec<(String, u64)> {
        let mut out = index.lookup(&[tag(t)], fresh, fake).unwrap().remove(0);
        out.sort();
        out
    }

    #[test]
    fn a_delivered_change_is_read_again_before_the_next_lookup_and_nothing_else_is() {
        let index = PrintIndex::default();
        let fake = Fake::default();
        fake.secrets
            .borrow_mut()
            .insert("a".into(), vec![(2, vec![tag(1)]), (1, vec![tag(9)])]);
        fake.secrets
            .borrow_mut()
            .insert("b".into(), vec![(5, vec![tag(1)])]);
        assert_eq!(
            hits(&index, &fake, 1, true),
            [("a".to_owned(), 2), ("b".to_owned(), 5)]
        );
        assert_eq!(*fake.all_reads.borrow(), 1);
        // A new version of `a` (tag 2) takes the stages: tag 1 is gone from
        // it. Not yet delivered: the index still answers from what it read.
        fake.secrets
            .borrow_mut()
            .insert("a".into(), vec![(3, vec![tag(2)])]);
        assert_eq!(hits(&index, &fake, 2, true), []);
        index.changed(META, "secrets/meta/a");
        assert_eq!(hits(&index, &fake, 2, true), [("a".to_owned(), 3)]);
        assert_eq!(hits(&index, &fake, 1, true), [("b".to_owned(), 5)]);
        assert_eq!(hits(&index, &fake, 9, true), []);
        assert_eq!(*fake.one_reads.borrow(), ["a"]);
        assert_eq!(*fake.all_reads.borrow(), 1);
        // A deleted secret leaves nothing behind.
        fake.secrets.borrow_mut().remove("b");
        index.changed(META, "secrets/meta/b");
        assert_eq!(hits(&index, &fake, 1, true), []);
        assert_eq!(index.paths(), 1);
    }

    /// A seal drops every tag and path; a Match while sealed (its reads
    /// fail) leaves the index empty; the first after the unseal reads all.
    #[test]
    fn a_seal_forgets_everything_held() {
        let index = PrintIndex::default();
        let fake = Fake::default();
        fake.secrets
            .borrow_mut()
            .insert("a".into(), vec![(1, vec![tag(1)])]);
        assert_eq!(hits(&index, &fake, 1, true), [("a".to_owned(), 1)]);
        assert_eq!(index.paths(), 1);
        index.forget();
        assert_eq!(index.paths(), 0);
        assert!(lock(&index.entries).by_tag.is_empty());
        *fake.fail.borrow_mut() = true;
        assert!(index.lookup(&[tag(1)], true, &fake).is_err());
        assert_eq!(index.paths(), 0);
        *fake.fail.borrow_mut() = false;
        assert_eq!(hits(&index, &fake, 1, true), [("a".to_owned(), 1)]);
        assert_eq!(
            *fake.all_reads.borrow(),
            2,
            "read whole again after the seal"
        );
    }

    #[test]
    fn a_reset_a_stale_fence_and_a_failed_read_each_mean_a_full_read() {
        let index = PrintIndex::default();
        let fake = Fake::default();
        fake.secrets
            .borrow_mut()
            .insert("a".into(), vec![(1, vec![tag(1)])]);
        assert_eq!(hits(&index, &fake, 1, true), [("a".to_owned(), 1)]);
        // A change the feed never delivered (a new watch session instead).
        fake.secrets
            .borrow_mut()
            .insert("a".into(), vec![(2, vec![tag(2)])]);
        index.reset();
        assert_eq!(hits(&index, &fake, 2, true), [("a".to_owned(), 2)]);
        assert_eq!(*fake.all_reads.borrow(), 2);
        // A fence that said no reads everything, and the next fresh
        // lookup reads everything again (marks taken meanwhile are not
        // trusted).
        fake.secrets
            .borrow_mut()
            .insert("c".into(), vec![(1, vec![tag(3)])]);
        assert_eq!(hits(&index, &fake, 3, false), [("c".to_owned(), 1)]);
        assert_eq!(*fake.all_reads.borrow(), 3);
        assert_eq!(hits(&index, &fake, 3, true), [("c".to_owned(), 1)]);
        assert_eq!(*fake.all_reads.borrow(), 4);
        // A read that fails drops the marks it took: the next lookup reads
        // everything rather than missing the paths they named.
        index.changed(META, "secrets/meta/c");
        fake.secrets.borrow_mut().insert("c".into(), vec![]);
        *fake.fail.borrow_mut() = true;
        assert!(index.lookup(&[tag(3)], true, &fake).is_err());
        *fake.fail.borrow_mut() = false;
        assert_eq!(hits(&index, &fake, 3, true), []);
        assert_eq!(*fake.all_reads.borrow(), 5);
    }

    /// A value held by many secrets: each keeps its own entry, and a
    /// change of one leaves the others' as they were.
    #[test]
    fn a_value_many_secrets_share_is_kept_per_secret() {
        let index = PrintIndex::default();
        let fake = Fake::default();
        for i in 0..500u64 {
            fake.secrets
                .borrow_mut()
                .insert(format!("p{i:03}"), vec![(i + 1, vec![tag(7)])]);
        }
        assert_eq!(hits(&index, &fake, 7, true).len(), 500);
        fake.secrets.borrow_mut().remove("p123");
        fake.secrets.borrow_mut().insert(
            "p124".into(),
            vec![(200, vec![tag(7)]), (125, vec![tag(7)])],
        );
        index.changed(META, "secrets/meta/p123");
        index.changed(META, "secrets/meta/p124");
        let after = hits(&index, &fake, 7, true);
        assert_eq!(after.len(), 500);
        assert!(!after.iter().any(|(p, _)| p == "p123"));
        assert!(after.contains(&("p124".to_owned(), 200)));
        assert!(after.contains(&("p124".to_owned(), 125)));
        assert!(after.contains(&("p125".to_owned(), 126)));
        assert_eq!(*fake.all_reads.borrow(), 1);
    }

    /// A refresh that panics (a bug in a read) drops the marks it took:
    /// the index is left unbuilt, so the next lookup reads everything.
    #[test]
    fn a_refresh_that_panics_leaves_the_index_unbuilt() {
        struct Panics;
        impl Source for Panics {
            fn all(&self) -> Result<Vec<(String, PathPrints)>, super::super::SecretsError> {
                Ok(Vec::new())
            }
            fn one(&self, _: &str) -> Result<PathPrints, super::super::SecretsError> {
                panic!("a read that panics");
            }
        }
        let index = PrintIndex::default();
        index.lookup(&[tag(1)], true, &Panics).unwrap();
        index.changed(META, "secrets/meta/a");
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            index.lookup(&[tag(1)], true, &Panics)
        }));
        assert!(caught.is_err());
        assert!(!lock(&index.marks).built);
        let fake = Fake::default();
        fake.secrets
            .borrow_mut()
            .insert("a".into(), vec![(1, vec![tag(1)])]);
        assert_eq!(hits(&index, &fake, 1, true), [("a".to_owned(), 1)]);
        assert_eq!(*fake.all_reads.borrow(), 1);
    }

    #[test]
    fn too_many_marks_drop_the_index_for_a_rebuild() {
        let index = PrintIndex::default();
        let fake = Fake::default();
        fake.secrets
            .borrow_mut()
            .insert("a".into(), vec![(1, vec![tag(1)])]);
        hits(&index, &fake, 1, true);
        for i in 0..=MIN_DIRTY_LIMIT {
            index.changed(META, &format!("secrets/meta/p{i}"));
        }
        assert!(lock(&index.marks).dirty.is_empty());
        assert_eq!(hits(&index, &fake, 1, true), [("a".to_owned(), 1)]);
        assert_eq!(*fake.all_reads.borrow(), 2);
        assert!(fake.one_reads.borrow().is_empty());
        // A key outside the metadata prefix marks nothing.
        index.changed(META, "secrets/data/a#00000000000000000001");
        assert!(lock(&index.marks).dirty.is_empty());
    }
}
