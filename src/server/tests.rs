//! A server on lanes, in process: what the lanes' thread must not be held by.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use crate::client::{Client, ClientError, ClientOptions, PutOptions};
use crate::clock::Clock;
use crate::core::Core;
use crate::secrecy::{SecretBytes, SecretData};

/// Bounds of the waits below. Generous: they pass on a loaded machine, and
/// only a call held up for their whole length fails.
const WAIT: Duration = Duration::from_secs(60);

/// What [`OneLane::start`] writes at [`HELD`].
const HELD: &str = "held/a";

/// A dev server on one lane, with two root clients (two connections of
/// that lane) and [`data`] written at [`HELD`].
struct OneLane {
    core: Arc<Core>,
    audit: std::path::PathBuf,
    clients: (Client, Client),
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), crate::server::ServerError>>,
    _dir: tempfile::TempDir,
}

impl OneLane {
    async fn start() -> Self {
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
        let clients = (
            Client::connect(options.clone()).await.unwrap(),
            Client::connect(options).await.unwrap(),
        );
        clients
            .1
            .put(HELD, &data(), PutOptions::default())
            .await
            .unwrap();
        Self {
            core,
            audit: dir.path().join("audit.log"),
            clients,
            stop,
            served,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.unwrap().unwrap();
    }
}

/// Waits, off the runtime, for `signal`, at most [`WAIT`].
async fn signalled(signal: std::sync::mpsc::Receiver<()>, what: &'static str) {
    tokio::task::spawn_blocking(move || signal.recv_timeout(WAIT))
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("{what}"));
}

/// Reads [`HELD`] on `other` while a call of the same lane is held, then
/// lets that call go with `release`.
async fn read_meanwhile(other: &Client, release: std::sync::mpsc::Sender<()>, what: &'static str) {
    let answered = tokio::time::timeout(WAIT, other.get(HELD)).await;
    let _ = release.send(());
    let read = answered.unwrap_or_else(|_| panic!("{what}"));
    assert_eq!(read.unwrap().data, data());
}

fn data() -> SecretData {
    [("k".to_owned(), SecretBytes::from("v"))]
        .into_iter()
        .collect()
}

/// A listing runs its scan on the blocking pool (`core::offload`), not on
/// its lane. The scan is held inside `SecretStore::list` until the end, and
/// meanwhile a call on another connection of the same (only) lane is
/// answered. With the scan on the lane's thread that call waits for the
/// whole hold and the test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_takes_long_holds_up_no_other_call_of_its_lane() {
    let server = OneLane::start().await;
    let (lister, other) = (server.clients.0.clone(), server.clients.1.clone());
    let (entered, in_scan) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    server.core.secrets.during_list.set(move || {
        let _ = entered.send(());
        let _ = released.recv_timeout(WAIT * 2);
    });
    let listing = tokio::spawn(async move { lister.list("held").await });
    signalled(in_scan, "the listing reached its scan").await;
    let waited = "a call on the listing's lane waited for its scan";
    read_meanwhile(&other, release, waited).await;
    let listed = tokio::time::timeout(WAIT, listing).await.unwrap();
    assert_eq!(listed.unwrap().unwrap(), vec![HELD.to_owned()]);
    server.stop().await;
}

/// `Pki/Crl`, which any token may call, waits on the lock a CRL is built
/// under on a blocking thread, not on its lane. The test holds that lock
/// (as a revoke rebuilding the CRL of a large inventory would) and a Get on
/// another connection of the same lane is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_waiting_for_a_rebuild_holds_up_no_other_call_of_its_lane() {
    let server = OneLane::start().await;
    let (asker, other) = (server.clients.0.clone(), server.clients.1.clone());
    let (held, lock_held) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let core = Arc::clone(&server.core);
    let holder = tokio::task::spawn_blocking(move || {
        let _rebuilding = core.pki.crl_lock();
        let _ = held.send(());
        let _ = released.recv_timeout(WAIT * 2);
    });
    signalled(lock_held, "the lock was taken").await;
    // The CRL call is at the lock once this hook has run: whatever thread
    // runs it goes straight on to wait there.
    let (entered, at_lock) = std::sync::mpsc::channel::<()>();
    server.core.pki.before_crl.set(move || {
        let _ = entered.send(());
    });
    let asking = tokio::spawn(async move { asker.pki_crl().await });
    signalled(at_lock, "the CRL call reached the lock").await;
    let waited = "a call on the CRL's lane waited for the rebuild";
    read_meanwhile(&other, release, waited).await;
    holder.await.unwrap();
    // No CA was made, so the CRL itself is refused once the lock is free;
    // what matters is that it ends.
    let asked = tokio::time::timeout(WAIT, asking).await.unwrap().unwrap();
    assert!(asked.is_err());
    server.stop().await;
}

/// Listings that hold every listing turn of the node delay no report: the
/// report has turns of its own. A caller's listing waits for its own turns
/// even while the node has others free, and one that finds none in time is
/// refused with `RESOURCE_EXHAUSTED`, audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_is_answered_while_listings_hold_every_listing_turn() {
    use crate::core::offload::{LISTINGS_AT_ONCE, LISTINGS_PER_CALLER};
    let server = OneLane::start().await;
    let client = server.clients.0.clone();
    let listings = &server.core.offload.listings;
    let mut others = Vec::new();
    for caller in ["a", "b", "c"] {
        for _ in 0..LISTINGS_PER_CALLER {
            others.push(listings.turn(caller).await.expect("a free turn"));
        }
    }
    // The root token's own turns (its identity is `root`).
    let mut roots = Vec::new();
    for _ in 0..LISTINGS_PER_CALLER {
        roots.push(listings.turn("root").await.expect("a free turn"));
    }
    assert_eq!(others.len() + roots.len(), LISTINGS_AT_ONCE);

    let report = tokio::time::timeout(WAIT, client.governance_report(0, 0))
        .await
        .expect("the report waited for the listings' turns");
    assert!(report.is_ok(), "{:?}", report.err());

    // The node has free listing turns again, but root's own are taken:
    // root's listing waits its LISTING_WAIT, then is refused.
    drop(others);
    let refused = client.list("anything").await.unwrap_err();
    match &refused {
        ClientError::Status(status) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
            assert!(status.message().contains("too many listings"), "{status}");
        }
        other => panic!("not a status: {other}"),
    }
    drop(roots);
    assert!(client.list("anything").await.unwrap().is_empty());

    let audit = std::fs::read_to_string(&server.audit).unwrap();
    let refusals: Vec<&str> = audit
        .lines()
        .filter(|l| {
            l.contains("\"method\":\"keyward.v1.Secrets/List\"")
                && l.contains("\"code\":\"RESOURCE_EXHAUSTED\"")
        })
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    server.stop().await;
}
