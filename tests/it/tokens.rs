//! Tokens over TLS: each property (expiry, max TTL, renew, uses, CIDR, the
//! subset rule, cascade revoke, revoke by accessor), self-service, restart,
//! and the audit record naming identity and accessor.

use std::time::Duration;

use serde_json::Value;
use tonic::Code;

use crate::harness::{cli, data, eventually, unique, TestServer};
use keyward::client::{Client, ClientError, IssueOptions, PutOptions};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.expect_err("the call should have been refused")
        .code()
        .expect("a server status, not a local error")
}

fn opts(policies: &[&str]) -> IssueOptions {
    IssueOptions {
        policies: policies.iter().map(|p| p.to_string()).collect(),
        ..IssueOptions::default()
    }
}

fn secs(ts: &Option<prost_types::Timestamp>) -> i64 {
    ts.as_ref().expect("a timestamp").seconds
}

/// Puts a policy that reads `secret/<prefix>/**` and may issue tokens.
async fn reader_policy(root: &Client, prefix: &str) -> String {
    let name = unique("reader");
    root.policy_put(
        &name,
        &format!(
            "[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\", \"list\"]\n\
             [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    name
}

#[tokio::test]
async fn a_token_expires_and_is_swept() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("exp");
    let policy = reader_policy(&root, &prefix).await;
    // Long enough for the lookup below on a loaded machine; the refusal
    // after it is waited for.
    let issued = root
        .issue_token(IssueOptions {
            ttl: Some(Duration::from_secs(6)),
            ..opts(&[&policy])
        })
        .await
        .unwrap();
    assert!(issued.token.starts_with("kwt_"));
    assert!(issued.accessor.starts_with("kwa_"));
    assert_eq!(issued.policies, vec![policy.clone()]);
    let user = root.with_token(&issued.token).unwrap();
    let me = user.lookup_self().await.unwrap();
    assert_eq!(me.accessor, issued.accessor);
    assert_eq!(me.method, "token");
    // Expiry is checked on use...
    eventually("the token is refused", || async {
        matches!(user.lookup_self().await, Err(e) if e.code() == Some(Code::Unauthenticated))
    })
    .await;
    // ... and the sweeper removes the record.
    let second = root
        .issue_token(IssueOptions {
            ttl: Some(Duration::from_secs(1)),
            ..opts(&[&policy])
        })
        .await
        .unwrap();
    eventually("the sweeper removed the record", || async {
        matches!(root.lookup_accessor(&second.accessor).await, Err(e) if e.code() == Some(Code::NotFound))
    })
    .await;
    // Gone from storage, not only refused: the record and its index entry.
    // (Nothing uses the second token, so only the sweeper can remove them.)
    let barrier = &server.core.barrier;
    eventually("the record and its index entry are deleted", || async {
        let record = barrier
            .get(&format!("tokens/accessor/{}", second.accessor))
            .unwrap();
        let indexed = barrier
            .scan_keys("tokens/ttl/")
            .unwrap()
            .iter()
            .any(|k| k.ends_with(&second.accessor));
        record.is_none() && !indexed
    })
    .await;
}

#[tokio::test]
async fn renew_extends_but_never_past_max_ttl() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let policy = reader_policy(&root, &unique("renew")).await;
    let issued = root
        .issue_token(IssueOptions {
            ttl: Some(Duration::from_secs(60)),
            max_ttl: Some(Duration::from_secs(600)),
            ..opts(&[&policy])
        })
        .await
        .unwrap();
    let user = root.with_token(&issued.token).unwrap();
    let before = user.lookup_self().await.unwrap();
    let renewed = user
        .renew_self(Some(Duration::from_secs(300)))
        .await
        .unwrap();
    assert!(secs(&renewed.expires_at) >= secs(&before.expires_at) + 200);
    assert!(secs(&renewed.expires_at) < secs(&before.max_expires_at));
    let capped = user
        .renew_self(Some(Duration::from_secs(86_400)))
        .await
        .unwrap();
    assert_eq!(
        capped.expires_at, before.max_expires_at,
        "renew stops at the max TTL"
    );
    assert_eq!(secs(&before.max_expires_at) - secs(&before.created_at), 600);
}

