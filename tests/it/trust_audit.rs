//! Issue 10 items 9 and 12: a change is recorded before it acts (and does
//! not act without its record), unauthenticated callers cannot grow the
//! audit log without bound, and seal works with the log down.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tonic::Code;

use crate::harness::{cli, data, unique, TestServer};
use crate::ident_kit::approle_identity;
use keyward::audit::{AuditEvent, AuditLog, Outcome, Phase};
use keyward::client::{Client, IssueOptions, PutOptions};

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn code<T: std::fmt::Debug>(r: Result<T, keyward::client::ClientError>) -> Code {
    r.unwrap_err().code().unwrap()
}

/// A dev server whose audit log cannot be written (every write fails).
async fn audit_down() -> TestServer {
    TestServer::dev_with(|c| c.audit_path = "/dev/full".into()).await
}

#[tokio::test]
async fn a_write_whose_request_record_cannot_be_written_does_not_act() {
    let server = audit_down().await;
    let root = server.root().await;
    let path = unique("unrecorded");
    let put = root
        .put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await;
    assert_eq!(code(put), Code::Unavailable);
    let issued = root.issue_token(IssueOptions::default()).await;
    assert_eq!(code(issued), Code::Unavailable);

    // With the log back (a restart on the same folder writes a new file),
    // the secret was never written.
    let server = server.restart().await;
    let root = server.root().await;
    assert_eq!(code(root.get(&path).await), Code::NotFound);
}

#[tokio::test]
async fn seal_goes_ahead_when_the_log_cannot_be_written() {
    let server = audit_down().await;
    let root = server.root().await;
    assert!(!server.core.is_sealed());
    root.seal().await.unwrap();
    assert!(server.core.is_sealed());
}

#[tokio::test]
async fn a_change_leaves_a_request_and_an_outcome_and_a_read_one_record() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("paired");
    root.put(&path, &data(&[("k", "v1")]), PutOptions::default())
        .await
        .unwrap();
    root.put(&path, &data(&[("k", "v2")]), PutOptions::default())
        .await
        .unwrap();
    root.get(&path).await.unwrap();
    root.metadata(&path).await.unwrap();
    root.delete(&path, Some(2)).await.unwrap();
    root.undelete(&path, 2).await.unwrap();
    root.destroy(&path, 1).await.unwrap();
    let policy = unique("pol");
    let document = format!("[[rule]]\npath = \"secret/{path}\"\ncapabilities = [\"read\"]\n");
    root.policy_put(&policy, &document).await.unwrap();
    root.policy_get(&policy).await.unwrap();
    let child = root
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let child = root.with_token(&child.token).unwrap();
    child.renew_self(None).await.unwrap();
    child.revoke_self().await.unwrap();
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, &[]).await;
    server
        .anonymous()
        .await
        .login_approle(&role_id, &secret_id, 0)
        .await
        .unwrap();
    root.identity_disable(&name).await.unwrap();
    root.rotate_key().await.unwrap();
    // A denied change is still a pair: the request, then its refusal.
    let weak = root
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let weak = root.with_token(&weak.token).unwrap();
    assert_eq!(
        code(
            weak.put(&path, &data(&[("k", "x")]), PutOptions::default())
                .await
        ),
        Code::PermissionDenied
    );
    root.policy_delete(&policy).await.unwrap();

    let all = records(&server.audit_path);
    let mut by_id: HashMap<&str, Vec<&Value>> = HashMap::new();
    for r in &all {
        by_id
            .entry(r["request_id"].as_str().unwrap())
            .or_default()
            .push(r);
    }
    let mut changes: HashMap<&str, usize> = HashMap::new();
    let mut reads: HashMap<&str, usize> = HashMap::new();
    let mut calls = std::collections::HashSet::new();
    for (id, rs) in &by_id {
        let method = rs[0]["method"].as_str().unwrap();
        let phases: Vec<&str> = rs
            .iter()
            .map(|r| r["phase"].as_str().unwrap_or(""))
            .collect();
        if phases[0] == "request" {
            assert_eq!(phases, ["request", "outcome"], "{id} {method}: {rs:?}");
            assert!(rs[0]["seq"].as_u64() < rs[1]["seq"].as_u64());
            assert_eq!(rs[1]["method"], method);
            // Both records name the same caller: the request record takes
            // the token's HMAC the call remembered, as the outcome does.
            // (A login's outcome also names the token it issued.)
            let login = method == "keyward.v1.Auth/Login";
            let fields: &[&str] = if login {
                &["token"]
            } else {
                &["token", "accessor", "identity"]
            };
            for field in fields {
                assert_eq!(rs[0][field], rs[1][field], "{id} {method}: {field}");
            }
            if !login && rs[1]["accessor"].is_string() {
                let token = rs[0]["token"].as_str().unwrap_or("");
                assert!(token.starts_with("hmac-sha256:"), "{id} {method}: {rs:?}");
            }
            // The server's id of the call is in both, and no other call's.
            let call = rs[0]["call"]
                .as_str()
                .expect("a request record has its call id");
            assert_eq!(rs[1]["call"], call, "{id} {method}");
            assert!(calls.insert(call), "{call} names two calls");
            *changes.entry(method).or_default() += 1;
        } else {
            assert_eq!(phases, [""], "a read has one record: {id} {method}: {rs:?}");
            assert!(rs[0].get("call").is_none(), "{id} {method}: {rs:?}");
            *reads.entry(method).or_default() += 1;
        }
    }
    for method in [
        "Secrets/Put",
        "Secrets/Delete",
        "Secrets/Undelete",
        "Secrets/Destroy",
        "Policies/Put",
        "Policies/Delete",
        "Auth/IssueToken",
        "Auth/RenewToken",
        "Auth/RevokeToken",
        "Auth/Login",
        "Identities/Create",
        "Identities/CreateSecretId",
        "Identities/Disable",
        "Sys/RotateKey",
    ] {
        let method = format!("keyward.v1.{method}");
        assert!(
            changes.contains_key(method.as_str()),
            "{method}: {changes:?}"
        );
        assert!(!reads.contains_key(method.as_str()), "{method}: {reads:?}");
    }
    assert_eq!(changes["keyward.v1.Secrets/Put"], 3, "{changes:?}");
    for method in ["Secrets/Get", "Secrets/Metadata", "Policies/Get"] {
        let method = format!("keyward.v1.{method}");
        assert!(reads.contains_key(method.as_str()), "{method}: {reads:?}");
        assert!(!changes.contains_key(method.as_str()), "{method}");
    }
    let denied = all
        .iter()
        .find(|r| r["code"] == "PERMISSION_DENIED" && r["method"] == "keyward.v1.Secrets/Put")
        .unwrap();
    assert_eq!(denied["phase"], "outcome");

    let (status, report) = verify(&server.audit_path);
    assert_eq!(status, 0, "{report}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["unanswered"], serde_json::json!([]));
}

