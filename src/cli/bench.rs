//! `keyward bench`: closed-loop load against a live server over TLS. Each
//! phase keeps `concurrency` requests in flight over `connections` TLS
//! connections for a fixed time, then stops by itself. Throughput is read
//! against `grpc.health.v1.Health/Check` (a no-op) on the same connections
//! in the same run, so the ratios mean something on a noisy machine.
//!
//! With `--server-pid PID` (the pid of the server on the same machine) each
//! phase also reports the server's CPU time per call, read from
//! `/proc/PID/stat` before and after the phase: user + system time of every
//! thread, those that ended during the phase included.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use super::output::{emit, Format};
use super::BenchArgs;
use keyward::client::{Client, ClientOptions, IssueOptions, PutOptions};
use keyward::config::ServerConfig;
use keyward::secrecy::{SecretBytes, SecretData};
use keyward::server::Server;

#[derive(Debug, Default)]
pub(super) struct Phase {
    ok: u64,
    pub(super) errors: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU time the server spent during the phase (with `--server-pid`).
    server_cpu: Option<Duration>,
    /// Context switches of the server's threads during the phase (with
    /// `--server-pid`; threads that ended during the phase are not counted).
    server_switches: Option<u64>,
}

impl Phase {
    pub(super) fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Server CPU microseconds per answered call.
    pub(super) fn cpu_us_per_op(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        Some(cpu.as_secs_f64() * 1e6 / (self.ok.max(1) as f64))
    }

    /// Server context switches per answered call.
    pub(super) fn switches_per_op(&self) -> Option<f64> {
        Some(self.server_switches? as f64 / (self.ok.max(1) as f64))
    }

    pub(super) fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i].as_secs_f64() * 1000.0
    }
}

/// User + system CPU time of process `pid` so far, from `/proc/PID/stat`
/// (fields 14 and 15, in clock ticks of `USER_HZ`, which Linux fixes at 100
/// for every reader of `/proc`). It counts the threads that have ended too.
fn process_cpu(pid: u32) -> Result<Duration> {
    const USER_HZ: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat has no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    let ticks = |field: usize| -> Result<u64> {
        let text = fields
            .get(field - 3)
            .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat is too short"))?;
        Ok(text.parse()?)
    };
    let total = ticks(14)?.saturating_add(ticks(15)?);
    Ok(Duration::from_millis(total.saturating_mul(1000 / USER_HZ)))
}

/// Context switches (voluntary and involuntary) of every live thread of
/// process `pid`, from `/proc/PID/task/*/status`. A thread that ended is no
/// longer listed, so use this over a phase where threads persist.
fn process_switches(pid: u32) -> Result<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total = total.saturating_add(rest.trim().parse().unwrap_or(0));
            }
        }
    }
    Ok(total)
}

/// When a phase ends.
#[derive(Clone, Copy, Debug)]
pub(super) enum Stop {
    /// After this long.
    After(Duration),
    /// After this many calls in all (answered or failed), for counting what
    /// the server does per call (e.g. under `valgrind --tool=callgrind`).
    Calls(u64),
}

/// Runs `op` from `concurrency` workers for `duration`, and reads the CPU
/// time the server at `server_pid` used meanwhile.
pub(super) async fn phase<F, Fut>(
    clients: &[Client],
    concurrency: usize,
    duration: Duration,
    server_pid: Option<u32>,
    op: F,
) -> Result<Phase>
where
    F: Fn(Client, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    phase_until(clients, concurrency, Stop::After(duration), server_pid, op).await
}

/// [`phase`] that ends as `stop` says.
pub(super) async fn phase_until<F, Fut>(
    clients: &[Client],
    concurrency: usize,
    stop: Stop,
    server_pid: Option<u32>,
    op: F,
) -> Result<Phase>
where
    F: Fn(Client, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let cpu_before = server_pid.map(process_cpu).transpose()?;
    let switches_before = server_pid.map(process_switches).transpose()?;
    let mut total = run_phase(clients, concurrency, stop, op).await;
    if let (Some(pid), Some(before)) = (server_pid, cpu_before) {
        total.server_cpu = Some(process_cpu(pid)?.saturating_sub(before));
    }
    if let (Some(pid), Some(before)) = (server_pid, switches_before) {
        total.server_switches = Some(process_switches(pid)?.saturating_sub(before));
    }
    Ok(total)
}

