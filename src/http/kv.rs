//! Vault's KV version 2 engine, mounted at `secret/`, over keyward's
//! versioned secrets: `data/` (read a version, write with check-and-set,
//! soft-delete the newest), `metadata/` (read, list, delete), `delete/`,
//! `undelete/`, `destroy/` and `config`; plus what the `vault`/`bao` CLIs
//! ask before every `kv` command (`sys/internal/ui/mounts/<path>`) and
//! `sys/mounts`.
//!
//! A Vault path `secret/data/<p>` is keyward's secret `<p>` (policy
//! resource `secret/<p>`), parsed by `SecretPath` with its rules. Each
//! operation is the gRPC `Secrets` method of the same meaning, under that
//! method's name, so audit, metrics and the capability checked are the
//! same. Field values are text: a JSON value that is not a string is
//! refused on write; a stored value that is not UTF-8 (written over gRPC)
//! is answered in base64 with a warning.

use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::reply::{
    errors, json_bytes_response, json_response, no_content, time, Answer, Envelope, Methods, Route,
    VaultRequest,
};
use super::HttpState;
use crate::core::call::{Access, Call, Failure};
use crate::core::offload::Work;
use crate::policy::Capability;
use crate::secrecy::{SecretBytes, SecretData};
use crate::secrets::{ListPrefix, PutRequest, SecretPath, Selector, Stage};

/// The one KV mount.
pub const MOUNT: &str = "secret";

/// `sys/mounts` and the CLIs' preflight: reads (keyward's mounts are fixed).
const MOUNTS: Route = Route::new(Methods::Get, "keyward.v1.Sys/Mounts", Access::Token);

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/secret/{*rest}", any(kv))
        .route("/v1/sys/internal/ui/mounts/{*path}", any(ui_mount))
        .route("/v1/sys/mounts", any(mounts))
}

/// Dispatches `secret/<op>/<path>` on the operation and the method.
async fn kv(State(state): State<HttpState>, Path(rest): Path<String>, req: Request) -> Answer {
    let req = VaultRequest::read(req, &state).await?;
    let (op, path) = match rest.split_once('/') {
        Some((op, path)) => (op, path),
        None => (rest.as_str(), ""),
    };
    let m = &req.method;
    let write = *m == Method::POST || *m == Method::PUT;
    match op {
        "data" if *m == Method::GET && !req.is_list() => read(&state, &req, path).await,
        "data" if write => put(&state, &req, path).await,
        "data" if *m == Method::DELETE => delete_newest(&state, &req, path).await,
        "data" => Err(req
            .method_not_allowed(&state, "GET, PUT, POST or DELETE")
            .await),
        "metadata" if req.is_list() => list(&state, &req, path).await,
        "metadata" if *m == Method::GET => metadata(&state, &req, path).await,
        "metadata" if *m == Method::DELETE => delete_metadata(&state, &req, path).await,
        "metadata" => Err(req.method_not_allowed(&state, "GET, LIST or DELETE").await),
        "delete" if write => versions_op(&state, &req, path, VersionsOp::Delete).await,
        "undelete" if write => versions_op(&state, &req, path, VersionsOp::Undelete).await,
        "destroy" if write => versions_op(&state, &req, path, VersionsOp::Destroy).await,
        "delete" | "undelete" | "destroy" => {
            Err(req.method_not_allowed(&state, "PUT or POST").await)
        }
        "config" if path.is_empty() && *m == Method::GET => config(&state, &req).await,
        "config" if path.is_empty() => Err(req.method_not_allowed(&state, "GET").await),
        _ => Err(req
            .not_found(
                &state,
                "no handler for this route: the KV v2 mount secret/ serves data/, metadata/, \
                 delete/, undelete/, destroy/ and config",
            )
            .await),
    }
}

/// Starts a token call under the gRPC method `method` and parses `path` as
/// a secret path (an invalid one is an audited 400 naming the rule).
async fn begin_path(
    state: &HttpState,
    req: &VaultRequest,
    method: &'static str,
    path: &str,
) -> Result<(Call, SecretPath), Response> {
    let mut call = req.begin(&state.core, method, Access::Token).await?;
    let path = call.check(SecretPath::parse(path))?;
    Ok((call, path))
}

/// Stored field values as Vault's `data`: text as a string, other bytes
/// base64 (named in the warnings). The reference `read_answer` is held to.
#[cfg(test)]
fn fields_json(data: &SecretData, warnings: &mut Vec<String>) -> Value {
    let mut out = Map::new();
    for (k, v) in data {
        let value = match std::str::from_utf8(v.expose()) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => {
                warnings.push(not_utf8_warning(k));
                Value::String(base64::engine::general_purpose::STANDARD.encode(v.expose()))
            }
        };
        out.insert(k.clone(), value);
    }
    Value::Object(out)
}

