//! Benchmark (not a test): KV v2 read and AppRole login over the
//! Vault-compatible HTTPS API beside gRPC Get and Login, on one in-process
//! dev server, in the same run, each with N concurrent connections (default
//! 64) for S seconds (default 5). Prints one line per phase and the ratios
//! HTTP/gRPC; the figures depend on the machine and its load, the ratios
//! less so.
//!
//! ```sh
//! cargo run --release --example http_bench -- [CONNECTIONS] [SECONDS]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

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

/// Runs `connections` workers for `seconds`; each makes its state with
/// `setup`, then calls `op` in a loop. Prints and returns calls per second.
async fn phase<S, SF, F, OF>(name: &str, connections: usize, seconds: u64, setup: SF, op: F) -> f64
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
    let until = Instant::now() + Duration::from_secs(seconds);
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
    all.sort();
    let rate = all.len() as f64 / seconds as f64;
    let p99 = all
        .get(all.len().saturating_mul(99) / 100)
        .copied()
        .unwrap_or_default();
    println!(
        "phase={name} connections={connections} seconds={seconds} calls={} per_second={rate:.0} p99_ms={:.2}",
        all.len(),
        p99.as_secs_f64() * 1000.0
    );
    rate
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().map_or(64, |a| a.parse().unwrap());
    let seconds: u64 = args.next().map_or(5, |a| a.parse().unwrap());

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
    let tls = Arc::new(client_tls(&ca));

    let token = Arc::new(root_token.clone());
    let http_read = {
        let tls = tls.clone();
        let token = token.clone();
        phase(
            "http_kv_read",
            connections,
            seconds,
            move || Box::pin(http_connection(http_addr, tls.clone())),
            move |mut s: Sender| {
                let token = token.clone();
                async move {
                    let code =
                        http_call(&mut s, "GET", "/v1/secret/data/bench/kv", Some(&token), b"")
                            .await;
                    assert_eq!(code, 200);
                    s
                }
            },
        )
        .await
    };
    let grpc_get = {
        let opts = options(Some(&root_token));
        phase(
            "grpc_get",
            connections,
            seconds,
            move || {
                let opts = opts.clone();
                Box::pin(async move { Client::connect(opts).await.unwrap() })
            },
            |c: Client| async move {
                c.get("bench/kv").await.unwrap();
                c
            },
        )
        .await
    };
    let login_body = serde_json::to_vec(&serde_json::json!({
        "role_id": sid.role_id, "secret_id": sid.secret_id
    }))
    .unwrap();
    let http_login = {
        let tls = tls.clone();
        let body = Arc::new(login_body);
        phase(
            "http_approle_login",
            connections,
            seconds,
            move || Box::pin(http_connection(http_addr, tls.clone())),
            move |mut s: Sender| {
                let body = body.clone();
                async move {
                    let code =
                        http_call(&mut s, "POST", "/v1/auth/approle/login", None, &body).await;
                    assert_eq!(code, 200);
                    s
                }
            },
        )
        .await
    };
    let grpc_login = {
        let opts = options(None);
        let (role, secret) = (
            Arc::new(sid.role_id.clone()),
            Arc::new(sid.secret_id.clone()),
        );
        phase(
            "grpc_login",
            connections,
            seconds,
            move || {
                let opts = opts.clone();
                Box::pin(async move { Client::connect(opts).await.unwrap() })
            },
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
    println!(
        "ratio http_read/grpc_get={:.2} http_login/grpc_login={:.2}",
        http_read / grpc_get,
        http_login / grpc_login
    );
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
