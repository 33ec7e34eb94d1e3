//! Vault's PKI engine at `pki/`, over keyward's PKI: `pki/issue/<role>`,
//! `pki/sign/<role>`, `pki/ca/pem`, `pki/ca` (DER), `pki/ca_chain`,
//! `pki/crl` (DER) and `pki/crl/pem`.
//!
//! Each is the gRPC `Pki` method of the same meaning, through the same
//! functions of `api::pki` (`build_issue`, `build_sign`, `record_built`),
//! so the role's bounds and the rule that a certificate which would log in
//! as an identity needs that identity's policies are written once.
//!
//! Vault's names map onto keyward's: `common_name` and `alt_names` are DNS
//! names, `uri_sans` are SPIFFE IDs (a `common_name` that is a SPIFFE ID is
//! taken as one). What keyward cannot give (IP or other SANs, a common name
//! kept out of the SANs, DER output) is refused naming the field, never
//! dropped: a certificate with less than was asked for is a surprise.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::reply::{failure, string_list, Answer, Envelope, Methods, Route, VaultRequest};
use super::token::seconds_value;
use super::HttpState;
use crate::api::pki as api_pki;
use crate::core::call::{Access, Call, Failure};
use crate::core::offload::Work;
use crate::pki::store::KeyType;
use crate::pki::{Built, CA_RESOURCE, CERTS_RESOURCE};

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/pki/issue/{role}", any(issue))
        .route("/v1/pki/sign/{role}", any(sign))
        .route("/v1/pki/ca/pem", any(ca_pem))
        .route("/v1/pki/ca", any(ca_der))
        .route("/v1/pki/ca_chain", any(ca_chain))
        .route("/v1/pki/cert/ca_chain", any(ca_chain))
        .route("/v1/pki/crl", any(crl_der))
        .route("/v1/pki/crl/pem", any(crl_pem))
}

const ISSUE: Route = Route::new(Methods::Write, "keyward.v1.Pki/Issue", Access::Token);
const SIGN: Route = Route::new(Methods::Write, "keyward.v1.Pki/Sign", Access::Token);
const CA: Route = Route::new(Methods::Get, "keyward.v1.Pki/Ca", Access::Token);
const CRL: Route = Route::new(Methods::Get, "keyward.v1.Pki/Crl", Access::Token);

/// The fields of `pki/issue` and `pki/sign` keyward reads or checks.
const FIELDS: &[&str] = &[
    "common_name",
    "alt_names",
    "uri_sans",
    "ttl",
    "format",
    "private_key_format",
    "exclude_cn_from_sans",
    "ip_sans",
    "other_sans",
    "not_after",
    "remove_roots_from_chain",
    "csr",
];

/// The names and lifetime asked for.
struct Asked {
    common_name: String,
    spiffe: Vec<String>,
    dns: Vec<String>,
    ttl: u64,
}

fn text_field(body: &Map<String, Value>, name: &str) -> Result<String, Failure> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.trim().to_owned()),
        Some(_) => Err(Failure::invalid(format!("{name} must be a string"))),
    }
}

/// Vault's booleans arrive as JSON booleans or as text (the CLI's `k=v`).
fn flag(body: &Map<String, Value>, name: &str) -> Result<bool, Failure> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.trim() {
            "" | "false" | "0" => Ok(false),
            "true" | "1" => Ok(true),
            _ => Err(Failure::invalid(format!("{name} must be true or false"))),
        },
        Some(_) => Err(Failure::invalid(format!("{name} must be true or false"))),
    }
}

/// Reads the body of `pki/issue` or `pki/sign`: unknown fields and values
/// keyward cannot honour are refused with the field named.
fn asked(body: &Map<String, Value>) -> Result<Asked, Failure> {
    for k in body.keys() {
        if !FIELDS.contains(&k.as_str()) {
            return Err(Failure::invalid(format!(
                "{k} is not supported: keyward's pki takes common_name, alt_names, uri_sans, \
                 ttl (and csr to sign)"
            )));
        }
    }
    for (name, why) in [
        ("ip_sans", "keyward issues no IP address SANs"),
        ("other_sans", "keyward issues no other SANs"),
        ("not_after", "give ttl instead"),
    ] {
        let set = match body.get(name) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.trim().is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(Failure::invalid(format!("{name} is not supported: {why}")));
        }
    }
    let format = text_field(body, "format")?;
    if !matches!(format.as_str(), "" | "pem") {
        return Err(Failure::invalid(
            "format must be pem: keyward answers PEM only",
        ));
    }
    let key_format = text_field(body, "private_key_format")?;
    if !matches!(key_format.as_str(), "" | "der" | "pem" | "pkcs8") {
        return Err(Failure::invalid(
            "private_key_format must be der, pem or pkcs8: keyward's private keys are PKCS#8 PEM",
        ));
    }
    if flag(body, "remove_roots_from_chain")? {
        return Err(Failure::invalid(
            "remove_roots_from_chain is not supported: ca_chain is the issuing CA and those above it",
        ));
    }
    let common_name = text_field(body, "common_name")?;
    if flag(body, "exclude_cn_from_sans")? && !common_name.is_empty() {
        return Err(Failure::invalid(
            "exclude_cn_from_sans is not supported: keyward's common name is always one of the SANs",
        ));
    }
    let mut spiffe = string_list(body, "uri_sans")?;
    let mut dns = string_list(body, "alt_names")?;
    if !common_name.is_empty() {
        let list = if common_name.starts_with("spiffe://") {
            &mut spiffe
        } else {
            &mut dns
        };
        if !list.contains(&common_name) {
            list.insert(0, common_name.clone());
        }
    }
    let ttl = seconds_value(body.get("ttl"), "ttl")?;
    Ok(Asked {
        common_name,
        spiffe,
        dns,
        ttl,
    })
}

