//! `Cidr`: an IPv4 or IPv6 network such as `10.0.0.0/8` or `::1/128`, for
//! binding tokens and secret-ids to source addresses.
//!
//! The two families are kept apart. An IPv4 block holds IPv4 addresses,
//! also when they arrive IPv4-mapped (`::ffff:a.b.c.d`, as on a dual-stack
//! socket); an IPv6 block holds IPv6 addresses other than IPv4-mapped ones.
//! A block written in IPv4-mapped form is normalised when parsed:
//! `::ffff:a.b.c.d/N` with N >= 96 lies inside the mapped space and is the
//! IPv4 block `a.b.c.d/(N-96)`; with N < 96 it is an IPv6 block (wider than
//! the whole mapped space, e.g. `::ffff:10.0.0.0/8` is `::/8`) and holds no
//! IPv4 address. So one block lies within another only inside one family,
//! and `within` agrees with `contains`: every address a block holds, a block
//! it lies within holds too.

use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a CIDR block such as 10.0.0.0/8 or ::1/128")]
pub struct BadCidr(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

fn mask_v4(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask_v6(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address; any other as it is.
fn unmapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

impl Cidr {
    /// Whether `addr` is inside this network. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) is taken as its IPv4 address, so only an IPv4
    /// block holds it.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.contains_network(unmapped(addr))
    }

    /// Whether every address this block holds, `outer` holds too (a child
    /// token's binding against its parent's). Only within one family: an
    /// IPv6 block (even one around the IPv4-mapped space) is never within an
    /// IPv4 one, nor the reverse.
    pub fn within(&self, outer: &Cidr) -> bool {
        let same_family = self.network.is_ipv4() == outer.network.is_ipv4();
        same_family && self.prefix >= outer.prefix && outer.contains_network(self.network)
    }

    /// Whether `network` matches this block's network under this block's
    /// prefix, in the same family (no mapping: parsing has normalised both).
    fn contains_network(&self, network: IpAddr) -> bool {
        match (self.network, network) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = mask_v4(self.prefix);
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = mask_v6(self.prefix);
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }

    /// Whether any of `blocks` holds `addr`; an empty list holds everything.
    pub fn any_contains(blocks: &[Cidr], addr: Option<IpAddr>) -> bool {
        if blocks.is_empty() {
            return true;
        }
        match addr {
            Some(a) => blocks.iter().any(|b| b.contains(a)),
            None => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(text.chars().take(64).collect());
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            // Digits only: `u8::from_str` would also take `+8`.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
            None => max,
        };
        // `::ffff:a.b.c.d/N`: inside the mapped space (N >= 96) it is the
        // IPv4 block a.b.c.d/(N-96); wider, it stays an IPv6 block.
        Ok(match unmapped(network) {
            IpAddr::V4(v4) if network.is_ipv6() && prefix >= 96 => Self {
                network: IpAddr::V4(v4),
                prefix: prefix - 96,
            },
            _ => Self { network, prefix },
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn contains_follows_the_prefix() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::any_contains(&[], None));
        assert!(!Cidr::any_contains(&[one], None));
    }

    #[test]
    fn refuses_bad_blocks() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x/1",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "::ffff:10.0.0.0/129",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv4_mapped_blocks_are_normalised() {
        for (text, normal) in [
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:10.1.0.0/112", "10.1.0.0/16"),
            ("::ffff:127.0.0.1", "127.0.0.1/32"),
            ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
            // Wider than the mapped space: an IPv6 block.
            ("::ffff:10.0.0.0/95", "::ffff:10.0.0.0/95"),
            ("::ffff:10.0.0.0/8", "::ffff:10.0.0.0/8"),
            ("::1/128", "::1/128"),
        ] {
            assert_eq!(cidr(text).to_string(), normal, "{text}");
        }
        let mapped = cidr("::ffff:10.0.0.0/104");
        assert_eq!(mapped, cidr("10.0.0.0/8"));
        assert!(mapped.contains(ip("10.9.8.7")));
        assert!(mapped.contains(ip("::ffff:10.9.8.7")));
        assert!(!mapped.contains(ip("11.0.0.1")));
    }

    /// The example: `::ffff:10.0.0.0/8` is the IPv6 block `::/8`
    /// (which holds `::1`), so it is not within `10.0.0.0/8`.
    #[test]
    fn a_wide_mapped_block_is_not_within_an_ipv4_block() {
        let parent = cidr("10.0.0.0/8");
        let child = cidr("::ffff:10.0.0.0/8");
        assert!(child.contains(ip("::1")) && !parent.contains(ip("::1")));
        assert!(!child.within(&parent));
        assert!(!cidr("::/0").within(&parent));
        assert!(!cidr("::ffff:0.0.0.0/95").within(&cidr("0.0.0.0/0")));
        // Nor the reverse: an IPv6 block holds no IPv4 address.
        assert!(!parent.within(&cidr("::/0")));
        assert!(!cidr("::/0").contains(ip("10.0.0.1")));
        assert!(!cidr("::/0").contains(ip("::ffff:10.0.0.1")));
        // The narrow mapped form is the IPv4 block, and within it.
        assert!(cidr("::ffff:10.1.0.0/112").within(&parent));
        assert!(cidr("10.1.0.0/16").within(&cidr("::ffff:10.0.0.0/104")));
        assert!(!cidr("::ffff:11.0.0.0/104").within(&parent));
        assert!(cidr("fd00::1/128").within(&cidr("fd00::/8")));
        assert!(!cidr("fd00::/8").within(&cidr("fd00::1/128")));
    }

    /// xorshift64*: random enough for choosing test cases, and no crate.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
    }

    /// The addresses the brute force tries: 32 each of IPv4, IPv4-mapped,
    /// unique-local IPv6 and low IPv6 (`::`, `::1`, ...).
    fn universe() -> Vec<IpAddr> {
        (0u8..32)
            .flat_map(|i| {
                [
                    ip(&format!("10.0.0.{i}")),
                    ip(&format!("::ffff:10.0.0.{i}")),
                    ip(&format!("fd00::{i:x}")),
                    ip(&format!("::{i:x}")),
                ]
            })
            .collect()
    }

    /// A random block around the universe: narrow ones that lie inside it
    /// (`small`: every address they hold is in the universe) and wide ones
    /// of every family and form.
    fn random_block(rng: &mut Rng) -> (Cidr, bool) {
        let i = rng.below(32);
        let (text, small) = match rng.below(4) {
            0 => {
                let prefix = rng.pick(&[0, 8, 24, 27, 28, 30, 31, 32]);
                (format!("10.0.0.{i}/{prefix}"), prefix >= 27)
            }
            1 => {
                let prefix = rng.pick(&[0, 8, 95, 96, 104, 123, 126, 128]);
                (format!("::ffff:10.0.0.{i}/{prefix}"), prefix >= 123)
            }
            2 => {
                let prefix = rng.pick(&[0, 8, 96, 123, 125, 127, 128]);
                (format!("fd00::{i:x}/{prefix}"), prefix >= 123)
            }
            _ => {
                let prefix = rng.pick(&[0, 8, 95, 96, 123, 124, 128]);
                (format!("::{i:x}/{prefix}"), prefix >= 123)
            }
        };
        (cidr(&text), small)
    }

    /// By brute force over random pairs: `within` never says yes when the
    /// child holds an address the parent does not (soundness), and for
    /// blocks small enough to enumerate it says yes exactly when the child
    /// holds nothing the parent does not.
    #[test]
    fn within_agrees_with_contains_by_brute_force() {
        let universe = universe();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut exact = 0;
        for _ in 0..20_000 {
            let (child, child_small) = random_block(&mut rng);
            let (parent, parent_small) = random_block(&mut rng);
            let escapes = universe
                .iter()
                .find(|a| child.contains(**a) && !parent.contains(**a));
            if child.within(&parent) {
                assert_eq!(escapes, None, "{child} within {parent}");
            } else if child_small && parent_small {
                assert!(escapes.is_some(), "{child} not within {parent}");
                exact += 1;
            }
            assert!(child.within(&child), "{child}");
        }
        assert!(exact > 1_000, "too few exact cases: {exact}");
    }
}
