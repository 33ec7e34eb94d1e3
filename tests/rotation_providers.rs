//! The rotation providers against real servers (TESTING.md): a private
//! scram-sha-256 PostgreSQL cluster started by this binary, the machine's
//! MariaDB on 127.0.0.1:3306 (root, no password) and Redis on 127.0.0.1:6379.
//! A server that cannot be reached fails the test with how to start it.
//!
//! Logins are checked with the drivers directly, not with the provider
//! under test, so a provider that wrongly reports success cannot pass.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

#[path = "support/db_target.rs"]
mod db_target;
#[path = "support/pg_cluster.rs"]
mod pg_cluster;
#[path = "support/plugin.rs"]
mod plugin;

use std::sync::Arc;

use keyward::rotation::provider::{Provider, ProviderError, ProviderSettings, RotationInput};
use keyward::rotation::providers::random::random_string;
use keyward::rotation::providers::Charset;
use keyward::rotation::providers::Registry;
use keyward::secrecy::{SecretBytes, SecretData};

use db_target::{password, with_cleanup, Kind, Target};

// ---------------------------------------------------------------- helpers

fn secret(pairs: &[(&str, &str)]) -> SecretData {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), SecretBytes::from(*v)))
        .collect()
}

fn settings(pairs: &[&str]) -> ProviderSettings {
    ProviderSettings::parse_pairs(pairs).expect("test settings are well formed")
}

fn field<'a>(data: &'a SecretData, name: &str) -> &'a str {
    data.get(name)
        .and_then(SecretBytes::expose_str)
        .unwrap_or_else(|| panic!("no UTF-8 field {name}"))
}

fn provider(name: &str) -> Arc<dyn Provider> {
    Registry::with_builtin()
        .get(name)
        .unwrap_or_else(|| panic!("no built-in provider {name}"))
}

/// Fails unless neither the Display nor the Debug of `error` holds any of
/// `secrets`.
fn assert_no_secret(error: &ProviderError, secrets: &[&str]) {
    let shown = format!("{error} / {error:?}");
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(!shown.contains(secret), "a secret leaked into: {shown}");
    }
}

/// The target's admin secret as the providers take it.
fn admin_secret(target: &Target) -> SecretData {
    target
        .admin()
        .into_iter()
        .map(|(k, v)| (k, SecretBytes::from(v)))
        .collect()
}

/// An admin secret that is refused: the right admin with a wrong password.
/// Redis's default user takes any password, so there the admin is a user
/// made for the test.
async fn admin_with_wrong_password(target: &Target, wrong: &str) -> SecretData {
    let mut admin = admin_secret(target);
    if target.kind == Kind::Redis {
        let name = target.user("admin");
        target.create_user(&name, &password()).await;
        admin.insert("username".into(), SecretBytes::from(name.as_str()));
    }
    admin.insert("password".into(), SecretBytes::from(wrong));
    admin
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// ---------------------------------------------------------------- scenarios

/// Single: apply replaces the password, the old one is refused at once, the
/// new one logs in; apply is idempotent; retire changes nothing.
async fn single_rotation(service: Arc<Target>) {
    let user = service.user("app");
    let initial = password();
    service.create_user(&user, &initial).await;
    assert!(service.can_login(&user, &initial).await);

    let provider = provider(service.provider());
    let settings = settings(&[
        "admin_secret=db/admin",
        "strategy=single",
        &format!("username={user}"),
    ]);
    provider.validate(&settings).unwrap();
    assert_eq!(provider.admin_secret(&settings), Some("db/admin"));
    let admin = admin_secret(&service);
    let current = secret(&[("username", &user), ("password", &initial)]);
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: Some(&current),
    };

    let pending = provider.generate(&input).await.unwrap();
    assert_eq!(field(&pending, "username"), user);
    assert_eq!(field(&pending, "host"), "127.0.0.1");
    assert_eq!(field(&pending, "port"), service.port().to_string());
    assert_eq!(pending.get("database"), admin.get("database"));
    let new_password = field(&pending, "password").to_owned();
    assert_eq!(new_password.len(), 32);
    assert!(new_password.bytes().all(|b| b.is_ascii_alphanumeric()));
    let again = provider.generate(&input).await.unwrap();
    assert_ne!(field(&again, "password"), new_password, "fresh randomness");

    provider.apply(&input, &pending).await.unwrap();
    provider.apply(&input, &pending).await.unwrap();
    provider.verify(&input, &pending).await.unwrap();
    assert!(service.can_login(&user, &new_password).await);
    assert!(
        !service.can_login(&user, &initial).await,
        "old password still works"
    );

    // verify with the old value is refused, and says nothing of either value.
    let old = secret(&[("username", &user), ("password", &initial)]);
    let error = provider.verify(&input, &old).await.unwrap_err();
    assert!(matches!(error, ProviderError::Refused(_)), "{error:?}");
    assert!(!error.is_retryable());
    assert_no_secret(&error, &[&initial, &new_password]);

    let after = RotationInput {
        current: Some(&pending),
        ..input
    };
    provider.retire(&after, &current).await.unwrap();
    assert!(service.can_login(&user, &new_password).await);
}

