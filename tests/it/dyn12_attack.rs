//! Issue 12's plugin credentials from an attacker's side: a malicious or
//! compromised plugin, and a low-privileged caller.
//!
//! The plugin here is served by the test itself on a unix socket
//! ([`Evil`]); each test sets what its `Create` and `Revoke` answer.
//!
//! - A plugin's account fields are checked before anything is stored or
//!   shown: a username that is empty, too long or holds control
//!   characters, a host or database with control characters or of any
//!   size, and a password of megabytes are refused, and the lease made for
//!   the attempt is revoked at once (none is left behind).
//! - A plugin that echoes the role's admin secret in its error message:
//!   neither the caller's error, the lease's `last_error` nor the audit log
//!   holds the value.
//! - A caller with `admin` on its own dynamic role but no `read` on the
//!   admin secret cannot point a plugin role at it: refused, and the plugin
//!   is never handed the value.
//! - A plugin that answers slowly: one held `Create` does not stop another
//!   issue from the same server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyward::client::{Client, DynamicRoleSpec, PutOptions};
use keyward::proto::provider_v1 as pb;
use keyward::proto::provider_v1::provider_server::{Provider, ProviderServer};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::db_target::suffix;
use crate::harness::{data, eventually, unique, TestServer};
use crate::ident_kit::{approle_identity, login, put_policy};

// ---------------------------------------------------------------- the plugin

/// What `Create` answers.
#[derive(Clone)]
enum CreateAnswer {
    Account(pb::CreateResponse),
    /// An error whose message is the admin secret's `password` field.
    EchoAdmin,
}

#[derive(Default)]
struct Hold {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[derive(Clone)]
struct Evil {
    create: Arc<Mutex<CreateAnswer>>,
    /// `Revoke` fails with the admin secret's `password` as its message.
    revoke_echoes: Arc<Mutex<bool>>,
    /// Every admin value the plugin was sent (by any call).
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    /// `Create` for this role waits for `release`.
    hold: Option<(String, Arc<Hold>)>,
}

fn echo(admin: Option<&pb::Secret>) -> String {
    let password = admin
        .and_then(|a| a.fields.get("password"))
        .cloned()
        .unwrap_or_default();
    format!(
        "login as admin with password {} failed",
        String::from_utf8_lossy(&password)
    )
}

impl Evil {
    fn keep(&self, admin: Option<&pb::Secret>) {
        if let Some(admin) = admin {
            let mut received = self.received.lock().unwrap();
            received.extend(admin.fields.values().cloned());
        }
    }
}

#[tonic::async_trait]
impl Provider for Evil {
    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        Ok(Response::new(pb::DescribeResponse {
            name: "evil".into(),
            description: "a plugin that misbehaves".into(),
            dynamic_credentials: true,
            dynamic_settings: vec![pb::SettingKey {
                key: "mode".into(),
                required: false,
                description: "anything".into(),
            }],
            ..Default::default()
        }))
    }

    async fn generate(
        &self,
        _: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        Err(Status::unimplemented("Generate"))
    }

    async fn apply(
        &self,
        _: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        Err(Status::unimplemented("Apply"))
    }

    async fn verify(
        &self,
        _: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        Err(Status::unimplemented("Verify"))
    }

    async fn retire(
        &self,
        _: Request<pb::RetireRequest>,
    ) -> Result<Response<pb::RetireResponse>, Status> {
        Err(Status::unimplemented("Retire"))
    }

    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        let r = req.into_inner();
        self.keep(r.admin.as_ref());
        if let Some((role, hold)) = &self.hold {
            if &r.role == role {
                hold.entered.notify_one();
                hold.release.notified().await;
            }
        }
        let answer = self.create.lock().unwrap().clone();
        match answer {
            CreateAnswer::Account(mut account) => {
                if account.username == "USE_LEASE" {
                    account.username = format!("acct_{}", r.lease_id.replace('/', "_"));
                }
                Ok(Response::new(account))
            }
            CreateAnswer::EchoAdmin => Err(Status::permission_denied(echo(r.admin.as_ref()))),
        }
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let r = req.into_inner();
        self.keep(r.admin.as_ref());
        if *self.revoke_echoes.lock().unwrap() {
            return Err(Status::unavailable(echo(r.admin.as_ref())));
        }
        Ok(Response::new(pb::RevokeResponse {}))
    }
}

struct EvilPlugin {
    evil: Evil,
    endpoint: String,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl EvilPlugin {
    async fn start(hold: Option<(String, Arc<Hold>)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket: PathBuf = dir.path().join("evil.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let evil = Evil {
            create: Arc::new(Mutex::new(CreateAnswer::Account(good_account()))),
            revoke_echoes: Arc::default(),
            received: Arc::default(),
            hold,
        };
        let service = ProviderServer::new(evil.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        });
        Self {
            evil,
            endpoint: format!("unix:{}", socket.display()),
            _dir: dir,
            task,
        }
    }

