//! Dynamic credentials: roles that say how to make a database user for one
//! requester, and the issue of such a user under a lease (`crate::lease`).
//!
//! Storage prefix `dynamic/` (through the barrier): `dynamic/roles/<name>` ->
//! the [`RoleRecord`]. The leases themselves live under `leases/`.
//!
//! What a new user may do is never free-form SQL: PostgreSQL and MariaDB
//! users are granted existing roles (`roles=`), Redis users get ACL rules
//! from an allowlist (`acl=`, see [`check_acl`]). Names are generated
//! (`kw_<role>_<16 hex digits>`), never taken from the caller.
//!
//! A role may also name a registered external provider (a plugin, see
//! `rotation::providers::external`) that serves `Create` and `Revoke`: the
//! plugin makes the account's name and password; keyward keeps the lease.
//! Its `--config` keys are the ones the plugin's `Describe` lists as
//! `dynamic_settings`, and `admin_secret` (optional), which keyward reads
//! and hands over.
//!
//! Issue order (crash safety): the lease is written and flushed first, the
//! user is made on the target second. A plugin is given the lease id, and
//! its `Revoke` finds the account by it, so the same holds for plugins. A crash in between leaves a lease
//! whose revocation finds no user (success); a crash after leaves a lease
//! the sleeper revokes at its expiry. A failed create revokes the lease at
//! once (dropping whatever part of the user was made).

mod pool;
mod targets;

pub use pool::{CHECK_AFTER, IDLE_CLOSE, MAX_LIFETIME, MAX_PER_LOGIN};
pub use targets::DEFAULT_SCRAM_ITERATIONS;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use prost::Message;

use crate::barrier::{Barrier, BarrierError};
use crate::clock::Clock;
use crate::lease::{BoxFuture, LeaseError, LeaseRecord, LeaseStore, Revoker};
use crate::policy::Authorized;
use crate::rotation::provider::{Provider, ProviderError};
use crate::rotation::providers::external::{DynamicCall, ExternalProvider};
use crate::rotation::providers::random::random_string;
use crate::rotation::providers::target::{new_password, Login};
use crate::rotation::providers::Charset;
use crate::secrecy::{SecretBytes, SecretData};
use crate::secrets::{SecretPath, SecretStore, Selector, Stage};

