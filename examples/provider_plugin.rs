//! An external rotation provider: the API keys of a toy service.
//!
//! The toy service accepts an API key when the SHA-256 of the key is listed
//! in its key file, a JSON document `{"keys": ["<hex sha256>", ...]}`; it
//! never stores a key itself. This plugin rotates such keys with the four
//! steps of `proto/keyward/provider/v1/provider.proto`:
//!
//! - Generate: a new `api_key` (`prefix` + 40 alphanumeric characters); the
//!   other fields of the current value are kept.
//! - Apply: lists the new key's hash in the file (idempotent).
//! - Verify: asks the "service" whether it accepts the key.
//! - Retire: unlists the previous key's hash (idempotent), unless it is also
//!   the current key.
//!
//! Until Retire both keys work, as with the alternating strategy of the
//! built-in database providers.
//!
//! Settings (`--config`): `keys_file=PATH` (required), `prefix=ak_`.
//!
//! ```text
//! cargo run --example provider_plugin -- --socket /run/keyward/apikeys.sock
//! keyward provider register apikeys --endpoint unix:/run/keyward/apikeys.sock
//! keyward rotation set app/api --provider apikeys --every 30d --grace 1d \
//!     --config keys_file=/srv/toy/keys.json
//! ```
//!
//! The plugin acts for whoever can connect to its socket (it writes the file
//! a request names), so the socket is made readable and writable by its
//! owner only. It stops on SIGTERM or Ctrl-C and removes the socket.

use std::collections::HashMap;
use std::error::Error;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use keyward::proto::provider_v1::provider_server::{Provider, ProviderServer};
use keyward::proto::provider_v1::{
    ApplyRequest, ApplyResponse, DescribeRequest, DescribeResponse, GenerateRequest,
    GenerateResponse, RetireRequest, RetireResponse, Secret, SettingKey, VerifyRequest,
    VerifyResponse,
};
use keyward::rotation::providers::random::random_string;
use keyward::rotation::providers::Charset;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

const KEY_LENGTH: usize = 40;

/// The key file of the toy service.
#[derive(Default, Serialize, Deserialize)]
struct KeyFile {
    keys: Vec<String>,
}

/// The settings of one request.
struct Settings {
    keys_file: PathBuf,
    prefix: String,
}

impl Settings {
    fn parse(settings: &HashMap<String, String>) -> Result<Self, Status> {
        if let Some(key) = settings
            .keys()
            .find(|k| !matches!(k.as_str(), "keys_file" | "prefix"))
        {
            return Err(Status::invalid_argument(format!("unknown key `{key}`")));
        }
        let keys_file = settings
            .get("keys_file")
            .filter(|p| Path::new(p).is_absolute())
            .ok_or_else(|| Status::invalid_argument("`keys_file` must be an absolute path"))?;
        let prefix = settings
            .get("prefix")
            .cloned()
            .unwrap_or_else(|| "ak_".into());
        if prefix.len() > 16
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(Status::invalid_argument(
                "`prefix` is at most 16 characters of [A-Za-z0-9_]",
            ));
        }
        Ok(Self {
            keys_file: PathBuf::from(keys_file),
            prefix,
        })
    }
}

/// The `api_key` field of a secret, or FAILED_PRECONDITION.
fn api_key<'a>(secret: Option<&'a Secret>, what: &str) -> Result<&'a [u8], Status> {
    secret
        .and_then(|s| s.fields.get("api_key"))
        .map(Vec::as_slice)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Status::failed_precondition(format!("the {what} value has no `api_key`")))
}

fn key_hash(key: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, key))
}

/// The API keys provider. The mutex serialises read-modify-write of the key
/// files within this process.
#[derive(Default)]
struct ApiKeys {
    files: Mutex<()>,
}

