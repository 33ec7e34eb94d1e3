//! Making and dropping lease users on PostgreSQL, MariaDB and Redis, with
//! the connection code of the rotation providers (`rotation::providers`):
//! the same logins, time limits and error mapping (no server message text is
//! passed through; it may quote a statement).
//!
//! Issue and revocation borrow their admin connection from the pools of
//! `super::pool` (one per admin login); the roles check of [`check`] runs
//! when a role is defined, on a fresh login. A granted role that vanished
//! later makes the `CREATE` itself fail, and the error names `roles=`.
//!
//! - PostgreSQL: `CREATE ROLE "u" LOGIN PASSWORD '<SCRAM verifier>' VALID
//!   UNTIL '<max expiry>' IN ROLE ...`, one statement (the plaintext never
//!   reaches the server; `VALID UNTIL` makes PostgreSQL itself refuse the
//!   password after the lease's latest end, even if keyward is gone). Drop,
//!   in one round trip: `NOLOGIN` (committed), end its sessions
//!   (committed), then `REASSIGN OWNED` to the admin user, `DROP OWNED`,
//!   `DROP ROLE` (objects in databases other than the admin login's are not
//!   reached by `REASSIGN OWNED`; a user that owns some there cannot be
//!   dropped and the revocation keeps failing, visibly).
//! - MariaDB: `CREATE USER 'u'@'%' IDENTIFIED BY '...'`, `GRANT role`, `SET
//!   DEFAULT ROLE`, sent as one multi-statement query. Drop: `ACCOUNT
//!   LOCK`, `KILL CONNECTION` of each of its sessions, `DROP USER IF
//!   EXISTS`.
//! - Redis: `ACL SETUSER u reset on #<sha256> <allowlisted rules>`. Drop:
//!   `off`, `CLIENT KILL USER`, `ACL DELUSER`.

use std::num::NonZeroU32;

use base64::Engine as _;
use mysql_async::prelude::Queryable;
use zeroize::Zeroizing;

use super::pool::{AdminConn, AdminPools, Lent};
use super::{DynamicError, Kind};
use crate::rotation::provider::ProviderError;
use crate::rotation::providers::mysql::{self, quote_string};
use crate::rotation::providers::postgres::{self, quote_ident, quote_literal};
use crate::rotation::providers::redis;
use crate::rotation::providers::target::{Call, Login, COMMAND_TIMEOUT};

/// The SCRAM iteration count PostgreSQL itself uses (RFC 7677's minimum).
pub const DEFAULT_SCRAM_ITERATIONS: u32 = 4096;
use crate::secrecy::SecretBytes;

/// Logs in as the admin and checks that each role in `roles` exists.
pub async fn check(kind: Kind, admin: &Login, roles: &[String]) -> Result<(), DynamicError> {
    match kind {
        Kind::Postgres => {
            let client = postgres::connect(admin).await?;
            pg_missing_roles(&client, admin, roles).await
        }
        Kind::Mysql => {
            let mut conn = mysql::connect(admin).await?;
            let result = my_missing_roles(&mut conn, admin, roles).await;
            let _ = conn.disconnect().await;
            result
        }
        Kind::Redis => {
            let mut conn = redis::connect(admin).await?;
            let call = Call::new("Redis", admin, "run ACL WHOAMI");
            let _: ::redis::Value =
                redis::command(&mut conn, ::redis::cmd("ACL").arg("WHOAMI"), &call).await?;
            Ok(())
        }
    }
}

fn missing(server: &str, admin: &Login, name: &str) -> DynamicError {
    DynamicError::Invalid(format!(
        "roles=: role `{name}` does not exist on {server} at {}",
        admin.address()
    ))
}

async fn pg_missing_roles(
    client: &tokio_postgres::Client,
    admin: &Login,
    roles: &[String],
) -> Result<(), DynamicError> {
    if roles.is_empty() {
        return Ok(());
    }
    let call = Call::new("PostgreSQL", admin, "look up roles");
    let rows = call
        .within(COMMAND_TIMEOUT, async {
            client
                .query(
                    "SELECT rolname FROM pg_roles WHERE rolname = ANY($1)",
                    &[&roles],
                )
                .await
                .map_err(|e| postgres::map_error(&e, &call))
        })
        .await?;
    let found: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    match roles.iter().find(|r| !found.contains(r)) {
        Some(name) => Err(missing("PostgreSQL", admin, name)),
        None => Ok(()),
    }
}

