//! Secrets stay secret: after a session of writes, reads and errors, the
//! values and the root token are nowhere in the sled folder, the audit log,
//! the server's log or the error messages.

use crate::harness::{contains, data, files_under, unique, ChildServer};
use keyward::client::PutOptions;

#[tokio::test]
async fn values_and_tokens_are_not_on_disk_or_in_logs() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let log = dir.path().join("server.log");
    let mut server = ChildServer::start(&vault, &log);
    let client = server.client().await;

    let values: Vec<String> = (0..5)
        .map(|i| format!("LEAKCHECK{i}{}", uuid::Uuid::new_v4().simple()))
        .collect();
    let mut errors = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let path = format!("{}/s{i}", unique("leak"));
        client
            .put(
                &path,
                &data(&[("password", value), ("note", "plain")]),
                PutOptions::default(),
            )
            .await
            .unwrap();
        client
            .put(&path, &data(&[("password", value)]), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(
            client.get(&path).await.unwrap().field_str("password"),
            Some(value.as_str())
        );
        // Refused writes that carry the value.
        errors.push(
            client
                .put(
                    &path,
                    &data(&[("password", value)]),
                    PutOptions {
                        cas: Some(99),
                        ..Default::default()
                    },
                )
                .await
                .unwrap_err()
                .to_string(),
        );
        errors.push(
            client
                .put(
                    &format!("{path}/../x"),
                    &data(&[("password", value)]),
                    PutOptions::default(),
                )
                .await
                .unwrap_err()
                .to_string(),
        );
        errors.push(
            client
                .put(&path, &data(&[("bad name", value)]), PutOptions::default())
                .await
                .unwrap_err()
                .to_string(),
        );
    }
    // A bad token is refused without being echoed.
    let wrong_token = keyward::token::format::TokenSecret::generate().unwrap();
    let wrong = client.with_token(wrong_token.expose()).unwrap();
    errors.push(wrong.get("anything").await.unwrap_err().to_string());
    client.seal().await.unwrap();
    server.signal("TERM");
    server.wait();

    let mut needles: Vec<(&str, Vec<u8>)> = values
        .iter()
        .map(|v| ("secret value", v.as_bytes().to_vec()))
        .collect();
    needles.push(("root token", server.token.as_bytes().to_vec()));
    needles.push(("wrong token", wrong_token.expose().as_bytes().to_vec()));

    let mut places = files_under(&vault.join("data"));
    assert!(!places.is_empty(), "the sled folder has files");
    places.push(vault.join("audit.log"));
    places.push(log.clone());
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("serving"),
        "the server log was captured: {log_text}"
    );
    for place in &places {
        let bytes = std::fs::read(place).unwrap();
        for (what, needle) in &needles {
            assert!(
                !contains(&bytes, needle),
                "{what} found in {}",
                place.display()
            );
        }
    }
    for message in &errors {
        for (what, needle) in &needles {
            assert!(
                !contains(message.as_bytes(), needle),
                "{what} found in error message {message}"
            );
        }
    }
}
