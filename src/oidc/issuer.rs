//! A trusted OIDC issuer: who signs (`iss`), for whom (`aud`), and where its
//! keys are. Checked once at construction.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;

use super::OidcError;

/// One issuer keyward accepts tokens from, e.g. GitHub Actions with
/// `issuer_url = "https://token.actions.githubusercontent.com"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    name: String,
    issuer_url: String,
    audience: String,
    jwks: JwksSource,
}

/// Where an issuer's JWK Set comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JwksSource {
    /// A file written by the operator (no network at all).
    File(PathBuf),
    /// Fetched over HTTPS and cached.
    Url(HttpsUrl),
}

impl IssuerConfig {
    /// `issuer_url` must be an `https://` URL (OpenID Connect Discovery
    /// §3); it is compared with `iss` byte for byte and never fetched.
    pub fn new(
        name: impl Into<String>,
        issuer_url: impl Into<String>,
        audience: impl Into<String>,
        jwks: JwksSource,
    ) -> Result<Self, OidcError> {
        let (name, issuer_url, audience) = (name.into(), issuer_url.into(), audience.into());
        if name.is_empty() {
            return Err(OidcError::InvalidConfig("issuer name is empty"));
        }
        let Some(rest) = issuer_url.strip_prefix("https://") else {
            return Err(OidcError::InvalidConfig(
                "issuer URL must start with https://",
            ));
        };
        if rest.is_empty() || !issuer_url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(OidcError::InvalidConfig(
                "issuer URL needs a host and no spaces or control characters",
            ));
        }
        if audience.is_empty() {
            return Err(OidcError::InvalidConfig("audience is empty"));
        }
        Ok(Self {
            name,
            issuer_url,
            audience,
            jwks,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    pub fn jwks(&self) -> &JwksSource {
        &self.jwks
    }
}

/// An `https://host[:port][/path][?query]` URL, split for an HTTP/1.1 GET.
/// No user-info, no fragment, no spaces or control characters (nothing
/// that could be smuggled into the request line or a header).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpsUrl {
    text: String,
    /// Host name or IP address, without brackets.
    host: String,
    port: u16,
    /// Request target: path and query, starting with `/`.
    target: String,
}

impl HttpsUrl {
    pub fn parse(text: &str) -> Result<Self, OidcError> {
        let bad = |reason| Err(OidcError::InvalidConfig(reason));
        let Some(rest) = text
            .get(..8)
            .filter(|scheme| scheme.eq_ignore_ascii_case("https://"))
            .and_then(|_| text.get(8..))
        else {
            return bad("JWKS URL must start with https://");
        };
        if !text.bytes().all(|b| b.is_ascii_graphic()) || text.contains(['#', '\\']) {
            return bad("JWKS URL has a space, control character, fragment or backslash");
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split);
        if authority.contains('@') {
            return bad("JWKS URL must not carry user information");
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let Some((ip, after)) = bracketed.split_once(']') else {
                return bad("JWKS URL has an unclosed IPv6 bracket");
            };
            if ip.parse::<Ipv6Addr>().is_err() {
                return bad("JWKS URL has an invalid IPv6 address");
            }
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => return bad("JWKS URL has text after the IPv6 address"),
                },
            };
            (ip, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let host_ok = !host.is_empty()
            && (host.parse::<IpAddr>().is_ok()
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
        if !host_ok {
            return bad("JWKS URL has an invalid host");
        }
        let port = match port {
            None => 443,
            Some(digits) => match digits.parse::<u16>() {
                Ok(port) if port != 0 && digits.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return bad("JWKS URL has an invalid port"),
            },
        };
        let target = match target.strip_prefix('?') {
            Some(_) => format!("/{target}"),
            None if target.is_empty() => "/".to_owned(),
            None => target.to_owned(),
        };
        Ok(Self {
            text: text.to_owned(),
            host: host.to_owned(),
            port,
            target,
        })
    }

    /// Host name or IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Path and query, for the request line.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The `Host` header value.
    pub(crate) fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn https_urls_are_split_for_a_get() {
        let url = HttpsUrl::parse("https://token.actions.githubusercontent.com/.well-known/jwks")
            .unwrap();
        assert_eq!(url.host(), "token.actions.githubusercontent.com");
        assert_eq!(url.port(), 443);
        assert_eq!(url.target(), "/.well-known/jwks");
        assert_eq!(url.host_header(), "token.actions.githubusercontent.com");

        let url = HttpsUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (url.host(), url.port(), url.target()),
            ("127.0.0.1", 8443, "/")
        );
        assert_eq!(url.host_header(), "127.0.0.1:8443");

        let url = HttpsUrl::parse("https://[::1]:9000?x=1").unwrap();
        assert_eq!(
            (url.host(), url.port(), url.target()),
            ("::1", 9000, "/?x=1")
        );
        assert_eq!(url.host_header(), "[::1]:9000");
    }

    #[test]
    fn unsafe_or_broken_urls_are_refused() {
        for text in [
            "http://example.com/jwks",
            "https://",
            "https://user:pw@example.com/jwks",
            "https://example.com/jwks#frag",
            "https://example.com/a b",
            "https://example.com/a\r\nHost: evil",
            "https://example.com:0/",
            "https://example.com:99999/",
            "https://example.com:+80/",
            "https://[::1/",
            "https://exa_mple.com/",
            "https://[zz]/",
        ] {
            assert!(
                matches!(HttpsUrl::parse(text), Err(OidcError::InvalidConfig(_))),
                "{text:?} was accepted"
            );
        }
    }

    #[test]
    fn issuer_config_is_checked() {
        let jwks = JwksSource::File("/dev/null".into());
        assert!(IssuerConfig::new("gh", "https://issuer", "aud", jwks.clone()).is_ok());
        for (name, url, aud) in [
            ("", "https://issuer", "aud"),
            ("gh", "http://issuer", "aud"),
            ("gh", "https://", "aud"),
            ("gh", "https://iss uer", "aud"),
            ("gh", "https://issuer", ""),
        ] {
            assert!(
                IssuerConfig::new(name, url, aud, jwks.clone()).is_err(),
                "{name:?} {url:?} {aud:?} was accepted"
            );
        }
    }
}
