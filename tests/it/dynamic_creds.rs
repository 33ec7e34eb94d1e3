//! Dynamic credentials against real servers: the private scram-sha-256
//! PostgreSQL cluster (passwords really checked), MariaDB and Redis. Every
//! user checked here is looked up with the drivers directly, never through
//! keyward.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use tonic::Code;

use crate::db_target::{mysql_admin, pg_admin, redis_admin, suffix, Kind, Target};
use crate::harness::{data, eventually, unique, TestServer};
use crate::ident_kit::{approle_identity, login};
use keyward::client::{Client, ClientError, DynamicRoleSpec, IssueOptions, PutOptions};
use keyward::proto::v1::CredsResponse;

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.expect_err("the call should have been refused")
        .code()
        .expect("a server status, not a local error")
}

fn message<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    r.expect_err("the call should have been refused")
        .to_string()
}

/// Stores the target's admin login as a secret; returns its path.
async fn admin_secret(root: &Client, target: &Target) -> String {
    let path = unique("dyn/admin");
    let pairs = target.admin();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    root.put(&path, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
    path
}

fn spec(
    name: &str,
    provider: &str,
    config: &[(&str, &str)],
    ttl: u64,
    max: u64,
) -> DynamicRoleSpec {
    DynamicRoleSpec {
        name: name.to_owned(),
        provider: provider.to_owned(),
        config: config
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        ttl: Duration::from_secs(ttl),
        max_ttl: Duration::from_secs(max),
    }
}

/// A role name unique to this test (`[a-z0-9_]`).
fn role_name(prefix: &str) -> String {
    format!("{prefix}_{}", suffix())
}

/// A client whose token holds only the policy `document`.
async fn holder(root: &Client, document: &str) -> Client {
    let name = unique("p");
    root.policy_put(&name, document).await.unwrap();
    let issued = root
        .issue_token(IssueOptions {
            policies: vec![name],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    root.with_token(&issued.token).unwrap()
}

/// Users on the target whose name starts with `kw_<role>_`.
async fn users_of_role(kind: Kind, role: &str) -> Vec<String> {
    let pattern = format!("kw\\_{}\\_%", role.replace('_', "\\_"));
    match kind {
        Kind::Postgres => {
            let c = pg_admin().await;
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
        Kind::Mysql => {
            let mut conn = mysql_admin().await;
            let users: Vec<String> = conn
                .exec("SELECT user FROM mysql.user WHERE user LIKE ?", (pattern,))
                .await
                .unwrap();
            conn.disconnect().await.unwrap();
            users
        }
        Kind::Redis => {
            let mut conn = redis_admin().await;
            let users: Vec<String> = redis::cmd("ACL")
                .arg("USERS")
                .query_async(&mut conn)
                .await
                .unwrap();
            let prefix = format!("kw_{role}_");
            users
                .into_iter()
                .filter(|u| u.starts_with(&prefix))
                .collect()
        }
    }
}

async fn pg_user_client(c: &CredsResponse) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host(&c.host)
        .port(u16::try_from(c.port).unwrap())
        .user(&c.username)
        .password(&c.password)
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("the issued PostgreSQL credential logs in");
    tokio::spawn(conn);
    client
}

async fn gone(target: &Arc<Target>, user: &str) {
    let t = target.clone();
    let u = user.to_owned();
    eventually(&format!("user {user} is dropped"), move || {
        let t = t.clone();
        let u = u.clone();
        async move { !t.user_exists(&u).await }
    })
    .await;
}

#[tokio::test]
async fn postgres_creds_use_the_granted_role_and_end_on_revoke_renew_and_expiry() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &target).await;
    // A database role that alone may read a table.
    let granted = format!("kwgrant_{}", suffix());
    let table = format!("kwtable_{}", suffix());
    let pg = pg_admin().await;
    pg.batch_execute(&format!(
        "CREATE ROLE {granted} NOLOGIN; CREATE TABLE {table} (v int); INSERT INTO {table} VALUES (42); GRANT SELECT ON {table} TO {granted}"
    ))
    .await
    .unwrap();
    let role = role_name("pg");
    root.dynamic_role_put(&spec(
        &role,
        "postgres",
        &[("admin_secret", &admin), ("roles", &granted)],
        3600,
        7200,
    ))
    .await
    .unwrap();

    let c = root.creds(&role, None).await.unwrap();
    assert!(
        c.username.starts_with(&format!("kw_{role}_")),
        "{}",
        c.username
    );
    assert!(c.lease_id.starts_with(&format!("dynamic/{role}/")));
    assert!(c.renewable);
    assert!(!format!("{c:?}").contains(&c.password));
    let user = pg_user_client(&c).await;
    let row = user
        .query_one(&format!("SELECT v FROM {table}"), &[])
        .await
        .expect("the granted role's privilege works");
    assert_eq!(row.get::<_, i32>(0), 42);
    // A wrong password is refused: the cluster checks passwords.
    assert!(!target.can_login(&c.username, "not-the-password").await);

    // Renew: extended, never past the max TTL.
    let before = root.lease_lookup(&c.lease_id).await.unwrap();
    let renewed = root
        .lease_renew(&c.lease_id, Some(Duration::from_secs(86_400)))
        .await
        .unwrap();
    let max = renewed.max_expires_at.unwrap().seconds;
    assert_eq!(renewed.expires_at.unwrap().seconds, max);
    assert!(max > before.expires_at.unwrap().seconds);

    // Revoke by id: the session ends and the user is gone.
    assert_eq!(root.lease_revoke(&c.lease_id).await.unwrap(), (1, 0));
    assert!(!target.user_exists(&c.username).await);
    assert!(user.simple_query("SELECT 1").await.is_err());
    assert_eq!(code(root.lease_lookup(&c.lease_id).await), Code::NotFound);

    // Expiry: a short lease is revoked by the sleeper (long enough for the
    // login below on a loaded machine; `gone` waits up to 30 s).
    let short = root
        .creds(&role, Some(Duration::from_secs(8)))
        .await
        .unwrap();
    assert!(target.can_login(&short.username, &short.password).await);
    gone(&target, &short.username).await;
    let t = root.clone();
    let id = short.lease_id.clone();
    eventually("the expired lease is forgotten", move || {
        let t = t.clone();
        let id = id.clone();
        async move { t.lease_lookup(&id).await.is_err() }
    })
    .await;
    assert!(users_of_role(Kind::Postgres, &role).await.is_empty());
    pg.batch_execute(&format!("DROP TABLE {table}; DROP ROLE {granted}"))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn mariadb_creds_get_the_role_as_default_and_revoke_prefix_removes_all() {
    let target = Target::new(Kind::Mysql).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &target).await;
    let granted = format!("kwgrant_{}", suffix());
    let table = format!("test.kwtable_{}", suffix());
    let mut my = mysql_admin().await;
    for s in [
        format!("CREATE ROLE {granted}"),
        format!("CREATE TABLE {table} (v INT)"),
        format!("INSERT INTO {table} VALUES (7)"),
        format!("GRANT SELECT ON {table} TO {granted}"),
    ] {
        my.query_drop(s).await.unwrap();
    }
    let role = role_name("my");
    root.dynamic_role_put(&spec(
        &role,
        "mysql",
        &[("admin_secret", &admin), ("roles", &granted)],
        3600,
        3600,
    ))
    .await
    .unwrap();
    let mut issued = Vec::new();
    for _ in 0..3 {
        issued.push(root.creds(&role, None).await.unwrap());
    }
    // The role applies without SET ROLE: it is the user's default.
    let c = &issued[0];
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(3306)
        .user(Some(c.username.clone()))
        .pass(Some(c.password.clone()))
        .prefer_socket(false);
    let mut conn = mysql_async::Conn::new(opts).await.unwrap();
    let v: Option<i32> = conn
        .query_first(format!("SELECT v FROM {table}"))
        .await
        .unwrap();
    assert_eq!(v, Some(7));
    assert_eq!(
        root.lease_list(&format!("dynamic/{role}"), false)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        root.lease_revoke_prefix(&format!("dynamic/{role}"))
            .await
            .unwrap(),
        (3, 0)
    );
    for c in &issued {
        assert!(!target.user_exists(&c.username).await, "{}", c.username);
    }
    // Its open session was killed.
    assert!(conn.query_drop("SELECT 1").await.is_err());
    for s in [
        format!("DROP TABLE {table}"),
        format!("DROP ROLE {granted}"),
    ] {
        my.query_drop(s).await.unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn redis_creds_follow_the_acl_and_end_with_their_token() {
    let target = Target::new(Kind::Redis).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &target).await;
    let role = role_name("rd");
    root.dynamic_role_put(&spec(
        &role,
        "redis",
        &[("admin_secret", &admin), ("acl", "~kwapp:* +set +get")],
        3600,
        3600,
    ))
    .await
    .unwrap();
    // A child token asks; revoking the token revokes its lease.
    let policy = unique("p");
    root.policy_put(
        &policy,
        &format!("[[rule]]\npath = \"dynamic/{role}\"\ncapabilities = [\"issue\"]\n"),
    )
    .await
    .unwrap();
    let child = root
        .issue_token(IssueOptions {
            policies: vec![policy],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let workload = root.with_token(&child.token).unwrap();
    let c = workload.creds(&role, None).await.unwrap();
    assert_eq!(c.port, 6379);
    let info = redis::ConnectionAddr::Tcp("127.0.0.1".into(), 6379);
    let info = redis::IntoConnectionInfo::into_connection_info(info)
        .unwrap()
        .set_redis_settings(
            redis::RedisConnectionInfo::default()
                .set_username(&c.username)
                .set_password(&c.password),
        );
    let mut conn = redis::Client::open(info)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("kwapp:{}", suffix());
    redis::cmd("SET")
        .arg(&key)
        .arg("1")
        .query_async::<()>(&mut conn)
        .await
        .expect("the ACL allows SET on kwapp:*");
    let refused = redis::cmd("SET")
        .arg("other:key")
        .arg("1")
        .query_async::<()>(&mut conn)
        .await;
    assert!(refused.is_err(), "a key outside the pattern is refused");
    // The holder looks up its own lease without any sys/leases grant.
    workload.lease_lookup(&c.lease_id).await.unwrap();
    root.revoke_token(&child.token).await.unwrap();
    gone(&target, &c.username).await;
    let mut admin_conn = redis_admin().await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut admin_conn)
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn disabling_an_identity_revokes_its_leases() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &target).await;
    let role = role_name("id");
    root.dynamic_role_put(&spec(
        &role,
        "postgres",
        &[("admin_secret", &admin)],
        3600,
        3600,
    ))
    .await
    .unwrap();
    let policy = unique("p");
    root.policy_put(
        &policy,
        &format!("[[rule]]\npath = \"dynamic/{role}\"\ncapabilities = [\"issue\"]\n"),
    )
    .await
    .unwrap();
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, &[policy]).await;
    let (_, workload) = login(&server, &role_id, &secret_id).await;
    let c = workload.creds(&role, None).await.unwrap();
    assert!(target.can_login(&c.username, &c.password).await);
    root.identity_disable(&name).await.unwrap();
    gone(&target, &c.username).await;
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_the_rule_and_creates_nothing() {
    let pg = Target::new(Kind::Postgres).await;
    let rd = Target::new(Kind::Redis).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &pg).await;
    let rd_admin = admin_secret(&root, &rd).await;
    let role = role_name("bad");

    assert_eq!(code(root.creds("no_such_role", None).await), Code::NotFound);
    let missing_role = message(
        root.dynamic_role_put(&spec(
            &role,
            "postgres",
            &[
                ("admin_secret", &admin),
                ("roles", "kw_role_that_is_not_there"),
            ],
            60,
            60,
        ))
        .await,
    );
    assert!(
        missing_role.contains("kw_role_that_is_not_there")
            && missing_role.contains("does not exist"),
        "{missing_role}"
    );
    let nopass = message(
        root.dynamic_role_put(&spec(
            &role,
            "redis",
            &[("admin_secret", &rd_admin), ("acl", "~x:* nopass")],
            60,
            60,
        ))
        .await,
    );
    assert!(nopass.contains("`nopass` is not allowed"), "{nopass}");
    let no_secret = message(
        root.dynamic_role_put(&spec(
            &role,
            "postgres",
            &[("admin_secret", "dyn/none/here")],
            60,
            60,
        ))
        .await,
    );
    assert!(no_secret.contains("dyn/none/here"), "{no_secret}");
    let past = code(
        root.dynamic_role_put(&spec(
            &role,
            "postgres",
            &[("admin_secret", &admin)],
            120,
            60,
        ))
        .await,
    );
    assert_eq!(past, Code::InvalidArgument);

    root.dynamic_role_put(&spec(
        &role,
        "postgres",
        &[("admin_secret", &admin)],
        60,
        120,
    ))
    .await
    .unwrap();
    let too_long = message(root.creds(&role, Some(Duration::from_secs(3600))).await);
    assert!(too_long.contains("max TTL"), "{too_long}");
    // The admin secret goes away: a clear error, no user made.
    root.delete(&admin, None).await.unwrap();
    let unreadable = message(root.creds(&role, None).await);
    assert!(unreadable.contains(&admin), "{unreadable}");
    assert!(users_of_role(Kind::Postgres, &role).await.is_empty());
    assert!(root.lease_list("", false).await.unwrap().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_low_privileged_caller_cannot_issue_define_or_touch_others_leases() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &target).await;
    let allowed = role_name("ok");
    let other = role_name("no");
    for r in [&allowed, &other] {
        root.dynamic_role_put(&spec(r, "postgres", &[("admin_secret", &admin)], 600, 600))
            .await
            .unwrap();
    }
    let low = holder(
        &root,
        &format!(
            "[[rule]]\npath = \"dynamic/{allowed}\"\ncapabilities = [\"issue\"]\n\
             [[rule]]\npath = \"dynamic/mine\"\ncapabilities = [\"admin\"]\n"
        ),
    )
    .await;
    assert_eq!(code(low.creds(&other, None).await), Code::PermissionDenied);
    // Admin on a role is not enough: the admin secret must be readable too
    // (else the role would lend the server's read of it).
    assert_eq!(
        code(
            low.dynamic_role_put(&spec(
                "mine",
                "postgres",
                &[("admin_secret", &admin)],
                60,
                60
            ))
            .await
        ),
        Code::PermissionDenied
    );
    let theirs = root.creds(&other, None).await.unwrap();
    let mine = low.creds(&allowed, None).await.unwrap();
    assert_eq!(
        code(low.lease_lookup(&theirs.lease_id).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(low.lease_renew(&theirs.lease_id, None).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(low.lease_revoke(&theirs.lease_id).await),
        Code::PermissionDenied
    );
    // A lease that does not exist is refused the same way.
    assert_eq!(
        code(
            low.lease_lookup(&format!("dynamic/{other}/nosuchlease"))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(low.lease_revoke_prefix(&format!("dynamic/{other}")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(low.lease_list("", false).await),
        Code::PermissionDenied
    );
    assert!(target.user_exists(&theirs.username).await);
    // Look-alike ids are refused as input, not resolved.
    for bad in [
        format!("dynamic/{allowed}/../{other}"),
        format!("dynamic/{other}/*"),
        "dynamic//x".to_owned(),
    ] {
        assert_eq!(
            code(low.lease_revoke(&bad).await),
            Code::InvalidArgument,
            "{bad}"
        );
    }
    // No token, no credential.
    let anonymous = server.anonymous().await;
    assert_eq!(
        code(anonymous.creds(&allowed, None).await),
        Code::Unauthenticated
    );
    // Its own lease it may revoke.
    assert_eq!(low.lease_revoke(&mine.lease_id).await.unwrap(), (1, 0));
    assert!(!target.user_exists(&mine.username).await);
    root.lease_revoke(&theirs.lease_id).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_refusing_target_is_retried_visibly_and_revoked_once_it_answers() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &target).await;
    let role = role_name("retry");
    root.dynamic_role_put(&spec(
        &role,
        "postgres",
        &[("admin_secret", &admin)],
        600,
        600,
    ))
    .await
    .unwrap();
    let c = root.creds(&role, None).await.unwrap();
    // The admin login stops working (a wrong port: nothing listens there).
    let saved = target.admin();
    let mut broken: Vec<(String, String)> = saved.clone();
    for (k, v) in broken.iter_mut() {
        if k == "port" {
            *v = "1".into();
        }
    }
    let put = |pairs: Vec<(String, String)>| {
        let root = root.clone();
        let admin = admin.clone();
        async move {
            let pairs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            root.put(&admin, &data(&pairs), PutOptions::default())
                .await
                .unwrap();
        }
    };
    put(broken).await;
    assert_eq!(root.lease_revoke(&c.lease_id).await.unwrap(), (0, 1));
    let failed = root.lease_list("", true).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].failures >= 1 && !failed[0].last_error.is_empty());
    assert!(!failed[0].last_error.contains(&c.password));
    let report = root.governance_report(86_400, 86_400).await.unwrap();
    assert_eq!(report.lease_revocations_failing, 1);
    let metrics = reqwest_metrics(&server).await;
    assert!(
        metrics.contains("keyward_lease_revocations_failing 1"),
        "{metrics}"
    );
    assert!(target.user_exists(&c.username).await);
    // Back: the sleeper's retry removes it.
    put(saved).await;
    gone(&target, &c.username).await;
    let r = root.clone();
    eventually("the failed list empties", move || {
        let r = r.clone();
        async move { r.lease_list("", true).await.unwrap().is_empty() }
    })
    .await;
    server.stop().await;
}

/// The metrics text of a test server.
async fn reqwest_metrics(server: &TestServer) -> String {
    server.core.metrics.refresh();
    server.core.metrics.encode()
}

#[tokio::test]
async fn a_restart_leaves_no_user_behind() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &target).await;
    let role = role_name("rs");
    root.dynamic_role_put(&spec(&role, "postgres", &[("admin_secret", &admin)], 3, 60))
        .await
        .unwrap();
    let c = root.creds(&role, None).await.unwrap();
    let server = server.restart().await;
    // Nothing was loaded; the sleeper reads the index and revokes at expiry.
    gone(&target, &c.username).await;
    let _ = server.root().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_issues_lists_and_revokes_with_one_json_document_each() {
    let target = Target::new(Kind::Redis).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin = admin_secret(&root, &target).await;
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str]| tokio::task::block_in_place(|| crate::harness::cli(args, &env, None));
    let role = role_name("cli");
    let admin_cfg = format!("admin_secret={admin}");
    let (code, out, err) = run(&[
        "dynamic",
        "role",
        "put",
        &role,
        "--provider",
        "redis",
        "--config",
        &admin_cfg,
        "--config",
        "acl=~cli:* +get",
        "--ttl",
        "10m",
        "--max-ttl",
        "1h",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["config"]["acl"], "~cli:* +get");
    let (code, out, err) = run(&["creds", &role, "--ttl", "5m", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let c: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in [
        "lease_id",
        "username",
        "password",
        "host",
        "port",
        "database",
        "expires_at",
        "renewable",
    ] {
        assert!(c.get(key).is_some(), "{key} in {out}");
    }
    let user = c["username"].as_str().unwrap().to_owned();
    let password = c["password"].as_str().unwrap().to_owned();
    assert!(target.can_login(&user, &password).await);
    // The password is shown once: not in the audit log, not on disk.
    server.core.barrier.durable().await.unwrap();
    for file in crate::harness::files_under(server.dir.path()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !crate::harness::contains(&bytes, password.as_bytes()),
            "{}",
            file.display()
        );
    }
    let (code, out, _) = run(&["lease", "list", "--failed", "--format", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["leases"],
        serde_json::json!([])
    );
    // Bad input: exit 1 with the rule on stderr; a TTL past the max.
    let (code, _, err) = run(&["creds", &role, "--ttl", "2h", "--format", "json"]);
    assert_eq!(code, 1);
    assert!(err.contains("max TTL"), "{err}");
    let prefix = format!("dynamic/{role}");
    let (code, out, err) = run(&["lease", "revoke", "--prefix", &prefix, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["revoked"],
        1
    );
    assert!(!target.user_exists(&user).await);
    server.stop().await;
}
