//! External providers: a separate process serving `keyward.provider.v1.Provider`
//! (`proto/keyward/provider/v1/provider.proto`, which states the contract) on a
//! unix socket (`unix:PATH`) or over HTTPS, so a provider can be written in
//! any language. `examples/provider_plugin.rs` is one.
//!
//! [`ExternalProvider::connect`] calls `Describe`, and so does
//! [`Provider::describe`] each time a policy is set: the settings keys it
//! returns are what [`Provider::validate`] checks (unknown and missing
//! required keys), and its `admin_secret_key` is the one setting the broker
//! resolves as a secret (whose `read` the policy's setter must hold). Each step is one RPC with the policy's settings passed
//! through; gRPC status codes map to [`ProviderError`] as the .proto says. A
//! plugin's status message is shown, but first every value of the secrets of
//! that call is cut out of it, control characters are dropped and it is
//! shortened: the plugin is trusted to act, not to keep secrets out of its
//! messages.
//!
//! Known limit: the protobuf encoder's copies of secret values are ordinary
//! heap memory, not zeroized.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};
use tonic::{Code, Status};

use crate::proto::provider_v1 as pb;
use crate::proto::provider_v1::provider_client::ProviderClient;
use crate::rotation::provider::{
    BoxFuture, Provider, ProviderError, ProviderSettings, RotationInput,
};
use crate::secrecy::{SecretBytes, SecretData};

/// How long connecting to the plugin may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one step may take in the plugin, target work included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest plugin message shown, in characters.
const MAX_MESSAGE_CHARS: usize = 512;
/// Secret values shorter than this are not cut out of plugin messages (a
/// port or a one-letter flag would garble them, and leaks nothing).
const MIN_SCRUBBED_LEN: usize = 4;

/// Where a plugin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginEndpoint {
    /// `unix:PATH`: a unix socket on this host.
    Unix(PathBuf),
    /// `https://HOST[:PORT]`: gRPC over TLS, checked against a given CA.
    Https(String),
}

impl PluginEndpoint {
    /// Parses `unix:PATH` or `https://...`; anything else (plain `http`
    /// included: step requests carry secrets) is refused, and so is an
    /// `https` endpoint with user info.
    pub fn parse(text: &str) -> Result<Self, ProviderError> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(ProviderError::InvalidSettings(
                    "the endpoint `unix:` needs a socket path".into(),
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if text.starts_with("https://") {
            // No user info (`https://user:pass@host`): an endpoint is shown
            // and audited, so it must never carry a credential.
            let usable = text
                .parse::<Uri>()
                .is_ok_and(|uri| uri.authority().is_some_and(|a| !a.as_str().contains('@')));
            if usable {
                return Ok(Self::Https(text.to_owned()));
            }
        }
        Err(ProviderError::InvalidSettings(
            "a provider endpoint is `unix:PATH` or `https://HOST[:PORT]`".into(),
        ))
    }
}

/// A settings key the plugin takes, from `Describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSetting {
    pub key: String,
    pub required: bool,
    pub description: String,
}

/// What the plugin said of itself in its last `Describe`.
#[derive(Debug, Clone, Default)]
struct Described {
    description: String,
    settings: Vec<PluginSetting>,
    admin_secret_key: Option<String>,
    /// Serves `Create` and `Revoke` (dynamic credentials).
    dynamic_credentials: bool,
    /// The `--config` keys of a dynamic role.
    dynamic_settings: Vec<PluginSetting>,
}

/// An account a plugin made for a lease (`Create`). The password is shown
/// once to the requester, never stored nor printed.
pub struct PluginAccount {
    pub username: String,
    pub password: SecretBytes,
    pub host: String,
    pub port: u16,
    pub database: String,
}

impl std::fmt::Debug for PluginAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginAccount")
            .field("username", &self.username)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// What a dynamic-credential call hands the plugin.
pub struct DynamicCall<'a> {
    /// The role's `--config` pairs, `admin_secret` left out.
    pub settings: &'a std::collections::BTreeMap<String, String>,
    /// The role's resolved admin secret, if it names one.
    pub admin: Option<&'a SecretData>,
    pub lease_id: &'a str,
}