async fn my_missing_roles(
    conn: &mut mysql_async::Conn,
    admin: &Login,
    roles: &[String],
) -> Result<(), DynamicError> {
    let call = Call::new("MariaDB", admin, "look up roles");
    for name in roles {
        let found: Option<u64> = call
            .within(COMMAND_TIMEOUT, async {
                conn.exec_first(
                    "SELECT COUNT(*) FROM mysql.user WHERE user = ? AND is_role = 'Y'",
                    (name.as_str(),),
                )
                .await
                .map_err(|e| mysql::map_error(&e, &call))
            })
            .await?;
        if found.unwrap_or(0) == 0 {
            return Err(missing("MariaDB", admin, name));
        }
    }
    Ok(())
}

/// An admin login and the path of the secret it was read from: together
/// they choose the pool a connection is borrowed from.
#[derive(Clone, Copy)]
pub struct Admin<'a> {
    pub secret: &'a str,
    pub login: &'a Login,
}

/// What a new user is given.
pub struct NewUser<'a> {
    pub name: &'a str,
    pub password: &'a SecretBytes,
    /// PostgreSQL / MariaDB roles granted.
    pub roles: &'a [String],
    /// Redis ACL rules (allowlisted).
    pub rules: &'a [String],
    /// PostgreSQL `VALID UNTIL`.
    pub valid_until_ms: u64,
    /// PBKDF2 rounds of the PostgreSQL SCRAM verifier.
    pub scram_iterations: u32,
}

/// Makes the user on the target. A failure leaves at most a user that
/// [`drop_user`] removes.
pub async fn create(
    pools: &AdminPools,
    kind: Kind,
    admin: Admin<'_>,
    user: &NewUser<'_>,
) -> Result<(), DynamicError> {
    match kind {
        Kind::Postgres => pg_create(pools, admin, user).await,
        Kind::Mysql => my_create(pools, admin, user).await,
        Kind::Redis => redis_create(pools, admin, user).await,
    }
}

/// PostgreSQL's SCRAM-SHA-256 verifier of a generated password with
/// `iterations` PBKDF2 rounds: `SCRAM-SHA-256$<i>:<salt>$<StoredKey>:<ServerKey>`
/// (RFC 5802, as PostgreSQL stores it).
///
/// PostgreSQL runs the same PBKDF2 once more when it receives a verifier
/// (it checks that the empty password does not match), and every login of
/// the new user runs it on both sides. The rounds only slow down guessing
/// of a weak password; a generated one is 32 random letters and digits
/// (about 190 bits), so a role may lower them (`scram_iterations=`).
/// Generated passwords are ASCII letters and digits, which SASLprep leaves
/// as they are; anything else is refused.
pub(crate) async fn scram_verifier(
    password: &SecretBytes,
    iterations: u32,
) -> Result<Zeroizing<String>, ProviderError> {
    let Some(rounds) = NonZeroU32::new(iterations) else {
        return Err(ProviderError::Internal(
            "a SCRAM iteration count is at least 1".into(),
        ));
    };
    if password.expose().is_empty() || !password.expose().iter().all(u8::is_ascii_alphanumeric) {
        return Err(ProviderError::Internal(
            "a generated password is not plain letters and digits".into(),
        ));
    }
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| ProviderError::Internal("no randomness for a SCRAM salt".into()))?;
    let secret = Zeroizing::new(password.expose().to_vec());
    let make = move || {
        let mut salted = Zeroizing::new([0u8; 32]);
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            &salt,
            &secret,
            salted.as_mut(),
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, salted.as_ref());
        let client_key = ring::hmac::sign(&key, b"Client Key");
        let stored_key = ring::digest::digest(&ring::digest::SHA256, client_key.as_ref());
        let server_key = ring::hmac::sign(&key, b"Server Key");
        let b64 = base64::engine::general_purpose::STANDARD;
        Zeroizing::new(format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            rounds,
            b64.encode(salt),
            b64.encode(stored_key.as_ref()),
            b64.encode(server_key.as_ref())
        ))
    };
    // Many rounds are milliseconds of CPU: off the async workers.
    if iterations <= 256 {
        return Ok(make());
    }
    match tokio::task::spawn_blocking(make).await {
        Ok(verifier) => Ok(verifier),
        // Only a panic in the hash itself (or a runtime shutting down) gets here.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A failed PostgreSQL call: the SQLSTATE (if the server answered), whether
/// it was the retry on a new connection, and the mapped error.
struct PgFailed {
    code: Option<String>,
    retried: bool,
    error: ProviderError,
}

/// Runs `sql` (simple protocol; several statements are one round trip) on a
/// pooled connection. A reused connection that turns out dead (closed, or
/// its session ended by the server) is closed and the call is made once
/// more on a new one. One whose statement the server refused with a
/// SQLSTATE goes back to the pool if it is idle (`Lent::give_back_if_idle`).
async fn pg_run(
    pools: &AdminPools,
    admin: Admin<'_>,
    call: &Call,
    sql: &str,
) -> Result<(), PgFailed> {
    let mut retried = false;
    loop {
        let lent = pools
            .lend(Kind::Postgres, admin.secret, admin.login)
            .await
            .map_err(|error| PgFailed {
                code: None,
                retried,
                error,
            })?;
        let AdminConn::Postgres(client) = &lent.conn else {
            return Err(PgFailed {
                code: None,
                retried,
                error: call.failed("the pool lent a connection of another kind"),
            });
        };
        let result = tokio::time::timeout(COMMAND_TIMEOUT, client.batch_execute(sql)).await;
        let e = match result {
            Ok(Ok(())) => {
                lent.give_back();
                return Ok(());
            }
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(PgFailed {
                    code: None,
                    retried,
                    error: call.unreachable(format_args!(
                        "no answer within {} s",
                        COMMAND_TIMEOUT.as_secs()
                    )),
                })
            }
        };
        let code = e.code().map(|c| c.code().to_owned());
        // 57: the session was ended (pg_terminate_backend, shutdown); 08:
        // connection exception; no code: the socket closed.
        let dead = code
            .as_deref()
            .is_none_or(|c| c.starts_with("57") || c.starts_with("08"));
        if lent.reused && !retried && dead {
            drop(lent);
            retried = true;
            continue;
        }
        if !dead {
            // The server refused a statement and the session lives on: back
            // to the pool if it is out of any transaction block (see the
            // pool's rules).
            lent.give_back_if_idle().await;
        }
        return Err(PgFailed {
            code,
            retried,
            error: postgres::map_error(&e, call),
        });
    }
}

