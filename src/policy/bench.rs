//! A micro-benchmark of [`PolicySet::check`] on a realistic 50-rule policy,
//! callable from the benchmark command (it prints `authz_ns`) and from tests.

use std::hint::black_box;
use std::time::Instant;

use super::capability::Capability;
use super::compile::PolicySet;
use super::document::{Policy, PolicyError};

/// Resource paths the benchmark checks, in turn: allowed, denied by a deny
/// rule, and matched by nothing.
pub(crate) const PATHS: &[&str] = &[
    "secret/team-3/app/config",
    "secret/team-7/app/db/primary",
    "secret/team-2/app/admin/root-password",
    "secret/team-42/app/config",
    "secret/platform/edge/shared/tls",
    "rotation/secret/team-1/app/db",
    "identity/ci-runner-4",
    "secret/team-19/app/db-admin",
    "sys/health",
    "secret/team-9/app/db/replica/2",
    "policy/payments-ro",
    "secret/a/b/c/d/e/f/g/h",
    "dynamic/postgres/creds/ro",
    "secret/team-12/other/thing",
    "secret/team-0/app/admin",
    "identity/ci-runner-12",
];

/// A 50-rule policy of the kind a platform team writes: per-team read grants,
/// deeper list grants, a few denies, rotation and identity grants, and a
/// `**` in the middle.
fn fifty_rule_policy() -> Result<Policy, PolicyError> {
    let mut rules: Vec<(String, &str)> = Vec::new();
    for i in 0..20 {
        rules.push((format!("secret/team-{i}/app/*"), r#""read""#));
    }
    for i in 0..10 {
        rules.push((format!("secret/team-{i}/app/db/**"), r#""read", "list""#));
    }
    for i in 0..5 {
        rules.push((format!("secret/team-{i}/app/admin/**"), r#""deny""#));
    }
    for i in 0..5 {
        rules.push((
            format!("rotation/secret/team-{i}/**"),
            r#""rotate", "read""#,
        ));
    }
    for i in 0..5 {
        rules.push((format!("identity/ci-runner-{i}"), r#""read""#));
    }
    for name in ["shared", "common", "public"] {
        rules.push((format!("secret/**/{name}/*"), r#""read""#));
    }
    rules.push(("sys/health".into(), r#""read""#));
    rules.push(("policy/*".into(), r#""read", "list""#));
    let text: String = rules
        .iter()
        .map(|(path, caps)| format!("[[rule]]\npath = \"{path}\"\ncapabilities = [{caps}]\n"))
        .collect();
    Policy::parse("bench", &text)
}

pub(crate) fn fifty_rule_set() -> Result<PolicySet, PolicyError> {
    PolicySet::compile([&fifty_rule_policy()?])
}

/// Nanoseconds per [`PolicySet::check`] against the 50-rule policy, over
/// `iterations` checks that cycle through realistic resource paths and
/// capabilities. The checks run in 5 rounds and the fastest round counts, so
/// other work on a shared machine inflates the figure less. Build with
/// optimisations for a meaningful figure.
pub fn bench_check_ns(iterations: u32) -> Result<f64, PolicyError> {
    const ROUNDS: u32 = 5;
    let set = fifty_rule_set()?;
    let caps = [
        Capability::Read,
        Capability::List,
        Capability::Read,
        Capability::Write,
        Capability::Rotate,
    ];
    let run = |n: u32| {
        let mut allowed = 0u32;
        for (path, cap) in PATHS
            .iter()
            .cycle()
            .zip(caps.iter().cycle())
            .take(n as usize)
        {
            allowed += u32::from(set.check(black_box(path), *cap).is_allowed());
        }
        black_box(allowed)
    };
    let per_round = (iterations / ROUNDS).max(1);
    run(per_round.min(10_000));
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        run(per_round);
        let ns = start.elapsed().as_nanos() as f64 / f64::from(per_round);
        best = best.min(ns);
    }
    Ok(best)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;
    use crate::policy::Decision;

    #[test]
    fn the_policy_has_fifty_rules_and_mixed_outcomes() {
        assert_eq!(fifty_rule_policy().unwrap().rules().len(), 50);
        let set = fifty_rule_set().unwrap();
        let allowed = PATHS
            .iter()
            .filter(|p| set.check(p, Capability::Read).is_allowed())
            .count();
        assert!(allowed > 3 && allowed < PATHS.len() - 3, "{allowed}");
        assert_eq!(
            set.check("secret/team-2/app/admin/root-password", Capability::Read),
            Decision::Denied
        );
        assert!(set
            .check("secret/platform/edge/shared/tls", Capability::Read)
            .is_allowed());
    }

    /// Prints the figure; timing is not asserted (the machine is shared).
    #[test]
    fn bench_reports_ns_per_check() {
        let ns = bench_check_ns(500_000).unwrap();
        assert!(ns.is_finite() && ns > 0.0);
        println!("authz_ns={ns:.1}");
    }
}
