//! Attacks on the etcd changes of 0.6.1 (issue 14): nodes racing each
//! other on one real 3-member etcd cluster (`etcd_kit`).
//!
//! A race between two nodes is made without timing: node A's store is the
//! real `EtcdBackend` behind a pass-through (`Interposed`) that, once, runs
//! node B's write just before A's write goes out, that is after A read the
//! records it decided on. Every call still goes to etcd.

use std::sync::{Arc, Mutex};

use keyward::barrier::{Barrier, BarrierOptions};
use keyward::policy::{Authorized, Capability, Policy, PolicySet};
use keyward::secrecy::{SecretBytes, SecretData};
use keyward::secrets::{
    DataLimits, PutRequest, SecretPath, SecretStore, SecretsError, Selector, Stage,
};
use keyward::storage::coherence::Coherence;
use keyward::storage::read_cache::ReadCacheFigures;
use keyward::storage::{
    Backend, BatchOp, CasOutcome, EtcdBackend, EtcdOptions, Expected, ExportSink, KeyValues,
    StorageError,
};

use crate::etcd_kit::EtcdCluster;
use crate::harness::unique;

type Hook = Box<dyn FnOnce() + Send>;

/// The real etcd backend, with a hook run once before the next batch
/// (guarded or not) is sent.
struct Interposed {
    inner: Arc<EtcdBackend>,
    before_write: Mutex<Option<Hook>>,
}

impl Interposed {
    fn run_hook(&self) {
        let hook = self.before_write.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
    }
}

impl Backend for Interposed {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(key)
    }
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.inner.put(key, value)
    }
    fn delete(&self, key: &[u8]) -> Result<(), StorageError> {
        self.inner.delete(key)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StorageError> {
        self.inner.scan_prefix(prefix)
    }
    fn scan_range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<KeyValues, StorageError> {
        self.inner.scan_range(start, end, limit)
    }
    fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, StorageError> {
        self.inner.compare_and_swap(key, expected, new)
    }
    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        self.run_hook();
        self.inner.batch(ops)
    }
    fn apply_in_order(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        self.inner.apply_in_order(ops)
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.inner.flush()
    }
    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StorageError> {
        self.inner.export(sink)
    }
    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
    fn coherence(&self) -> Option<&Coherence> {
        self.inner.coherence()
    }
    fn cache_fence(&self) -> bool {
        self.inner.cache_fence()
    }
    fn get_fenced(&self, key: &[u8], fresh: bool) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get_fenced(key, fresh)
    }
    fn batch_if(&self, expect: Expected, ops: Vec<BatchOp>) -> Result<bool, StorageError> {
        self.run_hook();
        self.inner.batch_if(expect, ops)
    }
    fn cache_reads(&self, prefix: &str) {
        self.inner.cache_reads(prefix)
    }
    fn read_cache_figures(&self) -> Option<ReadCacheFigures> {
        self.inner.read_cache_figures()
    }
    fn requests_sent(&self) -> Option<u64> {
        self.inner.requests_sent()
    }
}

/// Node A (interposed) and node B: a secret store each on one vault under
/// `prefix`, each with its own etcd connection.
struct Race {
    a: SecretStore,
    b: Arc<SecretStore>,
    a_backend: Arc<Interposed>,
}

impl Race {
    fn new(etcd: &EtcdCluster, prefix: &str) -> Self {
        let open = || {
            Arc::new(EtcdBackend::open(&EtcdOptions::plaintext(etcd.endpoints(), prefix)).unwrap())
        };
        let a_backend = Arc::new(Interposed {
            inner: open(),
            before_write: Mutex::new(None),
        });
        let a = Barrier::new(a_backend.clone(), BarrierOptions::default()).unwrap();
        let b = Barrier::new(open(), BarrierOptions::default()).unwrap();
        let shares = a.init(1, 1).unwrap();
        let share: String = (*shares[0].0).clone();
        a.seal();
        a.unseal(&share).unwrap();
        b.unseal(&share).unwrap();
        Race {
            a: SecretStore::new(Arc::new(a), DataLimits::default()),
            b: Arc::new(SecretStore::new(Arc::new(b), DataLimits::default())),
            a_backend,
        }
    }

    /// Runs `write` on node B just before node A's next write is sent.
    fn before_a_writes(&self, write: impl FnOnce(&SecretStore) + Send + 'static) {
        let b = self.b.clone();
        *self.a_backend.before_write.lock().unwrap() = Some(Box::new(move || write(&b)));
    }
}

