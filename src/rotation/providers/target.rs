//! What the providers of a login on a server (`postgres`, `mysql`, `redis`)
//! share: their settings, the admin login, the strategies, and the four steps.
//! Each server only says how to set a user's password and how to log in
//! ([`Target`]); [`TargetProvider`] does the rest.
//!
//! Settings (INTERFACE.md): `admin_secret=PATH`, `strategy=single|alternating`
//! (default `single`), `username=NAME` for single or `usernames=A,B` for
//! alternating.
//!
//! - single: apply changes the user's password; the old one stops working at
//!   once, so retire has nothing left to do.
//! - alternating: the two users take turns. generate picks the user that is
//!   not in `current` (the first one if there is no current), apply sets its
//!   password, and the other user keeps working through the grace period;
//!   retire then sets that user's password to a random value nobody keeps.
//!
//! The generated value holds `username` and `password`, plus `host`, `port`
//! and `database` copied from the admin secret. Passwords are 32 alphanumeric
//! characters (about 190 bits), safe in any SQL literal or command line.
//!
//! apply, verify and retire only act on a user the settings name: a pending
//! or previous value naming any other user is refused as an invalid secret.
//!
//! Known limit: our copies of passwords are zeroized, but the drivers keep
//! their own (connection options, send buffers) in ordinary heap memory for
//! the length of a call.

use std::future::Future;
use std::time::Duration;

use crate::rotation::provider::{
    BoxFuture, Provider, ProviderError, ProviderSettings, RotationInput,
};
use crate::secrecy::{SecretBytes, SecretData};

use super::random::{random_string, Charset};

/// How long a connection attempt may take, login included, before the target
/// counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one statement or command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Length of generated passwords, in alphanumeric characters.
pub const PASSWORD_LENGTH: usize = 32;

/// The longest user name accepted (PostgreSQL's limit; MariaDB allows 80).
pub const MAX_USERNAME_LEN: usize = 63;

const KEYS: [&str; 4] = ["admin_secret", "strategy", "username", "usernames"];

/// Where and as whom to log in: parsed from a secret's fields.
#[derive(Debug, Clone)]
pub struct Login {
    pub host: String,
    pub port: u16,
    pub database: Option<String>,
    pub username: String,
    pub password: SecretBytes,
}

impl Login {
    /// Reads `host`, `port` (default `default_port`), `username`, `password`
    /// and `database` (optional) from `secret`, which `what` names in errors
    /// ("the admin secret"). An absent password is an empty one.
    pub fn from_secret(
        secret: &SecretData,
        what: &str,
        default_port: u16,
    ) -> Result<Self, ProviderError> {
        let text = |field: &str| -> Result<Option<String>, ProviderError> {
            match secret.get(field) {
                None => Ok(None),
                Some(value) => value
                    .expose_str()
                    .map(|s| Some(s.to_owned()))
                    .ok_or_else(|| {
                        ProviderError::InvalidSecret(format!(
                            "field `{field}` of {what} is not UTF-8"
                        ))
                    }),
            }
        };
        let missing =
            |field: &str| ProviderError::InvalidSecret(format!("{what} has no field `{field}`"));
        let host = text("host")?
            .filter(|h| !h.is_empty())
            .ok_or_else(|| missing("host"))?;
        let port = match text("port")? {
            None => default_port,
            Some(port) => port
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    ProviderError::InvalidSecret(format!(
                        "field `port` of {what} is not a port number"
                    ))
                })?,
        };
        let username = text("username")?.ok_or_else(|| missing("username"))?;
        let password = secret.get("password").cloned().unwrap_or_default();
        if password.expose_str().is_none() {
            return Err(ProviderError::InvalidSecret(format!(
                "field `password` of {what} is not UTF-8"
            )));
        }
        let database = text("database")?.filter(|d| !d.is_empty());
        Ok(Self {
            host,
            port,
            database,
            username,
            password,
        })
    }

    /// The password as text (checked UTF-8 by `from_secret`).
    pub fn password_str(&self) -> &str {
        self.password.expose_str().unwrap_or_default()
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The same server and database as another user.
    fn as_user(&self, username: &str, password: SecretBytes) -> Self {
        Self {
            host: self.host.clone(),
            port: self.port,
            database: self.database.clone(),
            username: username.to_owned(),
            password,
        }
    }
}

