//! Compiled policies: built once, then checked on every request without
//! allocating. The semantics are documented on the `policy` module.

use std::sync::Arc;

use super::authorized::Authorized;
use super::capability::{Capability, CapabilitySet};
use super::document::{GlobSegment, Policy, PolicyError, ResourceRoot};

/// The outcome of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Granted by rule `rule` (from 0, in file order) of policy `policy` (from
    /// 0, in the order of the set).
    Allowed {
        policy: u16,
        rule: u16,
    },
    Denied,
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

#[derive(Debug)]
enum Seg {
    Literal(Box<str>),
    One,
    Any,
}

#[derive(Debug)]
struct CompiledRule {
    /// Position in the policy, for [`Decision::Allowed`].
    index: u16,
    capabilities: CapabilitySet,
    deny: bool,
    /// A grant that reaches delegated tokens too (`delegated = false` off).
    delegated: bool,
    /// Segments after the root; consecutive `**` are merged into one.
    segments: Box<[Seg]>,
    /// Bounds on the number of resource segments after the root this rule can
    /// match; a cheap filter before walking the segments.
    min_len: usize,
    max_len: usize,
}

/// One policy, compiled: its rules bucketed by resource root. Share it behind
/// an `Arc` between the token sets that hold it.
#[derive(Debug)]
pub struct CompiledPolicy {
    name: Box<str>,
    by_root: [Box<[CompiledRule]>; ResourceRoot::COUNT],
}

/// What one policy says about one resource and capability.
#[derive(Clone, Copy)]
enum Verdict {
    Deny,
    Grant(u16),
    Silent,
}

