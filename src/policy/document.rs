//! A policy as its author wrote it: a name and a list of rules, parsed from the
//! TOML of INTERFACE.md and written back to it for `policy get`.

use std::fmt::Write as _;

use serde::Deserialize;

use super::capability::{Capability, CapabilitySet, UnknownCapability};

/// The name of the built-in policy that allows everything; users cannot put it.
pub const ROOT_POLICY: &str = "root";
/// At most this many `[[rule]]` tables in one policy.
pub const MAX_RULES: usize = 1000;
/// At most this many bytes of policy text.
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// At most this many bytes in one rule path.
pub const MAX_PATH_BYTES: usize = 1024;
/// At most this many segments in one rule path (root included).
pub const MAX_PATH_SEGMENTS: usize = 64;

/// Why a policy was refused. Policy text is not secret, so messages may quote it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy name must match [a-z0-9][a-z0-9_-]{{0,63}}")]
    InvalidName,
    #[error("the policy name \"root\" is reserved for the built-in root policy")]
    ReservedName,
    #[error("policy text is {len} bytes; at most {MAX_POLICY_BYTES} are accepted")]
    TooLarge { len: usize },
    #[error(
        "policy is not valid TOML of the form [[rule]] path = \"...\" capabilities = [...]: {0}"
    )]
    Syntax(String),
    #[error("policy has {count} rules; at most {MAX_RULES} are accepted")]
    TooManyRules { count: usize },
    /// `index` counts `[[rule]]` tables from 1, in the order of the file.
    #[error("rule {index}: {problem}")]
    Rule { index: usize, problem: RuleProblem },
    #[error("a token holds at most {max} policies")]
    TooManyPolicies { max: usize },
}

/// What is wrong with one rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    UnknownCapability(#[from] UnknownCapability),
    #[error("capabilities is empty; name at least one")]
    EmptyCapabilities,
    #[error("deny cannot be combined with other capabilities: it refuses them all")]
    DenyWithGrants,
    #[error("path must start with one of the resource roots secret/, rotation/, identity/, policy/, dynamic/, sys/, pki/")]
    UnknownRoot,
    #[error("path has an empty segment (a leading, trailing or doubled '/')")]
    EmptySegment,
    #[error("path segment {segment} mixes '*' with other characters; '*' and '**' must be a whole segment")]
    PartialGlob { segment: usize },
    #[error("path segment {segment} has a character outside [A-Za-z0-9._-]")]
    BadCharacter { segment: usize },
    #[error("path segment {segment} is '.' or '..'")]
    DotSegment { segment: usize },
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
    #[error("path has more than {MAX_PATH_SEGMENTS} segments")]
    TooManySegments,
}

/// The first segment of every resource path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceRoot {
    Secret = 0,
    Rotation = 1,
    Identity = 2,
    Policy = 3,
    Dynamic = 4,
    Sys = 5,
    Pki = 6,
}

impl ResourceRoot {
    pub const COUNT: usize = 7;
    pub const ALL: [ResourceRoot; Self::COUNT] = [
        ResourceRoot::Secret,
        ResourceRoot::Rotation,
        ResourceRoot::Identity,
        ResourceRoot::Policy,
        ResourceRoot::Dynamic,
        ResourceRoot::Sys,
        ResourceRoot::Pki,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ResourceRoot::Secret => "secret",
            ResourceRoot::Rotation => "rotation",
            ResourceRoot::Identity => "identity",
            ResourceRoot::Policy => "policy",
            ResourceRoot::Dynamic => "dynamic",
            ResourceRoot::Sys => "sys",
            ResourceRoot::Pki => "pki",
        }
    }

    /// The root named by one path segment, if it is one.
    pub fn from_segment(segment: &str) -> Option<Self> {
        match segment {
            "secret" => Some(ResourceRoot::Secret),
            "rotation" => Some(ResourceRoot::Rotation),
            "identity" => Some(ResourceRoot::Identity),
            "policy" => Some(ResourceRoot::Policy),
            "dynamic" => Some(ResourceRoot::Dynamic),
            "sys" => Some(ResourceRoot::Sys),
            "pki" => Some(ResourceRoot::Pki),
            _ => None,
        }
    }
}

/// One segment of a rule path after its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum GlobSegment {
    /// Matches exactly this segment, nothing longer or shorter.
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: zero or more segments.
    Any,
}