/// A server whose users log in with a password.
///
/// Implementations map driver errors to [`ProviderError`] through a
/// [`Call`], without passing the driver's or the server's message through
/// (it may quote the statement), and time out connection attempts after
/// [`CONNECT_TIMEOUT`] and commands after [`COMMAND_TIMEOUT`].
pub trait Target: Send + Sync + 'static {
    /// The provider name (`postgres`).
    fn name(&self) -> &'static str;

    /// The port used when the admin secret has none.
    fn default_port(&self) -> u16;

    /// Logged in as `admin`, sets `user`'s password to `password`.
    /// Idempotent; refuses (does not create) a user that does not exist.
    fn set_password<'a>(
        &'a self,
        admin: &'a Login,
        user: &'a str,
        password: &'a SecretBytes,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send + 'a;

    /// Opens a new connection as `login` and runs a trivial command.
    fn check_login<'a>(
        &'a self,
        login: &'a Login,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send + 'a;
}

/// Which user(s) a policy rotates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    Single { username: String },
    Alternating { usernames: [String; 2] },
}

impl Strategy {
    /// Whether `username` is one this policy rotates.
    fn covers(&self, username: &str) -> bool {
        match self {
            Self::Single { username: u } => u == username,
            Self::Alternating { usernames } => usernames.iter().any(|u| u == username),
        }
    }
}

/// Parsed settings of a [`TargetProvider`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSettings {
    pub admin_secret: String,
    pub strategy: Strategy,
}

impl TargetSettings {
    pub fn parse(settings: &ProviderSettings) -> Result<Self, ProviderError> {
        settings.only_keys(&KEYS)?;
        let admin_secret = settings.require("admin_secret")?;
        if admin_secret.trim().is_empty() {
            return Err(ProviderError::InvalidSettings(
                "`admin_secret` must name a secret".into(),
            ));
        }
        let strategy = match settings.get("strategy").unwrap_or("single") {
            "single" => {
                if settings.get("usernames").is_some() {
                    return Err(ProviderError::InvalidSettings(
                        "`usernames` is for strategy=alternating; single takes `username`".into(),
                    ));
                }
                let username = check_username("username", settings.require("username")?)?;
                Strategy::Single { username }
            }
            "alternating" => {
                if settings.get("username").is_some() {
                    return Err(ProviderError::InvalidSettings(
                        "`username` is for strategy=single; alternating takes `usernames=A,B`"
                            .into(),
                    ));
                }
                let list = settings.require("usernames")?;
                let names: Vec<&str> = list.split(',').collect();
                let [a, b] = names.as_slice() else {
                    return Err(ProviderError::InvalidSettings(
                        "`usernames` must name exactly two users, A,B".into(),
                    ));
                };
                let (a, b) = (
                    check_username("usernames", a)?,
                    check_username("usernames", b)?,
                );
                if a == b {
                    return Err(ProviderError::InvalidSettings(
                        "`usernames` must name two different users".into(),
                    ));
                }
                Strategy::Alternating { usernames: [a, b] }
            }
            _ => {
                return Err(ProviderError::InvalidSettings(
                    "`strategy` must be `single` or `alternating`".into(),
                ))
            }
        };
        Ok(Self {
            admin_secret: admin_secret.to_owned(),
            strategy,
        })
    }
}

/// User names are quoted where they are used, and also kept to a character
/// set that no SQL dialect or sql_mode treats specially.
fn check_username(key: &str, name: &str) -> Result<String, ProviderError> {
    let name = name.trim();
    let well_formed = !name.is_empty()
        && name.len() <= MAX_USERNAME_LEN
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if well_formed {
        Ok(name.to_owned())
    } else {
        Err(ProviderError::InvalidSettings(format!(
            "`{key}`: a user name is 1 to {MAX_USERNAME_LEN} characters of [A-Za-z0-9_.-]"
        )))
    }
}

/// A new random password for the targets.
pub fn new_password() -> Result<SecretBytes, ProviderError> {
    random_string(PASSWORD_LENGTH, Charset::Alnum)
}

/// A provider for a [`Target`], with the single and alternating strategies.
#[derive(Debug, Clone, Default)]
pub struct TargetProvider<T> {
    target: T,
}

impl<T: Target> TargetProvider<T> {
    pub fn new(target: T) -> Self {
        Self { target }
    }

