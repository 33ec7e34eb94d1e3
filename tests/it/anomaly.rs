//! Anomaly detection (issue 13). Most tests run a real server over TLS and
//! plant one anomaly each from a client; other source addresses are real
//! connections bound to other loopback addresses (127.0.1.1 is another
//! /24 than 127.0.0.1; 127.0.0.2 another host of the same /24). Warm-up is
//! shortened through `anomaly.*` so a test needs tens of calls, not days.
//! Waiting is for the event itself (polling with a generous bound).
//!
//! Where days must pass (a steady baseline, dormancy), a vault is opened in
//! process on tokio's paused clock and driven through the request seam
//! (`core::call::Call`), which is what every gRPC and HTTP handler uses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;

use crate::harness::{cli, data, eventually, scrape, unique, TestServer};
use crate::ident_kit::{approle_identity, login, put_policy, read_policy};
use keyward::anomaly::AnomalyConfig;
use keyward::client::{Client, PutOptions};
use keyward::proto::v1::secrets_client::SecretsClient;
use keyward::proto::v1::{Anomaly, GetSecretRequest};

/// Short warm-up: 20 calls, no minimum age.
pub(crate) fn quick(
    adjust: impl FnOnce(&mut AnomalyConfig),
) -> impl FnOnce(&mut keyward::config::ServerConfig) {
    move |c| {
        c.anomaly.warmup_requests = 20;
        c.anomaly.warmup_age = Duration::ZERO;
        adjust(&mut c.anomaly);
    }
}

