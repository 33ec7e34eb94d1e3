//! Vault's dynamic database credentials and its lease endpoints, over
//! keyward's dynamic roles and leases: `database/creds/<role>`,
//! `sys/leases/lookup`, `sys/leases/renew[/<id>]`,
//! `sys/leases/revoke[/<id>]`, `sys/leases/revoke-prefix/<prefix>`, and
//! Vault's older aliases `sys/renew`, `sys/revoke`, `sys/revoke-prefix`.
//!
//! Each is the gRPC method of the same meaning (`Dynamic/Creds`,
//! `Leases/Lookup`, `Leases/Renew`, `Leases/Revoke`), through the same
//! functions of `api::dynamic` and `api::leases`, so who may issue, look
//! up, renew or revoke which lease is written once. A lease id is
//! keyward's (`dynamic/<role>/<id>`); clients treat it as opaque.

use axum::extract::{Path, Request, State};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::reply::{
    json_response, no_content, time, Answer, Envelope, Methods, Route, VaultRequest,
};
use super::token::seconds_value;
use super::HttpState;
use crate::api::{dynamic as api_dynamic, leases as api_leases};
use crate::core::call::{Access, Call, Failure};
use crate::policy::Capability;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/database/creds/{role}", any(creds))
        .route("/v1/sys/leases/lookup", any(lookup))
        .route("/v1/sys/leases/lookup/{*prefix}", any(list))
        .route("/v1/sys/leases/renew", any(renew))
        .route("/v1/sys/leases/renew/{*id}", any(renew_named))
        .route("/v1/sys/leases/revoke", any(revoke))
        .route("/v1/sys/leases/revoke/{*id}", any(revoke_named))
        .route("/v1/sys/leases/revoke-prefix/{*prefix}", any(revoke_prefix))
        .route("/v1/sys/renew", any(renew))
        .route("/v1/sys/renew/{*id}", any(renew_named))
        .route("/v1/sys/revoke", any(revoke))
        .route("/v1/sys/revoke/{*id}", any(revoke_named))
        .route("/v1/sys/revoke-prefix/{*prefix}", any(revoke_prefix))
}

const CREDS: Route = Route::new(Methods::Get, "keyward.v1.Dynamic/Creds", Access::Token);
const LOOKUP: Route = Route::new(Methods::Write, "keyward.v1.Leases/Lookup", Access::Token);
const LIST: Route = Route::new(Methods::Get, "keyward.v1.Leases/List", Access::Token);
const RENEW: Route = Route::new(Methods::Write, "keyward.v1.Leases/Renew", Access::Token);
const REVOKE: Route = Route::new(Methods::Write, "keyward.v1.Leases/Revoke", Access::Token);

/// Whole seconds from `now_ms` until `until_ms` (0 once past).
fn seconds_left(until_ms: u64, now_ms: u64) -> u64 {
    until_ms.saturating_sub(now_ms) / 1000
}

/// `GET database/creds/<role>`: a new database user from the dynamic role
/// `role` (`issue` on `dynamic/<role>`), held by the calling token. Vault's
/// answer: the lease at the top, `data.username` and `data.password`.
async fn creds(State(state): State<HttpState>, Path(role): Path<String>, req: Request) -> Answer {
    let (req, mut call) = VaultRequest::start(req, &state, CREDS).await?;
    let issued = api_dynamic::issue_creds(&state.core, &mut call, &role, None).await?;
    let password = issued.password.expose_str().unwrap_or_default().to_owned();
    call.ok(&[("password", password.as_bytes())])?;
    let lease = issued.lease;
    let now = state.core.clock().now_ms();
    let mut envelope = Envelope::data(
        req.request_id(),
        json!({ "username": lease.username, "password": password }),
    );
    envelope.lease_id = lease.id;
    envelope.lease_duration = seconds_left(lease.expires_ms, now);
    envelope.renewable = true;
    envelope.mount_type = Some("database");
    Ok(envelope.into_response())
}

