//! Starting servers for tests: in process (`TestServer`) or as a child
//! process of the real binary (`ChildServer`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyward::client::{Client, ClientOptions};
use keyward::config::{ServerConfig, TlsConfig};
use keyward::secrecy::{SecretBytes, SecretData};
use keyward::server::Server;

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A temporary folder only its owner may enter: `keyward dev` refuses an
/// existing folder open to other users.
pub fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .unwrap()
}

/// A random suffix so tests never share names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn data(pairs: &[(&str, &str)]) -> SecretData {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), SecretBytes::from(*v)))
        .collect()
}

/// Waits for an event: polls `check` every 50 ms until it is true, for at
/// most 30 s (a generous bound, not a timing assertion), then fails naming
/// `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

/// The body of `GET PATH` from a server's plain-HTTP listener (the
/// `/metrics` listener in most tests), headers included.
pub async fn scrape_path(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    body
}

/// `/metrics` of a server, in Prometheus' text format.
pub async fn scrape(addr: SocketAddr) -> String {
    scrape_path(addr, "/metrics").await
}

/// The value of the series `series` (its name and labels, as printed) in a
/// scrape, if it is there.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The lanes an in-process test server serves its gRPC connections on
/// (`listen_threads`): the path `keyward server` takes on sled, with more
/// than one lane so that connections and calls cross between them.
pub const LANES: usize = 2;

/// A dev vault over `dir`, serving on [`LANES`] lanes unless `adjust`
/// says otherwise.
async fn open_dev_on_lanes(
    dir: &std::path::Path,
    adjust: impl FnOnce(&mut ServerConfig),
) -> Result<keyward::dev::DevVault, keyward::dev::DevError> {
    keyward::dev::open_with(dir, None, keyward::clock::Clock::system(), |config| {
        config.listen_threads = LANES;
        adjust(config);
    })
    .await
}