async fn run_phase<F, Fut>(clients: &[Client], concurrency: usize, stop: Stop, op: F) -> Phase
where
    F: Fn(Client, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    let op = Arc::new(op);
    let start = Instant::now();
    let (deadline, calls) = match stop {
        Stop::After(d) => (Some(start + d), u64::MAX),
        Stop::Calls(n) => (None, n),
    };
    // Calls not yet started, shared by the workers.
    let left = Arc::new(AtomicU64::new(calls));
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let client = clients[w % clients.len()].clone();
        let op = op.clone();
        let left = left.clone();
        tasks.push(tokio::spawn(async move {
            let mut p = Phase::default();
            let mut i = 0u64;
            while deadline.is_none_or(|d| Instant::now() < d)
                && left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                let t = Instant::now();
                let ok = op(client.clone(), (w as u64) << 32 | i).await;
                i += 1;
                if ok {
                    p.ok += 1;
                    p.latencies.push(t.elapsed());
                } else {
                    p.errors += 1;
                }
            }
            p
        }));
    }
    let mut total = Phase::default();
    for t in tasks {
        if let Ok(p) = t.await {
            total.ok += p.ok;
            total.errors += p.errors;
            total.latencies.extend(p.latencies);
        }
    }
    total.elapsed = start.elapsed();
    total.latencies.sort_unstable();
    total
}

