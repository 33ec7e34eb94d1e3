//! Writes whose operations can outnumber one etcd transaction (128
//! operations): on a real etcd, each is applied in batches that fit, where
//! before 0.6.12 it was refused whole.

use tonic::Code;

use crate::etcd_kit::EtcdCluster;
use crate::etcd_nodes::two_nodes;
use crate::harness::{data, unique};
use keyward::client::PutOptions;

/// An identity with more secret-ids than one etcd transaction holds (each
/// is two records) is disabled (none of them logs in any more) and deleted
/// on etcd; before 0.6.12 both were refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_with_many_secret_ids_is_disabled_and_deleted_on_etcd() {
    let etcd = EtcdCluster::start(1);
    let nodes = two_nodes(&etcd, &format!("{}/", unique("kwi")), |_| {}).await;
    let name = unique("svc");
    nodes
        .root1
        .identity_create(crate::ident_kit::create(
            &name,
            "service-account",
            "team-a",
            &[],
        ))
        .await
        .unwrap();
    const SECRET_IDS: usize = 70;
    let mut secret_ids = Vec::new();
    for _ in 0..SECRET_IDS {
        secret_ids.push(
            nodes
                .root1
                .identity_secret_id(&name, 0, 0, &[])
                .await
                .unwrap(),
        );
    }
    let anon2 = nodes.two.anonymous().await;
    anon2
        .login_approle(&secret_ids[0].role_id, &secret_ids[0].secret_id, 0)
        .await
        .unwrap();
    let disabled = nodes.root2.identity_disable(&name).await.unwrap();
    assert!(disabled.disabled);
    assert!(nodes
        .root2
        .identity_secret_ids(&name)
        .await
        .unwrap()
        .is_empty());
    for sid in [&secret_ids[0], &secret_ids[SECRET_IDS - 1]] {
        let refused = anon2.login_approle(&sid.role_id, &sid.secret_id, 0).await;
        assert!(
            refused.is_err(),
            "a secret-id of a disabled identity logged in"
        );
    }
    nodes.root1.identity_enable(&name).await.unwrap();
    for _ in 0..SECRET_IDS {
        nodes
            .root1
            .identity_secret_id(&name, 0, 0, &[])
            .await
            .unwrap();
    }
    nodes.root2.identity_delete(&name).await.unwrap();
    let gone = nodes.root2.identity_get(&name).await;
    assert!(matches!(
        gone.map_err(|e| e.code()),
        Err(Some(Code::NotFound))
    ));
}

/// A Put that lowers `max_versions` far below the versions a secret holds
/// prunes at most 64 of them (their deletes share its guarded transaction);
/// the rest stay listed and go with the next writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_that_prunes_many_versions_on_etcd_succeeds() {
    let etcd = EtcdCluster::start(1);
    let nodes = two_nodes(&etcd, &format!("{}/", unique("kwp")), |_| {}).await;
    let path = format!("{}/db", unique("app"));
    let keep = |n: u32| PutOptions {
        max_versions: Some(n),
        ..PutOptions::default()
    };
    const VERSIONS: u64 = 140;
    for i in 0..VERSIONS {
        nodes
            .root1
            .put(&path, &data(&[("password", &format!("v{i}"))]), keep(200))
            .await
            .unwrap();
    }
    let gone = |v: u64| {
        let root = nodes.root1.clone();
        let path = path.clone();
        async move {
            let read = root.get_with(&path, Some(v), None).await;
            matches!(read.map_err(|e| e.code()), Err(Some(Code::NotFound)))
        }
    };
    let last = nodes
        .root2
        .put(&path, &data(&[("password", "final")]), keep(2))
        .await
        .unwrap();
    assert_eq!(last, VERSIONS + 1);
    let read = nodes.root2.get(&path).await.unwrap();
    assert_eq!(read.field_str("password"), Some("final"));
    assert!(gone(1).await && gone(64).await, "the 64 oldest went");
    assert!(
        !gone(65).await,
        "the rest stays listed until the next writes"
    );
    for i in 0..2 {
        nodes
            .root2
            .put(&path, &data(&[("password", &format!("after{i}"))]), keep(2))
            .await
            .unwrap();
    }
    for v in [65, 100, VERSIONS, VERSIONS + 1] {
        assert!(gone(v).await, "version {v} is still there");
    }
    let newest = nodes.root1.get(&path).await.unwrap();
    assert_eq!(newest.version, VERSIONS + 3);
    assert!(!gone(VERSIONS + 2).await);
}