/// Vault's serial number: the bytes in hex, colon-separated.
fn vault_serial(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(":")
}

/// Vault's `private_key_type` of a role's key type.
fn key_type_name(key_type: KeyType) -> &'static str {
    match key_type {
        KeyType::EcP256 => "ec",
        KeyType::Ed25519 => "ed25519",
    }
}

/// Records a built certificate (as gRPC's issue and sign do) and answers
/// Vault's `data`: certificate, issuing_ca, ca_chain, serial_number,
/// expiration, and for an issue the private key and its type.
async fn hand_out(
    state: &HttpState,
    req: &VaultRequest,
    mut call: Call,
    mut built: Built,
) -> Answer {
    api_pki::record_built(&state.core, &mut call, &mut built).await?;
    let key_type = match &built.private_key {
        None => None,
        Some(_) => {
            let role = call.check(state.core.pki.role(&built.record.role))?;
            Some(role.map_or("ec", |r| key_type_name(r.key_type)))
        }
    };
    let key = built
        .private_key
        .as_ref()
        .map(|k| k.as_str().to_owned())
        .unwrap_or_default();
    call.ok(&[("private_key", key.as_bytes())])?;
    let mut data = json!({
        "certificate": built.certificate_pem,
        "issuing_ca": built.ca_chain.first().cloned().unwrap_or_default(),
        "ca_chain": built.ca_chain,
        "serial_number": vault_serial(&built.record.serial),
        "expiration": built.record.not_after_ms / 1000,
    });
    if let (Some(kind), Some(map)) = (key_type, data.as_object_mut()) {
        map.insert("private_key".into(), json!(key));
        map.insert("private_key_type".into(), json!(kind));
    }
    Ok(Envelope::data(req.request_id(), data).into_response())
}

/// `PUT|POST pki/issue/<role> {"common_name", "alt_names", "uri_sans",
/// "ttl"}`: a new key and a certificate for it (`issue` on `pki/<role>`).
async fn issue(State(state): State<HttpState>, Path(role): Path<String>, req: Request) -> Answer {
    let (req, mut call, body) =
        VaultRequest::start_json::<Map<String, Value>>(req, &state, ISSUE).await?;
    if body.contains_key("csr") {
        return Err(call
            .fail(Failure::invalid(
                "csr is not taken by pki/issue: send it to pki/sign/<role>",
            ))
            .into());
    }
    let asked = call.check(asked(&body))?;
    let built = api_pki::build_issue(
        &state.core,
        &mut call,
        &role,
        &asked.spiffe,
        &asked.dns,
        asked.ttl,
    )?;
    hand_out(&state, &req, call, built).await
}

/// `PUT|POST pki/sign/<role> {"csr", "ttl"}`: a certificate for the CSR's
/// key with the CSR's names (`issue` on `pki/<role>`). A `common_name`
/// must be one of the CSR's names; `alt_names` and `uri_sans` are refused
/// (the names come from the CSR).
async fn sign(State(state): State<HttpState>, Path(role): Path<String>, req: Request) -> Answer {
    let (req, mut call, body) =
        VaultRequest::start_json::<Map<String, Value>>(req, &state, SIGN).await?;
    let csr = call.check(text_field(&body, "csr"))?;
    if csr.is_empty() {
        return Err(call
            .fail(Failure::invalid(
                "csr is required (a PEM CERTIFICATE REQUEST)",
            ))
            .into());
    }
    let asked = call.check(asked(&body))?;
    let from_body = string_list(&body, "alt_names").unwrap_or_default().len()
        + string_list(&body, "uri_sans").unwrap_or_default().len();
    if from_body > 0 {
        return Err(call
            .fail(Failure::invalid(
                "alt_names and uri_sans are not taken by pki/sign: the names come from the CSR",
            ))
            .into());
    }
    let built = api_pki::build_sign(&state.core, &mut call, &role, &csr, asked.ttl)?;
    if !asked.common_name.is_empty() && !built.record.sans.contains(&asked.common_name) {
        return Err(call
            .fail(Failure::invalid(
                "common_name must be one of the CSR's names (SPIFFE IDs and DNS names)",
            ))
            .into());
    }
    hand_out(&state, &req, call, built).await
}

