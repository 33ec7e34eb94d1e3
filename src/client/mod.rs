//! The public client: what the CLI, the examples and applications use to talk
//! to a keyward server over TLS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyward::client::ClientError> {
//! use keyward::client::{Client, ClientOptions};
//! let client = Client::connect(ClientOptions::from_env()).await?;
//! let secret = client.get("app/db").await?;
//! let password = secret.data.get("password");
//! # Ok(()) }
//! ```
//!
//! Secret values come back as `SecretData` (zeroized on drop, `Debug` hides
//! them); the token is kept in a metadata value marked sensitive.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};

// Calls of the identity, token and policy services (issue 3) go in
// `client/identity.rs`, rotation calls (issue 4) in `client/rotation.rs`,
// each as its own `impl Client` block.
mod auth;
mod dynamic;
mod leases;
pub use dynamic::DynamicRoleSpec;
mod federation;
mod identities;
mod lifecycle;
mod login;
mod pki;
mod policies;

pub use auth::IssueOptions;
pub use federation::ExchangeOptions;

// -- rotation (issue 4) --
mod rotation;
mod watch;
// -- operations (issue 16) --
pub mod snapshot;
pub use rotation::{RotationPolicySpec, ScheduleSpec, WatchStream};
// -- discovery scan (issue 13) --
mod scan;
pub use watch::FreshSecret;
// -- anomaly detection (issue 13) --
mod anomalies;
pub use anomalies::AnomalyStream;
// -- dynamic credentials kept fresh (issue 12) --
mod fresh_creds;
pub use fresh_creds::{DynamicCredential, FreshCredential, RefreshOptions};

use crate::proto::v1::secrets_client::SecretsClient;
use crate::proto::v1::sys_client::SysClient;
use crate::proto::v1::*;
use crate::secrecy::{SecretBytes, SecretData};

pub const DEFAULT_ADDR: &str = "https://127.0.0.1:8270";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid client setting {0}: {1}")]
    Config(&'static str, String),
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    /// The server answered with an error status.
    #[error("{}: {}", crate::proto::code_name(.0.code()), .0.message())]
    Status(tonic::Status),
}

// Not `#[from]`: that would make the status the error's source, and error
// chains would print its message twice.
impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

impl ClientError {
    /// The gRPC code if the server refused, `None` for local errors.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// How to reach a server; each field has a flag and an environment variable.
#[derive(Clone, Default)]
pub struct ClientOptions {
    pub addr: String,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub connect_timeout: Option<Duration>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish()
    }
}

impl ClientOptions {
    /// Reads `KEYWARD_ADDR`, `KEYWARD_TOKEN`, `KEYWARD_CACERT`,
    /// `KEYWARD_CLIENT_CERT` and `KEYWARD_CLIENT_KEY`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            addr: var("KEYWARD_ADDR").unwrap_or_else(|| DEFAULT_ADDR.to_owned()),
            token: var("KEYWARD_TOKEN"),
            ca_cert: var("KEYWARD_CACERT").map(PathBuf::from),
            client_cert: var("KEYWARD_CLIENT_CERT").map(PathBuf::from),
            client_key: var("KEYWARD_CLIENT_KEY").map(PathBuf::from),
            connect_timeout: None,
        }
    }
}

/// A secret version as the client returns it.
#[derive(Debug)]
pub struct Secret {
    pub path: String,
    pub version: u64,
    pub stage: String,
    pub data: SecretData,
    pub created_at: Option<prost_types::Timestamp>,
}

impl Secret {
    /// One field as UTF-8 text, if present and valid.
    pub fn field_str(&self, name: &str) -> Option<&str> {
        self.data.get(name).and_then(|v| v.expose_str())
    }
}

/// Options of a write.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub cas: Option<u64>,
    pub max_versions: Option<u32>,
    pub owner: Option<String>,
}

#[derive(Clone)]
pub struct Client {
    channel: Channel,
    token: Option<MetadataValue<Ascii>>,
}

