//! The `Backend` contract, one suite run against every backend: sled in a
//! temporary folder and etcd on a real 3-member loopback cluster
//! (`etcd_kit`). Each backend must give the same answers.

use keyward::storage::{Backend, BatchOp, CasOutcome, EtcdBackend, EtcdOptions, SledBackend};

use crate::etcd_kit::EtcdCluster;

fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
    (k.as_bytes().to_vec(), v.as_bytes().to_vec())
}

/// What every backend promises (see `storage::Backend`).
pub fn contract(b: &dyn Backend) {
    // get / put / delete
    assert_eq!(b.get(b"a/1").unwrap(), None);
    b.put(b"a/1", b"one").unwrap();
    assert_eq!(b.get(b"a/1").unwrap().as_deref(), Some(&b"one"[..]));
    b.put(b"a/1", b"uno").unwrap();
    assert_eq!(b.get(b"a/1").unwrap().as_deref(), Some(&b"uno"[..]));
    b.delete(b"a/1").unwrap();
    assert_eq!(b.get(b"a/1").unwrap(), None);
    b.delete(b"a/never").unwrap();

    // binary keys and values, empty value
    b.put(b"bin/\x00\xff", b"").unwrap();
    assert_eq!(b.get(b"bin/\x00\xff").unwrap().as_deref(), Some(&b""[..]));

    // scan_prefix in key order, only the prefix
    for k in ["p/b", "p/a", "p/c", "pa", "q/a"] {
        b.put(k.as_bytes(), k.as_bytes()).unwrap();
    }
    assert_eq!(
        b.scan_prefix(b"p/").unwrap(),
        vec![kv("p/a", "p/a"), kv("p/b", "p/b"), kv("p/c", "p/c")]
    );
    assert_eq!(b.scan_prefix(b"none/").unwrap(), vec![]);

    // scan_range: [start, end), limit, empty and inverted ranges
    assert_eq!(
        b.scan_range(b"p/a", b"p/c", 10).unwrap(),
        vec![kv("p/a", "p/a"), kv("p/b", "p/b")]
    );
    assert_eq!(b.scan_range(b"p/", b"p0", 2).unwrap().len(), 2);
    assert_eq!(b.scan_range(b"p/c", b"p/a", 10).unwrap(), vec![]);
    assert_eq!(b.scan_range(b"p/a", b"p/a", 10).unwrap(), vec![]);
    assert_eq!(b.scan_range(b"p/a", b"p/z", 0).unwrap(), vec![]);

    // compare_and_swap: absent -> value, value -> value, value -> absent
    assert_eq!(
        b.compare_and_swap(b"c/1", None, Some(b"v1")).unwrap(),
        CasOutcome::Swapped
    );
    assert_eq!(
        b.compare_and_swap(b"c/1", None, Some(b"v2")).unwrap(),
        CasOutcome::Conflict {
            current: Some(b"v1".to_vec())
        }
    );
    assert_eq!(
        b.compare_and_swap(b"c/1", Some(b"wrong"), Some(b"v2"))
            .unwrap(),
        CasOutcome::Conflict {
            current: Some(b"v1".to_vec())
        }
    );
    assert_eq!(
        b.compare_and_swap(b"c/1", Some(b"v1"), Some(b"v2"))
            .unwrap(),
        CasOutcome::Swapped
    );
    assert_eq!(
        b.compare_and_swap(b"c/1", Some(b"v2"), None).unwrap(),
        CasOutcome::Swapped
    );
    assert_eq!(b.get(b"c/1").unwrap(), None);
    assert_eq!(
        b.compare_and_swap(b"c/1", Some(b"v2"), None).unwrap(),
        CasOutcome::Conflict { current: None }
    );

    // batch: all of it, including two operations on one key (the last wins)
    b.batch(vec![
        BatchOp::Put(b"b/1".to_vec(), b"x".to_vec()),
        BatchOp::Put(b"b/2".to_vec(), b"y".to_vec()),
        BatchOp::Put(b"b/1".to_vec(), b"x2".to_vec()),
        BatchOp::Delete(b"p/a".to_vec()),
    ])
    .unwrap();
    assert_eq!(b.get(b"b/1").unwrap().as_deref(), Some(&b"x2"[..]));
    assert_eq!(b.get(b"b/2").unwrap().as_deref(), Some(&b"y"[..]));
    assert_eq!(b.get(b"p/a").unwrap(), None);
    b.batch(vec![]).unwrap();

    // apply_in_order: in order; over several etcd transactions (300 ops)
    let ops: Vec<BatchOp> = (0..300)
        .map(|i| BatchOp::Put(format!("o/{i:04}").into_bytes(), vec![b'v'; 10]))
        .chain([BatchOp::Delete(b"o/0000".to_vec())])
        .collect();
    b.apply_in_order(ops).unwrap();
    let listed = b.scan_prefix(b"o/").unwrap();
    assert_eq!(listed.len(), 299);
    assert_eq!(listed[0].0, b"o/0001".to_vec());

    // scans past one etcd page (512 keys): 1100 keys, in order
    let many: Vec<BatchOp> = (0..1100)
        .map(|i| BatchOp::Put(format!("m/{i:05}").into_bytes(), i.to_string().into_bytes()))
        .collect();
    b.apply_in_order(many).unwrap();
    let all = b.scan_prefix(b"m/").unwrap();
    assert_eq!(all.len(), 1100);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(b.scan_range(b"m/", b"m0", 700).unwrap().len(), 700);

    b.flush().unwrap();

    // export: every pair once
    let mut exported = Vec::new();
    let count = b
        .export(&mut |k, v| {
            exported.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
    assert_eq!(count as usize, exported.len());
    assert!(exported.contains(&kv("b/1", "x2")));
    assert!(exported.contains(&kv("m/01099", "1099")));
    assert_eq!(
        exported
            .iter()
            .filter(|(k, _)| k.starts_with(b"m/"))
            .count(),
        1100
    );
}

#[test]
fn sled_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path()).unwrap();
    contract(&backend);
}

