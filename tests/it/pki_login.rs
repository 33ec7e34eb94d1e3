//! A workload goes from a CSR to a token with no long-lived secret: its key
//! is made on its side, keyward signs its CSR, and `login cert` accepts the
//! certificate at once: the TLS trust store changes at run time when
//! `pki init` makes the CA, without a restart. The dev CA stays trusted; a
//! revoked certificate is refused at the handshake; after a restart the
//! trust store is loaded again at unseal.

use tonic::Code;

use crate::harness::{data, eventually, unique, TestServer};
use crate::ident_kit::{create, expire_in, read_policy};
use crate::pki_kit::*;
use keyward::client::{Client, ClientError, PutOptions};

/// A client presenting `cert_pem` with `key_pem`.
async fn with_cert(
    server: &TestServer,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Client, ClientError> {
    let dir = server.dir.path().join(unique("workload"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("k.pem"), key_pem).unwrap();
    let mut options = server.options(None);
    options.client_cert = Some(dir.join("c.pem"));
    options.client_key = Some(dir.join("k.pem"));
    Client::connect(options).await
}

/// `login cert` over a new connection presenting the certificate.
async fn login(
    server: &TestServer,
    cert_pem: &str,
    key_pem: &str,
) -> Result<keyward::proto::v1::TokenResponse, ClientError> {
    with_cert(server, cert_pem, key_pem)
        .await?
        .login_cert(0)
        .await
}

#[tokio::test]
async fn pki_from_a_csr_to_a_token_without_a_restart_and_revocation_takes_it_back() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("wl");
    let policy = read_policy(&server, &prefix).await;
    root.put(
        &format!("{prefix}/db"),
        &data(&[("password", "x")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let name = unique("worker");
    root.identity_create(create(
        &name,
        "workload",
        "team-w",
        std::slice::from_ref(&policy),
    ))
    .await
    .unwrap();
    let spiffe = format!("spiffe://acme.test/work/{name}");
    root.identity_bind_cert(&name, None, Some(&spiffe))
        .await
        .unwrap();

    // The workload's key never leaves it; only the CSR does.
    let (csr_pem, key_pem) = csr(&[&spiffe], &rcgen::PKCS_ECDSA_P256_SHA256);
    // Before the PKI exists, the same kind of certificate from an unknown
    // CA is refused.
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let stranger_ca =
        keyward::pki::builder::ca_params(keyward::pki::builder::name("x", "stranger"));
    let stranger_issuer = rcgen::Issuer::new(stranger_ca, stranger_key);
    let mut leaf = keyward::pki::builder::leaf_params(
        keyward::pki::builder::name("x", "w"),
        &[rcgen::ExtendedKeyUsagePurpose::ClientAuth],
    );
    leaf.subject_alt_names = vec![rcgen::SanType::URI(spiffe.as_str().try_into().unwrap())];
    let wk = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let forged = leaf.signed_by(&wk, &stranger_issuer).unwrap();
    assert!(login(&server, &forged.pem(), &key_pem).await.is_err());

    // The operator makes the PKI and signs the CSR: no restart.
    root.pki_init("keyward workloads", 0).await.unwrap();
    let mut r = role("work", "work");
    r.client = true;
    root.pki_role_put(r).await.unwrap();
    let signed = root.pki_sign("work", &csr_pem, 600).await.unwrap();
    let token = login(&server, &signed.certificate, &key_pem).await.unwrap();
    assert_eq!(token.identity, name);
    assert!(token.policies.contains(&policy));
    let as_workload = server.anonymous().await.with_token(&token.token).unwrap();
    as_workload.get(&format!("{prefix}/db")).await.unwrap();
    // Still not the stranger's.
    assert!(login(&server, &forged.pem(), &key_pem).await.is_err());
    // The dev CA stays trusted beside the PKI's.
    let dev = keyward::pki::CertPaths::in_dir(&server.dir.path().join("certs"));
    let dev_issuer = keyward::pki::load_issuer(&dev).unwrap();
    let dev_name = unique("devw");
    root.identity_create(create(&dev_name, "workload", "team-w", &[]))
        .await
        .unwrap();
    let dev_id = format!("spiffe://acme.test/dev/{dev_name}");
    root.identity_bind_cert(&dev_name, None, Some(&dev_id))
        .await
        .unwrap();
    let (dev_pem, dev_key) =
        keyward::pki::issue_client_cert(&dev_issuer, "devw", Some(&dev_id)).unwrap();
    assert_eq!(
        login(&server, &dev_pem, &dev_key).await.unwrap().identity,
        dev_name
    );

    // A second certificate for the same workload, kept for after the restart.
    let (csr2, key2) = csr(&[&spiffe], &rcgen::PKCS_ECDSA_P256_SHA256);
    let signed2 = root.pki_sign("work", &csr2, 600).await.unwrap();

    // Revoked: refused at once (the handshake fails), the other one works.
    root.pki_revoke(&signed.serial).await.unwrap();
    let refused = login(&server, &signed.certificate, &key_pem).await;
    assert!(refused.is_err(), "a revoked certificate logged in");
    assert_ne!(refused.unwrap_err().code(), Some(Code::Ok));
    assert_eq!(
        login(&server, &signed2.certificate, &key2)
            .await
            .unwrap()
            .identity,
        name
    );

    // After a restart the trust store is rebuilt at unseal.
    let server = server.restart().await;
    assert_eq!(
        login(&server, &signed2.certificate, &key2)
            .await
            .unwrap()
            .identity,
        name
    );
    assert!(login(&server, &signed.certificate, &key_pem).await.is_err());
    assert_eq!(
        login(&server, &dev_pem, &dev_key).await.unwrap().identity,
        dev_name
    );
    server.stop().await;
}

/// keyward runs the TLS handshakes itself now (server/tls.rs): once the
/// server stops, its accept task ends and the listening socket is closed,
/// as it was with tonic's own TLS.
#[tokio::test]
async fn pki_tls_listener_is_closed_when_the_server_stops() {
    let server = TestServer::dev().await;
    let addr = server.addr;
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    let _dir = server.stop().await;
    eventually("the listener is closed", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
}

/// A dev server whose PKI role `ns` issues client certificates.
async fn client_pki(ns: &str) -> (TestServer, Client) {
    let (server, root) = pki_server(ns).await;
    let mut r = role(ns, ns);
    r.client = true;
    root.pki_role_put(r).await.unwrap();
    (server, root)
}

/// Identity `name` (no policies), bound to `spiffe`.
async fn bound(root: &Client, name: &str, spiffe: &str) {
    root.identity_create(create(name, "workload", "team-w", &[]))
        .await
        .unwrap();
    root.identity_bind_cert(name, None, Some(spiffe))
        .await
        .unwrap();
}

/// A certificate for `spiffe` signed by role `ns` (600 s), with its key.
async fn signed_for(
    root: &Client,
    ns: &str,
    spiffe: &str,
) -> (keyward::proto::v1::PkiIssueResponse, String) {
    let (csr_pem, key_pem) = csr(&[spiffe], &rcgen::PKCS_ECDSA_P256_SHA256);
    (root.pki_sign(ns, &csr_pem, 600).await.unwrap(), key_pem)
}

/// A connection outlives the handshake that checked its certificate. A
/// login made later on the same connection is checked again: after the
/// certificate is revoked it is refused, and a token never outlives the
/// certificate it was issued for.
#[tokio::test]
async fn a_certificate_revoked_while_its_connection_stays_open_logs_in_no_more() {
    let (server, root) = client_pki("held").await;
    let name = unique("held");
    let spiffe = format!("spiffe://acme.test/held/{name}");
    bound(&root, &name, &spiffe).await;
    let (signed, key_pem) = signed_for(&root, "held", &spiffe).await;
    let not_after = signed.expires_at.unwrap().seconds;

    let held = with_cert(&server, &signed.certificate, &key_pem)
        .await
        .unwrap();
    let first = held.login_cert(0).await.unwrap();
    assert_eq!(first.identity, name);
    // The default login TTL (1 h) is longer than the certificate's 600 s.
    assert!(
        first.expires_at.unwrap().seconds <= not_after,
        "a token outlived its certificate"
    );

    root.pki_revoke(&signed.serial).await.unwrap();
    let (code, message) = refusal(held.login_cert(0).await);
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(message.contains("no longer valid"), "{message}");
    server.stop().await;
}

/// The server offers no session resumption: a resumed TLS handshake does
/// not run the client-certificate verifier, so it would bring back a
/// certificate revoked (or expired) since the first one.
#[tokio::test]
async fn the_server_resumes_no_tls_session() {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::AsyncReadExt;
    let server = TestServer::dev().await;
    crate::harness::install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&server.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
        kinds.push(tls.get_ref().1.handshake_kind());
        // Reading the server's first frame also takes in any session
        // ticket it sent after the handshake.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), tls.read(&mut buf))
            .await
            .expect("the server sent nothing in 30 s")
            .unwrap();
        assert!(n > 0);
    }
    assert_eq!(
        kinds,
        vec![
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Full)
        ]
    );
    server.stop().await;
}

/// A certificate issued for a name nobody was bound to does not log in as
/// an identity bound to that name later: the issue checked its requester
/// against the identities bound then, and nobody checked it against the
/// new one. A certificate issued after the binding logs in.
#[tokio::test]
async fn a_certificate_issued_before_its_name_was_bound_does_not_log_in_as_that_identity() {
    let (server, root) = client_pki("early").await;
    let name = unique("early");
    let spiffe = format!("spiffe://acme.test/early/{name}");
    // Nothing is bound to the name yet: anyone with `issue` on the role
    // could ask for this one.
    let (early, key_early) = signed_for(&root, "early", &spiffe).await;
    bound(&root, &name, &spiffe).await;
    let (code, message) = refusal(login(&server, &early.certificate, &key_early).await);
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(message.contains("issued for another identity"), "{message}");
    let (late, key_late) = signed_for(&root, "early", &spiffe).await;
    assert_eq!(
        login(&server, &late.certificate, &key_late)
            .await
            .unwrap()
            .identity,
        name
    );
    server.stop().await;
}

/// Deleting an identity revokes the certificates issued for it: one kept
/// would log in as an identity made again under the same name (with other
/// policies), which nobody checked it against.
#[tokio::test]
async fn a_certificate_does_not_outlive_the_deletion_of_its_identity() {
    let (server, root) = client_pki("gone").await;
    let name = unique("gone");
    let spiffe = format!("spiffe://acme.test/gone/{name}");
    bound(&root, &name, &spiffe).await;
    let (old, key_pem) = signed_for(&root, "gone", &spiffe).await;
    assert_eq!(
        login(&server, &old.certificate, &key_pem)
            .await
            .unwrap()
            .identity,
        name
    );
    root.identity_delete(&name).await.unwrap();
    bound(&root, &name, &spiffe).await;
    assert!(
        login(&server, &old.certificate, &key_pem).await.is_err(),
        "a certificate of the deleted identity logged in as the new one"
    );
    server.stop().await;
}

/// A certificate that logs in as an identity is a login credential for it,
/// used outside keyward too: none outlives the identity's expiry, none is
/// made once that has passed, and those made before are revoked then (the
/// expiry sweep puts them in the CRL).
#[tokio::test]
async fn no_certificate_outlives_or_follows_its_identitys_expiry() {
    let (_server, root) = client_pki("brief").await;
    let name = unique("brief");
    let spiffe = format!("spiffe://acme.test/brief/{name}");
    bound(&root, &name, &spiffe).await;
    expire_in(&root, &name, 300).await;
    let (csr_pem, _key) = csr(&[spiffe.as_str()], &rcgen::PKCS_ECDSA_P256_SHA256);
    let long = root.pki_sign("brief", &csr_pem, 600).await;
    let refused = long.expect_err("a certificate outliving its identity");
    assert_eq!(refused.code(), Some(Code::InvalidArgument), "{refused}");
    assert!(refused.to_string().contains("shorter ttl"), "{refused}");
    let short = root.pki_sign("brief", &csr_pem, 60).await.unwrap();
    let expires = root.identity_get(&name).await.unwrap().expires_at.unwrap();
    assert!(short.expires_at.unwrap().seconds <= expires.seconds);

    expire_in(&root, &name, 1).await;
    // Waits for the expiry itself; then no certificate at all.
    eventually("no certificate for an expired identity", || async {
        matches!(
            root.pki_sign("brief", &csr_pem, 60).await,
            Err(e) if e.code() == Some(Code::FailedPrecondition)
                && e.to_string().contains("past its expiry")
        )
    })
    .await;
    let serial = short.serial.clone();
    eventually(
        "the expiry sweep revokes the identity's certificate",
        || async {
            root.pki_list(0)
                .await
                .unwrap()
                .iter()
                .any(|c| c.serial == serial && c.revoked_at.is_some())
        },
    )
    .await;
    let crl = root.pki_crl().await.unwrap();
    let serial_bytes = hex::decode(&serial).unwrap();
    assert!(
        crl.windows(serial_bytes.len()).any(|w| w == serial_bytes),
        "the CRL lists the serial"
    );
}

/// A delete of the identity (and a new identity made under its name) that
/// runs between an issue's record and its second read of the identities:
/// the delete's revocation listed the inventory before the certificate was
/// there, so the issue takes the certificate back itself. Otherwise it
/// would log in as the new identity, which nobody checked it against.
#[tokio::test]
async fn a_certificate_recorded_while_its_identity_is_deleted_is_taken_back() {
    let (server, root) = client_pki("gone").await;
    let name = unique("gone");
    let spiffe = format!("spiffe://acme.test/gone/{name}");
    bound(&root, &name, &spiffe).await;
    let core = server.core.clone();
    let (gone, again) = (name.clone(), spiffe.clone());
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hook_ran = ran.clone();
    server.core.pki.danger_test_after_record(move || {
        // What `identity delete` does, then a new identity under the name,
        // bound to the same SPIFFE ID (made at a later millisecond).
        let now = core.clock().now_ms();
        let id = keyward::identity::IdentityName::parse(&gone).unwrap();
        core.pki.revoke_issued_for(&gone, now).unwrap();
        core.identities.delete(&id, &core.tokens, now).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let made = keyward::identity::NewIdentity {
            name: id.clone(),
            kind: keyward::identity::IdentityKind::Workload,
            owner: "someone-else".into(),
            description: String::new(),
            policies: Vec::new(),
            expires_at_ms: 0,
        };
        core.identities
            .create(made, &core.policies, core.clock().now_ms())
            .unwrap();
        core.identities.bind_cert(&id, None, Some(&again)).unwrap();
        hook_ran.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let (csr_pem, _key) = csr(&[spiffe.as_str()], &rcgen::PKCS_ECDSA_P256_SHA256);
    let refused = root
        .pki_sign("gone", &csr_pem, 60)
        .await
        .expect_err("a certificate whose identity was made again meanwhile");
    assert!(
        ran.load(std::sync::atomic::Ordering::SeqCst),
        "the hook ran"
    );
    assert_eq!(refused.code(), Some(Code::Aborted), "{refused}");
    let valid: Vec<_> = root
        .pki_list(0)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.identity == name && c.revoked_at.is_none())
        .collect();
    assert!(valid.is_empty(), "a valid certificate is left: {valid:?}");
}
