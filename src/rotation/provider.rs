//! The provider contract: the four steps of a rotation, the settings a
//! provider is configured with, and its errors. Nothing else: the built-in
//! providers and the registry that finds one by name live in `providers`.
//!
//! # The steps
//!
//! The broker calls the steps in order and persists each outcome before the
//! next call, so after a crash it calls the same step again. Hence every step
//! that acts on a target is idempotent: calling it twice with the same input
//! has the effect of calling it once.
//!
//! - [`Provider::generate`] makes the new value. It has no effect on the
//!   target and returns fresh randomness on every call; the broker stores the
//!   result as the `pending` version *before* calling `apply`, so a value that
//!   may be live on the target is never lost.
//! - [`Provider::apply`] makes `pending` valid on the target.
//! - [`Provider::verify`] proves `pending` works: it logs in *with* it, on a
//!   new connection. If it fails, the broker retries, then rolls back; `current`
//!   is never promoted to a value that does not work.
//! - [`Provider::retire`] runs after the grace period with the version that
//!   was `current` before the promotion (`previous`), and makes it stop working
//!   where the strategy allows it.
//!
//! In [`RotationInput`], `current` is the secret's current version at the time
//! of the call: during generate, apply and verify it is the value being
//! replaced; during retire it is the value that replaced `previous`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use crate::secrecy::SecretData;

/// A boxed future, so that [`Provider`] stays dyn-compatible.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors of a provider step.
///
/// Messages name the step, the setting key, the field or the target (host,
/// port, user name, server error code) and never hold a secret value: drivers'
/// messages are not passed through, because a server may quote the statement
/// (and so the password) it refused. Build messages only from such non-secret
/// parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The settings are wrong: a missing or unknown key or a bad value. The
    /// message names the key, never the value.
    #[error("invalid rotation settings: {0}")]
    InvalidSettings(String),
    /// A secret handed to the provider (admin, current, pending or previous)
    /// lacks a field or holds a value the provider cannot use.
    #[error("invalid secret: {0}")]
    InvalidSecret(String),
    /// The target could not be reached or did not answer in time. Retryable.
    #[error("target unreachable: {0}")]
    Unreachable(String),
    /// The target answered and said no: a login or a statement was refused.
    #[error("target refused: {0}")]
    Refused(String),
    /// The provider itself failed (no randomness, a broken plugin).
    #[error("provider failed: {0}")]
    Internal(String),
}

impl ProviderError {
    /// Whether the same call may succeed later without a change of settings
    /// or secrets.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unreachable(_))
    }
}

/// Limits on [`ProviderSettings`], so a policy stays small.
pub const MAX_SETTINGS: usize = 64;
/// The longest settings key, in bytes.
pub const MAX_SETTINGS_KEY_LEN: usize = 64;
/// The longest settings value, in bytes.
pub const MAX_SETTINGS_VALUE_LEN: usize = 1024;

/// The `--config KEY=VALUE` pairs of a rotation policy.
///
/// They are stored in the policy and shown by `rotation get`, so they never
/// hold credentials: a provider that needs one names a secret (for example
/// `admin_secret=PATH`) and the broker resolves it at each step. Keys are
/// 1 to 64 characters of `[A-Za-z0-9_.-]` starting with a letter; values are
/// at most 1024 bytes. Errors name the key and never echo a value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderSettings(BTreeMap<String, String>);

impl ProviderSettings {
    /// Settings from a map, checked against the limits above.
    pub fn new(pairs: BTreeMap<String, String>) -> Result<Self, ProviderError> {
        if pairs.len() > MAX_SETTINGS {
            return Err(ProviderError::InvalidSettings(format!(
                "at most {MAX_SETTINGS} settings are allowed"
            )));
        }
        for (key, value) in &pairs {
            check_key(key)?;
            if value.len() > MAX_SETTINGS_VALUE_LEN {
                return Err(ProviderError::InvalidSettings(format!(
                    "the value of `{key}` is longer than {MAX_SETTINGS_VALUE_LEN} bytes"
                )));
            }
        }
        Ok(Self(pairs))
    }

