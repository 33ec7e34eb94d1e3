//! The token's audit HMAC kept with a verified-token cache entry (issue 11,
//! hot path): a record of a cached token always carries the HMAC `audit
//! hash` gives under the audit key of that moment, after seal and unseal and
//! after the audit key changes, and never the token itself.

use serde_json::Value;

use crate::harness::{data, unique, TestServer};
use keyward::client::{IssueOptions, PutOptions};

const GET: &str = "keyward.v1.Secrets/Get";

/// The `token` field of every Get record of `accessor`, in order.
fn get_tokens(server: &TestServer, accessor: &str) -> Vec<String> {
    std::fs::read_to_string(&server.audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["method"] == GET && r["accessor"] == accessor)
        .map(|r| r["token"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_cached_tokens_audit_hmac_is_always_the_one_audit_hash_gives_now() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("mac");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("password", "pw")]), PutOptions::default())
        .await
        .unwrap();
    let policy = unique("reader");
    root.policy_put(
        &policy,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await
    .unwrap();
    let t = root
        .issue_token(IssueOptions {
            policies: vec![policy],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let user = root.with_token(&t.token).unwrap();

    // A miss, then hits: the HMAC is computed, kept, then reused.
    for _ in 0..3 {
        user.get(&path).await.unwrap();
    }
    let first = root.audit_hash(&t.token).await.unwrap();
    assert_eq!(get_tokens(&server, &t.accessor), vec![first.clone(); 3]);

    // The audit key changes under a cached token: its next record carries
    // the HMAC under the new key, not the kept one.
    server
        .core
        .audit
        .set_hmac_key(Some(zeroize::Zeroizing::new([0x5a; 32])));
    user.get(&path).await.unwrap();
    user.get(&path).await.unwrap();
    let changed = root.audit_hash(&t.token).await.unwrap();
    assert_ne!(changed, first);
    let tokens = get_tokens(&server, &t.accessor);
    assert_eq!(tokens[3..], [changed.clone(), changed.clone()]);

    // Seal and unseal (the derived key again): hits compute it afresh.
    root.seal().await.unwrap();
    root.unseal(&server.unseal_share).await.unwrap();
    for _ in 0..3 {
        user.get(&path).await.unwrap();
    }
    let after = root.audit_hash(&t.token).await.unwrap();
    assert_eq!(after, first);
    let tokens = get_tokens(&server, &t.accessor);
    assert_eq!(tokens.len(), 8);
    assert_eq!(tokens[5..], [first.clone(), first.clone(), first.clone()]);

    let text = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(!text.contains(&t.token));
    assert!(keyward::audit::verify_file(&server.audit_path).unwrap().ok);
}

/// Two tokens of one policy, used in turn: each record carries its own
/// token's HMAC (a kept HMAC never crosses to another token).
#[tokio::test]
async fn two_cached_tokens_never_share_a_kept_hmac() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("mac2");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("password", "pw")]), PutOptions::default())
        .await
        .unwrap();
    let policy = unique("reader");
    root.policy_put(
        &policy,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await
    .unwrap();
    let opts = || IssueOptions {
        policies: vec![policy.clone()],
        ..IssueOptions::default()
    };
    let a = root.issue_token(opts()).await.unwrap();
    let b = root.issue_token(opts()).await.unwrap();
    let ua = root.with_token(&a.token).unwrap();
    let ub = root.with_token(&b.token).unwrap();
    for _ in 0..3 {
        ua.get(&path).await.unwrap();
        ub.get(&path).await.unwrap();
    }
    let ha = root.audit_hash(&a.token).await.unwrap();
    let hb = root.audit_hash(&b.token).await.unwrap();
    assert_ne!(ha, hb);
    assert_eq!(get_tokens(&server, &a.accessor), vec![ha; 3]);
    assert_eq!(get_tokens(&server, &b.accessor), vec![hb; 3]);
}