/// A proof of every secret capability on `secret/**`.
fn proof(path: &SecretPath, capability: Capability) -> Authorized {
    let policy = Policy::parse(
        "attacker",
        "[[rule]]\npath = \"secret/**\"\ncapabilities = [\"read\", \"write\", \"delete\", \
         \"destroy\"]\n",
    )
    .unwrap();
    PolicySet::compile([&policy])
        .unwrap()
        .authorize(&path.resource(), capability)
        .unwrap()
}

fn put(store: &SecretStore, path: &SecretPath, value: &str) -> u64 {
    let mut data = SecretData::new();
    data.insert(
        "password".into(),
        SecretBytes::new(value.as_bytes().to_vec()),
    );
    store
        .put(
            &proof(path, Capability::Write),
            PutRequest {
                path: path.clone(),
                data,
                cas: None,
                max_versions: None,
                owner: None,
                stage: Stage::Current,
            },
            1_000,
        )
        .unwrap()
}

fn password(store: &SecretStore, path: &SecretPath, version: u64) -> Option<String> {
    let found = store.get(path, Selector::Version(version)).ok()?;
    Some(found.data["password"].expose_str().unwrap().to_owned())
}

fn destroyed(store: &SecretStore, path: &SecretPath, version: u64) -> bool {
    let meta = store.metadata(path).unwrap();
    meta.versions
        .iter()
        .find(|v| v.version == version)
        .is_some_and(|v| v.destroyed)
}

/// Issue 14 said delete, undelete and destroy were not guarded: each read
/// the metadata, changed it and wrote it back unconditionally, so a write
/// another node made in between was lost. Here node B writes version 2 (or
/// destroys version 1) after node A read the metadata and before A's write.
/// Both changes must survive.
fn race() -> (EtcdCluster, Race) {
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kwatk"));
    let race = Race::new(&etcd, &prefix);
    (etcd, race)
}

/// Destroy of v1 on A, put of v2 on B in between.
#[test]
fn a_destroy_racing_a_put_on_another_node_loses_no_version() {
    let (_etcd, race) = race();
    let path = SecretPath::parse(&format!("{}/db", unique("app"))).unwrap();
    put(&race.a, &path, "one");
    let target = path.clone();
    race.before_a_writes(move |b| {
        assert_eq!(put(b, &target, "two"), 2);
    });
    race.a
        .destroy(&proof(&path, Capability::Destroy), &path, 1, 2_000)
        .unwrap();
    assert!(destroyed(&race.b, &path, 1), "the destroy was applied");
    let meta = race.b.metadata(&path).unwrap();
    assert_eq!(
        (meta.newest, meta.current),
        (2, 2),
        "version 2, written on node B while node A destroyed version 1, is still there"
    );
    assert_eq!(password(&race.b, &path, 2).as_deref(), Some("two"));
    // And the next write is version 3: version 2's data is not overwritten.
    assert_eq!(put(&race.a, &path, "three"), 3);
    assert_eq!(password(&race.b, &path, 2).as_deref(), Some("two"));
}

/// Soft delete of the current version on A, put on B in between: the new
/// version stays current and readable.
#[test]
fn a_delete_racing_a_put_on_another_node_loses_no_version() {
    let (_etcd, race) = race();
    let path = SecretPath::parse(&format!("{}/db", unique("app"))).unwrap();
    put(&race.a, &path, "one");
    let target = path.clone();
    race.before_a_writes(move |b| {
        assert_eq!(put(b, &target, "two"), 2);
    });
    // The delete names version 1 (the current one A read).
    race.a
        .delete(&proof(&path, Capability::Delete), &path, Some(1), 2_000)
        .unwrap();
    assert_eq!(password(&race.b, &path, 1), None, "version 1 is deleted");
    assert_eq!(password(&race.b, &path, 2).as_deref(), Some("two"));
    assert_eq!(race.b.metadata(&path).unwrap().current, 2);
}