/// A reader identity of `secret/<prefix>/**` with two secrets it has read
/// 15 times each (warm): (name, client, token).
pub(crate) async fn warm_reader(
    server: &TestServer,
    root: &Client,
    prefix: &str,
) -> (String, Client, String) {
    let policy = read_policy(server, prefix).await;
    for leaf in ["a", "b", "never"] {
        root.put(
            &format!("{prefix}/{leaf}"),
            &data(&[("password", &format!("pw-{leaf}-{}", unique("v")))]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let name = unique("svc");
    let (role_id, secret_id) = approle_identity(root, &name, &[policy]).await;
    let (t, client) = login(server, &role_id, &secret_id).await;
    for _ in 0..15 {
        client.get(&format!("{prefix}/a")).await.unwrap();
        client.get(&format!("{prefix}/b")).await.unwrap();
    }
    (name, client, t.token)
}

/// A `Secrets.Get` over a connection from `local` (a loopback address).
async fn get_from(
    server: &TestServer,
    local: &str,
    token: &str,
    path: &str,
) -> Result<(), tonic::Status> {
    let ca = std::fs::read(&server.ca).unwrap();
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .local_address(Some(local.parse::<IpAddr>().unwrap()))
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(GetSecretRequest {
        path: path.to_owned(),
        version: None,
        stage: None,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    SecretsClient::new(channel).get(req).await.map(|_| ())
}

/// Waits until an anomaly of `kind` for `identity` is listed; returns it.
async fn listed(root: &Client, identity: Option<&str>, kind: &str) -> Anomaly {
    for _ in 0..600 {
        let list = root.list_anomalies(identity, None, 0).await.unwrap();
        if let Some(found) = list.into_iter().find(|a| a.kind == kind) {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {kind} anomaly was listed within 30 s");
}

#[tokio::test]
async fn a_new_source_and_a_new_path_are_listed_streamed_counted_and_audited() {
    let server = TestServer::dev_with(quick(|_| {})).await;
    let root = server.root().await;
    let prefix = unique("anom");
    let (name, _svc, token) = warm_reader(&server, &root, &prefix).await;
    let mut watch = root.watch_anomalies(Some(&name)).await.unwrap();

    // A secret it may read but never did, from where it always reads.
    let planted = format!("{prefix}/never");
    get_from(&server, "127.0.0.1", &token, &planted)
        .await
        .unwrap();
    let path_event = listed(&root, Some(&name), "new_path").await;
    assert!(path_event.detail.contains(&format!("secret/{planted}")));
    let streamed = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("no anomaly streamed within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(streamed.kind, "new_path");

    // Another /24: a source this identity never used (the same token, in
    // use a moment ago from 127.0.0.1, is also a token_reuse).
    get_from(&server, "127.0.1.1", &token, &format!("{prefix}/a"))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("no anomaly streamed within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(event.kind, "new_source");
    assert_eq!(event.identity, name);
    assert_eq!(event.source, "127.0.1.1");
    assert!(event.detail.contains("127.0.1.0/24"), "{}", event.detail);
    assert_eq!(event.response, "alert");
    let reuse = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reuse.kind, "token_reuse");
    assert_eq!(reuse.accessor, event.accessor);

    // Counted, and in the audit log with its kind and identity.
    let metrics = scrape(server.metrics_addr).await;
    assert!(
        metrics.contains("keyward_anomalies_total{kind=\"new_source\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("keyward_anomalies_total{kind=\"new_path\"} 1"));
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["method"] == "keyward.anomaly/Detected")
        .collect();
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["new_path", "new_source", "token_reuse"]);
    assert_eq!(records[1]["anomaly_source"], "127.0.1.1");
    assert_eq!(records[0]["anomaly_identity"], name.as_str());
    // The governance report counts the last day's events by kind.
    let report = root.governance_report(0, 0).await.unwrap();
    let recent: Vec<(&str, u64)> = report
        .anomalies_recent
        .iter()
        .map(|c| (c.key.as_str(), c.count))
        .collect();
    assert_eq!(
        recent,
        vec![("new_source", 1), ("new_path", 1), ("token_reuse", 1)]
    );
    // No token and no secret value in the audit records of anomalies, the
    // events, or the server's answer.
    let values = root.get(&planted).await.unwrap();
    let secret = values.field_str("password").unwrap().to_owned();
    let listed_json = format!("{:?}", root.list_anomalies(None, None, 0).await.unwrap());
    for text in [audit.as_str(), listed_json.as_str()] {
        assert!(!text.contains(&token), "the token leaked");
        assert!(!text.contains(&secret), "a secret value leaked");
    }
}

#[tokio::test]
async fn a_revoke_token_response_revokes_the_token_that_made_the_request() {
    let server = TestServer::dev_with(quick(|a| {
        a.set_response(
            keyward::anomaly::Kind::NewPath,
            keyward::anomaly::Response::RevokeToken,
        )
        .unwrap();
    }))
    .await;
    let root = server.root().await;
    let prefix = unique("anom");
    let (name, svc, _) = warm_reader(&server, &root, &prefix).await;
    svc.get(&format!("{prefix}/never")).await.unwrap();
    let event = listed(&root, Some(&name), "new_path").await;
    assert_eq!(event.response, "revoke-token: revoked 1 token(s)");
    let refused = svc.get(&format!("{prefix}/a")).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::Unauthenticated));
    // The identity itself is not disabled.
    assert!(!root.identity_get(&name).await.unwrap().disabled);
    // The response is in the audit log, and the log verifies (the record
    // once had `outcome` twice, which no verifier accepts).
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    let responded: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["method"] == "keyward.anomaly/Respond")
        .collect();
    assert_eq!(responded.len(), 1, "{responded:?}");
    assert_eq!(responded[0]["response_outcome"], "revoked 1 token(s)");
    assert_eq!(responded[0]["outcome"], "allowed");
    let verified = keyward::audit::verify_file(&server.audit_path).unwrap();
    assert!(verified.ok, "{verified:?}");
}

#[tokio::test]
async fn a_disable_identity_response_disables_it_on_a_token_used_from_two_sources() {
    let server = TestServer::dev_with(quick(|a| {
        a.set_response(
            keyward::anomaly::Kind::TokenReuse,
            keyward::anomaly::Response::DisableIdentity,
        )
        .unwrap();
    }))
    .await;
    let root = server.root().await;
    let prefix = unique("anom");
    let (name, svc, token) = warm_reader(&server, &root, &prefix).await;
    // The same token from another network, at once (also a new source).
    get_from(&server, "127.0.1.1", &token, &format!("{prefix}/a"))
        .await
        .unwrap();
    let event = listed(&root, Some(&name), "token_reuse").await;
    assert!(
        event
            .response
            .starts_with("disable-identity: identity disabled"),
        "{}",
        event.response
    );
    assert!(root.identity_get(&name).await.unwrap().disabled);
    let refused = svc.get(&format!("{prefix}/a")).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::Unauthenticated));
    // The new source is an alert only (its own response).
    let source = listed(&root, Some(&name), "new_source").await;
    assert_eq!(source.response, "alert");
}

#[tokio::test]
async fn a_token_shared_by_hosts_of_one_subnet_is_not_flagged() {
    let server = TestServer::dev_with(quick(|a| {
        a.set_response(
            keyward::anomaly::Kind::TokenReuse,
            keyward::anomaly::Response::DisableIdentity,
        )
        .unwrap();
    }))
    .await;
    let root = server.root().await;
    let prefix = unique("anom");
    let (name, svc, token) = warm_reader(&server, &root, &prefix).await;
    for local in ["127.0.0.2", "127.0.0.3", "127.0.0.1"] {
        get_from(&server, local, &token, &format!("{prefix}/b"))
            .await
            .unwrap();
    }
    svc.get(&format!("{prefix}/a")).await.unwrap();
    let expected = server.core.anomalies.queued();
    eventually("the detector took the calls in", || {
        let a = server.core.anomalies.clone();
        async move { a.handled() >= expected }
    })
    .await;
    assert_eq!(
        root.list_anomalies(Some(&name), None, 0).await.unwrap(),
        Vec::new()
    );
    assert!(!root.identity_get(&name).await.unwrap().disabled);
}

#[tokio::test]
async fn a_first_read_right_after_a_siblings_decommission_is_flagged() {
    let server = TestServer::dev_with(quick(|_| {})).await;
    let root = server.root().await;
    let prefix = unique("anom");
    // Both identities are owned by team-a (ident_kit).
    let (stays, svc, _) = warm_reader(&server, &root, &prefix).await;
    let (gone, _gone_client, _) = warm_reader(&server, &root, &prefix).await;
    let done = root.identity_decommission(&gone, false).await.unwrap();
    assert!(done.done);
    svc.get(&format!("{prefix}/never")).await.unwrap();
    let event = listed(&root, Some(&stays), "sibling_read").await;
    assert!(event.detail.contains(&gone), "{}", event.detail);
    assert_eq!(event.response, "alert");
}

// The CLI runs as a child process and blocks while the server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_needs_read_on_sys_anomalies_and_a_low_privileged_caller_cannot_watch() {
    let server = TestServer::dev_with(quick(|_| {})).await;
    let root = server.root().await;
    let prefix = unique("anom");
    let (name, _svc, token) = warm_reader(&server, &root, &prefix).await;
    get_from(&server, "127.0.1.1", &token, &format!("{prefix}/a"))
        .await
        .unwrap();
    listed(&root, Some(&name), "new_source").await;

    // Callers: one with nothing on sys/anomalies, one with look-alikes, one
    // with list only, and one with read.
    let mut callers = Vec::new();
    for rules in [
        String::new(),
        "[[rule]]\npath = \"sys/anomaliesx\"\ncapabilities = [\"read\"]\n\
         [[rule]]\npath = \"sys/anomalies/*\"\ncapabilities = [\"read\"]\n"
            .to_owned(),
        "[[rule]]\npath = \"sys/anomalies\"\ncapabilities = [\"list\"]\n".to_owned(),
        "[[rule]]\npath = \"sys/anomalies\"\ncapabilities = [\"read\"]\n".to_owned(),
    ] {
        let policy = unique("anomaly-view");
        let text =
            format!("[[rule]]\npath = \"secret/{prefix}/a\"\ncapabilities = [\"read\"]\n{rules}");
        put_policy(&server, &policy, &text).await;
        let who = unique("viewer");
        let (role_id, secret_id) = approle_identity(&root, &who, &[policy]).await;
        let (t, client) = login(&server, &role_id, &secret_id).await;
        callers.push((t.token, client));
    }
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_string_lossy().into_owned();
    for (i, (token, client)) in callers.iter().enumerate() {
        let allowed = i == 3;
        let (status, stdout, stderr) = cli(
            &[
                "anomalies",
                "list",
                "--identity",
                &name,
                "--since",
                "1h",
                "--format",
                "json",
            ],
            &[
                ("KEYWARD_ADDR", &addr),
                ("KEYWARD_CACERT", &ca),
                ("KEYWARD_TOKEN", token),
            ],
            None,
        );
        let watch = client.watch_anomalies(None).await;
        if allowed {
            assert_eq!(status, 0, "{stderr}");
            let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            let kinds: Vec<&str> = doc["anomalies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["kind"].as_str().unwrap())
                .collect();
            // The token that warmed up from 127.0.0.1, a moment later from
            // 127.0.1.1: a new source, and a token in two places.
            assert_eq!(kinds, vec!["new_source", "token_reuse"]);
            assert!(watch.is_ok());
        } else {
            assert_eq!(status, 1, "caller {i}: {stdout}");
            assert!(stderr.contains("PERMISSION_DENIED"), "caller {i}: {stderr}");
            assert_eq!(
                watch.unwrap_err().code(),
                Some(Code::PermissionDenied),
                "caller {i}"
            );
        }
    }
    // Without a token at all.
    let anonymous = server.anonymous().await;
    let e = anonymous.watch_anomalies(None).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated));
    let e = anonymous.list_anomalies(None, None, 0).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated));
    // The table format prints the event.
    let (status, stdout, stderr) = cli(
        &["anomalies", "list", "--identity", &name],
        &[
            ("KEYWARD_ADDR", &addr),
            ("KEYWARD_CACERT", &ca),
            ("KEYWARD_TOKEN", &callers[3].0),
        ],
        None,
    );
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.contains("new_source") && stdout.contains(&name),
        "{stdout}"
    );
}

