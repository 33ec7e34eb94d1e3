//! Server configuration: one TOML file, overridden by `KEYWARD_*` environment
//! variables, parsed into typed values once, before any port is bound.
//! Errors name the key, never echo a value (it could be secret).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::secrets::DataLimits;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8270";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9270";
/// The HTTPS listener (Vault-compatible API, dashboard, OIDC discovery):
/// Vault's own port, so its clients find it where they expect.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8200";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("the configuration file is not valid TOML: {0}")]
    Toml(String),
    #[error("configuration key '{0}' is required")]
    Missing(&'static str),
    #[error("configuration key '{0}' has an invalid value: {1}")]
    Invalid(String, &'static str),
    #[error("unknown configuration key '{0}'")]
    Unknown(String),
}

/// TLS files of the server.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Accept client certificates signed by this CA (for certificate login).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub storage_path: PathBuf,
    /// `None` only with `--insecure-plaintext`.
    pub tls: Option<TlsConfig>,
    pub audit_path: PathBuf,
    /// `None` turns the metrics listener off.
    pub metrics_listen: Option<SocketAddr>,
    pub limits: DataLimits,
    pub oidc: OidcConfig,
    /// Bounds on connections, streams and request sizes (`limits.*`).
    pub server_limits: ServerLimits,
    /// `audit.max_bytes`, `audit.max_files`, `audit.syslog`, `audit.syslog_socket`.
    pub audit: crate::audit::AuditOptions,
    /// `delegation.*` and `oidc_provider.*` (issue 17).
    pub federation: FederationConfig,
    /// `http.listen`: the HTTPS listener; `None` (`off`) turns it off.
    pub http_listen: Option<SocketAddr>,
    /// Owner recertification (`governance.*`).
    pub governance: GovernanceConfig,
    /// Anomaly detection (`anomaly.*`, issue 13).
    pub anomaly: crate::anomaly::AnomalyConfig,
    /// `storage.backend`: sled in `storage_path` (the default) or etcd.
    pub storage_backend: StorageBackend,
    /// `cluster.node_id`: this node's name among the nodes of one store.
    pub node_id: String,
    /// `listen_threads`: threads that serve the gRPC listener's connections,
    /// each with a runtime of its own (`server::lanes`); 0 serves them on
    /// the process's shared runtime.
    pub listen_threads: usize,
}

/// Where the store lives (`storage.backend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageBackend {
    /// sled in `storage.path` (one process owns it).
    Sled,
    /// An etcd cluster (`storage.etcd.*`), shared by several nodes.
    Etcd(crate::storage::EtcdOptions),
}

/// The prefix of `storage.etcd.prefix` when none is given.
pub const DEFAULT_ETCD_PREFIX: &str = "keyward/";

/// Reads `storage.backend` and `storage.etcd.*`.
fn parse_storage_backend(src: &dyn Source, base: &Path) -> Result<StorageBackend, ConfigError> {
    match src.get("storage.backend").as_deref() {
        None | Some("sled") => Ok(StorageBackend::Sled),
        Some("etcd") => {
            let endpoints: Vec<String> = src
                .get("storage.etcd.endpoints")
                .ok_or(ConfigError::Missing("storage.etcd.endpoints"))?
                .split(',')
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            if endpoints.is_empty()
                || endpoints
                    .iter()
                    .any(|e| !(e.starts_with("http://") || e.starts_with("https://")))
            {
                return Err(ConfigError::Invalid(
                    "storage.etcd.endpoints".into(),
                    "expected a list of http://HOST:PORT or https://HOST:PORT",
                ));
            }
            let prefix = src
                .get("storage.etcd.prefix")
                .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_owned());
            if prefix.is_empty() {
                return Err(ConfigError::Invalid(
                    "storage.etcd.prefix".into(),
                    "must not be empty",
                ));
            }
            let path = |key: &str| src.get(key).map(|v| base.join(v));
            // `0` or `off` leaves compaction to etcd's own settings.
            let compact_every = match src.get("storage.etcd.compact_every").as_deref() {
                None => Some(crate::storage::etcd_options::DEFAULT_COMPACT_EVERY),
                Some("off") => None,
                Some(v) => match crate::duration::parse(v) {
                    Ok(d) if d.is_zero() => None,
                    Ok(d) => Some(d),
                    Err(_) => {
                        return Err(ConfigError::Invalid(
                            "storage.etcd.compact_every".into(),
                            "expected a duration such as 5m, or 0 or off",
                        ))
                    }
                },
            };
            let compact_retain = match src.get("storage.etcd.compact_retain") {
                None => crate::storage::etcd_options::DEFAULT_COMPACT_RETAIN,
                Some(v) => crate::duration::parse(&v).map_err(|_| {
                    ConfigError::Invalid(
                        "storage.etcd.compact_retain".into(),
                        "expected a duration such as 1h (0 keeps no history)",
                    )
                })?,
            };
            let size = |key: &'static str, default: usize| -> Result<usize, ConfigError> {
                match src.get(key) {
                    None => Ok(default),
                    Some(v) => v.parse().map_err(|_| {
                        ConfigError::Invalid(key.to_owned(), "expected a whole number (0: off)")
                    }),
                }
            };
            Ok(StorageBackend::Etcd(crate::storage::EtcdOptions {
                endpoints,
                prefix,
                ca: path("storage.etcd.ca"),
                cert: path("storage.etcd.cert"),
                key: path("storage.etcd.key"),
                compact_every,
                compact_retain,
                read_cache_bytes: size(
                    "storage.etcd.read_cache_bytes",
                    crate::storage::read_cache::DEFAULT_MAX_BYTES,
                )?,
                read_cache_entries: size(
                    "storage.etcd.read_cache_entries",
                    crate::storage::read_cache::DEFAULT_MAX_ENTRIES,
                )?,
                fence_interval: fence_interval(src.get("storage.etcd.fence_interval_us"))?,
                read_lease: flag(src, "storage.etcd.read_lease", true)?,
            }))
        }
        Some(_) => Err(ConfigError::Invalid(
            "storage.backend".into(),
            "expected sled or etcd",
        )),
    }
}

