//! The governance dashboard (`/ui/`, src/http/ui/): HTTP-level checks of
//! sign-in, sessions, CSRF, headers and authorization from a low-privileged
//! caller's side, and a real headless Chromium (Debian's `chromium`,
//! driven by Python playwright from a venv under `target/ui-venv`) signing
//! in through the form over TLS and reading the counts of a seeded vault
//! from the DOM. Screenshots go to `target/ui-artifacts/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use super::harness::{contains, data, files_under, install_crypto, unique, TestServer};
use super::ident_kit::{approle_identity, create, login, put_policy};
use keyward::client::{
    Client, ClientOptions, IssueOptions, PutOptions, RotationPolicySpec, ScheduleSpec,
};

/// One answer of the listener, headers included.
pub(super) struct Page {
    pub(super) status: u16,
    pub(super) headers: hyper::HeaderMap,
    pub(super) text: String,
}

impl Page {
    pub(super) fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }

    /// The session id the answer's `Set-Cookie` gives, if any.
    pub(super) fn session(&self) -> Option<String> {
        let c = self.header("set-cookie");
        let v = c.strip_prefix("kw_ui=")?.split(';').next()?;
        (!v.is_empty()).then(|| v.to_owned())
    }

    /// The number in the element with `data-testid="{id}"`.
    fn count(&self, id: &str) -> Option<u64> {
        let at = self.text.find(&format!("data-testid=\"{id}\">"))?;
        let rest = &self.text[at..];
        let rest = &rest[rest.find('>')? + 1..];
        rest[..rest.find('<')?].trim().parse().ok()
    }
}

/// A TLS client of the HTTPS listener trusting the test CA, one connection
/// per request.
pub(super) struct Browserless {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl Browserless {
    pub(super) fn new(addr: SocketAddr, ca: &Path) -> Self {
        install_crypto();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            addr,
            tls: Arc::new(tls),
        }
    }

    pub(super) fn origin(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub(super) async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Page {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let host = format!("localhost:{}", self.addr.port());
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .header("content-length", body.len().to_string())
            .body(axum::body::Body::from(body))
            .unwrap();
        let resp: hyper::Response<Incoming> = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), 16 << 20)
            .await
            .unwrap();
        Page {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub(super) async fn get(&self, path: &str, session: Option<&str>) -> Page {
        let cookie = session.map(|s| format!("kw_ui={s}"));
        let mut headers = Vec::new();
        if let Some(c) = &cookie {
            headers.push(("cookie", c.as_str()));
        }
        self.send("GET", path, &headers, Vec::new()).await
    }

    /// POSTs the sign-in form with `token` from this listener's origin.
    pub(super) async fn sign_in(&self, token: &str) -> Page {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .finish();
        let origin = self.origin();
        self.send(
            "POST",
            "/ui/sign-in",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &origin),
            ],
            body.into_bytes(),
        )
        .await
    }

    pub(super) async fn session_of(&self, token: &str) -> String {
        let a = self.sign_in(token).await;
        assert_eq!(a.status, 303, "{}", a.text);
        assert_eq!(a.header("location"), "/ui/");
        a.session().expect("a session cookie")
    }
}

pub(super) fn assert_hardened(p: &Page) {
    let csp = p.header("content-security-policy");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("script-src"),
        "{csp}"
    );
    assert_eq!(p.header("x-frame-options"), "DENY");
    assert_eq!(p.header("cache-control"), "no-store");
    assert_eq!(p.header("x-content-type-options"), "nosniff");
    assert!(!p.text.contains("<script"), "no script in any page");
}

