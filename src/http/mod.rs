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
//! (envelope, errors, request reading), one file per group of routes, each
//! with its own `routes()`: `sys.rs`.

pub mod listen;
pub mod oidc;
pub mod reply;
pub mod sys;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Router;

use crate::config::ServerLimits;
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
}

impl HttpState {
    pub fn new(core: Arc<Core>, limits: ServerLimits) -> Self {
        Self {
            core,
            limits,
            on_seal_change: None,
        }
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
        .merge(oidc::routes())
        // OIDC discovery (src/http/oidc.rs) merges here: `.merge(oidc::routes())`.
        .fallback(not_found)
        .with_state(state)
}

/// Vault's answer to a path it has no handler for.
async fn not_found(req: Request) -> Response {
    let path = req.uri().path();
    let shown: String = path.chars().take(200).collect();
    reply::errors(
        StatusCode::NOT_FOUND,
        &format!("no handler for route \"{shown}\""),
    )
}
