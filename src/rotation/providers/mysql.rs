//! `mysql`: rotates a MariaDB (or MySQL) account's password with
//! `ALTER USER 'name'@'%' IDENTIFIED BY '...'` (mysql_async, no TLS).
//!
//! Accounts are `'name'@'%'`. The admin needs the `CREATE USER` privilege
//! (or `UPDATE` on the `mysql` schema). The connection stays on TCP
//! (`prefer_socket` off), so a login proves the account's network password,
//! not a local socket's peer credentials. Logins select no database: which
//! databases an account may use is a matter of grants, not of its password,
//! and `ALTER USER` needs none (the `database` field is still copied into
//! the rotated value for the application).
//!
//! Unlike PostgreSQL, the server receives the plaintext password in the
//! statement: a server with the general query log on writes it there.
//! MariaDB's client-side hash form (`IDENTIFIED BY PASSWORD '*...'`) would
//! avoid that but would also force the `mysql_native_password` plugin on the
//! account, so it is not used.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use zeroize::Zeroizing;

use crate::rotation::provider::ProviderError;
use crate::secrecy::SecretBytes;

use super::target::{io_kind, Call, Login, Target, COMMAND_TIMEOUT, CONNECT_TIMEOUT};

const SERVER: &str = "MariaDB";

/// MariaDB / MySQL as a rotation [`Target`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Mysql;

impl Target for Mysql {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn default_port(&self) -> u16 {
        3306
    }

    async fn set_password(
        &self,
        admin: &Login,
        user: &str,
        password: &SecretBytes,
    ) -> Result<(), ProviderError> {
        let password = password.expose_str().unwrap_or_default();
        let (Some(user_literal), Some(password_literal)) = (
            quote_string(user),
            quote_string(password).map(Zeroizing::new),
        ) else {
            return Err(ProviderError::InvalidSecret(
                "a MariaDB user name or password may not hold a backslash or a NUL".into(),
            ));
        };
        let statement = Zeroizing::new(format!(
            "ALTER USER {user_literal}@'%' IDENTIFIED BY {}",
            password_literal.as_str()
        ));
        let mut conn = connect(admin).await?;
        let call = Call::new(
            SERVER,
            admin,
            format!("change the password of account `{user}`@`%`"),
        );
        let result = call
            .within(COMMAND_TIMEOUT, async {
                conn.query_drop(statement.as_str())
                    .await
                    .map_err(|e| map_error(&e, &call))
            })
            .await;
        let _ = conn.disconnect().await;
        result
    }

    async fn check_login(&self, login: &Login) -> Result<(), ProviderError> {
        let mut conn = connect(login).await?;
        let call = Call::new(
            SERVER,
            login,
            format!("run a query as `{}`", login.username),
        );
        let result = call
            .within(COMMAND_TIMEOUT, async {
                conn.query_drop("SELECT 1")
                    .await
                    .map_err(|e| map_error(&e, &call))
            })
            .await;
        let _ = conn.disconnect().await;
        result
    }
}

pub(crate) async fn connect(login: &Login) -> Result<Conn, ProviderError> {
    let password = login.password_str();
    let opts = OptsBuilder::default()
        .ip_or_hostname(login.host.as_str())
        .tcp_port(login.port)
        .user(Some(login.username.as_str()))
        .pass((!password.is_empty()).then_some(password))
        .prefer_socket(false)
        .stmt_cache_size(0);
    let call = Call::new(SERVER, login, format!("log in as `{}`", login.username));
    call.within(CONNECT_TIMEOUT, async {
        Conn::new(opts).await.map_err(|e| map_error(&e, &call))
    })
    .await
}

/// Maps a driver error to a message built from non-secret parts only: the
/// server's error number and SQLSTATE, or the I/O error kind. The server's
/// message text is not used: a syntax error quotes the statement.
pub(crate) fn map_error(error: &mysql_async::Error, call: &Call) -> ProviderError {
    use mysql_async::{DriverError, Error};
    match error {
        Error::Server(server) => {
            let meaning = match server.code {
                1045 => " (access denied)",
                1044 | 1142 | 1227 => " (insufficient privilege)",
                1396 => " (the account does not exist)",
                1049 => " (the database does not exist)",
                1040 => " (too many connections)",
                _ => "",
            };
            let detail = format!("error {}, SQLSTATE {}{meaning}", server.code, server.state);
            // 1040 too many connections, 1053 server shutdown, 1205 lock wait
            // timeout: the same call may work later.
            if matches!(server.code, 1040 | 1053 | 1205) {
                call.unreachable(detail)
            } else {
                call.refused(detail)
            }
        }
        Error::Io(io) => match io_kind(io) {
            Some(kind) => call.unreachable(kind),
            None => call.unreachable("i/o error"),
        },
        Error::Driver(DriverError::ConnectionClosed) => {
            call.unreachable("the server closed the connection")
        }
        // Protocol and authentication-plugin errors: fixed text, no detail.
        Error::Driver(_) => call.refused("a protocol or authentication error"),
        Error::Url(_) | Error::Other(_) => call.failed("invalid connection options"),
    }
}

/// `text` as a string literal that means the same under any `sql_mode`:
/// `'...'` with `'` doubled; `None` if it holds a backslash (an escape unless
/// `NO_BACKSLASH_ESCAPES`) or a NUL.
pub fn quote_string(text: &str) -> Option<String> {
    if text.contains(['\\', '\0']) {
        return None;
    }
    Some(format!("'{}'", text.replace('\'', "''")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_message_is_not_passed_through() {
        let login = Login {
            host: "127.0.0.1".into(),
            port: 3306,
            database: None,
            username: "root".into(),
            password: SecretBytes::from("Adm1nPassw0rd"),
        };
        let call = Call::new(SERVER, &login, "change a password");
        let error = mysql_async::Error::Server(mysql_async::ServerError {
            code: 1064,
            state: "42000".into(),
            message: "You have an error in your SQL syntax near 'Sup3rS3cretPassw0rd'".into(),
        });
        let mapped = map_error(&error, &call);
        let shown = format!("{mapped} {mapped:?}");
        assert!(matches!(mapped, ProviderError::Refused(_)), "{shown}");
        assert!(shown.contains("error 1064"), "{shown}");
        assert!(!shown.contains("Sup3rS3cret"), "{shown}");
        assert!(!shown.contains("Adm1nPassw0rd"), "{shown}");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_string("app").as_deref(), Some("'app'"));
        assert_eq!(quote_string("it's").as_deref(), Some("'it''s'"));
        assert_eq!(quote_string("a\\b"), None);
    }
}
