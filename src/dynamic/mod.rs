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
//! Issue order (crash safety): the lease is written and flushed first, the
//! user is made on the target second. A crash in between leaves a lease
//! whose revocation finds no user (success); a crash after leaves a lease
//! the sleeper revokes at its expiry. A failed create revokes the lease at
//! once (dropping whatever part of the user was made).

mod targets;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use crate::barrier::{Barrier, BarrierError};
use crate::clock::Clock;
use crate::lease::{BoxFuture, LeaseError, LeaseRecord, LeaseStore, Revoker};
use crate::policy::Authorized;
use crate::rotation::provider::ProviderError;
use crate::rotation::providers::random::random_string;
use crate::rotation::providers::target::{new_password, Login};
use crate::rotation::providers::Charset;
use crate::secrecy::SecretBytes;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
                "provider `{}`: dynamic credentials are made by the built-in providers postgres, mysql and redis; external plugins have no Create/Revoke yet",
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
}

impl RoleRecord {
    pub fn kind(&self) -> Result<Kind, DynamicError> {
        Kind::parse(&self.provider)
    }

    /// The settings as `KEY=VALUE` pairs (no secret among them).
    pub fn config(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert("admin_secret".to_owned(), self.admin_secret.clone());
        if !self.roles.is_empty() {
            out.insert("roles".to_owned(), self.roles.join(","));
        }
        if !self.acl.is_empty() {
            out.insert("acl".to_owned(), self.acl.clone());
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
    pub kind: Kind,
    pub admin_secret: SecretPath,
    pub roles: Vec<String>,
    pub acl: Vec<String>,
    pub ttl: Duration,
    pub max_ttl: Duration,
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
        let kind = Kind::parse(provider)?;
        let allowed: &[&str] = match kind {
            Kind::Postgres | Kind::Mysql => &["admin_secret", "roles"],
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
        Ok(Self {
            name: name.to_owned(),
            kind,
            admin_secret,
            roles,
            acl,
            ttl,
            max_ttl,
        })
    }
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
}

impl DynamicStore {
    /// Also makes this store the revoker of `leases`.
    pub fn new(
        barrier: Arc<Barrier>,
        secrets: Arc<SecretStore>,
        leases: LeaseStore,
        clock: Clock,
    ) -> Self {
        leases.set_revoker(Arc::new(TargetRevoker {
            secrets: secrets.clone(),
        }));
        Self {
            barrier,
            secrets,
            leases,
            clock,
        }
    }

    pub fn leases(&self) -> &LeaseStore {
        &self.leases
    }

    /// Checks a role against its target before it is stored: the admin
    /// secret exists and logs in, and every granted role exists there.
    /// Nothing is created on the target.
    pub async fn check_target(&self, spec: &RoleSpec) -> Result<(), DynamicError> {
        let admin = read_admin(&self.secrets, spec.admin_secret.as_str(), spec.kind)?;
        targets::check(spec.kind, &admin, &spec.roles).await
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
            provider: spec.kind.as_str().to_owned(),
            admin_secret: spec.admin_secret.as_str().to_owned(),
            roles: spec.roles.clone(),
            acl: spec.acl.join(" "),
            ttl_ms: ms(spec.ttl),
            max_ttl_ms: ms(spec.max_ttl),
            created_ms: self.clock.now_ms(),
            set_by: set_by.to_owned(),
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
        let kind = role.kind()?;
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
        };
        let password = new_password()?;
        // The lease first, durably: a crash from here on leaves a lease
        // whose revocation removes whatever the target got.
        self.leases.create(&record).await?;
        crate::lease::danger_test_fault_point("recorded");
        let made = targets::create(
            kind,
            &admin,
            &username,
            &password,
            &role.roles,
            &role
                .acl
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            max_expiry,
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
}

impl Revoker for TargetRevoker {
    fn revoke<'a>(&'a self, lease: &'a LeaseRecord) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let kind = Kind::parse(&lease.provider).map_err(|e| e.to_string())?;
            let admin =
                read_admin(&self.secrets, &lease.admin_secret, kind).map_err(|e| e.to_string())?;
            targets::drop_user(kind, &admin, &lease.username)
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
                "ldap",
                vec![("admin_secret", "a")],
                h,
                h,
                "provider `ldap`",
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
