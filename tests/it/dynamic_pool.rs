//! The pool of admin connections of dynamic credentials, against the
//! private scram-sha-256 PostgreSQL cluster. Each test makes its own admin
//! logins (superusers with names unique to the test), so what
//! `pg_stat_activity` shows for them is this test's server alone.
//!
//! What is checked, on PostgreSQL's side only: a connection is reused
//! between issues, a connection ended by `pg_terminate_backend` is not
//! reused (the next issue works on a new one), roles with different admin
//! secrets never act through each other's connection (the grantor of each
//! new user's membership is its own role's admin), a rotated admin secret
//! is used for the very next credential (a wrong new password fails even
//! though a connection made with the old one is open), sealing closes
//! the pooled connections, and a statement the server refuses (dropping a
//! user that is already gone) leaves the connection in the pool.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::db_target::{pg_admin, suffix, Kind, Target};
use crate::harness::{data, eventually, unique, TestServer};
use keyward::client::{Client, DynamicRoleSpec, PutOptions};

/// A superuser login made for one test, dropped by [`AdminUser::drop`].
pub(crate) struct AdminUser {
    pub(crate) name: String,
    pub(crate) password: String,
}

impl AdminUser {
    pub(crate) async fn new() -> Self {
        let name = format!("kwadm_{}", suffix());
        let password = crate::db_target::password();
        pg_admin()
            .await
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN SUPERUSER PASSWORD '{password}'"
            ))
            .await
            .unwrap();
        Self { name, password }
    }

    /// Stores this login as a secret; returns its path.
    pub(crate) async fn store(&self, root: &Client, password: &str) -> String {
        let path = unique("dynpool/admin");
        self.put(root, &path, password).await;
        path
    }

    async fn put(&self, root: &Client, path: &str, password: &str) {
        let port = crate::pg_cluster::cluster().port.to_string();
        let secret = data(&[
            ("host", "127.0.0.1"),
            ("port", &port),
            ("username", &self.name),
            ("password", password),
            ("database", "postgres"),
        ]);
        root.put(path, &secret, PutOptions::default())
            .await
            .unwrap();
    }

    /// The pids of keyward's sessions logged in as this admin.
    pub(crate) async fn keyward_sessions(&self) -> Vec<i32> {
        pg_admin()
            .await
            .query(
                "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND application_name = 'keyward' ORDER BY pid",
                &[&self.name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub(crate) async fn drop(self) {
        let pg = pg_admin().await;
        pg.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&self.name],
        )
        .await
        .unwrap();
        let name = self.name.clone();
        eventually(&format!("the sessions of {name} end"), move || {
            let name = name.clone();
            async move {
                pg_admin()
                    .await
                    .query(
                        "SELECT 1 FROM pg_stat_activity WHERE usename = $1",
                        &[&name],
                    )
                    .await
                    .unwrap()
                    .is_empty()
            }
        })
        .await;
        pg.batch_execute(&format!("DROP ROLE {}", self.name))
            .await
            .unwrap();
    }
}

pub(crate) async fn granted_role() -> String {
    let name = format!("kwpoolgrp_{}", suffix());
    pg_admin()
        .await
        .batch_execute(&format!("CREATE ROLE {name} NOLOGIN"))
        .await
        .unwrap();
    name
}

/// The setup most pool tests share: a PostgreSQL target, a dev server and
/// its root client, a private admin login stored as the admin secret at
/// `path`, and a dynamic role granting an existing role.
pub(crate) struct PooledRole {
    pub target: std::sync::Arc<Target>,
    pub server: TestServer,
    pub root: Client,
    pub admin: AdminUser,
    pub path: String,
    pub role: String,
}

impl PooledRole {
    pub(crate) async fn new() -> Self {
        let target = Target::new(Kind::Postgres).await;
        let server = TestServer::dev().await;
        let root = server.root().await;
        let admin = AdminUser::new().await;
        let path = admin.store(&root, &admin.password).await;
        let granted = granted_role().await;
        let role = define(&root, &path, &granted).await;
        Self {
            target,
            server,
            root,
            admin,
            path,
            role,
        }
    }
}

pub(crate) async fn define(root: &Client, admin_secret: &str, granted: &str) -> String {
    let role = format!("pool_{}", suffix());
    let config: BTreeMap<String, String> = [
        ("admin_secret".to_owned(), admin_secret.to_owned()),
        ("roles".to_owned(), granted.to_owned()),
    ]
    .into_iter()
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
    role
}