/// A `true`/`false` setting (exactly those words; anything else is refused,
/// so a `yes` or `True` is not taken for either), `default` when unset.
fn flag(src: &dyn Source, key: &'static str, default: bool) -> Result<bool, ConfigError> {
    match src.get(key).as_deref() {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(ConfigError::Invalid(
            key.to_owned(),
            "expected true or false",
        )),
    }
}

/// `storage.etcd.fence_interval_us`: microseconds, 0 to 100,000.
fn fence_interval(value: Option<String>) -> Result<std::time::Duration, ConfigError> {
    use crate::storage::etcd_options::{DEFAULT_FENCE_INTERVAL, MAX_FENCE_INTERVAL};
    let Some(value) = value else {
        return Ok(DEFAULT_FENCE_INTERVAL);
    };
    match value.parse::<u64>() {
        Ok(us) if u128::from(us) <= MAX_FENCE_INTERVAL.as_micros() => {
            Ok(std::time::Duration::from_micros(us))
        }
        _ => Err(ConfigError::Invalid(
            "storage.etcd.fence_interval_us".into(),
            "expected whole microseconds from 0 to 100000 (0: no pause between fence reads)",
        )),
    }
}

impl ServerConfig {
    /// A loopback server on an ephemeral port, without TLS and with the
    /// metrics and HTTPS listeners off; every other setting at its default.
    /// Tests, benchmarks and tools start from it and set what they need
    /// (`ServerConfig { tls: Some(..), ..ServerConfig::local(..) }`), so a new
    /// setting is added here once rather than at every construction.
    pub fn local(storage_path: PathBuf, audit_path: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            storage_path,
            tls: None,
            audit_path,
            metrics_listen: None,
            limits: DataLimits::default(),
            oidc: OidcConfig::default(),
            server_limits: ServerLimits::default(),
            audit: Default::default(),
            federation: FederationConfig::default(),
            http_listen: None,
            governance: GovernanceConfig::default(),
            anomaly: crate::anomaly::AnomalyConfig::default(),
            storage_backend: StorageBackend::Sled,
            node_id: DEFAULT_NODE_ID.to_owned(),
            listen_threads: 0,
        }
    }
}

/// The most `listen_threads` a configuration may ask for.
pub const MAX_LISTEN_THREADS: usize = 256;

/// `listen_threads` when none is given: a lane per core on sled; on etcd
/// none (the connections are served on the shared runtime), because a
/// call there blocks its thread for etcd's answers and a lane has no other
/// thread to move its other calls to (`server::lanes`).
pub fn default_listen_threads(backend: &StorageBackend) -> usize {
    match backend {
        StorageBackend::Sled => std::thread::available_parallelism().map_or(1, |n| n.get()),
        StorageBackend::Etcd(_) => 0,
    }
}

/// `listen_threads` from its value, if one is given: 0 to
/// [`MAX_LISTEN_THREADS`]; else [`default_listen_threads`].
pub fn parse_listen_threads(
    value: Option<&str>,
    backend: &StorageBackend,
) -> Result<usize, ConfigError> {
    let Some(value) = value else {
        return Ok(default_listen_threads(backend));
    };
    match value.parse::<usize>() {
        Ok(n) if n <= MAX_LISTEN_THREADS => Ok(n),
        _ => Err(ConfigError::Invalid(
            "listen_threads".into(),
            "expected a number from 0 to 256 (0 serves on the shared runtime)",
        )),
    }
}

/// `cluster.node_id` when none is given.
pub const DEFAULT_NODE_ID: &str = "kw1";

/// Owner recertification (`governance.*`): an identity is due for
/// attestation `recertify_every` after its last one (or its creation), and
/// overdue `unattested_grace` later; with `disable_unattested` an overdue
/// identity is disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GovernanceConfig {
    /// `governance.recertify_every`, default 90d.
    pub every: std::time::Duration,
    /// `governance.unattested_grace`, default 14d.
    pub grace: std::time::Duration,
    /// `governance.disable_unattested`, default false.
    pub disable_unattested: bool,
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        Self {
            every: std::time::Duration::from_secs(90 * 86_400),
            grace: std::time::Duration::from_secs(14 * 86_400),
            disable_unattested: false,
        }
    }
}

