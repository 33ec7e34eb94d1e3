//! Making and dropping lease users on PostgreSQL, MariaDB and Redis, with
//! the connection code of the rotation providers (`rotation::providers`):
//! the same logins, time limits and error mapping (no server message text is
//! passed through; it may quote a statement).
//!
//! - PostgreSQL: `CREATE ROLE "u" LOGIN PASSWORD '<SCRAM verifier>' VALID
//!   UNTIL '<max expiry>' IN ROLE ...` (the plaintext never reaches the
//!   server; `VALID UNTIL` makes PostgreSQL itself refuse the password after
//!   the lease's latest end, even if keyward is gone). Drop: `NOLOGIN`, end
//!   its sessions, `REASSIGN OWNED` to the admin user, `DROP OWNED`, `DROP
//!   ROLE` (objects in databases other than the admin login's are not
//!   reached by `REASSIGN OWNED`; a user that owns some there cannot be
//!   dropped and the revocation keeps failing, visibly).
//! - MariaDB: `CREATE USER 'u'@'%' IDENTIFIED BY '...'`, `GRANT role`, `SET
//!   DEFAULT ROLE`. Drop: `ACCOUNT LOCK`, `KILL CONNECTION` of each of its
//!   sessions, `DROP USER IF EXISTS`.
//! - Redis: `ACL SETUSER u reset on #<sha256> <allowlisted rules>`. Drop:
//!   `off`, `CLIENT KILL USER`, `ACL DELUSER`.

use mysql_async::prelude::Queryable;
use zeroize::Zeroizing;

use super::{DynamicError, Kind};
use crate::rotation::provider::ProviderError;
use crate::rotation::providers::mysql::{self, quote_string};
use crate::rotation::providers::postgres::{self, quote_ident, quote_literal};
use crate::rotation::providers::redis;
use crate::rotation::providers::target::{Call, Login, COMMAND_TIMEOUT};
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

/// Makes `user` with `password`, granted `roles` (PostgreSQL, MariaDB) or
/// the ACL `rules` (Redis). A failure leaves at most a user that
/// [`drop_user`] removes.
pub async fn create(
    kind: Kind,
    admin: &Login,
    user: &str,
    password: &SecretBytes,
    roles: &[String],
    rules: &[String],
    valid_until_ms: u64,
) -> Result<(), DynamicError> {
    match kind {
        Kind::Postgres => pg_create(admin, user, password, roles, valid_until_ms).await,
        Kind::Mysql => my_create(admin, user, password, roles).await,
        Kind::Redis => redis_create(admin, user, password, rules).await,
    }
}

async fn pg_create(
    admin: &Login,
    user: &str,
    password: &SecretBytes,
    roles: &[String],
    valid_until_ms: u64,
) -> Result<(), DynamicError> {
    let client = postgres::connect(admin).await?;
    pg_missing_roles(&client, admin, roles).await?;
    let verifier = postgres::scram_verifier(password).await;
    let until =
        chrono::DateTime::from_timestamp_millis(i64::try_from(valid_until_ms).unwrap_or(i64::MAX))
            .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string())
            .unwrap_or_else(|| "infinity".to_owned());
    let mut statement = Zeroizing::new(format!(
        "CREATE ROLE {} LOGIN PASSWORD {} VALID UNTIL {}",
        quote_ident(user),
        quote_literal(&verifier),
        quote_literal(&until)
    ));
    if !roles.is_empty() {
        let list: Vec<String> = roles.iter().map(|r| quote_ident(r)).collect();
        statement.push_str(" IN ROLE ");
        statement.push_str(&list.join(", "));
    }
    let call = Call::new("PostgreSQL", admin, format!("create role `{user}`"));
    call.within(COMMAND_TIMEOUT, async {
        client
            .batch_execute(&statement)
            .await
            .map_err(|e| postgres::map_error(&e, &call))
    })
    .await?;
    Ok(())
}