/// Alternating: the other user gets the new password; the old user keeps
/// working until retire, and is refused after it; the next rotation goes
/// back to the first user.
async fn alternating_rotation(service: Arc<Target>) {
    let (a, b) = (service.user("a"), service.user("b"));
    let (pw_a, pw_b) = (password(), password());
    service.create_user(&a, &pw_a).await;
    service.create_user(&b, &pw_b).await;

    let provider = provider(service.provider());
    let settings = settings(&[
        "admin_secret=db/admin",
        "strategy=alternating",
        &format!("usernames={a},{b}"),
    ]);
    provider.validate(&settings).unwrap();
    let admin = admin_secret(&service);

    // No current value yet: the first user of the pair.
    let first = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    assert_eq!(
        field(&provider.generate(&first).await.unwrap(), "username"),
        a
    );

    let current = secret(&[("username", &a), ("password", &pw_a)]);
    let input = RotationInput {
        current: Some(&current),
        ..first
    };
    let pending = provider.generate(&input).await.unwrap();
    assert_eq!(field(&pending, "username"), b, "the user not in current");
    let new_password = field(&pending, "password").to_owned();

    provider.apply(&input, &pending).await.unwrap();
    provider.apply(&input, &pending).await.unwrap();
    provider.verify(&input, &pending).await.unwrap();
    assert!(service.can_login(&b, &new_password).await);
    assert!(!service.can_login(&b, &pw_b).await);
    assert!(
        service.can_login(&a, &pw_a).await,
        "the old user works until retire"
    );

    // Promoted: pending is current, the old current is previous.
    let promoted = RotationInput {
        current: Some(&pending),
        ..input
    };
    // Retiring the value that is current now is a no-op, never a lock-out.
    provider.retire(&promoted, &pending).await.unwrap();
    assert!(service.can_login(&b, &new_password).await);

    provider.retire(&promoted, &current).await.unwrap();
    provider.retire(&promoted, &current).await.unwrap();
    assert!(!service.can_login(&a, &pw_a).await, "refused after retire");
    assert!(service.can_login(&b, &new_password).await);

    let next = provider.generate(&promoted).await.unwrap();
    assert_eq!(field(&next, "username"), a);
}

/// A closed port: apply and verify fail fast with a retryable Unreachable.
async fn unreachable_target(service: Arc<Target>) {
    let provider = provider(service.provider());
    let user = service.user("app");
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let mut admin = admin_secret(&service);
    admin.insert("port".into(), SecretBytes::from(closed_port().to_string()));
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let pending = provider.generate(&input).await.unwrap();
    let secrets = [field(&pending, "password")];
    for error in [
        provider.apply(&input, &pending).await.unwrap_err(),
        provider.verify(&input, &pending).await.unwrap_err(),
    ] {
        assert!(matches!(error, ProviderError::Unreachable(_)), "{error:?}");
        assert!(error.is_retryable());
        assert_no_secret(&error, &secrets);
    }
}