#[tokio::test]
async fn without_a_session_every_page_sends_to_sign_in_and_a_query_token_is_ignored() {
    let server = TestServer::dev().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    let token = server.root_token.clone();
    for path in [
        "/ui/".to_owned(),
        "/ui/identity/anyone".to_owned(),
        format!("/ui/?token={token}"),
        format!("/ui/?X-Vault-Token={token}"),
    ] {
        let a = ui.get(&path, None).await;
        assert_eq!(a.status, 303, "{path}: {}", a.text);
        assert_eq!(a.header("location"), "/ui/sign-in", "{path}");
        assert_hardened(&a);
    }
    // The token as a header is no session either.
    let a = ui
        .send("GET", "/ui/", &[("x-vault-token", &token)], Vec::new())
        .await;
    assert_eq!(a.status, 303);
    // A token in the sign-in URL, with an empty form, signs nobody in.
    let origin = ui.origin();
    let a = ui
        .send(
            "POST",
            &format!("/ui/sign-in?token={token}"),
            &[
                ("origin", &origin),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            Vec::new(),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.session().is_none());
    assert!(!a.text.contains(&token));
    // The sign-in form itself: a POST form with a password field.
    let a = ui.get("/ui/sign-in", None).await;
    assert_eq!(a.status, 200);
    assert_hardened(&a);
    assert!(a.text.contains("method=\"post\" action=\"/ui/sign-in\""));
    assert!(a.text.contains("type=\"password\" name=\"token\""));
    server.stop().await;
}

#[tokio::test]
async fn sign_in_sets_a_strict_cookie_and_sign_out_ends_the_session() {
    let server = TestServer::dev().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    // A wrong token and a look-alike: refused, no cookie.
    for bad in [
        "kwt_not-a-token".to_owned(),
        format!("{}x", server.root_token),
    ] {
        let a = ui.sign_in(&bad).await;
        assert_eq!(a.status, 403, "{}", a.text);
        assert!(a.session().is_none());
        assert!(a.text.contains("not valid"), "{}", a.text);
        assert!(!a.text.contains(&bad));
    }
    let a = ui.sign_in(&server.root_token).await;
    assert_eq!(a.status, 303, "{}", a.text);
    let cookie = a.header("set-cookie");
    for flag in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/ui/",
        "Max-Age=900",
    ] {
        assert!(cookie.contains(flag), "{flag} missing: {cookie}");
    }
    assert!(!cookie.contains(&server.root_token));
    let id = a.session().unwrap();
    assert_eq!(id.len(), 64, "32 random bytes in hex");
    assert!(!a.header("location").contains(&server.root_token));

    let page = ui.get("/ui/", Some(&id)).await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_hardened(&page);
    assert!(page.text.contains("data-testid=\"identities-total\""));
    assert!(page.text.contains("data-testid=\"anomalies-count\">0<"));
    assert!(!page.text.contains(&server.root_token));
    // A look-alike session id finds nothing.
    let mut other = id.clone().into_bytes();
    other[0] = if other[0] == b'a' { b'b' } else { b'a' };
    let other = String::from_utf8(other).unwrap();
    assert_eq!(ui.get("/ui/", Some(&other)).await.status, 303);

    // Sign-out without the page's origin is refused and ends nothing.
    let cookie = format!("kw_ui={id}");
    for headers in [
        vec![("cookie", cookie.as_str())],
        vec![
            ("cookie", cookie.as_str()),
            ("origin", "https://evil.example"),
        ],
    ] {
        let a = ui.send("POST", "/ui/sign-out", &headers, Vec::new()).await;
        assert_eq!(a.status, 403, "{}", a.text);
    }
    assert_eq!(ui.get("/ui/", Some(&id)).await.status, 200);
    let origin = ui.origin();
    let a = ui
        .send(
            "POST",
            "/ui/sign-out",
            &[("cookie", &cookie), ("origin", &origin)],
            Vec::new(),
        )
        .await;
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), "/ui/sign-in");
    assert!(a.header("set-cookie").contains("Max-Age=0"));
    let after = ui.get("/ui/", Some(&id)).await;
    assert_eq!(after.status, 303, "the session is gone on the server");
    server.stop().await;
}

