//! Vault's token endpoints, `auth/token/*`, over keyward's tokens (`kwt_`
//! tokens and `kwa_` accessors, opaque to Vault clients). Each is the gRPC
//! `Auth` method of the same meaning, through the same helpers
//! (`api::auth::child_request`, `AuthService::resolve`), so the rules of who
//! may look up, renew or revoke which token are written once.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::Method;
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use serde_json::{json, Map, Value};

use super::reply::{no_content, time, Answer, Envelope, VaultRequest};
use super::HttpState;
use crate::api::auth::{child_request, AuthService, Target};
use crate::core::call::{Access, Call, Failure};
use crate::policy::Capability;
use crate::token::{Delegation, TokenError, TokenInfo};

pub fn routes() -> Router<HttpState> {
    Router::new().route("/v1/auth/token/{op}", any(token))
}

async fn token(State(state): State<HttpState>, Path(op): Path<String>, req: Request) -> Answer {
    let req = VaultRequest::read(req, &state).await?;
    let m = &req.method;
    let write = *m == Method::POST || *m == Method::PUT;
    match op.as_str() {
        "create" if write => create(&state, &req).await,
        "lookup-self" if *m == Method::GET || write => lookup(&state, &req, Which::Own).await,
        "lookup" if write => lookup(&state, &req, Which::Body).await,
        "lookup-accessor" if write => lookup(&state, &req, Which::Accessor).await,
        "renew-self" | "renew" if write => renew(&state, &req, op == "renew").await,
        "revoke-self" if write => revoke(&state, &req, Which::Own).await,
        "revoke" if write => revoke(&state, &req, Which::Body).await,
        "revoke-accessor" if write => revoke(&state, &req, Which::Accessor).await,
        "lookup-self" => Err(req.method_not_allowed(&state, "GET, PUT or POST").await),
        "create" | "lookup" | "lookup-accessor" | "renew-self" | "renew" | "revoke-self"
        | "revoke" | "revoke-accessor" => Err(req.method_not_allowed(&state, "PUT or POST").await),
        _ => Err(req
            .not_found(
                &state,
                "no handler for this route: auth/token serves create, lookup, lookup-self, \
                 lookup-accessor, renew, renew-self, revoke, revoke-self, revoke-accessor",
            )
            .await),
    }
}

/// Seconds from a Vault duration field: a number, digits, or keyward's
/// duration grammar (`90s`, `15m`, `1h`, `30d`); absent or "" is 0.
fn seconds_of(body: &Map<String, Value>, name: &str) -> Result<u64, Failure> {
    seconds_value(body.get(name), name)
}

/// [`seconds_of`] for a value already taken out of a body.
pub(super) fn seconds_value(value: Option<&Value>, name: &str) -> Result<u64, Failure> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| Failure::invalid(format!("{name} must be a whole number of seconds"))),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(0),
        Some(Value::String(s)) => crate::duration::parse(s)
            .map(|d| d.as_secs())
            .map_err(|e| Failure::invalid(format!("{name}: {e}"))),
        Some(_) => Err(Failure::invalid(format!(
            "{name} must be a duration such as 1h or a number of seconds"
        ))),
    }
}

fn string_of(body: &Map<String, Value>, name: &str) -> Result<String, Failure> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.trim().to_owned()),
        Some(_) => Err(Failure::invalid(format!("{name} must be a string"))),
    }
}

/// Vault's token-create fields keyward has no equivalent of: refused when
/// set to anything but their default, so a client never gets less than it
/// asked for without knowing.
fn refuse_unsupported(body: &Map<String, Value>) -> Result<(), Failure> {
    let set = |k: &str| match body.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty() && s != "service" && s != "0" && s != "0s",
        Some(Value::Number(n)) => n.as_u64() != Some(0),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    };
    for k in [
        "no_parent",
        "period",
        "role_name",
        "type",
        "entity_alias",
        "id",
    ] {
        if set(k) {
            return Err(Failure::invalid(format!(
                "{k} is not supported by keyward's tokens (every token is a service token \
                 with a parent and a max TTL)"
            )));
        }
    }
    if body.get("renewable") == Some(&Value::Bool(false)) {
        return Err(Failure::invalid(
            "renewable: false is not supported: keyward's tokens renew up to their max TTL",
        ));
    }
    Ok(())
}

/// The body as a JSON object (an empty body is `{}`).
fn object(
    req: &VaultRequest,
    call: &mut Call,
) -> Result<Map<String, Value>, axum::response::Response> {
    req.json::<Map<String, Value>>(call)
}