fn version_metadata(version: u64, created_ms: u64, deleted_ms: u64, destroyed: bool) -> Value {
    json!({
        "created_time": time(created_ms),
        "custom_metadata": null,
        "deletion_time": time(deleted_ms),
        "destroyed": destroyed,
        "version": version,
    })
}

/// `GET secret/data/<path>[?version=N]`: the newest live version (keyward's
/// `current`), or version N.
async fn read(state: &HttpState, req: &VaultRequest, path: &str) -> Answer {
    let (mut call, path) = begin_path(state, req, "keyward.v1.Secrets/Get", path).await?;
    let selector = match req.param("version") {
        None | Some("") | Some("0") => Selector::Stage(Stage::Current),
        Some(v) => Selector::Version(
            call.check(
                v.parse::<u64>()
                    .map_err(|_| Failure::invalid("version must be a positive integer")),
            )?,
        ),
    };
    call.authorize(Capability::Read, path.resource())?;
    let fresh = call.caller().is_some_and(|c| c.fresh);
    let found = call.check(state.core.secrets.get_fenced(&path, selector, fresh))?;
    call.note_read(path.as_str()).await?;
    let refs: Vec<(&str, &[u8])> = found
        .data
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose()))
        .collect();
    call.ok_async(&refs).await?;
    drop(refs);
    Ok(json_bytes_response(read_answer(req.request_id(), &found)))
}

/// The answer of a KV v2 read, written straight into its bytes: the same
/// text `Envelope::data(..).kv()` over `fields_json` and
/// `version_metadata` gives (keys in the same sorted order; a test holds
/// them equal), without building a `Value` tree, so each field value is
/// copied once (into the answer) instead of twice.
fn read_answer(request_id: &str, found: &crate::secrets::SecretVersion) -> Vec<u8> {
    use std::io::Write as _;
    fn string(out: &mut Vec<u8>, text: &str) {
        // Writing a `&str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
    let values: usize = found
        .data
        .iter()
        .map(|(k, v)| k.len() + v.expose().len() + 6)
        .sum();
    let mut out = Vec::with_capacity(400 + request_id.len() + values * 4 / 3);
    let mut warnings = Vec::new();
    out.extend_from_slice(b"{\"auth\":null,\"data\":{\"data\":{");
    for (i, (k, v)) in found.data.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(&mut out, k);
        out.push(b':');
        match std::str::from_utf8(v.expose()) {
            Ok(text) => string(&mut out, text),
            Err(_) => {
                warnings.push(not_utf8_warning(k));
                out.push(b'"');
                let at = out.len();
                let encoded = base64::encoded_len(v.expose().len(), true).unwrap_or(0);
                out.resize(at + encoded, 0);
                let written = base64::engine::general_purpose::STANDARD
                    .encode_slice(v.expose(), &mut out[at..])
                    .unwrap_or(0);
                out.truncate(at + written);
                out.push(b'"');
            }
        }
    }
    out.extend_from_slice(b"},\"metadata\":{\"created_time\":");
    string(&mut out, &time(found.created_at_ms));
    let _ = write!(
        out,
        ",\"custom_metadata\":null,\"deletion_time\":\"\",\"destroyed\":false,\"version\":{}}}}},",
        found.version
    );
    out.extend_from_slice(b"\"lease_duration\":0,\"lease_id\":\"\",\"mount_type\":\"kv\",\"renewable\":false,\"request_id\":");
    string(&mut out, request_id);
    out.extend_from_slice(b",\"warnings\":");
    if warnings.is_empty() {
        out.extend_from_slice(b"null");
    } else {
        let _ = serde_json::to_writer(&mut out, &warnings);
    }
    out.extend_from_slice(b",\"wrap_info\":null}");
    out
}

