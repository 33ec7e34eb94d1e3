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
//! It also makes dynamic credentials (`Create`/`Revoke`): accounts of the
//! same toy service, listed in a users file `{"users": [{"username",
//! "password_sha256", "lease_id", "max_expires_at_ms"}, ...]}`. Create makes
//! the name (`<role>_<12 hex digits>`) and a 32-character password and
//! lists the account under its lease id (again for the same lease: the
//! entry is replaced); Revoke unlists every account of the lease id (or of
//! the username), and an account already gone is success. Dynamic role
//! settings: `users_file=PATH` (required).
//!
//! ```text
//! keyward dynamic role put toy --provider apikeys \
//!     --config users_file=/srv/toy/users.json --ttl 1h --max-ttl 24h
//! keyward creds toy --format json
//! ```
//!
//! With `--old-protocol` it behaves as a plugin built before Create and
//! Revoke existed: Describe says nothing of them and both answer
//! UNIMPLEMENTED (for tests of keyward's error).
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
    ApplyRequest, ApplyResponse, CreateRequest, CreateResponse, DescribeRequest, DescribeResponse,
    GenerateRequest, GenerateResponse, RetireRequest, RetireResponse, RevokeRequest,
    RevokeResponse, Secret, SettingKey, VerifyRequest, VerifyResponse,
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

/// One account of the toy service (dynamic credentials).
#[derive(Clone, Serialize, Deserialize)]
struct User {
    username: String,
    password_sha256: String,
    lease_id: String,
    max_expires_at_ms: u64,
}

/// The users file of the toy service.
#[derive(Default, Serialize, Deserialize)]
struct UserFile {
    users: Vec<User>,
}

/// The `users_file` of a dynamic role (the only key it takes).
fn users_file(settings: &HashMap<String, String>) -> Result<PathBuf, Status> {
    if let Some(key) = settings.keys().find(|k| k.as_str() != "users_file") {
        return Err(Status::invalid_argument(format!("unknown key `{key}`")));
    }
    settings
        .get("users_file")
        .filter(|p| Path::new(p).is_absolute())
        .map(PathBuf::from)
        .ok_or_else(|| Status::invalid_argument("`users_file` must be an absolute path"))
}

/// A lease id as keyward makes them: printable, short.
fn check_lease_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument(
            "a lease id is 1 to 256 printable characters",
        ));
    }
    Ok(())
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
/// and users files within this process.
#[derive(Default)]
struct ApiKeys {
    files: Mutex<()>,
    /// Behave as a plugin of the protocol before Create and Revoke.
    old_protocol: bool,
}

impl ApiKeys {
    /// Runs `change` on the users file and writes it back by rename.
    fn update_users(
        &self,
        path: &Path,
        change: impl FnOnce(&mut UserFile) -> bool,
    ) -> Result<(), Status> {
        let _guard = self
            .files
            .lock()
            .map_err(|_| Status::internal("the users file lock is poisoned"))?;
        let mut file: UserFile = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|_| Status::failed_precondition("the users file is not valid"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => UserFile::default(),
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "cannot read the users file: {}",
                    e.kind()
                )))
            }
        };
        if change(&mut file) {
            let text = serde_json::to_vec_pretty(&file)
                .map_err(|_| Status::internal("cannot encode the users file"))?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| {
                    Status::unavailable(format!("cannot write the users file: {}", e.kind()))
                })?;
        }
        Ok(())
    }

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
        let dynamic_settings = if self.old_protocol {
            Vec::new()
        } else {
            vec![setting(
                "users_file",
                true,
                "absolute path of the service's users file",
            )]
        };
        Ok(Response::new(DescribeResponse {
            name: "apikeys".into(),
            description: "API keys of a service that lists their SHA-256 in a JSON file".into(),
            settings: vec![
                setting("keys_file", true, "absolute path of the service's key file"),
                setting("prefix", false, "prefix of generated keys (default ak_)"),
            ],
            admin_secret_key: String::new(),
            dynamic_credentials: !self.old_protocol,
            dynamic_settings,
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

    async fn create(
        &self,
        request: Request<CreateRequest>,
    ) -> Result<Response<CreateResponse>, Status> {
        if self.old_protocol {
            return Err(Status::unimplemented("Create"));
        }
        let request = request.into_inner();
        let path = users_file(&request.settings)?;
        check_lease_id(&request.lease_id)?;
        let role: String = request
            .role
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(32)
            .collect();
        let tail =
            random_string(12, Charset::Hex).map_err(|_| Status::internal("no randomness"))?;
        let username = format!(
            "{}_{}",
            if role.is_empty() { "toy" } else { &role },
            String::from_utf8_lossy(tail.expose())
        );
        let password =
            random_string(32, Charset::Alnum).map_err(|_| Status::internal("no randomness"))?;
        let user = User {
            username: username.clone(),
            password_sha256: key_hash(password.expose()),
            lease_id: request.lease_id.clone(),
            max_expires_at_ms: request.max_expires_at_ms,
        };
        self.update_users(&path, |file| {
            // Again for the same lease: the new account replaces the old.
            file.users.retain(|u| u.lease_id != user.lease_id);
            file.users.push(user);
            true
        })?;
        Ok(Response::new(CreateResponse {
            username,
            password: password.expose().to_vec(),
            host: String::new(),
            port: 0,
            database: String::new(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        if self.old_protocol {
            return Err(Status::unimplemented("Revoke"));
        }
        let request = request.into_inner();
        let path = users_file(&request.settings)?;
        check_lease_id(&request.lease_id)?;
        self.update_users(&path, |file| {
            let before = file.users.len();
            file.users.retain(|u| {
                u.lease_id != request.lease_id
                    && (request.username.is_empty() || u.username != request.username)
            });
            file.users.len() != before
        })?;
        Ok(Response::new(RevokeResponse {}))
    }
}

/// `--socket PATH [--old-protocol]`.
fn arguments() -> Result<(PathBuf, bool), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    match (
        args.next().as_deref(),
        args.next(),
        args.next().as_deref(),
        args.next(),
    ) {
        (Some("--socket"), Some(path), None, None) => Ok((PathBuf::from(path), false)),
        (Some("--socket"), Some(path), Some("--old-protocol"), None) => {
            Ok((PathBuf::from(path), true))
        }
        _ => Err("usage: provider_plugin --socket PATH [--old-protocol]".into()),
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
    let (socket, old_protocol) = arguments()?;
    // A socket left by a previous run that was killed.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    eprintln!(
        "provider_plugin: serving keyward.provider.v1.Provider on unix:{}",
        socket.display()
    );
    let served = tonic::transport::Server::builder()
        .add_service(ProviderServer::new(ApiKeys {
            old_protocol,
            ..ApiKeys::default()
        }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown())
        .await;
    let _ = std::fs::remove_file(&socket);
    served?;
    Ok(())
}