pub async fn run(options: &ClientOptions, args: &BenchArgs, format: Format) -> Result<()> {
    let concurrency = args.concurrency.max(1);
    let duration = Duration::from_secs(args.seconds.max(1));
    let server_pid = args.server_pid;
    if let Some(pid) = server_pid {
        // Fail before the load starts if the pid cannot be read.
        process_cpu(pid)?;
    }
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(Client::connect(options.clone()).await?);
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let get_path = format!("bench/{run_id}/get");
    let mut data = SecretData::new();
    data.insert("username".into(), SecretBytes::from("bench-user"));
    data.insert(
        "password".into(),
        SecretBytes::from("bench-password-0123456789abcdef"),
    );
    clients[0]
        .put(&get_path, &data, PutOptions::default())
        .await?;

    eprintln!(
        "bench: {concurrency} in flight over {} TLS connections, {}s per phase",
        clients.len(),
        duration.as_secs()
    );
    eprintln!("bench: phase health (grpc.health.v1.Health/Check)");
    let health = phase(
        &clients,
        concurrency,
        duration,
        server_pid,
        |c, _| async move { c.health().await.is_ok() },
    )
    .await?;
    eprintln!("bench: phase get (keyward.v1.Secrets/Get)");
    let path = Arc::new(get_path);
    let get = phase(&clients, concurrency, duration, server_pid, move |c, _| {
        let path = path.clone();
        async move { c.get(&path).await.is_ok() }
    })
    .await?;
    eprintln!("bench: phase put (keyward.v1.Secrets/Put, durable)");
    let data = Arc::new(data);
    let prefix = Arc::new(format!("bench/{run_id}/put"));
    let put = phase(&clients, concurrency, duration, server_pid, move |c, i| {
        let data = data.clone();
        let prefix = prefix.clone();
        async move {
            c.put(
                &format!("{prefix}/{}", i % 1024),
                &data,
                PutOptions::default(),
            )
            .await
            .is_ok()
        }
    })
    .await?;

    // Role-id/secret-id logins at the same concurrency: one identity with
    // one unlimited secret-id, made here; each token lives a minute.
    let bench_name = format!("bench-{run_id}");
    clients[0]
        .policy_put(
            &bench_name,
            &format!("[[rule]]\npath = \"secret/bench/{run_id}/**\"\ncapabilities = [\"read\"]\n"),
        )
        .await?;
    clients[0]
        .identity_create(keyward::proto::v1::CreateIdentityRequest {
            name: bench_name.clone(),
            kind: "service-account".into(),
            owner: "bench".into(),
            description: "made by keyward bench".into(),
            policies: Vec::new(),
            expires_in_seconds: 3600,
        })
        .await?;
    let sid = clients[0]
        .identity_secret_id(&bench_name, 3600, 0, &[])
        .await?;
    eprintln!("bench: phase login (keyward.v1.Auth/Login, approle)");
    let creds = Arc::new((sid.role_id.clone(), sid.secret_id.clone()));
    let login = phase(&clients, concurrency, duration, server_pid, move |c, _| {
        let creds = creds.clone();
        async move { c.login_approle(&creds.0, &creds.1, 60).await.is_ok() }
    })
    .await?;

    // Child tokens of the bench's own token, with one named policy; each
    // lives a minute (durable before the answer, like a login).
    eprintln!("bench: phase issue (keyward.v1.Auth/IssueToken, child tokens)");
    let policies = Arc::new(vec![bench_name.clone()]);
    let issue = phase(&clients, concurrency, duration, server_pid, move |c, _| {
        issue_child(c, policies.clone())
    })
    .await?;

    let ratio = |a: f64, b: f64| (a / b.max(1e-9) * 1000.0).round() / 1000.0;
    let ms = |v: f64| (v * 1000.0).round() / 1000.0;
    let mut summary = json!({
        "concurrency": concurrency,
        "health_rps": health.rps().round(),
        "get_rps": get.rps().round(),
        "get_ratio": ratio(get.rps(), health.rps()),
        "get_p50_ms": ms(get.percentile_ms(0.50)),
        "get_p99_ms": ms(get.percentile_ms(0.99)),
        "health_p99_ms": ms(health.percentile_ms(0.99)),
        "p99_ratio": ratio(get.percentile_ms(0.99), health.percentile_ms(0.99)),
        "put_rps": put.rps().round(),
        "put_to_get": ratio(put.rps(), get.rps()),
        "login_rps": login.rps().round(),
        "login_to_get": ratio(login.rps(), get.rps()),
        "login_p99_ms": ms(login.percentile_ms(0.99)),
        "issue_rps": issue.rps().round(),
        "issue_to_get": ratio(issue.rps(), get.rps()),
        "issue_p99_ms": ms(issue.percentile_ms(0.99)),
        "errors": health.errors + get.errors + put.errors + login.errors + issue.errors,
        // Local: PolicySet::check over a 50-rule policy (build with --release for the real figure).
        "authz_ns": (keyward::policy::bench_check_ns(1_000_000)? * 10.0).round() / 10.0,
    });
    if let (Some(map), Some(health_cpu), Some(get_cpu)) = (
        summary.as_object_mut(),
        health.cpu_us_per_op(),
        get.cpu_us_per_op(),
    ) {
        let us = |v: Option<f64>| v.map(|v| (v * 10.0).round() / 10.0);
        map.insert("health_cpu_us_per_op".into(), json!(us(Some(health_cpu))));
        map.insert("get_cpu_us_per_op".into(), json!(us(Some(get_cpu))));
        map.insert("put_cpu_us_per_op".into(), json!(us(put.cpu_us_per_op())));
        map.insert(
            "login_cpu_us_per_op".into(),
            json!(us(login.cpu_us_per_op())),
        );
        map.insert(
            "issue_cpu_us_per_op".into(),
            json!(us(issue.cpu_us_per_op())),
        );
        map.insert("cpu_ratio".into(), json!(ratio(get_cpu, health_cpu)));
        let per = |v: Option<f64>| v.map(|v| (v * 100.0).round() / 100.0);
        map.insert(
            "health_switches_per_op".into(),
            json!(per(health.switches_per_op())),
        );
        map.insert(
            "get_switches_per_op".into(),
            json!(per(get.switches_per_op())),
        );
    }
    print_summary(format, &summary);
    Ok(())
}