/// An in-process server over TLS on 127.0.0.1:0.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The HTTPS listener (Vault-compatible API), also on port 0.
    pub http_addr: SocketAddr,
    pub ca: PathBuf,
    pub root_token: String,
    pub unseal_share: String,
    pub audit_path: PathBuf,
    /// The server's core, for library-level checks (e.g. governance figures).
    pub core: std::sync::Arc<keyward::core::Core>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// A dev vault: initialised with one share and unsealed.
    pub async fn dev() -> Self {
        Self::dev_with(|_| {}).await
    }

    /// [`Self::dev`] with its configuration adjusted before it opens. It
    /// serves on [`LANES`] lanes unless `adjust` says otherwise (a test on
    /// tokio's paused clock must: a lane's runtime keeps the real time).
    pub async fn dev_with(adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        install_crypto();
        let dir = private_tempdir();
        let vault = open_dev_on_lanes(dir.path(), adjust).await.unwrap();
        let root_token = vault.credentials.root_token.clone();
        let unseal_share = vault.credentials.unseal_share.clone();
        let ca = vault.certs.ca.clone();
        Self::serve(dir, vault.server, ca, root_token, unseal_share).await
    }

    /// Stops this dev server and starts a new one on the same folder (it
    /// unseals with the stored dev credentials).
    pub async fn restart(self) -> Self {
        let dir = self.stop().await;
        let vault = open_dev_on_lanes(dir.path(), |_| {}).await.unwrap();
        let root_token = vault.credentials.root_token.clone();
        let unseal_share = vault.credentials.unseal_share.clone();
        let ca = vault.certs.ca.clone();
        Self::serve(dir, vault.server, ca, root_token, unseal_share).await
    }

    /// A dev server over an existing dev folder (a restored snapshot, a
    /// fixture): it unseals with the folder's dev credentials.
    pub async fn open_dev(dir: tempfile::TempDir) -> Result<Self, keyward::dev::DevError> {
        install_crypto();
        let vault = open_dev_on_lanes(dir.path(), |_| {}).await?;
        let root_token = vault.credentials.root_token.clone();
        let unseal_share = vault.credentials.unseal_share.clone();
        let ca = vault.certs.ca.clone();
        Ok(Self::serve(dir, vault.server, ca, root_token, unseal_share).await)
    }

    /// A server that is not initialised yet (for init and unseal tests).
    pub async fn uninitialized() -> Self {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let certs = keyward::pki::ensure_dev_certs(&dir.path().join("certs")).unwrap();
        let config = ServerConfig {
            tls: Some(TlsConfig {
                cert: certs.server.clone(),
                key: certs.server_key.clone(),
                client_ca: Some(certs.ca.clone()),
            }),
            listen_threads: LANES,
            ..ServerConfig::local(dir.path().join("data"), dir.path().join("audit.log"))
        };
        let server = Server::open(config).unwrap();
        Self::serve(dir, server, certs.ca, String::new(), String::new()).await
    }

    async fn serve(
        dir: tempfile::TempDir,
        server: Server,
        ca: PathBuf,
        root_token: String,
        unseal_share: String,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_addr = metrics_listener.local_addr().unwrap();
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http_listener.local_addr().unwrap();
        let server = server.with_http_listener(http_listener);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let core = server.core().clone();
        let task = tokio::spawn(async move {
            server
                .serve(listener, Some(metrics_listener), async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let audit_path = dir.path().join("audit.log");
        Self {
            dir,
            addr,
            metrics_addr,
            http_addr,
            ca,
            root_token,
            unseal_share,
            audit_path,
            core,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn options(&self, token: Option<&str>) -> ClientOptions {
        ClientOptions {
            addr: format!("https://{}", self.addr),
            token: token.map(str::to_owned),
            ca_cert: Some(self.ca.clone()),
            ..ClientOptions::default()
        }
    }

    /// A client holding the root token.
    pub async fn root(&self) -> Client {
        Client::connect(self.options(Some(&self.root_token)))
            .await
            .unwrap()
    }

    /// A client with no token.
    pub async fn anonymous(&self) -> Client {
        Client::connect(self.options(None)).await.unwrap()
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        // Move the folder out; Drop of Self then has nothing left to do.
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The real `keyward` binary running `keyward dev` in a folder.
pub struct ChildServer {
    pub child: Child,
    pub addr: String,
    pub ca: PathBuf,
    pub token: String,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_keyward")
}

impl ChildServer {
    /// Starts `keyward dev --data DIR` on a free port and waits for its
    /// export lines. Its log goes to `stderr_path`.
    pub fn start(data_dir: &Path, stderr_path: &Path) -> Self {
        Self::start_with_env(data_dir, stderr_path, &[])
    }

    /// Like `start`, with extra environment variables (e.g. a test fault point).
    pub fn start_with_env(data_dir: &Path, stderr_path: &Path, env: &[(&str, &str)]) -> Self {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr_path)
            .unwrap();
        let mut child = Command::new(binary())
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
                "--http-listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(data_dir)
            .env("KEYWARD_LOG", "debug")
            .env_remove("KEYWARD_TEST_CRASH_AFTER")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut vars = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("export ") {
                    vars.push(rest.to_owned());
                    if vars.len() == 3 {
                        let _ = tx.send(vars.clone());
                    }
                }
            }
        });
        let vars = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("keyward dev did not print its export lines");
        let get = |k: &str| {
            vars.iter()
                .find_map(|v| v.strip_prefix(&format!("{k}=")))
                .unwrap()
                .to_owned()
        };
        Self {
            child,
            addr: get("KEYWARD_ADDR"),
            ca: PathBuf::from(get("KEYWARD_CACERT")),
            token: get("KEYWARD_TOKEN"),
        }
    }

    pub fn options(&self) -> ClientOptions {
        ClientOptions {
            addr: self.addr.clone(),
            token: Some(self.token.clone()),
            ca_cert: Some(self.ca.clone()),
            ..ClientOptions::default()
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.options()).await.unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the child by its process id.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the CLI with the given environment; returns (status, stdout, stderr).
pub fn cli(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "KEYWARD_ADDR",
        "KEYWARD_TOKEN",
        "KEYWARD_CACERT",
        "KEYWARD_FORMAT",
        "KEYWARD_CLIENT_CERT",
        "KEYWARD_CLIENT_KEY",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            input.write_all(bytes).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

impl TestServer {
    /// A server over `config` as given (not initialised here), serving with
    /// the CA `ca` (its certificates are the caller's): nodes of a cluster
    /// (the etcd tests, built with the `etcd` feature only).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub async fn from_config(dir: tempfile::TempDir, config: ServerConfig, ca: PathBuf) -> Self {
        install_crypto();
        let server = Server::open(config).unwrap();
        Self::serve(dir, server, ca, String::new(), String::new()).await
    }
}
