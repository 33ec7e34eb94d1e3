//! Vault's `auth/token/*` and login endpoints over HTTPS: envelopes,
//! status codes, and tokens shared with gRPC both ways.

use keyward::client::{Client, IssueOptions};
use serde_json::json;

use super::harness::{unique, TestServer};
use super::http_client::HttpClient;
use super::ident_kit::{approle_identity, put_policy};

#[tokio::test]
async fn token_create_lookup_renew_revoke() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = Some(server.root_token.as_str());
    let a = http
        .call("POST", "/v1/auth/token/create", root, Some(json!({"policies": ["root"], "ttl": "1h", "num_uses": 0, "renewable": true, "type": "service", "display_name": "x"})))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let auth = &a.json["auth"];
    let child = auth["client_token"].as_str().unwrap().to_owned();
    let accessor = auth["accessor"].as_str().unwrap().to_owned();
    assert!(child.starts_with("kwt_"));
    assert!(accessor.starts_with("kwa_"));
    // Counted from the time the token was made: exactly its TTL.
    assert_eq!(auth["lease_duration"].as_u64(), Some(3600));
    assert_eq!(auth["policies"], json!(["root"]));
    assert!(a.json["data"].is_null());

    // lookup-self (GET), lookup (token in the body), lookup-accessor.
    let a = http.get("/v1/auth/token/lookup-self", Some(&child)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["accessor"], accessor);
    assert_eq!(a.json["data"]["id"], child);
    assert!(a.json["data"]["ttl"].as_u64().unwrap() > 3500);
    let a = http
        .call(
            "POST",
            "/v1/auth/token/lookup",
            root,
            Some(json!({"token": child})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["accessor"], accessor);
    let a = http
        .call(
            "POST",
            "/v1/auth/token/lookup-accessor",
            root,
            Some(json!({"accessor": accessor})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.json["data"]["id"], "",
        "an accessor lookup never shows the token"
    );
    let a = http
        .call(
            "POST",
            "/v1/auth/token/lookup-accessor",
            root,
            Some(json!({"accessor": "nope"})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);

    // renew-self and renew of the calling token; renewing another is refused.
    let a = http
        .call(
            "POST",
            "/v1/auth/token/renew-self",
            Some(&child),
            Some(json!({"increment": "2h"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["auth"]["client_token"], child);
    let a = http
        .call(
            "POST",
            "/v1/auth/token/renew",
            Some(&child),
            Some(json!({"token": child})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = http
        .call(
            "POST",
            "/v1/auth/token/renew",
            root,
            Some(json!({"token": child})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);

    // Unsupported token kinds are refused, naming the field.
    let a = http
        .call(
            "POST",
            "/v1/auth/token/create",
            root,
            Some(json!({"no_parent": true})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("no_parent"), "{}", a.text);

    // revoke-accessor, revoke (body token), revoke-self.
    let a = http
        .call(
            "POST",
            "/v1/auth/token/create",
            root,
            Some(json!({"policies": ["root"]})),
        )
        .await;
    let second = a.json["auth"]["client_token"].as_str().unwrap().to_owned();
    let a = http
        .call(
            "POST",
            "/v1/auth/token/revoke",
            root,
            Some(json!({"token": second})),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert_eq!(
        http.get("/v1/auth/token/lookup-self", Some(&second))
            .await
            .status,
        403
    );
    let a = http.call("POST", "/v1/auth/token/create", root, None).await;
    let third = a.json["auth"]["client_token"].as_str().unwrap().to_owned();
    let a = http
        .call("POST", "/v1/auth/token/revoke-self", Some(&third), None)
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert_eq!(
        http.get("/v1/auth/token/lookup-self", Some(&third))
            .await
            .status,
        403
    );
    let a = http
        .call(
            "POST",
            "/v1/auth/token/revoke-accessor",
            root,
            Some(json!({"accessor": accessor})),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    let a = http.get("/v1/auth/token/lookup-self", Some(&child)).await;
    assert_eq!(a.status, 403, "{}", a.text);
    // Methods and unknown operations.
    assert_eq!(http.get("/v1/auth/token/create", root).await.status, 405);
    assert_eq!(http.get("/v1/auth/token/wat", root).await.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_token_revoked_on_one_side_is_refused_on_the_other() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let grpc = server.root().await;
    // Issued over gRPC, revoked over HTTP: refused over gRPC.
    let t = grpc
        .issue_token(IssueOptions {
            policies: vec!["root".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let as_t = Client::connect(server.options(Some(&t.token)))
        .await
        .unwrap();
    as_t.lookup_self().await.unwrap();
    let a = http
        .call("POST", "/v1/auth/token/revoke-self", Some(&t.token), None)
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    let e = as_t.lookup_self().await.unwrap_err();
    assert!(
        e.to_string().to_lowercase().contains("unauthenticated") || e.to_string().contains("token"),
        "{e}"
    );
    // Issued over HTTP, revoked over gRPC: refused over HTTP.
    let a = http
        .call(
            "POST",
            "/v1/auth/token/create",
            Some(&server.root_token),
            Some(json!({"policies": ["root"]})),
        )
        .await;
    let h = a.json["auth"]["client_token"].as_str().unwrap().to_owned();
    assert_eq!(
        http.get("/v1/auth/token/lookup-self", Some(&h))
            .await
            .status,
        200
    );
    grpc.revoke_token(&h).await.unwrap();
    let a = http.get("/v1/auth/token/lookup-self", Some(&h)).await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = http
        .get(&format!("/v1/secret/data/{}", unique("x")), Some(&h))
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    server.stop().await;
}

#[tokio::test]
async fn approle_login_role_id_and_secret_id() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = server.root().await;
    let policy = unique("p");
    let prefix = unique("svc");
    put_policy(
        &server,
        &policy,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    let name = unique("bot");
    let (role_id, secret_id) = approle_identity(&root, &name, std::slice::from_ref(&policy)).await;
    let rt = Some(server.root_token.as_str());
    // role-id read.
    let a = http
        .get(&format!("/v1/auth/approle/role/{name}/role-id"), rt)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["role_id"], role_id);
    let a = http
        .get(
            &format!("/v1/auth/approle/role/{}/role-id", unique("none")),
            rt,
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.text);
    // A second secret-id over HTTP, limited to one use.
    let a = http
        .call(
            "POST",
            &format!("/v1/auth/approle/role/{name}/secret-id"),
            rt,
            Some(json!({"num_uses": 1, "ttl": "10m"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let once = a.json["data"]["secret_id"].as_str().unwrap().to_owned();
    assert!(a.json["data"]["secret_id_ttl"].as_u64().unwrap() > 500);
    // Login with each.
    let a = http
        .call(
            "POST",
            "/v1/auth/approle/login",
            None,
            Some(json!({"role_id": role_id, "secret_id": secret_id})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["auth"]["policies"], json!([policy]));
    let token = a.json["auth"]["client_token"].as_str().unwrap().to_owned();
    assert_eq!(
        http.get("/v1/auth/token/lookup-self", Some(&token))
            .await
            .json["data"]["display_name"],
        name
    );
    let a = http
        .call(
            "POST",
            "/v1/auth/approle/login",
            None,
            Some(json!({"role_id": role_id, "secret_id": once})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = http
        .call(
            "POST",
            "/v1/auth/approle/login",
            None,
            Some(json!({"role_id": role_id, "secret_id": once})),
        )
        .await;
    assert_eq!(a.status, 403, "a used-up secret-id: {}", a.text);
    let a = http
        .call(
            "POST",
            "/v1/auth/approle/login",
            None,
            Some(json!({"role_id": role_id, "secret_id": "wrong"})),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert!(!a.text.contains(&secret_id));
    // The logged-in token may not make secret-ids for itself (it lacks issue
    // on identity/<name>) nor read another identity's role-id.
    let a = http
        .call(
            "POST",
            &format!("/v1/auth/approle/role/{name}/secret-id"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = http
        .get(
            &format!("/v1/auth/approle/role/{name}/role-id"),
            Some(&token),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    server.stop().await;
}

#[tokio::test]
async fn cert_login_uses_the_connections_client_certificate() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let name = unique("certbot");
    root.identity_create(super::ident_kit::create(&name, "workload", "team", &[]))
        .await
        .unwrap();
    let cn = unique("host");
    root.identity_bind_cert(&name, Some(&format!("CN={cn}, O=keyward dev")), None)
        .await
        .unwrap();
    let certs = keyward::pki::CertPaths::in_dir(&server.dir.path().join("certs"));
    let issuer = keyward::pki::load_issuer(&certs).unwrap();
    let dir = server.dir.path().join(unique("client"));
    std::fs::create_dir_all(&dir).unwrap();
    let client_for = |cn: &str, file: &str| {
        let (pem, key) = keyward::pki::issue_client_cert(&issuer, cn, None).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), pem).unwrap();
        std::fs::write(dir.join(format!("{file}-key.pem")), key).unwrap();
        HttpClient::with_client_cert(
            server.http_addr,
            &server.ca,
            &dir.join(format!("{file}.pem")),
            &dir.join(format!("{file}-key.pem")),
        )
    };
    // Without a certificate: refused.
    let plain = HttpClient::new(server.http_addr, &server.ca);
    let a = plain.call("POST", "/v1/auth/cert/login", None, None).await;
    assert_eq!(a.status, 403, "{}", a.text);
    // A certificate of the CA bound to nobody: refused.
    let a = client_for(&unique("nobody"), "nobody")
        .call("POST", "/v1/auth/cert/login", None, None)
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    // The bound certificate: a token of that identity.
    let with = client_for(&cn, "bound");
    let a = with
        .call(
            "POST",
            "/v1/auth/cert/login",
            None,
            Some(json!({"name": "web"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["auth"]["metadata"]["identity"], name);
    server.stop().await;
}

#[tokio::test]
async fn jwt_login_finds_the_issuer_by_iss_and_checks_the_role() {
    use super::ident_kit::{jwks, now_unix, Signer};
    use keyward::proto::v1::PutOidcIssuerRequest;
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = server.root().await;
    let iss = format!("https://{}.example.test", unique("ci"));
    let signer = Signer::eddsa("http-key");
    let file = server.dir.path().join("jwks").join("http-jwks.json");
    std::fs::write(&file, jwks(&[&signer])).unwrap();
    let issuer = unique("iss");
    root.oidc_issuer_put(PutOidcIssuerRequest {
        name: issuer.clone(),
        issuer_url: iss.clone(),
        jwks_file: file.display().to_string(),
        jwks_url: String::new(),
        audience: "keyward-test".into(),
    })
    .await
    .unwrap();
    let name = unique("runner");
    root.identity_create(super::ident_kit::create(
        &name,
        "ci-runner",
        "platform",
        &[],
    ))
    .await
    .unwrap();
    root.identity_bind_oidc(&name, &issuer, &[("repository".into(), "acme/h".into())])
        .await
        .unwrap();
    let other = unique("other");
    root.identity_create(super::ident_kit::create(
        &other,
        "ci-runner",
        "platform",
        &[],
    ))
    .await
    .unwrap();
    let now = now_unix();
    let claims = |repo: &str, iss: &str| {
        json!({"iss": iss, "aud": "keyward-test", "sub": "x", "repository": repo,
               "iat": now - 5, "nbf": now - 5, "exp": now + 120})
    };
    let jwt = signer.token(&claims("acme/h", &iss));
    let a = http
        .call(
            "POST",
            "/v1/auth/jwt/login",
            None,
            Some(json!({"role": name, "jwt": jwt})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["auth"]["metadata"]["identity"], name);
    // The same JWT for another role, a JWT of an unknown iss, a claim that
    // binds nobody, a forged signature, an unknown role: each 403.
    let refusals = [
        json!({"role": other, "jwt": jwt}),
        json!({"role": name, "jwt": signer.token(&claims("acme/h", "https://evil.test"))}),
        json!({"role": name, "jwt": signer.token(&claims("acme/other", &iss))}),
        json!({"role": name, "jwt": Signer::eddsa("http-key").token(&claims("acme/h", &iss))}),
        json!({"role": unique("nobody"), "jwt": jwt}),
    ];
    let mut bodies = Vec::new();
    for body in refusals {
        let a = http
            .call("POST", "/v1/auth/jwt/login", None, Some(body))
            .await;
        assert_eq!(a.status, 403, "{}", a.text);
        bodies.push(a.error());
    }
    // What the HTTP layer decides (another role, an unknown iss, an unknown
    // role) says nothing of which it was; the JWT checks' own messages are
    // gRPC's (the domain's).
    assert_eq!(bodies[0], bodies[1], "{bodies:?}");
    assert_eq!(bodies[0], bodies[4], "{bodies:?}");
    // A body missing the role is 400 naming it.
    let a = http
        .call(
            "POST",
            "/v1/auth/jwt/login",
            None,
            Some(json!({"jwt": jwt})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("role"), "{}", a.text);
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let server = TestServer::dev_with(|c| c.server_limits.max_connections = 2).await;
    // Two connections that never finish their handshake hold both slots.
    let _a = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .unwrap();
    let _b = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .unwrap();
    // The third is accepted and closed: it reads end-of-file (waited for
    // with a generous bound, not timed).
    let mut c = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::io::AsyncReadExt::read(&mut c, &mut buf),
    )
    .await
    .expect("the third connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop((_a, _b));
    // Once they are gone, requests are served again.
    let http = HttpClient::new(server.http_addr, &server.ca);
    super::harness::eventually("a slot is free again", || async {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            http.get("/v1/sys/health", None),
        )
        .await
        .is_ok_and(|a| a.status == 200)
    })
    .await;
    server.stop().await;
}

/// `vault token create -policy=default` asks for a narrow token. keyward has
/// no `default` policy, and an empty list means "the caller's policies":
/// the request got a root token when the caller was root. Now it is
/// refused; with no policies named at all, the caller's are still copied.
#[tokio::test]
async fn a_token_asked_for_with_only_the_default_policy_is_never_the_callers() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = Some(server.root_token.as_str());
    for body in [
        json!({"policies": ["default"]}),
        json!({"policies": "default"}),
    ] {
        let a = http
            .call("POST", "/v1/auth/token/create", root, Some(body.clone()))
            .await;
        assert_eq!(a.status, 400, "{body}: {}", a.text);
        assert!(
            a.error().contains("policy default does not exist"),
            "{}",
            a.text
        );
    }
    let a = http
        .call("POST", "/v1/auth/token/create", root, Some(json!({})))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["auth"]["policies"], json!(["root"]));
    server.stop().await;
}
