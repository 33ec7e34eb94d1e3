//! The rotation providers against real servers (TESTING.md): a private
//! scram-sha-256 PostgreSQL cluster started by this binary, the machine's
//! MariaDB on 127.0.0.1:3306 (root, no password) and Redis on 127.0.0.1:6379.
//! A server that cannot be reached fails the test with how to start it.
//!
//! Logins are checked with the drivers directly, not with the provider
//! under test, so a provider that wrongly reports success cannot pass.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

#[path = "support/pg_cluster.rs"]
mod pg_cluster;
#[path = "support/plugin.rs"]
mod plugin;

use std::future::Future;
use std::sync::{Arc, Mutex};

use keyward::rotation::provider::{
    Provider, ProviderError, ProviderSettings, Registry, RotationInput,
};
use keyward::rotation::providers::random::random_string;
use keyward::rotation::providers::Charset;
use keyward::secrecy::{SecretBytes, SecretData};

const MARIADB_START: &str = "MariaDB is not reachable at 127.0.0.1:3306 as root with no password; \
    start it (as root) with `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd` \
    (see TESTING.md)";
const REDIS_START: &str = "Redis is not reachable at 127.0.0.1:6379; start it (as root) with \
    `redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log` (see TESTING.md)";

// ---------------------------------------------------------------- helpers

fn secret(pairs: &[(&str, &str)]) -> SecretData {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), SecretBytes::from(*v)))
        .collect()
}

fn settings(pairs: &[&str]) -> ProviderSettings {
    ProviderSettings::parse_pairs(pairs).expect("test settings are well formed")
}

fn field<'a>(data: &'a SecretData, name: &str) -> &'a str {
    data.get(name)
        .and_then(SecretBytes::expose_str)
        .unwrap_or_else(|| panic!("no UTF-8 field {name}"))
}

fn suffix() -> String {
    let s = random_string(10, Charset::Hex).unwrap();
    s.expose_str().unwrap().to_owned()
}

fn password() -> String {
    let s = random_string(24, Charset::Alnum).unwrap();
    format!("init{}", s.expose_str().unwrap())
}

fn provider(name: &str) -> Arc<dyn Provider> {
    Registry::with_builtin()
        .get(name)
        .unwrap_or_else(|| panic!("no built-in provider {name}"))
}

/// Fails unless neither the Display nor the Debug of `error` holds any of
/// `secrets`.
fn assert_no_secret(error: &ProviderError, secrets: &[&str]) {
    let shown = format!("{error} / {error:?}");
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(!shown.contains(secret), "a secret leaked into: {shown}");
    }
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Runs `body`, then `service.cleanup()` even if `body` panicked.
async fn with_cleanup<F>(service: Arc<Service>, body: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(body).await;
    service.cleanup().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

// ---------------------------------------------------------------- services

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Postgres,
    Mysql,
    Redis,
}

/// One real server, the users a test made on it, and independent login
/// checks.
struct Service {
    kind: Kind,
    suffix: String,
    users: Mutex<Vec<String>>,
}

impl Service {
    async fn new(kind: Kind) -> Arc<Self> {
        let service = Arc::new(Self {
            kind,
            suffix: suffix(),
            users: Mutex::new(Vec::new()),
        });
        // Fail early, naming the server and how to start it.
        match kind {
            Kind::Postgres => {
                pg_cluster::cluster();
            }
            Kind::Mysql => {
                mysql_admin().await;
            }
            Kind::Redis => {
                redis_admin().await;
            }
        }
        service
    }

    fn provider(&self) -> Arc<dyn Provider> {
        provider(match self.kind {
            Kind::Postgres => "postgres",
            Kind::Mysql => "mysql",
            Kind::Redis => "redis",
        })
    }

    fn port(&self) -> u16 {
        match self.kind {
            Kind::Postgres => pg_cluster::cluster().port,
            Kind::Mysql => 3306,
            Kind::Redis => 6379,
        }
    }

