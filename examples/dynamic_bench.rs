//! Benchmark (not a test): PostgreSQL dynamic credentials issued per
//! second with 16 and with 64 calls in flight, and revoked per second (by
//! lease id with 16 in flight, and one `revoke --prefix` per role of
//! everything left), each beside a no-op gRPC call
//! (`grpc.health.v1.Health/Check`) on the same in-process dev server with as
//! many in flight, printed as a ratio. At the end it counts the `kw_<role>_`
//! users left in PostgreSQL (there must be none).
//!
//! Two roles are measured, both granting one existing role (`IN ROLE`, made
//! here as `kwbench_granted`): one with the default SCRAM verifier (4096
//! PBKDF2 rounds, which PostgreSQL runs once more on `CREATE ROLE`), and one
//! made with `scram_iterations=16` (`BENCH_FAST_ITERATIONS`), the `_fast`
//! figures.
//!
//! The admin login comes from the environment: `BENCH_PG_HOST`
//! (127.0.0.1), `BENCH_PG_PORT` (5432), `BENCH_PG_USER` (postgres),
//! `BENCH_PG_PASSWORD` (empty), `BENCH_PG_DATABASE` (postgres).
//!
//! ```sh
//! cargo run --release --example dynamic_bench -- [SECONDS]
//! ```
//!
//! Prints one line per phase, then one `summary` line of `key=value` pairs
//! (calls per second, p99 in milliseconds, CPU microseconds per call of
//! this process — server and client — and of PostgreSQL's processes,
//! ratios to the no-op call, the 1-minute load average before and after,
//! users left). The CPU per call depends much less on the machine's load
//! than the rates do. Figures depend on
//! the machine and its load; the ratios less so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward::client::{Client, ClientOptions, DynamicRoleSpec, PutOptions};
use keyward::secrecy::{SecretBytes, SecretData};

/// Calls per second, 99th percentile latency, and CPU microseconds per
/// call of this process (server and client) and of PostgreSQL's processes.
#[derive(Clone, Copy)]
struct Stats {
    rate: f64,
    p99_ms: f64,
    cpu_us: f64,
    pg_cpu_us: f64,
}

/// User + system CPU ticks (1/100 s on Linux) of process `pid`, from
/// /proc/PID/stat (fields 14 and 15), and its command name.
fn ticks(pid: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let u: u64 = rest.get(11)?.parse().ok()?;
    let s: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, u + s))
}

/// CPU ticks of this process and of every `postgres` process now (a
/// backend that exits meanwhile takes its ticks with it; the pooled admin
/// sessions stay).
fn cpu_now() -> (u64, u64) {
    let own = ticks("self").map_or(0, |(_, t)| t);
    let mut pg = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.bytes().all(|b| b.is_ascii_digit()) {
                if let Some((comm, t)) = ticks(&name) {
                    if comm == "postgres" {
                        pg += t;
                    }
                }
            }
        }
    }
    (own, pg)
}

fn stats(
    name: &str,
    in_flight: usize,
    mut latencies: Vec<Duration>,
    elapsed: f64,
    cpu_before: (u64, u64),
) -> Stats {
    let cpu_after = cpu_now();
    latencies.sort();
    let n = latencies.len().max(1) as f64;
    let rate = latencies.len() as f64 / elapsed;
    let p99 = latencies
        .get(latencies.len().saturating_mul(99) / 100)
        .copied()
        .unwrap_or_default();
    let p99_ms = p99.as_secs_f64() * 1000.0;
    let cpu_us = cpu_after.0.saturating_sub(cpu_before.0) as f64 * 10_000.0 / n;
    let pg_cpu_us = cpu_after.1.saturating_sub(cpu_before.1) as f64 * 10_000.0 / n;
    println!(
        "phase={name} in_flight={in_flight} calls={} seconds={elapsed:.2} per_second={rate:.0} p99_ms={p99_ms:.2} cpu_us_per_call={cpu_us:.0} postgres_cpu_us_per_call={pg_cpu_us:.0}",
        latencies.len()
    );
    Stats {
        rate,
        p99_ms,
        cpu_us,
        pg_cpu_us,
    }
}