#[tokio::test]
async fn an_unauthenticated_failed_login_flood_only_alerts_and_holds_no_state_per_attempt() {
    // Config refuses a response other than alert for failed logins.
    for response in ["revoke-token", "disable-identity"] {
        let mut map = std::collections::BTreeMap::new();
        map.insert("storage.path".to_owned(), "data".to_owned());
        map.insert("audit.path".to_owned(), "audit.log".to_owned());
        map.insert(
            "anomaly.response.failed_logins".to_owned(),
            response.to_owned(),
        );
        let e = keyward::config::parse(&keyward::config::MapSource(map), std::path::Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("anomaly.response.failed_logins"), "{e}");
        assert!(e.contains("only allowed response is alert"), "{e}");
    }

    let server = TestServer::dev_with(quick(|a| a.failed_login_burst = 10)).await;
    let root = server.root().await;
    let prefix = unique("anom");
    let (name, svc, _) = warm_reader(&server, &root, &prefix).await;
    let (baselines_before, _, _) = server.core.anomalies.held();
    let anonymous = server.anonymous().await;
    let role_id = root
        .identity_secret_id(&name, 0, 0, &[])
        .await
        .unwrap()
        .role_id;
    for i in 0..200 {
        let e = anonymous
            .login_approle(&role_id, &format!("wrong-{i}"), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                Some(Code::Unauthenticated | Code::ResourceExhausted | Code::PermissionDenied)
            ),
            "{e}"
        );
    }
    // Per identity: the login module knows whose role was tried.
    let per_identity = listed(&root, Some(&name), "failed_logins").await;
    assert_eq!(per_identity.response, "alert");
    assert!(per_identity
        .detail
        .contains("failed logins as this identity"));
    // Per source: names no identity.
    let all = root.list_anomalies(None, None, 0).await.unwrap();
    let bursts: Vec<&Anomaly> = all.iter().filter(|a| a.kind == "failed_logins").collect();
    let per_source: Vec<&&Anomaly> = bursts.iter().filter(|a| a.identity.is_empty()).collect();
    assert_eq!(per_source.len(), 1, "{all:?}");
    assert_eq!(per_source[0].response, "alert");
    assert_eq!(per_source[0].source, "127.0.0.1");
    // One event per burst window and key, not one per attempt.
    assert_eq!(bursts.len(), 2, "{all:?}");
    // Nobody was locked out by the detector: the identity works.
    assert!(!root.identity_get(&name).await.unwrap().disabled);
    svc.get(&format!("{prefix}/a")).await.unwrap();
    // The flood made no baseline and followed no token; one source is held.
    eventually("the detector saw the flood", || {
        let a = server.core.anomalies.clone();
        async move { a.held().2 >= 1 }
    })
    .await;
    let (baselines, _, sources) = server.core.anomalies.held();
    assert_eq!(baselines, baselines_before);
    assert_eq!(sources, 1);
    assert_eq!(server.core.anomalies.dropped(), 0);
}

