//! Admin connections kept open between issues and revocations, one small
//! pool per admin login.
//!
//! Opening a PostgreSQL admin connection costs a TCP handshake, a SCRAM
//! login (PBKDF2 on both sides) and a backend process; doing it for every
//! credential and every revocation made the target's connection setup the
//! limit. A pool keeps up to [`MAX_PER_LOGIN`] connections per login open
//! and lends them one call at a time.
//!
//! Rules:
//! - A pool is keyed by everything that says who the connection is: the
//!   provider, the admin secret's path, host, port, database, user name and
//!   an HMAC of the password under a key made at random for this process
//!   (the password itself is not kept in the key, and the HMAC is worthless
//!   outside this process). Two roles with different admin secrets never
//!   share a connection, even when the logins look alike; a changed
//!   password is a different key.
//! - When a login of an admin secret is asked for with a key that differs
//!   from the one pooled for the same secret (the secret was rotated), the
//!   old pool is retired at once: its idle connections are closed and lent
//!   ones are closed when they come back.
//! - A connection that failed is closed, never lent again: only
//!   [`Lent::give_back`] after a call that succeeded returns it, with one
//!   exception. A PostgreSQL statement the server refused with a SQLSTATE
//!   (say 42704, a role that does not exist) leaves the session open and
//!   usable once it is out of any transaction block:
//!   [`Lent::give_back_if_idle`] then asks it `SELECT 1`, which succeeds
//!   only outside a failed transaction block (inside one the server answers
//!   25P02 and the connection is closed). After an error a session is
//!   either idle or in a failed block, never in a healthy open one, so that
//!   answer is exactly "idle". Without it, many drops of users already gone
//!   would close one pooled connection each and make the pool log in anew
//!   (a SCRAM exchange) every time.
//! - Idle connections are closed after [`IDLE_CLOSE`], and every
//!   connection once it is [`MAX_LIFETIME`] old (a login disabled or a
//!   password changed on the server leaves open sessions alone). A PostgreSQL
//!   connection whose server side ended is skipped when lending; MariaDB and
//!   Redis connections idle for more than [`CHECK_AFTER`] are pinged first.
//! - Sealing empties every pool ([`AdminPools::clear`]), and no pool is
//!   made or lent from while the vault is sealed: the sealed check and the
//!   making of a pool hold the same lock as `clear`, and the barrier is
//!   sealed before `clear` runs, so an issue or revocation that read its
//!   admin secret before the seal and borrows after it gets either a
//!   refusal or a pool that `clear` retires (its connection is closed when
//!   it comes back).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::Kind;
use crate::rotation::provider::ProviderError;
use crate::rotation::providers::target::{Call, Login, COMMAND_TIMEOUT};
use crate::rotation::providers::{mysql, postgres, redis};

/// Connections open at once per admin login (idle and lent together).
pub const MAX_PER_LOGIN: usize = 16;
/// An idle connection is closed after this long unused.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// A MariaDB or Redis connection idle longer than this is pinged before it
/// is lent again.
pub const CHECK_AFTER: Duration = Duration::from_secs(5);
/// A connection is closed (not returned) once it is this old, however busy:
/// a password changed or a login disabled on the server, which leaves open
/// sessions alone, reaches keyward within this time.
pub const MAX_LIFETIME: Duration = Duration::from_secs(300);

/// One open admin connection.
pub(crate) enum AdminConn {
    Postgres(tokio_postgres::Client),
    Mysql(mysql_async::Conn),
    Redis(::redis::aio::MultiplexedConnection),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    kind: Kind,
    secret: String,
    host: String,
    port: u16,
    database: Option<String>,
    username: String,
    password_mac: Vec<u8>,
}

struct Idle {
    conn: AdminConn,
    since: Instant,
    opened: Instant,
}

