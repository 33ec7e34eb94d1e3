//! Attacks on anomaly detection from outside (task atkanom), over TLS
//! against a real server.

use crate::anomaly::{quick, warm_reader};
use crate::harness::{eventually, unique, TestServer};
use crate::http_client::HttpClient;
use keyward::anomaly::{Kind, Response};

/// Lockout by a forged source: a caller on the HTTPS API sends headers
/// naming another network (`X-Forwarded-For`, `X-Real-IP`, `Forwarded`).
/// Were any believed, `new_source` and `token_reuse` (set to
/// `disable-identity` here) would disable the identity. The source is the
/// TCP peer: nothing is raised for the named network, and the identity
/// keeps working.
#[tokio::test]
async fn forwarded_headers_on_the_http_api_cannot_forge_a_source() {
    let server = TestServer::dev_with(quick(|a| {
        for kind in [Kind::NewSource, Kind::TokenReuse] {
            a.set_response(kind, Response::DisableIdentity).unwrap();
        }
    }))
    .await;
    let root = server.root().await;
    let prefix = unique("atk");
    let (name, svc, token) = warm_reader(&server, &root, &prefix).await;
    let http = HttpClient::new(server.http_addr, &server.ca);
    let path = format!("/v1/secret/data/{prefix}/a");
    let queued_before = server.core.anomalies.queued();
    for _ in 0..5 {
        let a = http
            .send(
                "GET",
                &path,
                &[
                    ("x-vault-token", token.as_str()),
                    ("x-forwarded-for", "203.0.113.9"),
                    ("x-real-ip", "203.0.113.9"),
                    ("forwarded", "for=203.0.113.9"),
                ],
                None,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    // The calls did reach the detector (else the test could not fail).
    assert!(server.core.anomalies.queued() >= queued_before + 5);
    let core = server.core.clone();
    eventually("the detector took in every call", || {
        let core = core.clone();
        async move { core.anomalies.handled() >= core.anomalies.queued() }
    })
    .await;
    let events = server.core.anomalies.list(Some(&name), 0, 0);
    assert!(
        events
            .iter()
            .all(|e| e.kind != Kind::NewSource && e.kind != Kind::TokenReuse),
        "{events:?}"
    );
    assert!(
        events.iter().all(|e| !e.detail.contains("203.0.113")),
        "{events:?}"
    );
    assert!(!root.identity_get(&name).await.unwrap().disabled);
    svc.get(&format!("{prefix}/b")).await.unwrap();
}
