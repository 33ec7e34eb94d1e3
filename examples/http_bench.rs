//! Benchmark (not a test): KV v2 read and AppRole login over the
//! Vault-compatible HTTPS API beside gRPC Get and Login, in the same run,
//! each with N concurrent connections (default 64) for S seconds (default 5).
//!
//! Two modes:
//!
//! - default: one in-process dev server; phases `grpc_noop`
//!   (`grpc.health.v1.Health/Check`), `http_noop` (`GET /v1/sys/health`),
//!   `http_kv_read`, `grpc_get`, `http_approle_login`, `grpc_login`.
//! - `--external NAME`: only the HTTP phases (`http_noop`, `http_kv_read`,
//!   `http_approle_login`) against a Vault-compatible server in another
//!   process (OpenBao, or a `keyward dev` process), read from the environment:
//!   `BENCH_HTTP_ADDR` (ip:port), `BENCH_CA` (PEM file that signs its
//!   certificate for `localhost`), `BENCH_TOKEN` (may read
//!   `secret/data/bench/kv`, which must exist), `BENCH_ROLE_ID`,
//!   `BENCH_SECRET_ID` (an AppRole secret-id with unlimited uses).
//!
//! Prints one line per phase, then one `summary` line of `key=value` pairs
//! for scripts (calls per second, p99 in milliseconds, the 1-minute load
//! average before and after, and in the default mode the ratios HTTP/gRPC and
//! whether the 0.6 goals were met). The figures depend on the machine and its
//! load, the ratios less so. `examples/openbao_bench.sh` runs both modes
//! against OpenBao, three times.
//!
//! ```sh
//! cargo run --release --example http_bench -- [CONNECTIONS] [SECONDS]
//! cargo run --release --example http_bench -- --external openbao [CONNECTIONS] [SECONDS]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward::client::{Client, ClientOptions, PutOptions};
use keyward::proto::v1::CreateIdentityRequest;
use keyward::secrecy::{SecretBytes, SecretData};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

type Sender = hyper::client::conn::http1::SendRequest<axum::body::Body>;

/// One keep-alive HTTPS/1.1 connection to the server.
async fn http_connection(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
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

/// Calls per second and 99th percentile latency of one phase.
#[derive(Clone, Copy)]
struct Stats {
    rate: f64,
    p99_ms: f64,
}

/// Runs `connections` workers for `seconds`; each makes its state with
/// `setup`, then calls `op` in a loop. Prints and returns the figures.
async fn phase<S, SF, F, OF>(
    name: &str,
    connections: usize,
    seconds: u64,
    setup: SF,
    op: F,
) -> Stats
where
    S: Send + 'static,
    SF: Fn() -> std::pin::Pin<Box<dyn Future<Output = S> + Send>>,
    F: Fn(S) -> OF + Clone + Send + 'static,
    OF: Future<Output = S> + Send,
{
    let mut states = Vec::new();
    for _ in 0..connections {
        states.push(setup().await);
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
    // The last calls end a little after `until`: divide by the real span.
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
        all.len(),
    );
    Stats { rate, p99_ms }
}

/// An HTTP phase: `method path` with `token` and `body` on every call of
/// every connection; any status but 200 stops the benchmark.
#[allow(clippy::too_many_arguments)]
async fn http_phase(
    name: &str,
    connections: usize,
    seconds: u64,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &'static str,
    path: &'static str,
    token: Option<Arc<String>>,
    body: Vec<u8>,
) -> Stats {
    let body = Arc::new(body);
    phase(
        name,
        connections,
        seconds,
        move || Box::pin(http_connection(addr, tls.clone())),
        move |mut s: Sender| {
            let (token, body) = (token.clone(), body.clone());
            async move {
                let code = http_call(
                    &mut s,
                    method,
                    path,
                    token.as_deref().map(String::as_str),
                    &body,
                )
                .await;
                assert_eq!(code, 200, "{method} {path}");
                s
            }
        },
    )
    .await
}

/// The 1-minute load average of the machine.
fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// The HTTP phases every target runs, with the same client code.
struct HttpTarget {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: Arc<String>,
    login_body: Vec<u8>,
}

async fn noop_phase(t: &HttpTarget, connections: usize, seconds: u64) -> Stats {
    http_phase(
        "http_noop",
        connections,
        seconds,
        t.addr,
        t.tls.clone(),
        "GET",
        "/v1/sys/health",
        None,
        Vec::new(),
    )
    .await
}

async fn read_phase(t: &HttpTarget, connections: usize, seconds: u64) -> Stats {
    http_phase(
        "http_kv_read",
        connections,
        seconds,
        t.addr,
        t.tls.clone(),
        "GET",
        "/v1/secret/data/bench/kv",
        Some(t.token.clone()),
        Vec::new(),
    )
    .await
}

async fn login_phase(t: &HttpTarget, connections: usize, seconds: u64) -> Stats {
    http_phase(
        "http_approle_login",
        connections,
        seconds,
        t.addr,
        t.tls.clone(),
        "POST",
        "/v1/auth/approle/login",
        None,
        t.login_body.clone(),
    )
    .await
}

fn login_body(role_id: &str, secret_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "role_id": role_id, "secret_id": secret_id })).unwrap()
}

fn push(line: &mut String, name: &str, s: Stats) {
    write!(line, " {name}={:.0} {name}_p99_ms={:.2}", s.rate, s.p99_ms).unwrap();
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        eprintln!("--external needs {name} in the environment");
        std::process::exit(2)
    })
}

