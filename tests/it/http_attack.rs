//! An outsider's attacks on the Vault-compatible HTTPS API, each one a hole
//! that was found and closed: a refused body must not echo what it carried,
//! a CIDR binding asked for must never be dropped without a word, and a
//! request body trickled byte by byte must not hold a connection slot for
//! ever.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::harness::{unique, TestServer};
use super::http_client::HttpClient;
use super::ident_kit::approle_identity;

fn audit_text(server: &TestServer) -> String {
    std::fs::read_to_string(&server.audit_path).unwrap()
}

/// A raw TLS connection to the HTTPS listener (HTTP/1.1 by ALPN), for
/// requests a well-behaved client would not send.
async fn raw_tls(server: &TestServer) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    super::harness::install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&server.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// serde's messages quote the value they refuse (`invalid type: string
/// "...", expected a map`): a KV write whose `data` is a bare string, or a
/// check-and-set given as text, put the would-be secret into the 400's body
/// and into the audit record of the refusal.
#[tokio::test]
async fn a_refused_body_never_echoes_its_values() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = Some(server.root_token.as_str());
    let value = "SeKrIt-d41d8cd98f00b204";
    let path = format!("/v1/secret/data/{}", unique("echo"));
    let bodies = [
        json!({ "data": value }),
        json!({ "data": { "k": "v" }, "options": { "cas": value } }),
        json!({ "data": { "k": "v" }, "options": { "cas": -7_123_456_789_i64 } }),
    ];
    for body in bodies {
        let a = http.call("PUT", &path, root, Some(body.clone())).await;
        assert_eq!(a.status, 400, "{body}: {}", a.text);
        assert!(
            a.error().contains("not valid JSON for this endpoint"),
            "the rule is named: {}",
            a.text
        );
        assert!(!a.text.contains(value), "the value is echoed: {}", a.text);
        assert!(
            !a.text.contains("7123456789"),
            "a number is echoed: {}",
            a.text
        );
    }
    // A secret-id sent where a login expects it is not echoed either.
    let a = http
        .call(
            "POST",
            "/v1/auth/approle/login",
            None,
            Some(json!({ "role_id": value, "secret_id": 12345 })),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(!a.text.contains(value), "{}", a.text);
    let audit = audit_text(&server);
    assert!(!audit.contains(value), "the value is in the audit log");
    assert!(
        !audit.contains("7123456789"),
        "a number is in the audit log"
    );
}

/// Vault takes `bound_cidrs` as a list or as a comma-separated string. A
/// string was silently ignored (and a non-string list entry dropped), so a
/// caller asking for a token bound to a network got one usable anywhere.
#[tokio::test]
async fn token_create_never_drops_a_cidr_binding() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = Some(server.root_token.as_str());
    // The string form binds the token: from 127.0.0.1 it is refused.
    let a = http
        .call(
            "POST",
            "/v1/auth/token/create",
            root,
            Some(json!({ "policies": ["root"], "bound_cidrs": "10.9.9.0/24" })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let bound = a.json["auth"]["client_token"].as_str().unwrap().to_owned();
    let a = http.get("/v1/auth/token/lookup-self", Some(&bound)).await;
    assert_eq!(
        a.status, 403,
        "a token bound to 10.9.9.0/24 used from loopback: {}",
        a.text
    );
    // A list entry that is not a CIDR string is refused, not dropped.
    for cidrs in [json!(["10.9.9.0/24", 7]), json!(7), json!([null])] {
        let a = http
            .call(
                "POST",
                "/v1/auth/token/create",
                root,
                Some(json!({ "policies": ["root"], "bound_cidrs": cidrs })),
            )
            .await;
        assert_eq!(a.status, 400, "bound_cidrs {cidrs}: {}", a.text);
        assert!(a.error().contains("bound_cidrs"), "{}", a.text);
    }
}

/// The same for an AppRole secret-id's `cidr_list`: a non-string entry was
/// dropped, leaving a secret-id usable from anywhere.
#[tokio::test]
async fn secret_id_never_drops_a_cidr_binding() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root_client = server.root().await;
    let name = unique("cidr-role");
    approle_identity(&root_client, &name, &[]).await;
    let path = format!("/v1/auth/approle/role/{name}/secret-id");
    for cidrs in [json!(["10.9.9.0/24", 7]), json!([7]), json!([null])] {
        let a = http
            .call(
                "POST",
                &path,
                Some(&server.root_token),
                Some(json!({ "cidr_list": cidrs })),
            )
            .await;
        assert_eq!(a.status, 400, "cidr_list {cidrs}: {}", a.text);
        assert!(a.error().contains("cidr_list"), "{}", a.text);
    }
}

