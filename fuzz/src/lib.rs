//! The bodies of the fuzz targets, one function per parser family.
//!
//! Each target in `fuzz_targets/` is one line calling a function here, and
//! `tests/fuzz_corpus.rs` includes this file and replays every committed
//! corpus file through the same functions in the normal `cargo test` on
//! stable, so CI catches a regression without nightly or libFuzzer.
//!
//! A function must return normally on any input: a panic is a crash. Where a
//! parser has a simple invariant (print then parse gives the same value, two
//! entry points agree, a reference model agrees) the function asserts it.
//! Inputs that start with a mode byte pick one of several entry points of
//! the family; bytes that are not UTF-8 are converted lossily, so every input
//! reaches the text parsers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use keyward::cidr::Cidr;
use keyward::oidc::{IssuerConfig, Jwks, JwksSource, OidcError, VerifiedJwt};
use keyward::policy::{Capability, CompiledPolicy, Decision, Policy, PolicySet};
use keyward::rotation::schedule::Schedule;
use keyward::secrets::{ListPrefix, SecretPath, Stage};
use keyward::token::format::{looks_like_accessor, looks_like_token, TokenSecret};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// The body of one fuzz target.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, for the corpus replay: `fuzz/corpus/NAME/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("token", token),
    ("secret_path", secret_path),
    ("policy", policy),
    ("jwt", jwt),
    ("jwks", jwks),
    ("cert", cert),
    ("duration_cron", duration_cron),
    ("cidr", cidr),
    ("share", share),
    ("audit", audit),
];

fn text(data: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// The first byte picks a mode; the rest is the input.
fn mode(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(m, rest)| (*m, rest))
}

// ---------------------------------------------------------------- token ---

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Tokens, accessors and secret-ids (`src/token/format.rs`,
/// `src/identity/secret_id.rs`). Mode 0: any text. Mode 1: 43 bytes made
/// into a token body with the checksum the format documents, which must
/// parse (so the checksum path is reached).
pub fn token(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    let owned;
    let s: &str = if m % 2 == 1 && rest.len() >= 43 {
        let body: String = rest[..43]
            .iter()
            .map(|b| char::from(BASE62[usize::from(*b) % 62]))
            .collect();
        let mut sum = crc32fast::hash(body.as_bytes());
        let mut digits = [b'0'; 6];
        for slot in digits.iter_mut().rev() {
            *slot = BASE62[(sum % 62) as usize];
            sum /= 62;
        }
        owned = format!("kwt_{body}{}", String::from_utf8_lossy(&digits));
        assert!(
            TokenSecret::parse(&owned).is_ok(),
            "a well-formed token is refused"
        );
        &owned
    } else {
        owned = text(rest).into_owned();
        &owned
    };
    let parsed = TokenSecret::parse(s);
    assert_eq!(parsed.is_ok(), looks_like_token(s));
    if let Ok(token) = &parsed {
        assert_eq!(token.expose(), s);
        assert!(!format!("{token:?}").contains(s), "Debug shows the token");
    }
    if looks_like_accessor(s) {
        assert!(s.starts_with("kwa_") && s.len() == 28);
    }
    if let Ok(id) = keyward::identity::SecretIdText::parse(s) {
        assert_eq!(id.expose(), s);
        assert!(!format!("{id:?}").contains(s), "Debug shows the secret-id");
    }
}

// ---------------------------------------------------------- secret path ---

/// Secret paths, list prefixes and stages (`src/secrets/path.rs`). A valid
/// path is its own text, and its resource is one the policy grammar matches.
pub fn secret_path(data: &[u8]) {
    let s = text(data);
    if let Ok(path) = SecretPath::parse(&s) {
        assert_eq!(path.as_str(), &*s);
        assert_eq!(path.resource(), format!("secret/{s}"));
        assert_eq!(SecretPath::parse(path.as_str()).as_ref(), Ok(&path));
        // Every valid path is matched by `secret/**`, and by its own
        // literal rule: the two grammars agree.
        let everything = Policy::parse(
            "fuzz",
            "[[rule]]\npath = \"secret/**\"\ncapabilities = [\"read\"]\n",
        )
        .expect("the secret/** policy parses");
        let compiled = CompiledPolicy::compile(&everything);
        assert!(compiled
            .check(&path.resource(), Capability::Read)
            .is_allowed());
        let literal = format!(
            "[[rule]]\npath = \"{}\"\ncapabilities = [\"read\"]\n",
            path.resource()
        );
        let literal = Policy::parse("fuzz", &literal).expect("a secret path is a rule path");
        assert!(CompiledPolicy::compile(&literal)
            .check(&path.resource(), Capability::Read)
            .is_allowed());
    }
    if let Ok(prefix) = ListPrefix::parse(&s) {
        let trimmed = s.trim_end_matches('/');
        match prefix.path() {
            None => {
                assert!(trimmed.is_empty());
                assert_eq!(prefix.resource(), "secret");
            }
            Some(path) => {
                assert_eq!(path.as_str(), trimmed);
                assert_eq!(prefix.resource(), format!("secret/{trimmed}"));
            }
        }
    }
    if let Ok(stage) = Stage::parse(&s) {
        assert_eq!(Stage::parse(stage.as_str()), Ok(stage));
    }
}

// --------------------------------------------------------------- policy ---

/// The glob semantics of `src/policy/mod.rs` as a table over segments: a
/// literal matches itself, `*` one segment, `**` any run of segments. A
/// resource with an empty, `.` or `..` segment matches nothing.
pub fn model_glob_matches(pattern: &str, resource: &str) -> bool {
    let r: Vec<&str> = resource.split('/').collect();
    if r.iter().any(|seg| matches!(*seg, "" | "." | "..")) {
        return false;
    }
    let p: Vec<&str> = pattern.split('/').collect();
    // at[i][j]: pattern[i..] matches resource[j..].
    let mut at = vec![vec![false; r.len() + 1]; p.len() + 1];
    at[p.len()][r.len()] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=r.len()).rev() {
            at[i][j] = match p[i] {
                "**" => at[i + 1][j] || (j < r.len() && at[i][j + 1]),
                "*" => j < r.len() && at[i + 1][j + 1],
                literal => j < r.len() && r[j] == literal && at[i + 1][j + 1],
            };
        }
    }
    at[0][0]
}

