//! Scheduled OIDC key rotation, shown across two keyward servers on one
//! paused clock: B trusts A as an OIDC issuer; A's key rotates by its
//! schedule (the test advances the clock); new tokens still log in to B (B
//! fetches A's key set again on the unknown `kid`), old tokens keep working
//! until they expire, and the old key leaves A's JWKS once the role's
//! longest TTL has passed since it retired. A relying party (jsonwebtoken,
//! not keyward's code) checks signature, iss, aud, exp and sub.
//!
//! Time: tokio's paused clock, which both servers' clocks and B's key-set
//! cache follow. Waiting is by polling for a condition (`eventually`).

use std::time::Duration;

use serde_json::Value;

use crate::federation_issuer::{fetch_keys, validation, verify, TRUST_DOMAIN};
use crate::harness::{data, eventually, unique, TestServer};
use crate::ident_kit::create;
use keyward::proto::v1::PutOidcIssuerRequest;

const PERIOD: Duration = Duration::from_secs(30 * 60);
const MAX_TTL: Duration = Duration::from_secs(3600);
const AUDIENCE: &str = "b.example";

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .unwrap()
        .kid
        .expect("a kid")
}

/// Moves the paused clock until `server`'s clock reads at least `at_ms`.
async fn advance_to(server: &TestServer, at_ms: u64) {
    let now = server.core.clock().now_ms();
    if at_ms > now {
        tokio::time::advance(Duration::from_millis(at_ms - now)).await;
    }
    assert!(server.core.clock().now_ms() >= at_ms);
}

