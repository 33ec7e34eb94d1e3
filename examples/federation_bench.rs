//! Benchmark (not a test): identity tokens (ES256 JWTs) issued per second
//! and token exchanges (RFC 8693 delegated tokens) per second, each beside
//! gRPC Get in the same run, with N concurrent connections (default 16) for
//! S seconds (default 5), against one in-process dev server.
//!
//! Phases: `grpc_get` (a KV read with the root token), `identity_token`
//! (`Federation/IdentityToken` by a ci-runner identity for a role with one
//! audience), `token_exchange` (`Auth/ExchangeToken` by an ai-agent with
//! its own token, for a service account's exchange-only token; each call
//! makes and stores a delegated token and waits for disk, as a real
//! exchange does), and `grpc_get` once more, so a drift of the machine's
//! speed during the run shows.
//!
//! Prints one line per phase, then one `summary` line of `key=value` pairs:
//! calls per second, p99 in milliseconds, the 1-minute load average before
//! and after, the ratios to the mean of the two Get phases, and whether the
//! issue's goals (identity tokens at least 0.5 of Get, exchanges at least
//! 0.3) were met. The figures depend on the machine and its load; the
//! ratios less so.
//!
//! ```sh
//! cargo run --release --example federation_bench -- [CONNECTIONS] [SECONDS]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward::client::{Client, ClientOptions, ExchangeOptions, IssueOptions, PutOptions};
use keyward::proto::v1::CreateIdentityRequest;
use keyward::secrecy::{SecretBytes, SecretData};

#[derive(Clone, Copy)]
struct Stats {
    rate: f64,
    p99_ms: f64,
}

type Setup<S> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = S> + Send>>>;

