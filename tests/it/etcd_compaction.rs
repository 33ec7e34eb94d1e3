//! Compaction of etcd's history by the elected keyward leader
//! (`storage::etcd_compact`), on a real 3-member etcd cluster (`etcd_kit`).
//!
//! - Two `keyward server` child processes (`ha_kit`) set to compact every
//!   second keeping no history: etcd's compacted revision moves past the
//!   revisions the test reads; only the leader compacts (its
//!   `keyward_etcd_request_duration_seconds{op="compact"}` series; the
//!   follower has none); the caches stay right across compactions (a token
//!   revoked and a policy narrowed on one node are refused by the other on
//!   its next call); after the leader is killed the new leader compacts.
//! - A watch overtaken by a compaction (a lagging reader, made by holding
//!   the backend's watch in a cache callback while many revisions are
//!   written, then compacting) is cancelled by etcd; the backend starts a
//!   new watch from a fresh revision, empties the caches, and delivers
//!   changes again.
//!
//! Every wait is for an event, with a generous bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{GetOptions, TxnOp};
use tonic::Code;

use crate::etcd_kit::EtcdCluster;
use crate::ha_kit::{cluster, init_and_unseal, leads, wait_for, wait_until_leads, Node};
use crate::harness::{data, unique};
use keyward::client::{ClientError, IssueOptions, PutOptions};
use keyward::storage::{Backend, EtcdBackend, EtcdOptions};

/// Compaction every second, keeping no history (so a test sees it soon).
const EAGER: &str = "compact_every = \"1s\"\ncompact_retain = \"0\"";
/// The series a node has once it has compacted.
const COMPACT_SERIES: &str = "keyward_etcd_request_duration_seconds_count{op=\"compact\"}";

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.unwrap_err().code().unwrap_or(Code::Unknown)
}

async fn raw_client(etcd: &EtcdCluster) -> etcd_client::Client {
    etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap()
}

/// The cluster's current revision.
async fn revision(client: &mut etcd_client::Client) -> i64 {
    let answer = client
        .get("kw-test-probe", Some(GetOptions::new().with_keys_only()))
        .await
        .unwrap();
    answer.header().unwrap().revision()
}

/// Whether etcd has compacted past `revision` (a read at it is refused:
/// the compacted revision is newer).
async fn compacted_past(client: &mut etcd_client::Client, revision: i64) -> bool {
    let options = GetOptions::new().with_keys_only().with_revision(revision);
    match client.get("kw-test-probe", Some(options)).await {
        Ok(_) => false,
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("compacted"), "unexpected etcd error: {text}");
            true
        }
    }
}