    /// The admin secret: the cluster's superuser, MariaDB's root, Redis's
    /// default user.
    fn admin(&self) -> SecretData {
        let port = self.port().to_string();
        match self.kind {
            Kind::Postgres => {
                let pg = pg_cluster::cluster();
                secret(&[
                    ("host", "127.0.0.1"),
                    ("port", &port),
                    ("username", &pg.admin_user),
                    ("password", &pg.admin_password),
                    ("database", "postgres"),
                ])
            }
            Kind::Mysql => secret(&[
                ("host", "127.0.0.1"),
                ("port", &port),
                ("username", "root"),
                ("password", ""),
                ("database", "test"),
            ]),
            Kind::Redis => secret(&[
                ("host", "127.0.0.1"),
                ("port", &port),
                ("username", "default"),
                ("password", ""),
            ]),
        }
    }

    /// A name unique to this test.
    fn user(&self, role: &str) -> String {
        format!("kw_{}_{role}", self.suffix)
    }

    async fn create_user(&self, name: &str, password: &str) {
        self.users.lock().unwrap().push(name.to_owned());
        match self.kind {
            Kind::Postgres => {
                let client = pg_admin().await;
                client
                    .batch_execute(&format!(
                        "CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'"
                    ))
                    .await
                    .unwrap();
            }
            Kind::Mysql => {
                use mysql_async::prelude::Queryable;
                let mut conn = mysql_admin().await;
                conn.query_drop(format!(
                    "CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"
                ))
                .await
                .unwrap();
                conn.disconnect().await.unwrap();
            }
            Kind::Redis => {
                let mut conn = redis_admin().await;
                redis::cmd("ACL")
                    .arg("SETUSER")
                    .arg(name)
                    .arg("on")
                    .arg(format!(">{password}"))
                    .arg("+ping")
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }

    /// An admin secret that is refused: the right admin with a wrong
    /// password. Redis's default user takes any password, so there the admin
    /// is a user made for the test.
    async fn admin_with_wrong_password(&self, wrong: &str) -> SecretData {
        let mut admin = self.admin();
        if self.kind == Kind::Redis {
            let name = self.user("admin");
            self.create_user(&name, &password()).await;
            admin.insert("username".into(), SecretBytes::from(name.as_str()));
        }
        admin.insert("password".into(), SecretBytes::from(wrong));
        admin
    }

    /// Whether `name` logs in with `password`, checked with the driver. Any
    /// failure other than a refused password fails the test.
    async fn can_login(&self, name: &str, password: &str) -> bool {
        match self.kind {
            Kind::Postgres => {
                let pg = pg_cluster::cluster();
                let result = tokio_postgres::Config::new()
                    .host("127.0.0.1")
                    .port(pg.port)
                    .user(name)
                    .password(password)
                    .dbname("postgres")
                    .connect(tokio_postgres::NoTls)
                    .await;
                match result {
                    Ok(_) => true,
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD) =>
                    {
                        false
                    }
                    Err(e) => panic!("PostgreSQL login check failed: {e:?}"),
                }
            }
            Kind::Mysql => {
                let opts = mysql_async::OptsBuilder::default()
                    .ip_or_hostname("127.0.0.1")
                    .tcp_port(3306)
                    .user(Some(name))
                    .pass(Some(password))
                    .prefer_socket(false);
                match mysql_async::Conn::new(opts).await {
                    Ok(conn) => {
                        conn.disconnect().await.unwrap();
                        true
                    }
                    Err(mysql_async::Error::Server(e)) if e.code == 1045 => false,
                    Err(e) => panic!("MariaDB login check failed: {e:?}"),
                }
            }
            Kind::Redis => {
                let info = redis::ConnectionAddr::Tcp("127.0.0.1".into(), 6379);
                let info = redis::IntoConnectionInfo::into_connection_info(info)
                    .unwrap()
                    .set_redis_settings(
                        redis::RedisConnectionInfo::default()
                            .set_username(name)
                            .set_password(password),
                    );
                let client = redis::Client::open(info).unwrap();
                match client.get_multiplexed_async_connection().await {
                    Ok(_) => true,
                    Err(e) if e.kind() == redis::ErrorKind::AuthenticationFailed => false,
                    Err(e) => panic!("Redis login check failed: {e:?}"),
                }
            }
        }
    }

    /// Whether `name` exists on the server.
    async fn user_exists(&self, name: &str) -> bool {
        match self.kind {
            Kind::Redis => {
                let mut conn = redis_admin().await;
                let found: redis::Value = redis::cmd("ACL")
                    .arg("GETUSER")
                    .arg(name)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                found != redis::Value::Nil
            }
            Kind::Mysql => {
                use mysql_async::prelude::Queryable;
                let mut conn = mysql_admin().await;
                let n: Option<u64> = conn
                    .exec_first(
                        "SELECT COUNT(*) FROM mysql.user WHERE user = ?",
                        (name.to_owned(),),
                    )
                    .await
                    .unwrap();
                conn.disconnect().await.unwrap();
                n.unwrap_or(0) > 0
            }
            Kind::Postgres => {
                let client = pg_admin().await;
                let row = client
                    .query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&name])
                    .await
                    .unwrap();
                row.get::<_, i64>(0) > 0
            }
        }
    }

    /// Drops every user this test made. The private PostgreSQL cluster is
    /// removed as a whole at the end of the run, so its roles stay.
    async fn cleanup(&self) {
        let users = std::mem::take(&mut *self.users.lock().unwrap());
        match self.kind {
            Kind::Postgres => {}
            Kind::Mysql => {
                use mysql_async::prelude::Queryable;
                let mut conn = mysql_admin().await;
                for user in users {
                    conn.query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"))
                        .await
                        .unwrap();
                }
                conn.disconnect().await.unwrap();
            }
            Kind::Redis => {
                let mut conn = redis_admin().await;
                for user in users {
                    redis::cmd("ACL")
                        .arg("DELUSER")
                        .arg(user)
                        .query_async::<()>(&mut conn)
                        .await
                        .unwrap();
                }
            }
        }
    }
}