/// Delegated tokens (`delegation.*`) and keyward as an OIDC issuer
/// (`oidc_provider.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// `delegation.max_ttl`: the longest a delegated token lives.
    pub delegation_max_ttl: std::time::Duration,
    /// `delegation.actor_kinds`: identity kinds that may act for others.
    pub actor_kinds: Vec<String>,
    /// `oidc_provider.issuer`: the public URL relying parties fetch
    /// `/.well-known/openid-configuration` from; `None`: no identity tokens.
    pub issuer: Option<String>,
    /// `oidc_provider.trust_domain`: the SPIFFE trust domain of `sub`.
    pub trust_domain: Option<String>,
    /// `oidc_provider.algorithm`: `ES256` (default) or `EdDSA`.
    pub algorithm: String,
    /// `oidc_provider.rotation_period`: a new signing key this often.
    pub rotation_period: std::time::Duration,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            delegation_max_ttl: std::time::Duration::from_secs(15 * 60),
            actor_kinds: vec!["ai-agent".to_owned(), "bot".to_owned()],
            issuer: None,
            trust_domain: None,
            algorithm: "ES256".to_owned(),
            rotation_period: std::time::Duration::from_secs(30 * 86_400),
        }
    }
}

/// The `governance.*` keys, with their variables (known keys, like [`KEYS`]).
pub const GOVERNANCE_KEYS: &[(&str, &str)] = &[
    (
        "governance.recertify_every",
        "KEYWARD_GOVERNANCE_RECERTIFY_EVERY",
    ),
    (
        "governance.unattested_grace",
        "KEYWARD_GOVERNANCE_UNATTESTED_GRACE",
    ),
    (
        "governance.disable_unattested",
        "KEYWARD_GOVERNANCE_DISABLE_UNATTESTED",
    ),
];

fn parse_governance(src: &dyn Source) -> Result<GovernanceConfig, ConfigError> {
    let defaults = GovernanceConfig::default();
    let duration = |key: &'static str, default| match src.get(key) {
        None => Ok(default),
        Some(v) => match crate::duration::parse(&v) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(ConfigError::Invalid(
                key.to_owned(),
                "expected a duration such as 90d, at least 1s",
            )),
        },
    };
    let disable_unattested = flag(src, "governance.disable_unattested", false)?;
    Ok(GovernanceConfig {
        every: duration("governance.recertify_every", defaults.every)?,
        grace: duration("governance.unattested_grace", defaults.grace)?,
        disable_unattested,
    })
}

/// Where `audit.syslog = true` sends records unless `audit.syslog_socket` names another socket.
pub const DEFAULT_SYSLOG_SOCKET: &str = "/dev/log";

/// The `delegation.*` and `oidc_provider.*` keys (known keys, like [`KEYS`]).
pub const FEDERATION_KEYS: &[(&str, &str)] = &[
    ("delegation.max_ttl", "KEYWARD_DELEGATION_MAX_TTL"),
    ("delegation.actor_kinds", "KEYWARD_DELEGATION_ACTOR_KINDS"),
    ("oidc_provider.issuer", "KEYWARD_OIDC_PROVIDER_ISSUER"),
    (
        "oidc_provider.trust_domain",
        "KEYWARD_OIDC_PROVIDER_TRUST_DOMAIN",
    ),
    ("oidc_provider.algorithm", "KEYWARD_OIDC_PROVIDER_ALGORITHM"),
    (
        "oidc_provider.rotation_period",
        "KEYWARD_OIDC_PROVIDER_ROTATION_PERIOD",
    ),
];

/// Reads the `delegation.*` and `oidc_provider.*` keys.
pub fn parse_federation(src: &dyn Source) -> Result<FederationConfig, ConfigError> {
    let defaults = FederationConfig::default();
    let duration = |key: &'static str, default| match src.get(key) {
        None => Ok(default),
        Some(v) => crate::duration::parse(&v)
            .map_err(|_| ConfigError::Invalid(key.to_owned(), "expected a duration like 15m")),
    };
    let actor_kinds = match src.get("delegation.actor_kinds") {
        None => defaults.actor_kinds,
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    let issuer = src.get("oidc_provider.issuer");
    if let Some(url) = &issuer {
        if !url.starts_with("https://") || url.ends_with('/') || url.contains(['?', '#']) {
            return Err(ConfigError::Invalid(
                "oidc_provider.issuer".into(),
                "expected an https:// URL without a trailing '/', query or fragment",
            ));
        }
    }
    let trust_domain = src.get("oidc_provider.trust_domain");
    if let Some(td) = &trust_domain {
        let ok = !td.is_empty()
            && td.len() <= 255
            && td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !ok {
            return Err(ConfigError::Invalid(
                "oidc_provider.trust_domain".into(),
                "expected a SPIFFE trust domain: [a-z0-9._-], at most 255 bytes",
            ));
        }
    }
    let algorithm = match src.get("oidc_provider.algorithm").as_deref() {
        None | Some("ES256") => "ES256".to_owned(),
        Some("EdDSA") => "EdDSA".to_owned(),
        Some(_) => {
            return Err(ConfigError::Invalid(
                "oidc_provider.algorithm".into(),
                "expected ES256 or EdDSA",
            ))
        }
    };
    let config = FederationConfig {
        delegation_max_ttl: duration("delegation.max_ttl", defaults.delegation_max_ttl)?,
        actor_kinds,
        issuer,
        trust_domain,
        algorithm,
        rotation_period: duration("oidc_provider.rotation_period", defaults.rotation_period)?,
    };
    if config.delegation_max_ttl.is_zero() || config.rotation_period.is_zero() {
        return Err(ConfigError::Invalid(
            "delegation.max_ttl".into(),
            "durations must be at least 1s",
        ));
    }
    Ok(config)
}

