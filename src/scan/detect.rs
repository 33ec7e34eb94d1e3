//! The detectors: exact shapes of well-known credentials in a text, and the
//! candidate values worth asking the server about.
//!
//! Precision first: each detector names a prefix and an exact alphabet and
//! length (and for keyward tokens the CRC), a JWT must decode to a JSON
//! header with `alg`, a PEM block must have a body. No generic entropy
//! finding is ever reported; entropy only decides which candidate values
//! are sent for a fingerprint match ([`worth_checking`]).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use zeroize::Zeroizing;

/// What a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `kwt_` + 43 base62 + a 6-character CRC32 (checked).
    KeywardToken,
    /// `kws_` + 43 base64url characters (256 bits).
    KeywardSecretId,
    /// AWS access key id: `AKIA`/`ASIA` + 16 base32 capitals.
    AwsAccessKey,
    /// GitHub `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_` + 36, `github_pat_` + 82.
    GithubToken,
    /// GitLab `glpat-` personal access token.
    GitlabToken,
    /// Slack `xoxb-`/`xoxp-`/`xoxa-`/`xoxr-`/`xoxs-`/`xoxe-`.
    SlackToken,
    /// Stripe `sk_live_`/`rk_live_`.
    StripeKey,
    /// A PEM block whose label ends in `PRIVATE KEY`, with a body.
    PrivateKey,
    /// Three base64url parts whose header is JSON naming `alg`.
    Jwt,
    /// A value the server holds a fingerprint of (set by the caller, not
    /// by a detector).
    StoredSecret,
}

impl Kind {
    /// The rule id in SARIF and JSON output.
    pub const fn rule_id(self) -> &'static str {
        match self {
            Kind::KeywardToken => "keyward-token",
            Kind::KeywardSecretId => "keyward-secret-id",
            Kind::AwsAccessKey => "aws-access-key-id",
            Kind::GithubToken => "github-token",
            Kind::GitlabToken => "gitlab-token",
            Kind::SlackToken => "slack-token",
            Kind::StripeKey => "stripe-live-key",
            Kind::PrivateKey => "private-key",
            Kind::Jwt => "jwt",
            Kind::StoredSecret => "keyward-stored-secret",
        }
    }

    /// One line for people.
    pub const fn description(self) -> &'static str {
        match self {
            Kind::KeywardToken => "keyward token (checksum valid)",
            Kind::KeywardSecretId => "keyward secret-id",
            Kind::AwsAccessKey => "AWS access key id",
            Kind::GithubToken => "GitHub token",
            Kind::GitlabToken => "GitLab personal access token",
            Kind::SlackToken => "Slack token",
            Kind::StripeKey => "Stripe live secret or restricted key",
            Kind::PrivateKey => "private key (PEM block)",
            Kind::Jwt => "JSON Web Token",
            Kind::StoredSecret => "value of a secret stored in keyward",
        }
    }

    /// Every kind, for the SARIF rule table.
    pub const ALL: [Kind; 10] = [
        Kind::KeywardToken,
        Kind::KeywardSecretId,
        Kind::AwsAccessKey,
        Kind::GithubToken,
        Kind::GitlabToken,
        Kind::SlackToken,
        Kind::StripeKey,
        Kind::PrivateKey,
        Kind::Jwt,
        Kind::StoredSecret,
    ];
}

/// One detector hit: the kind, the 1-based line and the text found.
pub struct Hit {
    pub kind: Kind,
    pub line: u64,
    /// The credential text (zeroized on drop; `Debug` hides it).
    pub text: Zeroizing<String>,
}

impl std::fmt::Debug for Hit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hit")
            .field("kind", &self.kind)
            .field("line", &self.line)
            .field("text", &"[redacted]")
            .finish()
    }
}

