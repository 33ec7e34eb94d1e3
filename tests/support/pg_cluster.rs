//! A private PostgreSQL cluster for tests that must see passwords checked
//! (the shared server on :5432 trusts loopback; see TESTING.md).
//!
//! `initdb` from `/usr/lib/postgresql/*/bin` (or `KEYWARD_TEST_PG_BIN`) into a
//! temporary folder, `scram-sha-256` for every connection, a superuser with
//! a random password, `127.0.0.1` and a free port only, no unix socket, and
//! `log_statement = 'all'` so tests can look for secrets in the server log.
//! As root, everything runs as the `postgres` OS user (`runuser`) in a folder
//! chowned to it.
//!
//! # Started once, stopped at the end
//!
//! The first call to [`cluster`] starts it; every test of the binary shares
//! it. Rust runs no destructor of a `static` at exit, and the test harness
//! has no end-of-run hook, so the stop does not rely on either: before the
//! cluster starts, a small watchdog shell is spawned that blocks reading a
//! pipe whose only write end this process holds (in the static). When the
//! test process ends — normally, by a panic, by a signal, even by SIGKILL —
//! the kernel closes that end, the watchdog's read returns, and it runs
//! `pg_ctl stop -m fast` (which signals the postmaster by the pid in
//! `postmaster.pid`) and removes the folder. The watchdog and the postmaster
//! have their own process group, so a Ctrl-C on `cargo test` reaches only the
//! test process, whose exit then triggers the orderly stop.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::OnceLock;

/// A running private cluster.
pub struct PgCluster {
    pub port: u16,
    pub admin_user: String,
    pub admin_password: String,
    dir: PathBuf,
    /// Held until the process exits; its closing stops the cluster.
    _stop_on_exit: ChildStdin,
}

impl PgCluster {
    /// The server log so far (every statement is logged).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();

/// The shared private cluster, started on first use. Panics with a message
/// saying what is missing if it cannot start: a test must not skip.
pub fn cluster() -> &'static PgCluster {
    match CLUSTER.get_or_init(start) {
        Ok(cluster) => cluster,
        Err(message) => panic!("private PostgreSQL cluster: {message}"),
    }
}

fn start() -> Result<PgCluster, String> {
    let bin = find_bin_dir()?;
    let as_root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .map_err(|e| format!("cannot tell whether we run as root: {e}"))?;
    let dir = tempfile::Builder::new()
        .prefix("keyward-pg-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary folder: {e}"))?
        .keep();
    let data = dir.join("data");

    // The watchdog first, so that any failure below still cleans up.
    let script =
        r#"cat >/dev/null; "$1/pg_ctl" stop -D "$2/data" -m fast -s >/dev/null 2>&1; rm -rf "$2""#;
    let mut watchdog = pg_user_command(as_root, "sh");
    watchdog
        .args(["-c", script, "sh"])
        .arg(&bin)
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let stop_on_exit = watchdog
        .spawn()
        .map_err(|e| format!("cannot start the watchdog shell: {e}"))?
        .stdin
        .take()
        .ok_or("the watchdog has no stdin")?;

    let admin_user = "kwadmin".to_owned();
    let admin_password = format!("adm-{}", random_hex());
    let pwfile = dir.join("pwfile");
    std::fs::File::create(&pwfile)
        .and_then(|mut f| f.write_all(admin_password.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", pwfile.display()))?;
    if as_root {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir))?;
    }
    run(pg_user_command(as_root, bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", &admin_user, "--auth=scram-sha-256", "-E", "UTF8"])
        .args(["--no-locale", "--no-sync", "--no-instructions"])
        .arg(format!("--pwfile={}", pwfile.display())))?;
    let _ = std::fs::remove_file(&pwfile);

    let settings =
        "\n# keyward tests\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
        password_encryption = 'scram-sha-256'\nfsync = off\nlog_statement = 'all'\n";
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| f.write_all(settings.as_bytes()))
        .map_err(|e| format!("cannot write postgresql.conf: {e}"))?;

    // A free port can be taken between our probe and the server's bind: try
    // a few.
    let log = dir.join("postgres.log");
    let mut last_error = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        let started = run(pg_user_command(as_root, bin.join("pg_ctl"))
            .args(["start", "-w", "-t", "120", "-s", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &format!("-p {port}")])
            .process_group(0));
        match started {
            Ok(()) => {
                return Ok(PgCluster {
                    port,
                    admin_user,
                    admin_password,
                    dir,
                    _stop_on_exit: stop_on_exit,
                })
            }
            Err(e) => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                last_error = format!("{e}\nserver log:\n{text}");
                if !text.contains("could not bind") {
                    break;
                }
            }
        }
    }
    Err(last_error)
}

/// The `bin` folder of the newest PostgreSQL server installed.
fn find_bin_dir() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("KEYWARD_TEST_PG_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "no initdb under /usr/lib/postgresql/*/bin: install the PostgreSQL server \
         (Debian: apt-get install postgresql) or set KEYWARD_TEST_PG_BIN to its bin folder"
            .to_owned()
    })
}

/// `program`, run as the `postgres` OS user when we are root (PostgreSQL
/// refuses to run as root).
fn pg_user_command(as_root: bool, program: impl AsRef<Path>) -> Command {
    if as_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program.as_ref());
        command
    } else {
        Command::new(program.as_ref())
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn random_hex() -> String {
    use keyward::rotation::providers::random::random_string;
    use keyward::rotation::providers::Charset;
    let value = random_string(24, Charset::Hex).expect("system randomness");
    value.expose_str().unwrap_or_default().to_owned()
}
