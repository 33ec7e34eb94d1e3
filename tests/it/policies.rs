//! Policies over TLS: storage and the built-in root, each rule (globs `*` and
//! `**`, deny wins, no leak between paths sharing a prefix), a denial that
//! does not reveal whether a path exists, and changes taking effect at once.

use serde_json::Value;
use tonic::Code;

use crate::harness::{cli, data, unique, TestServer};
use keyward::client::{Client, ClientError, IssueOptions, PutOptions};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.expect_err("the call should have been refused")
        .code()
        .expect("a server status, not a local error")
}

/// A client whose token holds only the policy `document` (under a fresh name).
async fn holder(root: &Client, document: &str) -> (String, Client) {
    let name = unique("p");
    root.policy_put(&name, document).await.unwrap();
    let issued = root
        .issue_token(IssueOptions {
            policies: vec![name.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    (name, root.with_token(&issued.token).unwrap())
}

async fn seed(root: &Client, paths: &[&str]) {
    for p in paths {
        root.put(p, &data(&[("k", "v")]), PutOptions::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn put_get_list_delete_and_the_builtin_root() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let name = unique("pol");
    let doc = "[[rule]]\npath = \"secret/app/**\"\ncapabilities = [\"read\", \"list\"]\n";
    assert_eq!(root.policy_put(&name, doc).await.unwrap(), 1);
    let got = root.policy_get(&name).await.unwrap();
    assert!(got.contains("secret/app/**"), "{got}");
    let names = root.policy_list().await.unwrap();
    assert_eq!(names[0], "root");
    assert!(names.contains(&name));
    assert!(root.policy_get("root").await.unwrap().contains("secret/**"));
    assert_eq!(
        code(root.policy_put("root", doc).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(root.policy_delete("root").await),
        Code::InvalidArgument
    );
    root.policy_delete(&name).await.unwrap();
    assert_eq!(code(root.policy_get(&name).await), Code::NotFound);
    assert_eq!(code(root.policy_delete(&name).await), Code::NotFound);
    // A broken document names the rule.
    let err = root
        .policy_put(
            &name,
            "[[rule]]\npath = \"secret/a\"\ncapabilities = [\"read\"]\n[[rule]]\npath = \"secret/b\"\ncapabilities = [\"fly\"]\n",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("rule 2"), "{err}");
    assert_eq!(
        code(root.policy_put("Bad/Name", doc).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn single_and_multi_segment_globs() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let a = unique("g");
    let one = format!("{a}/svc1/config");
    let deep = format!("{a}/svc1/x/config");
    let team = format!("{a}-team/x/y/z");
    seed(&root, &[&one, &deep, &team]).await;
    let (_, user) = holder(
        &root,
        &format!(
            "[[rule]]\npath = \"secret/{a}/*/config\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"secret/{a}-team/**\"\ncapabilities = [\"read\", \"list\"]\n"
        ),
    )
    .await;
    user.get(&one).await.unwrap();
    assert_eq!(
        code(user.get(&deep).await),
        Code::PermissionDenied,
        "* is one segment"
    );
    user.get(&team).await.unwrap();
    user.list(&format!("{a}-team")).await.unwrap();
    assert_eq!(code(user.list(&a).await), Code::PermissionDenied);
    assert_eq!(
        code(
            user.put(&one, &data(&[("k", "w")]), PutOptions::default())
                .await
        ),
        Code::PermissionDenied,
        "read does not imply write"
    );
}

#[tokio::test]
async fn an_explicit_deny_wins() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let a = unique("d");
    let open = format!("{a}/payments/api");
    let admin = format!("{a}/payments/admin/key");
    seed(&root, &[&open, &admin]).await;
    // Deny in the same policy...
    let (_, user) = holder(
        &root,
        &format!(
            "[[rule]]\npath = \"secret/{a}/payments/**\"\ncapabilities = [\"read\", \"list\"]\n\
             [[rule]]\npath = \"secret/{a}/payments/admin/*\"\ncapabilities = [\"deny\"]\n"
        ),
    )
    .await;
    user.get(&open).await.unwrap();
    assert_eq!(code(user.get(&admin).await), Code::PermissionDenied);
    // ... and in another policy of the same token, even alongside root.
    let grant = unique("grant");
    root.policy_put(
        &grant,
        &format!("[[rule]]\npath = \"secret/{a}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await
    .unwrap();
    let deny = unique("deny");
    root.policy_put(
        &deny,
        &format!("[[rule]]\npath = \"secret/{a}/payments/admin/**\"\ncapabilities = [\"deny\"]\n"),
    )
    .await
    .unwrap();
    for policies in [
        vec![grant.clone(), deny.clone()],
        vec!["root".into(), deny.clone()],
    ] {
        let t = root
            .issue_token(IssueOptions {
                policies,
                ..IssueOptions::default()
            })
            .await
            .unwrap();
        let c = root.with_token(&t.token).unwrap();
        c.get(&open).await.unwrap();
        assert_eq!(code(c.get(&admin).await), Code::PermissionDenied);
    }
}

#[tokio::test]
async fn no_leak_between_paths_that_share_a_prefix() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let a = unique("leak");
    let db = format!("{a}/db");
    let db_admin = format!("{a}/db-admin");
    let under = format!("{a}/db/replica");
    seed(&root, &[&db, &db_admin, &under]).await;
    let (_, user) = holder(
        &root,
        &format!(
            "[[rule]]\npath = \"secret/{a}/db\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"secret/{a}/db/**\"\ncapabilities = [\"read\"]\n"
        ),
    )
    .await;
    user.get(&db).await.unwrap();
    user.get(&under).await.unwrap();
    assert_eq!(code(user.get(&db_admin).await), Code::PermissionDenied);
    assert_eq!(code(user.metadata(&db_admin).await), Code::PermissionDenied);
}

#[tokio::test]
async fn a_denial_does_not_reveal_whether_the_path_exists() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let a = unique("hidden");
    let present = format!("{a}/present");
    let absent = format!("{a}/absent");
    seed(&root, &[&present]).await;
    let (_, user) = holder(
        &root,
        "[[rule]]\npath = \"secret/elsewhere/**\"\ncapabilities = [\"read\"]\n",
    )
    .await;
    let a1 = user.get(&present).await.unwrap_err();
    let a2 = user.get(&absent).await.unwrap_err();
    assert_eq!(a1.code(), Some(Code::PermissionDenied));
    assert_eq!((a1.code(), a1.to_string()), (a2.code(), a2.to_string()));
    let m1 = user.metadata(&present).await.unwrap_err();
    let m2 = user.metadata(&absent).await.unwrap_err();
    assert_eq!((m1.code(), m1.to_string()), (m2.code(), m2.to_string()));
    let p1 = user.policy_get("root").await.unwrap_err();
    let p2 = user.policy_get(&unique("none")).await.unwrap_err();
    assert_eq!((p1.code(), p1.to_string()), (p2.code(), p2.to_string()));
    // Root sees the difference.
    assert_eq!(code(root.get(&absent).await), Code::NotFound);
}

#[tokio::test]
async fn a_policy_change_applies_to_live_tokens_at_once() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("live");
    seed(&root, &[&path]).await;
    let (name, user) = holder(
        &root,
        &format!("[[rule]]\npath = \"secret/{path}\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    user.get(&path).await.unwrap();
    root.policy_put(
        &name,
        &format!("[[rule]]\npath = \"secret/{path}\"\ncapabilities = [\"list\"]\n"),
    )
    .await
    .unwrap();
    assert_eq!(code(user.get(&path).await), Code::PermissionDenied);
    root.policy_put(
        &name,
        &format!("[[rule]]\npath = \"secret/{path}\"\ncapabilities = [\"read\"]\n"),
    )
    .await
    .unwrap();
    user.get(&path).await.unwrap();
    root.policy_delete(&name).await.unwrap();
    assert_eq!(code(user.get(&path).await), Code::PermissionDenied);
    // Sys and policy resources are checked too.
    assert_eq!(code(user.rotate_key().await), Code::PermissionDenied);
    assert_eq!(code(user.policy_list().await), Code::PermissionDenied);
    // Its own token stays manageable with no policy at all.
    user.lookup_self().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_commands_print_json() {
    let server = TestServer::dev().await;
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(args, &env, None));
    let name = unique("clipol");
    let file = server.dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "[[rule]]\npath = \"secret/app/payments/**\"\ncapabilities = [\"read\", \"list\"]\n",
    )
    .unwrap();
    let (status, out, err) = run(&[
        "policy",
        "put",
        &name,
        file.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(status, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["rules"].as_u64()),
        (Some(name.as_str()), Some(1))
    );
    let (status, out, _) = run(&["policy", "get", &name, "--format", "json"]);
    assert_eq!(status, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["document"]
        .as_str()
        .unwrap()
        .contains("secret/app/payments/**"));
    let (status, out, _) = run(&["policy", "list", "--format", "json"]);
    assert_eq!(status, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n == name.as_str()));
    let (status, _, _) = run(&["policy", "delete", &name, "--format", "json"]);
    assert_eq!(status, 0);
    let (status, _, _) = run(&["policy", "get", &name]);
    assert_eq!(status, 1);
    let (status, _, _) = run(&["policy", "put", &name, "/nonexistent/file.toml"]);
    assert_eq!(status, 2);
}
