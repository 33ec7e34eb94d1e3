//! Rotation policies: which provider rotates a secret, when, with which
//! grace period and settings. [`PolicySpec::parse`] turns what a caller sent
//! into a checked value; [`PolicyRecord`] is what is stored under
//! `rotation/policy/<path>` (through the barrier, by the broker in
//! `rotation/mod.rs`; this file touches no storage).
//!
//! Settings never hold credentials: they are shown by `rotation get` and
//! kept in every backup. A key that names a credential (`password`,
//! `token`, `api_key`, ...) is refused; a key ending in `_secret` must hold
//! the path of a secret, which the broker resolves at each step.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;

use super::provider::{ProviderError, ProviderSettings};
use super::providers::Registry;
use super::record::{RecordError, RunState};
use super::schedule::{Schedule, ScheduleError, MAX_DURATION};
use crate::secrets::{InputError, SecretPath};

/// Words that mark a settings key as an inline credential.
const CREDENTIAL_WORDS: [&str; 9] = [
    "password",
    "passwd",
    "pwd",
    "token",
    "credential",
    "apikey",
    "api_key",
    "private_key",
    "access_key",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationPolicyError {
    #[error(transparent)]
    Path(#[from] InputError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("no provider named `{0}` (built in: random, postgres, mysql, redis; others need `keyward provider register`)")]
    UnknownProvider(String),
    #[error(transparent)]
    Settings(#[from] ProviderError),
    #[error("setting `{0}` looks like an inline credential; store it as a secret and name it (e.g. admin_secret=PATH)")]
    InlineCredential(String),
    #[error("setting `{0}` must name a secret path")]
    BadSecretReference(String),
    #[error("a setting may not name the rotated secret itself")]
    SelfReference,
    #[error("the grace period must be at most 100 years")]
    GraceTooLong,
}

/// A checked rotation policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    pub path: SecretPath,
    pub provider: String,
    pub schedule: Schedule,
    pub grace: Duration,
    pub settings: ProviderSettings,
}

impl PolicySpec {
    /// Checks every part; the provider validates its own settings (without
    /// touching its target).
    pub fn parse(
        path: &str,
        provider: &str,
        schedule: Schedule,
        grace: Duration,
        settings: BTreeMap<String, String>,
        registry: &Registry,
    ) -> Result<Self, RotationPolicyError> {
        let path = SecretPath::parse(path)?;
        if grace > MAX_DURATION {
            return Err(RotationPolicyError::GraceTooLong);
        }
        let settings = ProviderSettings::new(settings)?;
        check_no_credentials(&settings, &path)?;
        let found = registry
            .get(provider)
            .ok_or_else(|| RotationPolicyError::UnknownProvider(provider.to_owned()))?;
        found.validate(&settings)?;
        Ok(Self {
            path,
            provider: provider.to_owned(),
            schedule,
            grace,
            settings,
        })
    }

    /// The secret paths the settings refer to (keys ending in `_secret`).
    pub fn referenced_secrets(&self) -> Vec<SecretPath> {
        references(&self.settings)
    }
}

fn references(settings: &ProviderSettings) -> Vec<SecretPath> {
    settings
        .iter()
        .filter(|(k, _)| k.ends_with("_secret"))
        .filter_map(|(_, v)| SecretPath::parse(v).ok())
        .collect()
}

/// Refuses settings that carry a credential instead of naming one.
pub fn check_no_credentials(
    settings: &ProviderSettings,
    rotated: &SecretPath,
) -> Result<(), RotationPolicyError> {
    for (key, value) in settings.iter() {
        let lower = key.to_ascii_lowercase();
        if lower.ends_with("_secret") {
            let target = SecretPath::parse(value)
                .map_err(|_| RotationPolicyError::BadSecretReference(key.into()))?;
            if &target == rotated {
                return Err(RotationPolicyError::SelfReference);
            }
            continue;
        }
        if lower == "secret" || CREDENTIAL_WORDS.iter().any(|w| lower.contains(w)) {
            return Err(RotationPolicyError::InlineCredential(key.to_owned()));
        }
    }
    Ok(())
}

/// What the broker stores for a policy. `next_due_ms` is also the key of its
/// entry in the due index, so a change of schedule can remove the old one.
#[derive(Clone, PartialEq, Message)]
pub struct PolicyRecord {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(string, tag = "2")]
    pub provider: String,
    #[prost(uint64, tag = "3")]
    pub every_seconds: u64,
    #[prost(string, tag = "4")]
    pub cron: String,
    #[prost(uint64, tag = "5")]
    pub grace_seconds: u64,
    #[prost(btree_map = "string, string", tag = "6")]
    pub settings: BTreeMap<String, String>,
    #[prost(uint64, tag = "7")]
    pub next_due_ms: u64,
    #[prost(uint64, tag = "8")]
    pub last_run_ms: u64,
    /// The [`RunState`] of the last run by name, "" if it never ran; read
    /// and written through [`PolicyRecord::last_state`] and
    /// [`PolicyRecord::set_last_state`].
    #[prost(string, tag = "9")]
    pub last_state: String,
    #[prost(string, tag = "10")]
    pub last_error: String,
    #[prost(uint64, tag = "11")]
    pub last_success_ms: u64,
    #[prost(uint64, tag = "12")]
    pub created_at_ms: u64,
    /// The due time the last run was started for (0 for a manual run).
    #[prost(uint64, tag = "13")]
    pub last_due_ms: u64,
    /// Whether the last scheduled run started within its tolerance.
    #[prost(bool, tag = "14")]
    pub last_on_time: bool,
}

impl PolicyRecord {
    pub fn from_spec(spec: &PolicySpec, next_due_ms: u64, now_ms: u64) -> Self {
        Self {
            path: spec.path.to_string(),
            provider: spec.provider.clone(),
            every_seconds: spec.schedule.every_seconds(),
            cron: spec.schedule.cron_expression().to_owned(),
            grace_seconds: spec.grace.as_secs(),
            settings: spec.settings.as_map().clone(),
            next_due_ms,
            created_at_ms: now_ms,
            ..Self::default()
        }
    }

    /// The state of the last run; `None` if it never ran. An unknown name
    /// is an error (a record this code cannot read), never a guess.
    pub fn last_state(&self) -> Result<Option<RunState>, RecordError> {
        if self.last_state.is_empty() {
            return Ok(None);
        }
        self.last_state.parse().map(Some)
    }

    pub fn set_last_state(&mut self, state: RunState) {
        self.last_state = state.as_str().to_owned();
    }

    /// The schedule, parsed again (it was checked when set).
    pub fn schedule(&self) -> Result<Schedule, ScheduleError> {
        Schedule::from_parts(self.every_seconds, &self.cron)
    }

    pub fn settings(&self) -> Result<ProviderSettings, ProviderError> {
        ProviderSettings::new(self.settings.clone())
    }

    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_seconds)
    }

    /// How late a run may start and still count as on schedule: a tenth of
    /// the period, at least a minute (a server restart is not a breach).
    pub fn tolerance_ms(&self, now_ms: u64) -> u64 {
        let period = self
            .schedule()
            .map(|s| s.period_ms(now_ms))
            .unwrap_or(60_000);
        (period / 10).max(60_000)
    }

    /// Past its due time by more than the tolerance.
    pub fn is_overdue(&self, now_ms: u64) -> bool {
        self.next_due_ms != 0 && now_ms > self.next_due_ms + self.tolerance_ms(now_ms)
    }
}