/// A value found in a text that may be a stored secret's value.
pub struct Candidate {
    pub line: u64,
    pub value: Zeroizing<String>,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate")
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

/// Shortest candidate value checked (characters).
pub const MIN_CANDIDATE_CHARS: usize = 12;
/// Longest candidate value checked (bytes); longer ones are not sent.
pub const MAX_CANDIDATE_BYTES: usize = 1024;
/// Fewest distinct characters of a candidate.
const MIN_DISTINCT: usize = 8;
/// Least Shannon entropy of a candidate's characters, bits per character.
const MIN_BITS_PER_CHAR: f64 = 3.0;
/// Least estimated entropy of the whole candidate, bits.
const MIN_TOTAL_BITS: f64 = 48.0;

/// Whether `value` is long and random-looking enough to be checked against
/// the stored fingerprints: at least [`MIN_CANDIDATE_CHARS`] characters,
/// [`MIN_DISTINCT`] distinct ones, [`MIN_BITS_PER_CHAR`] bits of Shannon
/// entropy per character and [`MIN_TOTAL_BITS`] in all. The client filters
/// with it and the server refuses to check anything it rejects, so the match
/// cannot be used to confirm short or guessable values one by one.
pub fn worth_checking(value: &str) -> bool {
    let chars = value.chars().count();
    if chars < MIN_CANDIDATE_CHARS || value.len() > MAX_CANDIDATE_BYTES {
        return false;
    }
    // Counts per character: an array for ASCII (nearly every candidate), a
    // map otherwise.
    let counts: Vec<u32> = if value.is_ascii() {
        let mut table = [0u32; 128];
        for b in value.bytes() {
            table[usize::from(b)] += 1;
        }
        table.into_iter().filter(|k| *k > 0).collect()
    } else {
        let mut map: std::collections::HashMap<char, u32> = std::collections::HashMap::new();
        for c in value.chars() {
            *map.entry(c).or_default() += 1;
        }
        map.into_values().collect()
    };
    if counts.len() < MIN_DISTINCT {
        return false;
    }
    let n = chars as f64;
    let bits: f64 = counts
        .iter()
        .map(|&k| {
            let p = f64::from(k) / n;
            -p * p.log2()
        })
        .sum();
    bits >= MIN_BITS_PER_CHAR && bits * n >= MIN_TOTAL_BITS
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Every `prefix` in `line` that starts a word (the byte before it is not a
/// letter, digit, `_` or `-`), with the maximal run of `alphabet` after it.
fn prefixed<'a>(
    line: &'a str,
    prefix: &'static str,
    alphabet: fn(u8) -> bool,
) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    let bytes = line.as_bytes();
    let prefix_len = prefix.len();
    line.match_indices(prefix).filter_map(move |(at, _)| {
        if at > 0 && is_base64url(bytes[at - 1]) {
            return None;
        }
        let start = at + prefix_len;
        let end = bytes[start..]
            .iter()
            .position(|b| !alphabet(*b))
            .map_or(bytes.len(), |n| start + n);
        Some((&line[at..end], &line[start..end]))
    })
}

/// A run of one character class is not a credential body.
fn mixed(body: &str) -> bool {
    let b = body.as_bytes();
    b.iter().any(u8::is_ascii_digit) && b.iter().any(u8::is_ascii_alphabetic)
}

fn aws_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}

