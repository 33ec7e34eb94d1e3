//! Policies: named lists of `{path glob, capabilities}` rules over resource
//! paths, compiled once and checked on every request without allocating.
//!
//! Pure: no storage prefix, no network, no clock. Storing policies and
//! attaching them to tokens belong to the layers that use this module; it must
//! not touch storage or know about tokens.
//!
//! - [`Policy`]: parsed from the TOML of INTERFACE.md and written back to it.
//! - [`CompiledPolicy`], [`PolicySet`]: the request-path form.
//! - [`Authorized`]: the proof a check mints and a domain write requires.
//! - [`bench_check_ns`]: the `authz_ns` benchmark figure.
//!
//! # Matching
//!
//! A rule path matches a resource path segment by segment. A literal matches
//! that exact segment only, so `secret/app/db` and `secret/app/db/*` never match
//! `secret/app/db-admin`; `*` matches exactly one segment; `**` matches zero or
//! more, anywhere and any number of times (`secret/**/db/**` matches
//! `secret/db`). A resource with an empty, `.` or `..` segment, or outside the
//! six resource roots, matches nothing and is denied.
//!
//! # Decisions
//!
//! The capabilities of every matching rule of every policy in the set are
//! unioned; a matching rule holding `deny` refuses every capability on that
//! resource, whatever the others grant (explicit deny wins). When several rules
//! grant, the decision names the first one (policies in the order given, rules
//! in file order), for usage recording. Asking for `deny` itself is denied.
//!
//! The built-in `root` policy is ordinary rules: `ROOT/**` with every
//! capability but `deny`, for each of the six roots. A deny in another policy
//! of the same set still wins over it; a root token holds `root` alone.
//!
//! # Listing
//!
//! Listing is checked on the prefix being listed: `secret list secret/app` asks
//! `check("secret/app", List)`. So a rule must match the prefix itself:
//! `secret/app/**` (since `**` matches zero segments) or `secret/app` allow it;
//! `secret/app/*` does not (it allows listing below `secret/app/x`). The
//! answer then names only the paths the caller could `list` or `read` one by
//! one (`api/secrets.rs`): a deny on `secret/app/admin/**` hides the names
//! below `secret/app/admin` as well as their values.

mod authorized;
mod bench;
mod capability;
mod compile;
mod document;

pub use authorized::Authorized;
pub use bench::bench_check_ns;
pub use capability::{Capability, CapabilitySet, UnknownCapability};
pub use compile::{CompiledPolicy, Decision, PolicySet};
pub use document::{
    validate_name, Policy, PolicyError, ResourceRoot, Rule, RuleProblem, MAX_PATH_BYTES,
    MAX_PATH_SEGMENTS, MAX_POLICY_BYTES, MAX_RULES, ROOT_POLICY,
};
