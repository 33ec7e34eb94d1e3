//! Durability of the lifecycle (issue 13) with a child server killed by
//! SIGKILL:
//! - the read set: reads answered just before a `kill -9` are in the set
//!   after the restart (no clean flush happened);
//! - a decommission killed between its steps (the test fault point
//!   `KEYWARD_TEST_DECOMMISSION_CRASH_AFTER` = `revoke`, then `rotate-1`:
//!   the server SIGKILLs itself right after that step is on disk) is
//!   resumed by the restarted server and finishes: both secrets rotated
//!   once, the identity disabled, the same run answered.

use std::time::Duration;

use crate::harness::{data, unique, ChildServer};
use keyward::client::{Client, PutOptions, RotationPolicySpec, ScheduleSpec};
use keyward::proto::v1::CreateIdentityRequest;

const PATIENCE: Duration = Duration::from_secs(120);

async fn setup(root: &Client, prefix: &str) -> (String, Client, String) {
    let policy = unique("crash-read");
    root.policy_put(
        &policy,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await
    .unwrap();
    let name = unique("svc");
    root.identity_create(CreateIdentityRequest {
        name: name.clone(),
        kind: "service-account".into(),
        owner: "team".into(),
        description: String::new(),
        policies: vec![policy],
        expires_in_seconds: 0,
    })
    .await
    .unwrap();
    let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let t = root
        .without_token()
        .login_approle(&sid.role_id, &sid.secret_id, 0)
        .await
        .unwrap();
    let client = root.with_token(&t.token).unwrap();
    (name, client, t.token.clone())
}

fn random_every_day() -> RotationPolicySpec {
    RotationPolicySpec {
        provider: "random".into(),
        schedule: ScheduleSpec::Every(Duration::from_secs(86_400)),
        grace: Duration::from_secs(1),
        settings: [("fields".to_owned(), "password".to_owned())]
            .into_iter()
            .collect(),
    }
}

#[tokio::test]
async fn reads_answered_before_a_sigkill_are_in_the_read_set_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = ChildServer::start(&dir.path().join("vault"), &log);
    let root = server.client().await;
    let prefix = unique("rs");
    let (name, svc, _) = setup(&root, &prefix).await;
    let mut read = Vec::new();
    for i in 0..3 {
        let path = format!("{prefix}/s{i}");
        root.put(&path, &data(&[("v", "x")]), PutOptions::default())
            .await
            .unwrap();
        svc.get(&path).await.unwrap();
        read.push(path);
    }
    server.signal("KILL");
    let mut server = server;
    assert!(!server.wait().success());

    let restarted = ChildServer::start(&dir.path().join("vault"), &log);
    let root = restarted.client().await;
    let reads = root.identity_reads(&name).await.unwrap();
    let paths: Vec<&str> = reads.paths.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, read.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(reads.paths.iter().all(|p| p.first_read.is_some()));
}

#[tokio::test]
async fn a_decommission_killed_between_steps_resumes_after_restart() {
    for crash_after in ["revoke", "rotate-1"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let vault = dir.path().join("vault");
        let server = ChildServer::start_with_env(
            &vault,
            &log,
            &[("KEYWARD_TEST_DECOMMISSION_CRASH_AFTER", crash_after)],
        );
        let root = server.client().await;
        let prefix = unique("dc");
        let (name, svc, token) = setup(&root, &prefix).await;
        let paths = [format!("{prefix}/a"), format!("{prefix}/b")];
        let mut before = Vec::new();
        for path in &paths {
            root.put(
                path,
                &data(&[("password", "initial")]),
                PutOptions::default(),
            )
            .await
            .unwrap();
            root.set_rotation_policy(path, &random_every_day())
                .await
                .unwrap();
            svc.get(path).await.unwrap();
            before.push(root.get(path).await.unwrap().version);
        }
        let plain = format!("{prefix}/plain");
        root.put(&plain, &data(&[("v", "x")]), PutOptions::default())
            .await
            .unwrap();
        svc.get(&plain).await.unwrap();

        let cut = root.identity_decommission(&name, false).await;
        assert!(
            cut.is_err(),
            "the server died in the middle ({crash_after})"
        );
        let mut server = server;
        assert!(!server.wait().success(), "killed by the fault point");

        let restarted = ChildServer::start(&vault, &log);
        let root = restarted.client().await;
        // The resume task finishes it by itself; wait for the event.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let histories_done = {
                let mut all = true;
                for path in &paths {
                    let runs = root.rotation_history(path).await.unwrap();
                    all &= runs.iter().any(|r| r.state == "succeeded");
                }
                all
            };
            if histories_done {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the decommission did not resume ({crash_after})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Asking now answers the finished run: exactly one rotation each.
        let done = root.identity_decommission(&name, false).await.unwrap();
        assert!(done.done, "{done:?}");
        assert_eq!(done.rotated.len(), 2, "{done:?}");
        assert_eq!(done.not_rotatable, vec![plain.clone()]);
        assert!(root.identity_get(&name).await.unwrap().disabled);
        for (path, old) in paths.iter().zip(&before) {
            let runs = root.rotation_history(path).await.unwrap();
            assert_eq!(
                runs.len(),
                1,
                "one rotation of {path} ({crash_after}): {runs:?}"
            );
            assert!(root.get(path).await.unwrap().version > *old);
        }
        let svc_again = root.with_token(&token).unwrap();
        assert!(svc_again.get(&plain).await.is_err(), "its token is dead");
        let audit = std::fs::read_to_string(dir.path().join("vault").join("audit.log")).unwrap();
        assert!(
            audit.contains("keyward.lifecycle/DecommissionResume"),
            "the resume is audited ({crash_after})"
        );
    }
}