const ROLE_PREFIX: &str = "dynamic/roles/";
/// Longest role name: `kw_<role>_<16>` stays within PostgreSQL's 63 bytes
/// and MariaDB's 80.
pub const MAX_ROLE_NAME: usize = 32;
/// The longest TTL or max TTL of a role.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 86_400);
/// Most granted roles per dynamic role.
const MAX_ROLES: usize = 16;
/// Longest `acl=` rule list.
const MAX_ACL_LEN: usize = 4096;
/// Most PBKDF2 rounds a role may ask for (`scram_iterations=`).
const MAX_SCRAM_ITERATIONS: u32 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum DynamicError {
    /// The role definition or request breaks a rule (the message names it).
    #[error("{0}")]
    Invalid(String),
    #[error("no dynamic role named `{0}`")]
    UnknownRole(String),
    /// The admin secret is missing or unusable (named by path, never by value).
    #[error("{0}")]
    AdminSecret(String),
    /// The target refused or could not be reached.
    #[error(transparent)]
    Target(#[from] ProviderError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("stored dynamic role record is corrupt")]
    Corrupt,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

/// The providers dynamic credentials can be made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Postgres,
    Mysql,
    Redis,
}

impl Kind {
    pub fn parse(name: &str) -> Result<Self, DynamicError> {
        match name {
            "postgres" => Ok(Self::Postgres),
            "mysql" => Ok(Self::Mysql),
            "redis" => Ok(Self::Redis),
            other => Err(DynamicError::Invalid(format!(
                "provider `{}`: not a built-in provider of dynamic credentials (postgres, mysql, redis)",
                short(other)
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Redis => "redis",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Postgres => 5432,
            Self::Mysql => 3306,
            Self::Redis => 6379,
        }
    }
}

/// Who makes a role's accounts: a built-in provider or a registered plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Builtin(Kind),
    /// The registered name of an external provider.
    Plugin(String),
}

impl Backend {
    /// A built-in name, or any well-formed provider name (a plugin: whether
    /// it is registered and serves `Create` is checked against the target,
    /// see [`DynamicStore::check_target`]).
    pub fn parse(name: &str) -> Result<Self, DynamicError> {
        if let Ok(kind) = Kind::parse(name) {
            return Ok(Self::Builtin(kind));
        }
        if crate::rotation::providers::Registry::check_name(name).is_ok() {
            return Ok(Self::Plugin(name.to_owned()));
        }
        Err(DynamicError::Invalid(format!(
            "provider `{}`: dynamic credentials are made by postgres, mysql, redis or a registered plugin (1 to 64 of a-z, 0-9, '_' and '-', starting with a letter)",
            short(name)
        )))
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Builtin(kind) => kind.as_str(),
            Self::Plugin(name) => name,
        }
    }
}

/// The registered providers, as the dynamic module sees them.
pub trait Plugins: Send + Sync {
    fn provider(&self, name: &str) -> Option<Arc<dyn Provider>>;
}

impl Plugins for crate::rotation::Broker {
    fn provider(&self, name: &str) -> Option<Arc<dyn Provider>> {
        crate::rotation::Broker::provider(self, name)
    }
}

/// Weak: the broker reaches the lease store (through the token store's
/// revoke listener), so a strong handle here would be a cycle that keeps
/// the storage open after the server stops.
type PluginSlot = Arc<OnceLock<Weak<dyn Plugins>>>;

fn plugin_of(slot: &PluginSlot, name: &str) -> Result<Arc<ExternalProvider>, DynamicError> {
    slot.get()
        .and_then(Weak::upgrade)
        .and_then(|p| p.provider(name))
        .and_then(Provider::into_external)
        .ok_or_else(|| {
            DynamicError::Invalid(format!(
                "provider `{}` is neither built in (postgres, mysql, redis) nor a registered, connected plugin (`keyward provider register`)",
                short(name)
            ))
        })
}

fn short(text: &str) -> String {
    text.chars().take(64).collect()
}

/// A role, under `dynamic/roles/<name>`.
#[derive(Clone, PartialEq, Message)]
pub struct RoleRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub provider: String,
    #[prost(string, tag = "3")]
    pub admin_secret: String,
    /// PostgreSQL / MariaDB roles granted to each new user.
    #[prost(string, repeated, tag = "4")]
    pub roles: Vec<String>,
    /// Redis ACL rules (allowlisted).
    #[prost(string, tag = "5")]
    pub acl: String,
    #[prost(uint64, tag = "6")]
    pub ttl_ms: u64,
    #[prost(uint64, tag = "7")]
    pub max_ttl_ms: u64,
    #[prost(uint64, tag = "8")]
    pub created_ms: u64,
    /// The identity that defined it.
    #[prost(string, tag = "9")]
    pub set_by: String,
    /// A plugin role's `--config` pairs (`admin_secret` apart).
    #[prost(btree_map = "string, string", tag = "10")]
    pub settings: BTreeMap<String, String>,
    /// PostgreSQL: PBKDF2 rounds of each user's SCRAM verifier (0: the
    /// default, [`DEFAULT_SCRAM_ITERATIONS`]).
    #[prost(uint32, tag = "11")]
    pub scram_iterations: u32,
}

impl RoleRecord {
    pub fn backend(&self) -> Result<Backend, DynamicError> {
        Backend::parse(&self.provider)
    }

    /// The settings as `KEY=VALUE` pairs (no secret among them).
    pub fn config(&self) -> BTreeMap<String, String> {
        let mut out = self.settings.clone();
        if !self.admin_secret.is_empty() {
            out.insert("admin_secret".to_owned(), self.admin_secret.clone());
        }
        if !self.roles.is_empty() {
            out.insert("roles".to_owned(), self.roles.join(","));
        }
        if !self.acl.is_empty() {
            out.insert("acl".to_owned(), self.acl.clone());
        }
        if self.scram_iterations != 0 {
            out.insert(
                "scram_iterations".to_owned(),
                self.scram_iterations.to_string(),
            );
        }
        out
    }
}

/// Checks a role name: 1 to [`MAX_ROLE_NAME`] of `[a-z0-9_]`.
pub fn check_role_name(name: &str) -> Result<(), DynamicError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ROLE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DynamicError::Invalid(format!(
            "a dynamic role name is 1 to {MAX_ROLE_NAME} of a-z, 0-9 and '_'"
        )))
    }
}

