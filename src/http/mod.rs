//! http: the one HTTPS listener and what it serves. Today that is the
//! Vault-compatible API under `/v1/` (Vault 1.14's request and response
//! shapes, so the `vault` and `bao` CLIs, hvac and curl scripts work
//! unchanged); the dashboard and OIDC discovery join it here.
//!
//! Like `api` for gRPC, this layer holds no business rule: each handler
//! reads the request into the core's request seam (`core::call`, through
//! [`reply::VaultRequest`]), parses the body into domain types, calls the
//! domain, and maps the seam's failure kinds to HTTP statuses in one
//! function ([`reply::http_status`]). Authorization, audit and metrics are
//! the seam's, the same as gRPC's. Owns no storage prefix.
//!
//! Files: `listen.rs` (TLS, connection bounds, serving, drain), `reply.rs`
//! (envelope, errors, the handler prelude `VaultRequest::start` and the
//! audited refusals 404/405/408/413), one file per group of routes, each
//! with its own `routes()`: `sys.rs`, `kv.rs` (KV v2 at `secret/`),
//! `token.rs` (`auth/token/*`), `login.rs` (AppRole, JWT, cert logins),
//! `dynamic.rs` (`database/creds`, `sys/leases/*`), `pki.rs` (`pki/*`).

// A handler's error is its answer (a `Response`, 128 bytes), returned once
// per request on the way out; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

pub mod kv;
pub mod listen;
pub mod login;
pub mod oidc;
pub mod reply;
pub mod sys;
pub mod token;
// Dynamic credentials, leases and PKI (issue 15's last routes).
pub mod dynamic;
pub mod pki;
pub mod ui;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;

use crate::config::ServerLimits;
use crate::core::call;
use crate::core::Core;

/// What every handler of the listener is given.
#[derive(Clone)]
pub struct HttpState {
    pub core: Arc<Core>,
    /// `limits.*`: `max_request_bytes` bounds every request body.
    pub limits: ServerLimits,
    /// Told when a request of this listener seals or unseals the vault (the
    /// server points it at the gRPC health service).
    on_seal_change: Option<Arc<dyn Fn(bool) + Send + Sync>>,
    /// `governance.*` (recertification), for the dashboard's attestations.
    pub governance: crate::config::GovernanceConfig,
}

impl HttpState {
    pub fn new(core: Arc<Core>, limits: ServerLimits) -> Self {
        Self {
            core,
            limits,
            on_seal_change: None,
            governance: crate::config::GovernanceConfig::default(),
        }
    }

    /// The recertification settings the dashboard shows attestations by.
    pub fn with_governance(mut self, governance: crate::config::GovernanceConfig) -> Self {
        self.governance = governance;
        self
    }

    /// Calls `hook(sealed)` after an HTTP seal or unseal.
    pub fn with_seal_hook(mut self, hook: Arc<dyn Fn(bool) + Send + Sync>) -> Self {
        self.on_seal_change = Some(hook);
        self
    }

    pub(crate) fn notify_seal(&self, sealed: bool) {
        if let Some(hook) = &self.on_seal_change {
            hook(sealed);
        }
    }
}

/// Everything the HTTPS listener serves, one `routes()` per file merged
/// here. Unknown paths get Vault's 404 with `{"errors": [...]}`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .merge(sys::routes())
        .merge(kv::routes())
        .merge(token::routes())
        .merge(login::routes())
        .merge(oidc::routes())
        // OIDC discovery (src/http/oidc.rs) merges here: `.merge(oidc::routes())`.
        // Dynamic credentials, leases and PKI.
        .merge(dynamic::routes())
        .merge(pki::routes())
        .merge(ui::routes())
        .fallback(not_found)
        .with_state(state)
}

/// Vault's answer to a path it has no handler for. The path is not echoed:
/// a client that puts a token in a path (Vault's old `lookup/<token>`)
/// must not find it in an answer a proxy might log.
/// Audited (`reply::refuse`) without the path, the token or the body.
async fn not_found(State(state): State<HttpState>, req: Request) -> Response {
    let request_id = call::request_id(
        req.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
    );
    let source = req.extensions().get::<listen::Peer>().map(|p| p.addr);
    reply::refuse(
        &state.core,
        reply::Refusal::NotFound,
        &request_id,
        source,
        "no handler for this route: keyward serves Vault's KV v2 at secret/, auth/token, \
         auth/approle, auth/jwt, auth/cert, database/creds, pki/, sys/leases and sys/ (see the \
         README's compatibility table)",
    )
    .await
}
