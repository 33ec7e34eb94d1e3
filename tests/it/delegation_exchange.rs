//! Delegated tokens for agents (RFC 8693), from the callers' side: a
//! subject mints an exchange-only token naming an agent; the agent exchanges
//! it with its own token and gets the intersection of both, for minutes.

use std::time::Duration;

use serde_json::Value;
use tonic::Code;

use crate::harness::{data, eventually, unique, TestServer};
use crate::ident_kit::{create, expire_in, login};
use keyward::client::{Client, ClientError, ExchangeOptions, IssueOptions, PutOptions};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.expect_err("the call should have been refused")
        .code()
        .expect("a server status, not a local error")
}

fn message<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    r.expect_err("the call should have been refused")
        .to_string()
}

/// A subject (service account), an agent (ai-agent), a second agent and a
/// service account that is not allowed to act; secrets both, one side
/// only, and a `delegated = false` one.
struct World {
    server: TestServer,
    p: String,
    subject: Client,
    agent: Client,
    agent_name: String,
    other_agent: Client,
    other_agent_name: String,
    subject_policy: String,
}

async fn identity(
    server: &TestServer,
    root: &Client,
    kind: &str,
    policies: &[String],
) -> (String, Client) {
    let name = unique(kind);
    root.identity_create(create(&name, kind, "team-a", policies))
        .await
        .unwrap();
    let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let (_, client) = login(server, &sid.role_id, &sid.secret_id).await;
    (name, client)
}

