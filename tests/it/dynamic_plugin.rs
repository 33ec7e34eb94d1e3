//! Dynamic credentials made by an external plugin: the example plugin
//! (`examples/provider_plugin.rs`) runs as its own process on a unix socket
//! and keeps the accounts of a toy service in a users file, which the test
//! reads directly. keyward issues, renews and revokes (by id and by prefix)
//! through the plugin's `Create`/`Revoke`; a plugin of the older protocol
//! (no `Create`) is refused with a clear error at role put and at creds
//! time, and no lease is left behind.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::db_target::suffix;
use crate::harness::{cli, contains, eventually, ChildServer, TestServer};
use crate::plugin::{start_plugin, start_plugin_with};
use keyward::client::{ClientError, DynamicRoleSpec};

fn spec(name: &str, provider: &str, config: &[(&str, &str)]) -> DynamicRoleSpec {
    DynamicRoleSpec {
        name: name.to_owned(),
        provider: provider.to_owned(),
        config: config
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    }
}

fn message<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    r.expect_err("the call should have been refused")
        .to_string()
}

/// (username, password_sha256, lease_id) of every account in the file.
fn accounts(path: &Path) -> Vec<(String, String, String)> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    doc["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["username"].as_str().unwrap().to_owned(),
                u["password_sha256"].as_str().unwrap().to_owned(),
                u["lease_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn sha256_hex(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_role_issues_renews_and_revokes_through_create_and_revoke() {
    let plugin = tokio::task::spawn_blocking(start_plugin).await.unwrap();
    let server = TestServer::dev().await;
    let root = server.root().await;
    let provider = format!("toy{}", suffix());
    root.register_provider(
        &provider,
        &format!("unix:{}", plugin.socket.display()),
        None,
    )
    .await
    .unwrap();
    let users = plugin.dir.path().join("users.json");
    let users_text = users.to_str().unwrap().to_owned();
    let role = format!("toy_{}", suffix());

    // The role's settings are checked against the plugin's Describe.
    let unknown = message(
        root.dynamic_role_put(&spec(
            &role,
            &provider,
            &[("users_file", &users_text), ("sql", "x")],
        ))
        .await,
    );
    assert!(unknown.contains("`sql`"), "{unknown}");
    let missing = message(root.dynamic_role_put(&spec(&role, &provider, &[])).await);
    assert!(missing.contains("`users_file`"), "{missing}");
    let unregistered = message(
        root.dynamic_role_put(&spec(&role, "noplugin", &[("users_file", &users_text)]))
            .await,
    );
    assert!(unregistered.contains("registered"), "{unregistered}");
    root.dynamic_role_put(&spec(&role, &provider, &[("users_file", &users_text)]))
        .await
        .unwrap();
    let shown = root.dynamic_role_get(&role).await.unwrap();
    assert_eq!(shown.provider, provider);
    assert_eq!(
        shown.config.get("users_file").map(String::as_str),
        Some(users_text.as_str())
    );

    // Issue: the plugin made the name and the password; the account is
    // listed under the lease.
    let c = root.creds(&role, None).await.unwrap();
    assert!(c.lease_id.starts_with(&format!("dynamic/{role}/")));
    assert!(
        c.username.starts_with(&format!("{role}_")),
        "{}",
        c.username
    );
    assert_eq!(c.password.len(), 32);
    assert!(!format!("{c:?}").contains(&c.password));
    assert_eq!(
        accounts(&users),
        vec![(
            c.username.clone(),
            sha256_hex(&c.password),
            c.lease_id.clone()
        )]
    );
    let lease = root.lease_lookup(&c.lease_id).await.unwrap();
    assert_eq!(lease.username, c.username);

    // Renew: within the max TTL.
    let renewed = root
        .lease_renew(&c.lease_id, Some(Duration::from_secs(86_400)))
        .await
        .unwrap();
    assert_eq!(
        renewed.expires_at.unwrap().seconds,
        renewed.max_expires_at.unwrap().seconds
    );
    assert!(renewed.expires_at.unwrap().seconds > lease.expires_at.unwrap().seconds);

    // Revoke by id: the account is gone from the service.
    assert_eq!(root.lease_revoke(&c.lease_id).await.unwrap(), (1, 0));
    assert!(accounts(&users).is_empty());
    assert!(root.lease_lookup(&c.lease_id).await.is_err());

    // Revoke by prefix: every account of the role.
    let a = root.creds(&role, None).await.unwrap();
    let b = root.creds(&role, None).await.unwrap();
    assert_ne!(a.username, b.username);
    assert_eq!(accounts(&users).len(), 2);
    assert_eq!(
        root.lease_revoke_prefix(&format!("dynamic/{role}"))
            .await
            .unwrap(),
        (2, 0)
    );
    assert!(accounts(&users).is_empty());
    assert!(root
        .lease_list(&format!("dynamic/{role}"), false)
        .await
        .unwrap()
        .is_empty());

    // The command line: `dynamic role put --provider PLUGIN`, `creds`,
    // `lease revoke`.
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(args, &env, None));
    let cli_role = format!("toycli_{}", suffix());
    let users_cfg = format!("users_file={users_text}");
    let (code, out, err) = run(&[
        "dynamic",
        "role",
        "put",
        &cli_role,
        "--provider",
        &provider,
        "--config",
        &users_cfg,
        "--ttl",
        "10m",
        "--max-ttl",
        "1h",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["provider"], provider.as_str());
    let (code, out, err) = run(&["creds", &cli_role, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d_user = d["username"].as_str().unwrap().to_owned();
    let d_password = d["password"].as_str().unwrap().to_owned();
    let d_lease = d["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(
        accounts(&users),
        vec![(d_user, sha256_hex(&d_password), d_lease.clone())]
    );
    let (code, _, err) = run(&["lease", "revoke", &d_lease, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(accounts(&users).is_empty());

    // No password the plugin made reached the audit log (which did record
    // the calls).
    let audit_path = server.audit_path.clone();
    let _dir = server.stop().await;
    let audit = std::fs::read(&audit_path).unwrap();
    assert!(contains(&audit, format!("dynamic/{role}").as_bytes()));
    for password in [&c.password, &a.password, &b.password, &d_password] {
        assert!(!contains(&audit, password.as_bytes()));
    }
    drop(plugin);
}

#[tokio::test]
async fn a_plugin_without_create_is_refused_clearly_and_leaves_no_lease() {
    let new = tokio::task::spawn_blocking(start_plugin).await.unwrap();
    let old = tokio::task::spawn_blocking(|| start_plugin_with(&["--old-protocol"]))
        .await
        .unwrap();
    let server = TestServer::dev().await;
    let root = server.root().await;
    let users = new.dir.path().join("users.json");
    let users_text = users.to_str().unwrap().to_owned();

    // At role put.
    let old_name = format!("old{}", suffix());
    let old_endpoint = format!("unix:{}", old.socket.display());
    root.register_provider(&old_name, &old_endpoint, None)
        .await
        .unwrap();
    let role = format!("old_{}", suffix());
    let refused = message(
        root.dynamic_role_put(&spec(&role, &old_name, &[("users_file", &users_text)]))
            .await,
    );
    assert!(
        refused.contains("does not make dynamic credentials") && refused.contains(&old_name),
        "{refused}"
    );
    assert!(root.dynamic_role_get(&role).await.is_err());

    // At creds time: the role was put on a plugin that makes credentials,
    // whose registration was then replaced by an older plugin.
    let name = format!("swap{}", suffix());
    root.register_provider(&name, &format!("unix:{}", new.socket.display()), None)
        .await
        .unwrap();
    let role = format!("swap_{}", suffix());
    root.dynamic_role_put(&spec(&role, &name, &[("users_file", &users_text)]))
        .await
        .unwrap();
    root.replace_provider(&name, &old_endpoint, None)
        .await
        .unwrap();
    let refused = message(root.creds(&role, None).await);
    assert!(
        refused.contains("does not make dynamic credentials") && refused.contains(&name),
        "{refused}"
    );
    assert!(root
        .lease_list(&format!("dynamic/{role}"), false)
        .await
        .unwrap()
        .is_empty());
    assert!(accounts(&users).is_empty());
    server.stop().await;
}

/// A crash right after the plugin made the account, before keyward knew
/// its name: after a restart the sweeper's revocation reaches the plugin
/// with the lease id alone, and the account goes.
#[tokio::test]
async fn a_crash_after_create_leaves_no_account_after_the_sweep() {
    let plugin = tokio::task::spawn_blocking(start_plugin).await.unwrap();
    let users = plugin.dir.path().join("users.json");
    let users_text = users.to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let log = dir.path().join("server.log");
    let mut armed = ChildServer::start_with_env(
        &vault,
        &log,
        &[("KEYWARD_TEST_LEASE_CRASH_AFTER", "created")],
    );
    let client = armed.client().await;
    let provider = format!("toy{}", suffix());
    client
        .register_provider(
            &provider,
            &format!("unix:{}", plugin.socket.display()),
            None,
        )
        .await
        .unwrap();
    let role = format!("crash_{}", suffix());
    let mut role_spec = spec(&role, &provider, &[("users_file", &users_text)]);
    role_spec.ttl = Duration::from_secs(2);
    role_spec.max_ttl = Duration::from_secs(2);
    client.dynamic_role_put(&role_spec).await.unwrap();
    assert!(
        client.creds(&role, None).await.is_err(),
        "no answer after a kill"
    );
    let status = tokio::task::spawn_blocking(move || armed.wait())
        .await
        .unwrap();
    assert!(!status.success(), "killed after Create: {status:?}");
    let made = accounts(&users);
    assert_eq!(made.len(), 1, "the plugin made the account");
    assert!(made[0].2.starts_with(&format!("dynamic/{role}/")));

    let restarted = ChildServer::start(&vault, &log);
    let client = restarted.client().await;
    let u = users.clone();
    eventually("the account made before the crash is revoked", move || {
        let u = u.clone();
        async move { accounts(&u).is_empty() }
    })
    .await;
    let c = client.clone();
    eventually("no lease left", move || {
        let c = c.clone();
        async move { c.lease_list("", false).await.unwrap().is_empty() }
    })
    .await;
    drop(restarted);
    drop(plugin);
}
