//! Rotation policies: which provider rotates a secret, when, with which
//! grace period and settings. [`PolicySpec::parse`] turns what a caller sent
//! into a checked value; [`PolicyRecord`] is what is stored under
//! `rotation/policy/<path>` (through the barrier, by the broker in
//! `rotation/mod.rs`; this file touches no storage).
//!
//! Settings never hold credentials: they are shown by `rotation get` and
//! kept in every backup. The provider's own description decides which
//! setting is a secret reference ([`Provider::admin_secret_key`], compared
//! exactly, case included): that setting must hold the path of a secret,
//! which the broker resolves at each step on behalf of whoever set the
//! policy (see `reads`). Any other key that names a credential (`password`,
//! `token`, `api_key`, `secret`, ..., in any case) is refused.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;

use super::provider::{Provider, ProviderError, ProviderSettings};
use super::providers::Registry;
use super::reads::Setter;
use super::record::{RecordError, RunState};
use super::schedule::{Schedule, ScheduleError, MAX_DURATION};
use crate::secrets::{InputError, SecretPath};

/// Words that mark a settings key as an inline credential (unless it is
/// the provider's secret reference).
const CREDENTIAL_WORDS: [&str; 10] = [
    "secret",
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
    #[error("setting `{0}` looks like an inline credential, and the provider does not read it as a secret reference; store the credential as a secret and name it under the provider's reference key (e.g. admin_secret=PATH)")]
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
    /// The secrets the broker will read for the provider, as the provider
    /// describes its settings: whoever sets the policy must hold `read` on
    /// each.
    references: Vec<SecretPath>,
    /// Who sets it; unknown until [`PolicySpec::set_by`] (a policy with an
    /// unknown setter never has its references read).
    pub setter: Setter,
}

impl PolicySpec {
    /// Checks every part; the provider validates its own settings (without
    /// touching its target) and says which of them is a secret reference.
    /// An external provider answers from its last `Describe`: the broker
    /// asks it again first ([`super::Broker::check_policy`]).
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
        let found = registry
            .get(provider)
            .ok_or_else(|| RotationPolicyError::UnknownProvider(provider.to_owned()))?;
        let references = check_settings(found.as_ref(), &settings, &path)?;
        found.validate(&settings)?;
        Ok(Self {
            path,
            provider: provider.to_owned(),
            schedule,
            grace,
            settings,
            references,
            setter: Setter::default(),
        })
    }

    /// Records who sets the policy.
    pub fn set_by(mut self, setter: Setter) -> Self {
        self.setter = setter;
        self
    }

    /// The secret paths the broker will read for the provider (its secret
    /// reference, as the provider describes its settings).
    pub fn referenced_secrets(&self) -> &[SecretPath] {
        &self.references
    }
}

/// The secret paths `provider` reads from `settings`: the value under its
/// secret reference key, if set. The broker's read at run time and the
/// check at set time both come through here, so they cannot disagree.
pub fn secret_references(
    provider: &dyn Provider,
    settings: &ProviderSettings,
) -> Result<Vec<SecretPath>, RotationPolicyError> {
    let Some(key) = provider.admin_secret_key() else {
        return Ok(Vec::new());
    };
    match settings.get(&key) {
        None => Ok(Vec::new()),
        Some(value) => SecretPath::parse(value)
            .map(|path| vec![path])
            .map_err(|_| RotationPolicyError::BadSecretReference(key)),
    }
}