/// Soft delete of v1 on A, destroy of v1 on B in between: the version stays
/// destroyed (its data is gone; the metadata must say so).
#[test]
fn a_delete_racing_a_destroy_on_another_node_keeps_the_destroy() {
    let (_etcd, race) = race();
    let path = SecretPath::parse(&format!("{}/db", unique("app"))).unwrap();
    put(&race.a, &path, "one");
    let target = path.clone();
    race.before_a_writes(move |b| {
        b.destroy(&proof(&target, Capability::Destroy), &target, 1, 1_500)
            .unwrap();
    });
    // Either the delete applied first (and the destroy on top), or it is
    // refused as of a destroyed version; never a destroy undone.
    match race
        .a
        .delete(&proof(&path, Capability::Delete), &path, Some(1), 2_000)
    {
        Ok(_) | Err(SecretsError::Destroyed(1)) => {}
        Err(other) => panic!("delete after a concurrent destroy: {other}"),
    }
    assert!(
        destroyed(&race.b, &path, 1),
        "a destroy made on node B while node A soft-deleted is kept"
    );
}

/// A rotation that did not verify drops `pending` on node A (the broker's
/// `clear_pending`) while node B writes a new current version: B's version
/// stays, and `pending` is dropped.
#[test]
fn a_pending_dropped_racing_a_put_on_another_node_loses_no_version() {
    let (_etcd, race) = race();
    let path = SecretPath::parse(&format!("{}/db", unique("app"))).unwrap();
    put(&race.a, &path, "one");
    let mut data = SecretData::new();
    data.insert("password".into(), SecretBytes::new(b"rotated".to_vec()));
    let pending = race
        .a
        .put(
            &proof(&path, Capability::Write),
            PutRequest {
                path: path.clone(),
                data,
                cas: None,
                max_versions: None,
                owner: None,
                stage: Stage::Pending,
            },
            1_500,
        )
        .unwrap();
    assert_eq!(pending, 2);
    let target = path.clone();
    race.before_a_writes(move |b| {
        assert_eq!(put(b, &target, "three"), 3);
    });
    race.a.clear_pending(&path, 2_000).unwrap();
    let meta = race.b.metadata(&path).unwrap();
    assert_eq!(
        (meta.newest, meta.current, meta.pending),
        (3, 3, 0),
        "version 3, written on node B while node A dropped pending, is current"
    );
    assert_eq!(password(&race.b, &path, 3).as_deref(), Some("three"));
}

/// One vault on etcd: its barrier and a secret store over it.
fn etcd_vault(etcd: &EtcdCluster, prefix: &str) -> (Arc<Barrier>, SecretStore) {
    let backend =
        Arc::new(EtcdBackend::open(&EtcdOptions::plaintext(etcd.endpoints(), prefix)).unwrap());
    let barrier = Arc::new(Barrier::new(backend, BarrierOptions::default()).unwrap());
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(&shares[0].0).unwrap();
    let store = SecretStore::new(barrier.clone(), DataLimits::default());
    (barrier, store)
}

