//! Review of issue 10's fixes from an outsider's side: look-alike input
//! against the checks that were added (key-set hosts written as decimal,
//! octal, mapped or trailing-dot forms; key-set files reached through a
//! symlinked folder or `./`; child-token CIDRs widened through other
//! spellings of "everything"). Each test is a guard: the attack did not get
//! through when it was written.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;
use tonic::Code;

use crate::harness::{data, unique, TestServer};
use crate::ident_kit::*;
use keyward::client::{ClientError, IssueOptions, PutOptions};
use keyward::proto::v1::PutOidcIssuerRequest;

const ISSUER_URL: &str = "https://ci.example.test";
const AUDIENCE: &str = "keyward-test";

fn issuer(name: &str, jwks_file: &str, jwks_url: &str) -> PutOidcIssuerRequest {
    PutOidcIssuerRequest {
        name: name.to_owned(),
        issuer_url: ISSUER_URL.into(),
        jwks_file: jwks_file.to_owned(),
        jwks_url: jwks_url.to_owned(),
        audience: AUDIENCE.into(),
    }
}

fn claims(repo: &str) -> serde_json::Value {
    let now = now_unix();
    json!({"iss": ISSUER_URL, "aud": AUDIENCE, "sub": format!("repo:{repo}"),
           "repository": repo, "iat": now - 5, "nbf": now - 5, "exp": now + 300})
}

fn jwks_dir(server: &TestServer) -> PathBuf {
    let dir = server.dir.path().join("jwks");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TCP listener on 127.0.0.1 that counts the connections it accepts.
async fn counting_listener() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    (port, accepted, task)
}

fn assert_generic(err: &ClientError, port: u16, host: &str) {
    assert_eq!(err.code(), Some(Code::Unavailable), "{host}: {err}");
    let text = err.to_string();
    for leak in [
        port.to_string(),
        host.to_owned(),
        "https://".to_owned(),
        "loopback".to_owned(),
        "unspecified".to_owned(),
        "private".to_owned(),
    ] {
        assert!(!text.contains(&leak), "{host}: {leak:?} in {text}");
    }
}

/// Every spelling of the local host that a resolver turns into a loopback,
/// unspecified or IPv4-mapped loopback address is refused after resolution:
/// the server never connects, and the caller learns nothing about why.
#[tokio::test]
async fn key_set_host_look_alikes_of_loopback_are_refused_without_a_connection() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (port, accepted, listener) = counting_listener().await;
    let anon = server.anonymous().await;
    let jwt = Signer::es256("k").token(&claims("acme/app"));
    for host in [
        "0.0.0.0",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:127.0.0.1]",
        "2130706433",
        "0177.0.0.1",
        "0x7f000001",
        "127.1",
        "localhost",
        "localhost.",
        "LOCALHOST",
    ] {
        let name = unique("gh");
        let url = format!("https://{host}:{port}/jwks");
        if let Err(e) = root.oidc_issuer_put(issuer(&name, "", &url)).await {
            // Refused outright is as good as refused at connect time.
            assert_eq!(e.code(), Some(Code::InvalidArgument), "{host}: {e}");
            continue;
        }
        let who = unique("deploy");
        root.identity_create(create(&who, "ci-runner", "platform", &[]))
            .await
            .unwrap();
        root.identity_bind_oidc(&who, &name, &[("repository".into(), "acme/app".into())])
            .await
            .unwrap();
        let err = anon.login_oidc(&name, &jwt, 0).await.unwrap_err();
        assert_generic(&err, port, host);
    }
    listener.abort();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the server connected to a loopback look-alike"
    );
}

fn write_jwks(path: &Path, signers: &[&Signer]) -> String {
    std::fs::write(path, jwks(signers)).unwrap();
    path.display().to_string()
}

