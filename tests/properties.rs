//! Property tests: the policy matcher and decisions, CIDR containment and the
//! duration grammar against reference models simple enough to be obviously
//! right, over generated inputs. (Shamir split and combine are tested the same
//! way next to the code, in `src/barrier/shamir.rs`: they are not public.)
//!
//! Case counts are modest so the suite stays fast on a small machine;
//! `PROPTEST_CASES=10000 cargo test --test properties` runs more.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use keyward::cidr::Cidr;
use keyward::duration::{self, TtlText, MAX_SECONDS};
use keyward::policy::{Capability, CompiledPolicy, Decision, Policy, PolicySet};
use proptest::prelude::*;
use proptest::sample::select;

/// 256 cases; a failure is shrunk and printed, not saved to a file.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(256)
    }
}

// ------------------------------------------------------------ glob model ---

/// The matching rule of `src/policy/mod.rs`, written the obvious way: a
/// literal matches itself, `*` any one segment, `**` zero or more segments.
fn naive_match(pattern: &[&str], resource: &[&str]) -> bool {
    match (pattern.split_first(), resource.split_first()) {
        (None, None) => true,
        (Some((&"**", rest)), _) => {
            naive_match(rest, resource)
                || (!resource.is_empty() && naive_match(pattern, &resource[1..]))
        }
        (Some((&"*", rest)), Some((_, tail))) => naive_match(rest, tail),
        (Some((literal, rest)), Some((segment, tail))) => {
            literal == segment && naive_match(rest, tail)
        }
        _ => false,
    }
}

/// A resource with an empty, `.` or `..` segment matches nothing.
fn model_matches(pattern: &str, resource: &str) -> bool {
    let resource: Vec<&str> = resource.split('/').collect();
    if resource.iter().any(|s| matches!(*s, "" | "." | "..")) {
        return false;
    }
    naive_match(&pattern.split('/').collect::<Vec<_>>(), &resource)
}

const ROOTS: [&str; 3] = ["secret", "sys", "identity"];

/// A rule path: a root, then a few segments from a small alphabet, so that
/// literals collide with resources often.
fn pattern() -> impl Strategy<Value = String> {
    (
        select(&ROOTS[..]),
        // A rule path has at least one segment after its root.
        prop::collection::vec(select(&["a", "b", "ab", "*", "**"][..]), 1..6),
    )
        .prop_map(|(root, segments)| {
            let mut path = root.to_owned();
            for s in segments {
                path.push('/');
                path.push_str(s);
            }
            path
        })
}

/// A resource: mostly valid, sometimes with a bad segment or another root.
fn resource() -> impl Strategy<Value = String> {
    (
        select(&["secret", "sys", "identity", "policy"][..]),
        prop::collection::vec(
            prop_oneof![
                10 => select(&["a", "b", "ab", "c"][..]),
                1 => select(&["", ".", "..", "*"][..]),
            ],
            0..7,
        ),
    )
        .prop_map(|(root, segments)| {
            let mut path = root.to_owned();
            for s in segments {
                path.push('/');
                path.push_str(s);
            }
            path
        })
}

/// A resource made from a pattern, so that it matches or nearly matches: each
/// `*` becomes one segment, each `**` none to two, then one segment may be
/// dropped or one added.
fn near(pattern: String) -> impl Strategy<Value = (String, String)> {
    let segments = pattern.split('/').count();
    (
        prop::collection::vec(select(&["a", "b", "c"][..]), 2 * segments),
        prop::collection::vec(0usize..3, segments),
        prop_oneof![Just(None), (0..=segments, prop::bool::ANY).prop_map(Some)],
    )
        .prop_map(move |(fill, runs, edit)| {
            let mut out: Vec<&str> = Vec::new();
            for (i, seg) in pattern.split('/').enumerate() {
                match seg {
                    "*" => out.push(fill[2 * i]),
                    "**" => out.extend(&fill[2 * i..2 * i + runs[i].min(2)]),
                    literal => out.push(literal),
                }
            }
            match edit {
                Some((at, true)) if at < out.len() && at > 0 => {
                    out.remove(at);
                }
                Some((at, _)) => out.insert(at.clamp(1, out.len()), "a"),
                None => {}
            }
            (pattern.clone(), out.join("/"))
        })
}

/// A pattern and a resource: unrelated, or near each other.
fn pattern_and_resource() -> impl Strategy<Value = (String, String)> {
    prop_oneof![(pattern(), resource()), pattern().prop_flat_map(near)]
}

fn one_rule(path: &str, caps: &[Capability]) -> String {
    let caps: Vec<String> = caps.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "[[rule]]\npath = \"{path}\"\ncapabilities = [{}]\n",
        caps.join(", ")
    )
}

