//! Least-privilege suggestions: a policy made of what an identity used.
//!
//! Inputs: the read set (`read` on each secret path it read, since a time)
//! and the usage record's exercised rules. Reads are exact; for everything
//! else only the rule that granted it is recorded (not the path nor the
//! capability). So an exercised rule on `secret/` that grants more than
//! `read` is not put in the policy (its reads are already there, path by
//! path; whether it listed or wrote is unknown): it is listed under
//! `review`, for a person to add back what the identity needs. An
//! exercised rule on another root (`identity/`, `rotation/`, `sys/`, ...),
//! where no per-path record exists, is kept as written, and said so.
//! Where an identity read [`GENERALISE_AT`] or more paths directly under one
//! folder, those become one `folder/*` rule, and the output names each such
//! generalisation. Rules never exercised are left out: the diff shows them
//! removed.

use std::collections::{BTreeMap, BTreeSet};

use super::{Lifecycle, LifecycleError};
use crate::identity::{IdentityError, IdentityName};
use crate::policy::{Capability, Policy};

/// Sibling reads under one folder from which they become `folder/*`.
pub const GENERALISE_AT: usize = 8;

/// One suggested rule and why it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuggestedRule {
    pub path: String,
    pub capabilities: Vec<Capability>,
    pub why: String,
}

/// A generalisation: `rule` stands for `paths` read under one folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generalised {
    pub rule: String,
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Suggestion {
    pub rules: Vec<SuggestedRule>,
    pub generalised: Vec<Generalised>,
    /// Rules of the held policies that the suggestion does not keep, as
    /// `policy: path [caps]`.
    pub removed: Vec<String>,
    /// Suggested rules that no held policy has as such, as `path [caps]`.
    pub added: Vec<String>,
    /// Exercised `secret/` rules granting more than `read`, left out of the
    /// policy (only reads are recorded per path), as `policy: path [caps]`.
    pub review: Vec<String>,
}

impl Suggestion {
    /// The suggestion as a policy file ([`Policy::parse`] reads it).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&format!(
                "# {}\n[[rule]]\npath = {:?}\ncapabilities = [",
                rule.why, rule.path
            ));
            let caps: Vec<String> = rule
                .capabilities
                .iter()
                .map(|c| format!("{:?}", c.as_str()))
                .collect();
            out.push_str(&caps.join(", "));
            out.push_str("]\n");
        }
        out
    }
}

fn rule_text(path: &str, caps: &[Capability]) -> String {
    let words: Vec<&str> = caps.iter().map(|c| c.as_str()).collect();
    format!("{path} [{}]", words.join(", "))
}

/// Builds the suggestion from the secret paths read (`read_paths`), the
/// exercised `(policy, rule path)` pairs, and the policies the identity
/// holds.
pub fn suggest(
    read_paths: &[String],
    exercised: &[(String, String)],
    held: &[Policy],
) -> Suggestion {
    let mut s = Suggestion::default();
    // Reads, grouped by parent folder.
    let mut by_parent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in read_paths {
        let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        by_parent
            .entry(parent.to_owned())
            .or_default()
            .push(path.clone());
    }
    for (parent, mut paths) in by_parent {
        paths.sort();
        if paths.len() >= GENERALISE_AT {
            let rule = if parent.is_empty() {
                "secret/*".to_owned()
            } else {
                format!("secret/{parent}/*")
            };
            s.rules.push(SuggestedRule {
                path: rule.clone(),
                capabilities: vec![Capability::Read],
                why: format!(
                    "generalised: read {} secrets directly under this folder",
                    paths.len()
                ),
            });
            s.generalised.push(Generalised { rule, paths });
        } else {
            for path in paths {
                s.rules.push(SuggestedRule {
                    path: format!("secret/{path}"),
                    capabilities: vec![Capability::Read],
                    why: "read".to_owned(),
                });
            }
        }
    }
    // Exercised rules that grant more than read.
    let used: BTreeSet<(&str, &str)> = exercised
        .iter()
        .map(|(p, r)| (p.as_str(), r.as_str()))
        .collect();
    for policy in held {
        for rule in policy.rules() {
            if rule.is_deny() || !used.contains(&(policy.name(), rule.path())) {
                continue;
            }
            let on_secrets = rule.path().starts_with("secret/") || rule.path() == "secret";
            let caps: Vec<Capability> = rule
                .capabilities()
                .iter()
                .filter(|c| !(on_secrets && *c == Capability::Read))
                .collect();
            if caps.is_empty() {
                continue;
            }
            if on_secrets {
                s.review.push(format!(
                    "{}: {}",
                    policy.name(),
                    rule_text(rule.path(), &rule.capabilities().iter().collect::<Vec<_>>())
                ));
                continue;
            }
            s.rules.push(SuggestedRule {
                path: rule.path().to_owned(),
                capabilities: caps,
                why: format!(
                    "kept from policy {}: exercised; uses outside secret/ are recorded by rule only",
                    policy.name()
                ),
            });
        }
    }
    // Deny rules of held policies stay: they only narrow.
    for policy in held {
        for rule in policy.rules().iter().filter(|r| r.is_deny()) {
            if s.rules
                .iter()
                .any(|r| r.path == rule.path() && r.capabilities == [Capability::Deny])
            {
                continue;
            }
            s.rules.push(SuggestedRule {
                path: rule.path().to_owned(),
                capabilities: vec![Capability::Deny],
                why: format!("kept from policy {}: a deny only narrows", policy.name()),
            });
        }
    }
    let held_rules: BTreeSet<String> = held
        .iter()
        .flat_map(|p| p.rules())
        .map(|r| rule_text(r.path(), &r.capabilities().iter().collect::<Vec<_>>()))
        .collect();
    let suggested: BTreeSet<String> = s
        .rules
        .iter()
        .map(|r| rule_text(&r.path, &r.capabilities))
        .collect();
    for policy in held {
        for rule in policy.rules() {
            let text = rule_text(rule.path(), &rule.capabilities().iter().collect::<Vec<_>>());
            if !suggested.contains(&text) {
                s.removed.push(format!("{}: {text}", policy.name()));
            }
        }
    }
    s.added = suggested
        .into_iter()
        .filter(|t| !held_rules.contains(t))
        .collect();
    s
}

