//! Distinguished names as structure: a set of RDNs, each a set of
//! (attribute type OID, value). A certificate binding by subject is parsed
//! from its RFC 4514 text once, when it is made, and a certificate's subject
//! is read attribute by attribute from its DER; the two are compared as
//! structures, never as text joined and split again (a value may hold a
//! comma: `CN=web\,O=acme` is one attribute, not two).
//!
//! RDN order is not significant (certificates list them either way); the
//! grouping of attributes into RDNs is. Values compare exactly.

use std::fmt::Write as _;

use super::{IdentityError, MAX_TEXT};

/// Short names accepted in a DN's text, with their OIDs. The first name of
/// an OID is the one [`Dn::canonical`] writes.
const NAMES: &[(&str, &str)] = &[
    ("CN", "2.5.4.3"),
    ("SN", "2.5.4.4"),
    ("SERIALNUMBER", "2.5.4.5"),
    ("C", "2.5.4.6"),
    ("L", "2.5.4.7"),
    ("ST", "2.5.4.8"),
    ("STREET", "2.5.4.9"),
    ("O", "2.5.4.10"),
    ("OU", "2.5.4.11"),
    ("TITLE", "2.5.4.12"),
    ("GN", "2.5.4.42"),
    ("DC", "0.9.2342.19200300.100.1.25"),
    ("UID", "0.9.2342.19200300.100.1.1"),
    ("EMAILADDRESS", "1.2.840.113549.1.9.1"),
    ("E", "1.2.840.113549.1.9.1"),
    ("DOMAINCOMPONENT", "0.9.2342.19200300.100.1.25"),
];

/// One attribute of an RDN.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnAttribute {
    /// Dotted OID, e.g. `2.5.4.3`.
    pub oid: String,
    pub value: String,
}

/// A distinguished name as a set of RDNs (each sorted, and sorted among
/// themselves), so equal names are equal values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dn(Vec<Vec<DnAttribute>>);

fn bad(why: &str) -> IdentityError {
    IdentityError::Invalid(format!(
        "subject must be an RFC 4514 DN such as 'CN=ci,O=acme' ({why})"
    ))
}

fn oid_of(name: &str) -> Option<String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let ok = name
            .split('.')
            .all(|arc| !arc.is_empty() && arc.len() <= 20)
            && name.contains('.');
        return ok.then(|| name.to_owned());
    }
    NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, oid)| (*oid).to_owned())
}

fn name_of(oid: &str) -> &str {
    NAMES
        .iter()
        .find(|(_, o)| *o == oid)
        .map_or(oid, |(n, _)| *n)
}

impl Dn {
    /// Builds a DN from RDNs of (OID, value), sorting as equality needs.
    pub fn from_rdns(rdns: Vec<Vec<DnAttribute>>) -> Option<Self> {
        if rdns.is_empty() || rdns.iter().any(Vec::is_empty) {
            return None;
        }
        let mut rdns: Vec<Vec<DnAttribute>> = rdns
            .into_iter()
            .map(|mut rdn| {
                rdn.sort();
                rdn
            })
            .collect();
        // Sorted by their text, so that a name of single-attribute RDNs
        // without special characters keeps the text (and so the storage
        // key) earlier releases gave it.
        rdns.sort_by_cached_key(|rdn| rdn_text(rdn));
        Some(Self(rdns))
    }

    pub fn rdns(&self) -> &[Vec<DnAttribute>] {
        &self.0
    }

