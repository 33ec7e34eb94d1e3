//! The rotation broker over TLS through the public client, against the real
//! targets of `tests/support/db_target.rs` (TESTING.md): the private
//! scram-sha-256 PostgreSQL cluster, MariaDB on 127.0.0.1:3306 and Redis on
//! 127.0.0.1:6379. Logins are checked with the drivers directly, never with
//! the provider under test.
//!
//! - each provider and strategy: after `rotate` the new credential logs in;
//!   for alternating the old one still logs in during the grace period and
//!   is refused after the retire; for single the old one is refused at once;
//! - crash tests: a child server killed (SIGKILL, by the test fault point)
//!   after each step in turn; on restart the rotation completes;
//! - failure tests: unreachable target, refused change, verify that fails
//!   after apply changed the password: retries with fresh values, then
//!   `current` unchanged and still logging in; the next scheduled run runs;
//! - a scheduled rotation (`every 2s`) without a trigger, seen by Watch.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::db_target::{password, pg_admin, suffix, with_cleanup, Kind, Target};
use crate::harness::{cli, data, unique, ChildServer, TestServer};
use keyward::client::{Client, PutOptions, RotationPolicySpec, ScheduleSpec};
use keyward::proto::v1::RotationRun;

/// How long a test waits for something the server does by itself. Not a
/// timing assertion: only a bound so a broken server fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------- helpers

fn spec(
    provider: &str,
    every: Duration,
    grace: Duration,
    pairs: &[(&str, &str)],
) -> RotationPolicySpec {
    RotationPolicySpec {
        provider: provider.to_owned(),
        schedule: ScheduleSpec::Every(every),
        grace,
        settings: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Runs the CLI off the runtime's threads (it blocks until the child exits,
/// and the in-process server must keep running meanwhile).
async fn cli_off_runtime(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        cli(&args, &env, None)
    })
    .await
    .unwrap()
}

/// Polls `check` every 200 ms until it gives a value, or fails after PATIENCE.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn steps(run: &RotationRun) -> Vec<(String, String)> {
    run.steps
        .iter()
        .map(|s| (s.step.clone(), s.outcome.clone()))
        .collect()
}

fn has_step(run: &RotationRun, step: &str, outcome: &str) -> bool {
    run.steps
        .iter()
        .any(|s| s.step == step && s.outcome == outcome)
}

/// The newest finished run with a retire step, if any.
async fn retired(client: &Client, path: &str) -> Option<RotationRun> {
    let runs = client.rotation_history(path).await.ok()?;
    runs.into_iter()
        .find(|r| r.steps.iter().any(|s| s.step == "retire"))
}

// ---------------------------------------------------------------- targets