/// A granted database role's name: 1 to 63 of `[A-Za-z0-9_]`.
fn check_db_role(name: &str) -> Result<(), DynamicError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DynamicError::Invalid(
            "roles=: each granted role is 1 to 63 of A-Z, a-z, 0-9 and '_'".into(),
        ))
    }
}

/// Checks Redis ACL rules against the allowlist: key patterns (`~`, `%R~`,
/// `%W~`, `%RW~`, `allkeys`), channel patterns (`&`, `allchannels`) and
/// command rules (`+`, `-`, `+@`, `-@`). Everything else (`on`, `off`,
/// `nopass`, `>`, `<`, `#`, `!`, `reset`, selectors...) is refused: the user's
/// state and password are keyward's.
pub fn check_acl(rules: &str) -> Result<Vec<String>, DynamicError> {
    if rules.len() > MAX_ACL_LEN {
        return Err(DynamicError::Invalid(format!(
            "acl=: at most {MAX_ACL_LEN} bytes of rules"
        )));
    }
    let mut out = Vec::new();
    for rule in rules.split_whitespace() {
        let allowed = (rule == "allkeys" || rule == "allchannels")
            || ["~", "%R~", "%W~", "%RW~", "&"]
                .iter()
                .any(|p| rule.starts_with(p) && rule.len() > p.len())
            || (["+", "-"].iter().any(|p| rule.starts_with(p))
                && rule.len() > 1
                && !rule.contains(['>', '<', '#', '(', ')']));
        let printable = rule.bytes().all(|b| b.is_ascii_graphic());
        if !allowed || !printable {
            let shown = if rule.starts_with(['>', '<', '#', '!']) || !printable {
                "a password rule".to_owned()
            } else {
                format!("`{}`", short(rule))
            };
            return Err(DynamicError::Invalid(format!(
                "acl=: rule {shown} is not allowed; only key patterns (~, %R~, %W~, allkeys), channel patterns (&, allchannels) and command rules (+, -, +@, -@) are"
            )));
        }
        out.push(rule.to_owned());
    }
    if out.is_empty() {
        return Err(DynamicError::Invalid(
            "acl=: a Redis role needs at least one rule (e.g. `~app:* +@read`)".into(),
        ));
    }
    Ok(out)
}

/// A role as asked for, before it is checked against the target.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    pub name: String,
    pub backend: Backend,
    /// Required for the built-in providers; optional for a plugin.
    pub admin_secret: Option<SecretPath>,
    /// A plugin role's other `--config` pairs.
    pub settings: BTreeMap<String, String>,
    pub roles: Vec<String>,
    pub acl: Vec<String>,
    pub ttl: Duration,
    pub max_ttl: Duration,
    /// PostgreSQL `scram_iterations=` (0: the default).
    pub scram_iterations: u32,
}

