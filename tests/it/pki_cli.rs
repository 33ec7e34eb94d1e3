//! `keyward pki ...` against a real server: one JSON document per command,
//! the fields INTERFACE.md fixes, exit codes 0, 1 and 2.

use serde_json::Value;

use crate::harness::{cli, TestServer};

#[tokio::test(flavor = "multi_thread")]
async fn pki_commands_print_json_and_exit_codes_follow_the_contract() {
    let server = TestServer::dev().await;
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_str().unwrap().to_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
    ];
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        tokio::task::block_in_place(|| cli(args, &env, stdin))
    };
    let json = |out: &str| -> Value { serde_json::from_str(out).unwrap() };

    let (code, out, err) = run(
        &[
            "pki",
            "init",
            "--common-name",
            "cli root",
            "--ttl",
            "30d",
            "--format",
            "json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["ca_chain"].as_array().unwrap().len(), 1);
    let (code, out, err) = run(
        &[
            "pki",
            "role",
            "put",
            "web",
            "--allow-spiffe",
            "spiffe://acme.test/web/**",
            "--allow-dns",
            "*.web.svc.test",
            "--max-ttl",
            "1h",
            "--server",
            "--client",
            "--format",
            "json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["max_ttl"], "1h");
    let (code, out, err) = run(
        &[
            "pki",
            "issue",
            "web",
            "--dns",
            "a.web.svc.test",
            "--spiffe-id",
            "spiffe://acme.test/web/a",
            "--ttl",
            "10m",
            "--format",
            "json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let issued = json(&out);
    for field in [
        "certificate",
        "private_key",
        "ca_chain",
        "serial",
        "expires_at",
    ] {
        assert!(!issued[field].is_null(), "{field} missing in {out}");
    }
    assert!(issued["private_key"]
        .as_str()
        .unwrap()
        .contains("PRIVATE KEY"));
    // sign --csr @FILE and from stdin.
    let (csr, _) = crate::pki_kit::csr(&["a.web.svc.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let file = server.dir.path().join("req.csr");
    std::fs::write(&file, &csr).unwrap();
    let at = format!("@{}", file.display());
    let (code, out, err) = run(
        &["pki", "sign", "web", "--csr", &at, "--format", "json"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(json(&out)["private_key"].is_null());
    let (code, _, err) = run(
        &["pki", "sign", "web", "--csr", "-", "--format", "json"],
        Some(csr.as_bytes()),
    );
    assert_eq!(code, 0, "{err}");
    // list, revoke, crl (PEM and DER).
    let (code, out, _) = run(
        &["pki", "list", "--expiring", "1h", "--format", "json"],
        None,
    );
    assert_eq!(code, 0);
    assert_eq!(json(&out)["certificates"].as_array().unwrap().len(), 3);
    let serial = issued["serial"].as_str().unwrap();
    let (code, out, _) = run(&["pki", "revoke", serial, "--format", "json"], None);
    assert_eq!(code, 0);
    assert!(!json(&out)["revoked_at"].is_null());
    let der = server.dir.path().join("crl.der");
    let (code, out, _) = run(&["pki", "crl", "--der", der.to_str().unwrap()], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("-----BEGIN X509 CRL-----"));
    assert!(std::fs::read(&der).unwrap().len() > 100);
    let (code, out, _) = run(&["pki", "ca"], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("-----BEGIN CERTIFICATE-----"));
    // Refusals: 1 from the server, naming the rule; 2 for usage.
    let (code, _, err) = run(&["pki", "issue", "web", "--dns", "a.db.svc.test"], None);
    assert_eq!(code, 1);
    assert!(err.contains("--allow-dns"), "{err}");
    let (code, _, _) = run(
        &[
            "pki",
            "issue",
            "web",
            "--ttl",
            "soon",
            "--dns",
            "a.web.svc.test",
        ],
        None,
    );
    assert_eq!(code, 2);
    let (code, _, _) = run(&["pki", "sign", "web", "--csr", "inline-text"], None);
    assert_eq!(code, 2);
    server.stop().await;
}
