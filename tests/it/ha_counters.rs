//! Cluster-wide counters on a real 3-member etcd cluster (`etcd_kit`): the
//! barrier's encryption count per key term (ranges taken by
//! compare-and-swap), key terms added by another node, use counts of tokens
//! and secret-ids, and login throttle counts shared in bounded batches.
//!
//! "Nodes" are in-process: keyward servers over TLS (`TestServer`), or, for
//! the barrier and the throttle's bounds, barriers and login checkers each
//! with its own etcd connection. Every wait is for an event, with a
//! generous bound.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::Code;

use crate::etcd_kit::EtcdCluster;
use crate::harness::{data, eventually, private_tempdir, scrape, series_value, unique, TestServer};
use crate::ident_kit::create;
use keyward::barrier::{Barrier, BarrierOptions};
use keyward::client::{ClientError, IssueOptions, PutOptions};
use keyward::config::{ServerConfig, StorageBackend, TlsConfig};
use keyward::storage::{Backend, EtcdBackend, EtcdOptions};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.unwrap_err().code().unwrap_or(Code::Unknown)
}

fn backend(etcd: &EtcdCluster, prefix: &str) -> Arc<EtcdBackend> {
    Arc::new(EtcdBackend::open(&EtcdOptions::plaintext(etcd.endpoints(), prefix)).unwrap())
}

/// `n` barriers on one vault, each with its own etcd connection: the first
/// one initialized, every one unsealed with the share.
fn barrier_nodes(
    etcd: &EtcdCluster,
    prefix: &str,
    n: usize,
    options: BarrierOptions,
) -> Vec<Barrier> {
    let nodes: Vec<Barrier> = (0..n)
        .map(|_| Barrier::new(backend(etcd, prefix), options.clone()).unwrap())
        .collect();
    let shares = nodes[0].init(1, 1).unwrap();
    let share: String = (*shares[0].0).clone();
    nodes[0].seal();
    for node in &nodes {
        node.unseal(&share).unwrap();
    }
    nodes
}

fn term_of(envelope: &[u8]) -> u32 {
    u32::from_be_bytes(envelope[..4].try_into().unwrap())
}

/// Every envelope under `prefix`, counted by key term.
fn envelopes_per_term(raw: &EtcdBackend, prefix: &str) -> BTreeMap<u32, u64> {
    let mut per_term = BTreeMap::new();
    for (_, envelope) in raw.scan_prefix(prefix.as_bytes()).unwrap() {
        *per_term.entry(term_of(&envelope)).or_insert(0) += 1;
    }
    per_term
}

