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
    // Unknown fields are refused, naming the field.
    let a = http
        .call(
            "PUT",
            "/v1/sys/unseal",
            None,
            Some(json!({"key": "x", "shard": 1})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.error().contains("shard"), "{}", a.text);
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