async fn pg_admin() -> tokio_postgres::Client {
    let pg = pg_cluster::cluster();
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(pg.port)
        .user(&pg.admin_user)
        .password(&pg.admin_password)
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("the private PostgreSQL cluster refused its admin");
    tokio::spawn(connection);
    client
}

async fn mysql_admin() -> mysql_async::Conn {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(3306)
        .user(Some("root"))
        .prefer_socket(false);
    match mysql_async::Conn::new(opts).await {
        Ok(conn) => conn,
        Err(e) => panic!("{MARIADB_START}: {e}"),
    }
}

async fn redis_admin() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
    match client.get_multiplexed_async_connection().await {
        Ok(conn) => conn,
        Err(e) => panic!("{REDIS_START}: {e}"),
    }
}

// ---------------------------------------------------------------- scenarios

/// Single: apply replaces the password, the old one is refused at once, the
/// new one logs in; apply is idempotent; retire changes nothing.
async fn single_rotation(service: Arc<Service>) {
    let user = service.user("app");
    let initial = password();
    service.create_user(&user, &initial).await;
    assert!(service.can_login(&user, &initial).await);

    let provider = service.provider();
    let settings = settings(&[
        "admin_secret=db/admin",
        "strategy=single",
        &format!("username={user}"),
    ]);
    provider.validate(&settings).unwrap();
    assert_eq!(provider.admin_secret(&settings), Some("db/admin"));
    let admin = service.admin();
    let current = secret(&[("username", &user), ("password", &initial)]);
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: Some(&current),
    };

    let pending = provider.generate(&input).await.unwrap();
    assert_eq!(field(&pending, "username"), user);
    assert_eq!(field(&pending, "host"), "127.0.0.1");
    assert_eq!(field(&pending, "port"), service.port().to_string());
    assert_eq!(pending.get("database"), admin.get("database"));
    let new_password = field(&pending, "password").to_owned();
    assert_eq!(new_password.len(), 32);
    assert!(new_password.bytes().all(|b| b.is_ascii_alphanumeric()));
    let again = provider.generate(&input).await.unwrap();
    assert_ne!(field(&again, "password"), new_password, "fresh randomness");

    provider.apply(&input, &pending).await.unwrap();
    provider.apply(&input, &pending).await.unwrap();
    provider.verify(&input, &pending).await.unwrap();
    assert!(service.can_login(&user, &new_password).await);
    assert!(
        !service.can_login(&user, &initial).await,
        "old password still works"
    );

    // verify with the old value is refused, and says nothing of either value.
    let old = secret(&[("username", &user), ("password", &initial)]);
    let error = provider.verify(&input, &old).await.unwrap_err();
    assert!(matches!(error, ProviderError::Refused(_)), "{error:?}");
    assert!(!error.is_retryable());
    assert_no_secret(&error, &[&initial, &new_password]);

    let after = RotationInput {
        current: Some(&pending),
        ..input
    };
    provider.retire(&after, &current).await.unwrap();
    assert!(service.can_login(&user, &new_password).await);
}

