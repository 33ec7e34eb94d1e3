//! The read cache of secrets on etcd (`storage::read_cache`): two keyward
//! nodes on one real 3-member etcd cluster (`etcd_kit`), in process over
//! TLS. Node 2 reads first, so its cache holds the stored records; then
//! node 1 changes them, and node 2's very next read must show the change:
//!
//! - with node 2's watch running freely;
//! - with its deliveries held back (`Coherence::hold`: a watch that lags, on
//!   demand), where only the request fence stands between the cache and a
//!   stale answer;
//! - across a restart of every etcd member, which breaks the watch: reads
//!   go to etcd until a new watch session has emptied the cache.
//!
//! And the cache keeps to its bounds (entries and bytes).

use keyward::client::{Client, PutOptions};
use keyward::storage::read_cache::ReadCacheFigures;

use crate::etcd_kit::EtcdCluster;
use crate::etcd_nodes::{caught_up, two_nodes};
use crate::harness::{data, eventually, unique, TestServer};

fn figures(server: &TestServer) -> ReadCacheFigures {
    server
        .core
        .barrier
        .read_cache_figures()
        .expect("etcd has a read cache")
}

/// The `password` field of the current version of `path`, read on `client`.
async fn password(client: &Client, path: &str) -> (u64, String) {
    let secret = client.get(path).await.unwrap();
    let value = secret.field_str("password").unwrap().to_owned();
    (secret.version, value)
}

async fn write(client: &Client, path: &str, value: &str) -> u64 {
    client
        .put(path, &data(&[("password", value)]), PutOptions::default())
        .await
        .unwrap()
}