/// What a set of policies decides, by the module doc: a matching deny rule
/// anywhere refuses; otherwise the first matching rule holding `cap` (policies
/// in order, rules in file order) grants; asking for `deny` is refused.
pub fn model_decision(policies: &[Policy], resource: &str, cap: Capability) -> Decision {
    if cap == Capability::Deny {
        return Decision::Denied;
    }
    let mut granted = Decision::Denied;
    for (p, policy) in policies.iter().enumerate() {
        for (r, rule) in policy.rules().iter().enumerate() {
            if !model_glob_matches(rule.path(), resource) {
                continue;
            }
            if rule.is_deny() {
                return Decision::Denied;
            }
            if rule.capabilities().contains(cap) && granted == Decision::Denied {
                granted = Decision::Allowed {
                    policy: p as u16,
                    rule: r as u16,
                };
            }
        }
    }
    granted
}

/// Policy TOML and glob matching (`src/policy/`). Mode 0: the first line is a
/// resource, the rest a policy file; a policy that parses prints back to
/// itself and decides as the model does. Mode 1: `PATTERN\nRESOURCE`, one
/// rule, matched as the model matches.
pub fn policy(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    let s = text(rest);
    let (first, second) = s.split_once('\n').unwrap_or((&s, ""));
    if m % 2 == 0 {
        let Ok(parsed) = Policy::parse("fuzz", second) else {
            return;
        };
        let printed = parsed.to_toml();
        assert_eq!(
            Policy::parse("fuzz", &printed).as_ref(),
            Ok(&parsed),
            "{printed}"
        );
        let set = PolicySet::compile([&parsed]).expect("one policy is a set");
        let one = CompiledPolicy::compile(&parsed);
        let policies = [parsed];
        for resource in [first, "secret/a/b", "sys/seal", "secret"] {
            for cap in Capability::ALL {
                let decision = set.check(resource, cap);
                assert_eq!(decision, one.check(resource, cap));
                assert_eq!(
                    decision,
                    model_decision(&policies, resource, cap),
                    "{resource}"
                );
            }
        }
    } else {
        let pattern = first;
        let resource = second;
        if pattern.contains(['"', '\\']) || pattern.chars().any(char::is_control) {
            return;
        }
        let toml = format!("[[rule]]\npath = \"{pattern}\"\ncapabilities = [\"read\"]\n");
        let Ok(parsed) = Policy::parse("fuzz", &toml) else {
            return;
        };
        let allowed = CompiledPolicy::compile(&parsed)
            .check(resource, Capability::Read)
            .is_allowed();
        assert_eq!(
            allowed,
            model_glob_matches(pattern, resource),
            "{pattern} vs {resource}"
        );
    }
}

// ------------------------------------------------------------ jwt, jwks ---

/// The time the JWT target verifies at (2023-11-14).
pub const JWT_NOW: i64 = 1_700_000_000;

struct Signer {
    key: Ed25519KeyPair,
    jwks: Jwks,
    issuer: IssuerConfig,
}

fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a fixed seed");
        let x = URL_SAFE_NO_PAD.encode(key.public_key().as_ref());
        let doc = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"fuzz","use":"sig"}}]}}"#
        );
        let jwks = Jwks::parse(doc.as_bytes()).expect("the fixed key set parses");
        let issuer = IssuerConfig::new(
            "fuzz",
            "https://issuer.example",
            "keyward",
            JwksSource::File(PathBuf::from("/nonexistent/jwks.json")),
        )
        .expect("a valid issuer");
        Signer { key, jwks, issuer }
    })
}

/// JWT verification (`src/oidc/jwt.rs`). Mode 0: the input is the token.
/// Mode 1: `HEADER\0CLAIMS` (JSON), encoded and signed with the key the
/// issuer trusts, so the header and claims checks behind the signature are
/// reached; a token that verifies has a subject and has not expired.
pub fn jwt(data: &[u8]) {
    if let Some(Ok(verified)) = jwt_verify(data) {
        assert!(!verified.subject().is_empty());
        assert!(verified.expires_at_unix() > JWT_NOW - 60);
        assert_eq!(
            verified.claims().get("iss").and_then(|v| v.as_str()),
            Some("https://issuer.example")
        );
    }
}

/// What [`jwt`] verifies: `None` for an empty input.
pub fn jwt_verify(data: &[u8]) -> Option<Result<VerifiedJwt, OidcError>> {
    let (m, rest) = mode(data)?;
    let signer = signer();
    let token = if m % 2 == 0 {
        text(rest).into_owned()
    } else {
        let (header, claims) = match rest.iter().position(|b| *b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = signer.key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    };
    Some(keyward::oidc::verify(
        &token,
        &signer.issuer,
        &signer.jwks,
        JWT_NOW,
        60,
    ))
}

/// JWK Set documents (`src/oidc/jwks.rs`): a set that parses is not empty.
pub fn jwks(data: &[u8]) {
    if let Ok(set) = Jwks::parse(data) {
        assert!(!set.keys().is_empty());
        for key in set.keys() {
            let _ = (key.kid(), key.algorithm().name());
        }
    }
}

// ----------------------------------------------------------------- cert ---

/// Client-certificate names (`src/identity/login.rs` `cert_names`, and
/// `Dn` in `src/identity/dn.rs`, `check_spiffe_id` in `src/identity/mod.rs`). Mode 0: a
/// DER certificate; mode 1: a DN as text, whose normal form is a fixed point;
/// mode 2: a SPIFFE ID.
pub fn cert(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    match m % 3 {
        0 => {
            if let Some(names) = keyward::identity::login::cert_names(rest) {
                if let Some(subject) = &names.subject {
                    // Text refuses control characters a certificate may hold;
                    // any canonical text that parses gives the subject back.
                    if let Ok(back) = keyward::identity::Dn::parse(&subject.canonical()) {
                        assert_eq!(&back, subject);
                    }
                }
                for id in &names.spiffe_ids {
                    assert!(id.starts_with("spiffe://"));
                }
            }
        }
        1 => {
            let s = text(rest);
            if let Ok(dn) = keyward::identity::Dn::parse(&s) {
                let normal = dn.canonical();
                let again = keyward::identity::Dn::parse(&normal).map(|d| d.canonical());
                assert_eq!(again.ok().as_ref(), Some(&normal));
            }
        }
        _ => {
            let s = text(rest);
            if keyward::identity::check_spiffe_id(&s).is_ok() {
                assert!(s.starts_with("spiffe://") && s.len() > "spiffe://".len());
            }
        }
    }
}

// -------------------------------------------------------- duration, cron ---

/// Durations (`src/duration.rs`) and schedules (`src/rotation/schedule.rs`).
/// Mode 0: a duration, which prints back to itself. Mode 1: a schedule
/// (`every D`, `cron EXPR`) or a bare cron expression, whose next runs are
/// computed after a time taken from the first 8 bytes.
pub fn duration_cron(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    if m % 2 == 0 {
        let s = text(rest);
        if let Ok(d) = keyward::duration::parse(&s) {
            let printed = keyward::duration::format(d);
            assert_eq!(keyward::duration::parse(&printed), Ok(d), "{printed}");
        }
        if let Ok(ttl) = s.parse::<keyward::duration::TtlText>() {
            assert_eq!(ttl.to_string().parse(), Ok(ttl));
            assert!(ttl.as_secs() > 0);
        }
        return;
    }
    let (after, rest) = if rest.len() >= 8 {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&rest[..8]);
        // Up to the year 2255 or so: where the scheduler can be asked.
        (u64::from_le_bytes(raw) % 9_000_000_000_000, &rest[8..])
    } else {
        (1_700_000_000_000, rest)
    };
    let s = text(rest);
    for schedule in [Schedule::from_str(&s), Schedule::cron(&s)]
        .into_iter()
        .flatten()
    {
        assert_eq!(
            Schedule::from_parts(schedule.every_seconds(), schedule.cron_expression()).as_ref(),
            Ok(&schedule)
        );
        if let Ok(next) = schedule.next_after(after) {
            assert!(next > after || next == u64::MAX, "{next} <= {after}");
        }
        let _ = schedule.period_ms(after);
        let _ = schedule.max_jitter_ms(after);
    }
}

