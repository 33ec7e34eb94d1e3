//! Vault's login endpoints over keyward's login methods, and AppRole's
//! role-id and secret-id reads (a Vault role is a keyward identity):
//! `auth/approle/login`, `auth/approle/role/<name>/role-id`,
//! `auth/approle/role/<name>/secret-id`, `auth/jwt/login` (`role` = the
//! identity, the issuer found by the JWT's `iss`), `auth/cert/login` (the
//! client certificate of this HTTPS connection). A login is gRPC's
//! `Auth/Login`: the domain checks the credential, then the same
//! `api::login::issue_login` issues the token.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::reply::{Answer, Envelope, Methods, Route, VaultRequest};
use super::HttpState;
use crate::api::identities::{parse_cidrs, IdentitiesService};
use crate::barrier::BarrierError;
use crate::core::call::{Access, Call, Failure};
use crate::identity::login::{Grant, LoginError};
use crate::identity::{IdentityError, IdentityName, SecretIdSpec};
use crate::policy::Capability;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/auth/approle/login", any(approle_login))
        .route("/v1/auth/approle/role/{name}/role-id", any(role_id))
        .route("/v1/auth/approle/role/{name}/secret-id", any(secret_id))
        .route("/v1/auth/jwt/login", any(jwt_login))
        .route("/v1/auth/cert/login", any(cert_login))
}

/// A login: no token; as gRPC's Login.
const LOGIN: Route = Route::new(Methods::Write, "keyward.v1.Auth/Login", Access::Open);

/// Starts a login call (refused while sealed) on `resource`.
async fn begin_login(
    state: &HttpState,
    req: Request,
    resource: &'static str,
) -> Result<(VaultRequest, Call), axum::response::Response> {
    let (req, mut call) = VaultRequest::start(req, state, LOGIN).await?;
    call.set_resource(resource);
    if state.core.is_sealed() {
        return Err(call.fail(BarrierError::Sealed).into());
    }
    Ok((req, call))
}