/// Runs `op` from `concurrency` workers until `requests` calls are
/// answered or refused (each call is made exactly once).
async fn run_count<F, Fut>(clients: &[Client], concurrency: usize, requests: u64, op: F) -> Phase
where
    F: Fn(Client, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let client = clients[w % clients.len()].clone();
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut p = Phase::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break p;
                }
                if op(client.clone(), i).await {
                    p.ok += 1;
                } else {
                    p.errors += 1;
                }
            }
        }));
    }
    let mut total = Phase::default();
    for t in tasks {
        if let Ok(p) = t.await {
            total.ok += p.ok;
            total.errors += p.errors;
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// A `keyward dev` server run under valgrind's callgrind, which counts the
/// instructions the server executes: a count that does not depend on what
/// else the machine is doing. Killed (it is our own child) when dropped.
struct CallgrindServer {
    child: std::process::Child,
    dir: PathBuf,
    options: ClientOptions,
    /// The Vault-compatible API's `host:port` (`VAULT_ADDR`).
    http_addr: Option<String>,
}

impl Drop for CallgrindServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl CallgrindServer {
    /// Starts `keyward dev` on a free loopback port in a new folder under
    /// valgrind, and reads the address, CA and root token it prints.
    fn start() -> Result<Self> {
        use std::io::BufRead;
        for tool in ["valgrind", "callgrind_control"] {
            let found = std::process::Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                anyhow::bail!("{tool} is needed (Debian: apt-get install valgrind)");
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "keyward-bench-instructions-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let child = std::process::Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!(
                "--callgrind-out-file={}",
                dir.join("callgrind.out").display()
            ))
            .arg(std::env::current_exe()?)
            .args(["dev", "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            // A free port: Vault's 8200 may be another server's.
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--data")
            .arg(dir.join("dev"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join("server.log"))?)
            .spawn()?;
        let mut server = Self {
            child,
            dir,
            options: ClientOptions::default(),
            http_addr: None,
        };
        let stdout = server
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout of the server"))?;
        let (mut addr, mut ca, mut token) = (None, None, None);
        // The gRPC lines come first, then the Vault ones; VAULT_TOKEN is last.
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(v) = line.strip_prefix("export KEYWARD_ADDR=") {
                addr = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("export KEYWARD_CACERT=") {
                ca = Some(PathBuf::from(v));
            } else if let Some(v) = line.strip_prefix("export KEYWARD_TOKEN=") {
                token = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("export VAULT_ADDR=https://") {
                server.http_addr = Some(v.to_owned());
            } else if line.starts_with("export VAULT_TOKEN=") {
                break;
            }
        }
        match (addr, ca, token) {
            (Some(addr), Some(ca), Some(token)) => {
                server.options = ClientOptions {
                    addr,
                    token: Some(token),
                    ca_cert: Some(ca),
                    ..ClientOptions::default()
                };
                Ok(server)
            }
            _ => anyhow::bail!(
                "the server under valgrind stopped before it was ready; see {}",
                server.dir.join("server.log").display()
            ),
        }
    }

    /// Dumps callgrind's counters (which zeroes them) and returns the
    /// instructions counted since the previous dump; with `keep`, the dump
    /// is copied to `DIR/callgrind.PHASE`.
    fn dump(&self, keep: Option<(&Path, &str)>) -> Result<u64> {
        let before = self.dump_files()?;
        let status = std::process::Command::new("callgrind_control")
            .arg("--dump")
            .arg(self.child.id().to_string())
            .stdout(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            anyhow::bail!("callgrind_control --dump failed");
        }
        // callgrind_control returns once the dump is written.
        let newest = self
            .dump_files()?
            .into_iter()
            .filter(|f| !before.contains(f))
            .max_by_key(|f| dump_number(f))
            .ok_or_else(|| anyhow::anyhow!("callgrind wrote no dump"))?;
        if let Some((dir, phase)) = keep {
            std::fs::create_dir_all(dir)?;
            std::fs::copy(&newest, dir.join(format!("callgrind.{phase}")))?;
        }
        let text = std::fs::read_to_string(&newest)?;
        callgrind_total(&text).ok_or_else(|| anyhow::anyhow!("{} has no totals", newest.display()))
    }

    fn dump_files(&self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("callgrind.out.") {
                files.push(path);
            }
        }
        Ok(files)
    }
}

/// The instructions a callgrind dump counted: its `summary:` (or
/// `totals:`) line, whose first number is the first event, `Ir`.
fn callgrind_total(dump: &str) -> Option<u64> {
    dump.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The part number of a dump file (`callgrind.out.3` is 3).
fn dump_number(path: &Path) -> u64 {
    path.extension()
        .and_then(|e| e.to_str())
        .and_then(|e| e.parse().ok())
        .unwrap_or(0)
}

/// What `keyward bench instructions` counts beside the gRPC no-op and Get.
pub struct Counted {
    /// The HTTP API's no-op and KV read.
    pub http: bool,
    /// Child-token issues.
    pub issue: bool,
}

/// `keyward bench instructions`: see `BenchMode::Instructions`.
pub async fn instructions(
    args: &BenchArgs,
    requests: u64,
    counted_too: Counted,
    keep: Option<&Path>,
    format: Format,
) -> Result<()> {
    let concurrency = args.concurrency.max(1);
    let requests = requests.max(1);
    eprintln!("bench: starting keyward dev under valgrind --tool=callgrind (slow)");
    let server = tokio::task::spawn_blocking(CallgrindServer::start).await??;
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(Client::connect(server.options.clone()).await?);
    }
    let path = Arc::new(format!("bench/{}/get", uuid::Uuid::new_v4().simple()));
    let mut data = SecretData::new();
    data.insert("username".into(), SecretBytes::from("bench-user"));
    data.insert(
        "password".into(),
        SecretBytes::from("bench-password-0123456789abcdef"),
    );
    clients[0].put(&path, &data, PutOptions::default()).await?;
    let health = |c: Client, _| async move { c.health().await.is_ok() };
    let get = {
        let path = path.clone();
        move |c: Client, _| {
            let path = path.clone();
            async move { c.get(&path).await.is_ok() }
        }
    };
    // Warm up: connections, allocator, the verified-token cache.
    let warm = (requests / 10).max(concurrency as u64);
    run_count(&clients, concurrency, warm, health).await;
    run_count(&clients, concurrency, warm, get.clone()).await;
    let mut counted = Vec::new();
    for name in ["health", "get"] {
        eprintln!("bench: {requests} calls of {name} under callgrind");
        let srv = &server;
        tokio::task::block_in_place(|| srv.dump(None))?;
        let phase = match name {
            "health" => run_count(&clients, concurrency, requests, health).await,
            _ => run_count(&clients, concurrency, requests, get.clone()).await,
        };
        let ir = tokio::task::block_in_place(|| srv.dump(keep.map(|k| (k, name))))?;
        if phase.errors > 0 {
            anyhow::bail!("{} of the {name} calls failed", phase.errors);
        }
        counted.push(ir as f64 / requests as f64);
    }
    drop(clients);
    let (health_ir, get_ir) = (counted[0], counted[1]);
    let mut summary = json!({
        "concurrency": concurrency,
        "requests": requests,
        "health_instructions_per_op": health_ir.round(),
        "get_instructions_per_op": get_ir.round(),
        "instructions_ratio": (get_ir / health_ir.max(1.0) * 1000.0).round() / 1000.0,
    });
    if counted_too.issue {
        let issue_ir = issue_instructions(&server, concurrency, requests, keep).await?;
        if let Some(map) = summary.as_object_mut() {
            map.insert("issue_instructions_per_op".into(), json!(issue_ir.round()));
            map.insert(
                "issue_to_get_instructions".into(),
                json!((issue_ir / get_ir.max(1.0) * 1000.0).round() / 1000.0),
            );
        }
    }
    if counted_too.http {
        let (noop_ir, read_ir) =
            http_instructions(&server, &path, concurrency, requests, keep).await?;
        if let Some(map) = summary.as_object_mut() {
            map.insert(
                "http_health_instructions_per_op".into(),
                json!(noop_ir.round()),
            );
            map.insert(
                "http_read_instructions_per_op".into(),
                json!(read_ir.round()),
            );
            map.insert(
                "http_instructions_ratio".into(),
                json!((read_ir / noop_ir.max(1.0) * 1000.0).round() / 1000.0),
            );
        }
    }
    drop(server);
    print_summary(format, &summary);
    Ok(())
}

/// One child token of the client's token, carrying `policies` and living a
/// minute (durable before its answer, like a login): a call of the issue
/// phase of `keyward bench` and of `bench instructions --issue`.
async fn issue_child(client: Client, policies: Arc<Vec<String>>) -> bool {
    client
        .issue_token(IssueOptions {
            policies: policies.to_vec(),
            ttl: Some(Duration::from_secs(60)),
            ..IssueOptions::default()
        })
        .await
        .is_ok()
}

/// The child-issue part of `bench instructions`: a policy made for the
/// count, then `requests` child tokens of the dev server's root token with
/// it, each living a minute. Returns instructions per issue.
async fn issue_instructions(
    server: &CallgrindServer,
    concurrency: usize,
    requests: u64,
    keep: Option<&Path>,
) -> Result<f64> {
    let client = Client::connect(server.options.clone()).await?;
    let name = format!("bench-{}", uuid::Uuid::new_v4().simple());
    client
        .policy_put(
            &name,
            &format!("[[rule]]\npath = \"secret/{name}/**\"\ncapabilities = [\"read\"]\n"),
        )
        .await?;
    let clients = vec![client];
    let policies = Arc::new(vec![name]);
    let issue = move |c: Client, _| issue_child(c, policies.clone());
    let warm = (requests / 10).max(concurrency as u64);
    run_count(&clients, concurrency, warm, issue.clone()).await;
    eprintln!("bench: {requests} calls of issue under callgrind");
    tokio::task::block_in_place(|| server.dump(None))?;
    let phase = run_count(&clients, concurrency, requests, issue).await;
    let ir = tokio::task::block_in_place(|| server.dump(keep.map(|k| (k, "issue"))))?;
    if phase.errors > 0 {
        anyhow::bail!("{} of the issue calls failed", phase.errors);
    }
    Ok(ir as f64 / requests as f64)
}

/// The HTTP half of `bench instructions`: `GET /v1/sys/health` (the
/// Vault API's no-op) and a KV v2 read of `path`, `requests` of each over
/// `concurrency` keep-alive connections opened before counting (so no TLS
/// handshake is counted). Returns (no-op, read) instructions per call.
async fn http_instructions(
    server: &CallgrindServer,
    path: &str,
    concurrency: usize,
    requests: u64,
    keep: Option<&Path>,
) -> Result<(f64, f64)> {
    let addr = server
        .http_addr
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the server printed no VAULT_ADDR"))?;
    let ca = server
        .options
        .ca_cert
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no CA certificate of the server"))?;
    let token = server.options.token.clone().unwrap_or_default();
    let tls = Arc::new(http_client_tls(&ca)?);
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(HttpConn::open(&addr, tls.clone()).await?);
    }
    let health: Arc<[u8]> = b"GET /v1/sys/health HTTP/1.1\r\nhost: localhost\r\n\r\n"
        .as_slice()
        .into();
    let read: Arc<[u8]> = format!(
        "GET /v1/secret/data/{path} HTTP/1.1\r\nhost: localhost\r\nx-vault-token: {token}\r\n\r\n"
    )
    .into_bytes()
    .into();
    let warm = (requests / 10).max(concurrency as u64);
    conns = run_http_count(conns, health.clone(), warm).await?.0;
    conns = run_http_count(conns, read.clone(), warm).await?.0;
    let mut counted = Vec::new();
    for (name, request) in [("http_health", health), ("http_read", read)] {
        eprintln!("bench: {requests} calls of {name} under callgrind");
        tokio::task::block_in_place(|| server.dump(None))?;
        let (back, refused) = run_http_count(conns, request, requests).await?;
        conns = back;
        let ir = tokio::task::block_in_place(|| server.dump(keep.map(|k| (k, name))))?;
        if refused > 0 {
            anyhow::bail!("{refused} of the {name} calls were not answered 200");
        }
        counted.push(ir as f64 / requests as f64);
    }
    Ok((counted[0], counted[1]))
}

fn http_client_tls(ca: &Path) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One keep-alive HTTP/1.1 connection over TLS, one request at a time:
/// just enough client to count a server's instructions per request.
struct HttpConn {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl HttpConn {
    async fn open(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and reads the whole answer (a `Content-Length`
    /// body); returns its status code.
    async fn call(&mut self, request: &[u8]) -> Result<u16> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(request).await?;
        self.stream.flush().await?;
        let head_end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("malformed status line"))?;
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .ok_or_else(|| anyhow::anyhow!("an answer without Content-Length"))?;
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        self.buf.drain(..head_end + length);
        Ok(status)
    }

    async fn fill(&mut self) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("the server closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Makes `requests` calls of `request` over `conns`, one task per
/// connection; hands the connections back with the count of answers that
/// were not 200.
async fn run_http_count(
    conns: Vec<HttpConn>,
    request: Arc<[u8]>,
    requests: u64,
) -> Result<(Vec<HttpConn>, u64)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conns.len());
    for mut conn in conns {
        let (next, request) = (next.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut refused = 0u64;
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                if conn.call(&request).await? != 200 {
                    refused += 1;
                }
            }
            anyhow::Ok((conn, refused))
        }));
    }
    let mut back = Vec::with_capacity(tasks.len());
    let mut refused = 0;
    for task in tasks {
        let (conn, r) = task.await??;
        back.push(conn);
        refused += r;
    }
    Ok((back, refused))
}