    fn admin(&self, input: &RotationInput<'_>) -> Result<Login, ProviderError> {
        let admin = input.admin.ok_or_else(|| {
            ProviderError::InvalidSecret("the admin secret was not provided".into())
        })?;
        Login::from_secret(admin, "the admin secret", self.target.default_port())
    }

    /// The user name of `secret` (called `what`), which must be one the
    /// policy rotates: a value that names any other user is never acted on.
    fn rotated_user<'s>(
        strategy: &Strategy,
        secret: &'s SecretData,
        what: &str,
    ) -> Result<&'s str, ProviderError> {
        let username = secret
            .get("username")
            .and_then(SecretBytes::expose_str)
            .ok_or_else(|| {
                ProviderError::InvalidSecret(format!("{what} has no UTF-8 field `username`"))
            })?;
        if strategy.covers(username) {
            Ok(username)
        } else {
            Err(ProviderError::InvalidSecret(format!(
                "{what} names a user this policy does not rotate"
            )))
        }
    }

    async fn generate_value(&self, input: &RotationInput<'_>) -> Result<SecretData, ProviderError> {
        let settings = TargetSettings::parse(input.settings)?;
        let admin = self.admin(input)?;
        let username = match &settings.strategy {
            Strategy::Single { username } => username,
            Strategy::Alternating { usernames: [a, b] } => {
                let current = input
                    .current
                    .and_then(|c| c.get("username"))
                    .and_then(SecretBytes::expose_str);
                if current == Some(a.as_str()) {
                    b
                } else {
                    a
                }
            }
        };
        let mut value = SecretData::new();
        value.insert("username".into(), SecretBytes::from(username.as_str()));
        value.insert("password".into(), new_password()?);
        value.insert("host".into(), SecretBytes::from(admin.host.as_str()));
        value.insert("port".into(), SecretBytes::from(admin.port.to_string()));
        if let Some(database) = &admin.database {
            value.insert("database".into(), SecretBytes::from(database.as_str()));
        }
        Ok(value)
    }

    async fn apply_value(
        &self,
        input: &RotationInput<'_>,
        pending: &SecretData,
    ) -> Result<(), ProviderError> {
        let settings = TargetSettings::parse(input.settings)?;
        let admin = self.admin(input)?;
        let user = Self::rotated_user(&settings.strategy, pending, "the pending value")?;
        let password = pending_password(pending)?;
        self.target.set_password(&admin, user, password).await
    }

    async fn verify_value(
        &self,
        input: &RotationInput<'_>,
        pending: &SecretData,
    ) -> Result<(), ProviderError> {
        let settings = TargetSettings::parse(input.settings)?;
        let admin = self.admin(input)?;
        let user = Self::rotated_user(&settings.strategy, pending, "the pending value")?;
        // The server and database the value was applied on, as the new user.
        let login = admin.as_user(user, pending_password(pending)?.clone());
        self.target.check_login(&login).await
    }

    async fn retire_value(
        &self,
        input: &RotationInput<'_>,
        previous: &SecretData,
    ) -> Result<(), ProviderError> {
        let settings = TargetSettings::parse(input.settings)?;
        if let Strategy::Single { .. } = settings.strategy {
            // apply replaced the password: the old one already fails.
            return Ok(());
        }
        let user = Self::rotated_user(&settings.strategy, previous, "the previous value")?;
        let current_user = input
            .current
            .and_then(|c| c.get("username"))
            .and_then(SecretBytes::expose_str);
        if current_user == Some(user) {
            // Never lock out the user that is current now.
            return Ok(());
        }
        let admin = self.admin(input)?;
        let unknown = new_password()?;
        self.target.set_password(&admin, user, &unknown).await
    }
}

fn pending_password(pending: &SecretData) -> Result<&SecretBytes, ProviderError> {
    pending
        .get("password")
        .filter(|p| p.expose_str().is_some_and(|s| !s.is_empty()))
        .ok_or_else(|| {
            ProviderError::InvalidSecret("the pending value has no UTF-8 field `password`".into())
        })
}

impl<T: Target> Provider for TargetProvider<T> {
    fn name(&self) -> &str {
        self.target.name()
    }

    fn validate(&self, settings: &ProviderSettings) -> Result<(), ProviderError> {
        TargetSettings::parse(settings).map(|_| ())
    }

    fn admin_secret_key(&self) -> Option<String> {
        Some("admin_secret".to_owned())
    }