#[tokio::test]
async fn uses_run_out() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("uses");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await
        .unwrap();
    let policy = reader_policy(&root, &prefix).await;
    let issued = root
        .issue_token(IssueOptions {
            uses: 3,
            ..opts(&[&policy])
        })
        .await
        .unwrap();
    let user = root.with_token(&issued.token).unwrap();
    assert_eq!(user.lookup_self().await.unwrap().uses_left, 2);
    user.get(&path).await.unwrap();
    user.get(&path).await.unwrap();
    assert_eq!(code(user.get(&path).await), Code::Unauthenticated);
    assert_eq!(
        code(root.lookup_accessor(&issued.accessor).await),
        Code::NotFound
    );
}

#[tokio::test]
async fn cidr_binding_follows_the_source_address() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("cidr");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await
        .unwrap();
    let policy = reader_policy(&root, &prefix).await;
    let elsewhere = root
        .issue_token(IssueOptions {
            cidrs: vec!["10.0.0.0/8".into()],
            ..opts(&[&policy])
        })
        .await
        .unwrap();
    let err = root
        .with_token(&elsewhere.token)
        .unwrap()
        .get(&path)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    assert!(err.to_string().contains("source address"), "{err}");
    let here = root
        .issue_token(IssueOptions {
            cidrs: vec!["127.0.0.1/32".into()],
            ..opts(&[&policy])
        })
        .await
        .unwrap();
    let user = root.with_token(&here.token).unwrap();
    user.get(&path).await.unwrap();
    assert_eq!(
        user.lookup_self().await.unwrap().cidrs,
        vec!["127.0.0.1/32"]
    );
    // A child cannot widen the binding.
    assert_eq!(
        code(
            user.issue_token(IssueOptions {
                cidrs: vec!["0.0.0.0/0".into()],
                ..opts(&[&policy])
            })
            .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            root.issue_token(IssueOptions {
                cidrs: vec!["not-a-cidr".into()],
                ..opts(&[&policy])
            })
            .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn a_child_holds_only_policies_of_its_parent() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let a = reader_policy(&root, &unique("a")).await;
    let b = reader_policy(&root, &unique("b")).await;
    let parent = root.issue_token(opts(&[&a])).await.unwrap();
    let parent = root.with_token(&parent.token).unwrap();
    let err = parent.issue_token(opts(&[&a, &b])).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(err.to_string().contains(&b), "{err}");
    assert_eq!(
        code(parent.issue_token(opts(&["root"])).await),
        Code::PermissionDenied
    );
    let child = parent.issue_token(opts(&[&a])).await.unwrap();
    assert_eq!(child.policies, vec![a.clone()]);
    // Root may issue anything that exists.
    root.issue_token(opts(&[&a, &b])).await.unwrap();
    assert_eq!(
        code(root.issue_token(opts(&[&unique("nope")])).await),
        Code::InvalidArgument
    );
    // Without `issue` on sys/token a token cannot issue at all.
    let name = unique("plain");
    root.policy_put(
        &name,
        "[[rule]]\npath = \"secret/x/**\"\ncapabilities = [\"read\"]\n",
    )
    .await
    .unwrap();
    let plain = root.issue_token(opts(&[&name])).await.unwrap();
    assert_eq!(
        code(
            root.with_token(&plain.token)
                .unwrap()
                .issue_token(opts(&[&name]))
                .await
        ),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn revoking_a_token_revokes_its_children() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let p = reader_policy(&root, &unique("tree")).await;
    let parent = root.issue_token(opts(&[&p])).await.unwrap();
    let parent_c = root.with_token(&parent.token).unwrap();
    let child = parent_c.issue_token(opts(&[&p])).await.unwrap();
    let child_c = root.with_token(&child.token).unwrap();
    let grandchild = child_c.issue_token(opts(&[&p])).await.unwrap();
    let grandchild_c = root.with_token(&grandchild.token).unwrap();
    let sibling = root.issue_token(opts(&[&p])).await.unwrap();
    assert_eq!(
        grandchild_c.lookup_self().await.unwrap().parent_accessor,
        child.accessor
    );
    // A parent may act on its descendants by accessor, without a capability.
    parent_c
        .lookup_accessor(&grandchild.accessor)
        .await
        .unwrap();
    assert_eq!(parent_c.revoke_self().await.unwrap(), 3);
    for c in [&parent_c, &child_c, &grandchild_c] {
        assert_eq!(code(c.lookup_self().await), Code::Unauthenticated);
    }
    root.with_token(&sibling.token)
        .unwrap()
        .lookup_self()
        .await
        .unwrap();
}

#[tokio::test]
async fn revoke_and_lookup_by_accessor() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let p = reader_policy(&root, &unique("acc")).await;
    let victim = root.issue_token(opts(&[&p])).await.unwrap();
    let other = root.issue_token(opts(&[&p])).await.unwrap();
    let other_c = root.with_token(&other.token).unwrap();
    // Another token without rights on sys/token: the same refusal for a
    // real accessor and a made-up one.
    let real = other_c.lookup_accessor(&victim.accessor).await.unwrap_err();
    let fake = other_c
        .lookup_accessor("kwa_000000000000000000000000")
        .await
        .unwrap_err();
    assert_eq!(real.code(), Some(Code::PermissionDenied));
    assert_eq!(real.to_string(), fake.to_string());
    assert_eq!(
        code(other_c.revoke_accessor(&victim.accessor).await),
        Code::PermissionDenied
    );
    // A token pasted into the accessor field is refused without being
    // echoed into the message (nor, through it, into the audit log).
    let pasted = root.lookup_accessor(&other.token).await.unwrap_err();
    assert_eq!(pasted.code(), Some(Code::InvalidArgument));
    assert!(
        !pasted.to_string().contains(&other.token[4..20]),
        "{pasted}"
    );
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(!audit.contains(&other.token[4..20]));
    // Root looks up and revokes by accessor.
    let info = root.lookup_accessor(&victim.accessor).await.unwrap();
    assert_eq!(info.policies, vec![p.clone()]);
    assert_eq!(root.revoke_accessor(&victim.accessor).await.unwrap(), 1);
    assert_eq!(
        code(root.with_token(&victim.token).unwrap().lookup_self().await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(root.revoke_accessor(&victim.accessor).await),
        Code::NotFound
    );
    // Whoever holds a token's text may look it up or revoke it.
    let held = root.issue_token(opts(&[&p])).await.unwrap();
    assert_eq!(
        other_c.lookup_token(&held.token).await.unwrap().accessor,
        held.accessor
    );
    assert_eq!(other_c.revoke_token(&held.token).await.unwrap(), 1);
    assert_eq!(
        code(other_c.lookup_accessor("not-an-accessor").await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn root_token_survives_a_restart() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("restart");
    root.put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await
        .unwrap();
    let p = reader_policy(&root, &path).await;
    let child = root
        .issue_token(IssueOptions {
            ttl: Some(Duration::from_secs(3600)),
            ..opts(&[&p])
        })
        .await
        .unwrap();
    let token = server.root_token.clone();
    drop(root);
    let server = server.restart().await;
    assert_eq!(server.root_token, token);
    let root = server.root().await;
    root.get(&path).await.unwrap();
    let me = root.lookup_self().await.unwrap();
    assert_eq!(me.identity, "root");
    assert_eq!(me.policies, vec!["root"]);
    assert!(me.expires_at.is_none(), "the root token never expires");
    root.with_token(&child.token)
        .unwrap()
        .lookup_self()
        .await
        .unwrap();
}

#[tokio::test]
async fn audit_records_name_identity_and_accessor() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("aud");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await
        .unwrap();
    let p = reader_policy(&root, &prefix).await;
    let issued = root.issue_token(opts(&[&p])).await.unwrap();
    let user = root.with_token(&issued.token).unwrap();
    user.get(&path).await.unwrap();
    let _ = user
        .put(&path, &data(&[("k", "w")]), PutOptions::default())
        .await;
    let text = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(!text.contains(&issued.token), "token text in the audit log");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["accessor"] == issued.accessor.as_str())
        .filter(|r: &Value| r["phase"] != "request")
        .collect();
    let get = records
        .iter()
        .find(|r| r["method"] == "keyward.v1.Secrets/Get")
        .expect("the get is audited under the token's accessor");
    assert_eq!(get["identity"], "root");
    assert_eq!(get["outcome"], "allowed");
    assert_eq!(get["resource"], format!("secret/{path}"));
    let put = records
        .iter()
        .find(|r| r["method"] == "keyward.v1.Secrets/Put")
        .expect("the refused put is audited");
    assert_eq!(put["code"], "PERMISSION_DENIED");
    assert_eq!(put["outcome"], "denied");
    let issue = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["method"] == "keyward.v1.Auth/IssueToken" && r["phase"] != "request")
        .unwrap();
    assert_eq!(issue["resource"], format!("sys/token/{}", issued.accessor));
}

#[tokio::test]
async fn login_without_a_method_is_refused() {
    let server = TestServer::dev().await;
    let mut client =
        keyward::proto::v1::auth_client::AuthClient::new(server.anonymous().await.channel());
    let err = client
        .login(keyward::proto::v1::LoginRequest::default())
        .await
        .unwrap_err();
    // Login itself is tested in tests/it/login.rs.
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_commands_print_json() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let p = reader_policy(&root, &unique("cli")).await;
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = |token: &str| {
        vec![
            ("KEYWARD_ADDR", addr.clone()),
            ("KEYWARD_CACERT", ca.clone()),
            ("KEYWARD_TOKEN", token.to_owned()),
        ]
    };
    let run = |args: &[&str], token: &str| {
        let env = env(token);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        tokio::task::block_in_place(|| cli(args, &env, None))
    };
    let (status, out, err) = run(
        &[
            "token",
            "issue",
            "--policy",
            &p,
            "--ttl",
            "15m",
            "--max-ttl",
            "1h",
            "--uses",
            "5",
            "--cidr",
            "127.0.0.1/32",
            "--format",
            "json",
        ],
        &server.root_token,
    );
    assert_eq!(status, 0, "{err}");
    let issued: Value = serde_json::from_str(&out).unwrap();
    let keys: Vec<&String> = issued.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["accessor", "expires_at", "policies", "token"]);
    let token = issued["token"].as_str().unwrap().to_owned();
    let (status, out, err) = run(&["token", "lookup", "--format", "json"], &token);
    assert_eq!(status, 0, "{err}");
    let me: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(me["accessor"], issued["accessor"]);
    assert_eq!(me["uses_left"], 4);
    let (status, out, _) = run(
        &["token", "renew", "--increment", "30m", "--format", "json"],
        &token,
    );
    assert_eq!(status, 0);
    assert!(serde_json::from_str::<Value>(&out).unwrap()["expires_at"].is_string());
    let (status, _, err) = run(&["token", "issue", "--policy", &p, "--ttl", "15x"], &token);
    assert_eq!(status, 2, "a bad duration is a usage error");
    assert!(err.contains("90s, 15m, 1h, 30d"), "{err}");
    let (status, out, _) = run(
        &[
            "token",
            "revoke",
            "--accessor",
            issued["accessor"].as_str().unwrap(),
            "--format",
            "json",
        ],
        &server.root_token,
    );
    assert_eq!(status, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["revoked"], 1);
    let (status, _, _) = run(&["token", "lookup"], &token);
    assert_eq!(status, 1);
    // The root token is untouched (the global --token/KEYWARD_TOKEN is not
    // taken for the TOKEN argument).
    let (status, out, err) = run(&["token", "lookup", "--format", "json"], &server.root_token);
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["identity"],
        "root"
    );
    // A token given by its text.
    let other = root
        .issue_token(IssueOptions {
            policies: vec![p.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let (status, out, err) = run(
        &["token", "lookup", &other.token, "--format", "json"],
        &server.root_token,
    );
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["accessor"],
        other.accessor.as_str()
    );
    let (status, out, _) = run(
        &["token", "revoke", &other.token, "--format", "json"],
        &server.root_token,
    );
    assert_eq!(status, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["revoked"], 1);
    root.lookup_self().await.unwrap();
}