/// Waits until etcd has compacted at the revision current now (or later):
/// every older revision is gone. Returns that revision.
async fn wait_compaction_past_now(client: &etcd_client::Client, what: &str) -> i64 {
    let mut client = client.clone();
    let now = revision(&mut client).await;
    wait_for(what, || {
        let mut client = client.clone();
        async move { compacted_past(&mut client, now - 1).await.then_some(()) }
    })
    .await;
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_compacts_etcd_and_the_caches_stay_right() {
    let (etcd, _certs_dir, certs, prefix) = cluster();
    let mut kw1 = Node::start_with(&etcd, &prefix, &certs, "kw1", &[], EAGER);
    wait_until_leads(&kw1).await;
    let kw2 = Node::start_with(&etcd, &prefix, &certs, "kw2", &[], EAGER);
    let root_token = init_and_unseal(&[&kw1, &kw2]).await;
    let root1 = kw1.client(Some(&root_token)).await;
    let root2 = kw2.client(Some(&root_token)).await;
    let raw = raw_client(&etcd).await;

    // Writes go on; the compacted revision moves past them, twice.
    let path = format!("{}/db", unique("cmp"));
    root2
        .put(&path, &data(&[("v", "1")]), PutOptions::default())
        .await
        .unwrap();
    let first = wait_compaction_past_now(&raw, "a compaction past the first write").await;
    root1
        .put(&path, &data(&[("v", "2")]), PutOptions::default())
        .await
        .unwrap();
    let second = wait_compaction_past_now(&raw, "a compaction past the second write").await;
    assert!(second > first);
    println!("etcd compacted past revision {first}, then past {second}");

    // Only the leader compacts.
    assert!(leads(&kw1).await && !leads(&kw2).await);
    let leader_metrics = kw1.scrape().await;
    let follower_metrics = kw2.scrape().await;
    assert!(leader_metrics.contains(COMPACT_SERIES), "{leader_metrics}");
    assert!(
        !follower_metrics.contains(COMPACT_SERIES),
        "the follower compacted: {follower_metrics}"
    );

    // The caches stay right across compactions: kw2 uses a token (its
    // caches hold it and its policy), compactions pass, kw1 narrows the
    // policy and then revokes the token: kw2 refuses at once each time.
    let policy = unique("p");
    let folder = path.split('/').next().unwrap().to_owned();
    let rule =
        |caps: &str| format!("[[rule]]\npath = \"secret/{folder}/**\"\ncapabilities = [{caps}]\n");
    root1
        .policy_put(&policy, &rule("\"read\", \"write\""))
        .await
        .unwrap();
    let issued = root1
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let user2 = kw2.client(Some(&issued.token)).await;
    for _ in 0..3 {
        assert_eq!(user2.get(&path).await.unwrap().field_str("v"), Some("2"));
    }
    user2
        .put(&path, &data(&[("v", "3")]), PutOptions::default())
        .await
        .unwrap();
    wait_compaction_past_now(&raw, "a compaction past the token's uses").await;
    root1.policy_put(&policy, &rule("\"read\"")).await.unwrap();
    assert_eq!(
        code(
            user2
                .put(&path, &data(&[("v", "4")]), PutOptions::default())
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(user2.get(&path).await.unwrap().field_str("v"), Some("3"));
    wait_compaction_past_now(&raw, "a compaction past the narrowed policy").await;
    root1.revoke_token(&issued.token).await.unwrap();
    assert_eq!(code(user2.get(&path).await), Code::Unauthenticated);

    // The leader killed: kw2 leads and compacts from then on.
    kw1.signal("KILL");
    wait_for("kw1 is dead", || {
        let dead = kw1.has_exited();
        async move { dead.then_some(()) }
    })
    .await;
    wait_until_leads(&kw2).await;
    root2
        .put(&path, &data(&[("v", "5")]), PutOptions::default())
        .await
        .unwrap();
    let third = wait_compaction_past_now(&raw, "a compaction by the new leader").await;
    assert!(third > second);
    let metrics = kw2.scrape().await;
    assert!(metrics.contains(COMPACT_SERIES), "{metrics}");
    assert_eq!(root2.get(&path).await.unwrap().field_str("v"), Some("5"));
}

/// A cache fed from `under`, counting resets and changes; its first change
/// blocks the watch (and the backend's runtime with it) until `gate` says
/// go, so that the watch falls behind etcd.
struct Lagging {
    resets: Arc<AtomicUsize>,
    changes: Arc<Mutex<Vec<String>>>,
    gate: std::sync::mpsc::SyncSender<()>,
}

fn lagging_cache(backend: &EtcdBackend, under: &str) -> Lagging {
    let (gate, opened) = std::sync::mpsc::sync_channel::<()>(1);
    let opened = Mutex::new(Some(opened));
    let resets = Arc::new(AtomicUsize::new(0));
    let changes = Arc::new(Mutex::new(Vec::new()));
    let (r, c) = (resets.clone(), changes.clone());
    backend.coherence().unwrap().track(
        under,
        Arc::new(move |key| {
            if let Some(opened) = opened.lock().unwrap().take() {
                // Bounded: a failing test must not hang here.
                let _ = opened.recv_timeout(Duration::from_secs(120));
            }
            c.lock().unwrap().push(key.to_owned());
        }),
        Arc::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }),
    );
    Lagging {
        resets,
        changes,
        gate,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_overtaken_by_a_compaction_starts_again_and_empties_the_caches() {
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kwc"));
    let backend = tokio::task::block_in_place(|| {
        EtcdBackend::open(&EtcdOptions::plaintext(etcd.endpoints(), prefix.clone())).unwrap()
    });
    let under = "lag/";
    let cache = lagging_cache(&backend, under);
    let coherence = backend.coherence().unwrap();
    wait_for("the watch runs", || {
        let live = coherence.is_live();
        async move { live.then_some(()) }
    })
    .await;
    let resets_before = cache.resets.load(Ordering::SeqCst);

    // Many large revisions while the watch is held: more than etcd buffers
    // for a watch and the connection's windows hold, so etcd stops sending
    // to it and it falls behind.
    let mut raw = raw_client(&etcd).await;
    let data_key = |i: usize, j: usize| format!("{prefix}d/{under}k{i}-{j}");
    let value = vec![b'x'; 2048];
    for i in 0..400 {
        let ops: Vec<TxnOp> = (0..64)
            .map(|j| TxnOp::put(data_key(i, j), value.clone(), None))
            .collect();
        raw.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    let now = revision(&mut raw).await;
    raw.compact(now, None).await.unwrap();
    // The watch goes on: it reads what was buffered, is cancelled at the
    // compacted revision, and a new watch empties the cache again.
    cache.gate.send(()).unwrap();
    wait_for("a new watch after the compaction emptied the cache", || {
        let resets = cache.resets.load(Ordering::SeqCst);
        async move { (resets > resets_before).then_some(()) }
    })
    .await;
    wait_for("the new watch runs", || {
        let live = coherence.is_live();
        async move { live.then_some(()) }
    })
    .await;
    println!(
        "resets: {resets_before} before, {} after; {} changes delivered before the cancel",
        cache.resets.load(Ordering::SeqCst),
        cache.changes.lock().unwrap().len()
    );
    // A change made now reaches the cache through the new watch.
    let fresh = format!("{prefix}d/{under}after-compaction");
    raw.put(fresh, "y", None).await.unwrap();
    wait_for("the change after the compaction is delivered", || {
        let seen = cache
            .changes
            .lock()
            .unwrap()
            .iter()
            .any(|k| k == &format!("{under}after-compaction"));
        async move { seen.then_some(()) }
    })
    .await;
    drop(backend);
}

/// Compaction every second, keeping 20 s of history.
const KEEP_20S: &str = "compact_every = \"1s\"\ncompact_retain = \"20s\"";

/// The wall clock in ms (the samples' clock).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The `(ms, revision)` samples stored under `PREFIX m/compaction`.
async fn stored_samples(client: &etcd_client::Client, prefix: &str) -> Vec<(u64, i64)> {
    let mut client = client.clone();
    let answer = client
        .get(format!("{prefix}m/compaction"), None)
        .await
        .unwrap();
    let Some(kv) = answer.kvs().first() else {
        return Vec::new();
    };
    let text = std::str::from_utf8(kv.value()).unwrap().to_owned();
    let mut lines = text.split('\n');
    assert_eq!(lines.next(), Some("KWC1"), "{text}");
    lines
        .map(|line| {
            let (at, revision) = line.split_once(' ').unwrap();
            (at.parse().unwrap(), revision.parse().unwrap())
        })
        .collect()
}

/// The revision of the first "compacted etcd history" line of `log`.
fn first_compaction(log: &str) -> Option<i64> {
    let line = log.lines().find(|l| l.contains("compacted etcd history"))?;
    let digits: String = line
        .split("revision=")
        .nth(1)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The leader keeps its `(time, revision)` samples in etcd, so a leader
/// that starts after every node went down compacts at once at a stored
/// revision old enough, instead of waiting `compact_retain` for samples of
/// its own (which are all newer than its start).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_leader_compacts_at_the_stored_revision_at_once() {
    let (etcd, _certs_dir, certs, prefix) = cluster();
    let raw = raw_client(&etcd).await;
    let mut kw1 = Node::start_with(&etcd, &prefix, &certs, "kw1", &[], KEEP_20S);
    wait_until_leads(&kw1).await;
    wait_for("kw1 stores a compaction sample", || {
        let (raw, prefix) = (raw.clone(), prefix.clone());
        async move { (!stored_samples(&raw, &prefix).await.is_empty()).then_some(()) }
    })
    .await;
    kw1.signal("KILL");
    wait_for("kw1 is dead", || {
        let dead = kw1.has_exited();
        async move { dead.then_some(()) }
    })
    .await;
    assert_eq!(
        first_compaction(&kw1.log_text()),
        None,
        "kw1 compacted before it was killed; the test needs a longer compact_retain"
    );
    let stored = stored_samples(&raw, &prefix).await;
    println!("stored samples before the restart: {stored:?}");
    // At most one sample per compact_every (9/10 of it apart).
    assert!(
        stored.windows(2).all(|w| w[1].0 - w[0].0 >= 900),
        "{stored:?}"
    );

    // Writes after the samples: every revision a node samples after its
    // restart is past every stored one.
    let mut writer = raw.clone();
    for i in 0..5 {
        writer
            .put("kw-test-probe", format!("{i}"), None)
            .await
            .unwrap();
    }
    let before_restart = revision(&mut writer).await;
    assert!(stored.iter().all(|(_, r)| *r < before_restart));
    // Until the first stored sample is compact_retain old (its own clock is
    // the wall clock): the restarted node may then compact at it at once.
    let due = stored[0].0 + 20_000 + 1_000;
    while wall_ms() < due {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!compacted_past(&mut writer, stored[0].1 - 1).await);

    let kw1 = Node::start_with(&etcd, &prefix, &certs, "kw1", &[], KEEP_20S);
    let compacted_at = wait_for("the restarted kw1 compacts", || {
        let log = kw1.log_text();
        async move { first_compaction(&log) }
    })
    .await;
    println!(
        "restarted kw1 compacted first at revision {compacted_at}; the revision at its \
         restart was {before_restart}"
    );
    assert!(
        stored.iter().any(|(_, r)| *r == compacted_at),
        "compacted at {compacted_at}, not at a stored sample {stored:?}"
    );
    assert!(compacted_at < before_restart);
    assert!(compacted_past(&mut writer, compacted_at - 1).await);
}
