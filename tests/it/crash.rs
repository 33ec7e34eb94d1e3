//! Durability: every acknowledged write survives `kill -9` of the server,
//! and SIGTERM stops it gracefully.

use std::sync::Arc;

use crate::harness::{data, unique, ChildServer};
use keyward::client::PutOptions;

#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = ChildServer::start(&dir.path().join("vault"), &log);
    let client = server.client().await;
    let prefix = unique("durable");

    // Concurrent writers, so acknowledgements come from shared flushes.
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let client = client.clone();
        let acked = acked.clone();
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let path = format!("{prefix}/w{w}/s{i}");
                let value = format!("value-{w}-{i}");
                if client
                    .put(&path, &data(&[("v", &value)]), PutOptions::default())
                    .await
                    .is_ok()
                {
                    acked.lock().unwrap().push((path, value));
                }
            }
        }));
    }
    // Kill while writers are still going: some writes are in flight.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.signal("KILL");
    for t in tasks {
        t.await.unwrap();
    }
    let mut server = server;
    let status = server.wait();
    assert!(!status.success(), "the server was killed");
    let acked = acked.lock().unwrap().clone();
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );

    let restarted = ChildServer::start(&dir.path().join("vault"), &log);
    let client = restarted.client().await;
    for (path, value) in &acked {
        let got = client
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("acknowledged write {path} lost: {e}"));
        assert_eq!(got.field_str("v"), Some(value.as_str()));
    }
    eprintln!("{} acknowledged writes found after SIGKILL", acked.len());
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly_and_data_stays() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut server = ChildServer::start(&dir.path().join("vault"), &log);
    let client = server.client().await;
    let path = unique("kept");
    client
        .put(&path, &data(&[("v", "kept-value")]), PutOptions::default())
        .await
        .unwrap();
    server.signal("TERM");
    let status = server.wait();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    let restarted = ChildServer::start(&dir.path().join("vault"), &log);
    assert_eq!(
        restarted.token, server.token,
        "the same folder keeps the same credentials"
    );
    let got = restarted.client().await.get(&path).await.unwrap();
    assert_eq!(got.field_str("v"), Some("kept-value"));
}
