//! The governance report and its gauges, checked against a known fixture of
//! identities, uses and failures on a fresh server.

use std::collections::HashMap;

use crate::harness::{data, scrape, series_value, unique, TestServer};
use crate::ident_kit::*;
use keyward::client::PutOptions;

#[tokio::test]
async fn report_of_a_known_fixture() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("gov");
    let policy = unique("gov");
    put_policy(
        &server,
        &policy,
        &format!(
            "[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n\n\
             [[rule]]\npath = \"secret/{prefix}-other/**\"\ncapabilities = [\"read\"]\n\n\
             [[rule]]\npath = \"secret/{prefix}/admin/**\"\ncapabilities = [\"deny\"]\n"
        ),
    )
    .await;
    root.put(
        &format!("{prefix}/k"),
        &data(&[("v", "1")]),
        PutOptions::default(),
    )
    .await
    .unwrap();

    let bot = format!("b-{}", unique("bot"));
    let agent = format!("c-{}", unique("agent"));
    root.identity_create(create(&bot, "bot", "", &[]))
        .await
        .unwrap();
    let mut req = create(&agent, "ai-agent", "ml-team", &[]);
    req.expires_in_seconds = 3 * 86400;
    root.identity_create(req).await.unwrap();

    let runner = format!("a-{}", unique("runner"));
    root.identity_create(create(
        &runner,
        "ci-runner",
        "platform",
        std::slice::from_ref(&policy),
    ))
    .await
    .unwrap();
    let sid = root
        .identity_secret_id(&runner, 2 * 86400, 0, &[])
        .await
        .unwrap();
    let (t, client) = login(&server, &sid.role_id, &sid.secret_id).await;
    let anon = server.anonymous().await;
    for _ in 0..2 {
        assert!(anon
            .login_approle(&sid.role_id, &format!("kws_{}", "C".repeat(43)), 0)
            .await
            .is_err());
    }

    // Dormant after one second: wait for the report in which the bot and the
    // agent have been unused for a second while the runner, used just
    // before each look, has not (the event, not a fixed sleep).
    let mut looks = 0;
    let r = loop {
        client.get(&format!("{prefix}/k")).await.unwrap();
        let report = root.governance_report(1, 60).await.unwrap();
        if report.dormant == vec![bot.clone(), agent.clone()] {
            break report;
        }
        looks += 1;
        assert!(
            looks < 600,
            "the bot and the agent never were the only dormant ones (30 s): {:?}",
            report.dormant
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(r.identities_total, 3);
    let kinds: HashMap<String, u64> = r
        .identities_by_kind
        .iter()
        .map(|c| (c.key.clone(), c.count))
        .collect();
    assert_eq!(kinds.len(), 6, "every kind is listed: {kinds:?}");
    assert_eq!(
        (
            kinds["ci-runner"],
            kinds["bot"],
            kinds["ai-agent"],
            kinds["workload"]
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(r.unowned, vec![bot.clone()]);
    assert_eq!(r.dormant, vec![bot.clone(), agent.clone()]);
    assert_eq!(r.unused_grants.len(), 1, "{:?}", r.unused_grants);
    assert_eq!(r.unused_grants[0].identity, runner);
    assert_eq!(
        r.unused_grants[0].unused_rules,
        vec![format!("{policy}: secret/{prefix}-other/** [read]")],
        "the exercised rule and the deny rule are not listed"
    );
    assert!(
        r.long_lived_tokens
            .iter()
            .any(|l| l.identity == runner && l.accessor == t.accessor && l.ttl_seconds >= 3600),
        "{:?}",
        r.long_lived_tokens
    );
    let expiring: Vec<(&str, &str)> = r
        .expiring_soon
        .iter()
        .map(|e| (e.kind.as_str(), e.identity.as_str()))
        .collect();
    assert_eq!(
        expiring,
        vec![("secret-id", runner.as_str()), ("identity", agent.as_str())]
    );
    assert_eq!(r.failed_logins.len(), 1);
    assert_eq!(
        (
            r.failed_logins[0].identity.as_str(),
            r.failed_logins[0].source.as_str(),
            r.failed_logins[0].count
        ),
        (runner.as_str(), "127.0.0.1", 2)
    );
    assert!(r.overdue_rotations.is_empty() && r.rotation_failures.is_empty());

    // A longer dormancy threshold: nobody is dormant.
    assert!(root
        .governance_report(3600, 0)
        .await
        .unwrap()
        .dormant
        .is_empty());
    // A token without read on sys/governance is refused.
    assert_eq!(
        client.governance_report(0, 0).await.unwrap_err().code(),
        Some(tonic::Code::PermissionDenied)
    );

    let text = scrape(server.metrics_addr).await;
    assert_eq!(
        series_value(&text, r#"keyward_identities{kind="bot"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series_value(&text, r#"keyward_identities{kind="ci-runner"}"#),
        Some(1.0)
    );
    assert_eq!(series_value(&text, "keyward_identities_unowned"), Some(1.0));
    assert_eq!(series_value(&text, "keyward_unused_grants"), Some(1.0));
    assert_eq!(series_value(&text, "keyward_failed_logins"), Some(2.0));
    assert_eq!(
        series_value(
            &text,
            r#"keyward_credentials_expiring_soon{kind="secret-id"}"#
        ),
        Some(1.0)
    );
    assert!(!text.contains(&runner), "no identity name in metric labels");
}