/// On etcd an answered write is already on a quorum, so `durable` runs no
/// group-commit round (none is counted), and a secret write, which hands
/// its worker over on a multi-thread runtime, also works on a
/// current-thread runtime (where `block_in_place` would panic).
#[tokio::test]
async fn on_etcd_durable_runs_no_round_and_a_put_works_on_a_current_thread_runtime() {
    let etcd = EtcdCluster::start(1);
    let (barrier, store) = etcd_vault(&etcd, &format!("{}/", unique("kw-durable")));
    let path = SecretPath::parse("app/db").unwrap();
    let version = put(&store, &path, "first-value");
    store.durable().await.unwrap();
    barrier.durable().await.unwrap();
    assert_eq!(barrier.flush_count(), 0, "a group-commit round ran on etcd");
    assert_eq!(
        password(&store, &path, version).as_deref(),
        Some("first-value")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_puts_from_multi_thread_workers_all_land() {
    let etcd = EtcdCluster::start(1);
    let (barrier, store) = etcd_vault(&etcd, &format!("{}/", unique("kw-workers")));
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // Two tasks a path: writes of one path wait for its lock.
            let path = SecretPath::parse(&format!("app/s{}", t % 4)).unwrap();
            for i in 0..10 {
                put(&store, &path, &format!("v-{t}-{i}"));
                store.durable().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for s in 0..4 {
        let path = SecretPath::parse(&format!("app/s{s}")).unwrap();
        assert_eq!(store.metadata(&path).unwrap().newest, 20);
    }
    assert_eq!(barrier.flush_count(), 0);
}

/// On etcd a version's fingerprints are listed in its metadata only (no
/// `scan/fp/` or `scan/ver/` record is written: a Put's transaction holds
/// the metadata, the data and the pruned version's delete), a value matches
/// exactly the staged versions holding it, and a version losing its stage
/// (a newer Put, a destroy) stops matching at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_fingerprints_are_listed_in_the_metadata_only_and_follow_the_stages() {
    let etcd = EtcdCluster::start(1);
    let (barrier, store) = etcd_vault(&etcd, &format!("{}/", unique("kw-prints")));
    let path = SecretPath::parse("app/fp").unwrap();
    let versions = |value: &str| -> Vec<u64> {
        store
            .match_value(value.as_bytes())
            .unwrap()
            .into_iter()
            .map(|m| m.version)
            .collect()
    };
    for i in 1..=4 {
        assert_eq!(put(&store, &path, &format!("fp-Value-{i:05}")), i);
    }
    // Current (4) and previous (3) hold fingerprints; 1 and 2 do not.
    assert!(versions("fp-Value-00001").is_empty());
    assert!(versions("fp-Value-00002").is_empty());
    assert_eq!(versions("fp-Value-00003"), [3]);
    assert_eq!(versions("fp-Value-00004"), [4]);
    let found = store.match_value(b"fp-Value-00004").unwrap();
    assert_eq!(found[0].fields, ["password"]);
    assert_eq!(found[0].path, "app/fp");
    assert!(barrier.scan_keys("scan/").unwrap().is_empty());
    let meta = store.metadata(&path).unwrap();
    let listed = |v: u64| {
        let record = meta.versions.iter().find(|r| r.version == v).unwrap();
        (
            record.prints_listed,
            record.prints_unrecorded,
            record.prints.len(),
        )
    };
    assert_eq!(listed(4), (true, true, 1));
    assert_eq!(listed(3), (true, true, 1));
    assert_eq!(listed(2), (true, true, 0));
    store
        .destroy(&proof(&path, Capability::Destroy), &path, 3, 2_000)
        .unwrap();
    assert!(versions("fp-Value-00003").is_empty());
    assert_eq!(versions("fp-Value-00004"), [4]);
    assert!(barrier.scan_keys("scan/").unwrap().is_empty());
}

/// Two nodes: node A has built its index with a first Match; node B's
/// writes (a new value, a newer one taking the stage, a delete of the
/// destroy of both staged versions) are matched, or no longer matched, by A's very next
/// Match, with no wait in between: A's fence waits for its watch to
/// deliver B's acknowledged writes, and each delivered change marks the
/// path for A's index.
#[test]
fn a_match_on_one_node_sees_the_writes_another_node_acknowledged() {
    let (_etcd, race) = race();
    let (a, b) = (&race.a, &race.b);
    let path = SecretPath::parse("app/shared").unwrap();
    let other = SecretPath::parse("app/other").unwrap();
    put(b, &other, "other-Value-0001");
    let on_a = |value: &str| -> Vec<(String, u64)> {
        a.match_value(value.as_bytes())
            .unwrap()
            .into_iter()
            .map(|m| (m.path, m.version))
            .collect()
    };
    assert_eq!(on_a("other-Value-0001"), [("app/other".to_owned(), 1)]);
    for round in 1..=5u64 {
        let value = format!("shared-Value-{round:04}");
        assert_eq!(put(b, &path, &value), round);
        assert_eq!(
            on_a(&value),
            [("app/shared".to_owned(), round)],
            "round {round}"
        );
        if round >= 3 {
            // Two versions back: no stage, no match.
            let old = format!("shared-Value-{:04}", round - 2);
            assert!(on_a(&old).is_empty(), "round {round}");
        }
    }
    for version in [5, 4] {
        b.destroy(&proof(&path, Capability::Destroy), &path, version, 3_000)
            .unwrap();
    }
    assert!(on_a("shared-Value-0005").is_empty());
    assert!(on_a("shared-Value-0004").is_empty());
    assert_eq!(on_a("other-Value-0001"), [("app/other".to_owned(), 1)]);
}

/// A node of 0.6.5 or older, during a rolling upgrade, rewrites a secret's
/// metadata without the fields it does not know (its versions'
/// fingerprint lists). The index then finds those versions' fingerprints
/// from their values, and a version that lost its stage is not reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_a_metadata_rewritten_by_an_older_node_is_matched_from_its_values() {
    use prost::Message;
    let etcd = EtcdCluster::start(1);
    let (barrier, store) = etcd_vault(&etcd, &format!("{}/", unique("kw-old")));
    let path = SecretPath::parse("app/old").unwrap();
    put(&store, &path, "old-Value-00001");
    put(&store, &path, "old-Value-00002");
    // What an older node's decoding and encoding does: fields 5 to 7 gone.
    let key = format!("secrets/meta/{path}");
    let raw = barrier.get(&key).unwrap().unwrap();
    let mut meta = keyward::secrets::MetaRecord::decode(raw.as_slice()).unwrap();
    for v in &mut meta.versions {
        v.prints_listed = false;
        v.prints_unrecorded = false;
        v.prints.clear();
    }
    barrier.put(&key, &meta.encode_to_vec()).unwrap();
    let versions = |value: &[u8]| -> Vec<u64> {
        let mut v: Vec<u64> = store
            .match_value(value)
            .unwrap()
            .into_iter()
            .map(|m| m.version)
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(versions(b"old-Value-00001"), [1]);
    assert_eq!(versions(b"old-Value-00002"), [2]);
    // Version 1 loses its stage; 3 is listed by this node.
    put(&store, &path, "old-Value-00003");
    assert!(versions(b"old-Value-00001").is_empty());
    assert_eq!(versions(b"old-Value-00002"), [2]);
    assert_eq!(versions(b"old-Value-00003"), [3]);
    assert!(barrier.scan_keys("scan/").unwrap().is_empty());
}

/// A vault carried over from 0.6.6 to 0.6.9 on etcd: its versions are
/// listed in the metadata *and* have `scan/fp/` records. A version of that
/// form losing its stage loses its records in the same transaction, so the
/// store keeps none it no longer needs; the records themselves are never
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_records_of_an_older_node_go_with_their_stage() {
    use prost::Message;
    let etcd = EtcdCluster::start(1);
    let (barrier, store) = etcd_vault(&etcd, &format!("{}/", unique("kw-rec")));
    let path = SecretPath::parse("app/rec").unwrap();
    put(&store, &path, "rec-Value-00001");
    put(&store, &path, "rec-Value-00002");
    // What 0.6.9 stored: the same lists, not marked, and a record per
    // listed fingerprint (its value: the field names).
    let key = format!("secrets/meta/{path}");
    let raw = barrier.get(&key).unwrap().unwrap();
    let mut meta = keyward::secrets::MetaRecord::decode(raw.as_slice()).unwrap();
    let mut records = Vec::new();
    for v in &mut meta.versions {
        v.prints_unrecorded = false;
        for tag in &v.prints {
            let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
            records.push(format!("scan/fp/{hex}/{path}#{:020}", v.version));
        }
    }
    assert_eq!(records.len(), 2);
    barrier.put(&key, &meta.encode_to_vec()).unwrap();
    for record in &records {
        // prost: field 1, a string "password".
        barrier.put(record, b"\x0a\x08password").unwrap();
    }
    assert_eq!(store.fingerprint_count().unwrap(), 2);
    put(&store, &path, "rec-Value-00003");
    // Version 1's record went with its stage; version 2's stays.
    let left = barrier.scan_keys("scan/fp/").unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with(&format!("#{:020}", 2)), "{left:?}");
    assert!(store.match_value(b"rec-Value-00001").unwrap().is_empty());
    assert_eq!(store.match_value(b"rec-Value-00002").unwrap().len(), 1);
    put(&store, &path, "rec-Value-00004");
    assert!(barrier.scan_keys("scan/fp/").unwrap().is_empty());
}

/// A vault moved from sled (`keyward migrate`) keeps each version's
/// `scan/ver/` list, whose keys carry the fingerprints: the index takes
/// them from there, and from the values when a list does not decode. A
/// secret whose metadata does not decrypt (damaged in etcd) is left out of
/// the index, and every other secret still matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_lists_carried_from_sled_are_read_and_a_damaged_record_stops_only_its_secret() {
    use prost::Message;
    let etcd = EtcdCluster::start(1);
    let prefix = format!("{}/", unique("kw-mig"));
    let (barrier, store) = etcd_vault(&etcd, &prefix);
    let moved = SecretPath::parse("app/moved").unwrap();
    let damaged = SecretPath::parse("app/damaged").unwrap();
    let fine = SecretPath::parse("app/fine").unwrap();
    put(&store, &moved, "moved-Value-0001");
    put(&store, &damaged, "damaged-Value-01");
    put(&store, &fine, "fine-Value-00001");
    // What sled wrote: no list in the metadata, a `scan/ver/` record.
    for (path, list) in [(&moved, None), (&damaged, Some(b"\xff\xff".to_vec()))] {
        let key = format!("secrets/meta/{path}");
        let raw = barrier.get(&key).unwrap().unwrap();
        let mut meta = keyward::secrets::MetaRecord::decode(raw.as_slice()).unwrap();
        let v = &mut meta.versions[0];
        let hex: String = v.prints[0].iter().map(|b| format!("{b:02x}")).collect();
        v.prints_listed = false;
        v.prints_unrecorded = false;
        v.prints.clear();
        barrier.put(&key, &meta.encode_to_vec()).unwrap();
        // prost: field 1, one string (the record key).
        let record = format!("scan/fp/{hex}/{path}#{:020}", 1);
        let mut encoded = vec![0x0a, record.len() as u8];
        encoded.extend_from_slice(record.as_bytes());
        let list = list.unwrap_or(encoded);
        barrier
            .put(&format!("scan/ver/{path}#{:020}", 1), &list)
            .unwrap();
    }
    let versions = |value: &[u8]| -> Vec<(String, u64)> {
        store
            .match_value(value)
            .unwrap()
            .into_iter()
            .map(|m| (m.path, m.version))
            .collect()
    };
    assert_eq!(versions(b"moved-Value-0001"), [("app/moved".to_owned(), 1)]);
    assert_eq!(versions(b"fine-Value-00001"), [("app/fine".to_owned(), 1)]);
    assert_eq!(
        versions(b"damaged-Value-01"),
        [("app/damaged".to_owned(), 1)]
    );
    // A metadata record that does not decrypt: term 1, then bytes that are
    // no sealed value. The next full read (a rebuild, as after a new watch
    // session) leaves that secret out and keeps the others.
    let raw = EtcdBackend::open(&EtcdOptions::plaintext(etcd.endpoints(), &prefix)).unwrap();
    let mut garbage = vec![0, 0, 0, 1];
    garbage.extend_from_slice(&[0x5a; 64]);
    raw.put(b"secrets/meta/app/garbage", &garbage).unwrap();
    assert!(store
        .metadata(&SecretPath::parse("app/garbage").unwrap())
        .is_err());
    // A store of its own: its index is built by a full read.
    let fresh = SecretStore::new(barrier.clone(), DataLimits::default());
    assert_eq!(
        fresh.match_value(b"fine-Value-00001").unwrap().len(),
        1,
        "one damaged record failed the whole Match"
    );
    assert_eq!(fresh.match_value(b"moved-Value-0001").unwrap().len(), 1);
}

