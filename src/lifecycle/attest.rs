//! Owner recertification: an owner attests, periodically, that an identity
//! is still needed and still theirs.
//!
//! An identity is due `recertify_every` after its last attestation (or its
//! creation, if never attested) and overdue `unattested_grace` after that.
//! With `disable_unattested`, the recertifier (a background task on the one
//! clock) disables an overdue identity (its tokens and secret-ids revoked,
//! audited as `keyward.lifecycle/DisableUnattested` by `lifecycle`). An
//! operator who enables it again without an attestation sees it disabled
//! again at the next pass: attesting is the way back.
//!
//! Storage: `lifecycle/attest/<name>` -> [`Attestation`] (the last one).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prost::Message;

use super::{Lifecycle, LifecycleError, LIFECYCLE_IDENTITY};
use crate::audit::{AuditEvent, Outcome};
use crate::clock::Shutdown;
use crate::identity::{IdentityError, IdentityName, IdentityRecord};
use crate::metrics::{Metrics, Refresh, RefreshEvery};

const PREFIX: &str = "lifecycle/attest/";

/// How often the recertifier looks for overdue identities.
pub const PASS_EVERY: Duration = Duration::from_secs(60);

/// Longest attestation note, in bytes.
pub const MAX_NOTE: usize = 1024;

/// `governance.*` settings of recertification (parsed in `config`).
pub use crate::config::GovernanceConfig as RecertSettings;

/// The last attestation of an identity.
#[derive(Clone, PartialEq, Message)]
pub struct Attestation {
    #[prost(string, tag = "1")]
    pub identity: String,
    /// The identity of the caller who attested.
    #[prost(string, tag = "2")]
    pub by: String,
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
    #[prost(string, tag = "4")]
    pub note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestState {
    Current,
    Due,
    Overdue,
}

impl AttestState {
    pub fn as_str(self) -> &'static str {
        match self {
            AttestState::Current => "current",
            AttestState::Due => "due",
            AttestState::Overdue => "overdue",
        }
    }
}

/// Where one identity stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestStatus {
    pub identity: String,
    pub owner: String,
    pub disabled: bool,
    /// 0: never attested.
    pub attested_at_ms: u64,
    pub attested_by: String,
    pub note: String,
    pub due_at_ms: u64,
    pub overdue_at_ms: u64,
    pub state: AttestState,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where `record` stands at `now_ms`, given its last attestation.
pub fn status_of(
    record: &IdentityRecord,
    last: Option<&Attestation>,
    settings: &RecertSettings,
    now_ms: u64,
) -> AttestStatus {
    let base = last.map(|a| a.at_ms).unwrap_or(0).max(record.created_at_ms);
    let due_at_ms = base.saturating_add(ms(settings.every));
    let overdue_at_ms = due_at_ms.saturating_add(ms(settings.grace));
    let state = if now_ms >= overdue_at_ms {
        AttestState::Overdue
    } else if now_ms >= due_at_ms {
        AttestState::Due
    } else {
        AttestState::Current
    };
    AttestStatus {
        identity: record.name.clone(),
        owner: record.owner.clone(),
        disabled: record.disabled,
        attested_at_ms: last.map(|a| a.at_ms).unwrap_or(0),
        attested_by: last.map(|a| a.by.clone()).unwrap_or_default(),
        note: last.map(|a| a.note.clone()).unwrap_or_default(),
        due_at_ms,
        overdue_at_ms,
        state,
    }
}

/// A note must be printable text (it is shown in reports and logs).
pub fn check_note(note: &str) -> Result<(), LifecycleError> {
    if note.len() > MAX_NOTE {
        return Err(LifecycleError::Invalid(format!(
            "an attestation note is at most {MAX_NOTE} bytes"
        )));
    }
    if note.chars().any(char::is_control) {
        return Err(LifecycleError::Invalid(
            "an attestation note may not hold control characters".into(),
        ));
    }
    Ok(())
}

impl Lifecycle {
    /// Records that `by` attested `name` now.
    pub async fn attest(
        &self,
        name: &IdentityName,
        by: &str,
        note: &str,
    ) -> Result<Attestation, LifecycleError> {
        check_note(note)?;
        self.deps
            .identities
            .get(name.as_str())?
            .ok_or(IdentityError::NotFound)?;
        let attestation = Attestation {
            identity: name.as_str().to_owned(),
            by: by.to_owned(),
            at_ms: self.deps.clock.now_ms(),
            note: note.to_owned(),
        };
        self.deps.barrier.put(
            &format!("{PREFIX}{}", name.as_str()),
            &attestation.encode_to_vec(),
        )?;
        self.deps.barrier.durable().await?;
        Ok(attestation)
    }

    pub fn attestation(&self, name: &str) -> Result<Option<Attestation>, LifecycleError> {
        match self.deps.barrier.get(&format!("{PREFIX}{name}"))? {
            None => Ok(None),
            Some(raw) => Attestation::decode(raw.as_slice())
                .map(Some)
                .map_err(|_| LifecycleError::Corrupt),
        }
    }