/// How the server loads OIDC issuers' key sets (`oidc.*`).
#[derive(Debug, Clone, Default)]
pub struct OidcConfig {
    /// `oidc.ca_file`: CA bundle (PEM) trusted when fetching JWKS over HTTPS;
    /// `None`: only `--jwks-file` issuers work. For a public issuer point it
    /// at the system bundle, e.g. `/etc/ssl/certs/ca-certificates.crt`.
    pub ca_file: Option<PathBuf>,
    /// `oidc.jwks_dir`: the folder every `--jwks-file` must be under;
    /// `None`: `--jwks-file` is refused.
    pub jwks_dir: Option<PathBuf>,
    /// `oidc.allow_private_hosts`: also fetch JWKS from loopback, private
    /// and link-local addresses (off: an issuer admin could otherwise make
    /// the server connect into its own network).
    pub allow_private_hosts: bool,
}

// --- Limits on connections, streams and requests (`limits.*`) ---

/// How much one server lets its callers hold at once. Over a limit the
/// caller gets `RESOURCE_EXHAUSTED` (a Watch, an oversized request) or its
/// connection is closed at once (a connection over `max_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open connections (TCP, counted from accept, before TLS).
    pub max_connections: usize,
    /// HTTP/2 streams (calls) in flight on one connection; a client queues
    /// the calls over it (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Open `Watch` streams of one identity, all its tokens together (a
    /// child token has its parent's identity).
    pub max_watch_per_identity: usize,
    /// The largest request message, in bytes.
    pub max_request_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_concurrent_streams: 128,
            max_watch_per_identity: 64,
            max_request_bytes: 4 * 1024 * 1024,
        }
    }
}

impl ServerLimits {
    /// Streams that their client reset before the server took them from
    /// the connection (a burst of client timeouts while the server was
    /// busy) that may wait at once on one HTTP/2 connection; one more and
    /// the connection is closed (`GOAWAY` `ENHANCE_YOUR_CALM`). The stream
    /// limit: h2's default of 20 closed connections under a client's own
    /// timeouts and failed every other call on them. What waits stays
    /// bounded: this many beside the stream limit of open streams and
    /// [`MAX_LOCAL_ERROR_RESETS`].
    pub fn max_pending_reset_streams(&self) -> usize {
        self.max_concurrent_streams as usize
    }
}

/// Streams that the server itself resets or refuses over one HTTP/2
/// connection's life (a body longer than its `content-length`, a window
/// overrun, a stream over the stream limit), before it closes the
/// connection. Such a stream gives its slot back as soon as the server
/// has written its reset, taken or not, while a stream not yet taken
/// still waits to be; so without a bound a client could make the server
/// take streams without end (CVE-2025-8671, "MadeYouReset"). hyper's default, which
/// tonic switches off unless it is set. A well-behaved client causes few:
/// refusals before it has read the server's stream limit (when that is
/// under its guess of 100), data arriving on a stream already refused.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What a request may carry beyond one secret version's data (path, field
/// names, options): `limits.max_request_bytes` must leave this much room
/// above `limits.max_version_bytes`.
pub const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;

/// The `limits.*` keys of [`ServerLimits`], with their variables (known
/// keys, like [`KEYS`]).
pub const SERVER_LIMIT_KEYS: &[(&str, &str)] = &[
    ("limits.max_connections", "KEYWARD_LIMITS_MAX_CONNECTIONS"),
    (
        "limits.max_concurrent_streams",
        "KEYWARD_LIMITS_MAX_CONCURRENT_STREAMS",
    ),
    (
        "limits.max_watch_per_identity",
        "KEYWARD_LIMITS_MAX_WATCH_PER_IDENTITY",
    ),
    (
        "limits.max_request_bytes",
        "KEYWARD_LIMITS_MAX_REQUEST_BYTES",
    ),
];

