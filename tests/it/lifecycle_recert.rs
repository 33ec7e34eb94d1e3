//! Owner recertification (issue 13) with paused time: the recertifier is
//! the background task the server runs, on the one clock, driven here by
//! tokio's paused clock. A vault is opened in process (the library's
//! `Core`, as the server wires it).

use std::sync::Arc;
use std::time::Duration;

use keyward::audit::AuditLog;
use keyward::barrier::{Barrier, BarrierOptions};
use keyward::clock::{Clock, ShutdownTrigger};
use keyward::config::GovernanceConfig;
use keyward::core::Core;
use keyward::identity::{IdentityKind, IdentityName, NewIdentity};
use keyward::lifecycle::attest::AttestState;
use keyward::metrics::Metrics;
use keyward::secrets::DataLimits;
use keyward::storage::SledBackend;
use keyward::token::TokenRequest;

const DAY: Duration = Duration::from_secs(86_400);

struct Vault {
    _dir: tempfile::TempDir,
    core: Arc<Core>,
    audit: std::path::PathBuf,
}

async fn vault(clock: Clock) -> Vault {
    let dir = tempfile::tempdir().unwrap();
    let backend = SledBackend::open(dir.path().join("data")).unwrap();
    let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
    let audit = dir.path().join("audit.log");
    let core = Arc::new(Core::new(
        Arc::new(barrier),
        AuditLog::open(&audit, clock.clone()).unwrap(),
        Arc::new(Metrics::new()),
        DataLimits::default(),
        clock,
        keyward::clock::Shutdown::never(),
    ));
    let init = core.init(1, 1).await.unwrap();
    core.unseal(&init.shares[0].0).await.unwrap();
    Vault {
        _dir: dir,
        core,
        audit,
    }
}

fn identity(core: &Core, name: &str) -> IdentityName {
    let name = IdentityName::parse(name).unwrap();
    core.identities
        .create(
            NewIdentity {
                name: name.clone(),
                kind: IdentityKind::parse("service-account").unwrap(),
                owner: "team-a".into(),
                description: String::new(),
                policies: Vec::new(),
                expires_at_ms: 0,
            },
            &core.policies,
            core.clock().now_ms(),
        )
        .unwrap();
    name
}

