//! OIDC discovery for relying parties: `/.well-known/openid-configuration`
//! and the JWKS it points to (`/.well-known/jwks.json`), public keys only,
//! cacheable for 5 minutes (a relying party that meets an unknown `kid`
//! fetches again; a retired key stays published for as long as any token it
//! signed lives). No token needed; each fetch is one
//! call of the request seam (`keyward.v1.Federation/Discovery`), counted
//! into the aggregated unauthenticated audit records.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

use super::reply::{failure, Methods, Route, VaultRequest};
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
    let route = Route::new(
        Methods::GetOrHead,
        "keyward.v1.Federation/Discovery",
        Access::Open,
    );
    let (_req, mut call) = match VaultRequest::start(req, &state, route).await {
        Ok(started) => started,
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