/// `keyward audit verify --format json`: its exit status, report and stderr.
fn verify_with_notes(path: &Path) -> (i32, Value, String) {
    let (code, out, err) = cli(
        &[
            "audit",
            "verify",
            path.to_str().unwrap(),
            "--format",
            "json",
        ],
        &[],
        None,
    );
    let report: Value =
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out} / {err}"));
    (code, report, err)
}

fn verify(path: &Path) -> (i32, Value) {
    let (code, report, _) = verify_with_notes(path);
    (code, report)
}

fn change(log: &AuditLog, request_id: &str, phase: Option<Phase>) {
    log.append_phase(
        &AuditEvent {
            request_id,
            method: "keyward.v1.Secrets/Put",
            resource: Some("secret/app/db"),
            identity: Some("svc"),
            accessor: None,
            actor: None,
            source: Some("127.0.0.1:1"),
            outcome: Outcome::Allowed,
            code: "OK",
            error: None,
            token: None,
            values: &[],
            call: None,
        },
        phase,
    )
    .unwrap();
}

#[tokio::test]
async fn verify_reports_unanswered_requests_and_names_the_last_as_in_flight() {
    let dir = crate::harness::private_tempdir();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, keyward::clock::Clock::system()).unwrap();
    change(&log, "answered", Some(Phase::Request));
    change(&log, "answered", Some(Phase::Outcome));
    change(&log, "a-read", None);
    change(&log, "cut-off", Some(Phase::Request));
    drop(log);

    let (status, report, notes) = verify_with_notes(&path);
    assert_eq!(status, 0, "{report}");
    assert!(
        notes.contains("the last 1 request record(s) have no outcome record yet"),
        "{notes}"
    );
    assert!(!notes.contains("warning"), "{notes}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["records"], 4);
    assert_eq!(report["first_bad"], Value::Null);
    assert_eq!(report["unanswered"], serde_json::json!([]));
    assert_eq!(
        report["in_flight_at_end"],
        serde_json::json!([{"seq": 4, "request_id": "cut-off"}])
    );

    // The log goes on: a later change began and ended, so "cut-off" never
    // got its outcome; the newest request is in flight.
    let log = AuditLog::open(&path, keyward::clock::Clock::system()).unwrap();
    change(&log, "later", Some(Phase::Request));
    change(&log, "later", Some(Phase::Outcome));
    change(&log, "newest", Some(Phase::Request));
    drop(log);
    let (status, report, notes) = verify_with_notes(&path);
    assert_eq!(status, 0, "{report}");
    assert!(
        notes.contains("warning: 1 request record(s) have no outcome record"),
        "{notes}"
    );
    assert_eq!(report["ok"], true);
    assert_eq!(
        report["unanswered"],
        serde_json::json!([{"seq": 4, "request_id": "cut-off"}])
    );
    assert_eq!(
        report["in_flight_at_end"],
        serde_json::json!([{"seq": 7, "request_id": "newest"}])
    );
}