#[cfg(test)]
#[allow(clippy::panic, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    fn spec(provider: &str, pairs: &[(&str, &str)]) -> Result<PolicySpec, RotationPolicyError> {
        let settings = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        PolicySpec::parse(
            "app/db",
            provider,
            Schedule::Every(Duration::from_secs(60)),
            Duration::from_secs(10),
            settings,
            &Registry::with_builtin(),
        )
    }

    #[test]
    fn good_policies_parse() {
        assert!(spec("random", &[("length", "40")]).is_ok());
        let pg = spec(
            "postgres",
            &[("admin_secret", "db/admin"), ("username", "app")],
        );
        let refs = pg.map(|s| s.referenced_secrets()).unwrap_or_default();
        assert_eq!(refs.len(), 1);
    }

    #[test]
    fn inline_credentials_are_refused_without_echo() {
        for key in ["password", "admin_password", "api_key", "Token", "secret"] {
            let err = spec("random", &[(key, "hunter2-secret-value")]);
            match err {
                Err(RotationPolicyError::InlineCredential(k)) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
            let shown = format!("{:?}", spec("random", &[(key, "hunter2-secret-value")]));
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert!(matches!(
            spec(
                "postgres",
                &[("admin_secret", "not a path"), ("username", "a")]
            ),
            Err(RotationPolicyError::BadSecretReference(_))
        ));
        assert_eq!(
            spec("postgres", &[("admin_secret", "app/db"), ("username", "a")]),
            Err(RotationPolicyError::SelfReference)
        );
    }

    #[test]
    fn unknown_providers_and_bad_settings_are_refused() {
        assert!(matches!(
            spec("nope", &[]),
            Err(RotationPolicyError::UnknownProvider(_))
        ));
        assert!(matches!(
            spec("random", &[("length", "2")]),
            Err(RotationPolicyError::Settings(_))
        ));
    }
}