fn token_of(core: &Core, identity: &str) -> String {
    core.tokens
        .issue(
            TokenRequest {
                identity: identity.into(),
                policies: Vec::new(),
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
}

fn state_of(core: &Core, settings: &GovernanceConfig, name: &str) -> AttestState {
    core.lifecycle
        .attestations(settings, core.clock().now_ms())
        .unwrap()
        .into_iter()
        .find(|s| s.identity == name)
        .unwrap()
        .state
}

fn disabled(core: &Core, name: &str) -> bool {
    core.identities.get(name).unwrap().unwrap().disabled
}

/// Lets the recertifier run after the clock moved (bounded: paused time
/// advances by itself while every task waits).
async fn settle() {
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_unattested_identity_is_due_then_overdue_then_disabled_and_attesting_resets_it() {
    let v = vault(Clock::system()).await;
    let core = v.core.clone();
    let settings = GovernanceConfig {
        every: 10 * DAY,
        grace: 2 * DAY,
        disable_unattested: true,
    };
    let attested = identity(&core, "attested-svc");
    let ignored = identity(&core, "ignored-svc");
    let attested_token = token_of(&core, attested.as_str());
    let ignored_token = token_of(&core, ignored.as_str());

    let trigger = ShutdownTrigger::new();
    let task = tokio::spawn(core.lifecycle.clone().run_recertifier(
        settings,
        Duration::from_secs(60),
        trigger.signal(),
    ));
    settle().await;
    assert_eq!(
        state_of(&core, &settings, "ignored-svc"),
        AttestState::Current
    );

    tokio::time::advance(9 * DAY).await;
    settle().await;
    core.lifecycle
        .attest(&attested, "owner-of-attested", "still serving payments")
        .await
        .unwrap();

    // Day 10.5: the unattested one is due (not yet disabled).
    tokio::time::advance(DAY + DAY / 2).await;
    settle().await;
    assert_eq!(state_of(&core, &settings, "ignored-svc"), AttestState::Due);
    assert_eq!(
        state_of(&core, &settings, "attested-svc"),
        AttestState::Current
    );
    assert!(!disabled(&core, "ignored-svc"), "due is not yet overdue");

    // Day 12.5: past its grace, the recertifier disables it and revokes
    // its token; the attested one keeps working.
    tokio::time::advance(2 * DAY).await;
    settle().await;
    assert_eq!(
        state_of(&core, &settings, "ignored-svc"),
        AttestState::Overdue
    );
    assert!(disabled(&core, "ignored-svc"));
    let now = core.clock().now_ms();
    assert!(core
        .tokens
        .lookup_token(&ignored_token, now)
        .unwrap()
        .is_none());
    assert!(!disabled(&core, "attested-svc"));
    assert!(core
        .tokens
        .lookup_token(&attested_token, now)
        .unwrap()
        .is_some());
    let audit = std::fs::read_to_string(&v.audit).unwrap();
    assert!(audit
        .lines()
        .any(|l| l.contains("keyward.lifecycle/DisableUnattested")
            && l.contains("identity/ignored-svc")));
    assert!(!audit
        .lines()
        .any(|l| l.contains("keyward.lifecycle/DisableUnattested")
            && l.contains("identity/attested-svc")));

    // Day 19.5: the attested one (attested on day 9) is due, day 21.5 overdue.
    tokio::time::advance(7 * DAY).await;
    settle().await;
    assert_eq!(state_of(&core, &settings, "attested-svc"), AttestState::Due);
    assert!(!disabled(&core, "attested-svc"));
    tokio::time::advance(2 * DAY).await;
    settle().await;
    assert!(disabled(&core, "attested-svc"));

    // Without disable_unattested nothing is disabled, whatever the state.
    let lenient = GovernanceConfig {
        disable_unattested: false,
        ..settings
    };
    let late = identity(&core, "late-svc");
    tokio::time::advance(30 * DAY).await;
    assert!(core
        .lifecycle
        .enforce_attestation(&lenient)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        state_of(&core, &lenient, late.as_str()),
        AttestState::Overdue
    );

    trigger.trigger();
    task.await.unwrap();
}

#[test]
fn governance_settings_parse_with_defaults_and_refuse_bad_values_by_key() {
    use keyward::config::{parse, MapSource};
    let base = |extra: &[(&str, &str)]| {
        let mut map: std::collections::BTreeMap<String, String> =
            [("storage.path", "data"), ("audit.path", "audit.log")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        for (k, v) in extra {
            map.insert((*k).to_owned(), (*v).to_owned());
        }
        parse(&MapSource(map), std::path::Path::new("/tmp"))
    };
    let c = base(&[]).unwrap();
    assert_eq!(c.governance, GovernanceConfig::default());
    assert_eq!(c.governance.every, 90 * DAY);
    assert_eq!(c.governance.grace, 14 * DAY);
    assert!(!c.governance.disable_unattested);
    let c = base(&[
        ("governance.recertify_every", "30d"),
        ("governance.unattested_grace", "1d"),
        ("governance.disable_unattested", "true"),
    ])
    .unwrap();
    assert_eq!((c.governance.every, c.governance.grace), (30 * DAY, DAY));
    assert!(c.governance.disable_unattested);
    for (key, bad) in [
        ("governance.recertify_every", "soon"),
        ("governance.recertify_every", "0s"),
        ("governance.disable_unattested", "yes"),
    ] {
        let e = base(&[(key, bad)]).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
        assert!(
            !e.contains(bad) || bad == "0s",
            "the value is not echoed: {e}"
        );
    }
}