/// `in_flight` workers, each on its own connection, call `op` for
/// `seconds`; `op` returns what to keep (a lease id).
async fn timed<F, Fut>(
    name: &str,
    clients: &[Client],
    in_flight: usize,
    seconds: u64,
    op: F,
) -> (Stats, Vec<String>)
where
    F: Fn(Client) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send,
{
    let cpu = cpu_now();
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let kept = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..in_flight {
        let client = clients[i % clients.len()].clone();
        let op = op.clone();
        let kept = kept.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                if let Some(id) = op(client.clone()).await {
                    kept.lock().unwrap().push(id);
                }
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
    let kept = std::mem::take(&mut *kept.lock().unwrap());
    (stats(name, in_flight, all, elapsed, cpu), kept)
}

/// Revokes `ids` by id, `in_flight` at a time.
async fn revoke_all(clients: &[Client], ids: Vec<String>, in_flight: usize) -> Stats {
    let queue = Arc::new(Mutex::new(ids));
    let cpu = cpu_now();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..in_flight {
        let client = clients[i % clients.len()].clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(id) = queue.lock().unwrap().pop() else {
                    break;
                };
                let t = Instant::now();
                let (done, pending) = client.lease_revoke(&id).await.unwrap();
                assert_eq!((done, pending), (1, 0), "lease {id} not revoked at once");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    stats(
        "revoke_by_id",
        in_flight,
        all,
        start.elapsed().as_secs_f64(),
        cpu,
    )
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
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
        " {name}_per_second={:.0} {name}_p99_ms={:.2} {name}_cpu_us={:.0} {name}_pg_cpu_us={:.0}",
        s.rate, s.p99_ms, s.cpu_us, s.pg_cpu_us
    )
    .unwrap();
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seconds: u64 = std::env::args()
        .nth(1)
        .map_or(5, |a| a.parse().expect("SECONDS is a whole number"));
    let pg_host = env("BENCH_PG_HOST", "127.0.0.1");
    let pg_port = env("BENCH_PG_PORT", "5432");
    let pg_user = env("BENCH_PG_USER", "postgres");
    let pg_password = env("BENCH_PG_PASSWORD", "");
    let pg_database = env("BENCH_PG_DATABASE", "postgres");
    let fast_iterations = env("BENCH_FAST_ITERATIONS", "16");
    let load_before = load1();

    // The admin login, also used at the end to count users left behind.
    let (pg, conn) = tokio_postgres::Config::new()
        .host(&pg_host)
        .port(pg_port.parse().unwrap())
        .user(&pg_user)
        .password(&pg_password)
        .dbname(&pg_database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    pg.batch_execute(
        "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kwbench_granted') \
         THEN CREATE ROLE kwbench_granted NOLOGIN; END IF; END$$",
    )
    .await
    .unwrap();

    let dir = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let vault = keyward::dev::open(&dir.path().join("kw"), None)
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
    let options = ClientOptions {
        addr: format!("https://{addr}"),
        token: Some(root_token),
        ca_cert: Some(ca),
        ..ClientOptions::default()
    };
    // One connection per 4 calls in flight (HTTP/2 multiplexes).
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(Client::connect(options.clone()).await.unwrap());
    }
    let root = clients[0].clone();

    let mut admin = SecretData::new();
    for (k, v) in [
        ("host", &pg_host),
        ("port", &pg_port),
        ("username", &pg_user),
        ("password", &pg_password),
        ("database", &pg_database),
    ] {
        admin.insert(k.into(), SecretBytes::from(v.as_str()));
    }
    root.put("bench/pg-admin", &admin, PutOptions::default())
        .await
        .unwrap();
    let role = format!("bench{}", std::process::id());
    let fast_role = format!("benchfast{}", std::process::id());
    for (name, iterations) in [(&role, None), (&fast_role, Some(&fast_iterations))] {
        let mut config: BTreeMap<String, String> = [
            ("admin_secret".to_owned(), "bench/pg-admin".to_owned()),
            ("roles".to_owned(), "kwbench_granted".to_owned()),
        ]
        .into_iter()
        .collect();
        if let Some(n) = iterations {
            config.insert("scram_iterations".to_owned(), n.clone());
        }
        root.dynamic_role_put(&DynamicRoleSpec {
            name: name.clone(),
            provider: "postgres".into(),
            config,
            ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7200),
        })
        .await
        .unwrap();
    }

    let noop = |c: Client| async move {
        assert!(c.health().await.unwrap());
        None
    };
    let issue = |role: &String| {
        let role = role.clone();
        move |c: Client| {
            let role = role.clone();
            async move { Some(c.creds(&role, None).await.unwrap().lease_id) }
        }
    };
    let (noop16, _) = timed("grpc_noop", &clients, 16, seconds, noop).await;
    let (issue16, mut leases) = timed("issue", &clients, 16, seconds, issue(&role)).await;
    let (fast16, more) = timed("issue_fast", &clients, 16, seconds, issue(&fast_role)).await;
    leases.extend(more);
    let (noop64, _) = timed("grpc_noop", &clients, 64, seconds, noop).await;
    let (issue64, more) = timed("issue", &clients, 64, seconds, issue(&role)).await;
    leases.extend(more);
    let (fast64, more) = timed("issue_fast", &clients, 64, seconds, issue(&fast_role)).await;
    leases.extend(more);
    // Half by id (both roles mixed), the rest with one revoke --prefix per role.
    let by_prefix = leases.split_off(leases.len() / 2);
    let revoke16 = revoke_all(&clients, leases, 16).await;
    let t = Instant::now();
    let (mut done, mut pending) = (0, 0);
    for r in [&role, &fast_role] {
        let (d, p) = root
            .lease_revoke_prefix(&format!("dynamic/{r}"))
            .await
            .unwrap();
        done += d;
        pending += p;
    }
    let prefix_seconds = t.elapsed().as_secs_f64();
    let prefix_rate = f64::from(done) / prefix_seconds;
    println!(
        "phase=revoke_prefix leases={} revoked={done} pending={pending} seconds={prefix_seconds:.2} per_second={prefix_rate:.0}",
        by_prefix.len()
    );

    // Users left behind, looked up in PostgreSQL itself.
    let mut left = 0i64;
    for r in [&role, &fast_role] {
        let pattern = format!("kw\\_{r}\\_%");
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1",
                &[&pattern],
            )
            .await
            .unwrap()
            .get(0);
        left += n;
    }

    let mut line = format!(
        "summary target=keyward-inprocess seconds={seconds} load1_before={load_before} load1_after={}",
        load1()
    );
    push(&mut line, "grpc_noop_16", noop16);
    push(&mut line, "issue_16", issue16);
    push(&mut line, "issue_fast_16", fast16);
    push(&mut line, "grpc_noop_64", noop64);
    push(&mut line, "issue_64", issue64);
    push(&mut line, "issue_fast_64", fast64);
    push(&mut line, "revoke_by_id_16", revoke16);
    write!(
        line,
        " revoke_prefix_per_second={prefix_rate:.0} fast_scram_iterations={fast_iterations} ratio_issue_16={:.3} ratio_issue_fast_16={:.3} ratio_issue_64={:.3} ratio_issue_fast_64={:.3} ratio_revoke_16={:.3} users_left={left}",
        issue16.rate / noop16.rate,
        fast16.rate / noop16.rate,
        issue64.rate / noop64.rate,
        fast64.rate / noop64.rate,
        revoke16.rate / noop16.rate,
    )
    .unwrap();
    println!("{line}");
    let _ = stop.send(());
    let _ = server.await;
    assert_eq!(left, 0, "users left behind in PostgreSQL");
}
