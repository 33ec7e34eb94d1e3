//! Read leases on etcd (`storage::members`, `etcd_members`): a node that
//! holds one answers from its caches with no fence read, and every write
//! waits until the other nodes holding one have acknowledged it.
//!
//! In process (three nodes on one real 3-member etcd cluster): nodes join,
//! one whose watch lags gives its lease up so writers go on and it reads
//! etcd meanwhile, comes back once it has caught up, and a node that shuts
//! down leaves the roll.
//!
//! Cut off: node 2 reaches etcd through a loopback relay that the test can
//! stop. While it is stopped, node 1's revoke and write are answered once
//! node 2's lease has run out in etcd, and a request that node 2 receives
//! then is not answered from its caches (its own count of the lease ran out
//! first): it waits for etcd and sees both changes once the relay runs.
//!
//! As child processes: a node frozen (SIGSTOP) while holding its lease. The
//! other node's revoke and write complete once the frozen node's lease has
//! run out in etcd, and when the frozen node runs again (SIGCONT) its very
//! first requests see both.
//!
//! Every wait is for an event, with a generous bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use tonic::Code;

use crate::etcd_kit::EtcdCluster;
use crate::etcd_nodes::{issue, node, node_with};
use crate::ha_kit::{cluster, init_and_unseal, wait_for, Node};
use crate::harness::{data, eventually, private_tempdir, series_value, unique, TestServer};
use keyward::client::{Client, ClientError, PutOptions};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.unwrap_err().code().unwrap_or(Code::Unknown)
}

fn leased(server: &TestServer) -> bool {
    server
        .core
        .barrier
        .coherence()
        .expect("etcd has a change feed")
        .leased()
}

async fn until_leased(server: &TestServer, what: &str) {
    eventually(what, || {
        let held = leased(server);
        async move { held }
    })
    .await;
}

async fn password(client: &keyward::client::Client, path: &str) -> String {
    client
        .get(path)
        .await
        .unwrap()
        .field_str("password")
        .unwrap()
        .to_owned()
}

