//! Issue 15's Vault routes attacked by an outsider holding a narrow token
//! (or none): refusals the prelude answers are audited like any other,
//! and a lease prefix cannot be stretched to a look-alike role.

use std::collections::BTreeMap;
use std::time::Duration;

use keyward::client::{Client, DynamicRoleSpec, IssueOptions, PutOptions};
use serde_json::{json, Value};

use crate::db_target::{suffix, Kind, Target};
use crate::harness::{data, unique, TestServer};
use crate::http_client::HttpClient;

fn records(server: &TestServer) -> Vec<Value> {
    std::fs::read_to_string(&server.audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A token holding only the policy `document`.
async fn token_with(root: &Client, document: &str) -> String {
    let name = unique("p");
    root.policy_put(&name, document).await.unwrap();
    root.issue_token(IssueOptions {
        policies: vec![name],
        ..IssueOptions::default()
    })
    .await
    .unwrap()
    .token
}

/// A PostgreSQL dynamic role named `name`.
async fn pg_role_named(root: &Client, target: &Target, name: &str) {
    let admin = unique("dyn/admin");
    let pairs = target.admin();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    root.put(&admin, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
    let config: BTreeMap<String, String> = [("admin_secret".to_owned(), admin)].into();
    root.dynamic_role_put(&DynamicRoleSpec {
        name: name.to_owned(),
        provider: "postgres".into(),
        config,
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    })
    .await
    .unwrap();
}

/// A namespace header keyward cannot serve is refused before any token is
/// looked at; that refusal is audited like the prelude's 404/405/408/413
/// (one record with the request id and the source, no token), so an
/// outsider probing with it leaves a trace.
#[tokio::test]
async fn a_refused_namespace_is_audited_without_the_token() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = server.root_token.clone();
    let a = http
        .send(
            "GET",
            "/v1/secret/data/app/x",
            &[
                ("x-vault-token", root.as_str()),
                ("x-vault-namespace", "team-a"),
                ("x-request-id", "req-ns-attack"),
            ],
            None,
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("namespaces"), "{}", a.text);
    let found: Vec<Value> = records(&server)
        .into_iter()
        .filter(|r| r["request_id"] == "req-ns-attack")
        .collect();
    assert_eq!(found.len(), 1, "records: {found:?}");
    let r = &found[0];
    assert_eq!(r["method"], "keyward.v1.Http/Namespace", "{r}");
    assert_eq!(r["code"], "INVALID_ARGUMENT", "{r}");
    assert!(
        r["source"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
    assert!(r["identity"].is_null() && r["accessor"].is_null(), "{r}");
    let text = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(!text.contains(root.as_str()), "the token in the audit log");
    server.stop().await;
}

/// A token allowed to revoke the leases of role R (`delete` on
/// `sys/leases/dynamic/R/**`) cannot reach those of a role whose name
/// starts with R, nor climb out with `..`, an encoded slash, a look-alike
/// letter or an empty prefix; the look-alike role's user survives R's
/// revoke-prefix.
#[tokio::test]
async fn revoke_prefix_stays_inside_its_role() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let base = format!("ro{}", suffix());
    let other = format!("{base}_other");
    pg_role_named(&root, &target, &base).await;
    pg_role_named(&root, &target, &other).await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let tok = Some(server.root_token.as_str());
    let a = http.get(&format!("/v1/database/creds/{other}"), tok).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let other_lease = a.json["lease_id"].as_str().unwrap().to_owned();
    let other_user = a.json["data"]["username"].as_str().unwrap().to_owned();
    let a = http.get(&format!("/v1/database/creds/{base}"), tok).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let base_user = a.json["data"]["username"].as_str().unwrap().to_owned();

    let narrow = token_with(
        &root,
        &format!(
            "[[rule]]\npath = \"sys/leases/dynamic/{base}/**\"\ncapabilities = [\"delete\"]\n"
        ),
    )
    .await;
    let narrow = Some(narrow.as_str());
    for (path, want) in [
        (format!("dynamic/{other}"), 403),
        ("dynamic".to_owned(), 403),
        (format!("dynamic/{base}/../{other}"), 400),
        (format!("dynamic/{base}%2F..%2F{other}"), 400),
        (format!("dynamic/{base}/%2e%2e/{other}"), 400),
        (format!("dynamic/{base}*"), 400),
        (format!("dynamic/{}\u{043E}", &base[..1]), 400),
        ("/".to_owned(), 400),
    ] {
        let path = path.replace('\u{043E}', "%D0%BE");
        let a = http
            .call(
                "PUT",
                &format!("/v1/sys/leases/revoke-prefix/{path}"),
                narrow,
                None,
            )
            .await;
        assert!(
            a.status == want || (want == 400 && a.status == 404),
            "{path}: {} {}",
            a.status,
            a.text
        );
    }
    // A body prefix that names the other role while the path names R.
    let a = http
        .call(
            "PUT",
            &format!("/v1/sys/leases/revoke-prefix/dynamic/{base}"),
            narrow,
            Some(json!({ "prefix": format!("dynamic/{other}") })),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(target.user_exists(&other_user).await);
    assert!(target.user_exists(&base_user).await);

    // R's own prefix (with a trailing slash) takes R's user only.
    let a = http
        .call(
            "PUT",
            &format!("/v1/sys/leases/revoke-prefix/dynamic/{base}/"),
            narrow,
            None,
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert!(!target.user_exists(&base_user).await);
    assert!(
        target.user_exists(&other_user).await,
        "the look-alike role's user was dropped"
    );
    root.lease_revoke(&other_lease).await.unwrap();
    server.stop().await;
}
