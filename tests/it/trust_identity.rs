//! Issue 10, items 4, 5 and 8, from the attacker's side: a certificate whose
//! one CN holds a comma does not pass for a two-attribute subject; a caller
//! with `write` on an identity but not its policies cannot enable it or
//! extend its life; a disable kills the secret-ids for good; secret-ids can
//! be listed (accessors only) and revoked one by one, bindings removed one
//! by one; a role-id's failures from one source do not lock out another,
//! and a burst of failures cannot get more attempts past the check than the
//! limit.

use std::net::IpAddr;

use serde_json::Value;
use tonic::Code;

use crate::harness::{cli, data, unique, TestServer};
use crate::ident_kit::{approle_identity, create, jwks, login, now_unix, put_policy, Signer};
use keyward::client::{Client, IssueOptions, PutOptions};
use keyward::proto::v1::auth_client::AuthClient;
use keyward::proto::v1::login_request::Method;
use keyward::proto::v1::unbind_request::Binding;
use keyward::proto::v1::{AppRoleLogin, LoginRequest, PutOidcIssuerRequest, UpdateIdentityRequest};

fn code<T: std::fmt::Debug>(r: Result<T, keyward::client::ClientError>) -> Code {
    r.expect_err("expected a refusal").code().unwrap()
}

/// A client holding a token with only `policies` (what the attacker has).
async fn caller_with(server: &TestServer, policies: &[&str]) -> Client {
    let root = server.root().await;
    let t = root
        .issue_token(IssueOptions {
            policies: policies.iter().map(|p| (*p).to_owned()).collect(),
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    server.anonymous().await.with_token(&t.token).unwrap()
}

/// A client certificate with exactly the subject `dn` (as rcgen writes the
/// attributes: one RDN each, in order), signed by the dev CA.
async fn client_with_subject(server: &TestServer, dn: &[(rcgen::DnType, &str)]) -> Client {
    let certs = keyward::pki::CertPaths::in_dir(&server.dir.path().join("certs"));
    let issuer = keyward::pki::load_issuer(&certs).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut name = rcgen::DistinguishedName::new();
    for (ty, value) in dn {
        name.push(ty.clone(), *value);
    }
    params.distinguished_name = name;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let dir = server.dir.path().join(unique("client"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
    let mut options = server.options(None);
    options.client_cert = Some(dir.join("c.pem"));
    options.client_key = Some(dir.join("k.pem"));
    Client::connect(options).await.unwrap()
}

#[tokio::test]
async fn a_comma_inside_a_common_name_does_not_forge_a_subject() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let name = unique("web");
    root.identity_create(create(&name, "workload", "team", &[]))
        .await
        .unwrap();
    let cn = unique("web");
    root.identity_bind_cert(&name, Some(&format!("CN={cn},O=acme")), None)
        .await
        .unwrap();

    // One CN attribute whose value is "web-...,O=acme".
    let forged = format!("{cn},O=acme");
    let attacker = client_with_subject(&server, &[(rcgen::DnType::CommonName, &forged)]).await;
    assert_eq!(
        code(attacker.login_cert(0).await),
        Code::Unauthenticated,
        "a certificate with one CN holding a comma logged in as {name}"
    );

    // The real two-attribute subject, in either order, does log in.
    let real = client_with_subject(
        &server,
        &[
            (rcgen::DnType::OrganizationName, "acme"),
            (rcgen::DnType::CommonName, &cn),
        ],
    )
    .await;
    assert_eq!(real.login_cert(0).await.unwrap().identity, name);

    // A binding may name such a value on purpose, escaped as RFC 4514 says,
    // and then matches only that certificate.
    let odd = unique("odd");
    root.identity_create(create(&odd, "workload", "team", &[]))
        .await
        .unwrap();
    let shown = root
        .identity_bind_cert(&odd, Some(&format!("CN={cn}\\,O=acme")), None)
        .await
        .unwrap();
    assert_eq!(
        shown.cert_bindings[0].subject,
        format!("CN={cn}\\,O=acme"),
        "get shows the escaped form"
    );
    assert_eq!(attacker.login_cert(0).await.unwrap().identity, odd);
    assert_eq!(real.login_cert(0).await.unwrap().identity, name);
}

/// An identity holding a secret-reading policy, and a caller with `write`
/// (and `read`) on `identity/<name>` but not that policy.
async fn guarded_identity(server: &TestServer) -> (String, String, Client) {
    let root = server.root().await;
    let prefix = unique("app");
    let secret_policy = unique("secret-read");
    put_policy(
        server,
        &secret_policy,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    root.put(
        &format!("{prefix}/db"),
        &data(&[("password", "hunter2")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let name = unique("svc");
    let writer_policy = unique("identity-writer");
    put_policy(
        server,
        &writer_policy,
        &format!("[[rule]]\npath = \"identity/{name}\"\ncapabilities = [\"read\", \"write\"]\n"),
    )
    .await;
    let mut request = create(&name, "service-account", "team", &[secret_policy]);
    request.expires_in_seconds = 3600;
    root.identity_create(request).await.unwrap();
    let writer = caller_with(server, &[&writer_policy]).await;
    (name, prefix, writer)
}

#[tokio::test]
async fn enabling_or_extending_an_identity_needs_its_policies() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (name, _prefix, writer) = guarded_identity(&server).await;

    // `write` still disables (it only takes access away) ...
    assert!(writer.identity_disable(&name).await.unwrap().disabled);
    // ... but enabling gives the identity's policies back: refused.
    assert_eq!(
        code(writer.identity_enable(&name).await),
        Code::PermissionDenied
    );
    assert!(root.identity_get(&name).await.unwrap().disabled);
    root.identity_enable(&name).await.unwrap();

    let expires = |seconds: u64| UpdateIdentityRequest {
        name: name.clone(),
        expires_in_seconds: Some(seconds),
        ..UpdateIdentityRequest::default()
    };
    // Moving the expiry later, or removing it, is refused; earlier is fine.
    assert_eq!(
        code(writer.identity_update(expires(30 * 24 * 3600)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(writer.identity_update(expires(0)).await),
        Code::PermissionDenied,
        "never expiring is later than any expiry"
    );
    let before = root.identity_get(&name).await.unwrap().expires_at.unwrap();
    let sooner = writer.identity_update(expires(600)).await.unwrap();
    assert!(sooner.expires_at.unwrap().seconds < before.seconds);
    // The holder of the policies may extend it.
    root.identity_update(expires(30 * 24 * 3600)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disable_revokes_secret_ids_for_good_unless_kept() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let name = unique("svc");
    let (role_id, leaked) = approle_identity(&root, &name, &[]).await;
    login(&server, &role_id, &leaked).await;

    root.identity_disable(&name).await.unwrap();
    assert!(root.identity_secret_ids(&name).await.unwrap().is_empty());
    root.identity_enable(&name).await.unwrap();
    let anon = server.anonymous().await;
    assert_eq!(
        code(anon.login_approle(&role_id, &leaked, 0).await),
        Code::Unauthenticated,
        "the leaked secret-id came back to life with the enable"
    );

    // --keep-secret-ids (through the CLI): it works again after the enable.
    let kept = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let (status, out, err) = run_cli(
        &server,
        &["identity", "disable", &name, "--keep-secret-ids"],
    );
    assert_eq!(status, 0, "{out}{err}");
    assert_eq!(
        code(anon.login_approle(&role_id, &kept.secret_id, 0).await),
        Code::Unauthenticated,
        "disabled"
    );
    root.identity_enable(&name).await.unwrap();
    anon.login_approle(&role_id, &kept.secret_id, 0)
        .await
        .unwrap();
}

fn run_cli(server: &TestServer, args: &[&str]) -> (i32, String, String) {
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
        ("KEYWARD_FORMAT", "json"),
    ];
    tokio::task::block_in_place(|| cli(args, &env, None))
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_ids_are_listed_by_accessor_and_revoked_one_by_one() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let name = unique("svc");
    let (role_id, first) = approle_identity(&root, &name, &[]).await;
    let second = root
        .identity_secret_id(&name, 3600, 3, &["127.0.0.0/8".to_owned()])
        .await
        .unwrap();

    let (status, out, err) = run_cli(&server, &["identity", "secret-id", "list", &name]);
    assert_eq!(status, 0, "{out}{err}");
    assert!(
        !out.contains(&first) && !out.contains(&second.secret_id) && !out.contains("kws_"),
        "a secret-id value is listed: {out}"
    );
    let listed: Value = serde_json::from_str(&out).unwrap();
    let items = listed["secret_ids"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{out}");
    let limited = items
        .iter()
        .find(|i| i["uses_left"] == 3)
        .unwrap_or_else(|| panic!("{out}"));
    assert!(limited["expires_at"].is_string() && limited["cidrs"][0] == "127.0.0.0/8");
    let accessor = limited["accessor"].as_str().unwrap().to_owned();
    assert!(accessor.starts_with("sid_"), "{accessor}");

    // Revoking that one: it no longer logs in, the other still does.
    let (status, out, err) = run_cli(
        &server,
        &[
            "identity",
            "secret-id",
            "revoke",
            &name,
            "--accessor",
            &accessor,
        ],
    );
    assert_eq!(status, 0, "{out}{err}");
    let anon = server.anonymous().await;
    assert_eq!(
        code(anon.login_approle(&role_id, &second.secret_id, 0).await),
        Code::Unauthenticated
    );
    anon.login_approle(&role_id, &first, 0).await.unwrap();
    assert_eq!(root.identity_secret_ids(&name).await.unwrap().len(), 1);
    assert_eq!(
        code(root.identity_revoke_secret_id(&name, &accessor).await),
        Code::NotFound
    );
    // Creating a secret-id by name keeps working beside the subcommands.
    let (status, out, err) = run_cli(&server, &["identity", "secret-id", &name, "--uses", "1"]);
    assert_eq!(status, 0, "{out}{err}");
    assert!(out.contains("kws_"), "{out}");

    // Listing needs `read` on the identity; revoking needs `write`.
    let reader = unique("reader");
    put_policy(
        &server,
        &reader,
        &format!("[[rule]]\npath = \"identity/{name}\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    let reader = caller_with(&server, &[&reader]).await;
    let seen = reader.identity_secret_ids(&name).await.unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        code(
            reader
                .identity_revoke_secret_id(&name, &seen[0].accessor)
                .await
        ),
        Code::PermissionDenied
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unbind_removes_one_certificate_or_oidc_binding() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let name = unique("wl");
    root.identity_create(create(&name, "workload", "team", &[]))
        .await
        .unwrap();
    let cn = unique("host");
    let spiffe = format!("spiffe://acme.test/{name}");
    root.identity_bind_cert(&name, Some(&format!("CN={cn},O=acme")), None)
        .await
        .unwrap();
    root.identity_bind_cert(&name, None, Some(&spiffe))
        .await
        .unwrap();
    let by_dn = client_with_subject(
        &server,
        &[
            (rcgen::DnType::OrganizationName, "acme"),
            (rcgen::DnType::CommonName, &cn),
        ],
    )
    .await;
    assert_eq!(by_dn.login_cert(0).await.unwrap().identity, name);

    // Another spelling of the same DN names the binding (CLI).
    let (status, out, err) = run_cli(
        &server,
        &[
            "identity",
            "unbind",
            &name,
            "--cert-subject",
            &format!("O=acme, CN={cn}"),
        ],
    );
    assert_eq!(status, 0, "{out}{err}");
    assert_eq!(code(by_dn.login_cert(0).await), Code::Unauthenticated);
    let left = root.identity_get(&name).await.unwrap().cert_bindings;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].spiffe_id, spiffe);
    assert_eq!(
        code(
            root.identity_unbind(&name, Binding::CertSubject(format!("CN={cn},O=acme")))
                .await
        ),
        Code::NotFound
    );

    // SPIFFE: a caller with only `write` on the identity may unbind.
    let writer = unique("writer");
    put_policy(
        &server,
        &writer,
        &format!("[[rule]]\npath = \"identity/{name}\"\ncapabilities = [\"write\"]\n"),
    )
    .await;
    let writer = caller_with(&server, &[&writer]).await;
    let certs = keyward::pki::CertPaths::in_dir(&server.dir.path().join("certs"));
    let issuer = keyward::pki::load_issuer(&certs).unwrap();
    let (pem, key) =
        keyward::pki::issue_client_cert(&issuer, &unique("any"), Some(&spiffe)).unwrap();
    let dir = server.dir.path().join(unique("spiffe"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), pem).unwrap();
    std::fs::write(dir.join("k.pem"), key).unwrap();
    let mut options = server.options(None);
    options.client_cert = Some(dir.join("c.pem"));
    options.client_key = Some(dir.join("k.pem"));
    let by_spiffe = Client::connect(options).await.unwrap();
    assert_eq!(by_spiffe.login_cert(0).await.unwrap().identity, name);
    writer
        .identity_unbind(&name, Binding::CertSpiffe(spiffe.clone()))
        .await
        .unwrap();
    assert_eq!(code(by_spiffe.login_cert(0).await), Code::Unauthenticated);

    // OIDC: every binding to the issuer goes.
    let signer = Signer::eddsa("unbind-key");
    let jwks_dir = server.dir.path().join("jwks");
    std::fs::create_dir_all(&jwks_dir).unwrap();
    let file = jwks_dir.join(format!("{}.json", unique("keys")));
    std::fs::write(&file, jwks(&[&signer])).unwrap();
    let issuer_name = unique("ci");
    root.oidc_issuer_put(PutOidcIssuerRequest {
        name: issuer_name.clone(),
        issuer_url: "https://ci.example.test".into(),
        jwks_file: file.display().to_string(),
        jwks_url: String::new(),
        audience: "keyward-test".into(),
    })
    .await
    .unwrap();
    let repo = unique("acme/repo");
    root.identity_bind_oidc(&name, &issuer_name, &[("repository".into(), repo.clone())])
        .await
        .unwrap();
    let now = now_unix();
    let jwt = signer.token(&serde_json::json!({
        "iss": "https://ci.example.test", "aud": "keyward-test", "sub": "job",
        "repository": repo, "iat": now - 5, "nbf": now - 5, "exp": now + 300
    }));
    let anon = server.anonymous().await;
    assert_eq!(
        anon.login_oidc(&issuer_name, &jwt, 0)
            .await
            .unwrap()
            .identity,
        name
    );
    let (status, out, err) = run_cli(
        &server,
        &["identity", "unbind", &name, "--oidc-issuer", &issuer_name],
    );
    assert_eq!(status, 0, "{out}{err}");
    assert_eq!(
        code(anon.login_oidc(&issuer_name, &jwt, 0).await),
        Code::Unauthenticated
    );
    assert!(root
        .identity_get(&name)
        .await
        .unwrap()
        .oidc_bindings
        .is_empty());
}

/// A raw gRPC `Auth.Login` from the local address `from` (any 127.0.0.0/8
/// address reaches a server on 127.0.0.1): what another host would be.
async fn approle_from(
    server: &TestServer,
    from: IpAddr,
    role_id: &str,
    secret_id: &str,
) -> Result<(), tonic::Status> {
    let ca = std::fs::read(&server.ca).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .local_address(Some(from))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    AuthClient::new(channel)
        .login(LoginRequest {
            method: Some(Method::Approle(AppRoleLogin {
                role_id: role_id.to_owned(),
                secret_id: secret_id.to_owned(),
            })),
            ttl_seconds: 0,
        })
        .await
        .map(|_| ())
}

fn wrong_secret_id() -> String {
    format!("kws_{}", "Q".repeat(43))
}

#[tokio::test]
async fn failures_from_one_source_do_not_lock_out_another() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, &[]).await;
    let a: IpAddr = "127.0.0.1".parse().unwrap();
    let b: IpAddr = "127.0.0.2".parse().unwrap();

    // The attacker at A knows the role-id and fails until locked out.
    for _ in 0..5 {
        let refused = approle_from(&server, a, &role_id, &wrong_secret_id()).await;
        assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
    }
    let locked = approle_from(&server, a, &role_id, &secret_id).await;
    assert_eq!(locked.unwrap_err().code(), Code::ResourceExhausted);

    // The service at B, which never failed, still logs in.
    approle_from(&server, b, &role_id, &secret_id)
        .await
        .unwrap_or_else(|s| panic!("B is locked out by A's failures: {s:?}"));

    // Governance still counts A's failures under the identity and A.
    let report = root.governance_report(0, 0).await.unwrap();
    assert!(report
        .failed_logins
        .iter()
        .any(|f| f.identity == name && f.source == "127.0.0.1" && f.count == 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_failures_gets_no_more_attempts_than_the_limit() {
    const LIMIT: usize = 5;
    const BURST: usize = 48;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (role_id, secret_id) = approle_identity(&root, &unique("svc"), &[]).await;
    // Several connections, so the attempts arrive on several server tasks.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(server.anonymous().await);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(BURST));
    let mut tasks = Vec::new();
    for i in 0..BURST {
        let client = clients[i % clients.len()].clone();
        let role_id = role_id.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            client
                .login_approle(&role_id, &wrong_secret_id(), 0)
                .await
                .unwrap_err()
                .code()
                .unwrap()
        }));
    }
    let mut checked = 0;
    let mut locked = 0;
    for task in tasks {
        match task.await.unwrap() {
            Code::Unauthenticated => checked += 1,
            Code::ResourceExhausted => locked += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (checked, locked),
        (LIMIT, BURST - LIMIT),
        "attempts past the check vs. refused"
    );
    assert_eq!(
        code(
            server
                .anonymous()
                .await
                .login_approle(&role_id, &secret_id, 0)
                .await
        ),
        Code::ResourceExhausted
    );
}