// ----------------------------------------------------------------- cidr ---

/// CIDR blocks (`src/cidr.rs`): the first three lines are two blocks and an
/// address. A block prints back to itself, holds its own network (unless
/// that is IPv4-mapped) and lies
/// within itself; when A lies within B, every address A holds, B holds.
pub fn cidr(data: &[u8]) {
    let s = text(data);
    let mut lines = s.split('\n');
    let a = lines.next().and_then(|t| Cidr::from_str(t).ok());
    let b = lines.next().and_then(|t| Cidr::from_str(t).ok());
    let addr = lines.next().and_then(|t| IpAddr::from_str(t).ok());
    for block in [a, b].into_iter().flatten() {
        let printed = block.to_string();
        assert_eq!(Cidr::from_str(&printed), Ok(block), "{printed}");
        assert!(block.within(&block));
        let network = printed
            .split_once('/')
            .and_then(|(n, _)| IpAddr::from_str(n).ok())
            .expect("a block prints its network");
        // An IPv6 block written around the IPv4-mapped space holds no IPv4
        // address, its own mapped network included (src/cidr.rs).
        let mapped = matches!(network, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
        assert!(mapped || block.contains(network), "{printed}");
    }
    if let (Some(a), Some(b)) = (a, b) {
        if a.within(&b) {
            for x in [
                addr,
                Some(IpAddr::from([10, 0, 0, 1])),
                Some("::1".parse().expect("ip")),
            ]
            .into_iter()
            .flatten()
            {
                assert!(!a.contains(x) || b.contains(x), "{a} within {b}, {x}");
            }
        }
    }
}

// ---------------------------------------------------------------- share ---

/// Unseal shares (`src/barrier/shamir.rs`). Mode 0: any text; a share that
/// parses prints back to the same text. Mode 1: 42 payload bytes given the
/// CRC the format documents, so the checks behind the checksum are reached.
pub fn share(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    let owned = if m % 2 == 1 && rest.len() >= 42 {
        let mut raw = rest[..42].to_vec();
        let crc = crc32fast::hash(&raw);
        raw.extend_from_slice(&crc.to_be_bytes());
        let built = format!("kwu1_{}", URL_SAFE_NO_PAD.encode(&raw));
        // Threshold (byte 8) and share number (byte 9) must not be 0.
        let valid = raw[8] != 0 && raw[9] != 0;
        assert_eq!(
            keyward::barrier::share_text_round_trip(&built).is_ok(),
            valid,
            "share with threshold {} and number {}",
            raw[8],
            raw[9]
        );
        built
    } else {
        text(rest).into_owned()
    };
    if let Ok(printed) = keyward::barrier::share_text_round_trip(&owned) {
        assert_eq!(printed.as_str(), owned.trim());
    }
}

// ---------------------------------------------------------------- audit ---

/// The audit chain verifier (`src/audit`, `keyward audit verify`). Mode 0:
/// the input is the file. Mode 1: each line is a record's body up to its
/// `prev`, which is completed with the `prev` and `hash` of a good chain, so
/// the checks behind the hashes are reached. Either way the report counts
/// every line, and a good report names no bad line.
pub fn audit(data: &[u8]) {
    let Some((m, rest)) = mode(data) else { return };
    let file = if m % 2 == 0 {
        rest.to_vec()
    } else {
        let mut file = Vec::new();
        let mut prev = [0u8; 32];
        for line in rest.split(|b| *b == b'\n') {
            let mut body = line.to_vec();
            body.extend_from_slice(b",\"prev\":\"");
            body.extend_from_slice(hex::encode(prev).as_bytes());
            body.push(b'"');
            let mut context = ring::digest::Context::new(&ring::digest::SHA256);
            context.update(&prev);
            context.update(&body);
            prev.copy_from_slice(context.finish().as_ref());
            file.extend_from_slice(&body);
            file.extend_from_slice(b",\"hash\":\"");
            file.extend_from_slice(hex::encode(prev).as_bytes());
            file.extend_from_slice(b"\"}\n");
        }
        file
    };
    let report = keyward::audit::verify_bytes(&file).expect("reading memory cannot fail");
    let newlines = file.iter().filter(|b| **b == b'\n').count() as u64;
    let torn = u64::from(file.last().is_some_and(|b| *b != b'\n'));
    assert_eq!(report.records, newlines + torn);
    assert_eq!(report.ok, report.first_bad.is_none());
    if let Some(bad) = report.first_bad {
        assert!(bad >= 1 && bad <= report.records);
    }
}