async fn my_create(
    admin: &Login,
    user: &str,
    password: &SecretBytes,
    roles: &[String],
) -> Result<(), DynamicError> {
    let mut conn = mysql::connect(admin).await?;
    my_missing_roles(&mut conn, admin, roles).await?;
    let (Some(user_lit), Some(pass_lit)) = (
        quote_string(user),
        quote_string(password.expose_str().unwrap_or_default()).map(Zeroizing::new),
    ) else {
        return Err(
            ProviderError::Internal("a generated name or password is not quotable".into()).into(),
        );
    };
    let mut statements = vec![Zeroizing::new(format!(
        "CREATE USER {user_lit}@'%' IDENTIFIED BY {}",
        pass_lit.as_str()
    ))];
    for role in roles {
        let role_lit = quote_string(role).unwrap_or_default();
        statements.push(Zeroizing::new(format!(
            "GRANT {role_lit} TO {user_lit}@'%'"
        )));
        statements.push(Zeroizing::new(format!(
            "SET DEFAULT ROLE {role_lit} FOR {user_lit}@'%'"
        )));
    }
    let call = Call::new("MariaDB", admin, format!("create user `{user}`"));
    let result = call
        .within(COMMAND_TIMEOUT, async {
            for s in &statements {
                conn.query_drop(s.as_str())
                    .await
                    .map_err(|e| mysql::map_error(&e, &call))?;
            }
            Ok(())
        })
        .await;
    let _ = conn.disconnect().await;
    Ok(result?)
}

async fn redis_create(
    admin: &Login,
    user: &str,
    password: &SecretBytes,
    rules: &[String],
) -> Result<(), DynamicError> {
    let mut conn = redis::connect(admin).await?;
    let digest = ring::digest::digest(&ring::digest::SHA256, password.expose());
    let hash = Zeroizing::new(format!("#{}", hex::encode(digest.as_ref())));
    let mut cmd = ::redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(user)
        .arg("reset")
        .arg("on")
        .arg(hash.as_str());
    for rule in rules {
        cmd.arg(rule.as_str());
    }
    let call = Call::new("Redis", admin, format!("create ACL user `{user}`"));
    let _: ::redis::Value = redis::command(&mut conn, &cmd, &call).await?;
    Ok(())
}

/// Removes `user` and ends its sessions; a user that does not exist is
/// success.
pub async fn drop_user(kind: Kind, admin: &Login, user: &str) -> Result<(), ProviderError> {
    match kind {
        Kind::Postgres => pg_drop(admin, user).await,
        Kind::Mysql => my_drop(admin, user).await,
        Kind::Redis => redis_drop(admin, user).await,
    }
}

async fn pg_drop(admin: &Login, user: &str) -> Result<(), ProviderError> {
    let client = postgres::connect(admin).await?;
    let call = Call::new("PostgreSQL", admin, format!("drop role `{user}`"));
    call.within(COMMAND_TIMEOUT, async {
        let map = |e: tokio_postgres::Error| postgres::map_error(&e, &call);
        let exists = client
            .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
            .await
            .map_err(map)?;
        if exists.is_empty() {
            return Ok(());
        }
        let role = quote_ident(user);
        client
            .batch_execute(&format!("ALTER ROLE {role} NOLOGIN"))
            .await
            .map_err(map)?;
        client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&user],
            )
            .await
            .map_err(map)?;
        client
            .batch_execute(&format!(
                "REASSIGN OWNED BY {role} TO {}; DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}",
                quote_ident(&admin.username)
            ))
            .await
            .map_err(map)
    })
    .await
}

async fn my_drop(admin: &Login, user: &str) -> Result<(), ProviderError> {
    let mut conn = mysql::connect(admin).await?;
    let call = Call::new("MariaDB", admin, format!("drop user `{user}`"));
    let Some(user_lit) = quote_string(user) else {
        return Err(call.failed("the user name is not quotable"));
    };
    let result = call
        .within(COMMAND_TIMEOUT, async {
            let map = |e: mysql_async::Error| mysql::map_error(&e, &call);
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
        .await;
    let _ = conn.disconnect().await;
    result
}

async fn redis_drop(admin: &Login, user: &str) -> Result<(), ProviderError> {
    let mut conn = redis::connect(admin).await?;
    let call = Call::new("Redis", admin, format!("delete ACL user `{user}`"));
    let found: ::redis::Value = redis::command(
        &mut conn,
        ::redis::cmd("ACL").arg("GETUSER").arg(user),
        &call,
    )
    .await?;
    if found == ::redis::Value::Nil {
        return Ok(());
    }
    let _: ::redis::Value = redis::command(
        &mut conn,
        ::redis::cmd("ACL").arg("SETUSER").arg(user).arg("off"),
        &call,
    )
    .await?;
    let _: ::redis::Value = redis::command(
        &mut conn,
        ::redis::cmd("CLIENT").arg("KILL").arg("USER").arg(user),
        &call,
    )
    .await?;
    let _: ::redis::Value = redis::command(
        &mut conn,
        ::redis::cmd("ACL").arg("DELUSER").arg(user),
        &call,
    )
    .await?;
    Ok(())
}
