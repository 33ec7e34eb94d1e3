//! Benchmark client (not a test): dynamic database credentials over the
//! Vault-compatible HTTPS API, the same code against any server (a
//! `keyward dev` process or OpenBao). `examples/openbao_dynamic_bench.sh`
//! starts both and runs this against each.
//!
//! Phases, each with IN_FLIGHT keep-alive HTTPS/1.1 connections:
//! - `http_noop`: `GET /v1/sys/health` for SECONDS;
//! - `creds`: `GET /v1/database/creds/<BENCH_ROLE>` for SECONDS (every
//!   answer must be 200 with a `lease_id`);
//! - `revoke_by_id`: half the leases, `PUT /v1/sys/leases/revoke` with
//!   `{"lease_id": ...}`, until done;
//! - `revoke_prefix`: one `PUT /v1/sys/leases/revoke-prefix/<BENCH_PREFIX>`
//!   for the rest.
//!
//! Environment: `BENCH_HTTP_ADDR` (ip:port), `BENCH_CA` (PEM of the CA of
//! its certificate for `localhost`), `BENCH_TOKEN`, `BENCH_ROLE`,
//! `BENCH_PREFIX` (the lease prefix of the role, e.g.
//! `database/creds/bench`).
//!
//! ```sh
//! dynamic_http_bench NAME [IN_FLIGHT] [SECONDS]      # 16 5
//! ```
//!
//! Prints one line per phase and one `summary` line: rates, p99s, the
//! ratio of creds to the no-op, and the 1-minute load average.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

type Sender = hyper::client::conn::http1::SendRequest<axum::body::Body>;

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

/// One call; returns the status and the body.
async fn call(
    sender: &mut Sender,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
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
    let bytes = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), 1 << 20)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

#[derive(Clone, Copy)]
struct Stats {
    rate: f64,
    p99_ms: f64,
}

fn stats(name: &str, in_flight: usize, mut all: Vec<Duration>, elapsed: f64) -> Stats {
    all.sort();
    let rate = all.len() as f64 / elapsed;
    let p99_ms = all
        .get(all.len().saturating_mul(99) / 100)
        .copied()
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0;
    println!(
        "phase={name} in_flight={in_flight} calls={} seconds={elapsed:.2} per_second={rate:.0} p99_ms={p99_ms:.2}",
        all.len()
    );
    Stats { rate, p99_ms }
}

struct Target {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: Arc<String>,
}

/// `in_flight` connections call `GET path` for `seconds`; with `keep`, the
/// `lease_id` of each answer is kept.
async fn timed(
    t: &Target,
    name: &str,
    in_flight: usize,
    seconds: u64,
    path: String,
    token: bool,
) -> (Stats, Vec<String>) {
    let mut senders = Vec::new();
    for _ in 0..in_flight {
        senders.push(http_connection(t.addr, t.tls.clone()).await);
    }
    let kept = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for mut s in senders {
        let path = path.clone();
        let kept = kept.clone();
        let tok = token.then(|| t.token.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let t0 = Instant::now();
                let (code, body) = call(
                    &mut s,
                    "GET",
                    &path,
                    tok.as_deref().map(String::as_str),
                    b"",
                )
                .await;
                assert_eq!(code, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
                if tok.is_some() {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let id = v["lease_id"].as_str().expect("an answer with a lease_id");
                    kept.lock().unwrap().push(id.to_owned());
                }
                latencies.push(t0.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let kept = std::mem::take(&mut *kept.lock().unwrap());
    (stats(name, in_flight, all, elapsed), kept)
}

async fn revoke_all(t: &Target, ids: Vec<String>, in_flight: usize) -> Stats {
    let queue = Arc::new(Mutex::new(ids));
    let mut senders = Vec::new();
    for _ in 0..in_flight {
        senders.push(http_connection(t.addr, t.tls.clone()).await);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in senders {
        let queue = queue.clone();
        let token = t.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(id) = queue.lock().unwrap().pop() else {
                    break;
                };
                let body = serde_json::to_vec(&serde_json::json!({ "lease_id": id })).unwrap();
                let t0 = Instant::now();
                let (code, answer) =
                    call(&mut s, "PUT", "/v1/sys/leases/revoke", Some(&token), &body).await;
                assert_eq!(
                    code / 100,
                    2,
                    "revoke {id}: {}",
                    String::from_utf8_lossy(&answer)
                );
                latencies.push(t0.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    stats(
        "revoke_by_id",
        in_flight,
        all,
        start.elapsed().as_secs_f64(),
    )
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        eprintln!("dynamic_http_bench needs {name} in the environment");
        std::process::exit(2)
    })
}

fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn push(line: &mut String, name: &str, s: Stats) {
    write!(
        line,
        " {name}_per_second={:.0} {name}_p99_ms={:.2}",
        s.rate, s.p99_ms
    )
    .unwrap();
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

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args
        .first()
        .cloned()
        .expect("usage: dynamic_http_bench NAME [IN_FLIGHT] [SECONDS]");
    let in_flight: usize = args.get(1).map_or(16, |a| a.parse().unwrap());
    let seconds: u64 = args.get(2).map_or(5, |a| a.parse().unwrap());
    let target = Target {
        addr: env("BENCH_HTTP_ADDR")
            .parse()
            .expect("BENCH_HTTP_ADDR: ip:port"),
        tls: Arc::new(client_tls(Path::new(&env("BENCH_CA")))),
        token: Arc::new(env("BENCH_TOKEN")),
    };
    let role = env("BENCH_ROLE");
    let prefix = env("BENCH_PREFIX");
    let load_before = load1();
    let (noop, _) = timed(
        &target,
        "http_noop",
        in_flight,
        seconds,
        "/v1/sys/health".into(),
        false,
    )
    .await;
    let (creds, mut leases) = timed(
        &target,
        "creds",
        in_flight,
        seconds,
        format!("/v1/database/creds/{role}"),
        true,
    )
    .await;
    let by_prefix = leases.split_off(leases.len() / 2);
    let revoke = revoke_all(&target, leases, in_flight).await;
    let mut s = http_connection(target.addr, target.tls.clone()).await;
    let t0 = Instant::now();
    let (code, answer) = call(
        &mut s,
        "PUT",
        &format!("/v1/sys/leases/revoke-prefix/{prefix}"),
        Some(&target.token),
        b"",
    )
    .await;
    let prefix_s = t0.elapsed().as_secs_f64();
    assert_eq!(
        code / 100,
        2,
        "revoke-prefix: {}",
        String::from_utf8_lossy(&answer)
    );
    let prefix_rate = by_prefix.len() as f64 / prefix_s;
    println!(
        "phase=revoke_prefix leases={} seconds={prefix_s:.2} per_second={prefix_rate:.0}",
        by_prefix.len()
    );
    let mut line = format!(
        "summary target={name} in_flight={in_flight} seconds={seconds} load1_before={load_before} load1_after={}",
        load1()
    );
    push(&mut line, "http_noop", noop);
    push(&mut line, "creds", creds);
    push(&mut line, "revoke_by_id", revoke);
    write!(
        line,
        " revoke_prefix_leases={} revoke_prefix_per_second={prefix_rate:.0} ratio_creds={:.4} ratio_revoke={:.4}",
        by_prefix.len(),
        creds.rate / noop.rate,
        revoke.rate / noop.rate
    )
    .unwrap();
    println!("{line}");
}
