//! keyward as an OIDC issuer, seen by relying parties: a JWT library that is
//! not keyward's (jsonwebtoken) verifies an identity token with the keys it
//! fetched over HTTPS from the discovery document; a second keyward server
//! trusts the first as an OIDC issuer, across a key rotation.

use std::time::Duration;

use serde_json::Value;
use tonic::Code;

use crate::harness::{unique, TestServer};
use crate::http_client::HttpClient;
use crate::ident_kit::{create, expire_in, login};
use keyward::client::{Client, ClientError};
use keyward::proto::v1::PutOidcIssuerRequest;

pub(crate) const TRUST_DOMAIN: &str = "a.keyward.test";

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.expect_err("the call should have been refused")
        .code()
        .expect("a server status, not a local error")
}

/// A dev server whose issuer URL is its own HTTPS listener.
pub(crate) async fn issuer_server() -> (TestServer, String) {
    let server = TestServer::dev().await;
    let issuer = format!("https://127.0.0.1:{}", server.http_addr.port());
    let mut config = server.core.federation.config();
    config.issuer = Some(issuer.clone());
    config.trust_domain = Some(TRUST_DOMAIN.to_owned());
    server.core.federation.set_config(config);
    (server, issuer)
}

/// A role with `audiences`, and a ci-runner identity (logged in) whose
/// policy may use it.
pub(crate) async fn role_and_identity(
    server: &TestServer,
    audiences: &[&str],
) -> (String, String, Client) {
    let root = server.root().await;
    let role = unique("cloud");
    root.put_oidc_role(
        &role,
        audiences.iter().map(|a| a.to_string()).collect(),
        Duration::from_secs(600),
        [("team".to_owned(), "{{identity.owner}}".to_owned())].into(),
    )
    .await
    .unwrap();
    let policy = unique("oidc-user");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"sys/oidc/{role}\"\ncapabilities = [\"issue\"]\n\
             [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    let name = unique("ci");
    root.identity_create(create(&name, "ci-runner", "team-a", &[policy]))
        .await
        .unwrap();
    let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let (_, client) = login(server, &sid.role_id, &sid.secret_id).await;
    (role, name, client)
}

/// Fetches the discovery document and the JWKS it names over HTTPS.
pub(crate) async fn fetch_keys(
    server: &TestServer,
    issuer: &str,
) -> (Value, jsonwebtoken::jwk::JwkSet) {
    let http = HttpClient::new(server.http_addr, &server.ca);
    let doc = http.get("/.well-known/openid-configuration", None).await;
    assert_eq!(doc.status, 200, "{}", doc.text);
    assert_eq!(doc.json["issuer"], issuer);
    let jwks_uri = doc.json["jwks_uri"].as_str().unwrap().to_owned();
    let path = jwks_uri
        .strip_prefix(issuer)
        .expect("the JWKS is on the issuer");
    let keys = http.get(path, None).await;
    assert_eq!(keys.status, 200, "{}", keys.text);
    // Public keys only.
    for key in keys.json["keys"].as_array().unwrap() {
        assert!(key.get("d").is_none(), "{key}");
    }
    (doc.json, serde_json::from_str(&keys.text).unwrap())
}

pub(crate) fn validation(issuer: &str, audience: &str) -> jsonwebtoken::Validation {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_issuer(&[issuer]);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
    v.leeway = 0;
    v
}