/// Vault's `auth` block for a token just issued or renewed.
fn auth_block(
    token: &str,
    accessor: &str,
    policies: &[String],
    expires_at_ms: u64,
    now_ms: u64,
    uses: u32,
) -> Value {
    json!({
        "client_token": token,
        "accessor": accessor,
        "policies": policies,
        "token_policies": policies,
        "identity_policies": null,
        "metadata": null,
        "lease_duration": ttl_left(expires_at_ms, now_ms),
        "renewable": true,
        "entity_id": "",
        "token_type": "service",
        "orphan": false,
        "mfa_requirement": null,
        "num_uses": uses,
    })
}

fn ttl_left(expires_at_ms: u64, now_ms: u64) -> u64 {
    if expires_at_ms == 0 {
        0
    } else {
        expires_at_ms.saturating_sub(now_ms) / 1000
    }
}

/// `POST auth/token/create {"policies", "ttl", "explicit_max_ttl",
/// "num_uses", "bound_cidrs"}`: a child of the calling token (`issue` on
/// `sys/token`; policies a subset of the caller's; none given: the
/// caller's own, as Vault does).
async fn create(state: &HttpState, req: &VaultRequest) -> Answer {
    let mut call = req
        .begin(&state.core, "keyward.v1.Auth/IssueToken", Access::Token)
        .await?;
    let body = object(req, &mut call)?;
    call.check(refuse_unsupported(&body))?;
    let caller = call.require_caller()?;
    let mut policies: Vec<String> = match body.get("policies") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for p in a {
                match p.as_str() {
                    Some(s) => out.push(s.to_owned()),
                    None => {
                        return Err(call
                            .fail(Failure::invalid("policies must be a list of names"))
                            .into())
                    }
                }
            }
            out
        }
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(_) => {
            return Err(call
                .fail(Failure::invalid("policies must be a list of names"))
                .into())
        }
    };
    // Vault adds its "default" policy to every token; keyward has none of
    // that name unless an operator made one, so it is dropped when absent.
    let default_exists = matches!(state.core.policies.get("default"), Ok(Some(_)));
    let named = !policies.is_empty();
    if !default_exists {
        policies.retain(|p| p != "default");
    }
    if policies.is_empty() {
        if named {
            // Only `default` was asked for: a narrow token. Falling back to
            // the caller's policies would hand out the widest one it can
            // make (a root token, for a root caller).
            return Err(call
                .fail(Failure::invalid(
                    "policy default does not exist in keyward (Vault's default policy has no \
                     counterpart here): name the policies the new token should hold",
                ))
                .into());
        }
        policies = caller.policies.clone();
    }
    let ttl = call.check(seconds_of(&body, "ttl"))?;
    let max_ttl = call.check(seconds_of(&body, "explicit_max_ttl"))?;
    let uses = match body.get("num_uses") {
        None | Some(Value::Null) => 0,
        Some(v) => call.check(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| Failure::invalid("num_uses must be a whole number")),
        )?,
    };
    let cidrs = call.check(super::reply::string_list(&body, "bound_cidrs"))?;
    let request = child_request(&mut call, policies, ttl, max_ttl, uses, &cidrs)?;
    let issued = call.check(
        state
            .core
            .tokens
            .issue_on_runtime(request, Delegation::default())
            .await,
    )?;
    call.check(state.core.barrier.durable().await)?;
    call.set_resource(format!("sys/token/{}", issued.accessor));
    call.ok_async(&[]).await?;
    let auth = auth_block(
        issued.token.expose(),
        &issued.accessor,
        &issued.policies,
        issued.expires_at_ms,
        issued.issued_at_ms,
        uses,
    );
    Ok(Envelope::auth(req.request_id(), auth).into_response())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    /// The calling token.
    Own,
    /// `{"token": T}` in the body.
    Body,
    /// `{"accessor": A}` in the body.
    Accessor,
}

/// The target of a lookup or revoke, as gRPC's Target: the body's token or
/// accessor, or the caller's own.
fn target_of(
    call: &mut Call,
    body: &Map<String, Value>,
    which: Which,
) -> Result<(Target, Option<String>), Failure> {
    match which {
        Which::Own => Ok((Target::Own, None)),
        Which::Body => {
            let token = call.check(string_of(body, "token"))?;
            if token.is_empty() {
                return Err(call.fail(Failure::invalid("token is required")));
            }
            Ok((AuthService::target(call, &token, "")?, Some(token)))
        }
        Which::Accessor => {
            let accessor = call.check(string_of(body, "accessor"))?;
            if accessor.is_empty() {
                return Err(call.fail(Failure::invalid("accessor is required")));
            }
            Ok((AuthService::target(call, "", &accessor)?, None))
        }
    }
}

