//! A small HTTPS client for the Vault-compatible API tests: one TLS
//! connection per request (hyper's HTTP/1 client over tokio-rustls),
//! trusting the test server's CA, optionally with a client certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper::body::Incoming;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

/// One answer: the status and the body as JSON (`Value::Null` if empty or
/// not JSON), plus the raw text.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub json: Value,
    pub text: String,
    /// The body as sent (DER answers are not text).
    pub bytes: Vec<u8>,
}

impl Answer {
    /// The first message of Vault's `{"errors": [...]}`, or "".
    pub fn error(&self) -> String {
        self.json["errors"][0].as_str().unwrap_or("").to_owned()
    }
}

pub struct HttpClient {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl HttpClient {
    pub fn new(addr: SocketAddr, ca: &Path) -> Self {
        Self::build(addr, ca, None)
    }

    /// A client presenting `cert`/`key` (PEM files) to the server.
    pub fn with_client_cert(addr: SocketAddr, ca: &Path, cert: &Path, key: &Path) -> Self {
        Self::build(addr, ca, Some((cert, key)))
    }

    fn build(addr: SocketAddr, ca: &Path, client: Option<(&Path, &Path)>) -> Self {
        super::harness::install_crypto();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let tls = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(key).unwrap();
                builder.with_client_auth_cert(certs, key).unwrap()
            }
        };
        Self {
            addr,
            tls: Arc::new(tls),
        }
    }

    /// Sends `method path` with `headers` and `body`; `path` starts with `/`.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Answer {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(hyper::Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = body.unwrap_or_default();
        let req = req
            .header("content-length", body.len().to_string())
            .body(http_body_full(body))
            .unwrap();
        let resp: hyper::Response<Incoming> = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), 64 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            json,
            text,
            bytes: bytes.to_vec(),
        }
    }

    /// `method path` with `token` in `X-Vault-Token` and a JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(t) = token {
            headers.push(("x-vault-token", t));
        }
        self.send(
            method,
            path,
            &headers,
            body.map(|b| serde_json::to_vec(&b).unwrap()),
        )
        .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.call("GET", path, token, None).await
    }
}

fn http_body_full(bytes: Vec<u8>) -> axum::body::Body {
    axum::body::Body::from(bytes)
}
