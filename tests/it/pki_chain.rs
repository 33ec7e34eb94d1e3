//! Issued certificates are judged by outside verifiers: `openssl verify`
//! and Python `cryptography`'s strict RFC 5280 path validation accept the
//! chains of an internal root and of an intermediate signed outside, for
//! the purposes the role gives and no other; two workloads holding
//! keyward-issued certificates complete a mutual TLS handshake; a revoked
//! serial is in the CRL; each issued private key is the key of its
//! certificate (both key types); the CA key kept in memory for signing is
//! dropped at seal and signing resumes with the same CA after unseal.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::prelude::FromDer;

use crate::harness::{private_tempdir, TestServer};
use crate::pki_kit::*;
use keyward::proto::v1::{PkiIssueRequest, PkiRole};

fn issue_req(role: &str, spiffe: &[&str], dns: &[&str]) -> PkiIssueRequest {
    PkiIssueRequest {
        role: role.to_owned(),
        spiffe_ids: spiffe.iter().map(|s| s.to_string()).collect(),
        dns_names: dns.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: 600,
    }
}

#[tokio::test]
async fn pki_root_chain_passes_openssl_and_a_strict_verifier_for_its_purposes_only() {
    let (server, root) = pki_server("web").await;
    let dir = private_tempdir();
    let ca = write(dir.path(), "ca.pem", &root.pki_ca().await.unwrap().concat());
    // Role with both purposes (neither flag given).
    let both = root
        .pki_issue(issue_req(
            "web",
            &["spiffe://acme.test/web/api"],
            &["api.web.svc.test"],
        ))
        .await
        .unwrap();
    let leaf = write(dir.path(), "both.pem", &both.certificate);
    assert_eq!(both.ca_chain.len(), 1);
    for purpose in ["sslserver", "sslclient"] {
        let (ok, text) = openssl_verify(&ca, None, &leaf, purpose);
        assert!(ok, "openssl {purpose}: {text}");
    }
    let (ok, text) = strict_verify(&ca, &[], &leaf, Some("api.web.svc.test"), true);
    assert!(ok, "strict: {text}");
    // Not for a name it does not carry.
    let (ok, _) = strict_verify(&ca, &[], &leaf, Some("other.web.svc.test"), false);
    assert!(!ok, "accepted for a name it does not carry");

    // A server-only role: no clientAuth, so a client verifier refuses it.
    let mut server_only = role("websrv", "web");
    server_only.server = true;
    root.pki_role_put(server_only).await.unwrap();
    let srv = root
        .pki_issue(issue_req("websrv", &[], &["api.web.svc.test"]))
        .await
        .unwrap();
    let srv_leaf = write(dir.path(), "srv.pem", &srv.certificate);
    assert!(openssl_verify(&ca, None, &srv_leaf, "sslserver").0);
    assert!(!openssl_verify(&ca, None, &srv_leaf, "sslclient").0);
    assert!(strict_verify(&ca, &[], &srv_leaf, Some("api.web.svc.test"), false).0);
    assert!(!strict_verify(&ca, &[], &srv_leaf, None, true).0);

    // The RFC 5280 profile, read back: AKI = CA's SKI, KU digitalSignature, CA:false.
    let ca_der = CertificateDer::from_pem_slice(std::fs::read(&ca).unwrap().as_slice()).unwrap();
    let leaf_der = CertificateDer::from_pem_slice(srv.certificate.as_bytes()).unwrap();
    let (_, ca_x) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    let (_, leaf_x) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let ski = ca_x
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("CA SKI");
    let aki = leaf_x
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("leaf AKI");
    assert_eq!(ski, aki);
    let ku = leaf_x.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    assert!(!leaf_x.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(leaf_x.raw_serial_as_string().replace(':', ""), srv.serial);
    server.stop().await;
}

#[tokio::test]
async fn pki_sign_from_a_csr_passes_the_verifiers_and_uses_only_the_csr_key_and_sans() {
    let (server, root) = pki_server("batch").await;
    let mut ed = role("batch-ed", "batch");
    ed.key_type = "ed25519".into();
    ed.client = true;
    root.pki_role_put(ed).await.unwrap();
    let dir = private_tempdir();
    let ca = write(dir.path(), "ca.pem", &root.pki_ca().await.unwrap().concat());
    let (csr_pem, _key) = csr(&["spiffe://acme.test/batch/job-1"], &rcgen::PKCS_ED25519);
    let signed = root.pki_sign("batch-ed", &csr_pem, 300).await.unwrap();
    assert!(signed.private_key.is_empty(), "sign hands back no key");
    let leaf = write(dir.path(), "leaf.pem", &signed.certificate);
    let (ok, text) = openssl_verify(&ca, None, &leaf, "sslclient");
    assert!(ok, "{text}");
    let (ok, text) = strict_verify(&ca, &[], &leaf, None, true);
    assert!(ok, "{text}");
    // The certificate carries the CSR's key.
    let csr_der =
        rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .unwrap();
    let (_, csr_x) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der).unwrap();
    let leaf_der = CertificateDer::from_pem_slice(signed.certificate.as_bytes()).unwrap();
    let (_, leaf_x) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    assert_eq!(
        csr_x.certification_request_info.subject_pki.raw,
        leaf_x.public_key().raw
    );
    // A CSR asking to be a CA gets no CA certificate: refused outright.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://acme.test/batch/x".try_into().unwrap(),
    )];
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let signed = root.pki_sign("batch-ed", &ca_csr, 300).await.unwrap();
    let der = CertificateDer::from_pem_slice(signed.certificate.as_bytes()).unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(
        !x.basic_constraints().unwrap().unwrap().value.ca,
        "the CSR's CA:true was used"
    );
    server.stop().await;
}

