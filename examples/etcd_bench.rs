//! Benchmark (not a test): keyward on a 3-member loopback etcd cluster that
//! the benchmark starts itself (`tests/support/etcd_kit.rs`), one in-process
//! keyward node over TLS, N concurrent connections (default 64) for S
//! seconds (default 5) per phase:
//!
//! - `grpc_noop` (`grpc.health.v1.Health/Check`, no token, no etcd);
//! - `grpc_get`: a token with a policy reads one secret (token and policy
//!   from the revision-checked caches, and the secret from the read cache
//!   of stored ciphertext, under the same fence);
//! - `grpc_put`: durable writes (answered once committed on an etcd quorum),
//!   each connection its own path;
//! - `http_kv_write`: the same writes over the Vault-compatible HTTP API
//!   (`POST /v1/secret/data/bench/hN`), and the same client code against
//!   OpenBao when `BENCH_BAO_ADDR`, `BENCH_BAO_CA`, `BENCH_BAO_TOKEN` are set
//!   (`examples/etcd_bench.sh` starts OpenBao 2.x on single-node raft and
//!   sets them);
//! - `grpc_login`: AppRole logins (each writes a token record to etcd), on
//!   at most 16 connections, each with its own role-id (the login throttle
//!   judges at most 5 attempts of one role-id from one address at once).
//!
//! Before the phases, one call at a time: how many requests a Get, a Put
//! and a login send to etcd (`round_trips`). After them, the read cache's
//! figures.
//!
//! Then, unless `--sizing 0`: how many bytes etcd holds per secret version,
//! per token and per lease: N of each are written and the vault prefix's
//! key and value bytes, etcd's revisions and its database size are read
//! before and after; at the end the history is compacted and every member
//! defragmented, and the database size read again.
//!
//! `BENCH_READ_CACHE=0` turns the read cache of secrets off;
//! `BENCH_FENCE_INTERVAL_US=N` sets `storage.etcd.fence_interval_us` (2000 by default);
//! `BENCH_READ_LEASE=0` turns the node's read lease off (every request takes
//! the fence read, as before 0.6.5).
//!
//! Under load it also prints the mean time of each storage call in the Get
//! and Put phases (`loaded_etcd_times`, from the node's
//! `keyward_etcd_request_duration_seconds`): `fence_wait` is a request's
//! whole wait at its cache fence, `cache_fence` the shared read in it.
//!
//! Prints one line per phase, one `sizing` line per kind, then one `summary`
//! line with the ratios (`get/noop`, keyward write / OpenBao write) and the
//! 1-minute load average before and after.
//!
//! ```sh
//! cargo build --release --features etcd --example etcd_bench
//! examples/etcd_bench.sh [CONNECTIONS] [SECONDS] [SIZING_N]     # with OpenBao
//! target/release/examples/etcd_bench [CONNECTIONS] [SECONDS] [--sizing N]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(feature = "etcd")]
#[path = "../tests/support/etcd_kit.rs"]
#[allow(dead_code)]
mod etcd_kit;

#[cfg(not(feature = "etcd"))]
fn main() {
    eprintln!("etcd_bench needs the etcd feature: cargo build --release --features etcd --example etcd_bench");
    std::process::exit(2);
}

// The allocator of the `keyward` binary (src/main.rs): the node runs in this
// process, so it is measured as it ships. (The load client shares it, for
// keyward and OpenBao alike.)
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(feature = "etcd")]
fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench::run());
}

#[cfg(feature = "etcd")]
mod bench {
    use std::fmt::Write as _;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use keyward::client::{Client, ClientOptions, IssueOptions, PutOptions};
    use keyward::config::{ServerConfig, StorageBackend, TlsConfig};
    use keyward::proto::v1::CreateIdentityRequest;
    use keyward::secrecy::{SecretBytes, SecretData};
    use keyward::storage::EtcdOptions;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    use crate::etcd_kit::EtcdCluster;

    type Sender = hyper::client::conn::http1::SendRequest<axum::body::Body>;

    /// Login connections at most, each with its own role-id (see `run`).
    const LOGIN_CONNECTIONS: usize = 16;
    /// Calls per operation in the round-trip count.
    const TRIP_CALLS: u64 = 50;
    type Setup<S> = Box<dyn Fn(usize) -> Pin<Box<dyn Future<Output = S> + Send>>>;