    /// Settings from `KEY=VALUE` strings, as typed after `--config`. A key
    /// given twice is refused.
    pub fn parse_pairs<I, S>(pairs: I) -> Result<Self, ProviderError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut map = BTreeMap::new();
        for pair in pairs {
            let pair = pair.as_ref();
            let Some((key, value)) = pair.split_once('=') else {
                return Err(ProviderError::InvalidSettings(
                    "each setting must be written KEY=VALUE".into(),
                ));
            };
            check_key(key)?;
            if map.insert(key.to_owned(), value.to_owned()).is_some() {
                return Err(ProviderError::InvalidSettings(format!(
                    "`{key}` is given more than once"
                )));
            }
        }
        Self::new(map)
    }

    /// The value of `key`, if set. Keys are compared exactly, case
    /// included: `Admin_Secret` and `admin_secret` are different keys. Every
    /// comparison of keys (this, [`ProviderSettings::only_keys`], a
    /// provider's secret reference) is exact; only the check for keys that
    /// look like inline credentials reads names case-blind, and refuses more
    /// for it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The value of `key`, or an error naming it.
    pub fn require(&self, key: &str) -> Result<&str, ProviderError> {
        self.get(key)
            .ok_or_else(|| ProviderError::InvalidSettings(format!("`{key}` is required")))
    }

    /// Refuses any key not in `known`, naming the first such key.
    pub fn only_keys(&self, known: &[&str]) -> Result<(), ProviderError> {
        match self.0.keys().find(|key| !known.contains(&key.as_str())) {
            None => Ok(()),
            Some(key) => Err(ProviderError::InvalidSettings(format!(
                "unknown key `{key}` (known keys: {})",
                known.join(", ")
            ))),
        }
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn check_key(key: &str) -> Result<(), ProviderError> {
    let well_formed = !key.is_empty()
        && key.len() <= MAX_SETTINGS_KEY_LEN
        && key.starts_with(|c: char| c.is_ascii_alphabetic())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if well_formed {
        Ok(())
    } else {
        // The key may be a mistyped value: do not echo it.
        Err(ProviderError::InvalidSettings(format!(
            "a key must be 1 to {MAX_SETTINGS_KEY_LEN} characters of [A-Za-z0-9_.-] starting with a letter"
        )))
    }
}

/// What a step gets besides the value it acts on.
#[derive(Debug, Clone, Copy)]
pub struct RotationInput<'a> {
    pub settings: &'a ProviderSettings,
    /// The resolved secret named by [`Provider::admin_secret`], if the
    /// provider names one (fields `host`, `port`, `username`, `password`,
    /// `database` for the database providers).
    pub admin: Option<&'a SecretData>,
    /// The secret's current version, if it has one (see the module doc for
    /// what it is at each step).
    pub current: Option<&'a SecretData>,
}

/// A rotation provider. Providers are chosen by name at run time, so the
/// trait is dyn-compatible; see the module doc for the steps' contract.
pub trait Provider: Send + Sync {
    /// The name policies use (`--provider NAME`).
    fn name(&self) -> &str;

    /// Checks settings when a policy is set (`rotation set`): unknown and
    /// missing keys, bad values. Errors name the key, never the value. Touches
    /// no target.
    fn validate(&self, settings: &ProviderSettings) -> Result<(), ProviderError>;

    /// The settings key whose value is the path of a secret the broker
    /// resolves and passes as [`RotationInput::admin`], if the provider
    /// takes one (`admin_secret` for the database providers; an external
    /// provider names it in `Describe`).
    ///
    /// This is the provider's own description of which setting is a secret
    /// reference, and the only one: a policy's other settings are passed
    /// through as text and never resolved. Keys are compared exactly (case
    /// included), here as everywhere ([`ProviderSettings::get`]).
    fn admin_secret_key(&self) -> Option<String>;

    /// The path the settings name under [`Provider::admin_secret_key`], if
    /// any: the one secret the broker reads for this provider besides the
    /// rotated one.
    fn admin_secret<'s>(&self, settings: &'s ProviderSettings) -> Option<&'s str> {
        self.admin_secret_key().and_then(|key| settings.get(&key))
    }

    /// Asks the provider to describe itself again, when a policy is set, so
    /// that the settings are checked (and their secret reference found)
    /// against what it says now. An external provider calls its plugin's
    /// `Describe`; a built-in one knows itself, so the default does nothing.
    fn describe(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    /// The external plugin behind this provider, if it is one (dynamic
    /// credentials call its `Create`/`Revoke`).
    fn into_external(
        self: std::sync::Arc<Self>,
    ) -> Option<std::sync::Arc<crate::rotation::providers::ExternalProvider>> {
        None
    }

    /// Makes the new value. No effect on any target; fresh randomness on
    /// every call.
    fn generate<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
    ) -> BoxFuture<'a, Result<SecretData, ProviderError>>;

    /// Makes `pending` (a value `generate` made) valid on the target.
    /// Idempotent.
    fn apply<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        pending: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Proves `pending` works by using it: a new connection that logs in with
    /// it and runs a trivial command. Changes nothing.
    fn verify<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        pending: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// After the grace period, makes `previous` (the version `current`
    /// replaced) stop working where the strategy allows it. Idempotent.
    fn retire<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
        previous: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_refuse_duplicates() {
        let settings = ProviderSettings::parse_pairs(["length=32", "fields=a,b=c"]);
        assert_eq!(
            settings.as_ref().ok().and_then(|s| s.get("fields")),
            Some("a,b=c")
        );
        assert!(matches!(
            ProviderSettings::parse_pairs(["length=1", "length=2"]),
            Err(ProviderError::InvalidSettings(m)) if m.contains("`length`")
        ));
        assert!(ProviderSettings::parse_pairs(["novalue"]).is_err());
    }

    #[test]
    fn a_bad_key_is_not_echoed() {
        let err = ProviderSettings::parse_pairs(["hunter2 secret=x"]).err();
        let shown = format!("{err:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