impl ApiKeys {
    /// Runs `change` on the key file and writes it back (atomically, by
    /// rename) if it returns true.
    fn update(&self, path: &Path, change: impl FnOnce(&mut KeyFile) -> bool) -> Result<(), Status> {
        let _guard = self
            .files
            .lock()
            .map_err(|_| Status::internal("the key file lock is poisoned"))?;
        let mut file = read(path)?;
        if change(&mut file) {
            let text = serde_json::to_vec_pretty(&file)
                .map_err(|_| Status::internal("cannot encode the key file"))?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| {
                    Status::unavailable(format!("cannot write the key file: {}", e.kind()))
                })?;
        }
        Ok(())
    }

    fn accepts(&self, path: &Path, key: &[u8]) -> Result<bool, Status> {
        let _guard = self
            .files
            .lock()
            .map_err(|_| Status::internal("the key file lock is poisoned"))?;
        Ok(read(path)?.keys.contains(&key_hash(key)))
    }
}

/// The key file, or an empty one if there is none yet.
fn read(path: &Path) -> Result<KeyFile, Status> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|_| Status::failed_precondition("the key file is not a valid key file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyFile::default()),
        Err(e) => Err(Status::unavailable(format!(
            "cannot read the key file: {}",
            e.kind()
        ))),
    }
}

#[tonic::async_trait]
impl Provider for ApiKeys {
    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let setting = |key: &str, required: bool, description: &str| SettingKey {
            key: key.into(),
            required,
            description: description.into(),
        };
        Ok(Response::new(DescribeResponse {
            name: "apikeys".into(),
            description: "API keys of a service that lists their SHA-256 in a JSON file".into(),
            settings: vec![
                setting("keys_file", true, "absolute path of the service's key file"),
                setting("prefix", false, "prefix of generated keys (default ak_)"),
            ],
            admin_secret_key: String::new(),
        }))
    }

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let request = request.into_inner();
        let settings = Settings::parse(&request.settings)?;
        let random = random_string(KEY_LENGTH, Charset::Alnum)
            .map_err(|_| Status::internal("no randomness"))?;
        let mut key = settings.prefix.into_bytes();
        key.extend_from_slice(random.expose());
        let mut value = request.current.unwrap_or_default();
        value.fields.insert("api_key".into(), key);
        Ok(Response::new(GenerateResponse { value: Some(value) }))
    }

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let request = request.into_inner();
        let settings = Settings::parse(&request.settings)?;
        let hash = key_hash(api_key(request.pending.as_ref(), "pending")?);
        self.update(&settings.keys_file, |file| {
            let missing = !file.keys.contains(&hash);
            if missing {
                file.keys.push(hash);
            }
            missing
        })?;
        Ok(Response::new(ApplyResponse {}))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let request = request.into_inner();
        let settings = Settings::parse(&request.settings)?;
        let key = api_key(request.pending.as_ref(), "pending")?;
        if self.accepts(&settings.keys_file, key)? {
            Ok(Response::new(VerifyResponse {}))
        } else {
            Err(Status::permission_denied(
                "the service does not accept the pending key",
            ))
        }
    }

    async fn retire(
        &self,
        request: Request<RetireRequest>,
    ) -> Result<Response<RetireResponse>, Status> {
        let request = request.into_inner();
        let settings = Settings::parse(&request.settings)?;
        let previous = api_key(request.previous.as_ref(), "previous")?;
        if api_key(request.current.as_ref(), "current").ok() == Some(previous) {
            // Never unlist the key that is current.
            return Ok(Response::new(RetireResponse {}));
        }
        let hash = key_hash(previous);
        self.update(&settings.keys_file, |file| {
            let before = file.keys.len();
            file.keys.retain(|k| *k != hash);
            file.keys.len() != before
        })?;
        Ok(Response::new(RetireResponse {}))
    }
}

fn socket_path() -> Result<PathBuf, Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next(), args.next()) {
        (Some("--socket"), Some(path), None) => Ok(PathBuf::from(path)),
        _ => Err("usage: provider_plugin --socket PATH".into()),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let socket = socket_path()?;
    // A socket left by a previous run that was killed.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    eprintln!(
        "provider_plugin: serving keyward.provider.v1.Provider on unix:{}",
        socket.display()
    );
    let served = tonic::transport::Server::builder()
        .add_service(ProviderServer::new(ApiKeys::default()))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown())
        .await;
    let _ = std::fs::remove_file(&socket);
    served?;
    Ok(())
}
