//! What every Vault-compatible handler shares: reading a request into the
//! core's request seam ([`VaultRequest`], [`VaultRequest::begin`]), the
//! response envelope ([`Envelope`]), Vault's `{"errors": [...]}` and the
//! one mapping of the seam's failure kinds to HTTP statuses
//! ([`http_status`]). No business rule lives here.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::listen::Peer;
use super::HttpState;
use crate::core::call::{
    bearer, request_id, Access, Acting, Call, Failure, FailureKind, RequestMeta,
};
use crate::core::Core;

/// The HTTP status a failure kind is answered with: the one place HTTP
/// statuses are chosen for the seam's failures (gRPC's is `api::grpc_code`).
/// As Vault does: a bad token and a denial are both 403; a lost
/// check-and-set and an existing name are 400; a sealed vault is 503.
pub fn http_status(kind: FailureKind) -> StatusCode {
    match kind {
        FailureKind::InvalidInput | FailureKind::AlreadyExists | FailureKind::Conflict => {
            StatusCode::BAD_REQUEST
        }
        FailureKind::NotFound => StatusCode::NOT_FOUND,
        FailureKind::Denied | FailureKind::Unauthenticated => StatusCode::FORBIDDEN,
        FailureKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        FailureKind::Exhausted => StatusCode::TOO_MANY_REQUESTS,
        FailureKind::Upstream => StatusCode::BAD_GATEWAY,
        FailureKind::Aborted => StatusCode::CONFLICT,
        FailureKind::Cancelled | FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Vault's error body: `{"errors": [message]}` with `status` (`[]` for an
/// empty message, as Vault answers a plain 404).
pub fn errors(status: StatusCode, message: &str) -> Response {
    let list: Vec<&str> = if message.is_empty() {
        vec![]
    } else {
        vec![message]
    };
    json_response(status, &json!({ "errors": list }))
}

/// A failure of the seam, answered the Vault way.
pub fn failure(f: &Failure) -> Response {
    errors(http_status(f.kind()), f.message())
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        failure(&self)
    }
}

// So a handler returning `Result<Response, Response>` can `?` a failure.
impl From<Failure> for Response {
    fn from(f: Failure) -> Self {
        failure(&f)
    }
}

/// What a handler answers: either way a response.
pub type Answer = Result<Response, Response>;

/// Milliseconds since the epoch as Vault writes times (RFC 3339, UTC,
/// microseconds); 0 is "".
pub fn time(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    json_bytes_with(status, bytes)
}

/// A 200 with a JSON body already written (the headers of [`json_response`]).
pub fn json_bytes_response(bytes: Vec<u8>) -> Response {
    json_bytes_with(StatusCode::OK, bytes)
}

fn json_bytes_with(status: StatusCode, bytes: Vec<u8>) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        bytes,
    )
        .into_response()
}

/// 204 No Content: what Vault answers a write with no data.
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// Which methods a route serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Methods {
    Get,
    GetOrHead,
    /// PUT or POST (Vault treats them alike).
    Write,
    GetOrWrite,
}

impl Methods {
    pub fn allows(self, m: &Method) -> bool {
        let write = *m == Method::PUT || *m == Method::POST;
        match self {
            Self::Get => *m == Method::GET,
            Self::GetOrHead => *m == Method::GET || *m == Method::HEAD,
            Self::Write => write,
            Self::GetOrWrite => *m == Method::GET || write,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::GetOrHead => "GET or HEAD",
            Self::Write => "PUT or POST",
            Self::GetOrWrite => "GET, PUT or POST",
        }
    }
}

/// A route for [`VaultRequest::start`]: the methods it serves, and the
/// seam method and access of its call.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub methods: Methods,
    pub seam: &'static str,
    pub access: Access,
}

impl Route {
    pub const fn new(methods: Methods, seam: &'static str, access: Access) -> Self {
        Self {
            methods,
            seam,
            access,
        }
    }
}

