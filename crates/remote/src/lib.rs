//! Hosts as values. A [`Script`] is the only way a command line is built: a static template
//! whose `{name}` placeholders are filled with values quoted by [`quote`], the one quoting
//! function in cutover. A [`Remote`] runs scripts on a host: [`ssh::SshHost`] over one
//! multiplexed OpenSSH connection per host per run (strict host keys always), [`local::LocalHost`]
//! on this machine through the same `sh -c` path.
//!
//! **Invariant:** no other crate formats a shell command. Templates are `&'static str`, so data
//! from a config, a host or a user can only ever arrive as a quoted value.

pub mod local;
pub mod ssh;

use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

/// POSIX single-quoting: the result is one word for `sh`, whatever `s` holds.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// A value for a script placeholder: one word, or a list of words (each quoted, joined by
/// spaces: for argument lists such as `-e K=V` pairs).
#[derive(Clone, Copy)]
pub enum Arg<'a> {
    One(&'a str),
    Many(&'a [String]),
}

/// A shell script for `sh -c`, built from a static template and quoted values.
#[derive(Clone, PartialEq, Eq)]
pub struct Script {
    template: &'static str,
    text: String,
}

impl Script {
    /// Fills `{name}` placeholders in `template` with `quote(value)`. Panics (a programming
    /// error, caught by tests) if a placeholder has no value or a value no placeholder.
    pub fn new(template: &'static str, values: &[(&str, &str)]) -> Script {
        let args: Vec<(&str, Arg<'_>)> = values.iter().map(|(k, v)| (*k, Arg::One(v))).collect();
        Script::with(template, &args)
    }

    /// Like [`Script::new`], with list values: `{name}` bound to `Arg::Many(words)` becomes
    /// the words, each quoted, separated by spaces.
    pub fn with(template: &'static str, values: &[(&str, Arg<'_>)]) -> Script {
        let mut text = String::with_capacity(template.len() + 64);
        let mut used = vec![false; values.len()];
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('}') else { break };
            let name = &after[..end];
            let is_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit());
            if !is_name {
                text.push_str(&rest[..start + 1]);
                rest = after;
                continue;
            }
            let (i, (_, v)) = values
                .iter()
                .enumerate()
                .find(|(_, (k, _))| *k == name)
                .unwrap_or_else(|| panic!("script placeholder {{{name}}} has no value"));
            used[i] = true;
            text.push_str(&rest[..start]);
            match v {
                Arg::One(v) => text.push_str(&quote(v)),
                Arg::Many(words) => {
                    let quoted: Vec<String> = words.iter().map(|w| quote(w)).collect();
                    text.push_str(&quoted.join(" "));
                }
            }
            rest = &after[end + 1..];
        }
        text.push_str(rest);
        if let Some(i) = used.iter().position(|u| !u) {
            panic!("script value {} is not used by the template", values[i].0);
        }
        Script { template, text }
    }

    /// The script text (already quoted) for `sh -c`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The whole remote command line: `sh -c '<script>'`.
    pub fn command_line(&self) -> String {
        format!("sh -c {}", quote(&self.text))
    }
}

/// Shows the template, never the values: values may be secrets (container env).
impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Script({:?}, values redacted)", self.template)
    }
}

/// What a script printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// stderr, else stdout, trimmed to its last lines: for messages.
    pub fn tail(&self) -> String {
        let s = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let lines: Vec<&str> = s.trim().lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

/// Where a forwarded port can be reached from this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Why a host could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("{host}: host key is not known (strict checking is always on). The host offered {fingerprint}. If that is right, add it to your known_hosts (e.g. `ssh-keyscan` and compare the fingerprint out of band)")]
    HostKeyUnknown { host: String, fingerprint: String },
    #[error("{host}: HOST KEY CHANGED: the host offered {fingerprint}, which is not the key in known_hosts. Refusing to connect. If the host was reinstalled, remove the old key (`ssh-keygen -R`) and add the new one after checking it")]
    HostKeyChanged { host: String, fingerprint: String },
    #[error("{host}: unreachable: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("{host}: authentication failed: {detail}")]
    AuthFailed { host: String, detail: String },
    #[error("{host}: {detail}")]
    Other { host: String, detail: String },
}

/// A host cutover can run scripts on.
pub trait Remote: Send + Sync {
    /// The host's name as written in the config.
    fn name(&self) -> &str;
    /// Opens the connection (one per host per run). Errors say which host and why.
    fn connect(&self) -> Result<(), RemoteError>;
    /// Runs `script` with `sh -c`, feeding `stdin` if given.
    fn run(
        &self,
        script: &Script,
        stdin: Option<&mut (dyn Read + Send)>,
    ) -> Result<Output, RemoteError>;
    /// Makes `host:port`, as the remote host sees it, reachable from here.
    fn forward(&self, host: &str, port: u16) -> Result<Endpoint, RemoteError>;
    /// Closes the connection and every forward.
    fn close(&self);
    /// What the open connection negotiated that is worth a line in the run's events (for
    /// SSH, the cipher); empty when there is nothing to say.
    fn link(&self) -> String {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh_echo(value: &str) -> String {
        let s = Script::new("printf '%s' {v}", &[("v", value)]);
        let out = Command::new("sh").arg("-c").arg(s.text()).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn quoted_values_reach_sh_unchanged() {
        for v in [
            "plain",
            "it's",
            "$(touch /tmp/pwned)",
            "a; rm -rf /",
            "new\nline",
            "  spaces  ",
            "`id`",
            "\\'\"",
            "",
            "*",
            "-n",
        ] {
            assert_eq!(sh_echo(v), v, "value {v:?}");
        }
    }

    #[test]
    fn command_line_survives_a_second_shell() {
        // ssh hands the command line to the login shell, which runs sh -c <script>.
        let s = Script::new("printf '%s' {v}", &[("v", "it's $(x); y")]);
        let out = Command::new("sh")
            .arg("-c")
            .arg(s.command_line())
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "it's $(x); y");
    }

    #[test]
    fn braces_that_are_not_placeholders_stay() {
        let s = Script::new("f() { echo {a}; }; f", &[("a", "x")]);
        assert_eq!(s.text(), "f() { echo 'x'; }; f");
    }

    #[test]
    fn lists_are_quoted_word_by_word_and_debug_hides_values() {
        let words = vec!["-e".to_string(), "TOKEN=it's secret".to_string()];
        let s = Script::with("printf '%s|' {args}", &[("args", Arg::Many(&words))]);
        let out = Command::new("sh").arg("-c").arg(s.text()).output().unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "-e|TOKEN=it's secret|"
        );
        assert!(!format!("{s:?}").contains("secret"));
    }

    #[test]
    #[should_panic(expected = "has no value")]
    fn missing_value_panics() {
        Script::new("echo {a}", &[]);
    }
}
