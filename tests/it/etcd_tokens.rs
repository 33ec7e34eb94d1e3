//! Tokens on two keyward nodes sharing one etcd cluster: a child issued on
//! one node while the other revokes its parent never outlives the
//! revocation. Each node's token write lock is its own; what keeps them
//! apart is the child's record written only if the parent's is still the
//! one read (one etcd transaction), and the revocation's mark of the parent
//! (a rewrite of its record) before it reads the parent's children.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use crate::etcd_kit::EtcdCluster;
use crate::etcd_nodes::two_nodes;
use crate::harness::unique;
use keyward::client::IssueOptions;

/// Rounds of the race; each is a fresh parent with children being issued
/// on node 1 while node 2 revokes it.
const ROUNDS: usize = 12;
/// Tasks issuing children at once on node 1.
const ISSUERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn children_issued_on_one_node_never_outlive_a_revoke_on_the_other() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(1);
    let nodes = two_nodes(&etcd, &format!("{}/", unique("kwt")), |_| {}).await;
    let policy = unique("issuer");
    let doc = "[[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n";
    nodes.root1.policy_put(&policy, doc).await.unwrap();
    let anon1 = nodes.one.anonymous().await;
    let anon2 = nodes.two.anonymous().await;

    let mut issued_total = 0usize;
    let mut revoked_with_parent = 0u32;
    for round in 0..ROUNDS {
        let parent = nodes
            .root1
            .issue_token(IssueOptions {
                policies: vec![policy.clone()],
                ttl: Some(Duration::from_secs(600)),
                ..IssueOptions::default()
            })
            .await
            .unwrap();
        let issuer = Arc::new(anon1.with_token(&parent.token).unwrap());
        let first = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..ISSUERS {
            let (issuer, policy, first) = (issuer.clone(), policy.clone(), first.clone());
            tasks.push(tokio::spawn(async move {
                let mut children = Vec::new();
                // Issue until the parent is gone; the refusal says so.
                loop {
                    let made = issuer
                        .issue_token(IssueOptions {
                            policies: vec![policy.clone()],
                            ttl: Some(Duration::from_secs(600)),
                            ..IssueOptions::default()
                        })
                        .await;
                    match made {
                        Ok(child) => {
                            children.push(child.token.clone());
                            first.notify_one();
                        }
                        Err(e) => {
                            let code = e.code();
                            assert!(
                                matches!(code, Some(Code::Unauthenticated)),
                                "a child issue racing a revoke is refused as unauthenticated, got {e}"
                            );
                            return children;
                        }
                    }
                }
            }));
        }
        // Revoke on node 2 while node 1 is issuing.
        tokio::time::timeout(Duration::from_secs(60), first.notified())
            .await
            .expect("node 1 issued a child within 60 s");
        let removed = nodes.root2.revoke_accessor(&parent.accessor).await.unwrap();
        revoked_with_parent += removed.saturating_sub(1);
        let mut children = Vec::new();
        for task in tasks {
            let made = tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("the issuers stop once the parent is revoked")
                .unwrap();
            children.extend(made);
        }
        assert!(!children.is_empty(), "round {round}: no child was issued");
        issued_total += children.len();
        // Every child issued is refused on both nodes, now and for good.
        for child in &children {
            for (node, anon) in [("node 1", &anon1), ("node 2", &anon2)] {
                let refused = anon.with_token(child).unwrap().lookup_self().await;
                assert!(
                    matches!(
                        refused.as_ref().map_err(|e| e.code()),
                        Err(Some(Code::Unauthenticated))
                    ),
                    "round {round}: a child of the revoked parent still works on {node}"
                );
            }
        }
    }
    println!(
        "{ROUNDS} rounds: {issued_total} children issued on node 1, \
         {revoked_with_parent} revoked with their parent on node 2, none usable after"
    );
}

/// A tree larger than one etcd transaction (128 operations; a child takes
/// three: its record, index entry and link) is revoked in several batches,
/// not refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_larger_than_one_etcd_transaction_is_revoked() {
    let etcd = EtcdCluster::start(1);
    let nodes = two_nodes(&etcd, &format!("{}/", unique("kwt")), |_| {}).await;
    let policy = unique("issuer");
    let doc = "[[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n";
    nodes.root1.policy_put(&policy, doc).await.unwrap();
    let options = || IssueOptions {
        policies: vec![policy.clone()],
        ttl: Some(Duration::from_secs(600)),
        ..IssueOptions::default()
    };
    let parent = nodes.root1.issue_token(options()).await.unwrap();
    let issuer = nodes
        .one
        .anonymous()
        .await
        .with_token(&parent.token)
        .unwrap();
    const CHILDREN: usize = 60;
    let mut children = Vec::new();
    for _ in 0..CHILDREN {
        children.push(issuer.issue_token(options()).await.unwrap().token);
    }
    let removed = nodes.root2.revoke_accessor(&parent.accessor).await.unwrap();
    assert_eq!(removed as usize, CHILDREN + 1);
    let anon2 = nodes.two.anonymous().await;
    for child in &children {
        let refused = anon2.with_token(child).unwrap().lookup_self().await;
        assert!(
            matches!(
                refused.as_ref().map_err(|e| e.code()),
                Err(Some(Code::Unauthenticated))
            ),
            "a child of the revoked parent still works"
        );
    }
}
