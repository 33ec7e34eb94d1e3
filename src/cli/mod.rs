//! The command line of INTERFACE.md. Parses arguments with clap, talks to the
//! server through `keyward::client`, prints JSON (`--format json`: exactly one
//! document on stdout) or a table, and exits 0 on success, 1 when the server
//! refuses or fails, 2 on a usage error.

mod bench;
mod common;
mod dynamic;
mod federation;
mod ident;
mod lifecycle;
mod migrate;
mod ops;
mod output;
mod pki;
mod rotation;
mod run;
mod scan;
mod serve;
// -- anomaly detection (issue 13) --
mod anomalies;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keyward::duration::TtlText;

pub use output::Format;

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "A secrets vault and rotation broker for non-human identities"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Server address.
    #[arg(long, global = true, env = "KEYWARD_ADDR", default_value = keyward::client::DEFAULT_ADDR)]
    pub addr: String,
    /// Bearer token.
    #[arg(long, global = true, env = "KEYWARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate that signed the server's certificate.
    #[arg(long, global = true, env = "KEYWARD_CACERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (for `login cert`).
    #[arg(long, global = true, env = "KEYWARD_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, global = true, env = "KEYWARD_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, env = "KEYWARD_FORMAT", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a development server: generated certificates, one unseal share, data kept in DIR.
    Dev {
        #[arg(long, default_value = keyward::config::DEFAULT_LISTEN)]
        listen: String,
        #[arg(long, default_value = keyward::config::DEFAULT_METRICS_LISTEN)]
        metrics_listen: String,
        /// The HTTPS listener (Vault-compatible API); `off` disables it.
        #[arg(long, env = "KEYWARD_HTTP_LISTEN", default_value = keyward::config::DEFAULT_HTTP_LISTEN)]
        http_listen: String,
        #[arg(long, default_value = "./keyward-dev")]
        data: PathBuf,
    },
    /// Run a production server from a TOML configuration file; it starts sealed.
    Server {
        #[arg(long)]
        config: PathBuf,
        /// Serve gRPC without TLS. Only for local experiments.
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Seal operations.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Seal state, version and keyring term.
    Status,
    /// Versioned secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Named policies of rules over resource paths.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Tokens: issue a child, look up, renew, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The inventory of non-human identities, secret-ids and login bindings.
    #[command(subcommand)]
    Identity(ident::IdentityCommand),
    /// OIDC issuers whose tokens `login oidc` accepts.
    #[command(subcommand)]
    OidcIssuer(ident::OidcIssuerCommand),
    /// Exchange a credential for a short-lived token.
    #[command(subcommand)]
    Login(ident::LoginCommand),
    /// keyward as an OIDC issuer: roles and signing keys.
    #[command(subcommand)]
    Oidc(federation::OidcCommand),
    /// The governance report: identities, owners, dormancy, unused grants, credentials.
    Report(ident::ReportArgs),
    /// Rotation policies: provider, schedule, grace period, settings.
    #[command(subcommand)]
    Rotation(RotationCommand),
    /// Rotate a secret now; waits and prints the steps (exit 1 if it failed).
    Rotate {
        path: String,
        /// Answer at once instead of waiting for the rotation to finish.
        #[arg(long)]
        no_wait: bool,
    },
    /// Dynamic credentials: roles that make a database user per requester.
    #[command(subcommand)]
    Dynamic(dynamic::DynamicCommand),
    /// A new database credential from a dynamic role, under a lease.
    Creds {
        role: String,
        /// Lease TTL (default: the role's; at most its max TTL).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Leases of dynamic credentials: lookup, list, renew, revoke.
    #[command(subcommand)]
    Lease(dynamic::LeaseCommand),
    /// External rotation providers (keyward.provider.v1 plugins).
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// Short-lived workload certificates: CA, roles, issue, sign, inventory, CRL.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Measure throughput and latency against a live server.
    Bench(BenchArgs),
    /// Offline snapshot operations (no server): restore.
    #[command(subcommand)]
    Snapshot(ops::SnapshotCommand),
    /// Generate a CA, server and client certificates into a folder.
    Certs {
        #[arg(long)]
        out: PathBuf,
    },
    /// Find leaked credentials and stored secrets' values in files and git
    /// history (exit 1 when anything is found).
    Scan(scan::ScanArgs),
    /// Anomalies detected by comparing identities with their baselines.
    #[command(subcommand)]
    Anomalies(anomalies::AnomaliesCommand),
    /// Copy a single-node vault's store (ciphertext, keys unchanged) into an
    /// empty etcd prefix: --from sled:DIR --to etcd:CONFIG. Offline.
    Migrate {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
pub enum OperatorCommand {
    /// Initialise the vault: prints the unseal shares and the root token once.
    Init {
        #[arg(long, default_value_t = 5)]
        shares: u32,
        #[arg(long, default_value_t = 3)]
        threshold: u32,
    },
    /// Give one unseal share.
    Unseal {
        share: Option<String>,
        /// Forget the shares given so far.
        #[arg(long)]
        reset: bool,
    },
    /// Seal the vault: every key leaves memory.
    Seal,
    /// Add a keyring term; new writes use it.
    RotateKey,
    /// Snapshots of the whole store.
    #[command(subcommand)]
    Snapshot(ops::OperatorSnapshotCommand),
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Write a new version: FIELD=VALUE, FIELD=@file or FIELD=- (stdin).
    Put {
        path: String,
        #[arg(required = true)]
        fields: Vec<String>,
        /// Write only if the newest version is this one (0: only if new).
        #[arg(long)]
        cas: Option<u64>,
        #[arg(long)]
        max_versions: Option<u32>,
        #[arg(long)]
        owner: Option<String>,
    },
    /// Read a version (default: current).
    Get {
        path: String,
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        stage: Option<String>,
        /// Print only this field's raw value, no newline added.
        #[arg(long)]
        field: Option<String>,
    },
    /// Paths under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Versions, stages and times of a secret.
    Metadata { path: String },
    /// Soft-delete a version (default: current).
    Delete {
        path: String,
        #[arg(long)]
        version: Option<u64>,
    },
    Undelete {
        path: String,
        #[arg(long)]
        version: u64,
    },
    /// Remove a version's data for good.
    Destroy {
        path: String,
        #[arg(long)]
        version: u64,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Store (or replace) a policy from a TOML file (`-`: stdin).
    Put { name: String, file: PathBuf },
    /// Print a policy's TOML.
    Get { name: String },
    /// Every policy name.
    List,
    /// Delete a policy (tokens holding it lose its grants at once).
    Delete { name: String },
    /// A policy of exactly what an identity used, with the diff against
    /// the policies it holds.
    Suggest(lifecycle::SuggestArgs),
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Issue a child of the current token; its policies must be a subset.
    Issue {
        /// A policy of the new token (repeat for several).
        #[arg(long = "policy", value_name = "P")]
        policies: Vec<String>,
        /// Life of the token, e.g. 90s, 15m, 1h, 30d (default 1h).
        #[arg(long, value_name = "D")]
        ttl: Option<TtlText>,
        /// Cap on its life including renewals (default 24h, or the TTL if longer).
        #[arg(long, value_name = "D")]
        max_ttl: Option<TtlText>,
        /// Number of uses (default unlimited).
        #[arg(long, value_name = "N")]
        uses: Option<u32>,
        /// Source addresses allowed to use it (repeat for several).
        #[arg(long = "cidr", value_name = "CIDR")]
        cidrs: Vec<keyward::cidr::Cidr>,
        /// Make an exchange-only token that only this identity (an agent)
        /// may use, with `token exchange` (RFC 8693 may_act).
        #[arg(long, value_name = "IDENTITY")]
        may_act: Option<String>,
    },
    /// Exchange a subject's exchange-only token for a delegated token, with
    /// this (the agent's) token as the actor.
    Exchange(federation::ExchangeArgs),
    /// Show a token: the current one, one by its text, or one by accessor.
    Lookup {
        /// A token's text (the global `--token` is the caller's own).
        #[arg(id = "token_text", value_name = "TOKEN", conflicts_with = "accessor")]
        token: Option<String>,
        #[arg(long, value_name = "A")]
        accessor: Option<String>,
    },
    /// Extend the current token's life (never past its max TTL).
    Renew {
        #[arg(long, value_name = "D")]
        increment: Option<TtlText>,
    },
    /// Revoke a token and its descendants: the current one, one by its text, or by accessor.
    Revoke {
        /// A token's text (the global `--token` is the caller's own).
        #[arg(id = "token_text", value_name = "TOKEN", conflicts_with = "accessor")]
        token: Option<String>,
        #[arg(long, value_name = "A")]
        accessor: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit files, in the order given, as one chain
    /// (rotated files first: `audit.log.0* audit.log`).
    Verify {
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
    /// The HMAC under which VALUE appears in the audit log.
    Hash { value: String },
}

#[derive(Subcommand)]
pub enum RotationCommand {
    /// Set (or replace) the rotation policy of a secret.
    Set {
        path: String,
        #[arg(long)]
        provider: String,
        /// Rotate every D (90s, 15m, 1h, 30d; at least 1s).
        #[arg(long, conflicts_with = "cron")]
        every: Option<String>,
        /// Rotate at the times of a cron expression (UTC).
        #[arg(long)]
        cron: Option<String>,
        /// How long `previous` keeps working after a rotation.
        #[arg(long, default_value = "1h")]
        grace: String,
        /// Provider settings KEY=VALUE (secret references, never credentials).
        #[arg(long = "config")]
        config: Vec<String>,
    },
    /// Show a secret's rotation policy and its last outcome.
    Get { path: String },
    /// Every rotation policy.
    List {
        /// Only those due now.
        #[arg(long)]
        due: bool,
        /// Only those whose last rotation failed.
        #[arg(long)]
        failed: bool,
    },
    /// The recent rotations of a secret, newest first, with their steps.
    History { path: String },
    /// Remove a secret's rotation policy.
    Delete { path: String },
}

#[derive(Subcommand)]
pub enum ProviderCommand {
    /// Register an external provider by its endpoint (unix:PATH or https://...).
    Register {
        name: String,
        #[arg(long)]
        endpoint: String,
        /// CA certificate that signed an https plugin's certificate.
        #[arg(long)]
        plugin_ca: Option<PathBuf>,
        /// Replace the endpoint of a provider registered under NAME (needs
        /// admin on sys/rotation/providers; audited).
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// TLS connections shared by the workers.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// The server's pid (same machine): report its CPU time per call.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

#[derive(Subcommand, Clone)]
pub enum BenchMode {
    /// Start-up to ready with N live tokens in the store: writes them into a
    /// fresh store in DIR, then times Server::open + unseal in a new process
    /// and reports startup_ms and the RSS growth.
    Startup {
        /// Live tokens to write (writing stops after --write-seconds).
        #[arg(long, default_value_t = 1_000_000)]
        tokens: u64,
        /// Folder of the store (default: a new temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Longest time spent writing tokens.
        #[arg(long, default_value_t = 180)]
        write_seconds: u64,
        /// Internal: only open and unseal the store in DIR, then report.
        #[arg(long, hide = true)]
        open_only: bool,
    },
    /// Snapshot save and restore times and file size over a store made by
    /// `bench startup --dir DIR` (its data is left as it was).
    Snapshot {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Server instructions per call, Get against the no-op health check:
    /// starts `keyward dev` under valgrind's callgrind (a count that does
    /// not depend on machine load), makes REQUESTS calls of each, and
    /// prints the instructions per call and their ratio.
    Instructions {
        /// Calls of each kind counted.
        #[arg(long, default_value_t = 2000)]
        requests: u64,
        /// Also count the Vault-compatible HTTP API: `GET /v1/sys/health`
        /// (its no-op) and a KV v2 read (`GET /v1/secret/data/...`), each
        /// over `--concurrency` keep-alive HTTP/1.1 TLS connections.
        #[arg(long)]
        http: bool,
        /// Also count child-token issues (`Auth/IssueToken`, durable, one
        /// named policy, a minute's life, as `keyward bench` makes them):
        /// all of the server's threads, the store's flushes included.
        #[arg(long)]
        issue: bool,
        /// Keep callgrind's dump of each counted phase in DIR
        /// (`callgrind.PHASE`), for `callgrind_annotate`.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}

/// A refusal that is the user's fault: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e.downcast_ref::<UsageError>().is_some()
                || matches!(
                    e.downcast_ref::<keyward::client::ClientError>(),
                    Some(keyward::client::ClientError::Config(..))
                );
            eprintln!("error: {e:#}");
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}
