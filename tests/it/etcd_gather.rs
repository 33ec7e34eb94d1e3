//! Concurrent writes gathered into one etcd transaction (`storage::etcd_combine`),
//! on a real 3-member loopback cluster: what goes together, what never does,
//! and that each write still gets its own answer.
//!
//! The combiner is held (`EtcdBackend::hold_writes`) while the writes queue, so
//! what is gathered with what does not depend on timing; the tests wait for the
//! queue itself, not for a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward::storage::{Backend, BatchOp, EtcdBackend, EtcdOptions};

use crate::etcd_kit::EtcdCluster;

pub(crate) fn open(cluster: &EtcdCluster, prefix: &str) -> Arc<EtcdBackend> {
    Arc::new(EtcdBackend::open(&EtcdOptions::plaintext(cluster.endpoints(), prefix)).unwrap())
}

pub(crate) fn put(key: &str, value: &str) -> BatchOp {
    BatchOp::Put(key.as_bytes().to_vec(), value.as_bytes().to_vec())
}

fn expect(key: &str, value: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
    (
        key.as_bytes().to_vec(),
        value.map(|v| v.as_bytes().to_vec()),
    )
}

/// Waits until `n` writes wait in the held combiner (generous bound: an
/// event, not a speed).
pub(crate) fn wait_queued(backend: &EtcdBackend, n: usize) {
    let until = Instant::now() + Duration::from_secs(60);
    while backend.writes_queued() < n {
        assert!(
            Instant::now() < until,
            "{} of {n} writes queued",
            backend.writes_queued()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

type Job = Box<dyn FnOnce(&EtcdBackend) -> bool + Send>;

/// Runs each job on its own thread while the combiner is held, releases it
/// once all are queued, and returns their answers in order with the number of
/// requests sent to etcd meanwhile.
fn held_together(backend: &Arc<EtcdBackend>, jobs: Vec<Job>) -> (Vec<bool>, u64) {
    let before = backend.requests_sent().unwrap();
    let hold = backend.hold_writes().expect("the combiner runs");
    let n = jobs.len();
    let threads: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let backend = backend.clone();
            std::thread::spawn(move || job(&backend))
        })
        .collect();
    wait_queued(backend, n);
    drop(hold);
    let answers = threads.into_iter().map(|t| t.join().unwrap()).collect();
    (answers, backend.requests_sent().unwrap() - before)
}

#[test]
fn writes_queued_together_go_in_one_transaction_and_each_applies() {
    let cluster = EtcdCluster::start(3);
    let backend = open(&cluster, "kw-gather-one/");
    backend.put(b"meta/a", b"a0").unwrap();
    let mut jobs: Vec<Job> = (0..6)
        .map(|i| -> Job {
            Box::new(move |b: &EtcdBackend| {
                b.batch_if(
                    vec![expect(&format!("meta/p{i}"), None)],
                    vec![
                        put(&format!("meta/p{i}"), "m"),
                        put(&format!("data/p{i}"), "d"),
                    ],
                )
                .unwrap()
            })
        })
        .collect();
    jobs.push(Box::new(|b: &EtcdBackend| {
        b.put(b"plain/x", b"x").unwrap();
        true
    }));
    jobs.push(Box::new(|b: &EtcdBackend| {
        b.batch(vec![put("meta/a", "a1"), BatchOp::Delete(b"gone".to_vec())])
            .unwrap();
        true
    }));
    let (answers, sent) = held_together(&backend, jobs);
    assert_eq!(answers, vec![true; 8]);
    assert_eq!(
        sent, 1,
        "eight disjoint writes queued together: one transaction"
    );
    for i in 0..6 {
        assert_eq!(
            backend
                .get(format!("data/p{i}").as_bytes())
                .unwrap()
                .as_deref(),
            Some(&b"d"[..])
        );
    }
    assert_eq!(backend.get(b"plain/x").unwrap().as_deref(), Some(&b"x"[..]));
    assert_eq!(backend.get(b"meta/a").unwrap().as_deref(), Some(&b"a1"[..]));
}

#[test]
fn a_failed_comparison_fails_only_its_own_write() {
    let cluster = EtcdCluster::start(3);
    let backend = open(&cluster, "kw-gather-conflict/");
    backend.put(b"stale", b"now").unwrap();
    let jobs: Vec<Job> = vec![
        Box::new(|b: &EtcdBackend| {
            b.batch_if(vec![expect("k1", None)], vec![put("k1", "one")])
                .unwrap()
        }),
        // Expects a value the key no longer holds.
        Box::new(|b: &EtcdBackend| {
            b.batch_if(
                vec![expect("stale", Some("before"))],
                vec![put("lost", "x")],
            )
            .unwrap()
        }),
        Box::new(|b: &EtcdBackend| {
            b.batch_if(vec![expect("k2", None)], vec![put("k2", "two")])
                .unwrap()
        }),
    ];
    let (answers, sent) = held_together(&backend, jobs);
    assert_eq!(answers, vec![true, false, true]);
    // The gathered transaction failed as a whole, then each went alone.
    assert_eq!(sent, 4);
    assert_eq!(backend.get(b"k1").unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(backend.get(b"k2").unwrap().as_deref(), Some(&b"two"[..]));
    assert_eq!(backend.get(b"lost").unwrap(), None);
}

/// Write skew: each write compares the key the other changes. Checked in one
/// transaction both comparisons would see the old values and both would
/// apply; written one after the other exactly one may. They must not be
/// gathered.
#[test]
fn writes_that_compare_what_another_changes_are_not_gathered() {
    let cluster = EtcdCluster::start(3);
    let backend = open(&cluster, "kw-gather-skew/");
    backend.put(b"a", b"0").unwrap();
    backend.put(b"b", b"0").unwrap();
    let jobs: Vec<Job> = vec![
        Box::new(|b: &EtcdBackend| {
            b.batch_if(vec![expect("a", Some("0"))], vec![put("b", "1")])
                .unwrap()
        }),
        Box::new(|b: &EtcdBackend| {
            b.batch_if(vec![expect("b", Some("0"))], vec![put("a", "1")])
                .unwrap()
        }),
    ];
    let (answers, sent) = held_together(&backend, jobs);
    assert_eq!(
        answers.iter().filter(|a| **a).count(),
        1,
        "exactly one of two skewed writes applies: {answers:?}"
    );
    assert_eq!(sent, 2, "one transaction each");
    let a = backend.get(b"a").unwrap().unwrap();
    let b = backend.get(b"b").unwrap().unwrap();
    assert!(a != b, "one of the two changed: a={a:?} b={b:?}");
}

/// No hold: threads race read-modify-write increments of one counter (each
/// a guarded write, retried when its comparison fails) beside writes of their
/// own keys. However they are gathered, no increment is lost.
#[test]
fn racing_guarded_increments_lose_no_update() {
    let cluster = EtcdCluster::start(3);
    let backend = open(&cluster, "kw-gather-race/");
    backend.put(b"counter", b"0").unwrap();
    const THREADS: usize = 8;
    const EACH: usize = 25;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let backend = backend.clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    backend
                        .put(format!("own/{t}/{i}").as_bytes(), b"v")
                        .unwrap();
                    loop {
                        let old = backend.get(b"counter").unwrap().unwrap();
                        let n: usize = std::str::from_utf8(&old).unwrap().parse().unwrap();
                        let old = String::from_utf8(old).unwrap();
                        if backend
                            .batch_if(
                                vec![expect("counter", Some(&old))],
                                vec![put("counter", &(n + 1).to_string())],
                            )
                            .unwrap()
                        {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        backend.get(b"counter").unwrap().as_deref(),
        Some((THREADS * EACH).to_string().as_bytes())
    );
    assert_eq!(backend.scan_prefix(b"own/").unwrap().len(), THREADS * EACH);
}
