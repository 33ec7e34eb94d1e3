//! The names a PKI role allows: SPIFFE IDs and DNS names, and the patterns
//! that bound them. Every name is parsed strictly before it is compared, so
//! a look-alike (upper case, a trailing dot, an empty or `..` segment, a
//! query, a port, non-ASCII) is refused with the rule it breaks rather than
//! matched loosely.
//!
//! Patterns: in a SPIFFE pattern `*` is exactly one segment (the trust
//! domain counts as the first) and `**` any number of segments, zero
//! included; in a DNS pattern `*` is exactly one label. A wildcard DNS name
//! (`*.example.com`) is itself a request for a wildcard certificate: it is
//! allowed only by a role made with `--allow-wildcard-dns`, and only where
//! the pattern has `*` in that label.

use super::PkiError;

const MAX_SPIFFE: usize = 2048;
const MAX_DNS: usize = 253;

/// A SPIFFE ID, `spiffe://trust-domain/path`: the trust domain is lower-case
/// letters, digits, `.`, `-` and `_`; each path segment letters, digits,
/// `.`, `-` and `_`, never empty, `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId(String);

impl SpiffeId {
    pub fn parse(text: &str) -> Result<Self, PkiError> {
        let bad = |why: &str| PkiError::Invalid(format!("SPIFFE ID {text:?}: {why}"));
        if text.len() > MAX_SPIFFE {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe:// (lower case)"))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("needs a path after the trust domain"))?;
        if domain.is_empty()
            || !domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(bad(
                "the trust domain is lower-case letters, digits, '.', '-' and '_' (no port, no user)",
            ));
        }
        for segment in path.split('/') {
            check_segment(segment).map_err(|why| bad(&why))?;
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn segments(&self) -> impl Iterator<Item = &str> {
        self.0["spiffe://".len()..].split('/')
    }
}

fn check_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() || segment == "." || segment == ".." {
        return Err("a path segment is empty, '.' or '..'".into());
    }
    if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err("a path segment has a character other than letters, digits, '.', '-', '_' (no query, fragment or percent-encoding)".into());
    }
    Ok(())
}

/// A DNS name in lower case: labels of letters, digits and `-` (not at
/// either end), 1 to 63 bytes each, 253 in all, no trailing dot; the first
/// label may be `*` (a wildcard name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsName(String);