impl RoleSpec {
    /// Parses a role definition; every error names the rule.
    pub fn parse(
        name: &str,
        provider: &str,
        config: &BTreeMap<String, String>,
        ttl: Duration,
        max_ttl: Duration,
    ) -> Result<Self, DynamicError> {
        check_role_name(name)?;
        let kind = match Backend::parse(provider)? {
            Backend::Builtin(kind) => kind,
            Backend::Plugin(plugin) => {
                return Self::parse_plugin(name, plugin, config, ttl, max_ttl)
            }
        };
        let allowed: &[&str] = match kind {
            Kind::Postgres => &["admin_secret", "roles", "scram_iterations"],
            Kind::Mysql => &["admin_secret", "roles"],
            Kind::Redis => &["admin_secret", "acl"],
        };
        if let Some(key) = config.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(DynamicError::Invalid(format!(
                "setting `{}` is not known to provider {}; it takes {}",
                short(key),
                kind.as_str(),
                allowed.join(", ")
            )));
        }
        let admin_secret = config.get("admin_secret").ok_or_else(|| {
            DynamicError::Invalid(
                "setting `admin_secret` (the path of the admin login's secret) is required".into(),
            )
        })?;
        let admin_secret = SecretPath::parse(admin_secret)
            .map_err(|e| DynamicError::Invalid(format!("admin_secret: {e}")))?;
        let roles: Vec<String> = match config.get("roles") {
            Some(list) => list.split(',').map(str::trim).map(str::to_owned).collect(),
            None => Vec::new(),
        };
        for r in &roles {
            check_db_role(r)?;
        }
        if roles.len() > MAX_ROLES {
            return Err(DynamicError::Invalid(format!(
                "roles=: at most {MAX_ROLES} roles"
            )));
        }
        if kind == Kind::Mysql && roles.len() > 1 {
            return Err(DynamicError::Invalid(
                "roles=: MariaDB has one default role per user, so a mysql role grants at most one role (make one MariaDB role that holds the others)".into(),
            ));
        }
        let acl = match kind {
            Kind::Redis => check_acl(config.get("acl").map(String::as_str).unwrap_or(""))?,
            _ => Vec::new(),
        };
        let scram_iterations = match config.get("scram_iterations") {
            None => 0,
            Some(text) => text
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_SCRAM_ITERATIONS).contains(n))
                .ok_or_else(|| {
                    DynamicError::Invalid(format!(
                        "scram_iterations=: a whole number from 1 to {MAX_SCRAM_ITERATIONS} (default {DEFAULT_SCRAM_ITERATIONS})"
                    ))
                })?,
        };
        check_ttls(ttl, max_ttl)?;
        Ok(Self {
            name: name.to_owned(),
            backend: Backend::Builtin(kind),
            admin_secret: Some(admin_secret),
            settings: BTreeMap::new(),
            roles,
            acl,
            ttl,
            max_ttl,
            scram_iterations,
        })
    }

    /// A plugin role: `admin_secret` (optional) is keyward's; the other
    /// keys are checked against the plugin's `Describe` in
    /// [`DynamicStore::check_target`].
    fn parse_plugin(
        name: &str,
        plugin: String,
        config: &BTreeMap<String, String>,
        ttl: Duration,
        max_ttl: Duration,
    ) -> Result<Self, DynamicError> {
        let mut settings = config.clone();
        let admin_secret = match settings.remove("admin_secret") {
            Some(path) => Some(
                SecretPath::parse(&path)
                    .map_err(|e| DynamicError::Invalid(format!("admin_secret: {e}")))?,
            ),
            None => None,
        };
        check_ttls(ttl, max_ttl)?;
        Ok(Self {
            name: name.to_owned(),
            backend: Backend::Plugin(plugin),
            admin_secret,
            settings,
            roles: Vec::new(),
            acl: Vec::new(),
            ttl,
            max_ttl,
            scram_iterations: 0,
        })
    }
}

fn check_ttls(ttl: Duration, max_ttl: Duration) -> Result<(), DynamicError> {
    if ttl < Duration::from_secs(1) {
        return Err(DynamicError::Invalid("--ttl must be at least 1s".into()));
    }
    if max_ttl < ttl {
        return Err(DynamicError::Invalid(
            "--max-ttl must be at least --ttl".into(),
        ));
    }
    if max_ttl > MAX_TTL {
        return Err(DynamicError::Invalid(
            "--max-ttl must be at most 366d".into(),
        ));
    }
    Ok(())
}

/// Who asks for a credential: the token that will hold the lease.
#[derive(Debug, Clone)]
pub struct Holder {
    pub accessor: String,
    pub identity: String,
    /// The token's current end (0: never).
    pub expires_ms: u64,
    /// The token's latest possible end, renewals included (0: never).
    pub max_expiry_ms: u64,
}

/// A credential just made. `password` is shown once, never stored.
pub struct Issued {
    pub lease: LeaseRecord,
    pub password: SecretBytes,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn min_nonzero(a: u64, cap: u64) -> u64 {
    if cap == 0 {
        a
    } else {
        a.min(cap)
    }
}

/// Roles and issue. Clones share one store.
#[derive(Clone)]
pub struct DynamicStore {
    barrier: Arc<Barrier>,
    secrets: Arc<SecretStore>,
    leases: LeaseStore,
    clock: Clock,
    /// The registered plugins (set once, after the broker exists).
    plugins: PluginSlot,
    /// Admin connections, per admin login (shared with the revoker).
    pools: Arc<pool::AdminPools>,
}

impl DynamicStore {
    /// Also makes this store the revoker of `leases`.
    pub fn new(
        barrier: Arc<Barrier>,
        secrets: Arc<SecretStore>,
        leases: LeaseStore,
        clock: Clock,
    ) -> Self {
        let plugins: PluginSlot = Arc::default();
        let gate = barrier.clone();
        let pools = Arc::new(pool::AdminPools::new(Box::new(move || {
            gate.status().sealed
        })));
        leases.set_revoker(Arc::new(TargetRevoker {
            secrets: secrets.clone(),
            plugins: plugins.clone(),
            pools: pools.clone(),
        }));
        Self {
            barrier,
            secrets,
            leases,
            clock,
            plugins,
            pools,
        }
    }

