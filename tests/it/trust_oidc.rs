//! OIDC issuers from an attacker's side (issue 10, items 3 and 11): an
//! issuer admin who holds nothing else cannot take over the identities bound
//! to its issuer, nor make the server open any file; a login cannot make the
//! server connect into its own network, probe ports, open a connection per
//! attempt, or hang on a FIFO.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tonic::Code;

use crate::harness::{data, unique, TestServer};
use crate::ident_kit::*;
use keyward::client::{Client, ClientError, PutOptions};
use keyward::proto::v1::PutOidcIssuerRequest;

const ISSUER_URL: &str = "https://ci.example.test";
const AUDIENCE: &str = "keyward-test";
const REPO: &str = "acme/app";

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.unwrap_err().code().unwrap()
}

fn claims(repo: &str) -> serde_json::Value {
    let now = now_unix();
    json!({"iss": ISSUER_URL, "aud": AUDIENCE, "sub": format!("repo:{repo}"),
           "repository": repo, "iat": now - 5, "nbf": now - 5, "exp": now + 300})
}

fn issuer(name: &str, jwks_file: &str, jwks_url: &str) -> PutOidcIssuerRequest {
    PutOidcIssuerRequest {
        name: name.to_owned(),
        issuer_url: ISSUER_URL.into(),
        jwks_file: jwks_file.to_owned(),
        jwks_url: jwks_url.to_owned(),
        audience: AUDIENCE.into(),
    }
}

/// The dev server's `oidc.jwks_dir` (`DIR/jwks/`); made here too, so the
/// tests run unchanged against a server that has none.
fn jwks_dir(server: &TestServer) -> PathBuf {
    let dir = server.dir.path().join("jwks");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_jwks(path: &Path, signers: &[&Signer]) -> String {
    std::fs::write(path, jwks(signers)).unwrap();
    path.display().to_string()
}

/// A policy of `rules` (path, capability), stored under a random name.
async fn policy(server: &TestServer, rules: &[(&str, &str)]) -> String {
    let name = unique("p");
    let toml: String = rules
        .iter()
        .map(|(path, cap)| format!("[[rule]]\npath = \"{path}\"\ncapabilities = [\"{cap}\"]\n"))
        .collect();
    put_policy(server, &name, &toml).await;
    name
}

/// A client logged in as a new identity holding exactly `policies`.
async fn caller(server: &TestServer, root: &Client, policies: &[String]) -> Client {
    let (role_id, secret_id) = approle_identity(root, &unique("caller"), policies).await;
    login(server, &role_id, &secret_id).await.1
}

/// The operator's set-up: a `prod-read` identity `deploy` bound to issuer
/// `gh` (claim repository=acme/app), whose key set is `issuer_source`.
async fn bound_identity(server: &TestServer, root: &Client, gh: PutOidcIssuerRequest) -> String {
    root.oidc_issuer_put(gh.clone()).await.unwrap();
    let prod_read = policy(server, &[("secret/prod/**", "read")]).await;
    root.identity_create(create(
        "deploy",
        "ci-runner",
        "platform",
        std::slice::from_ref(&prod_read),
    ))
    .await
    .unwrap();
    root.identity_bind_oidc("deploy", &gh.name, &[("repository".into(), REPO.into())])
        .await
        .unwrap();
    prod_read
}

#[tokio::test]
async fn an_issuer_admin_cannot_swap_the_key_set_of_identities_it_does_not_hold() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let dir = jwks_dir(&server);
    let (operator_key, attacker_key) = (Signer::es256("ops"), Signer::es256("evil"));
    let operator_file = write_jwks(&dir.join("gh.json"), &[&operator_key]);
    // A key set the attacker controls, in the folder (another issuer's file,
    // say): the folder is the operator's, the key set is not.
    let attacker_file = write_jwks(&dir.join("other.json"), &[&attacker_key]);
    let prod_read = bound_identity(&server, &root, issuer("gh", &operator_file, "")).await;
    root.put(
        "prod/db",
        &data(&[("password", "s3cret")]),
        PutOptions::default(),
    )
    .await
    .unwrap();

    // The attacker: admin on sys/oidc-issuer/gh and nothing else.
    let gh_admin = policy(&server, &[("sys/oidc-issuer/gh", "admin")]).await;
    let attacker = caller(&server, &root, std::slice::from_ref(&gh_admin)).await;
    for (what, change) in [
        ("key set file", issuer("gh", &attacker_file, "")),
        (
            "key set URL",
            issuer("gh", "", "https://attacker.example/jwks"),
        ),
        (
            "audience",
            PutOidcIssuerRequest {
                audience: "attacker".into(),
                ..issuer("gh", &operator_file, "")
            },
        ),
        (
            "issuer URL",
            PutOidcIssuerRequest {
                issuer_url: "https://attacker.example".into(),
                ..issuer("gh", &operator_file, "")
            },
        ),
    ] {
        assert_eq!(
            code(attacker.oidc_issuer_put(change).await),
            Code::PermissionDenied,
            "{what}"
        );
    }
    // Putting the issuer exactly as it is changes nothing and is allowed.
    attacker
        .oidc_issuer_put(issuer("gh", &operator_file, ""))
        .await
        .unwrap();

    // The forged JWT does not log in; the operator's key still does.
    let anon = server.anonymous().await;
    let forged = attacker_key.token(&claims(REPO));
    assert_eq!(
        code(anon.login_oidc("gh", &forged, 0).await),
        Code::Unauthenticated
    );
    let real = anon
        .login_oidc("gh", &operator_key.token(&claims(REPO)), 0)
        .await
        .unwrap();
    assert_eq!(real.identity, "deploy");

    // Whoever holds the bound identity's policies too may change the issuer.
    let both = caller(&server, &root, &[gh_admin, prod_read]).await;
    both.oidc_issuer_put(issuer("gh", &attacker_file, ""))
        .await
        .unwrap();
    let listed = root.oidc_issuer_list().await.unwrap();
    let gh = listed.iter().find(|i| i.name == "gh").unwrap();
    assert!(gh.jwks_file.ends_with("other.json"), "{gh:?}");
}

