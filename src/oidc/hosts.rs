//! Which addresses a key set may be fetched from.
//!
//! An issuer admin chooses the JWKS URL, and every login makes the server
//! connect to it: without a rule that is a way to reach the server's own
//! loopback services, the private network behind it, and cloud metadata
//! endpoints (169.254.169.254). Unless `oidc.allow_private_hosts` is set,
//! keyward connects only to addresses that are routable on the public
//! Internet. The rule is applied to every address the host name resolves
//! to, and the connection goes to an address that was checked (never to a
//! second resolution), so a DNS answer that changes between the check and
//! the connection (rebinding) cannot get around it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why `ip` is not a public address, or `None` if it is one.
///
/// IPv4 addresses carried in IPv6 (IPv4-mapped `::ffff:a.b.c.d`, the
/// deprecated IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` and 6to4
/// `2002::/16`) are judged by the IPv4 address they carry.
pub(crate) fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    match (a, b) {
        _ if ip.is_unspecified() => Some("unspecified"),
        // 0.0.0.0/8: "this network" (Linux connects 0.x to the local host).
        (0, _) => Some("unspecified"),
        (127, _) => Some("loopback"),
        (10, _) | (192, 168) => Some("private"),
        (172, 16..=31) => Some("private"),
        (169, 254) => Some("link-local"),
        // 100.64.0.0/10: carrier-grade NAT, private to a provider's network.
        (100, 64..=127) => Some("shared (carrier-grade NAT)"),
        // 192.0.0.0/24 (IETF protocol assignments), 198.18.0.0/15 (benchmarking).
        (192, 0) if c == 0 => Some("reserved"),
        (198, 18..=19) => Some("reserved"),
        (224..=239, _) => Some("multicast"),
        // 240.0.0.0/4 and the broadcast address.
        (240..=255, _) => Some("reserved"),
        _ => None,
    }
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let embedded_v4 =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // ::ffff:a.b.c.d (IPv4-mapped).
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return non_public_v4(embedded_v4(s[6], s[7]));
    }
    // ::a.b.c.d (IPv4-compatible, deprecated; no host should use it).
    if s[..6] == [0; 6] {
        return Some("IPv4-compatible (deprecated)");
    }
    // 64:ff9b::a.b.c.d (NAT64, RFC 6052): the IPv4 host behind the gateway.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return non_public_v4(embedded_v4(s[6], s[7]));
    }
    // 64:ff9b:1::/48: NAT64 for local use (RFC 8215).
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some("private");
    }
    // 2002:aabb:ccdd::/48 (6to4): the IPv4 host a.b.c.d.
    if s[0] == 0x2002 {
        return non_public_v4(embedded_v4(s[1], s[2]));
    }
    match s[0] {
        0xfc00..=0xfdff => Some("private (unique local)"),
        0xfe80..=0xfebf => Some("link-local"),
        // fec0::/10: site-local, deprecated but still private.
        0xfec0..=0xfeff => Some("private (site-local)"),
        0xff00..=0xffff => Some("multicast"),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for refused in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::8.8.8.8",
            "64:ff9b::10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(non_public(ip).is_some(), "{refused} passed");
        }
        for allowed in [
            "8.8.8.8",
            "1.1.1.1",
            "140.82.112.3",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.1.1",
            "192.0.1.1",
            "198.20.0.1",
            "223.255.255.254",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "fbff::1",
        ] {
            let ip: IpAddr = allowed.parse().unwrap();
            assert_eq!(non_public(ip), None, "{allowed} was refused");
        }
    }
}