/// Three nodes encrypt at once, in turns and then freely, across several
/// automatic key terms: no term has more encryptions than its limit, and the
/// ranges of the count the nodes took never overlap.
#[test]
fn three_nodes_share_each_terms_encryption_count() {
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kw-ranges"));
    const LIMIT: u64 = 200;
    let options = BarrierOptions {
        max_encryptions_per_term: LIMIT,
        reservation_block: 16,
    };
    let nodes = barrier_nodes(&etcd, &prefix, 3, options);

    // In turns: 20 writes each, so every node takes ranges of the same terms.
    for round in 0..5 {
        for (n, node) in nodes.iter().enumerate() {
            for i in 0..20 {
                let key = format!("turns/{n}/{round}/{i}");
                node.put(&key, key.as_bytes()).unwrap();
            }
        }
    }
    // Then all at once: two threads per node.
    std::thread::scope(|scope| {
        for (n, node) in nodes.iter().enumerate() {
            for t in 0..2 {
                scope.spawn(move || {
                    for i in 0..150 {
                        let key = format!("free/{n}/{t}/{i}");
                        node.put(&key, key.as_bytes()).unwrap();
                    }
                });
            }
        }
    });
    let written = 3 * 100 + 3 * 2 * 150;

    // Every value reads back on every node (terms made elsewhere are loaded).
    for node in &nodes {
        for (key, value) in node.scan_prefix("turns/").unwrap() {
            assert_eq!(value.as_slice(), key.as_bytes());
        }
        let free = node.scan_prefix("free/").unwrap();
        assert_eq!(free.len(), 900);
        for (key, value) in free {
            assert_eq!(value.as_slice(), key.as_bytes());
        }
    }

    // No term holds more than LIMIT envelopes in etcd.
    let raw = backend(&etcd, &prefix);
    let mut per_term = envelopes_per_term(&raw, "turns/");
    for (term, n) in envelopes_per_term(&raw, "free/") {
        *per_term.entry(term).or_insert(0) += n;
    }
    assert_eq!(per_term.values().sum::<u64>(), written);
    assert!(per_term.len() >= 6, "{per_term:?}");
    assert!(per_term.values().all(|&n| n <= LIMIT), "{per_term:?}");

    // The ranges the nodes took: disjoint, within the limit, covering what
    // was written; and some terms shared by several nodes.
    let mut ranges: BTreeMap<u32, Vec<(u64, u64, usize)>> = BTreeMap::new();
    for (n, node) in nodes.iter().enumerate() {
        for (term, start, end) in node.taken_ranges() {
            assert!(start < end && end <= LIMIT, "{term}: {start}..{end}");
            ranges.entry(term).or_default().push((start, end, n));
        }
    }
    let mut shared_terms = 0;
    for (term, list) in &mut ranges {
        list.sort();
        for pair in list.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "term {term}: {pair:?} overlap");
        }
        let covered: u64 = list.iter().map(|(s, e, _)| e - s).sum();
        assert!(
            covered >= per_term.get(term).copied().unwrap_or(0),
            "term {term}: {covered} reserved, {:?} written",
            per_term.get(term)
        );
        let mut owners: Vec<usize> = list.iter().map(|r| r.2).collect();
        owners.dedup();
        owners.sort();
        owners.dedup();
        if owners.len() > 1 {
            shared_terms += 1;
        }
    }
    assert!(shared_terms >= 1, "{ranges:?}");
    assert!(
        per_term.keys().all(|term| ranges.contains_key(term)),
        "a term was written without a range: {per_term:?} {ranges:?}"
    );
}

/// A term added on one node is loaded by the others while unsealed: a value
/// sealed under it reads on every node at once, and their next encryption
/// uses it. A keyring rolled back under a node is refused, not written over.
#[test]
fn a_term_added_on_one_node_is_loaded_by_the_others() {
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kw-terms"));
    let options = BarrierOptions {
        reservation_block: 4,
        ..BarrierOptions::default()
    };
    let nodes = barrier_nodes(&etcd, &prefix, 3, options);
    let raw = backend(&etcd, &prefix);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    for node in &nodes {
        node.put(&unique("before"), b"v").unwrap();
    }

    assert_eq!(a.rotate_key().unwrap(), 2);
    a.put("under-2", b"sealed under term 2").unwrap();
    assert_eq!(term_of(&raw.get(b"under-2").unwrap().unwrap()), 2);
    // B reads it at once: the unknown term makes it read the keyring.
    assert_eq!(b.status().key_term, 1);
    assert_eq!(
        b.get("under-2").unwrap().unwrap().as_slice(),
        b"sealed under term 2"
    );
    assert_eq!(b.status().key_term, 2);
    // C never read it: its next range meets the new keyring and loads it.
    for i in 0..5 {
        c.put(&format!("c/{i}"), b"v").unwrap();
    }
    assert_eq!(term_of(&raw.get(b"c/4").unwrap().unwrap()), 2);
    assert_eq!(c.status().key_term, 2);

    // C rotates; A, still inside a range of term 2, moves on at its next range.
    assert_eq!(c.rotate_key().unwrap(), 3);
    for i in 0..8 {
        a.put(&format!("a/{i}"), b"v").unwrap();
    }
    assert_eq!(term_of(&raw.get(b"a/7").unwrap().unwrap()), 3);
    for node in &nodes {
        for key in ["under-2", "c/4", "a/7"] {
            assert!(node.get(key).unwrap().is_some(), "{key}");
        }
    }

    // A rollback of sys/keyring (an old copy written back under the nodes,
    // lowering a reservation) is refused when met, never written over.
    let old = raw.get(b"sys/keyring").unwrap().unwrap();
    for i in 0..8 {
        b.put(&format!("b/{i}"), b"v").unwrap();
    }
    raw.put(b"sys/keyring", &old).unwrap();
    let refused = (0..8)
        .map(|i| b.put(&format!("b2/{i}"), b"v"))
        .find_map(Result::err)
        .expect("a node must refuse a rolled-back keyring");
    assert!(refused.to_string().contains("refusing"), "{refused}");
    assert_eq!(raw.get(b"sys/keyring").unwrap().unwrap(), old);
}