fn valid_until(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string())
        .unwrap_or_else(|| "infinity".to_owned())
}

async fn pg_create(
    pools: &AdminPools,
    admin: Admin<'_>,
    user: &NewUser<'_>,
) -> Result<(), DynamicError> {
    let verifier = scram_verifier(user.password, user.scram_iterations).await?;
    let mut statement = Zeroizing::new(format!(
        "CREATE ROLE {} LOGIN PASSWORD {} VALID UNTIL {}",
        quote_ident(user.name),
        quote_literal(&verifier),
        quote_literal(&valid_until(user.valid_until_ms))
    ));
    if !user.roles.is_empty() {
        let list: Vec<String> = user.roles.iter().map(|r| quote_ident(r)).collect();
        statement.push_str(" IN ROLE ");
        statement.push_str(&list.join(", "));
    }
    let call = Call::new(
        "PostgreSQL",
        admin.login,
        format!("create role `{}`", user.name),
    );
    match pg_run(pools, admin, &call, &statement).await {
        Ok(()) => Ok(()),
        // 42710 duplicate_object on the retry: the first attempt's CREATE
        // reached the server before its connection died (the name is 64
        // random bits made for this lease, the verifier is ours).
        Err(PgFailed {
            code: Some(code),
            retried: true,
            ..
        }) if code == "42710" => Ok(()),
        // 42704 undefined_object: a granted role is gone since the role
        // was defined (the new user's own name cannot be undefined).
        Err(PgFailed {
            code: Some(code), ..
        }) if code == "42704" => Err(pg_vanished(pools, admin, user.roles).await),
        Err(failed) => Err(failed.error.into()),
    }
}

/// Names the granted role that no longer exists (on the error path only).
async fn pg_vanished(pools: &AdminPools, admin: Admin<'_>, roles: &[String]) -> DynamicError {
    let generic = || {
        DynamicError::Invalid(format!(
            "roles=: a role this dynamic role grants no longer exists on PostgreSQL at {}; nothing was created",
            admin.login.address()
        ))
    };
    let Ok(lent) = pools.lend(Kind::Postgres, admin.secret, admin.login).await else {
        return generic();
    };
    let AdminConn::Postgres(client) = &lent.conn else {
        return generic();
    };
    match pg_missing_roles(client, admin.login, roles).await {
        Err(named @ DynamicError::Invalid(_)) => {
            lent.give_back();
            named
        }
        Ok(()) => {
            lent.give_back();
            generic()
        }
        Err(_) => generic(),
    }
}

