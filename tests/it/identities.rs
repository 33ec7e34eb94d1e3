//! The identity inventory over TLS: create/get/list/update/delete, input
//! rules, authorisation, and revocation on disable, expiry and delete.

use tonic::Code;

use crate::harness::{cli, contains, data, eventually, files_under, unique, TestServer};
use crate::ident_kit::*;
use keyward::client::{Client, PutOptions};
use keyward::proto::v1::{ListIdentitiesRequest, UpdateIdentityRequest};

fn code<T: std::fmt::Debug>(r: Result<T, keyward::client::ClientError>) -> Code {
    r.unwrap_err().code().unwrap()
}

#[tokio::test]
async fn create_get_list_update_and_delete() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let a = unique("ci");
    let b = unique("bot");
    let created = root
        .identity_create(create(&a, "ci-runner", "platform", &[]))
        .await
        .unwrap();
    assert_eq!(created.kind, "ci-runner");
    assert_eq!(created.role_id.len(), 32);
    assert!(created.created_at.is_some() && created.expires_at.is_none());
    root.identity_create(create(&b, "bot", "", &[]))
        .await
        .unwrap();

    assert_eq!(
        code(root.identity_create(create(&a, "bot", "x", &[])).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            root.identity_create(create("bad/name", "bot", "x", &[]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            root.identity_create(create(&unique("k"), "robot", "x", &[]))
                .await
        ),
        Code::InvalidArgument
    );
    let no_policy = root
        .identity_create(create(&unique("p"), "bot", "x", &[unique("missing")]))
        .await
        .unwrap_err();
    assert_eq!(no_policy.code(), Some(Code::InvalidArgument), "{no_policy}");

    let got = root.identity_get(&a).await.unwrap();
    assert_eq!(got.owner, "platform");
    let names = |list: Vec<keyward::proto::v1::Identity>| -> Vec<String> {
        list.into_iter().map(|i| i.name).collect()
    };
    let all = names(
        root.identity_list(ListIdentitiesRequest::default())
            .await
            .unwrap(),
    );
    assert!(all.contains(&a) && all.contains(&b));
    let bots = names(
        root.identity_list(ListIdentitiesRequest {
            kind: "bot".into(),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    assert_eq!(bots, vec![b.clone()]);
    let unowned = names(
        root.identity_list(ListIdentitiesRequest {
            no_owner: true,
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    assert_eq!(unowned, vec![b.clone()]);
    let dormant = names(
        root.identity_list(ListIdentitiesRequest {
            dormant_seconds: 3600,
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    assert!(dormant.is_empty(), "created just now: {dormant:?}");

    let updated = root
        .identity_update(UpdateIdentityRequest {
            name: b.clone(),
            owner: Some("team-b".into()),
            description: None,
            set_policies: false,
            policies: vec![],
            expires_in_seconds: Some(7 * 86400),
        })
        .await
        .unwrap();
    assert_eq!(updated.owner, "team-b");
    assert!(updated.expires_at.is_some());

    assert_eq!(root.identity_delete(&b).await.unwrap(), 0);
    assert_eq!(code(root.identity_get(&b).await), Code::NotFound);
    assert_eq!(code(root.identity_delete(&b).await), Code::NotFound);
}

/// Logs in as a fresh identity that may read `secret/<prefix>/**`.
async fn reader(server: &TestServer, prefix: &str) -> (String, String, String, Client) {
    let root = server.root().await;
    let policy = read_policy(server, prefix).await;
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, &[policy]).await;
    let (_, client) = login(server, &role_id, &secret_id).await;
    (name, role_id, secret_id, client)
}

#[tokio::test]
async fn a_disabled_identity_s_tokens_stop_working_at_once() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("app");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("password", "pw")]), PutOptions::default())
        .await
        .unwrap();
    let (name, role_id, secret_id, client) = reader(&server, &prefix).await;
    let (_, second) = login(&server, &role_id, &secret_id).await;
    client.get(&path).await.unwrap();
    second.get(&path).await.unwrap();

    // Kept secret-ids, so the same one logs in again after the enable (a
    // plain disable revokes them: tests/it/trust_identity.rs).
    let disabled = root.identity_disable_with(&name, true).await.unwrap();
    assert!(disabled.disabled);
    for c in [&client, &second] {
        assert_eq!(code(c.get(&path).await), Code::Unauthenticated);
    }
    let anon = server.anonymous().await;
    assert_eq!(
        code(anon.login_approle(&role_id, &secret_id, 0).await),
        Code::Unauthenticated,
        "a disabled identity cannot log in"
    );
    root.identity_enable(&name).await.unwrap();
    let (_, again) = login(&server, &role_id, &secret_id).await;
    again.get(&path).await.unwrap();
    assert_eq!(
        code(client.get(&path).await),
        Code::Unauthenticated,
        "enabling does not bring old tokens back"
    );
}

#[tokio::test]
async fn deleted_and_expired_identities_lose_their_tokens() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("app");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("password", "pw")]), PutOptions::default())
        .await
        .unwrap();

    let (name, role_id, secret_id, client) = reader(&server, &prefix).await;
    client.get(&path).await.unwrap();
    assert_eq!(root.identity_delete(&name).await.unwrap(), 1);
    assert_eq!(code(client.get(&path).await), Code::Unauthenticated);
    assert_eq!(
        code(
            server
                .anonymous()
                .await
                .login_approle(&role_id, &secret_id, 0)
                .await
        ),
        Code::Unauthenticated
    );

    // A login token never outlives its identity's expiry.
    let policy = read_policy(&server, &prefix).await;
    let brief = unique("brief");
    let mut req = create(&brief, "bot", "o", &[policy]);
    // Long enough for the writes and the read before the expiry on a
    // loaded machine; the expiry itself is waited for below.
    req.expires_in_seconds = 8;
    root.identity_create(req).await.unwrap();
    let sid = root.identity_secret_id(&brief, 0, 0, &[]).await.unwrap();
    let (t, client) = login(&server, &sid.role_id, &sid.secret_id).await;
    assert!(t.expires_at.unwrap().seconds <= now_unix() + 8);
    client.get(&path).await.unwrap();
    // Waits for the expiry itself; the token ends with its identity.
    eventually("the token ends with its identity's expiry", || async {
        matches!(client.get(&path).await, Err(e) if e.code() == Some(Code::Unauthenticated))
    })
    .await;
    assert_eq!(
        code(
            server
                .anonymous()
                .await
                .login_approle(&sid.role_id, &sid.secret_id, 0)
                .await
        ),
        Code::Unauthenticated,
        "an expired identity cannot log in"
    );

    // An expiry set later, where there was none: the update revokes the
    // older tokens at once (they carry no expiry of their identity's).
    let (name, _, _, client) = reader(&server, &prefix).await;
    client.get(&path).await.unwrap();
    expire_in(&root, &name, 3600).await;
    assert_eq!(
        code(client.get(&path).await),
        Code::Unauthenticated,
        "a token from before the expiry was set still works"
    );
}

#[tokio::test]
async fn identity_calls_are_authorised_and_policies_cannot_be_widened() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let team = unique("team");
    let admin_policy = unique("idadmin");
    put_policy(
        &server,
        &admin_policy,
        &["worker", "w2", "w3"]
            .iter()
            .map(|n| {
                format!(
                    "[[rule]]\npath = \"identity/{team}-{n}\"\ncapabilities = [\"read\", \"write\", \"issue\"]\n"
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .await;
    let (role_id, secret_id) =
        approle_identity(&root, &unique("admin"), std::slice::from_ref(&admin_policy)).await;
    let (_, admin) = login(&server, &role_id, &secret_id).await;

    let mine = format!("{team}-worker");
    admin
        .identity_create(create(
            &mine,
            "workload",
            "team",
            std::slice::from_ref(&admin_policy),
        ))
        .await
        .unwrap();
    admin.identity_secret_id(&mine, 60, 1, &[]).await.unwrap();
    let other = root
        .identity_create(create(&unique("x"), "bot", "o", &[]))
        .await
        .unwrap();
    assert_eq!(
        code(admin.identity_get(&other.name).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(admin.identity_get(&unique("nonexistent")).await),
        Code::PermissionDenied,
        "a denial does not say whether the identity exists"
    );
    assert_eq!(
        code(admin.identity_delete(&mine).await),
        Code::PermissionDenied,
        "delete needs the delete capability"
    );
    assert_eq!(
        code(admin.identity_bind_cert(&mine, Some("CN=x"), None).await),
        Code::PermissionDenied,
        "binding needs admin"
    );
    let wider = unique("wide");
    put_policy(
        &server,
        &wider,
        "[[rule]]\npath = \"secret/**\"\ncapabilities = [\"read\"]\n",
    )
    .await;
    assert_eq!(
        code(
            admin
                .identity_create(create(
                    &format!("{team}-w2"),
                    "bot",
                    "o",
                    std::slice::from_ref(&wider)
                ))
                .await
        ),
        Code::PermissionDenied,
        "cannot hand out a policy the caller does not hold"
    );
    assert_eq!(
        code(
            admin
                .identity_create(create(&format!("{team}-w3"), "bot", "o", &["root".into()]))
                .await
        ),
        Code::PermissionDenied
    );
    // `issue` on an identity that holds more than the caller is no way up:
    // a secret-id for it would log in with its policies.
    let richer = format!("{team}-w3");
    root.identity_create(create(&richer, "bot", "o", &["root".into()]))
        .await
        .unwrap();
    assert_eq!(
        code(admin.identity_secret_id(&richer, 60, 1, &[]).await),
        Code::PermissionDenied,
        "a secret-id needs every policy its identity holds"
    );
    assert_eq!(
        code(server.anonymous().await.identity_get(&mine).await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn secret_ids_are_shown_once_and_never_stored_or_logged() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, &[]).await;
    let (t, _) = login(&server, &role_id, &secret_id).await;
    root.seal().await.unwrap();
    let dir = server.stop().await;
    for file in files_under(dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !contains(&bytes, secret_id.as_bytes()),
            "secret-id in {}",
            file.display()
        );
        assert!(
            !contains(&bytes, &secret_id.as_bytes()[4..]),
            "secret-id body in {}",
            file.display()
        );
        assert!(
            !contains(&bytes, t.token.as_bytes()),
            "login token in {}",
            file.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_and_login_from_the_command_line() {
    let server = TestServer::dev().await;
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.display().to_string();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
        ("KEYWARD_FORMAT", "json"),
    ];
    let name = unique("cli");
    let (status, out, err) = cli(
        &[
            "identity",
            "create",
            &name,
            "--kind",
            "ai-agent",
            "--expires",
            "30d",
        ],
        &env,
        None,
    );
    assert_eq!(status, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "ai-agent");
    assert!(v["owner"].is_null());
    let (status, _, err) = cli(
        &["identity", "create", &unique("x"), "--kind", "toaster"],
        &env,
        None,
    );
    assert_eq!(status, 1, "refused by the server: {err}");
    let (status, out, err) = cli(
        &[
            "identity",
            "secret-id",
            &name,
            "--ttl",
            "1h",
            "--uses",
            "3",
            "--cidr",
            "127.0.0.0/8",
        ],
        &env,
        None,
    );
    assert_eq!(status, 0, "{err}");
    let sid: serde_json::Value = serde_json::from_str(&out).unwrap();
    let role_id = sid["role_id"].as_str().unwrap().to_owned();
    let secret_id = sid["secret_id"].as_str().unwrap().to_owned();
    assert!(sid["expires_at"].is_string());
    let no_token = [env[0], env[1], env[3]];
    let (status, out, err) = cli(
        &[
            "login",
            "approle",
            "--role-id",
            &role_id,
            "--secret-id",
            "-",
            "--ttl",
            "15m",
        ],
        &no_token,
        Some(secret_id.as_bytes()),
    );
    assert_eq!(status, 0, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(t["token"].as_str().unwrap().starts_with("kwt_"));
    assert!(t["accessor"].is_string() && t["expires_at"].is_string());
    // An expiry brought forward logs the identity out, and says so; one
    // pushed later does neither.
    let token_env = [
        env[0],
        env[1],
        ("KEYWARD_TOKEN", t["token"].as_str().unwrap()),
        env[3],
    ];
    let (status, _, err) = cli(&["token", "lookup"], &token_env, None);
    assert_eq!(status, 0, "{err}");
    let (status, _, err) = cli(
        &["identity", "update", &name, "--expires", "60d"],
        &env,
        None,
    );
    assert_eq!(status, 0, "{err}");
    assert!(!err.contains("brought forward"), "{err}");
    let (status, _, err) = cli(&["token", "lookup"], &token_env, None);
    assert_eq!(status, 0, "a later expiry keeps the token: {err}");
    let (status, _, err) = cli(
        &["identity", "update", &name, "--expires", "1d"],
        &env,
        None,
    );
    assert_eq!(status, 0, "{err}");
    assert!(
        err.contains("brought forward, so its tokens were revoked"),
        "{err}"
    );
    let (status, _, _) = cli(&["token", "lookup"], &token_env, None);
    assert_ne!(status, 0, "the token was revoked");
    let (status, out, err) = cli(&["identity", "list", "--kind", "ai-agent"], &env, None);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains(&name));
    let (status, _, _) = cli(&["identity", "list", "--dormant", "soon"], &env, None);
    assert_eq!(status, 2, "a bad duration is a usage error");
    let (status, out, err) = cli(&["report", "--dormant-after", "1d"], &env, None);
    assert_eq!(status, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(r["identities_total"].as_u64().unwrap() >= 1);
    assert!(r["unowned"].as_array().unwrap().iter().any(|n| n == &name));
}