/// A term added on one node is used by another node's next encryption as
/// soon as that node's watch has delivered the keyring write, although the
/// other node still holds an unfinished range of the old term (65,536
/// encryptions by default; before 0.6.1 it sealed under the old term until
/// that range ran out).
#[test]
fn a_term_added_elsewhere_is_used_by_the_next_encryption() {
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kw-nextterm"));
    let nodes = barrier_nodes(&etcd, &prefix, 2, BarrierOptions::default());
    let raw = backend(&etcd, &prefix);
    let (a, b) = (&nodes[0], &nodes[1]);
    b.put("b/before", b"v").unwrap();
    assert_eq!(term_of(&raw.get(b"b/before").unwrap().unwrap()), 1);

    assert_eq!(a.rotate_key().unwrap(), 2);
    // The fence holds once B's watch has delivered every write acknowledged
    // before the call, the new keyring among them.
    let caught_up = (0..60).any(|_| b.cache_fence());
    assert!(caught_up, "node B's etcd watch did not catch up");
    b.put("b/after", b"sealed under the new term").unwrap();
    assert_eq!(term_of(&raw.get(b"b/after").unwrap().unwrap()), 2);
    assert_eq!(b.status().key_term, 2);
    assert_eq!(
        a.get("b/after").unwrap().unwrap().as_slice(),
        b"sealed under the new term"
    );
}

/// A node on `etcd` under `prefix`, over TLS with the certificates in `certs`.
async fn node(
    etcd: &EtcdCluster,
    prefix: &str,
    certs: &keyward::pki::CertPaths,
    node_id: &str,
) -> TestServer {
    crate::harness::install_crypto();
    let dir = private_tempdir();
    let config = ServerConfig {
        tls: Some(TlsConfig {
            cert: certs.server.clone(),
            key: certs.server_key.clone(),
            client_ca: Some(certs.ca.clone()),
        }),
        storage_backend: StorageBackend::Etcd(EtcdOptions::plaintext(etcd.endpoints(), prefix)),
        node_id: node_id.to_owned(),
        ..ServerConfig::local(dir.path().join("data"), dir.path().join("audit.log"))
    };
    TestServer::from_config(dir, config, certs.ca.clone()).await
}

/// Three keyward servers on one vault, unsealed; the root token's clients.
async fn three_servers(
    etcd: &EtcdCluster,
    prefix: &str,
) -> (
    Vec<TestServer>,
    Vec<keyward::client::Client>,
    tempfile::TempDir,
) {
    let certs_dir = private_tempdir();
    let certs = keyward::pki::ensure_dev_certs(&certs_dir.path().join("certs")).unwrap();
    let mut servers = Vec::new();
    for n in 1..=3 {
        servers.push(node(etcd, prefix, &certs, &format!("kw{n}")).await);
    }
    let anon = servers[0].anonymous().await;
    let init = anon.init(1, 1).await.unwrap();
    let mut roots = Vec::new();
    for server in &servers {
        let anon = server.anonymous().await;
        anon.unseal(&init.shares[0]).await.unwrap();
        roots.push(anon.with_token(&init.root_token).unwrap());
    }
    (servers, roots, certs_dir)
}

