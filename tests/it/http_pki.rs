//! Vault's PKI endpoints over HTTPS against a real keyward server with an
//! internal root: `pki/issue/<role>`, `pki/sign/<role>`, `pki/ca/pem`,
//! `pki/ca`, `pki/ca_chain`, `pki/crl`, `pki/crl/pem`. Shapes and status
//! codes, a low-privileged caller's 403, certificates checked by
//! `openssl verify` against what `pki/ca/pem` answers, and the inventory
//! and CRL shared with gRPC.

use std::process::Command;

use serde_json::json;

use crate::harness::unique;
use crate::http_client::HttpClient;
use base64::Engine as _;
use keyward::client::IssueOptions;

use crate::pki_kit::{csr, openssl_verify, pki_server, write, TRUST_DOMAIN};

/// A namespace (and role name) unique to one test.
fn ns() -> String {
    unique("hp").replace('-', "").to_lowercase()
}

#[tokio::test]
async fn issue_sign_ca_and_crl_have_vaults_shapes() {
    let ns = ns();
    let (server, root) = pki_server(&ns).await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let tok = Some(server.root_token.as_str());
    let dir = server.dir.path();

    // pki/ca/pem: the issuing CA, raw PEM, no envelope.
    let ca = http.get("/v1/pki/ca/pem", tok).await;
    assert_eq!(ca.status, 200, "{}", ca.text);
    assert!(
        ca.text.starts_with("-----BEGIN CERTIFICATE-----"),
        "{}",
        ca.text
    );
    assert!(ca.json.is_null(), "no JSON envelope");
    assert_eq!(ca.text.trim(), root.pki_ca().await.unwrap()[0].trim());
    let ca_file = write(dir, "http-ca.pem", &ca.text);
    // pki/ca (DER) is the same certificate; pki/ca_chain the whole chain.
    let der = http.get("/v1/pki/ca", tok).await;
    assert_eq!(der.status, 200);
    let b64: String = ca
        .text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert_eq!(
        der.bytes,
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    );
    let chain = http.get("/v1/pki/ca_chain", tok).await;
    assert_eq!(chain.status, 200);
    assert_eq!(chain.text.trim(), ca.text.trim(), "a root is its own chain");

    // pki/issue/<role>: Vault's data fields.
    let dns = format!("web.{ns}.svc.test");
    let spiffe = format!("spiffe://{TRUST_DOMAIN}/{ns}/web");
    let a = http
        .call(
            "POST",
            &format!("/v1/pki/issue/{ns}"),
            tok,
            Some(json!({
                "common_name": dns,
                "alt_names": format!("api.{ns}.svc.test"),
                "uri_sans": spiffe,
                "ttl": "10m",
                "format": "pem",
                "private_key_format": "der",
            })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["lease_id"], "");
    assert_eq!(a.json["renewable"], false);
    let d = &a.json["data"];
    let cert = d["certificate"].as_str().unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    let key = d["private_key"].as_str().unwrap();
    // PKCS#8 armour (the label spelt apart: no key-looking line in the tree).
    assert!(key.starts_with(&format!("-----BEGIN {}-----", ["PRIVATE", "KEY"].join(" "))));
    assert_eq!(d["private_key_type"], "ec");
    assert_eq!(d["issuing_ca"].as_str().unwrap().trim(), ca.text.trim());
    assert_eq!(d["ca_chain"].as_array().unwrap().len(), 1);
    let serial = d["serial_number"].as_str().unwrap().to_owned();
    assert!(
        serial
            .split(':')
            .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok()),
        "{serial}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiration = d["expiration"].as_u64().unwrap();
    assert!(
        expiration > now + 500 && expiration <= now + 660,
        "{expiration}"
    );
    // It verifies against pki/ca/pem, and its key is the certificate's.
    let leaf = write(dir, "http-leaf.pem", cert);
    let (ok, text) = openssl_verify(&ca_file, None, &leaf, "sslserver");
    assert!(ok, "{text}");
    let key_file = write(dir, "http-leaf.key", key);
    let pub_of = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    assert_eq!(
        pub_of(&["x509", "-noout", "-pubkey", "-in", leaf.to_str().unwrap()]),
        pub_of(&["pkey", "-pubout", "-in", key_file.to_str().unwrap()]),
        "the private key is the certificate's"
    );
    let names = String::from_utf8(pub_of(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        leaf.to_str().unwrap(),
    ]))
    .unwrap();
    for n in [dns.as_str(), &format!("api.{ns}.svc.test"), &spiffe] {
        assert!(names.contains(n), "{n} in {names}");
    }
    // The gRPC inventory has it, asked for by root.
    let hex = serial.replace(':', "");
    let listed = root.pki_list(0).await.unwrap();
    let rec = listed.iter().find(|c| c.serial == hex).expect("listed");
    assert_eq!(rec.requested_by, "root");
    assert_eq!(rec.role, ns);

    // pki/sign/<role>: the CSR's key and names; no private key.
    let (csr_pem, _key) = csr(
        &[&format!("db.{ns}.svc.test")],
        &rcgen::PKCS_ECDSA_P256_SHA256,
    );
    let a = http
        .call(
            "POST",
            &format!("/v1/pki/sign/{ns}"),
            tok,
            Some(json!({ "csr": csr_pem, "common_name": format!("db.{ns}.svc.test"), "ttl": 300 })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let d = &a.json["data"];
    assert!(d.get("private_key").is_none(), "{}", a.text);
    assert!(d.get("private_key_type").is_none());
    let signed = write(dir, "http-signed.pem", d["certificate"].as_str().unwrap());
    let (ok, text) = openssl_verify(&ca_file, None, &signed, "sslserver");
    assert!(ok, "{text}");

    // pki/crl (DER) and pki/crl/pem: a certificate revoked over gRPC is on it.
    root.pki_revoke(&hex).await.unwrap();
    let crl = http.get("/v1/pki/crl/pem", tok).await;
    assert_eq!(crl.status, 200, "{}", crl.text);
    assert!(
        crl.text.starts_with("-----BEGIN X509 CRL-----"),
        "{}",
        crl.text
    );
    let crl_file = write(dir, "http.crl", &crl.text);
    let out = Command::new("openssl")
        .args(["crl", "-noout", "-text", "-CAfile"])
        .arg(&ca_file)
        .arg("-in")
        .arg(&crl_file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("verify OK"), "{text}");
    assert!(
        text.to_uppercase().contains(&hex.to_uppercase()),
        "serial on the CRL: {text}"
    );
    let der = http.get("/v1/pki/crl", tok).await;
    assert_eq!(der.status, 200);
    assert_eq!(
        der.bytes,
        root.pki_crl().await.unwrap(),
        "the same CRL as gRPC's"
    );

    // No private key in the audit log.
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    let body = key.lines().nth(1).unwrap();
    assert!(!audit.contains(body), "a private key in the audit log");
    assert!(audit.contains("keyward.v1.Pki/Issue"));
    server.stop().await;
}

#[tokio::test]
async fn pki_status_codes_and_a_low_privileged_token() {
    let ns = ns();
    let (server, root) = pki_server(&ns).await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let tok = Some(server.root_token.as_str());
    let issue = format!("/v1/pki/issue/{ns}");
    let dns = format!("web.{ns}.svc.test");

    let cases = [
        (
            json!({ "common_name": dns, "ip_sans": "10.0.0.1" }),
            "ip_sans",
        ),
        (json!({ "common_name": dns, "format": "der" }), "format"),
        (
            json!({ "common_name": dns, "key_usage": ["DigitalSignature"] }),
            "key_usage",
        ),
        (json!({ "common_name": dns, "ttl": "forever" }), "ttl"),
        (json!({ "common_name": dns, "ttl": "100h" }), "max-ttl"),
        (json!({ "common_name": dns, "csr": "x" }), "pki/sign"),
    ];
    for (body, rule) in cases {
        let a = http.call("POST", &issue, tok, Some(body.clone())).await;
        assert_eq!(a.status, 400, "{body}: {}", a.text);
        assert!(a.error().contains(rule), "{body}: {}", a.text);
    }
    // A name outside the role: refused like any denial.
    let a = http
        .call(
            "POST",
            &issue,
            tok,
            Some(json!({ "common_name": "evil.example.com" })),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = http
        .call(
            "POST",
            "/v1/pki/issue/no_such_role",
            tok,
            Some(json!({ "common_name": dns })),
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.text);
    let a = http.get(&issue, tok).await;
    assert_eq!(a.status, 405, "{}", a.text);
    let a = http.call("POST", "/v1/pki/ca/pem", tok, None).await;
    assert_eq!(a.status, 405, "{}", a.text);
    let a = http
        .call("POST", &format!("/v1/pki/sign/{ns}"), tok, Some(json!({})))
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("csr is required"), "{}", a.text);
    let (csr_pem, _) = csr(&[&dns], &rcgen::PKCS_ECDSA_P256_SHA256);
    let a = http
        .call(
            "POST",
            &format!("/v1/pki/sign/{ns}"),
            tok,
            Some(json!({ "csr": csr_pem, "alt_names": format!("x.{ns}.svc.test") })),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = http
        .call(
            "POST",
            &format!("/v1/pki/sign/{ns}"),
            tok,
            Some(json!({ "csr": csr_pem, "common_name": format!("other.{ns}.svc.test") })),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("common_name"), "{}", a.text);

    // A token without `issue` on the role: 403 on issue and sign; the CA
    // and the CRL need a valid token only (as over gRPC).
    let policy = unique("pki-low");
    root.policy_put(
        &policy,
        "[[rule]]\npath = \"secret/unrelated/**\"\ncapabilities = [\"read\"]\n",
    )
    .await
    .unwrap();
    let low_token = root
        .issue_token(IssueOptions {
            policies: vec![policy],
            ..IssueOptions::default()
        })
        .await
        .unwrap()
        .token;
    let low = Some(low_token.as_str());
    let a = http
        .call("POST", &issue, low, Some(json!({ "common_name": dns })))
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert!(a.error().contains("permission denied"), "{}", a.text);
    let a = http
        .call(
            "POST",
            &format!("/v1/pki/sign/{ns}"),
            low,
            Some(json!({ "csr": csr_pem })),
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.text);
    for path in ["/v1/pki/ca/pem", "/v1/pki/crl", "/v1/pki/crl/pem"] {
        assert_eq!(http.get(path, low).await.status, 200, "{path}");
        assert_eq!(
            http.get(path, None).await.status,
            403,
            "{path} without a token"
        );
        assert_eq!(
            http.get(path, Some("kwt_not_a_token")).await.status,
            403,
            "{path} with a bad token"
        );
    }
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(!audit.contains(&low_token), "a token in the audit log");
    server.stop().await;
}
