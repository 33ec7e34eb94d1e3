//! A real database a rotation test changes credentials on (TESTING.md): the
//! private scram-sha-256 PostgreSQL cluster of `pg_cluster.rs`, the machine's
//! MariaDB on 127.0.0.1:3306 (root, no password) or Redis on 127.0.0.1:6379.
//! It makes users with names unique to one test, checks logins with the
//! drivers directly (never with the provider under test), and drops its users
//! afterwards. Shared by `tests/rotation_providers.rs` and
//! `tests/it/rotation.rs`; each includes `pg_cluster.rs` at its crate root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::{Arc, Mutex};

use keyward::rotation::providers::random::random_string;
use keyward::rotation::providers::Charset;

use crate::pg_cluster;

pub const MARIADB_START: &str = "MariaDB is not reachable at 127.0.0.1:3306 as root with no password; \
    start it (as root) with `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd` \
    (see TESTING.md)";
pub const REDIS_START: &str = "Redis is not reachable at 127.0.0.1:6379; start it (as root) with \
    `redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log` (see TESTING.md)";

/// A password no other test uses.
pub fn password() -> String {
    let s = random_string(24, Charset::Alnum).unwrap();
    format!("init{}", s.expose_str().unwrap())
}

/// Ten hex characters, to make names unique to one test.
pub fn suffix() -> String {
    random_string(10, Charset::Hex)
        .unwrap()
        .expose_str()
        .unwrap()
        .to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Mysql,
    Redis,
}

/// One real server and the users a test made on it.
pub struct Target {
    pub kind: Kind,
    suffix: String,
    users: Mutex<Vec<String>>,
}

impl Target {
    /// Fails at once, naming the server and how to start it, when it cannot
    /// be reached.
    pub async fn new(kind: Kind) -> Arc<Self> {
        match kind {
            Kind::Postgres => {
                pg_cluster::cluster();
            }
            Kind::Mysql => drop(mysql_admin().await),
            Kind::Redis => drop(redis_admin().await),
        }
        Arc::new(Self {
            kind,
            suffix: suffix(),
            users: Mutex::new(Vec::new()),
        })
    }

    /// The name of the built-in provider for this server.
    pub fn provider(&self) -> &'static str {
        match self.kind {
            Kind::Postgres => "postgres",
            Kind::Mysql => "mysql",
            Kind::Redis => "redis",
        }
    }

    pub fn port(&self) -> u16 {
        match self.kind {
            Kind::Postgres => pg_cluster::cluster().port,
            Kind::Mysql => 3306,
            Kind::Redis => 6379,
        }
    }

    /// Fields of the admin secret: the cluster's superuser, MariaDB's root,
    /// Redis's default user.
    pub fn admin(&self) -> Vec<(String, String)> {
        let pairs: Vec<(&str, String)> = match self.kind {
            Kind::Postgres => {
                let pg = pg_cluster::cluster();
                vec![
                    ("username", pg.admin_user.clone()),
                    ("password", pg.admin_password.clone()),
                    ("database", "postgres".into()),
                ]
            }
            Kind::Mysql => vec![
                ("username", "root".into()),
                ("password", String::new()),
                ("database", "test".into()),
            ],
            Kind::Redis => vec![("username", "default".into()), ("password", String::new())],
        };
        let mut out = vec![
            ("host".to_owned(), "127.0.0.1".to_owned()),
            ("port".to_owned(), self.port().to_string()),
        ];
        out.extend(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)));
        out
    }

    /// A user name unique to this test.
    pub fn user(&self, role: &str) -> String {
        format!("kw_{}_{role}", self.suffix)
    }

    /// Has `cleanup` drop `name`, a user the test did not make (one that a
    /// provider might wrongly create).
    pub fn track_user(&self, name: &str) {
        self.users.lock().unwrap().push(name.to_owned());
    }

    /// Makes a user that `cleanup` drops again.
    pub async fn create_user(&self, name: &str, password: &str) {
        self.users.lock().unwrap().push(name.to_owned());
        match self.kind {
            Kind::Postgres => {
                pg_admin()
                    .await
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

    /// Whether `name` logs in with `password`, checked with the driver. Any
    /// failure other than a refused password fails the test.
    pub async fn can_login(&self, name: &str, password: &str) -> bool {
        match self.kind {
            Kind::Postgres => {
                let result = tokio_postgres::Config::new()
                    .host("127.0.0.1")
                    .port(self.port())
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
    pub async fn user_exists(&self, name: &str) -> bool {
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
    pub async fn cleanup(&self) {
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

/// Runs `body`, then the target's cleanup even if `body` panicked.
pub async fn with_cleanup<F>(target: Arc<Target>, body: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(body).await;
    target.cleanup().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

pub async fn pg_admin() -> tokio_postgres::Client {
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

pub async fn mysql_admin() -> mysql_async::Conn {
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

pub async fn redis_admin() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
    match client.get_multiplexed_async_connection().await {
        Ok(conn) => conn,
        Err(e) => panic!("{REDIS_START}: {e}"),
    }
}