#[tokio::test]
async fn pki_intermediate_signed_outside_chains_to_the_outside_root() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let dir = private_tempdir();
    // The outside CA, made here with rcgen.
    let outside_key = rcgen::KeyPair::generate().unwrap();
    let mut outside_params =
        keyward::pki::builder::ca_params(keyward::pki::builder::name("Outside", "Outside Root"));
    outside_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
    let outside_cert = outside_params.self_signed(&outside_key).unwrap();
    let outside_issuer = rcgen::Issuer::new(outside_params, outside_key);
    let csr_pem = root
        .pki_intermediate_csr("keyward intermediate")
        .await
        .unwrap();
    // Setting a certificate for another key is refused, naming the rule.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = keyward::pki::builder::ca_params(keyward::pki::builder::name("x", "y"))
        .signed_by(&other_key, &outside_issuer)
        .unwrap();
    let (c, msg) = refusal(root.pki_set_signed(&other.pem()).await);
    assert_eq!(c, tonic::Code::InvalidArgument);
    assert!(msg.contains("pending key"), "{msg}");
    // The outside CA signs the CSR as a CA.
    let mut req = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
    req.params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    req.params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    req.params.use_authority_key_identifier_extension = true;
    let inter = req.signed_by(&outside_issuer).unwrap();
    let chain = root
        .pki_set_signed(&format!("{}{}", inter.pem(), outside_cert.pem()))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    root.pki_role_put(role("edge", "edge")).await.unwrap();
    let issued = root
        .pki_issue(issue_req("edge", &[], &["gw.edge.svc.test"]))
        .await
        .unwrap();
    assert_eq!(issued.ca_chain.len(), 2);
    let anchor = write(dir.path(), "outside.pem", &outside_cert.pem());
    let inter_path = write(dir.path(), "inter.pem", &issued.ca_chain[0]);
    let leaf = write(dir.path(), "leaf.pem", &issued.certificate);
    let (ok, text) = openssl_verify(&anchor, Some(&inter_path), &leaf, "sslserver");
    assert!(ok, "{text}");
    let (ok, text) = strict_verify(
        &anchor,
        &[&inter_path],
        &leaf,
        Some("gw.edge.svc.test"),
        true,
    );
    assert!(ok, "{text}");
    // Without the intermediate the outside root alone does not reach it.
    assert!(!openssl_verify(&anchor, None, &leaf, "sslserver").0);
    // A second CA is not installed over the first.
    assert_eq!(
        code(root.pki_init("again", 0).await),
        tonic::Code::FailedPrecondition
    );
    server.stop().await;
}

