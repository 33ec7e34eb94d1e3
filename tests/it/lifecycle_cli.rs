//! The lifecycle commands on the command line (issue 13): the names and
//! flags of INTERFACE.md, one JSON document with `--format json`, the
//! policy file with `--format toml`, exit codes 0, 1 and 2.

use serde_json::Value;

use crate::harness::{cli, data, unique, TestServer};
use crate::ident_kit::{approle_identity, login, read_policy};
use keyward::client::PutOptions;

#[tokio::test(flavor = "multi_thread")]
async fn decommission_attest_reads_and_suggest_on_the_command_line() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("clilc");
    let policy = read_policy(&server, &prefix).await;
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(&root, &name, std::slice::from_ref(&policy)).await;
    let (_, svc) = login(&server, &role_id, &secret_id).await;
    let path = format!("{prefix}/db");
    root.put(
        &path,
        &data(&[("v", "cli-secret-value")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    svc.get(&path).await.unwrap();

    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(args, &env, None));
    let json = |out: &str| serde_json::from_str::<Value>(out).unwrap();

    let (code, out, err) = run(&["identity", "reads", &name, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["paths"][0]["path"], path.as_str());

    let (code, out, err) = run(&["policy", "suggest", &name, "--format", "toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("path = \"secret/{path}\"")), "{out}");
    let (code, out, err) = run(&[
        "policy", "suggest", &name, "--since", "1h", "--format", "json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["rules"][0]["capabilities"][0], "read");
    let (code, _, err) = run(&["policy", "suggest", &name, "--since", "soon"]);
    assert_eq!(code, 2, "a bad duration is a usage error: {err}");

    let (code, out, err) = run(&[
        "identity",
        "attest",
        &name,
        "--note",
        "owned by team-a",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["attested_by"], "root");
    let (code, out, err) = run(&["identity", "attestations", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let all = json(&out);
    assert!(all["identities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == name.as_str() && i["state"] == "current"));

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
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["not_rotatable"][0], path.as_str());
    for key in [
        "revoked_tokens",
        "revoked_secret_ids",
        "revoked_leases",
        "revoked_certificates",
        "rotated",
        "not_rotatable",
        "readable_never_read",
    ] {
        assert!(plan.get(key).is_some(), "{key} in {plan}");
    }
    let (code, out, err) = run(&["identity", "decommission", &name, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["done"], true);
    assert!(!out.contains("cli-secret-value"));
    let (code, _, err) = run(&[
        "identity",
        "decommission",
        "no-such-identity-x",
        "--format",
        "json",
    ]);
    assert_eq!(code, 1, "a refusal exits 1: {err}");
    server.stop().await;
}
