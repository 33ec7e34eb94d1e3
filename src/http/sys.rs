//! Vault's `sys/` endpoints for operators and load balancers: `health`
//! (with Vault's status codes and `?standbyok` and friends), `seal-status`,
//! `seal`, `unseal`, `init`, `leader`. Each is one call of the request seam
//! under the gRPC `Sys` method it matches, so audit and metrics count them
//! alike.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::reply::{self, failure, json_response, Methods, Route, VaultRequest};
use super::HttpState;
use crate::core::call::{Access, Failure};
use crate::core::Core;
use crate::policy::Capability;

/// The version Vault clients are told: the Vault API level keyward speaks,
/// with keyward's own version as semver build metadata.
pub const VAULT_VERSION: &str = concat!("1.14.0+keyward.", env!("CARGO_PKG_VERSION"));

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/sys/health", any(health))
        .route("/v1/sys/seal-status", any(seal_status))
        .route("/v1/sys/seal", any(seal))
        .route("/v1/sys/unseal", any(unseal))
        .route("/v1/sys/init", any(init))
        .route("/v1/sys/leader", any(leader))
}

fn seal_status_body(core: &Core) -> Value {
    let s = core.status();
    json!({
        "type": "shamir",
        "initialized": s.initialized,
        "sealed": s.sealed,
        "t": s.threshold,
        "n": s.shares,
        "progress": s.progress,
        "nonce": "",
        "version": VAULT_VERSION,
        "build_date": "",
        "migration": false,
        "cluster_name": "keyward",
        "cluster_id": "",
        "recovery_seal": false,
        "storage_type": "sled",
    })
}

/// A status read (`Sys/Status`), audited like gRPC's, on `resource`.
async fn status_read(
    state: &HttpState,
    req: Request,
    resource: &'static str,
    methods: Methods,
) -> Result<(VaultRequest, crate::core::call::Call), Response> {
    let route = Route::new(methods, "keyward.v1.Sys/Status", Access::Open);
    let (req, mut call) = VaultRequest::start(req, state, route).await?;
    call.set_resource(resource);
    Ok((req, call))
}

/// `GET|HEAD sys/health`: 200 active, 429 standby (`standbyok` makes it
/// 200), 501 not initialized, 503 sealed; each code can be replaced by
/// `activecode`, `standbycode`, `sealedcode`, `uninitcode`. keyward has no
/// standby node, so `standbyok` changes nothing.
async fn health(State(state): State<HttpState>, req: Request) -> Response {
    let (req, call) = match status_read(&state, req, "sys/health", Methods::GetOrHead).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let s = state.core.status();
    let code = |name: &str, default: u16| -> Result<StatusCode, String> {
        match req.param(name) {
            None => Ok(StatusCode::from_u16(default).unwrap_or(StatusCode::OK)),
            Some(v) => v
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|c| (200..600).contains(&c.as_u16()))
                .ok_or_else(|| format!("{name} must be an HTTP status code (200 to 599)")),
        }
    };
    let chosen = if !s.initialized {
        code("uninitcode", 501)
    } else if s.sealed {
        code("sealedcode", 503)
    } else {
        code("activecode", 200)
    };
    let status = match chosen {
        Ok(status) => status,
        Err(message) => {
            let mut call = call;
            return failure(&call.fail(Failure::invalid(message)));
        }
    };
    if let Err(f) = call.ok(&[]) {
        return failure(&f);
    }
    let now = state.core.clock().now_ms() / 1000;
    let body = json!({
        "initialized": s.initialized,
        "sealed": s.sealed,
        "standby": false,
        "performance_standby": false,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": now,
        "version": VAULT_VERSION,
        "cluster_name": "keyward",
        "cluster_id": "",
    });
    if req.method == Method::HEAD {
        return status.into_response();
    }
    json_response(status, &body)
}

/// `GET sys/seal-status`.
async fn seal_status(State(state): State<HttpState>, req: Request) -> Response {
    let (_req, call) = match status_read(&state, req, "sys/seal-status", Methods::Get).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let body = seal_status_body(&state.core);
    match call.ok(&[]) {
        Ok(()) => json_response(StatusCode::OK, &body),
        Err(f) => failure(&f),
    }
}

/// `GET sys/leader`: keyward runs one active node, which is always itself.
async fn leader(State(state): State<HttpState>, req: Request) -> Response {
    let (_req, call) = match status_read(&state, req, "sys/leader", Methods::Get).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(f) = call.ok(&[]) {
        return failure(&f);
    }
    json_response(
        StatusCode::OK,
        &json!({
            "ha_enabled": false,
            "is_self": true,
            "active_time": "0001-01-01T00:00:00Z",
            "leader_address": "",
            "leader_cluster_address": "",
            "performance_standby": false,
            "performance_standby_last_remote_wal": 0,
        }),
    )
}