/// The admin's password is wrong: Refused, and the message holds neither
/// the wrong admin password nor the pending one.
async fn refused_admin(service: Arc<Target>) {
    let provider = provider(service.provider());
    let user = service.user("app");
    let initial = password();
    service.create_user(&user, &initial).await;
    let wrong = format!("wrong-{}", password());
    let admin = admin_with_wrong_password(&service, &wrong).await;
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let pending = provider.generate(&input).await.unwrap();
    let error = provider.apply(&input, &pending).await.unwrap_err();
    assert!(matches!(error, ProviderError::Refused(_)), "{error:?}");
    assert!(!error.is_retryable());
    assert_no_secret(&error, &[&wrong, field(&pending, "password")]);
    assert!(service.can_login(&user, &initial).await, "nothing changed");
}

/// A user that does not exist: apply is refused, creates nothing, and does
/// not echo the password.
async fn missing_user(service: Arc<Target>) {
    let provider = provider(service.provider());
    let user = service.user("ghost");
    // Registered for cleanup in case a broken provider creates it.
    service.track_user(&user);
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let admin = admin_secret(&service);
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let pending = provider.generate(&input).await.unwrap();
    let error = provider.apply(&input, &pending).await.unwrap_err();
    assert!(matches!(error, ProviderError::Refused(_)), "{error:?}");
    assert_no_secret(&error, &[field(&pending, "password")]);
    assert!(!service.user_exists(&user).await, "apply created the user");
}

/// A value naming a user the policy does not rotate is never acted on.
async fn foreign_user_is_not_touched(service: Arc<Target>) {
    let provider = provider(service.provider());
    let (user, other) = (service.user("app"), service.user("other"));
    let other_password = password();
    service.create_user(&other, &other_password).await;
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let admin = admin_secret(&service);
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let forged = secret(&[("username", &other), ("password", "Forged0123456789")]);
    let error = provider.apply(&input, &forged).await.unwrap_err();
    assert!(
        matches!(error, ProviderError::InvalidSecret(_)),
        "{error:?}"
    );
    assert!(service.can_login(&other, &other_password).await);
}

macro_rules! service_tests {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn single_rotation() {
                let service = Target::new($kind).await;
                with_cleanup(service.clone(), super::single_rotation(service)).await;
            }

            #[tokio::test]
            async fn alternating_rotation() {
                let service = Target::new($kind).await;
                with_cleanup(service.clone(), super::alternating_rotation(service)).await;
            }

            #[tokio::test]
            async fn unreachable_target() {
                let service = Target::new($kind).await;
                with_cleanup(service.clone(), super::unreachable_target(service)).await;
            }

            #[tokio::test]
            async fn refused_admin() {
                let service = Target::new($kind).await;
                with_cleanup(service.clone(), super::refused_admin(service)).await;
            }

            #[tokio::test]
            async fn missing_user() {
                let service = Target::new($kind).await;
                with_cleanup(service.clone(), super::missing_user(service)).await;
            }

            #[tokio::test]
            async fn foreign_user_is_not_touched() {
                let service = Target::new($kind).await;
                with_cleanup(service.clone(), super::foreign_user_is_not_touched(service)).await;
            }
        }
    };
}

service_tests!(postgres, Kind::Postgres);
service_tests!(mysql, Kind::Mysql);
service_tests!(redis_acl, Kind::Redis);