/// Alternating: the other user gets the new password; the old user keeps
/// working until retire, and is refused after it; the next rotation goes
/// back to the first user.
async fn alternating_rotation(service: Arc<Service>) {
    let (a, b) = (service.user("a"), service.user("b"));
    let (pw_a, pw_b) = (password(), password());
    service.create_user(&a, &pw_a).await;
    service.create_user(&b, &pw_b).await;

    let provider = service.provider();
    let settings = settings(&[
        "admin_secret=db/admin",
        "strategy=alternating",
        &format!("usernames={a},{b}"),
    ]);
    provider.validate(&settings).unwrap();
    let admin = service.admin();

    // No current value yet: the first user of the pair.
    let first = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    assert_eq!(
        field(&provider.generate(&first).await.unwrap(), "username"),
        a
    );

    let current = secret(&[("username", &a), ("password", &pw_a)]);
    let input = RotationInput {
        current: Some(&current),
        ..first
    };
    let pending = provider.generate(&input).await.unwrap();
    assert_eq!(field(&pending, "username"), b, "the user not in current");
    let new_password = field(&pending, "password").to_owned();

    provider.apply(&input, &pending).await.unwrap();
    provider.apply(&input, &pending).await.unwrap();
    provider.verify(&input, &pending).await.unwrap();
    assert!(service.can_login(&b, &new_password).await);
    assert!(!service.can_login(&b, &pw_b).await);
    assert!(
        service.can_login(&a, &pw_a).await,
        "the old user works until retire"
    );

    // Promoted: pending is current, the old current is previous.
    let promoted = RotationInput {
        current: Some(&pending),
        ..input
    };
    // Retiring the value that is current now is a no-op, never a lock-out.
    provider.retire(&promoted, &pending).await.unwrap();
    assert!(service.can_login(&b, &new_password).await);

    provider.retire(&promoted, &current).await.unwrap();
    provider.retire(&promoted, &current).await.unwrap();
    assert!(!service.can_login(&a, &pw_a).await, "refused after retire");
    assert!(service.can_login(&b, &new_password).await);

    let next = provider.generate(&promoted).await.unwrap();
    assert_eq!(field(&next, "username"), a);
}