/// The single-line detectors over one line.
fn line_hits(line: &str, out: &mut Vec<(Kind, String)>) {
    for (whole, _) in prefixed(line, "kwt_", is_base62) {
        if crate::token::format::looks_like_token(whole) {
            out.push((Kind::KeywardToken, whole.to_owned()));
        }
    }
    for (whole, body) in prefixed(line, "kws_", is_base64url) {
        // 43 characters of 6 bits carry 258: the last one's low 2 bits are
        // zero in an encoding of 32 bytes.
        let last_ok = body
            .bytes()
            .last()
            .and_then(base64_index)
            .is_some_and(|i| i % 4 == 0);
        if body.len() == 43 && last_ok && mixed(body) {
            out.push((Kind::KeywardSecretId, whole.to_owned()));
        }
    }
    for prefix in ["AKIA", "ASIA"] {
        for (whole, body) in prefixed(line, prefix, aws_char) {
            // The id is base32: capitals and 2-7.
            if body.len() == 16
                && body
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
            {
                out.push((Kind::AwsAccessKey, whole.to_owned()));
            }
        }
    }
    for prefix in ["ghp_", "gho_", "ghu_", "ghs_", "ghr_"] {
        for (whole, body) in prefixed(line, prefix, is_base62) {
            if body.len() == 36 && mixed(body) {
                out.push((Kind::GithubToken, whole.to_owned()));
            }
        }
    }
    for (whole, body) in prefixed(line, "github_pat_", |b| is_base62(b) || b == b'_') {
        if body.len() == 82 && body.as_bytes().get(22) == Some(&b'_') && mixed(body) {
            out.push((Kind::GithubToken, whole.to_owned()));
        }
    }
    for (whole, body) in prefixed(line, "glpat-", is_base64url) {
        if (20..=100).contains(&body.len()) && mixed(body) {
            out.push((Kind::GitlabToken, whole.to_owned()));
        }
    }
    for prefix in ["xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-", "xoxe-"] {
        for (whole, body) in prefixed(line, prefix, |b| is_base62(b) || b == b'-') {
            let parts: Vec<&str> = body.split('-').collect();
            let first_ok = parts
                .first()
                .is_some_and(|p| p.len() >= 8 && p.bytes().all(|b| b.is_ascii_digit()));
            let last_ok = parts
                .last()
                .is_some_and(|p| p.len() >= 16 && p.bytes().all(is_base62));
            if parts.len() >= 3 && first_ok && last_ok && body.len() <= 255 {
                out.push((Kind::SlackToken, whole.to_owned()));
            }
        }
    }
    for prefix in ["sk_live_", "rk_live_"] {
        for (whole, body) in prefixed(line, prefix, is_base62) {
            if (24..=247).contains(&body.len()) && mixed(body) {
                out.push((Kind::StripeKey, whole.to_owned()));
            }
        }
    }
    for (whole, _) in prefixed(line, "eyJ", |b| is_base64url(b) || b == b'.') {
        if is_jwt(whole) {
            out.push((Kind::Jwt, whole.to_owned()));
        }
    }
}

fn base64_index(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    }
}

/// Three base64url parts; the header decodes to a JSON object with a string
/// `alg`, the payload to a JSON object; the signature is empty only for
/// `alg: none`.
fn is_jwt(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        return false;
    };
    let object = |part: &str| -> Option<serde_json::Map<String, serde_json::Value>> {
        let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            serde_json::Value::Object(map) => Some(map),
            _ => None,
        }
    };
    let Some(head) = object(header) else {
        return false;
    };
    let Some(alg) = head.get("alg").and_then(|a| a.as_str()) else {
        return false;
    };
    if object(payload).is_none() {
        return false;
    }
    if signature.is_empty() {
        return alg.eq_ignore_ascii_case("none");
    }
    URL_SAFE_NO_PAD
        .decode(signature)
        .is_ok_and(|s| s.len() >= 16)
}

/// The kinds of PEM block that hold a private key.
fn private_key_begin(line: &str) -> Option<usize> {
    let at = line.find("-----BEGIN ")?;
    let rest = &line[at + 11..];
    let end = rest.find("-----")?;
    let label = &rest[..end];
    let ok = label.ends_with("PRIVATE KEY") || label == "PGP PRIVATE KEY BLOCK";
    ok.then_some(at + 11 + end + 5)
}

/// Whether `text` starts with a base64 body line of a PEM block (at least
/// 40 characters of the standard alphabet).
fn pem_body(text: &str) -> bool {
    let text = text.trim_start();
    text.starts_with("Proc-Type:")
        || text
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/' || *b == b'=')
            .count()
            >= 40
}