/// PostgreSQL gets a SCRAM verifier: with every statement logged, the
/// plaintext password never reaches the server log.
#[tokio::test]
async fn postgres_plaintext_password_never_reaches_the_server_log() {
    let service = Target::new(Kind::Postgres).await;
    let user = service.user("logged");
    service.create_user(&user, &password()).await;
    let provider = provider(service.provider());
    let settings = settings(&["admin_secret=db/admin", &format!("username={user}")]);
    let admin = admin_secret(&service);
    let input = RotationInput {
        settings: &settings,
        admin: Some(&admin),
        current: None,
    };
    let pending = provider.generate(&input).await.unwrap();
    provider.apply(&input, &pending).await.unwrap();
    provider.verify(&input, &pending).await.unwrap();
    let log = pg_cluster::cluster().log();
    assert!(
        log.contains(&format!(
            "ALTER ROLE \"{user}\" PASSWORD 'SCRAM-SHA-256$4096:"
        )),
        "the statement was not logged: the check below would prove nothing"
    );
    assert!(!log.contains(field(&pending, "password")));
}

// ---------------------------------------------------------------- settings

#[test]
fn target_providers_validate_settings() {
    for name in ["postgres", "mysql", "redis"] {
        let provider = provider(name);
        assert_eq!(provider.name(), name);
        let cases: &[(&[&str], &str)] = &[
            (&[], "`admin_secret`"),
            (&["admin_secret=a"], "`username`"),
            (
                &["admin_secret=a", "username=app", "password=hunter2secret"],
                "`password`",
            ),
            (&["admin_secret=a", "strategy=alternating"], "`usernames`"),
            (
                &["admin_secret=a", "strategy=alternating", "usernames=x,y,z"],
                "`usernames`",
            ),
            (
                &["admin_secret=a", "strategy=blue-green", "username=app"],
                "`strategy`",
            ),
        ];
        for (pairs, key) in cases {
            let error = provider.validate(&settings(pairs)).unwrap_err();
            match &error {
                ProviderError::InvalidSettings(message) => {
                    assert!(message.contains(key), "{name} {pairs:?}: {message}")
                }
                other => panic!("{name} {pairs:?}: {other:?}"),
            }
            assert_no_secret(&error, &["hunter2secret", "blue-green"]);
        }
        provider
            .validate(&settings(&["admin_secret=a", "username=app"]))
            .unwrap();
    }
}

#[test]
fn registry_holds_the_builtin_providers() {
    let registry = Registry::with_builtin();
    for name in ["random", "postgres", "mysql", "redis"] {
        assert_eq!(
            registry.get(name).map(|p| p.name().to_owned()).as_deref(),
            Some(name)
        );
    }
    assert!(registry.get("ldap").is_none());
}

// ---------------------------------------------------------------- random