/// Reads the `limits.*` keys of [`ServerLimits`]; each is at least 1, and a
/// request has room for the largest secret version.
fn parse_server_limits(
    src: &dyn Source,
    max_version_bytes: usize,
) -> Result<ServerLimits, ConfigError> {
    let number = |key: &'static str, default: usize| -> Result<usize, ConfigError> {
        let value = match src.get(key) {
            None => default,
            Some(v) => v
                .parse()
                .map_err(|_| ConfigError::Invalid(key.to_owned(), "expected a positive integer"))?,
        };
        if value == 0 {
            return Err(ConfigError::Invalid(key.to_owned(), "must be at least 1"));
        }
        Ok(value)
    };
    let defaults = ServerLimits::default();
    let streams = number(
        "limits.max_concurrent_streams",
        defaults.max_concurrent_streams as usize,
    )?;
    let limits = ServerLimits {
        max_connections: number("limits.max_connections", defaults.max_connections)?,
        max_concurrent_streams: u32::try_from(streams).map_err(|_| {
            ConfigError::Invalid("limits.max_concurrent_streams".into(), "too large")
        })?,
        max_watch_per_identity: number(
            "limits.max_watch_per_identity",
            defaults.max_watch_per_identity,
        )?,
        max_request_bytes: number("limits.max_request_bytes", defaults.max_request_bytes)?,
    };
    if limits.max_request_bytes < max_version_bytes.saturating_add(REQUEST_OVERHEAD_BYTES) {
        return Err(ConfigError::Invalid(
            "limits.max_request_bytes".into(),
            "must exceed limits.max_version_bytes by at least 65536",
        ));
    }
    Ok(limits)
}

/// Where settings come from: tests fill one from a map.
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

/// A flat map of dotted keys (`storage.path`) to values.
pub struct MapSource(pub BTreeMap<String, String>);

impl Source for MapSource {
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

/// Every key the server knows, with the environment variable that overrides it.
pub const KEYS: &[(&str, &str)] = &[
    ("listen", "KEYWARD_LISTEN"),
    ("storage.path", "KEYWARD_STORAGE_PATH"),
    ("tls.cert", "KEYWARD_TLS_CERT"),
    ("tls.key", "KEYWARD_TLS_KEY"),
    ("tls.client_ca", "KEYWARD_TLS_CLIENT_CA"),
    ("audit.path", "KEYWARD_AUDIT_PATH"),
    ("audit.max_bytes", "KEYWARD_AUDIT_MAX_BYTES"),
    ("audit.max_files", "KEYWARD_AUDIT_MAX_FILES"),
    ("audit.syslog", "KEYWARD_AUDIT_SYSLOG"),
    ("audit.syslog_socket", "KEYWARD_AUDIT_SYSLOG_SOCKET"),
    ("oidc.ca_file", "KEYWARD_OIDC_CA_FILE"),
    ("oidc.jwks_dir", "KEYWARD_OIDC_JWKS_DIR"),
    (
        "oidc.allow_private_hosts",
        "KEYWARD_OIDC_ALLOW_PRIVATE_HOSTS",
    ),
    ("metrics.listen", "KEYWARD_METRICS_LISTEN"),
    ("http.listen", "KEYWARD_HTTP_LISTEN"),
    ("limits.max_fields", "KEYWARD_LIMITS_MAX_FIELDS"),
    (
        "limits.max_version_bytes",
        "KEYWARD_LIMITS_MAX_VERSION_BYTES",
    ),
    (
        "limits.default_max_versions",
        "KEYWARD_LIMITS_DEFAULT_MAX_VERSIONS",
    ),
    ("storage.backend", "KEYWARD_STORAGE_BACKEND"),
    ("storage.etcd.endpoints", "KEYWARD_STORAGE_ETCD_ENDPOINTS"),
    ("storage.etcd.prefix", "KEYWARD_STORAGE_ETCD_PREFIX"),
    ("storage.etcd.ca", "KEYWARD_STORAGE_ETCD_CA"),
    ("storage.etcd.cert", "KEYWARD_STORAGE_ETCD_CERT"),
    ("storage.etcd.key", "KEYWARD_STORAGE_ETCD_KEY"),
    (
        "storage.etcd.compact_every",
        "KEYWARD_STORAGE_ETCD_COMPACT_EVERY",
    ),
    (
        "storage.etcd.compact_retain",
        "KEYWARD_STORAGE_ETCD_COMPACT_RETAIN",
    ),
    (
        "storage.etcd.read_cache_bytes",
        "KEYWARD_STORAGE_ETCD_READ_CACHE_BYTES",
    ),
    (
        "storage.etcd.read_cache_entries",
        "KEYWARD_STORAGE_ETCD_READ_CACHE_ENTRIES",
    ),
    (
        "storage.etcd.fence_interval_us",
        "KEYWARD_STORAGE_ETCD_FENCE_INTERVAL_US",
    ),
    ("storage.etcd.read_lease", "KEYWARD_STORAGE_ETCD_READ_LEASE"),
    ("cluster.node_id", "KEYWARD_CLUSTER_NODE_ID"),
    ("listen_threads", "KEYWARD_LISTEN_THREADS"),
];

fn flatten(
    prefix: &str,
    table: &toml::Table,
    out: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out)?,
            toml::Value::String(s) => {
                out.insert(key, s.clone());
            }
            toml::Value::Integer(i) => {
                out.insert(key, i.to_string());
            }
            toml::Value::Boolean(b) => {
                out.insert(key, b.to_string());
            }
            // A list of words (`delegation.actor_kinds`): read as a comma list.
            toml::Value::Array(items) if items.iter().all(|i| i.is_str()) => {
                let words: Vec<&str> = items.iter().filter_map(|i| i.as_str()).collect();
                out.insert(key, words.join(","));
            }
            _ => {
                return Err(ConfigError::Invalid(
                    key,
                    "expected a string, integer or boolean",
                ))
            }
        }
    }
    Ok(())
}

