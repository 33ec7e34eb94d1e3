//! Attacks on the write combiner (`storage::etcd_combine`), on a real
//! 3-member loopback cluster: a caller who floods one key, a caller whose
//! write waits past its bound, writes that together pass etcd's request
//! limit, and writes that etcd would refuse, gathered with others'.
//!
//! As in `etcd_gather`, the combiner is held while writes queue, so what is
//! gathered with what does not depend on timing; the tests wait for events
//! (the queue, a thread's answer), never for a time.

use std::sync::Arc;

use etcd_client::GetOptions;
use keyward::storage::{Backend, BatchOp, EtcdBackend};

use crate::etcd_gather::{open, put, wait_queued};
use crate::etcd_kit::EtcdCluster;

type Job = Box<dyn FnOnce(&EtcdBackend) -> Result<(), String> + Send>;

/// Queues `jobs` in this order while the combiner is held (each one queued
/// before the next starts), releases it, and returns their answers.
fn queued_in_order(backend: &Arc<EtcdBackend>, jobs: Vec<Job>) -> Vec<Result<(), String>> {
    let hold = backend.hold_writes().expect("the combiner runs");
    let threads: Vec<_> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, job)| {
            let backend2 = backend.clone();
            let thread = std::thread::spawn(move || job(&backend2));
            wait_queued(backend, i + 1);
            thread
        })
        .collect();
    drop(hold);
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn put_job(key: &'static str, value: String) -> Job {
    Box::new(move |b: &EtcdBackend| {
        b.put(key.as_bytes(), value.as_bytes())
            .map_err(|e| e.to_string())
    })
}

/// The etcd `(create_revision, mod_revision)` of a barrier key under `prefix`.
fn revisions(cluster: &EtcdCluster, prefix: &str, key: &str) -> (i64, i64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
            .await
            .unwrap();
        let answer = client
            .get(format!("{prefix}d/{key}"), Some(GetOptions::new()))
            .await
            .unwrap();
        let kv = answer.kvs().first().expect("the key is in etcd");
        (kv.create_revision(), kv.mod_revision())
    })
}

/// Head-of-line blocking: writes to one key can never go together, so each
/// takes a transaction of its own. A caller who keeps many writes of one
/// key queued must not make every other caller's write wait behind all of
/// them (one transaction out at a time): a disjoint write queued after them
/// goes in the first transaction, beside the first of them.
#[test]
fn a_flood_of_writes_to_one_key_does_not_hold_back_other_writes() {
    let cluster = EtcdCluster::start(3);
    let prefix = "kw-gatk-flood/";
    let backend = open(&cluster, prefix);
    let mut jobs: Vec<Job> = (0..5).map(|i| put_job("hot", format!("h{i}"))).collect();
    jobs.push(put_job("cold", "c".into()));
    let answers = queued_in_order(&backend, jobs);
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    // Same-key writes kept their order.
    assert_eq!(backend.get(b"hot").unwrap().as_deref(), Some(&b"h4"[..]));
    let (hot_created, hot_last) = revisions(&cluster, prefix, "hot");
    let (_, cold) = revisions(&cluster, prefix, "cold");
    assert!(hot_created < hot_last);
    assert_eq!(
        cold, hot_created,
        "the disjoint write went with the first write of the flooded key \
         (revision {hot_created}), not behind all of them (last at {hot_last})"
    );
}

/// Same-key writes stay in their order even when a disjoint write passes
/// them, and a write that touches a passed-over write's key waits for it.
#[test]
fn writes_passed_over_keep_their_order() {
    let cluster = EtcdCluster::start(3);
    let backend = open(&cluster, "kw-gatk-order/");
    let jobs: Vec<Job> = vec![
        put_job("a", "a1".into()),
        // Overlaps the first: passed over.
        Box::new(|b: &EtcdBackend| {
            b.batch(vec![put("a", "a2"), put("b", "b2")])
                .map_err(|e| e.to_string())
        }),
        // Disjoint from the first but overlaps the passed-over one: it must
        // not go before it.
        put_job("b", "b3".into()),
        put_job("c", "c1".into()),
    ];
    let answers = queued_in_order(&backend, jobs);
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(backend.get(b"a").unwrap().as_deref(), Some(&b"a2"[..]));
    assert_eq!(
        backend.get(b"b").unwrap().as_deref(),
        Some(&b"b3"[..]),
        "the later write of b went after the earlier one"
    );
    assert_eq!(backend.get(b"c").unwrap().as_deref(), Some(&b"c1"[..]));
}