    /// Every identity's standing, in name order.
    pub fn attestations(
        &self,
        settings: &RecertSettings,
        now_ms: u64,
    ) -> Result<Vec<AttestStatus>, LifecycleError> {
        let mut out = Vec::new();
        for record in self.deps.identities.all()? {
            let last = self.attestation(&record.name)?;
            out.push(status_of(&record, last.as_ref(), settings, now_ms));
        }
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        Ok(out)
    }

    /// One pass of the recertifier: with `disable_unattested`, disables
    /// every enabled identity past its grace. Returns the names disabled.
    pub async fn enforce_attestation(
        &self,
        settings: &RecertSettings,
    ) -> Result<Vec<String>, LifecycleError> {
        let mut disabled = Vec::new();
        if !settings.disable_unattested || self.deps.barrier.status().sealed {
            return Ok(disabled);
        }
        let now = self.deps.clock.now_ms();
        for status in self.attestations(settings, now)? {
            if status.disabled || status.state != AttestState::Overdue {
                continue;
            }
            let name = IdentityName::parse(&status.identity)?;
            let resource = format!("identity/{}", status.identity);
            let request_id = format!("recert-{}", uuid::Uuid::now_v7().simple());
            let reason = format!(
                "not attested since {}; overdue since {}",
                status.due_at_ms, status.overdue_at_ms
            );
            // The record before the act, as for any change.
            self.deps.audit.append(&AuditEvent {
                request_id: &request_id,
                method: "keyward.lifecycle/DisableUnattested",
                resource: Some(&resource),
                identity: Some(LIFECYCLE_IDENTITY),
                accessor: None,
                actor: None,
                source: None,
                outcome: Outcome::Allowed,
                code: "OK",
                error: Some(&reason),
                token: None,
                values: &[],
                call: None,
            })?;
            let (_, tokens, secret_ids) = self.deps.identities.set_disabled(
                &name,
                true,
                false,
                self.deps.tokens.as_ref(),
                now,
            )?;
            self.deps.barrier.durable().await?;
            tracing::warn!(
                identity = %status.identity,
                tokens,
                secret_ids,
                "identity disabled: not attested within its grace period"
            );
            disabled.push(status.identity);
        }
        Ok(disabled)
    }

    /// The recertifier: a pass every `every` (and at start) until `shutdown`.
    pub async fn run_recertifier(
        self,
        settings: RecertSettings,
        every: Duration,
        shutdown: Shutdown,
    ) {
        loop {
            if let Err(e) = self.enforce_attestation(&settings).await {
                tracing::warn!(error = %e, "recertification pass failed");
            }
            tokio::select! {
                _ = self.deps.clock.sleep(every) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

/// `keyward_identities_attestation_due` and `..._overdue`, set before a
/// scrape (at most every 30 s).
pub struct AttestGauges {
    lifecycle: Lifecycle,
    settings: RecertSettings,
    due: Gauge,
    overdue: Gauge,
    every: RefreshEvery,
}

impl AttestGauges {
    pub fn register(lifecycle: Lifecycle, settings: RecertSettings, metrics: &Metrics) {
        let due = Gauge::default();
        let overdue = Gauge::default();
        metrics.register(
            "identities_attestation_due",
            "Identities past their recertification date, within the grace period",
            due.clone(),
        );
        metrics.register(
            "identities_attestation_overdue",
            "Identities past their recertification date and its grace period",
            overdue.clone(),
        );
        metrics.on_scrape(Arc::new(Self {
            lifecycle,
            settings,
            due,
            overdue,
            every: RefreshEvery::new(Duration::from_secs(30)),
        }));
    }
}

impl Refresh for AttestGauges {
    fn refresh(&self, _metrics: &Metrics) {
        let now = self.lifecycle.deps.clock.now_ms();
        if !self.every.due(now) {
            return;
        }
        match self.lifecycle.attestations(&self.settings, now) {
            Ok(all) => {
                let count = |s: AttestState| all.iter().filter(|a| a.state == s).count() as i64;
                self.due.set(count(AttestState::Due));
                self.overdue.set(count(AttestState::Overdue));
            }
            Err(e) => {
                self.every.reset();
                tracing::debug!(error = %e, "attestation gauges not refreshed");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn due_and_overdue_count_from_the_last_attestation_or_creation() {
        let settings = RecertSettings {
            every: Duration::from_secs(10),
            grace: Duration::from_secs(5),
            disable_unattested: true,
        };
        let record = IdentityRecord {
            name: "svc".into(),
            created_at_ms: 1_000,
            ..Default::default()
        };
        assert_eq!(
            status_of(&record, None, &settings, 10_999).state,
            AttestState::Current
        );
        assert_eq!(
            status_of(&record, None, &settings, 11_000).state,
            AttestState::Due
        );
        assert_eq!(
            status_of(&record, None, &settings, 16_000).state,
            AttestState::Overdue
        );
        let last = Attestation {
            identity: "svc".into(),
            by: "owner".into(),
            at_ms: 12_000,
            note: String::new(),
        };
        let s = status_of(&record, Some(&last), &settings, 16_000);
        assert_eq!(s.state, AttestState::Current);
        assert_eq!(s.due_at_ms, 22_000);
        assert_eq!(s.attested_by, "owner");
        assert!(check_note("fine").is_ok());
        assert!(check_note("bad\nline").is_err());
        assert!(check_note(&"x".repeat(MAX_NOTE + 1)).is_err());
    }
}