/// Who granted `user` its membership in `granted`: the admin whose
/// connection ran its `CREATE ROLE ... IN ROLE`.
async fn grantor(user: &str, granted: &str) -> String {
    pg_admin()
        .await
        .query_one(
            "SELECT g.rolname FROM pg_auth_members m \
             JOIN pg_roles u ON u.oid = m.member JOIN pg_roles r ON r.oid = m.roleid \
             JOIN pg_roles g ON g.oid = m.grantor WHERE u.rolname = $1 AND r.rolname = $2",
            &[&user, &granted],
        )
        .await
        .unwrap()
        .get(0)
}

async fn sessions_become(admin: &AdminUser, what: &str, check: impl Fn(&[i32]) -> bool) {
    let name = admin.name.clone();
    let check = &check;
    for _ in 0..600 {
        let pids = pg_admin()
            .await
            .query(
                "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND application_name = 'keyward' ORDER BY pid",
                &[&name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>();
        if check(&pids) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn a_connection_is_reused_and_one_ended_by_the_server_is_not() {
    let PooledRole {
        target,
        server,
        root,
        admin,
        role,
        ..
    } = PooledRole::new().await;

    let first = root.creds(&role, None).await.unwrap();
    let pids = admin.keyward_sessions().await;
    assert_eq!(pids.len(), 1, "one pooled admin session: {pids:?}");
    for _ in 0..3 {
        root.creds(&role, None).await.unwrap();
    }
    assert_eq!(
        admin.keyward_sessions().await,
        pids,
        "the same session made every user"
    );

    // The server ends the pooled session behind keyward's back.
    pg_admin()
        .await
        .query("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap();
    let old = pids[0];
    sessions_become(&admin, "the ended session is gone", |p| !p.contains(&old)).await;
    let after = root
        .creds(&role, None)
        .await
        .expect("an issue after the session ended works");
    assert!(target.can_login(&after.username, &after.password).await);
    let now = admin.keyward_sessions().await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], old, "a new session, not the ended one");

    // Revocations go through the pool too, and leave nobody.
    let (done, pending) = root
        .lease_revoke_prefix(&format!("dynamic/{role}"))
        .await
        .unwrap();
    assert_eq!((done, pending), (5, 0));
    assert!(!target.user_exists(&first.username).await);
    assert!(!target.user_exists(&after.username).await);
    server.stop().await;
    admin.drop().await;
}

#[tokio::test]
async fn a_drop_of_a_user_already_gone_gives_the_connection_back() {
    let PooledRole {
        target,
        server,
        root,
        admin,
        role,
        ..
    } = PooledRole::new().await;

    let gone = root.creds(&role, None).await.unwrap();
    let kept = root.creds(&role, None).await.unwrap();
    let pids = admin.keyward_sessions().await;
    assert_eq!(pids.len(), 1, "one pooled admin session: {pids:?}");
    let opened = server.core.dynamic.admin_connections_opened();
    assert_eq!(opened, 1, "one connection opened for two issues");

    // Someone drops the user behind keyward's back: the revocation's first
    // statement is refused with 42704 (role does not exist).
    pg_admin()
        .await
        .batch_execute(&format!("DROP ROLE {}", gone.username))
        .await
        .unwrap();
    assert_eq!(root.lease_revoke(&gone.lease_id).await.unwrap(), (1, 0));
    // Twice more the same way, on the same connection each time.
    for _ in 0..2 {
        let c = root.creds(&role, None).await.unwrap();
        pg_admin()
            .await
            .batch_execute(&format!("DROP ROLE {}", c.username))
            .await
            .unwrap();
        assert_eq!(root.lease_revoke(&c.lease_id).await.unwrap(), (1, 0));
    }
    assert_eq!(
        server.core.dynamic.admin_connections_opened(),
        opened,
        "a refused statement closed the pooled connection"
    );
    assert_eq!(admin.keyward_sessions().await, pids, "the same session");
    assert_eq!(server.core.dynamic.idle_admin_connections(), 1);

    // The connection still works: a revocation of a live user through it.
    assert_eq!(root.lease_revoke(&kept.lease_id).await.unwrap(), (1, 0));
    assert!(!target.user_exists(&kept.username).await);
    assert_eq!(server.core.dynamic.admin_connections_opened(), opened);
    server.stop().await;
    admin.drop().await;
}

#[tokio::test]
async fn roles_with_different_admin_secrets_never_share_a_connection() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (a, b) = (AdminUser::new().await, AdminUser::new().await);
    let path_a = a.store(&root, &a.password).await;
    let path_b = b.store(&root, &b.password).await;
    let granted = granted_role().await;
    let role_a = define(&root, &path_a, &granted).await;
    let role_b = define(&root, &path_b, &granted).await;

    // Interleaved and concurrent: every user is made by its own role's admin.
    let mut calls = Vec::new();
    for i in 0..12 {
        let (root, role) = (
            root.clone(),
            if i % 2 == 0 {
                role_a.clone()
            } else {
                role_b.clone()
            },
        );
        calls.push(tokio::spawn(async move {
            (role.clone(), root.creds(&role, None).await.unwrap())
        }));
    }
    for call in calls {
        let (role, creds) = call.await.unwrap();
        let expected = if role == role_a { &a.name } else { &b.name };
        assert_eq!(
            &grantor(&creds.username, &granted).await,
            expected,
            "{} of {role} was made through another role's admin connection",
            creds.username
        );
        assert!(target.can_login(&creds.username, &creds.password).await);
    }
    assert!(!a.keyward_sessions().await.is_empty());
    assert!(!b.keyward_sessions().await.is_empty());

    // The same login under two secret paths is still two pools.
    let path_a2 = a.store(&root, &a.password).await;
    let role_a2 = define(&root, &path_a2, &granted).await;
    // Role A's pool has an idle session right after this issue...
    root.creds(&role_a, None).await.unwrap();
    let before = a.keyward_sessions().await;
    root.creds(&role_a2, None).await.unwrap();
    let after = a.keyward_sessions().await;
    // ...which the second path's issue did not use: a session not seen before.
    assert!(
        after.iter().any(|p| !before.contains(p)),
        "a second secret path got its own connection: {before:?} -> {after:?}"
    );

    for role in [&role_a, &role_b, &role_a2] {
        root.lease_revoke_prefix(&format!("dynamic/{role}"))
            .await
            .unwrap();
    }
    server.stop().await;
    a.drop().await;
    b.drop().await;
}

#[tokio::test]
async fn a_rotated_admin_secret_is_used_for_the_next_credential() {
    let PooledRole {
        target,
        server,
        root,
        admin,
        path,
        role,
        ..
    } = PooledRole::new().await;
    root.creds(&role, None).await.unwrap();
    let old = admin.keyward_sessions().await;
    assert_eq!(old.len(), 1);

    // A new version with a wrong password: the open session made with the
    // old one must not be used, so the issue fails at the login.
    admin.put(&root, &path, "not-the-password").await;
    let refused = root.creds(&role, None).await;
    assert!(
        refused.is_err(),
        "an issue went through a connection of the old secret"
    );
    // The retired pool closed the old session.
    sessions_become(&admin, "the old secret's session is closed", |p| {
        !p.contains(&old[0])
    })
    .await;

    // The real rotation: a new password on the server and in the secret.
    let new_password = crate::db_target::password();
    pg_admin()
        .await
        .batch_execute(&format!(
            "ALTER ROLE {} PASSWORD '{new_password}'",
            admin.name
        ))
        .await
        .unwrap();
    admin.put(&root, &path, &new_password).await;
    let c = root.creds(&role, None).await.unwrap();
    assert!(target.can_login(&c.username, &c.password).await);
    // (How many sessions are open now is not fixed: the sweeper may be
    // retrying the refused issue's lease with the version it read before,
    // which retires the new pool for a moment. None is the old session.)
    assert!(!admin.keyward_sessions().await.contains(&old[0]));

    // The lease of the refused issue was left to the sweeper (its undo
    // failed with the wrong password too); with the secret fixed, every
    // lease of the role ends and no user stays.
    root.lease_revoke_prefix(&format!("dynamic/{role}"))
        .await
        .unwrap();
    let r = root.clone();
    let prefix = format!("dynamic/{role}");
    eventually("every lease of the role is gone", move || {
        let (r, prefix) = (r.clone(), prefix.clone());
        async move { r.lease_list(&prefix, false).await.unwrap().is_empty() }
    })
    .await;
    server.stop().await;
    admin.drop().await;
}

#[tokio::test]
async fn sealing_closes_the_pooled_admin_connections() {
    let PooledRole {
        target,
        server,
        root,
        admin,
        role,
        ..
    } = PooledRole::new().await;
    let c = root.creds(&role, None).await.unwrap();
    assert_eq!(admin.keyward_sessions().await.len(), 1);
    assert!(server.core.dynamic.idle_admin_connections() >= 1);

    root.seal().await.unwrap();
    assert_eq!(server.core.dynamic.idle_admin_connections(), 0);
    sessions_become(&admin, "the pooled session is closed at seal", |p| {
        p.is_empty()
    })
    .await;

    root.unseal(&server.unseal_share).await.unwrap();
    assert_eq!(root.lease_revoke(&c.lease_id).await.unwrap(), (1, 0));
    assert!(!target.user_exists(&c.username).await);
    server.stop().await;
    admin.drop().await;
}
