//! Benchmark of the rotation broker (not a test; TESTING.md "Benchmarks").
//!
//! ```sh
//! cargo run --example rotation_bench            # 10,000 due, 100,000 idle
//! cargo run --example rotation_bench -- 1000 10000
//! ```
//!
//! 1. `N` secrets (default 10,000) with the `random` provider, all due at
//!    the same moment: the time until every one has rotated (generate,
//!    apply, verify, promote, each made durable) with the default worker
//!    pool.
//! 2. `M` more policies (default 100,000) scheduled an hour ahead, none due:
//!    the process's CPU time (utime + stime from /proc/self/stat) over 10 s
//!    with the scheduler running, printed as a share of one core, beside a
//!    baseline: the same 10 s at start-up, before any policy exists and
//!    before the scheduler starts (sled's own background flusher included).
//!
//! It runs the broker in process on a dev vault in a temporary folder (no
//! gRPC: the broker, the barrier and sled are what is measured) and prints
//! one line a script can read.

use std::time::{Duration, Instant};

use keyward::clock::ShutdownTrigger;
use keyward::policy::Capability;
use keyward::rotation::policy::PolicySpec;
use keyward::rotation::schedule::Schedule;
use keyward::secrecy::{SecretBytes, SecretData};
use keyward::secrets::{PutRequest, SecretPath, Stage};

fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" that ends the command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let due: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let idle: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir()?;
    // A fresh folder: `dev` refuses an existing one open to other users.
    let vault = keyward::dev::open(&dir.path().join("dev"), None).await?;
    let core = vault.server.core().clone();
    let registry = core.rotation.registry();
    let workers = core.rotation.options().workers;
    let clock = core.clock().clone();

    // 0. Baseline: the same process, empty, scheduler not started.
    let window = Duration::from_secs(10);
    let (b0, bw) = (cpu_ticks(), Instant::now());
    tokio::time::sleep(window).await;
    let baseline_ms = (cpu_ticks() - b0) * 1000 / ticks_per_second().max(1);
    let _ = bw;

    // 1. N secrets due at the same moment, written as the root token would.
    let root = core
        .gate
        .authenticate(&vault.credentials.root_token, None)?;
    let t0 = clock.now_ms();
    let mut paths = Vec::with_capacity(due);
    for i in 0..due {
        let path = SecretPath::parse(&format!("bench/due/s{i}"))?;
        let mut data = SecretData::new();
        data.insert("password".into(), SecretBytes::from("initial"));
        let proof = core
            .gate
            .authorize(&root, Capability::Write, &path.resource())?;
        core.secrets.put(
            &proof,
            PutRequest {
                path: path.clone(),
                data,
                cas: None,
                max_versions: None,
                owner: None,
                stage: Stage::Current,
            },
            t0,
        )?;
        let spec = PolicySpec::parse(
            path.as_str(),
            "random",
            Schedule::every(Duration::from_secs(3600))?,
            Duration::ZERO,
            Default::default(),
            &registry,
        )?;
        core.rotation.set_policy_due_at(&spec, t0, t0)?;
        paths.push(path);
    }
    core.barrier.durable().await?;
    let start = Instant::now();
    let stop = ShutdownTrigger::new();
    let scheduler = keyward::rotation::scheduler::start((*core.rotation).clone(), stop.signal());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let done = core
            .rotation
            .policies()?
            .iter()
            .filter(|p| p.last_success_ms != 0)
            .count();
        if done >= due {
            break;
        }
    }
    let rotate_all = start.elapsed();
    // Let the retires (grace 0) finish too before the idle phase.
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if core.barrier.scan_keys("rotation/retire/")?.is_empty() {
            break;
        }
    }
    let with_retires = start.elapsed();

    // 2. M policies scheduled, none due.
    let t1 = clock.now_ms();
    for i in 0..idle {
        let spec = PolicySpec::parse(
            &format!("bench/idle/s{i}"),
            "random",
            Schedule::every(Duration::from_secs(3600))?,
            Duration::ZERO,
            Default::default(),
            &registry,
        )?;
        core.rotation.set_policy_due_at(&spec, t1 + 3_600_000, t1)?;
    }
    core.barrier.durable().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A first window lets sled settle after 100,000 writes; the second is
    // the figure.
    let (s0, p0) = (cpu_ticks(), core.rotation.sleeper_passes());
    tokio::time::sleep(window).await;
    let settle_ms = (cpu_ticks() - s0) * 1000 / ticks_per_second().max(1);
    let settle_passes = core.rotation.sleeper_passes() - p0;
    let (c0, w0, q0) = (cpu_ticks(), Instant::now(), core.rotation.sleeper_passes());
    tokio::time::sleep(window).await;
    let (c1, w1) = (cpu_ticks(), w0.elapsed());
    let passes = core.rotation.sleeper_passes() - q0;
    let cpu_ms = (c1 - c0) * 1000 / ticks_per_second().max(1);
    let share = cpu_ms as f64 / w1.as_millis().max(1) as f64 * 100.0;

    println!(
        "rotation_bench due={due} workers={workers} rotate_all_s={:.2} rotations_per_s={:.0} retired_all_s={:.2} idle_policies={} idle_window_s={} idle_cpu_ms={cpu_ms} idle_cpu_pct_of_one_core={share:.3} idle_scheduler_passes={passes} baseline_cpu_ms={baseline_ms} settle_cpu_ms={settle_ms} settle_scheduler_passes={settle_passes}",
        rotate_all.as_secs_f64(),
        due as f64 / rotate_all.as_secs_f64().max(1e-9),
        with_retires.as_secs_f64(),
        idle + due,
        window.as_secs(),
    );
    stop.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), scheduler).await;
    Ok(())
}