/// The longest username a plugin may return.
const MAX_PLUGIN_USERNAME: usize = 128;
/// The longest password a plugin may return, in bytes.
const MAX_PLUGIN_PASSWORD: usize = 1024;
/// The longest host or database a plugin may return, in bytes.
const MAX_PLUGIN_FIELD: usize = 255;

/// A provider served by another process.
#[derive(Debug)]
pub struct ExternalProvider {
    name: String,
    described: RwLock<Described>,
    client: ProviderClient<Channel>,
}

impl ExternalProvider {
    /// Connects to the plugin at `endpoint` (see [`PluginEndpoint::parse`]),
    /// to be registered as `name`, and asks it to describe itself. An
    /// `https` endpoint needs `ca_pem`, the CA certificate that signed the
    /// plugin's.
    pub async fn connect(
        name: impl Into<String>,
        endpoint: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ProviderError> {
        let name = name.into();
        let channel = match PluginEndpoint::parse(endpoint)? {
            PluginEndpoint::Unix(path) => unix_channel(path)?,
            PluginEndpoint::Https(uri) => https_channel(&uri, ca_pem)?,
        };
        let client = ProviderClient::new(channel);
        let described = ask_describe(&client, &name).await?;
        Ok(Self {
            name,
            described: RwLock::new(described),
            client,
        })
    }

    /// What the plugin says it does.
    pub fn description(&self) -> String {
        self.read_described().description.clone()
    }

    /// The settings keys the plugin takes.
    pub fn settings(&self) -> Vec<PluginSetting> {
        self.read_described().settings.clone()
    }

    fn read_described(&self) -> std::sync::RwLockReadGuard<'_, Described> {
        self.described
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The `--config` keys of a dynamic role on this plugin, as its last
    /// `Describe` gave them; `None` if it does not make dynamic credentials
    /// (an older plugin).
    pub fn dynamic_settings(&self) -> Option<Vec<PluginSetting>> {
        let described = self.read_described();
        described
            .dynamic_credentials
            .then(|| described.dynamic_settings.clone())
    }

    /// Asks `Describe` again (a dynamic role is checked against what the
    /// plugin says now).
    pub async fn refresh(&self) -> Result<(), ProviderError> {
        Provider::describe(self).await
    }

    /// Checks a dynamic role's settings against the plugin's
    /// `dynamic_settings`: unknown and missing required keys.
    pub fn validate_dynamic(
        &self,
        settings: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let Some(known) = self.dynamic_settings() else {
            return Err(self.no_dynamic());
        };
        if let Some(key) = settings
            .keys()
            .find(|k| !known.iter().any(|s| &s.key == *k))
        {
            let keys: Vec<&str> = known.iter().map(|s| s.key.as_str()).collect();
            return Err(ProviderError::InvalidSettings(format!(
                "setting `{}` is not known to provider `{}`; it takes {}",
                key.chars().take(64).collect::<String>(),
                self.name,
                if keys.is_empty() {
                    "none".to_owned()
                } else {
                    keys.join(", ")
                }
            )));
        }
        if let Some(missing) = known
            .iter()
            .find(|s| s.required && !settings.contains_key(&s.key))
        {
            return Err(ProviderError::InvalidSettings(format!(
                "setting `{}` is required by provider `{}`",
                missing.key, self.name
            )));
        }
        Ok(())
    }

    fn no_dynamic(&self) -> ProviderError {
        ProviderError::InvalidSettings(format!(
            "provider `{}` does not make dynamic credentials: it serves no Create/Revoke (a plugin of the older protocol, or one for rotation only)",
            self.name
        ))
    }

    /// A status from `Create`/`Revoke`: UNIMPLEMENTED (an older plugin) is
    /// said plainly; anything else maps as the steps' statuses do.
    fn dynamic_failure(
        &self,
        step: &str,
        secrets: &[&SecretData],
    ) -> impl Fn(Status) -> ProviderError {
        let general = self.failure(step, secrets);
        let old = self.no_dynamic();
        move |status| {
            if status.code() == Code::Unimplemented {
                old.clone()
            } else {
                general(status)
            }
        }
    }

    /// `Create`: the plugin makes an account for the lease `call.lease_id`,
    /// its name and password its own; `max_expires_at_ms` is the lease's
    /// latest possible end.
    pub async fn create_account(
        &self,
        call: &DynamicCall<'_>,
        role: &str,
        max_expires_at_ms: u64,
    ) -> Result<PluginAccount, ProviderError> {
        let request = pb::CreateRequest {
            settings: call
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            admin: call.admin.map(to_proto),
            role: role.to_owned(),
            lease_id: call.lease_id.to_owned(),
            max_expires_at_ms,
        };
        let secrets: Vec<&SecretData> = call.admin.into_iter().collect();
        let response = self
            .client
            .clone()
            .create(request)
            .await
            .map_err(self.dynamic_failure("Create", &secrets))?
            .into_inner();
        let username_ok = !response.username.is_empty()
            && response.username.len() <= MAX_PLUGIN_USERNAME
            && response.username.chars().all(|c| c.is_ascii_graphic());
        if !username_ok
            || response.password.is_empty()
            || response.password.len() > MAX_PLUGIN_PASSWORD
            // Handed to the caller as a string: bytes that are not UTF-8
            // would reach it as an empty password.
            || std::str::from_utf8(&response.password).is_err()
        {
            return Err(ProviderError::Internal(format!(
                "provider `{}` (Create) returned no usable username and password (a username is 1 to {MAX_PLUGIN_USERNAME} printable ASCII characters, a password 1 to {MAX_PLUGIN_PASSWORD} bytes of UTF-8)",
                self.name
            )));
        }
        // Stored in the lease and shown by `lease list`: no escapes, no
        // megabytes.
        let field_ok =
            |text: &str| text.len() <= MAX_PLUGIN_FIELD && text.chars().all(|c| !c.is_control());
        if !field_ok(&response.host) || !field_ok(&response.database) {
            return Err(ProviderError::Internal(format!(
                "provider `{}` (Create) returned an unusable host or database (at most {MAX_PLUGIN_FIELD} bytes, no control characters)",
                self.name
            )));
        }
        Ok(PluginAccount {
            username: response.username,
            password: SecretBytes::new(response.password),
            host: response.host,
            port: u16::try_from(response.port).unwrap_or(0),
            database: response.database,
        })
    }

    /// `Revoke`: the plugin removes the account of `call.lease_id`
    /// (`username` when known). Idempotent on the plugin's side.
    pub async fn revoke_account(
        &self,
        call: &DynamicCall<'_>,
        username: &str,
    ) -> Result<(), ProviderError> {
        let request = pb::RevokeRequest {
            settings: call
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            admin: call.admin.map(to_proto),
            lease_id: call.lease_id.to_owned(),
            username: username.to_owned(),
        };
        let secrets: Vec<&SecretData> = call.admin.into_iter().collect();
        self.client
            .clone()
            .revoke(request)
            .await
            .map(|_| ())
            .map_err(self.dynamic_failure("Revoke", &secrets))
    }

    fn failure(&self, step: &str, secrets: &[&SecretData]) -> impl Fn(Status) -> ProviderError {
        let name = self.name.clone();
        let step = step.to_owned();
        let values = secret_values(secrets);
        move |status| map_status_with(&status, &name, &step, &values)
    }
}

/// Calls the plugin's `Describe`.
async fn ask_describe(
    client: &ProviderClient<Channel>,
    name: &str,
) -> Result<Described, ProviderError> {
    let described = client
        .clone()
        .describe(pb::DescribeRequest {})
        .await
        .map_err(|status| map_status(&status, name, "Describe", &[]))?
        .into_inner();
    Ok(Described {
        description: described.description,
        settings: described
            .settings
            .into_iter()
            .map(|s| PluginSetting {
                key: s.key,
                required: s.required,
                description: s.description,
            })
            .collect(),
        admin_secret_key: Some(described.admin_secret_key).filter(|k| !k.is_empty()),
        dynamic_credentials: described.dynamic_credentials,
        dynamic_settings: described
            .dynamic_settings
            .into_iter()
            .map(|s| PluginSetting {
                key: s.key,
                required: s.required,
                description: s.description,
            })
            .collect(),
    })
}

fn unix_channel(path: PathBuf) -> Result<Channel, ProviderError> {
    // The URI is required by the HTTP/2 layer and otherwise ignored.
    let endpoint = Endpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        })),
    )
}