fn etcd_backend(cluster: &EtcdCluster, prefix: &str) -> EtcdBackend {
    EtcdBackend::open(&EtcdOptions::plaintext(cluster.endpoints(), prefix)).unwrap()
}

#[test]
fn etcd_backend_keeps_the_contract_and_etcds_limits() {
    let cluster = EtcdCluster::start(3);
    let backend = etcd_backend(&cluster, "kw-contract/");
    contract(&backend);
    assert!(backend.is_shared());

    // Another prefix on the same cluster sees none of it.
    let other = etcd_backend(&cluster, "kw-other/");
    assert_eq!(other.scan_prefix(b"").unwrap(), vec![]);
    assert!(other.is_empty().unwrap());
    assert!(!backend.is_empty().unwrap());

    // A batch over 128 operations cannot be one transaction: refused whole.
    let ops: Vec<BatchOp> = (0..129)
        .map(|i| BatchOp::Put(format!("big/{i:03}").into_bytes(), b"v".to_vec()))
        .collect();
    let error = backend.batch(ops).unwrap_err().to_string();
    assert!(error.contains("129 operations"), "{error}");
    assert!(error.contains("nothing was written"), "{error}");
    assert_eq!(backend.scan_prefix(b"big/").unwrap(), vec![]);
    // Over 1.5 MiB in all: refused whole too.
    let ops: Vec<BatchOp> = (0..4)
        .map(|i| BatchOp::Put(format!("fat/{i}").into_bytes(), vec![7u8; 500_000]))
        .collect();
    assert!(backend.batch(ops).is_err());
    assert_eq!(backend.scan_prefix(b"fat/").unwrap(), vec![]);
    // apply_in_order with the same bytes goes through (several transactions).
    let ops: Vec<BatchOp> = (0..4)
        .map(|i| BatchOp::Put(format!("fat/{i}").into_bytes(), vec![7u8; 500_000]))
        .collect();
    backend.apply_in_order(ops).unwrap();
    assert_eq!(backend.scan_prefix(b"fat/").unwrap().len(), 4);

    // A second open of the same prefix sees the data (format version kept).
    drop(backend);
    let again = etcd_backend(&cluster, "kw-contract/");
    assert_eq!(again.get(b"b/1").unwrap().as_deref(), Some(&b"x2"[..]));
}

