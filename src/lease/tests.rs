#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The lease store's own rules with a paused tokio clock. The revoker here
//! is a stand-in that records what it was asked (and can be told to fail);
//! revocation on real PostgreSQL, MariaDB and Redis is tested in
//! `tests/it/dynamic_*.rs`.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::barrier::BarrierOptions;
use crate::clock::ShutdownTrigger;
use crate::storage::SledBackend;

const T0: u64 = 1_000_000_000;

#[derive(Default)]
struct Recorder {
    revoked: Mutex<Vec<String>>,
    failing: AtomicBool,
}

impl Revoker for Recorder {
    fn revoke<'a>(&'a self, lease: &'a LeaseRecord) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if self.failing.load(Ordering::SeqCst) {
                return Err("target down".to_owned());
            }
            self.revoked.lock().unwrap().push(lease.username.clone());
            Ok(())
        })
    }
}

fn store() -> (tempfile::TempDir, LeaseStore, Arc<Recorder>) {
    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path()).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let shares = barrier.init(1, 1).unwrap();
    barrier.unseal(&shares[0].0).unwrap();
    let store = LeaseStore::new(Arc::new(barrier), Clock::starting_at(T0));
    let recorder = Arc::new(Recorder::default());
    store.set_revoker(recorder.clone());
    (dir, store, recorder)
}

