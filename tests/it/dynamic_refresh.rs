//! The client library's [`FreshCredential`] on the private scram-sha-256
//! PostgreSQL cluster: with a role TTL of a few seconds and a short max TTL
//! the credential it holds keeps logging in across a renewal, across its
//! replacement when the max TTL is reached, and across a revocation behind
//! its back (renewal refused). Every wait is a condition polled with a
//! generous bound, never a duration asserted.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::db_target::{suffix, Kind, Target};
use crate::harness::{data, eventually, unique, TestServer};
use keyward::client::{DynamicRoleSpec, FreshCredential, PutOptions, RefreshOptions};

/// The longest wait for the helper to replace its credential.
const PATIENCE: Duration = Duration::from_secs(120);

fn ts(t: Option<prost_types::Timestamp>) -> (i64, i32) {
    t.map_or((0, 0), |t| (t.seconds, t.nanos))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_credential_survives_renewal_replacement_and_revocation() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = unique("dyn/admin");
    let pairs = target.admin();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    root.put(&admin, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
    let role = format!("fresh_{}", suffix());
    root.dynamic_role_put(&DynamicRoleSpec {
        name: role.clone(),
        provider: "postgres".into(),
        config: [("admin_secret".to_owned(), admin.clone())]
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        ttl: Duration::from_secs(3),
        max_ttl: Duration::from_secs(12),
    })
    .await
    .unwrap();

    let fresh = FreshCredential::start(root.clone(), &role, RefreshOptions::default())
        .await
        .unwrap();
    let mut changes = fresh.subscribe();
    let first = fresh.current();
    assert_eq!(first.generation, 0);
    assert!(!format!("{first:?}").contains(first.password()));
    assert!(target.can_login(&first.username, first.password()).await);
    let issued = ts(root.lease_lookup(&first.lease_id).await.unwrap().expires_at);

    // A renewal: the lease's end moves later, the credential still works.
    let r = root.clone();
    let lease = first.lease_id.clone();
    eventually("the helper renews the lease", move || {
        let r = r.clone();
        let lease = lease.clone();
        async move {
            match r.lease_lookup(&lease).await {
                Ok(l) => ts(l.expires_at) > issued,
                Err(_) => false,
            }
        }
    })
    .await;
    let now = fresh.current();
    assert!(target.can_login(&now.username, now.password()).await);

    // The max TTL: a new credential replaces it, and logs in.
    tokio::time::timeout(PATIENCE, changes.changed())
        .await
        .expect("the helper replaced its credential at the max TTL")
        .unwrap();
    let second = fresh.current();
    assert_eq!(second.generation, 1);
    assert_ne!(second.username, first.username);
    assert!(target.can_login(&second.username, second.password()).await);
    // The first lease ended on its own: its user is gone.
    let t = target.clone();
    let old = first.username.clone();
    eventually(
        "the first credential's user is dropped at its max TTL",
        move || {
            let t = t.clone();
            let old = old.clone();
            async move { !t.user_exists(&old).await }
        },
    )
    .await;

    // Revoked behind its back: the renewal is refused, a new one comes.
    let seen = fresh.current().generation;
    root.lease_revoke(&fresh.current().lease_id).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while changes.borrow_and_update().generation == seen {
        tokio::time::timeout_at(deadline, changes.changed())
            .await
            .expect("the helper replaced its revoked credential")
            .unwrap();
    }
    let third = fresh.current();
    assert!(third.generation > seen);
    assert!(target.can_login(&third.username, third.password()).await);

    // Revoked on purpose: the user is dropped at once.
    let last = fresh.current();
    fresh.revoke().await.unwrap();
    assert!(!target.user_exists(&last.username).await);
    server.stop().await;
}
