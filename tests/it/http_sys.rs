//! The HTTPS listener and Vault's `sys/` endpoints, curl-style: status
//! codes, the JSON shapes, and that the same vault is behind both
//! listeners.

use serde_json::json;

use super::harness::TestServer;
use super::http_client::HttpClient;

#[tokio::test]
async fn health_answers_vaults_fields_and_codes() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let a = http.get("/v1/sys/health", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["initialized"], true);
    assert_eq!(a.json["sealed"], false);
    assert_eq!(a.json["standby"], false);
    assert!(a.json["version"]
        .as_str()
        .unwrap()
        .starts_with("1.14.0+keyward."));
    assert!(a.json["server_time_utc"].as_u64().unwrap() > 1_700_000_000);
    // HEAD: the same code, no body.
    let a = http.send("HEAD", "/v1/sys/health", &[], None).await;
    assert_eq!(a.status, 200);
    assert!(a.text.is_empty());
    // standbyok changes nothing on an active node; activecode replaces 200.
    let a = http.get("/v1/sys/health?standbyok=true", None).await;
    assert_eq!(a.status, 200);
    let a = http.get("/v1/sys/health?activecode=204", None).await;
    assert_eq!(a.status, 204);
    let a = http.get("/v1/sys/health?activecode=abc", None).await;
    assert_eq!(a.status, 400);
    assert!(a.error().contains("activecode"), "{}", a.text);
    // A method the path does not serve: 405 naming the ones it does.
    let a = http.call("POST", "/v1/sys/health", None, None).await;
    assert_eq!(a.status, 405, "{}", a.text);
    assert!(a.error().contains("GET"), "{}", a.text);
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_path_is_vaults_404() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    for path in ["/v1/nope", "/", "/v1/sys/nope/deeper"] {
        let a = http.get(path, Some(&server.root_token)).await;
        assert_eq!(a.status, 404, "{path}: {}", a.text);
        assert!(a.json["errors"].is_array(), "{path}: {}", a.text);
    }
    // Vault's old GET auth/token/lookup/<token>: not served, and the token
    // in the path is not echoed back.
    let path = format!("/v1/auth/token/lookup/{}", server.root_token);
    let a = http.get(&path, Some(&server.root_token)).await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert!(!a.text.contains(&server.root_token), "{}", a.text);
    server.stop().await;
}

#[tokio::test]
async fn seal_status_seal_and_unseal_over_http_are_the_same_vault_as_grpc() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let a = http.get("/v1/sys/seal-status", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["type"], "shamir");
    assert_eq!(a.json["sealed"], false);
    assert_eq!(a.json["t"], 1);
    assert_eq!(a.json["n"], 1);
    // Sealing needs a token allowed to: none is 403, as Vault answers.
    let a = http.call("PUT", "/v1/sys/seal", None, None).await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = http
        .call("PUT", "/v1/sys/seal", Some(&server.root_token), None)
        .await;
    assert_eq!(a.status, 204, "{}", a.text);
    // gRPC sees it sealed.
    let status = server.anonymous().await.status().await.unwrap();
    assert!(status.sealed);
    let a = http.get("/v1/sys/health", None).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json["sealed"], true);
    let a = http.get("/v1/sys/health?sealedcode=200", None).await;
    assert_eq!(a.status, 200);
    // A token call while sealed: 503 with Vault's error body.
    let a = http
        .get("/v1/auth/token/lookup-self", Some(&server.root_token))
        .await;
    assert!(a.status == 503 || a.status == 404, "{}", a.text);
    // Unseal: a wrong share is 400 naming the problem, the right one opens.
    let a = http
        .call("PUT", "/v1/sys/unseal", None, Some(json!({"key": "nope"})))
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/unseal",
            None,
            Some(json!({"key": server.unseal_share})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["sealed"], false);
    assert!(!server.anonymous().await.status().await.unwrap().sealed);
    // Unknown fields are refused, naming the fields expected (never the
    // one sent: see `http_attack`).
    let a = http
        .call(
            "PUT",
            "/v1/sys/unseal",
            None,
            Some(json!({"key": "x", "shard": 1})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("unknown field"), "{}", a.text);
    assert!(a.error().contains("`key`"), "{}", a.text);
    assert!(!a.error().contains("shard"), "{}", a.text);
    // Leader: one active node, itself.
    let a = http.get("/v1/sys/leader", None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json["ha_enabled"], false);
    assert_eq!(a.json["is_self"], true);
    server.stop().await;
}