/// An unauthenticated outsider sends a request head promising a body and
/// then trickles it (or sends nothing more): the body was read without a
/// deadline, before any token check, so each such connection held one of
/// `limits.max_connections` slots for as long as the outsider liked. Now
/// the body must arrive within the deadline or the request is answered 408
/// and the connection closed.
#[tokio::test]
async fn a_trickled_body_does_not_hold_a_connection_for_ever() {
    let server = TestServer::dev().await;
    let mut tls = raw_tls(&server).await;
    let head = "POST /v1/auth/approle/login HTTP/1.1\r\nhost: localhost\r\n\
                content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"role_id\"";
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    // Generous: the deadline is keyward's (listen::BODY_DEADLINE, 10 s);
    // without one the server waits for ever and this bound fails the test.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the server still waits for the body after 60 s"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "answer: {text}");
    assert!(text.contains("body"), "the rule is named: {text}");
}

/// An outsider opens HTTP/2 connections (TLS, ALPN h2, the client
/// preface) and then sends nothing: no head deadline applies to HTTP/2, so
/// each held one of `limits.max_connections` slots for ever. Now a
/// connection with nothing in flight is closed after the idle deadline.
#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let server = TestServer::dev().await;
    super::harness::install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&server.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The client preface and an empty SETTINGS frame, then silence.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // Generous: the deadline is 30 s (listen::IDLE_DEADLINE); without one
    // the connection stays open and this bound fails the test.
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(90), tls.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "an idle HTTP/2 connection is still open after 90 s"
    );
}

/// serde names an unknown field back, and the open routes refuse unknown
/// fields: a caller with no token wrote a megabyte of its own text into the
/// audit record of each refusal (about ten records in full per minute and
/// source before they are counted into an aggregate), and so filled the
/// disk of a log that fails closed. A made-up method name was echoed the
/// same way by the 405.
#[tokio::test]
async fn an_unauthenticated_caller_cannot_write_its_own_bytes_into_the_audit_log() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let before = std::fs::metadata(&server.audit_path).unwrap().len();
    let name = "Q".repeat(256 * 1024);
    let mut body = serde_json::Map::new();
    body.insert(name.clone(), json!(1));
    let body = serde_json::Value::Object(body);
    for route in [
        "/v1/auth/approle/login",
        "/v1/sys/unseal",
        "/v1/auth/jwt/login",
    ] {
        for _ in 0..3 {
            let a = http.call("POST", route, None, Some(body.clone())).await;
            assert_eq!(
                a.status,
                400,
                "{route}: {}",
                &a.text[..a.text.len().min(300)]
            );
            assert!(!a.text.contains("QQQQ"), "{route}: the name is echoed");
            assert!(a.text.len() < 4096, "{route}: {} bytes", a.text.len());
        }
    }
    let method = "M".repeat(4 * 1024);
    let a = http.call(&method, "/v1/sys/health", None, None).await;
    assert!(!a.text.contains("MMMM"), "the method is echoed");
    let grown = std::fs::metadata(&server.audit_path).unwrap().len() - before;
    assert!(grown < 64 * 1024, "the audit log grew by {grown} bytes");
    let audit = audit_text(&server);
    assert!(!audit.contains("QQQQ") && !audit.contains("MMMM"));
    server.stop().await;
}

/// A read over the Vault API is a read: it goes into the identity's read
/// set, so `identity decommission` rotates it. Before, only gRPC `Get`
/// noted reads, and an identity that read over HTTPS was said never to
/// have read the path.
#[tokio::test]
async fn a_read_over_https_is_in_the_read_set() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("httpread");
    let policy = unique("httpread");
    super::ident_kit::put_policy(
        &server,
        &policy,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    let path = format!("{prefix}/db");
    root.put(
        &path,
        &super::harness::data(&[("password", "x")]),
        Default::default(),
    )
    .await
    .unwrap();
    let name = unique("httpreader");
    let (role_id, secret_id) = approle_identity(&root, &name, &[policy]).await;
    let (token, _) = super::ident_kit::login(&server, &role_id, &secret_id).await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let a = http
        .get(&format!("/v1/secret/data/{path}"), Some(&token.token))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let reads = root.identity_reads(&name).await.unwrap();
    assert_eq!(
        reads
            .paths
            .iter()
            .map(|r| r.path.as_str())
            .collect::<Vec<_>>(),
        [path.as_str()]
    );
    let plan = root.identity_decommission(&name, true).await.unwrap();
    assert!(plan.readable_never_read.is_empty(), "{plan:?}");
    server.stop().await;
}