    /// Closes every pooled admin connection (called at seal: nothing that
    /// logged in with a secret stays open while the vault is sealed).
    pub fn on_seal(&self) {
        self.pools.clear();
    }

    /// Idle admin connections held open now (tests, figures).
    pub fn idle_admin_connections(&self) -> usize {
        self.pools.idle_count()
    }

    /// Admin connections opened (or tried) since start (tests, figures).
    pub fn admin_connections_opened(&self) -> u64 {
        self.pools.opened_count()
    }

    /// Where registered plugins are found (the rotation broker, held
    /// weakly); set once.
    pub fn set_plugins(&self, plugins: Weak<dyn Plugins>) {
        let _ = self.plugins.set(plugins);
    }

    pub fn leases(&self) -> &LeaseStore {
        &self.leases
    }

    /// Checks a role against its target before it is stored: the admin
    /// secret exists and logs in, and every granted role exists there.
    /// Nothing is created on the target.
    pub async fn check_target(&self, spec: &RoleSpec) -> Result<(), DynamicError> {
        match &spec.backend {
            Backend::Builtin(kind) => {
                let path = spec.admin_secret.as_ref().ok_or_else(|| {
                    DynamicError::Invalid("setting `admin_secret` is required".into())
                })?;
                let admin = read_admin(&self.secrets, path.as_str(), *kind)?;
                targets::check(*kind, &admin, &spec.roles).await
            }
            Backend::Plugin(name) => {
                let plugin = plugin_of(&self.plugins, name)?;
                // What the plugin says now, not at its registration.
                plugin.refresh().await?;
                plugin
                    .validate_dynamic(&spec.settings)
                    .map_err(|e| DynamicError::Invalid(e.to_string()))?;
                if let Some(path) = &spec.admin_secret {
                    read_admin_data(&self.secrets, path.as_str())?;
                }
                Ok(())
            }
        }
    }

    /// Stores a role (replacing one of the same name).
    pub fn put_role(
        &self,
        proof: &Authorized,
        spec: &RoleSpec,
        set_by: &str,
    ) -> Result<RoleRecord, DynamicError> {
        let resource = format!("dynamic/{}", spec.name);
        if !proof.grants(crate::policy::Capability::Admin, &resource) {
            return Err(DynamicError::Invalid(
                "the proof does not cover this role".into(),
            ));
        }
        let record = RoleRecord {
            name: spec.name.clone(),
            provider: spec.backend.name().to_owned(),
            admin_secret: spec
                .admin_secret
                .as_ref()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            settings: spec.settings.clone(),
            roles: spec.roles.clone(),
            acl: spec.acl.join(" "),
            ttl_ms: ms(spec.ttl),
            max_ttl_ms: ms(spec.max_ttl),
            created_ms: self.clock.now_ms(),
            set_by: set_by.to_owned(),
            scram_iterations: spec.scram_iterations,
        };
        self.barrier.put(
            &format!("{ROLE_PREFIX}{}", spec.name),
            &record.encode_to_vec(),
        )?;
        Ok(record)
    }

    pub fn get_role(&self, name: &str) -> Result<RoleRecord, DynamicError> {
        check_role_name(name)?;
        let raw = self
            .barrier
            .get(&format!("{ROLE_PREFIX}{name}"))?
            .ok_or_else(|| DynamicError::UnknownRole(name.to_owned()))?;
        RoleRecord::decode(raw.as_slice()).map_err(|_| DynamicError::Corrupt)
    }

    pub fn list_roles(&self) -> Result<Vec<String>, DynamicError> {
        Ok(self
            .barrier
            .scan_keys(ROLE_PREFIX)?
            .into_iter()
            .filter_map(|k| k.strip_prefix(ROLE_PREFIX).map(str::to_owned))
            .collect())
    }

    /// Deletes a role; its live leases stay until they end (revoke them
    /// with `lease revoke --prefix dynamic/<name>`).
    pub fn delete_role(&self, proof: &Authorized, name: &str) -> Result<(), DynamicError> {
        check_role_name(name)?;
        if !proof.grants(crate::policy::Capability::Admin, &format!("dynamic/{name}")) {
            return Err(DynamicError::Invalid(
                "the proof does not cover this role".into(),
            ));
        }
        self.get_role(name)?;
        self.barrier.delete(&format!("{ROLE_PREFIX}{name}"))?;
        Ok(())
    }

