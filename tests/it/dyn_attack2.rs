//! Attack review of the issue 12 changes of 3 December (the PostgreSQL admin
//! pool giving a connection back after a refused statement, the PKI keeping
//! its parsed CA until seal, Issue/Sign answering through the shared audit
//! write). Each test is an attempt from outside; what it checks is what the
//! attacker would have needed to break.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::db_target::{pg_admin, suffix};
use crate::dynamic_pool::PooledRole;
use crate::harness::eventually;
use crate::pki_kit::{pki_server, TRUST_DOMAIN};
use keyward::proto::v1::PkiIssueRequest;

fn issue_req(role: &str, spiffe: &str) -> PkiIssueRequest {
    PkiIssueRequest {
        role: role.to_owned(),
        spiffe_ids: vec![spiffe.to_owned()],
        dns_names: Vec::new(),
        ttl_seconds: 600,
    }
}

/// The transaction state of each of keyward's sessions of `admin`:
/// (pid, state, whether a transaction is open).
async fn session_states(admin: &str) -> Vec<(i32, String, bool)> {
    pg_admin()
        .await
        .query(
            "SELECT pid, state, xact_start IS NOT NULL FROM pg_stat_activity \
             WHERE usename = $1 AND application_name = 'keyward' ORDER BY pid",
            &[&admin],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// A lease user that owns an object in another database makes its
/// revocation fail at `DROP ROLE`, after the two `COMMIT`s of the drop batch
/// (NOLOGIN and the ended sessions are committed, the rest is refused with
/// 2BP01). The pool gives that connection back. The attacker hopes that the
/// session is still inside a transaction, so that the next caller's
/// `CREATE ROLE` lands in a block that is never committed, or that some
/// of the refused statement's work stays behind for the next one. Checked:
/// the pooled session is idle with no open transaction, the next issue
/// runs on it, and its user logs in from a fresh connection (committed).
#[tokio::test]
async fn a_refusal_after_the_commits_of_a_drop_leaves_the_pooled_session_idle() {
    let PooledRole {
        target,
        server,
        root,
        admin,
        role,
        ..
    } = PooledRole::new().await;

    let victim = root.creds(&role, None).await.unwrap();
    let pids = admin.keyward_sessions().await;
    assert_eq!(pids.len(), 1, "one pooled admin session: {pids:?}");
    let opened = server.core.dynamic.admin_connections_opened();

    // The lease user owns a table in another database (as if it had CREATE
    // there): REASSIGN/DROP OWNED of the admin's database do not reach it.
    let db = format!("kwatk2_{}", suffix());
    let pg = pg_admin().await;
    pg.batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    {
        let port = crate::pg_cluster::cluster().port;
        let c = crate::pg_cluster::cluster();
        let (other, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user(&c.admin_user)
            .password(&c.admin_password)
            .dbname(&db)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        other
            .batch_execute(&format!(
                "CREATE TABLE kept (x int); ALTER TABLE kept OWNER TO \"{}\"",
                victim.username
            ))
            .await
            .unwrap();
        drop(other);
        let _ = task.await;
    }

    // The revocation is refused by the server (not a lost session).
    let revoked = root.lease_revoke(&victim.lease_id).await;
    assert!(
        target.user_exists(&victim.username).await,
        "the drop was meant to be refused: {revoked:?}"
    );

    // The connection went back to the pool, idle, outside any transaction.
    assert_eq!(admin.keyward_sessions().await, pids, "the same session");
    assert_eq!(server.core.dynamic.idle_admin_connections(), 1);
    let states = session_states(&admin.name).await;
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(states[0].1, "idle", "pooled session state: {states:?}");
    assert!(!states[0].2, "a transaction is open on the pooled session");

    // The next caller's statement runs on it and is committed.
    let next = root.creds(&role, None).await.unwrap();
    assert_eq!(
        server.core.dynamic.admin_connections_opened(),
        opened,
        "the next issue did not reuse the connection"
    );
    assert!(
        target.can_login(&next.username, &next.password).await,
        "the next caller's user is not visible to a new session (left in a transaction)"
    );
    let states = session_states(&admin.name).await;
    assert!(
        states.iter().all(|(_, s, open)| s == "idle" && !open),
        "{states:?}"
    );

    // Clean up: without the other database the revocation goes through.
    pg.batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    assert_eq!(root.lease_revoke(&victim.lease_id).await.unwrap().0, 1);
    assert!(!target.user_exists(&victim.username).await);
    assert_eq!(root.lease_revoke(&next.lease_id).await.unwrap(), (1, 0));
    server.stop().await;
    admin.drop().await;
}

/// Seal races certificate issues in flight, round after round. The
/// attacker wants the CA's private key still held after seal (an issue
/// that parsed the CA before the seal and stores it after), or a
/// certificate answered for a call made after the seal returned.
#[tokio::test]
async fn pki_seal_racing_issues_keeps_no_ca_key_and_signs_nothing_after() {
    let (server, root) = pki_server("sealrace").await;
    let spiffe = format!("spiffe://{TRUST_DOMAIN}/sealrace/a");
    for round in 0..6 {
        root.pki_issue(issue_req("sealrace", &spiffe))
            .await
            .unwrap();
        assert!(server.core.pki.keeps_ca_key(), "round {round}: kept");
        let sealed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        // Calls made after the seal returned, of any task, once they ended.
        let answered_late = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (client, spiffe) = (root.clone(), spiffe.clone());
            let (sealed, stop) = (sealed.clone(), stop.clone());
            let answered_late = answered_late.clone();
            tasks.push(tokio::spawn(async move {
                // (calls made after the seal returned that were answered, calls after it)
                let (mut late_ok, mut late) = (0u32, 0u32);
                while !stop.load(Ordering::SeqCst) {
                    let after = sealed.load(Ordering::SeqCst);
                    let r = client.pki_issue(issue_req("sealrace", &spiffe)).await;
                    if after {
                        late += 1;
                        late_ok += u32::from(r.is_ok());
                        answered_late.fetch_add(1, Ordering::SeqCst);
                    }
                }
                (late_ok, late)
            }));
        }
        tokio::task::yield_now().await;
        root.seal().await.unwrap();
        sealed.store(true, Ordering::SeqCst);
        assert!(
            !server.core.pki.keeps_ca_key(),
            "round {round}: the CA key outlived the seal"
        );
        // Let the tasks make calls after the seal (as many as there are
        // tasks, waited for, not timed), then stop them.
        eventually("calls are made after the seal", || {
            let answered = answered_late.load(Ordering::SeqCst);
            async move { answered >= 8 }
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        let (mut late_ok, mut late) = (0, 0);
        for t in tasks {
            let (ok, n) = t.await.unwrap();
            late_ok += ok;
            late += n;
        }
        assert!(late > 0, "round {round}: no call after the seal");
        assert_eq!(late_ok, 0, "round {round}: a sealed vault signed");
        assert!(
            !server.core.pki.keeps_ca_key(),
            "round {round}: an issue in flight kept the CA key after the seal"
        );
        root.unseal(&server.unseal_share).await.unwrap();
    }
    server.stop().await;
}

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn answered_issues(path: &std::path::Path) -> usize {
    records(path)
        .iter()
        .filter(|r| {
            (r["method"] == "keyward.v1.Pki/Issue" || r["method"] == "keyward.v1.Pki/Sign")
                && r["phase"] == "outcome"
                && r["code"] == "OK"
        })
        .count()
}

/// Issues and signs through the shared audit write, from 16 callers at
/// once. Each caller, once answered, counts the OK records of Issue/Sign in
/// the log: there are at least as many as answers received so far (a record
/// is written before its answer). No private key reaches the log, and the
/// chain verifies.
#[tokio::test]
async fn pki_issue_answers_only_after_their_audit_records_and_keys_stay_out_of_the_log() {
    let (server, root) = pki_server("audq").await;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = root.clone();
        let answered = answered.clone();
        let audit = server.audit_path.clone();
        tasks.push(tokio::spawn(async move {
            let spiffe = format!("spiffe://{TRUST_DOMAIN}/audq/t{i}");
            let mut keys = Vec::new();
            for _ in 0..4 {
                let issued = client.pki_issue(issue_req("audq", &spiffe)).await.unwrap();
                answered.fetch_add(1, Ordering::SeqCst);
                let seen = answered.load(Ordering::SeqCst);
                let written = answered_issues(&audit);
                assert!(
                    written >= seen,
                    "{seen} answers but {written} records in the audit log"
                );
                keys.push(issued.private_key);
            }
            keys
        }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        keys.extend(t.await.unwrap());
    }
    assert_eq!(keys.len(), 64);
    assert_eq!(answered_issues(&server.audit_path), 64);
    let log = std::fs::read_to_string(&server.audit_path).unwrap();
    for key in &keys {
        assert!(key.contains("PRIVATE KEY"), "an issue without a key");
        for line in key
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 32)
        {
            assert!(!log.contains(line), "a private key line in the audit log");
        }
    }
    assert!(keyward::audit::verify_file(&server.audit_path).unwrap().ok);
    server.stop().await;
}