/// A validated rule path: a resource root, then literal or glob segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PathGlob {
    pub(crate) text: String,
    pub(crate) root: ResourceRoot,
    pub(crate) segments: Vec<GlobSegment>,
}

impl PathGlob {
    pub(crate) fn parse(text: &str) -> Result<Self, RuleProblem> {
        if text.len() > MAX_PATH_BYTES {
            return Err(RuleProblem::PathTooLong);
        }
        let mut parts = text.split('/');
        let root = parts
            .next()
            .and_then(ResourceRoot::from_segment)
            .ok_or(RuleProblem::UnknownRoot)?;
        if text.as_bytes().get(root.as_str().len()) != Some(&b'/') {
            return Err(RuleProblem::UnknownRoot);
        }
        let mut segments = Vec::new();
        for (i, part) in parts.enumerate() {
            // Segments are counted from 1 and the root is segment 1.
            let segment = i + 2;
            if segment > MAX_PATH_SEGMENTS {
                return Err(RuleProblem::TooManySegments);
            }
            segments.push(parse_segment(part, segment)?);
        }
        Ok(Self {
            text: text.to_owned(),
            root,
            segments,
        })
    }

    /// `ROOT/**`: every resource under one root, and the root itself.
    fn everything_under(root: ResourceRoot) -> Self {
        Self {
            text: format!("{}/**", root.as_str()),
            root,
            segments: vec![GlobSegment::Any],
        }
    }
}

fn parse_segment(part: &str, segment: usize) -> Result<GlobSegment, RuleProblem> {
    match part {
        "" => Err(RuleProblem::EmptySegment),
        "*" => Ok(GlobSegment::One),
        "**" => Ok(GlobSegment::Any),
        "." | ".." => Err(RuleProblem::DotSegment { segment }),
        _ if part.contains('*') => Err(RuleProblem::PartialGlob { segment }),
        _ if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
        {
            Err(RuleProblem::BadCharacter { segment })
        }
        _ => Ok(GlobSegment::Literal(part.to_owned())),
    }
}

/// One rule: the resources its path matches and what it grants (or denies) there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub(crate) path: PathGlob,
    pub(crate) capabilities: CapabilitySet,
    /// `delegated = false`: the rule grants nothing to a delegated token (a
    /// deny rule refuses every token whatever this says).
    pub(crate) delegated: bool,
}

impl Rule {
    /// The path as written, e.g. `secret/app/*/db`.
    pub fn path(&self) -> &str {
        &self.path.text
    }

    pub fn capabilities(&self) -> CapabilitySet {
        self.capabilities
    }

    pub fn is_deny(&self) -> bool {
        self.capabilities.contains(Capability::Deny)
    }

    /// Whether the rule's grants reach a delegated token (`delegated`,
    /// default true).
    pub fn grants_delegated(&self) -> bool {
        self.delegated
    }
}

/// A named, validated policy. Build one with [`Policy::parse`] or [`Policy::root`];
/// evaluate it through [`super::CompiledPolicy`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rule: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    path: String,
    capabilities: Vec<String>,
    #[serde(default)]
    delegated: Option<bool>,
}

/// Refuses a name that users may not give a policy: anything outside
/// `[a-z0-9][a-z0-9_-]{0,63}`, and `root`.
pub fn validate_name(name: &str) -> Result<(), PolicyError> {
    let bytes = name.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if !first_ok || !rest_ok || bytes.len() > 64 {
        return Err(PolicyError::InvalidName);
    }
    if name == ROOT_POLICY {
        return Err(PolicyError::ReservedName);
    }
    Ok(())
}