/// The relying party's check: signature with the published key, iss, aud,
/// sub, and exp against the test's (paused) clock.
fn relying_party_accepts(
    token: &str,
    keys: &jsonwebtoken::jwk::JwkSet,
    issuer: &str,
    sub: &str,
    now_secs: u64,
) -> Value {
    let claims = verify(token, keys, &validation(issuer, AUDIENCE)).expect("verifies");
    assert_eq!(claims["sub"], sub);
    assert_eq!(claims["iss"], issuer);
    assert_eq!(claims["aud"], AUDIENCE);
    assert!(claims["exp"].as_u64().unwrap() > now_secs, "{claims}");
    claims
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_rotation_keeps_b_trusting_a_and_the_old_key_leaves_after_the_longest_ttl() {
    // A: an issuer whose key rotates every 30 minutes.
    // Both servers serve on the test's runtime (no lanes): a lane's runtime
    // keeps the real time, and this test moves tokio's paused clock.
    let a = TestServer::dev_with(|c| {
        c.federation.rotation_period = PERIOD;
        c.listen_threads = 0;
    })
    .await;
    let issuer = format!("https://127.0.0.1:{}", a.http_addr.port());
    let mut config = a.core.federation.config();
    config.issuer = Some(issuer.clone());
    config.trust_domain = Some(TRUST_DOMAIN.to_owned());
    a.core.federation.set_config(config);
    let a_root = a.root().await;
    let role = unique("cloud");
    a_root
        .put_oidc_role(
            &role,
            vec![AUDIENCE.to_owned()],
            MAX_TTL,
            Default::default(),
        )
        .await
        .unwrap();
    let policy = unique("oidc-user");
    a_root
        .policy_put(
            &policy,
            &format!("[[rule]]\npath = \"sys/oidc/{role}\"\ncapabilities = [\"issue\"]\n"),
        )
        .await
        .unwrap();
    let name = unique("ci");
    a_root
        .identity_create(create(&name, "ci-runner", "team-a", &[policy]))
        .await
        .unwrap();
    let sid = a_root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let a_anon = a.anonymous().await;
    // A caller token that outlives the whole test, so it never bounds `exp`.
    let login = a_anon
        .login_approle(&sid.role_id, &sid.secret_id, 6 * 3600)
        .await
        .unwrap();
    let ci = a_anon.with_token(&login.token).unwrap();

    // B: trusts A's JWKS URL (loopback, so private hosts are allowed).
    let a_ca = a.ca.clone();
    let b = TestServer::dev_with(move |c| {
        c.oidc.ca_file = Some(a_ca);
        c.oidc.allow_private_hosts = true;
        c.listen_threads = 0;
    })
    .await;
    let b_root = b.root().await;
    b_root
        .oidc_issuer_put(PutOidcIssuerRequest {
            name: "keyward-a".into(),
            issuer_url: issuer.clone(),
            jwks_file: String::new(),
            jwks_url: format!("{issuer}/.well-known/jwks.json"),
            audience: AUDIENCE.into(),
        })
        .await
        .unwrap();
    let path = unique("fed");
    b_root
        .put(
            &format!("{path}/db"),
            &data(&[("password", "s3cr3t")]),
            Default::default(),
        )
        .await
        .unwrap();
    let b_policy = unique("fed-read");
    b_root
        .policy_put(
            &b_policy,
            &format!("[[rule]]\npath = \"secret/{path}/*\"\ncapabilities = [\"read\"]\n"),
        )
        .await
        .unwrap();
    let on_b = unique("from-a");
    b_root
        .identity_create(create(&on_b, "workload", "team-a", &[b_policy]))
        .await
        .unwrap();
    let sub = format!("spiffe://{TRUST_DOMAIN}/ci-runner/{name}");
    b_root
        .identity_bind_oidc(&on_b, "keyward-a", &[("sub".to_owned(), sub.clone())])
        .await
        .unwrap();
    let b_anon = b.anonymous().await;
    let logs_in_to_b = |jwt: String| {
        let b_anon = b_anon.clone();
        let path = path.clone();
        let on_b = on_b.clone();
        async move {
            let t = b_anon.login_oidc("keyward-a", &jwt, 0).await?;
            assert_eq!(t.identity, on_b);
            let got = b_anon
                .with_token(&t.token)
                .unwrap()
                .get(&format!("{path}/db"))
                .await?;
            assert_eq!(got.data["password"].expose(), b"s3cr3t");
            Ok::<_, keyward::client::ClientError>(t)
        }
    };

    // 1. A token signed by A's first key logs in to B; the relying party
    //    accepts it.
    let old = ci.identity_token(&role, None, None).await.unwrap();
    let old_kid = kid(&old.token);
    let old_exp_ms = u64::try_from(old.expires_at.as_ref().unwrap().seconds).unwrap() * 1000;
    logs_in_to_b(old.token.clone()).await.unwrap();
    let (_, keys) = fetch_keys(&a, &issuer).await;
    relying_party_accepts(&old.token, &keys, &issuer, &sub, a.core.clock().now_secs());
    let first = a.core.federation.issuer.keys().unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].kid, old_kid);

    // 2. A's schedule: at created + period the background task rotates.
    advance_to(
        &a,
        first[0].created_at_ms + PERIOD.as_millis() as u64 + 1000,
    )
    .await;
    eventually("A rotates its signing key by its schedule", || async {
        a.core
            .federation
            .issuer
            .keys()
            .unwrap()
            .iter()
            .any(|k| k.kid != old_kid && k.retired_at_ms == 0)
    })
    .await;
    let keys_now = a.core.federation.issuer.keys().unwrap();
    let retired_at_ms = keys_now
        .iter()
        .find(|k| k.kid == old_kid)
        .expect("the old key is kept while its tokens live")
        .retired_at_ms;
    assert!(retired_at_ms > 0);
    assert!(
        old_exp_ms > a.core.clock().now_ms(),
        "the old token still lives"
    );

    // 3. A new token is signed by the new key and logs in to B: B had A's
    //    old key set cached and fetches it again on the unknown kid.
    let new = ci.identity_token(&role, None, None).await.unwrap();
    let new_kid = kid(&new.token);
    assert_ne!(new_kid, old_kid);
    logs_in_to_b(new.token.clone()).await.unwrap();
    // The relying party sees both keys and accepts both tokens.
    let (_, keys) = fetch_keys(&a, &issuer).await;
    assert!(
        keys.find(&old_kid).is_some(),
        "the old key is still published"
    );
    assert!(keys.find(&new_kid).is_some());
    let now = a.core.clock().now_secs();
    relying_party_accepts(&new.token, &keys, &issuer, &sub, now);
    relying_party_accepts(&old.token, &keys, &issuer, &sub, now);
    // 4. The old token keeps working on B until it expires.
    logs_in_to_b(old.token.clone()).await.unwrap();

    // 5. Once it has expired, B refuses it; the new one still works.
    advance_to(&a, old_exp_ms + 1000).await;
    let refused = logs_in_to_b(old.token.clone()).await;
    assert!(refused.is_err(), "an expired JWT logs in: {refused:?}");
    let new_exp_ms = u64::try_from(new.expires_at.as_ref().unwrap().seconds).unwrap() * 1000;
    assert!(new_exp_ms > a.core.clock().now_ms());
    logs_in_to_b(new.token.clone()).await.unwrap();

    // 6. The longest TTL after the old key retired: it has left A's JWKS.
    advance_to(&a, retired_at_ms + MAX_TTL.as_millis() as u64 + 1000).await;
    let (_, keys) = fetch_keys(&a, &issuer).await;
    assert!(
        keys.find(&old_kid).is_none(),
        "the old key is still published"
    );
    assert!(!keys.keys.is_empty());
    // A relying party can no longer verify a token of the old key at all.
    let header_kid = kid(&old.token);
    assert!(keys.find(&header_kid).is_none());
    // And it leaves A's storage at the next pass of the rotation task.
    eventually("the old key leaves A's storage", || async {
        a.core
            .federation
            .issuer
            .keys()
            .unwrap()
            .iter()
            .all(|k| k.kid != old_kid)
    })
    .await;
}
