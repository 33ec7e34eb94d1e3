//! Review of issue 11's hot path from a low-privileged caller's side: the
//! verified-token cache must honour every revocation on the very next
//! request, use limits must hold under concurrency, audit batches must fail
//! closed and keep the chain whole, and a record must not depend on a later
//! request to reach the file.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tonic::Code;

use crate::harness::{cli, data, unique, TestServer};
use crate::ident_kit::{approle_identity, login, read_policy};
use keyward::client::{Client, ClientError, IssueOptions, PutOptions};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.expect_err("the call should have been refused")
        .code()
        .expect("a server status, not a local error")
}

/// A secret under a fresh prefix and a policy that reads it and may issue
/// tokens: (path, policy).
async fn secret_and_reader(root: &Client) -> (String, String) {
    let prefix = unique("hot");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("password", "pw")]), PutOptions::default())
        .await
        .unwrap();
    let policy = unique("reader");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\", \"list\"]\n\
             [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    (path, policy)
}

fn opts(policy: &str) -> IssueOptions {
    IssueOptions {
        policies: vec![policy.to_owned()],
        ..IssueOptions::default()
    }
}

/// Uses a token twice (the second use is served from the cache).
async fn warm(client: &Client, path: &str) {
    client.get(path).await.unwrap();
    client.get(path).await.unwrap();
}

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_revoked_token_is_refused_on_the_next_request_even_after_it_was_cached() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;

    // By its text, held by someone else.
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    assert_eq!(root.revoke_token(&t.token).await.unwrap(), 1);
    assert_eq!(code(user.get(&path).await), Code::Unauthenticated);

    // By accessor.
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    assert_eq!(root.revoke_accessor(&t.accessor).await.unwrap(), 1);
    assert_eq!(code(user.get(&path).await), Code::Unauthenticated);

    // By itself.
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    assert_eq!(user.revoke_self().await.unwrap(), 1);
    assert_eq!(code(user.get(&path).await), Code::Unauthenticated);

    // A parent's revoke reaches its cached child and grandchild.
    let parent = root.issue_token(opts(&policy)).await.unwrap();
    let parent_client = root.with_token(&parent.token).unwrap();
    let child = parent_client.issue_token(opts(&policy)).await.unwrap();
    let child_client = root.with_token(&child.token).unwrap();
    let grandchild = child_client.issue_token(opts(&policy)).await.unwrap();
    let grandchild_client = root.with_token(&grandchild.token).unwrap();
    for c in [&parent_client, &child_client, &grandchild_client] {
        warm(c, &path).await;
    }
    assert_eq!(root.revoke_accessor(&parent.accessor).await.unwrap(), 3);
    for c in [&parent_client, &child_client, &grandchild_client] {
        assert_eq!(code(c.get(&path).await), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn disabling_deleting_or_narrowing_an_identity_refuses_its_cached_tokens_at_once() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("idc");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("password", "pw")]), PutOptions::default())
        .await
        .unwrap();
    let policy = read_policy(&server, &prefix).await;
    let other = read_policy(&server, &unique("other")).await;

    let name = unique("svc");
    let (role, sid) = approle_identity(&root, &name, std::slice::from_ref(&policy)).await;
    let (_, client) = login(&server, &role, &sid).await;
    warm(&client, &path).await;
    root.identity_disable(&name).await.unwrap();
    assert_eq!(code(client.get(&path).await), Code::Unauthenticated);

    let name = unique("svc");
    let (role, sid) = approle_identity(&root, &name, std::slice::from_ref(&policy)).await;
    let (_, client) = login(&server, &role, &sid).await;
    warm(&client, &path).await;
    root.identity_delete(&name).await.unwrap();
    assert_eq!(code(client.get(&path).await), Code::Unauthenticated);

    let name = unique("svc");
    let (role, sid) = approle_identity(&root, &name, &[policy.clone(), other]).await;
    let (_, client) = login(&server, &role, &sid).await;
    warm(&client, &path).await;
    root.identity_update(keyward::proto::v1::UpdateIdentityRequest {
        name: name.clone(),
        owner: None,
        description: None,
        set_policies: true,
        policies: vec![policy.clone()],
        expires_in_seconds: None,
    })
    .await
    .unwrap();
    assert_eq!(code(client.get(&path).await), Code::Unauthenticated);
}

