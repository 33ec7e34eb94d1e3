//! A server on lanes, in process: what the lanes' thread must not be held by.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use crate::client::{Client, ClientOptions, PutOptions};
use crate::clock::Clock;
use crate::secrecy::{SecretBytes, SecretData};

/// Bounds of the waits below. Generous: they pass on a loaded machine, and
/// only a call held up for their whole length fails.
const WAIT: Duration = Duration::from_secs(60);

/// A listing runs its scan on the blocking pool (`core::offload`), not on
/// its lane. The scan is held inside `SecretStore::list` until the end, and
/// meanwhile a call on another connection of the same (only) lane is
/// answered. With the scan on the lane's thread that call waits for the
/// whole hold and the test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_takes_long_holds_up_no_other_call_of_its_lane() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let vault = crate::dev::open_with(dir.path(), None, Clock::system(), |config| {
        config.listen_threads = 1;
    })
    .await
    .unwrap();
    let core = vault.server.core().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(vault.server.serve(listener, None, async move {
        let _ = stopped.await;
    }));
    let options = ClientOptions {
        addr: format!("https://{addr}"),
        token: Some(vault.credentials.root_token.clone()),
        ca_cert: Some(vault.certs.ca.clone()),
        ..ClientOptions::default()
    };
    let lister = Client::connect(options.clone()).await.unwrap();
    let other = Client::connect(options).await.unwrap();
    let data: SecretData = [("k".to_owned(), SecretBytes::from("v"))]
        .into_iter()
        .collect();
    other
        .put("held/a", &data, PutOptions::default())
        .await
        .unwrap();

    let (entered, in_scan) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    core.secrets.during_list.set(move || {
        let _ = entered.send(());
        let _ = released.recv_timeout(WAIT * 2);
    });
    let listing = tokio::spawn(async move { lister.list("held").await });
    tokio::task::spawn_blocking(move || in_scan.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the listing reached its scan");

    let answered = tokio::time::timeout(WAIT, other.get("held/a")).await;
    let _ = release.send(());
    let read = answered.expect("a call on the listing's lane waited for its scan");
    assert_eq!(read.unwrap().data, data);
    let listed = tokio::time::timeout(WAIT, listing).await.unwrap();
    assert_eq!(listed.unwrap().unwrap(), vec!["held/a".to_owned()]);

    let _ = stop.send(());
    served.await.unwrap().unwrap();
}