/// An answer the listener gives before any seam call of its own: each is
/// audited under a method of its own (`keyward.v1.Http/...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 404: no handler for the path.
    NotFound,
    /// 405: the path does not serve the method.
    MethodNotAllowed,
    /// 408: the body did not arrive in time.
    Timeout,
    /// 413: the body is over `limits.max_request_bytes`.
    TooLarge,
    /// 400: the body could not be read (a malformed chunked encoding, a
    /// connection that broke part-way).
    Unreadable,
    /// 400: `X-Vault-Namespace` names a namespace (keyward has none).
    Namespace,
}

impl Refusal {
    /// (the audited method, the failure kind audited, the HTTP status).
    fn parts(self) -> (&'static str, FailureKind, StatusCode) {
        match self {
            Self::NotFound => (
                "keyward.v1.Http/NotFound",
                FailureKind::NotFound,
                StatusCode::NOT_FOUND,
            ),
            Self::MethodNotAllowed => (
                "keyward.v1.Http/MethodNotAllowed",
                FailureKind::InvalidInput,
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            Self::Timeout => (
                "keyward.v1.Http/BodyTimeout",
                FailureKind::Cancelled,
                StatusCode::REQUEST_TIMEOUT,
            ),
            Self::TooLarge => (
                "keyward.v1.Http/BodyTooLarge",
                FailureKind::Exhausted,
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            Self::Unreadable => (
                "keyward.v1.Http/BodyUnreadable",
                FailureKind::InvalidInput,
                StatusCode::BAD_REQUEST,
            ),
            Self::Namespace => (
                "keyward.v1.Http/Namespace",
                FailureKind::InvalidInput,
                StatusCode::BAD_REQUEST,
            ),
        }
    }
}

/// Whether reading a body with `axum::body::to_bytes` failed because it was
/// over its limit (not because the body broke: malformed, cut short).
pub fn over_limit(e: &axum::Error) -> bool {
    std::error::Error::source(e).is_some_and(|inner| inner.is::<http_body_util::LengthLimitError>())
}

/// Answers `refusal` with `message`, after auditing it through the seam as
/// a call that names nobody: no token (not even its HMAC), no body and no
/// path (a client may put a token in one) reach the record, which carries
/// the request id, the source and the rule; repeats from one source are counted into aggregate records,
/// so a flood of them cannot grow the log without bound. If the record
/// cannot be written, the answer is that failure (503), as for any call.
pub async fn refuse(
    core: &Arc<Core>,
    refusal: Refusal,
    request_id: &str,
    source: Option<std::net::SocketAddr>,
    message: &str,
) -> Response {
    let (method, kind, status) = refusal.parts();
    let meta = RequestMeta {
        method,
        request_id: request_id.to_owned(),
        source,
        token: None,
        acting: None,
    };
    let mut call = match Call::begin(core, meta, Access::Open).await {
        Ok(call) => call,
        Err(f) => return failure(&f),
    };
    let audited = call.fail(Failure::new(kind, message));
    if audited.kind() != kind {
        return failure(&audited);
    }
    errors(status, message)
}

/// Vault's response envelope around `data` (or `auth`).
pub struct Envelope {
    pub request_id: String,
    /// The lease of a dynamic credential ("" for none).
    pub lease_id: String,
    pub data: Value,
    pub auth: Value,
    pub lease_duration: u64,
    pub renewable: bool,
    pub mount_type: Option<&'static str>,
    /// Vault's `warnings` (`null` when there are none).
    pub warnings: Vec<String>,
}

impl Envelope {
    pub fn data(request_id: &str, data: Value) -> Self {
        Self {
            request_id: request_id.to_owned(),
            lease_id: String::new(),
            data,
            auth: Value::Null,
            lease_duration: 0,
            renewable: false,
            mount_type: None,
            warnings: Vec::new(),
        }
    }

    pub fn auth(request_id: &str, auth: Value) -> Self {
        Self {
            auth,
            ..Self::data(request_id, Value::Null)
        }
    }

    pub fn kv(mut self) -> Self {
        self.mount_type = Some("kv");
        self
    }

    pub fn into_value(self) -> Value {
        let mut v = json!({
            "request_id": self.request_id,
            "lease_id": self.lease_id,
            "renewable": self.renewable,
            "lease_duration": self.lease_duration,
            "data": self.data,
            "wrap_info": null,
            "warnings": if self.warnings.is_empty() { Value::Null } else { json!(self.warnings) },
            "auth": self.auth,
        });
        if let (Some(t), Some(map)) = (self.mount_type, v.as_object_mut()) {
            map.insert("mount_type".into(), json!(t));
        }
        v
    }
}

impl IntoResponse for Envelope {
    fn into_response(self) -> Response {
        json_response(StatusCode::OK, &self.into_value())
    }
}

/// One request as the Vault handlers see it: method, path after `/v1/`,
/// query pairs, the token, the peer, and the body (read within the limit).
pub struct VaultRequest {
    pub method: Method,
    pub query: BTreeMap<String, String>,
    pub peer: Option<Peer>,
    token: Option<Zeroizing<String>>,
    request_id: String,
    body: Bytes,
    /// The transport's mark of a change (`api::detach`).
    acting: Option<Acting>,
}

impl VaultRequest {
    /// Reads `req`: headers, then the body, refused past
    /// `limits.max_request_bytes` with 413 naming the limit, when it does
    /// not arrive within [`BODY_DEADLINE`] with 408, and when it cannot be
    /// read (malformed, cut short) with 400 (all audited, see [`refuse`]); a
    /// namespace other than the root one is refused (keyward has none).
    pub async fn read(req: Request, state: &HttpState) -> Result<Self, Response> {
        let max_body = state.limits.max_request_bytes;
        let (parts, body) = req.into_parts();
        let namespace = check_namespace(&parts.headers);
        let query = parts
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let peer = parts.extensions.get::<Peer>().cloned();
        let acting = parts.extensions.get::<Acting>().cloned();
        let token = token_of(&parts.headers);
        let request_id = request_id(
            parts
                .headers
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok()),
        );
        let mut req = Self {
            method: parts.method,
            query,
            peer,
            token,
            request_id,
            body: Bytes::new(),
            acting,
        };
        if let Err(message) = namespace {
            return Err(req.refuse(state, Refusal::Namespace, message).await);
        }
        // The body is read before any token check: without a deadline an
        // outsider trickling it would hold a connection slot for ever.
        let read = tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, max_body));
        match read.await {
            Ok(Ok(b)) => req.body = b,
            Err(_) => {
                let message = format!(
                    "the request body did not arrive within {} seconds",
                    BODY_DEADLINE.as_secs()
                );
                let mut answer = req.refuse(state, Refusal::Timeout, &message).await;
                answer.headers_mut().insert(
                    header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                return Err(answer);
            }
            Ok(Err(e)) => {
                if over_limit(&e) {
                    let message = format!(
                        "the request body is larger than limits.max_request_bytes ({max_body} bytes)"
                    );
                    return Err(req.refuse(state, Refusal::TooLarge, &message).await);
                }
                // The transport's error is not repeated: it says nothing
                // the client needs, and the record names nobody.
                let message = "the request body could not be read";
                let mut answer = req.refuse(state, Refusal::Unreadable, message).await;
                answer.headers_mut().insert(
                    header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                return Err(answer);
            }
        }
        Ok(req)
    }

    /// The prelude of a handler: reads the request ([`Self::read`]),
    /// answers a method `route` does not serve with an audited 405, and
    /// begins the seam call ([`Self::begin`]). Handlers that serve several
    /// operations on one path read once and call [`Self::allow`] and
    /// [`Self::begin`] per operation instead.
    pub async fn start(
        req: Request,
        state: &HttpState,
        route: Route,
    ) -> Result<(Self, Call), Response> {
        let req = Self::read(req, state).await?;
        req.allow(state, route.methods).await?;
        let call = req.begin(&state.core, route.seam, route.access).await?;
        Ok((req, call))
    }

    /// [`Self::start`], then the body as JSON of type `T` ([`Self::json`]).
    pub async fn start_json<T: DeserializeOwned>(
        req: Request,
        state: &HttpState,
        route: Route,
    ) -> Result<(Self, Call, T), Response> {
        let (req, mut call) = Self::start(req, state, route).await?;
        let body = req.json(&mut call)?;
        Ok((req, call, body))
    }

    /// An audited 405 unless `methods` has this request's method.
    pub async fn allow(&self, state: &HttpState, methods: Methods) -> Result<(), Response> {
        if methods.allows(&self.method) {
            Ok(())
        } else {
            Err(self.method_not_allowed(state, methods.text()).await)
        }
    }

    /// An audited 405 naming the methods this path serves (`allowed`).
    pub async fn method_not_allowed(&self, state: &HttpState, allowed: &str) -> Response {
        // A method of hyper's own list is named; an extension method (any
        // token the client made up, of any length) is not repeated.
        let message = if is_standard(&self.method) {
            format!(
                "method {} is not supported here; use {allowed}",
                self.method
            )
        } else {
            format!("this method is not supported here; use {allowed}")
        };
        self.refuse(state, Refusal::MethodNotAllowed, &message)
            .await
    }

    /// An audited 404 for a path under a route that has no such operation.
    pub async fn not_found(&self, state: &HttpState, message: &str) -> Response {
        self.refuse(state, Refusal::NotFound, message).await
    }

    /// Answers `refusal` with `message`, audited by [`refuse`].
    async fn refuse(&self, state: &HttpState, refusal: Refusal, message: &str) -> Response {
        refuse(
            &state.core,
            refusal,
            &self.request_id,
            self.peer.as_ref().map(|p| p.addr),
            message,
        )
        .await
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The token the request carries, to answer it back to its sender
    /// (lookup-self's `id`, renew-self's `client_token`).
    pub fn token_text(&self) -> Option<String> {
        self.token.as_ref().map(|t| t.as_str().to_owned())
    }

    /// Whether a token header was sent.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The query parameter `name`, if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// A Vault `LIST`: the `LIST` method, or `GET` with `?list=true`.
    pub fn is_list(&self) -> bool {
        self.method.as_str() == "LIST"
            || (self.method == Method::GET && self.param("list") == Some("true"))
    }

    /// The seam's description of this request under `method`.
    pub fn meta(&self, method: &'static str) -> RequestMeta {
        RequestMeta {
            method,
            request_id: self.request_id.clone(),
            source: self.peer.as_ref().map(|p| p.addr),
            token: self.token.clone(),
            acting: self.acting.clone(),
        }
    }

    /// Starts the call (`Call::begin`); a refusal is audited and answered.
    pub async fn begin(
        &self,
        core: &Arc<Core>,
        method: &'static str,
        access: Access,
    ) -> Result<Call, Response> {
        Call::begin(core, self.meta(method), access)
            .await
            .map_err(|f| failure(&f))
    }

    /// The body as JSON of type `T` (an empty body is `{}`); malformed JSON
    /// or a field `T` does not know is an audited 400 naming the problem.
    pub fn json<T: DeserializeOwned>(&self, call: &mut Call) -> Result<T, Response> {
        let bytes: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        call.check(serde_json::from_slice::<T>(bytes).map_err(|e| {
            Failure::invalid(format!(
                "the request body is not valid JSON for this endpoint: {}",
                json_error_text(&e)
            ))
        }))
        .map_err(|f| failure(&f))
    }
}

/// How long a request body may take to arrive once its head is read (the
/// head itself is bounded by `listen::HANDSHAKE_DEADLINE`); past it the
/// answer is 408 and the connection is closed.
pub const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The keys a Vault LIST answers for `paths` under `under` (which ends in
/// `/`, or is empty): each path's next segment, with a `/` when more
/// follows; sorted, each once. (A set, not a search of the list so far:
/// that was quadratic in the number of keys.)
pub fn child_keys<'a>(paths: impl IntoIterator<Item = &'a str>, under: &str) -> Vec<String> {
    let mut keys = std::collections::BTreeSet::new();
    for path in paths {
        let Some(rest) = path.strip_prefix(under) else {
            continue;
        };
        let key = match rest.split_once('/') {
            Some((folder, _)) => format!("{folder}/"),
            None => rest.to_owned(),
        };
        if !key.is_empty() {
            keys.insert(key);
        }
    }
    keys.into_iter().collect()
}

/// Whether `method` is one of HTTP's own or Vault's `LIST`: one a 405
/// names back.
fn is_standard(method: &Method) -> bool {
    matches!(
        method.as_str(),
        "GET"
            | "HEAD"
            | "POST"
            | "PUT"
            | "DELETE"
            | "PATCH"
            | "OPTIONS"
            | "TRACE"
            | "CONNECT"
            | "LIST"
    )
}

/// serde_json's message for a body it refused, without the value it
/// refused: serde quotes it (`invalid type: string "...", expected a map`),
/// and a request body carries secrets. The kind of value, what was
/// expected and the position stay.
fn json_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if e.classify() != serde_json::error::Category::Data {
        // Syntax and end-of-input messages name characters expected, never
        // the input.
        return text;
    }
    // serde quotes the name of an unknown field (or variant) the caller
    // sent, which can be anything of any length: it is not repeated; the
    // names expected, from the endpoint's schema, are.
    for lead in ["unknown field ", "unknown variant "] {
        if let Some(rest) = text.strip_prefix(lead) {
            // The name ends at the last separator (the text after it is
            // serde's own); a name holding one is cut there, never shown.
            let tail = ["`, expected ", "`, there are no "]
                .iter()
                .filter_map(|sep| rest.rfind(sep))
                .max()
                .map_or("", |at| &rest[at + 1..]);
            return format!("{lead}(its name is not repeated){tail}");
        }
    }
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = text.strip_prefix(lead) {
            if let Some(at) = rest.rfind(", expected ") {
                let kind = rest[..at].split(' ').next().unwrap_or("value");
                return format!("{lead}{kind}{}", &rest[at..]);
            }
            // A refusal of this shape without the usual tail: say no more.
            return format!("{lead}a value of the wrong kind");
        }
    }
    text
}