/// Vault's token lookup `data`.
fn lookup_data(info: &TokenInfo, id: Option<&str>, now_ms: u64) -> Value {
    let ttl = ttl_left(info.expires_at_ms, now_ms);
    let creation_ttl = if info.expires_at_ms == 0 {
        0
    } else {
        info.expires_at_ms.saturating_sub(info.created_at_ms) / 1000
    };
    let explicit_max = if info.max_expiry_ms == 0 {
        0
    } else {
        info.max_expiry_ms.saturating_sub(info.created_at_ms) / 1000
    };
    json!({
        "accessor": info.accessor,
        "creation_time": info.created_at_ms / 1000,
        "creation_ttl": creation_ttl,
        "display_name": info.identity,
        "entity_id": "",
        "expire_time": if info.expires_at_ms == 0 { Value::Null } else { json!(time(info.expires_at_ms)) },
        "explicit_max_ttl": explicit_max,
        "id": id.unwrap_or(""),
        "issue_time": time(info.created_at_ms),
        "meta": { "identity": info.identity },
        "num_uses": info.uses_remaining,
        "orphan": info.parent_accessor.is_empty(),
        "path": if info.method == "token" { "auth/token/create".to_owned() } else { format!("auth/{}/login", info.method) },
        "policies": info.policies,
        "renewable": info.expires_at_ms != 0,
        "ttl": ttl,
        "type": "service",
        "bound_cidrs": info.cidrs,
    })
}

async fn lookup(state: &HttpState, req: &VaultRequest, which: Which) -> Answer {
    let mut call = req
        .begin(&state.core, "keyward.v1.Auth/LookupToken", Access::Token)
        .await?;
    let body = object(req, &mut call)?;
    let caller = call.require_caller()?;
    let (target, held) = target_of(&mut call, &body, which)?;
    let service = AuthService::new(Arc::clone(&state.core));
    let acc = service.resolve(&mut call, &caller, target, Capability::Read)?;
    let now = state.core.clock().now_ms();
    let info = call.check(state.core.tokens.lookup_accessor(&acc, now))?;
    let Some(info) = info else {
        return Err(call.fail(TokenError::NotFound).into());
    };
    call.ok(&[])?;
    // The token's text is shown only to whoever sent it.
    let id = match which {
        Which::Own => req.token_text(),
        Which::Body => held,
        Which::Accessor => None,
    };
    Ok(Envelope::data(req.request_id(), lookup_data(&info, id.as_deref(), now)).into_response())
}

/// `renew-self {"increment"}`, or `renew {"token", "increment"}` for the
/// calling token only: keyward renews no other token.
async fn renew(state: &HttpState, req: &VaultRequest, named: bool) -> Answer {
    let mut call = req
        .begin(&state.core, "keyward.v1.Auth/RenewToken", Access::Token)
        .await?;
    let body = object(req, &mut call)?;
    let caller = call.require_caller()?;
    if named {
        let token = call.check(string_of(&body, "token"))?;
        if !token.is_empty() && Some(token.as_str()) != req.token_text().as_deref() {
            return Err(call
                .fail(Failure::invalid(
                    "keyward renews only the calling token: send renew-self with the token to renew",
                ))
                .into());
        }
    }
    let increment = call.check(seconds_of(&body, "increment"))?;
    let increment = (increment > 0).then(|| std::time::Duration::from_secs(increment));
    let service = AuthService::new(Arc::clone(&state.core));
    let acc = service.resolve(&mut call, &caller, Target::Own, Capability::Write)?;
    let now = state.core.clock().now_ms();
    let info = call.check(state.core.tokens.renew(&acc, increment, now))?;
    call.check(state.core.barrier.durable().await)?;
    call.ok(&[])?;
    let token = req.token_text().unwrap_or_default();
    let auth = auth_block(
        &token,
        &info.accessor,
        &info.policies,
        info.expires_at_ms,
        now,
        info.uses_remaining,
    );
    Ok(Envelope::auth(req.request_id(), auth).into_response())
}

async fn revoke(state: &HttpState, req: &VaultRequest, which: Which) -> Answer {
    let mut call = req
        .begin(&state.core, "keyward.v1.Auth/RevokeToken", Access::Token)
        .await?;
    let body = object(req, &mut call)?;
    let caller = call.require_caller()?;
    let (target, _) = target_of(&mut call, &body, which)?;
    let service = AuthService::new(Arc::clone(&state.core));
    let acc = service.resolve(&mut call, &caller, target, Capability::Delete)?;
    let revoked = call.check(state.core.tokens.revoke(&acc))?;
    if revoked == 0 {
        return Err(call.fail(TokenError::NotFound).into());
    }
    call.check(state.core.barrier.durable().await)?;
    call.ok(&[])?;
    Ok(no_content())
}
