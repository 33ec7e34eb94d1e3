//! Benchmark (not a test): a server's start-up with many live leases.
//!
//! Writes LEASES live leases (default 100,000) into a fresh store through
//! the lease store itself (`LeaseStore::create`, the call `creds` makes:
//! record, expiry index, token index, durable), then times in a NEW process
//! the start-up to ready: `Server::open`, unseal, and the first round of the
//! lease sleeper (what it reads at start: the head of the expiry index). The
//! same is measured on an empty store in another new process, so the
//! summary can give the growth the leases cause.
//!
//! The leases are honest records of the `postgres` provider whose users do
//! not exist: they name an admin secret that is not stored, and expire in
//! 24 hours, so nothing is due and nothing is revoked while this runs (the
//! store is deleted at the end). After the measurement the child reads one
//! lease back and counts them all, to show they are there.
//!
//! ```sh
//! cargo run --release --example lease_scale -- [LEASES]
//! ```
//!
//! Prints one `summary` line: the RSS growth and start-up time with the
//! leases, the same for the empty store, their ratios, and the 1-minute
//! load average.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward::config::ServerConfig;
use keyward::lease::LeaseRecord;
use keyward::server::Server;

const SHARE_FILE: &str = "unseal-share";
const ONE_ID_FILE: &str = "one-lease-id";

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn config(dir: &Path) -> ServerConfig {
    ServerConfig::local(dir.join("data"), dir.join("audit.log"))
}

/// Makes a store in `dir` with `count` live leases.
async fn write_store(dir: &Path, count: usize) -> f64 {
    let server = Server::open(config(dir)).unwrap();
    let core = server.core().clone();
    let init = core.init(1, 1).await.unwrap();
    let share = init.shares.first().unwrap().0.clone();
    std::fs::write(dir.join(SHARE_FILE), share.as_bytes()).unwrap();
    core.unseal(&share).await.unwrap();
    let now = core.clock().now_ms();
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let leases = core.leases.clone();
        let next = next.clone();
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let id = format!("dynamic/scale/{i:024}");
                let record = LeaseRecord {
                    id,
                    accessor: format!("scaleacc{:04}", i % 1000),
                    identity: format!("scale-{}", i % 1000),
                    role: "scale".into(),
                    provider: "postgres".into(),
                    username: format!("kw_scale_{i:016x}"),
                    host: "127.0.0.1".into(),
                    port: 5432,
                    database: "postgres".into(),
                    admin_secret: "bench/no-such-admin".into(),
                    created_ms: now,
                    // Spread over the next day, none due during the run.
                    expires_ms: now + 86_400_000 + (i as u64 % 3_600_000),
                    max_expiry_ms: now + 2 * 86_400_000,
                    ttl_ms: 86_400_000,
                    ..LeaseRecord::default()
                };
                leases.create(&record).await.unwrap();
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    if count > 0 {
        std::fs::write(
            dir.join(ONE_ID_FILE),
            format!("dynamic/scale/{:024}", count / 2),
        )
        .unwrap();
    }
    core.seal().await;
    drop(core);
    drop(server);
    seconds
}

/// The child: opens the store, unseals, runs one sleeper round; prints
/// `rss_growth_kib startup_ms found_one total`.
async fn open_and_report(dir: &Path) {
    let share = std::fs::read_to_string(dir.join(SHARE_FILE)).unwrap();
    let rss_before = rss_kib();
    let started = Instant::now();
    let server = Server::open(config(dir)).unwrap();
    let core = server.core().clone();
    let status = core.unseal(share.trim()).await.unwrap();
    assert!(!status.sealed);
    let (next, _) = core.leases.sweep(core.clock().now_ms()).await.unwrap();
    let ready = started.elapsed();
    let rss_after = rss_kib();
    // After the measurement: the leases are there.
    let found_one = match std::fs::read_to_string(dir.join(ONE_ID_FILE)) {
        Ok(id) => core.leases.get(id.trim()).unwrap().is_some(),
        Err(_) => true,
    };
    let total = core.leases.list("", false).unwrap().len();
    let next_due_s = next.map_or(0, |n| n.saturating_sub(core.clock().now_ms()) / 1000);
    println!(
        "{} {:.1} {found_one} {total} {next_due_s}",
        rss_after.saturating_sub(rss_before),
        ready.as_secs_f64() * 1000.0
    );
}

fn child(dir: &Path) -> (u64, f64, bool, usize) {
    // Wait for the writer's sled lock to go (a moment after it is dropped).
    std::thread::sleep(Duration::from_millis(500));
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--open-only")
        .arg(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the start-up measurement failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<&str> = text.split_whitespace().collect();
    (
        f[0].parse().unwrap(),
        f[1].parse().unwrap(),
        f[2] == "true",
        f[3].parse().unwrap(),
    )
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--open-only") {
        open_and_report(&PathBuf::from(&args[2])).await;
        return;
    }
    let count: usize = args.get(1).map_or(100_000, |a| a.parse().unwrap());
    let load_before = load1();
    let top = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let empty = top.path().join("empty");
    let full = top.path().join("full");
    std::fs::create_dir(&empty).unwrap();
    std::fs::create_dir(&full).unwrap();
    write_store(&empty, 0).await;
    let write_s = write_store(&full, count).await;
    println!("phase=write leases={count} seconds={write_s:.1}");
    let (rss0, ms0, _, total0) = child(&empty);
    println!("phase=start store=empty rss_growth_kib={rss0} ready_ms={ms0:.1} leases={total0}");
    let (rss1, ms1, found, total1) = child(&full);
    println!("phase=start store=leases rss_growth_kib={rss1} ready_ms={ms1:.1} leases={total1} one_found={found}");
    let extra_mib = rss1.saturating_sub(rss0) as f64 / 1024.0;
    println!(
        "summary target=keyward leases={count} write_per_second={:.0} ready_ms={ms1:.1} ready_ms_empty={ms0:.1} ratio_ready={:.2} rss_growth_mib={:.1} rss_growth_mib_empty={:.1} rss_from_leases_mib={extra_mib:.1} bytes_per_lease={:.0} leases_found={total1} load1_before={load_before} load1_after={}",
        count as f64 / write_s,
        ms1 / ms0.max(0.001),
        rss1 as f64 / 1024.0,
        rss0 as f64 / 1024.0,
        (rss1.saturating_sub(rss0) * 1024) as f64 / count.max(1) as f64,
        load1(),
    );
    assert_eq!(total1, count, "not every lease was found after the restart");
    assert!(found);
}
