//! Issue 10, items 1 and 2, from a low-privileged caller's side.
//!
//! - A rotation policy's secret reference is whatever setting the provider
//!   describes as one (an external plugin's `Describe`, any key, any case):
//!   setting it needs `read` on that secret, and every run checks that the
//!   identity that set the policy may still read it, before the value is
//!   read, audited in its name.
//! - A provider name that is registered already is refused; replacing an
//!   endpoint is explicit (`replace`), needs `admin` on the whole
//!   collection and is audited with both endpoints; a bad name changes
//!   nothing.
//!
//! The plugins here are served by the test itself on a unix socket
//! ([`Recorder`]): they describe the reference key they are given and keep
//! every secret value keyward sends them, so a test can say what a plugin
//! never received.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyward::client::{Client, IssueOptions, PutOptions, RotationPolicySpec, ScheduleSpec};
use keyward::proto::provider_v1 as pb;
use keyward::proto::provider_v1::provider_server::{Provider, ProviderServer};
use keyward::proto::v1::{RotationRun, UpdateIdentityRequest};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};

use crate::harness::{data, unique, TestServer};
use crate::ident_kit::{approle_identity, login, put_policy};

// ---------------------------------------------------------------- the plugin

/// What a plugin was sent: (step, a secret value), and (step, empty) once
/// per call.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A plugin that names `reference_key` as its secret reference and keeps
/// every secret value it is sent (admin and current), by step.
#[derive(Clone)]
struct Recorder {
    reference_key: String,
    received: Received,
    /// When set, `Apply` says it has applied (`applied`) and then waits for
    /// `release` before it answers: a test acts between apply and verify.
    hold: Option<Arc<Hold>>,
}

#[derive(Default)]
struct Hold {
    applied: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl Recorder {
    fn keep(&self, step: &str, secrets: &[Option<&pb::Secret>]) {
        let mut received = self.received.lock().unwrap();
        for secret in secrets.iter().flatten() {
            for value in secret.fields.values() {
                received.push((step.to_owned(), value.clone()));
            }
        }
        received.push((step.to_owned(), Vec::new()));
    }
}

#[tonic::async_trait]
impl Provider for Recorder {
    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        Ok(Response::new(pb::DescribeResponse {
            name: "recorder".into(),
            description: "keeps what it is sent".into(),
            settings: vec![pb::SettingKey {
                key: self.reference_key.clone(),
                required: false,
                description: "the secret the plugin is handed".into(),
            }],
            admin_secret_key: self.reference_key.clone(),
            ..Default::default()
        }))
    }

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let r = req.into_inner();
        self.keep("generate", &[r.admin.as_ref(), r.current.as_ref()]);
        let value = pb::Secret {
            fields: [("password".to_owned(), unique("new").into_bytes())].into(),
        };
        Ok(Response::new(pb::GenerateResponse { value: Some(value) }))
    }

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let r = req.into_inner();
        self.keep("apply", &[r.admin.as_ref(), r.current.as_ref()]);
        if let Some(hold) = &self.hold {
            hold.applied.notify_one();
            hold.release.notified().await;
        }
        Ok(Response::new(pb::ApplyResponse {}))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let r = req.into_inner();
        self.keep("verify", &[r.admin.as_ref(), r.current.as_ref()]);
        Ok(Response::new(pb::VerifyResponse {}))
    }

    async fn retire(
        &self,
        req: Request<pb::RetireRequest>,
    ) -> Result<Response<pb::RetireResponse>, Status> {
        let r = req.into_inner();
        self.keep("retire", &[r.admin.as_ref(), r.current.as_ref()]);
        Ok(Response::new(pb::RetireResponse {}))
    }

    // A rotation-only plugin: no dynamic credentials (what a plugin of the
    // older protocol answers).
    async fn create(
        &self,
        _: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        Err(Status::unimplemented("Create"))
    }

    async fn revoke(
        &self,
        _: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        Err(Status::unimplemented("Revoke"))
    }
}