/// A key set file reached through a folder inside `oidc.jwks_dir` that is a
/// symbolic link out of it, or named with `.`/`./`/trailing-slash forms, is
/// refused; `./x.json` of a real file inside is the same file and is fine.
#[tokio::test]
async fn a_symlinked_folder_or_dot_forms_do_not_lead_out_of_the_jwks_dir() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let dir = jwks_dir(&server);
    let outside_dir = server.dir.path().join(unique("outside"));
    std::fs::create_dir_all(&outside_dir).unwrap();
    write_jwks(&outside_dir.join("evil.json"), &[&Signer::eddsa("k")]);
    std::os::unix::fs::symlink(&outside_dir, dir.join("sub")).unwrap();
    // A link to the folder itself, from inside: resolves to the folder.
    std::os::unix::fs::symlink(&dir, dir.join("self")).unwrap();

    for path in [
        "sub/evil.json".to_owned(),
        "./sub/evil.json".to_owned(),
        dir.join("sub/evil.json").display().to_string(),
        ".".to_owned(),
        "./".to_owned(),
        "self".to_owned(),
        "self/".to_owned(),
        format!("{}/", dir.display()),
        format!("{}/.", dir.display()),
        "sub".to_owned(),
    ] {
        let err = root
            .oidc_issuer_put(issuer("gh", &path, ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{path}: {err}");
        assert!(
            !err.to_string().contains(&outside_dir.display().to_string()),
            "{path}: the real path outside is named: {err}"
        );
    }
    assert!(root.oidc_issuer_list().await.unwrap().is_empty());

    let key = Signer::eddsa("k");
    write_jwks(&dir.join("gh.json"), &[&key]);
    for path in ["./gh.json", "self/gh.json"] {
        root.oidc_issuer_put(issuer("gh", path, "")).await.unwrap();
    }
}

/// A child token bound to "everything" however it is spelt, or to the IPv6
/// forms around the IPv4-mapped space, is refused under a parent bound to
/// 127.0.0.0/8; the mapped spelling of the parent's own block is accepted.
#[tokio::test]
async fn a_child_cannot_widen_its_binding_with_other_spellings_of_everything() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("wide");
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
    let issue = |cidrs: &[&str]| IssueOptions {
        policies: vec![policy.clone()],
        cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
        ..IssueOptions::default()
    };
    let parent = root.issue_token(issue(&["127.0.0.0/8"])).await.unwrap();
    let parent = root.with_token(&parent.token).unwrap();

    for wide in [
        &["0.0.0.0/0"][..],
        &["::/0"],
        &["::ffff:0:0/96"],
        &["::ffff:0.0.0.0/96"],
        &["::ffff:127.0.0.0/95"],
        &["::/96"],
        &["::127.0.0.1/128"],
        &["::1/128"],
        &["127.0.0.0/8", "10.0.0.0/8"],
        &["127.0.0.0/7"],
    ] {
        let err = parent
            .issue_token(issue(wide))
            .await
            .expect_err("a child wider than its parent");
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{wide:?}: {err}");
    }
    for bad in ["127.0.0.1/+8", "127.0.0.1/08x", "0177.0.0.1/32", "127.1/32"] {
        let err = parent.issue_token(issue(&[bad])).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{bad}: {err}");
    }
    let same = parent
        .issue_token(issue(&["0:0:0:0:0:ffff:7f00:0/104"]))
        .await
        .unwrap();
    let same = root.with_token(&same.token).unwrap();
    assert_eq!(same.lookup_self().await.unwrap().cidrs, ["127.0.0.0/8"]);
    same.get(&path).await.unwrap();
}