/// `--external NAME`: the HTTP phases against a server in another process.
async fn external(name: &str, connections: usize, seconds: u64) {
    let target = HttpTarget {
        addr: env("BENCH_HTTP_ADDR")
            .parse()
            .expect("BENCH_HTTP_ADDR: ip:port"),
        tls: Arc::new(client_tls(Path::new(&env("BENCH_CA")))),
        token: Arc::new(env("BENCH_TOKEN")),
        login_body: login_body(&env("BENCH_ROLE_ID"), &env("BENCH_SECRET_ID")),
    };
    let load_before = load1();
    let noop = noop_phase(&target, connections, seconds).await;
    let read = read_phase(&target, connections, seconds).await;
    let login = login_phase(&target, connections, seconds).await;
    let mut line = format!(
        "summary target={name} connections={connections} seconds={seconds} load1_before={load_before} load1_after={}",
        load1()
    );
    push(&mut line, "http_noop", noop);
    push(&mut line, "http_kv_read", read);
    push(&mut line, "http_approle_login", login);
    println!("{line}");
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let external_name = if args.first().map(String::as_str) == Some("--external") {
        assert!(args.len() >= 2, "--external needs a NAME");
        let name = args[1].clone();
        args.drain(..2);
        Some(name)
    } else {
        None
    };
    let mut args = args.into_iter();
    let connections: usize = args.next().map_or(64, |a| a.parse().unwrap());
    let seconds: u64 = args.next().map_or(5, |a| a.parse().unwrap());
    if let Some(name) = external_name {
        external(&name, connections, seconds).await;
        return;
    }
    let load_before = load1();

    let dir = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let vault = keyward::dev::open(&dir.path().join("kw"), None)
        .await
        .unwrap();
    let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc_listener.local_addr().unwrap();
    let http_addr = http_listener.local_addr().unwrap();
    let root_token = vault.credentials.root_token.clone();
    let ca = vault.certs.ca.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vault.server.with_http_listener(http_listener).serve(
        grpc_listener,
        None,
        async move {
            let _ = stopped.await;
        },
    ));

    let options = |token: Option<&str>| ClientOptions {
        addr: format!("https://{grpc_addr}"),
        token: token.map(str::to_owned),
        ca_cert: Some(ca.clone()),
        ..ClientOptions::default()
    };
    let root = Client::connect(options(Some(&root_token))).await.unwrap();
    let mut data = SecretData::new();
    data.insert("password".into(), SecretBytes::from("bench-value"));
    root.put("bench/kv", &data, PutOptions::default())
        .await
        .unwrap();
    root.identity_create(CreateIdentityRequest {
        name: "bench-bot".into(),
        kind: "service-account".into(),
        owner: "bench".into(),
        description: "http bench".into(),
        policies: vec![],
        expires_in_seconds: 0,
    })
    .await
    .unwrap();
    let sid = root
        .identity_secret_id("bench-bot", 0, 0, &[])
        .await
        .unwrap();
    let target = HttpTarget {
        addr: http_addr,
        tls: Arc::new(client_tls(&ca)),
        token: Arc::new(root_token.clone()),
        login_body: login_body(&sid.role_id, &sid.secret_id),
    };
    let grpc_client = |token: Option<String>| {
        let opts = options(token.as_deref());
        move || {
            let opts = opts.clone();
            Box::pin(async move { Client::connect(opts).await.unwrap() })
                as std::pin::Pin<Box<dyn Future<Output = Client> + Send>>
        }
    };

    let grpc_noop = phase(
        "grpc_noop",
        connections,
        seconds,
        grpc_client(None),
        |c: Client| async move {
            assert!(c.health().await.unwrap());
            c
        },
    )
    .await;
    let http_noop = noop_phase(&target, connections, seconds).await;
    let http_read = read_phase(&target, connections, seconds).await;
    let grpc_get = phase(
        "grpc_get",
        connections,
        seconds,
        grpc_client(Some(root_token.clone())),
        |c: Client| async move {
            c.get("bench/kv").await.unwrap();
            c
        },
    )
    .await;
    let http_login = login_phase(&target, connections, seconds).await;
    let grpc_login = {
        let (role, secret) = (
            Arc::new(sid.role_id.clone()),
            Arc::new(sid.secret_id.clone()),
        );
        phase(
            "grpc_login",
            connections,
            seconds,
            grpc_client(None),
            move |c: Client| {
                let (role, secret) = (role.clone(), secret.clone());
                async move {
                    c.login_approle(&role, &secret, 0).await.unwrap();
                    c
                }
            },
        )
        .await
    };
    let ratio_read = http_read.rate / grpc_get.rate;
    let ratio_login = http_login.rate / grpc_login.rate;
    let goal = |r: f64| if r >= 0.6 { "met" } else { "missed" };
    let mut line = format!(
        "summary target=keyward-inprocess connections={connections} seconds={seconds} load1_before={load_before} load1_after={}",
        load1()
    );
    push(&mut line, "grpc_noop", grpc_noop);
    push(&mut line, "http_noop", http_noop);
    push(&mut line, "http_kv_read", http_read);
    push(&mut line, "grpc_get", grpc_get);
    push(&mut line, "http_approle_login", http_login);
    push(&mut line, "grpc_login", grpc_login);
    write!(
        line,
        " ratio_read={ratio_read:.2} ratio_login={ratio_login:.2} goal_read_0.6={} goal_login_0.6={}",
        goal(ratio_read),
        goal(ratio_login)
    )
    .unwrap();
    println!("{line}");
    let _ = stop.send(());
    let _ = server.await;
}

fn client_tls(ca: &Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}
