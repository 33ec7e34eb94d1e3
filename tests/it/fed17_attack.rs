//! Issue 17 (federation and delegation) attacked from outside: a caller with
//! a low-privileged token, or none, tries to get identity tokens it should
//! not, to forge claims through metadata, to widen or outlive a delegated
//! token, and to read private key material from the served documents.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tonic::Code;

use crate::federation_issuer::{issuer_server, role_and_identity, TRUST_DOMAIN};
use crate::harness::{data, unique, TestServer};
use crate::http_client::HttpClient;
use crate::ident_kit::{create, login};
use keyward::client::{Client, ClientError, ExchangeOptions, IssueOptions, PutOptions};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.expect_err("the call should have been refused")
        .code()
        .expect("a server status, not a local error")
}

/// The claims of a compact JWT (not verified: the shape is what is tested).
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a compact JWT");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

async fn logged_in(server: &TestServer, kind: &str, policies: &[String]) -> (String, Client) {
    let root = server.root().await;
    let name = unique(kind);
    root.identity_create(create(&name, kind, "team-a", policies))
        .await
        .unwrap();
    let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let (_, client) = login(server, &sid.role_id, &sid.secret_id).await;
    (name, client)
}

/// A subject (service account) and an agent (ai-agent), both able to read
/// `secret/<p>/both` and to issue child tokens.
struct Pair {
    _server: TestServer,
    p: String,
    subject: Client,
    subject_policy: String,
    agent: Client,
    agent_name: String,
    agent_policy: String,
}