pub(crate) fn verify(
    token: &str,
    keys: &jsonwebtoken::jwk::JwkSet,
    validation: &jsonwebtoken::Validation,
) -> jsonwebtoken::errors::Result<Value> {
    let header = jsonwebtoken::decode_header(token)?;
    let kid = header.kid.expect("a kid");
    let jwk = keys.find(&kid).expect("the kid is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)?;
    Ok(jsonwebtoken::decode::<Value>(token, &key, validation)?.claims)
}

#[tokio::test]
async fn a_relying_party_verifies_an_identity_token() {
    let (server, issuer) = issuer_server().await;
    let (role, name, ci) = role_and_identity(&server, &["sts.example"]).await;
    let me = ci.lookup_self().await.unwrap();
    let t = ci.identity_token(&role, None, None).await.unwrap();
    let (_, keys) = fetch_keys(&server, &issuer).await;
    let claims = verify(&t.token, &keys, &validation(&issuer, "sts.example")).unwrap();
    assert_eq!(
        claims["sub"],
        format!("spiffe://{TRUST_DOMAIN}/ci-runner/{name}")
    );
    assert_eq!(claims["kind"], "ci-runner");
    assert_eq!(claims["owner"], "team-a");
    assert_eq!(claims["team"], "team-a");
    assert_eq!(claims["jti"], t.jti.as_str());
    let exp = claims["exp"].as_i64().unwrap();
    assert_eq!(exp, t.expires_at.as_ref().unwrap().seconds);
    assert!(
        exp <= me.expires_at.as_ref().unwrap().seconds,
        "never past the caller's token"
    );
    assert!(claims["iat"].as_i64().unwrap() <= exp - 590);
    // The relying party's checks bite: another audience, another issuer, a
    // changed payload.
    assert!(verify(&t.token, &keys, &validation(&issuer, "other.example")).is_err());
    assert!(verify(
        &t.token,
        &keys,
        &validation("https://evil.example", "sts.example")
    )
    .is_err());
    let parts: Vec<&str> = t.token.split('.').collect();
    let mut forged_claims = claims.clone();
    forged_claims["sub"] = Value::String(format!("spiffe://{TRUST_DOMAIN}/ci-runner/admin"));
    use base64::Engine as _;
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged_claims.to_string()),
        parts[2]
    );
    assert!(verify(&forged, &keys, &validation(&issuer, "sts.example")).is_err());
    // A short caller token bounds the identity token.
    let short = ci
        .issue_token(keyward::client::IssueOptions {
            ttl: Some(Duration::from_secs(30)),
            policies: me.policies.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let t2 = ci
        .with_token(&short.token)
        .unwrap()
        .identity_token(&role, Some("sts.example"), None)
        .await
        .unwrap();
    assert!(t2.expires_at.as_ref().unwrap().seconds <= short.expires_at.as_ref().unwrap().seconds);
    // The audit log names the jti, never the token.
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(audit.contains(&format!("sys/oidc/{role}/jti/{}", t.jti)));
    assert!(!audit.contains(parts[2]));
    assert!(!audit.contains(parts[1]));
}

/// Bringing an identity's expiry forward revokes the tokens it had (they
/// carry the old expiry); a token it gets after the change, and every
/// identity token from that, ends by the new expiry. (`IdentityToken` also
/// caps `exp` at the identity's expiry itself, a second line this cannot
/// reach once the tokens are revoked.)
#[tokio::test]
async fn an_identity_token_never_outlives_its_identity() {
    let (server, _issuer) = issuer_server().await;
    let (role, name, ci) = role_and_identity(&server, &["sts.example"]).await;
    let root = server.root().await;
    ci.identity_token(&role, None, None).await.unwrap();
    expire_in(&root, &name, 120).await;
    let expires = root.identity_get(&name).await.unwrap().expires_at.unwrap();
    assert_eq!(
        code(ci.identity_token(&role, None, None).await),
        Code::Unauthenticated,
        "a token from before the expiry was brought forward still works"
    );
    let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let (t, again) = login(&server, &sid.role_id, &sid.secret_id).await;
    assert!(t.expires_at.unwrap().seconds <= expires.seconds);
    // The role allows 600 s.
    let token = again.identity_token(&role, None, None).await.unwrap();
    assert!(
        token.expires_at.unwrap().seconds <= expires.seconds,
        "an identity token outlived its identity"
    );
}

#[tokio::test]
async fn identity_tokens_are_refused_with_the_rule() {
    let (server, _issuer) = issuer_server().await;
    let (role, _name, ci) = role_and_identity(&server, &["sts.example", "b.example"]).await;
    // Several audiences: one must be named; an unknown one is refused.
    let e = ci.identity_token(&role, None, None).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(e.to_string().contains("--audience"), "{e}");
    let e = ci
        .identity_token(&role, Some("evil.example"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(
        e.to_string().contains("'evil.example' is not one of"),
        "{e}"
    );
    // A TTL past the role's.
    let e = ci
        .identity_token(&role, Some("sts.example"), Some(Duration::from_secs(601)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(
        e.to_string().contains("longer than the role's max TTL"),
        "{e}"
    );
    // Another role: no grant, refused whether or not it exists.
    let (other_role, ..) = role_and_identity(&server, &["x"]).await;
    assert_eq!(
        code(ci.identity_token(&other_role, None, None).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(ci.identity_token("no-such-role", None, None).await),
        Code::PermissionDenied
    );
    // Nor may it define roles or rotate keys.
    assert_eq!(
        code(
            ci.put_oidc_role(
                &role,
                vec!["evil".into()],
                Duration::from_secs(60),
                Default::default()
            )
            .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(code(ci.rotate_oidc_key().await), Code::PermissionDenied);
    // The root token is no inventory identity: no identity token.
    let root = server.root().await;
    let e = root
        .identity_token(&role, Some("sts.example"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    // Role input is checked: a reserved claim, a secret in a template.
    let e = root
        .put_oidc_role(
            &unique("bad"),
            vec!["a".into()],
            Duration::from_secs(60),
            [("sub".to_owned(), "x".to_owned())].into(),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("claim 'sub' is set by the issuer"),
        "{e}"
    );
    let e = root
        .put_oidc_role(
            &unique("bad"),
            vec!["a".into()],
            Duration::from_secs(60),
            [("k".to_owned(), "{{secret.password}}".to_owned())].into(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    // Nothing was issued by any refusal.
    assert_eq!(
        std::fs::read_to_string(&server.audit_path)
            .unwrap()
            .matches("/jti/")
            .count(),
        0
    );
}

#[tokio::test]
async fn a_second_server_trusts_the_first_across_a_key_rotation() {
    let (a, issuer) = issuer_server().await;
    let (role, name, ci) = role_and_identity(&a, &["b.example"]).await;
    let a_ca = a.ca.clone();
    let b = TestServer::dev_with(move |c| {
        c.oidc.ca_file = Some(a_ca);
        c.oidc.allow_private_hosts = true;
    })
    .await;
    let b_root = b.root().await;
    b_root
        .oidc_issuer_put(PutOidcIssuerRequest {
            name: "keyward-a".into(),
            issuer_url: issuer.clone(),
            jwks_file: String::new(),
            jwks_url: format!("{issuer}/.well-known/jwks.json"),
            audience: "b.example".into(),
        })
        .await
        .unwrap();
    let path = unique("fed");
    b_root
        .put(
            &format!("{path}/db"),
            &crate::harness::data(&[("password", "s3cr3t")]),
            Default::default(),
        )
        .await
        .unwrap();
    let policy = unique("fed-read");
    b_root
        .policy_put(
            &policy,
            &format!("[[rule]]\npath = \"secret/{path}/*\"\ncapabilities = [\"read\"]\n"),
        )
        .await
        .unwrap();
    let on_b = unique("from-a");
    b_root
        .identity_create(create(&on_b, "workload", "team-a", &[policy]))
        .await
        .unwrap();
    let sub = format!("spiffe://{TRUST_DOMAIN}/ci-runner/{name}");
    b_root
        .identity_bind_oidc(&on_b, "keyward-a", &[("sub".to_owned(), sub.clone())])
        .await
        .unwrap();
    // A token signed by A's first key; then A rotates its key (B has not
    // fetched A's key set yet: B refetches a changed set only every 30 s,
    // its own rule, tested with the oidc module).
    let old = ci.identity_token(&role, None, None).await.unwrap();
    let old_kid = jsonwebtoken::decode_header(&old.token)
        .unwrap()
        .kid
        .unwrap();
    let rotated = a.root().await.rotate_oidc_key().await.unwrap();
    assert_ne!(rotated.kid, old_kid);
    assert!(
        rotated.published.contains(&old_kid),
        "{:?}",
        rotated.published
    );
    let new = ci.identity_token(&role, None, None).await.unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&new.token)
            .unwrap()
            .kid
            .unwrap(),
        rotated.kid
    );
    // Both log in to B: the new key's token, and the old key's while it lives.
    let anon = b.anonymous().await;
    let t = anon.login_oidc("keyward-a", &new.token, 0).await.unwrap();
    assert_eq!(t.identity, on_b);
    let got = anon
        .with_token(&t.token)
        .unwrap()
        .get(&format!("{path}/db"))
        .await
        .unwrap();
    assert_eq!(got.data["password"].expose(), b"s3cr3t");
    let t_old = anon.login_oidc("keyward-a", &old.token, 0).await.unwrap();
    assert_eq!(t_old.identity, on_b);
    // B's token never outlives the JWT it came from.
    assert!(t_old.expires_at.as_ref().unwrap().seconds <= old.expires_at.as_ref().unwrap().seconds);
    let (_, keys) = fetch_keys(&a, &issuer).await;
    assert!(keys.find(&old_kid).is_some() && keys.find(&rotated.kid).is_some());
    // A token for another identity of A is not this binding's.
    let (role2, _, other) = role_and_identity(&a, &["b.example"]).await;
    let stranger = other.identity_token(&role2, None, None).await.unwrap();
    let refused = anon.login_oidc("keyward-a", &stranger.token, 0).await;
    assert!(refused.is_err(), "{refused:?}");
}