async fn my_create(
    pools: &AdminPools,
    admin: Admin<'_>,
    user: &NewUser<'_>,
) -> Result<(), DynamicError> {
    let (Some(user_lit), Some(pass_lit)) = (
        quote_string(user.name),
        quote_string(user.password.expose_str().unwrap_or_default()).map(Zeroizing::new),
    ) else {
        return Err(
            ProviderError::Internal("a generated name or password is not quotable".into()).into(),
        );
    };
    // One round trip: the statements as one multi-statement query; the
    // server stops at the first that fails.
    let mut statement = Zeroizing::new(format!(
        "CREATE USER {user_lit}@'%' IDENTIFIED BY {}",
        pass_lit.as_str()
    ));
    for role in user.roles {
        let role_lit = quote_string(role).unwrap_or_default();
        statement.push_str(&format!(
            "; GRANT {role_lit} TO {user_lit}@'%'; SET DEFAULT ROLE {role_lit} FOR {user_lit}@'%'"
        ));
    }
    let call = Call::new(
        "MariaDB",
        admin.login,
        format!("create user `{}`", user.name),
    );
    let mut retried = false;
    loop {
        let mut lent = pools.lend(Kind::Mysql, admin.secret, admin.login).await?;
        let AdminConn::Mysql(conn) = &mut lent.conn else {
            return Err(call
                .failed("the pool lent a connection of another kind")
                .into());
        };
        let result =
            tokio::time::timeout(COMMAND_TIMEOUT, conn.query_drop(statement.as_str())).await;
        let e = match result {
            Ok(Ok(())) => {
                lent.give_back();
                return Ok(());
            }
            // 1959 invalid role specification: a granted role is gone since
            // the role was defined. The user made by the first statement is
            // dropped by the caller's undo.
            Ok(Err(mysql_async::Error::Server(e))) if e.code == 1959 => {
                return Err(DynamicError::Invalid(format!(
                    "roles=: role `{}` no longer exists on MariaDB at {}",
                    user.roles.first().map(String::as_str).unwrap_or_default(),
                    admin.login.address()
                )))
            }
            Ok(Err(e)) => mysql::map_error(&e, &call),
            Err(_) => {
                return Err(call
                    .unreachable(format_args!(
                        "no answer within {} s",
                        COMMAND_TIMEOUT.as_secs()
                    ))
                    .into())
            }
        };
        // A reused connection the server closed: once more on a new one. If
        // the first try did make the user, CREATE USER now fails and the
        // caller's undo drops it.
        if lent.reused && !retried && e.is_retryable() {
            retried = true;
            continue;
        }
        return Err(e.into());
    }
}

