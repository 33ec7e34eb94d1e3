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

/// What [`a_wait_for_a_turn_ends_with_the_caller_checked_again`] does while
/// a call waits for its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meanwhile {
    /// Nothing: the answer is the plain one.
    Nothing,
    /// The waiting token is revoked.
    Revoked,
    /// The waiting token's parent is revoked (the waiting token is a
    /// child of a token of policy [`WAITER`], not of root's).
    ParentRevoked,
    /// The token's policy is rewritten to grant none of what the call asked.
    Narrowed,
    /// The token's policy is rewritten without its read of the secrets:
    /// the call is still allowed, and what it answers is filtered.
    ReadTaken,
}

/// The policy of the waiting tokens: list and read under [`HELD`]'s
/// folder, scan, and issue (a parent's children).
const WAITER: &str = "[[rule]]\npath = \"secret/held\"\ncapabilities = [\"list\"]\n\
                      [[rule]]\npath = \"secret/held/**\"\ncapabilities = [\"read\"]\n\
                      [[rule]]\npath = \"sys/scan\"\ncapabilities = [\"scan\"]\n\
                      [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n";
/// [`WAITER`] rewritten to grant nothing the calls below ask for.
const NARROWED: &str = "[[rule]]\npath = \"secret/other/**\"\ncapabilities = [\"read\"]\n";
/// [`WAITER`] without its read of the secrets.
const READ_TAKEN: &str = "[[rule]]\npath = \"secret/held\"\ncapabilities = [\"list\"]\n\
                          [[rule]]\npath = \"sys/scan\"\ncapabilities = [\"scan\"]\n";

