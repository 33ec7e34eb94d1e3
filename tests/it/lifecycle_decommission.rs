//! Decommission (issue 13) over TLS through the public client, against
//! real targets: the private scram-sha-256 PostgreSQL cluster and Redis.
//!
//! An identity reads three secrets, two of them with rotation policies
//! (alternating users, a 2 s grace period); it is decommissioned. Its
//! tokens and secret-ids stop working, both secrets rotate (the broker's
//! runs, named in the audit log as caused by the decommission), the old
//! credentials are refused once their grace has passed, the third secret is
//! listed as not rotatable, a secret it could read but never did is listed
//! apart. Asking again changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::db_target::{password, with_cleanup, Kind, Target};
use crate::harness::{data, unique, TestServer};
use crate::ident_kit::{approle_identity, login, put_policy};
use keyward::client::{Client, PutOptions, RotationPolicySpec, ScheduleSpec};
use keyward::proto::v1::RotationRun;

const PATIENCE: Duration = Duration::from_secs(120);

pub fn alternating(
    provider: &str,
    admin: &str,
    users: &str,
    grace: Duration,
) -> RotationPolicySpec {
    RotationPolicySpec {
        provider: provider.to_owned(),
        schedule: ScheduleSpec::Every(Duration::from_secs(86_400)),
        grace,
        settings: [
            ("admin_secret", admin),
            ("strategy", "alternating"),
            ("usernames", users),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<BTreeMap<_, _>>(),
    }
}

/// Waits (bounded) for the rotation `run_id` of `path` to have retired its
/// previous value.
async fn retired(root: &Client, path: &str, run_id: &str) -> RotationRun {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let runs = root.rotation_history(path).await.unwrap();
        if let Some(retire) = runs.iter().find(|r| {
            r.steps
                .iter()
                .any(|s| s.step == "retire" && s.outcome == "ok")
        }) {
            // The run the decommission started promoted the value retired.
            assert!(
                runs.iter()
                    .any(|r| r.run_id == run_id && r.state == "succeeded"),
                "the decommission's run {run_id} succeeded: {runs:?}"
            );
            return retire.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retire of {path} within {PATIENCE:?}: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn put_fields(client: &Client, path: &str, fields: &[(String, String)]) {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    client
        .put(path, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn decommission_revokes_rotates_what_was_read_and_lists_the_rest() {
    let pg = Target::new(Kind::Postgres).await;
    let redis = Target::new(Kind::Redis).await;
    let (pg2, redis2) = (pg.clone(), redis.clone());
    let body = async move {
        let (pg, redis) = (pg2, redis2);
        let server = TestServer::dev().await;
        let root = server.root().await;
        let prefix = unique("decom");
        // Two rotatable secrets, one plain, one never read.
        let mut rotated_users = Vec::new();
        for (t, name) in [(&pg, "pg"), (&redis, "redis")] {
            let admin = format!("{prefix}/admin/{name}");
            put_fields(&root, &admin, &t.admin()).await;
            let (a, b) = (t.user(&format!("{name}a")), t.user(&format!("{name}b")));
            let (pa, pb) = (password(), password());
            t.create_user(&a, &pa).await;
            t.create_user(&b, &pb).await;
            let path = format!("{prefix}/app/{name}");
            root.put(
                &path,
                &data(&[("username", &a), ("password", &pa)]),
                PutOptions::default(),
            )
            .await
            .unwrap();
            root.set_rotation_policy(
                &path,
                &alternating(
                    t.provider(),
                    &admin,
                    &format!("{a},{b}"),
                    Duration::from_secs(2),
                ),
            )
            .await
            .unwrap();
            rotated_users.push((t.clone(), path, a, pa));
        }
        let plain = format!("{prefix}/app/plain");
        root.put(
            &plain,
            &data(&[("token", "plain-value")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
        let unread = format!("{prefix}/app/unread");
        root.put(
            &unread,
            &data(&[("token", "unread-value")]),
            PutOptions::default(),
        )
        .await
        .unwrap();

        let policy = unique("decom-read");
        put_policy(
            &server,
            &policy,
            &format!("[[rule]]\npath = \"secret/{prefix}/app/**\"\ncapabilities = [\"read\"]\n"),
        )
        .await;
        let name = unique("svc");
        let (role_id, secret_id) =
            approle_identity(&root, &name, std::slice::from_ref(&policy)).await;
        let spare = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
        let (_, svc) = login(&server, &role_id, &secret_id).await;
        for (_, path, _, _) in &rotated_users {
            svc.get(path).await.unwrap();
        }
        svc.get(&plain).await.unwrap();

        // A dry run says what would happen and changes nothing.
        let plan = root.identity_decommission(&name, true).await.unwrap();
        assert!(plan.dry_run && plan.run_id.is_empty());
        let mut expected_rotated: Vec<String> =
            rotated_users.iter().map(|(_, p, _, _)| p.clone()).collect();
        expected_rotated.sort();
        let planned: Vec<&str> = plan.rotated.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            planned,
            expected_rotated
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
        assert_eq!(plan.revoked_secret_ids, 2, "two live secret-ids would go");
        svc.get(&plain)
            .await
            .expect("a dry run leaves the token working");
        assert!(!root.identity_get(&name).await.unwrap().disabled);

        let done = root.identity_decommission(&name, false).await.unwrap();
        assert!(done.done && !done.dry_run && !done.run_id.is_empty());
        assert!(done.revoked_tokens >= 1, "{done:?}");
        assert_eq!(done.revoked_secret_ids, 2);
        assert_eq!(done.revoked_leases, 0);
        assert_eq!(done.revoked_certificates, 0);
        let rotated: Vec<&str> = done.rotated.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            rotated,
            expected_rotated
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
        assert_eq!(done.not_rotatable, vec![plain.clone()]);
        assert_eq!(done.readable_never_read, vec![unread.clone()]);
        assert_eq!(done.requested_by, "root");

        // Its token and both secret-ids are dead; it is disabled.
        let refused = svc.get(&plain).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Some(tonic::Code::Unauthenticated),
            "{refused}"
        );
        let anon = server.anonymous().await;
        for sid in [&secret_id, &spare.secret_id] {
            assert!(anon.login_approle(&role_id, sid, 0).await.is_err());
        }
        assert!(root.identity_get(&name).await.unwrap().disabled);

        // Each secret rotated; once its grace passed the old credential is
        // refused and the current one logs in.
        for (t, path, old_user, old_password) in &rotated_users {
            let run_id = &done
                .rotated
                .iter()
                .find(|r| &r.path == path)
                .unwrap()
                .run_id;
            retired(&root, path, run_id).await;
            assert!(
                !t.can_login(old_user, old_password).await,
                "the credential it read ({path}) is refused after the grace period"
            );
            let current = root.get(path).await.unwrap();
            assert_ne!(current.field_str("username"), Some(old_user.as_str()));
            assert!(
                t.can_login(
                    current.field_str("username").unwrap(),
                    current.field_str("password").unwrap()
                )
                .await
            );
        }

        // The audit log names the decommission as the cause of each run.
        let audit = std::fs::read_to_string(&server.audit_path).unwrap();
        for r in &done.rotated {
            assert!(
                audit
                    .lines()
                    .any(|l| l.contains("keyward.lifecycle/DecommissionRotate")
                        && l.contains(&r.run_id)
                        && l.contains(&done.run_id)),
                "no cause record for {}",
                r.run_id
            );
        }

        // Idempotent: the same answer, no new rotation.
        let again = root.identity_decommission(&name, false).await.unwrap();
        assert_eq!(again.run_id, done.run_id);
        assert_eq!(again.rotated, done.rotated);
        for (_, path, _, _) in &rotated_users {
            let runs = root.rotation_history(path).await.unwrap();
            assert_eq!(runs.len(), 1, "one rotation of {path}: {runs:?}");
        }
        server.stop().await;
    };
    let (pg3, redis3) = (pg.clone(), redis.clone());
    with_cleanup(pg3, async move {
        with_cleanup(redis3, body).await;
    })
    .await;
}