proptest! {
    #![proptest_config(config())]

    /// The compiled matcher (two pointers with one backtrack point) agrees
    /// with the naive recursive matcher.
    #[test]
    fn glob_matching_agrees_with_the_naive_matcher((p, r) in pattern_and_resource()) {
        let policy = Policy::parse("p", &one_rule(&p, &[Capability::Read])).unwrap();
        let allowed = CompiledPolicy::compile(&policy)
            .check(&r, Capability::Read)
            .is_allowed();
        prop_assert_eq!(allowed, model_matches(&p, &r), "{} vs {}", p, r);
    }
}

// ------------------------------------------------------- decision model ---

/// A rule as the test made it: a path and its capabilities.
#[derive(Clone, Debug)]
struct ModelRule {
    path: String,
    caps: Vec<Capability>,
}

fn rule() -> impl Strategy<Value = ModelRule> {
    (
        pattern(),
        prop::collection::vec(select(&Capability::ALL[..]), 1..4),
        // A deny rule one time in five.
        prop::bool::weighted(0.2),
    )
        .prop_map(|(path, mut caps, deny)| {
            if deny {
                // A deny rule holds `deny` alone (a policy refuses a mix).
                caps = vec![Capability::Deny];
            } else {
                caps.retain(|c| *c != Capability::Deny);
                if caps.is_empty() {
                    caps.push(Capability::Read);
                }
            }
            ModelRule { path, caps }
        })
}

/// The decision of the policy module doc: deny if any matching rule of any
/// policy holds `deny`; else granted by the first matching rule holding the
/// capability (policies in order, rules in file order); `deny` itself is
/// never granted.
fn model_decision(policies: &[Vec<ModelRule>], resource: &str, cap: Capability) -> Decision {
    if cap == Capability::Deny {
        return Decision::Denied;
    }
    let matching = || {
        policies.iter().enumerate().flat_map(|(p, rules)| {
            rules
                .iter()
                .enumerate()
                .filter(|(_, rule)| model_matches(&rule.path, resource))
                .map(move |(r, rule)| (p, r, rule))
        })
    };
    if matching().any(|(_, _, rule)| rule.caps.contains(&Capability::Deny)) {
        return Decision::Denied;
    }
    matching()
        .find(|(_, _, rule)| rule.caps.contains(&cap))
        .map_or(Decision::Denied, |(p, r, _)| Decision::Allowed {
            policy: p as u16,
            rule: r as u16,
        })
}

proptest! {
    #![proptest_config(config())]

    /// A set of random policies decides every capability as the model does:
    /// deny anywhere wins, else the union of the matching rules' grants.
    #[test]
    fn policy_set_decides_as_the_union_and_deny_model(
        policies in prop::collection::vec(prop::collection::vec(rule(), 1..5), 1..4),
        resources in prop::collection::vec(pattern_and_resource(), 1..6),
    ) {
        let parsed: Vec<Policy> = policies
            .iter()
            .enumerate()
            .map(|(i, rules)| {
                let text: String = rules
                    .iter()
                    .map(|r| one_rule(&r.path, &r.caps))
                    .collect::<Vec<_>>()
                    .join("\n");
                Policy::parse(&format!("p{i}"), &text).unwrap()
            })
            .collect();
        let set = PolicySet::compile(&parsed).unwrap();
        for (_, resource) in &resources {
            for cap in Capability::ALL {
                let model = model_decision(&policies, resource, cap);
                prop_assert_eq!(set.check(resource, cap), model, "{} {}", resource, cap);
                // The proof is minted exactly when the check allows.
                let proof = set.authorize(resource, cap);
                prop_assert_eq!(proof.is_some(), model.is_allowed());
            }
        }
    }
}

// ------------------------------------------------------------ CIDR model ---

/// A block or address as the model sees it: a family and a range of
/// integers (an IPv4-mapped IPv6 address is in the IPv4 family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug)]
struct Range {
    family: Family,
    lo: u128,
    hi: u128,
}

fn range(family: Family, addr: u128, prefix: u32) -> Range {
    let bits = if family == Family::V4 { 32 } else { 128 };
    let host = if prefix >= bits {
        0
    } else {
        (u128::MAX >> (128 - bits)) >> prefix
    };
    Range {
        family,
        lo: addr & !host,
        hi: (addr & !host) | host,
    }
}

/// How a block is written: IPv4, IPv6, or IPv4 in IPv4-mapped IPv6 form.
#[derive(Clone, Copy, Debug)]
enum Written {
    V4(u32, u32),
    V6(u128, u32),
    Mapped(u32, u32),
}

impl Written {
    fn text(self) -> String {
        match self {
            Written::V4(a, p) => format!("{}/{p}", Ipv4Addr::from(a)),
            Written::V6(a, p) => format!("{}/{p}", Ipv6Addr::from(a)),
            Written::Mapped(a, p) => format!("::ffff:{}/{p}", Ipv4Addr::from(a)),
        }
    }