fn lease(id: &str, accessor: &str, expires_in_ms: u64, max_in_ms: u64) -> LeaseRecord {
    LeaseRecord {
        id: format!("dynamic/app/{id}"),
        accessor: accessor.into(),
        username: format!("kw_app_{id}"),
        provider: "postgres".into(),
        created_ms: T0,
        expires_ms: T0 + expires_in_ms,
        max_expiry_ms: T0 + max_in_ms,
        ttl_ms: expires_in_ms,
        ..LeaseRecord::default()
    }
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_sleeper_revokes_at_expiry_and_not_before() {
    let (_d, store, recorder) = store();
    let trigger = ShutdownTrigger::new();
    tokio::spawn(store.clone().run_sweeper(trigger.signal()));
    store
        .create(&lease("a", "acc1", 10_000, 60_000))
        .await
        .unwrap();
    store
        .create(&lease("b", "acc1", 30_000, 60_000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(9_000)).await;
    settle().await;
    assert!(recorder.revoked.lock().unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    settle().await;
    assert_eq!(
        *recorder.revoked.lock().unwrap(),
        vec!["kw_app_a".to_owned()]
    );
    assert!(store.get("dynamic/app/a").unwrap().is_none());
    assert!(store.get("dynamic/app/b").unwrap().is_some());
    trigger.trigger();
}

#[tokio::test(start_paused = true)]
async fn renew_is_capped_by_max_ttl_and_the_token() {
    let (_d, store, _r) = store();
    store
        .create(&lease("a", "acc1", 10_000, 60_000))
        .await
        .unwrap();
    let r = store
        .renew("dynamic/app/a", Some(Duration::from_secs(3600)), 0)
        .await
        .unwrap();
    assert_eq!(r.expires_ms, T0 + 60_000);
    store
        .create(&lease("b", "acc1", 10_000, 60_000))
        .await
        .unwrap();
    let r = store
        .renew(
            "dynamic/app/b",
            Some(Duration::from_secs(3600)),
            T0 + 20_000,
        )
        .await
        .unwrap();
    assert_eq!(r.expires_ms, T0 + 20_000);
    assert!(matches!(
        store.renew("dynamic/app/none", None, 0).await,
        Err(LeaseError::NotFound)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_revoked_token_marks_its_leases_and_only_its_own() {
    let (_d, store, recorder) = store();
    let trigger = ShutdownTrigger::new();
    tokio::spawn(store.clone().run_sweeper(trigger.signal()));
    store
        .create(&lease("a", "acc1", 600_000, 600_000))
        .await
        .unwrap();
    store
        .create(&lease("b", "acc2", 600_000, 600_000))
        .await
        .unwrap();
    store.tokens_revoked(&["acc1"]);
    settle().await;
    assert_eq!(
        *recorder.revoked.lock().unwrap(),
        vec!["kw_app_a".to_owned()]
    );
    assert!(store.get("dynamic/app/b").unwrap().is_some());
    // A revoking lease cannot be renewed.
    store
        .create(&lease("c", "acc3", 600_000, 600_000))
        .await
        .unwrap();
    recorder.failing.store(true, Ordering::SeqCst);
    assert_eq!(
        store.revoke("dynamic/app/c").await.unwrap(),
        Some(Revoked::Pending("target down".into()))
    );
    assert!(matches!(
        store.renew("dynamic/app/c", None, 0).await,
        Err(LeaseError::Revoking)
    ));
    trigger.trigger();
}

#[tokio::test(start_paused = true)]
async fn a_failing_revocation_is_retried_with_back_off_and_listed() {
    let (_d, store, recorder) = store();
    let trigger = ShutdownTrigger::new();
    tokio::spawn(store.clone().run_sweeper(trigger.signal()));
    recorder.failing.store(true, Ordering::SeqCst);
    store
        .create(&lease("a", "acc1", 1_000, 60_000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    settle().await;
    let failed = store.list("", true).unwrap();
    assert_eq!(failed.len(), 1);
    // 1 + 2 + 4 + 8 s of back-off fit in 20 s, not many more.
    assert!(
        (3..=6).contains(&failed[0].failures),
        "{}",
        failed[0].failures
    );
    assert_eq!(store.failed_count().unwrap(), 1);
    recorder.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(40)).await;
    settle().await;
    assert_eq!(
        *recorder.revoked.lock().unwrap(),
        vec!["kw_app_a".to_owned()]
    );
    assert_eq!(store.failed_count().unwrap(), 0);
    assert!(store.list("", false).unwrap().is_empty());
    trigger.trigger();
}

#[test]
fn prefixes_are_whole_segments() {
    assert_eq!(check_prefix("dynamic/app/").unwrap(), "dynamic/app");
    for bad in ["", "/", "dynamic//app", "dynamic/*", "../x", "dynamic/a b"] {
        assert!(check_prefix(bad).is_err(), "{bad}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_decommission_revokes_the_identitys_leases_once_and_counts_them() {
    let (_d, store, recorder) = store();
    for (id, identity) in [("a", "svc"), ("b", "svc"), ("c", "other")] {
        let mut record = lease(id, &format!("acc-{id}"), 60_000, 120_000);
        record.identity = identity.into();
        store.create(&record).await.unwrap();
    }
    assert_eq!(store.count_identity("svc").unwrap(), 2);
    assert_eq!(store.count_identity("nobody").unwrap(), 0);
    // A lease already marked by the revocation of its token still counts
    // for the revoke (it ends with the identity), not as live.
    store.tokens_revoked(&["acc-a"]);
    assert_eq!(store.count_identity("svc").unwrap(), 1);
    assert_eq!(store.revoke_identity("svc", T0).unwrap(), 2);
    // Marked, not yet dropped: no renew from now on.
    assert!(matches!(
        store.renew("dynamic/app/b", None, 0).await,
        Err(LeaseError::Revoking)
    ));
    // The normal path (the sleeper's round) drops the users.
    store.sweep(T0).await.unwrap();
    let mut revoked = recorder.revoked.lock().unwrap().clone();
    revoked.sort();
    assert_eq!(revoked, vec!["kw_app_a".to_owned(), "kw_app_b".to_owned()]);
    // Asking again finds nothing and does not fail; the other identity's
    // lease is untouched.
    assert_eq!(store.revoke_identity("svc", T0).unwrap(), 0);
    assert_eq!(store.count_identity("svc").unwrap(), 0);
    assert_eq!(store.count_identity("other").unwrap(), 1);
    assert!(!store.get("dynamic/app/c").unwrap().unwrap().revoking);
}