    /// Makes a user on the role's target under a new lease held by `holder`.
    /// `ttl` defaults to the role's; past its max TTL it is refused.
    pub async fn issue(
        &self,
        proof: &Authorized,
        role: &str,
        ttl: Option<Duration>,
        holder: &Holder,
    ) -> Result<Issued, DynamicError> {
        let role = self.get_role(role)?;
        if !proof.grants(
            crate::policy::Capability::Issue,
            &format!("dynamic/{}", role.name),
        ) {
            return Err(DynamicError::Invalid(
                "the proof does not cover this role".into(),
            ));
        }
        let backend = role.backend()?;
        let ttl_ms = match ttl {
            Some(d) if ms(d) > role.max_ttl_ms => {
                return Err(DynamicError::Invalid(format!(
                    "--ttl {} is past the role's max TTL {}",
                    crate::duration::format(d),
                    crate::duration::format(Duration::from_millis(role.max_ttl_ms))
                )))
            }
            Some(d) if d < Duration::from_secs(1) => {
                return Err(DynamicError::Invalid("--ttl must be at least 1s".into()))
            }
            Some(d) => ms(d),
            None => role.ttl_ms,
        };
        let kind = match backend {
            Backend::Builtin(kind) => kind,
            Backend::Plugin(name) => {
                return self.issue_plugin(&role, &name, ttl_ms, holder).await;
            }
        };
        let admin = read_admin(&self.secrets, &role.admin_secret, kind)?;
        let now = self.clock.now_ms();
        let max_expiry = min_nonzero(now.saturating_add(role.max_ttl_ms), holder.max_expiry_ms);
        let expires = min_nonzero(now.saturating_add(ttl_ms), holder.expires_ms).min(max_expiry);
        if expires <= now {
            return Err(DynamicError::Invalid(
                "the token ends now: a lease cannot outlive its token".into(),
            ));
        }
        let suffix = random_string(16, Charset::Hex)?;
        let username = format!(
            "kw_{}_{}",
            role.name,
            suffix.expose_str().unwrap_or_default()
        );
        let lease_key = random_string(24, Charset::Alnum)?;
        let record = LeaseRecord {
            id: format!(
                "dynamic/{}/{}",
                role.name,
                lease_key.expose_str().unwrap_or_default()
            ),
            accessor: holder.accessor.clone(),
            identity: holder.identity.clone(),
            role: role.name.clone(),
            provider: kind.as_str().to_owned(),
            username: username.clone(),
            host: admin.host.clone(),
            port: u32::from(admin.port),
            database: admin.database.clone().unwrap_or_default(),
            admin_secret: role.admin_secret.clone(),
            created_ms: now,
            expires_ms: expires,
            max_expiry_ms: max_expiry,
            ttl_ms: role.ttl_ms,
            revoking: false,
            failures: 0,
            last_error: String::new(),
            settings: BTreeMap::new(),
        };
        let password = new_password()?;
        let rules: Vec<String> = role.acl.split_whitespace().map(str::to_owned).collect();
        // The lease first, durably: a crash from here on leaves a lease
        // whose revocation removes whatever the target got.
        self.leases.create(&record).await?;
        crate::lease::danger_test_fault_point("recorded");
        let made = targets::create(
            &self.pools,
            kind,
            targets::Admin {
                secret: &role.admin_secret,
                login: &admin,
            },
            &targets::NewUser {
                name: &username,
                password: &password,
                roles: &role.roles,
                rules: &rules,
                valid_until_ms: max_expiry,
                scram_iterations: match role.scram_iterations {
                    0 => DEFAULT_SCRAM_ITERATIONS,
                    n => n,
                },
            },
        )
        .await;
        if let Err(e) = made {
            // Undo at once (drops a half-made user); a target that is down
            // now leaves the lease to the sleeper.
            if let Err(undo) = self.leases.revoke(&record.id).await {
                tracing::warn!(lease = %record.id, error = %undo, "failed issue not undone; the sweeper retries");
            }
            return Err(e);
        }
        crate::lease::danger_test_fault_point("created");
        Ok(Issued {
            lease: record,
            password,
        })
    }