/// The API's Put on etcd runs on the blocking pool (`put_async`), one
/// write per lock stripe at a time: concurrent writes of a few paths all
/// land, each path's versions numbered without a gap, and once they are
/// answered no write is left running (`writes_settled`, which shutdown
/// waits on before the audit log's last flush).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_puts_on_the_blocking_pool_all_land_and_settle() {
    let etcd = EtcdCluster::start(1);
    let (_barrier, store) = etcd_vault(&etcd, &format!("{}/", unique("kw-async")));
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for t in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let path = SecretPath::parse(&format!("app/a{}", t % 4)).unwrap();
            let mut data = SecretData::new();
            data.insert(
                "password".into(),
                SecretBytes::from(format!("async-{t:04}")),
            );
            store
                .put_async(
                    proof(&path, Capability::Write),
                    PutRequest {
                        path: path.clone(),
                        data,
                        cas: None,
                        max_versions: Some(20),
                        owner: None,
                        stage: Stage::Current,
                    },
                    1_000,
                    false,
                )
                .await
                .unwrap()
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap());
    }
    for s in 0..4 {
        let path = SecretPath::parse(&format!("app/a{s}")).unwrap();
        let meta = store.metadata(&path).unwrap();
        assert_eq!(meta.newest, 10);
        assert_eq!(meta.versions.len(), 10);
    }
    versions.sort_unstable();
    assert_eq!(versions.iter().filter(|v| **v == 10).count(), 4);
    assert!(
        store
            .writes_settled(std::time::Duration::from_secs(60))
            .await
    );
}