#[tokio::test]
async fn a_cached_token_is_refused_on_the_first_request_after_its_expiry() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    // Long enough for the warming reads on a loaded machine (they must
    // land before the expiry); the test then waits for the expiry itself.
    let t = root
        .issue_token(IssueOptions {
            ttl: Some(Duration::from_secs(6)),
            ..opts(&policy)
        })
        .await
        .unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    let expires = t.expires_at.as_ref().unwrap();
    let expires_ms = expires.seconds as u64 * 1000 + expires.nanos as u64 / 1_000_000;
    // Past the expiry by the server's clock (it follows the system's).
    tokio::time::sleep(server.core.clock().until_ms(expires_ms + 50)).await;
    assert_eq!(code(user.get(&path).await), Code::Unauthenticated);
}

#[tokio::test]
async fn a_renewed_then_revoked_token_is_refused() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    user.renew_self(Some(Duration::from_secs(1800)))
        .await
        .unwrap();
    warm(&user, &path).await;
    assert_eq!(root.revoke_accessor(&t.accessor).await.unwrap(), 1);
    assert_eq!(code(user.get(&path).await), Code::Unauthenticated);
}

#[tokio::test]
async fn a_use_limited_token_is_not_used_more_than_n_times_under_32_concurrent_calls() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root
        .issue_token(IssueOptions {
            uses: 5,
            ..opts(&policy)
        })
        .await
        .unwrap();
    let user = root.with_token(&t.token).unwrap();
    let mut calls = Vec::new();
    for _ in 0..32 {
        let user = user.clone();
        let path = path.clone();
        calls.push(tokio::spawn(async move { user.get(&path).await }));
    }
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}"),
        }
    }
    assert_eq!(ok, 5, "exactly the 5 uses the token was issued with");
    assert_eq!(code(user.get(&path).await), Code::Unauthenticated);
}

#[tokio::test]
async fn a_cidr_bound_token_is_refused_from_another_source_on_every_use() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root
        .issue_token(IssueOptions {
            cidrs: vec!["10.0.0.0/8".into()],
            ..opts(&policy)
        })
        .await
        .unwrap();
    let user = root.with_token(&t.token).unwrap();
    for _ in 0..3 {
        assert_eq!(code(user.get(&path).await), Code::Unauthenticated);
    }
    // Bound to loopback: allowed, cached, and still bound.
    let t = root
        .issue_token(IssueOptions {
            cidrs: vec!["127.0.0.0/8".into()],
            ..opts(&policy)
        })
        .await
        .unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    let child = user
        .issue_token(IssueOptions {
            cidrs: vec!["10.0.0.0/8".into()],
            ..opts(&policy)
        })
        .await;
    assert_eq!(code(child), Code::PermissionDenied);
}

#[tokio::test]
async fn seal_and_unseal_forget_cached_tokens_and_a_later_revoke_holds() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    root.seal().await.unwrap();
    assert_eq!(code(user.get(&path).await), Code::Unavailable);
    root.unseal(&server.unseal_share).await.unwrap();
    warm(&user, &path).await;
    root.revoke_accessor(&t.accessor).await.unwrap();
    assert_eq!(code(user.get(&path).await), Code::Unauthenticated);
}

#[tokio::test]
async fn a_revoke_racing_requests_is_final_once_it_returns() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    for _round in 0..3 {
        let t = root.issue_token(opts(&policy)).await.unwrap();
        let user = root.with_token(&t.token).unwrap();
        warm(&user, &path).await;
        let revoked = Arc::new(AtomicBool::new(false));
        let after = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (user, path, revoked, after) =
                (user.clone(), path.clone(), revoked.clone(), after.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let started_after = revoked.load(Ordering::SeqCst);
                    let result = user.get(&path).await;
                    if started_after {
                        assert_eq!(
                            code(result),
                            Code::Unauthenticated,
                            "a request sent after the revoke returned was served"
                        );
                        if after.fetch_add(1, Ordering::SeqCst) >= 200 {
                            return;
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(root.revoke_accessor(&t.accessor).await.unwrap(), 1);
        revoked.store(true, Ordering::SeqCst);
        for task in tasks {
            task.await.unwrap();
        }
    }
}

#[tokio::test]
async fn forged_tokens_near_a_cached_one_and_a_flood_of_invalid_ones_are_refused() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    let real = t.token.clone();
    let flip = |i: usize| {
        let mut bytes = real.clone().into_bytes();
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let mut forged = vec![
        real[..real.len() - 1].to_owned(),
        format!("{real}A"),
        format!("{real} x"),
        flip(real.len() - 1),
        flip(10),
        real.to_uppercase(),
    ];
    for i in 0..500 {
        forged.push(format!("kwt_{}{i:08}", &real[4..real.len() - 14]));
    }
    for f in &forged {
        let Ok(client) = root.with_token(f) else {
            continue;
        };
        assert_eq!(code(client.get(&path).await), Code::Unauthenticated);
    }
    // The real one still works.
    user.get(&path).await.unwrap();
}

#[tokio::test]
async fn a_denied_call_is_recorded_with_its_code_and_writes_nothing() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    assert_eq!(
        code(
            user.put(&path, &data(&[("password", "evil")]), PutOptions::default())
                .await
        ),
        Code::PermissionDenied
    );
    let evil_policy = unique("evil");
    assert_eq!(
        code(
            user.policy_put(
                &evil_policy,
                "[[rule]]\npath = \"**\"\ncapabilities = [\"read\"]\n"
            )
            .await
        ),
        Code::PermissionDenied
    );
    let got = root.get(&path).await.unwrap();
    assert_eq!(got.version, 1);
    assert_eq!(code(root.policy_get(&evil_policy).await), Code::NotFound);
    let all = records(&server.audit_path);
    let denied: Vec<&Value> = all
        .iter()
        .filter(|r| r["accessor"] == t.accessor.as_str() && r["code"] == "PERMISSION_DENIED")
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0]["resource"], format!("secret/{path}"));
    assert_eq!(denied[1]["resource"], format!("policy/{evil_policy}"));
}