fn print_summary(format: Format, summary: &serde_json::Value) {
    match format {
        Format::Json => emit(format, summary),
        Format::Table => {
            let line: Vec<String> = summary
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            println!("{}", line.join(" "));
        }
    }
}

/// Resident set size of this process in KiB, from /proc/self/status.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn bench_config(dir: &Path) -> ServerConfig {
    ServerConfig::local(dir.join("data"), dir.join("audit.log"))
}

const SHARE_FILE: &str = "bench-unseal-share";

/// `keyward bench startup`: see `BenchMode::Startup`.
pub async fn startup(
    tokens: u64,
    dir: Option<PathBuf>,
    write_seconds: u64,
    open_only: bool,
    format: Format,
) -> Result<()> {
    if open_only {
        let dir = dir.ok_or_else(|| anyhow::anyhow!("--open-only needs --dir"))?;
        return open_and_report(&dir, format).await;
    }
    let temporary = dir.is_none();
    let dir = match dir {
        Some(d) => d,
        None => tempfile_dir()?,
    };
    if dir.join("data").exists() {
        anyhow::bail!("{} already holds a store: give a new --dir", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    // Write the tokens straight into a fresh store.
    let written = {
        let server = Server::open(bench_config(&dir))?;
        let core = server.core().clone();
        let init = core.init(1, 1).await?;
        let share = init
            .shares
            .first()
            .ok_or_else(|| anyhow::anyhow!("init gave no share"))?;
        write_private(&dir.join(SHARE_FILE), share.0.as_bytes())?;
        core.unseal(&share.0).await?;
        let policy = keyward::policy::Policy::parse(
            "bench",
            "[[rule]]\npath = \"secret/bench/**\"\ncapabilities = [\"read\"]\n",
        )?;
        // Stored as the root token would store it: through the policy check.
        let root = core.gate.authenticate(init.root_token.expose(), None)?;
        let write = keyward::policy::Capability::Write;
        let proof = core.gate.authorize(&root, write, "policy/bench")?;
        core.policies.put(&proof, &policy)?;
        let limit = Duration::from_secs(write_seconds.max(1));
        let store = core.tokens.clone();
        let started = Instant::now();
        let written = tokio::task::spawn_blocking(move || -> Result<u64> {
            let now = store.clock().now_ms();
            let mut n = 0u64;
            while n < tokens && started.elapsed() < limit {
                store.issue(
                    keyward::token::TokenRequest {
                        identity: format!("bench-{}", n % 1000),
                        policies: vec!["bench".into()],
                        ttl: Duration::from_secs(30 * 86_400),
                        max_ttl: Duration::from_secs(30 * 86_400),
                        hard_expiry_ms: None,
                        uses: 0,
                        cidrs: Vec::new(),
                        parent_accessor: None,
                        method: "token",
                    },
                    now,
                )?;
                n += 1;
                if n.is_multiple_of(100_000) {
                    eprintln!(
                        "bench: {n} tokens written in {:.0}s",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Ok(n)
        })
        .await??;
        core.barrier.durable().await?;
        let write_s = started.elapsed().as_secs_f64();
        eprintln!("bench: {written} tokens written in {write_s:.1}s");
        core.seal().await;
        written
    };
    // Time the start-up in a fresh process, so nothing written above is cached.
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args([
            "bench",
            "startup",
            "--open-only",
            "--format",
            "json",
            "--dir",
        ])
        .arg(&dir)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        anyhow::bail!("the start-up measurement failed");
    }
    let mut report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if let Some(map) = report.as_object_mut() {
        map.insert("tokens".into(), json!(written));
        map.insert("tokens_requested".into(), json!(tokens));
    }
    print_summary(format, &report);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "keyward-bench-startup-{}",
        uuid::Uuid::new_v4().simple()
    ));
    Ok(dir)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(bytes)?;
    Ok(())
}

/// Waits (at most 30 s) until nobody holds the lock on sled's `db` file.
async fn wait_for_unlocked(db_file: &Path) -> Result<()> {
    for _ in 0..300 {
        let file = std::fs::File::open(db_file)?;
        match file.try_lock() {
            Ok(()) => return Ok(file.unlock()?),
            Err(std::fs::TryLockError::WouldBlock) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
    anyhow::bail!("{} stayed locked for 30 s", db_file.display())
}

/// How long after start-up `bench startup` reads the resident memory again.
const SETTLE: Duration = Duration::from_secs(12);

async fn open_and_report(dir: &Path, format: Format) -> Result<()> {
    let share = zeroize::Zeroizing::new(std::fs::read_to_string(dir.join(SHARE_FILE))?);
    // The process that wrote the store may still be letting go of sled's
    // folder lock (it does so a moment after the database is dropped): wait
    // for it before the clock starts, so the wait is not measured.
    wait_for_unlocked(&dir.join("data").join("db")).await?;
    let rss_before = rss_kib().unwrap_or(0);
    let started = Instant::now();
    let server = Server::open(bench_config(dir))?;
    let opened = started.elapsed();
    let rss_opened = rss_kib().unwrap_or(0);
    let status = server.core().unseal(share.trim()).await?;
    let ready = started.elapsed();
    if status.sealed {
        anyhow::bail!("the store did not unseal");
    }
    let rss_after = rss_kib().unwrap_or(0);
    // The allocator gives freed pages back to the system over its decay
    // time (jemalloc's default is 10 s), so what the process holds once
    // start-up's buffers are gone is read again after that.
    tokio::time::sleep(SETTLE).await;
    let rss_settled = rss_kib().unwrap_or(0);
    let report = json!({
        "startup_ms": (ready.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
        "open_ms": (opened.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
        "rss_before_kib": rss_before,
        "rss_opened_kib": rss_opened,
        "rss_after_kib": rss_after,
        "rss_growth_mib": ((rss_after.saturating_sub(rss_before)) as f64 / 1024.0 * 10.0).round() / 10.0,
        "rss_settled_kib": rss_settled,
        "rss_settled_growth_mib": ((rss_settled.saturating_sub(rss_before)) as f64 / 1024.0 * 10.0).round() / 10.0,
    });
    print_summary(format, &report);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_gives_its_instruction_count_and_part_number() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\n\
                    fn=(1) main\n0 12\nsummary: 322454801\ntotals: 322454801\n";
        assert_eq!(callgrind_total(dump), Some(322_454_801));
        assert_eq!(callgrind_total("totals: 7 3\n"), Some(7));
        assert_eq!(callgrind_total("events: Ir\n"), None);
        assert_eq!(dump_number(Path::new("/tmp/x/callgrind.out.4")), 4);
        assert_eq!(dump_number(Path::new("/tmp/x/callgrind.out")), 0);
    }
}
