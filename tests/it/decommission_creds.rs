//! A decommission revokes what the identity holds outside keyward's own
//! records: its dynamic PostgreSQL credentials (the user is dropped on the
//! private scram-sha-256 cluster, checked in `pg_roles` directly) and the
//! certificates issued to it (their serials enter the CRL). A dry run counts
//! them and changes nothing; asking again finds nothing and does not fail.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use x509_parser::prelude::FromDer;

use crate::db_target::{pg_admin, suffix, Kind, Target};
use crate::harness::{cli, data, eventually, unique, TestServer};
use crate::ident_kit::{approle_identity, login};
use crate::pki_kit::{role, TRUST_DOMAIN};
use keyward::client::{DynamicRoleSpec, PutOptions};
use keyward::proto::v1::PkiIssueRequest;

async fn pg_role_exists(name: &str) -> bool {
    let pg = pg_admin().await;
    pg.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

async fn crl_serials(root: &keyward::client::Client) -> Vec<String> {
    let der = root.pki_crl().await.unwrap();
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
    crl.iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn decommission_revokes_the_identitys_leases_and_certificates() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;

    // A PostgreSQL dynamic role the identity may use.
    let admin = unique("dyn/admin");
    let pairs = target.admin();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    root.put(&admin, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
    let dyn_role = format!("decom_{}", suffix());
    root.dynamic_role_put(&DynamicRoleSpec {
        name: dyn_role.clone(),
        provider: "postgres".into(),
        config: [("admin_secret".to_owned(), admin.clone())]
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    })
    .await
    .unwrap();
    // A PKI role for its certificates.
    let ns = format!("dc{}", suffix());
    root.pki_init("keyward decommission test", 0).await.unwrap();
    root.pki_role_put(role(&ns, &ns)).await.unwrap();

    let policy = unique("decom-creds");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"dynamic/{dyn_role}\"\ncapabilities = [\"issue\"]\n\n\
             [[rule]]\npath = \"pki/{ns}\"\ncapabilities = [\"issue\"]\n"
        ),
    )
    .await
    .unwrap();
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, std::slice::from_ref(&policy)).await;
    let (_, workload) = login(&server, &role_id, &secret_id).await;

    // A live dynamic credential, held by the identity's token.
    let creds = workload.creds(&dyn_role, None).await.unwrap();
    assert!(target.can_login(&creds.username, &creds.password).await);
    // Two certificates: one that makes its holder the identity (its SAN is
    // the identity's binding; issued by root), one its own token asked for.
    let spiffe = format!("spiffe://{TRUST_DOMAIN}/{ns}/{name}");
    root.identity_bind_cert(&name, None, Some(&spiffe))
        .await
        .unwrap();
    let bound = root
        .pki_issue(PkiIssueRequest {
            role: ns.clone(),
            spiffe_ids: vec![spiffe.clone()],
            dns_names: vec![],
            ttl_seconds: 600,
        })
        .await
        .unwrap();
    let own = workload
        .pki_issue(PkiIssueRequest {
            role: ns.clone(),
            spiffe_ids: vec![],
            dns_names: vec![format!("own.{ns}.svc.test")],
            ttl_seconds: 600,
        })
        .await
        .unwrap();
    // Someone else's certificate and credential: left alone.
    let other = root
        .pki_issue(PkiIssueRequest {
            role: ns.clone(),
            spiffe_ids: vec![],
            dns_names: vec![format!("other.{ns}.svc.test")],
            ttl_seconds: 600,
        })
        .await
        .unwrap();
    let others_creds = root.creds(&dyn_role, None).await.unwrap();

    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(args, &env, None));
    let json = |out: &str| serde_json::from_str::<Value>(out).unwrap();

    // Dry run: counted, nothing revoked.
    let (code, out, err) = run(&[
        "identity",
        "decommission",
        &name,
        "--dry-run",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let plan = json(&out);
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(plan["revoked_leases"], 1, "{plan}");
    assert_eq!(plan["revoked_certificates"], 2, "{plan}");
    assert!(!out.contains(&creds.password));
    assert!(pg_role_exists(&creds.username).await);
    assert!(target.can_login(&creds.username, &creds.password).await);
    root.lease_lookup(&creds.lease_id).await.unwrap();
    assert!(crl_serials(&root).await.is_empty());

    // The real run.
    let (code, out, err) = run(&["identity", "decommission", &name, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let done = json(&out);
    assert_eq!(done["done"], true, "{done}");
    assert_eq!(done["revoked_leases"], 1, "{done}");
    assert_eq!(done["revoked_certificates"], 2, "{done}");
    assert!(!out.contains(&creds.password));
    // The PostgreSQL user is dropped (polled, bounded), and the lease goes.
    let user = creds.username.clone();
    eventually("the decommissioned identity's user is dropped", move || {
        let user = user.clone();
        async move { !pg_role_exists(&user).await }
    })
    .await;
    assert!(!target.can_login(&creds.username, &creds.password).await);
    let r = root.clone();
    let id = creds.lease_id.clone();
    eventually("the revoked lease is forgotten", move || {
        let r = r.clone();
        let id = id.clone();
        async move { r.lease_lookup(&id).await.is_err() }
    })
    .await;
    // Both serials are in the CRL; the other certificate is not.
    let mut serials = crl_serials(&root).await;
    serials.sort();
    let mut expected = vec![bound.serial.clone(), own.serial.clone()];
    expected.sort();
    assert_eq!(serials, expected, "other: {}", other.serial);
    // Someone else's credential still works.
    assert!(
        target
            .can_login(&others_creds.username, &others_creds.password)
            .await
    );

    // Asking again: the stored run is answered, nothing fails.
    let (code, out, err) = run(&["identity", "decommission", &name, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["done"], true);
    // The revokers themselves, asked again (what a resumed run does), find
    // nothing and do not fail.
    let now = server.core.clock().now_ms();
    for revoker in &server.core.lifecycle.deps().revokers {
        assert_eq!(revoker.revoke_identity(&name, now).unwrap(), 0);
        assert_eq!(revoker.count_identity(&name).unwrap(), 0);
    }
    assert_eq!(crl_serials(&root).await.len(), 2);

    root.lease_revoke(&others_creds.lease_id).await.unwrap();
    assert!(!pg_role_exists(&others_creds.username).await);
    server.stop().await;
}