    /// The model's range: a mapped block of /96 or longer is the IPv4 block
    /// of prefix - 96; a shorter one is the IPv6 block it spells.
    fn range(self) -> Range {
        match self {
            Written::V4(a, p) => range(Family::V4, u128::from(a), p),
            // An IPv6 address in the mapped space prints as `::ffff:a.b.c.d`.
            Written::V6(a, p) => match Ipv6Addr::from(a).to_ipv4_mapped() {
                Some(v4) => Written::Mapped(u32::from(v4), p).range(),
                None => range(Family::V6, a, p),
            },
            Written::Mapped(a, p) if p >= 96 => range(Family::V4, u128::from(a), p - 96),
            Written::Mapped(a, p) => range(
                Family::V6,
                u128::from(Ipv4Addr::from(a).to_ipv6_mapped()),
                p,
            ),
        }
    }
}

/// Addresses near a few bases, so that blocks overlap and nest often.
fn v4_addr() -> impl Strategy<Value = u32> {
    (
        select(&[0u32, 0x0a00_0000, 0xc0a8_0000][..]),
        0u32..0x1_0000,
    )
        .prop_map(|(b, low)| b | low)
}

fn v6_addr() -> impl Strategy<Value = u128> {
    (
        select(&[0u128, 0xfd00 << 112, 0xffff_0a00_0000][..]),
        0u128..0x1_0000,
    )
        .prop_map(|(b, low)| b | low)
}

fn written() -> impl Strategy<Value = Written> {
    prop_oneof![
        (v4_addr(), 0u32..=32).prop_map(|(a, p)| Written::V4(a, p)),
        (v6_addr(), 0u32..=128).prop_map(|(a, p)| Written::V6(a, p)),
        (v4_addr(), 80u32..=128).prop_map(|(a, p)| Written::Mapped(a, p)),
    ]
}

/// An address and its place in the model.
fn address() -> impl Strategy<Value = (IpAddr, Family, u128)> {
    prop_oneof![
        v4_addr().prop_map(|a| (IpAddr::from(Ipv4Addr::from(a)), Family::V4, u128::from(a))),
        v4_addr().prop_map(|a| (
            IpAddr::from(Ipv4Addr::from(a).to_ipv6_mapped()),
            Family::V4,
            u128::from(a)
        )),
        v6_addr().prop_filter_map("mapped addresses are the case above", |a| {
            let v6 = Ipv6Addr::from(a);
            v6.to_ipv4_mapped()
                .is_none()
                .then_some((IpAddr::from(v6), Family::V6, a))
        }),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// `contains` and `within` agree with ranges of integers per family.
    #[test]
    fn cidr_containment_agrees_with_the_range_model(
        a in written(),
        b in written(),
        (addr, family, value) in address(),
    ) {
        let (ca, cb): (Cidr, Cidr) = (a.text().parse().unwrap(), b.text().parse().unwrap());
        let (ra, rb) = (a.range(), b.range());
        let inside = ra.family == family && ra.lo <= value && value <= ra.hi;
        prop_assert_eq!(ca.contains(addr), inside, "{} holds {}", ca, addr);
        let nested = ra.family == rb.family && rb.lo <= ra.lo && ra.hi <= rb.hi;
        prop_assert_eq!(ca.within(&cb), nested, "{} within {}", ca, cb);
        // The printed form reads back to the same block.
        prop_assert_eq!(ca.to_string().parse::<Cidr>().unwrap(), ca);
    }
}

// -------------------------------------------------------------- duration ---

proptest! {
    #![proptest_config(config())]

    /// `format` then `parse` gives the value back, for any duration in range.
    #[test]
    fn duration_prints_and_parses_back(secs in prop_oneof![0u64..100_000, 0..=MAX_SECONDS]) {
        let d = Duration::from_secs(secs);
        let printed = duration::format(d);
        prop_assert_eq!(duration::parse(&printed), Ok(d), "{}", printed);
        if let Some(ttl) = TtlText::from_secs(secs) {
            prop_assert_eq!(ttl.to_string().parse::<TtlText>(), Ok(ttl));
        }
    }

    /// A compound duration written by hand (units in decreasing order, any
    /// subset, any sizes) reads as the sum of its parts.
    #[test]
    fn compound_durations_read_as_their_sum(
        parts in prop::collection::vec(prop::option::of(0u64..1000), 4),
        spaces in prop::bool::ANY,
    ) {
        let mut text = String::new();
        let mut total = 0;
        for (part, (unit, secs)) in parts.iter().zip([('d', 86_400), ('h', 3600), ('m', 60), ('s', 1)]) {
            if let Some(n) = part {
                text.push_str(&format!("{n}{unit}"));
                total += n * secs;
            }
        }
        if spaces {
            text = format!("  {text}\t");
        }
        let parsed = duration::parse(&text);
        if text.trim().is_empty() {
            prop_assert_eq!(parsed, Err(duration::DurationError::Empty));
        } else {
            prop_assert_eq!(parsed, Ok(Duration::from_secs(total)), "{}", text);
        }
    }
}