/// A closed port: apply and verify fail fast with a retryable Unreachable.
async fn unreachable_target(service: Arc<Service>) {
    let provider = service.provider();
    let user = service.user("app");
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let mut admin = service.admin();
    admin.insert("port".into(), SecretBytes::from(closed_port().to_string()));
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let pending = provider.generate(&input).await.unwrap();
    let secrets = [field(&pending, "password")];
    for error in [
        provider.apply(&input, &pending).await.unwrap_err(),
        provider.verify(&input, &pending).await.unwrap_err(),
    ] {
        assert!(matches!(error, ProviderError::Unreachable(_)), "{error:?}");
        assert!(error.is_retryable());
        assert_no_secret(&error, &secrets);
    }
}

/// The admin's password is wrong: Refused, and the message holds neither
/// the wrong admin password nor the pending one.
async fn refused_admin(service: Arc<Service>) {
    let provider = service.provider();
    let user = service.user("app");
    let initial = password();
    service.create_user(&user, &initial).await;
    let wrong = format!("wrong-{}", password());
    let admin = service.admin_with_wrong_password(&wrong).await;
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let pending = provider.generate(&input).await.unwrap();
    let error = provider.apply(&input, &pending).await.unwrap_err();
    assert!(matches!(error, ProviderError::Refused(_)), "{error:?}");
    assert!(!error.is_retryable());
    assert_no_secret(&error, &[&wrong, field(&pending, "password")]);
    assert!(service.can_login(&user, &initial).await, "nothing changed");
}

/// A user that does not exist: apply is refused, creates nothing, and does
/// not echo the password.
async fn missing_user(service: Arc<Service>) {
    let provider = service.provider();
    let user = service.user("ghost");
    // Registered for cleanup in case a broken provider creates it.
    service.users.lock().unwrap().push(user.clone());
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let admin = service.admin();
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let pending = provider.generate(&input).await.unwrap();
    let error = provider.apply(&input, &pending).await.unwrap_err();
    assert!(matches!(error, ProviderError::Refused(_)), "{error:?}");
    assert_no_secret(&error, &[field(&pending, "password")]);
    assert!(!service.user_exists(&user).await, "apply created the user");
}

/// A value naming a user the policy does not rotate is never acted on.
async fn foreign_user_is_not_touched(service: Arc<Service>) {
    let provider = service.provider();
    let (user, other) = (service.user("app"), service.user("other"));
    let other_password = password();
    service.create_user(&other, &other_password).await;
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let admin = service.admin();
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let forged = secret(&[("username", &other), ("password", "Forged0123456789")]);
    let error = provider.apply(&input, &forged).await.unwrap_err();
    assert!(
        matches!(error, ProviderError::InvalidSecret(_)),
        "{error:?}"
    );
    assert!(service.can_login(&other, &other_password).await);
}

macro_rules! service_tests {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn single_rotation() {
                let service = Service::new($kind).await;
                with_cleanup(service.clone(), super::single_rotation(service)).await;
            }

            #[tokio::test]
            async fn alternating_rotation() {
                let service = Service::new($kind).await;
                with_cleanup(service.clone(), super::alternating_rotation(service)).await;
            }

            #[tokio::test]
            async fn unreachable_target() {
                let service = Service::new($kind).await;
                with_cleanup(service.clone(), super::unreachable_target(service)).await;
            }

            #[tokio::test]
            async fn refused_admin() {
                let service = Service::new($kind).await;
                with_cleanup(service.clone(), super::refused_admin(service)).await;
            }

            #[tokio::test]
            async fn missing_user() {
                let service = Service::new($kind).await;
                with_cleanup(service.clone(), super::missing_user(service)).await;
            }

            #[tokio::test]
            async fn foreign_user_is_not_touched() {
                let service = Service::new($kind).await;
                with_cleanup(service.clone(), super::foreign_user_is_not_touched(service)).await;
            }
        }
    };
}

service_tests!(postgres, Kind::Postgres);
service_tests!(mysql, Kind::Mysql);
service_tests!(redis_acl, Kind::Redis);