/// A Vault list field (`bound_cidrs`, `cidr_list`): a JSON list of
/// strings, or one comma-separated string, as Vault takes them; absent or
/// null is empty. Anything else is refused naming the field, never dropped:
/// these fields restrict what is issued, and a restriction silently lost
/// is a wider credential than the caller asked for.
pub fn string_list(
    body: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Vec<String>, Failure> {
    let refuse = || {
        Failure::invalid(format!(
            "{name} must be a list of strings or a comma-separated string"
        ))
    };
    match body.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(|s| s.trim().to_owned()).ok_or_else(refuse))
            .collect(),
        Some(_) => Err(refuse()),
    }
}

// Header names looked up on every request, made once: a lookup by `&str`
// parses and checks the name each time.
static X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
static X_VAULT_TOKEN: header::HeaderName = header::HeaderName::from_static("x-vault-token");
static X_VAULT_NAMESPACE: header::HeaderName = header::HeaderName::from_static("x-vault-namespace");

/// The token of a request: `X-Vault-Token`, else `Authorization: Bearer`.
fn token_of(headers: &HeaderMap) -> Option<Zeroizing<String>> {
    if let Some(v) = headers.get(&X_VAULT_TOKEN).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if !v.is_empty() {
            return Some(Zeroizing::new(v.to_owned()));
        }
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
}