async fn pair() -> Pair {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let p = unique("atk");
    root.put(
        &format!("{p}/both"),
        &data(&[("v", "both")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let rules = format!(
        "[[rule]]\npath = \"secret/{p}/both\"\ncapabilities = [\"read\"]\n\
         [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
    );
    let subject_policy = unique("subj");
    root.policy_put(&subject_policy, &rules).await.unwrap();
    let agent_policy = unique("agent");
    root.policy_put(&agent_policy, &rules).await.unwrap();
    let (_, subject) = logged_in(
        &server,
        "service-account",
        std::slice::from_ref(&subject_policy),
    )
    .await;
    let (agent_name, agent) =
        logged_in(&server, "ai-agent", std::slice::from_ref(&agent_policy)).await;
    Pair {
        _server: server,
        p,
        subject,
        subject_policy,
        agent,
        agent_name,
        agent_policy,
    }
}

impl Pair {
    async fn may_act(&self, cidrs: &[&str]) -> String {
        self.subject
            .issue_may_act_token(
                IssueOptions {
                    policies: vec![self.subject_policy.clone()],
                    cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
                    ..IssueOptions::default()
                },
                &self.agent_name,
            )
            .await
            .unwrap()
            .token
    }

    /// A child of the agent's token bound to `cidrs`, as a client.
    async fn bound_agent(&self, cidrs: &[&str]) -> Client {
        let t = self
            .agent
            .issue_token(IssueOptions {
                policies: vec![self.agent_policy.clone()],
                cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
                ..IssueOptions::default()
            })
            .await
            .unwrap();
        self.agent.with_token(&t.token).unwrap()
    }
}

/// HIT: an agent whose token is bound to source addresses got a delegated
/// token bound only to the subject's (here: none), usable from anywhere
/// with the agent's rights. The delegated token must be bound at least as
/// tightly as both tokens.
#[tokio::test]
async fn a_delegated_token_keeps_the_actor_tokens_source_binding() {
    let w = pair().await;
    let agent = w.bound_agent(&["127.0.0.1/32"]).await;
    let d = agent
        .exchange_token(&w.may_act(&[]).await, ExchangeOptions::default())
        .await
        .unwrap();
    let delegated = w.agent.with_token(&d.token).unwrap();
    let info = delegated.lookup_self().await.unwrap();
    assert_eq!(info.cidrs, vec!["127.0.0.1/32".to_owned()], "{info:?}");
    // Still usable from the address both allow.
    delegated.get(&format!("{}/both", w.p)).await.unwrap();
    // Both bound: the narrower block of the two.
    let d = agent
        .exchange_token(
            &w.may_act(&["127.0.0.0/8"]).await,
            ExchangeOptions::default(),
        )
        .await
        .unwrap();
    let info = w
        .agent
        .with_token(&d.token)
        .unwrap()
        .lookup_self()
        .await
        .unwrap();
    assert_eq!(info.cidrs, vec!["127.0.0.1/32".to_owned()], "{info:?}");
    // Disjoint blocks: a token usable from nowhere is refused, not issued.
    let wide_agent = w.bound_agent(&["127.0.0.0/8"]).await;
    let e = wide_agent
        .exchange_token(
            &w.may_act(&["10.0.0.0/8"]).await,
            ExchangeOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("CIDR"), "{e}");
}

/// Refused correctly (regression guards): identity tokens for a role
/// without `issue`, an unknown role, an unknown audience, a TTL past the
/// role's; never past the caller's token; not with an exchange-only or a
/// delegated token; not without a token.
#[tokio::test]
async fn identity_tokens_are_refused_to_outsiders_and_bounded() {
    let (server, _issuer) = issuer_server().await;
    let (role, _name, ci) = role_and_identity(&server, &["sts.example"]).await;
    let (other_role, _, _) = role_and_identity(&server, &["sts.example"]).await;
    assert_eq!(
        code(
            server
                .anonymous()
                .await
                .identity_token(&role, None, None)
                .await
        ),
        Code::Unauthenticated
    );
    // Another role, and one that does not exist: the same refusal.
    assert_eq!(
        code(ci.identity_token(&other_role, None, None).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(ci.identity_token("no-such-role", None, None).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(ci.identity_token(&role, Some("sts.example "), None).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ci.identity_token(&role, Some("STS.example"), None).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ci.identity_token(&role, None, Some(Duration::from_secs(601)))
                .await
        ),
        Code::InvalidArgument
    );
    // Nothing was issued by any refusal.
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert_eq!(audit.matches("/jti/").count(), 0);
    // A short child token: the identity token ends by it.
    let policies = ci.lookup_self().await.unwrap().policies;
    let short = ci
        .issue_token(IssueOptions {
            policies: policies.clone(),
            ttl: Some(Duration::from_secs(30)),
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let got = ci
        .with_token(&short.token)
        .unwrap()
        .identity_token(&role, None, None)
        .await
        .unwrap();
    let c = claims(&got.token);
    assert!(
        c["exp"].as_i64().unwrap() <= short.expires_at.as_ref().unwrap().seconds,
        "{c}"
    );
    // An exchange-only token names an agent and is good for nothing else.
    let (agent_name, _agent) = logged_in(&server, "ai-agent", &policies).await;
    let may_act = ci
        .issue_may_act_token(
            IssueOptions {
                policies,
                ..IssueOptions::default()
            },
            &agent_name,
        )
        .await
        .unwrap();
    let e = ci
        .with_token(&may_act.token)
        .unwrap()
        .identity_token(&role, None, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("exchange-only"), "{e}");
}

/// Refused correctly: a delegated token mints neither identity tokens nor
/// exchange-only tokens, even when both sides could.
#[tokio::test]
async fn a_delegated_token_mints_no_identity_or_exchange_only_tokens() {
    let (server, _issuer) = issuer_server().await;
    let (role, _name, ci) = role_and_identity(&server, &["sts.example"]).await;
    let policies = ci.lookup_self().await.unwrap().policies;
    let (agent_name, agent) = logged_in(&server, "ai-agent", &policies).await;
    // The agent may use the role itself.
    agent.identity_token(&role, None, None).await.unwrap();
    let may_act = ci
        .issue_may_act_token(
            IssueOptions {
                policies,
                ..IssueOptions::default()
            },
            &agent_name,
        )
        .await
        .unwrap();
    let d = agent
        .exchange_token(&may_act.token, ExchangeOptions::default())
        .await
        .unwrap();
    let delegated = agent.with_token(&d.token).unwrap();
    assert_eq!(
        code(delegated.identity_token(&role, None, None).await),
        Code::PermissionDenied
    );
    assert_ne!(
        code(
            delegated
                .issue_may_act_token(IssueOptions::default(), &agent_name)
                .await
        ),
        Code::Ok
    );
}

/// Refused correctly, and claims not forgeable: metadata with quotes,
/// template text, look-alike characters and JSON fragments arrives in the
/// JWT as the exact string, in its own claim, and `sub` stays the issuer's;
/// control characters, huge values and too many labels are refused; an
/// identity may not label itself or another identity.
#[tokio::test]
async fn metadata_cannot_forge_claims() {
    let (server, issuer) = issuer_server().await;
    let root = server.root().await;
    let role = unique("forge");
    root.put_oidc_role(
        &role,
        vec!["sts.example".into()],
        Duration::from_secs(600),
        [("env".to_owned(), "{{identity.metadata.env}}".to_owned())].into(),
    )
    .await
    .unwrap();
    let policy = unique("forge-user");
    root.policy_put(
        &policy,
        &format!("[[rule]]\npath = \"sys/oidc/{role}\"\ncapabilities = [\"issue\"]\n"),
    )
    .await
    .unwrap();
    let (name, ci) = logged_in(&server, "ci-runner", std::slice::from_ref(&policy)).await;
    let (victim, _) = logged_in(&server, "ci-runner", std::slice::from_ref(&policy)).await;
    let one = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
    // Nobody without `write` on the identity labels it: not itself, not another.
    for target in [&name, &victim] {
        assert_eq!(
            code(
                ci.identity_set_metadata(target, one("env", "prod"), vec![])
                    .await
            ),
            Code::PermissionDenied,
            "{target}"
        );
    }
    assert_eq!(
        code(
            server
                .anonymous()
                .await
                .identity_set_metadata(&name, one("env", "prod"), vec![])
                .await
        ),
        Code::Unauthenticated
    );
    // Bad values and keys: refused with the rule.
    let too_many: HashMap<String, String> =
        (0..33).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    for bad in [
        one("env", "prod\r\nsub: x"),
        one("env", "a\u{0}b"),
        one("env", &"x".repeat(257)),
        one("еnv", "prod"), // Cyrillic 'е'
        one("env.sub", "x"),
        too_many,
    ] {
        assert_eq!(
            code(root.identity_set_metadata(&name, bad, vec![]).await),
            Code::InvalidArgument
        );
    }
    // Values that look like JSON, a template or another issuer's subject.
    let sub = format!("spiffe://{TRUST_DOMAIN}/ci-runner/{name}");
    for value in [
        format!("prod\",\"sub\":\"spiffe://{TRUST_DOMAIN}/ci-runner/{victim}"),
        "{{identity.name}}".to_owned(),
        "{{identity.metadata.env}}".to_owned(),
        "ｐｒｏｄ".to_owned(),
        "prod\u{202e}dorp".to_owned(),
        "x".repeat(256),
    ] {
        root.identity_set_metadata(&name, one("env", &value), vec![])
            .await
            .unwrap();
        let t = ci.identity_token(&role, None, None).await.unwrap();
        let c = claims(&t.token);
        assert_eq!(c["env"], value.as_str());
        assert_eq!(c["sub"], sub.as_str());
        assert_eq!(c["iss"], issuer.as_str());
        assert_eq!(c["aud"], "sts.example");
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 10, "no extra claims: {keys:?}");
    }
}

/// Refused correctly: the served documents hold only public keys (no `d`,
/// no PKCS#8 of any stored key, current or retired), are cacheable only
/// on success, and nothing else is served under `/.well-known/`.
#[tokio::test]
async fn discovery_serves_public_keys_only_and_nothing_else() {
    let (server, _issuer) = issuer_server().await;
    let (role, _name, ci) = role_and_identity(&server, &["sts.example"]).await;
    ci.identity_token(&role, None, None).await.unwrap();
    server.root().await.rotate_oidc_key().await.unwrap();
    ci.identity_token(&role, None, None).await.unwrap();
    let http = HttpClient::new(server.http_addr, &server.ca);
    let doc = http.get("/.well-known/openid-configuration", None).await;
    let jwks = http.get("/.well-known/jwks.json", None).await;
    assert_eq!(jwks.status, 200, "{}", jwks.text);
    let stored = server.core.federation.issuer.keys().unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(jwks.json["keys"].as_array().unwrap().len(), 2);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for key in &stored {
        let pkcs8 = b64.encode(&key.pkcs8);
        // Any 16 characters of the PKCS#8 encoding would do; the private
        // scalar sits after the algorithm header, near the start.
        for window in [&pkcs8[..24], &pkcs8[24..48], &pkcs8[48..72]] {
            assert!(!jwks.text.contains(window), "{}", jwks.text);
            assert!(!doc.text.contains(window), "{}", doc.text);
        }
    }
    for key in jwks.json["keys"].as_array().unwrap() {
        let fields: Vec<&String> = key.as_object().unwrap().keys().collect();
        for f in &fields {
            assert!(
                ["kty", "crv", "use", "alg", "kid", "x", "y"].contains(&f.as_str()),
                "{key}"
            );
        }
    }
    for path in [
        "/.well-known/jwks",
        "/.well-known/keys",
        "/.well-known/jwks.json/private",
        "/.well-known/openid-configuration/x",
        "/.well-known/",
    ] {
        let a = http.get(path, None).await;
        assert_eq!(a.status, 404, "{path}: {}", a.text);
        assert!(!a.text.contains("\"kid\""), "{path}");
    }
    let post = http
        .call("POST", "/.well-known/jwks.json", None, None)
        .await;
    assert_eq!(post.status, 405, "{}", post.text);
}

/// HIT: a rotation policy set with a delegated token lent the subject's
/// standing authority to the broker: every later run read the referenced
/// secret on the subject's policies, after the delegated token was revoked
/// (or had expired, 15 minutes on), so the agent's minutes became a
/// permanent read for the plugin. The policy must record the delegated
/// token and stop reading once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_policy_set_by_a_delegated_token_dies_with_it() {
    use crate::trust_rotation::{spec, AdminReference};
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin_value = "db-admin-password-AFTER-DELEGATION";
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
             [[rule]]\npath = \"secret/{shared}\"\ncapabilities = [\"read\"]\n\n\
             [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    let (_, subject) = logged_in(&server, "service-account", std::slice::from_ref(&policy)).await;
    let (agent_name, agent) = logged_in(&server, "ai-agent", std::slice::from_ref(&policy)).await;
    let may_act = subject
        .issue_may_act_token(
            IssueOptions {
                policies: vec![policy.clone()],
                ..IssueOptions::default()
            },
            &agent_name,
        )
        .await
        .unwrap();
    let d = agent
        .exchange_token(&may_act.token, ExchangeOptions::default())
        .await
        .unwrap();
    let delegated = agent.with_token(&d.token).unwrap();
    let mine = format!("{own}/app");
    delegated
        .put(&mine, &data(&[("password", "m-1")]), PutOptions::default())
        .await
        .unwrap();
    delegated
        .set_rotation_policy(&mine, &spec(&provider, &[("admin", &shared)]))
        .await
        .unwrap();
    // The subject withdraws the delegation: the delegated token is gone.
    subject.revoke_token(&may_act.token).await.unwrap();
    assert_eq!(code(delegated.get(&mine).await), Code::Unauthenticated);
    let run = root.rotate(&mine, true).await;
    assert!(
        !plugin.received(admin_value),
        "the broker handed the plugin a secret on a revoked delegated token's authority: {run:?}"
    );
}