#[tokio::test]
async fn with_an_unwritable_audit_log_no_call_is_answered_ok() {
    let server = TestServer::dev_with(|c| c.audit_path = "/dev/full".into()).await;
    let root = server.root().await;
    let path = unique("full");
    // The write happens, but its answer needs a record.
    assert_eq!(
        code(
            root.put(&path, &data(&[("password", "pw")]), PutOptions::default())
                .await
        ),
        Code::Unavailable
    );
    let mut calls = Vec::new();
    for _ in 0..32 {
        let (root, path) = (root.clone(), path.clone());
        calls.push(tokio::spawn(async move { root.get(&path).await }));
    }
    for call in calls {
        assert_eq!(code(call.await.unwrap()), Code::Unavailable);
    }
    assert_eq!(
        code(root.issue_token(IssueOptions::default()).await),
        Code::Unavailable
    );
    assert_eq!(code(root.lookup_self().await), Code::Unavailable);
}

#[tokio::test]
async fn sixty_four_concurrent_gets_leave_a_verifiable_chain_with_one_record_each() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    let mut calls = Vec::new();
    for _ in 0..64 {
        let (user, path) = (user.clone(), path.clone());
        calls.push(tokio::spawn(async move { user.get(&path).await }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let dir = server.stop().await;
    let log = dir.path().join("audit.log");
    let (status, out, err) = cli(
        &["audit", "verify", log.to_str().unwrap(), "--format", "json"],
        &[],
        None,
    );
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out} / {err}"));
    assert_eq!(status, 0, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let gets = records(&log)
        .into_iter()
        .filter(|r| r["accessor"] == t.accessor.as_str() && r["method"] == "keyward.v1.Secrets/Get")
        .filter(|r| r["code"] == "OK")
        .count();
    assert_eq!(gets, 64);
}

/// A Get whose caller went away after its record was queued (the client
/// cancelled while the call yielded to let others batch) must still reach
/// the file, without waiting for some later request to write it.
#[tokio::test]
async fn a_record_queued_by_a_dropped_append_is_written_without_a_later_call() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = keyward::audit::AuditLog::open(&path, keyward::clock::Clock::system()).unwrap();
    let event = keyward::audit::AuditEvent {
        request_id: "cancelled-get",
        method: "keyward.v1.Secrets/Get",
        resource: Some("secret/app/db"),
        identity: Some("svc"),
        accessor: None,
        actor: None,
        source: None,
        outcome: keyward::audit::Outcome::Allowed,
        code: "OK",
        error: None,
        token: None,
        values: &[],
        call: None,
    };
    // Polled once (it queues its record and yields), then dropped.
    tokio::select! {
        biased;
        _ = log.append_async(&event) => panic!("a lone append yields once before writing"),
        _ = std::future::ready(()) => {}
    }
    log.sync().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("\"request_id\":\"cancelled-get\""),
        "the record waits in the queue for another caller: {text:?}"
    );
    assert!(keyward::audit::verify_file(&path).unwrap().ok);
}

#[tokio::test]
async fn narrowing_or_deleting_a_policy_is_seen_by_a_cached_token_at_once() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    root.policy_put(
        &policy,
        "[[rule]]\npath = \"secret/nothing/**\"\ncapabilities = [\"read\"]\n",
    )
    .await
    .unwrap();
    assert_eq!(code(user.get(&path).await), Code::PermissionDenied);

    let (path, policy) = secret_and_reader(&root).await;
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    warm(&user, &path).await;
    root.policy_delete(&policy).await.unwrap();
    assert_eq!(code(user.get(&path).await), Code::PermissionDenied);
}