/// A write that waited in the combiner past its caller's bound: the caller
/// was answered (an error), so the write must never be sent afterwards. A
/// ghost write applied later would overwrite a write another node
/// acknowledged meanwhile.
#[test]
fn a_write_whose_caller_gave_up_is_never_sent_afterwards() {
    let cluster = EtcdCluster::start(3);
    let prefix = "kw-gatk-ghost/";
    let a = open(&cluster, prefix);
    let b = open(&cluster, prefix);
    let hold = a.hold_writes().expect("the combiner runs");
    let given_up = {
        let a = a.clone();
        std::thread::spawn(move || a.put(b"k", b"ghost"))
    };
    wait_queued(&a, 1);
    // The caller waits its bound out (seconds) and is answered.
    let answer = given_up.join().unwrap();
    let message = answer.expect_err("a held write is not applied").to_string();
    // Another node's write, acknowledged after that answer.
    b.put(b"k", b"acknowledged").unwrap();
    drop(hold);
    // A later write of node A goes after anything the combiner had.
    a.put(b"after", b"x").unwrap();
    wait_queued(&a, 0);
    assert_eq!(
        b.get(b"k").unwrap().as_deref(),
        Some(&b"acknowledged"[..]),
        "the abandoned write was sent after its caller was answered"
    );
    assert!(
        message.contains("was not sent"),
        "a write never sent says so: {message}"
    );
}

/// etcd counts the whole request, its keys with the store's prefix: with a
/// long prefix, many writes that each fit and that together fit the
/// combiner's count of key and value bytes must not be sent as one
/// transaction that etcd refuses (every gathered write would fail).
#[test]
fn a_long_prefix_does_not_push_a_gathered_transaction_past_etcds_limit() {
    let cluster = EtcdCluster::start(3);
    let prefix = format!("kw-gatk-long-{}/", "p".repeat(200));
    let backend = open(&cluster, &prefix);
    const WRITES: usize = 120;
    let value = "v".repeat(13_000);
    let hold = backend.hold_writes().expect("the combiner runs");
    let threads: Vec<_> = (0..WRITES)
        .map(|i| {
            let (backend, value) = (backend.clone(), value.clone());
            std::thread::spawn(move || {
                backend
                    .put(format!("big/{i:03}").as_bytes(), value.as_bytes())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    wait_queued(&backend, WRITES);
    drop(hold);
    let answers: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {WRITES} writes failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(backend.scan_prefix(b"big/").unwrap().len(), WRITES);
}

/// A write with more comparisons than etcd takes fails on its own: the
/// writes queued beside it are not gathered with it.
#[test]
fn a_write_over_etcds_comparison_limit_fails_alone() {
    let cluster = EtcdCluster::start(3);
    let backend = open(&cluster, "kw-gatk-compares/");
    let jobs: Vec<Job> = vec![
        put_job("before", "b".into()),
        Box::new(|b: &EtcdBackend| {
            let expect = (0..129)
                .map(|i| (format!("absent/{i}").into_bytes(), None))
                .collect();
            match b.batch_if(expect, vec![put("mine", "m")]) {
                Err(_) => Ok(()),
                Ok(applied) => Err(format!("129 comparisons answered {applied}")),
            }
        }),
        put_job("after", "a".into()),
    ];
    let answers = queued_in_order(&backend, jobs);
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(backend.get(b"before").unwrap().as_deref(), Some(&b"b"[..]));
    assert_eq!(backend.get(b"after").unwrap().as_deref(), Some(&b"a"[..]));
    assert_eq!(backend.get(b"mine").unwrap(), None);
}

/// A batch naming one key twice (etcd refuses a transaction that does) is
/// folded to one operation per key before it is gathered, so it cannot fail
/// the writes gathered with it.
#[test]
fn a_batch_naming_a_key_twice_does_not_fail_the_writes_beside_it() {
    let cluster = EtcdCluster::start(3);
    let backend = open(&cluster, "kw-gatk-dup/");
    let jobs: Vec<Job> = vec![
        put_job("innocent", "i".into()),
        Box::new(|b: &EtcdBackend| {
            b.batch(vec![put("twice", "1"), put("twice", "2")])
                .map_err(|e| e.to_string())
        }),
        Box::new(|b: &EtcdBackend| {
            b.apply_in_order(vec![put("again", "1"), BatchOp::Delete(b"again".to_vec())])
                .map_err(|e| e.to_string())
        }),
    ];
    let answers = queued_in_order(&backend, jobs);
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(
        backend.get(b"innocent").unwrap().as_deref(),
        Some(&b"i"[..])
    );
    assert_eq!(backend.get(b"twice").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(backend.get(b"again").unwrap(), None);
}