#[tokio::test]
async fn unauthenticated_loops_grow_the_log_by_a_bounded_amount_and_are_counted_exactly() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let anon = server.anonymous().await;
    let bad = Client::connect(server.options(Some(&format!("kwt_{}", "B".repeat(43)))))
        .await
        .unwrap();
    let path = unique("target");
    root.put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await
        .unwrap();
    let missing = unique("missing");
    let role_id = format!("kwr_{}", "C".repeat(20));
    let wrong = format!("kws_{}", "A".repeat(43));

    let started = std::time::Instant::now();
    let before = std::fs::metadata(&server.audit_path).unwrap().len();
    let before_lines = records(&server.audit_path).len();
    let mut made: HashMap<&str, u64> = HashMap::new();
    for i in 0..2000u32 {
        match i % 3 {
            0 => {
                assert_eq!(code(bad.get(&path).await), Code::Unauthenticated);
                *made.entry("keyward.v1.Secrets/Get").or_default() += 1;
            }
            1 => {
                let _ = anon.login_approle(&role_id, &wrong, 0).await.unwrap_err();
                *made.entry("keyward.v1.Auth/Login").or_default() += 1;
            }
            _ => {
                anon.status().await.unwrap();
                *made.entry("keyward.v1.Sys/Status").or_default() += 1;
            }
        }
        // Authenticated calls are still written one per call.
        if i % 100 == 0 {
            let _ = root.get(&missing).await.unwrap_err();
        }
    }
    let grown = std::fs::metadata(&server.audit_path).unwrap().len() - before;
    let new: Vec<Value> = records(&server.audit_path).split_off(before_lines);
    // Each (method, code) key writes at most AGGREGATE_AFTER records plus
    // one aggregate per window of a minute; a slow machine may span more
    // windows, so the bound counts them. In one window: 20 authenticated
    // + at most 5 keys * 11 = 75 records, under 100 records' worth.
    let windows = started.elapsed().as_secs() / 60 + 1;
    let per_window = 5 * (u64::from(keyward::audit::AGGREGATE_AFTER) + 1);
    let bound = 20 + per_window * windows;
    assert!(
        (new.len() as u64) <= bound && (windows > 1 || new.len() < 100),
        "{} records, {grown} bytes for 2000 unauthenticated calls",
        new.len()
    );
    let per_record = grown / new.len() as u64;
    assert!(grown <= bound * per_record.max(600), "{grown} bytes");
    let authenticated = new
        .iter()
        .filter(|r| r["resource"] == format!("secret/{missing}"))
        .count();
    assert_eq!(authenticated, 20);

    // Shutdown writes the counted repeats.
    let dir = server.stop().await;
    let audit = dir.path().join("audit.log");
    let all = records(&audit);
    let mut counted: HashMap<&str, u64> = HashMap::new();
    for r in &all[before_lines..] {
        let method = r["method"].as_str().unwrap();
        if r["identity"].is_null() && made.contains_key(method) {
            *counted.entry(method).or_default() += r["count"].as_u64().unwrap_or(1);
        }
    }
    assert_eq!(counted, made);
    assert_eq!(counted.values().sum::<u64>(), 2000);
    assert!(all
        .iter()
        .any(|r| r["aggregate"] == true && r["source"] == "127.0.0.1"));
    let (status, report) = verify(&audit);
    assert_eq!(status, 0, "{report}");
    assert_eq!(report["ok"], true);
}

