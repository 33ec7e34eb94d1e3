//! `postgres`: rotates a PostgreSQL role's password (tokio-postgres, no TLS).
//!
//! The password is sent as a SCRAM-SHA-256 verifier computed here
//! (`ALTER ROLE "name" PASSWORD 'SCRAM-SHA-256$4096:...'`), so the plaintext
//! never appears in a statement, a server log (`log_statement`) or
//! `pg_stat_activity`. Roles must therefore log in with `scram-sha-256`
//! (PostgreSQL's default since 14), not `md5`.
//!
//! The admin needs `CREATEROLE` (or superuser). Logins go to the admin
//! secret's `database`, or `postgres` when it has none.

use tokio_postgres::NoTls;
use zeroize::Zeroizing;

use crate::rotation::provider::ProviderError;
use crate::secrecy::SecretBytes;

use super::target::{io_kind, Call, Login, Target, COMMAND_TIMEOUT, CONNECT_TIMEOUT};

const SERVER: &str = "PostgreSQL";

/// PostgreSQL as a rotation [`Target`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Postgres;

impl Target for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn default_port(&self) -> u16 {
        5432
    }

    async fn set_password(
        &self,
        admin: &Login,
        user: &str,
        password: &SecretBytes,
    ) -> Result<(), ProviderError> {
        let client = connect(admin).await?;
        let verifier = scram_verifier(password).await;
        let statement = Zeroizing::new(format!(
            "ALTER ROLE {} PASSWORD {}",
            quote_ident(user),
            quote_literal(&verifier)
        ));
        let call = Call::new(
            SERVER,
            admin,
            format!("change the password of role `{user}`"),
        );
        call.within(COMMAND_TIMEOUT, async {
            client
                .batch_execute(&statement)
                .await
                .map_err(|e| map_error(&e, &call))
        })
        .await
    }

    async fn check_login(&self, login: &Login) -> Result<(), ProviderError> {
        let client = connect(login).await?;
        let call = Call::new(
            SERVER,
            login,
            format!("run a query as role `{}`", login.username),
        );
        call.within(COMMAND_TIMEOUT, async {
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| map_error(&e, &call))
        })
        .await
    }
}

pub(crate) async fn connect(login: &Login) -> Result<tokio_postgres::Client, ProviderError> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&login.host)
        .port(login.port)
        .user(&login.username)
        .password(login.password.expose())
        .dbname(login.database.as_deref().unwrap_or("postgres"))
        .application_name("keyward")
        .connect_timeout(CONNECT_TIMEOUT);
    let call = Call::new(SERVER, login, format!("log in as `{}`", login.username));
    let (client, connection) = call
        .within(CONNECT_TIMEOUT, async {
            config
                .connect(NoTls)
                .await
                .map_err(|e| map_error(&e, &call))
        })
        .await?;
    // The connection task ends when `client` is dropped; its error, if any,
    // reaches the client's next call.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Maps a driver error to a message built from non-secret parts only: the
/// SQLSTATE code (and its meaning for the usual ones) or the I/O error kind.
/// The server's message text is not used: it may quote the statement.
pub(crate) fn map_error(error: &tokio_postgres::Error, call: &Call) -> ProviderError {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        let meaning = match code {
            "28P01" => " (password authentication failed)",
            "28000" => " (invalid authorization: no pg_hba.conf entry, or the role cannot log in)",
            "42501" => " (insufficient privilege)",
            "42704" => " (the role does not exist)",
            "3D000" => " (the database does not exist)",
            "53300" => " (too many connections)",
            "57P03" => " (the server is starting or shutting down)",
            _ => "",
        };
        let detail = format!("SQLSTATE {code}{meaning}");
        // 08: connection exception, 53: insufficient resources, 57: operator
        // intervention (shutdown, cancel): the same call may work later.
        return if ["08", "53", "57"]
            .iter()
            .any(|class| code.starts_with(class))
        {
            call.unreachable(detail)
        } else {
            call.refused(detail)
        };
    }
    if let Some(kind) = io_kind(error) {
        return call.unreachable(kind);
    }
    if error.is_closed() {
        return call.unreachable("the server closed the connection");
    }
    // tokio-postgres's Display is one fixed phrase per kind ("authentication
    // error", "timeout waiting for server"); the cause is not printed.
    call.refused(error)
}

/// `name` as a quoted identifier: `"..."` with `"` doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a string literal that means the same under any
/// `standard_conforming_strings`: `'...'` with `'` doubled, or `E'...'` with
/// `\` doubled too when there is a backslash (as PostgreSQL's `quote_literal`).
pub fn quote_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// PostgreSQL's SCRAM-SHA-256 verifier of `password`: 4096 PBKDF2 rounds
/// (milliseconds of CPU), so it runs on the blocking pool rather than on an
/// async worker, where it would stall every other request on that worker.
pub(crate) async fn scram_verifier(password: &SecretBytes) -> Zeroizing<String> {
    let password = Zeroizing::new(password.expose().to_vec());
    let made = tokio::task::spawn_blocking(move || {
        Zeroizing::new(postgres_protocol::password::scram_sha_256(&password))
    })
    .await;
    match made {
        Ok(verifier) => verifier,
        // Only a panic in the hash itself (or a runtime shutting down) gets here.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("abc"), "'abc'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
    }
}