async fn redis_create(
    pools: &AdminPools,
    admin: Admin<'_>,
    user: &NewUser<'_>,
) -> Result<(), DynamicError> {
    let digest = ring::digest::digest(&ring::digest::SHA256, user.password.expose());
    let hash = Zeroizing::new(format!("#{}", hex::encode(digest.as_ref())));
    let mut cmd = ::redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(user.name)
        .arg("reset")
        .arg("on")
        .arg(hash.as_str());
    for rule in user.rules {
        cmd.arg(rule.as_str());
    }
    let call = Call::new(
        "Redis",
        admin.login,
        format!("create ACL user `{}`", user.name),
    );
    let mut retried = false;
    loop {
        let mut lent = pools.lend(Kind::Redis, admin.secret, admin.login).await?;
        let AdminConn::Redis(conn) = &mut lent.conn else {
            return Err(call
                .failed("the pool lent a connection of another kind")
                .into());
        };
        // ACL SETUSER with `reset` is idempotent: a retry is safe.
        match redis::command::<::redis::Value>(conn, &cmd, &call).await {
            Ok(_) => {
                lent.give_back();
                return Ok(());
            }
            Err(e) if lent.reused && !retried && e.is_retryable() => retried = true,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Removes `user` and ends its sessions; a user that does not exist is
/// success.
pub async fn drop_user(
    pools: &AdminPools,
    kind: Kind,
    admin: Admin<'_>,
    user: &str,
) -> Result<(), ProviderError> {
    match kind {
        Kind::Postgres => pg_drop(pools, admin, user).await,
        Kind::Mysql => my_drop(pools, admin, user).await,
        Kind::Redis => redis_drop(pools, admin, user).await,
    }
}

async fn pg_drop(pools: &AdminPools, admin: Admin<'_>, user: &str) -> Result<(), ProviderError> {
    let role = quote_ident(user);
    // One round trip. The explicit COMMITs end the implicit transaction of
    // a multi-statement query: NOLOGIN is visible to new logins before the
    // sessions are ended, and the sessions are gone before the drop.
    let sql = format!(
        "ALTER ROLE {role} NOLOGIN; COMMIT; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {}; COMMIT; \
         REASSIGN OWNED BY {role} TO {}; DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}",
        quote_literal(user),
        quote_ident(&admin.login.username)
    );
    let call = Call::new("PostgreSQL", admin.login, format!("drop role `{user}`"));
    match pg_run(pools, admin, &call, &sql).await {
        Ok(()) => Ok(()),
        // 42704 undefined_object: the user is already gone.
        Err(PgFailed {
            code: Some(code), ..
        }) if code == "42704" => Ok(()),
        Err(failed) => Err(failed.error),
    }
}

async fn my_drop(pools: &AdminPools, admin: Admin<'_>, user: &str) -> Result<(), ProviderError> {
    let call = Call::new("MariaDB", admin.login, format!("drop user `{user}`"));
    let Some(user_lit) = quote_string(user) else {
        return Err(call.failed("the user name is not quotable"));
    };
    let mut retried = false;
    loop {
        let mut lent = pools.lend(Kind::Mysql, admin.secret, admin.login).await?;
        match my_drop_on(&mut lent, &call, user, &user_lit).await {
            Ok(()) => {
                lent.give_back();
                return Ok(());
            }
            // Every step is idempotent: a reused connection the server
            // closed is retried once on a new one.
            Err(e) if lent.reused && !retried && e.is_retryable() => retried = true,
            Err(e) => return Err(e),
        }
    }
}

async fn my_drop_on(
    lent: &mut Lent,
    call: &Call,
    user: &str,
    user_lit: &str,
) -> Result<(), ProviderError> {
    let AdminConn::Mysql(conn) = &mut lent.conn else {
        return Err(call.failed("the pool lent a connection of another kind"));
    };
    call.within(COMMAND_TIMEOUT, async {
        let map = |e: mysql_async::Error| mysql::map_error(&e, call);
        conn.query_drop(format!("ALTER USER IF EXISTS {user_lit}@'%' ACCOUNT LOCK"))
            .await
            .map_err(map)?;
        let ids: Vec<u64> = conn
            .exec(
                "SELECT id FROM information_schema.processlist WHERE user = ?",
                (user,),
            )
            .await
            .map_err(map)?;
        for id in ids {
            // 1094: the session ended meanwhile.
            match conn.query_drop(format!("KILL CONNECTION {id}")).await {
                Err(mysql_async::Error::Server(e)) if e.code == 1094 => {}
                other => other.map_err(map)?,
            }
        }
        conn.query_drop(format!("DROP USER IF EXISTS {user_lit}@'%'"))
            .await
            .map_err(map)
    })
    .await
}

async fn redis_drop(pools: &AdminPools, admin: Admin<'_>, user: &str) -> Result<(), ProviderError> {
    let call = Call::new("Redis", admin.login, format!("delete ACL user `{user}`"));
    let mut retried = false;
    loop {
        let mut lent = pools.lend(Kind::Redis, admin.secret, admin.login).await?;
        match redis_drop_on(&mut lent, &call, user).await {
            Ok(()) => {
                lent.give_back();
                return Ok(());
            }
            // Idempotent: retried once on a new connection.
            Err(e) if lent.reused && !retried && e.is_retryable() => retried = true,
            Err(e) => return Err(e),
        }
    }
}

async fn redis_drop_on(lent: &mut Lent, call: &Call, user: &str) -> Result<(), ProviderError> {
    let AdminConn::Redis(conn) = &mut lent.conn else {
        return Err(call.failed("the pool lent a connection of another kind"));
    };
    let found: ::redis::Value =
        redis::command(conn, ::redis::cmd("ACL").arg("GETUSER").arg(user), call).await?;
    if found != ::redis::Value::Nil {
        let _: ::redis::Value = redis::command(
            conn,
            ::redis::cmd("ACL").arg("SETUSER").arg(user).arg("off"),
            call,
        )
        .await?;
        let _: ::redis::Value = redis::command(
            conn,
            ::redis::cmd("CLIENT").arg("KILL").arg("USER").arg(user),
            call,
        )
        .await?;
        let _: ::redis::Value =
            redis::command(conn, ::redis::cmd("ACL").arg("DELUSER").arg(user), call).await?;
    }
    Ok(())
}
