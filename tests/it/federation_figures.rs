//! Governance figures of federation: identity tokens issued per role and
//! audience, delegations by agent and by delegator, in the report (gRPC and
//! `keyward report`) and in /metrics; refusals count nothing; a restart
//! keeps the counts.

use serde_json::Value;
use tonic::Code;

use crate::federation_issuer::{issuer_server, role_and_identity};
use crate::harness::{cli, scrape, unique, TestServer};
use crate::ident_kit::{create, login};
use keyward::client::{Client, ExchangeOptions, IssueOptions};
use keyward::proto::v1::ReportResponse;

fn series(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

async fn identity(server: &TestServer, kind: &str, policies: &[String]) -> (String, Client) {
    let root = server.root().await;
    let name = unique(kind);
    root.identity_create(create(&name, kind, "team-a", policies))
        .await
        .unwrap();
    let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let (_, client) = login(server, &sid.role_id, &sid.secret_id).await;
    (name, client)
}

fn issued(r: &ReportResponse, role: &str, audience: &str) -> u64 {
    r.identity_tokens_issued
        .iter()
        .find(|c| c.role == role && c.audience == audience)
        .map_or(0, |c| c.count)
}

fn by_key(list: &[keyward::proto::v1::CountByKey], key: &str) -> u64 {
    list.iter().find(|c| c.key == key).map_or(0, |c| c.count)
}

// Multi-threaded: `cli` waits for the child process on this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_tokens_and_delegations_are_counted_reported_and_kept() {
    let (server, _issuer) = issuer_server().await;
    let (role, _ci_name, ci) = role_and_identity(&server, &["sts.example", "b.example"]).await;
    for audience in ["sts.example", "sts.example", "b.example"] {
        ci.identity_token(&role, Some(audience), None)
            .await
            .unwrap();
    }
    // Refused: an unknown audience, a TTL past the role's. Not counted.
    assert!(ci
        .identity_token(&role, Some("evil.example"), None)
        .await
        .is_err());
    assert!(ci
        .identity_token(
            &role,
            Some("sts.example"),
            Some(std::time::Duration::from_secs(601))
        )
        .await
        .is_err());

    // A subject delegates to an agent twice; a second agent is refused.
    let root = server.root().await;
    let subject_policy = unique("subj");
    root.policy_put(
        &subject_policy,
        "[[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n",
    )
    .await
    .unwrap();
    let (subject_name, subject) = identity(
        &server,
        "service-account",
        std::slice::from_ref(&subject_policy),
    )
    .await;
    let (agent_name, agent) = identity(&server, "ai-agent", &[]).await;
    let (_other_name, other_agent) = identity(&server, "ai-agent", &[]).await;
    for _ in 0..2 {
        let may_act = subject
            .issue_may_act_token(
                IssueOptions {
                    policies: vec![subject_policy.clone()],
                    ..IssueOptions::default()
                },
                &agent_name,
            )
            .await
            .unwrap()
            .token;
        assert!(other_agent
            .exchange_token(&may_act, ExchangeOptions::default())
            .await
            .is_err());
        agent
            .exchange_token(&may_act, ExchangeOptions::default())
            .await
            .unwrap();
    }

    // A low-privileged caller does not read the report.
    let e = agent.governance_report(0, 0).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));

    let check = |r: &ReportResponse| {
        assert_eq!(issued(r, &role, "sts.example"), 2, "{r:?}");
        assert_eq!(issued(r, &role, "b.example"), 1, "{r:?}");
        assert_eq!(issued(r, &role, "evil.example"), 0, "{r:?}");
        assert_eq!(by_key(&r.delegations_by_agent, &agent_name), 2, "{r:?}");
        assert_eq!(r.delegations_by_agent.len(), 1, "{r:?}");
        assert_eq!(
            by_key(&r.delegations_by_delegator, &subject_name),
            2,
            "{r:?}"
        );
        assert_eq!(r.delegations_by_delegator.len(), 1, "{r:?}");
    };
    check(&root.governance_report(0, 0).await.unwrap());
    let issued_series =
        format!("keyward_identity_tokens_issued_total{{role=\"{role}\",audience=\"sts.example\"}}");
    let delegation_series =
        format!("keyward_delegations_total{{agent=\"{agent_name}\",delegator=\"{subject_name}\"}}");
    let text = scrape(server.metrics_addr).await;
    assert_eq!(series(&text, &issued_series), Some(2), "{text}");
    assert_eq!(series(&text, &delegation_series), Some(2), "{text}");
    assert!(!text.contains("evil.example"), "{text}");

    // `keyward report`: JSON and table.
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_string_lossy().into_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
    ];
    let (status, out, err) = cli(&["report", "--format", "json"], &env, None);
    assert_eq!(status, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert!(
        r["identity_tokens_issued"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["role"] == role.as_str()
                && c["audience"] == "sts.example"
                && c["count"] == 2),
        "{out}"
    );
    assert_eq!(r["delegations_by_agent"][&agent_name], 2, "{out}");
    assert_eq!(r["delegations_by_delegator"][&subject_name], 2, "{out}");
    let (status, out, err) = cli(&["report", "--format", "table"], &env, None);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("delegations_by_agent"), "{out}");
    assert!(out.contains(&agent_name), "{out}");

    // A restart keeps the counts: the report and the metrics.
    let server = server.restart().await;
    let root = server.root().await;
    check(&root.governance_report(0, 0).await.unwrap());
    let text = scrape(server.metrics_addr).await;
    assert_eq!(series(&text, &issued_series), Some(2), "{text}");
    assert_eq!(series(&text, &delegation_series), Some(2), "{text}");
}