/// Runs every detector over `lines` (line number, text); the number is the
/// one reported. A PEM block is found on its BEGIN line when the next line
/// (or, in a JSON or YAML string, the text after a literal `\n`) is a body.
pub fn detect(lines: &[(u64, &str)]) -> Vec<Hit> {
    let mut hits = Vec::new();
    let mut found = Vec::new();
    for (i, (number, line)) in lines.iter().enumerate() {
        found.clear();
        line_hits(line, &mut found);
        if let Some(after) = private_key_begin(line) {
            let rest = &line[after..];
            let inline = rest
                .strip_prefix("\\n")
                .or_else(|| rest.strip_prefix("\\r\\n"));
            let body = match inline {
                Some(inline) => pem_body(inline),
                None => lines.get(i + 1).is_some_and(|(_, next)| pem_body(next)),
            };
            if body {
                let text = line[..after]
                    .trim_start_matches(|c: char| c != '-')
                    .to_owned();
                found.push((Kind::PrivateKey, text));
            }
        }
        for (kind, text) in found.drain(..) {
            hits.push(Hit {
                kind,
                line: *number,
                text: Zeroizing::new(text),
            });
        }
    }
    hits
}

/// [`detect`] over a whole text, lines numbered from 1.
pub fn detect_text(text: &str) -> Vec<Hit> {
    let lines: Vec<(u64, &str)> = text.lines().zip(1u64..).map(|(l, n)| (n, l)).collect();
    detect(&lines)
}

/// Strips one pair of matching quotes.
fn unquote(value: &str) -> &str {
    let v = value.trim();
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

/// The values a line may carry: the right side of `KEY=VALUE` (`.env`,
/// shell, properties) and `key: value` (YAML), and every quoted string
/// (JSON, code, YAML). Only those [`worth_checking`] are kept.
fn line_candidates(line: &str, out: &mut Vec<String>) {
    let trimmed = line.trim_start();
    let trimmed = trimmed.strip_prefix("export ").unwrap_or(trimmed);
    let trimmed = trimmed.strip_prefix("- ").unwrap_or(trimmed);
    if !trimmed.starts_with('#') && !trimmed.starts_with("//") {
        for sep in ['=', ':'] {
            if let Some(at) = trimmed.find(sep) {
                let key = trimmed[..at].trim();
                let key_ok = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.\"' ".contains(&b));
                if key_ok {
                    let value = unquote(&trimmed[at + 1..]);
                    let value = value.split(" #").next().unwrap_or(value).trim();
                    out.push(value.to_owned());
                }
            }
        }
    }
    for q in ['"', '\''] {
        let mut parts = line.split(q);
        parts.next();
        // Every other piece is inside the quotes.
        while let Some(inside) = parts.next() {
            out.push(inside.to_owned());
            if parts.next().is_none() {
                break;
            }
        }
    }
}