/// Batched (Get, IssueToken) and single (Put, refusals) records written at
/// once, some calls cancelled by their client mid-flight: the chain stays
/// whole and every answered call has its record.
#[tokio::test]
async fn mixed_batched_single_and_cancelled_calls_keep_the_chain_whole() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (path, policy) = secret_and_reader(&root).await;
    let t = root.issue_token(opts(&policy)).await.unwrap();
    let user = root.with_token(&t.token).unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut calls = Vec::new();
    for i in 0..96u64 {
        let (user, root, path, policy, answered) = (
            user.clone(),
            root.clone(),
            path.clone(),
            policy.clone(),
            answered.clone(),
        );
        calls.push(tokio::spawn(async move {
            match i % 4 {
                0 => {
                    user.get(&path).await.unwrap();
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                1 => {
                    let refused = user
                        .put(&path, &data(&[("password", "x")]), PutOptions::default())
                        .await;
                    assert_eq!(code(refused), Code::PermissionDenied);
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                2 => {
                    user.issue_token(opts(&policy)).await.unwrap();
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                _ => {
                    // Cancelled after a varying delay.
                    let wait = Duration::from_micros(100 * (i % 20));
                    let _ = tokio::time::timeout(wait, root.get(&path)).await;
                }
            }
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let dir = server.stop().await;
    let log = dir.path().join("audit.log");
    let report = keyward::audit::verify_file(&log).unwrap();
    assert!(report.ok, "{report:?}");
    // One answer record per answered call (a change also has its request
    // record, written before it acts).
    let mine = records(&log)
        .into_iter()
        .filter(|r| r["accessor"] == t.accessor.as_str() && r["phase"] != "request")
        .count();
    assert_eq!(mine, answered.load(Ordering::SeqCst));
}

/// A login stuck on a key-set host that never answers, given up by its
/// client: the server drops the call, and the call still has its record.
#[tokio::test]
async fn a_call_its_client_cancels_mid_flight_is_recorded_as_cancelled() {
    let server = TestServer::dev_with(|c| c.oidc.allow_private_hosts = true).await;
    let root = server.root().await;
    // Accepts and holds every connection, saying nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    root.oidc_issuer_put(keyward::proto::v1::PutOidcIssuerRequest {
        name: "slow".into(),
        issuer_url: "https://ci.example.test".into(),
        jwks_file: String::new(),
        jwks_url: format!("https://127.0.0.1:{port}/jwks"),
        audience: "keyward-test".into(),
    })
    .await
    .unwrap();
    let anon = server.anonymous().await;
    let jwt = crate::ident_kit::Signer::es256("k").token(&serde_json::json!({
        "iss": "https://ci.example.test", "aud": "keyward-test", "sub": "repo:acme/app",
        "iat": crate::ident_kit::now_unix() - 5, "nbf": crate::ident_kit::now_unix() - 5,
        "exp": crate::ident_kit::now_unix() + 300,
    }));
    let login = anon.login_oidc("slow", &jwt, 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), login)
            .await
            .is_err(),
        "the login should still be waiting for the key set"
    );
    let audit = server.audit_path.clone();
    crate::harness::eventually("the cancelled login is recorded", || {
        let audit = audit.clone();
        async move {
            records(&audit)
                .iter()
                .any(|r| r["method"] == "keyward.v1.Auth/Login" && r["code"] == "CANCELLED")
        }
    })
    .await;
    silent.abort();
    assert!(keyward::audit::verify_file(&server.audit_path).unwrap().ok);
}

#[tokio::test]
async fn a_cached_token_of_an_identity_is_refused_on_the_first_request_after_the_identity_expires()
{
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("idexp");
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("password", "pw")]), PutOptions::default())
        .await
        .unwrap();
    let policy = read_policy(&server, &prefix).await;
    let name = unique("svc");
    let mut request = crate::ident_kit::create(
        &name,
        "service-account",
        "team-a",
        std::slice::from_ref(&policy),
    );
    // Long enough for the writes and reads before the expiry on a loaded
    // machine; the test then waits for the expiry itself.
    request.expires_in_seconds = 8;
    let created = root.identity_create(request).await.unwrap();
    let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let (_, client) = login(&server, &sid.role_id, &sid.secret_id).await;
    warm(&client, &path).await;
    let expires = created.expires_at.as_ref().unwrap();
    let expires_ms = expires.seconds as u64 * 1000 + expires.nanos as u64 / 1_000_000;
    tokio::time::sleep(server.core.clock().until_ms(expires_ms + 50)).await;
    assert_eq!(code(client.get(&path).await), Code::Unauthenticated);
}