/// A [`Recorder`] served on a unix socket; stopped when dropped.
pub(crate) struct RecordingPlugin {
    recorder: Recorder,
    pub(crate) endpoint: String,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingPlugin {
    pub(crate) async fn start(reference_key: &str) -> Self {
        Self::start_with(reference_key, None).await
    }

    async fn start_with(reference_key: &str, hold: Option<Arc<Hold>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket: PathBuf = dir.path().join("plugin.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let recorder = Recorder {
            reference_key: reference_key.to_owned(),
            received: Arc::default(),
            hold,
        };
        let service = ProviderServer::new(recorder.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        });
        Self {
            recorder,
            endpoint: format!("unix:{}", socket.display()),
            _dir: dir,
            task,
        }
    }

    /// Whether any call carried `value` in a secret.
    pub(crate) fn received(&self, value: &str) -> bool {
        self.recorder
            .received
            .lock()
            .unwrap()
            .iter()
            .any(|(_, v)| v == value.as_bytes())
    }

    /// How many calls of `step` it answered.
    fn calls(&self, step: &str) -> usize {
        self.recorder
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, v)| s == step && v.is_empty())
            .count()
    }

    fn forget(&self) {
        self.recorder.received.lock().unwrap().clear();
    }
}

impl Drop for RecordingPlugin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- helpers