    /// Parses RFC 4514 text: `TYPE=VALUE` attributes, `+` within an RDN,
    /// `,` between RDNs, `\` escapes (`\,` or `\2C`). TYPE is a short name
    /// (`CN`, `O`, `OU`, ...) or a dotted OID. Spaces around separators are
    /// ignored; an escaped space is kept. Hex values (`#...`) are refused.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        if text.len() > MAX_TEXT || text.chars().any(char::is_control) {
            return Err(bad("at most 1024 bytes, no control characters"));
        }
        let bytes = text.as_bytes();
        let mut rdns: Vec<Vec<DnAttribute>> = Vec::new();
        let mut rdn: Vec<DnAttribute> = Vec::new();
        let mut attributes = 0usize;
        let mut i = 0;
        loop {
            // The type, up to '='.
            let start = i;
            while i < bytes.len() && bytes[i] != b'=' {
                i += 1;
            }
            if i == bytes.len() {
                return Err(bad("an attribute has no '='"));
            }
            let name = text[start..i].trim();
            let oid = oid_of(name).ok_or_else(|| bad("unknown attribute type"))?;
            i += 1;
            // The value, up to an unescaped ',' or '+'.
            let mut value: Vec<u8> = Vec::new();
            let mut trailing_spaces = 0usize;
            let mut end = None;
            while i < bytes.len() {
                let b = bytes[i];
                match b {
                    b',' | b'+' => {
                        end = Some(b);
                        i += 1;
                        break;
                    }
                    b'\\' => {
                        let next = *bytes
                            .get(i + 1)
                            .ok_or_else(|| bad("a '\\' ends the text"))?;
                        if b" \"#+,;<=>\\".contains(&next) {
                            value.push(next);
                            i += 2;
                        } else {
                            let hex = text
                                .get(i + 1..i + 3)
                                .and_then(|h| u8::from_str_radix(h, 16).ok())
                                .ok_or_else(|| bad("a bad escape"))?;
                            value.push(hex);
                            i += 3;
                        }
                        trailing_spaces = 0;
                    }
                    b' ' if value.is_empty() => i += 1,
                    b' ' => {
                        value.push(b);
                        trailing_spaces += 1;
                        i += 1;
                    }
                    b'"' | b';' | b'<' | b'>' => {
                        return Err(bad("escape '\"', ';', '<' and '>' with '\\'"))
                    }
                    b'#' if value.is_empty() => {
                        return Err(bad("give the value as text, not as #hex"))
                    }
                    _ => {
                        value.push(b);
                        trailing_spaces = 0;
                        i += 1;
                    }
                }
            }
            value.truncate(value.len() - trailing_spaces);
            let value = String::from_utf8(value).map_err(|_| bad("a value is not UTF-8"))?;
            if value.is_empty() || value.chars().any(char::is_control) {
                return Err(bad("an attribute has an empty value"));
            }
            rdn.push(DnAttribute { oid, value });
            // Counted per attribute, however they are grouped, so the limit
            // does not depend on their order (the canonical text sorts them).
            attributes += 1;
            if attributes > super::MAX_LIST {
                return Err(bad("too many attributes"));
            }
            match end {
                Some(b'+') => {}
                Some(_) => rdns.push(std::mem::take(&mut rdn)),
                None => {
                    rdns.push(rdn);
                    break;
                }
            }
        }
        let dn = Self::from_rdns(rdns).ok_or_else(|| bad("empty"))?;
        // The canonical text (long attribute names, escapes) can be longer
        // than what was typed; it must parse again, so it keeps the limit.
        if dn.canonical().len() > MAX_TEXT {
            return Err(bad("at most 1024 bytes once written in canonical form"));
        }
        Ok(dn)
    }

    /// The subject of a parsed certificate; `None` if an attribute's value
    /// is not a string (such a subject matches no binding).
    pub fn from_x509(name: &x509_parser::x509::X509Name<'_>) -> Option<Self> {
        let mut rdns = Vec::new();
        for rdn in name.iter() {
            let mut attrs = Vec::new();
            for attr in rdn.iter() {
                attrs.push(DnAttribute {
                    oid: attr.attr_type().to_id_string(),
                    value: attr.as_str().ok()?.to_owned(),
                });
            }
            rdns.push(attrs);
        }
        Self::from_rdns(rdns)
    }

    /// RFC 4514 text in one canonical form (short names, sorted, every
    /// special character escaped): what `identity get` shows and what the
    /// binding's storage key is made of. Escaping makes it one-to-one with
    /// the structure.
    pub fn canonical(&self) -> String {
        self.0
            .iter()
            .map(|rdn| rdn_text(rdn))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn rdn_text(rdn: &[DnAttribute]) -> String {
    rdn.iter()
        .map(|a| format!("{}={}", name_of(&a.oid), escape(&a.value)))
        .collect::<Vec<_>>()
        .join("+")
}

/// RFC 4514 escaping of a value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '\\' | ',' | '+' | '"' | ';' | '<' | '>' => {
                out.push('\\');
                out.push(c);
            }
            '#' | ' ' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\{b:02X}");
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Found by fuzzing: `E=` is written `EMAILADDRESS=` in canonical form,
    /// so a name near the length limit grew past it and its canonical text
    /// no longer parsed.
    #[test]
    fn every_parsed_name_s_canonical_text_parses_back() {
        let long = (0..60)
            .map(|i| format!("E=a{i:010}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(long.len() <= MAX_TEXT);
        let refused = Dn::parse(&long).unwrap_err();
        assert!(refused.to_string().contains("canonical"), "{refused}");
        // The attribute limit holds however the attributes are grouped
        // (also found by fuzzing: 64 single RDNs and one more at the end
        // passed, while the sorted canonical text put a `+` group last).
        let many = (0..65)
            .map(|i| format!("CN=a{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(Dn::parse(&many).is_err());
        let fits = (0..20)
            .map(|i| format!("E=a{i:010}"))
            .collect::<Vec<_>>()
            .join(",");
        let dn = Dn::parse(&fits).unwrap();
        assert_eq!(Dn::parse(&dn.canonical()).unwrap(), dn);
    }

    #[test]
    fn parses_escapes_and_compares_as_structure() {
        let plain = Dn::parse("CN=web, O=acme").unwrap();
        assert_eq!(plain, Dn::parse("O=acme,CN=web").unwrap());
        assert_eq!(plain.canonical(), "CN=web,O=acme");
        let one = Dn::parse("CN=web\\,O=acme").unwrap();
        assert_eq!(one.rdns().len(), 1);
        assert_eq!(one.rdns()[0][0].value, "web,O=acme");
        assert_ne!(one, plain);
        assert_ne!(one.canonical(), plain.canonical());
        assert_eq!(Dn::parse(&one.canonical()).unwrap(), one);
        assert_eq!(Dn::parse("CN=web\\2cO=acme").unwrap(), one);
        assert_eq!(Dn::parse("2.5.4.3=web,o=acme").unwrap(), plain);
        let multi = Dn::parse("CN=web+O=acme").unwrap();
        assert_ne!(multi, plain, "RDN grouping counts");
        assert_eq!(Dn::parse(&multi.canonical()).unwrap(), multi);
        assert_eq!(Dn::parse("CN=\\ a \\ ").unwrap().rdns()[0][0].value, " a  ");
        for bad in [
            "", "CN", "CN=", "X=1", "CN=a;O=b", "CN=#00", "CN=a\\", "CN=a\\zz",
        ] {
            assert!(Dn::parse(bad).is_err(), "{bad}");
        }
    }
}
