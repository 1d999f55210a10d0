//! Host destinations as written in `hosts = [...]`: `local`, `web1`, `deploy@10.0.0.5:2222`,
//! `[2001:db8::1]:22`. Parsing refuses anything that could be read by `ssh` as an option or
//! that holds whitespace or control characters, so a destination is always one plain argument.

use std::fmt;

/// Where a host is reached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Destination {
    /// This machine, without SSH (same code path otherwise).
    Local,
    /// An OpenSSH destination.
    Ssh {
        user: Option<String>,
        host: String,
        port: Option<u16>,
    },
}

impl Destination {
    /// Parses one entry of `hosts`.
    pub fn parse(text: &str) -> Result<Destination, String> {
        if text == "local" {
            return Ok(Destination::Local);
        }
        if text.is_empty() {
            return Err("an empty host".into());
        }
        if text.starts_with('-') {
            return Err(format!(
                "`{text}` starts with '-' and would be read as an ssh option"
            ));
        }
        if let Some(c) = text
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || "'\"`$;&|<>(){}\\*?!#".contains(*c))
        {
            return Err(format!(
                "`{}` holds {:?}, which no host name or address contains",
                text.escape_debug(),
                c
            ));
        }
        let (user, rest) = match text.rsplit_once('@') {
            Some((u, r)) => {
                if u.is_empty() || u.contains('@') {
                    return Err(format!("`{text}`: bad user part"));
                }
                (Some(u.to_string()), r)
            }
            None => (None, text),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (h, after) = inner
                .split_once(']')
                .ok_or_else(|| format!("`{text}`: unclosed '['"))?;
            let port = match after {
                "" => None,
                p => Some(parse_port(text, p.strip_prefix(':').unwrap_or("x"))?),
            };
            (h.to_string(), port)
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(parse_port(text, p)?)),
                None => (rest.to_string(), None),
            }
        };
        if host.is_empty() || host.starts_with('-') {
            return Err(format!("`{text}`: missing host name"));
        }
        Ok(Destination::Ssh { user, host, port })
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Destination::Local)
    }
}

fn parse_port(text: &str, p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{text}`: port must be a number from 1 to 65535")),
        Ok(n) => Ok(n),
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Local => f.write_str("local"),
            Destination::Ssh { user, host, port } => {
                if let Some(u) = user {
                    write!(f, "{u}@")?;
                }
                if host.contains(':') {
                    write!(f, "[{host}]")?;
                } else {
                    f.write_str(host)?;
                }
                if let Some(p) = port {
                    write!(f, ":{p}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(Destination::parse("local").unwrap(), Destination::Local);
        assert_eq!(
            Destination::parse("deploy@10.0.0.5:2222").unwrap(),
            Destination::Ssh {
                user: Some("deploy".into()),
                host: "10.0.0.5".into(),
                port: Some(2222)
            }
        );
        assert_eq!(
            Destination::parse("[2001:db8::1]:22").unwrap().to_string(),
            "[2001:db8::1]:22"
        );
        assert_eq!(Destination::parse("web1").unwrap().to_string(), "web1");
    }

    #[test]
    fn refuses_option_injection_and_metacharacters() {
        for bad in [
            "-oProxyCommand=x",
            "a b",
            "web1;rm",
            "x$(id)",
            "h\nx",
            "u@-x",
            "h:0",
            "h:99999",
            "",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
