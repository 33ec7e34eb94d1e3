//! A child token's CIDR binding is never wider than its parent's, across
//! address families too: an IPv4-mapped block is normalised
//! (`::ffff:127.0.0.0/104` is `127.0.0.0/8`), and the wide mapped form
//! `::ffff:127.0.0.0/8`, the IPv6 block `::/8` that holds `::1`, is not within
//! an IPv4 binding.

use tonic::Code;

use crate::harness::{data, unique, TestServer};
use keyward::client::{IssueOptions, PutOptions};

#[tokio::test]
async fn a_child_cannot_widen_its_binding_through_an_ipv4_mapped_block() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("mapped");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await
        .unwrap();
    let policy = unique("reader");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    let issue = |cidr: &str| IssueOptions {
        policies: vec![policy.clone()],
        cidrs: vec![cidr.to_owned()],
        ..IssueOptions::default()
    };
    let parent = root.issue_token(issue("127.0.0.0/8")).await.unwrap();
    let parent = root.with_token(&parent.token).unwrap();

    let err = parent
        .issue_token(issue("::ffff:127.0.0.0/8"))
        .await
        .expect_err("a child bound to ::/8 under a parent bound to 127.0.0.0/8");
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    let err = parent.issue_token(issue("::1/128")).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    // The narrow mapped form is the IPv4 block, stored and enforced as such.
    let child = parent
        .issue_token(issue("::ffff:127.0.0.1/128"))
        .await
        .unwrap();
    let child = root.with_token(&child.token).unwrap();
    assert_eq!(child.lookup_self().await.unwrap().cidrs, ["127.0.0.1/32"]);
    child.get(&path).await.unwrap();
    let wider = parent
        .issue_token(issue("::ffff:127.0.0.0/104"))
        .await
        .unwrap();
    let wider = root.with_token(&wider.token).unwrap();
    assert_eq!(wider.lookup_self().await.unwrap().cidrs, ["127.0.0.0/8"]);
    wider.get(&path).await.unwrap();
}