impl CompiledPolicy {
    pub fn compile(policy: &Policy) -> CompiledPolicy {
        let mut by_root: [Vec<CompiledRule>; ResourceRoot::COUNT] = Default::default();
        // A policy has at most MAX_RULES (1000) rules, so indices fit in u16.
        for (index, rule) in (0..=u16::MAX).zip(policy.rules()) {
            let mut segments: Vec<Seg> = Vec::with_capacity(rule.path.segments.len());
            for segment in &rule.path.segments {
                match segment {
                    GlobSegment::Literal(text) => segments.push(Seg::Literal(text.as_str().into())),
                    GlobSegment::One => segments.push(Seg::One),
                    GlobSegment::Any if matches!(segments.last(), Some(Seg::Any)) => {}
                    GlobSegment::Any => segments.push(Seg::Any),
                }
            }
            let fixed = segments.iter().filter(|s| !matches!(s, Seg::Any)).count();
            let open = segments.iter().any(|s| matches!(s, Seg::Any));
            let compiled = CompiledRule {
                index,
                capabilities: rule.capabilities,
                deny: rule.capabilities.contains(Capability::Deny),
                delegated: rule.grants_delegated(),
                segments: segments.into_boxed_slice(),
                min_len: fixed,
                max_len: if open { usize::MAX } else { fixed },
            };
            if let Some(bucket) = by_root.get_mut(rule.path.root as usize) {
                bucket.push(compiled);
            }
        }
        CompiledPolicy {
            name: policy.name().into(),
            by_root: by_root.map(Vec::into_boxed_slice),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This policy alone; `policy` in the decision is 0.
    pub fn check(&self, resource: &str, cap: Capability) -> Decision {
        let Some(resource) = Resource::parse(resource) else {
            return Decision::Denied;
        };
        if cap == Capability::Deny {
            return Decision::Denied;
        }
        match self.verdict(&resource, cap, false) {
            Verdict::Grant(rule) => Decision::Allowed { policy: 0, rule },
            Verdict::Deny | Verdict::Silent => Decision::Denied,
        }
    }

    /// `delegated`: the holder is a delegated token, which rules with
    /// `delegated = false` grant nothing (their denies still apply).
    fn verdict(&self, resource: &Resource<'_>, cap: Capability, delegated: bool) -> Verdict {
        let rules = self
            .by_root
            .get(resource.root as usize)
            .map_or(&[][..], |rules| &rules[..]);
        let mut grant = None;
        for rule in rules {
            if resource.len < rule.min_len || resource.len > rule.max_len {
                continue;
            }
            if !rule.deny
                && (grant.is_some()
                    || !rule.capabilities.contains(cap)
                    || (delegated && !rule.delegated))
            {
                // Cannot change the outcome: skip the walk.
                continue;
            }
            if matches(&rule.segments, resource.rest) {
                if rule.deny {
                    return Verdict::Deny;
                }
                grant = Some(rule.index);
            }
        }
        grant.map_or(Verdict::Silent, Verdict::Grant)
    }
}

/// The policies of one token, checked together.
#[derive(Clone, Debug)]
pub struct PolicySet {
    policies: Box<[Arc<CompiledPolicy>]>,
}

impl PolicySet {
    /// At most this many policies in one set, so indices fit in a `u16`.
    pub const MAX_POLICIES: usize = u16::MAX as usize + 1;

    pub fn new(
        policies: impl IntoIterator<Item = Arc<CompiledPolicy>>,
    ) -> Result<PolicySet, PolicyError> {
        let policies: Box<[_]> = policies.into_iter().collect();
        if policies.len() > Self::MAX_POLICIES {
            return Err(PolicyError::TooManyPolicies {
                max: Self::MAX_POLICIES,
            });
        }
        Ok(PolicySet { policies })
    }

    /// Compiles each policy and sets them together.
    pub fn compile<'p>(
        policies: impl IntoIterator<Item = &'p Policy>,
    ) -> Result<PolicySet, PolicyError> {
        Self::new(
            policies
                .into_iter()
                .map(|policy| Arc::new(CompiledPolicy::compile(policy))),
        )
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The name of the policy at `index` of a [`Decision::Allowed`].
    pub fn policy_name(&self, index: u16) -> Option<&str> {
        self.policies.get(usize::from(index)).map(|p| p.name())
    }

    /// May the holder use `cap` on `resource`? Does not allocate. Asking for
    /// `Capability::Deny` is always denied.
    pub fn check(&self, resource: &str, cap: Capability) -> Decision {
        self.check_as(resource, cap, false)
    }

    /// [`PolicySet::check`] for a delegated token (`delegated`): rules
    /// written with `delegated = false` grant it nothing.
    pub fn check_as(&self, resource: &str, cap: Capability, delegated: bool) -> Decision {
        let Some(resource) = Resource::parse(resource) else {
            return Decision::Denied;
        };
        if cap == Capability::Deny {
            return Decision::Denied;
        }
        let mut granted = None;
        for (policy, compiled) in (0..=u16::MAX).zip(self.policies.iter()) {
            match compiled.verdict(&resource, cap, delegated) {
                Verdict::Deny => return Decision::Denied,
                Verdict::Grant(rule) if granted.is_none() => {
                    granted = Some(Decision::Allowed { policy, rule });
                }
                Verdict::Grant(_) | Verdict::Silent => {}
            }
        }
        granted.unwrap_or(Decision::Denied)
    }

    /// [`PolicySet::check`], returning the proof a domain write requires:
    /// the one way to mint an [`Authorized`] for a caller. Allocates only on
    /// a grant (the proof owns its resource path).
    pub fn authorize(&self, resource: &str, cap: Capability) -> Option<Authorized> {
        self.authorize_as(resource, cap, false)
    }

    /// [`PolicySet::authorize`] for a delegated token (see
    /// [`PolicySet::check_as`]).
    pub fn authorize_as(
        &self,
        resource: &str,
        cap: Capability,
        delegated: bool,
    ) -> Option<Authorized> {
        match self.check_as(resource, cap, delegated) {
            Decision::Allowed { policy, rule } => {
                Some(Authorized::granted(resource, cap, policy, rule))
            }
            Decision::Denied => None,
        }
    }
}

/// A resource path split at `/` lazily; `Copy`, so saving a position for
/// backtracking costs two words.
#[derive(Clone, Copy)]
struct Segments<'a> {
    rest: Option<&'a str>,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        match rest.split_once('/') {
            Some((head, tail)) => {
                self.rest = Some(tail);
                Some(head)
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

struct Resource<'a> {
    root: ResourceRoot,
    rest: Segments<'a>,
    /// Number of segments after the root.
    len: usize,
}

impl<'a> Resource<'a> {
    fn parse(resource: &'a str) -> Option<Resource<'a>> {
        let (root, rest) = match resource.split_once('/') {
            Some((root, rest)) => (root, Some(rest)),
            None => (resource, None),
        };
        let root = ResourceRoot::from_segment(root)?;
        let rest = Segments { rest };
        let mut len = 0;
        for segment in rest {
            if matches!(segment, "" | "." | "..") {
                return None;
            }
            len += 1;
        }
        Some(Resource { root, rest, len })
    }
}

/// Glob matching over segments: the two-pointer wildcard algorithm, with
/// `*` as "any one" and `**` as "any run". Only the last `**` seen needs a
/// backtrack point, so this runs in O(pattern x path) time and O(1) space.
fn matches(pattern: &[Seg], mut input: Segments<'_>) -> bool {
    let mut p = 0;
    // (index of the last `**`, input position where it stopped eating)
    let mut backtrack: Option<(usize, Segments<'_>)> = None;
    loop {
        let before = input;
        let Some(segment) = input.next() else {
            break;
        };
        match pattern.get(p) {
            Some(Seg::Any) => {
                // Let `**` eat nothing at first; come back if that fails.
                backtrack = Some((p, before));
                p += 1;
                input = before;
                continue;
            }
            Some(Seg::One) => {
                p += 1;
                continue;
            }
            Some(Seg::Literal(literal)) if **literal == *segment => {
                p += 1;
                continue;
            }
            _ => {}
        }
        match &mut backtrack {
            Some((star, eaten)) => {
                // The `**` eats one more segment and matching resumes after it.
                eaten.next();
                input = *eaten;
                p = *star + 1;
            }
            None => return false,
        }
    }
    pattern
        .get(p..)
        .is_some_and(|tail| tail.iter().all(|s| matches!(s, Seg::Any)))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]
mod tests {
    use super::*;

    fn policy(name: &str, rules: &[(&str, &[&str])]) -> Policy {
        let mut text = String::new();
        for (path, caps) in rules {
            let caps: Vec<String> = caps.iter().map(|c| format!("\"{c}\"")).collect();
            text.push_str(&format!(
                "[[rule]]\npath = \"{path}\"\ncapabilities = [{}]\n",
                caps.join(", ")
            ));
        }
        Policy::parse(name, &text).unwrap()
    }

    fn set(policies: &[Policy]) -> PolicySet {
        PolicySet::compile(policies).unwrap()
    }

    fn glob_matches(glob: &str, resource: &str) -> bool {
        let set = set(&[policy("p", &[(glob, &["read"])])]);
        set.check(resource, Capability::Read).is_allowed()
    }

    #[test]
    fn glob_table() {
        #[rustfmt::skip]
        let table: &[(&str, &str, bool)] = &[
            // literals: exact segments only
            ("secret/app/db", "secret/app/db", true),
            ("secret/app/db", "secret/app/db-admin", false),
            ("secret/app/db", "secret/app/d", false),
            ("secret/app/db", "secret/app", false),
            ("secret/app/db", "secret/app/db/x", false),
            ("secret/app/db", "secret/APP/db", false),
            ("secret/app/db", "rotation/app/db", false),
            // `*`: exactly one segment
            ("secret/app/*", "secret/app/db", true),
            ("secret/app/*", "secret/app", false),
            ("secret/app/*", "secret/app/db/x", false),
            ("secret/*/db", "secret/app/db", true),
            ("secret/*/db", "secret/db", false),
            ("secret/*/db", "secret/a/b/db", false),
            ("secret/*/*", "secret/a/b", true),
            ("secret/*/*", "secret/a", false),
            // `**` at the end: zero or more
            ("secret/app/**", "secret/app", true),
            ("secret/app/**", "secret/app/db", true),
            ("secret/app/**", "secret/app/db/x/y/z", true),
            ("secret/app/**", "secret/apps/db", false),
            ("secret/app/**", "secret", false),
            ("secret/**", "secret", true),
            ("secret/**", "secret/anything/at/all", true),
            ("secret/**", "sys/seal", false),
            // `**` in the middle
            ("secret/**/db", "secret/db", true),
            ("secret/**/db", "secret/a/db", true),
            ("secret/**/db", "secret/a/b/c/db", true),
            ("secret/**/db", "secret/a/db/x", false),
            ("secret/**/db", "secret/a/db-admin", false),
            ("secret/**/db/*", "secret/x/db/y", true),
            ("secret/**/db/*", "secret/db/y", true),
            ("secret/**/db/*", "secret/db", false),
            ("secret/**/db/**", "secret/db", true),
            ("secret/**/db/**", "secret/a/db/b/db/c", true),
            ("secret/**/a/**/b", "secret/a/b", true),
            ("secret/**/a/**/b", "secret/x/a/y/z/b", true),
            ("secret/**/a/**/b", "secret/b/a", false),
            ("secret/**/a/**/b", "secret/a/b/c", false),
            ("secret/**/**", "secret", true),
            ("secret/**/**/x", "secret/x", true),
            ("secret/**/*", "secret", false),
            ("secret/**/*", "secret/a", true),
            ("secret/*/**/*", "secret/a/b", true),
            ("secret/*/**/*", "secret/a", false),
            // backtracking: the first candidate for `db` is not the right one
            ("secret/**/db/x", "secret/db/db/x", true),
            ("secret/**/db/x", "secret/db/y/db/x", true),
            ("secret/**/db/x", "secret/db/y/db/z", false),
            // malformed resources match nothing, even `**`
            ("secret/**", "secret/", false),
            ("secret/**", "secret//a", false),
            ("secret/**", "secret/a/", false),
            ("secret/**", "secret/../sys", false),
            ("secret/**", "secret/./a", false),
            ("secret/**", "/secret/a", false),
            ("secret/**", "", false),
        ];
        for (glob, resource, want) in table {
            assert_eq!(glob_matches(glob, resource), *want, "{glob} vs {resource}");
        }
    }

    #[test]
    fn delegated_false_rules_grant_nothing_to_delegated_tokens() {
        let text = "[[rule]]\npath = \"secret/app/**\"\ncapabilities = [\"read\"]\n\
                    [[rule]]\npath = \"secret/app/danger\"\ncapabilities = [\"delete\"]\ndelegated = false\n\
                    [[rule]]\npath = \"secret/app/never\"\ncapabilities = [\"deny\"]\ndelegated = false\n";
        let p = Policy::parse("app", text).unwrap();
        // Written back as it was read.
        assert_eq!(Policy::parse("app", &p.to_toml()).unwrap(), p);
        assert!(p.to_toml().contains("delegated = false"));
        let s = set(&[p]);
        assert!(s
            .check("secret/app/danger", Capability::Delete)
            .is_allowed());
        assert!(s
            .check_as("secret/app/x", Capability::Read, true)
            .is_allowed());
        assert_eq!(
            s.check_as("secret/app/danger", Capability::Delete, true),
            Decision::Denied
        );
        // A deny applies to every token, whatever `delegated` says.
        assert_eq!(
            s.check("secret/app/never", Capability::Read),
            Decision::Denied
        );
        assert_eq!(
            s.check_as("secret/app/never", Capability::Read, true),
            Decision::Denied
        );
        let bad = Policy::parse(
            "app",
            "[[rule]]\npath = \"secret/a\"\ncapabilities = [\"read\"]\ndelegated = \"no\"\n",
        );
        assert!(bad.is_err());
    }

    #[test]
    fn prefix_sharing_paths_do_not_leak() {
        let p = policy(
            "app",
            &[
                ("secret/app/db", &["read"]),
                ("secret/app/db/*", &["read"]),
                ("secret/app/db/**", &["list"]),
            ],
        );
        let s = set(&[p]);
        assert!(s.check("secret/app/db", Capability::Read).is_allowed());
        assert!(s.check("secret/app/db/x", Capability::Read).is_allowed());
        for leak in [
            "secret/app/db-admin",
            "secret/app/dbx",
            "secret/app/db-admin/x",
        ] {
            assert_eq!(s.check(leak, Capability::Read), Decision::Denied, "{leak}");
            assert_eq!(s.check(leak, Capability::List), Decision::Denied, "{leak}");
        }
        let refused = Policy::parse(
            "app",
            "[[rule]]\npath = \"secret/app/db*\"\ncapabilities = [\"read\"]\n",
        );
        assert!(refused.is_err());
    }

    #[test]
    fn deny_wins() {
        let p = policy(
            "p",
            &[
                ("secret/app/**", &["read", "list", "write"]),
                ("secret/app/admin/*", &["deny"]),
            ],
        );
        let s = set(&[p]);
        assert!(s.check("secret/app/x", Capability::Read).is_allowed());
        assert!(s.check("secret/app/admin", Capability::List).is_allowed());
        for cap in [Capability::Read, Capability::List, Capability::Write] {
            assert_eq!(s.check("secret/app/admin/key", cap), Decision::Denied);
        }
        // Deny in another policy of the set wins too, in either order, and over root.
        let deny = policy("no-admin", &[("secret/app/admin/**", &["deny"])]);
        let grant = policy("all", &[("secret/**", &["read"])]);
        for order in [
            vec![grant.clone(), deny.clone()],
            vec![deny.clone(), grant.clone()],
            vec![Policy::root(), deny.clone()],
        ] {
            let s = set(&order);
            assert_eq!(
                s.check("secret/app/admin", Capability::Read),
                Decision::Denied
            );
            assert_eq!(
                s.check("secret/app/admin/k", Capability::Read),
                Decision::Denied
            );
            assert!(s.check("secret/app/other", Capability::Read).is_allowed());
        }
        // Asking for `deny` itself is never granted.
        assert_eq!(s.check("secret/app/x", Capability::Deny), Decision::Denied);
    }

    #[test]
    fn capabilities_union_across_rules_and_policies() {
        let reader = policy(
            "reader",
            &[("secret/app/*", &["read"]), ("secret/app/**", &["list"])],
        );
        let writer = policy("writer", &[("secret/app/db", &["write"])]);
        let s = set(&[reader, writer]);
        assert_eq!(
            s.check("secret/app/db", Capability::Read),
            Decision::Allowed { policy: 0, rule: 0 }
        );
        assert_eq!(
            s.check("secret/app/db", Capability::List),
            Decision::Allowed { policy: 0, rule: 1 }
        );
        assert_eq!(
            s.check("secret/app/db", Capability::Write),
            Decision::Allowed { policy: 1, rule: 0 }
        );
        assert_eq!(
            s.check("secret/app/other", Capability::Write),
            Decision::Denied
        );
        assert_eq!(
            s.check("secret/app/db", Capability::Delete),
            Decision::Denied
        );
        assert_eq!(s.policy_name(1), Some("writer"));
        assert_eq!(s.policy_name(2), None);
        // The first granting rule is reported, in policy then file order.
        let p = policy(
            "p",
            &[
                ("secret/other", &["read"]),
                ("secret/**", &["read"]),
                ("secret/a", &["read"]),
            ],
        );
        let s = set(&[p]);
        assert_eq!(
            s.check("secret/a", Capability::Read),
            Decision::Allowed { policy: 0, rule: 1 }
        );
    }

    #[test]
    fn rule_indices_count_across_roots() {
        let p = policy(
            "p",
            &[
                ("sys/seal", &["admin"]),
                ("secret/a", &["read"]),
                ("rotation/**", &["rotate"]),
            ],
        );
        let compiled = CompiledPolicy::compile(&p);
        assert_eq!(
            compiled.check("secret/a", Capability::Read),
            Decision::Allowed { policy: 0, rule: 1 }
        );
        assert_eq!(
            compiled.check("rotation/secret/db", Capability::Rotate),
            Decision::Allowed { policy: 0, rule: 2 }
        );
        assert_eq!(
            compiled.check("sys/seal", Capability::Read),
            Decision::Denied
        );
        assert_eq!(compiled.name(), "p");
    }

    #[test]
    fn listing_is_checked_on_the_prefix() {
        let s = set(&[policy(
            "p",
            &[("secret/app/**", &["list"]), ("secret/team/*", &["list"])],
        )]);
        assert!(s.check("secret/app", Capability::List).is_allowed());
        assert!(s.check("secret/app/sub", Capability::List).is_allowed());
        assert!(!s.check("secret", Capability::List).is_allowed());
        assert!(!s.check("secret/team", Capability::List).is_allowed());
        assert!(s.check("secret/team/x", Capability::List).is_allowed());
    }

    #[test]
    fn root_policy_allows_everything() {
        let s = set(&[Policy::root()]);
        for resource in [
            "secret",
            "secret/a/b/c",
            "rotation/x",
            "identity/ci-runner",
            "policy/root",
            "dynamic/postgres/creds/ro",
            "sys/seal",
        ] {
            for cap in &Capability::ALL[..8] {
                assert!(s.check(resource, *cap).is_allowed(), "{resource} {cap}");
            }
        }
        assert!(!s.check("other/x", Capability::Read).is_allowed());
        assert!(!s.check("secret//x", Capability::Read).is_allowed());
    }

    #[test]
    fn empty_set_denies() {
        let s = PolicySet::new([]).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.check("secret/a", Capability::Read), Decision::Denied);
    }

    #[test]
    fn authorize_mints_a_proof() {
        let s = set(&[policy("p", &[("secret/a/*", &["read"])])]);
        let proof = s.authorize("secret/a/b", Capability::Read).unwrap();
        assert_eq!(proof.resource(), "secret/a/b");
        assert_eq!(proof.capability(), Capability::Read);
        assert_eq!(proof.rule(), Some((0, 0)));
        assert!(s.authorize("secret/a/b", Capability::Write).is_none());
    }

    /// splitmix64: a tiny deterministic generator for the randomised test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// The obvious recursive definition, as the reference.
    fn reference(glob: &[&str], path: &[&str]) -> bool {
        match (glob.first(), path.first()) {
            (None, None) => true,
            (Some(&"**"), _) => {
                reference(&glob[1..], path) || (!path.is_empty() && reference(glob, &path[1..]))
            }
            (Some(&"*"), Some(_)) => reference(&glob[1..], &path[1..]),
            (Some(lit), Some(seg)) => lit == seg && reference(&glob[1..], &path[1..]),
            _ => false,
        }
    }

    #[test]
    fn matcher_agrees_with_a_reference_on_random_globs() {
        let mut rng = Rng(0x006b_6579_7761_7264);
        let glob_alphabet = ["a", "b", "ab", "*", "**", "**"];
        let path_alphabet = ["a", "b", "ab", "ba"];
        let mut matched = 0;
        let cases = 20_000;
        for _ in 0..cases {
            let glob: Vec<&str> = (0..rng.below(6))
                .map(|_| glob_alphabet[rng.below(glob_alphabet.len())])
                .collect();
            let path: Vec<&str> = (0..rng.below(7))
                .map(|_| path_alphabet[rng.below(path_alphabet.len())])
                .collect();
            let glob_text = std::iter::once("secret")
                .chain(glob.iter().copied())
                .collect::<Vec<_>>()
                .join("/");
            let path_text = std::iter::once("secret")
                .chain(path.iter().copied())
                .collect::<Vec<_>>()
                .join("/");
            let Ok(p) = Policy::parse(
                "p",
                &format!("[[rule]]\npath = \"{glob_text}\"\ncapabilities = [\"read\"]\n"),
            ) else {
                // `secret` alone is not a valid rule path.
                assert!(glob.is_empty());
                continue;
            };
            let want = reference(&glob, &path);
            let got = CompiledPolicy::compile(&p)
                .check(&path_text, Capability::Read)
                .is_allowed();
            assert_eq!(got, want, "{glob_text} vs {path_text}");
            matched += usize::from(want);
        }
        // Both outcomes are well represented, so the comparison means something.
        assert!(
            matched > cases / 10 && matched < cases * 9 / 10,
            "{matched}"
        );
    }

    /// Runs `KEYWARD_ALLOC_PROBE` checks; `check_does_not_allocate` runs this
    /// test under valgrind with two counts and compares the heap totals.
    #[test]
    fn alloc_probe() {
        let checks: usize = std::env::var("KEYWARD_ALLOC_PROBE")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(100);
        let set = super::super::bench::fifty_rule_set().unwrap();
        let paths = super::super::bench::PATHS;
        let mut allowed = 0;
        for i in 0..checks {
            let decision = set.check(paths[i % paths.len()], Capability::Read);
            allowed += usize::from(std::hint::black_box(decision).is_allowed());
        }
        if checks >= paths.len() {
            assert!(allowed > 0 && allowed < checks);
        }
    }

    fn heap_allocations_of_probe(checks: usize) -> u64 {
        let exe = std::env::current_exe().unwrap();
        let output = std::process::Command::new("valgrind")
            .arg("--tool=memcheck")
            .arg("--leak-check=no")
            .arg(&exe)
            .args([
                "--exact",
                "policy::compile::tests::alloc_probe",
                "--test-threads=1",
                "-q",
            ])
            .env("KEYWARD_ALLOC_PROBE", checks.to_string())
            .output()
            .expect(
                "valgrind is needed to prove that PolicySet::check does not allocate \
                 (Debian: apt-get install valgrind)",
            );
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "probe failed: {stdout} {stderr}");
        // A renamed probe would run nothing and compare two empty runs.
        assert!(
            stdout.contains("1 passed"),
            "the probe did not run: {stdout}"
        );
        // "==123== total heap usage: 1,234 allocs, 1,230 frees, 56,789 bytes allocated"
        let line = stderr
            .lines()
            .find(|l| l.contains("total heap usage:"))
            .unwrap_or_else(|| panic!("no heap summary from valgrind: {stderr}"));
        let count = line
            .split("total heap usage:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .replace(',', "");
        count.parse().unwrap()
    }

    /// `unsafe_code` is forbidden in this crate, so a counting global allocator
    /// (an `unsafe impl GlobalAlloc`) cannot be written; valgrind counts instead.
    /// 20 000 more checks must not add 20 000 allocations (we allow a little
    /// noise from the test harness, far below one per check).
    #[test]
    fn check_does_not_allocate() {
        let few = heap_allocations_of_probe(0);
        let many = heap_allocations_of_probe(20_000);
        assert!(
            many.abs_diff(few) < 100,
            "0 checks: {few} allocations, 20000 checks: {many}"
        );
    }
}