    /// [`Self::issue`] on a plugin: the lease first (no username yet; the
    /// plugin's `Revoke` finds the account by the lease id), then `Create`,
    /// then the account's name and address written into the lease.
    async fn issue_plugin(
        &self,
        role: &RoleRecord,
        name: &str,
        ttl_ms: u64,
        holder: &Holder,
    ) -> Result<Issued, DynamicError> {
        let plugin = plugin_of(&self.plugins, name)?;
        // Replaced since the role was put by a plugin without Create: said
        // before any lease is written.
        if plugin.dynamic_settings().is_none() {
            plugin
                .validate_dynamic(&role.settings)
                .map_err(|e| DynamicError::Invalid(e.to_string()))?;
        }
        let admin = match role.admin_secret.as_str() {
            "" => None,
            path => Some(read_admin_data(&self.secrets, path)?),
        };
        let now = self.clock.now_ms();
        let max_expiry = min_nonzero(now.saturating_add(role.max_ttl_ms), holder.max_expiry_ms);
        let expires = min_nonzero(now.saturating_add(ttl_ms), holder.expires_ms).min(max_expiry);
        if expires <= now {
            return Err(DynamicError::Invalid(
                "the token ends now: a lease cannot outlive its token".into(),
            ));
        }
        let lease_key = random_string(24, Charset::Alnum)?;
        let mut record = LeaseRecord {
            id: format!(
                "dynamic/{}/{}",
                role.name,
                lease_key.expose_str().unwrap_or_default()
            ),
            accessor: holder.accessor.clone(),
            identity: holder.identity.clone(),
            role: role.name.clone(),
            provider: name.to_owned(),
            admin_secret: role.admin_secret.clone(),
            created_ms: now,
            expires_ms: expires,
            max_expiry_ms: max_expiry,
            ttl_ms: role.ttl_ms,
            settings: role.settings.clone(),
            ..LeaseRecord::default()
        };
        self.leases.create(&record).await?;
        crate::lease::danger_test_fault_point("recorded");
        let call = DynamicCall {
            settings: &role.settings,
            admin: admin.as_ref(),
            lease_id: &record.id,
        };
        let account = match plugin.create_account(&call, &role.name, max_expiry).await {
            Ok(account) => account,
            Err(e) => {
                if let Err(undo) = self.leases.revoke(&record.id).await {
                    tracing::warn!(lease = %record.id, error = %undo, "failed issue not undone; the sweeper retries");
                }
                return Err(e.into());
            }
        };
        // Made, and keyward does not know its name yet: the harder case
        // for a crash (the plugin's Revoke finds it by the lease id).
        crate::lease::danger_test_fault_point("created");
        record.username = account.username;
        record.host = account.host;
        record.port = u32::from(account.port);
        record.database = account.database;
        self.leases.set_account(&record).await?;
        Ok(Issued {
            lease: record,
            password: account.password,
        })
    }
}

/// The current version of the secret at `path`, for a plugin (passed as
/// `admin` as it is).
fn read_admin_data(secrets: &SecretStore, path: &str) -> Result<SecretData, DynamicError> {
    let parsed = SecretPath::parse(path)
        .map_err(|e| DynamicError::AdminSecret(format!("admin secret `{path}`: {e}")))?;
    let version = secrets
        .get(&parsed, Selector::Stage(Stage::Current))
        .map_err(|e| {
            DynamicError::AdminSecret(format!("admin secret `{path}` cannot be read: {e}"))
        })?;
    Ok(version.data)
}

/// Reads and parses the admin login of a role: the current version of the
/// secret at `path` (keyward's own read; whoever defined the role had to be
/// able to read it).
fn read_admin(secrets: &SecretStore, path: &str, kind: Kind) -> Result<Login, DynamicError> {
    let parsed = SecretPath::parse(path)
        .map_err(|e| DynamicError::AdminSecret(format!("admin secret `{path}`: {e}")))?;
    let version = secrets
        .get(&parsed, Selector::Stage(Stage::Current))
        .map_err(|e| {
            DynamicError::AdminSecret(format!("admin secret `{path}` cannot be read: {e}"))
        })?;
    Login::from_secret(
        &version.data,
        &format!("the admin secret `{path}`"),
        kind.default_port(),
    )
    .map_err(|e| DynamicError::AdminSecret(e.to_string()))
}

/// Removes lease users on their targets with the admin login the lease names.
struct TargetRevoker {
    secrets: Arc<SecretStore>,
    plugins: PluginSlot,
    pools: Arc<pool::AdminPools>,
}

impl TargetRevoker {
    /// A plugin's `Revoke` for the lease (by id, and by name when known).
    async fn revoke_on_plugin(&self, name: &str, lease: &LeaseRecord) -> Result<(), String> {
        let plugin = plugin_of(&self.plugins, name).map_err(|_| {
            format!(
                "provider `{}` is not connected; the revocation is retried",
                short(name)
            )
        })?;
        let admin = match lease.admin_secret.as_str() {
            "" => None,
            path => Some(read_admin_data(&self.secrets, path).map_err(|e| e.to_string())?),
        };
        let call = DynamicCall {
            settings: &lease.settings,
            admin: admin.as_ref(),
            lease_id: &lease.id,
        };
        plugin
            .revoke_account(&call, &lease.username)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Revoker for TargetRevoker {
    fn revoke<'a>(&'a self, lease: &'a LeaseRecord) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let kind = match Backend::parse(&lease.provider).map_err(|e| e.to_string())? {
                Backend::Builtin(kind) => kind,
                Backend::Plugin(name) => return self.revoke_on_plugin(&name, lease).await,
            };
            let admin =
                read_admin(&self.secrets, &lease.admin_secret, kind).map_err(|e| e.to_string())?;
            let admin_ref = targets::Admin {
                secret: &lease.admin_secret,
                login: &admin,
            };
            targets::drop_user(&self.pools, kind, admin_ref, &lease.username)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_rules_outside_the_allowlist_are_refused() {
        assert!(check_acl("~app:* %R~ro:* &chan +@read -flushall allkeys allchannels").is_ok());
        for bad in [
            "nopass",
            "on",
            "off",
            ">secret",
            "<x",
            "#abc",
            "!abc",
            "reset",
            "resetpass",
            "resetkeys",
            "(~x +get)",
            "~",
            "+",
            "",
            "+get >pw",
        ] {
            let refused = check_acl(bad);
            assert!(refused.is_err(), "{bad}");
            let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                !message.contains("secret") && !message.contains("abc"),
                "{message}"
            );
        }
    }

