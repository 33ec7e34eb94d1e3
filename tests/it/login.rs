//! Login over TLS: role-id + secret-id (TTL, uses, CIDR), client
//! certificates, OIDC/JWT with a JWKS served over HTTPS, and brute force.

use serde_json::json;
use tonic::Code;

use crate::harness::{data, eventually, unique, TestServer};
use crate::ident_kit::*;
use keyward::client::{Client, PutOptions};
use keyward::proto::v1::PutOidcIssuerRequest;

fn code<T: std::fmt::Debug>(r: Result<T, keyward::client::ClientError>) -> Code {
    r.unwrap_err().code().unwrap()
}

#[tokio::test]
async fn approle_login_gives_a_token_with_the_identity_policies() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("app");
    let policy = read_policy(&server, &prefix).await;
    root.put(
        &format!("{prefix}/db"),
        &data(&[("password", "pw")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, std::slice::from_ref(&policy)).await;
    let (t, client) = login(&server, &role_id, &secret_id).await;
    assert!(t.token.starts_with("kwt_"));
    assert_eq!(t.policies, vec![policy]);
    assert_eq!(t.identity, name);
    let got = client.get(&format!("{prefix}/db")).await.unwrap();
    assert_eq!(got.field_str("password"), Some("pw"));
    assert_eq!(
        code(client.get(&format!("{}/db", unique("other"))).await),
        Code::PermissionDenied
    );

    // The requested TTL is capped at 24 hours.
    let anon = server.anonymous().await;
    let long = anon
        .login_approle(&role_id, &secret_id, 30 * 86400)
        .await
        .unwrap();
    let left = long.expires_at.unwrap().seconds - now_unix();
    assert!(left <= 86400 + 5, "{left}");
    let short = anon.login_approle(&role_id, &secret_id, 60).await.unwrap();
    assert!(short.expires_at.unwrap().seconds - now_unix() <= 65);

    // Last use is recorded.
    let record = root.identity_get(&name).await.unwrap();
    assert!(record.last_used_at.is_some());
}

#[tokio::test]
async fn secret_id_ttl_uses_and_cidr_are_enforced() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let anon = server.anonymous().await;
    let name = unique("svc");
    root.identity_create(create(&name, "bot", "team", &[]))
        .await
        .unwrap();

    let two = root.identity_secret_id(&name, 0, 2, &[]).await.unwrap();
    for _ in 0..2 {
        anon.login_approle(&two.role_id, &two.secret_id, 0)
            .await
            .unwrap();
    }
    assert_eq!(
        code(anon.login_approle(&two.role_id, &two.secret_id, 0).await),
        Code::Unauthenticated,
        "third use of a two-use secret-id"
    );

    let elsewhere = root
        .identity_secret_id(&name, 0, 0, &["10.0.0.0/8".into()])
        .await
        .unwrap();
    assert_eq!(
        code(
            anon.login_approle(&elsewhere.role_id, &elsewhere.secret_id, 0)
                .await
        ),
        Code::Unauthenticated,
        "127.0.0.1 is outside 10.0.0.0/8"
    );
    let here = root
        .identity_secret_id(&name, 0, 0, &["127.0.0.0/8".into()])
        .await
        .unwrap();
    anon.login_approle(&here.role_id, &here.secret_id, 0)
        .await
        .unwrap();
    assert_eq!(
        code(root.identity_secret_id(&name, 0, 0, &["nope".into()]).await),
        Code::InvalidArgument
    );

    let brief = root.identity_secret_id(&name, 1, 0, &[]).await.unwrap();
    assert!(brief.expires_at.is_some());
    // Logins work until the expiry, then the first failure is the expiry's
    // (one failure: the role-id is not throttled).
    eventually("the secret-id expires", || async {
        match anon
            .login_approle(&brief.role_id, &brief.secret_id, 0)
            .await
        {
            Ok(_) => false,
            Err(e) => {
                assert_eq!(e.code(), Some(Code::Unauthenticated), "expired secret-id");
                true
            }
        }
    })
    .await;

    // A secret-id of one identity does not log in as another.
    let other = unique("other");
    root.identity_create(create(&other, "bot", "team", &[]))
        .await
        .unwrap();
    let other_role = root.identity_get(&other).await.unwrap().role_id;
    let mine = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    assert_eq!(
        code(anon.login_approle(&other_role, &mine.secret_id, 0).await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn repeated_failures_are_throttled_counted_and_audited() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let anon = server.anonymous().await;
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, &[]).await;
    let wrong = format!("kws_{}", "A".repeat(43));
    for _ in 0..5 {
        assert_eq!(
            code(anon.login_approle(&role_id, &wrong, 0).await),
            Code::Unauthenticated
        );
    }
    let locked = anon
        .login_approle(&role_id, &secret_id, 0)
        .await
        .unwrap_err();
    assert_eq!(locked.code(), Some(Code::ResourceExhausted), "{locked}");

    // Other role-ids from the same address still work (below the source limit).
    let other = unique("svc");
    let (r2, s2) = approle_identity(&root, &other, &[]).await;
    anon.login_approle(&r2, &s2, 0).await.unwrap();

    // Every attempt is in the audit log, with its outcome.
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    let logins: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("keyward.v1.Auth/Login"))
        .collect();
    assert_eq!(
        logins
            .iter()
            .filter(|l| l.contains("UNAUTHENTICATED"))
            .count(),
        5
    );
    assert_eq!(
        logins
            .iter()
            .filter(|l| l.contains("RESOURCE_EXHAUSTED"))
            .count(),
        1
    );
    assert!(!audit.contains(&secret_id), "the secret-id is never logged");
    // The successful login names the identity and its new token's accessor.
    let (t, _) = login(&server, &r2, &s2).await;
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    let record = audit
        .lines()
        .rfind(|l| l.contains("keyward.v1.Auth/Login"))
        .unwrap();
    assert!(
        record.contains(&other) && record.contains(&t.accessor) && !record.contains(&t.token),
        "{record}"
    );

    let report = root.governance_report(0, 0).await.unwrap();
    let mine: Vec<_> = report
        .failed_logins
        .iter()
        .filter(|f| f.identity == name)
        .collect();
    assert_eq!(mine.len(), 1);
    assert_eq!((mine[0].source.as_str(), mine[0].count), ("127.0.0.1", 6));
}

