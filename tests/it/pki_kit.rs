//! Shared kit of the PKI tests: a vault with an internal root and a role,
//! low-privileged tokens, and the outside tools that judge certificates
//! (`openssl verify`, Python `cryptography`'s strict path validation).

use std::path::Path;
use std::process::Command;

use tonic::Code;

use crate::harness::{unique, TestServer};
use keyward::client::{Client, ClientError, IssueOptions};
use keyward::proto::v1::PkiRole;

pub const TRUST_DOMAIN: &str = "acme.test";

pub fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.unwrap_err().code().unwrap()
}

/// The message of a server refusal.
pub fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (Code, String) {
    match r.unwrap_err() {
        ClientError::Status(s) => (s.code(), s.message().to_owned()),
        other => panic!("not a server refusal: {other}"),
    }
}

/// A role allowing `spiffe://acme.test/<ns>/**` and `*.<ns>.svc.test`.
pub fn role(name: &str, ns: &str) -> PkiRole {
    PkiRole {
        name: name.to_owned(),
        allow_spiffe: vec![format!("spiffe://{TRUST_DOMAIN}/{ns}/**")],
        allow_dns: vec![format!("*.{ns}.svc.test")],
        max_ttl_seconds: 3600,
        key_type: "ec-p256".into(),
        client: false,
        server: false,
        allow_wildcard_dns: false,
    }
}

/// A dev server with an internal root and one role (`ns` as its name).
pub async fn pki_server(ns: &str) -> (TestServer, Client) {
    let server = TestServer::dev().await;
    let root = server.root().await;
    root.pki_init("keyward test root", 0).await.unwrap();
    root.pki_role_put(role(ns, ns)).await.unwrap();
    (server, root)
}

/// A token holding only the policy `toml` (stored under a random name).
pub async fn token_with(server: &TestServer, toml: &str) -> Client {
    let root = server.root().await;
    let name = unique("pki-pol");
    root.policy_put(&name, toml).await.unwrap();
    let t = root
        .issue_token(IssueOptions {
            policies: vec![name],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    Client::connect(server.options(Some(&t.token)))
        .await
        .unwrap()
}

pub fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `openssl verify` with `-purpose`; returns (ok, output).
pub fn openssl_verify(
    ca: &Path,
    untrusted: Option<&Path>,
    leaf: &Path,
    purpose: &str,
) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(ca);
    if let Some(u) = untrusted {
        cmd.arg("-untrusted").arg(u);
    }
    let out = cmd.arg(leaf).output().unwrap_or_else(|e| {
        panic!("this test needs the openssl CLI (apt-get install openssl): {e}")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains(": OK"), text)
}

/// Python `cryptography`'s RFC 5280 path validation of `leaf` (PEM) to
/// the trust anchor `anchor` through `intermediates`: as a server for
/// `dns` (if given) and as a client (if `client`). Prints "ok" or the
/// refusals.
pub fn strict_verify(
    anchor: &Path,
    intermediates: &[&Path],
    leaf: &Path,
    dns: Option<&str>,
    client: bool,
) -> (bool, String) {
    let script = r#"
import sys
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
load = lambda p: x509.load_pem_x509_certificate(open(p, 'rb').read())
anchor, leaf, dns, client = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3], sys.argv[4] == '1'
inter = [load(p) for p in sys.argv[5:]]
b = PolicyBuilder().store(Store([anchor]))
fails = []
if dns:
    try: b.build_server_verifier(x509.DNSName(dns)).verify(leaf, inter)
    except Exception as e: fails.append('server: %s' % e)
if client:
    try: b.build_client_verifier().verify(leaf, inter)
    except Exception as e: fails.append('client: %s' % e)
print('ok' if not fails else '; '.join(fails))
"#;
    let out = Command::new(crate::certs::python())
        .arg("-c")
        .arg(script)
        .arg(anchor)
        .arg(leaf)
        .arg(dns.unwrap_or(""))
        .arg(if client { "1" } else { "0" })
        .args(intermediates)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.trim() == "ok", text)
}

/// A key and a CSR for `sans` (URIs and DNS names), made on the workload's
/// side; returns (CSR PEM, key PEM).
pub fn csr(sans: &[&str], alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::default();
    for s in sans {
        params
            .subject_alt_names
            .push(if s.starts_with("spiffe://") {
                rcgen::SanType::URI((*s).try_into().unwrap())
            } else {
                rcgen::SanType::DnsName((*s).try_into().unwrap())
            });
    }
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (csr, key.serialize_pem())
}
