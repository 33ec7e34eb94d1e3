//! Health, reflection, metrics and plaintext refusal of the running server.

use crate::harness::{data, scrape_path, unique, TestServer};
use keyward::client::PutOptions;

#[tokio::test]
async fn health_follows_the_seal() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    assert!(root.health().await.unwrap());
    root.seal().await.unwrap();
    assert!(
        !root.health().await.unwrap(),
        "a sealed server is NOT_SERVING"
    );
    server
        .anonymous()
        .await
        .unseal(&server.unseal_share)
        .await
        .unwrap();
    assert!(root.health().await.unwrap());
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = TestServer::dev().await;
    let mut client = ServerReflectionClient::new(server.anonymous().await.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reply")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "keyward.v1.Sys",
        "keyward.v1.Secrets",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn metrics_count_requests_by_method_and_code() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("metered");
    root.put(&path, &data(&[("a", "1")]), PutOptions::default())
        .await
        .unwrap();
    root.get(&path).await.unwrap();
    let _ = root.get(&unique("missing")).await;
    let text = scrape_path(server.metrics_addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let line = |needle: &str| {
        text.lines()
            .any(|l| l.starts_with("keyward_requests_total") && l.contains(needle))
    };
    assert!(
        line(r#"method="keyward.v1.Secrets/Get""#) && line(r#"code="NOT_FOUND""#),
        "{text}"
    );
    assert!(text.contains("keyward_request_duration_seconds"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("keyward_sealed") && l.trim_end().ends_with(" 0")),
        "{text}"
    );
    assert!(text.contains("keyward_barrier_encryptions"), "{text}");
    assert!(scrape_path(server.metrics_addr, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn plaintext_clients_are_refused_by_a_tls_server() {
    let server = TestServer::dev().await;
    let options = keyward::client::ClientOptions {
        addr: format!("http://{}", server.addr),
        ..server.options(Some(&server.root_token))
    };
    match keyward::client::Client::connect(options).await {
        Err(_) => {}
        Ok(client) => assert!(
            client.status().await.is_err(),
            "a plaintext call to a TLS server must fail"
        ),
    }
}

/// The connections of a server on lanes (`listen_threads`, here the
/// harness's two): each goes to the lane with the fewest open, every call
/// is answered whichever lane serves it, and a lane's count falls as its
/// connections close.
#[tokio::test]
async fn connections_are_spread_over_the_lanes_and_counted_until_they_close() {
    use crate::harness::{eventually, series_value, LANES};
    assert_eq!(LANES, 2);
    let server = TestServer::dev().await;
    let lanes = || async {
        let text = scrape_path(server.metrics_addr, "/metrics").await;
        let open = |n: usize| {
            series_value(
                &text,
                &format!("keyward_listen_lane_connections{{lane=\"{n}\"}}"),
            )
            .unwrap_or(-1.0)
        };
        (open(0), open(1))
    };
    let path = unique("laned");
    let first = server.root().await;
    first
        .put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await
        .unwrap();
    let mut clients = vec![first];
    for _ in 0..5 {
        clients.push(server.root().await);
    }
    for (n, client) in clients.iter().enumerate() {
        let got = client.get(&path).await.unwrap();
        assert_eq!(got.field_str("k"), Some("v"), "connection {n}");
    }
    let (zero, one) = lanes().await;
    assert!(
        zero >= 3.0 && one >= 3.0 && (zero - one).abs() <= 1.0,
        "six connections over two lanes: {zero} and {one}"
    );
    drop(clients);
    eventually("every lane's connections are closed", || async {
        lanes().await == (0.0, 0.0)
    })
    .await;
    // A lane that served takes new connections afterwards.
    let again = server.root().await;
    assert!(again.get(&path).await.is_ok());
}