#[tokio::test]
async fn many_failures_from_one_address_lock_it_out() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let anon = server.anonymous().await;
    let (role_id, secret_id) = approle_identity(&root, &unique("svc"), &[]).await;
    let wrong = format!("kws_{}", "B".repeat(43));
    for i in 0..20 {
        // A different unknown role-id each time: only the source limit applies.
        assert_eq!(
            code(anon.login_approle(&format!("{:032x}", i), &wrong, 0).await),
            Code::Unauthenticated
        );
    }
    assert_eq!(
        code(anon.login_approle(&role_id, &secret_id, 0).await),
        Code::ResourceExhausted
    );
}

async fn cert_client(server: &TestServer, cn: &str, spiffe: Option<&str>) -> Client {
    let certs = keyward::pki::CertPaths::in_dir(&server.dir.path().join("certs"));
    let issuer = keyward::pki::load_issuer(&certs).unwrap();
    let (pem, key) = keyward::pki::issue_client_cert(&issuer, cn, spiffe).unwrap();
    let dir = server.dir.path().join(unique("client"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), pem).unwrap();
    std::fs::write(dir.join("k.pem"), key).unwrap();
    let mut options = server.options(None);
    options.client_cert = Some(dir.join("c.pem"));
    options.client_key = Some(dir.join("k.pem"));
    Client::connect(options).await.unwrap()
}

#[tokio::test]
async fn cert_login_by_subject_and_by_spiffe_id() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("app");
    let policy = read_policy(&server, &prefix).await;
    root.put(
        &format!("{prefix}/k"),
        &data(&[("v", "1")]),
        PutOptions::default(),
    )
    .await
    .unwrap();

    let by_dn = unique("dn");
    root.identity_create(create(
        &by_dn,
        "workload",
        "team",
        std::slice::from_ref(&policy),
    ))
    .await
    .unwrap();
    let cn = unique("host");
    root.identity_bind_cert(&by_dn, Some(&format!("CN={cn}, O=keyward dev")), None)
        .await
        .unwrap();
    let client = cert_client(&server, &cn, None).await;
    let t = client.login_cert(0).await.unwrap();
    assert_eq!(t.identity, by_dn);
    client
        .with_token(&t.token)
        .unwrap()
        .get(&format!("{prefix}/k"))
        .await
        .unwrap();

    let by_spiffe = unique("sp");
    root.identity_create(create(&by_spiffe, "workload", "team", &[]))
        .await
        .unwrap();
    let id = format!("spiffe://acme.test/{by_spiffe}");
    root.identity_bind_cert(&by_spiffe, None, Some(&id))
        .await
        .unwrap();
    let client = cert_client(&server, &unique("any"), Some(&id)).await;
    assert_eq!(client.login_cert(0).await.unwrap().identity, by_spiffe);

    // The dev client certificate is signed by the CA but bound to nobody.
    let unbound = cert_client(&server, &unique("nobody"), None).await;
    assert_eq!(code(unbound.login_cert(0).await), Code::Unauthenticated);
    // No certificate at all.
    assert_eq!(
        code(server.anonymous().await.login_cert(0).await),
        Code::Unauthenticated
    );
    // A binding taken by another identity is refused.
    // Re-binding to the same identity is idempotent.
    root.identity_bind_cert(&by_spiffe, None, Some(&id))
        .await
        .unwrap();
    assert_eq!(
        code(root.identity_bind_cert(&by_dn, None, Some(&id)).await),
        Code::AlreadyExists
    );
}