/// The synchronous trait called from async code: on a current-thread
/// runtime (where `block_in_place` would panic) and on a multi-thread one.
#[tokio::test]
async fn etcd_backend_works_from_a_current_thread_runtime() {
    let cluster = EtcdCluster::start(1);
    let backend = etcd_backend(&cluster, "kw-ct/");
    backend.put(b"k", b"v").unwrap();
    assert_eq!(backend.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    // Dropped inside the runtime: no panic.
    drop(backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_works_from_multi_thread_workers() {
    let cluster = EtcdCluster::start(1);
    let backend = std::sync::Arc::new(etcd_backend(&cluster, "kw-mt/"));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let backend = backend.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let key = format!("t{t}/{i}");
                backend.put(key.as_bytes(), b"v").unwrap();
                assert!(backend.get(key.as_bytes()).unwrap().is_some());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(backend.scan_prefix(b"t").unwrap().len(), 160);
}

/// A lost cluster is an error within the request bound, never a hang.
#[test]
fn etcd_backend_reports_a_lost_cluster() {
    let mut cluster = EtcdCluster::start(1);
    let backend = etcd_backend(&cluster, "kw-lost/");
    backend.put(b"k", b"v").unwrap();
    cluster.members[0].kill();
    let error = backend.put(b"k", b"w").unwrap_err().to_string();
    assert!(error.contains("put"), "{error}");
}

/// etcd's NOSPACE alarm: writes fail with a clear error, reads go on.
#[test]
fn etcd_backend_fails_writes_closed_when_etcd_is_out_of_space() {
    let cluster = EtcdCluster::start_with(
        1,
        crate::etcd_kit::EtcdFlags {
            quota_backend_bytes: Some(2 * 1024 * 1024),
        },
    );
    let backend = etcd_backend(&cluster, "kw-full/");
    backend.put(b"keep", b"readable").unwrap();
    let mut refused = None;
    for i in 0..200 {
        if let Err(e) = backend.put(format!("fill/{i}").as_bytes(), &vec![1u8; 200_000]) {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.expect("etcd never ran out of space");
    assert!(refused.contains("out of space"), "{refused}");
    assert!(refused.contains("NOSPACE"), "{refused}");
    // Still refused (the alarm stays), reads still answered.
    assert!(backend.put(b"small", b"x").is_err());
    assert_eq!(
        backend.get(b"keep").unwrap().as_deref(),
        Some(&b"readable"[..])
    );
    assert!(!backend.scan_prefix(b"fill/").unwrap().is_empty());
}

/// One of three etcd members killed: the backend goes on reading and
/// writing through the other two (etcd keeps its quorum).
#[test]
fn etcd_backend_survives_one_member_of_three() {
    let mut cluster = EtcdCluster::start(3);
    let backend = etcd_backend(&cluster, "kw-one-down/");
    backend.put(b"before", b"1").unwrap();
    cluster.members[0].kill();
    // If it was etcd's leader, a request during the election can time out
    // (an ambiguous outcome keyward reports, never retries): wait until the
    // two left have a leader, then every call must succeed.
    cluster.wait_healthy();
    for i in 0..50 {
        let key = format!("after/{i}");
        backend.put(key.as_bytes(), b"v").unwrap();
        assert_eq!(
            backend.get(key.as_bytes()).unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
    assert_eq!(backend.get(b"before").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(backend.scan_prefix(b"after/").unwrap().len(), 50);
}

/// The storage calls try once while etcd's quorum is known lost (a call ran
/// out of retries, nothing answered since); an answer to the node's election
/// loop ends that, so once the node says SERVING again its calls ride out a
/// blip as usual. Shown by the third refusal: it came after 5 s of retries,
/// not after one try, though it was asked within seconds of the second.
#[test]
fn an_answer_to_the_election_loop_ends_the_known_quorum_loss() {
    use keyward::storage::cluster::Leadership;

    let mut cluster = EtcdCluster::start(1);
    let options = EtcdOptions::plaintext(cluster.endpoints(), "kw-known-lost/");
    let backend = std::sync::Arc::new(EtcdBackend::open(&options).unwrap());
    backend.put(b"k", b"v").unwrap();
    cluster.members[0].kill();
    let first = backend.get(b"k").unwrap_err().to_string();
    assert!(first.contains("of retries"), "{first}");
    let second = backend.get(b"k").unwrap_err().to_string();
    assert!(second.contains("tried once"), "{second}");

    // The member back; nothing is asked of the backend itself, only the
    // election loop runs until it has won (its answers heard).
    cluster.members[0].restart();
    cluster.wait_healthy();
    let leadership =
        keyward::storage::EtcdLeadership::start(backend.clone(), &options, "kw1").unwrap();
    let view = leadership.watch();
    let started = std::time::Instant::now();
    while !view.borrow().is_leader {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the election loop never won"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cluster.members[0].kill();
    let third = backend.get(b"k").unwrap_err().to_string();
    assert!(!third.contains("tried once"), "{third}");
    drop(leadership);
}

/// While etcd's quorum is known lost, a call is tried once; a try that was
/// never sent (the client picked a member that is still down) does not use
/// that try up. Two of three members killed (the loss becomes known), one
/// brought back: reads started together all succeed through the two that
/// run, though the third is still down.
#[test]
fn while_the_loss_is_known_a_member_that_is_down_does_not_use_up_the_one_try() {
    let mut cluster = EtcdCluster::start(3);
    let backend = std::sync::Arc::new(etcd_backend(&cluster, "kw-one-try/"));
    backend.put(b"k", b"v").unwrap();
    cluster.members[0].kill();
    cluster.members[1].kill();
    let lost = backend.get(b"k").unwrap_err().to_string();
    assert!(lost.contains("of retries"), "{lost}");
    cluster.members[1].restart();
    cluster.wait_healthy();
    let start = std::sync::Arc::new(std::sync::Barrier::new(24));
    let readers: Vec<_> = (0..24)
        .map(|_| {
            let (backend, start) = (backend.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                backend.get(b"k").map_err(|e| e.to_string())
            })
        })
        .collect();
    let failed: Vec<String> = readers
        .into_iter()
        .filter_map(|r| r.join().unwrap().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} reads failed: {failed:?}",
        failed.len()
    );
}