/// The lease id of a request: the one in the path, else the body's
/// `lease_id`; both given must agree.
fn lease_id_of(
    call: &mut Call,
    named: Option<&str>,
    body: Option<String>,
) -> Result<String, Failure> {
    let body = body.map(|b| b.trim().to_owned()).filter(|b| !b.is_empty());
    let named = named.map(str::trim).filter(|n| !n.is_empty());
    match (named, body) {
        (Some(n), Some(b)) if n != b => Err(call.fail(Failure::invalid(
            "the lease id in the path and lease_id in the body differ: give one",
        ))),
        (Some(n), _) => Ok(n.to_owned()),
        (None, Some(b)) => Ok(b),
        (None, None) => Err(call.fail(Failure::invalid("lease_id is required"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupBody {
    #[serde(default)]
    lease_id: Option<String>,
}

/// `PUT|POST sys/leases/lookup {"lease_id"}`: the lease's times (the
/// holding token, or `read` on `sys/leases/<id>`).
async fn lookup(State(state): State<HttpState>, req: Request) -> Answer {
    let (req, mut call, body) = VaultRequest::start_json::<LookupBody>(req, &state, LOOKUP).await?;
    let id = lease_id_of(&mut call, None, body.lease_id)?;
    let record = api_leases::owned_or_allowed(&state.core, &mut call, &id, Capability::Read)?;
    call.ok(&[])?;
    let now = state.core.clock().now_ms();
    Ok(Envelope::data(
        req.request_id(),
        json!({
            "id": record.id,
            "issue_time": time(record.created_ms),
            "expire_time": time(record.expires_ms),
            // keyward keeps no renewal time apart from the new expiry.
            "last_renewal": Value::Null,
            "renewable": !record.revoking,
            "ttl": seconds_left(record.expires_ms, now),
        }),
    )
    .into_response())
}

/// `LIST sys/leases/lookup/<prefix>` (or `GET ?list=true`): the names
/// right under the prefix, lease ids and sub-prefixes (`role/`), as Vault
/// answers (`list` on `sys/leases/<prefix>`); none is 404.
async fn list(State(state): State<HttpState>, Path(prefix): Path<String>, req: Request) -> Answer {
    let req = VaultRequest::read(req, &state).await?;
    if !req.is_list() {
        return Err(req
            .method_not_allowed(&state, "LIST (or GET with ?list=true)")
            .await);
    }
    let mut call = req.begin(&state.core, LIST.seam, LIST.access).await?;
    let leases = api_leases::list(&mut call, &prefix, false).await?;
    call.ok(&[])?;
    let under = format!("{}/", prefix.trim_end_matches('/'));
    let keys = super::reply::child_keys(leases.iter().map(|l| l.id.as_str()), &under);
    if keys.is_empty() {
        return Err(super::reply::errors(axum::http::StatusCode::NOT_FOUND, ""));
    }
    Ok(Envelope::data(req.request_id(), json!({ "keys": keys })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    #[serde(default)]
    lease_id: Option<String>,
    /// Seconds, or a duration such as `1h`; absent, null or 0: the role's TTL.
    #[serde(default)]
    increment: Option<Value>,
}

/// `PUT|POST sys/leases/renew {"lease_id", "increment"}`.
async fn renew(State(state): State<HttpState>, req: Request) -> Answer {
    renew_lease(state, req, None).await
}

/// `PUT|POST sys/leases/renew/<lease id> {"increment"}`.
async fn renew_named(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    req: Request,
) -> Answer {
    renew_lease(state, req, Some(id)).await
}

/// Extends the lease by `increment` from now (the holding token, or
/// `write` on `sys/leases/<id>`), never past its max TTL nor the end of the
/// token that holds it. Vault's answer: the lease at the top, no data.
async fn renew_lease(state: HttpState, req: Request, named: Option<String>) -> Answer {
    let (req, mut call, body) = VaultRequest::start_json::<RenewBody>(req, &state, RENEW).await?;
    let id = lease_id_of(&mut call, named.as_deref(), body.lease_id)?;
    let increment = call.check(seconds_value(body.increment.as_ref(), "increment"))?;
    let increment = (increment > 0).then(|| std::time::Duration::from_secs(increment));
    let renewed = api_leases::renew(&state.core, &mut call, &id, increment).await?;
    call.ok(&[])?;
    let now = state.core.clock().now_ms();
    let mut envelope = Envelope::data(req.request_id(), Value::Null);
    envelope.lease_id = renewed.id;
    envelope.lease_duration = seconds_left(renewed.expires_ms, now);
    envelope.renewable = !renewed.revoking;
    Ok(envelope.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    lease_id: Option<String>,
    /// Vault's `sync`: accepted either way; keyward always revokes before
    /// it answers (a client that would wait less gets more, never less).
    #[serde(default)]
    #[allow(dead_code)]
    sync: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokePrefixBody {
    /// hvac repeats the path's prefix in the body; it must agree.
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    sync: Option<bool>,
}

/// 204 when every user is gone; 202 with a warning when a target could
/// not be reached and the lease sweeper retries (the lease stays listed
/// as failing until it succeeds).
fn revoked_answer(req: &VaultRequest, pending: u32) -> axum::response::Response {
    if pending == 0 {
        return no_content();
    }
    let mut envelope = Envelope::data(req.request_id(), Value::Null);
    envelope.warnings = vec![format!(
        "{pending} lease(s) could not be revoked on their target yet; keyward retries them \
         (see `keyward lease list --failed`)"
    )];
    json_response(axum::http::StatusCode::ACCEPTED, &envelope.into_value())
}

/// `PUT|POST sys/leases/revoke {"lease_id"}`.
async fn revoke(State(state): State<HttpState>, req: Request) -> Answer {
    revoke_lease(state, req, None).await
}

/// `PUT|POST sys/leases/revoke/<lease id>`.
async fn revoke_named(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    req: Request,
) -> Answer {
    revoke_lease(state, req, Some(id)).await
}

/// Revokes the lease (the holding token, or `delete` on
/// `sys/leases/<id>`): the user is dropped on its target before the answer.
async fn revoke_lease(state: HttpState, req: Request, named: Option<String>) -> Answer {
    let (req, mut call, body) = VaultRequest::start_json::<RevokeBody>(req, &state, REVOKE).await?;
    let id = lease_id_of(&mut call, named.as_deref(), body.lease_id)?;
    let (_, pending) = api_leases::revoke(&state.core, &mut call, &id).await?;
    call.ok(&[])?;
    Ok(revoked_answer(&req, pending))
}

/// `PUT|POST sys/leases/revoke-prefix/<prefix>`: every lease under the
/// prefix (`delete` on `sys/leases/<prefix>/**`).
async fn revoke_prefix(
    State(state): State<HttpState>,
    Path(prefix): Path<String>,
    req: Request,
) -> Answer {
    let (req, mut call, body) =
        VaultRequest::start_json::<RevokePrefixBody>(req, &state, REVOKE).await?;
    let trim = |p: &str| p.trim().trim_end_matches('/').to_owned();
    if let Some(given) = body.prefix.as_deref().map(trim) {
        if !given.is_empty() && given != trim(&prefix) {
            return Err(call
                .fail(Failure::invalid(
                    "the prefix in the path and prefix in the body differ: give one",
                ))
                .into());
        }
    }
    let (_, pending) = api_leases::revoke_prefix(&state.core, &mut call, &prefix).await?;
    call.ok(&[])?;
    Ok(revoked_answer(&req, pending))
}