impl DnsName {
    pub fn parse(text: &str) -> Result<Self, PkiError> {
        let bad = |why: &str| PkiError::Invalid(format!("DNS name {text:?}: {why}"));
        if text.is_empty() || text.len() > MAX_DNS {
            return Err(bad("must be 1 to 253 bytes"));
        }
        if text.parse::<std::net::IpAddr>().is_ok() {
            return Err(bad("an IP address is not a DNS name"));
        }
        let labels: Vec<&str> = text.split('.').collect();
        if labels.len() < 2 {
            return Err(bad("needs at least two labels"));
        }
        for (i, label) in labels.iter().enumerate() {
            if *label == "*" && i == 0 {
                continue;
            }
            check_label(label).map_err(|why| bad(&why))?;
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > 63 {
        return Err("a label is empty (or the name ends with '.') or longer than 63 bytes".into());
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(
            "a label has a character other than lower-case letters, digits and '-' (write IDNs in punycode, and only the first label may be '*')"
                .into(),
        );
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err("a label starts or ends with '-'".into());
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    One,
    Any,
}

/// An allowed-SPIFFE pattern, e.g. `spiffe://prod.acme/ns/*/sa/**`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffePattern {
    text: String,
    parts: Vec<Part>,
}

impl SpiffePattern {
    pub fn parse(text: &str) -> Result<Self, PkiError> {
        let bad = |why: &str| PkiError::Invalid(format!("--allow-spiffe {text:?}: {why}"));
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let mut parts = Vec::new();
        for (i, segment) in rest.split('/').enumerate() {
            parts.push(match segment {
                "*" => Part::One,
                "**" if i > 0 => Part::Any,
                "**" => return Err(bad("'**' cannot stand for the trust domain")),
                s if i == 0 => {
                    SpiffeId::parse(&format!("spiffe://{s}/x")).map_err(|e| bad(&e.to_string()))?;
                    Part::Literal(s.to_owned())
                }
                s => {
                    check_segment(s).map_err(|why| bad(&why))?;
                    Part::Literal(s.to_owned())
                }
            });
        }
        if parts.len() < 2 {
            return Err(bad(
                "needs a path after the trust domain (use '**' for any)",
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        let segments: Vec<&str> = id.segments().collect();
        match_parts(&self.parts, &segments)
    }
}

fn match_parts(parts: &[Part], segments: &[&str]) -> bool {
    match parts.split_first() {
        None => segments.is_empty(),
        Some((Part::Any, rest)) => (0..=segments.len()).any(|n| match_parts(rest, &segments[n..])),
        Some((part, rest)) => match segments.split_first() {
            None => false,
            Some((segment, tail)) => {
                let hit = match part {
                    Part::One => true,
                    Part::Literal(l) => l == segment,
                    Part::Any => false,
                };
                hit && match_parts(rest, tail)
            }
        },
    }
}

/// An allowed-DNS pattern, e.g. `*.svc.cluster.local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPattern {
    text: String,
    labels: Vec<Part>,
}

impl DnsPattern {
    pub fn parse(text: &str) -> Result<Self, PkiError> {
        let bad = |why: &str| PkiError::Invalid(format!("--allow-dns {text:?}: {why}"));
        if text.is_empty() || text.len() > MAX_DNS {
            return Err(bad("must be 1 to 253 bytes"));
        }
        let mut labels = Vec::new();
        for label in text.split('.') {
            labels.push(match label {
                "*" => Part::One,
                "**" => return Err(bad("'**' is not a DNS pattern: '*' is one label")),
                l => {
                    check_label(l).map_err(|why| bad(&why))?;
                    Part::Literal(l.to_owned())
                }
            });
        }
        if labels.len() < 2 {
            return Err(bad("needs at least two labels"));
        }
        Ok(Self {
            text: text.to_owned(),
            labels,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `name` matches: each label against one pattern label. A
    /// wildcard label in `name` matches only a `*` in the pattern, and only
    /// when `allow_wildcard`.
    pub fn matches(&self, name: &DnsName, allow_wildcard: bool) -> bool {
        let labels: Vec<&str> = name.as_str().split('.').collect();
        labels.len() == self.labels.len()
            && labels.iter().zip(&self.labels).all(|(l, p)| match p {
                Part::One => *l != "*" || allow_wildcard,
                Part::Literal(lit) => lit == l,
                Part::Any => false,
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sp(p: &str, id: &str) -> bool {
        SpiffePattern::parse(p)
            .unwrap()
            .matches(&SpiffeId::parse(id).unwrap())
    }

    #[test]
    fn spiffe_star_is_one_segment_and_double_star_any() {
        assert!(sp(
            "spiffe://acme.test/ns/*/sa",
            "spiffe://acme.test/ns/web/sa"
        ));
        assert!(!sp(
            "spiffe://acme.test/ns/*/sa",
            "spiffe://acme.test/ns/a/b/sa"
        ));
        assert!(sp(
            "spiffe://acme.test/ns/**",
            "spiffe://acme.test/ns/a/b/c"
        ));
        assert!(sp("spiffe://acme.test/ns/**", "spiffe://acme.test/ns"));
        assert!(!sp("spiffe://acme.test/ns/**", "spiffe://acme.test/nsx/a"));
        assert!(!sp("spiffe://acme.test/ns/**", "spiffe://other.test/ns/a"));
        assert!(sp("spiffe://*/web", "spiffe://other.test/web"));
    }

    #[test]
    fn look_alike_spiffe_ids_are_refused() {
        for bad in [
            "SPIFFE://acme.test/a",
            "spiffe://Acme.test/a",
            "spiffe://acme.test/a//b",
            "spiffe://acme.test/a/../b",
            "spiffe://acme.test/a?x=1",
            "spiffe://acme.test:443/a",
            "spiffe://acme.test/a%2fb",
            "spiffe://acme.test",
            "spiffe://acme.test/",
            "spiffe://acme.test/é",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_star_is_one_label_and_wildcards_need_the_flag() {
        let p = DnsPattern::parse("*.svc.example").unwrap();
        let n = |s: &str| DnsName::parse(s).unwrap();
        assert!(p.matches(&n("web.svc.example"), false));
        assert!(!p.matches(&n("a.web.svc.example"), false));
        assert!(!p.matches(&n("svc.example"), false));
        assert!(!p.matches(&n("*.svc.example"), false));
        assert!(p.matches(&n("*.svc.example"), true));
        let lit = DnsPattern::parse("web.svc.example").unwrap();
        assert!(!lit.matches(&n("*.svc.example"), true));
    }

    #[test]
    fn look_alike_dns_names_are_refused() {
        for bad in [
            "Web.example.com",
            "web.example.com.",
            "web..example.com",
            "-web.example.com",
            "web.*.example.com",
            "127.0.0.1",
            "localhost",
            "wéb.example.com",
            "web_1.example.com",
        ] {
            assert!(DnsName::parse(bad).is_err(), "{bad}");
        }
        assert!(DnsPattern::parse("**.example.com").is_err());
    }
}
