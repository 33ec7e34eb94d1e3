//! The records of a rotation: a run ([`RunRecord`], with its steps) and a
//! retire waiting for its grace period ([`RetireRecord`]), with their typed
//! state ([`RunState`], [`Trigger`], [`RotationStep`], [`StepOutcome`]) and
//! their stored form.
//!
//! # Stored form
//!
//! A run is stored as a protobuf message (`StoredRun`) whose `format` field
//! says how to read it. The enums are stored by name, the same names the
//! wire (`keyward.v1.RotationRun`) and the CLI show, except the run's step,
//! stored as its number (tag 9).
//!
//! - format 0: written before the field existed (keyward 0.2); the same
//!   names, read the same way;
//! - format 1 ([`RUN_FORMAT`]): this code.
//!
//! A name or a step number this code does not know, or a format newer than
//! it, is a [`RecordError`], never a guess: a run is not resumed at a step
//! nobody recorded. No storage access here: the broker reads and writes the
//! bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use prost::Message;

use super::reads::Setter;

/// The format this code writes (see the module doc).
pub const RUN_FORMAT: u32 = 1;

/// A stored rotation record that cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a rotation record")]
    Malformed,
    #[error("rotation record format {0} is newer than this keyward reads")]
    NewerFormat(u32),
    #[error("unknown {what} `{value}` in a rotation record")]
    Unknown { what: &'static str, value: String },
}