    fn generate<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
    ) -> BoxFuture<'a, Result<SecretData, ProviderError>> {
        Box::pin(self.generate_value(input))
    }

    fn apply<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        pending: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.apply_value(input, pending))
    }

    fn verify<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        pending: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.verify_value(input, pending))
    }

    fn retire<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        previous: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.retire_value(input, previous))
    }
}

/// One call to a target, named for error messages: where
/// (`PostgreSQL at 127.0.0.1:5432`) and what (`log in as `app``). Errors
/// are built from these and a non-secret detail (an error code, an I/O error
/// kind) only.
#[derive(Debug, Clone)]
pub struct Call {
    at: String,
    action: String,
}

impl Call {
    pub fn new(server: &str, login: &Login, action: impl Into<String>) -> Self {
        Self {
            at: format!("{server} at {}", login.address()),
            action: action.into(),
        }
    }

    /// The target answered no.
    pub fn refused(&self, detail: impl std::fmt::Display) -> ProviderError {
        ProviderError::Refused(format!("{} refused to {}: {detail}", self.at, self.action))
    }

    /// The target could not be reached, or not now.
    pub fn unreachable(&self, detail: impl std::fmt::Display) -> ProviderError {
        ProviderError::Unreachable(format!("{}: could not {}: {detail}", self.at, self.action))
    }

    /// The client side failed.
    pub fn failed(&self, detail: impl std::fmt::Display) -> ProviderError {
        ProviderError::Internal(format!("{}: could not {}: {detail}", self.at, self.action))
    }

    /// Runs `future` with a time limit; on expiry the target is unreachable.
    pub async fn within<F, O>(&self, limit: Duration, future: F) -> Result<O, ProviderError>
    where
        F: Future<Output = Result<O, ProviderError>>,
    {
        match tokio::time::timeout(limit, future).await {
            Ok(result) => result,
            Err(_) => Err(self.unreachable(format_args!("no answer within {} s", limit.as_secs()))),
        }
    }
}

/// The kind of the first I/O error in `error`'s source chain, for messages.
pub(crate) fn io_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::panic, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    fn settings(pairs: &[&str]) -> ProviderSettings {
        ProviderSettings::parse_pairs(pairs).unwrap_or_default()
    }

    #[test]
    fn strategies_parse() {
        let single = TargetSettings::parse(&settings(&["admin_secret=db/admin", "username=app"]));
        assert_eq!(
            single.map(|s| s.strategy),
            Ok(Strategy::Single {
                username: "app".into()
            })
        );
        let alternating = TargetSettings::parse(&settings(&[
            "admin_secret=db/admin",
            "strategy=alternating",
            "usernames=app_a,app_b",
        ]));
        assert_eq!(
            alternating.map(|s| s.strategy),
            Ok(Strategy::Alternating {
                usernames: ["app_a".into(), "app_b".into()]
            })
        );
    }

    #[test]
    fn bad_settings_name_the_key() {
        let cases: &[(&[&str], &str)] = &[
            (&["username=app"], "`admin_secret`"),
            (&["admin_secret=a"], "`username`"),
            (&["admin_secret=a", "username=x", "colour=red"], "`colour`"),
            (
                &["admin_secret=a", "strategy=alternating", "usernames=a"],
                "`usernames`",
            ),
            (
                &["admin_secret=a", "strategy=alternating", "usernames=a,a"],
                "`usernames`",
            ),
            (
                &["admin_secret=a", "strategy=alternating", "username=a"],
                "`username`",
            ),
            (
                &["admin_secret=a", "strategy=rolling", "username=a"],
                "`strategy`",
            ),
            (&["admin_secret=a", "username=o'brien"], "`username`"),
        ];
        for (pairs, key) in cases {
            match TargetSettings::parse(&settings(pairs)) {
                Err(ProviderError::InvalidSettings(m)) => {
                    assert!(m.contains(key), "{pairs:?}: {m}")
                }
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn login_reads_fields_and_defaults_the_port() {
        let mut secret = SecretData::new();
        secret.insert("host".into(), "127.0.0.1".into());
        secret.insert("username".into(), "admin".into());
        let login = Login::from_secret(&secret, "the admin secret", 5432);
        assert_eq!(login.as_ref().map(|l| l.port).ok(), Some(5432));
        secret.insert("port".into(), "http".into());
        assert!(matches!(
            Login::from_secret(&secret, "the admin secret", 5432),
            Err(ProviderError::InvalidSecret(m)) if m.contains("`port`")
        ));
    }
}