impl Policy {
    /// Parses a user's policy. Every rule is checked; the first broken one is
    /// named by its position (from 1) and the rule it breaks.
    pub fn parse(name: &str, toml_text: &str) -> Result<Policy, PolicyError> {
        validate_name(name)?;
        if toml_text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge {
                len: toml_text.len(),
            });
        }
        let file: PolicyFile = toml::from_str(toml_text).map_err(|err| {
            let line = err.span().map(|span| {
                let before = toml_text.as_bytes().get(..span.start).unwrap_or_default();
                1 + before.iter().filter(|b| **b == b'\n').count()
            });
            PolicyError::Syntax(match line {
                Some(line) => format!("line {line}: {}", err.message().trim_end()),
                None => err.message().trim_end().to_owned(),
            })
        })?;
        if file.rule.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules {
                count: file.rule.len(),
            });
        }
        let rules = file
            .rule
            .into_iter()
            .enumerate()
            .map(|(i, table)| {
                parse_rule(table).map_err(|problem| PolicyError::Rule {
                    index: i + 1,
                    problem,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            name: name.to_owned(),
            rules,
        })
    }

    /// The built-in `root` policy: every capability but `deny` on `ROOT/**`
    /// for each resource root, i.e. on every resource there is.
    pub fn root() -> Policy {
        Policy {
            name: ROOT_POLICY.to_owned(),
            rules: ResourceRoot::ALL
                .into_iter()
                .map(|root| Rule {
                    path: PathGlob::everything_under(root),
                    capabilities: CapabilitySet::ALL_GRANTS,
                    delegated: true,
                })
                .collect(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_root(&self) -> bool {
        self.name == ROOT_POLICY
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The policy as TOML that [`Policy::parse`] reads back to an equal policy.
    /// Capabilities come out in canonical order, one blank line between rules.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            // Paths hold only [A-Za-z0-9._*/-] and capabilities are fixed
            // words, so nothing needs escaping.
            let caps: Vec<String> = rule
                .capabilities
                .iter()
                .map(|cap| format!("\"{}\"", cap.as_str()))
                .collect();
            let _ = write!(
                out,
                "[[rule]]\npath = \"{}\"\ncapabilities = [{}]\n",
                rule.path.text,
                caps.join(", ")
            );
            if !rule.delegated {
                out.push_str("delegated = false\n");
            }
        }
        out
    }
}

fn parse_rule(table: toml::Table) -> Result<Rule, RuleProblem> {
    let file: RuleFile = table.try_into().map_err(|err: toml::de::Error| {
        RuleProblem::Malformed(err.message().trim_end().to_owned())
    })?;
    let path = PathGlob::parse(&file.path)?;
    let mut capabilities = CapabilitySet::new();
    for word in &file.capabilities {
        capabilities.insert(word.parse::<Capability>()?);
    }
    if capabilities.is_empty() {
        return Err(RuleProblem::EmptyCapabilities);
    }
    if capabilities.contains(Capability::Deny) && capabilities.len() > 1 {
        return Err(RuleProblem::DenyWithGrants);
    }
    Ok(Rule {
        path,
        capabilities,
        delegated: file.delegated.unwrap_or(true),
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]
mod tests {
    use super::*;

    fn rule_error(toml_text: &str) -> (usize, RuleProblem) {
        match Policy::parse("p", toml_text) {
            Err(PolicyError::Rule { index, problem }) => (index, problem),
            other => panic!("expected a rule error, got {other:?}"),
        }
    }

    fn path_error(path: &str) -> RuleProblem {
        let text = format!("[[rule]]\npath = \"secret/ok\"\ncapabilities = [\"read\"]\n[[rule]]\npath = \"{path}\"\ncapabilities = [\"read\"]\n");
        let (index, problem) = rule_error(&text);
        assert_eq!(index, 2, "{path}");
        problem
    }

    const EXAMPLE: &str = r#"
[[rule]]
path = "secret/app/payments/**"     # '*' one segment, '**' any number of segments
capabilities = ["read", "list"]
[[rule]]
path = "secret/app/payments/admin/*"
capabilities = ["deny"]
"#;

    #[test]
    fn parses_the_interface_example() {
        let policy = Policy::parse("payments-ro", EXAMPLE).unwrap();
        assert_eq!(policy.name(), "payments-ro");
        assert_eq!(policy.rules().len(), 2);
        assert_eq!(policy.rules()[0].path(), "secret/app/payments/**");
        assert_eq!(
            policy.rules()[0].capabilities(),
            CapabilitySet::new()
                .with(Capability::Read)
                .with(Capability::List)
        );
        assert!(policy.rules()[1].is_deny());
        assert!(!policy.is_root());
    }

    #[test]
    fn empty_policy_grants_nothing_but_parses() {
        let policy = Policy::parse("empty", "").unwrap();
        assert!(policy.rules().is_empty());
        assert_eq!(policy.to_toml(), "");
    }

    #[test]
    fn writes_back_what_it_read() {
        let policy = Policy::parse("payments-ro", EXAMPLE).unwrap();
        let text = policy.to_toml();
        assert_eq!(
            text,
            "[[rule]]\npath = \"secret/app/payments/**\"\ncapabilities = [\"read\", \"list\"]\n\n\
             [[rule]]\npath = \"secret/app/payments/admin/*\"\ncapabilities = [\"deny\"]\n"
        );
        assert_eq!(Policy::parse("payments-ro", &text).unwrap(), policy);
    }

    #[test]
    fn every_capability_and_root_survive_a_round_trip() {
        let all: Vec<String> = CapabilitySet::ALL_GRANTS
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect();
        let text = format!(
            "[[rule]]\npath = \"sys/**\"\ncapabilities = [{}]\n",
            all.join(",")
        );
        let policy = Policy::parse("ops", &text).unwrap();
        assert_eq!(policy.rules()[0].capabilities(), CapabilitySet::ALL_GRANTS);
        assert_eq!(Policy::parse("ops", &policy.to_toml()).unwrap(), policy);
        // The root policy writes out, but its name cannot be parsed back.
        let root = Policy::root();
        let reparsed = Policy::parse("copy-of-root", &root.to_toml()).unwrap();
        assert_eq!(reparsed.rules(), root.rules());
    }

    #[test]
    fn root_policy() {
        let root = Policy::root();
        assert_eq!(root.name(), "root");
        assert!(root.is_root());
        assert_eq!(root.rules().len(), ResourceRoot::COUNT);
        for rule in root.rules() {
            assert_eq!(rule.capabilities(), CapabilitySet::ALL_GRANTS);
            assert!(rule.path().ends_with("/**"));
        }
        assert_eq!(
            Policy::parse("root", "").unwrap_err(),
            PolicyError::ReservedName
        );
    }

    #[test]
    fn names() {
        for good in ["a", "0", "app-payments_ro", "x9", &"a".repeat(64)] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "App",
            "a b",
            "a/b",
            "a.b",
            "é",
            &"a".repeat(65),
        ] {
            assert_eq!(validate_name(bad), Err(PolicyError::InvalidName), "{bad}");
            assert_eq!(
                Policy::parse(bad, "").unwrap_err(),
                PolicyError::InvalidName
            );
        }
        assert_eq!(validate_name("root"), Err(PolicyError::ReservedName));
    }

    #[test]
    fn unknown_capability_names_the_word_and_rule() {
        let (index, problem) = rule_error(
            "[[rule]]\npath = \"secret/a\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"secret/b\"\ncapabilities = [\"read\", \"sudo\"]\n",
        );
        assert_eq!(index, 2);
        assert_eq!(
            problem,
            RuleProblem::UnknownCapability(UnknownCapability {
                word: "sudo".into()
            })
        );
        let message = PolicyError::Rule { index, problem }.to_string();
        assert!(message.starts_with("rule 2: "), "{message}");
        assert!(message.contains("\"sudo\""), "{message}");
    }

    #[test]
    fn empty_capabilities() {
        let (index, problem) = rule_error("[[rule]]\npath = \"secret/a\"\ncapabilities = []\n");
        assert_eq!((index, problem), (1, RuleProblem::EmptyCapabilities));
    }

    #[test]
    fn deny_stands_alone() {
        let (_, problem) =
            rule_error("[[rule]]\npath = \"secret/a\"\ncapabilities = [\"deny\", \"read\"]\n");
        assert_eq!(problem, RuleProblem::DenyWithGrants);
    }

    #[test]
    fn paths_must_start_at_a_resource_root() {
        for path in [
            "secrets/a",
            "secret",
            "/secret/a",
            "*/a",
            "**",
            "Secret/a",
            "",
            "kv/a",
            "secretx/a",
        ] {
            assert_eq!(path_error(path), RuleProblem::UnknownRoot, "{path}");
        }
        for root in ResourceRoot::ALL {
            let text = format!(
                "[[rule]]\npath = \"{}/**\"\ncapabilities = [\"read\"]\n",
                root.as_str()
            );
            assert!(Policy::parse("p", &text).is_ok(), "{text}");
        }
    }

    #[test]
    fn path_segment_rules() {
        assert_eq!(path_error("secret/"), RuleProblem::EmptySegment);
        assert_eq!(path_error("secret//a"), RuleProblem::EmptySegment);
        assert_eq!(path_error("secret/a/"), RuleProblem::EmptySegment);
        for (path, segment) in [
            ("secret/app/db*", 3),
            ("secret/*db", 2),
            ("secret/a*b/c", 2),
            ("secret/***", 2),
            ("secret/a/**x", 3),
        ] {
            assert_eq!(
                path_error(path),
                RuleProblem::PartialGlob { segment },
                "{path}"
            );
        }
        for path in [
            "secret/a b",
            "secret/a?",
            "secret/[ab]",
            "secret/é",
            "secret/a\\\\b",
        ] {
            assert!(
                matches!(path_error(path), RuleProblem::BadCharacter { segment: 2 }),
                "{path}"
            );
        }
        assert_eq!(
            path_error("secret/a/.."),
            RuleProblem::DotSegment { segment: 3 }
        );
        assert_eq!(
            path_error("secret/./a"),
            RuleProblem::DotSegment { segment: 2 }
        );
        assert_eq!(
            path_error(&format!("secret/{}", "a".repeat(MAX_PATH_BYTES))),
            RuleProblem::PathTooLong
        );
        assert_eq!(
            path_error(&format!("secret{}", "/a".repeat(MAX_PATH_SEGMENTS))),
            RuleProblem::TooManySegments
        );
        // The largest accepted path.
        let text = format!(
            "[[rule]]\npath = \"secret{}\"\ncapabilities = [\"read\"]\n",
            "/a".repeat(MAX_PATH_SEGMENTS - 1)
        );
        assert!(Policy::parse("p", &text).is_ok());
        // Names with dots, dashes and underscores are literals.
        let text = "[[rule]]\npath = \"secret/.env/db-admin_2/v1.2\"\ncapabilities = [\"read\"]\n";
        assert!(Policy::parse("p", text).is_ok());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let (index, problem) = rule_error(
            "[[rule]]\npath = \"secret/a\"\ncapabilities = [\"read\"]\n\
             [[rule]]\npath = \"secret/b\"\ncapabilities = [\"read\"]\nttl = \"1h\"\n",
        );
        assert_eq!(index, 2);
        let RuleProblem::Malformed(message) = problem else {
            panic!("{problem:?}")
        };
        assert!(message.contains("ttl"), "{message}");

        let err = Policy::parse("p", "[[rules]]\npath = \"secret/a\"\n").unwrap_err();
        let PolicyError::Syntax(message) = err else {
            panic!("{err:?}")
        };
        assert!(message.contains("rules"), "{message}");
        assert!(message.starts_with("line 1: "), "{message}");

        let err = Policy::parse("p", "name = \"x\"\n").unwrap_err();
        assert!(matches!(err, PolicyError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn missing_and_mistyped_fields_name_the_rule() {
        let (index, problem) = rule_error("[[rule]]\ncapabilities = [\"read\"]\n");
        assert_eq!(index, 1);
        assert!(
            matches!(&problem, RuleProblem::Malformed(m) if m.contains("path")),
            "{problem:?}"
        );
        let (_, problem) = rule_error("[[rule]]\npath = \"secret/a\"\n");
        assert!(
            matches!(&problem, RuleProblem::Malformed(m) if m.contains("capabilities")),
            "{problem:?}"
        );
        let (_, problem) = rule_error("[[rule]]\npath = 3\ncapabilities = [\"read\"]\n");
        assert!(matches!(problem, RuleProblem::Malformed(_)), "{problem:?}");
        let (_, problem) = rule_error("[[rule]]\npath = \"secret/a\"\ncapabilities = \"read\"\n");
        assert!(matches!(problem, RuleProblem::Malformed(_)), "{problem:?}");
        let err = Policy::parse("p", "rule = 3\n").unwrap_err();
        assert!(matches!(err, PolicyError::Syntax(_)), "{err:?}");
        let err = Policy::parse("p", "[[rule]\n").unwrap_err();
        assert!(matches!(err, PolicyError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn limits() {
        let one = "[[rule]]\npath = \"secret/a\"\ncapabilities = [\"read\"]\n";
        assert_eq!(
            Policy::parse("p", &one.repeat(MAX_RULES))
                .unwrap()
                .rules()
                .len(),
            MAX_RULES
        );
        assert_eq!(
            Policy::parse("p", &one.repeat(MAX_RULES + 1)).unwrap_err(),
            PolicyError::TooManyRules {
                count: MAX_RULES + 1
            }
        );
        let big = "#".repeat(MAX_POLICY_BYTES + 1);
        assert_eq!(
            Policy::parse("p", &big).unwrap_err(),
            PolicyError::TooLarge {
                len: MAX_POLICY_BYTES + 1
            }
        );
    }
}