/// Refuses settings that carry a credential instead of naming one, and
/// returns the secret paths the provider reads from them (which may not be
/// the rotated secret itself).
pub fn check_settings(
    provider: &dyn Provider,
    settings: &ProviderSettings,
    rotated: &SecretPath,
) -> Result<Vec<SecretPath>, RotationPolicyError> {
    let reference_key = provider.admin_secret_key();
    for (key, _) in settings.iter() {
        if reference_key.as_deref() == Some(key) {
            continue;
        }
        // A heuristic on the key's name, not a comparison of keys: read
        // case-blind, so `Password` and `Admin_Secret` are caught too.
        let lower = key.to_ascii_lowercase();
        if CREDENTIAL_WORDS.iter().any(|w| lower.contains(w)) {
            return Err(RotationPolicyError::InlineCredential(key.to_owned()));
        }
    }
    let references = secret_references(provider, settings)?;
    if references.iter().any(|r| r == rotated) {
        return Err(RotationPolicyError::SelfReference);
    }
    Ok(references)
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
    /// The identity that set the policy; "" in records written before it
    /// was recorded (see [`Setter`]).
    #[prost(string, tag = "15")]
    pub set_by: String,
    /// The policies its token held then.
    #[prost(string, repeated, tag = "16")]
    pub set_by_policies: Vec<String>,
    /// The accessor of the setting token, for a root-lineage token without
    /// the `root` policy; "" otherwise and in older records.
    #[prost(string, tag = "17")]
    pub set_by_accessor: String,
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
            set_by: spec.setter.identity.clone(),
            set_by_policies: spec.setter.policies.clone(),
            set_by_accessor: spec.setter.accessor.clone(),
            ..Self::default()
        }
    }

    /// Who set the policy.
    pub fn setter(&self) -> Setter {
        Setter::new(self.set_by.clone(), self.set_by_policies.clone())
            .with_accessor(self.set_by_accessor.clone())
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
        let refs = pg.map(|s| {
            s.referenced_secrets()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        });
        assert_eq!(refs, Ok(vec!["db/admin".to_owned()]));
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

    /// A provider whose reference key is `key`; its steps are never run.
    struct Describes(&'static str);

    impl Provider for Describes {
        fn name(&self) -> &str {
            "describes"
        }

        fn validate(&self, _: &ProviderSettings) -> Result<(), ProviderError> {
            Ok(())
        }

        fn admin_secret_key(&self) -> Option<String> {
            Some(self.0.to_owned())
        }

        fn generate<'a>(
            &'a self,
            _: &'a super::super::provider::RotationInput<'a>,
        ) -> super::super::provider::BoxFuture<'a, Result<crate::secrecy::SecretData, ProviderError>>
        {
            Box::pin(async { Err(ProviderError::Internal("not run".into())) })
        }

        fn apply<'a>(
            &'a self,
            _: &'a super::super::provider::RotationInput<'a>,
            _: &'a crate::secrecy::SecretData,
        ) -> super::super::provider::BoxFuture<'a, Result<(), ProviderError>> {
            Box::pin(async { Err(ProviderError::Internal("not run".into())) })
        }

        fn verify<'a>(
            &'a self,
            _: &'a super::super::provider::RotationInput<'a>,
            _: &'a crate::secrecy::SecretData,
        ) -> super::super::provider::BoxFuture<'a, Result<(), ProviderError>> {
            Box::pin(async { Err(ProviderError::Internal("not run".into())) })
        }

        fn retire<'a>(
            &'a self,
            _: &'a super::super::provider::RotationInput<'a>,
            _: &'a crate::secrecy::SecretData,
        ) -> super::super::provider::BoxFuture<'a, Result<(), ProviderError>> {
            Box::pin(async { Err(ProviderError::Internal("not run".into())) })
        }
    }

    fn check(
        key: &'static str,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<String>, RotationPolicyError> {
        let settings = ProviderSettings::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )?;
        let rotated = SecretPath::parse("app/db")?;
        check_settings(&Describes(key), &settings, &rotated)
            .map(|refs| refs.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn the_provider_names_its_reference_and_keys_compare_exactly() {
        // Whatever key the provider describes is the reference, in any case.
        assert_eq!(
            check("admin", &[("admin", "prod/db")]),
            Ok(vec!["prod/db".into()])
        );
        assert_eq!(
            check("Admin_Secret", &[("Admin_Secret", "prod/db")]),
            Ok(vec!["prod/db".into()])
        );
        // The same key in another case is not the reference, and a name
        // that looks like a credential is refused, in any case.
        assert_eq!(
            check("Admin_Secret", &[("admin_secret", "prod/db")]),
            Err(RotationPolicyError::InlineCredential("admin_secret".into()))
        );
        assert_eq!(
            check("admin", &[("db_SECRET", "prod/db")]),
            Err(RotationPolicyError::InlineCredential("db_SECRET".into()))
        );
        // No reference set: nothing is read.
        assert_eq!(check("admin", &[("note", "x")]), Ok(vec![]));
        assert_eq!(
            check("admin", &[("admin", "app/db")]),
            Err(RotationPolicyError::SelfReference)
        );
    }
}
