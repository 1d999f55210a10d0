//! Address ranges in CIDR notation, as `[proxy] trusted_proxies` lists them: `10.0.0.0/8`,
//! `2001:db8::/32`, or one address (`192.0.2.7`, a range of one). The edge proxy matches
//! client addresses against them (`cutover_proxy::ProxyConfig::trusted_proxies`); this is
//! where they are read and checked.

use std::fmt;
use std::net::IpAddr;

/// A validated address range: `addr` has no bits set past `prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Reads `10.0.0.0/8`, `2001:db8::/32` or a bare address. The error says what is wrong:
    /// a range with bits set past its prefix (`10.1.2.3/8`) is refused with the range it
    /// probably means, rather than silently widened or narrowed.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| {
            format!("expected an address or a range like \"10.0.0.0/8\", got {s:?}")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("{s:?}: the prefix must be 0 to {max}")),
            },
        };
        let c = Cidr { addr, prefix };
        let network = c.network();
        if network != addr {
            return Err(format!(
                "{s:?} has bits set past its /{prefix} prefix: did you mean \"{network}/{prefix}\"?"
            ));
        }
        Ok(c)
    }

    /// `addr` with every bit past the prefix cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_single_addresses_are_read_and_written_back() {
        for (text, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.0.2.7", "192.0.2.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1/128"),
            ("173.245.48.0/20", "173.245.48.0/20"),
        ] {
            assert_eq!(Cidr::parse(text).unwrap().to_string(), shown, "{text}");
        }
    }

    #[test]
    fn bad_ranges_say_what_is_wrong() {
        assert_eq!(
            Cidr::parse("10.1.2.3/8").unwrap_err(),
            "\"10.1.2.3/8\" has bits set past its /8 prefix: did you mean \"10.0.0.0/8\"?"
        );
        assert_eq!(
            Cidr::parse("10.0.0.0/33").unwrap_err(),
            "\"10.0.0.0/33\": the prefix must be 0 to 32"
        );
        assert_eq!(
            Cidr::parse("2001:db8::/+32").unwrap_err(),
            "\"2001:db8::/+32\": the prefix must be 0 to 128"
        );
        for bad in [
            "",
            "lb.example.com",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/8/8",
            " 10.0.0.1",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?}");
        }
    }
}