struct Pool {
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// Replaced (rotated secret) or emptied (seal): nothing goes back in.
    retired: AtomicBool,
    /// A reaper task is running for this pool.
    reaping: AtomicBool,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    fn new() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_PER_LOGIN)),
            idle: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
            reaping: AtomicBool::new(false),
        }
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        locked(&self.idle).clear();
    }

    /// Closes idle connections past [`IDLE_CLOSE`]; returns how many stay.
    fn prune(&self, now: Instant) -> usize {
        let mut idle = locked(&self.idle);
        idle.retain(|i| now.saturating_duration_since(i.since) < IDLE_CLOSE);
        idle.len()
    }

    /// Starts the task that closes idle connections, if none runs. It holds
    /// the pool weakly and ends once the pool has nothing idle.
    fn ensure_reaper(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE_CLOSE / 4).await;
                let Some(pool) = weak.upgrade() else { return };
                if pool.prune(Instant::now()) == 0 {
                    pool.reaping.store(false, Ordering::SeqCst);
                    // A connection put back meanwhile found the flag set:
                    // look after it here.
                    if locked(&pool.idle).is_empty() || pool.reaping.swap(true, Ordering::SeqCst) {
                        return;
                    }
                }
            }
        });
    }
}

/// A connection lent for one call. Dropped, it is closed; only
/// [`Lent::give_back`] returns it to its pool.
pub(crate) struct Lent {
    pub conn: AdminConn,
    opened: Instant,
    /// Taken from the idle list (it may have died since): a connection
    /// error on it may be retried once on a new connection.
    pub reused: bool,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Lent {
    /// Returns the connection after a call that succeeded. The slot is
    /// freed only after the connection is back in the idle list.
    pub fn give_back(self) {
        let Lent {
            conn,
            opened,
            pool,
            _permit: permit,
            ..
        } = self;
        let now = Instant::now();
        if pool.retired.load(Ordering::SeqCst)
            || now.saturating_duration_since(opened) >= MAX_LIFETIME
        {
            return;
        }
        if let AdminConn::Postgres(c) = &conn {
            if c.is_closed() {
                return;
            }
        }
        locked(&pool.idle).push(Idle {
            conn,
            since: now,
            opened,
        });
        drop(permit);
        pool.ensure_reaper();
    }
}

/// How long the idle check of [`Lent::give_back_if_idle`] may take.
const IDLE_CHECK: Duration = Duration::from_secs(2);

impl Lent {
    /// After a PostgreSQL statement the server answered with an error
    /// (SQLSTATE) that did not end the session: returns the connection if
    /// it is idle, outside any transaction block, and closes it otherwise.
    /// Any other kind of connection is closed, as after any failure.
    pub async fn give_back_if_idle(self) {
        let idle = match &self.conn {
            AdminConn::Postgres(c) if !c.is_closed() => matches!(
                tokio::time::timeout(IDLE_CHECK, c.simple_query("SELECT 1")).await,
                Ok(Ok(_))
            ),
            _ => false,
        };
        if idle {
            self.give_back();
        }
    }
}

/// Whether the vault is sealed now.
pub(crate) type SealedCheck = Box<dyn Fn() -> bool + Send + Sync>;

/// Every admin pool of one server.
pub(crate) struct AdminPools {
    mac_key: ring::hmac::Key,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    sealed: SealedCheck,
    /// Connections opened since start (tests, figures).
    opened: AtomicU64,
}

impl AdminPools {
    pub fn new(sealed: SealedCheck) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let mac_key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            // No randomness: a key of a fixed value would still separate
            // passwords, but nothing else in keyward works without it.
            .unwrap_or_else(|_| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"keyward-pool"));
        Self {
            mac_key,
            pools: Mutex::new(HashMap::new()),
            sealed,
            opened: AtomicU64::new(0),
        }
    }

    fn key(&self, kind: Kind, secret: &str, admin: &Login) -> PoolKey {
        PoolKey {
            kind,
            secret: secret.to_owned(),
            host: admin.host.clone(),
            port: admin.port,
            database: admin.database.clone(),
            username: admin.username.clone(),
            password_mac: ring::hmac::sign(&self.mac_key, admin.password.expose())
                .as_ref()
                .to_vec(),
        }
    }

    /// The pool of `key`; `None` while the vault is sealed. Checked under
    /// the lock `clear` takes: a pool handed out here either existed before
    /// `clear` (which retires it) or was made while the vault was unsealed.
    fn pool(&self, key: &PoolKey) -> Option<Arc<Pool>> {
        let mut pools = locked(&self.pools);
        if (self.sealed)() {
            return None;
        }
        if let Some(pool) = pools.get(key) {
            return Some(pool.clone());
        }
        // The same secret under another key: it was rotated (or edited).
        pools.retain(|k, pool| {
            let stale = k.kind == key.kind && k.secret == key.secret;
            if stale {
                pool.retire();
            }
            !stale
        });
        let pool = Arc::new(Pool::new());
        pools.insert(key.clone(), pool.clone());
        Some(pool)
    }

    /// Lends a connection logged in as `admin` (the login read from the
    /// secret at `secret`): an idle one of the same key, or a new one.
    pub async fn lend(
        &self,
        kind: Kind,
        secret: &str,
        admin: &Login,
    ) -> Result<Lent, ProviderError> {
        let key = self.key(kind, secret, admin);
        let call = Call::new(server(kind), admin, "take an admin connection");
        let Some(pool) = self.pool(&key) else {
            return Err(call.failed("the vault is sealed"));
        };
        let permit =
            match tokio::time::timeout(COMMAND_TIMEOUT, pool.slots.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(call.failed("the pool is closed")),
                Err(_) => {
                    return Err(call.unreachable(format_args!(
                        "all {MAX_PER_LOGIN} admin connections stayed busy for {} s",
                        COMMAND_TIMEOUT.as_secs()
                    )))
                }
            };
        loop {
            let candidate = locked(&pool.idle).pop();
            let Some(idle) = candidate else { break };
            let now = Instant::now();
            let idle_for = now.saturating_duration_since(idle.since);
            if idle_for >= IDLE_CLOSE || now.saturating_duration_since(idle.opened) >= MAX_LIFETIME
            {
                continue;
            }
            let (mut conn, opened) = (idle.conn, idle.opened);
            let alive = match &mut conn {
                AdminConn::Postgres(c) => !c.is_closed(),
                AdminConn::Mysql(c) if idle_for >= CHECK_AFTER => {
                    matches!(
                        tokio::time::timeout(Duration::from_secs(2), c.ping()).await,
                        Ok(Ok(()))
                    )
                }
                AdminConn::Redis(c) if idle_for >= CHECK_AFTER => {
                    let ping = ::redis::cmd("PING");
                    matches!(
                        tokio::time::timeout(
                            Duration::from_secs(2),
                            ping.query_async::<::redis::Value>(c)
                        )
                        .await,
                        Ok(Ok(_))
                    )
                }
                _ => true,
            };
            if alive {
                return Ok(Lent {
                    conn,
                    opened,
                    reused: true,
                    pool,
                    _permit: permit,
                });
            }
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        let conn = match kind {
            Kind::Postgres => AdminConn::Postgres(postgres::connect(admin).await?),
            Kind::Mysql => AdminConn::Mysql(mysql::connect(admin).await?),
            Kind::Redis => AdminConn::Redis(redis::connect(admin).await?),
        };
        Ok(Lent {
            conn,
            opened: Instant::now(),
            reused: false,
            pool,
            _permit: permit,
        })
    }

    /// Closes every pooled connection (seal). Lent ones are closed when
    /// they come back.
    pub fn clear(&self) {
        let mut pools = locked(&self.pools);
        for pool in pools.values() {
            pool.retire();
        }
        pools.clear();
    }

    /// Connections opened (or tried) since start, across all pools.
    pub fn opened_count(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Idle connections across all pools (for tests and figures).
    pub fn idle_count(&self) -> usize {
        locked(&self.pools)
            .values()
            .map(|p| locked(&p.idle).len())
            .sum()
    }
}

fn server(kind: Kind) -> &'static str {
    match kind {
        Kind::Postgres => "PostgreSQL",
        Kind::Mysql => "MariaDB",
        Kind::Redis => "Redis",
    }
}