/// PostgreSQL gets a SCRAM verifier: with every statement logged, the
/// plaintext password never reaches the server log.
#[tokio::test]
async fn postgres_plaintext_password_never_reaches_the_server_log() {
    let service = Service::new(Kind::Postgres).await;
    let user = service.user("logged");
    service.create_user(&user, &password()).await;
    let provider = service.provider();
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let admin = service.admin();
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let pending = provider.generate(&input).await.unwrap();
    provider.apply(&input, &pending).await.unwrap();
    provider.verify(&input, &pending).await.unwrap();
    let log = pg_cluster::cluster().log();
    assert!(
        log.contains(&format!(
            "ALTER ROLE \"{user}\" PASSWORD 'SCRAM-SHA-256$4096:"
        )),
        "the statement was not logged: the check below would prove nothing"
    );
    assert!(!log.contains(field(&pending, "password")));
}

// ---------------------------------------------------------------- settings

#[test]
fn target_providers_validate_settings() {
    for name in ["postgres", "mysql", "redis"] {
        let provider = provider(name);
        assert_eq!(provider.name(), name);
        let cases: &[(&[&str], &str)] = &[
            (&[], "`admin_secret`"),
            (&["admin_secret=a"], "`username`"),
            (
                &["admin_secret=a", "username=app", "password=hunter2secret"],
                "`password`",
            ),
            (&["admin_secret=a", "strategy=alternating"], "`usernames`"),
            (
                &["admin_secret=a", "strategy=alternating", "usernames=x,y,z"],
                "`usernames`",
            ),
            (
                &["admin_secret=a", "strategy=blue-green", "username=app"],
                "`strategy`",
            ),
        ];
        for (pairs, key) in cases {
            let error = provider.validate(&settings(pairs)).unwrap_err();
            match &error {
                ProviderError::InvalidSettings(message) => {
                    assert!(message.contains(key), "{name} {pairs:?}: {message}")
                }
                other => panic!("{name} {pairs:?}: {other:?}"),
            }
            assert_no_secret(&error, &["hunter2secret", "blue-green"]);
        }
        provider
            .validate(&settings(&["admin_secret=a", "username=app"]))
            .unwrap();
    }
}

#[test]
fn registry_holds_the_builtin_providers() {
    let registry = Registry::with_builtin();
    for name in ["random", "postgres", "mysql", "redis"] {
        assert_eq!(
            registry.get(name).map(|p| p.name().to_owned()).as_deref(),
            Some(name)
        );
    }
    assert!(registry.get("ldap").is_none());
}

// ---------------------------------------------------------------- random