    #[test]
    fn role_specs_name_the_rule() {
        let cfg = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        let h = Duration::from_secs(3600);
        let ok = RoleSpec::parse(
            "app",
            "postgres",
            &cfg(&[("admin_secret", "db/admin"), ("roles", "r1,r2")]),
            h,
            h,
        );
        assert_eq!(
            ok.map(|s| s.roles).ok(),
            Some(vec!["r1".to_owned(), "r2".to_owned()])
        );
        type Case<'a> = (
            &'a str,
            &'a str,
            Vec<(&'a str, &'a str)>,
            Duration,
            Duration,
            &'a str,
        );
        let cases: &[Case] = &[
            (
                "App",
                "postgres",
                vec![("admin_secret", "a")],
                h,
                h,
                "role name",
            ),
            (
                "app",
                "Ldap!",
                vec![("admin_secret", "a")],
                h,
                h,
                "provider `Ldap!`",
            ),
            (
                "app",
                "someplugin",
                vec![("admin_secret", "a")],
                h * 2,
                h,
                "--max-ttl",
            ),
            ("app", "postgres", vec![], h, h, "admin_secret"),
            (
                "app",
                "postgres",
                vec![("admin_secret", "a"), ("sql", "x")],
                h,
                h,
                "`sql`",
            ),
            (
                "app",
                "postgres",
                vec![("admin_secret", "a"), ("roles", "a;drop")],
                h,
                h,
                "roles=",
            ),
            (
                "app",
                "mysql",
                vec![("admin_secret", "a"), ("roles", "a,b")],
                h,
                h,
                "one default role",
            ),
            (
                "app",
                "redis",
                vec![("admin_secret", "a"), ("acl", "nopass")],
                h,
                h,
                "acl=",
            ),
            (
                "app",
                "postgres",
                vec![("admin_secret", "a")],
                h * 2,
                h,
                "--max-ttl",
            ),
        ];
        for (name, provider, pairs, ttl, max, rule) in cases {
            let message = RoleSpec::parse(name, provider, &cfg(pairs), *ttl, *max)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(rule), "{name} {provider}: {message}");
        }
    }
}
