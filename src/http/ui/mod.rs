//! The governance dashboard at `/ui/` on the HTTPS listener: read-only,
//! server-rendered HTML with inline SVG charts, no script.
//!
//! Sign-in is a form that POSTs the token; the answer sets a session cookie
//! (`kw_ui`: a random id, `HttpOnly; Secure; SameSite=Strict; Path=/ui/`,
//! 15 minutes) that maps, on the server only, to the token
//! ([`session::Sessions`]). The token never travels in a URL, is never
//! written into a page, and is never logged (the seam's audit record holds
//! only its HMAC). A query string is never read: a token put there is
//! ignored.
//!
//! Every page is one call of the request seam, authenticated with the
//! session's token and authorized as the API is: the overview needs `read`
//! on `sys/governance` (as `Governance/Report`), an identity's page `read`
//! on `identity/<name>` (as `Identities/Get` and `Lifecycle/Reads`); parts
//! of a page other API calls would authorize otherwise are shown only if
//! the caller may make those calls (see [`views`]). Calls are audited as
//! `keyward.ui/SignIn`, `keyward.ui/Overview`, `keyward.ui/Identity`.
//!
//! Every answer carries a strict CSP (`default-src 'none'`, styles from
//! `/ui/style.css` only, no script), `X-Frame-Options: DENY`,
//! `Cache-Control: no-store`, `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: same-origin` (not `no-referrer`: under it a browser
//! sends `Origin: null` on a form POST, and the Origin check below needs
//! the real one; the dashboard's URLs hold no secret anyway). The only
//! POSTs, sign-in and sign-out,
//! need an `Origin` equal to the listener's own (`https://<Host>`), on top
//! of `SameSite=Strict`.

pub mod page;
pub mod session;
pub mod views;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Router};
use zeroize::Zeroizing;

use super::listen::Peer;
use super::reply::{http_status, BODY_DEADLINE};
use super::HttpState;
use crate::core::call::{request_id, Access, Call, Failure, FailureKind, RequestMeta};
use crate::core::offload::Work;
use crate::identity::{IdentityError, IdentityName};
use crate::policy::Capability;
use session::{Sessions, COOKIE, SESSION_LIFETIME};

/// The longest sign-in form body read.
const MAX_FORM_BYTES: usize = 8 * 1024;

/// The Content-Security-Policy of every dashboard answer.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes, merged into the listener's router.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/ui", get(to_overview))
        .route("/ui/", get(overview))
        .route("/ui/style.css", get(style))
        .route("/ui/sign-in", get(sign_in_form).post(sign_in))
        .route("/ui/sign-out", post(sign_out))
        .route("/ui/identity/{name}", get(identity))
        // Any other path under /ui/ is this router's own (hardened) 404,
        // not the listener's bare one.
        .route("/ui/{*rest}", any(not_found))
        // Every answer of these routes, the router's own 405s included,
        // carries the dashboard's headers.
        .layer(axum::middleware::map_response(harden))
        .layer(Extension(Arc::new(Sessions::default())))
}

async fn not_found() -> Response {
    html(
        StatusCode::NOT_FOUND,
        page::problem("Not found", "There is no such page.", false),
    )
}

/// The security headers every dashboard answer carries.
async fn harden(r: Response) -> Response {
    harden_now(r)
}