/// Runs `ask` with a new token of policy `waiter` (`uses` 0: unlimited)
/// while the token's identity holds every turn of its own in `turns`, does
/// `meanwhile` once the call waits for one, then gives the turns back.
/// `Err` is the refusal's code.
async fn after_a_wait<T, F, Fut>(
    server: &OneLane,
    turns: &crate::core::offload::Offload,
    per_caller: usize,
    uses: u32,
    meanwhile: Meanwhile,
    ask: F,
) -> Result<T, tonic::Code>
where
    T: Send + 'static,
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>> + Send + 'static,
{
    let root = &server.clients.0;
    root.policy_put("waiter", WAITER).await.unwrap();
    let waiter = |uses| crate::client::IssueOptions {
        policies: vec!["waiter".into()],
        uses,
        ..Default::default()
    };
    let parent = root.issue_token(waiter(0)).await.unwrap();
    let issuer = if meanwhile == Meanwhile::ParentRevoked {
        root.with_token(&parent.token).unwrap()
    } else {
        root.clone()
    };
    let issued = issuer.issue_token(waiter(uses)).await.unwrap();
    let owner = root
        .lookup_accessor(&issued.accessor)
        .await
        .unwrap()
        .identity;
    let mut held = Vec::new();
    for _ in 0..per_caller {
        held.push(turns.turn(&owner).await.expect("a free turn"));
    }
    assert_eq!(turns.waiting(), 0);
    let asking = tokio::spawn(ask(root.with_token(&issued.token).unwrap()));
    // The call has been authorized once it waits for a turn.
    let waits = async {
        while turns.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(WAIT, waits)
        .await
        .expect("the call waits for a turn");
    match meanwhile {
        Meanwhile::Nothing => {}
        Meanwhile::Revoked => {
            root.revoke_accessor(&issued.accessor).await.unwrap();
        }
        Meanwhile::ParentRevoked => {
            root.revoke_accessor(&parent.accessor).await.unwrap();
        }
        Meanwhile::Narrowed => {
            root.policy_put("waiter", NARROWED).await.unwrap();
        }
        Meanwhile::ReadTaken => {
            root.policy_put("waiter", READ_TAKEN).await.unwrap();
        }
    }
    drop(held);
    let answer = tokio::time::timeout(WAIT, asking).await.unwrap().unwrap();
    answer.map_err(|e| match e {
        ClientError::Status(status) => status.code(),
        other => panic!("not a status: {other}"),
    })
}

/// `attempt` again (up to 3 times in all) while it is refused
/// `RESOURCE_EXHAUSTED`: on a machine so loaded that the revoke or the
/// policy write took the whole 10 s of the call's wait for a turn.
async fn again_if_out_of_time<T, F, Fut>(mut attempt: F) -> Result<T, tonic::Code>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Code>>,
{
    let mut left = 3;
    loop {
        let answer = attempt().await;
        left -= 1;
        if left == 0 || answer.as_ref().err() != Some(&tonic::Code::ResourceExhausted) {
            return answer;
        }
    }
}

/// A listing, a report or a scan match waits up to 10 s for its turn after
/// it was authorized. Once its turn comes its token and policies are
/// checked again: a token revoked meanwhile is refused `UNAUTHENTICATED`,
/// a policy narrowed meanwhile `PERMISSION_DENIED`, and a read taken away
/// meanwhile leaves the secret out of a listing and blinds a match. The
/// last use of a use-limited token, which revokes it, still gets its
/// answer, unless its parent was revoked meanwhile. Without the second
/// check every case but the plain ones gets the first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_a_turn_ends_with_the_caller_checked_again() {
    use crate::core::offload::{LISTINGS_PER_CALLER, MATCHES_PER_CALLER};
    use Meanwhile::*;
    let server = OneLane::start().await;
    let core = Arc::clone(&server.core);
    let listings = &core.offload.listings;
    let list = |client: Client| async move { client.list("held").await };
    for (uses, meanwhile, expected) in [
        (0, Nothing, Ok(vec![HELD.to_owned()])),
        (1, Nothing, Ok(vec![HELD.to_owned()])),
        (0, Revoked, Err(tonic::Code::Unauthenticated)),
        (2, Revoked, Err(tonic::Code::Unauthenticated)),
        (1, ParentRevoked, Err(tonic::Code::Unauthenticated)),
        (2, ParentRevoked, Err(tonic::Code::Unauthenticated)),
        (0, Narrowed, Err(tonic::Code::PermissionDenied)),
        (1, Narrowed, Err(tonic::Code::PermissionDenied)),
        (0, ReadTaken, Ok(Vec::new())),
    ] {
        let listed = again_if_out_of_time(|| {
            after_a_wait(
                &server,
                listings,
                LISTINGS_PER_CALLER,
                uses,
                meanwhile,
                list,
            )
        })
        .await;
        assert_eq!(listed, expected, "a listing, {meanwhile:?}, uses {uses}");
    }

    // A scan match of a value stored under the folder the token may read.
    let value = "kw-wait-7Gq2Lx9Vb4Tz8Np3Hc6Rm1";
    let stored = [("key".to_owned(), SecretBytes::from(value))]
        .into_iter()
        .collect();
    let root = &server.clients.0;
    root.put("held/b", &stored, PutOptions::default())
        .await
        .unwrap();
    let matches = &core.offload.matches;
    let scan = |client: Client| async move { client.scan_match(vec![value.to_owned()]).await };
    for (meanwhile, readable) in [
        (Nothing, Some(true)),
        (ReadTaken, Some(false)),
        (Revoked, None),
        (Narrowed, None),
    ] {
        let answer = again_if_out_of_time(|| {
            after_a_wait(&server, matches, MATCHES_PER_CALLER, 0, meanwhile, scan)
        })
        .await;
        match readable {
            Some(readable) => {
                let answer = answer.unwrap();
                assert_eq!(answer.matches.len(), 1, "{meanwhile:?}");
                let found = &answer.matches[0];
                assert_eq!(found.readable, readable, "{meanwhile:?}");
                let path = if readable { "held/b" } else { "" };
                assert_eq!(found.path, path, "{meanwhile:?}");
            }
            None => {
                let code = answer.unwrap_err();
                let expected = if meanwhile == Revoked {
                    tonic::Code::Unauthenticated
                } else {
                    tonic::Code::PermissionDenied
                };
                assert_eq!(code, expected, "a match, {meanwhile:?}");
            }
        }
    }
    server.stop().await;
}
