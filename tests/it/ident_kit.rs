//! Shared kit of the identity, login and governance tests: identities with
//! a secret-id, policies, JWT signers (keys made in the test with ring) and a
//! JWKS endpoint over HTTPS on 127.0.0.1.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Value};

use crate::harness::{unique, TestServer};
use keyward::client::Client;
use keyward::proto::v1::{CreateIdentityRequest, TokenResponse, UpdateIdentityRequest};

/// Sets identity `name`'s expiry `seconds` from now (0: never) with `root`.
pub async fn expire_in(root: &Client, name: &str, seconds: u64) {
    root.identity_update(UpdateIdentityRequest {
        name: name.to_owned(),
        expires_in_seconds: Some(seconds),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("identity update {name} --expires {seconds}s: {e}"));
}

/// A policy from TOML text, stored by the root client.
pub async fn put_policy(server: &TestServer, name: &str, toml: &str) {
    server
        .root()
        .await
        .policy_put(name, toml)
        .await
        .unwrap_or_else(|e| panic!("policy put {name}: {e}"));
}

/// A policy reading `secret/<prefix>/**`, with a random name.
pub async fn read_policy(server: &TestServer, prefix: &str) -> String {
    let name = unique("read");
    put_policy(
        server,
        &name,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\", \"list\"]\n"),
    )
    .await;
    name
}

pub fn create(name: &str, kind: &str, owner: &str, policies: &[String]) -> CreateIdentityRequest {
    CreateIdentityRequest {
        name: name.to_owned(),
        kind: kind.to_owned(),
        owner: owner.to_owned(),
        description: format!("test identity {name}"),
        policies: policies.to_vec(),
        expires_in_seconds: 0,
    }
}

/// An identity with a secret-id: (role_id, secret_id).
pub async fn approle_identity(root: &Client, name: &str, policies: &[String]) -> (String, String) {
    root.identity_create(create(name, "service-account", "team-a", policies))
        .await
        .unwrap();
    let sid = root.identity_secret_id(name, 0, 0, &[]).await.unwrap();
    (sid.role_id.clone(), sid.secret_id.clone())
}

/// Logs in with role-id/secret-id; returns the token response and a client holding it.
pub async fn login(server: &TestServer, role_id: &str, secret_id: &str) -> (TokenResponse, Client) {
    let anon = server.anonymous().await;
    let t = anon.login_approle(role_id, secret_id, 0).await.unwrap();
    let client = anon.with_token(&t.token).unwrap();
    (t, client)
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------
// JWT signing.

pub enum Signer {
    Ec(&'static str, EcdsaKeyPair),
    Ed(&'static str, Ed25519KeyPair),
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    pub fn es256(kid: &'static str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        Self::Ec(
            kid,
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap(),
        )
    }

    pub fn eddsa(kid: &'static str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Self::Ed(kid, Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
    }

    fn kid(&self) -> &'static str {
        match self {
            Self::Ec(k, _) | Self::Ed(k, _) => k,
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            Self::Ec(..) => "ES256",
            Self::Ed(..) => "EdDSA",
        }
    }

    pub fn jwk(&self) -> Value {
        match self {
            Self::Ec(kid, pair) => {
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(&point[1..33]), "y": b64(&point[33..])})
            }
            Self::Ed(kid, pair) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key().as_ref())})
            }
        }
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        match self {
            Self::Ec(_, pair) => pair
                .sign(&SystemRandom::new(), message)
                .unwrap()
                .as_ref()
                .to_vec(),
            Self::Ed(_, pair) => pair.sign(message).as_ref().to_vec(),
        }
    }

    pub fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    pub fn token(&self, claims: &Value) -> String {
        self.token_with_header(
            &json!({"typ": "JWT", "alg": self.alg(), "kid": self.kid()}),
            claims,
        )
    }
}

pub fn jwks(signers: &[&Signer]) -> Vec<u8> {
    let keys: Vec<Value> = signers.iter().map(|s| s.jwk()).collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

// ---------------------------------------------------------------------------
// A JWKS endpoint over HTTPS, with the dev server's certificate (signed by
// the dev CA, which a dev vault trusts for JWKS fetches).

pub struct JwksServer {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn jwks_server(server: &TestServer, body: Vec<u8>) -> JwksServer {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let certs = keyward::pki::CertPaths::in_dir(&server.dir.path().join("certs"));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&certs.server_key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") && request.len() < 8192 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            response.extend_from_slice(&body);
            let _ = tls.write_all(&response).await;
            let _ = tls.shutdown().await;
        }
    });
    JwksServer {
        url: format!("https://127.0.0.1:{port}/.well-known/jwks"),
        task,
    }
}