pub(crate) fn spec(provider: &str, pairs: &[(&str, &str)]) -> RotationPolicySpec {
    RotationPolicySpec {
        provider: provider.to_owned(),
        schedule: ScheduleSpec::Every(Duration::from_secs(24 * 3600)),
        grace: Duration::from_secs(24 * 3600),
        settings: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// The usual setting of a reference test: a shared admin secret holding
/// `password = admin_value` (written by root), and a [`RecordingPlugin`]
/// whose reference key is `admin`, registered under a fresh name.
pub(crate) struct AdminReference {
    /// The shared admin secret's path.
    pub(crate) shared: String,
    pub(crate) plugin: RecordingPlugin,
    /// The registered provider's name.
    pub(crate) provider: String,
}

impl AdminReference {
    pub(crate) async fn start(root: &Client, admin_value: &str) -> Self {
        Self::start_with(root, admin_value, None).await
    }

    async fn start_with(root: &Client, admin_value: &str, hold: Option<Arc<Hold>>) -> Self {
        let shared = format!("{}/db-admin", unique("shared"));
        root.put(
            &shared,
            &data(&[("password", admin_value)]),
            PutOptions::default(),
        )
        .await
        .unwrap();
        let plugin = RecordingPlugin::start_with("admin", hold).await;
        let provider = provider_name("rec");
        root.register_provider(&provider, &plugin.endpoint, None)
            .await
            .unwrap();
        Self {
            shared,
            plugin,
            provider,
        }
    }
}

/// A provider name no other test uses (`[a-z0-9_-]`).
fn provider_name(prefix: &str) -> String {
    unique(prefix)
}

pub(crate) fn step_messages(run: &RotationRun) -> Vec<String> {
    run.steps
        .iter()
        .map(|s| format!("{} {}: {}", s.step, s.outcome, s.message))
        .collect()
}

fn audit_lines(server: &TestServer) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&server.audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A client for a new identity holding only the policy `toml`.
async fn caller_with(server: &TestServer, name: &str, toml: &str) -> Client {
    let policy = unique("p");
    put_policy(server, &policy, toml).await;
    let root = server.root().await;
    let (role_id, secret_id) = approle_identity(&root, name, &[policy]).await;
    login(server, &role_id, &secret_id).await.1
}

fn code(e: &keyward::client::ClientError) -> Option<Code> {
    e.code()
}

// ---------------------------------------------------------------- item 1

/// The attack of item 1: a caller with write on its own secret only names
/// a secret it cannot read under the key the plugin describes (`admin`,
/// `Admin_Secret`): refused, and the plugin is handed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_under_the_plugins_own_key_needs_read() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prod = format!("{}/db-root", unique("prod"));
    let prod_value = "prod-db-root-password-NEVER-SENT";
    root.put(
        &prod,
        &data(&[("password", prod_value)]),
        PutOptions::default(),
    )
    .await
    .unwrap();

    // Plugins an administrator registered; their reference keys are unusual.
    let plain = RecordingPlugin::start("admin").await;
    let cased = RecordingPlugin::start("Admin_Secret").await;
    let evil = provider_name("evil");
    let evil_cased = provider_name("evilcased");
    root.register_provider(&evil, &plain.endpoint, None)
        .await
        .unwrap();
    root.register_provider(&evil_cased, &cased.endpoint, None)
        .await
        .unwrap();

    let own = unique("own");
    let attacker = caller_with(
        &server,
        &unique("attacker"),
        &format!(
            "[[rule]]\npath = \"secret/{own}/**\"\ncapabilities = [\"read\", \"write\"]\n\n\
             [[rule]]\npath = \"rotation/{own}/**\"\ncapabilities = [\"read\", \"write\", \"rotate\"]\n"
        ),
    )
    .await;
    let mine = format!("{own}/app");
    attacker
        .put(
            &mine,
            &data(&[("password", "mine-1")]),
            PutOptions::default(),
        )
        .await
        .unwrap();

    for (provider, key) in [(&evil, "admin"), (&evil_cased, "Admin_Secret")] {
        let refused = attacker
            .set_rotation_policy(&mine, &spec(provider, &[(key, &prod)]))
            .await
            .unwrap_err();
        assert_eq!(
            code(&refused),
            Some(Code::PermissionDenied),
            "{key}={prod}: {refused}"
        );
    }
    // The described key in another case is not a reference, and a key that
    // names a secret is never taken as an inline value.
    let other_case = attacker
        .set_rotation_policy(&mine, &spec(&evil_cased, &[("admin_secret", &prod)]))
        .await
        .unwrap_err();
    assert_eq!(
        code(&other_case),
        Some(Code::InvalidArgument),
        "{other_case}"
    );

    // Nothing was set, so nothing runs; the plugins never saw the value.
    let none = attacker.rotation_policy(&mine).await.unwrap_err();
    assert_eq!(code(&none), Some(Code::NotFound), "{none}");
    assert!(!plain.received(prod_value) && !cased.received(prod_value));
}

/// After a legitimate set, the setter's `read` is checked again at every
/// run: revoked, the next run fails with a clear message and the plugin
/// never receives the value. Each read is audited in the setter's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stops_reading_once_the_setter_loses_read() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin_v1 = "db-admin-password-VALUE-ONE";
    let AdminReference {
        shared,
        plugin,
        provider: name,
    } = AdminReference::start(&root, admin_v1).await;

    let own = unique("own");
    let grants = |with_admin: bool| {
        let mut doc = format!(
            "[[rule]]\npath = \"secret/{own}/**\"\ncapabilities = [\"read\", \"write\"]\n\n\
             [[rule]]\npath = \"rotation/{own}/**\"\ncapabilities = [\"read\", \"write\", \"rotate\"]\n"
        );
        if with_admin {
            doc.push_str(&format!(
                "\n[[rule]]\npath = \"secret/{shared}\"\ncapabilities = [\"read\"]\n"
            ));
        }
        doc
    };
    let policy = unique("setter");
    put_policy(&server, &policy, &grants(true)).await;
    let identity = unique("setter");
    let (role_id, secret_id) =
        approle_identity(&root, &identity, std::slice::from_ref(&policy)).await;
    let setter = login(&server, &role_id, &secret_id).await.1;

    let mine = format!("{own}/app");
    setter
        .put(
            &mine,
            &data(&[("password", "mine-1")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let set = setter
        .set_rotation_policy(&mine, &spec(&name, &[("admin", &shared)]))
        .await
        .unwrap();
    assert_eq!(set.set_by, identity);

    let run = setter.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "succeeded", "{:?}", step_messages(&run));
    assert!(plugin.received(admin_v1), "the plugin got the admin secret");
    let resource = format!("secret/{shared}");
    let reads: Vec<_> = audit_lines(&server)
        .into_iter()
        .filter(|r| r["method"] == "keyward.rotation/ReadReference" && r["resource"] == *resource)
        .collect();
    assert!(!reads.is_empty(), "each read of the reference is audited");
    assert!(reads
        .iter()
        .all(|r| r["identity"] == *identity && r["outcome"] == "allowed"));
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(
        !audit.contains(admin_v1),
        "the audit log never holds the value"
    );

    // The grant is withdrawn (the policy no longer reads the admin secret);
    // the admin secret gets a new value, which must never reach the plugin.
    put_policy(&server, &policy, &grants(false)).await;
    let admin_v2 = "db-admin-password-VALUE-TWO";
    root.put(
        &shared,
        &data(&[("password", admin_v2)]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let current = root.get(&mine).await.unwrap().version;
    plugin.forget();
    let run = root.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "failed", "{:?}", step_messages(&run));
    let messages = step_messages(&run).join("\n");
    assert!(
        messages.contains(&format!(
            "`{identity}`, who set this policy, may no longer read {resource}"
        )),
        "{messages}"
    );
    assert!(!plugin.received(admin_v2), "the plugin never got the value");
    assert_eq!(plugin.calls("generate") + plugin.calls("apply"), 0);
    assert_eq!(root.get(&mine).await.unwrap().version, current);
    let refused = audit_lines(&server).into_iter().any(|r| {
        r["method"] == "keyward.rotation/ReadReference"
            && r["resource"] == *resource
            && r["identity"] == *identity
            && r["outcome"] == "denied"
    });
    assert!(refused, "the refused read is audited");

    // Given back, through the identity, and then taken from the identity
    // (the policy itself unchanged): refused again.
    put_policy(&server, &policy, &grants(true)).await;
    let run = root.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "succeeded", "{:?}", step_messages(&run));
    root.identity_update(UpdateIdentityRequest {
        name: identity.clone(),
        set_policies: true,
        policies: Vec::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    plugin.forget();
    let run = root.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "failed", "{:?}", step_messages(&run));
    assert!(!plugin.received(admin_v2));
}

/// Read revoked between apply and verify: verify is not called with the
/// admin secret, nor is the rollback; the value apply may have made live on
/// the target is kept as `pending`, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_revoked_mid_run_keeps_the_applied_value() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let hold = Arc::new(Hold::default());
    let AdminReference {
        shared,
        plugin,
        provider: name,
    } = AdminReference::start_with(&root, "admin-MID-RUN", Some(hold.clone())).await;
    let own = unique("own");
    let policy = unique("setter");
    let with_admin = format!(
        "[[rule]]\npath = \"secret/{own}/**\"\ncapabilities = [\"read\", \"write\"]\n\n\
         [[rule]]\npath = \"rotation/{own}/**\"\ncapabilities = [\"write\", \"rotate\"]\n\n\
         [[rule]]\npath = \"secret/{shared}\"\ncapabilities = [\"read\"]\n"
    );
    put_policy(&server, &policy, &with_admin).await;
    let identity = unique("setter");
    let (role_id, secret_id) =
        approle_identity(&root, &identity, std::slice::from_ref(&policy)).await;
    let setter = login(&server, &role_id, &secret_id).await.1;
    let mine = format!("{own}/app");
    setter
        .put(
            &mine,
            &data(&[("password", "mine-1")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    setter
        .set_rotation_policy(&mine, &spec(&name, &[("admin", &shared)]))
        .await
        .unwrap();

    let rotating = {
        let root = root.clone();
        let mine = mine.clone();
        tokio::spawn(async move { root.rotate(&mine, true).await.unwrap() })
    };
    hold.applied.notified().await;
    let pending = root.get_with(&mine, None, Some("pending")).await.unwrap();
    put_policy(
        &server,
        &policy,
        &with_admin.replace(&format!("secret/{shared}"), "secret/nothing-here"),
    )
    .await;
    plugin.forget();
    hold.release.notify_one();
    let run = rotating.await.unwrap();

    assert_eq!(run.state, "failed", "{:?}", step_messages(&run));
    assert!(
        !plugin.received("admin-MID-RUN"),
        "nothing read after the revocation"
    );
    assert_eq!(plugin.calls("verify") + plugin.calls("apply"), 0);
    let messages = step_messages(&run).join("\n");
    assert!(messages.contains("is kept"), "{messages}");
    let kept = root.get_with(&mine, None, Some("pending")).await.unwrap();
    assert_eq!(kept.version, pending.version, "the applied value is kept");
    assert_eq!(
        root.get(&mine).await.unwrap().field_str("password"),
        Some("mine-1")
    );
}

/// A policy stored before setters were recorded has its reference read by
/// nobody's authority: its runs refuse to read it until it is set again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_without_a_recorded_setter_reads_no_reference() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let admin_value = "db-admin-password-OLD-POLICY";
    let AdminReference {
        shared,
        plugin,
        provider: name,
    } = AdminReference::start(&root, admin_value).await;
    let mine = format!("{}/app", unique("own"));
    root.put(&mine, &data(&[("password", "v1")]), PutOptions::default())
        .await
        .unwrap();
    root.set_rotation_policy(&mine, &spec(&name, &[("admin", &shared)]))
        .await
        .unwrap();

    // As an older keyward wrote it: no setter.
    let path = keyward::secrets::SecretPath::parse(&mine).unwrap();
    let mut record = server.core.rotation.policy(&path).unwrap().unwrap();
    record.set_by.clear();
    record.set_by_policies.clear();
    server
        .core
        .barrier
        .put(
            &format!("rotation/policy/{mine}"),
            &prost::Message::encode_to_vec(&record),
        )
        .unwrap();

    let run = root.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "failed", "{:?}", step_messages(&run));
    let messages = step_messages(&run).join("\n");
    assert!(
        messages.contains("does not record who set it"),
        "{messages}"
    );
    assert!(!plugin.received(admin_value));

    // Set again, it records root and runs.
    root.set_rotation_policy(&mine, &spec(&name, &[("admin", &shared)]))
        .await
        .unwrap();
    let run = root.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "succeeded", "{:?}", step_messages(&run));
}

// ---------------------------------------------------------------- item 2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_provider_is_replaced_only_explicitly() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let first = RecordingPlugin::start("admin").await;
    let second = RecordingPlugin::start("admin").await;
    let name = provider_name("apikeys");

    let one_name = caller_with(
        &server,
        &unique("one"),
        &format!(
            "[[rule]]\npath = \"sys/rotation/providers/{name}\"\ncapabilities = [\"admin\"]\n"
        ),
    )
    .await;
    one_name
        .register_provider(&name, &first.endpoint, None)
        .await
        .unwrap();

    // Registering the name again does not swap the live plugin.
    let again = one_name
        .register_provider(&name, &second.endpoint, None)
        .await
        .unwrap_err();
    assert_eq!(code(&again), Some(Code::AlreadyExists), "{again}");
    // Nor does `replace` from a caller with admin on that one name.
    let replace = one_name
        .replace_provider(&name, &second.endpoint, None)
        .await
        .unwrap_err();
    assert_eq!(code(&replace), Some(Code::PermissionDenied), "{replace}");

    // The provider in use is still the first one.
    let mine = format!("{}/app", unique("own"));
    root.put(&mine, &data(&[("password", "v1")]), PutOptions::default())
        .await
        .unwrap();
    root.set_rotation_policy(&mine, &spec(&name, &[]))
        .await
        .unwrap();
    let run = root.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "succeeded", "{:?}", step_messages(&run));
    assert!(first.calls("generate") > 0);
    assert_eq!(second.calls("generate"), 0, "the second plugin got nothing");

    // Admin on the whole collection may replace it, audited with both.
    let collection = caller_with(
        &server,
        &unique("all"),
        "[[rule]]\npath = \"sys/rotation/providers\"\ncapabilities = [\"admin\"]\n",
    )
    .await;
    collection
        .replace_provider(&name, &second.endpoint, None)
        .await
        .unwrap();
    let audited = audit_lines(&server).into_iter().any(|r| {
        let note = r["error"].as_str().unwrap_or_default();
        r["method"] == "keyward.rotation/ReplaceProvider"
            && r["resource"] == *format!("sys/rotation/providers/{name}")
            && note.contains(&first.endpoint)
            && note.contains(&second.endpoint)
    });
    assert!(
        audited,
        "the replacement is audited with the old and new endpoints"
    );
    let run = root.rotate(&mine, true).await.unwrap();
    assert_eq!(run.state, "succeeded", "{:?}", step_messages(&run));
    assert!(second.calls("generate") > 0, "the new endpoint is used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_provider_name_changes_nothing() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let plugin = RecordingPlugin::start("admin").await;
    for bad in ["Bad Name", "UPPER", "x/y"] {
        let refused = root
            .register_provider(bad, &plugin.endpoint, None)
            .await
            .unwrap_err();
        assert_eq!(
            code(&refused),
            Some(Code::InvalidArgument),
            "{bad:?}: {refused}"
        );
    }
    let good = provider_name("good");
    let registered = root
        .register_provider(&good, &plugin.endpoint, None)
        .await
        .unwrap();
    assert_eq!(registered.name, good);
    // An empty name is refused before the policy check.
    let empty = root
        .register_provider("", &plugin.endpoint, None)
        .await
        .unwrap_err();
    assert_eq!(code(&empty), Some(Code::InvalidArgument), "{empty}");
    // And with a token that holds only that name.
    let token = root
        .issue_token(IssueOptions {
            policies: vec![{
                let p = unique("prov");
                put_policy(
                    &server,
                    &p,
                    "[[rule]]\npath = \"sys/rotation/providers/*\"\ncapabilities = [\"admin\"]\n",
                )
                .await;
                p
            }],
            ttl: None,
            max_ttl: None,
            uses: 0,
            cidrs: Vec::new(),
        })
        .await
        .unwrap();
    let scoped = root.with_token(&token.token).unwrap();
    scoped
        .register_provider(&provider_name("later"), &plugin.endpoint, None)
        .await
        .unwrap();
}

/// The CLI: `provider register` of a taken name fails; `--replace` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_provider_register_replace() {
    let server = TestServer::dev().await;
    let first = RecordingPlugin::start("admin").await;
    let second = RecordingPlugin::start("admin").await;
    let name = provider_name("cli");
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.display().to_string();
    let env: Vec<(String, String)> = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
        ("KEYWARD_FORMAT", "json"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let run = |args: Vec<String>| {
        let env = env.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            crate::harness::cli(&args, &env, None)
        })
    };
    let register = |endpoint: &str, replace: bool| {
        let mut args: Vec<String> = ["provider", "register", &name, "--endpoint", endpoint]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        if replace {
            args.push("--replace".into());
        }
        args
    };
    let (code, _, err) = run(register(&first.endpoint, false)).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(register(&second.endpoint, false)).await.unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("already registered"), "{err}");
    let (code, out, err) = run(register(&second.endpoint, true)).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&name), "{out}");
}