#[test]
fn random_validates_settings() {
    let random = provider("random");
    random.validate(&settings(&[])).unwrap();
    random
        .validate(&settings(&[
            "fields=password,api_key",
            "length=64",
            "charset=hex",
        ]))
        .unwrap();
    assert_eq!(random.admin_secret(&settings(&[])), None);
    let cases: &[(&[&str], &str)] = &[
        (&["length=7"], "`length`"),
        (&["length=4097"], "`length`"),
        (&["length=lots"], "`length`"),
        (&["charset=emoji"], "`charset`"),
        (&["fields="], "`fields`"),
        (&["fields=a,,b"], "`fields`"),
        (&["fields=a,a"], "`fields`"),
        (&["colour=red"], "`colour`"),
    ];
    for (pairs, key) in cases {
        match random.validate(&settings(pairs)) {
            Err(ProviderError::InvalidSettings(message)) => {
                assert!(message.contains(key), "{pairs:?}: {message}");
                assert!(!message.contains("emoji") && !message.contains("lots"));
            }
            other => panic!("{pairs:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn random_regenerates_the_fields_and_keeps_the_others() {
    let random = provider("random");
    let settings = settings(&["fields=password,api_key", "length=48", "charset=base64"]);
    let current = secret(&[("username", "svc"), ("password", "old"), ("note", "kept")]);
    let input = RotationInput {
        settings: &settings,
        admin: None,
        current: Some(&current),
    };
    let pending = random.generate(&input).await.unwrap();
    assert_eq!(field(&pending, "username"), "svc");
    assert_eq!(field(&pending, "note"), "kept");
    for name in ["password", "api_key"] {
        let value = field(&pending, name);
        assert_eq!(value.len(), 48);
        assert!(value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
    }
    assert_ne!(field(&pending, "password"), field(&pending, "api_key"));
    let again = random.generate(&input).await.unwrap();
    assert_ne!(field(&again, "password"), field(&pending, "password"));
    random.apply(&input, &pending).await.unwrap();
    random.verify(&input, &pending).await.unwrap();
    random.retire(&input, &current).await.unwrap();

    // With no current value, only the listed fields; default settings.
    let defaults = ProviderSettings::default();
    let fresh = RotationInput {
        settings: &defaults,
        admin: None,
        current: None,
    };
    let value = random.generate(&fresh).await.unwrap();
    assert_eq!(value.keys().collect::<Vec<_>>(), ["password"]);
    assert_eq!(field(&value, "password").len(), 32);
    assert!(field(&value, "password")
        .bytes()
        .all(|b| b.is_ascii_alphanumeric()));
}

/// Every character of each set turns up about equally often. With about
/// 8000 expected draws per character one standard deviation is about 1.1% of
/// the mean; the bound is 10% (about 9 deviations, so a correct generator
/// fails with odds far below 1e-15), while plain `byte % 62` would draw 8 of
/// the alnum characters about 21% more often than the mean, and fail.
#[test]
fn random_characters_are_uniform() {
    for charset in [
        Charset::Alnum,
        Charset::Ascii,
        Charset::Hex,
        Charset::Base64,
    ] {
        let alphabet = charset.alphabet();
        let draws = alphabet.len() * 8000;
        let mut counts = [0usize; 256];
        let mut total = 0;
        while total < draws {
            let chunk = random_string(4096, charset).unwrap();
            for &b in chunk.expose() {
                counts[usize::from(b)] += 1;
            }
            total += chunk.len();
        }
        let mean = total as f64 / alphabet.len() as f64;
        for &c in alphabet {
            let n = counts[usize::from(c)] as f64;
            assert!(
                (n - mean).abs() < mean * 0.10,
                "{charset:?}: {:?} drawn {n} times, mean {mean}",
                c as char
            );
        }
        let outside: usize = (0..256)
            .filter(|b| !alphabet.contains(&(*b as u8)))
            .map(|b| counts[b])
            .sum();
        assert_eq!(outside, 0, "{charset:?}: characters outside the set");
    }
}

// ---------------------------------------------------------------- external

/// An external provider: `examples/provider_plugin.rs`, built and started by
/// the test on a unix socket, reached through `ExternalProvider`.
mod external {
    use super::*;
    use crate::plugin::start_plugin;
    use keyward::rotation::providers::ExternalProvider;
    use std::path::Path;

    fn listed(keys_file: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(keys_file).unwrap();
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        file["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    }

    fn sha256_hex(key: &str) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()))
    }

    #[tokio::test]
    async fn rotates_through_the_example_plugin() {
        let plugin = start_plugin();
        let endpoint = format!("unix:{}", plugin.socket.display());
        let external = ExternalProvider::connect("apikeys", &endpoint, None)
            .await
            .unwrap();
        assert!(external
            .settings()
            .iter()
            .any(|s| s.key == "keys_file" && s.required));
        let mut registry = Registry::with_builtin();
        registry.register(Arc::new(external)).unwrap();
        let provider = registry.get("apikeys").unwrap();

        // validate: from Describe, without a call.
        for (pairs, key) in [
            (&[][..], "`keys_file`"),
            (&["keys_file=/x", "colour=red"][..], "`colour`"),
        ] {
            match provider.validate(&settings(pairs)) {
                Err(ProviderError::InvalidSettings(m)) => assert!(m.contains(key), "{m}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
        let keys_file = plugin.dir.path().join("keys.json");
        let config = settings(&[&format!("keys_file={}", keys_file.display())]);
        provider.validate(&config).unwrap();
        assert_eq!(provider.admin_secret(&config), None);

        // The service accepts the current key.
        let old_key = "ak_OldKeyThatIsCurrentlyInUse0123456789";
        std::fs::write(
            &keys_file,
            format!("{{\"keys\": [\"{}\"]}}", sha256_hex(old_key)),
        )
        .unwrap();
        let current = secret(&[("api_key", old_key), ("owner", "team-payments")]);
        let input = RotationInput {
            settings: &config,
            admin: None,
            current: Some(&current),
        };

        let pending = provider.generate(&input).await.unwrap();
        let new_key = field(&pending, "api_key").to_owned();
        assert!(
            new_key.starts_with("ak_") && new_key.len() == 43,
            "{new_key}"
        );
        assert_eq!(field(&pending, "owner"), "team-payments");
        assert_ne!(
            field(&provider.generate(&input).await.unwrap(), "api_key"),
            new_key
        );

        // Before apply, the service refuses the pending key; the message
        // does not hold it.
        let error = provider.verify(&input, &pending).await.unwrap_err();
        assert!(matches!(error, ProviderError::Refused(_)), "{error:?}");
        assert_no_secret(&error, &[&new_key, old_key]);

        provider.apply(&input, &pending).await.unwrap();
        provider.apply(&input, &pending).await.unwrap();
        provider.verify(&input, &pending).await.unwrap();
        assert_eq!(
            listed(&keys_file),
            [sha256_hex(old_key), sha256_hex(&new_key)]
        );
        let on_disk = std::fs::read_to_string(&keys_file).unwrap();
        assert!(
            !on_disk.contains(&new_key),
            "the key file holds hashes only"
        );

        // Promoted; retiring the current value is a no-op, the previous one
        // is unlisted, twice is once.
        let promoted = RotationInput {
            current: Some(&pending),
            ..input
        };
        provider.retire(&promoted, &pending).await.unwrap();
        provider.retire(&promoted, &current).await.unwrap();
        provider.retire(&promoted, &current).await.unwrap();
        assert_eq!(listed(&keys_file), [sha256_hex(&new_key)]);

        // A value the plugin cannot use, and settings it refuses.
        let error = provider
            .apply(&promoted, &secret(&[("owner", "x")]))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ProviderError::InvalidSecret(_)),
            "{error:?}"
        );
        let relative = settings(&["keys_file=keys.json"]);
        let bad = RotationInput {
            settings: &relative,
            ..promoted
        };
        let error = provider.generate(&bad).await.unwrap_err();
        assert!(
            matches!(error, ProviderError::InvalidSettings(_)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_plugin_that_is_not_running_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("unix:{}", dir.path().join("absent.sock").display());
        let error = ExternalProvider::connect("absent", &endpoint, None)
            .await
            .unwrap_err();
        assert!(matches!(error, ProviderError::Unreachable(_)), "{error:?}");
        assert!(error.is_retryable());
    }

    #[tokio::test]
    async fn a_stopped_plugin_is_unreachable() {
        let mut plugin = start_plugin();
        let endpoint = format!("unix:{}", plugin.socket.display());
        let provider = ExternalProvider::connect("apikeys", &endpoint, None)
            .await
            .unwrap();
        plugin.child.kill().unwrap();
        plugin.child.wait().unwrap();
        let _ = std::fs::remove_file(&plugin.socket);
        let settings = settings(&["keys_file=/nonexistent/keys.json"]);
        let input = RotationInput {
            settings: &settings,
            admin: None,
            current: None,
        };
        let error = provider.generate(&input).await.unwrap_err();
        assert!(matches!(error, ProviderError::Unreachable(_)), "{error:?}");
    }
}