/// Use counts across servers: a one-use secret-id presented on three nodes
/// at once logs in exactly once (six times over, each of its own identity
/// so that the throttle stays out of it), and a token with five
/// uses is used exactly five times of twelve tries spread over three nodes.
/// A key term added on one server is read at once on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 6)]
async fn use_counts_and_key_terms_hold_across_servers() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kw-uses"));
    let (servers, roots, _certs) = three_servers(&etcd, &prefix).await;
    let anons = [
        servers[0].anonymous().await,
        servers[1].anonymous().await,
        servers[2].anonymous().await,
    ];

    for round in 0..6 {
        let name = unique("svc");
        roots[round % 3]
            .identity_create(create(&name, "service-account", "team-a", &[]))
            .await
            .unwrap();
        let sid = roots[(round + 1) % 3]
            .identity_secret_id(&name, 0, 1, &[])
            .await
            .unwrap();
        let (r0, r1, r2) = tokio::join!(
            anons[0].login_approle(&sid.role_id, &sid.secret_id, 0),
            anons[1].login_approle(&sid.role_id, &sid.secret_id, 0),
            anons[2].login_approle(&sid.role_id, &sid.secret_id, 0),
        );
        let results = [r0, r1, r2];
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {results:?}");
        for r in results.into_iter().filter(Result::is_err) {
            assert_eq!(code(r), Code::Unauthenticated, "round {round}");
        }
    }

    // A token with 5 uses: 12 reads, 4 on each node, at once.
    let path = format!("{}/db", unique("app"));
    roots[0]
        .put(&path, &data(&[("k", "v")]), PutOptions::default())
        .await
        .unwrap();
    let issued = roots[1]
        .issue_token(IssueOptions {
            policies: vec!["root".into()],
            uses: 5,
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let users: Vec<_> = anons
        .iter()
        .map(|a| a.with_token(&issued.token).unwrap())
        .collect();
    let mut tries = Vec::new();
    for i in 0..12 {
        let user = users[i % 3].clone();
        let path = path.clone();
        tries.push(tokio::spawn(async move { user.get(&path).await }));
    }
    let mut ok = 0;
    for t in tries {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}"),
        }
    }
    assert_eq!(ok, 5, "a 5-use token was used {ok} times");
    for user in &users {
        assert_eq!(code(user.get(&path).await), Code::Unauthenticated);
    }

    // operator rotate-key on node 1; node 2 reads what node 1 writes next.
    let term = roots[0].rotate_key().await.unwrap();
    assert_eq!(term, 2);
    roots[0]
        .put(
            &path,
            &data(&[("k", "under term 2")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let read = roots[1].get(&path).await.unwrap();
    assert_eq!(read.field_str("k"), Some("under term 2"));
    assert_eq!(servers[1].core.barrier.status().key_term, 2);
    roots[2]
        .put(&path, &data(&[("k", "from node 3")]), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        roots[0].get(&path).await.unwrap().field_str("k"),
        Some("from node 3")
    );
}

/// Failed logins on node 1 lock the role-id (from this address) on node 2
/// once node 1 has flushed its counts; no throttle key name in etcd holds
/// the role-id or the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_failures_on_one_node_count_on_another() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kw-throttle"));
    let (servers, roots, _certs) = three_servers(&etcd, &prefix).await;
    let name = unique("svc");
    roots[0]
        .identity_create(create(&name, "service-account", "team-a", &[]))
        .await
        .unwrap();
    let sid = roots[0].identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let one = servers[0].anonymous().await;
    let two = servers[1].anonymous().await;
    two.login_approle(&sid.role_id, &sid.secret_id, 0)
        .await
        .unwrap();

    let wrong = format!("kws_{}", "A".repeat(43));
    for _ in 0..5 {
        assert_eq!(
            code(one.login_approle(&sid.role_id, &wrong, 0).await),
            Code::Unauthenticated
        );
    }
    assert_eq!(
        code(one.login_approle(&sid.role_id, &sid.secret_id, 0).await),
        Code::ResourceExhausted
    );
    // Node 2 saw none of the failures: it refuses once node 1's flush of
    // them reached etcd. Node 2 is asked only after the record in etcd
    // holds the lock-out: a success on node 2 while node 1's five failures
    // were only partly flushed (its flushes run every 500 ms, and a loaded
    // machine can spread the five over two) clears what was flushed, as it
    // should, and the rest never reaches five.
    wait_for_figures(
        servers[0].metrics_addr,
        "node 1's flush locked the shared record",
        &[("keyward_login_throttle_shared_locked", 1.0)],
    )
    .await;
    eventually("node 2 refuses the role-id node 1 locked", || {
        let two = two.clone();
        let (role, secret) = (sid.role_id.clone(), sid.secret_id.clone());
        async move {
            matches!(
                two.login_approle(&role, &secret, 0).await,
                Err(e) if e.code() == Some(Code::ResourceExhausted)
            )
        }
    })
    .await;
    let raw = backend(&etcd, &prefix);
    assert!(!raw.scan_prefix(b"identities/throttle/").unwrap().is_empty());
    // The throttle's key names are HMACs: no role-id, no address. (The
    // role-id index `identities/role/` names role-ids by design.)
    let throttle = raw.scan_prefix(b"identities/throttle/").unwrap();
    for (key, _) in &throttle {
        assert!(!crate::harness::contains(key, sid.role_id.as_bytes()));
        assert!(!crate::harness::contains(key, b"127.0.0.1"));
    }
    let three = servers[2].anonymous().await;
    assert_eq!(
        code(three.login_approle(&sid.role_id, &sid.secret_id, 0).await),
        Code::ResourceExhausted
    );
}

/// A flood of failed logins with made-up role-ids from made-up addresses,
/// on three nodes, writes no more throttle records than the slots, each no
/// larger than its entry cap, and no more records per flush than the cap.
#[test]
fn a_login_flood_writes_a_bounded_number_of_keys() {
    use keyward::identity::login::{Login, ThrottleConfig};
    use keyward::identity::shared_throttle::{SharedThrottle, SharedThrottleConfig};
    use keyward::identity::IdentityStore;

    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kw-flood"));
    let nodes = barrier_nodes(&etcd, &prefix, 3, BarrierOptions::default());
    let shared_config = SharedThrottleConfig {
        slots: 16,
        entries_per_slot: 4,
        flush_every_ms: 500,
        max_slots_per_flush: 4,
        max_pending: 64,
    };
    let checkers: Vec<(IdentityStore, Login, Arc<SharedThrottle>)> = nodes
        .into_iter()
        .map(|barrier| {
            let barrier = Arc::new(barrier);
            let shared = Arc::new(SharedThrottle::new(
                barrier.clone(),
                ThrottleConfig::default(),
                shared_config,
            ));
            let login = Login::new(
                keyward::oidc::JwksCache::files_only(),
                ThrottleConfig::default(),
            )
            .with_shared(shared.clone());
            (IdentityStore::new(barrier), login, shared)
        })
        .collect();

    let mut now = 1_800_000_000_000u64;
    let mut refused = 0;
    for round in 0..20u32 {
        for (n, (store, login, _)) in checkers.iter().enumerate() {
            for i in 0..50u32 {
                let source = std::net::IpAddr::from([10, n as u8, (round % 250) as u8, i as u8]);
                let role = format!("made-up-{n}-{round}-{i}");
                let secret = format!("kws_{}", "B".repeat(43));
                if login
                    .approle(store, &role, &secret, Some(source), now)
                    .is_err()
                {
                    refused += 1;
                }
                now += 1;
            }
        }
        for (_, _, shared) in &checkers {
            shared.flush(now).unwrap();
        }
    }
    assert_eq!(refused, 3 * 20 * 50);
    let raw = backend(&etcd, &prefix);
    let records = raw.scan_prefix(b"identities/throttle/").unwrap();
    assert!(!records.is_empty());
    assert!(records.len() <= 16, "{} throttle records", records.len());
    // term (4) + nonce (12) + "KWT1" + count (2) + 4 entries of 36 + tag (16)
    let largest = records.iter().map(|(_, v)| v.len()).max().unwrap();
    assert!(largest <= 4 + 12 + 6 + 4 * 36 + 16, "{largest} bytes");
    for (_, _, shared) in &checkers {
        let figures = shared.figures();
        assert!(figures.flushes <= 20, "{figures:?}");
        assert!(figures.slots_written <= figures.flushes * 4, "{figures:?}");
        assert!(
            figures.dropped > 0,
            "the pending cap was never met: {figures:?}"
        );
    }
}

/// Waits (bound: 120 s) until the node at `addr` shows every `(series, at
/// least)`; its last scrape.
async fn wait_for_figures(
    addr: std::net::SocketAddr,
    what: &str,
    wanted: &[(&str, f64)],
) -> String {
    let started = std::time::Instant::now();
    loop {
        let text = scrape(addr).await;
        if wanted
            .iter()
            .all(|(series, least)| series_value(&text, series).is_some_and(|v| v >= *least))
        {
            return text;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "timed out waiting until {what}; last scrape:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// The shared login throttle's figures on `/metrics`: after failed logins
/// on node 1, its flushes, the records it wrote, the records in etcd and
/// the locked role-id; node 2, which saw none of the failures, shows the
/// lock-out it read from etcd. No series names a role-id or an address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shared_throttles_figures_are_on_metrics() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let prefix = format!("{}/", unique("kw-thrm"));
    let (servers, roots, _certs) = three_servers(&etcd, &prefix).await;
    let name = unique("svc");
    roots[0]
        .identity_create(create(&name, "service-account", "team-a", &[]))
        .await
        .unwrap();
    let sid = roots[0].identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let one = servers[0].anonymous().await;
    let two = servers[1].anonymous().await;

    let before = scrape(servers[0].metrics_addr).await;
    assert_eq!(
        series_value(&before, "keyward_login_throttle_records_written_total"),
        Some(0.0),
        "{before}"
    );
    let wrong = format!("kws_{}", "A".repeat(43));
    for _ in 0..5 {
        assert_eq!(
            code(one.login_approle(&sid.role_id, &wrong, 0).await),
            Code::Unauthenticated
        );
    }
    assert_eq!(
        code(one.login_approle(&sid.role_id, &sid.secret_id, 0).await),
        Code::ResourceExhausted
    );
    let text = wait_for_figures(
        servers[0].metrics_addr,
        "node 1 shows its flush and the records in etcd",
        &[
            ("keyward_login_throttle_flushes_total", 1.0),
            ("keyward_login_throttle_records_written_total", 1.0),
            ("keyward_login_throttle_shared_records", 1.0),
            ("keyward_login_throttle_shared_entries", 2.0),
            ("keyward_login_throttle_shared_locked", 1.0),
            ("keyward_login_throttle_locked{kind=\"role_source\"}", 1.0),
        ],
    )
    .await;
    println!(
        "node 1: {}",
        text.lines()
            .filter(|l| l.starts_with("keyward_login_throttle"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    // Five failures lock the role-id from this address, not the address.
    assert_eq!(
        series_value(&text, "keyward_login_throttle_locked{kind=\"source\"}"),
        Some(0.0)
    );
    assert_eq!(
        series_value(&text, "keyward_login_throttle_flush_failures_total"),
        Some(0.0)
    );
    assert_eq!(
        series_value(&text, "keyward_login_throttle_dropped_total"),
        Some(0.0)
    );

    // Node 2 refuses once it reads the shared record, and says so.
    eventually("node 2 refuses the role-id node 1 locked", || {
        let two = two.clone();
        let (role, secret) = (sid.role_id.clone(), sid.secret_id.clone());
        async move {
            matches!(
                two.login_approle(&role, &secret, 0).await,
                Err(e) if e.code() == Some(Code::ResourceExhausted)
            )
        }
    })
    .await;
    let text = wait_for_figures(
        servers[1].metrics_addr,
        "node 2 shows the lock-out it read and the records in etcd",
        &[
            ("keyward_login_throttle_locked{kind=\"role_source\"}", 1.0),
            ("keyward_login_throttle_shared_records", 1.0),
            ("keyward_login_throttle_shared_locked", 1.0),
        ],
    )
    .await;
    assert_eq!(
        series_value(&text, "keyward_login_throttle_records_written_total"),
        Some(0.0),
        "node 2 saw no failure to share"
    );
    for server in &servers[..2] {
        let text = scrape(server.metrics_addr).await;
        assert!(!text.contains(&sid.role_id), "a role-id in /metrics");
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("keyward_login_throttle") && l.contains("127.0.0.1")),
            "an address in the throttle's series"
        );
    }
}

/// Policy names for token stores built at the library level: every name
/// exists.
struct AnyPolicy;

impl keyward::token::store::PolicyNames for AnyPolicy {
    fn policy_exists(&self, _name: &str) -> Result<bool, keyward::token::TokenError> {
        Ok(true)
    }
}

/// A token store ("node") over `barrier` whose clock starts at `now`,
/// unsealed (its sweeper's memory loaded, as after a start).
fn token_store(barrier: &Arc<Barrier>, now: u64) -> keyward::token::TokenStore {
    let store = keyward::token::TokenStore::new(
        barrier.clone(),
        Arc::new(AnyPolicy),
        keyward::clock::Clock::starting_at(now),
    );
    store.on_unseal(now).unwrap();
    store
}

/// Two barrier nodes over `etcd` (a fresh prefix named after `name`), and
/// a token store on each, at `t0`.
fn two_token_nodes(
    etcd: &EtcdCluster,
    name: &str,
    t0: u64,
) -> (
    Vec<Arc<Barrier>>,
    keyward::token::TokenStore,
    keyward::token::TokenStore,
) {
    let prefix = format!("{}/", unique(name));
    let nodes: Vec<Arc<Barrier>> = barrier_nodes(etcd, &prefix, 2, BarrierOptions::default())
        .into_iter()
        .map(Arc::new)
        .collect();
    let (a, b) = (token_store(&nodes[0], t0), token_store(&nodes[1], t0));
    (nodes, a, b)
}

/// A token whose last use was marked `spent` on node A, which then
/// "crashed" before revoking it (the test hook stops there): its child
/// still works on node B. A token store started afresh on node B (a
/// restart: nothing in memory) finishes the revocation at its first sweep,
/// long before the parent's expiry a year away, and both nodes refuse the
/// child from then on.
#[test]
fn a_spent_token_cut_short_is_revoked_with_its_children_after_a_restart() {
    use keyward::token::TokenRequest;

    let etcd = EtcdCluster::start(3);
    let t0 = 1_800_000_000_000u64;
    let (nodes, a, b) = two_token_nodes(&etcd, "kw-spent", t0);
    let year = std::time::Duration::from_secs(365 * 24 * 3600);
    let request = |uses: u32, parent: Option<String>| TokenRequest {
        identity: "svc".into(),
        policies: vec!["app".into()],
        ttl: year,
        max_ttl: std::time::Duration::ZERO,
        hard_expiry_ms: None,
        uses,
        cidrs: vec![],
        parent_accessor: parent,
        method: "token",
    };
    let local = Some(std::net::IpAddr::from([127, 0, 0, 1]));
    // A token with a use limit issues no child tokens, and since 0.6.13
    // acts for nobody either: the delegated child below is linked under
    // its actor as one an earlier release made under a use-limited actor,
    // whose one use left is written here.
    let parent = a.issue(request(0, None), t0).unwrap();
    let child = a
        .issue_with(
            request(0, None),
            keyward::token::Delegation {
                may_act: None,
                actor_accessor: Some(parent.accessor.clone()),
            },
            t0,
        )
        .unwrap();
    {
        use prost::Message;
        let key = format!("tokens/accessor/{}", parent.accessor);
        let raw = nodes[0].get(&key).unwrap().unwrap();
        let mut record = keyward::token::store::TokenRecord::decode(raw.as_slice()).unwrap();
        (record.uses_total, record.uses_remaining) = (1, 1);
        nodes[0].put(&key, &record.encode_to_vec()).unwrap();
    }
    b.use_token(child.token.expose(), local, t0).unwrap();

    let crashed_at = t0 + 1_000;
    a.danger_test_mark_spent_without_revoking(&parent.accessor, crashed_at)
        .unwrap();
    assert!(b
        .lookup_accessor(&parent.accessor, crashed_at)
        .unwrap()
        .is_none());
    // The crash state: nothing revoked the child.
    b.use_token(child.token.expose(), local, crashed_at)
        .unwrap();

    let after = crashed_at + 1_000;
    let restarted = token_store(&nodes[1], after);
    let swept = restarted.sweep(after).unwrap();
    assert_eq!(swept.revoked, 2, "{swept:?}");
    for (node, tokens) in [("a", &a), ("b", &b), ("b restarted", &restarted)] {
        let refused = tokens.use_token(child.token.expose(), local, after + 1);
        assert!(
            matches!(refused, Err(keyward::token::TokenError::Invalid)),
            "node {node}: {refused:?}"
        );
    }
}

/// A revocation on node A cut short right after its marks (the test hook
/// stops there: the crash). Node B refuses every marked token at once, one
/// its verified-token cache held included (the mark reaches that cache
/// through the store's watch, as a delete would), and issues no child under
/// any of them. A token store started afresh on node B (a restart) finishes
/// the revocation at its first sweep once the marks are older than their
/// grace (30 s), and every node refuses the tokens for good.
#[test]
fn a_revocation_cut_short_after_its_marks_is_refused_everywhere_and_swept() {
    use keyward::token::{TokenError, TokenRequest};

    let etcd = EtcdCluster::start(1);
    let t0 = 1_800_000_000_000u64;
    let (nodes, a, b) = two_token_nodes(&etcd, "kw-marks", t0);
    let request = |parent: Option<&str>| TokenRequest {
        identity: "svc".into(),
        policies: vec!["app".into()],
        ttl: std::time::Duration::from_secs(3600),
        max_ttl: std::time::Duration::ZERO,
        hard_expiry_ms: None,
        uses: 0,
        cidrs: vec![],
        parent_accessor: parent.map(str::to_owned),
        method: "token",
    };
    let local = Some(std::net::IpAddr::from([127, 0, 0, 1]));
    let parent = a.issue(request(None), t0).unwrap();
    let child = a.issue(request(Some(&parent.accessor)), t0).unwrap();
    let grandchild = a.issue(request(Some(&child.accessor)), t0).unwrap();
    b.use_token(child.token.expose(), local, t0).unwrap();
    let cached = b.use_token(child.token.expose(), local, t0).unwrap();
    assert!(
        cached.audit_mac.is_some(),
        "node B's second use is a cache hit"
    );

    assert_eq!(
        a.danger_test_mark_without_revoking(&parent.accessor)
            .unwrap(),
        3
    );
    let now = t0 + 1_000;
    for (node, tokens) in [("a", &a), ("b", &b)] {
        for (name, token) in [
            ("parent", &parent),
            ("child", &child),
            ("grandchild", &grandchild),
        ] {
            let refused = tokens.use_token(token.token.expose(), local, now);
            assert!(
                matches!(refused, Err(TokenError::Invalid)),
                "node {node}, {name}: {:?}",
                refused.map(|u| u.record.accessor.clone())
            );
            let below = tokens.issue(request(Some(&token.accessor)), now);
            assert!(
                matches!(below, Err(TokenError::ParentInvalid)),
                "node {node}, a child of the {name}: {:?}",
                below.map(|t| t.accessor)
            );
        }
    }

    let after = t0 + 60_000;
    let restarted = token_store(&nodes[1], after);
    let swept = restarted.sweep(after).unwrap();
    assert_eq!(swept.revoked, 3, "{swept:?}");
    for (node, tokens) in [("a", &a), ("b", &b), ("b restarted", &restarted)] {
        for token in [&parent, &child, &grandchild] {
            assert!(
                tokens
                    .lookup_accessor(&token.accessor, after)
                    .unwrap()
                    .is_none(),
                "node {node}"
            );
        }
    }
    let left = nodes[0].scan_keys("tokens/").unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}