/// Initializes the vault on `one`, unseals both nodes and waits until each
/// holds a read lease: the init answer and each node's root client.
async fn unsealed_and_leased(
    one: &TestServer,
    two: &TestServer,
) -> (keyward::proto::v1::InitResponse, Client, Client) {
    let anon1 = one.anonymous().await;
    let init = anon1.init(1, 1).await.unwrap();
    anon1.unseal(&init.shares[0]).await.unwrap();
    two.anonymous().await.unseal(&init.shares[0]).await.unwrap();
    let root1 = anon1.with_token(&init.root_token).unwrap();
    let root2 = two.anonymous().await.with_token(&init.root_token).unwrap();
    until_leased(one, "node 1 holds a read lease").await;
    until_leased(two, "node 2 holds a read lease").await;
    (init, root1, root2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_leases_join_give_way_to_a_lagging_watch_and_leave() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let certs_dir = private_tempdir();
    let certs = keyward::pki::ensure_dev_certs(&certs_dir.path().join("certs")).unwrap();
    let prefix = format!("{}/", unique("kwl"));
    let one = node(&etcd, &prefix, &certs, "kw1").await;
    let two = node(&etcd, &prefix, &certs, "kw2").await;
    let (init, root1, root2) = unsealed_and_leased(&one, &two).await;
    let roll = |s: &TestServer| s.core.barrier.coherence().unwrap().roll_len();
    assert_eq!(roll(&one), 2);

    // Node 2 caches the secret and a token; node 1 changes both, and node
    // 2 answers with the change at once, still under its lease.
    let path = format!("{}/db", unique("app"));
    let policy = unique("p");
    root1
        .policy_put(
            &policy,
            "[[rule]]\npath = \"secret/**\"\ncapabilities = [\"read\"]\n",
        )
        .await
        .unwrap();
    root1
        .put(&path, &data(&[("password", "v1")]), PutOptions::default())
        .await
        .unwrap();
    let token = issue(&root1, &policy).await;
    let user2 = two.anonymous().await.with_token(&token).unwrap();
    for _ in 0..3 {
        assert_eq!(password(&user2, &path).await, "v1");
    }
    root1
        .put(&path, &data(&[("password", "v2")]), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(password(&user2, &path).await, "v2");
    root1.revoke_token(&token).await.unwrap();
    assert_eq!(code(user2.get(&path).await), Code::Unauthenticated);

    // A tracked write that changes no key (the delete of a token record
    // that is not there) moves only the change marker: the other node
    // acknowledges it all the same, and the write is answered.
    let barrier = one.core.barrier.clone();
    let deleted = tokio::task::spawn_blocking(move || barrier.delete("tokens/accessor/kwa_absent"))
        .await
        .unwrap();
    assert!(deleted.is_ok(), "{deleted:?}");

    // Node 2's watch lags (its deliveries held back). Node 1's write is
    // acknowledged once node 2 has given its lease up, and node 2 then
    // reads etcd: it answers with the write all the same.
    let coherence2 = two.core.barrier.coherence().unwrap();
    let hold = coherence2.hold();
    root1
        .put(&path, &data(&[("password", "v3")]), PutOptions::default())
        .await
        .unwrap();
    assert!(!leased(&two), "a node whose watch lags holds no lease");
    assert_eq!(password(&root2, &path).await, "v3");
    drop(hold);
    until_leased(&two, "node 2 holds a read lease again").await;
    root1
        .put(&path, &data(&[("password", "v4")]), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(password(&root2, &path).await, "v4");

    // A third node joins, serves under its own lease, and sees node 1's
    // writes; when it shuts down it leaves the roll.
    let three = node(&etcd, &prefix, &certs, "kw3").await;
    let anon3 = three.anonymous().await;
    anon3.unseal(&init.shares[0]).await.unwrap();
    let root3 = anon3.with_token(&init.root_token).unwrap();
    until_leased(&three, "node 3 holds a read lease").await;
    eventually("node 1 sees three nodes on the roll", || {
        let n = roll(&one);
        async move { n == 3 }
    })
    .await;
    assert_eq!(password(&root3, &path).await, "v4");
    root1
        .put(&path, &data(&[("password", "v5")]), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(password(&root3, &path).await, "v5");
    assert_eq!(password(&root2, &path).await, "v5");
    drop(root3);
    drop(anon3);
    three.stop().await;
    eventually("node 1 sees two nodes on the roll", || {
        let n = roll(&one);
        async move { n == 2 }
    })
    .await;
    root1
        .put(&path, &data(&[("password", "v6")]), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(password(&root2, &path).await, "v6");
}

/// A loopback relay in front of each etcd member. While it is stopped no
/// byte passes either way (at most one read chunk per direction is held
/// until it runs again), so a node behind it is cut off from etcd without
/// any connection breaking.
struct Relay {
    endpoints: Vec<String>,
    stopped: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(upstream: &[String]) -> Self {
        let (stopped, running) = watch::channel(false);
        let mut endpoints = Vec::new();
        let mut tasks = Vec::new();
        for url in upstream {
            let target = url.trim_start_matches("http://").to_owned();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            endpoints.push(format!("http://{}", listener.local_addr().unwrap()));
            let running = running.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        continue;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::spawn(pipe(ri, wo, running.clone()));
                    tokio::spawn(pipe(ro, wi, running.clone()));
                }
            }));
        }
        Self {
            endpoints,
            stopped,
            tasks,
        }
    }

    fn stop(&self) {
        self.stopped.send_replace(true);
    }

    fn run(&self) {
        self.stopped.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stopped: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stopped.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_etcd_stops_answering_from_its_caches_before_writers_go_on() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let relay = Relay::start(&etcd.endpoints()).await;
    let certs_dir = private_tempdir();
    let certs = keyward::pki::ensure_dev_certs(&certs_dir.path().join("certs")).unwrap();
    let prefix = format!("{}/", unique("kwl"));
    let one = node(&etcd, &prefix, &certs, "kw1").await;
    let endpoints = relay.endpoints.clone();
    let two = node_with(&etcd, &prefix, &certs, "kw2", move |o| {
        o.endpoints = endpoints
    })
    .await;
    let (init, root1, root2) = unsealed_and_leased(&one, &two).await;
    let policy = unique("p");
    root1
        .policy_put(
            &policy,
            "[[rule]]\npath = \"secret/**\"\ncapabilities = [\"read\"]\n",
        )
        .await
        .unwrap();
    let path = format!("{}/db", unique("app"));
    root1
        .put(&path, &data(&[("password", "v1")]), PutOptions::default())
        .await
        .unwrap();
    let token = issue(&root1, &policy).await;
    let user2 = Arc::new(two.anonymous().await.with_token(&token).unwrap());
    for _ in 0..3 {
        assert_eq!(password(&user2, &path).await, "v1");
        assert_eq!(password(&root2, &path).await, "v1");
    }

    relay.stop();
    let started = Instant::now();
    root1.revoke_token(&token).await.unwrap();
    root1
        .put(&path, &data(&[("password", "v2")]), PutOptions::default())
        .await
        .unwrap();
    println!(
        "node 1's revoke and write were answered {:.2} s after node 2 was cut off",
        started.elapsed().as_secs_f64()
    );
    // Requests node 2 receives now: not from its caches. They wait for etcd
    // (or fail for want of it); once the relay runs they see both changes.
    let (u, p) = (user2.clone(), path.clone());
    let revoked = tokio::spawn(async move { u.get(&p).await.map(|s| s.version) });
    let r = two.anonymous().await.with_token(&init.root_token).unwrap();
    let p = path.clone();
    let read = tokio::spawn(async move { r.get(&p).await.map(|s| s.version) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.run();
    let revoked = revoked.await.unwrap();
    assert!(
        matches!(&revoked, Err(e) if matches!(e.code(), Some(Code::Unauthenticated | Code::Unavailable))),
        "a token revoked on node 1 was accepted by node 2: {revoked:?}"
    );
    let read = read.await.unwrap();
    assert!(
        matches!(&read, Ok(2)) || matches!(&read, Err(e) if e.code() == Some(Code::Unavailable)),
        "node 2 answered with the replaced version: {read:?}"
    );
    // Once it can reach etcd again: the changes, and a new lease.
    assert_eq!(code(user2.get(&path).await), Code::Unauthenticated);
    assert_eq!(password(&root2, &path).await, "v2");
    until_leased(&two, "node 2 holds a read lease again").await;
    assert_eq!(password(&root2, &path).await, "v2");
}

/// The value of one series on `node`'s `/metrics` (0 when absent).
async fn series(node: &Node, name: &str) -> f64 {
    series_value(&node.scrape().await, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_frozen_past_its_read_lease_answers_with_what_changed_meanwhile() {
    let (etcd, _certs_dir, certs, prefix) = cluster();
    let kw1 = Node::start(&etcd, &prefix, &certs, "kw1", &[]);
    let kw2 = Node::start(&etcd, &prefix, &certs, "kw2", &[]);
    let root_token = init_and_unseal(&[&kw1, &kw2]).await;
    let one = kw1.client(Some(&root_token)).await;
    let two = kw2.client(Some(&root_token)).await;
    let policy = unique("p");
    one.policy_put(
        &policy,
        "[[rule]]\npath = \"secret/**\"\ncapabilities = [\"read\"]\n",
    )
    .await
    .unwrap();
    let path = format!("{}/db", unique("app"));
    one.put(&path, &data(&[("password", "v1")]), PutOptions::default())
        .await
        .unwrap();
    let token = issue(&one, &policy).await;
    let user2 = kw2.client(Some(&token)).await;
    for node in [&kw1, &kw2] {
        wait_for("both nodes hold a read lease", || async move {
            (series(node, "keyward_etcd_read_lease").await == 1.0
                && series(node, "keyward_etcd_read_lease_nodes").await == 2.0)
                .then_some(())
        })
        .await;
    }
    // kw2 has the token, the policy and the secret in its caches.
    for _ in 0..3 {
        assert_eq!(password(&user2, &path).await, "v1");
    }

    kw2.signal("STOP");
    wait_for("kw2 is stopped", || {
        let stopped = kw2.is_stopped();
        async move { stopped.then_some(()) }
    })
    .await;
    // kw1's revoke and write wait for kw2's lease to run out in etcd.
    let started = Instant::now();
    one.revoke_token(&token).await.unwrap();
    one.put(&path, &data(&[("password", "v2")]), PutOptions::default())
        .await
        .unwrap();
    println!(
        "kw1's revoke and write were answered {:.2} s after kw2 froze",
        started.elapsed().as_secs_f64()
    );
    kw2.signal("CONT");
    // kw2's very first requests: its own count of the lease has run out,
    // so they take the fence read, and they see both changes.
    assert_eq!(code(user2.get(&path).await), Code::Unauthenticated);
    assert_eq!(password(&two, &path).await, "v2");
    // It takes a new lease once it has caught up.
    wait_for("kw2 gave its lease up and holds a new one", || async {
        (series(&kw2, "keyward_etcd_read_lease_given_up_total").await >= 1.0
            && series(&kw2, "keyward_etcd_read_lease").await == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(password(&two, &path).await, "v2");
    drop(etcd);
}