fn tls_parts(
    issued: &keyward::proto::v1::PkiIssueResponse,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = CertificateDer::pem_slice_iter(issued.certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(issued.private_key.as_bytes()).unwrap();
    (certs, key)
}

#[tokio::test]
async fn pki_issued_client_and_server_complete_a_mutual_tls_handshake() {
    crate::harness::install_crypto();
    let (server, root) = pki_server("mesh").await;
    let mut srv_role: PkiRole = role("mesh-server", "mesh");
    srv_role.server = true;
    let mut cli_role: PkiRole = role("mesh-client", "mesh");
    cli_role.client = true;
    root.pki_role_put(srv_role).await.unwrap();
    root.pki_role_put(cli_role).await.unwrap();
    let srv = root
        .pki_issue(issue_req("mesh-server", &[], &["db.mesh.svc.test"]))
        .await
        .unwrap();
    let cli = root
        .pki_issue(issue_req(
            "mesh-client",
            &["spiffe://acme.test/mesh/app"],
            &[],
        ))
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(srv.ca_chain[0].as_bytes()).unwrap())
        .unwrap();
    let roots = Arc::new(roots);
    let (scerts, skey) = tls_parts(&srv);
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone())
        .build()
        .unwrap();
    let server_cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(scerts, skey)
        .unwrap();
    let (ccerts, ckey) = tls_parts(&cli);
    let client_cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(ccerts, ckey)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.ok();
        (buf, peer)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("db.mesh.svc.test").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    let (got, peer) = accept.await.unwrap();
    assert_eq!(&got, b"ping");
    let names = keyward::identity::login::cert_names(&peer).unwrap();
    assert_eq!(
        names.spiffe_ids,
        vec!["spiffe://acme.test/mesh/app".to_owned()]
    );

    // The client certificate cannot serve: the server role's name check and
    // purpose refuse it.
    let connector2 = {
        let mut r = rustls::RootCertStore::empty();
        r.add(CertificateDer::from_pem_slice(srv.ca_chain[0].as_bytes()).unwrap())
            .unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(r)
                .with_no_client_auth(),
        ))
    };
    let (ccerts, ckey) = tls_parts(&cli);
    let bad_server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(ccerts, ckey)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(bad_server));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(connector2
        .connect(ServerName::try_from("db.mesh.svc.test").unwrap(), tcp)
        .await
        .is_err());
    server.stop().await;
}

#[tokio::test]
async fn pki_revoked_serial_is_in_the_crl_and_the_inventory() {
    let (server, root) = pki_server("crl").await;
    let a = root
        .pki_issue(issue_req("crl", &[], &["a.crl.svc.test"]))
        .await
        .unwrap();
    let b = root
        .pki_issue(issue_req("crl", &[], &["b.crl.svc.test"]))
        .await
        .unwrap();
    // Asking again does not make (sign, number, store) a new CRL: a loop of
    // `pki crl` by any token holder gets the same one until a revoke.
    let before = root.pki_crl().await.unwrap();
    assert_eq!(root.pki_crl().await.unwrap(), before);
    // Revoke accepts the colon form openssl prints.
    let colon: Vec<String> = hex::decode(&a.serial)
        .unwrap()
        .iter()
        .map(|x| format!("{x:02X}"))
        .collect();
    let rec = root.pki_revoke(&colon.join(":")).await.unwrap();
    assert_eq!(rec.serial, a.serial);
    assert!(rec.revoked_at.is_some());
    let der = root.pki_crl().await.unwrap();
    assert_ne!(der, before, "a revoke must replace the served CRL");
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
    let serials: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    assert_eq!(
        serials,
        vec![a.serial.clone()],
        "b ({}) must not be listed",
        b.serial
    );
    // The CRL is signed by the CA: openssl checks it.
    let dir = private_tempdir();
    let ca = write(dir.path(), "ca.pem", &root.pki_ca().await.unwrap().concat());
    let crl_path = dir.path().join("crl.der");
    std::fs::write(&crl_path, &der).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["crl", "-inform", "DER", "-noout", "-CAfile"])
        .arg(&ca)
        .arg("-in")
        .arg(&crl_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success() && text.contains("verify OK"), "{text}");
    // openssl verify with the CRL refuses a and accepts b.
    let leaf_a = write(dir.path(), "a.pem", &a.certificate);
    let leaf_b = write(dir.path(), "b.pem", &b.certificate);
    let crl_pem = write(
        dir.path(),
        "crl.pem",
        &format!(
            "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
        ),
    );
    let verify = |leaf: &std::path::Path| {
        std::process::Command::new("openssl")
            .args(["verify", "-crl_check", "-CAfile"])
            .arg(&ca)
            .arg("-CRLfile")
            .arg(&crl_pem)
            .arg(leaf)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        !verify(&leaf_a),
        "revoked certificate accepted with the CRL"
    );
    assert!(verify(&leaf_b));
    // The inventory: both, a marked revoked; --expiring leaves a out.
    let listed = root.pki_list(0).await.unwrap();
    let mine: Vec<_> = listed
        .iter()
        .filter(|c| c.serial == a.serial || c.serial == b.serial)
        .collect();
    assert_eq!(mine.len(), 2);
    assert!(mine.iter().all(|c| c.role == "crl"));
    let expiring = root.pki_list(3600).await.unwrap();
    assert!(expiring.iter().any(|c| c.serial == b.serial));
    assert!(!expiring.iter().any(|c| c.serial == a.serial));
    // Unknown serial: NOT_FOUND for the one allowed to revoke.
    let (c, msg) = refusal(root.pki_revoke("serial-7").await);
    assert_eq!(c, tonic::Code::InvalidArgument);
    assert!(msg.contains("hex digits"), "{msg}");
    assert_eq!(
        code(root.pki_revoke("0badc0de").await),
        tonic::Code::NotFound
    );
    server.stop().await;
}

