//! `redis`: rotates a Redis ACL user's password (redis crate, RESP2, no TLS).
//!
//! apply runs `ACL SETUSER name resetpass #<sha256> on`: the old passwords go,
//! the new one is sent as its SHA-256 (the form Redis stores), so the
//! plaintext never appears in a command, `MONITOR` or the slow log. Because
//! `ACL SETUSER` creates a user that does not exist, the user is looked up
//! first and a missing one is refused. The admin needs `+acl`. An admin
//! secret with an empty password logs in without `AUTH` (the `default` user
//! with `nopass`).
//!
//! verify authenticates as the user and sends `PING`; a user without the
//! right to `PING` (`NOPERM`) has still proved its password.

use ::redis::aio::MultiplexedConnection;
use ::redis::{
    AsyncConnectionConfig, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisConnectionInfo,
    RedisError, ServerErrorKind, Value,
};
use zeroize::Zeroizing;

use crate::rotation::provider::ProviderError;
use crate::secrecy::SecretBytes;

use super::target::{Call, Login, Target, COMMAND_TIMEOUT, CONNECT_TIMEOUT};

const SERVER: &str = "Redis";

/// Redis (ACL users, Redis 6 or later) as a rotation [`Target`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Redis;

impl Target for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn default_port(&self) -> u16 {
        6379
    }

    async fn set_password(
        &self,
        admin: &Login,
        user: &str,
        password: &SecretBytes,
    ) -> Result<(), ProviderError> {
        let mut conn = connect(admin).await?;
        let lookup = Call::new(SERVER, admin, format!("look up ACL user `{user}`"));
        let change = Call::new(
            SERVER,
            admin,
            format!("change the password of ACL user `{user}`"),
        );
        let found: Value = command(
            &mut conn,
            ::redis::cmd("ACL").arg("GETUSER").arg(user),
            &lookup,
        )
        .await?;
        if found == Value::Nil {
            return Err(change.refused("no such user"));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, password.expose());
        let rule = Zeroizing::new(format!("#{}", hex::encode(digest.as_ref())));
        let _: Value = command(
            &mut conn,
            ::redis::cmd("ACL")
                .arg("SETUSER")
                .arg(user)
                .arg("resetpass")
                .arg(rule.as_str())
                .arg("on"),
            &change,
        )
        .await?;
        Ok(())
    }

    async fn check_login(&self, login: &Login) -> Result<(), ProviderError> {
        let mut conn = connect(login).await?;
        let call = Call::new(
            SERVER,
            login,
            format!("PING as ACL user `{}`", login.username),
        );
        let ping = call
            .within(COMMAND_TIMEOUT, async {
                Ok(::redis::cmd("PING").query_async::<Value>(&mut conn).await)
            })
            .await?;
        match ping {
            Ok(_) => Ok(()),
            // Authenticated, but not allowed to PING: the password works.
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) => Ok(()),
            Err(e) => Err(map_error(&e, &call)),
        }
    }
}

pub(crate) async fn connect(login: &Login) -> Result<MultiplexedConnection, ProviderError> {
    let call = Call::new(SERVER, login, format!("log in as `{}`", login.username));
    let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
    let password = login.password_str();
    if !password.is_empty() {
        settings = settings
            .set_username(&login.username)
            .set_password(password);
    }
    let info = ConnectionAddr::Tcp(login.host.clone(), login.port)
        .into_connection_info()
        .map_err(|e| map_error(&e, &call))?
        .set_redis_settings(settings);
    let client = ::redis::Client::open(info).map_err(|e| map_error(&e, &call))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    call.within(CONNECT_TIMEOUT, async {
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| map_error(&e, &call))
    })
    .await
}

pub(crate) async fn command<T: ::redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    cmd: &::redis::Cmd,
    call: &Call,
) -> Result<T, ProviderError> {
    call.within(COMMAND_TIMEOUT, async {
        cmd.query_async(conn).await.map_err(|e| map_error(&e, call))
    })
    .await
}

/// Maps a client error to a message built from non-secret parts only: the
/// error kind and the server's error code (`WRONGPASS`, `NOPERM`). The
/// server's detail is not used: it may quote the command's arguments.
pub(crate) fn map_error(error: &RedisError, call: &Call) -> ProviderError {
    if error.is_connection_refusal() {
        return call.unreachable("connection refused");
    }
    if error.is_timeout() {
        return call.unreachable("timed out");
    }
    if error.is_io_error() || error.is_connection_dropped() {
        return call.unreachable("connection failed");
    }
    match error.kind() {
        ErrorKind::AuthenticationFailed => call.refused("authentication failed"),
        ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain) => {
            call.unreachable("the server is busy")
        }
        ErrorKind::InvalidClientConfig => call.failed("invalid connection options"),
        _ => {
            // The first word of an error reply: ERR, NOPERM, WRONGPASS, ...
            let code = error
                .code()
                .filter(|c| c.bytes().all(|b| b.is_ascii_uppercase()))
                .unwrap_or("error");
            call.refused(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_detail_is_not_passed_through() {
        let login = Login {
            host: "127.0.0.1".into(),
            port: 6379,
            database: None,
            username: "admin".into(),
            password: SecretBytes::from("Adm1nPassw0rd"),
        };
        let call = Call::new(SERVER, &login, "change a password");
        let error = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "An error was signalled by the server",
            "Error in ACL SETUSER modifier '>Sup3rS3cretPassw0rd'".to_owned(),
        ));
        let mapped = map_error(&error, &call);
        let shown = format!("{mapped} {mapped:?}");
        assert!(matches!(mapped, ProviderError::Refused(_)), "{shown}");
        assert!(!shown.contains("Sup3rS3cret"), "{shown}");
        assert!(!shown.contains("Adm1nPassw0rd"), "{shown}");
    }
}