impl Client {
    pub async fn connect(options: ClientOptions) -> Result<Self, ClientError> {
        let addr = if options.addr.is_empty() {
            DEFAULT_ADDR.to_owned()
        } else {
            options.addr.clone()
        };
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|_| ClientError::Config("addr", "not a valid URI".into()))?
            .connect_timeout(options.connect_timeout.unwrap_or(Duration::from_secs(10)))
            .tcp_nodelay(true);
        if addr.starts_with("https://") {
            let ca_path = options.ca_cert.as_ref().ok_or_else(|| {
                ClientError::Config("ca_cert", "https needs --ca-cert or KEYWARD_CACERT".into())
            })?;
            let read = |name: &'static str, p: &PathBuf| {
                std::fs::read(p)
                    .map_err(|e| ClientError::Config(name, format!("{}: {e}", p.display())))
            };
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("ca_cert", ca_path)?));
            match (&options.client_cert, &options.client_key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(
                        read("client_cert", cert)?,
                        read("client_key", key)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(ClientError::Config(
                        "client_cert",
                        "give both a client certificate and its key".into(),
                    ))
                }
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ClientError::Config("tls", e.to_string()))?;
        } else if !addr.starts_with("http://") {
            return Err(ClientError::Config(
                "addr",
                "must start with https:// (or http:// for a plaintext server)".into(),
            ));
        }
        let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
            addr: addr.clone(),
            detail: error_chain(&e),
        })?;
        let mut client = Self {
            channel,
            token: None,
        };
        if let Some(token) = &options.token {
            client.set_token(token)?;
        }
        Ok(client)
    }

    /// Uses `token` for the calls that follow.
    pub fn set_token(&mut self, token: &str) -> Result<(), ClientError> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            ClientError::Config(
                "token",
                "contains characters not allowed in a header".into(),
            )
        })?;
        value.set_sensitive(true);
        self.token = Some(value);
        Ok(())
    }

    /// A copy of this client that uses another token on the same connection.
    pub fn with_token(&self, token: &str) -> Result<Self, ClientError> {
        let mut c = self.clone();
        c.set_token(token)?;
        Ok(c)
    }

    /// A copy with no token.
    pub fn without_token(&self) -> Self {
        Self {
            channel: self.channel.clone(),
            token: None,
        }
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        if let Some(token) = &self.token {
            req.metadata_mut().insert("authorization", token.clone());
        }
        req
    }

    fn sys(&self) -> SysClient<Channel> {
        SysClient::new(self.channel.clone())
    }

    fn secrets(&self) -> SecretsClient<Channel> {
        SecretsClient::new(self.channel.clone())
    }

    // --- Sys ---

    pub async fn init(&self, shares: u32, threshold: u32) -> Result<InitResponse, ClientError> {
        Ok(self
            .sys()
            .init(self.request(InitRequest { shares, threshold }))
            .await?
            .into_inner())
    }

    pub async fn unseal(&self, share: &str) -> Result<UnsealResponse, ClientError> {
        let req = self.request(UnsealRequest {
            share: share.to_owned(),
            reset: false,
        });
        Ok(self.sys().unseal(req).await?.into_inner())
    }

    pub async fn unseal_reset(&self) -> Result<UnsealResponse, ClientError> {
        let req = self.request(UnsealRequest {
            share: String::new(),
            reset: true,
        });
        Ok(self.sys().unseal(req).await?.into_inner())
    }

    pub async fn seal(&self) -> Result<(), ClientError> {
        self.sys().seal(self.request(SealRequest {})).await?;
        Ok(())
    }

    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        Ok(self
            .sys()
            .status(self.request(StatusRequest {}))
            .await?
            .into_inner())
    }

    pub async fn rotate_key(&self) -> Result<u32, ClientError> {
        Ok(self
            .sys()
            .rotate_key(self.request(RotateKeyRequest {}))
            .await?
            .into_inner()
            .term)
    }

    pub async fn audit_hash(&self, value: &str) -> Result<String, ClientError> {
        let req = self.request(AuditHashRequest {
            value: value.to_owned(),
        });
        Ok(self.sys().audit_hash(req).await?.into_inner().hash)
    }

    /// `grpc.health.v1.Health/Check` of the whole server: true when serving.
    pub async fn health(&self) -> Result<bool, ClientError> {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let mut client = HealthClient::new(self.channel.clone());
        let resp = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        Ok(resp.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }

    // --- Secrets ---

    pub async fn put(
        &self,
        path: &str,
        data: &SecretData,
        options: PutOptions,
    ) -> Result<u64, ClientError> {
        let req = self.request(PutSecretRequest {
            path: path.to_owned(),
            data: data
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_vec()))
                .collect(),
            cas: options.cas,
            max_versions: options.max_versions,
            owner: options.owner,
        });
        Ok(self.secrets().put(req).await?.into_inner().version)
    }

    /// The `current` version.
    pub async fn get(&self, path: &str) -> Result<Secret, ClientError> {
        self.get_with(path, None, None).await
    }

    /// A version by number, or by stage (`current`, `previous`, `pending`).
    pub async fn get_with(
        &self,
        path: &str,
        version: Option<u64>,
        stage: Option<&str>,
    ) -> Result<Secret, ClientError> {
        let req = self.request(GetSecretRequest {
            path: path.to_owned(),
            version,
            stage: stage.map(str::to_owned),
        });
        let r = self.secrets().get(req).await?.into_inner();
        Ok(Secret {
            path: r.path,
            version: r.version,
            stage: r.stage,
            created_at: r.created_at,
            data: r
                .data
                .into_iter()
                .map(|(k, v)| (k, SecretBytes::new(v)))
                .collect(),
        })
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, ClientError> {
        let req = self.request(ListSecretsRequest {
            prefix: prefix.to_owned(),
        });
        Ok(self.secrets().list(req).await?.into_inner().paths)
    }

    pub async fn metadata(&self, path: &str) -> Result<SecretMetadata, ClientError> {
        let req = self.request(SecretMetadataRequest {
            path: path.to_owned(),
        });
        Ok(self.secrets().metadata(req).await?.into_inner())
    }

    pub async fn delete(&self, path: &str, version: Option<u64>) -> Result<(), ClientError> {
        self.secrets()
            .delete(self.request(DeleteSecretRequest {
                path: path.to_owned(),
                version,
            }))
            .await?;
        Ok(())
    }

    pub async fn undelete(&self, path: &str, version: u64) -> Result<(), ClientError> {
        self.secrets()
            .undelete(self.request(UndeleteSecretRequest {
                path: path.to_owned(),
                version,
            }))
            .await?;
        Ok(())
    }

    pub async fn destroy(&self, path: &str, version: u64) -> Result<(), ClientError> {
        self.secrets()
            .destroy(self.request(DestroySecretRequest {
                path: path.to_owned(),
                version,
            }))
            .await?;
        Ok(())
    }
}

/// The error and its sources on one line (transport errors nest).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