/// Enums stored and shown by name: `as_str`, `FromStr` (strict), `Display`.
macro_rules! named {
    ($(#[$doc:meta])* $name:ident, $what:literal {
        $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The name stored, sent on the wire and printed.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = RecordError;

            fn from_str(text: &str) -> Result<Self, RecordError> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    other => Err(RecordError::Unknown {
                        what: $what,
                        value: other.to_owned(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named!(
    /// Where a run is: running until it finishes, one way or the other.
    RunState, "run state" {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
    }
);

named!(
    /// What started a run.
    Trigger, "trigger" {
        Schedule = "schedule",
        Manual = "manual",
    }
);

named!(
    /// How one step went.
    StepOutcome, "step outcome" {
        Ok = "ok",
        Failed = "failed",
        /// Nothing to do (a rollback with no current value to restore).
        Skipped = "skipped",
    }
);

/// The steps of a run (and the retire after it). Stored by number in the
/// run (the resume point) and by name in each [`StepRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RotationStep {
    Generate = 0,
    Apply = 1,
    Verify = 2,
    Promote = 3,
    Rollback = 4,
    Retire = 5,
}

impl RotationStep {
    const ALL: [RotationStep; 6] = [
        Self::Generate,
        Self::Apply,
        Self::Verify,
        Self::Promote,
        Self::Rollback,
        Self::Retire,
    ];

    /// The name stored, sent on the wire, audited and counted.
    pub fn name(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Apply => "apply",
            Self::Verify => "verify",
            Self::Promote => "promote",
            Self::Rollback => "rollback",
            Self::Retire => "retire",
        }
    }

    fn from_number(n: i32) -> Result<Self, RecordError> {
        Self::ALL
            .into_iter()
            .find(|s| *s as i32 == n)
            .ok_or_else(|| RecordError::Unknown {
                what: "step number",
                value: n.to_string(),
            })
    }
}

impl FromStr for RotationStep {
    type Err = RecordError;

    fn from_str(text: &str) -> Result<Self, RecordError> {
        Self::ALL
            .into_iter()
            .find(|s| s.name() == text)
            .ok_or_else(|| RecordError::Unknown {
                what: "step",
                value: text.to_owned(),
            })
    }
}

impl fmt::Display for RotationStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One step as it happened.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: RotationStep,
    pub attempt: u32,
    pub outcome: StepOutcome,
    pub version: u64,
    /// Why it failed or was skipped; never a secret value.
    pub message: String,
    pub at_ms: u64,
}

/// A run: its resume point while it runs (`rotation/run/<path>`), its
/// record once finished (`rotation/history/...`). It holds a copy of the
/// policy it started with, so a policy change does not alter a run midway.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    pub run_id: String,
    pub path: String,
    pub provider: String,
    pub settings: BTreeMap<String, String>,
    pub grace_seconds: u64,
    pub trigger: Trigger,
    /// The due time a scheduled run was started for (0 for a manual run).
    pub due_ms: u64,
    pub started_ms: u64,
    /// The step to run next.
    pub step: RotationStep,
    /// From 1.
    pub attempt: u32,
    pub pending_version: u64,
    /// The next attempt does not start before this (back-off).
    pub not_before_ms: u64,
    pub state: RunState,
    pub steps: Vec<StepRecord>,
    pub finished_ms: u64,
    /// The current version after the run.
    pub version: u64,
    pub last_error: String,
    /// Who set the policy the run started from: the broker reads the
    /// policy's secret reference only while this setter may.
    pub setter: Setter,
}

impl RunRecord {
    /// A run about to generate its first value.
    pub fn start(
        run_id: String,
        policy: &super::policy::PolicyRecord,
        trigger: Trigger,
        due_ms: u64,
        now_ms: u64,
    ) -> Self {
        Self {
            run_id,
            path: policy.path.clone(),
            provider: policy.provider.clone(),
            settings: policy.settings.clone(),
            grace_seconds: policy.grace_seconds,
            trigger,
            due_ms,
            started_ms: now_ms,
            step: RotationStep::Generate,
            attempt: 1,
            pending_version: 0,
            not_before_ms: 0,
            state: RunState::Running,
            steps: Vec::new(),
            finished_ms: 0,
            version: 0,
            last_error: String::new(),
            setter: policy.setter(),
        }
    }

    /// Appends a step of the current attempt; returns it.
    pub fn record(
        &mut self,
        step: RotationStep,
        outcome: StepOutcome,
        version: u64,
        message: String,
        at_ms: u64,
    ) -> StepRecord {
        let r = StepRecord {
            step,
            attempt: self.attempt,
            outcome,
            version,
            message,
            at_ms,
        };
        self.steps.push(r.clone());
        r
    }

    /// The stored form, in format [`RUN_FORMAT`].
    pub fn encode(&self) -> Vec<u8> {
        StoredRun {
            format: RUN_FORMAT,
            run_id: self.run_id.clone(),
            path: self.path.clone(),
            provider: self.provider.clone(),
            settings: self.settings.clone(),
            grace_seconds: self.grace_seconds,
            trigger: self.trigger.as_str().to_owned(),
            due_ms: self.due_ms,
            started_ms: self.started_ms,
            step: self.step as i32,
            attempt: self.attempt,
            pending_version: self.pending_version,
            not_before_ms: self.not_before_ms,
            state: self.state.as_str().to_owned(),
            steps: self.steps.iter().map(StoredStep::from).collect(),
            finished_ms: self.finished_ms,
            version: self.version,
            last_error: self.last_error.clone(),
            set_by: self.setter.identity.clone(),
            set_by_policies: self.setter.policies.clone(),
            set_by_accessor: self.setter.accessor.clone(),
        }
        .encode_to_vec()
    }

    /// Reads a stored run of any format this code knows.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let stored = StoredRun::decode(bytes).map_err(|_| RecordError::Malformed)?;
        if stored.format > RUN_FORMAT {
            return Err(RecordError::NewerFormat(stored.format));
        }
        // Formats 0 and 1 store the same names.
        Ok(Self {
            trigger: stored.trigger.parse()?,
            step: RotationStep::from_number(stored.step)?,
            state: stored.state.parse()?,
            steps: stored
                .steps
                .into_iter()
                .map(StepRecord::try_from)
                .collect::<Result<_, _>>()?,
            run_id: stored.run_id,
            path: stored.path,
            provider: stored.provider,
            settings: stored.settings,
            grace_seconds: stored.grace_seconds,
            due_ms: stored.due_ms,
            started_ms: stored.started_ms,
            attempt: stored.attempt,
            pending_version: stored.pending_version,
            not_before_ms: stored.not_before_ms,
            finished_ms: stored.finished_ms,
            version: stored.version,
            last_error: stored.last_error,
            setter: Setter::new(stored.set_by, stored.set_by_policies)
                .with_accessor(stored.set_by_accessor),
        })
    }
}

/// A retire waiting for its grace period (`rotation/retire/<ms>/<path>`).
/// Its fields are all plain values: it is stored as it is.
#[derive(Clone, PartialEq, Message)]
pub struct RetireRecord {
    #[prost(string, tag = "1")]
    pub run_id: String,
    #[prost(string, tag = "2")]
    pub path: String,
    #[prost(string, tag = "3")]
    pub provider: String,
    #[prost(btree_map = "string, string", tag = "4")]
    pub settings: BTreeMap<String, String>,
    #[prost(uint64, tag = "5")]
    pub previous_version: u64,
    #[prost(uint64, tag = "6")]
    pub retire_at_ms: u64,
    /// Who set the policy of the run (see [`RunRecord::setter`]); "" in
    /// records written before it was recorded.
    #[prost(string, tag = "7")]
    pub set_by: String,
    #[prost(string, repeated, tag = "8")]
    pub set_by_policies: Vec<String>,
    /// The setting token's accessor, if the policy records one.
    #[prost(string, tag = "9")]
    pub set_by_accessor: String,
}

impl RetireRecord {
    /// Who set the policy of the run.
    pub fn setter(&self) -> Setter {
        Setter::new(self.set_by.clone(), self.set_by_policies.clone())
            .with_accessor(self.set_by_accessor.clone())
    }
}

// ---------------------------------------------------------------- stored form

/// [`StepRecord`] as stored (tags of format 0, kept).
#[derive(Clone, PartialEq, Message)]
struct StoredStep {
    #[prost(string, tag = "1")]
    step: String,
    #[prost(uint32, tag = "2")]
    attempt: u32,
    #[prost(string, tag = "3")]
    outcome: String,
    #[prost(uint64, tag = "4")]
    version: u64,
    #[prost(string, tag = "5")]
    message: String,
    #[prost(uint64, tag = "6")]
    at_ms: u64,
}

impl From<&StepRecord> for StoredStep {
    fn from(s: &StepRecord) -> Self {
        Self {
            step: s.step.name().to_owned(),
            attempt: s.attempt,
            outcome: s.outcome.as_str().to_owned(),
            version: s.version,
            message: s.message.clone(),
            at_ms: s.at_ms,
        }
    }
}

impl TryFrom<StoredStep> for StepRecord {
    type Error = RecordError;

    fn try_from(s: StoredStep) -> Result<Self, RecordError> {
        Ok(Self {
            step: s.step.parse()?,
            attempt: s.attempt,
            outcome: s.outcome.parse()?,
            version: s.version,
            message: s.message,
            at_ms: s.at_ms,
        })
    }
}

/// [`RunRecord`] as stored (tags 1-17 of format 0, kept; 18-20 are new).
#[derive(Clone, PartialEq, Message)]
struct StoredRun {
    #[prost(string, tag = "1")]
    run_id: String,
    #[prost(string, tag = "2")]
    path: String,
    #[prost(string, tag = "3")]
    provider: String,
    #[prost(btree_map = "string, string", tag = "4")]
    settings: BTreeMap<String, String>,
    #[prost(uint64, tag = "5")]
    grace_seconds: u64,
    #[prost(string, tag = "6")]
    trigger: String,
    #[prost(uint64, tag = "7")]
    due_ms: u64,
    #[prost(uint64, tag = "8")]
    started_ms: u64,
    #[prost(int32, tag = "9")]
    step: i32,
    #[prost(uint32, tag = "10")]
    attempt: u32,
    #[prost(uint64, tag = "11")]
    pending_version: u64,
    #[prost(uint64, tag = "12")]
    not_before_ms: u64,
    #[prost(string, tag = "13")]
    state: String,
    #[prost(message, repeated, tag = "14")]
    steps: Vec<StoredStep>,
    #[prost(uint64, tag = "15")]
    finished_ms: u64,
    #[prost(uint64, tag = "16")]
    version: u64,
    #[prost(string, tag = "17")]
    last_error: String,
    /// 0 when absent: written before the field existed.
    #[prost(uint32, tag = "18")]
    format: u32,
    /// "" and empty in records written before the setter was recorded
    /// (any format: an absent field reads as empty).
    #[prost(string, tag = "19")]
    set_by: String,
    #[prost(string, repeated, tag = "20")]
    set_by_policies: Vec<String>,
    /// The setting token's accessor, if the policy records one.
    #[prost(string, tag = "21")]
    set_by_accessor: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn run() -> RunRecord {
        let policy = super::super::policy::PolicyRecord {
            path: "app/db".into(),
            provider: "random".into(),
            set_by: "svc".into(),
            set_by_policies: vec!["app".into()],
            ..Default::default()
        };
        let mut run = RunRecord::start("r1".into(), &policy, Trigger::Manual, 0, 5);
        run.record(RotationStep::Generate, StepOutcome::Ok, 2, String::new(), 6);
        run.step = RotationStep::Verify;
        run
    }

    /// A record as keyward 0.2 wrote it: no format field.
    fn legacy(state: &str, step: i32, step_name: &str, outcome: &str) -> Vec<u8> {
        StoredRun {
            run_id: "old".into(),
            path: "app/db".into(),
            provider: "random".into(),
            trigger: "schedule".into(),
            step,
            attempt: 2,
            state: state.into(),
            steps: vec![StoredStep {
                step: step_name.into(),
                attempt: 1,
                outcome: outcome.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn a_run_round_trips() {
        let run = run();
        assert_eq!(RunRecord::decode(&run.encode()), Ok(run));
    }

    #[test]
    fn records_without_a_format_still_load() {
        let old = RunRecord::decode(&legacy("failed", 4, "apply", "skipped")).unwrap();
        assert_eq!(old.state, RunState::Failed);
        assert!(!old.setter.is_known(), "an old record names no setter");
        assert_eq!(old.trigger, Trigger::Schedule);
        assert_eq!(old.step, RotationStep::Rollback);
        assert_eq!(
            (old.steps[0].step, old.steps[0].outcome),
            (RotationStep::Apply, StepOutcome::Skipped)
        );
        // Written again, it is format 1 and reads back the same.
        assert_eq!(RunRecord::decode(&old.encode()), Ok(old));
    }

    #[test]
    fn unknown_values_are_errors_not_guesses() {
        let unknown = |bytes: Vec<u8>, what: &str| match RunRecord::decode(&bytes) {
            Err(RecordError::Unknown { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        };
        unknown(legacy("paused", 0, "apply", "ok"), "run state");
        unknown(legacy("running", 9, "apply", "ok"), "step number");
        unknown(legacy("running", 0, "reboot", "ok"), "step");
        unknown(legacy("running", 0, "apply", "maybe"), "step outcome");
        let mut newer = StoredRun::decode(run().encode().as_slice()).unwrap();
        newer.format = RUN_FORMAT + 1;
        assert_eq!(
            RunRecord::decode(&newer.encode_to_vec()),
            Err(RecordError::NewerFormat(RUN_FORMAT + 1))
        );
        assert_eq!(RunRecord::decode(b"\xff\xff"), Err(RecordError::Malformed));
    }

    #[test]
    fn names_are_the_wire_names() {
        let names: Vec<&str> = RotationStep::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            ["generate", "apply", "verify", "promote", "rollback", "retire"]
        );
        for s in RotationStep::ALL {
            assert_eq!(s.name().parse(), Ok(s));
            assert_eq!(RotationStep::from_number(s as i32), Ok(s));
        }
        for s in [RunState::Running, RunState::Succeeded, RunState::Failed] {
            assert_eq!(s.as_str().parse(), Ok(s));
        }
        assert_eq!(Trigger::Manual.to_string(), "manual");
        assert_eq!(StepOutcome::Skipped.as_str(), "skipped");
    }
}