fn https_channel(uri: &str, ca_pem: Option<&[u8]>) -> Result<Channel, ProviderError> {
    let Some(ca_pem) = ca_pem else {
        return Err(ProviderError::InvalidSettings(
            "an https provider endpoint needs the CA certificate that signed the plugin's".into(),
        ));
    };
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    let endpoint = Endpoint::from_shared(uri.to_owned())
        .and_then(|e| e.tls_config(tls))
        .map_err(|_| {
            ProviderError::InvalidSettings("the https provider endpoint is not usable".into())
        })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_lazy())
}

fn to_proto(data: &SecretData) -> pb::Secret {
    pb::Secret {
        fields: data
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_vec()))
            .collect(),
    }
}

fn from_proto(secret: pb::Secret) -> SecretData {
    secret
        .fields
        .into_iter()
        .map(|(k, v)| (k, SecretBytes::new(v)))
        .collect()
}

fn settings_map(settings: &ProviderSettings) -> HashMap<String, String> {
    settings
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The values worth cutting out of a message, longest first (so a value
/// that contains another is cut whole).
fn secret_values(secrets: &[&SecretData]) -> Vec<SecretBytes> {
    let mut values: Vec<SecretBytes> = secrets
        .iter()
        .flat_map(|s| s.values())
        .filter(|v| v.len() >= MIN_SCRUBBED_LEN)
        .cloned()
        .collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
}

/// `message` without any of `values`, without control characters, and at
/// most [`MAX_MESSAGE_CHARS`] long.
pub fn scrub(message: &str, values: &[SecretBytes]) -> String {
    let mut text = message.to_owned();
    for value in values {
        if let Some(value) = value.expose_str() {
            if text.contains(value) {
                text = text.replace(value, "[redacted]");
            }
        }
    }
    let mut shown: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if text.chars().count() > MAX_MESSAGE_CHARS {
        shown.push('…');
    }
    if shown.trim().is_empty() {
        shown = "no message".into();
    }
    shown
}

fn map_status(status: &Status, name: &str, step: &str, secrets: &[&SecretData]) -> ProviderError {
    map_status_with(status, name, step, &secret_values(secrets))
}

fn map_status_with(
    status: &Status,
    name: &str,
    step: &str,
    values: &[SecretBytes],
) -> ProviderError {
    let message = scrub(status.message(), values);
    let text = format!("provider `{name}` ({step}): {message}");
    // A status made on our side from a transport error (the connection to
    // the plugin broke) carries that error as its source; one decoded from
    // the plugin's answer does not.
    let transport = std::error::Error::source(status).is_some();
    match status.code() {
        Code::Unknown | Code::Cancelled if transport => ProviderError::Unreachable(text),
        Code::InvalidArgument => ProviderError::InvalidSettings(text),
        Code::FailedPrecondition => ProviderError::InvalidSecret(text),
        Code::PermissionDenied | Code::Unauthenticated => ProviderError::Refused(text),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
            ProviderError::Unreachable(text)
        }
        _ => ProviderError::Internal(text),
    }
}

impl Provider for ExternalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, settings: &ProviderSettings) -> Result<(), ProviderError> {
        let described = self.read_described();
        let known: Vec<&str> = described.settings.iter().map(|s| s.key.as_str()).collect();
        settings.only_keys(&known)?;
        for setting in described.settings.iter().filter(|s| s.required) {
            settings.require(&setting.key)?;
        }
        Ok(())
    }

    fn admin_secret_key(&self) -> Option<String> {
        self.read_described().admin_secret_key.clone()
    }

    fn into_external(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<ExternalProvider>> {
        Some(self)
    }

    /// Asks the plugin's `Describe` again and keeps what it says now: a
    /// policy is checked against it, and the broker reads the admin secret
    /// under the key it names (a plugin that changes its answer later is
    /// still held to the setter's `read` at every run).
    fn describe(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            let described = ask_describe(&self.client, &self.name).await?;
            *self
                .described
                .write()
                .unwrap_or_else(PoisonError::into_inner) = described;
            Ok(())
        })
    }

    fn generate<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
    ) -> BoxFuture<'a, Result<SecretData, ProviderError>> {
        Box::pin(async move {
            let request = pb::GenerateRequest {
                settings: settings_map(input.settings),
                admin: input.admin.map(to_proto),
                current: input.current.map(to_proto),
            };
            let secrets: Vec<&SecretData> = input.admin.into_iter().chain(input.current).collect();
            let response = self
                .client
                .clone()
                .generate(request)
                .await
                .map_err(self.failure("Generate", &secrets))?
                .into_inner();
            match response.value.map(from_proto) {
                Some(value) if !value.is_empty() => Ok(value),
                _ => Err(ProviderError::Internal(format!(
                    "provider `{}` (Generate) returned no value",
                    self.name
                ))),
            }
        })
    }

    fn apply<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        pending: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let request = pb::ApplyRequest {
                settings: settings_map(input.settings),
                admin: input.admin.map(to_proto),
                current: input.current.map(to_proto),
                pending: Some(to_proto(pending)),
            };
            let secrets = step_secrets(input, pending);
            self.client
                .clone()
                .apply(request)
                .await
                .map(|_| ())
                .map_err(self.failure("Apply", &secrets))
        })
    }

    fn verify<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        pending: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let request = pb::VerifyRequest {
                settings: settings_map(input.settings),
                admin: input.admin.map(to_proto),
                current: input.current.map(to_proto),
                pending: Some(to_proto(pending)),
            };
            let secrets = step_secrets(input, pending);
            self.client
                .clone()
                .verify(request)
                .await
                .map(|_| ())
                .map_err(self.failure("Verify", &secrets))
        })
    }

    fn retire<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        previous: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let request = pb::RetireRequest {
                settings: settings_map(input.settings),
                admin: input.admin.map(to_proto),
                current: input.current.map(to_proto),
                previous: Some(to_proto(previous)),
            };
            let secrets = step_secrets(input, previous);
            self.client
                .clone()
                .retire(request)
                .await
                .map(|_| ())
                .map_err(self.failure("Retire", &secrets))
        })
    }
}