/// The warning of a stored value that is not UTF-8 text.
fn not_utf8_warning(field: &str) -> String {
    format!("field {field:?} is not UTF-8 text; its value is given in base64")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    data: Option<Map<String, Value>>,
    #[serde(default)]
    options: PutOptions,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PutOptions {
    cas: Option<u64>,
}

/// `PUT|POST secret/data/<path> {"data": {...}, "options": {"cas": N}}`: a
/// new version (`options.cas`: only if N is the newest version; 0: only if
/// there is none).
async fn put(state: &HttpState, req: &VaultRequest, path: &str) -> Answer {
    let (mut call, path) = begin_path(state, req, "keyward.v1.Secrets/Put", path).await?;
    let body: PutBody = req.json(&mut call)?;
    let Some(fields) = body.data else {
        return Err(call
            .fail(Failure::invalid(
                "no data provided: the body must be {\"data\": {FIELD: VALUE, ...}}",
            ))
            .into());
    };
    let mut data = SecretData::new();
    for (k, v) in fields {
        match v {
            Value::String(s) => {
                data.insert(k, SecretBytes::new(s.into_bytes()));
            }
            _ => {
                return Err(call
                    .fail(Failure::invalid(format!(
                        "field {k:?} must be a string: keyward stores field values as text \
                         (Vault's KV would take any JSON value)"
                    )))
                    .into())
            }
        }
    }
    let proof = call.authorize(Capability::Write, path.resource())?;
    let values: Vec<(String, SecretBytes)> =
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let put = PutRequest {
        path: path.clone(),
        data,
        cas: body.options.cas,
        max_versions: None,
        owner: None,
        stage: Stage::Current,
    };
    let now = state.core.clock().now_ms();
    let fresh = call.caller().is_some_and(|c| c.fresh);
    let version = call.check(state.core.secrets.put_async(proof, put, now, fresh).await)?;
    call.check(state.core.secrets.durable().await)?;
    let refs: Vec<(&str, &[u8])> = values
        .iter()
        .map(|(k, v)| (k.as_str(), v.expose()))
        .collect();
    call.ok_async(&refs).await?;
    Ok(
        Envelope::data(req.request_id(), version_metadata(version, now, 0, false))
            .kv()
            .into_response(),
    )
}

/// `DELETE secret/data/<path>`: soft-deletes the newest version.
async fn delete_newest(state: &HttpState, req: &VaultRequest, path: &str) -> Answer {
    let (mut call, path) = begin_path(state, req, "keyward.v1.Secrets/Delete", path).await?;
    let proof = call.authorize(Capability::Delete, path.resource())?;
    let now = state.core.clock().now_ms();
    call.check(state.core.secrets.delete(&proof, &path, None, now))?;
    call.check(state.core.secrets.durable().await)?;
    call.ok(&[])?;
    Ok(no_content())
}

#[derive(Clone, Copy)]
enum VersionsOp {
    Delete,
    Undelete,
    Destroy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionsBody {
    /// Numbers, or numbers written as strings (the CLIs send `["2"]`).
    #[serde(default)]
    versions: Vec<Value>,
}

/// The version numbers of a `versions` list.
fn version_numbers(values: &[Value]) -> Result<Vec<u64>, Failure> {
    values
        .iter()
        .map(|v| match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
        .map(|n| {
            n.filter(|n| *n > 0)
                .ok_or_else(|| Failure::invalid("versions must be positive version numbers"))
        })
        .collect()
}

/// The most versions one `delete/`, `undelete/` or `destroy/` may name.
const MAX_VERSIONS_PER_CALL: usize = 256;

/// `PUT|POST secret/{delete,undelete,destroy}/<path> {"versions": [..]}`:
/// each version in turn (one call, one audit record; a failure stops at
/// that version, the ones before it are done).
async fn versions_op(state: &HttpState, req: &VaultRequest, path: &str, op: VersionsOp) -> Answer {
    let (method, capability) = match op {
        VersionsOp::Delete => ("keyward.v1.Secrets/Delete", Capability::Delete),
        VersionsOp::Undelete => ("keyward.v1.Secrets/Undelete", Capability::Write),
        VersionsOp::Destroy => ("keyward.v1.Secrets/Destroy", Capability::Destroy),
    };
    let (mut call, path) = begin_path(state, req, method, path).await?;
    let body: VersionsBody = req.json(&mut call)?;
    if body.versions.is_empty() || body.versions.len() > MAX_VERSIONS_PER_CALL {
        return Err(call
            .fail(Failure::invalid(format!(
                "versions must name 1 to {MAX_VERSIONS_PER_CALL} versions"
            )))
            .into());
    }
    let versions = call.check(version_numbers(&body.versions))?;
    let proof = call.authorize(capability, path.resource())?;
    let now = state.core.clock().now_ms();
    let secrets = &state.core.secrets;
    for v in versions {
        let done = match op {
            VersionsOp::Delete => secrets.delete(&proof, &path, Some(v), now),
            VersionsOp::Undelete => secrets.undelete(&proof, &path, v, now),
            VersionsOp::Destroy => secrets.destroy(&proof, &path, v, now),
        };
        if let Err(e) = done {
            // What was done before this version is made durable first.
            let _ = secrets.durable().await;
            return Err(call.fail(e).into());
        }
    }
    call.check(secrets.durable().await)?;
    call.ok(&[])?;
    Ok(no_content())
}

/// `GET secret/metadata/<path>`.
async fn metadata(state: &HttpState, req: &VaultRequest, path: &str) -> Answer {
    let (mut call, path) = begin_path(state, req, "keyward.v1.Secrets/Metadata", path).await?;
    call.authorize(Capability::Read, path.resource())?;
    let meta = call.check(state.core.secrets.metadata(&path))?;
    call.ok(&[])?;
    let mut versions = Map::new();
    for v in &meta.versions {
        versions.insert(
            v.version.to_string(),
            json!({
                "created_time": time(v.created_at_ms),
                "deletion_time": time(v.deleted_at_ms),
                "destroyed": v.destroyed,
            }),
        );
    }
    let oldest = meta.versions.iter().map(|v| v.version).min().unwrap_or(0);
    Ok(Envelope::data(
        req.request_id(),
        json!({
            "cas_required": false,
            "created_time": time(meta.created_at_ms),
            "current_version": meta.newest,
            "custom_metadata": null,
            "delete_version_after": "0s",
            "max_versions": meta.max_versions,
            "oldest_version": oldest,
            "updated_time": time(meta.updated_at_ms),
            "versions": versions,
        }),
    )
    .kv()
    .into_response())
}

/// `LIST secret/metadata/<prefix>`: the names right under the prefix,
/// folders with a trailing `/`, of the secrets the caller could list or
/// read one by one (as gRPC's List); none is 404, as Vault answers.
async fn list(state: &HttpState, req: &VaultRequest, prefix: &str) -> Answer {
    let mut call = req
        .begin(&state.core, "keyward.v1.Secrets/List", Access::Token)
        .await?;
    let prefix = call.check(ListPrefix::parse(prefix))?;
    call.authorize(Capability::List, prefix.resource())?;
    call.require_caller()?;
    let under = prefix.path().map(|p| format!("{p}/")).unwrap_or_default();
    // It reads every path under the prefix: off the connection's thread,
    // filtered by the caller's policies as they stand once its turn came.
    let paths = call
        .off_thread_as(Work::Listing, move |core, caller| {
            core.secrets.list(&prefix, |path| {
                caller.is_some_and(|caller| crate::api::secrets::visible_to(caller, path))
            })
        })
        .await?;
    call.ok(&[])?;
    let keys = super::reply::child_keys(paths.iter().map(String::as_str), &under);
    if keys.is_empty() {
        return Err(errors(StatusCode::NOT_FOUND, ""));
    }
    Ok(Envelope::data(req.request_id(), json!({ "keys": keys }))
        .kv()
        .into_response())
}

/// `DELETE secret/metadata/<path>`: destroys every version that is not
/// destroyed yet (capability `destroy`). Unlike Vault, the path's version
/// history stays (keyward never forgets that a secret existed).
async fn delete_metadata(state: &HttpState, req: &VaultRequest, path: &str) -> Answer {
    let (mut call, path) = begin_path(state, req, "keyward.v1.Secrets/Destroy", path).await?;
    let proof = call.authorize(Capability::Destroy, path.resource())?;
    let meta = match state.core.secrets.metadata(&path) {
        Ok(m) => m,
        // Vault answers 204 for a path with nothing to delete.
        Err(crate::secrets::SecretsError::NotFound) => {
            call.ok(&[])?;
            return Ok(no_content());
        }
        Err(e) => return Err(call.fail(e).into()),
    };
    let now = state.core.clock().now_ms();
    for v in meta.versions.iter().filter(|v| !v.destroyed) {
        if let Err(e) = state.core.secrets.destroy(&proof, &path, v.version, now) {
            let _ = state.core.secrets.durable().await;
            return Err(call.fail(e).into());
        }
    }
    call.check(state.core.secrets.durable().await)?;
    call.ok(&[])?;
    Ok(no_content())
}

/// `GET secret/config`: the engine's settings (the server's limits); any
/// valid token may read them.
async fn config(state: &HttpState, req: &VaultRequest) -> Answer {
    let mut call = req
        .begin(&state.core, "keyward.v1.Secrets/Config", Access::Token)
        .await?;
    call.set_resource(format!("{MOUNT}/config"));
    call.ok(&[])?;
    let limits = state.core.secrets.limits();
    Ok(Envelope::data(
        req.request_id(),
        json!({
            "cas_required": false,
            "delete_version_after": "0s",
            "max_versions": limits.default_max_versions,
        }),
    )
    .into_response())
}

/// The description of the KV mount, as `sys/mounts` and the CLIs'
/// preflight give it.
fn mount_json() -> Value {
    json!({
        "type": "kv",
        "description": "keyward secrets (KV version 2)",
        "accessor": "kv_keyward",
        "config": {
            "default_lease_ttl": 0,
            "max_lease_ttl": 0,
            "force_no_cache": false,
        },
        "options": { "version": "2" },
        "local": false,
        "seal_wrap": false,
        "external_entropy_access": false,
        "plugin_version": "",
        "running_plugin_version": "",
        "running_sha256": "",
        "uuid": "",
    })
}

/// `GET sys/internal/ui/mounts/<path>`: which mount serves `<path>` (the
/// CLIs ask before every `kv` command). Any valid token; only `secret/`
/// exists, anything else is 404.
async fn ui_mount(
    State(state): State<HttpState>,
    Path(path): Path<String>,
    req: Request,
) -> Answer {
    let (req, mut call) = VaultRequest::start(req, &state, MOUNTS).await?;
    call.set_resource("sys/internal/ui/mounts");
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if first != MOUNT {
        return Err(call
            .fail(Failure::new(
                crate::core::call::FailureKind::NotFound,
                format!("no mount serves this path: keyward has one KV mount, {MOUNT}/"),
            ))
            .into());
    }
    call.ok(&[])?;
    let mut mount = mount_json();
    if let Some(map) = mount.as_object_mut() {
        map.insert("path".into(), json!(format!("{MOUNT}/")));
    }
    Ok(Envelope::data(req.request_id(), mount).into_response())
}

/// `GET sys/mounts`: the one KV mount (`read` on `sys/mounts`).
async fn mounts(State(state): State<HttpState>, req: Request) -> Answer {
    let (req, mut call) = VaultRequest::start(req, &state, MOUNTS).await?;
    call.authorize(Capability::Read, "sys/mounts".into())?;
    call.ok(&[])?;
    let mounts = json!({ format!("{MOUNT}/"): mount_json() });
    let mut body = Envelope::data(req.request_id(), mounts.clone()).into_value();
    // Vault also gives the mounts at the top level (older clients read them there).
    if let (Some(top), Some(m)) = (body.as_object_mut(), mounts.as_object()) {
        for (k, v) in m {
            top.insert(k.clone(), v.clone());
        }
    }
    Ok(json_response(StatusCode::OK, &body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::secrets::SecretVersion;

    /// The read answer as it was built before: a `Value` tree through
    /// `Envelope`, serialized by serde_json.
    fn through_values(request_id: &str, found: &SecretVersion) -> Vec<u8> {
        let mut warnings = Vec::new();
        let data = fields_json(&found.data, &mut warnings);
        let mut envelope = Envelope::data(
            request_id,
            json!({
                "data": data,
                "metadata": version_metadata(found.version, found.created_at_ms, 0, false),
            }),
        )
        .kv();
        envelope.warnings = warnings;
        serde_json::to_vec(&envelope.into_value()).unwrap()
    }

    #[test]
    fn a_read_answer_is_the_text_the_value_tree_gave() {
        let mut cases: Vec<SecretData> = Vec::new();
        cases.push(SecretData::new());
        let mut plain = SecretData::new();
        plain.insert("username".into(), SecretBytes::from("app"));
        plain.insert("password".into(), SecretBytes::from("s3cr\"et\\\n\u{7}é✓"));
        cases.push(plain);
        let mut mixed = SecretData::new();
        mixed.insert("bin".into(), SecretBytes::new(vec![0xff, 0x00, 0xfe, 0x80]));
        mixed.insert("k\"ey".into(), SecretBytes::new(Vec::new()));
        mixed.insert("other".into(), SecretBytes::new(vec![0xc3]));
        mixed.insert("text".into(), SecretBytes::from("plain"));
        cases.push(mixed);
        // Pseudo-random bytes of every length up to 40, text or not.
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..40usize {
            let mut data = SecretData::new();
            for field in 0..3 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        if field == 0 {
                            b'a' + (rng % 26) as u8
                        } else {
                            rng as u8
                        }
                    })
                    .collect();
                data.insert(format!("f{field}"), SecretBytes::new(bytes));
            }
            cases.push(data);
        }
        for (i, data) in cases.into_iter().enumerate() {
            let found = SecretVersion {
                version: i as u64 + 1,
                stage: None,
                created_at_ms: if i == 0 {
                    0
                } else {
                    1_764_000_000_123 + i as u64
                },
                data,
            };
            let request_id = format!("req-{i}");
            let direct = read_answer(&request_id, &found);
            let reference = through_values(&request_id, &found);
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                String::from_utf8(reference).unwrap(),
                "case {i}"
            );
        }
    }
}
