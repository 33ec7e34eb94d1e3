//! OIDC discovery for relying parties: `/.well-known/openid-configuration`
//! and the JWKS it points to (`/.well-known/jwks.json`), public keys only,
//! cacheable for 5 minutes (a relying party that meets an unknown `kid`
//! fetches again; a retired key stays published for as long as any token it
//! signed lives). No token needed; each fetch is one
//! call of the request seam (`keyward.v1.Federation/Discovery`), counted
//! into the aggregated unauthenticated audit records.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

use super::reply::{failure, method_not_allowed, VaultRequest};
use super::HttpState;
use crate::core::call::Access;

/// How long relying parties may cache the documents.
const CACHE_CONTROL: &str = "public, max-age=300";

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/.well-known/openid-configuration", any(configuration))
        .route("/.well-known/jwks.json", any(jwks))
}

async fn configuration(State(state): State<HttpState>, req: Request) -> Response {
    serve(state, req, true).await
}

async fn jwks(State(state): State<HttpState>, req: Request) -> Response {
    serve(state, req, false).await
}

async fn serve(state: HttpState, req: Request, configuration: bool) -> Response {
    let req = match VaultRequest::read(req, state.limits.max_request_bytes).await {
        Ok(req) => req,
        Err(r) => return r,
    };
    if req.method != Method::GET && req.method != Method::HEAD {
        return method_not_allowed(&req.method, "GET or HEAD");
    }
    let mut call = match req
        .begin(&state.core, "keyward.v1.Federation/Discovery", Access::Open)
        .await
    {
        Ok(call) => call,
        Err(r) => return r,
    };
    call.set_resource("sys/oidc");
    if state.core.is_sealed() {
        return failure(&call.fail(crate::barrier::BarrierError::Sealed));
    }
    let (doc, jwks) = match state.core.federation.discovery() {
        Ok(both) => both,
        Err(e) => return failure(&call.fail(e)),
    };
    if let Err(f) = call.ok(&[]) {
        return failure(&f);
    }
    let body = if configuration { doc } else { jwks };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    response
}