/// Issues the token of a checked credential and answers Vault's `auth`.
async fn finish(
    state: &HttpState,
    req: &VaultRequest,
    mut call: Call,
    grant: Result<Grant, LoginError>,
) -> Answer {
    let grant = call.check(grant)?;
    let issued = crate::api::login::issue_login(&state.core, &mut call, &grant, 0).await?;
    call.ok(&[("token", issued.token.expose().as_bytes())])?;
    let now = state.core.clock().now_ms();
    let ttl = issued.expires_at_ms.saturating_sub(now) / 1000;
    let auth = json!({
        "client_token": issued.token.expose(),
        "accessor": issued.accessor,
        "policies": issued.policies,
        "token_policies": issued.policies,
        "identity_policies": null,
        "metadata": { "identity": issued.identity },
        "lease_duration": ttl,
        "renewable": true,
        "entity_id": "",
        "token_type": "service",
        "orphan": true,
        "mfa_requirement": null,
        "num_uses": 0,
    });
    Ok(Envelope::auth(req.request_id(), auth).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproleBody {
    role_id: String,
    #[serde(default)]
    secret_id: String,
}

/// `POST auth/approle/login {"role_id", "secret_id"}`.
async fn approle_login(State(state): State<HttpState>, req: Request) -> Answer {
    let (req, mut call) = begin_login(&state, req, "auth/login/approle").await?;
    let body: ApproleBody = req.json(&mut call)?;
    let source = req.peer.as_ref().map(|p| p.addr.ip());
    let now = state.core.clock().now_ms();
    let grant = state.core.login.approle(
        &state.core.identities,
        &body.role_id,
        &body.secret_id,
        source,
        now,
    );
    finish(&state, &req, call, grant).await
}

/// `POST auth/cert/login`: the client certificate this connection
/// presented (verified against `tls.client_ca` in the handshake).
async fn cert_login(State(state): State<HttpState>, req: Request) -> Answer {
    let (req, mut call) = begin_login(&state, req, "auth/login/cert").await?;
    // Vault's optional `name` (a certificate role) has no keyward meaning:
    // the certificate alone names the identity.
    let _: serde_json::Map<String, Value> = req.json(&mut call)?;
    let source = req.peer.as_ref().map(|p| p.addr.ip());
    let chain = req.peer.as_ref().and_then(|p| p.client_chain.clone());
    let now = state.core.clock().now_ms();
    let grant = state.core.login.cert(
        &state.core.identities,
        &state.core.pki,
        chain.as_deref().map_or(&[], Vec::as_slice),
        source,
        now,
    );
    finish(&state, &req, call, grant).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtBody {
    role: String,
    jwt: String,
}

/// The `iss` claim of a JWT, read without checking it (only to choose the
/// issuer that will check it).
fn unverified_iss(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// `POST auth/jwt/login {"role": IDENTITY, "jwt"}`: the issuer `role` is
/// bound to whose URL is the token's `iss` checks it (as `login oidc
/// --issuer`); the identity it maps to must be `role`.
async fn jwt_login(State(state): State<HttpState>, req: Request) -> Answer {
    let (req, mut call) = begin_login(&state, req, "auth/login/oidc").await?;
    let body: JwtBody = req.json(&mut call)?;
    // The issuer: one the role's identity is bound to whose URL is the
    // JWT's `iss` (several issuers may share a URL). Every miss is the same
    // refusal as a bad JWT.
    let issuers = call.check(state.core.identities.issuers())?;
    let role = call.check(state.core.identities.get(&body.role))?;
    let iss = unverified_iss(&body.jwt);
    let issuer = match (&role, iss.as_deref()) {
        (Some(role), Some(iss)) => issuers
            .iter()
            .find(|i| i.issuer_url == iss && role.oidc_bindings.iter().any(|b| b.issuer == i.name)),
        _ => None,
    };
    let Some(issuer) = issuer else {
        return Err(call.fail(LoginError::Invalid).into());
    };
    let source = req.peer.as_ref().map(|p| p.addr.ip());
    let now = state.core.clock().now_ms();
    let grant = state
        .core
        .login
        .oidc(&state.core.identities, &issuer.name, &body.jwt, source, now)
        .await;
    // The identity the JWT maps to must be the role asked for.
    let grant = match grant {
        Ok(g) if g.identity != body.role => Err(LoginError::Invalid),
        other => other,
    };
    finish(&state, &req, call, grant).await
}

/// `GET auth/approle/role/<name>/role-id`: the identity's role-id (`read`
/// on `identity/<name>`, as gRPC's Identities/Get that shows it).
async fn role_id(State(state): State<HttpState>, Path(name): Path<String>, req: Request) -> Answer {
    let route = Route::new(Methods::Get, "keyward.v1.Identities/Get", Access::Token);
    let (req, mut call) = VaultRequest::start(req, &state, route).await?;
    let name = call.check(IdentityName::parse(&name))?;
    call.authorize(Capability::Read, name.resource())?;
    let found = call.check(state.core.identities.get(name.as_str()))?;
    let record = call.check(found.ok_or(IdentityError::NotFound))?;
    call.ok(&[])?;
    Ok(Envelope::data(req.request_id(), json!({ "role_id": record.role_id })).into_response())
}

/// `POST auth/approle/role/<name>/secret-id {"ttl", "num_uses",
/// "cidr_list"}`: a new secret-id (`issue` on `identity/<name>`, and the
/// caller must hold the identity's policies, as gRPC's CreateSecretId).
async fn secret_id(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    req: Request,
) -> Answer {
    let route = Route::new(
        Methods::Write,
        "keyward.v1.Identities/CreateSecretId",
        Access::Token,
    );
    let (req, mut call) = VaultRequest::start(req, &state, route).await?;
    let body: serde_json::Map<String, Value> = req.json(&mut call)?;
    for k in body.keys() {
        if !matches!(k.as_str(), "ttl" | "num_uses" | "cidr_list" | "metadata") {
            return Err(call
                .fail(Failure::invalid(format!(
                    "{k} is not supported: secret-id takes ttl, num_uses and cidr_list"
                )))
                .into());
        }
    }
    let name = call.check(IdentityName::parse(&name))?;
    let ttl = match body.get("ttl") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => call.check(
            n.as_u64()
                .ok_or_else(|| Failure::invalid("ttl must be a whole number of seconds")),
        )?,
        Some(Value::String(s)) if s.is_empty() => 0,
        Some(Value::String(s)) => call.check(
            crate::duration::parse(s)
                .map(|d| d.as_secs())
                .map_err(|e| Failure::invalid(format!("ttl: {e}"))),
        )?,
        Some(_) => return Err(call.fail(Failure::invalid("ttl must be a duration")).into()),
    };
    let uses = match body.get("num_uses") {
        None | Some(Value::Null) => 0,
        Some(v) => call.check(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| Failure::invalid("num_uses must be a whole number")),
        )?,
    };
    let cidr_texts = call.check(super::reply::string_list(&body, "cidr_list"))?;
    let cidrs = call.check(parse_cidrs(&cidr_texts))?;
    call.authorize(Capability::Issue, name.resource())?;
    IdentitiesService::new(Arc::clone(&state.core)).require_holds_policies_of(&mut call, &name)?;
    let spec = SecretIdSpec {
        ttl_ms: ttl.saturating_mul(1000),
        uses,
        cidrs,
    };
    let now = state.core.clock().now_ms();
    let made = call.check(state.core.identities.create_secret_id(&name, spec, now))?;
    call.check(state.core.barrier.durable().await)?;
    call.ok(&[("secret_id", made.secret_id.expose().as_bytes())])?;
    let ttl_left = if made.expires_at_ms == 0 {
        0
    } else {
        made.expires_at_ms.saturating_sub(now) / 1000
    };
    Ok(Envelope::data(
        req.request_id(),
        json!({
            "secret_id": made.secret_id.expose(),
            "secret_id_accessor": "",
            "secret_id_ttl": ttl_left,
            "secret_id_num_uses": uses,
        }),
    )
    .into_response())
}