/// The candidate values of `lines` worth a fingerprint match, each once per
/// line.
pub fn candidates(lines: &[(u64, &str)]) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut values = Vec::new();
    for (number, line) in lines {
        if line.len() > 64 * 1024 {
            continue;
        }
        values.clear();
        line_candidates(line, &mut values);
        values.sort_unstable();
        values.dedup();
        for v in values.drain(..) {
            if worth_checking(&v) {
                out.push(Candidate {
                    line: *number,
                    value: Zeroizing::new(v),
                });
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<Kind> {
        detect_text(text).iter().map(|h| h.kind).collect()
    }

    fn token() -> String {
        crate::token::format::TokenSecret::generate()
            .unwrap()
            .expose()
            .to_owned()
    }

    #[test]
    fn a_keyward_token_is_found_and_a_wrong_checksum_is_not() {
        let t = token();
        let hits = detect_text(&format!("KEYWARD_TOKEN={t}\n"));
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].kind, Kind::KeywardToken);
        assert_eq!(hits[0].text.as_str(), t);
        // One character changed: the CRC no longer matches.
        let mut bad = t.clone().into_bytes();
        bad[10] = if bad[10] == b'a' { b'b' } else { b'a' };
        let bad = String::from_utf8(bad).unwrap();
        assert!(kinds(&format!("x = \"{bad}\"")).is_empty());
        // Truncated, extended, or glued to a word: not a token.
        assert!(kinds(&t[..t.len() - 1]).is_empty());
        assert!(kinds(&format!("{t}A")).is_empty());
        assert!(kinds(&format!("x{t}")).is_empty());
    }

    #[test]
    fn secret_ids_need_the_exact_shape() {
        let body = URL_SAFE_NO_PAD.encode([0x5au8; 32].map(|b| b ^ 0x33));
        let sid = format!(
            "kws_{}",
            URL_SAFE_NO_PAD.encode(b"0123456789abcdefghijklmnopqrstuv")
        );
        assert_eq!(kinds(&format!("sid: {sid}")), [Kind::KeywardSecretId]);
        assert!(kinds(&format!("kws_{}", &body[..42])).is_empty());
        assert!(kinds(&format!("{sid}x")).is_empty());
        // 43 characters whose last one cannot end 32 bytes.
        let mut odd = sid.clone();
        odd.pop();
        odd.push('B');
        assert!(kinds(&odd).is_empty());
    }

    #[test]
    fn aws_keys_need_sixteen_base32_capitals() {
        assert_eq!(
            kinds("aws_access_key_id = AKIAIOSFODNN7EXAMPLE"),
            [Kind::AwsAccessKey]
        );
        assert_eq!(kinds("ASIAY34FZKBOKMUTVV7A"), [Kind::AwsAccessKey]);
        // Wrong length, lower case, a digit outside base32, glued to a word.
        for look_alike in [
            "AKIAIOSFODNN7EXAMPL",
            "AKIAIOSFODNN7EXAMPLEX",
            "AKIAiosfodnn7example",
            "AKIAIOSFODNN1EXAMPLE",
            "XAKIAIOSFODNN7EXAMPLE",
        ] {
            assert!(kinds(look_alike).is_empty(), "{look_alike}");
        }
    }

    #[test]
    fn source_host_chat_and_payment_tokens() {
        assert_eq!(
            kinds("token: ghp_1234567890abcdefABCDEF1234567890abcd"),
            [Kind::GithubToken]
        );
        assert!(kinds("ghp_1234567890abcdefABCDEF1234567890abc").is_empty());
        let pat = format!(
            "github_pat_{}_{}",
            "11ABCDEFG0abcdefghijkl",
            "a1".repeat(29) + "b"
        );
        assert_eq!(kinds(&pat), [Kind::GithubToken]);
        assert_eq!(kinds("glpat-xR4nd0mT0kenV4lue123"), [Kind::GitlabToken]);
        assert!(kinds("glpat-short1").is_empty());
        assert_eq!(
            kinds("SLACK=xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
            [Kind::SlackToken]
        );
        assert!(kinds("xoxb-not-a-token").is_empty());
        assert_eq!(kinds("sk_live_4eC39HqLyjWDarjtT1zdp7dc"), [Kind::StripeKey]);
        assert_eq!(kinds("rk_live_4eC39HqLyjWDarjtT1zdp7dc"), [Kind::StripeKey]);
        // Test keys are not live keys.
        assert!(kinds("sk_test_4eC39HqLyjWDarjtT1zdp7dc").is_empty());
    }

    /// A PEM block of `label` around `body`, put together at run time so
    /// that no file of the repository holds a key-looking block.
    fn armour(label: &str, body: &str) -> String {
        let dashes = "-----";
        format!("{dashes}BEGIN {label}{dashes}\n{body}\n{dashes}END {label}{dashes}\n")
    }

    /// 40 random bytes in standard base64: a body no detector can tell
    /// from a real key's first line.
    fn random_body() -> String {
        let mut bytes = [0u8; 40];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn private_keys_need_a_body() {
        let private = ["RSA", "PRIVATE KEY"].join(" ");
        assert_eq!(kinds(&armour(&private, &random_body())), [Kind::PrivateKey]);
        let pkcs8 = "PRIVATE KEY";
        let json = format!(
            r#"{{"key": "{}"}}"#,
            armour(pkcs8, &random_body()).replace('\n', "\\n")
        );
        assert_eq!(kinds(&json), [Kind::PrivateKey]);
        // A parser's constant, a public key, a certificate: no finding.
        let header = armour(pkcs8, "");
        let header = header.lines().next().unwrap();
        assert!(kinds(&format!("const BEGIN: &str = \"{header}\";\nfn x() {{}}\n")).is_empty());
        assert!(kinds(&armour("PUBLIC KEY", &random_body())).is_empty());
        assert!(kinds(&armour("CERTIFICATE", &random_body())).is_empty());
    }

    #[test]
    fn jwts_need_a_json_header_with_alg() {
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"svc","iat":1700000000}"#);
        let sig = URL_SAFE_NO_PAD.encode([7u8; 32]);
        assert_eq!(
            kinds(&format!("Authorization: Bearer {head}.{body}.{sig}")),
            [Kind::Jwt]
        );
        let no_alg = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT"}"#);
        assert!(kinds(&format!("{no_alg}.{body}.{sig}")).is_empty());
        // Two parts, or a header that is not JSON.
        assert!(kinds(&format!("{head}.{body}")).is_empty());
        assert!(kinds(&format!("eyJhbGciOi.{body}.{sig}")).is_empty());
    }

    #[test]
    fn random_high_entropy_non_secrets_are_not_findings() {
        use ring::rand::{SecureRandom, SystemRandom};
        let rng = SystemRandom::new();
        let mut text = String::new();
        for i in 0..200 {
            let mut bytes = [0u8; 48];
            rng.fill(&mut bytes).unwrap();
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
            let git = &sha[..40];
            let uuid = uuid::Uuid::new_v4();
            text.push_str(&format!(
                "blob{i}: {b64}\nsha256 = \"{sha}\"\ncommit {git}\nid: {uuid}\n"
            ));
        }
        // A base64 PNG image as in a data: URL.
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        let mut noise = [0u8; 600];
        rng.fill(&mut noise).unwrap();
        png.extend_from_slice(&noise);
        text.push_str(&format!(
            "<img src=\"data:image/png;base64,{}\">\n",
            base64::engine::general_purpose::STANDARD.encode(&png)
        ));
        assert!(kinds(&text).is_empty());
    }

    #[test]
    fn candidates_come_from_assignments_and_strings_and_skip_weak_ones() {
        let text = "DB_PASSWORD=Xq8#tLm2!vR9pZ4w\n\
                    short: abc123\n\
                    repeat=aaaaaaaaaaaaaaaaaaaaaaaa\n\
                    {\"api_key\": \"9fK2mQ7xLp3Rt8Vw\"}\n\
                    # comment=Zz9Yy8Xx7Ww6Vv5U\n\
                    password: 'hunter2'\n";
        let lines: Vec<(u64, &str)> = text.lines().zip(1u64..).map(|(l, n)| (n, l)).collect();
        let found: Vec<(u64, String)> = candidates(&lines)
            .into_iter()
            .map(|c| (c.line, c.value.to_string()))
            .collect();
        assert!(found.contains(&(1, "Xq8#tLm2!vR9pZ4w".into())), "{found:?}");
        assert!(found.contains(&(4, "9fK2mQ7xLp3Rt8Vw".into())), "{found:?}");
        assert!(
            found.iter().all(|(l, _)| *l != 2 && *l != 3 && *l != 6),
            "{found:?}"
        );
        assert!(!worth_checking("password1234"));
        assert!(!worth_checking("abcabcabcabcabcabc"));
        assert!(worth_checking("Xq8#tLm2!vR9pZ4w"));
    }

    #[test]
    fn debug_hides_the_text() {
        let t = token();
        let hits = detect_text(&t);
        let shown = format!("{hits:?}");
        assert!(!shown.contains(&t[4..]), "{shown}");
    }
}