fn harden_now(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

fn html(status: StatusCode, body: String) -> Response {
    harden_now(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

fn redirect(to: &'static str) -> Response {
    harden_now((StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response())
}

fn cookie_header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `Set-Cookie` of a new session.
pub fn session_cookie(id: &str, max_age_secs: u64) -> String {
    format!("{COOKIE}={id}; Path=/ui/; Max-Age={max_age_secs}; HttpOnly; Secure; SameSite=Strict")
}

/// The `Set-Cookie` that clears the session cookie.
fn cleared_cookie() -> String {
    format!("{COOKIE}=; Path=/ui/; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

/// The session id of the request's cookie, if any.
fn session_id(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k == COOKIE && !v.is_empty() {
                    return Some(v.to_owned());
                }
            }
        }
    }
    None
}

/// Whether a POST comes from a page of this listener: its `Origin` is
/// `https://` and the request's own host (`Host`, or the HTTP/2
/// authority), and `Sec-Fetch-Site`, if sent, is `same-origin`. A request
/// without `Origin` is refused: every browser this serves sends it on a
/// form POST.
fn same_origin(req: &Request) -> bool {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
    let Some(host) = host else { return false };
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    let site_ok = match req.headers().get("sec-fetch-site") {
        None => true,
        Some(v) => v.as_bytes() == b"same-origin",
    };
    site_ok && origin.is_some_and(|o| o.eq_ignore_ascii_case(&format!("https://{host}")))
}

fn meta(req_headers: &HeaderMap, peer: Option<&Peer>, method: &'static str) -> RequestMeta {
    RequestMeta {
        method,
        request_id: request_id(
            req_headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
        ),
        source: peer.map(|p| p.addr),
        token: None,
        acting: None,
    }
}

/// A failure of a page, as a page.
fn failure_page(f: &Failure, what: &str) -> Response {
    let message = match f.kind() {
        FailureKind::Denied => format!("Your token may not {what}."),
        FailureKind::NotFound => "There is no such identity.".to_owned(),
        FailureKind::Unavailable => format!(
            "The vault cannot answer now (sealed or its audit log cannot be written): {}",
            f.message()
        ),
        _ => f.message().to_owned(),
    };
    let title = match f.kind() {
        FailureKind::Denied => "Not allowed",
        FailureKind::NotFound => "Not found",
        _ => "Cannot show this page",
    };
    html(http_status(f.kind()), page::problem(title, &message, true))
}

/// Starts a page's call with the session's token. `Err` is the answer: a
/// redirect to sign-in when there is no live session or its token no
/// longer works (the session is then ended).
async fn begin_page(
    state: &HttpState,
    sessions: &Sessions,
    req: &axum::http::request::Parts,
    method: &'static str,
) -> Result<Call, Response> {
    let now = state.core.clock().now_ms();
    let Some(id) = session_id(&req.headers) else {
        return Err(redirect("/ui/sign-in"));
    };
    let Some(token) = sessions.token(&id, now) else {
        return Err(redirect("/ui/sign-in"));
    };
    let mut m = meta(&req.headers, req.extensions.get::<Peer>(), method);
    m.token = Some(token);
    match Call::begin(&state.core, m, Access::Token).await {
        Ok(call) => Ok(call),
        Err(f) if f.kind() == FailureKind::Unauthenticated => {
            sessions.remove(&id);
            let mut r = redirect("/ui/sign-in");
            r.headers_mut()
                .insert(header::SET_COOKIE, cookie_header(&cleared_cookie()));
            Err(r)
        }
        Err(f) => Err(failure_page(&f, "open this page")),
    }
}

async fn to_overview() -> Response {
    redirect("/ui/")
}

async fn style() -> Response {
    harden_now(
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
            page::STYLE,
        )
            .into_response(),
    )
}

async fn sign_in_form() -> Response {
    html(StatusCode::OK, page::sign_in(None))
}

async fn sign_in(
    State(state): State<HttpState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    req: Request,
) -> Response {
    if !same_origin(&req) {
        return html(
            StatusCode::FORBIDDEN,
            page::problem(
                "Refused",
                "A sign-in must come from this dashboard's own page.",
                false,
            ),
        );
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        BODY_DEADLINE,
        axum::body::to_bytes(body, MAX_FORM_BYTES.min(state.limits.max_request_bytes)),
    )
    .await;
    let bytes = match read {
        Ok(Ok(b)) => Zeroizing::new(b.to_vec()),
        Ok(Err(e)) if crate::http::reply::over_limit(&e) => {
            return html(
                StatusCode::PAYLOAD_TOO_LARGE,
                page::sign_in(Some("The form is too large.")),
            )
        }
        Ok(Err(_)) => {
            return html(
                StatusCode::BAD_REQUEST,
                page::sign_in(Some("The form could not be read.")),
            )
        }
        Err(_) => {
            return html(
                StatusCode::REQUEST_TIMEOUT,
                page::sign_in(Some("The form did not arrive in time.")),
            )
        }
    };
    let mut token: Option<Zeroizing<String>> = None;
    for (k, v) in form_urlencoded::parse(&bytes) {
        if k == "token" {
            let t = v.trim();
            if !t.is_empty() {
                token = Some(Zeroizing::new(t.to_owned()));
            }
        }
    }
    let Some(token) = token else {
        return html(
            StatusCode::BAD_REQUEST,
            page::sign_in(Some("Paste a token to sign in.")),
        );
    };
    let mut m = meta(
        &parts.headers,
        parts.extensions.get::<Peer>(),
        "keyward.ui/SignIn",
    );
    m.token = Some(token.clone());
    let call = match Call::begin(&state.core, m, Access::Token).await {
        Ok(call) => call,
        Err(f) => {
            let message = match f.kind() {
                FailureKind::Unavailable => "The vault is sealed or cannot answer now.",
                _ => "Sign-in refused: the token is not valid.",
            };
            return html(http_status(f.kind()), page::sign_in(Some(message)));
        }
    };
    let now = state.core.clock().now_ms();
    let lifetime = u64::try_from(SESSION_LIFETIME.as_millis()).unwrap_or(u64::MAX);
    let mut expires = now.saturating_add(lifetime);
    if let Some(caller) = call.caller() {
        if caller.expires_at_ms != 0 {
            expires = expires.min(caller.expires_at_ms);
        }
    }
    if let Err(f) = call.ok(&[]) {
        return html(
            http_status(f.kind()),
            page::sign_in(Some("The vault cannot answer now.")),
        );
    }
    let Some(id) = sessions.create(token, now, expires) else {
        return html(
            StatusCode::INTERNAL_SERVER_ERROR,
            page::sign_in(Some("No session could be made (no randomness).")),
        );
    };
    let max_age = expires.saturating_sub(now) / 1000;
    let mut r = redirect("/ui/");
    r.headers_mut().insert(
        header::SET_COOKIE,
        cookie_header(&session_cookie(&id, max_age)),
    );
    r
}

async fn sign_out(Extension(sessions): Extension<Arc<Sessions>>, req: Request) -> Response {
    if !same_origin(&req) {
        return html(
            StatusCode::FORBIDDEN,
            page::problem(
                "Refused",
                "A sign-out must come from this dashboard's own page.",
                false,
            ),
        );
    }
    if let Some(id) = session_id(req.headers()) {
        sessions.remove(&id);
    }
    let mut r = redirect("/ui/sign-in");
    r.headers_mut()
        .insert(header::SET_COOKIE, cookie_header(&cleared_cookie()));
    r
}

async fn overview(
    State(state): State<HttpState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    req: Request,
) -> Response {
    let (req, _) = req.into_parts();
    let mut call = match begin_page(&state, &sessions, &req, "keyward.ui/Overview").await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(f) = call.authorize(Capability::Read, "sys/governance".to_owned()) {
        return failure_page(
            &f,
            "read the governance report (it needs read on sys/governance)",
        );
    }
    if call.caller().is_none() {
        return redirect("/ui/sign-in");
    }
    let now = state.core.clock().now_ms();
    let settings = state.governance;
    // It reads every identity and token record: off the connection's
    // thread, for the caller as its token stands once its turn came.
    let body = call
        .off_thread_as(Work::Report, move |core, caller| match caller {
            Some(caller) => views::overview(core, caller, &settings, now),
            None => Err(Failure::from(crate::core::auth::AuthError::MissingToken)),
        })
        .await;
    let body = match body {
        Ok(b) => b,
        Err(f) => return failure_page(&f, "read the governance report"),
    };
    if let Err(f) = call.ok(&[]) {
        return failure_page(&f, "read the governance report");
    }
    html(StatusCode::OK, page::frame("Overview", true, &body))
}

async fn identity(
    State(state): State<HttpState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    req: Request,
) -> Response {
    let (req, _) = req.into_parts();
    // Read from the path itself rather than by an extractor, so a malformed
    // one is this handler's hardened page, not the router's bare 400.
    let name = req
        .uri
        .path()
        .strip_prefix("/ui/identity/")
        .unwrap_or_default()
        .to_owned();
    let mut call = match begin_page(&state, &sessions, &req, "keyward.ui/Identity").await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let name = match call.check(IdentityName::parse(&name)) {
        Ok(n) => n,
        Err(f) => return failure_page(&f, "open this identity"),
    };
    if let Err(f) = call.authorize(Capability::Read, name.resource()) {
        return failure_page(&f, "read this identity (it needs read on identity/<name>)");
    }
    let Some(caller) = call.caller().cloned() else {
        return redirect("/ui/sign-in");
    };
    let found = state.core.identities.get(name.as_str());
    let record = match call.check(found.and_then(|r| r.ok_or(IdentityError::NotFound))) {
        Ok(r) => r,
        Err(f) => return failure_page(&f, "read this identity"),
    };
    let now = state.core.clock().now_ms();
    let body = views::identity(&state.core, &caller, &state.governance, &record, now);
    let body = match call.check(body) {
        Ok(b) => b,
        Err(f) => return failure_page(&f, "read this identity"),
    };
    if let Err(f) = call.ok(&[]) {
        return failure_page(&f, "read this identity");
    }
    html(
        StatusCode::OK,
        page::frame(&format!("Identity {}", name.as_str()), true, &body),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().method("POST").uri("/ui/sign-in");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn only_the_listeners_own_origin_may_post() {
        let host = ("host", "localhost:8200");
        assert!(same_origin(&req(&[
            host,
            ("origin", "https://localhost:8200")
        ])));
        assert!(same_origin(&req(&[
            host,
            ("origin", "https://localhost:8200"),
            ("sec-fetch-site", "same-origin")
        ])));
        for bad in [
            vec![host],
            vec![host, ("origin", "https://evil.example")],
            vec![host, ("origin", "http://localhost:8200")],
            vec![host, ("origin", "https://localhost:8201")],
            vec![host, ("origin", "null")],
            vec![
                host,
                ("origin", "https://localhost:8200"),
                ("sec-fetch-site", "cross-site"),
            ],
            vec![("origin", "https://localhost:8200")],
        ] {
            assert!(!same_origin(&req(&bad)), "{bad:?}");
        }
    }

    #[test]
    fn the_session_cookie_is_read_by_name_only() {
        let mut h = HeaderMap::new();
        assert!(session_id(&h).is_none());
        h.insert(header::COOKIE, "a=1; kw_ui=abc; b=2".parse().unwrap());
        assert_eq!(session_id(&h).as_deref(), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "xkw_ui=abc; kw_ui=".parse().unwrap());
        assert!(session_id(&h).is_none());
    }

    #[test]
    fn the_cookie_has_every_flag() {
        let c = session_cookie("00ff", 900);
        for flag in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/ui/",
            "Max-Age=900",
        ] {
            assert!(c.contains(flag), "{c}");
        }
    }
}