fn step_secrets<'a>(input: &RotationInput<'a>, value: &'a SecretData) -> Vec<&'a SecretData> {
    input
        .admin
        .into_iter()
        .chain(input.current)
        .chain(Some(value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            PluginEndpoint::parse("unix:/run/kw/p.sock"),
            Ok(PluginEndpoint::Unix("/run/kw/p.sock".into()))
        );
        assert_eq!(
            PluginEndpoint::parse("https://plugins.internal:8443"),
            Ok(PluginEndpoint::Https(
                "https://plugins.internal:8443".into()
            ))
        );
        for bad in [
            "http://127.0.0.1:9000",
            "unix:",
            "/run/p.sock",
            "https://",
            "https://user:pw@plugins.internal:8443",
        ] {
            assert!(PluginEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plugin_messages_lose_the_secrets_of_the_call() {
        let mut pending = SecretData::new();
        pending.insert("api_key".into(), SecretBytes::from("ak_Sup3rS3cretKey"));
        pending.insert("port".into(), SecretBytes::from("80"));
        let status =
            Status::permission_denied("key ak_Sup3rS3cretKey rejected on port 80\n\x1b[31m");
        let error = map_status(&status, "keys", "Verify", &[&pending]);
        assert_eq!(
            error,
            ProviderError::Refused(
                "provider `keys` (Verify): key [redacted] rejected on port 80[31m".into()
            )
        );
        let long = Status::internal("x".repeat(5000));
        let shown = map_status(&long, "keys", "Apply", &[]).to_string();
        assert!(shown.len() < 600, "{}", shown.len());
    }

    #[test]
    fn status_codes_map_to_error_kinds() {
        let kind = |code| map_status(&Status::new(code, "m"), "p", "Apply", &[]);
        assert!(matches!(
            kind(Code::InvalidArgument),
            ProviderError::InvalidSettings(_)
        ));
        assert!(matches!(
            kind(Code::FailedPrecondition),
            ProviderError::InvalidSecret(_)
        ));
        assert!(matches!(
            kind(Code::PermissionDenied),
            ProviderError::Refused(_)
        ));
        assert!(kind(Code::Unavailable).is_retryable());
        assert!(matches!(kind(Code::Unknown), ProviderError::Internal(_)));
    }

    #[test]
    fn secret_debug_names_fields_only() {
        let secret = to_proto(&SecretData::from([(
            "password".to_owned(),
            SecretBytes::from("hunter2-very-secret"),
        )]));
        let request = pb::ApplyRequest {
            pending: Some(secret),
            ..Default::default()
        };
        let shown = format!("{request:?}");
        assert!(shown.contains("password"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("104, 117"), "{shown}");
    }
}