// ---------------------------------------------------------------------------
// Paused time: a vault in process, driven through the request seam.

mod paused {
    use super::*;
    use keyward::audit::AuditLog;
    use keyward::barrier::{Barrier, BarrierOptions};
    use keyward::clock::{Clock, ShutdownTrigger};
    use keyward::core::call::{Access, Call, RequestMeta};
    use keyward::core::Core;
    use keyward::metrics::Metrics;
    use keyward::policy::Capability;
    use keyward::secrets::DataLimits;
    use keyward::storage::SledBackend;
    use keyward::token::TokenRequest;
    use zeroize::Zeroizing;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);
    /// 2026-01-05 00:00 UTC.
    const T0: u64 = 1_767_571_200_000;

    struct Vault {
        _dir: tempfile::TempDir,
        core: Arc<Core>,
        /// One token per host of [`HOSTS`] (replicas that each log in), and
        /// one more for anywhere else.
        tokens: Vec<String>,
    }

    async fn vault() -> Vault {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::starting_at(T0);
        let backend = SledBackend::open(dir.path().join("data")).unwrap();
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
        let core = Arc::new(Core::new(
            Arc::new(barrier),
            AuditLog::open(&dir.path().join("audit.log"), clock.clone()).unwrap(),
            Arc::new(Metrics::new()),
            DataLimits::default(),
            clock,
            keyward::clock::Shutdown::never(),
        ));
        let init = core.init(1, 1).await.unwrap();
        core.unseal(&init.shares[0].0).await.unwrap();
        let issue = || {
            core.tokens
                .issue(
                    TokenRequest {
                        identity: "svc".into(),
                        policies: vec!["root".into()],
                        ttl: 400 * DAY,
                        max_ttl: Duration::ZERO,
                        hard_expiry_ms: None,
                        uses: 0,
                        cidrs: Vec::new(),
                        parent_accessor: None,
                        method: "token",
                    },
                    core.clock().now_ms(),
                )
                .unwrap()
                .token
                .expose()
                .to_owned()
        };
        let tokens = (0..=HOSTS.len()).map(|_| issue()).collect();
        Vault {
            _dir: dir,
            core,
            tokens,
        }
    }

    /// One read through the seam, as a handler makes it.
    async fn read(v: &Vault, source: &str, path: &str) {
        let meta = RequestMeta {
            method: "keyward.v1.Secrets/Get",
            request_id: keyward::core::call::request_id(None),
            source: Some(SocketAddr::new(source.parse().unwrap(), 40_000)),
            token: Some(Zeroizing::new(v.tokens[token_index(source)].clone())),
            acting: None,
        };
        let mut call = Call::begin(&v.core, meta, Access::Token).await.unwrap();
        call.authorize(Capability::Read, format!("secret/{path}"))
            .unwrap();
        call.ok(&[]).unwrap();
    }

    fn token_index(source: &str) -> usize {
        HOSTS
            .iter()
            .position(|h| *h == source)
            .unwrap_or(HOSTS.len())
    }

    /// Waits (paused time passes by itself) until the worker took in
    /// `count` observations.
    async fn drained(v: &Vault, count: u64) {
        for _ in 0..10_000 {
            if v.core.anomalies.handled() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!(
            "the detector took in {} of {count}",
            v.core.anomalies.handled()
        );
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    const HOSTS: [&str; 5] = [
        "10.0.1.7",
        "10.0.1.30",
        "10.0.2.9",
        "192.168.5.10",
        "192.168.5.77",
    ];
    const PATHS: [&str; 4] = ["app/db", "app/api", "app/cache", "app/mail"];

    /// `days` of working-hours traffic (08:00-18:59 UTC) whose rate, hosts,
    /// paths and hours vary within one baseline; the clock ends at the next
    /// midnight. Returns the number of calls.
    async fn steady(v: &Vault, days: u64, rng: &mut Rng) -> u64 {
        let mut calls = 0;
        for _ in 0..days {
            tokio::time::advance(8 * HOUR).await;
            for _hour in 8..19 {
                for _burst in 0..2 {
                    let n = 2 + rng.below(15);
                    for _ in 0..n {
                        let host = HOSTS[rng.below(HOSTS.len() as u64) as usize];
                        let path = PATHS[rng.below(PATHS.len() as u64) as usize];
                        read(v, host, path).await;
                        calls += 1;
                    }
                    tokio::time::advance(20 * MIN).await;
                }
                tokio::time::advance(20 * MIN).await;
            }
            tokio::time::advance(5 * HOUR).await;
        }
        calls
    }

    /// A full queue (one identity flooding calls) is drained without the
    /// worker pausing between full batches: the pause after a small batch
    /// must not cap how fast a backlog drains (a reviewer's finding: with a
    /// pause after every batch, the queue stayed full under a flood and the
    /// calls of other identities were dropped). On the paused clock no time
    /// passes while this test only yields, so a worker that slept after a
    /// full batch would stop at the first one.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_drained_without_pausing_between_full_batches() {
        let v = vault().await;
        let fresh = keyward::anomaly::Anomalies::new(&Metrics::new());
        let trigger = ShutdownTrigger::new();
        let at = v.core.clock().now_ms();
        let total = keyward::anomaly::CHANNEL_CAPACITY as u64;
        for i in 0..total {
            fresh.observe(keyward::anomaly::Observation {
                at_ms: at,
                identity: Some("flooder".into()),
                accessor: Some("acc-flood".into()),
                source: Some(HOSTS[0].parse().unwrap()),
                method: "keyward.v1.Secrets/Get",
                resource: Some(format!("secret/denied/{}", i % 7)),
                capability: Some("read"),
                code: "PERMISSION_DENIED",
            });
        }
        assert_eq!(fresh.queued(), total, "the flood did not fill the queue");
        let started = tokio::time::Instant::now();
        let worker = tokio::spawn(fresh.clone().run(v.core.anomaly_deps(), trigger.signal()));
        for _ in 0..1_000_000 {
            if fresh.handled() >= total {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(fresh.handled(), total, "the backlog was not drained");
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "time passed while draining"
        );
        trigger.trigger();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn steady_traffic_is_quiet_then_use_after_dormancy_is_loud_and_survives_a_restart() {
        let v = vault().await;
        let trigger = ShutdownTrigger::new();
        let worker = tokio::spawn(
            v.core
                .anomalies
                .clone()
                .run(v.core.anomaly_deps(), trigger.signal()),
        );
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Default settings: warm after 200 calls and a day.
        let mut calls = steady(&v, 6, &mut rng).await;
        drained(&v, calls).await;
        assert_eq!(v.core.anomalies.list(None, 0, 0), Vec::new());
        assert_eq!(v.core.anomalies.dropped(), 0);
        assert!(calls > 300, "{calls} calls");

        // The baselines are written (every minute) and read back by a new
        // worker: it does not start its warm-up again.
        trigger.trigger();
        worker.await.unwrap();
        let fresh = keyward::anomaly::Anomalies::new(&Metrics::new());
        let trigger = ShutdownTrigger::new();
        let worker = tokio::spawn(fresh.clone().run(v.core.anomaly_deps(), trigger.signal()));
        // The old queue has no worker any more: feed the new one the way the
        // seam would.
        let mut events = fresh.subscribe();

        // 40 days idle, then one call at a usual hour, from a usual host.
        tokio::time::advance(40 * DAY + 9 * HOUR).await;
        let at = v.core.clock().now_ms();
        fresh.observe(keyward::anomaly::Observation {
            at_ms: at,
            identity: Some("svc".into()),
            accessor: Some("acc".into()),
            source: Some(HOSTS[0].parse().unwrap()),
            method: "keyward.v1.Secrets/Get",
            resource: Some(format!("secret/{}", PATHS[0])),
            capability: Some("read"),
            code: "OK",
        });
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event.kind, keyward::anomaly::Kind::DormantUse);
        assert_eq!(event.identity.as_deref(), Some("svc"));
        assert!(event.detail.contains("40 days"), "{}", event.detail);
        trigger.trigger();
        worker.await.unwrap();
        calls += 1;
        let _ = calls;
    }

    #[tokio::test(start_paused = true)]
    async fn after_warm_up_each_planted_anomaly_through_the_seam_is_loud() {
        let v = vault().await;
        let trigger = ShutdownTrigger::new();
        let worker = tokio::spawn(
            v.core
                .anomalies
                .clone()
                .run(v.core.anomaly_deps(), trigger.signal()),
        );
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut calls = steady(&v, 3, &mut rng).await;
        drained(&v, calls).await;
        assert_eq!(v.core.anomalies.list(None, 0, 0), Vec::new());
        // 03:00 UTC, from a network never used, on a path never used.
        tokio::time::advance(3 * HOUR).await;
        read(&v, "203.0.113.50", "payroll/key").await;
        calls += 1;
        // 10:00: a burst of 400 calls within a minute.
        tokio::time::advance(7 * HOUR).await;
        for _ in 0..400 {
            read(&v, HOSTS[0], PATHS[0]).await;
            calls += 1;
        }
        drained(&v, calls).await;
        let mut kinds: Vec<&str> = v
            .core
            .anomalies
            .list(Some("svc"), 0, 0)
            .iter()
            .map(|e| e.kind.as_str())
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            vec!["new_path", "new_source", "rate_spike", "unusual_hour"]
        );
        trigger.trigger();
        worker.await.unwrap();
    }
}