/// `X-Vault-Namespace` is accepted empty or naming the root namespace;
/// keyward has no namespaces, and serving another one's request from the
/// root would mix what the client keeps apart.
fn check_namespace(headers: &HeaderMap) -> Result<(), &'static str> {
    let Some(ns) = headers.get(&X_VAULT_NAMESPACE) else {
        return Ok(());
    };
    let ns = ns.to_str().unwrap_or("?").trim().trim_matches('/');
    if ns.is_empty() || ns == "root" {
        Ok(())
    } else {
        Err("keyward has no namespaces: X-Vault-Namespace must be empty or root")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A body over the limit, whole or streamed in chunks, is told apart
    /// from one whose stream breaks (413 against 400): the check names
    /// the error type of the http-body-util that axum uses.
    #[tokio::test]
    async fn a_body_over_the_limit_is_told_from_a_broken_one() {
        let read = |body: axum::body::Body| axum::body::to_bytes(body, 10);
        let whole = read(axum::body::Body::from(vec![b'x'; 100])).await;
        assert!(over_limit(&whole.unwrap_err()));
        let chunks = (0..5).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"xxxx")));
        let streamed = read(axum::body::Body::from_stream(tokio_stream::iter(chunks))).await;
        assert!(over_limit(&streamed.unwrap_err()));
        let broken = [
            Ok(Bytes::from_static(b"xx")),
            Err(std::io::Error::other("connection reset")),
        ];
        let broken = read(axum::body::Body::from_stream(tokio_stream::iter(broken))).await;
        assert!(!over_limit(&broken.unwrap_err()));
        let fits = read(axum::body::Body::from(vec![b'x'; 10])).await;
        assert_eq!(fits.unwrap().len(), 10);
    }

    /// The name of an unknown field comes from the caller (any length):
    /// it is not repeated; the names the endpoint expects are.
    #[test]
    fn an_unknown_field_is_not_named_back() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body {
            role_id: String,
        }
        let name = "A".repeat(10_000);
        let body = format!("{{\"{name}\": 1}}");
        let e = serde_json::from_str::<Body>(&body).unwrap_err();
        let text = json_error_text(&e);
        assert!(!text.contains("AAAA"), "{text}");
        assert!(
            text.starts_with("unknown field (its name is not repeated)"),
            "{text}"
        );
        assert!(text.contains("`role_id`"), "{text}");
        // Even one whose name looks like the separator.
        let body = "{\"x`, expected nothing\": 1}";
        let e = serde_json::from_str::<Body>(body).unwrap_err();
        let text = json_error_text(&e);
        assert!(!text.contains("nothing"), "{text}");
    }

    #[test]
    fn list_keys_are_each_next_segment_once_and_sorted() {
        let paths = ["a/x", "b", "a/y/z", "c/", "a", "other/q"];
        let keys = child_keys(paths, "");
        assert_eq!(keys, ["a", "a/", "b", "c/", "other/"]);
        let under = child_keys(["t/a/b", "t/c", "u/d", "t/a/e"], "t/");
        assert_eq!(under, ["a/", "c"]);
    }

    #[test]
    fn only_known_methods_are_named_back() {
        assert!(is_standard(&Method::GET));
        assert!(is_standard(&Method::from_bytes(b"LIST").unwrap()));
        let made_up = Method::from_bytes("X".repeat(5000).as_bytes()).unwrap();
        assert!(!is_standard(&made_up));
    }

    #[test]
    fn each_kind_has_vaults_status() {
        let expected = [
            (FailureKind::InvalidInput, 400),
            (FailureKind::NotFound, 404),
            (FailureKind::AlreadyExists, 400),
            (FailureKind::Denied, 403),
            (FailureKind::Unauthenticated, 403),
            (FailureKind::Unavailable, 503),
            (FailureKind::Conflict, 400),
            (FailureKind::Upstream, 502),
            (FailureKind::Exhausted, 429),
            (FailureKind::Aborted, 409),
            (FailureKind::Cancelled, 500),
            (FailureKind::Internal, 500),
        ];
        assert_eq!(expected.len(), FailureKind::ALL.len());
        for (kind, code) in expected {
            assert_eq!(http_status(kind).as_u16(), code, "{kind:?}");
        }
    }

    #[test]
    fn the_token_comes_from_either_header() {
        let mut h = HeaderMap::new();
        assert!(token_of(&h).is_none());
        h.insert(header::AUTHORIZATION, "Bearer kwt_b".parse().unwrap());
        assert_eq!(token_of(&h).unwrap().as_str(), "kwt_b");
        h.insert("x-vault-token", "kwt_v".parse().unwrap());
        assert_eq!(token_of(&h).unwrap().as_str(), "kwt_v");
    }

    #[test]
    fn only_the_root_namespace_is_accepted() {
        let mut h = HeaderMap::new();
        assert!(check_namespace(&h).is_ok());
        for ok in ["", "root", "root/"] {
            h.insert("x-vault-namespace", ok.parse().unwrap());
            assert!(check_namespace(&h).is_ok(), "{ok}");
        }
        h.insert("x-vault-namespace", "team-a".parse().unwrap());
        assert!(check_namespace(&h).unwrap_err().contains("no namespaces"));
    }
}