/// `PUT|POST sys/seal` (token; `admin` on `sys/seal`, as gRPC's Seal).
async fn seal(State(state): State<HttpState>, req: Request) -> Response {
    let route = Route::new(Methods::Write, "keyward.v1.Sys/Seal", Access::Token);
    let (_req, mut call) = match VaultRequest::start(req, &state, route).await {
        Ok(started) => started,
        Err(r) => return r,
    };
    if let Err(f) = call.authorize(Capability::Admin, "sys/seal".into()) {
        return failure(&f);
    }
    // As gRPC's Seal: sealing is the safe direction and goes ahead even when
    // the audit log cannot be written.
    call.record_request_or_log();
    state.core.seal().await;
    state.notify_seal(true);
    if let Err(e) = call.ok(&[]) {
        tracing::error!(error = %e.message(), "sealed; its audit outcome record was not written");
    }
    reply::no_content()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsealBody {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    reset: bool,
    /// Vault's seal migration; keyward has none, so only `false` is accepted.
    #[serde(default)]
    migrate: bool,
}

/// `PUT|POST sys/unseal {"key": SHARE}` or `{"reset": true}`.
async fn unseal(State(state): State<HttpState>, req: Request) -> Response {
    let route = Route::new(Methods::Write, "keyward.v1.Sys/Unseal", Access::Open);
    let (req, mut call) = match VaultRequest::start(req, &state, route).await {
        Ok(started) => started,
        Err(r) => return r,
    };
    call.set_resource("sys/unseal");
    let body: UnsealBody = match req.json(&mut call) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if body.migrate {
        return failure(&call.fail(Failure::invalid(
            "keyward has no seal migration: migrate must be false",
        )));
    }
    let key = body.key.as_deref().map(str::trim).unwrap_or("");
    if !body.reset && key.is_empty() {
        return failure(&call.fail(Failure::invalid(
            "give key (an unseal share) or reset: true",
        )));
    }
    // Recorded before it acts, decided under the seal lock (see
    // `Core::unseal_if_sealed`).
    let share = (!body.reset).then_some(key);
    let status = match state
        .core
        .unseal_if_sealed(share, || call.record_request())
        .await
        .map(|unsealed| call.check(unsealed))
    {
        Ok(Ok(s)) => s,
        Ok(Err(f)) | Err(f) => return failure(&f),
    };
    state.notify_seal(status.sealed);
    if let Err(f) = call.ok(&[]) {
        return failure(&f);
    }
    json_response(StatusCode::OK, &seal_status_body(&state.core))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InitBody {
    secret_shares: u32,
    secret_threshold: u32,
    /// Vault's PGP-wrapped shares; keyward does not encrypt shares to PGP
    /// keys, so only an empty list is accepted.
    #[serde(default)]
    pgp_keys: Option<Vec<String>>,
    #[serde(default)]
    root_token_pgp_key: Option<String>,
}

/// `GET sys/init` → `{"initialized"}`; `PUT|POST sys/init
/// {"secret_shares", "secret_threshold"}` → `{"keys", "keys_base64",
/// "root_token"}` (the shares in keyward's format, the same in both lists).
async fn init(State(state): State<HttpState>, req: Request) -> Response {
    if req.method() == Method::GET {
        let (_req, call) = match status_read(&state, req, "sys/init", Methods::Get).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let initialized = state.core.status().initialized;
        return match call.ok(&[]) {
            Ok(()) => json_response(StatusCode::OK, &json!({ "initialized": initialized })),
            Err(f) => failure(&f),
        };
    }
    // GET was served above: any other method but PUT or POST is refused
    // naming all three.
    let req = match VaultRequest::read(req, &state).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Err(r) = req.allow(&state, Methods::GetOrWrite).await {
        return r;
    }
    let mut call = match req
        .begin(&state.core, "keyward.v1.Sys/Init", Access::Open)
        .await
    {
        Ok(c) => c,
        Err(r) => return r,
    };
    call.set_resource("sys/init");
    let body: InitBody = match req.json(&mut call) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if body.pgp_keys.is_some_and(|k| !k.is_empty()) || body.root_token_pgp_key.is_some() {
        return failure(&call.fail(Failure::invalid(
            "keyward does not encrypt shares to PGP keys: leave pgp_keys and root_token_pgp_key out",
        )));
    }
    let shares = match call.check(
        u8::try_from(body.secret_shares)
            .map_err(|_| Failure::invalid("secret_shares must be between 1 and 255")),
    ) {
        Ok(n) => n,
        Err(f) => return failure(&f),
    };
    let threshold = match call.check(
        u8::try_from(body.secret_threshold)
            .map_err(|_| Failure::invalid("secret_threshold must be between 1 and secret_shares")),
    ) {
        Ok(n) => n,
        Err(f) => return failure(&f),
    };
    if !state.core.status().initialized {
        if let Err(f) = call.record_request() {
            return failure(&f);
        }
    }
    let out = match call.check(state.core.init(shares, threshold).await) {
        Ok(o) => o,
        Err(f) => return failure(&f),
    };
    if let Err(f) = call.ok(&[]) {
        return failure(&f);
    }
    let keys: Vec<&str> = out.shares.iter().map(|s| s.0.as_str()).collect();
    json_response(
        StatusCode::OK,
        &json!({
            "keys": keys,
            "keys_base64": keys,
            "root_token": out.root_token.expose(),
        }),
    )
}
