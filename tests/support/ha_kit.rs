//! keyward nodes as child processes (`keyward server --config`, the cargo-
//! built binary) on a real etcd cluster (`etcd_kit`), for the tests that
//! kill or freeze a node or an etcd member: `ha_leader` and `ha_members`.
//!
//! Every wait is for an event, with a generous bound ([`BOUND`]); nothing
//! here asserts a time.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd_kit::EtcdCluster;
use crate::harness::{binary, private_tempdir, unique};
use keyward::client::{Client, ClientOptions};

/// The bound on every wait for an event.
pub const BOUND: Duration = Duration::from_secs(60);

/// `N` distinct ports that were free a moment ago: every listener is held
/// until all are picked, so no two are the same.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// One `keyward server` child process.
pub struct Node {
    pub id: String,
    child: Option<Child>,
    pub addr: String,
    pub metrics: std::net::SocketAddr,
    pub ca: PathBuf,
    pub log: PathBuf,
    pub audit: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts node `id` on `etcd` under `prefix`, with `env` added, and
    /// waits until it accepts connections.
    pub fn start(
        etcd: &EtcdCluster,
        prefix: &str,
        certs: &keyward::pki::CertPaths,
        id: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_with(etcd, prefix, certs, id, env, "")
    }

    /// As [`Node::start`], with `etcd_settings` (TOML lines) added to the
    /// node's `[storage.etcd]` table. A node that exits before it listens
    /// (a port taken between its pick and the node's bind, by a test
    /// running beside) is started again on other ports, 3 tries in all.
    pub fn start_with(
        etcd: &EtcdCluster,
        prefix: &str,
        certs: &keyward::pki::CertPaths,
        id: &str,
        env: &[(&str, &str)],
        etcd_settings: &str,
    ) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(etcd, prefix, certs, id, env, etcd_settings) {
                Ok(node) => return node,
                Err(log) => failures.push(log),
            }
        }
        panic!(
            "node {id} exited before it listened, 3 times; logs:\n{}",
            failures.join("\n----\n")
        );
    }

    /// One try of [`Node::start_with`]: `Err` is the log of a node that
    /// exited before it listened.
    fn try_start(
        etcd: &EtcdCluster,
        prefix: &str,
        certs: &keyward::pki::CertPaths,
        id: &str,
        env: &[(&str, &str)],
        etcd_settings: &str,
    ) -> Result<Self, String> {
        let dir = private_tempdir();
        let [port, metrics_port] = free_ports();
        let endpoints: Vec<String> = etcd
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\n\
             [storage]\npath = \"{data}\"\nbackend = \"etcd\"\n\
             [storage.etcd]\nendpoints = [{endpoints}]\nprefix = \"{prefix}\"\n{etcd_settings}\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [audit]\npath = \"{audit}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             [http]\nlisten = \"off\"\n\
             [cluster]\nnode_id = \"{id}\"\n",
            data = dir.path().join("data").display(),
            endpoints = endpoints.join(", "),
            cert = certs.server.display(),
            key = certs.server_key.display(),
            audit = dir.path().join("audit.log").display(),
        );
        let config_path = dir.path().join("keyward.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("server.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(binary())
            .arg("server")
            .arg("--config")
            .arg(&config_path)
            .env("KEYWARD_LOG", "info")
            .env_remove("KEYWARD_TEST_CRASH_AFTER")
            .env_remove("KEYWARD_TEST_STOP_AT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if child.try_wait().ok().flatten().is_some() {
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            if started.elapsed() >= BOUND {
                // Our own child, by its handle: no process is left behind.
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {id} did not listen within {BOUND:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            id: id.to_owned(),
            child: Some(child),
            addr: format!("https://127.0.0.1:{port}"),
            metrics: ([127, 0, 0, 1], metrics_port).into(),
            ca: certs.ca.clone(),
            audit: dir.path().join("audit.log"),
            log,
            _dir: dir,
        })
    }

    pub async fn client(&self, token: Option<&str>) -> Client {
        Client::connect(ClientOptions {
            addr: self.addr.clone(),
            token: token.map(str::to_owned),
            ca_cert: Some(self.ca.clone()),
            ..ClientOptions::default()
        })
        .await
        .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` to this node, by its process id.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Whether the process is stopped (SIGSTOP): state `T` in /proc.
    pub fn is_stopped(&self) -> bool {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // The state follows the command name in parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
    }

    /// Whether the process has ended (reaps it).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn scrape(&self) -> String {
        crate::harness::scrape(self.metrics).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process must run again to die of SIGTERM; SIGKILL
            // needs no help, and it is only ever sent to our own child.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `check` with the generous bound; fails naming `what`.
pub async fn wait_for<F, Fut, T>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(started.elapsed() < BOUND, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `node` says it leads.
pub async fn leads(node: &Node) -> bool {
    let Ok(client) = Client::connect(ClientOptions {
        addr: node.addr.clone(),
        ca_cert: Some(node.ca.clone()),
        ..ClientOptions::default()
    })
    .await
    else {
        return false;
    };
    client.status().await.is_ok_and(|s| s.is_leader)
}

/// Waits (generous bound) until `node` says it leads.
pub async fn wait_until_leads(node: &Node) {
    wait_for(&format!("{} leads", node.id), || async move {
        leads(node).await.then_some(())
    })
    .await;
}

/// The shared certificates, a unique prefix and a 3-member etcd cluster.
pub fn cluster() -> (
    EtcdCluster,
    tempfile::TempDir,
    keyward::pki::CertPaths,
    String,
) {
    crate::harness::install_crypto();
    let etcd = EtcdCluster::start(3);
    let certs_dir = private_tempdir();
    let certs = keyward::pki::ensure_dev_certs(&certs_dir.path().join("certs")).unwrap();
    let prefix = format!("{}/", unique("ha"));
    (etcd, certs_dir, certs, prefix)
}

/// Inits the vault through `nodes[0]`, unseals every node; the root token.
pub async fn init_and_unseal(nodes: &[&Node]) -> String {
    let first = nodes[0].client(None).await;
    let init = first.init(1, 1).await.unwrap();
    for node in nodes {
        node.client(None)
            .await
            .unseal(&init.shares[0])
            .await
            .unwrap();
    }
    init.root_token
}