async fn world() -> World {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let p = unique("dlg");
    for path in ["both", "subject-only", "agent-only", "guarded"] {
        root.put(
            &format!("{p}/{path}"),
            &data(&[("v", path)]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let subject_policy = unique("subj");
    root.policy_put(
        &subject_policy,
        &format!(
            "[[rule]]\npath = \"secret/{p}/both\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"secret/{p}/subject-only\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"secret/{p}/w-subject/**\"\ncapabilities = [\"write\"]\n\
             [[rule]]\npath = \"secret/{p}/guarded\"\ncapabilities = [\"read\"]\ndelegated = false\n\
             [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    let agent_policy = unique("agent");
    root.policy_put(
        &agent_policy,
        &format!(
            "[[rule]]\npath = \"secret/{p}/both\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"secret/{p}/agent-only\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"secret/{p}/w-agent/**\"\ncapabilities = [\"write\"]\n\
             [[rule]]\npath = \"secret/{p}/guarded\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    let (_, subject) = identity(
        &server,
        &root,
        "service-account",
        std::slice::from_ref(&subject_policy),
    )
    .await;
    let (agent_name, agent) = identity(
        &server,
        &root,
        "ai-agent",
        std::slice::from_ref(&agent_policy),
    )
    .await;
    let (other_agent_name, other_agent) = identity(
        &server,
        &root,
        "ai-agent",
        std::slice::from_ref(&agent_policy),
    )
    .await;
    World {
        server,
        p,
        subject,
        agent,
        agent_name,
        other_agent,
        other_agent_name,
        subject_policy,
    }
}

impl World {
    /// The subject's exchange-only token naming `agent`.
    async fn may_act(&self, agent: &str) -> String {
        self.subject
            .issue_may_act_token(
                IssueOptions {
                    policies: vec![self.subject_policy.clone()],
                    ..IssueOptions::default()
                },
                agent,
            )
            .await
            .unwrap()
            .token
    }

    /// A delegated token for the agent, and a client holding it.
    async fn delegated(&self) -> (String, keyward::proto::v1::TokenResponse, Client) {
        let subject_token = self.may_act(&self.agent_name).await;
        let d = self
            .agent
            .exchange_token(&subject_token, ExchangeOptions::default())
            .await
            .unwrap();
        let client = self.agent.with_token(&d.token).unwrap();
        (subject_token, d, client)
    }
}

#[tokio::test]
async fn the_may_act_token_is_exchange_only() {
    let w = world().await;
    let subject_token = w.may_act(&w.agent_name).await;
    let held = w.agent.with_token(&subject_token).unwrap();
    // Any direct use is refused, by whoever holds it, with the reason.
    let refused = message(held.get(&format!("{}/both", w.p)).await);
    assert!(refused.contains("exchange-only"), "{refused}");
    assert_eq!(code(held.lookup_self().await), Code::PermissionDenied);
    assert_eq!(
        code(held.issue_token(IssueOptions::default()).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            held.exchange_token(&subject_token, ExchangeOptions::default())
                .await
        ),
        Code::PermissionDenied
    );
    // Another agent may not exchange it; nothing is issued.
    let other = message(
        w.other_agent
            .exchange_token(&subject_token, ExchangeOptions::default())
            .await,
    );
    assert!(other.contains("names another identity"), "{other}");
    // The subject itself is not the actor it named either.
    assert_eq!(
        code(
            w.subject
                .exchange_token(&subject_token, ExchangeOptions::default())
                .await
        ),
        Code::PermissionDenied
    );
    // An ordinary token is not a subject token.
    let plain = w
        .subject
        .issue_token(IssueOptions {
            policies: vec![w.subject_policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let e = message(
        w.agent
            .exchange_token(&plain.token, ExchangeOptions::default())
            .await,
    );
    assert!(e.contains("not exchange-only"), "{e}");
    // The other agent still works for itself: the refusals were about the token.
    w.other_agent.get(&format!("{}/both", w.p)).await.unwrap();
    let _ = &w.other_agent_name;
}

#[tokio::test]
async fn an_agent_gets_the_intersection_and_nothing_else() {
    let w = world().await;
    let (_, d, delegated) = w.delegated().await;
    let p = &w.p;
    // Both may read it.
    let got = delegated.get(&format!("{p}/both")).await.unwrap();
    assert_eq!(got.data["v"].expose(), b"both");
    // One side only: refused, both ways.
    for path in ["subject-only", "agent-only"] {
        assert_eq!(
            code(delegated.get(&format!("{p}/{path}")).await),
            Code::PermissionDenied,
            "{path}"
        );
    }
    // Each side reads its own directly.
    w.subject.get(&format!("{p}/subject-only")).await.unwrap();
    w.agent.get(&format!("{p}/agent-only")).await.unwrap();
    // Writes: the subject may but the agent may not, and the other way round.
    for path in ["w-subject/x", "w-agent/x"] {
        assert_eq!(
            code(
                delegated
                    .put(
                        &format!("{p}/{path}"),
                        &data(&[("v", "1")]),
                        PutOptions::default()
                    )
                    .await
            ),
            Code::PermissionDenied,
            "{path}"
        );
    }
    w.subject
        .put(
            &format!("{p}/w-subject/x"),
            &data(&[("v", "1")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    w.agent
        .put(
            &format!("{p}/w-agent/x"),
            &data(&[("v", "1")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    // `delegated = false`: the subject reads it, the agent reads it, the
    // delegated token does not.
    w.subject.get(&format!("{p}/guarded")).await.unwrap();
    w.agent.get(&format!("{p}/guarded")).await.unwrap();
    assert_eq!(
        code(delegated.get(&format!("{p}/guarded")).await),
        Code::PermissionDenied
    );
    // A delegated token is not exchanged again and issues no children.
    let again = w.may_act(&w.agent_name).await;
    let chained = message(
        delegated
            .exchange_token(&again, ExchangeOptions::default())
            .await,
    );
    assert!(chained.contains("cannot be exchanged again"), "{chained}");
    assert_ne!(
        code(delegated.issue_token(IssueOptions::default()).await),
        Code::Ok
    );
    // Lookup shows the chain.
    let me = delegated.lookup_self().await.unwrap();
    assert_eq!(me.actor_identity, w.agent_name);
    assert_eq!(
        me.actor_accessor,
        w.agent.lookup_self().await.unwrap().accessor
    );
    assert_eq!(me.method, "exchange");
    assert_eq!(me.accessor, d.accessor);
}

#[tokio::test]
async fn every_use_is_audited_with_both_identities() {
    let w = world().await;
    let (subject_token, d, delegated) = w.delegated().await;
    delegated.get(&format!("{}/both", w.p)).await.unwrap();
    let _ = delegated.get(&format!("{}/agent-only", w.p)).await;
    let subject_info = w.subject.lookup_token(&subject_token).await;
    // (The subject may look up its own exchange-only child by text.)
    let subject_acc = subject_info.map(|i| i.accessor).unwrap_or_default();
    let agent_acc = w.agent.lookup_self().await.unwrap().accessor;
    let subject_name = w.subject.lookup_self().await.unwrap().identity;
    let text = std::fs::read_to_string(&w.server.audit_path).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["accessor"] == d.accessor.as_str())
        .collect();
    assert!(records.len() >= 2, "{records:?}");
    let mut denied = 0;
    for r in &records {
        assert_eq!(r["identity"], subject_name.as_str(), "{r}");
        assert_eq!(r["actor_identity"], w.agent_name.as_str(), "{r}");
        assert_eq!(r["actor_accessor"], agent_acc.as_str(), "{r}");
        assert_eq!(r["subject_accessor"], subject_acc.as_str(), "{r}");
        if r["outcome"] == "denied" {
            denied += 1;
        }
    }
    assert!(
        denied >= 1,
        "the refused read is audited with the chain too"
    );
    // The tokens themselves never reach the log.
    assert!(!text.contains(&d.token[4..30]));
    assert!(!text.contains(&subject_token[4..30]));
}

#[tokio::test]
async fn revoking_the_subject_token_stops_it() {
    let w = world().await;
    let (subject_token, _, delegated) = w.delegated().await;
    delegated.get(&format!("{}/both", w.p)).await.unwrap();
    assert!(w.subject.revoke_token(&subject_token).await.unwrap() >= 2);
    assert_eq!(
        code(delegated.get(&format!("{}/both", w.p)).await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn revoking_the_agent_token_stops_it() {
    let w = world().await;
    let (_, _, delegated) = w.delegated().await;
    delegated.get(&format!("{}/both", w.p)).await.unwrap();
    assert!(w.agent.revoke_self().await.unwrap() >= 2);
    assert_eq!(
        code(delegated.get(&format!("{}/both", w.p)).await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn disabling_the_agent_stops_it() {
    let w = world().await;
    let (_, _, delegated) = w.delegated().await;
    delegated.get(&format!("{}/both", w.p)).await.unwrap();
    w.server
        .root()
        .await
        .identity_disable(&w.agent_name)
        .await
        .unwrap();
    assert_eq!(
        code(delegated.get(&format!("{}/both", w.p)).await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn an_agent_past_its_expiry_cannot_be_named_to_act() {
    let w = world().await;
    // Named while it is active: fine.
    w.may_act(&w.other_agent_name).await;
    expire_in(&w.server.root().await, &w.other_agent_name, 1).await;
    // Waits for the expiry itself; from then on it may not be named.
    eventually("an expired agent may not be named to act", || async {
        let named = w
            .subject
            .issue_may_act_token(
                IssueOptions {
                    policies: vec![w.subject_policy.clone()],
                    ..IssueOptions::default()
                },
                &w.other_agent_name,
            )
            .await;
        matches!(named, Err(e) if e.to_string().contains("not past its expiry"))
    })
    .await;
}

#[tokio::test]
async fn its_life_is_bounded_by_both_tokens_and_the_ceiling() {
    let w = world().await;
    let subject_token = w.may_act(&w.agent_name).await;
    // The ceiling (15 minutes by default) wins over a longer request.
    let d = w
        .agent
        .exchange_token(
            &subject_token,
            ExchangeOptions {
                ttl: Some(Duration::from_secs(3 * 3600)),
                ..ExchangeOptions::default()
            },
        )
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let exp = d.expires_at.as_ref().unwrap().seconds;
    assert!(
        exp <= now + 15 * 60 + 5 && exp >= now + 15 * 60 - 60,
        "{exp} vs {now}"
    );
    // A short-lived subject token bounds it.
    let short = w
        .subject
        .issue_may_act_token(
            IssueOptions {
                policies: vec![w.subject_policy.clone()],
                ttl: Some(Duration::from_secs(120)),
                ..IssueOptions::default()
            },
            &w.agent_name,
        )
        .await
        .unwrap();
    let d2 = w
        .agent
        .exchange_token(&short.token, ExchangeOptions::default())
        .await
        .unwrap();
    assert!(d2.expires_at.as_ref().unwrap().seconds <= short.expires_at.as_ref().unwrap().seconds);
    // A short-lived agent token bounds it too.
    let agent_short = w
        .agent
        .issue_token(IssueOptions {
            ttl: Some(Duration::from_secs(60)),
            policies: w.agent.lookup_self().await.unwrap().policies,
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let agent_short_client = w.agent.with_token(&agent_short.token).unwrap();
    let d3 = agent_short_client
        .exchange_token(&subject_token, ExchangeOptions::default())
        .await
        .unwrap();
    assert!(
        d3.expires_at.as_ref().unwrap().seconds <= agent_short.expires_at.as_ref().unwrap().seconds
    );
    // Uses are counted.
    let d4 = w
        .agent
        .exchange_token(
            &subject_token,
            ExchangeOptions {
                uses: 2,
                ..ExchangeOptions::default()
            },
        )
        .await
        .unwrap();
    let limited = w.agent.with_token(&d4.token).unwrap();
    limited.get(&format!("{}/both", w.p)).await.unwrap();
    limited.get(&format!("{}/both", w.p)).await.unwrap();
    assert_eq!(
        code(limited.get(&format!("{}/both", w.p)).await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn bad_exchanges_are_refused_with_the_rule_and_issue_nothing() {
    let w = world().await;
    let root = w.server.root().await;
    let subject_token = w.may_act(&w.agent_name).await;
    let subject_acc = w
        .subject
        .lookup_token(&subject_token)
        .await
        .map(|i| i.accessor);
    // A policy the subject token does not hold.
    let wider = message(
        w.agent
            .exchange_token(
                &subject_token,
                ExchangeOptions {
                    policies: vec!["default-nothing".into()],
                    ..ExchangeOptions::default()
                },
            )
            .await,
    );
    assert!(wider.contains("not held by the subject token"), "{wider}");
    // Root is never delegated.
    let rooted = message(
        root.exchange_token(
            &subject_token,
            ExchangeOptions {
                policies: vec!["root".into()],
                ..ExchangeOptions::default()
            },
        )
        .await,
    );
    assert!(!rooted.is_empty());
    // A garbage subject token, and a revoked one.
    assert_eq!(
        code(
            w.agent
                .exchange_token("kwt_notatoken", ExchangeOptions::default())
                .await
        ),
        Code::Unauthenticated
    );
    let revoked = w.may_act(&w.agent_name).await;
    w.subject.revoke_token(&revoked).await.unwrap();
    let e = message(
        w.agent
            .exchange_token(&revoked, ExchangeOptions::default())
            .await,
    );
    assert!(e.contains("subject token is not valid"), "{e}");
    // An expired one (waits for the expiry itself, with a generous bound).
    let short = w
        .subject
        .issue_may_act_token(
            IssueOptions {
                policies: vec![w.subject_policy.clone()],
                ttl: Some(Duration::from_secs(1)),
                ..IssueOptions::default()
            },
            &w.agent_name,
        )
        .await
        .unwrap();
    eventually("the exchange-only token expired", || async {
        matches!(
            w.subject.lookup_token(&short.token).await,
            Err(e) if e.code() == Some(Code::NotFound)
        )
    })
    .await;
    let e = message(
        w.agent
            .exchange_token(&short.token, ExchangeOptions::default())
            .await,
    );
    assert!(e.contains("subject token is not valid"), "{e}");
    // An actor of a kind that may not act: minting is refused ...
    let svc = unique("svc");
    root.identity_create(create(&svc, "service-account", "team-a", &[]))
        .await
        .unwrap();
    let kind = message(
        w.subject
            .issue_may_act_token(IssueOptions::default(), &svc)
            .await,
    );
    assert!(kind.contains("'service-account' may not act"), "{kind}");
    let nobody = message(
        w.subject
            .issue_may_act_token(IssueOptions::default(), "no-such-identity")
            .await,
    );
    assert!(nobody.contains("names no identity"), "{nobody}");
    // ... and so is the exchange once the kind leaves delegation.actor_kinds.
    let mut config = w.server.core.federation.config();
    config.actor_kinds = vec!["bot".into()];
    w.server.core.federation.set_config(config);
    let e = message(
        w.agent
            .exchange_token(&subject_token, ExchangeOptions::default())
            .await,
    );
    assert!(e.contains("'ai-agent' may not act"), "{e}");
    // Nothing was issued under the subject token by any refused exchange.
    if let Ok(acc) = subject_acc {
        let info = root.lookup_accessor(&acc).await.unwrap();
        assert_eq!(info.may_act, w.agent_name);
    }
    let tree: Vec<Value> = std::fs::read_to_string(&w.server.audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| {
            r["method"] == "keyward.v1.Auth/ExchangeToken"
                && r["outcome"] == "allowed"
                && r["phase"] != "request"
        })
        .collect();
    assert!(tree.is_empty(), "no exchange succeeded: {tree:?}");
}

/// What an agent reads through a delegated token is in the read sets of
/// both identities: decommissioning the agent rotates it. Before, it went
/// to the subject's only, and the agent's plan called the path readable but
/// never read.
#[tokio::test]
async fn a_delegated_read_is_in_the_agents_read_set_too() {
    let w = world().await;
    let (_, _, delegated) = w.delegated().await;
    let path = format!("{}/both", w.p);
    delegated.get(&path).await.unwrap();
    let root = w.server.root().await;
    let subject_name = w.subject.lookup_self().await.unwrap().identity;
    for name in [&w.agent_name, &subject_name] {
        let reads = root.identity_reads(name).await.unwrap();
        assert!(
            reads.paths.iter().any(|r| r.path == path),
            "{name}: {reads:?}"
        );
    }
    let plan = root
        .identity_decommission(&w.agent_name, true)
        .await
        .unwrap();
    assert!(!plan.readable_never_read.contains(&path), "{plan:?}");
}

/// A token with a use limit cannot be the actor of an exchange: spending
/// one of its uses would buy a delegated token with no limit. (A parent
/// with a use limit was already refused.)
#[tokio::test]
async fn an_actor_with_a_use_limit_is_refused() {
    let w = world().await;
    let subject_token = w.may_act(&w.agent_name).await;
    let counted = w
        .agent
        .issue_token(IssueOptions {
            uses: 2,
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let counted = w.agent.with_token(&counted.token).unwrap();
    let e = counted
        .exchange_token(&subject_token, ExchangeOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("use limit"), "{e}");
    // The agent's own token still may.
    w.agent
        .exchange_token(&subject_token, ExchangeOptions::default())
        .await
        .unwrap();
}

/// The last use of a delegated token (uses 1) is a listing that waits for
/// a turn of the actor's (the test holds the actor's own turns). Its use
/// revoked the delegated token, so the check after the wait
/// (`Gate::recheck`) cannot read it; it reads what it hung from instead: the
/// actor's token or the subject's (exchange-only) token revoked meanwhile
/// is `UNAUTHENTICATED`, and either side's policy narrowed meanwhile
/// `PERMISSION_DENIED`. Undisturbed, the last use gets its answer.
#[tokio::test]
async fn a_delegated_last_use_that_waited_follows_its_actor() {
    use keyward::core::offload::LISTINGS_PER_CALLER;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let p = unique("dlgw");
    root.put(
        &format!("{p}/a"),
        &data(&[("v", "a")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let rules = format!(
        "[[rule]]\npath = \"secret/{p}\"\ncapabilities = [\"list\"]\n\
         [[rule]]\npath = \"secret/{p}/**\"\ncapabilities = [\"read\"]\n"
    );
    let subject_policy = unique("subj");
    let issue = "[[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n";
    let subject_rules = format!("{rules}{issue}");
    root.policy_put(&subject_policy, &subject_rules)
        .await
        .unwrap();
    let (_, subject) = identity(
        &server,
        &root,
        "service-account",
        std::slice::from_ref(&subject_policy),
    )
    .await;
    let listings = &server.core.offload.listings;
    let narrowed = format!("[[rule]]\npath = \"secret/{p}-other/**\"\ncapabilities = [\"read\"]\n");
    for meanwhile in [
        "nothing",
        "actor revoked",
        "actor narrowed",
        "subject revoked",
        "subject narrowed",
    ] {
        let mut attempts = 0;
        let answer = loop {
            // The subject's policy as it was (a case below narrows it).
            root.policy_put(&subject_policy, &subject_rules)
                .await
                .unwrap();
            // A new agent each time: one case revokes its token, another
            // narrows its policy.
            let agent_policy = unique("agent");
            root.policy_put(&agent_policy, &rules).await.unwrap();
            let (agent_name, agent) = identity(
                &server,
                &root,
                "ai-agent",
                std::slice::from_ref(&agent_policy),
            )
            .await;
            let actor_accessor = agent.lookup_self().await.unwrap().accessor;
            let may_act = subject
                .issue_may_act_token(
                    IssueOptions {
                        policies: vec![subject_policy.clone()],
                        ..IssueOptions::default()
                    },
                    &agent_name,
                )
                .await
                .unwrap();
            let subject_token = may_act.token.clone();
            let d = agent
                .exchange_token(
                    &subject_token,
                    ExchangeOptions {
                        uses: 1,
                        ..ExchangeOptions::default()
                    },
                )
                .await
                .unwrap();
            let delegated = agent.with_token(&d.token).unwrap();
            let mut held = Vec::new();
            for _ in 0..LISTINGS_PER_CALLER {
                held.push(listings.turn(&agent_name).await.expect("a free turn"));
            }
            let prefix = p.clone();
            let listing = tokio::spawn(async move { delegated.list(&prefix).await });
            eventually("the listing waits for a turn", || async {
                listings.waiting() > 0
            })
            .await;
            match meanwhile {
                "actor revoked" => {
                    root.revoke_accessor(&actor_accessor).await.unwrap();
                }
                "actor narrowed" => {
                    root.policy_put(&agent_policy, &narrowed).await.unwrap();
                }
                "subject revoked" => {
                    root.revoke_accessor(&may_act.accessor).await.unwrap();
                }
                "subject narrowed" => {
                    root.policy_put(&subject_policy, &narrowed).await.unwrap();
                }
                _ => {}
            }
            drop(held);
            let answer = listing.await.unwrap();
            attempts += 1;
            // Only a machine so loaded that the step above took the whole
            // 10 s of the listing's wait for a turn: try again.
            let out_of_time =
                matches!(&answer, Err(e) if e.code() == Some(Code::ResourceExhausted));
            if !out_of_time || attempts == 3 {
                break answer;
            }
        };
        match meanwhile {
            "nothing" => assert_eq!(answer.unwrap(), vec![format!("{p}/a")]),
            "actor revoked" | "subject revoked" => {
                assert_eq!(code(answer), Code::Unauthenticated, "{meanwhile}")
            }
            _ => assert_eq!(code(answer), Code::PermissionDenied, "{meanwhile}"),
        }
    }
}