/// Reads `path` on node 2 until the read cache answers it (the cache is
/// warm): a later hit must follow.
async fn warm(two: &TestServer, root2: &Client, path: &str, version: Option<u64>) {
    caught_up(two).await;
    for _ in 0..20 {
        let before = figures(two).hits;
        root2.get_with(path, version, None).await.unwrap();
        if figures(two).hits >= before + 2 {
            return;
        }
    }
    panic!("node 2's read cache never answered a read of {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secret_reads_from_the_cache_follow_changes_made_on_another_node() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kwr"));
    let nodes = two_nodes(&etcd, &prefix, |_| {}).await;
    let (two, root1, root2) = (&nodes.two, &nodes.root1, &nodes.root2);
    let path = format!("{}/db", unique("app"));

    // --- With the watch running freely. -------------------------------
    write(root1, &path, "v1").await;
    warm(two, root2, &path, None).await;
    assert_eq!(password(root2, &path).await, (1, "v1".into()));
    write(root1, &path, "v2").await;
    assert_eq!(password(root2, &path).await, (2, "v2".into()));

    // --- With node 2's deliveries held back. --------------------------
    write(root1, &path, "v3").await;
    warm(two, root2, &path, None).await;
    warm(two, root2, &path, Some(2)).await;
    let other = format!("{}/api", unique("app"));
    let coherence = two
        .core
        .barrier
        .coherence()
        .expect("etcd has a change feed");
    let hold = coherence.hold();

    // A new version on node 1: node 2's next read returns it.
    write(root1, &path, "v4").await;
    assert_eq!(password(root2, &path).await, (4, "v4".into()));
    // A secret written on node 1: read on node 2 at once.
    write(root1, &other, "o1").await;
    assert_eq!(password(root2, &other).await, (1, "o1".into()));
    // The current version deleted on node 1: node 2 refuses it.
    root1.delete(&path, None).await.unwrap();
    root2.get(&path).await.unwrap_err();
    // Version 2 destroyed on node 1: gone on node 2.
    root1.destroy(&path, 2).await.unwrap();
    root2.get_with(&path, Some(2), None).await.unwrap_err();
    // Version 3 is still there.
    let three = root2.get_with(&path, Some(3), None).await.unwrap();
    assert_eq!(three.field_str("password"), Some("v3"));

    // Deliveries resume: node 2 catches up, serves from its cache again,
    // and every answer stays right.
    drop(hold);
    caught_up(two).await;
    let before = figures(two).hits;
    root2.get(&path).await.unwrap_err();
    root2.get_with(&path, Some(2), None).await.unwrap_err();
    for _ in 0..3 {
        let three = root2.get_with(&path, Some(3), None).await.unwrap();
        assert_eq!(three.field_str("password"), Some("v3"));
        assert_eq!(password(root2, &other).await, (1, "o1".into()));
    }
    assert!(
        figures(two).hits > before,
        "the cache answers again once the watch caught up: {:?}",
        figures(two)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_watch_makes_reads_go_to_etcd_until_a_new_one_runs() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kwr"));
    let nodes = two_nodes(&etcd, &prefix, |_| {}).await;
    let (two, root1, root2) = (&nodes.two, &nodes.root1, &nodes.root2);
    let path = format!("{}/db", unique("app"));
    write(root1, &path, "before").await;
    warm(two, root2, &path, None).await;
    let resets = figures(two).resets;

    // Every member restarts: every watch and connection breaks.
    for member in &mut etcd.members {
        member.kill();
    }
    for member in &mut etcd.members {
        member.restart();
    }
    etcd.wait_healthy();

    // A write on node 1 once etcd takes writes again (a unique value, so
    // that a write retried after an unclear failure is still recognised).
    let value = unique("after");
    eventually("node 1 writes after the restart", || {
        let (root1, path, value) = (root1.clone(), path.clone(), value.clone());
        async move {
            root1
                .put(&path, &data(&[("password", &value)]), PutOptions::default())
                .await
                .is_ok()
        }
    })
    .await;
    // Node 2's next answer shows it, whatever its watch is doing now (its
    // etcd client may need a moment to reconnect: errors are retried, but
    // every answer must be the new value).
    let mut answered = false;
    for _ in 0..600 {
        if let Ok(read) = root2.get(&path).await {
            assert_eq!(read.field_str("password"), Some(value.as_str()));
            answered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(answered, "node 2 never answered a read after the restart");

    // A new watch session emptied the cache, then the cache fills again.
    eventually("node 2 runs a new watch session", || {
        let fresh = figures(two).resets > resets;
        async move { fresh }
    })
    .await;
    warm(two, root2, &path, None).await;
    let read = root2.get(&path).await.unwrap();
    assert_eq!(read.field_str("password"), Some(value.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_read_cache_keeps_to_its_bounds() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kwr"));
    const MAX_BYTES: usize = 32 * 1024;
    const MAX_ENTRIES: usize = 24;
    let nodes = two_nodes(&etcd, &prefix, |o| {
        o.read_cache_bytes = MAX_BYTES;
        o.read_cache_entries = MAX_ENTRIES;
    })
    .await;
    let (two, root1, root2) = (&nodes.two, &nodes.root1, &nodes.root2);
    let area = unique("many");
    // 40 secrets of 1,500 bytes: 80 records (metadata and one version
    // each), over both bounds.
    let value = |i: usize| format!("{i:04}{}", "x".repeat(1500));
    for i in 0..40 {
        write(root1, &format!("{area}/s{i}"), &value(i)).await;
    }
    caught_up(two).await;
    // Each secret twice in a row (the second read can hit), three rounds.
    for round in 0..3 {
        for i in 0..80 {
            let (version, read) = password(root2, &format!("{area}/s{}", i / 2)).await;
            assert_eq!((version, read.as_str()), (1, value(i / 2).as_str()));
            let f = figures(two);
            assert!(
                f.entries <= MAX_ENTRIES as u64 && f.bytes <= MAX_BYTES as u64,
                "round {round}, read {i}: over the bounds: {f:?}"
            );
        }
    }
    let f = figures(two);
    assert!(f.evicted > 0, "the bounds pushed entries out: {f:?}");
    assert!(f.hits > 0, "recent entries answered reads: {f:?}");
    assert_eq!(
        (f.max_entries, f.max_bytes),
        (MAX_ENTRIES as u64, MAX_BYTES as u64)
    );
}

/// Writes of one secret on two nodes at once: every write gets its own
/// version and none is lost (each is one etcd transaction that applies
/// only if the metadata it read, from the cache or from etcd, is still the
/// stored one; the node's own lock does not reach the other node).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_of_one_secret_on_two_nodes_at_once_lose_nothing() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kwr"));
    let nodes = two_nodes(&etcd, &prefix, |_| {}).await;
    let path = format!("{}/shared", unique("app"));
    write(&nodes.root1, &path, "first").await;
    caught_up(&nodes.one).await;
    caught_up(&nodes.two).await;
    const WRITERS: usize = 3;
    const WRITES: usize = 10;
    let mut tasks = Vec::new();
    for (n, root) in [&nodes.root1, &nodes.root2].into_iter().enumerate() {
        for w in 0..WRITERS {
            let (root, path) = (root.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let mut versions = Vec::new();
                for i in 0..WRITES {
                    let value = format!("n{n}-w{w}-{i}");
                    loop {
                        // Conflict: others won every try; nothing was written.
                        match root
                            .put(&path, &data(&[("password", &value)]), PutOptions::default())
                            .await
                        {
                            Ok(version) => {
                                versions.push(version);
                                break;
                            }
                            Err(e) if e.code() == Some(tonic::Code::Aborted) => continue,
                            Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => continue,
                            Err(e) => panic!("write failed: {e}"),
                        }
                    }
                }
                versions
            }));
        }
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.extend(t.await.unwrap());
    }
    versions.sort_unstable();
    let total = 2 * WRITERS * WRITES;
    let expected: Vec<u64> = (2..=(total as u64 + 1)).collect();
    assert_eq!(versions, expected, "every write has its own version");
    for root in [&nodes.root1, &nodes.root2] {
        let meta = root.metadata(&path).await.unwrap();
        assert_eq!(meta.newest_version, total as u64 + 1);
    }
}