/// The Watch budget is per identity, and every token the root token issues
/// (and their children) has the identity `root`. So one low-privileged
/// token handed out by an operator with `keyward token issue` used up the
/// budget of the root token itself and of every other tenant's root-issued
/// token: a cross-tenant denial of service. The budget of the root lineage
/// is counted per token issued by root (its children share it), so a holder
/// of one such token exhausts only its own.
#[tokio::test]
async fn a_root_issued_token_cannot_use_up_the_watch_budget_of_other_root_issued_tokens() {
    let server = TestServer::dev_with(|c| c.server_limits.max_watch_per_identity = 2).await;
    let root = server.root().await;
    let prefix = unique("watched");
    let policy = unique("watcher");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n\n\
             [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    let issue = || IssueOptions {
        policies: vec![policy.clone()],
        ..IssueOptions::default()
    };
    let attacker = root.issue_token(issue()).await.unwrap();
    let attacker = root.with_token(&attacker.token).unwrap();
    let tenant = root.issue_token(issue()).await.unwrap();
    let tenant = root.with_token(&tenant.token).unwrap();

    let _a1 = attacker.watch(&[], &[&prefix]).await.unwrap();
    let _a2 = attacker.watch(&[], &[&prefix]).await.unwrap();
    let refused = attacker.watch(&[], &[&prefix]).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
    // A child of the attacker's token shares its budget (no dodge).
    let child = attacker.issue_token(issue()).await.unwrap();
    let child = root.with_token(&child.token).unwrap();
    let refused = child.watch(&[], &[&prefix]).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");

    let _t = tenant
        .watch(&[], &[&prefix])
        .await
        .expect("another root-issued token is not counted against the attacker's");
    let _r = root
        .watch(&[], &[&prefix])
        .await
        .expect("the root token is not counted against the attacker's");
}

/// Listing under a denied folder through look-alike prefixes (a trailing
/// slash, doubled slashes, `.` segments, a prefix cut inside the folder's
/// name, other case, the root) never names a path under the denied folder;
/// whatever each answers, the hidden names are not in it.
#[tokio::test]
async fn look_alike_list_prefixes_do_not_reveal_names_under_a_denied_folder() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let app = unique("app");
    let open = format!("{app}/db");
    let hidden = [
        format!("{app}/admin/root-password"),
        format!("{app}/admin/deep/er/key"),
        format!("{app}/x/admin/k"),
    ];
    for path in std::iter::once(&open).chain(&hidden) {
        root.put(path, &data(&[("v", "x")]), PutOptions::default())
            .await
            .unwrap();
    }
    let policy = unique("no-admin");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"secret/{app}/**\"\ncapabilities = [\"read\", \"list\"]\n\n\
             [[rule]]\npath = \"secret/{app}/admin/**\"\ncapabilities = [\"deny\"]\n\n\
             [[rule]]\npath = \"secret/{app}/*/admin/**\"\ncapabilities = [\"deny\"]\n"
        ),
    )
    .await
    .unwrap();
    let token = root
        .issue_token(IssueOptions {
            policies: vec![policy],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let user = root.with_token(&token.token).unwrap();
    assert_eq!(user.list(&app).await.unwrap(), std::slice::from_ref(&open));
    for prefix in [
        format!("{app}/"),
        format!("{app}/admin/"),
        format!("{app}//admin"),
        format!("{app}/./admin"),
        format!("{app}/admin/."),
        format!("{app}/ad"),
        format!("{app}/ADMIN"),
        format!("{app}/x"),
        format!("{app}/x/admin"),
        format!("/{app}"),
        format!("secret/{app}"),
        String::new(),
        "/".to_owned(),
        "*".to_owned(),
        "**".to_owned(),
    ] {
        if let Ok(listed) = user.list(&prefix).await {
            for path in &hidden {
                assert!(!listed.contains(path), "{prefix:?} listed {path}");
            }
        }
    }
}

/// A rotation policy set by a token the root token issued records the
/// setter `root` and the policies that token held; each run checks those
/// policies as they stand, never whether the token is still alive. So a
/// leaked token, used to point a plugin at a secret it could read, keeps
/// the broker handing that secret to the plugin on every run after the
/// operator revoked the token (the documented answer to a leak). An
/// inventory identity is covered (disable it); the root lineage is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_root_issued_setter_no_longer_has_references_read() {
    use crate::trust_rotation::{spec, AdminReference};
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin_value = "db-admin-password-AFTER-REVOKE";
    let AdminReference {
        shared,
        plugin,
        provider,
    } = AdminReference::start(&root, admin_value).await;
    let own = unique("own");
    let policy = unique("setter");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"secret/{own}/**\"\ncapabilities = [\"read\", \"write\"]\n\n\
             [[rule]]\npath = \"rotation/{own}/**\"\ncapabilities = [\"read\", \"write\", \"rotate\"]\n\n\
             [[rule]]\npath = \"secret/{shared}\"\ncapabilities = [\"read\"]\n"
        ),
    )
    .await
    .unwrap();
    let leaked = root
        .issue_token(IssueOptions {
            policies: vec![policy],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let attacker = root.with_token(&leaked.token).unwrap();
    let mine = format!("{own}/app");
    attacker
        .put(&mine, &data(&[("password", "m-1")]), PutOptions::default())
        .await
        .unwrap();
    attacker
        .set_rotation_policy(&mine, &spec(&provider, &[("admin", &shared)]))
        .await
        .unwrap();

    // The operator finds the leak and revokes the token.
    root.revoke_accessor(&leaked.accessor).await.unwrap();
    let run = root.rotate(&mine, true).await;
    assert!(
        !plugin.received(admin_value),
        "the broker handed the plugin a secret on a revoked token's authority: {run:?}"
    );
}

/// The root token's own policies keep running after the operator revokes
/// it (as they should once setup is done): a `root`-policy token's
/// authority is the vault's, not the token's, so no accessor is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_by_the_root_token_survives_its_revocation() {
    use crate::trust_rotation::{spec, step_messages, AdminReference};
    let server = TestServer::dev().await;
    let root = server.root().await;
    // A second root-policy token that is not the root token's child (a
    // revoke takes the children with it).
    let (role_id, secret_id) =
        approle_identity(&root, &unique("operator"), &["root".to_owned()]).await;
    let (_, operator) = login(&server, &role_id, &secret_id).await;
    let admin_value = "db-admin-password-ROOT-SET";
    let AdminReference {
        shared,
        plugin,
        provider,
    } = AdminReference::start(&root, admin_value).await;
    let mine = format!("{}/app", unique("own"));
    root.put(&mine, &data(&[("password", "m-1")]), PutOptions::default())
        .await
        .unwrap();
    root.set_rotation_policy(&mine, &spec(&provider, &[("admin", &shared)]))
        .await
        .unwrap();

    let root_accessor = root.lookup_self().await.unwrap().accessor;
    operator.revoke_accessor(&root_accessor).await.unwrap();
    assert!(
        root.lookup_self().await.is_err(),
        "the root token is revoked"
    );
    let run = operator.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "succeeded", "{:?}", step_messages(&run));
    assert!(plugin.received(admin_value));
}