#[test]
fn random_validates_settings() {
    let random = provider("random");
    random.validate(&settings(&[])).unwrap();
    random
        .validate(&settings(&[
            "fields=password,api_key",
            "length=64",
            "charset=hex",
        ]))
        .unwrap();
    assert_eq!(random.admin_secret(&settings(&[])), None);
    let cases: &[(&[&str], &str)] = &[
        (&["length=7"], "`length`"),
        (&["length=4097"], "`length`"),
        (&["length=lots"], "`length`"),
        (&["charset=emoji"], "`charset`"),
        (&["fields="], "`fields`"),
        (&["fields=a,,b"], "`fields`"),
        (&["fields=a,a"], "`fields`"),
        (&["colour=red"], "`colour`"),
    ];
    for (pairs, key) in cases {
        match random.validate(&settings(pairs)) {
            Err(ProviderError::InvalidSettings(message)) => {
                assert!(message.contains(key), "{pairs:?}: {message}");
                assert!(!message.contains("emoji") && !message.contains("lots"));
            }
            other => panic!("{pairs:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn random_regenerates_the_fields_and_keeps_the_others() {
    let random = provider("random");
    let settings = settings(&["fields=password,api_key", "length=48", "charset=base64"]);
    let current = secret(&[("username", "svc"), ("password", "old"), ("note", "kept")]);
    let input = RotationInput {
        settings: &settings,
        admin: None,
        current: Some(&current),
    };
    let pending = random.generate(&input).await.unwrap();
    assert_eq!(field(&pending, "username"), "svc");
    assert_eq!(field(&pending, "note"), "kept");
    for name in ["password", "api_key"] {
        let value = field(&pending, name);
        assert_eq!(value.len(), 48);
        assert!(value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
    }
    assert_ne!(field(&pending, "password"), field(&pending, "api_key"));
    let again = random.generate(&input).await.unwrap();
    assert_ne!(field(&again, "password"), field(&pending, "password"));
    random.apply(&input, &pending).await.unwrap();
    random.verify(&input, &pending).await.unwrap();
    random.retire(&input, &current).await.unwrap();

    // With no current value, only the listed fields; default settings.
    let defaults = ProviderSettings::default();
    let fresh = RotationInput {
        settings: &defaults,
        admin: None,
        current: None,
    };
    let value = random.generate(&fresh).await.unwrap();
    assert_eq!(value.keys().collect::<Vec<_>>(), ["password"]);
    assert_eq!(field(&value, "password").len(), 32);
    assert!(field(&value, "password")
        .bytes()
        .all(|b| b.is_ascii_alphanumeric()));
}

/// Every character of each set turns up about equally often. With about
/// 8000 expected draws per character one standard deviation is about 1.1% of
/// the mean; the bound is 10% (about 9 deviations, so a correct generator
/// fails with odds far below 1e-15), while plain `byte % 62` would draw 8 of
/// the alnum characters about 21% more often than the mean, and fail.
#[test]
fn random_characters_are_uniform() {
    for charset in [
        Charset::Alnum,
        Charset::Ascii,
        Charset::Hex,
        Charset::Base64,
    ] {
        let alphabet = charset.alphabet();
        let draws = alphabet.len() * 8000;
        let mut counts = [0usize; 256];
        let mut total = 0;
        while total < draws {
            let chunk = random_string(4096, charset).unwrap();
            for &b in chunk.expose() {
                counts[usize::from(b)] += 1;
            }
            total += chunk.len();
        }
        let mean = total as f64 / alphabet.len() as f64;
        for &c in alphabet {
            let n = counts[usize::from(c)] as f64;
            assert!(
                (n - mean).abs() < mean * 0.10,
                "{charset:?}: {:?} drawn {n} times, mean {mean}",
                c as char
            );
        }
        let outside: usize = (0..256)
            .filter(|b| !alphabet.contains(&(*b as u8)))
            .map(|b| counts[b])
            .sum();
        assert_eq!(outside, 0, "{charset:?}: characters outside the set");
    }
}

// ---------------------------------------------------------------- external

/// An external provider: `examples/provider_plugin.rs`, built and started by
/// the test on a unix socket, reached through `ExternalProvider`.
mod external {
    use super::*;
    use crate::plugin::start_plugin;
    use keyward::rotation::providers::ExternalProvider;
    use std::path::Path;

    fn listed(keys_file: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(keys_file).unwrap();
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        file["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    }

    fn sha256_hex(key: &str) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()))
    }

    #[tokio::test]
    async fn rotates_through_the_example_plugin() {
        let plugin = start_plugin();
        let endpoint = format!("unix:{}", plugin.socket.display());
        let external = ExternalProvider::connect("apikeys", &endpoint, None)
            .await
            .unwrap();
        assert!(external
            .settings()
            .iter()
            .any(|s| s.key == "keys_file" && s.required));
        let mut registry = Registry::with_builtin();
        registry.register(Arc::new(external)).unwrap();
        let provider = registry.get("apikeys").unwrap();

        // validate: from Describe, without a call.
        for (pairs, key) in [
            (&[][..], "`keys_file`"),
            (&["keys_file=/x", "colour=red"][..], "`colour`"),
        ] {
            match provider.validate(&settings(pairs)) {
                Err(ProviderError::InvalidSettings(m)) => assert!(m.contains(key), "{m}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
        let keys_file = plugin.dir.path().join("keys.json");
        let config = settings(&[&format!("keys_file={}", keys_file.display())]);
        provider.validate(&config).unwrap();
        assert_eq!(provider.admin_secret(&config), None);

        // The service accepts the current key.
        let old_key = "ak_OldKeyThatIsCurrentlyInUse0123456789";
        std::fs::write(
            &keys_file,
            format!("{{\"keys\": [\"{}\"]}}", sha256_hex(old_key)),
        )
        .unwrap();
        let current = secret(&[("api_key", old_key), ("owner", "team-payments")]);
        let input = RotationInput {
            settings: &config,
            admin: None,
            current: Some(&current),
        };

        let pending = provider.generate(&input).await.unwrap();
        let new_key = field(&pending, "api_key").to_owned();
        assert!(
            new_key.starts_with("ak_") && new_key.len() == 43,
            "{new_key}"
        );
        assert_eq!(field(&pending, "owner"), "team-payments");
        assert_ne!(
            field(&provider.generate(&input).await.unwrap(), "api_key"),
            new_key
        );

        // Before apply, the service refuses the pending key; the message
        // does not hold it.
        let error = provider.verify(&input, &pending).await.unwrap_err();
        assert!(matches!(error, ProviderError::Refused(_)), "{error:?}");
        assert_no_secret(&error, &[&new_key, old_key]);

        provider.apply(&input, &pending).await.unwrap();
        provider.apply(&input, &pending).await.unwrap();
        provider.verify(&input, &pending).await.unwrap();
        assert_eq!(
            listed(&keys_file),
            [sha256_hex(old_key), sha256_hex(&new_key)]
        );
        let on_disk = std::fs::read_to_string(&keys_file).unwrap();
        assert!(
            !on_disk.contains(&new_key),
            "the key file holds hashes only"
        );

        // Promoted; retiring the current value is a no-op, the previous one
        // is unlisted, twice is once.
        let promoted = RotationInput {
            current: Some(&pending),
            ..input
        };
        provider.retire(&promoted, &pending).await.unwrap();
        provider.retire(&promoted, &current).await.unwrap();
        provider.retire(&promoted, &current).await.unwrap();
        assert_eq!(listed(&keys_file), [sha256_hex(&new_key)]);

        // A value the plugin cannot use, and settings it refuses.
        let error = provider
            .apply(&promoted, &secret(&[("owner", "x")]))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ProviderError::InvalidSecret(_)),
            "{error:?}"
        );
        let relative = settings(&["keys_file=keys.json"]);
        let bad = RotationInput {
            settings: &relative,
            ..promoted
        };
        let error = provider.generate(&bad).await.unwrap_err();
        assert!(
            matches!(error, ProviderError::InvalidSettings(_)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_plugin_that_is_not_running_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("unix:{}", dir.path().join("absent.sock").display());
        let error = ExternalProvider::connect("absent", &endpoint, None)
            .await
            .unwrap_err();
        assert!(matches!(error, ProviderError::Unreachable(_)), "{error:?}");
        assert!(error.is_retryable());
    }

    #[tokio::test]
    async fn a_stopped_plugin_is_unreachable() {
        let mut plugin = start_plugin();
        let endpoint = format!("unix:{}", plugin.socket.display());
        let provider = ExternalProvider::connect("apikeys", &endpoint, None)
            .await
            .unwrap();
        plugin.child.kill().unwrap();
        plugin.child.wait().unwrap();
        let _ = std::fs::remove_file(&plugin.socket);
        let settings = settings(&["keys_file=/nonexistent/keys.json"]);
        let input = RotationInput {
            settings: &settings,
            admin: None,
            current: None,
        };
        let error = provider.generate(&input).await.unwrap_err();
        assert!(matches!(error, ProviderError::Unreachable(_)), "{error:?}");
    }
}