/// Reads a TOML file and applies the environment overrides. Relative paths
/// in the file are taken relative to the file's folder.
pub fn load_file(path: &Path) -> Result<ServerConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Toml(e.message().to_owned()))?;
    let mut flat = BTreeMap::new();
    flatten("", &table, &mut flat)?;
    let known = || {
        KEYS.iter()
            .chain(SERVER_LIMIT_KEYS)
            .chain(GOVERNANCE_KEYS)
            .chain(FEDERATION_KEYS)
            .chain(crate::anomaly::ANOMALY_KEYS)
    };
    for key in flat.keys() {
        if !known().any(|(k, _)| k == key) {
            return Err(ConfigError::Unknown(key.clone()));
        }
    }
    for (key, var) in known() {
        if let Ok(v) = std::env::var(var) {
            flat.insert((*key).to_owned(), v);
        }
    }
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&MapSource(flat), base)
}

/// The largest `limits.max_version_bytes` on etcd.
pub const ETCD_MAX_VERSION_BYTES: usize = 1024 * 1024;
/// The largest `limits.max_fields` on etcd.
pub const ETCD_MAX_FIELDS: usize = 512;

/// Builds the typed configuration from a source.
pub fn parse(src: &dyn Source, base: &Path) -> Result<ServerConfig, ConfigError> {
    let path = |key: &'static str| src.get(key).map(|v| base.join(v));
    let addr = |key: &'static str, default: &str| -> Result<SocketAddr, ConfigError> {
        src.get(key)
            .unwrap_or_else(|| default.to_owned())
            .parse()
            .map_err(|_| {
                ConfigError::Invalid(key.to_owned(), "expected HOST:PORT with an IP address")
            })
    };
    let number = |key: &'static str, default: usize| -> Result<usize, ConfigError> {
        match src.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ConfigError::Invalid(key.to_owned(), "expected a positive integer")),
        }
    };
    let defaults = DataLimits::default();
    let limits = DataLimits {
        max_fields: number("limits.max_fields", defaults.max_fields)?,
        max_bytes: number("limits.max_version_bytes", defaults.max_bytes)?,
        default_max_versions: u32::try_from(number(
            "limits.default_max_versions",
            defaults.default_max_versions as usize,
        )?)
        .map_err(|_| ConfigError::Invalid("limits.default_max_versions".into(), "too large"))?,
        max_max_versions: defaults.max_max_versions,
    };
    if limits.max_fields == 0 || limits.max_bytes == 0 || limits.default_max_versions == 0 {
        return Err(ConfigError::Invalid(
            "limits".into(),
            "limits must be at least 1",
        ));
    }
    let tls = match (path("tls.cert"), path("tls.key")) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert,
            key,
            client_ca: path("tls.client_ca"),
        }),
        (None, None) => None,
        (Some(_), None) => return Err(ConfigError::Missing("tls.key")),
        (None, Some(_)) => return Err(ConfigError::Missing("tls.cert")),
    };
    let metrics_listen = match src.get("metrics.listen").as_deref() {
        Some("off") | Some("") => None,
        _ => Some(addr("metrics.listen", DEFAULT_METRICS_LISTEN)?),
    };
    let http_listen = match src.get("http.listen").as_deref() {
        Some("off") | Some("") => None,
        _ => Some(addr("http.listen", DEFAULT_HTTP_LISTEN)?),
    };
    let storage_backend = parse_storage_backend(src, base)?;
    // One etcd request holds at most 1.5 MiB: a version's record, with its
    // metadata in the same transaction, must fit.
    if matches!(storage_backend, StorageBackend::Etcd(_)) {
        if limits.max_bytes > ETCD_MAX_VERSION_BYTES {
            return Err(ConfigError::Invalid(
                "limits.max_version_bytes".into(),
                "at most 1048576 on etcd (one etcd request holds at most 1.5 MiB)",
            ));
        }
        // The metadata lists each staged version's fingerprints (32 bytes a
        // field, up to three versions) and a guarded write sends it twice.
        if limits.max_fields > ETCD_MAX_FIELDS {
            return Err(ConfigError::Invalid(
                "limits.max_fields".into(),
                "at most 512 on etcd (a version's metadata must fit one etcd request)",
            ));
        }
    }
    let listen_threads =
        parse_listen_threads(src.get("listen_threads").as_deref(), &storage_backend)?;
    Ok(ServerConfig {
        listen_threads,
        http_listen,
        listen: addr("listen", DEFAULT_LISTEN)?,
        storage_path: path("storage.path").ok_or(ConfigError::Missing("storage.path"))?,
        tls,
        audit_path: path("audit.path").ok_or(ConfigError::Missing("audit.path"))?,
        metrics_listen,
        limits,
        oidc: OidcConfig {
            ca_file: path("oidc.ca_file"),
            jwks_dir: path("oidc.jwks_dir"),
            allow_private_hosts: flag(src, "oidc.allow_private_hosts", false)?,
        },
        server_limits: parse_server_limits(src, limits.max_bytes)?,
        audit: crate::audit::AuditOptions {
            max_bytes: number("audit.max_bytes", 0)? as u64,
            max_files: u32::try_from(number("audit.max_files", 0)?)
                .map_err(|_| ConfigError::Invalid("audit.max_files".into(), "too large"))?,
            syslog: if flag(src, "audit.syslog", false)? {
                Some(
                    src.get("audit.syslog_socket")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_SYSLOG_SOCKET)),
                )
            } else {
                None
            },
        },
        governance: parse_governance(src)?,
        federation: parse_federation(src)?,
        anomaly: crate::anomaly::parse_config(&|key| src.get(key))
            .map_err(|(key, why)| ConfigError::Invalid(key, why))?,
        storage_backend,
        node_id: src
            .get("cluster.node_id")
            .unwrap_or_else(|| DEFAULT_NODE_ID.to_owned()),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn src(pairs: &[(&str, &str)]) -> MapSource {
        MapSource(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn parses_the_fixed_keys() {
        let c = parse(
            &src(&[
                ("listen", "127.0.0.1:1"),
                ("storage.path", "data"),
                ("tls.cert", "s.pem"),
                ("tls.key", "k.pem"),
                ("audit.path", "audit.log"),
                ("metrics.listen", "off"),
            ]),
            Path::new("/etc/kw"),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.storage_path, Path::new("/etc/kw/data"));
        assert!(c.tls.unwrap().client_ca.is_none());
        assert!(c.metrics_listen.is_none());
        assert!(c.oidc.jwks_dir.is_none());
        assert!(!c.oidc.allow_private_hosts);
    }

    #[test]
    fn etcd_compaction_has_defaults_and_can_be_off() {
        let base = [
            ("storage.path", "d"),
            ("audit.path", "a"),
            ("storage.backend", "etcd"),
            ("storage.etcd.endpoints", "http://127.0.0.1:2379"),
        ];
        let etcd = |extra: &[(&'static str, &'static str)]| {
            let mut pairs = base.to_vec();
            pairs.extend_from_slice(extra);
            match parse(&src(&pairs), Path::new("."))?.storage_backend {
                StorageBackend::Etcd(options) => Ok(options),
                // Not expected: the test's unwraps then fail, naming it.
                StorageBackend::Sled => Err(ConfigError::Missing("storage.etcd")),
            }
        };
        // A version must fit one etcd request.
        assert!(etcd(&[("limits.max_version_bytes", "1048576")]).is_ok());
        assert!(matches!(
            etcd(&[("limits.max_version_bytes", "1048577")]),
            Err(ConfigError::Invalid(key, _)) if key == "limits.max_version_bytes"
        ));
        assert!(etcd(&[("limits.max_fields", "512")]).is_ok());
        assert!(matches!(
            etcd(&[("limits.max_fields", "513")]),
            Err(ConfigError::Invalid(key, _)) if key == "limits.max_fields"
        ));
        let defaults = etcd(&[]).unwrap();
        assert_eq!(
            defaults.compact_every,
            Some(std::time::Duration::from_secs(300))
        );
        assert_eq!(
            defaults.compact_retain,
            std::time::Duration::from_secs(3600)
        );
        for off in ["0", "off", "0s"] {
            assert_eq!(
                etcd(&[("storage.etcd.compact_every", off)])
                    .unwrap()
                    .compact_every,
                None
            );
        }
        let set = etcd(&[
            ("storage.etcd.compact_every", "1m"),
            ("storage.etcd.compact_retain", "0"),
        ])
        .unwrap();
        assert_eq!(set.compact_every, Some(std::time::Duration::from_secs(60)));
        assert!(set.compact_retain.is_zero());
        assert!(matches!(
            etcd(&[("storage.etcd.compact_every", "often")]),
            Err(ConfigError::Invalid(key, _)) if key == "storage.etcd.compact_every"
        ));
        assert!(matches!(
            etcd(&[("storage.etcd.compact_retain", "off")]),
            Err(ConfigError::Invalid(key, _)) if key == "storage.etcd.compact_retain"
        ));
        // The fence interval: 2 ms by default, whole microseconds up to 0.1 s.
        assert_eq!(defaults.fence_interval, std::time::Duration::from_millis(2));
        for (text, us) in [("0", 0), ("500", 500), ("100000", 100_000)] {
            assert_eq!(
                etcd(&[("storage.etcd.fence_interval_us", text)])
                    .unwrap()
                    .fence_interval,
                std::time::Duration::from_micros(us)
            );
        }
        for bad in ["100001", "-1", "2ms", ""] {
            assert!(matches!(
                etcd(&[("storage.etcd.fence_interval_us", bad)]),
                Err(ConfigError::Invalid(key, _)) if key == "storage.etcd.fence_interval_us"
            ));
        }
        // The read lease: on by default.
        assert!(defaults.read_lease);
        assert!(
            !etcd(&[("storage.etcd.read_lease", "false")])
                .unwrap()
                .read_lease
        );
        assert!(matches!(
            etcd(&[("storage.etcd.read_lease", "no")]),
            Err(ConfigError::Invalid(key, _)) if key == "storage.etcd.read_lease"
        ));
    }

    #[test]
    fn http_listen_has_vaults_port_and_can_be_off() {
        let base = [("storage.path", "d"), ("audit.path", "a")];
        let c = parse(&src(&base), Path::new(".")).unwrap();
        assert_eq!(c.http_listen, Some("127.0.0.1:8200".parse().unwrap()));
        let mut pairs = base.to_vec();
        pairs.push(("http.listen", "off"));
        assert_eq!(
            parse(&src(&pairs), Path::new(".")).unwrap().http_listen,
            None
        );
        let mut pairs = base.to_vec();
        pairs.push(("http.listen", "localhost"));
        let e = parse(&src(&pairs), Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("'http.listen'"), "{e}");
    }

    #[test]
    fn oidc_keys() {
        let base = [("storage.path", "d"), ("audit.path", "a")];
        let mut pairs = base.to_vec();
        pairs.extend([
            ("oidc.jwks_dir", "jwks"),
            ("oidc.allow_private_hosts", "true"),
        ]);
        let c = parse(&src(&pairs), Path::new("/etc/kw")).unwrap();
        assert_eq!(c.oidc.jwks_dir.as_deref(), Some(Path::new("/etc/kw/jwks")));
        assert!(c.oidc.allow_private_hosts);
        let mut pairs = base.to_vec();
        pairs.push(("oidc.allow_private_hosts", "yes"));
        let e = parse(&src(&pairs), Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("'oidc.allow_private_hosts'"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&src(&[("audit.path", "a")]), Path::new(".")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration key 'storage.path' is required"
        );
        let e = parse(
            &src(&[
                ("storage.path", "d"),
                ("audit.path", "a"),
                ("listen", "nope"),
            ]),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("'listen'"), "{e}");
        assert!(!e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn listen_threads_default_to_a_lane_per_core_on_sled_and_none_on_etcd() {
        let sled = [("storage.path", "d"), ("audit.path", "a")];
        let etcd = [
            ("storage.path", "d"),
            ("audit.path", "a"),
            ("storage.backend", "etcd"),
            ("storage.etcd.endpoints", "http://127.0.0.1:2379"),
        ];
        let parsed = |base: &[(&str, &str)], extra: Option<&str>| {
            let mut pairs = base.to_vec();
            if let Some(n) = extra {
                pairs.push(("listen_threads", n));
            }
            parse(&src(&pairs), Path::new("."))
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(parsed(&sled, None).unwrap().listen_threads, cores);
        assert_eq!(parsed(&etcd, None).unwrap().listen_threads, 0);
        assert_eq!(parsed(&sled, Some("0")).unwrap().listen_threads, 0);
        assert_eq!(parsed(&etcd, Some("3")).unwrap().listen_threads, 3);
        assert_eq!(parsed(&sled, Some("256")).unwrap().listen_threads, 256);
        for bad in ["257", "-1", "two"] {
            assert!(
                matches!(
                    parsed(&sled, Some(bad)),
                    Err(ConfigError::Invalid(key, _)) if key == "listen_threads"
                ),
                "{bad}"
            );
        }
        // The library's own starting point serves on the caller's runtime.
        let local = ServerConfig::local("d".into(), "a".into());
        assert_eq!(local.listen_threads, 0);
    }

    #[test]
    fn server_limits_have_defaults_and_refuse_zero_and_a_too_small_request() {
        let base = [("storage.path", "d"), ("audit.path", "a")];
        let c = parse(&src(&base), Path::new(".")).unwrap();
        assert_eq!(c.server_limits, ServerLimits::default());
        let with = |extra: (&str, &str)| {
            let mut pairs = base.to_vec();
            pairs.push(extra);
            parse(&src(&pairs), Path::new("."))
        };
        let c = with(("limits.max_watch_per_identity", "3")).unwrap();
        assert_eq!(c.server_limits.max_watch_per_identity, 3);
        for key in [
            "limits.max_connections",
            "limits.max_concurrent_streams",
            "limits.max_watch_per_identity",
            "limits.max_request_bytes",
        ] {
            let e = with((key, "0")).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
        // A request must have room for the largest secret version.
        let e = with(("limits.max_request_bytes", "524288")).unwrap_err();
        assert!(e.to_string().contains("limits.max_request_bytes"), "{e}");
    }
}