#[tokio::test]
async fn init_over_http() {
    let server = TestServer::uninitialized().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let a = http.get("/v1/sys/init", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["initialized"], false);
    let a = http.get("/v1/sys/health", None).await;
    assert_eq!(a.status, 501, "{}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/init",
            None,
            Some(json!({"secret_shares": 0, "secret_threshold": 1})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    let a = http
        .call(
            "PUT",
            "/v1/sys/init",
            None,
            Some(json!({"secret_shares": 3, "secret_threshold": 2})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let keys = a.json["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 3);
    assert!(a.json["root_token"].as_str().unwrap().starts_with("kwt_"));
    // A second init is refused.
    let a = http
        .call(
            "PUT",
            "/v1/sys/init",
            None,
            Some(json!({"secret_shares": 1, "secret_threshold": 1})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    // Two of three shares unseal it; progress shows after the first.
    let a = http
        .call("PUT", "/v1/sys/unseal", None, Some(json!({"key": keys[0]})))
        .await;
    assert_eq!(a.json["sealed"], true, "{}", a.text);
    assert_eq!(a.json["progress"], 1);
    let a = http
        .call("PUT", "/v1/sys/unseal", None, Some(json!({"key": keys[2]})))
        .await;
    assert_eq!(a.json["sealed"], false, "{}", a.text);
    server.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_naming_the_rule() {
    let server = TestServer::dev_with(|c| {
        c.server_limits.max_request_bytes = 600 * 1024;
    })
    .await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let big = vec![b' '; 700 * 1024];
    let a = http
        .send(
            "PUT",
            "/v1/sys/unseal",
            &[("content-type", "application/json")],
            Some(big),
        )
        .await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert!(a.error().contains("limits.max_request_bytes"), "{}", a.text);
    // Malformed JSON: 400 naming it.
    let a = http
        .send("PUT", "/v1/sys/unseal", &[], Some(b"{\"key\":".to_vec()))
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("not valid JSON"), "{}", a.text);
    server.stop().await;
}

/// An outsider looping over the HTTPS listener, a new connection each time
/// (a new source port), grows the audit log by a bounded amount, and the
/// counted repeats add up to the calls made.
#[tokio::test]
async fn unauthenticated_http_loops_are_counted_not_written_one_by_one() {
    let server = TestServer::dev().await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let records = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let before = records(&server.audit_path).len();
    let bad = format!("kwt_{}", "B".repeat(49));
    let mut made = std::collections::HashMap::<&str, u64>::new();
    for i in 0..150u32 {
        match i % 3 {
            0 => {
                let a = http.get("/v1/secret/data/anything", Some(&bad)).await;
                assert_eq!(a.status, 403);
                *made.entry("keyward.v1.Secrets/Get").or_default() += 1;
            }
            1 => {
                let body = json!({"role_id": format!("kwr_{}", "C".repeat(20)), "secret_id": "x"});
                let a = http
                    .call("POST", "/v1/auth/approle/login", None, Some(body))
                    .await;
                assert!(a.status == 403 || a.status == 429, "{}", a.text);
                *made.entry("keyward.v1.Auth/Login").or_default() += 1;
            }
            _ => {
                assert_eq!(http.get("/v1/sys/health", None).await.status, 200);
                *made.entry("keyward.v1.Sys/Status").or_default() += 1;
            }
        }
    }
    let written = records(&server.audit_path).len() - before;
    assert!(
        written < 100,
        "{written} records for 150 unauthenticated calls"
    );
    let dir = server.stop().await;
    let all = records(&dir.path().join("audit.log"));
    let mut counted = std::collections::HashMap::<&str, u64>::new();
    for r in &all[before..] {
        let method = r["method"].as_str().unwrap();
        if r["identity"].is_null() && made.contains_key(method) {
            *counted.entry(method).or_default() += r["count"].as_u64().unwrap_or(1);
        }
    }
    assert_eq!(counted, made);
}