    fn answer(&self, answer: CreateAnswer) {
        *self.evil.create.lock().unwrap() = answer;
    }

    fn received(&self, value: &str) -> bool {
        self.evil
            .received
            .lock()
            .unwrap()
            .iter()
            .any(|v| v == value.as_bytes())
    }
}

impl Drop for EvilPlugin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn good_account() -> pb::CreateResponse {
    pb::CreateResponse {
        username: "USE_LEASE".into(),
        password: b"plugin-made-password-0123456789".to_vec(),
        host: "toy.internal".into(),
        port: 7000,
        database: "toy".into(),
    }
}

fn role_spec(name: &str, provider: &str, admin: Option<&str>) -> DynamicRoleSpec {
    let mut config = BTreeMap::new();
    if let Some(admin) = admin {
        config.insert("admin_secret".to_owned(), admin.to_owned());
    }
    DynamicRoleSpec {
        name: name.to_owned(),
        provider: provider.to_owned(),
        config,
        ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    }
}

async fn leases_of(root: &Client, role: &str) -> usize {
    root.lease_list(&format!("dynamic/{role}"), false)
        .await
        .unwrap()
        .len()
}

fn audit_text(server: &TestServer) -> String {
    std::fs::read_to_string(&server.audit_path).unwrap()
}

// ---------------------------------------------------------------- attacks

/// Hit (fixed): host and database were stored and shown as the plugin gave
/// them (terminal escapes, megabytes), and the password had no bound. Now
/// every bad field is refused, and no lease stays behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_bad_account_fields_are_refused_and_leave_no_lease() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let plugin = EvilPlugin::start(None).await;
    let provider = unique("evil");
    root.register_provider(&provider, &plugin.endpoint, None)
        .await
        .unwrap();
    let role = format!("evil_{}", suffix());
    root.dynamic_role_put(&role_spec(&role, &provider, None))
        .await
        .unwrap();

    // The good answer works (the test can fail for the right reason).
    let ok = root.creds(&role, None).await.unwrap();
    assert_eq!(ok.host, "toy.internal");
    root.lease_revoke(&ok.lease_id).await.unwrap();
    assert_eq!(leases_of(&root, &role).await, 0);

    let bad: Vec<(&str, pb::CreateResponse)> = vec![
        (
            "empty username",
            pb::CreateResponse {
                username: String::new(),
                ..good_account()
            },
        ),
        (
            "username with a newline",
            pb::CreateResponse {
                username: "a\nb".into(),
                ..good_account()
            },
        ),
        (
            "username of 4096 bytes",
            pb::CreateResponse {
                username: "u".repeat(4096),
                ..good_account()
            },
        ),
        (
            "empty password",
            pb::CreateResponse {
                password: Vec::new(),
                ..good_account()
            },
        ),
        (
            "password of 2 MB",
            pb::CreateResponse {
                password: vec![b'p'; 2 << 20],
                ..good_account()
            },
        ),
        (
            "password not UTF-8 (the caller would get an empty one)",
            pb::CreateResponse {
                password: vec![0xff, 0xfe, 0xfd, 0x80, 0x81, 0x82, 0x83, 0x84],
                ..good_account()
            },
        ),
        (
            "host with a terminal escape",
            pb::CreateResponse {
                host: "toy\x1b[2J.internal".into(),
                ..good_account()
            },
        ),
        (
            "host of 100 kB",
            pb::CreateResponse {
                host: "h".repeat(100_000),
                ..good_account()
            },
        ),
        (
            "database with a newline",
            pb::CreateResponse {
                database: "toy\nlease revoked".into(),
                ..good_account()
            },
        ),
        (
            "database of 1 MB",
            pb::CreateResponse {
                database: "d".repeat(1 << 20),
                ..good_account()
            },
        ),
    ];
    for (what, answer) in bad {
        plugin.answer(CreateAnswer::Account(answer));
        let refused = root.creds(&role, None).await;
        assert!(refused.is_err(), "{what}: accepted");
        let message = refused.err().unwrap().to_string();
        assert!(message.contains(&provider), "{what}: {message}");
        assert!(message.len() < 2048, "{what}: message of {}", message.len());
        eventually(&format!("no lease is left after `{what}`"), || async {
            leases_of(&root, &role).await == 0
        })
        .await;
    }
}