const ISSUER: &str = "https://ci.example.test";
const AUDIENCE: &str = "keyward-test";

fn claims(repo: &str, exp_in: i64) -> serde_json::Value {
    let now = now_unix();
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": format!("repo:{repo}:ref:refs/heads/main"),
           "repository": repo, "ref": "refs/heads/main", "iat": now - 5, "nbf": now - 5, "exp": now + exp_in})
}

/// An OIDC issuer whose JWKS (of `signers`) is served over HTTPS, and a
/// `ci-runner` identity bound to it by `repository` (plus `extra` claims),
/// with read on `prefix`.
struct OidcRunner {
    issuer: String,
    prefix: String,
    name: String,
    repo: String,
    _jwks: JwksServer,
}

async fn oidc_runner(
    server: &TestServer,
    root: &Client,
    signers: &[&Signer],
    extra: &[(&str, &str)],
) -> OidcRunner {
    let jwks_https = jwks_server(server, jwks(signers)).await;
    let issuer = unique("ci");
    root.oidc_issuer_put(PutOidcIssuerRequest {
        name: issuer.clone(),
        issuer_url: ISSUER.into(),
        jwks_file: String::new(),
        jwks_url: jwks_https.url.clone(),
        audience: AUDIENCE.into(),
    })
    .await
    .unwrap();
    let prefix = unique("app");
    let policy = read_policy(server, &prefix).await;
    let name = unique("runner");
    root.identity_create(create(&name, "ci-runner", "platform", &[policy]))
        .await
        .unwrap();
    let repo = format!("acme/{}", unique("repo"));
    let mut bound = vec![("repository".to_owned(), repo.clone())];
    bound.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    root.identity_bind_oidc(&name, &issuer, &bound)
        .await
        .unwrap();
    OidcRunner {
        issuer,
        prefix,
        name,
        repo,
        _jwks: jwks_https,
    }
}

