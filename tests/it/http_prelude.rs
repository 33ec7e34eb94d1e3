//! The answers the HTTPS listener gives before any call of the seam of its
//! own (404 no handler, 405 method, 408 body too slow, 413 body too big,
//! 400 body unreadable)
//! are audited like every other answer: one record each, under
//! `keyward.v1.Http/...`, with the request id and the source, without the
//! token, the path or the body; a flood of them is counted, not written
//! one by one.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::TestServer;
use crate::http_client::HttpClient;

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The one record of `request_id`.
fn record_of(server: &TestServer, request_id: &str) -> Value {
    let mut found: Vec<Value> = records(&server.audit_path)
        .into_iter()
        .filter(|r| r["request_id"] == request_id)
        .collect();
    assert_eq!(found.len(), 1, "records of {request_id}: {found:?}");
    found.remove(0)
}

#[tokio::test]
async fn refusals_are_audited_without_token_path_or_body() {
    let server = TestServer::dev_with(|c| {
        c.server_limits.max_request_bytes = 64 * 1024;
    })
    .await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let root = server.root_token.clone();
    let in_path = "kwt_PathCarriedToken0123456789";
    let in_body = "BodyMarker-5f2c9e";
    let send = |method: &'static str, path: String, id: &'static str, body: Option<Vec<u8>>| {
        let http = &http;
        let root = root.clone();
        async move {
            http.send(
                method,
                &path,
                &[
                    ("x-vault-token", root.as_str()),
                    ("x-request-id", id),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
        }
    };

    // 404 from the fallback (Vault's old lookup/<token> form) and from a
    // route with no such operation.
    let a = send(
        "GET",
        format!("/v1/auth/token/lookup/{in_path}"),
        "req-404a",
        None,
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert!(!a.text.contains(in_path), "the path is echoed: {}", a.text);
    let a = send(
        "GET",
        format!("/v1/secret/nope/{in_path}"),
        "req-404b",
        None,
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.text);
    let a = send("POST", "/v1/auth/token/nope".into(), "req-404c", None).await;
    assert_eq!(a.status, 404, "{}", a.text);
    for id in ["req-404a", "req-404b", "req-404c"] {
        let r = record_of(&server, id);
        assert_eq!(r["method"], "keyward.v1.Http/NotFound", "{r}");
        assert_eq!(r["code"], "NOT_FOUND", "{r}");
    }

    // 405 from the prelude and from a route serving several operations.
    let body = Some(format!("{{\"key\": \"{in_body}\"}}").into_bytes());
    let a = send("GET", "/v1/sys/seal".into(), "req-405a", body.clone()).await;
    assert_eq!(a.status, 405, "{}", a.text);
    assert!(a.error().contains("PUT or POST"), "{}", a.text);
    let a = send(
        "GET",
        "/v1/auth/token/create".into(),
        "req-405b",
        body.clone(),
    )
    .await;
    assert_eq!(a.status, 405, "{}", a.text);
    let a = send("PATCH", "/v1/secret/data/app/x".into(), "req-405c", body).await;
    assert_eq!(a.status, 405, "{}", a.text);
    for id in ["req-405a", "req-405b", "req-405c"] {
        let r = record_of(&server, id);
        assert_eq!(r["method"], "keyward.v1.Http/MethodNotAllowed", "{r}");
        assert_eq!(r["code"], "INVALID_ARGUMENT", "{r}");
        assert!(
            r["error"].as_str().unwrap().contains("not supported here"),
            "{r}"
        );
        assert!(
            r["source"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{r}"
        );
    }

    // 413.
    let mut big = format!("{{\"key\": \"{in_body}").into_bytes();
    big.resize(80 * 1024, b'x');
    let a = send("PUT", "/v1/sys/unseal".into(), "req-413", Some(big)).await;
    assert_eq!(a.status, 413, "{}", a.text);
    let r = record_of(&server, "req-413");
    assert_eq!(r["method"], "keyward.v1.Http/BodyTooLarge", "{r}");
    assert_eq!(r["code"], "RESOURCE_EXHAUSTED", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("max_request_bytes"),
        "{r}"
    );

    // 408: a body that never arrives (the server's deadline is 10 s; the
    // bound here is generous).
    let mut tls = raw_tls(&server).await;
    let head = format!(
        "POST /v1/sys/unseal HTTP/1.1\r\nhost: localhost\r\nx-vault-token: {root}\r\n\
         x-request-id: req-408\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n\
         {{\"key\": \"{in_body}"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "no answer after 60 s");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"));
    let r = record_of(&server, "req-408");
    assert_eq!(r["method"], "keyward.v1.Http/BodyTimeout", "{r}");
    assert_eq!(r["code"], "CANCELLED", "{r}");

    // None of them carries the token (nor its HMAC), the path or the body.
    for id in [
        "req-404a", "req-404b", "req-404c", "req-405a", "req-405b", "req-405c", "req-413",
        "req-408",
    ] {
        let r = record_of(&server, id);
        assert!(r["identity"].is_null() && r["accessor"].is_null(), "{r}");
        assert!(r.get("token").is_none_or(Value::is_null), "{r}");
        assert!(r["resource"].is_null(), "{r}");
    }
    let text = std::fs::read_to_string(&server.audit_path).unwrap();
    for leak in [root.as_str(), in_path, in_body] {
        assert!(!text.contains(leak), "{leak} in the audit log");
    }
    server.stop().await;
}

/// A body that breaks part-way (a malformed chunk, a connection closed
/// before the declared length) is answered 400 and audited as unreadable,
/// not as too large, and the record holds neither the token nor the body.
#[tokio::test]
async fn a_body_that_breaks_part_way_is_audited_as_unreadable() {
    let server = TestServer::dev_with(|c| {
        c.server_limits.max_request_bytes = 64 * 1024;
    })
    .await;
    let root = server.root_token.clone();
    let in_body = "BodyMarker-81d0aa";
    let heads = [
        (
            "req-400-chunk",
            "transfer-encoding: chunked",
            format!("10\r\n{{\"key\": \"{in_body}\r\nzz\r\n"),
        ),
        (
            "req-400-eof",
            "content-length: 1000",
            format!("{{\"key\": \"{in_body}"),
        ),
    ];
    for (id, framing, body) in &heads {
        let mut tls = raw_tls(&server).await;
        let request = format!(
            "POST /v1/sys/unseal HTTP/1.1\r\nhost: localhost\r\nx-vault-token: {root}\r\n\
             x-request-id: {id}\r\ncontent-type: application/json\r\n{framing}\r\n\r\n{body}"
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        // The end of what this client sends (a TLS close_notify, then FIN).
        tls.shutdown().await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "{id}: no answer after 60 s");
        let answer = String::from_utf8_lossy(&got);
        assert!(answer.starts_with("HTTP/1.1 400"), "{id}: {answer}");
        let r = record_of(&server, id);
        assert_eq!(r["method"], "keyward.v1.Http/BodyUnreadable", "{r}");
        assert_eq!(r["code"], "INVALID_ARGUMENT", "{r}");
        assert!(r["identity"].is_null() && r["accessor"].is_null(), "{r}");
        assert!(r.get("token").is_none_or(Value::is_null), "{r}");
        assert!(r["resource"].is_null(), "{r}");
        assert!(
            !answer.contains(in_body),
            "{id}: the answer echoes the body"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{id}: {answer}"
        );
    }
    // A chunked body that grows past the limit is still 413, not 400.
    let limit = 64 * 1024;
    let mut tls = raw_tls(&server).await;
    let head = format!(
        "POST /v1/sys/unseal HTTP/1.1\r\nhost: localhost\r\nx-vault-token: {root}\r\n\
         x-request-id: req-413-chunked\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // Just past the limit, in 1 KiB chunks: what the server leaves unread
    // when it answers is at most one chunk.
    let chunk = format!("{:x}\r\n{}\r\n", 1024, "x".repeat(1024));
    for _ in 0..(limit / 1024 + 2) {
        tls.write_all(chunk.as_bytes()).await.unwrap();
    }
    tls.flush().await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "no answer to the chunked body after 60 s");
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let r = record_of(&server, "req-413-chunked");
    assert_eq!(r["method"], "keyward.v1.Http/BodyTooLarge", "{r}");
    let text = std::fs::read_to_string(&server.audit_path).unwrap();
    for leak in [root.as_str(), in_body] {
        assert!(!text.contains(leak), "{leak} in the audit log");
    }
    server.stop().await;
}

/// An outsider looping over unknown paths and wrong methods grows the log
/// by a bounded amount; the counted repeats add up to the calls made.
#[tokio::test]
async fn a_flood_of_refusals_is_counted_not_written_one_by_one() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let before = records(&server.audit_path).len();
    let mut made = std::collections::HashMap::<&str, u64>::new();
    for i in 0..120u32 {
        if i % 2 == 0 {
            assert_eq!(
                http.get(&format!("/v1/no/such/{i}"), None).await.status,
                404
            );
            *made.entry("keyward.v1.Http/NotFound").or_default() += 1;
        } else {
            assert_eq!(http.get("/v1/sys/seal", None).await.status, 405);
            *made.entry("keyward.v1.Http/MethodNotAllowed").or_default() += 1;
        }
    }
    let written = records(&server.audit_path).len() - before;
    assert!(written < 80, "{written} records for 120 refusals");
    let dir = server.stop().await;
    let all = records(&dir.path().join("audit.log"));
    let mut counted = std::collections::HashMap::<&str, u64>::new();
    for r in &all[before..] {
        let method = r["method"].as_str().unwrap();
        if made.contains_key(method) {
            *counted.entry(method).or_default() += r["count"].as_u64().unwrap_or(1);
        }
    }
    assert_eq!(counted, made);
}

/// A raw TLS connection (HTTP/1.1 by ALPN), for a request a well-behaved
/// client would not send.
async fn raw_tls(server: &TestServer) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    crate::harness::install_crypto();
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
