//! Durability: every acknowledged write survives `kill -9` of the server,
//! and SIGTERM stops it gracefully.

use std::sync::Arc;

use crate::harness::{data, eventually, unique, ChildServer};
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
    // Kill while writers are still going: once some writes are acknowledged
    // (the event, whatever the machine's speed), others are in flight.
    eventually("some writes are acknowledged", || {
        let n = acked.lock().unwrap().len();
        async move { n >= 20 }
    })
    .await;
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
    // A write cut off by the kill is there whole or not at all: every
    // secret the store lists reads back with the value written to it (a
    // Put's records go one at a time on sled, metadata after the data).
    let listed = client.list(&prefix).await.unwrap();
    assert!(listed.len() >= acked.len());
    for path in &listed {
        let got = client
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("listed secret {path} unreadable: {e}"));
        let (w, i) = path
            .rsplit_once("/w")
            .and_then(|(_, rest)| rest.split_once("/s"))
            .unwrap();
        assert_eq!(got.field_str("v"), Some(format!("value-{w}-{i}").as_str()));
    }
    eprintln!(
        "{} acknowledged writes found after SIGKILL, {} listed",
        acked.len(),
        listed.len()
    );
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

/// Logins under load, then `kill -9`: every login that was answered gives a
/// token that still works after the restart (a token's records are written
/// one by one, so this is what shows the order and the flush hold), and the
/// uses of a limited secret-id spent by answered logins are not handed back.
#[tokio::test]
async fn acknowledged_logins_survive_sigkill() {
    use crate::ident_kit::approle_identity;
    use keyward::client::{Client, ClientOptions};

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = ChildServer::start(&dir.path().join("vault"), &log);
    let root = server.client().await;
    let anonymous = |server: &ChildServer| {
        let options = ClientOptions {
            token: None,
            ..server.options()
        };
        async move { Client::connect(options).await.unwrap() }
    };
    let name = unique("crash-login");
    let (role_id, unlimited) = approle_identity(&root, &name, &[]).await;
    // More than the two workers spend before the kill: some spends are in flight.
    const USES: u32 = 200;
    let limited = root
        .identity_secret_id(&name, 0, USES, &[])
        .await
        .unwrap()
        .secret_id
        .clone();

    let anon = anonymous(&server).await;
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let spent = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let anon = anon.clone();
        let tokens = tokens.clone();
        let spent = spent.clone();
        let role_id = role_id.clone();
        let secret_id = if w < 2 {
            limited.clone()
        } else {
            unlimited.clone()
        };
        tasks.push(tokio::spawn(async move {
            // Until the server is gone (a bound, not a timing assertion).
            for _ in 0..10_000 {
                match anon.login_approle(&role_id, &secret_id, 600).await {
                    Ok(t) if w < 2 => {
                        spent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokens.lock().unwrap().push((t.token, t.accessor));
                    }
                    Ok(t) => tokens.lock().unwrap().push((t.token, t.accessor)),
                    // The limited secret-id used up, or the server gone. (A
                    // worker stops at its first failure, so the role-id is
                    // never throttled.)
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill once logins are being answered (the event, not a fixed sleep).
    eventually("some logins are answered", || {
        let n = tokens.lock().unwrap().len();
        async move { n >= 20 }
    })
    .await;
    server.signal("KILL");
    for t in tasks {
        t.await.unwrap();
    }
    let mut server = server;
    assert!(!server.wait().success(), "the server was killed");
    let tokens = tokens.lock().unwrap().clone();
    assert!(!tokens.is_empty(), "no login was answered before the kill");

    let restarted = ChildServer::start(&dir.path().join("vault"), &log);
    let anon = anonymous(&restarted).await;
    for (token, accessor) in &tokens {
        let info = anon
            .with_token(token)
            .unwrap()
            .lookup_self()
            .await
            .unwrap_or_else(|e| panic!("the token of an answered login ({accessor}) is lost: {e}"));
        assert_eq!(&info.accessor, accessor);
    }
    // A crash must not hand back a spent use of the limited secret-id.
    let spent = spent.load(std::sync::atomic::Ordering::SeqCst);
    let mut more = 0;
    for _ in 0..USES {
        if anon.login_approle(&role_id, &limited, 60).await.is_err() {
            break;
        }
        more += 1;
    }
    assert!(
        spent + more <= USES,
        "{spent} answered before the kill and {more} after: more than {USES} uses"
    );
    eprintln!(
        "{} answered logins found after SIGKILL; limited secret-id: {spent} + {more} of {USES} uses",
        tokens.len()
    );
}