/// Refused correctly: a plugin that puts the admin secret's value into its
/// `Create` and `Revoke` errors. The caller's error, the lease's last
/// error and the audit log never hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_echoing_the_admin_secret_leaks_it_nowhere() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let plugin = EvilPlugin::start(None).await;
    let provider = unique("evil");
    root.register_provider(&provider, &plugin.endpoint, None)
        .await
        .unwrap();
    let admin_path = format!("{}/admin", unique("evil"));
    let admin_value = format!("ADMIN-{}", suffix());
    root.put(
        &admin_path,
        &data(&[("password", &admin_value)]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let role = format!("echo_{}", suffix());
    root.dynamic_role_put(&role_spec(&role, &provider, Some(&admin_path)))
        .await
        .unwrap();

    plugin.answer(CreateAnswer::EchoAdmin);
    let refused = root.creds(&role, None).await.err().unwrap().to_string();
    assert!(plugin.received(&admin_value), "the plugin was handed it");
    assert!(refused.contains("[redacted]"), "{refused}");
    assert!(!refused.contains(&admin_value), "{refused}");

    // A lease whose Revoke keeps failing with the value in its message.
    plugin.answer(CreateAnswer::Account(good_account()));
    let c = root.creds(&role, None).await.unwrap();
    *plugin.evil.revoke_echoes.lock().unwrap() = true;
    let (_, pending) = root.lease_revoke(&c.lease_id).await.unwrap();
    assert_eq!(pending, 1);
    let lease = root.lease_lookup(&c.lease_id).await.unwrap();
    assert!(
        lease.last_error.contains("[redacted]"),
        "{}",
        lease.last_error
    );
    assert!(!lease.last_error.contains(&admin_value));
    let failed = root
        .lease_list(&format!("dynamic/{role}"), true)
        .await
        .unwrap();
    assert!(failed.iter().all(|l| !l.last_error.contains(&admin_value)));

    let audit = audit_text(&server);
    assert!(audit.contains(&role), "the audit log holds the calls");
    assert!(
        !audit.contains(&admin_value),
        "the audit log holds the value"
    );
    assert!(
        !audit.contains(&c.password),
        "the audit log holds the password"
    );

    *plugin.evil.revoke_echoes.lock().unwrap() = false;
    root.lease_revoke(&c.lease_id).await.unwrap();
}

/// Refused correctly: a caller with `admin` on its own dynamic roles and
/// `issue` on them, but no `read` on root's admin secret, names it as a
/// plugin role's `admin_secret`: refused, nothing stored, and the plugin is
/// never handed the value. Without the secret the role is its own (and
/// issue works), so the refusal is about the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_role_cannot_borrow_an_unreadable_admin_secret() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let plugin = EvilPlugin::start(None).await;
    let provider = unique("evil");
    root.register_provider(&provider, &plugin.endpoint, None)
        .await
        .unwrap();
    let prod = format!("{}/db-root", unique("prod"));
    let prod_value = format!("PROD-ROOT-{}", suffix());
    root.put(
        &prod,
        &data(&[("password", &prod_value)]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let own = format!("mine_{}", suffix());
    let policy = unique("p");
    put_policy(
        &server,
        &policy,
        &format!(
            "[[rule]]\npath = \"dynamic/{own}\"\ncapabilities = [\"read\", \"admin\", \"issue\"]\n"
        ),
    )
    .await;
    let (role_id, secret_id) = approle_identity(&root, &unique("attacker"), &[policy]).await;
    let attacker = login(&server, &role_id, &secret_id).await.1;

    let refused = attacker
        .dynamic_role_put(&role_spec(&own, &provider, Some(&prod)))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(!refused.is_empty(), "the role was stored");
    assert!(!refused.contains(&prod_value), "{refused}");
    assert!(root.dynamic_role_get(&own).await.is_err());
    assert!(!plugin.received(&prod_value));

    attacker
        .dynamic_role_put(&role_spec(&own, &provider, None))
        .await
        .unwrap();
    let c = attacker.creds(&own, None).await.unwrap();
    assert!(!plugin.received(&prod_value));
    attacker.lease_revoke(&c.lease_id).await.unwrap();
}

/// Refused correctly: a plugin whose `Create` for one role hangs holds no
/// lock the server needs: another role on the same plugin issues, looks up
/// and revokes while the first is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_create_does_not_stop_other_issues() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let slow = format!("slow_{}", suffix());
    let hold = Arc::new(Hold::default());
    let plugin = EvilPlugin::start(Some((slow.clone(), hold.clone()))).await;
    let provider = unique("evil");
    root.register_provider(&provider, &plugin.endpoint, None)
        .await
        .unwrap();
    let fast = format!("fast_{}", suffix());
    for role in [&slow, &fast] {
        root.dynamic_role_put(&role_spec(role, &provider, None))
            .await
            .unwrap();
    }
    let entered = hold.entered.notified();
    let held = {
        let root = root.clone();
        let slow = slow.clone();
        tokio::spawn(async move { root.creds(&slow, None).await })
    };
    entered.await;
    let c = root.creds(&fast, None).await.unwrap();
    root.lease_lookup(&c.lease_id).await.unwrap();
    assert_eq!(root.lease_revoke(&c.lease_id).await.unwrap(), (1, 0));
    hold.release.notify_one();
    let slow_creds = held.await.unwrap().unwrap();
    root.lease_revoke(&slow_creds.lease_id).await.unwrap();
}