/// A Put whose client goes away at any point: if its version was written,
/// its outcome record says so (`OK`, with the value's HMAC), never
/// `CANCELLED` (`api::detach`); a `CANCELLED` Put wrote nothing.
#[tokio::test]
async fn a_put_whose_client_leaves_midway_is_recorded_as_what_it_did() {
    let server = TestServer::dev().await;
    let base = unique("leaves");
    const PUTS: usize = 240;
    const CLIENTS: usize = 8;
    // Eight connections: HTTP/2 servers close one that resets too many
    // streams (hyper's guard against rapid-reset floods).
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(server.root().await);
    }
    // How long a Put takes here, eight at a time, so that the clients
    // below leave before, during and after the write and its durability
    // wait on a machine of any speed.
    let timing = std::time::Instant::now();
    let mut warm = tokio::task::JoinSet::new();
    for (c, client) in clients.iter().enumerate() {
        let client = client.clone();
        let path = format!("{base}/warm{c}");
        warm.spawn(async move {
            for _ in 0..4 {
                let value = data(&[("k", "warm")]);
                client
                    .put(&path, &value, PutOptions::default())
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = warm.join_next().await {
        done.unwrap();
    }
    let put_micros = (timing.elapsed().as_micros() / 4).max(1) as u64;
    let mut calls = tokio::task::JoinSet::new();
    for (c, client) in clients.iter().enumerate() {
        let client = client.clone();
        let base = base.clone();
        calls.spawn(async move {
            let mut left = Vec::new();
            for i in (c..PUTS).step_by(CLIENTS) {
                // Gone after 0 to 2x a Put's time, spread over the Puts.
                let after = put_micros * 2 * (i as u64 * 37 % 100) / 100;
                let path = format!("{base}/{i}");
                let value = data(&[("k", "left")]);
                let put = client.put(&path, &value, PutOptions::default());
                let put = tokio::time::timeout(std::time::Duration::from_micros(after), put);
                if put.await.is_err() {
                    left.push(i);
                }
            }
            left
        });
    }
    let mut left = std::collections::HashSet::new();
    while let Some(gone) = calls.join_next().await {
        left.extend(gone.unwrap());
    }
    assert!(
        !left.is_empty(),
        "no client went away: the test checked nothing"
    );

    // A Put's outcome record names its path (its request record does not:
    // the resource comes with the policy check) and holds the values'
    // HMACs if it wrote. A Put may still be running when its client's
    // future is gone, so each check reads the log after the store.
    let outcome = |path: &str| -> Option<(String, bool)> {
        records(&server.audit_path)
            .iter()
            .filter(|r| r["method"] == "keyward.v1.Secrets/Put" && r["phase"] == "outcome")
            .find(|r| r["resource"] == format!("secret/{path}"))
            .map(|r| {
                let code = r["code"].as_str().unwrap_or_default().to_owned();
                (code, r["data"].get("k").is_some())
            })
    };
    let root = server.root().await;
    let stored = |path: String| {
        let root = root.clone();
        async move {
            match root.get(&path).await {
                Ok(_) => true,
                Err(e) if e.code() == Some(Code::NotFound) => false,
                Err(e) => panic!("{path}: {e}"),
            }
        }
    };
    let (mut written, mut other, mut left_and_written) = (0, 0, 0);
    for i in 0..PUTS {
        let path = format!("{base}/{i}");
        let was_stored = stored(path.clone()).await;
        let mut recorded = outcome(&path);
        if was_stored && recorded.is_none() {
            // Written; its outcome record follows (the call runs on).
            crate::harness::eventually("the stored Put's outcome record", || {
                recorded = outcome(&path);
                let found = recorded.is_some();
                async move { found }
            })
            .await;
        }
        match recorded {
            Some((code, hmac)) if code == "OK" => {
                assert!(
                    stored(path.clone()).await,
                    "{path}: recorded OK, not stored"
                );
                assert!(hmac, "{path}: recorded OK without the value's HMAC");
                written += 1;
                left_and_written += usize::from(left.contains(&i));
            }
            Some((code, _)) => {
                assert!(!was_stored, "{path}: stored, yet its outcome says {code}");
                assert!(!stored(path.clone()).await, "{path}: stored after {code}");
                other += 1;
            }
            None => assert!(!was_stored),
        }
    }
    println!(
        "a Put took ~{put_micros} us; {} clients left, {left_and_written} of them after \
         their Put was written; {written} Puts recorded OK, {other} otherwise",
        left.len()
    );
    // Some Puts lost their client after they acted and ran on: the case
    // the layer is for was met (the spread of leaving times makes sure).
    let orphaned = crate::harness::series_value(
        &server.core.metrics.encode(),
        "keyward_changes_orphaned_total",
    )
    .unwrap_or_default();
    println!("{orphaned} Puts ran on after their client left");
    assert!(orphaned > 0.0, "no Put ran on after its client left");
    assert!(
        left_and_written > 0,
        "no client left after its Put was written"
    );
    // Every request record has its outcome: nothing was left open.
    let verified = keyward::audit::verify_file(&server.audit_path).unwrap();
    assert!(verified.ok, "the chain holds");
    assert!(verified.unanswered.is_empty(), "{:?}", verified.unanswered);
    assert!(
        verified.in_flight_at_end.is_empty(),
        "{:?}",
        verified.in_flight_at_end
    );
}
