//! The PKI from a low-privileged caller's side: what a token with `issue`
//! on one role may do and may not; a certificate that would log in as an
//! identity needs every policy of that identity (or `pki/<role>` would be a
//! way to become anyone); bad input is refused with the rule it breaks; the
//! private keys keyward makes are nowhere on disk or in the audit log.

use tonic::Code;

use crate::harness::{contains, files_under, unique, TestServer};
use crate::ident_kit::{create, put_policy};
use crate::pki_kit::*;
use keyward::proto::v1::PkiIssueRequest;

fn req(role: &str, spiffe: &[&str], dns: &[&str], ttl: u64) -> PkiIssueRequest {
    PkiIssueRequest {
        role: role.to_owned(),
        spiffe_ids: spiffe.iter().map(|s| s.to_string()).collect(),
        dns_names: dns.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: ttl,
    }
}

const ISSUE_WEB: &str = "[[rule]]\npath = \"pki/web\"\ncapabilities = [\"issue\"]\n";

#[tokio::test]
async fn pki_low_privileged_caller_issues_on_its_role_only() {
    let (server, root) = pki_server("web").await;
    root.pki_role_put(role("db", "db")).await.unwrap();
    let low = token_with(&server, ISSUE_WEB).await;
    // Allowed: its role, names inside the patterns.
    let ok = low
        .pki_issue(req(
            "web",
            &["spiffe://acme.test/web/api"],
            &["api.web.svc.test"],
            60,
        ))
        .await
        .unwrap();
    assert!(!ok.private_key.is_empty());
    // Anything else: denied, and the denial does not say whether it exists.
    assert_eq!(
        code(low.pki_issue(req("db", &[], &["x.db.svc.test"], 60)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            low.pki_issue(req("nosuch", &[], &["x.db.svc.test"], 60))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(code(low.pki_init("mine", 0).await), Code::PermissionDenied);
    assert_eq!(
        code(low.pki_intermediate_csr("mine").await),
        Code::PermissionDenied
    );
    let mut wider = role("web", "web");
    wider.allow_dns = vec!["*.test".into()];
    assert_eq!(code(low.pki_role_put(wider).await), Code::PermissionDenied);
    assert_eq!(
        code(low.pki_role_delete("web").await),
        Code::PermissionDenied
    );
    assert_eq!(code(low.pki_role_get("web").await), Code::PermissionDenied);
    assert_eq!(code(low.pki_list(0).await), Code::PermissionDenied);
    assert_eq!(
        code(low.pki_revoke(&ok.serial).await),
        Code::PermissionDenied
    );
    // Public knowledge: the chain and the CRL.
    assert_eq!(low.pki_ca().await.unwrap().len(), 1);
    assert!(!low.pki_crl().await.unwrap().is_empty());
    // No token at all.
    let anon = server.anonymous().await;
    assert_eq!(
        code(
            anon.pki_issue(req("web", &[], &["api.web.svc.test"], 60))
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(code(anon.pki_ca().await), Code::Unauthenticated);
    // The audit log names each denial against its resource.
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(
        audit.contains("\"resource\":\"pki/db\""),
        "denied issue not audited"
    );
    assert!(audit.contains("\"resource\":\"sys/pki/ca\""));
    server.stop().await;
}

#[tokio::test]
async fn pki_a_certificate_that_logs_in_as_an_identity_needs_all_its_policies() {
    let (server, root) = pki_server("web").await;
    let secret_reader = unique("pay-read");
    put_policy(
        &server,
        &secret_reader,
        "[[rule]]\npath = \"secret/pay/**\"\ncapabilities = [\"read\"]\n",
    )
    .await;
    let payments = unique("payments");
    root.identity_create(create(
        &payments,
        "workload",
        "team-pay",
        std::slice::from_ref(&secret_reader),
    ))
    .await
    .unwrap();
    let pay_id = format!("spiffe://acme.test/web/{payments}");
    root.identity_bind_cert(&payments, None, Some(&pay_id))
        .await
        .unwrap();
    // An identity bound by subject: the subject of an issued certificate is
    // O=keyward, CN=<first name>.
    let by_dn = unique("bydn");
    root.identity_create(create(
        &by_dn,
        "workload",
        "team-pay",
        std::slice::from_ref(&secret_reader),
    ))
    .await
    .unwrap();
    root.identity_bind_cert(&by_dn, Some("CN=pay.web.svc.test, O=keyward"), None)
        .await
        .unwrap();

    let low = token_with(&server, ISSUE_WEB).await;
    // Names no identity is bound to: fine.
    low.pki_issue(req("web", &["spiffe://acme.test/web/other"], &[], 60))
        .await
        .unwrap();
    // The identity's SPIFFE ID, by issue and by sign, also hidden behind a
    // first unbound name: denied.
    for spiffe in [
        vec![pay_id.as_str()],
        vec!["spiffe://acme.test/web/other", pay_id.as_str()],
    ] {
        assert_eq!(
            code(low.pki_issue(req("web", &spiffe, &[], 60)).await),
            Code::PermissionDenied,
            "{spiffe:?}"
        );
    }
    let (csr_pem, _) = csr(&[&pay_id], &rcgen::PKCS_ECDSA_P256_SHA256);
    assert_eq!(
        code(low.pki_sign("web", &csr_pem, 60).await),
        Code::PermissionDenied
    );
    // The subject binding: a DNS name that becomes the bound CN.
    assert_eq!(
        code(
            low.pki_issue(req("web", &[], &["pay.web.svc.test"], 60))
                .await
        ),
        Code::PermissionDenied
    );
    // Nothing was recorded for the refused ones.
    let before = root.pki_list(0).await.unwrap().len();
    assert_eq!(before, 1);

    // A caller holding the identity's policies may; the inventory names it.
    let both = token_with(
        &server,
        &format!("{ISSUE_WEB}[[rule]]\npath = \"secret/pay/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    // `token_with` stores its own policy: the caller must hold the very
    // policy the identity holds, not an equivalent one.
    assert_eq!(
        code(
            both.pki_issue(req("web", &[pay_id.as_str()], &[], 60))
                .await
        ),
        Code::PermissionDenied
    );
    let holder = {
        let t = root
            .issue_token(keyward::client::IssueOptions {
                policies: vec![secret_reader.clone(), {
                    let n = unique("issue-web");
                    root.policy_put(&n, ISSUE_WEB).await.unwrap();
                    n
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        keyward::client::Client::connect(server.options(Some(&t.token)))
            .await
            .unwrap()
    };
    let issued = holder
        .pki_issue(req("web", &[pay_id.as_str()], &[], 60))
        .await
        .unwrap();
    let listed = root.pki_list(0).await.unwrap();
    let rec = listed.iter().find(|c| c.serial == issued.serial).unwrap();
    assert_eq!(rec.identity, payments);
    server.stop().await;
}

#[tokio::test]
async fn pki_bad_input_is_refused_naming_the_rule() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    root.pki_role_put(role("web", "web")).await.unwrap();
    // Before any CA.
    let (c, m) = refusal(
        root.pki_issue(req("web", &[], &["a.web.svc.test"], 60))
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("pki init"), "{m}");
    root.pki_init("t", 0).await.unwrap();
    let cases: Vec<(PkiIssueRequest, Code, &str)> = vec![
        (
            req("nosuch", &[], &["a.web.svc.test"], 60),
            Code::NotFound,
            "no PKI role",
        ),
        (
            req("Web", &[], &["a.web.svc.test"], 60),
            Code::InvalidArgument,
            "role name",
        ),
        (
            req("web", &[], &[], 60),
            Code::InvalidArgument,
            "at least one",
        ),
        (
            req("web", &[], &["a.web.svc.test"], 7200),
            Code::InvalidArgument,
            "--max-ttl",
        ),
        (
            req("web", &[], &["a.db.svc.test"], 60),
            Code::PermissionDenied,
            "--allow-dns",
        ),
        (
            req("web", &[], &["a.b.web.svc.test"], 60),
            Code::PermissionDenied,
            "--allow-dns",
        ),
        (
            req("web", &[], &["*.web.svc.test"], 60),
            Code::PermissionDenied,
            "--allow-wildcard-dns",
        ),
        (
            req("web", &[], &["A.web.svc.test"], 60),
            Code::InvalidArgument,
            "lower-case",
        ),
        (
            req("web", &[], &["a.web.svc.test."], 60),
            Code::InvalidArgument,
            "ends with '.'",
        ),
        (
            req("web", &[], &["127.0.0.1"], 60),
            Code::InvalidArgument,
            "IP address",
        ),
        (
            req("web", &["spiffe://acme.test/db/x"], &[], 60),
            Code::PermissionDenied,
            "--allow-spiffe",
        ),
        (
            req("web", &["spiffe://acme.test/web/../db"], &[], 60),
            Code::InvalidArgument,
            "'..'",
        ),
        (
            req("web", &["spiffe://ACME.test/web/x"], &[], 60),
            Code::InvalidArgument,
            "trust domain",
        ),
        (
            req("web", &["https://acme.test/web/x"], &[], 60),
            Code::InvalidArgument,
            "spiffe://",
        ),
    ];
    for (r, want, text) in cases {
        let what = format!("{r:?}");
        let (c, m) = refusal(root.pki_issue(r).await);
        assert_eq!(c, want, "{what}: {m}");
        assert!(m.contains(text), "{what}: {m:?} does not name {text:?}");
    }
    assert!(
        root.pki_list(0).await.unwrap().is_empty(),
        "a refused request was recorded"
    );
    // Wildcards with the flag, where the pattern has '*'.
    let mut wild = role("wild", "web");
    wild.allow_wildcard_dns = true;
    root.pki_role_put(wild).await.unwrap();
    root.pki_issue(req("wild", &[], &["*.web.svc.test"], 60))
        .await
        .unwrap();
    // Roles.
    for (mut r, text) in [
        (
            {
                let mut r = role("r1", "x");
                r.allow_dns = vec!["**.x.test".into()];
                r
            },
            "'*' is one label",
        ),
        (
            {
                let mut r = role("r2", "x");
                r.allow_spiffe = vec!["spiffe://**/x".into()];
                r
            },
            "trust domain",
        ),
        (
            {
                let mut r = role("r3", "x");
                r.allow_spiffe = vec![];
                r.allow_dns = vec![];
                r
            },
            "at least one",
        ),
        (
            {
                let mut r = role("r4", "x");
                r.max_ttl_seconds = 0;
                r
            },
            "--max-ttl",
        ),
        (
            {
                let mut r = role("r5", "x");
                r.key_type = "rsa-2048".into();
                r
            },
            "RSA is not offered",
        ),
    ] {
        r.name = r.name.clone();
        let (c, m) = refusal(root.pki_role_put(r).await);
        assert_eq!(c, Code::InvalidArgument, "{m}");
        assert!(m.contains(text), "{m:?} does not name {text:?}");
    }
    // CSRs.
    let (good, _) = csr(
        &["spiffe://acme.test/web/a"],
        &rcgen::PKCS_ECDSA_P256_SHA256,
    );
    let tampered = {
        // Flip one character of the base64 body near its end (in the signature).
        let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
        let i = lines.len() - 2;
        let mut chars: Vec<char> = lines[i].chars().collect();
        let j = chars.len() / 2;
        chars[j] = if chars[j] == 'A' { 'B' } else { 'A' };
        lines[i] = chars.into_iter().collect();
        lines.join("\n") + "\n"
    };
    let (ed, _) = csr(&["spiffe://acme.test/web/a"], &rcgen::PKCS_ED25519);
    let (outside, _) = csr(&["spiffe://acme.test/db/a"], &rcgen::PKCS_ECDSA_P256_SHA256);
    for (pem, want, text) in [
        (tampered.as_str(), Code::InvalidArgument, "CSR"),
        ("not a csr", Code::InvalidArgument, "does not parse"),
        (ed.as_str(), Code::InvalidArgument, "key type"),
        (outside.as_str(), Code::PermissionDenied, "--allow-spiffe"),
    ] {
        let (c, m) = refusal(root.pki_sign("web", pem, 60).await);
        assert_eq!(c, want, "{m}");
        assert!(m.contains(text), "{m:?} does not name {text:?}");
    }
    root.pki_sign("web", &good, 60).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn pki_private_keys_are_not_in_the_audit_log_or_the_store() {
    let (server, root) = pki_server("leak").await;
    let issued = root
        .pki_issue(req("leak", &["spiffe://acme.test/leak/a"], &[], 60))
        .await
        .unwrap();
    let key_pem = issued.private_key.clone();
    assert!(key_pem.contains("PRIVATE KEY"));
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &body).unwrap();
    // The PKCS#8 of a P-256 key holds the 32-byte private scalar after
    // the OCTET STRING header 04 20: search for the scalar itself.
    let at = der.windows(2).position(|w| w == [0x04, 0x20]).unwrap() + 2;
    let scalar = der[at..at + 32].to_vec();
    // A debug print of the response redacts it too.
    let debug = format!("{issued:?}");
    // (The first characters of the body are the PKCS#8 header every P-256
    // key shares; characters 60.. encode the private scalar.)
    let secret_chunk = &body[60..100];
    assert!(!debug.contains(secret_chunk));
    let dir = server.stop().await;
    let files = files_under(dir.path());
    assert!(files.iter().any(|f| f.ends_with("audit.log")));
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        for needle in [body.as_bytes(), secret_chunk.as_bytes(), &der, &scalar] {
            assert!(
                !contains(&bytes, needle),
                "the private key is in {}",
                f.display()
            );
        }
    }
}

#[tokio::test]
async fn pki_figures_are_in_the_governance_report() {
    let (server, root) = pki_server("gov").await;
    root.pki_role_put(role("gov2", "gov")).await.unwrap();
    let a = root
        .pki_issue(req("gov", &[], &["a.gov.svc.test"], 60))
        .await
        .unwrap();
    root.pki_issue(req("gov", &[], &["b.gov.svc.test"], 60))
        .await
        .unwrap();
    // 8 days: valid, not expiring within the report's 7 days.
    let mut long = role("gov-long", "gov");
    long.max_ttl_seconds = 8 * 24 * 3600;
    root.pki_role_put(long).await.unwrap();
    root.pki_issue(req("gov-long", &[], &["c.gov.svc.test"], 8 * 24 * 3600))
        .await
        .unwrap();
    root.pki_revoke(&a.serial).await.unwrap();
    let r = root.governance_report(0, 0).await.unwrap();
    let by_role: Vec<(String, u64)> = r
        .certificates_by_role
        .iter()
        .map(|c| (c.key.clone(), c.count))
        .collect();
    assert_eq!(by_role, vec![("gov".into(), 1), ("gov-long".into(), 1)]);
    assert_eq!(r.certificates_expiring_soon, 1);
    assert_eq!(r.certificates_revoked, 1);
    // The report needs read on sys/governance: a PKI user does not get it.
    let low = token_with(&server, ISSUE_WEB).await;
    assert_eq!(
        code(low.governance_report(0, 0).await),
        Code::PermissionDenied
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_concurrent_inits_make_one_ca() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let c = root.clone();
            tokio::spawn(async move { c.pki_init(&format!("root {i}"), 0).await })
        })
        .collect();
    let mut made = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(chain) => made.push(chain),
            Err(e) => assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}"),
        }
    }
    assert_eq!(made.len(), 1, "more than one CA was made");
    assert_eq!(root.pki_ca().await.unwrap(), made[0]);
    server.stop().await;
}