impl Lifecycle {
    /// The suggestion for `name` from its reads since `since_ms` and its
    /// `exercised` rules (from the usage record, which `core` holds).
    pub fn suggestion(
        &self,
        name: &IdentityName,
        since_ms: u64,
        exercised: &[(String, String)],
    ) -> Result<Suggestion, LifecycleError> {
        let record = self
            .deps
            .identities
            .get(name.as_str())?
            .ok_or(IdentityError::NotFound)?;
        let reads: Vec<String> = self
            .deps
            .reads
            .of(name.as_str())?
            .paths
            .into_iter()
            .filter(|(_, _, last)| *last >= since_ms)
            .map(|(p, _, _)| p)
            .collect();
        let mut held = Vec::new();
        for policy in &record.policies {
            if let Some(p) = self.deps.policies.get(policy)? {
                held.push(p);
            }
        }
        Ok(suggest(&reads, exercised, &held))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn reads_become_rules_many_siblings_generalise_and_the_diff_names_both_sides() {
        let held = Policy::parse(
            "wide",
            "[[rule]]\npath = \"secret/app/**\"\ncapabilities = [\"read\", \"list\"]\n\
             [[rule]]\npath = \"secret/app/admin/*\"\ncapabilities = [\"deny\"]\n",
        )
        .unwrap();
        let mut reads = vec!["app/db".to_owned()];
        for i in 0..GENERALISE_AT {
            reads.push(format!("app/shards/s{i}"));
        }
        let s = suggest(&reads, &[], std::slice::from_ref(&held));
        let paths: Vec<&str> = s.rules.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            ["secret/app/db", "secret/app/shards/*", "secret/app/admin/*"]
        );
        assert_eq!(s.generalised.len(), 1);
        assert_eq!(s.generalised[0].paths.len(), GENERALISE_AT);
        assert!(s.rules[1].why.contains("generalised"));
        assert_eq!(s.removed, ["wide: secret/app/** [read, list]"]);
        assert!(s.added.contains(&"secret/app/db [read]".to_owned()));
        // The suggestion is a policy file keyward reads back.
        let back = Policy::parse("narrow", &s.to_toml()).unwrap();
        assert_eq!(back.rules().len(), 3);
        // An exercised secret rule granting more than read goes to review,
        // not into the policy; one on another root is kept as written.
        let ops = Policy::parse(
            "ops",
            "[[rule]]\npath = \"rotation/app/*\"\ncapabilities = [\"read\", \"rotate\"]\n",
        )
        .unwrap();
        let s = suggest(
            &[],
            &[
                ("wide".into(), "secret/app/**".into()),
                ("ops".into(), "rotation/app/*".into()),
            ],
            &[held, ops],
        );
        assert_eq!(s.review, ["wide: secret/app/** [read, list]"]);
        assert_eq!(s.rules[0].path, "rotation/app/*");
        assert_eq!(
            s.rules[0].capabilities,
            [Capability::Read, Capability::Rotate]
        );
    }
}
