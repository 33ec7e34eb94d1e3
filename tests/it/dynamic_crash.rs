//! Crash safety of dynamic credentials: a child server kills itself
//! (SIGKILL) at each step of an issue and of a revocation; after a restart
//! without the fault point, the sweeper leaves no user behind and no lease.

use std::time::Duration;

use crate::db_target::{suffix, Kind, Target};
use crate::harness::{data, eventually, ChildServer};
use keyward::client::{Client, DynamicRoleSpec, PutOptions};

const PATIENCE: Duration = Duration::from_secs(120);

/// Users of the private PostgreSQL cluster named `kw_<role>_...`.
async fn users_of(role: &str) -> Vec<String> {
    let c = crate::db_target::pg_admin().await;
    let pattern = format!("kw\\_{}\\_%", role.replace('_', "\\_"));
    c.query(
        "SELECT rolname FROM pg_roles WHERE rolname LIKE $1",
        &[&pattern],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn define(client: &Client, target: &Target, role: &str, ttl: u64) {
    let pairs = target.admin();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let admin = format!("dyn/{role}/admin");
    client
        .put(&admin, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
    client
        .dynamic_role_put(&DynamicRoleSpec {
            name: role.to_owned(),
            provider: "postgres".into(),
            config: [("admin_secret".to_owned(), admin)].into_iter().collect(),
            ttl: Duration::from_secs(ttl),
            max_ttl: Duration::from_secs(ttl),
        })
        .await
        .unwrap();
}

async fn killed(mut armed: ChildServer, step: &str) {
    let status = tokio::task::spawn_blocking(move || armed.wait());
    let status = tokio::time::timeout(PATIENCE, status)
        .await
        .unwrap_or_else(|_| panic!("the fault point {step} did not fire"))
        .unwrap();
    assert!(!status.success(), "killed at {step}: {status:?}");
}

#[tokio::test]
async fn a_crash_at_each_step_of_an_issue_leaves_no_user_after_the_sweep() {
    let target = Target::new(Kind::Postgres).await;
    for (step, made) in [("recorded", false), ("created", true)] {
        let dir = tempfile::tempdir().unwrap();
        let vault = dir.path().join("vault");
        let log = dir.path().join("server.log");
        let role = format!("crash_{step}_{}", suffix());
        let armed =
            ChildServer::start_with_env(&vault, &log, &[("KEYWARD_TEST_LEASE_CRASH_AFTER", step)]);
        let client = armed.client().await;
        define(&client, &target, &role, 2).await;
        assert!(
            client.creds(&role, None).await.is_err(),
            "no answer after a kill"
        );
        killed(armed, step).await;
        assert_eq!(users_of(&role).await.len(), usize::from(made), "{step}");
        let restarted = ChildServer::start(&vault, &log);
        let client = restarted.client().await;
        let r = role.clone();
        eventually(&format!("no user of {role} after the sweep"), move || {
            let r = r.clone();
            async move { users_of(&r).await.is_empty() }
        })
        .await;
        let c = client.clone();
        eventually("no lease left", move || {
            let c = c.clone();
            async move { c.lease_list("", false).await.unwrap().is_empty() }
        })
        .await;
        drop(restarted);
    }
}

#[tokio::test]
async fn a_crash_between_marking_and_dropping_is_finished_after_restart() {
    let target = Target::new(Kind::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let log = dir.path().join("server.log");
    let role = format!("crash_marked_{}", suffix());
    let armed = ChildServer::start_with_env(
        &vault,
        &log,
        &[("KEYWARD_TEST_LEASE_CRASH_AFTER", "marked")],
    );
    let client = armed.client().await;
    // Long TTL: only the marked revocation can remove it soon.
    define(&client, &target, &role, 3600).await;
    let c = client.creds(&role, None).await.unwrap();
    assert!(target.can_login(&c.username, &c.password).await);
    assert!(client.lease_revoke(&c.lease_id).await.is_err());
    killed(armed, "marked").await;
    assert!(target.user_exists(&c.username).await);
    let restarted = ChildServer::start(&vault, &log);
    let r = role.clone();
    eventually(
        "the marked lease's user is dropped after restart",
        move || {
            let r = r.clone();
            async move { users_of(&r).await.is_empty() }
        },
    )
    .await;
    drop(restarted);
}