/// A body that is not JSON, with its content type; never cached.
fn raw(content_type: &'static str, body: Vec<u8>) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The CA chain (signing CA first), as gRPC's `Pki/Ca`: any valid token.
async fn read_chain(state: &HttpState, req: Request) -> Result<Vec<String>, Response> {
    let (_req, mut call) = VaultRequest::start(req, state, CA).await?;
    call.set_resource(CA_RESOURCE);
    let chain = call.check(state.core.pki.ca_chain())?;
    call.ok(&[])?;
    Ok(chain)
}

/// `GET pki/ca/pem`: the issuing CA's certificate, PEM, no envelope.
async fn ca_pem(State(state): State<HttpState>, req: Request) -> Answer {
    let chain = read_chain(&state, req).await?;
    let first = chain.into_iter().next().unwrap_or_default();
    Ok(raw("application/pem-certificate-chain", first.into_bytes()))
}

/// `GET pki/ca`: the issuing CA's certificate, DER.
async fn ca_der(State(state): State<HttpState>, req: Request) -> Answer {
    let chain = read_chain(&state, req).await?;
    let first = chain.first().map(String::as_str).unwrap_or_default();
    match pem_body(first) {
        Some(der) => Ok(raw("application/pkix-cert", der)),
        None => Err(failure(&Failure::internal(
            "the stored CA certificate is not PEM",
        ))),
    }
}

/// `GET pki/ca_chain` (and `pki/cert/ca_chain`): every CA certificate, PEM.
async fn ca_chain(State(state): State<HttpState>, req: Request) -> Answer {
    let chain = read_chain(&state, req).await?;
    let mut text = String::new();
    for pem in chain {
        text.push_str(pem.trim_end());
        text.push('\n');
    }
    Ok(raw("application/pem-certificate-chain", text.into_bytes()))
}

/// The CRL (DER), as gRPC's `Pki/Crl`: any valid token.
async fn read_crl(state: &HttpState, req: Request) -> Result<Vec<u8>, Response> {
    let (_req, mut call) = VaultRequest::start(req, state, CRL).await?;
    call.set_resource(CERTS_RESOURCE);
    // As gRPC's: the lock a revoke rebuilds the CRL under is waited on off
    // the runtime's workers.
    let der = call
        .off_thread(Work::Listing, move |core| {
            core.pki.crl(core.clock().now_ms())
        })
        .await?;
    call.ok(&[])?;
    Ok(der)
}

/// `GET pki/crl`: the CRL, DER.
async fn crl_der(State(state): State<HttpState>, req: Request) -> Answer {
    let der = read_crl(&state, req).await?;
    Ok(raw("application/pkix-crl", der))
}

/// `GET pki/crl/pem`: the CRL, PEM (`X509 CRL`).
async fn crl_pem(State(state): State<HttpState>, req: Request) -> Answer {
    let der = read_crl(&state, req).await?;
    Ok(raw(
        "application/x-pem-file",
        to_pem("X509 CRL", &der).into_bytes(),
    ))
}

/// `der` as PEM under `label`, 64 characters a line.
fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The bytes of the first PEM block of `pem`.
fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN ")?;
    let rest = &pem[start..];
    let body_start = rest.find('\n')? + 1;
    let body_end = rest.find("-----END ")?;
    let b64: String = rest
        .get(body_start..body_end)?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_written_the_vault_way() {
        assert_eq!(vault_serial("0a1b2c"), "0a:1b:2c");
        assert_eq!(vault_serial(""), "");
    }

    #[test]
    fn pem_round_trips() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = to_pem("X509 CRL", &der);
        assert!(pem.starts_with("-----BEGIN X509 CRL-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(pem_body(&pem).unwrap(), der);
    }

    #[test]
    fn what_keyward_cannot_give_is_refused_by_name() {
        let body = |v: Value| v.as_object().unwrap().clone();
        for (v, field) in [
            (json!({"ip_sans": "10.0.0.1"}), "ip_sans"),
            (json!({"other_sans": ["x"]}), "other_sans"),
            (json!({"format": "der"}), "format"),
            (json!({"key_usage": ["x"]}), "key_usage"),
            (
                json!({"common_name": "a.b", "exclude_cn_from_sans": true}),
                "exclude_cn_from_sans",
            ),
        ] {
            let e = asked(&body(v)).err().unwrap();
            assert!(e.message().contains(field), "{}", e.message());
        }
        let a = asked(&body(json!({
            "common_name": "web.ns.svc.test",
            "alt_names": "api.ns.svc.test",
            "uri_sans": ["spiffe://acme.test/ns/web"],
            "ttl": "10m",
            "format": "pem",
            "private_key_format": "der",
        })))
        .unwrap();
        assert_eq!(a.dns, ["web.ns.svc.test", "api.ns.svc.test"]);
        assert_eq!(a.spiffe, ["spiffe://acme.test/ns/web"]);
        assert_eq!(a.ttl, 600);
        let a = asked(&body(json!({"common_name": "spiffe://acme.test/ns/x"}))).unwrap();
        assert_eq!(a.spiffe, ["spiffe://acme.test/ns/x"]);
        assert!(a.dns.is_empty());
    }
}
