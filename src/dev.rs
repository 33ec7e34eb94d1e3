//! `keyward dev`: a one-command server for a laptop or a test. Certificates,
//! storage, audit log and credentials all live in one folder; run again on
//! the same folder, it unseals with the saved share and keeps every secret.
//!
//! The credentials file holds the unseal share and the root token in clear
//! (mode 0600): that is what makes dev mode one command, and why it is not
//! for production.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::clock::Clock;
use crate::config::{OidcConfig, ServerConfig, TlsConfig};
use crate::pki;
use crate::server::Server;

pub const CREDENTIALS_FILE: &str = "dev-credentials.json";
/// The dev server's `oidc.jwks_dir`, in its data folder.
pub const JWKS_DIR: &str = "jwks";

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error("cannot use the data folder {0}: {1}")]
    Folder(PathBuf, std::io::Error),
    #[error(
        "the data folder {0} is open to other users (mode {1:04o}); it would hold the root \
         token and the unseal share: name a new folder (keyward makes it with mode 0700) \
         or chmod 700 this one"
    )]
    OpenFolder(PathBuf, u32),
    #[error("the credentials file {0} is unreadable or corrupt")]
    Credentials(PathBuf),
    #[error("the vault in {0} is initialized but {CREDENTIALS_FILE} is missing; use another --data folder")]
    MissingCredentials(PathBuf),
    #[error("initialising or unsealing the dev vault failed: {0}")]
    Core(#[from] crate::core::CoreError),
}

/// The contents of `dev-credentials.json`.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct DevCredentials {
    pub unseal_share: String,
    pub root_token: String,
}

impl std::fmt::Debug for DevCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCredentials { [redacted] }")
    }
}

/// A dev vault, opened and unsealed, ready to serve.
pub struct DevVault {
    pub server: Server,
    pub credentials: DevCredentials,
    pub certs: pki::CertPaths,
    pub data_dir: PathBuf,
}

/// Opens (or creates) the dev vault in `data_dir` and unseals it.
pub async fn open(
    data_dir: &Path,
    metrics_listen: Option<SocketAddr>,
) -> Result<DevVault, DevError> {
    open_with_clock(data_dir, metrics_listen, Clock::system()).await
}

/// [`open`] with the clock every part of the vault reads (tests pass one
/// they pause and advance).
pub async fn open_with_clock(
    data_dir: &Path,
    metrics_listen: Option<SocketAddr>,
    clock: Clock,
) -> Result<DevVault, DevError> {
    open_with(data_dir, metrics_listen, clock, |_| {}).await
}

/// [`open_with_clock`], with a last word on the configuration before the
/// server opens (tests set `oidc.allow_private_hosts` this way).
pub async fn open_with(
    data_dir: &Path,
    metrics_listen: Option<SocketAddr>,
    clock: Clock,
    adjust: impl FnOnce(&mut ServerConfig),
) -> Result<DevVault, DevError> {
    create_private_dir(data_dir)?;
    let certs = pki::ensure_dev_certs(&data_dir.join("certs"))?;
    let jwks_dir = data_dir.join(JWKS_DIR);
    create_private_dir(&jwks_dir)?;
    let mut config = ServerConfig {
        tls: Some(TlsConfig {
            cert: certs.server.clone(),
            key: certs.server_key.clone(),
            client_ca: Some(certs.ca.clone()),
        }),
        metrics_listen,
        // `keyward dev --http-listen` binds the HTTPS listener itself.
        http_listen: None,
        oidc: OidcConfig {
            // A dev server fetches JWKS only from servers its own CA signed
            // (a local test issuer); production names a bundle in the config.
            ca_file: Some(certs.ca.clone()),
            jwks_dir: Some(jwks_dir),
            allow_private_hosts: false,
        },
        ..ServerConfig::local(data_dir.join("data"), data_dir.join("audit.log"))
    };
    adjust(&mut config);
    let server = Server::open_with_clock(config, clock)?;
    let creds_path = data_dir.join(CREDENTIALS_FILE);
    let core = server.core().clone();
    if !core.status().initialized {
        let out = core.init(1, 1).await?;
        let creds = DevCredentials {
            unseal_share: out
                .shares
                .first()
                .map(|s| s.0.as_str().to_owned())
                .unwrap_or_default(),
            root_token: out.root_token.expose().to_owned(),
        };
        let mut json = serde_json::to_vec_pretty(&creds)
            .map_err(|_| DevError::Credentials(creds_path.clone()))?;
        let written = pki::write_file(&creds_path, &json, true);
        json.zeroize();
        written?;
    }
    let credentials = read_credentials(data_dir)?;
    core.unseal(&credentials.unseal_share).await?;
    Ok(DevVault {
        server,
        credentials,
        certs,
        data_dir: data_dir.to_owned(),
    })
}

/// Reads `dev-credentials.json` of a dev folder.
pub fn read_credentials(data_dir: &Path) -> Result<DevCredentials, DevError> {
    let path = data_dir.join(CREDENTIALS_FILE);
    let mut bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DevError::MissingCredentials(path))
        }
        Err(_) => return Err(DevError::Credentials(path)),
    };
    let parsed = serde_json::from_slice(&bytes).map_err(|_| DevError::Credentials(path));
    bytes.zeroize();
    parsed
}

/// Makes the data folder (and missing parents) with mode 0700, or checks
/// that an existing one is its owner's alone: it will hold the root token
/// and the unseal share. A folder keyward did not make keeps its mode
/// (`--data /tmp` is refused, not locked down).
fn create_private_dir(dir: &Path) -> Result<(), DevError> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(DevError::Folder(
            dir.to_owned(),
            std::io::Error::other("not a folder"),
        )),
        Ok(meta) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    return Err(DevError::OpenFolder(dir.to_owned(), mode));
                }
            }
            #[cfg(not(unix))]
            let _ = meta;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder
                .create(dir)
                .map_err(|e| DevError::Folder(dir.to_owned(), e))
        }
        Err(e) => Err(DevError::Folder(dir.to_owned(), e)),
    }
}