    #[derive(Clone, Copy, Default)]
    struct Stats {
        rate: f64,
        p99_ms: f64,
        calls: usize,
    }

    /// Runs `connections` workers for `seconds`; worker `i` makes its state
    /// with `setup(i)`, then calls `op` in a loop. Prints and returns the figures.
    async fn phase<S, F, OF>(
        name: &str,
        connections: usize,
        seconds: u64,
        setup: Setup<S>,
        op: F,
    ) -> Stats
    where
        S: Send + 'static,
        F: Fn(S) -> OF + Clone + Send + 'static,
        OF: Future<Output = S> + Send,
    {
        let mut states = Vec::new();
        for i in 0..connections {
            states.push(setup(i).await);
        }
        let start = Instant::now();
        let until = start + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for mut state in states {
            let op = op.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    state = op(state).await;
                    latencies.push(t.elapsed());
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = start.elapsed().as_secs_f64();
        all.sort();
        let rate = all.len() as f64 / elapsed;
        let p99 = all
            .get(all.len().saturating_mul(99) / 100)
            .copied()
            .unwrap_or_default();
        let p99_ms = p99.as_secs_f64() * 1000.0;
        println!(
            "phase={name} connections={connections} seconds={seconds} calls={} per_second={rate:.0} p99_ms={p99_ms:.2}",
            all.len()
        );
        Stats {
            rate,
            p99_ms,
            calls: all.len(),
        }
    }

    fn client_tls(ca: &Path) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    async fn http_connection(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Sender {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn http_call(
        sender: &mut Sender,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> u16 {
        sender.ready().await.unwrap();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("content-length", body.len().to_string());
        if let Some(t) = token {
            req = req.header("x-vault-token", t);
        }
        let resp = sender
            .send_request(req.body(axum::body::Body::from(body.to_vec())).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        axum::body::to_bytes(axum::body::Body::new(resp.into_body()), 1 << 20)
            .await
            .unwrap();
        status
    }

    /// An HTTP server to write to (keyward's or OpenBao's).
    #[derive(Clone)]
    struct HttpTarget {
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        token: Arc<String>,
    }

    /// KV v2 writes, each connection to its own path, the same code for
    /// every target.
    async fn http_write_phase(
        name: &str,
        t: &HttpTarget,
        connections: usize,
        seconds: u64,
    ) -> Stats {
        let target = t.clone();
        let body = Arc::new(
            serde_json::to_vec(&serde_json::json!({"data": {"password": "bench-write-value"}}))
                .unwrap(),
        );
        phase(
            name,
            connections,
            seconds,
            Box::new(move |i| {
                let target = target.clone();
                Box::pin(async move {
                    (
                        http_connection(target.addr, target.tls.clone()).await,
                        format!("/v1/secret/data/bench/h{i}"),
                        target.token.clone(),
                    )
                })
            }),
            move |(mut s, path, token): (Sender, String, Arc<String>)| {
                let body = body.clone();
                async move {
                    let code = http_call(&mut s, "POST", &path, Some(&token), &body).await;
                    assert!(code == 200 || code == 204, "POST {path}: {code}");
                    (s, path, token)
                }
            },
        )
        .await
    }

    async fn http_noop_phase(
        name: &str,
        t: &HttpTarget,
        connections: usize,
        seconds: u64,
    ) -> Stats {
        let target = t.clone();
        phase(
            name,
            connections,
            seconds,
            Box::new(move |_| {
                let target = target.clone();
                Box::pin(async move { http_connection(target.addr, target.tls.clone()).await })
            }),
            |mut s: Sender| async move {
                let code = http_call(&mut s, "GET", "/v1/sys/health", None, b"").await;
                assert_eq!(code, 200);
                s
            },
        )
        .await
    }

    /// Count and sum of seconds of each op of
    /// `keyward_etcd_request_duration_seconds`, from the node's `/metrics`.
    /// User + system CPU time of process `pid` so far, in milliseconds,
    /// from `/proc/PID/stat` (fields 14 and 15, in ticks of Linux's fixed
    /// `USER_HZ` of 100).
    fn cpu_ms(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return 0;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i - 3)
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (ticks(14) + ticks(15)) * 10
    }

    /// CPU so far of the etcd members (summed) and of this process (the
    /// keyward node and the load client together).
    fn cpu_split(etcd: &EtcdCluster) -> (u64, u64) {
        let members = etcd
            .members
            .iter()
            .filter_map(|m| m.pid())
            .map(cpu_ms)
            .sum();
        (members, cpu_ms(std::process::id()))
    }

    async fn etcd_times(
        addr: std::net::SocketAddr,
    ) -> std::collections::BTreeMap<String, (f64, f64)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let mut out = std::collections::BTreeMap::<String, (f64, f64)>::new();
        for line in text.lines() {
            for (suffix, slot) in [("_count{op=\"", 0), ("_sum{op=\"", 1)] {
                let Some(rest) = line
                    .strip_prefix("keyward_etcd_request_duration_seconds")
                    .and_then(|r| r.strip_prefix(suffix))
                else {
                    continue;
                };
                let Some((op, value)) = rest.split_once("\"} ") else {
                    continue;
                };
                let value: f64 = value.trim().parse().unwrap_or(0.0);
                let entry = out.entry(op.to_owned()).or_default();
                if slot == 0 {
                    entry.0 = value;
                } else {
                    entry.1 = value;
                }
            }
        }
        out
    }

    fn load1() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into())
    }

    fn push(line: &mut String, name: &str, s: Stats) {
        write!(line, " {name}={:.0} {name}_p99_ms={:.2}", s.rate, s.p99_ms).unwrap();
    }

    fn openbao() -> Option<HttpTarget> {
        let addr = std::env::var("BENCH_BAO_ADDR").ok()?;
        let ca = std::env::var("BENCH_BAO_CA").ok()?;
        let token = std::env::var("BENCH_BAO_TOKEN").ok()?;
        Some(HttpTarget {
            addr: addr.parse().expect("BENCH_BAO_ADDR: ip:port"),
            tls: client_tls(Path::new(&ca)),
            token: Arc::new(token),
        })
    }

    /// What etcd holds under `prefix`: keys, key+value bytes, the revision.
    async fn held(client: &mut etcd_client::Client, prefix: &[u8]) -> (u64, u64, i64) {
        let mut kv = client.kv_client().max_decoding_message_size(256 << 20);
        let answer = kv
            .get(
                prefix.to_vec(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        let revision = answer.header().map_or(0, |h| h.revision());
        let bytes: u64 = answer
            .kvs()
            .iter()
            .map(|kv| (kv.key().len() + kv.value().len()) as u64)
            .sum();
        (answer.kvs().len() as u64, bytes, revision)
    }

    /// The database size of every member (bytes), by its own endpoint.
    async fn db_sizes(endpoints: &[String]) -> Vec<i64> {
        let mut out = Vec::new();
        for endpoint in endpoints {
            let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
                .await
                .unwrap();
            out.push(c.status().await.unwrap().db_size());
        }
        out
    }

    fn mean(v: &[i64]) -> f64 {
        v.iter().sum::<i64>() as f64 / v.len().max(1) as f64
    }

    /// Runs `n` calls of `op(i)`, 32 at a time.
    async fn many<F, Fut>(n: usize, op: F)
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut running = tokio::task::JoinSet::new();
        for i in 0..n {
            if running.len() >= 32 {
                running.join_next().await.unwrap().unwrap();
            }
            running.spawn(op(i));
        }
        while let Some(done) = running.join_next().await {
            done.unwrap();
        }
    }

    struct Before {
        keys: u64,
        bytes: u64,
        revision: i64,
        db: f64,
    }

    async fn before(raw: &mut etcd_client::Client, prefix: &[u8], endpoints: &[String]) -> Before {
        let (keys, bytes, revision) = held(raw, prefix).await;
        Before {
            keys,
            bytes,
            revision,
            db: mean(&db_sizes(endpoints).await),
        }
    }

    async fn report(
        kind: &str,
        n: usize,
        b: &Before,
        raw: &mut etcd_client::Client,
        prefix: &[u8],
        endpoints: &[String],
    ) -> f64 {
        let a = before(raw, prefix, endpoints).await;
        let per = |x: f64| x / n as f64;
        let kv_per = per((a.bytes - b.bytes) as f64);
        println!(
            "sizing kind={kind} n={n} keys_per={:.2} key_value_bytes_per={kv_per:.0} revisions_per={:.2} db_growth_bytes_per={:.0}",
            per((a.keys - b.keys) as f64),
            per((a.revision - b.revision) as f64),
            per(a.db - b.db),
        );
        kv_per
    }

    #[allow(clippy::too_many_lines)]
    pub async fn run() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        let mut sizing_n = 2000usize;
        if let Some(i) = args.iter().position(|a| a == "--sizing") {
            sizing_n = args[i + 1].parse().unwrap();
            args.drain(i..i + 2);
        }
        let mut args = args.into_iter();
        let connections: usize = args.next().map_or(64, |a| a.parse().unwrap());
        let seconds: u64 = args.next().map_or(5, |a| a.parse().unwrap());
        let load_before = load1();

        let etcd = EtcdCluster::start(3);
        let endpoints = etcd.endpoints();
        println!(
            "etcd: 3 members on loopback ({}), data in {}",
            endpoints.join(" "),
            etcd.log_dir().display()
        );
        let dir = tempfile::Builder::new()
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .unwrap();
        let certs = keyward::pki::ensure_dev_certs(&dir.path().join("certs")).unwrap();
        let prefix = "bench/".to_owned();
        // BENCH_READ_CACHE=0 turns the read cache of secrets off (every Get
        // reads etcd): the same run's figures with and without it.
        let mut etcd_options = EtcdOptions::plaintext(endpoints.clone(), prefix.clone());
        if std::env::var("BENCH_READ_CACHE").as_deref() == Ok("0") {
            etcd_options.read_cache_bytes = 0;
            println!("read cache: off (BENCH_READ_CACHE=0)");
        }
        if let Ok(us) = std::env::var("BENCH_FENCE_INTERVAL_US") {
            let us: u64 = us.parse().expect("BENCH_FENCE_INTERVAL_US: microseconds");
            etcd_options.fence_interval = Duration::from_micros(us);
        }
        if std::env::var("BENCH_READ_LEASE").as_deref() == Ok("0") {
            etcd_options.read_lease = false;
        }
        println!(
            "fence interval: {} us; read lease: {}",
            etcd_options.fence_interval.as_micros(),
            if etcd_options.read_lease { "on" } else { "off" }
        );
        let config = ServerConfig {
            tls: Some(TlsConfig {
                cert: certs.server.clone(),
                key: certs.server_key.clone(),
                client_ca: Some(certs.ca.clone()),
            }),
            storage_backend: StorageBackend::Etcd(etcd_options),
            node_id: "kw1".into(),
            ..ServerConfig::local(dir.path().join("data"), dir.path().join("audit.log"))
        };
        let server = keyward::server::Server::open(config).unwrap();
        let core = server.core().clone();
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc_listener.local_addr().unwrap();
        let http_addr = http_listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics_listener.local_addr().unwrap();
        let served = tokio::spawn(server.with_http_listener(http_listener).serve(
            grpc_listener,
            Some(metrics_listener),
            async move {
                let _ = stopped.await;
            },
        ));
        let ca = certs.ca.clone();
        let options = move |token: Option<&str>| ClientOptions {
            addr: format!("https://{grpc_addr}"),
            token: token.map(str::to_owned),
            ca_cert: Some(ca.clone()),
            ..ClientOptions::default()
        };
        let anon = Client::connect(options(None)).await.unwrap();
        let init = anon.init(1, 1).await.unwrap();
        anon.unseal(&init.shares[0]).await.unwrap();
        let root = anon.with_token(&init.root_token).unwrap();
        root.policy_put(
            "bench-rw",
            "[[rule]]\npath = \"secret/bench/**\"\ncapabilities = [\"read\", \"write\"]\n",
        )
        .await
        .unwrap();
        let mut data = SecretData::new();
        data.insert("password".into(), SecretBytes::from("bench-value"));
        root.put("bench/kv", &data, PutOptions::default())
            .await
            .unwrap();
        let token = root
            .issue_token(IssueOptions {
                policies: vec!["bench-rw".into()],
                ttl: Some(Duration::from_secs(3600)),
                ..IssueOptions::default()
            })
            .await
            .unwrap()
            .token;
        // One identity per login connection: the login throttle judges at
        // most 5 attempts of one role-id from one address at once (and 20
        // from one address), refusing the rest as busy (see the README's
        // "Speed on etcd"), and every connection here comes from 127.0.0.1.
        let login_connections = connections.min(LOGIN_CONNECTIONS);
        let mut creds = Vec::new();
        for i in 0..login_connections {
            let name = format!("bench-bot-{i}");
            root.identity_create(CreateIdentityRequest {
                name: name.clone(),
                kind: "service-account".into(),
                owner: "bench".into(),
                description: "etcd bench".into(),
                policies: vec!["bench-rw".into()],
                expires_in_seconds: 0,
            })
            .await
            .unwrap();
            let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
            creds.push((sid.role_id.clone(), sid.secret_id.clone()));
        }
        let creds = Arc::new(creds);

        // Round trips to etcd per call, one call at a time (the background
        // tasks' few requests fall in the same count, so these are upper
        // bounds): the backend counts every request it sends.
        let sent = || core.barrier.store_requests_sent().unwrap_or(0);
        let user = Client::connect(options(Some(&token))).await.unwrap();
        let anon_login = Client::connect(options(None)).await.unwrap();
        let mut write = SecretData::new();
        write.insert("password".into(), SecretBytes::from("bench-write-value"));
        let mut trips = String::new();
        for op in ["get", "put", "login"] {
            let before = sent();
            for _ in 0..TRIP_CALLS {
                match op {
                    "get" => drop(user.get("bench/kv").await.unwrap()),
                    "put" => drop(
                        user.put("bench/trips", &write, PutOptions::default())
                            .await
                            .unwrap(),
                    ),
                    _ => drop(
                        anon_login
                            .login_approle(&creds[0].0, &creds[0].1, 0)
                            .await
                            .unwrap(),
                    ),
                }
            }
            let per = (sent() - before) as f64 / TRIP_CALLS as f64;
            println!("round_trips op={op} calls={TRIP_CALLS} etcd_requests_per_call={per:.2}");
            write!(trips, " trips_{op}={per:.2}").unwrap();
        }

        let grpc = |token: Option<String>| -> Setup<Client> {
            let options = options.clone();
            Box::new(move |_| {
                let opts = options(token.as_deref());
                Box::pin(async move { Client::connect(opts).await.unwrap() })
            })
        };
        let noop = phase(
            "grpc_noop",
            connections,
            seconds,
            grpc(None),
            |c: Client| async move {
                assert!(c.health().await.unwrap());
                c
            },
        )
        .await;
        let sent_before_get = sent();
        let etcd_before_get = etcd_times(metrics_addr).await;
        let get = phase(
            "grpc_get",
            connections,
            seconds,
            grpc(Some(token.clone())),
            |c: Client| async move {
                c.get("bench/kv").await.unwrap();
                c
            },
        )
        .await;
        let sent_before_put = sent();
        let etcd_before_put = etcd_times(metrics_addr).await;
        let cpu_before_put = cpu_split(&etcd);
        let put = {
            let options = options.clone();
            let token = token.clone();
            phase(
                "grpc_put",
                connections,
                seconds,
                Box::new(move |i| {
                    let opts = options(Some(&token));
                    Box::pin(async move {
                        let mut data = SecretData::new();
                        data.insert("password".into(), SecretBytes::from("bench-write-value"));
                        (
                            Client::connect(opts).await.unwrap(),
                            format!("bench/w{i}"),
                            data,
                        )
                    })
                }),
                |(c, path, data): (Client, String, SecretData)| async move {
                    c.put(&path, &data, PutOptions::default()).await.unwrap();
                    (c, path, data)
                },
            )
            .await
        };
        // Under load, concurrent requests share fence reads and gathered
        // writes: the same count divided by the phase's calls.
        let sent_after_put = sent();
        let etcd_after_put = etcd_times(metrics_addr).await;
        let cpu_after_put = cpu_split(&etcd);
        {
            // Where the Put phase's CPU went: the three etcd members, and
            // this process (keyward node and load client), per Put.
            let per = |a: u64, b: u64| (b - a) as f64 * 1000.0 / put.calls.max(1) as f64;
            println!(
                "put_cpu etcd_members_us_per_put={:.0} bench_process_us_per_put={:.0}",
                per(cpu_before_put.0, cpu_after_put.0),
                per(cpu_before_put.1, cpu_after_put.1)
            );
        }
        // Mean times by storage call in each loaded phase (`fence_wait` is a
        // request's whole wait at its fence; `cache_fence` the shared read).
        for (phase, before, after) in [
            ("get", &etcd_before_get, &etcd_before_put),
            ("put", &etcd_before_put, &etcd_after_put),
        ] {
            for (op, (count, sum)) in after {
                let (c0, s0) = before.get(op).copied().unwrap_or((0.0, 0.0));
                if count - c0 > 0.0 {
                    println!(
                        "loaded_etcd_times phase={phase} op={op} calls={:.0} mean_ms={:.2}",
                        count - c0,
                        (sum - s0) * 1000.0 / (count - c0)
                    );
                }
            }
        }
        for (op, requests, calls) in [
            ("get", sent_before_put - sent_before_get, get.calls),
            ("put", sent_after_put - sent_before_put, put.calls),
        ] {
            let per = requests as f64 / calls.max(1) as f64;
            println!("loaded_round_trips op={op} etcd_requests_per_call={per:.2}");
            write!(trips, " loaded_trips_{op}={per:.2}").unwrap();
        }
        let keyward_http = HttpTarget {
            addr: http_addr,
            tls: client_tls(&certs.ca),
            token: Arc::new(token.clone()),
        };
        let http_put = http_write_phase("http_kv_write", &keyward_http, connections, seconds).await;
        let login_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let login = {
            let errors = login_errors.clone();
            let options = options.clone();
            phase(
                "grpc_login",
                login_connections,
                seconds,
                Box::new(move |i| {
                    let opts = options(None);
                    let creds = creds.clone();
                    Box::pin(async move {
                        let (role, secret) = creds[i].clone();
                        (Client::connect(opts).await.unwrap(), role, secret)
                    })
                }),
                move |(c, role, secret): (Client, String, String)| {
                    let errors = errors.clone();
                    async move {
                        // A refused login is counted (and its first reason
                        // printed), not fatal: the figure is of calls.
                        if let Err(e) = c.login_approle(&role, &secret, 0).await {
                            if errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                                println!("grpc_login: first refusal: {e}");
                            }
                        }
                        (c, role, secret)
                    }
                },
            )
            .await
        };
        let cache = core.barrier.read_cache_figures().unwrap_or_default();
        println!(
            "read_cache entries={} bytes={} hits={} misses={} inserted={} refused={} evicted={} invalidated={} resets={}",
            cache.entries,
            cache.bytes,
            cache.hits,
            cache.misses,
            cache.inserted,
            cache.refused,
            cache.evicted,
            cache.invalidated,
            cache.resets
        );
        let bao = match openbao() {
            Some(target) => Some((
                http_noop_phase("openbao_http_noop", &target, connections, seconds).await,
                http_write_phase("openbao_http_kv_write", &target, connections, seconds).await,
            )),
            None => {
                println!("openbao: BENCH_BAO_ADDR/BENCH_BAO_CA/BENCH_BAO_TOKEN not set, skipped");
                None
            }
        };
        let load_after = load1();

        // ---- sizing --------------------------------------------------------
        if sizing_n > 0 {
            let n = sizing_n;
            let mut raw = etcd_client::Client::connect(endpoints.clone(), None)
                .await
                .unwrap();
            let p = prefix.as_bytes();
            let root = Arc::new(root.clone());
            let value = "s".repeat(32);

            let b = before(&mut raw, p, &endpoints).await;
            many(n, |i| {
                let (root, value) = (root.clone(), value.clone());
                async move {
                    let mut d = SecretData::new();
                    d.insert("password".into(), SecretBytes::from(value));
                    root.put(&format!("size/s{i}"), &d, PutOptions::default())
                        .await
                        .unwrap();
                }
            })
            .await;
            report("secret_first_version", n, &b, &mut raw, p, &endpoints).await;

            let b = before(&mut raw, p, &endpoints).await;
            many(n, |i| {
                let (root, value) = (root.clone(), value.clone());
                async move {
                    let mut d = SecretData::new();
                    d.insert("password".into(), SecretBytes::from(value));
                    root.put(&format!("size/s{i}"), &d, PutOptions::default())
                        .await
                        .unwrap();
                }
            })
            .await;
            report("secret_next_version", n, &b, &mut raw, p, &endpoints).await;

            let b = before(&mut raw, p, &endpoints).await;
            many(n, |_| {
                let root = root.clone();
                async move {
                    root.issue_token(IssueOptions {
                        policies: vec!["bench-rw".into()],
                        ttl: Some(Duration::from_secs(3600)),
                        ..IssueOptions::default()
                    })
                    .await
                    .unwrap();
                }
            })
            .await;
            report("token", n, &b, &mut raw, p, &endpoints).await;

            // Leases as a dynamic role makes them (the record of a PostgreSQL
            // user), written through the lease store; due in a day.
            let b = before(&mut raw, p, &endpoints).await;
            let now = core.clock().now_ms();
            let leases = core.leases.clone();
            many(n, |i| {
                let leases = leases.clone();
                async move {
                    let record = keyward::lease::LeaseRecord {
                        id: format!("dynamic/app-db/{:024}", i),
                        accessor: format!("kwa_{:040}", i),
                        identity: "payments-api".into(),
                        role: "app-db".into(),
                        provider: "postgres".into(),
                        username: format!("kw_app_db_{:016x}", i),
                        host: "127.0.0.1".into(),
                        port: 5432,
                        database: "app".into(),
                        admin_secret: "db/admin".into(),
                        created_ms: now,
                        expires_ms: now + 86_400_000,
                        max_expiry_ms: now + 7 * 86_400_000,
                        ttl_ms: 86_400_000,
                        ..Default::default()
                    };
                    leases.create(&record).await.unwrap();
                }
            })
            .await;
            report("lease", n, &b, &mut raw, p, &endpoints).await;

            // Compact the history and defragment: what live data alone takes.
            let (keys, bytes, revision) = held(&mut raw, p).await;
            let db_before = db_sizes(&endpoints).await;
            raw.compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .unwrap();
            for endpoint in &endpoints {
                let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
                    .await
                    .unwrap();
                c.defragment().await.unwrap();
            }
            let db_after = db_sizes(&endpoints).await;
            println!(
                "sizing kind=whole_vault keys={keys} key_value_bytes={bytes} revision={revision} db_bytes_before_compaction={:.0} db_bytes_after_compaction_and_defrag={:.0}",
                mean(&db_before),
                mean(&db_after)
            );
        }

        let ratio_get = get.rate / noop.rate;
        let mut line = format!(
            "summary target=keyward-etcd-3 connections={connections} seconds={seconds} load1_before={load_before} load1_after={load_after}"
        );
        push(&mut line, "grpc_noop", noop);
        push(&mut line, "grpc_get", get);
        push(&mut line, "grpc_put", put);
        push(&mut line, "http_kv_write", http_put);
        push(&mut line, "grpc_login", login);
        write!(
            line,
            " grpc_login_connections={login_connections} grpc_login_errors={}{trips} read_cache_hits={}",
            login_errors.load(std::sync::atomic::Ordering::Relaxed),
            cache.hits
        )
        .unwrap();
        write!(
            line,
            " ratio_get_noop={ratio_get:.2} goal_get_0.5={}",
            if ratio_get >= 0.5 { "met" } else { "missed" }
        )
        .unwrap();
        if let Some((bao_noop, bao_put)) = bao {
            push(&mut line, "openbao_http_noop", bao_noop);
            push(&mut line, "openbao_http_kv_write", bao_put);
            let ratio = http_put.rate / bao_put.rate;
            write!(
                line,
                " ratio_http_put_openbao={ratio:.2} ratio_grpc_put_openbao={:.2} goal_put_2x={}",
                put.rate / bao_put.rate,
                if ratio >= 2.0 { "met" } else { "missed" }
            )
            .unwrap();
        }
        println!("{line}");
        let _ = stop.send(());
        let _ = served.await;
        drop(etcd);
    }
}