/// The raw public key of a PEM certificate.
fn cert_public_key(pem: &str) -> Vec<u8> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
    cert.public_key().subject_public_key.data.to_vec()
}

#[tokio::test]
async fn pki_issued_private_keys_are_the_keys_of_their_certificates() {
    let (server, root) = pki_server("keys").await;
    let mut ed = role("keys-ed", "keys");
    ed.key_type = "ed25519".into();
    root.pki_role_put(ed).await.unwrap();
    let dir = private_tempdir();
    let ca = write(dir.path(), "ca.pem", &root.pki_ca().await.unwrap()[0]);
    let mut seen = Vec::new();
    for (role_name, alg) in [
        ("keys", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("keys-ed", &rcgen::PKCS_ED25519),
    ] {
        for n in 0..3 {
            let spiffe = format!("spiffe://{TRUST_DOMAIN}/keys/w{n}");
            let issued = root
                .pki_issue(issue_req(role_name, &[&spiffe], &[]))
                .await
                .unwrap();
            let key = rcgen::KeyPair::from_pem(&issued.private_key).unwrap();
            assert_eq!(key.algorithm(), alg, "{role_name}");
            let public = cert_public_key(&issued.certificate);
            assert_eq!(
                key.public_key_raw(),
                public.as_slice(),
                "{role_name}: the private key is not the certificate's"
            );
            assert!(!seen.contains(&public), "a key was handed out twice");
            seen.push(public);
            let leaf = write(dir.path(), "leaf.pem", &issued.certificate);
            let (ok, text) = openssl_verify(&ca, None, &leaf, "any");
            assert!(ok, "{role_name}: {text}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn pki_sealing_drops_the_kept_ca_key_and_signing_resumes_after_unseal() {
    let (server, root) = pki_server("seal").await;
    let chain = root.pki_ca().await.unwrap();
    let spiffe = format!("spiffe://{TRUST_DOMAIN}/seal/a");
    let first = root
        .pki_issue(issue_req("seal", &[&spiffe], &[]))
        .await
        .unwrap();
    assert_eq!(first.ca_chain, chain);
    assert!(server.core.pki.keeps_ca_key(), "the CA is kept after use");

    root.seal().await.unwrap();
    assert!(
        !server.core.pki.keeps_ca_key(),
        "the CA key outlived the seal"
    );
    assert!(root
        .pki_issue(issue_req("seal", &[&spiffe], &[]))
        .await
        .is_err());
    assert!(!server.core.pki.keeps_ca_key());

    root.unseal(&server.unseal_share).await.unwrap();
    let (csr_pem, _key) = csr(&[&spiffe], &rcgen::PKCS_ECDSA_P256_SHA256);
    let again = root.pki_sign("seal", &csr_pem, 600).await.unwrap();
    assert_eq!(again.ca_chain, chain, "the same CA signs after unseal");
    let dir = private_tempdir();
    let ca = write(dir.path(), "ca.pem", &chain[0]);
    for (name, pem) in [("first", &first.certificate), ("again", &again.certificate)] {
        let leaf = write(dir.path(), &format!("{name}.pem"), pem);
        let (ok, text) = openssl_verify(&ca, None, &leaf, "any");
        assert!(ok, "{name}: {text}");
    }
    server.stop().await;
}