#[tokio::test]
async fn oidc_login_with_jwks_over_https_and_every_refusal() {
    let server = TestServer::dev_with(|c| c.oidc.allow_private_hosts = true).await;
    let root = server.root().await;
    let anon = server.anonymous().await;
    let es = Signer::es256("k-es");
    let ed = Signer::eddsa("k-ed");
    let stranger = Signer::es256("k-stranger");
    let OidcRunner {
        issuer,
        prefix,
        name,
        repo,
        _jwks,
    } = oidc_runner(&server, &root, &[&es, &ed], &[("ref", "refs/heads/main")]).await;

    // Valid ES256 and EdDSA tokens; the keyward token dies with the JWT.
    for signer in [&es, &ed] {
        let jwt = signer.token(&claims(&repo, 120));
        let t = anon.login_oidc(&issuer, &jwt, 3600).await.unwrap();
        assert_eq!(t.identity, name);
        let exp = t.expires_at.unwrap().seconds;
        assert!(exp <= now_unix() + 121, "token outlives the JWT: {exp}");
        anon.with_token(&t.token)
            .unwrap()
            .list(&prefix)
            .await
            .unwrap();
    }

    let refused = |jwt: String| {
        let anon = anon.clone();
        let issuer = issuer.clone();
        async move { anon.login_oidc(&issuer, &jwt, 0).await.unwrap_err() }
    };
    let mut wrong_aud = claims(&repo, 120);
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims(&repo, 120);
    wrong_iss["iss"] = json!("https://evil.example.test");
    let mut bad_sig = es.token(&claims(&repo, 120));
    let last = bad_sig.pop().unwrap();
    bad_sig.push(if last == 'A' { 'B' } else { 'A' });
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes()),
        b64(claims(&repo, 120).to_string().as_bytes())
    );
    let cases = [
        ("wrong audience", es.token(&wrong_aud), "audience"),
        ("wrong issuer", es.token(&wrong_iss), "issuer"),
        ("expired", es.token(&claims(&repo, -300)), "expired"),
        ("bad signature", bad_sig, "signature"),
        (
            "mismatched bound claim",
            es.token(&claims("acme/other", 120)),
            "bound",
        ),
        ("alg none", none, "algorithm"),
        (
            "key not in the JWKS",
            stranger.token(&claims(&repo, 120)),
            "key",
        ),
    ];
    for (what, jwt, needle) in cases {
        let e = refused(jwt).await;
        assert_eq!(e.code(), Some(Code::Unauthenticated), "{what}: {e}");
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
    // An issuer that does not exist.
    assert_eq!(
        code(
            anon.login_oidc("no-such", &es.token(&claims(&repo, 60)), 0)
                .await
        ),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn oidc_issuer_with_a_jwks_file() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let ed = Signer::eddsa("file-key");
    let file = server.dir.path().join("jwks").join("jwks.json");
    std::fs::write(&file, jwks(&[&ed])).unwrap();
    let issuer = unique("file");
    root.oidc_issuer_put(PutOidcIssuerRequest {
        name: issuer.clone(),
        issuer_url: ISSUER.into(),
        jwks_file: file.display().to_string(),
        jwks_url: String::new(),
        audience: AUDIENCE.into(),
    })
    .await
    .unwrap();
    let listed = root.oidc_issuer_list().await.unwrap();
    assert!(listed.iter().any(|i| i.name == issuer));
    let name = unique("runner");
    root.identity_create(create(&name, "ci-runner", "platform", &[]))
        .await
        .unwrap();
    assert_eq!(
        code(root.identity_bind_oidc(&name, &issuer, &[]).await),
        Code::InvalidArgument,
        "a binding needs at least one claim"
    );
    root.identity_bind_oidc(&name, &issuer, &[("repository".into(), "acme/f".into())])
        .await
        .unwrap();
    let t = server
        .anonymous()
        .await
        .login_oidc(&issuer, &ed.token(&claims("acme/f", 60)), 0)
        .await
        .unwrap();
    assert_eq!(t.identity, name);
    // An http:// issuer URL and a JWKS given twice are refused.
    let bad = root
        .oidc_issuer_put(PutOidcIssuerRequest {
            name: unique("bad"),
            issuer_url: "http://ci.example.test".into(),
            jwks_file: file.display().to_string(),
            jwks_url: String::new(),
            audience: AUDIENCE.into(),
        })
        .await;
    assert_eq!(code(bad), Code::InvalidArgument);
}

/// `examples/ci_runner_token.rs`, as the README tells a CI job to run it:
/// it exchanges the job's JWT for a token, reads one secret, prints neither
/// the value nor the token, and revokes its token before it exits.
#[tokio::test]
async fn the_ci_runner_example_logs_in_reads_and_revokes_its_token() {
    let server = TestServer::dev_with(|c| c.oidc.allow_private_hosts = true).await;
    let root = server.root().await;
    let es = Signer::es256("k-example");
    let OidcRunner {
        issuer,
        prefix,
        name,
        repo,
        _jwks,
    } = oidc_runner(&server, &root, &[&es], &[]).await;
    let path = format!("{prefix}/deploy-key");
    let value = format!("deploy-key-{}", unique("v"));
    root.put(&path, &data(&[("key", &value)]), PutOptions::default())
        .await
        .unwrap();

    let jwt = es.token(&claims(&repo, 300));
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.display().to_string();
    let example = crate::plugin::example_binary("ci_runner_token");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(example)
            .arg(&path)
            .env_remove("KEYWARD_TOKEN")
            .env_remove("KEYWARD_JWT_FILE")
            .env("KEYWARD_ADDR", &addr)
            .env("KEYWARD_CACERT", &ca)
            .env("KEYWARD_OIDC_ISSUER", &issuer)
            .env("KEYWARD_JWT", &jwt)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(
        stdout.contains("version 1") && stdout.contains("\"key\""),
        "{stdout}"
    );
    assert!(stderr.contains(&format!("logged in as {name}")), "{stderr}");
    let printed = format!("{stdout}{stderr}");
    assert!(!printed.contains(&value), "the secret value was printed");
    assert!(!printed.contains("kwt_"), "a token was printed");

    // The accessor it printed names a token that is gone.
    let accessor = stderr
        .split_whitespace()
        .find(|w| w.starts_with("kwa_"))
        .expect("the example names its token's accessor");
    assert_eq!(
        code(root.lookup_accessor(accessor).await),
        Code::NotFound,
        "the example's token outlived the job"
    );
}