/// Stores the target's admin secret at `path`, with `overrides` applied.
async fn put_admin(target: &Target, client: &Client, path: &str, overrides: &[(&str, &str)]) {
    let mut fields: BTreeMap<String, String> = target.admin().into_iter().collect();
    for (k, v) in overrides {
        fields.insert((*k).to_owned(), (*v).to_owned());
    }
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    client
        .put(path, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
}

// ---------------------------------------------------------------- random

#[tokio::test]
async fn random_rotation_promotes_a_fresh_value_and_records_every_step() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = format!("{}/api-key", unique("rot"));
    root.put(
        &path,
        &data(&[("password", "initial-value-1"), ("client_id", "svc-42")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let policy = root
        .set_rotation_policy(
            &path,
            &spec(
                "random",
                HOUR,
                Duration::ZERO,
                &[("fields", "password"), ("length", "40"), ("charset", "hex")],
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        (policy.provider.as_str(), policy.every_seconds),
        ("random", 3600)
    );
    assert!(policy.next_due.is_some());

    let run = root.rotate(&path, true).await.unwrap();
    assert_eq!(run.state, "succeeded", "{:?}", steps(&run));
    assert_eq!(run.version, 2);
    let names: Vec<String> = run.steps.iter().map(|s| s.step.clone()).collect();
    // The retire (grace 0) may already have been added.
    assert_eq!(names[..4], ["generate", "apply", "verify", "promote"]);
    assert!(run.steps.iter().all(|s| s.outcome == "ok"));

    let current = root.get(&path).await.unwrap();
    let new = current.field_str("password").unwrap().to_owned();
    assert_eq!((current.version, current.stage.as_str()), (2, "current"));
    assert_eq!(new.len(), 40);
    assert!(new.bytes().all(|b| b.is_ascii_hexdigit()), "{new}");
    assert_eq!(
        current.field_str("client_id"),
        Some("svc-42"),
        "other fields stay"
    );
    let previous = root.get_with(&path, None, Some("previous")).await.unwrap();
    assert_eq!(previous.field_str("password"), Some("initial-value-1"));

    // The retire (grace 0) follows on its own and is added to the run.
    let with_retire = eventually("the retire step", || retired(&root, &path)).await;
    assert!(
        has_step(&with_retire, "retire", "ok"),
        "{:?}",
        steps(&with_retire)
    );

    let got = root.rotation_policy(&path).await.unwrap();
    assert_eq!(got.last_state, "succeeded");
    assert!(got.last_success.is_some());

    // Every step is audited, by the broker; values only as HMACs.
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    for step in ["generate", "apply", "verify", "promote", "retire"] {
        assert!(
            audit.contains(&format!("\"method\":\"keyward.rotation/{step}\"")),
            "no audit record of {step}"
        );
    }
    assert!(audit.contains("\"identity\":\"rotation-broker\""));
    assert!(
        !audit.contains(&new),
        "a generated value is in the audit log"
    );
    let hmac = root.audit_hash(&new).await.unwrap();
    assert!(
        audit.contains(&hmac),
        "the generated value's HMAC is audited"
    );

    // Metrics count the run.
    let metrics = reqwest_free_get(server.metrics_addr).await;
    assert!(
        metrics.contains("keyward_rotations_total{provider=\"random\",outcome=\"succeeded\"}"),
        "{metrics}"
    );
}

/// GET /metrics with a raw HTTP/1.0 request.
async fn reqwest_free_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn policies_refuse_inline_credentials_and_bad_schedules() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = format!("{}/db", unique("rot"));
    let refused = root
        .set_rotation_policy(
            &path,
            &spec(
                "postgres",
                HOUR,
                HOUR,
                &[("admin_password", "hunter2-inline"), ("username", "app")],
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::InvalidArgument));
    assert!(refused.to_string().contains("admin_password"), "{refused}");
    assert!(!refused.to_string().contains("hunter2"), "{refused}");

    let bad_every = root
        .set_rotation_policy(&path, &spec("random", Duration::ZERO, HOUR, &[]))
        .await
        .unwrap_err();
    assert_eq!(bad_every.code(), Some(tonic::Code::InvalidArgument));
    let mut cron = spec("random", HOUR, HOUR, &[]);
    cron.schedule = ScheduleSpec::Cron("61 * * * *".into());
    let bad_cron = root.set_rotation_policy(&path, &cron).await.unwrap_err();
    assert_eq!(bad_cron.code(), Some(tonic::Code::InvalidArgument));
    let unknown = root
        .set_rotation_policy(&path, &spec("nosuch", HOUR, HOUR, &[]))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(tonic::Code::NotFound));
    let no_policy = root.rotate(&path, true).await.unwrap_err();
    assert_eq!(no_policy.code(), Some(tonic::Code::NotFound));

    cron.schedule = ScheduleSpec::Cron("0 3 * * *".into());
    let p = root.set_rotation_policy(&path, &cron).await.unwrap();
    assert_eq!(p.cron, "0 3 * * *");
    let listed = root.rotation_policies(false, false).await.unwrap();
    assert!(listed.iter().any(|p| p.path == path));
    root.delete_rotation_policy(&path).await.unwrap();
    let gone = root.rotation_policy(&path).await.unwrap_err();
    assert_eq!(gone.code(), Some(tonic::Code::NotFound));

    // Without a token: refused.
    let anonymous = server.anonymous().await;
    let denied = anonymous.rotate(&path, true).await.unwrap_err();
    assert_eq!(denied.code(), Some(tonic::Code::Unauthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rotation_set_rotate_history_and_list() {
    let server = TestServer::dev().await;
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_string_lossy().into_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
        ("KEYWARD_FORMAT", "json"),
    ];
    let path = format!("{}/token", unique("cli"));
    let (code, _, err) = cli_off_runtime(&["secret", "put", &path, "password=first"], &env).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli_off_runtime(
        &[
            "rotation",
            "set",
            &path,
            "--provider",
            "random",
            "--every",
            "1h",
            "--grace",
            "0s",
            "--config",
            "length=20",
        ],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let policy: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(policy["schedule"]["every"], "1h");
    assert_eq!(policy["config"]["length"], "20");

    let (code, out, err) = cli_off_runtime(&["rotate", &path], &env).await;
    assert_eq!(code, 0, "{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["path"], path.as_str());
    assert_eq!(run["state"], "succeeded");
    assert_eq!(run["version"], 2);
    assert!(run["steps"].as_array().unwrap().len() >= 4);

    let (code, out, _) = cli_off_runtime(&["rotate", &path, "--no-wait"], &env).await;
    assert_eq!(code, 0);
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(started["state"] == "running" || started["state"] == "succeeded");

    let (code, out, _) = cli_off_runtime(&["rotation", "history", &path], &env).await;
    assert_eq!(code, 0);
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(history["runs"].as_array().unwrap().len() >= 2);

    let (code, out, _) = cli_off_runtime(&["rotation", "list", "--failed"], &env).await;
    assert_eq!(code, 0);
    let failed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(failed["policies"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["path"] != path.as_str()));

    let (code, _, err) =
        cli_off_runtime(&["rotation", "set", &path, "--provider", "random"], &env).await;
    assert_eq!(code, 2, "no schedule is a usage error: {err}");
    let (code, _, _) = cli_off_runtime(&["rotate", "no/such/policy"], &env).await;
    assert_eq!(code, 1);
    let (code, _, _) = cli_off_runtime(&["rotation", "delete", &path], &env).await;
    assert_eq!(code, 0);
}

// ---------------------------------------------------------------- targets

/// Single: the user's password changes; the old one is refused at once,
/// the new one logs in.
async fn single_user(kind: Kind) {
    let target = Target::new(kind).await;
    let t = target.clone();
    with_cleanup(target, async move {
        let server = TestServer::dev().await;
        let root = server.root().await;
        let prefix = unique("single");
        let (admin, path) = (format!("{prefix}/admin"), format!("{prefix}/app"));
        put_admin(&t, &root, &admin, &[]).await;
        let user = t.user("app");
        let initial = password();
        t.create_user(&user, &initial).await;
        root.put(
            &path,
            &data(&[("username", &user), ("password", &initial)]),
            PutOptions::default(),
        )
        .await
        .unwrap();
        root.set_rotation_policy(
            &path,
            &spec(
                t.provider(),
                HOUR,
                Duration::from_secs(2),
                &[
                    ("admin_secret", &admin),
                    ("strategy", "single"),
                    ("username", &user),
                ],
            ),
        )
        .await
        .unwrap();

        let run = root.rotate(&path, true).await.unwrap();
        assert_eq!(run.state, "succeeded", "{:?}", run.steps);
        let current = root.get(&path).await.unwrap();
        let new = current.field_str("password").unwrap().to_owned();
        assert_eq!(current.field_str("username"), Some(user.as_str()));
        assert_eq!(current.field_str("host"), Some("127.0.0.1"));
        assert!(t.can_login(&user, &new).await, "the new password logs in");
        assert!(
            !t.can_login(&user, &initial).await,
            "the old password is refused"
        );
        let done = eventually("the retire step", || retired(&root, &path)).await;
        assert!(has_step(&done, "retire", "ok"), "{:?}", steps(&done));
        assert!(
            t.can_login(&user, &new).await,
            "current still logs in after retire"
        );
    })
    .await;
}

/// Alternating: the other user gets the new password and becomes current;
/// the old one works through the grace period, then is refused.
async fn alternating_users(kind: Kind) {
    let target = Target::new(kind).await;
    let t = target.clone();
    with_cleanup(target, async move {
        let server = TestServer::dev().await;
        let root = server.root().await;
        let prefix = unique("alt");
        let (admin, path) = (format!("{prefix}/admin"), format!("{prefix}/app"));
        put_admin(&t, &root, &admin, &[]).await;
        let (a, b) = (t.user("a"), t.user("b"));
        let (pa, pb) = (password(), password());
        t.create_user(&a, &pa).await;
        t.create_user(&b, &pb).await;
        root.put(
            &path,
            &data(&[("username", &a), ("password", &pa)]),
            PutOptions::default(),
        )
        .await
        .unwrap();
        let users = format!("{a},{b}");
        // A grace period long enough to check the old login in it.
        root.set_rotation_policy(
            &path,
            &spec(
                t.provider(),
                HOUR,
                Duration::from_secs(4),
                &[
                    ("admin_secret", &admin),
                    ("strategy", "alternating"),
                    ("usernames", &users),
                ],
            ),
        )
        .await
        .unwrap();

        let run = root.rotate(&path, true).await.unwrap();
        assert_eq!(run.state, "succeeded", "{:?}", run.steps);
        let current = root.get(&path).await.unwrap();
        let new = current.field_str("password").unwrap().to_owned();
        assert_eq!(
            current.field_str("username"),
            Some(b.as_str()),
            "the other user is current"
        );
        assert!(t.can_login(&b, &new).await, "the new credential logs in");
        // The retire has not run yet (its history has no retire step).
        if retired(&root, &path).await.is_none() {
            assert!(
                t.can_login(&a, &pa).await,
                "the old credential works in the grace period"
            );
        }
        let done = eventually("the retire step", || retired(&root, &path)).await;
        assert!(has_step(&done, "retire", "ok"), "{:?}", steps(&done));
        assert!(
            !t.can_login(&a, &pa).await,
            "the old credential is refused after retire"
        );
        assert!(t.can_login(&b, &new).await, "current still logs in");

        // The next rotation goes back to the first user.
        let again = root.rotate(&path, true).await.unwrap();
        assert_eq!(again.state, "succeeded");
        let current = root.get(&path).await.unwrap();
        assert_eq!(current.field_str("username"), Some(a.as_str()));
        assert!(
            t.can_login(&a, current.field_str("password").unwrap())
                .await
        );
    })
    .await;
}

#[tokio::test]
async fn postgres_single_user() {
    single_user(Kind::Postgres).await;
}

#[tokio::test]
async fn postgres_alternating_users() {
    alternating_users(Kind::Postgres).await;
}

#[tokio::test]
async fn mysql_single_user() {
    single_user(Kind::Mysql).await;
}

#[tokio::test]
async fn mysql_alternating_users() {
    alternating_users(Kind::Mysql).await;
}

#[tokio::test]
async fn redis_single_user() {
    single_user(Kind::Redis).await;
}

#[tokio::test]
async fn redis_alternating_users() {
    alternating_users(Kind::Redis).await;
}

// ---------------------------------------------------------------- failures

/// The target cannot be reached: every attempt fails with a fresh value,
/// the run is rolled back, current is unchanged and still logs in; the
/// next scheduled rotation still runs (and succeeds once the admin secret
/// is fixed).
#[tokio::test]
async fn unreachable_target_rolls_back_and_the_next_scheduled_run_still_runs() {
    let target = Target::new(Kind::Mysql).await;
    let t = target.clone();
    with_cleanup(target, async move {
        let server = TestServer::dev().await;
        let root = server.root().await;
        let prefix = unique("down");
        let (admin, path) = (format!("{prefix}/admin"), format!("{prefix}/app"));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        put_admin(&t, &root, &admin, &[("port", &closed.to_string())]).await;
        let user = t.user("app");
        let initial = password();
        t.create_user(&user, &initial).await;
        root.put(
            &path,
            &data(&[("username", &user), ("password", &initial)]),
            PutOptions::default(),
        )
        .await
        .unwrap();
        root.set_rotation_policy(
            &path,
            &spec(
                "mysql",
                HOUR,
                Duration::ZERO,
                &[("admin_secret", &admin), ("username", &user)],
            ),
        )
        .await
        .unwrap();

        let run = root.rotate(&path, true).await.unwrap();
        assert_eq!(run.state, "failed", "{:?}", steps(&run));
        let applies: Vec<_> = run.steps.iter().filter(|s| s.step == "apply").collect();
        assert_eq!(applies.len(), 3, "three attempts: {:?}", steps(&run));
        assert!(applies.iter().all(|s| s.outcome == "failed"));
        assert!(
            applies[0].message.contains("unreachable"),
            "{}",
            applies[0].message
        );
        let mut versions: Vec<u64> = applies.iter().map(|s| s.version).collect();
        versions.dedup();
        assert_eq!(
            versions.len(),
            3,
            "each attempt had a fresh value: {versions:?}"
        );
        assert!(has_step(&run, "rollback", "failed") || has_step(&run, "rollback", "ok"));

        let current = root.get(&path).await.unwrap();
        assert_eq!(current.version, 1, "current is unchanged");
        assert_eq!(current.field_str("password"), Some(initial.as_str()));
        assert!(
            root.get_with(&path, None, Some("pending")).await.is_err(),
            "pending is dropped"
        );
        assert!(t.can_login(&user, &initial).await, "current still logs in");
        let failed = root.rotation_policies(false, true).await.unwrap();
        assert!(failed
            .iter()
            .any(|p| p.path == path && !p.last_error.is_empty()));
        // Governance sees the failure.
        let summary = server
            .core
            .rotation
            .rotation_summary(server.core.clock().now_ms())
            .unwrap();
        assert!(summary
            .last_failures
            .iter()
            .any(|(p, m)| p == &path && m.contains("apply")));
        assert!(summary.compliance < 1.0);
        // The governance report carries the same figures.
        let report = root.governance_report(0, 0).await.unwrap();
        assert!(report
            .rotation_failures
            .iter()
            .any(|s| s.path == path && s.last_failure.contains("apply")));
        assert!(report.rotation_compliance < 1.0);

        // The schedule keeps running: a scheduled run after the fix works.
        put_admin(&t, &root, &admin, &[]).await;
        root.set_rotation_policy(
            &path,
            &spec(
                "mysql",
                Duration::from_secs(2),
                Duration::ZERO,
                &[("admin_secret", &admin), ("username", &user)],
            ),
        )
        .await
        .unwrap();
        let ok = eventually("a scheduled run that succeeds", || {
            let root = root.clone();
            let path = path.clone();
            async move {
                let runs = root.rotation_history(&path).await.ok()?;
                runs.into_iter()
                    .find(|r| r.trigger == "schedule" && r.state == "succeeded")
            }
        })
        .await;
        let current = root.get(&path).await.unwrap();
        assert!(current.version >= ok.version);
        assert!(
            t.can_login(&user, current.field_str("password").unwrap())
                .await
        );
        root.delete_rotation_policy(&path).await.unwrap();
    })
    .await;
}

/// The target refuses the change (the admin's password is wrong): retries
/// with fresh values, then current unchanged and still logging in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_change_keeps_current() {
    let target = Target::new(Kind::Postgres).await;
    let t = target.clone();
    with_cleanup(target, async move {
        let server = TestServer::dev().await;
        let root = server.root().await;
        let prefix = unique("refused");
        let (admin, path) = (format!("{prefix}/admin"), format!("{prefix}/app"));
        put_admin(&t, &root, &admin, &[("password", "wrong-admin-password")]).await;
        let user = t.user("app");
        let initial = password();
        t.create_user(&user, &initial).await;
        root.put(
            &path,
            &data(&[("username", &user), ("password", &initial)]),
            PutOptions::default(),
        )
        .await
        .unwrap();
        root.set_rotation_policy(
            &path,
            &spec(
                "postgres",
                HOUR,
                Duration::ZERO,
                &[("admin_secret", &admin), ("username", &user)],
            ),
        )
        .await
        .unwrap();
        let run = root.rotate(&path, true).await.unwrap();
        assert_eq!(run.state, "failed", "{:?}", steps(&run));
        let applies: Vec<_> = run.steps.iter().filter(|s| s.step == "apply").collect();
        assert_eq!(applies.len(), 3, "{:?}", steps(&run));
        assert!(
            applies[0].message.contains("refused"),
            "{}",
            applies[0].message
        );
        let current = root.get(&path).await.unwrap();
        assert_eq!(current.version, 1);
        assert!(t.can_login(&user, &initial).await, "current still logs in");
        // keyward's CLI exits 1 on a failed rotation.
        let addr = format!("https://{}", server.addr);
        let ca = server.ca.to_string_lossy().into_owned();
        let env = [
            ("KEYWARD_ADDR", addr.as_str()),
            ("KEYWARD_CACERT", ca.as_str()),
            ("KEYWARD_TOKEN", server.root_token.as_str()),
            ("KEYWARD_FORMAT", "json"),
        ];
        let (code, out, _) = cli_off_runtime(&["rotate", &path], &env).await;
        assert_eq!(code, 1);
        let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(printed["state"], "failed");
        assert_eq!(printed["version"], 1);
    })
    .await;
}

/// Apply succeeds (the password on the target changes) but verify fails:
/// the rollback puts current's password back, so current still logs in.
#[tokio::test]
async fn verify_failure_after_apply_rolls_the_target_back() {
    let target = Target::new(Kind::Postgres).await;
    let t = target.clone();
    with_cleanup(target, async move {
        let server = TestServer::dev().await;
        let root = server.root().await;
        let prefix = unique("verify");
        let (admin, path) = (format!("{prefix}/admin"), format!("{prefix}/app"));
        // A database the rotated user may not connect to: verify logs in
        // there (the admin secret's database) and is refused.
        let db = format!("kwdb_{}", suffix());
        let pg = pg_admin().await;
        pg.batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await
            .unwrap();
        pg.batch_execute(&format!("REVOKE CONNECT ON DATABASE \"{db}\" FROM PUBLIC"))
            .await
            .unwrap();
        put_admin(&t, &root, &admin, &[("database", &db)]).await;
        let user = t.user("app");
        let initial = password();
        t.create_user(&user, &initial).await;
        root.put(
            &path,
            &data(&[("username", &user), ("password", &initial)]),
            PutOptions::default(),
        )
        .await
        .unwrap();
        root.set_rotation_policy(
            &path,
            &spec(
                "postgres",
                HOUR,
                Duration::ZERO,
                &[("admin_secret", &admin), ("username", &user)],
            ),
        )
        .await
        .unwrap();
        let run = root.rotate(&path, true).await.unwrap();
        assert_eq!(run.state, "failed", "{:?}", steps(&run));
        assert_eq!(
            run.steps
                .iter()
                .filter(|s| s.step == "apply" && s.outcome == "ok")
                .count(),
            3,
            "apply worked each time: {:?}",
            steps(&run)
        );
        assert_eq!(
            run.steps
                .iter()
                .filter(|s| s.step == "verify" && s.outcome == "failed")
                .count(),
            3
        );
        let current = root.get(&path).await.unwrap();
        assert_eq!(
            current.version, 1,
            "current never moved to a value that did not verify"
        );
        assert!(
            t.can_login(&user, &initial).await,
            "rollback restored current on the target"
        );
        let _ = pg
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\""))
            .await;
    })
    .await;
}

// ---------------------------------------------------------------- schedule and watch

#[tokio::test]
async fn scheduled_rotation_runs_without_a_trigger_and_watch_delivers_it() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("sched");
    let path = format!("{prefix}/key");
    root.put(
        &path,
        &data(&[("password", "before")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let mut stream = root.watch(&[], &[&prefix]).await.unwrap();
    let fresh = keyward::client::FreshSecret::start(root.clone(), &path)
        .await
        .unwrap();
    assert_eq!(fresh.current().version, 1);
    let mut changes = fresh.subscribe();

    root.set_rotation_policy(
        &path,
        &spec("random", Duration::from_secs(2), Duration::ZERO, &[]),
    )
    .await
    .unwrap();
    let event = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("Watch delivered nothing")
        .unwrap()
        .unwrap();
    assert_eq!(event.path, path);
    assert!(event.version >= 2);
    let got = root
        .get_with(&path, Some(event.version), None)
        .await
        .unwrap();
    assert_ne!(got.field_str("password"), Some("before"));
    let runs = root.rotation_history(&path).await.unwrap();
    assert!(
        runs.iter().any(|r| r.trigger == "schedule"),
        "no scheduled run"
    );

    tokio::time::timeout(PATIENCE, changes.changed())
        .await
        .expect("FreshSecret saw nothing")
        .unwrap();
    assert!(
        fresh.current().version >= 2,
        "FreshSecret follows the rotation"
    );

    // It keeps rotating on its own.
    let second = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("no second rotation")
        .unwrap()
        .unwrap();
    assert!(second.version > event.version);
    root.delete_rotation_policy(&path).await.unwrap();

    // A plain write is announced too; a path outside the watch is not.
    root.put(
        &format!("{prefix}x/other"),
        &data(&[("k", "v")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    root.put(
        &format!("{prefix}/other"),
        &data(&[("k", "v")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    loop {
        let e = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("the write was not announced")
            .unwrap()
            .unwrap();
        assert!(
            !e.path.starts_with(&format!("{prefix}x")),
            "a path outside the prefix: {}",
            e.path
        );
        if e.path == format!("{prefix}/other") {
            break;
        }
    }
}

// ---------------------------------------------------------------- crashes

/// Writes what a crash test needs on a fresh server.
type Setup =
    dyn Fn(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Sync;

/// Starts a rotation on a child server armed to kill itself after `step`,
/// waits for the kill, restarts without the fault point and waits for the
/// rotation (and its retire) to be complete. Returns the restarted server.
async fn crash_after(
    step: &str,
    dir: &std::path::Path,
    path: &str,
    policy: &RotationPolicySpec,
    setup: &Setup,
) -> ChildServer {
    let log = dir.join(format!("server-{step}.log"));
    let vault = dir.join("vault");
    let mut armed =
        ChildServer::start_with_env(&vault, &log, &[("KEYWARD_TEST_CRASH_AFTER", step)]);
    let client = armed.client().await;
    setup(client.clone()).await;
    client.set_rotation_policy(path, policy).await.unwrap();
    // The answer may or may not arrive before the kill.
    let _ = client.rotate(path, false).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = armed.wait();
        (armed, status)
    });
    let (armed, status) = tokio::time::timeout(PATIENCE, status)
        .await
        .unwrap_or_else(|_| panic!("the fault point after {step} did not fire"))
        .unwrap();
    assert!(!status.success(), "killed after {step}: {status:?}");
    drop(armed);
    let restarted = ChildServer::start(&vault, &log);
    let client = restarted.client().await;
    let run = eventually(
        &format!("the rotation to complete after a crash after {step}"),
        || {
            let client = client.clone();
            async move {
                let runs = client.rotation_history(path).await.ok()?;
                runs.into_iter()
                    .find(|r| r.state == "succeeded" && r.steps.iter().any(|s| s.step == "retire"))
            }
        },
    )
    .await;
    assert!(has_step(&run, "promote", "ok"), "{step}: {:?}", steps(&run));
    restarted
}

#[tokio::test]
async fn crash_after_each_step_random_provider_resumes() {
    for step in ["generate", "apply", "verify", "promote", "retire"] {
        let dir = tempfile::tempdir().unwrap();
        let path = format!("{}/key", unique("crash"));
        let setup_path = path.clone();
        let setup =
            move |c: Client| -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
                let path = setup_path.clone();
                Box::pin(async move {
                    c.put(
                        &path,
                        &data(&[("password", "before-crash")]),
                        PutOptions::default(),
                    )
                    .await
                    .unwrap();
                })
            };
        let policy = spec("random", HOUR, Duration::ZERO, &[]);
        let server = crash_after(step, dir.path(), &path, &policy, &setup).await;
        let client = server.client().await;
        let current = client.get(&path).await.unwrap();
        assert_eq!(current.stage, "current");
        assert_ne!(
            current.field_str("password"),
            Some("before-crash"),
            "{step}"
        );
        let runs = client.rotation_history(&path).await.unwrap();
        assert_eq!(
            runs.iter().filter(|r| r.state == "succeeded").count(),
            1,
            "{step}: exactly one run, resumed: {:?}",
            runs.iter().map(steps).collect::<Vec<_>>()
        );
        assert!(
            client.get_with(&path, None, Some("pending")).await.is_err(),
            "{step}"
        );
    }
}

#[tokio::test]
async fn crash_after_each_step_postgres_resumes_and_current_logs_in() {
    let target = Target::new(Kind::Postgres).await;
    let t = target.clone();
    with_cleanup(target, async move {
        for step in ["generate", "apply", "verify", "promote", "retire"] {
            let dir = tempfile::tempdir().unwrap();
            let prefix = unique("pgcrash");
            let (admin, path) = (format!("{prefix}/admin"), format!("{prefix}/app"));
            let user = t.user(&format!("c{step}"));
            let initial = password();
            t.create_user(&user, &initial).await;
            let (t2, admin2, path2, user2, initial2) = (
                t.clone(),
                admin.clone(),
                path.clone(),
                user.clone(),
                initial.clone(),
            );
            let setup = move |c: Client| -> std::pin::Pin<
                Box<dyn std::future::Future<Output = ()> + Send>,
            > {
                let (t, admin, path, user, initial) = (
                    t2.clone(),
                    admin2.clone(),
                    path2.clone(),
                    user2.clone(),
                    initial2.clone(),
                );
                Box::pin(async move {
                    put_admin(&t, &c, &admin, &[]).await;
                    c.put(
                        &path,
                        &data(&[("username", &user), ("password", &initial)]),
                        PutOptions::default(),
                    )
                    .await
                    .unwrap();
                })
            };
            let policy = spec(
                "postgres",
                HOUR,
                Duration::ZERO,
                &[("admin_secret", &admin), ("username", &user)],
            );
            let server = crash_after(step, dir.path(), &path, &policy, &setup).await;
            let client = server.client().await;
            let current = client.get(&path).await.unwrap();
            let new = current.field_str("password").unwrap();
            assert_ne!(new, initial, "{step}");
            assert!(
                t.can_login(&user, new).await,
                "{step}: current logs in after the crash"
            );
            assert!(
                !t.can_login(&user, &initial).await,
                "{step}: the old password is refused"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------- external plugin

/// `examples/provider_plugin.rs` registered through the server
/// (`Rotation.RegisterProvider`) and used by a policy.
mod external {
    use super::*;
    use crate::plugin::start_plugin;
    use std::path::Path;

    fn sha256_hex(key: &str) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()))
    }

    fn listed(keys_file: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(keys_file).unwrap();
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        file["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registered_plugin_rotates_and_retires() {
        let plugin = tokio::task::spawn_blocking(start_plugin).await.unwrap();
        let server = TestServer::dev().await;
        let root = server.root().await;
        let endpoint = format!("unix:{}", plugin.socket.display());
        let name = format!("apikeys{}", suffix());
        let registered = root
            .register_provider(&name, &endpoint, None)
            .await
            .unwrap();
        assert!(registered.settings.iter().any(|k| k == "keys_file"));
        let taken = root
            .register_provider("random", &endpoint, None)
            .await
            .unwrap_err();
        assert_eq!(taken.code(), Some(tonic::Code::AlreadyExists));

        let keys_file = plugin.dir.path().join("keys.json");
        let old_key = "ak_OldKeyThatIsCurrentlyInUse0123456789";
        std::fs::write(
            &keys_file,
            format!("{{\"keys\": [\"{}\"]}}", sha256_hex(old_key)),
        )
        .unwrap();
        let path = format!("{}/api", unique("plugin"));
        root.put(&path, &data(&[("api_key", old_key)]), PutOptions::default())
            .await
            .unwrap();
        let file = keys_file.display().to_string();
        root.set_rotation_policy(
            &path,
            &spec(&name, HOUR, Duration::from_secs(1), &[("keys_file", &file)]),
        )
        .await
        .unwrap();
        let run = root.rotate(&path, true).await.unwrap();
        assert_eq!(run.state, "succeeded", "{:?}", steps(&run));
        let new_key = root
            .get(&path)
            .await
            .unwrap()
            .field_str("api_key")
            .unwrap()
            .to_owned();
        assert_ne!(new_key, old_key);
        assert!(listed(&keys_file).contains(&sha256_hex(&new_key)));
        let done = eventually("the plugin's retire", || retired(&root, &path)).await;
        assert!(has_step(&done, "retire", "ok"), "{:?}", steps(&done));
        assert_eq!(
            listed(&keys_file),
            [sha256_hex(&new_key)],
            "the old key is unlisted"
        );
    }
}

// ---------------------------------------------------------------- serialising

/// Records a run on `path` straight in storage, as a crash would leave it,
/// from the secret's policy; `step` and `pending_version` as given.
fn record_run(
    server: &TestServer,
    path: &str,
    step: keyward::rotation::machine::Step,
    pending_version: u64,
) -> keyward::rotation::machine::RunRecord {
    use prost::Message;
    let secret = keyward::secrets::SecretPath::parse(path).unwrap();
    let policy = server.core.rotation.policy(&secret).unwrap().unwrap();
    let mut run = keyward::rotation::machine::RunRecord::start(
        unique("run"),
        &policy,
        "manual",
        0,
        server.core.clock().now_ms(),
    );
    run.step = step as i32;
    run.pending_version = pending_version;
    server
        .core
        .barrier
        .put(&format!("rotation/run/{}", run.path), &run.encode_to_vec())
        .unwrap();
    run
}

/// The retire entries of `path` (their keys carry the due time).
fn retire_entries(server: &TestServer, path: &str) -> Vec<String> {
    let secret = keyward::secrets::SecretPath::parse(path).unwrap();
    let suffix = format!("/{}", secret.as_str());
    server
        .core
        .barrier
        .scan_keys("rotation/retire/")
        .unwrap()
        .into_iter()
        .filter(|k| k.ends_with(&suffix))
        .collect()
}

/// A new secret (`password` = `initial-value-1`) rotated by `random` every
/// hour with `grace`; returns its path.
async fn hourly_random_secret(root: &Client, grace: Duration) -> String {
    let path = format!("{}/api-key", unique("rot"));
    root.put(
        &path,
        &data(&[("password", "initial-value-1")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    root.set_rotation_policy(
        &path,
        &spec("random", HOUR, grace, &[("fields", "password")]),
    )
    .await
    .unwrap();
    path
}

#[tokio::test]
async fn a_retire_waits_while_a_run_on_the_same_secret_is_recorded() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = hourly_random_secret(&root, Duration::from_secs(2)).await;
    let first = root.rotate(&path, true).await.unwrap();
    assert_eq!(first.state, "succeeded", "{:?}", steps(&first));
    // The next run is recorded (between apply and promote) before the
    // retire of the first one is due.
    record_run(&server, &path, keyward::rotation::machine::Step::Promote, 0);
    let scheduled = retire_entries(&server, &path);
    assert_eq!(scheduled.len(), 1, "one retire is scheduled");

    // Well past the grace period the retire has not run: it was moved on.
    eventually("the retire to be postponed", || async {
        let now = retire_entries(&server, &path);
        (now.len() == 1 && now != scheduled).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        retired(&root, &path).await.is_none(),
        "a retire ran while a run was recorded"
    );
    assert_eq!(
        retire_entries(&server, &path).len(),
        1,
        "the retire is kept"
    );

    // Once the run is gone, the retire runs.
    let secret = keyward::secrets::SecretPath::parse(&path).unwrap();
    server
        .core
        .barrier
        .delete(&format!("rotation/run/{}", secret.as_str()))
        .unwrap();
    let done = eventually("the retire step", || retired(&root, &path)).await;
    assert!(has_step(&done, "retire", "ok"), "{:?}", steps(&done));
    assert_eq!(done.run_id, first.run_id);
    assert!(retire_entries(&server, &path).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_pending_version_gone_before_promote_rolls_back_and_the_schedule_goes_on() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = hourly_random_secret(&root, Duration::ZERO).await;
    // A run at Promote whose pending version was removed outside it (there
    // is no pending version 7), resumed as after a restart.
    let stuck = record_run(&server, &path, keyward::rotation::machine::Step::Promote, 7);
    server.core.rotation.on_unseal();
    let failed = eventually("the stuck run to finish", || async {
        root.rotation_history(&path)
            .await
            .ok()?
            .into_iter()
            .find(|r| r.run_id == stuck.run_id && r.state != "running")
    })
    .await;
    assert_eq!(failed.state, "failed", "{:?}", steps(&failed));
    assert!(
        has_step(&failed, "promote", "failed"),
        "{:?}",
        steps(&failed)
    );
    assert!(
        failed.steps.iter().any(|s| s.step == "rollback"),
        "{:?}",
        steps(&failed)
    );
    assert!(
        failed
            .steps
            .iter()
            .any(|s| s.step == "promote" && s.message.contains("cannot be promoted")),
        "{:?}",
        failed.steps
    );
    let current = root.get(&path).await.unwrap();
    assert_eq!(
        (current.version, current.field_str("password")),
        (1, Some("initial-value-1")),
        "current is kept"
    );
    let secret = keyward::secrets::SecretPath::parse(&path).unwrap();
    assert!(server.core.rotation.active_run(&secret).unwrap().is_none());
    let policy = root.rotation_policy(&path).await.unwrap();
    assert_eq!(policy.last_state, "failed");

    // The next run is not held back by it.
    let next = root.rotate(&path, true).await.unwrap();
    assert_eq!(next.state, "succeeded", "{:?}", steps(&next));
    assert_ne!(next.run_id, stuck.run_id);
    assert_eq!(root.get(&path).await.unwrap().version, 2);
    server.stop().await;
}

/// A grant on `rotation/...` alone does not let a caller have the broker
/// overwrite a secret it cannot write.
#[tokio::test]
async fn setting_a_policy_needs_write_on_the_secret() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("rot/guarded");
    root.put(
        &path,
        &data(&[("password", "keep-me")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let name = unique("rotonly");
    root.policy_put(
        &name,
        "[[rule]]\npath = \"rotation/**\"\ncapabilities = [\"read\", \"write\", \"rotate\"]\n",
    )
    .await
    .unwrap();
    let issued = root
        .issue_token(keyward::client::IssueOptions {
            policies: vec![name],
            ..Default::default()
        })
        .await
        .unwrap();
    let rotator = root.with_token(&issued.token).unwrap();
    let refused = rotator
        .set_rotation_policy(&path, &spec("random", HOUR, HOUR, &[]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::PermissionDenied));
    assert!(
        root.rotation_policy(&path).await.is_err(),
        "no policy was set"
    );
    // Root may.
    root.set_rotation_policy(&path, &spec("random", HOUR, HOUR, &[]))
        .await
        .unwrap();
}
