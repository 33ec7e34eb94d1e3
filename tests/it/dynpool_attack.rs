//! Attacks on the pool of admin connections (issue 12, speed work).
//!
//! Seal while an issue is between its checks (role and admin secret read,
//! lease recorded) and borrowing its admin connection: the issue must not
//! leave a logged-in admin session pooled behind a sealed vault. The window
//! is widened by a role whose SCRAM verifier takes 1,000,000 PBKDF2 rounds
//! (computed after the lease is recorded, before the connection is taken);
//! the seal is sent as soon as the lease shows. If the seal lands later,
//! the test checks nothing the fix does not also hold, so it cannot fail
//! on the fixed code whatever the machine's speed.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::db_target::{pg_admin, suffix, Kind, Target};
use crate::harness::{data, eventually, unique, TestServer};
use keyward::client::{DynamicRoleSpec, PutOptions};

async fn keyward_sessions(name: &str) -> Vec<i32> {
    pg_admin()
        .await
        .query(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND application_name = 'keyward'",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn an_issue_in_flight_at_seal_leaves_no_pooled_admin_session() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;

    let admin = format!("kwadm_{}", suffix());
    let password = crate::db_target::password();
    let pg = pg_admin().await;
    pg.batch_execute(&format!(
        "CREATE ROLE {admin} LOGIN SUPERUSER PASSWORD '{password}'"
    ))
    .await
    .unwrap();
    let granted = format!("kwpoolgrp_{}", suffix());
    pg.batch_execute(&format!("CREATE ROLE {granted} NOLOGIN"))
        .await
        .unwrap();
    let path = unique("dynpoolatk/admin");
    let port = crate::pg_cluster::cluster().port.to_string();
    root.put(
        &path,
        &data(&[
            ("host", "127.0.0.1"),
            ("port", &port),
            ("username", &admin),
            ("password", &password),
            ("database", "postgres"),
        ]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let role = format!("poolatk_{}", suffix());
    let config: BTreeMap<String, String> = [
        ("admin_secret", path.as_str()),
        ("roles", granted.as_str()),
        ("scram_iterations", "1000000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    root.dynamic_role_put(&DynamicRoleSpec {
        name: role.clone(),
        provider: "postgres".into(),
        config,
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    })
    .await
    .unwrap();
    // The role check at definition left no pooled session.
    sessions_become(&admin, "no session before the issue", |p| p.is_empty()).await;

    let issuer = root.clone();
    let issuing = {
        let role = role.clone();
        tokio::spawn(async move { issuer.creds(&role, None).await })
    };
    let prefix = format!("dynamic/{role}");
    let mut seen = false;
    for _ in 0..20_000 {
        if !root.lease_list(&prefix, false).await.unwrap().is_empty() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(seen, "the lease never showed");
    root.seal().await.unwrap();
    // Whatever the issue answers, once it is over no admin session of
    // keyward's may stay open behind the sealed vault.
    let _ = issuing.await.unwrap();
    assert_eq!(server.core.dynamic.idle_admin_connections(), 0);
    sessions_become(&admin, "no admin session stays open after seal", |p| {
        p.is_empty()
    })
    .await;

    root.unseal(&server.unseal_share).await.unwrap();
    root.lease_revoke_prefix(&prefix).await.unwrap();
    let left = prefix.clone();
    let r = root.clone();
    eventually("every lease of the role is revoked", move || {
        let r = r.clone();
        let left = left.clone();
        async move { r.lease_list(&left, false).await.unwrap().is_empty() }
    })
    .await;
    let like = format!("kw_{role}_%");
    let users: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1",
            &[&like],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 0, "a user of the role was left behind");
    drop(target);
    server.stop().await;
    pg.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
        &[&admin],
    )
    .await
    .unwrap();
    sessions_become(&admin, "the admin's sessions end", |p| p.is_empty()).await;
    pg.batch_execute(&format!("DROP ROLE {admin}; DROP ROLE {granted}"))
        .await
        .unwrap();
}

/// Polls (at most 15 s, well under the pool's 60 s idle close) until the
/// keyward sessions logged in as `admin` pass `check`.
async fn sessions_become(admin: &str, what: &str, check: impl Fn(&[i32]) -> bool) {
    for _ in 0..300 {
        if check(&keyward_sessions(admin).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

/// The benchmark beside OpenBao starts real servers with the PostgreSQL
/// admin password (`BENCH_PG_PASSWORD` when the cluster is not on trust)
/// and an unseal key: none may be an argument of a command, which every
/// local user reads in `ps` / `/proc/<pid>/cmdline`.
#[test]
fn the_openbao_bench_script_puts_no_secret_on_a_command_line() {
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/openbao_dynamic_bench.sh"),
    )
    .unwrap();
    for (n, line) in script.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        assert!(
            !line.contains("=\"$PGPASSWORD\"")
                || line.starts_with("PGPASSWORD=")
                || line.starts_with("export "),
            "line {}: the admin password is a command argument: {line}",
            n + 1
        );
        assert!(
            !(line.contains("operator unseal") && line.contains("$(")),
            "line {}: the unseal key is a command argument: {line}",
            n + 1
        );
    }
}