/// Runs `connections` workers for `seconds`, each with its own state from
/// `setup`, calling `op` in a loop; prints and returns the figures.
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
    let mut states = Vec::with_capacity(connections);
    for _ in 0..connections {
        states.push(setup().await);
    }
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for mut state in states {
        let op = op.clone();
        workers.push(tokio::spawn(async move {
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
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    let rate = all.len() as f64 / elapsed;
    let p99_ms = all
        .get(all.len().saturating_mul(99) / 100)
        .copied()
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0;
    println!(
        "phase={name} connections={connections} seconds={seconds} calls={} per_second={rate:.0} p99_ms={p99_ms:.2}",
        all.len()
    );
    Stats { rate, p99_ms }
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

/// An identity with `policies`, logged in with a secret-id: its token.
async fn identity_token_of(
    root: &Client,
    anon: &Client,
    name: &str,
    kind: &str,
    policies: Vec<String>,
) -> String {
    root.identity_create(CreateIdentityRequest {
        name: name.into(),
        kind: kind.into(),
        owner: "bench".into(),
        description: "federation bench".into(),
        policies,
        expires_in_seconds: 0,
    })
    .await
    .unwrap();
    let sid = root.identity_secret_id(name, 0, 0, &[]).await.unwrap();
    anon.login_approle(&sid.role_id, &sid.secret_id, 3600)
        .await
        .unwrap()
        .token
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().map_or(16, |a| a.parse().unwrap());
    let seconds: u64 = args.next().map_or(5, |a| a.parse().unwrap());
    let load_before = load1();

    let dir = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let vault = keyward::dev::open_with(
        &dir.path().join("kw"),
        None,
        keyward::clock::Clock::system(),
        |c| {
            c.federation.issuer = Some("https://keyward.bench.example".into());
            c.federation.trust_domain = Some("bench.example".into());
        },
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let root_token = vault.credentials.root_token.clone();
    let ca = vault.certs.ca.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vault.server.serve(listener, None, async move {
        let _ = stopped.await;
    }));
    let options = move |token: Option<&str>| ClientOptions {
        addr: format!("https://{addr}"),
        token: token.map(str::to_owned),
        ca_cert: Some(ca.clone()),
        ..ClientOptions::default()
    };
    let root = Client::connect(options(Some(&root_token))).await.unwrap();
    let anon = Client::connect(options(None)).await.unwrap();

    // The data every phase uses.
    let mut data = SecretData::new();
    data.insert("password".into(), SecretBytes::from("bench-value"));
    root.put("bench/kv", &data, PutOptions::default())
        .await
        .unwrap();
    root.put_oidc_role(
        "bench",
        vec!["sts.bench.example".into()],
        Duration::from_secs(600),
        [("team".to_owned(), "{{identity.owner}}".to_owned())].into(),
    )
    .await
    .unwrap();
    root.policy_put(
        "bench-fed",
        "[[rule]]\npath = \"sys/oidc/bench\"\ncapabilities = [\"issue\"]\n\
         [[rule]]\npath = \"sys/token\"\ncapabilities = [\"issue\"]\n\
         [[rule]]\npath = \"secret/bench/*\"\ncapabilities = [\"read\"]\n",
    )
    .await
    .unwrap();
    let ci_token = identity_token_of(
        &root,
        &anon,
        "bench-ci",
        "ci-runner",
        vec!["bench-fed".into()],
    )
    .await;
    let subject_token = identity_token_of(
        &root,
        &anon,
        "bench-subject",
        "service-account",
        vec!["bench-fed".into()],
    )
    .await;
    let agent_token = identity_token_of(
        &root,
        &anon,
        "bench-agent",
        "ai-agent",
        vec!["bench-fed".into()],
    )
    .await;
    let subject = anon.with_token(&subject_token).unwrap();

    let client_with = |token: String| -> Setup<Client> {
        let opts = options(Some(&token));
        Box::new(move || {
            let opts = opts.clone();
            Box::pin(async move { Client::connect(opts).await.unwrap() })
        })
    };

    let get_before = phase(
        "grpc_get",
        connections,
        seconds,
        client_with(root_token.clone()),
        |c: Client| async move {
            c.get("bench/kv").await.unwrap();
            c
        },
    )
    .await;
    let identity_tokens = phase(
        "identity_token",
        connections,
        seconds,
        client_with(ci_token),
        |c: Client| async move {
            c.identity_token("bench", None, None).await.unwrap();
            c
        },
    )
    .await;
    // Each worker exchanges its own exchange-only subject token (one per
    // worker, minted now) with the agent's token.
    let mut may_act = Vec::with_capacity(connections);
    for _ in 0..connections {
        may_act.push(
            subject
                .issue_may_act_token(
                    IssueOptions {
                        policies: vec!["bench-fed".into()],
                        ttl: Some(Duration::from_secs(3600)),
                        ..IssueOptions::default()
                    },
                    "bench-agent",
                )
                .await
                .unwrap()
                .token,
        );
    }
    let may_act = Arc::new(std::sync::Mutex::new(may_act));
    let agent_opts = options(Some(&agent_token));
    let exchanges = phase(
        "token_exchange",
        connections,
        seconds,
        Box::new(move || {
            let opts = agent_opts.clone();
            let token = may_act.lock().unwrap().pop().unwrap();
            Box::pin(async move { (Client::connect(opts).await.unwrap(), Arc::new(token)) })
        }),
        |(c, token): (Client, Arc<String>)| async move {
            c.exchange_token(&token, ExchangeOptions::default())
                .await
                .unwrap();
            (c, token)
        },
    )
    .await;
    let get_after = phase(
        "grpc_get",
        connections,
        seconds,
        client_with(root_token.clone()),
        |c: Client| async move {
            c.get("bench/kv").await.unwrap();
            c
        },
    )
    .await;

    let get_rate = (get_before.rate + get_after.rate) / 2.0;
    let ratio_identity = identity_tokens.rate / get_rate;
    let ratio_exchange = exchanges.rate / get_rate;
    let goal = |r: f64, at: f64| if r >= at { "met" } else { "missed" };
    let mut line = format!(
        "summary target=keyward-inprocess connections={connections} seconds={seconds} load1_before={load_before} load1_after={}",
        load1()
    );
    push(&mut line, "grpc_get_before", get_before);
    push(&mut line, "identity_token", identity_tokens);
    push(&mut line, "token_exchange", exchanges);
    push(&mut line, "grpc_get_after", get_after);
    write!(
        line,
        " ratio_identity_token={ratio_identity:.2} ratio_exchange={ratio_exchange:.2} goal_identity_0.5={} goal_exchange_0.3={}",
        goal(ratio_identity, 0.5),
        goal(ratio_exchange, 0.3)
    )
    .unwrap();
    println!("{line}");
    let _ = stop.send(());
    let _ = server.await;
}