#[tokio::test]
async fn an_issuer_admin_cannot_make_the_server_open_any_path() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let dir = jwks_dir(&server);
    let gh_admin = policy(&server, &[("sys/oidc-issuer/gh", "admin")]).await;
    let admin = caller(&server, &root, &[gh_admin]).await;
    let outside = server.dir.path().join("outside.json");
    write_jwks(&outside, &[&Signer::eddsa("k")]);
    std::os::unix::fs::symlink(&outside, dir.join("link.json")).unwrap();

    for path in [
        "/etc/passwd".to_owned(),
        "../x".to_owned(),
        "../outside.json".to_owned(),
        format!("{}/../outside.json", dir.display()),
        outside.display().to_string(),
        dir.join("link.json").display().to_string(),
    ] {
        let err = admin
            .oidc_issuer_put(issuer("gh", &path, ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{path}: {err}");
        assert!(err.to_string().contains("oidc.jwks_dir"), "{path}: {err}");
    }
    assert!(root.oidc_issuer_list().await.unwrap().is_empty());

    // A file in the folder, named relative to it or in full, is fine.
    let inside = write_jwks(&dir.join("gh.json"), &[&Signer::eddsa("k")]);
    admin
        .oidc_issuer_put(issuer("gh", "gh.json", ""))
        .await
        .unwrap();
    admin
        .oidc_issuer_put(issuer("gh", &inside, ""))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_server_without_a_jwks_dir_refuses_key_set_files() {
    let server = TestServer::dev_with(|c| c.oidc.jwks_dir = None).await;
    let root = server.root().await;
    let file = write_jwks(&jwks_dir(&server).join("gh.json"), &[&Signer::eddsa("k")]);
    let err = root
        .oidc_issuer_put(issuer("gh", &file, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("oidc.jwks_dir"), "{err}");
}

/// A TCP listener on 127.0.0.1 that counts the connections it accepts and
/// drops each (so a TLS handshake with it fails).
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

/// What a login against a key set that cannot be had must look like: the
/// issuer is unavailable, and nothing says where or why.
fn assert_generic(err: &ClientError, port: u16) {
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    let text = err.to_string();
    for leak in [
        "127.0.0.1".to_owned(),
        port.to_string(),
        "https://".to_owned(),
        "TLS".to_owned(),
        "refused".to_owned(),
        "connect".to_owned(),
    ] {
        assert!(!text.contains(&leak), "{leak:?} in {text}");
    }
}

#[tokio::test]
async fn a_loopback_key_set_host_is_refused_without_a_connection() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (port, accepted, listener) = counting_listener().await;
    let url = format!("https://127.0.0.1:{port}/jwks");
    bound_identity(&server, &root, issuer("gh", "", &url)).await;
    let anon = server.anonymous().await;
    let jwt = Signer::es256("k").token(&claims(REPO));
    for _ in 0..3 {
        let err = anon.login_oidc("gh", &jwt, 0).await.unwrap_err();
        assert_generic(&err, port);
    }
    listener.abort();
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "the server connected");
}

#[tokio::test]
async fn failed_key_set_fetches_back_off() {
    let server = TestServer::dev_with(|c| c.oidc.allow_private_hosts = true).await;
    let root = server.root().await;
    let (port, accepted, listener) = counting_listener().await;
    let url = format!("https://127.0.0.1:{port}/jwks");
    bound_identity(&server, &root, issuer("gh", "", &url)).await;
    let anon = server.anonymous().await;
    let jwt = Signer::es256("k").token(&claims(REPO));
    const LOGINS: u32 = 8;
    let started = Instant::now();
    for _ in 0..LOGINS {
        let err = anon.login_oidc("gh", &jwt, 0).await.unwrap_err();
        assert_generic(&err, port);
    }
    let elapsed = started.elapsed();
    listener.abort();
    // The back-off is 5 s, then 10, 20, ...: however slow this machine, no
    // more connections than back-offs that could have ended meanwhile (one,
    // unless the logins took over 5 s).
    let mut allowed = 1;
    let (mut waited, mut backoff) = (Duration::ZERO, Duration::from_secs(5));
    while waited + backoff <= elapsed {
        waited += backoff;
        backoff *= 2;
        allowed += 1;
    }
    let made = accepted.load(Ordering::SeqCst);
    assert!(
        made >= 1 && made <= allowed,
        "{made} connections for {LOGINS} logins in {elapsed:?}"
    );
}

#[tokio::test]
async fn a_key_set_file_swapped_for_a_fifo_fails_instead_of_hanging() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let dir = jwks_dir(&server);
    let file = dir.join("gh.json");
    let key = Signer::es256("k");
    bound_identity(
        &server,
        &root,
        issuer("gh", &write_jwks(&file, &[&key]), ""),
    )
    .await;
    // The file is replaced by a FIFO nobody writes to: opening it for
    // reading would block for ever.
    std::fs::remove_file(&file).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&file)
        .status()
        .unwrap();
    assert!(made.success());

    let anon = server.anonymous().await;
    let jwt = key.token(&claims(REPO));
    let login = anon.login_oidc("gh", &jwt, 0);
    let Ok(result) = tokio::time::timeout(Duration::from_secs(60), login).await else {
        // Let a reader stuck in open(2) go (a writer ends its wait), so the
        // test fails here instead of hanging the runtime's shutdown.
        std::thread::spawn(move || std::fs::OpenOptions::new().write(true).open(&file));
        panic!("the login hung on the FIFO");
    };
    let err = result.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(!err.to_string().contains("gh.json"), "{err}");
}