/// A root-issued setter whose token expires stops the reads just as a
/// revoked one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_root_issued_setter_no_longer_has_references_read() {
    use crate::harness::eventually;
    use crate::trust_rotation::{spec, step_messages, AdminReference};
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin_value = "db-admin-password-AFTER-EXPIRY";
    let AdminReference {
        shared,
        plugin,
        provider,
    } = AdminReference::start(&root, admin_value).await;
    let own = unique("own");
    let policy = unique("setter");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"secret/{own}/**\"\ncapabilities = [\"read\", \"write\"]\n\n\
             [[rule]]\npath = \"rotation/{own}/**\"\ncapabilities = [\"read\", \"write\", \"rotate\"]\n\n\
             [[rule]]\npath = \"secret/{shared}\"\ncapabilities = [\"read\"]\n"
        ),
    )
    .await
    .unwrap();
    let short = root
        .issue_token(IssueOptions {
            policies: vec![policy],
            ttl: Some(std::time::Duration::from_secs(3)),
            max_ttl: Some(std::time::Duration::from_secs(3)),
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let setter = root.with_token(&short.token).unwrap();
    let mine = format!("{own}/app");
    setter
        .put(&mine, &data(&[("password", "m-1")]), PutOptions::default())
        .await
        .unwrap();
    setter
        .set_rotation_policy(&mine, &spec(&provider, &[("admin", &shared)]))
        .await
        .unwrap();

    let accessor = short.accessor.clone();
    eventually("the setter token expires", || {
        let root = root.clone();
        let accessor = accessor.clone();
        async move { root.lookup_accessor(&accessor).await.is_err() }
    })
    .await;
    let run = root.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "failed", "{:?}", step_messages(&run));
    let messages = step_messages(&run).join("\n");
    assert!(
        messages.contains(&format!(
            "the token that set this policy (accessor {accessor}) was revoked or has expired; set the policy again"
        )),
        "{messages}"
    );
    assert!(!plugin.received(admin_value));
}