#[tokio::test]
async fn a_cross_site_sign_in_is_refused() {
    let server = TestServer::dev().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    let body = format!("token={}", server.root_token).into_bytes();
    let other_port = format!("https://localhost:{}", server.http_addr.port() + 1);
    for headers in [
        vec![],
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        vec![("origin", other_port.as_str())],
        vec![("origin", "http://localhost")],
    ] {
        let mut h = headers.clone();
        h.push(("content-type", "application/x-www-form-urlencoded"));
        let a = ui.send("POST", "/ui/sign-in", &h, body.clone()).await;
        assert_eq!(a.status, 403, "{headers:?}: {}", a.text);
        assert!(a.session().is_none(), "{headers:?}");
    }
    let origin = ui.origin();
    let a = ui
        .send(
            "POST",
            "/ui/sign-in",
            &[
                ("origin", &origin),
                ("sec-fetch-site", "cross-site"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body,
        )
        .await;
    assert_eq!(a.status, 403);
    server.stop().await;
}

/// A sign-in form over its 8 KiB bound is answered 413 and signs nobody
/// in, even with a valid token in it; the page does not echo the form.
#[tokio::test]
async fn an_oversized_sign_in_form_is_refused_as_too_large() {
    let server = TestServer::dev().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    let mut body = format!("token={}&pad=", server.root_token).into_bytes();
    body.resize(16 * 1024, b'x');
    let origin = ui.origin();
    let a = ui
        .send(
            "POST",
            "/ui/sign-in",
            &[
                ("origin", &origin),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body,
        )
        .await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert!(a.text.contains("The form is too large."), "{}", a.text);
    assert!(a.session().is_none());
    assert!(!a.text.contains(&server.root_token));
    server.stop().await;
}

#[tokio::test]
async fn a_low_privileged_token_sees_only_what_it_may_and_no_token_leaks() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let ui = Browserless::new(server.http_addr, &server.ca);
    let prefix = unique("uiv");
    let reader = unique("uiread");
    put_policy(
        &server,
        &reader,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    for p in ["shown/a", "secret/b"] {
        root.put(
            &format!("{prefix}/{p}"),
            &data(&[("v", "value-not-shown")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let svc = unique("svc");
    let other = unique("other");
    let (role_id, secret_id) = approle_identity(&root, &svc, std::slice::from_ref(&reader)).await;
    root.identity_create(create(&other, "bot", "", &[]))
        .await
        .unwrap();
    let (svc_token, svc_client) = login(&server, &role_id, &secret_id).await;
    for p in ["shown/a", "secret/b"] {
        svc_client.get(&format!("{prefix}/{p}")).await.unwrap();
    }

    // Viewer: the report and this one identity, and only the `shown` part
    // of the secrets; not the attestation list.
    let viewer = unique("viewer");
    put_policy(
        &server,
        &viewer,
        &format!(
            "[[rule]]\npath = \"sys/governance\"\ncapabilities = [\"read\"]\n\n\
             [[rule]]\npath = \"identity/{svc}\"\ncapabilities = [\"read\"]\n\n\
             [[rule]]\npath = \"secret/{prefix}/shown/**\"\ncapabilities = [\"list\"]\n"
        ),
    )
    .await;
    // Narrow: this one identity only.
    let narrow = unique("narrow");
    put_policy(
        &server,
        &narrow,
        &format!("[[rule]]\npath = \"identity/{svc}\"\ncapabilities = [\"read\"]\n"),
    )
    .await;
    let issue = |policy: &str| IssueOptions {
        policies: vec![policy.to_owned()],
        ..IssueOptions::default()
    };
    let viewer_token = root.issue_token(issue(&viewer)).await.unwrap().token;
    let narrow_token = root.issue_token(issue(&narrow)).await.unwrap().token;
    let mut pages = Vec::new();

    let v = ui.session_of(&viewer_token).await;
    let page = ui.get("/ui/", Some(&v)).await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert!(
        page.text
            .contains("Not shown: your token needs list on identity"),
        "{}",
        page.text
    );
    assert!(page.count("attestations-due-count").is_none());
    assert!(page.count("leases-expiring-count").is_none());
    pages.push(page);
    let page = ui.get(&format!("/ui/identity/{svc}"), Some(&v)).await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_eq!(page.count("reads-count"), Some(1), "{}", page.text);
    assert!(page.text.contains(&format!("{prefix}/shown/a")));
    assert!(
        !page.text.contains(&format!("{prefix}/secret/b")),
        "a path the viewer may not see is not named"
    );
    assert!(page.text.contains("data-testid=\"reads-hidden\">1 more"));
    assert_eq!(page.count("identity-tokens"), Some(1), "{}", page.text);
    assert!(!page.text.contains("value-not-shown"));
    pages.push(page);
    let page = ui.get(&format!("/ui/identity/{other}"), Some(&v)).await;
    assert_eq!(page.status, 403, "{}", page.text);
    assert_hardened(&page);
    for odd in ["%3Cscript%3E", "a%2Fb", "..%2F..", "%FF"] {
        let p = ui.get(&format!("/ui/identity/{odd}"), Some(&v)).await;
        assert_eq!(p.status, 400, "{odd}: {}", p.text);
        assert_hardened(&p);
        assert!(!p.text.contains("<script>"), "{odd}");
    }
    assert!(!page.text.contains(&other) || page.text.contains("may not"));
    pages.push(page);

    let n = ui.session_of(&narrow_token).await;
    let page = ui.get("/ui/", Some(&n)).await;
    assert_eq!(page.status, 403, "{}", page.text);
    assert!(page.text.contains("sys/governance"), "{}", page.text);
    assert!(
        !page.text.contains(&other),
        "no identity name leaks from the report"
    );
    pages.push(page);
    assert_eq!(
        ui.get(&format!("/ui/identity/{svc}"), Some(&n))
            .await
            .status,
        200
    );
    assert_eq!(
        ui.get(&format!("/ui/identity/{other}"), Some(&n))
            .await
            .status,
        403
    );
    // Root sees every part.
    let r = ui.session_of(&server.root_token).await;
    let page = ui.get("/ui/", Some(&r)).await;
    assert_eq!(page.status, 200);
    assert!(page.count("attestations-due-count").is_some());
    pages.push(page);

    // A revoked token ends its session at the next page.
    root.revoke_token(&narrow_token).await.unwrap();
    let page = ui.get(&format!("/ui/identity/{svc}"), Some(&n)).await;
    assert_eq!(page.status, 303, "{}", page.text);
    assert!(page.header("set-cookie").contains("Max-Age=0"));

    // No token in any page, nor in the audit log or anywhere under the
    // vault's folder.
    let root_token = server.root_token.clone();
    let tokens = [
        root_token.as_str(),
        viewer_token.as_str(),
        narrow_token.as_str(),
        svc_token.token.as_str(),
    ];
    for p in &pages {
        for t in tokens {
            assert!(!p.text.contains(t), "a token in a page");
        }
    }
    let audit = std::fs::read(&server.audit_path).unwrap();
    assert!(
        contains(&audit, b"keyward.ui/Overview"),
        "pages are audited"
    );
    for t in &tokens[1..] {
        assert!(!contains(&audit, t.as_bytes()), "a token in the audit log");
    }
    let dir = server.stop().await;
    for file in files_under(dir.path()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        for t in &tokens[1..] {
            assert!(
                !contains(&bytes, t.as_bytes()),
                "a token in {}",
                file.display()
            );
        }
    }
}

// --- the browser ------------------------------------------------------------

/// The venv with playwright (PyPI), made on first use; Chromium is Debian's
/// (`apt-get install chromium`, done by .ci/run). Fails with the command to
/// run if either is missing (TESTING.md: never a silent skip).
fn playwright_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-venv");
    let python = venv.join("bin/python");
    let ready = || {
        std::process::Command::new(&python)
            .args(["-c", "import playwright.sync_api"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let install = format!(
            "python3 -m venv {0} && {0}/bin/pip install playwright",
            venv.display()
        );
        let status = std::process::Command::new("sh")
            .args(["-c", &install])
            .status();
        assert!(
            status.is_ok_and(|s| s.success()) && ready(),
            "playwright could not be installed; run: {install}"
        );
    }
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "Debian's Chromium is missing; run: apt-get install -y chromium"
    );
    python
}

/// base64(SHA-256(SubjectPublicKeyInfo)) of the first certificate in
/// `pem`: what Chromium's `--ignore-certificate-errors-spki-list` takes, so
/// it accepts this one test certificate and nothing else.
fn spki_pin(pem: &Path) -> String {
    use base64::Engine as _;
    let der = CertificateDer::pem_file_iter(pem)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Serves `router` over TLS with `cert`/`key` on 127.0.0.1:0 until the
/// trigger fires; returns the address.
async fn serve_dashboard(
    core: Arc<keyward::core::Core>,
    governance: keyward::config::GovernanceConfig,
    cert: &Path,
    key: &Path,
    stop: &keyward::clock::ShutdownTrigger,
) -> SocketAddr {
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let limits = keyward::config::ServerLimits::default();
    let state = keyward::http::HttpState::new(core, limits).with_governance(governance);
    let router = keyward::http::router(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = stop.signal();
    tokio::spawn(keyward::http::listen::serve(
        listener,
        Some(Arc::new(tls)),
        router,
        limits,
        keyward::api::detach::Changes::new(keyward::api::detach::MAX_DETACHED),
        shutdown,
    ));
    addr
}

const DAY: u64 = 86_400_000;

/// A seeded vault shown in Chromium. The vault is made 40 days in the past
/// (a clock that reads then), so one identity nobody uses since is dormant
/// and a daily rotation never run since is overdue; it is then opened now
/// and only the HTTPS listener serves it: no rotation scheduler runs, as
/// when a scheduler is down, which is when rotations become overdue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_signs_in_and_reads_the_seeded_counts() {
    install_crypto();
    let python = playwright_python();
    let dir = super::harness::private_tempdir();
    let vault_dir = dir.path().join("vault");
    let now = keyward::clock::Clock::system().now_ms();
    let prefix = unique("uib");

    // Phase 1, 40 days ago: identities, a policy, a rotation policy.
    let names = {
        let vault = keyward::dev::open_with_clock(
            &vault_dir,
            None,
            keyward::clock::Clock::starting_at(now - 40 * DAY),
        )
        .await
        .unwrap();
        let token = vault.credentials.root_token.clone();
        let ca = vault.certs.ca.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(vault.server.serve(listener, None, async move {
            let _ = stopped.await;
        }));
        let root = Client::connect(ClientOptions {
            addr: format!("https://{addr}"),
            token: Some(token),
            ca_cert: Some(ca),
            ..ClientOptions::default()
        })
        .await
        .unwrap();
        let policy = format!("{prefix}-read");
        root.policy_put(
            &policy,
            &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\"]\n"),
        )
        .await
        .unwrap();
        let names = [
            (format!("{prefix}-svc-a"), "service-account", "team-a"),
            (format!("{prefix}-svc-b"), "service-account", "team-a"),
            (format!("{prefix}-runner"), "ci-runner", "platform"),
            (format!("{prefix}-sleepy"), "ci-runner", "platform"),
            (format!("{prefix}-orphan"), "ci-runner", ""),
        ];
        for (i, (name, kind, owner)) in names.iter().enumerate() {
            let policies = if i == 0 { vec![policy.clone()] } else { vec![] };
            root.identity_create(create(name, kind, owner, &policies))
                .await
                .unwrap();
        }
        let db = format!("{prefix}/db");
        root.put(&db, &data(&[("password", "p0")]), PutOptions::default())
            .await
            .unwrap();
        root.set_rotation_policy(
            &db,
            &RotationPolicySpec {
                provider: "random".into(),
                schedule: ScheduleSpec::Every(Duration::from_secs(86_400)),
                grace: Duration::from_secs(1),
                settings: [("fields".to_owned(), "password".to_owned())]
                    .into_iter()
                    .collect(),
            },
        )
        .await
        .unwrap();
        drop(root);
        let _ = stop.send(());
        task.await.unwrap().unwrap();
        names
    };

    // Phase 2, now: every identity but the sleepy one has been used today.
    let vault = keyward::dev::open_with(&vault_dir, None, keyward::clock::Clock::system(), |c| {
        c.governance.every = Duration::from_secs(30 * 86_400)
    })
    .await
    .unwrap();
    let core = vault.server.core().clone();
    for (name, _, _) in &names {
        if !name.ends_with("-sleepy") {
            core.usage.record(name, None, core.clock().now_ms());
        }
    }
    // svc-a read the rotated secret (the read set a decommission uses).
    core.reads
        .note(&names[0].0, &format!("{prefix}/db"), core.clock().now_ms())
        .await
        .unwrap();
    let stop = keyward::clock::ShutdownTrigger::new();
    let governance = keyward::config::GovernanceConfig {
        every: Duration::from_secs(30 * 86_400),
        ..Default::default()
    };
    let addr = serve_dashboard(
        core.clone(),
        governance,
        &vault.certs.server,
        &vault.certs.server_key,
        &stop,
    )
    .await;
    // What the vault itself says, for the assertions below to be about the
    // seed and the page alike.
    let report = core.governance_report(0, Duration::ZERO).unwrap();
    let ours = |list: &[String]| list.iter().filter(|n| n.starts_with(&prefix)).count();
    assert_eq!(ours(&report.dormant), 1, "{:?}", report.dormant);
    assert_eq!(ours(&report.unowned), 1);

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/ui_drive.py");
    let token = vault.credentials.root_token.clone();
    let input = serde_json::json!({
        "base": format!("https://localhost:{}", addr.port()),
        "token": token,
        "identity": format!("{prefix}-svc-a"),
        "spki": spki_pin(&vault.certs.server),
        "profile": profile.path(),
        "artifacts": artifacts,
    })
    .to_string();
    let python2 = python.clone();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = std::process::Command::new(python2)
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "the browser run failed:\n{stdout}\n{stderr}"
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    let n = |k: &str| seen["overview"][k].as_str().unwrap_or("?").to_owned();

    // The dev vault holds only this test's identities.
    assert_eq!(report.identities_total, 5, "{report:?}");
    assert_eq!(n("identities-total"), "5", "{seen}");
    assert_eq!(n("unowned-count"), "1", "{seen}");
    assert_eq!(n("dormant-count"), "1", "{seen}");
    assert_eq!(n("unused-grants-count"), "1", "svc-a's one rule: {seen}");
    assert_eq!(n("rotations-overdue-count"), "1", "{seen}");
    assert_eq!(
        n("attestations-due-count"),
        "5",
        "all made 40 days ago, due after 30: {seen}"
    );
    let kinds = &seen["kinds"];
    assert_eq!(kinds["service-account"], "2", "{seen}");
    assert_eq!(kinds["ci-runner"], "3", "{seen}");
    assert_eq!(kinds["bot"], "0", "{seen}");
    let owners = &seen["owners"];
    assert_eq!(owners["team-a"], "2", "{seen}");
    assert_eq!(owners["platform"], "2", "{seen}");
    assert_eq!(owners["(no owner)"], "1", "{seen}");
    let dormant: Vec<&str> = seen["dormant"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(dormant, vec![format!("{prefix}-sleepy")]);
    // The identity page.
    let id = &seen["identity"];
    assert_eq!(id["identity-name"], format!("{prefix}-svc-a"), "{seen}");
    assert_eq!(id["identity-kind"], "service-account");
    assert_eq!(id["identity-owner"], "team-a");
    assert_eq!(id["unused-rules-count"], "1");
    assert_eq!(id["reads-count"], "1", "{seen}");
    assert_eq!(id["attestation-state"], "due");
    assert_eq!(id["identity-tokens"], "0");
    // The seeded identities are in their warm-up: nothing is flagged.
    assert_eq!(id["anomalies-count"], "0", "{seen}");
    // The token went only into the form: never into a URL the browser asked
    // for, and the session cookie is HttpOnly (not readable by the page).
    for url in seen["urls"].as_array().unwrap() {
        assert!(!url.as_str().unwrap().contains(&token), "{url}");
    }
    assert_eq!(seen["cookie_http_only"], true, "{seen}");
    assert_eq!(seen["cookie_secure"], true, "{seen}");
    assert_eq!(seen["cookie_same_site"], "Strict", "{seen}");
    assert_eq!(seen["document_cookie"], "", "no cookie visible to scripts");
    assert_eq!(seen["after_sign_out"], "/ui/sign-in", "{seen}");
    for shot in ["overview.png", "identity.png"] {
        let len = std::fs::metadata(artifacts.join(shot)).unwrap().len();
        assert!(len > 1000, "{shot} is {len} bytes");
    }
    assert!(!stdout.contains(&token) && !stderr.contains(&token));
    stop.trigger();
}

/// The real `keyward dev` binary with debug logging: after sign-ins (good,
/// bad and look-alike tokens), pages and a sign-out, no token value is in
/// its log, its audit log, or any file of its folder but the dev
/// credentials file that holds the root token by design.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_reaches_the_servers_log() {
    use std::io::BufRead as _;
    let dir = super::harness::private_tempdir();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(super::harness::binary())
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--http-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(dir.path().join("vault"))
        .env("KEYWARD_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(log))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut vars = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.strip_prefix("export ") {
                vars.push(rest.to_owned());
                if vars.len() == 6 {
                    let _ = tx.send(vars.clone());
                }
            }
        }
    });
    let vars = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("keyward dev did not print its export lines");
    let get = |k: &str| {
        vars.iter()
            .find_map(|v| v.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_owned()
    };
    let token = get("KEYWARD_TOKEN");
    let ca = PathBuf::from(get("KEYWARD_CACERT"));
    let http: SocketAddr = get("VAULT_ADDR")
        .strip_prefix("https://")
        .unwrap()
        .parse()
        .unwrap();
    let root = Client::connect(ClientOptions {
        addr: get("KEYWARD_ADDR"),
        token: Some(token.clone()),
        ca_cert: Some(ca.clone()),
        ..ClientOptions::default()
    })
    .await
    .unwrap();
    root.policy_put(
        "ui-narrow",
        "[[rule]]\npath = \"secret/ui-narrow/**\"\ncapabilities = [\"read\"]\n",
    )
    .await
    .unwrap();
    let narrow = root
        .issue_token(IssueOptions {
            policies: vec!["ui-narrow".into()],
            ..IssueOptions::default()
        })
        .await
        .unwrap()
        .token;
    let ui = Browserless::new(http, &ca);
    // The last character changed to one it is not: a fixed "Z" equals the
    // real token's last character one time in 64 and then signs in.
    let last = if token.ends_with('Z') { 'Y' } else { 'Z' };
    let look_alike = format!("{}{last}", &token[..token.len() - 1]);
    assert_ne!(look_alike, token);
    assert_eq!(ui.sign_in(&look_alike).await.status, 403);
    let s = ui.session_of(&token).await;
    assert_eq!(ui.get("/ui/", Some(&s)).await.status, 200);
    assert_eq!(ui.get("/ui/?token=x", Some(&s)).await.status, 200);
    let n = ui.session_of(&narrow).await;
    assert_eq!(ui.get("/ui/", Some(&n)).await.status, 403);
    let cookie = format!("kw_ui={s}");
    let origin = ui.origin();
    ui.send(
        "POST",
        "/ui/sign-out",
        &[("cookie", &cookie), ("origin", &origin)],
        Vec::new(),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read(&log_path).unwrap();
    assert!(!log.is_empty(), "debug logging wrote nothing");
    let secrets = [
        token.clone(),
        look_alike.clone(),
        s.clone(),
        narrow.clone(),
        n.clone(),
    ];
    for secret in &secrets {
        assert!(
            !contains(&log, secret.as_bytes()),
            "a token or session id in the log"
        );
    }
    for file in files_under(dir.path()) {
        if file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("cred"))
        {
            continue;
        }
        let bytes = std::fs::read(&file).unwrap_or_default();
        for secret in &secrets {
            assert!(
                !contains(&bytes, secret.as_bytes()),
                "a token or session id in {}",
                file.display()
            );
        }
    }
}
