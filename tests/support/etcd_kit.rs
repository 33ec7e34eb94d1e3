//! A real etcd cluster for tests: `members` etcd processes (Debian's
//! `etcd-server`, `/usr/bin/etcd` or `$KEYWARD_TEST_ETCD`) on free loopback
//! ports, in a temporary folder, plaintext. `EtcdCluster::start` returns once
//! every member answers its `/health` with `"health":"true"` (polled, with a
//! generous bound); dropping it kills exactly the processes it started, by
//! their pid, and waits for them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The etcd binary the tests run.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("KEYWARD_TEST_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// A port that was free a moment ago (the listener is closed on return).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub struct Member {
    pub name: String,
    pub client_url: String,
    child: Option<Child>,
    /// The program and arguments it was started with (for `restart`).
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
}

impl Member {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts a killed member again on its data folder (etcd ignores the
    /// initial-cluster flags once the folder holds data).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running member");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(etcd_binary())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Kills this member (SIGKILL, by its pid) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
}

/// Extra flags for every member (a small quota, say).
#[derive(Default, Clone)]
pub struct EtcdFlags {
    pub quota_backend_bytes: Option<u64>,
}

impl EtcdCluster {
    /// A cluster of `members` members (1 or 3, usually).
    pub fn start(members: usize) -> Self {
        Self::start_with(members, EtcdFlags::default())
    }

    /// Ports are picked free and then handed to etcd, so another process
    /// of a parallel test can take one in between (seen: a member's peer
    /// port answered by some other HTTP server, the cluster never formed).
    /// A cluster that does not form is killed and started again on new
    /// ports and a new folder, up to three times.
    pub fn start_with(members: usize, flags: EtcdFlags) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let mut cluster = Self::spawn(members, &flags);
            match cluster.formed() {
                Ok(()) => return cluster,
                Err(why) => failures.push(why),
            }
            // Dropping it kills its members by pid.
        }
        panic!(
            "etcd cluster did not form in 3 tries:\n{}",
            failures.join("\n----\n")
        );
    }

    fn spawn(members: usize, flags: &EtcdFlags) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let token = format!("kw-test-{}", uuid::Uuid::new_v4().simple());
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let mut started = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let data = dir.path().join(&name);
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut command = Command::new(etcd_binary());
            command
                .arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-token")
                .arg(&token)
                .arg("--initial-cluster-state")
                .arg("new")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            if let Some(quota) = flags.quota_backend_bytes {
                command.arg("--quota-backend-bytes").arg(quota.to_string());
            }
            let args = command.get_args().map(|a| a.to_owned()).collect();
            let child = command
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", etcd_binary().display()));
            started.push(Member {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_url,
                child: Some(child),
                args,
            });
        }
        Self {
            dir,
            members: started,
        }
    }

    /// Waits (at most 60 s) until every member is healthy; a member whose
    /// process has ended (a port it could not bind) fails at once. The
    /// error carries the members' logs.
    fn formed(&mut self) -> Result<(), String> {
        for _ in 0..600 {
            if self.endpoints().iter().all(|url| healthy(url)) {
                return Ok(());
            }
            let ended = self.members.iter_mut().any(|m| {
                m.child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            });
            if ended {
                return Err(format!("a member exited; logs:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("not healthy within 60 s; logs:\n{}", self.logs()))
    }

    fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The client URLs of the members still running.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect()
    }

    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Polls every running member's `/health` until all say healthy, for at
    /// most 60 s (a bound, not a timing assumption).
    pub fn wait_healthy(&self) {
        for _ in 0..600 {
            if self.endpoints().iter().all(|url| healthy(url)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "etcd cluster not healthy within 60 s; logs:\n{}",
            self.logs()
        );
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill();
        }
    }
}

/// `GET /health` over plain HTTP/1.0 on loopback.
fn healthy(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some(addr) = url.strip_prefix("http://") else {
        return false;
    };
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}
