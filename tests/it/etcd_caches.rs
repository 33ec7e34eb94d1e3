//! The token and policy caches on etcd (`storage::coherence`): two keyward
//! nodes on one real 3-member etcd cluster (`etcd_kit`), in process over
//! TLS. Node 2 uses its tokens first, so its caches hold them; then node 1
//! revokes a token, narrows a policy and disables an identity, and node 2's
//! very next request is refused each time.
//!
//! The second half holds node 2's watch deliveries back (`Coherence::hold`:
//! a watch that lags, on demand). A cache that trusted itself without the
//! revision fence would then answer from its stale entries; the fence sees
//! that the watch has not delivered the change acknowledged before the
//! request and reads etcd instead.

use tonic::Code;

use crate::etcd_kit::EtcdCluster;
use crate::etcd_nodes::{caught_up, issue, node};
use crate::harness::{data, private_tempdir, unique};
use crate::ident_kit::{approle_identity, login};
use keyward::client::{ClientError, PutOptions};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.unwrap_err().code().unwrap_or(Code::Unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caches_on_etcd_honour_changes_made_on_another_node() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let certs_dir = private_tempdir();
    let certs = keyward::pki::ensure_dev_certs(&certs_dir.path().join("certs")).unwrap();
    let prefix = format!("{}/", unique("kwc"));
    let one = node(&etcd, &prefix, &certs, "kw1").await;
    let two = node(&etcd, &prefix, &certs, "kw2").await;
    let anon1 = one.anonymous().await;
    let init = anon1.init(1, 1).await.unwrap();
    anon1.unseal(&init.shares[0]).await.unwrap();
    let anon2 = two.anonymous().await;
    anon2.unseal(&init.shares[0]).await.unwrap();
    let root1 = anon1.with_token(&init.root_token).unwrap();

    let area = unique("app");
    let path = format!("{area}/db");
    root1
        .put(&path, &data(&[("password", "v1")]), PutOptions::default())
        .await
        .unwrap();
    let policy = unique("p");
    let rw =
        format!("[[rule]]\npath = \"secret/{area}/**\"\ncapabilities = [\"read\", \"write\"]\n");
    let ro = format!("[[rule]]\npath = \"secret/{area}/**\"\ncapabilities = [\"read\"]\n");
    root1.policy_put(&policy, &rw).await.unwrap();

    // --- With the watch running freely. -------------------------------
    let first = issue(&root1, &policy).await;
    let revoked = anon2.with_token(&first).unwrap();
    caught_up(&two).await;
    for _ in 0..3 {
        revoked.get(&path).await.unwrap();
    }
    root1.revoke_token(&first).await.unwrap();
    assert_eq!(code(revoked.get(&path).await), Code::Unauthenticated);

    // --- With node 2's watch held back. --------------------------------
    // Tokens used on node 2 (so cached there, with the policy compiled).
    let second = issue(&root1, &policy).await;
    let to_revoke = anon2.with_token(&second).unwrap();
    let narrowed = anon2.with_token(&issue(&root1, &policy).await).unwrap();
    let identity = unique("svc");
    let (role_id, secret_id) =
        approle_identity(&root1, &identity, std::slice::from_ref(&policy)).await;
    let (_, of_identity) = login(&two, &role_id, &secret_id).await;
    caught_up(&two).await;
    for _ in 0..3 {
        to_revoke.get(&path).await.unwrap();
        of_identity.get(&path).await.unwrap();
        narrowed
            .put(&path, &data(&[("password", "v2")]), PutOptions::default())
            .await
            .unwrap();
    }

    let coherence = two
        .core
        .barrier
        .coherence()
        .expect("etcd has a change feed");
    let hold = coherence.hold();

    // A revoke acknowledged by node 1: node 2's next request is refused.
    root1.revoke_token(&second).await.unwrap();
    assert_eq!(code(to_revoke.get(&path).await), Code::Unauthenticated);

    // A policy narrowed on node 1: node 2 refuses the write at once, and
    // still allows the read.
    root1.policy_put(&policy, &ro).await.unwrap();
    assert_eq!(
        code(
            narrowed
                .put(&path, &data(&[("password", "v3")]), PutOptions::default())
                .await
        ),
        Code::PermissionDenied
    );
    narrowed.get(&path).await.unwrap();

    // An identity disabled on node 1 (which revokes its tokens): its token
    // is refused by node 2 at once.
    root1.identity_disable(&identity).await.unwrap();
    assert_eq!(code(of_identity.get(&path).await), Code::Unauthenticated);

    // Deliveries resume: node 2 catches up and serves from its caches again,
    // and what was refused stays refused.
    drop(hold);
    caught_up(&two).await;
    assert_eq!(code(to_revoke.get(&path).await), Code::Unauthenticated);
    assert_eq!(code(of_identity.get(&path).await), Code::Unauthenticated);
    assert_eq!(
        code(
            narrowed
                .put(&path, &data(&[("password", "v4")]), PutOptions::default())
                .await
        ),
        Code::PermissionDenied
    );
    // v1, then three writes before the narrowing.
    assert_eq!(narrowed.get(&path).await.unwrap().version, 4);
}
