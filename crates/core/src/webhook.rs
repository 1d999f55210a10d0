//! `[webhook]`: which forge signs the pushes of an app, where the server finds the secret
//! (an environment variable's name, never the value), which branch deploys, and optionally
//! the token and API for commit statuses.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWebhook {
    provider: Option<String>,
    secret_env: Option<String>,
    branch: Option<String>,
    status_token_env: Option<String>,
    api_url: Option<String>,
}

/// The forge whose deliveries an app accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Github,
    Gitea,
    Gitlab,
}

impl Provider {
    pub fn parse(text: &str) -> Option<Provider> {
        match text {
            "github" => Some(Provider::Github),
            "gitea" => Some(Provider::Gitea),
            "gitlab" => Some(Provider::Gitlab),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitea => "gitea",
            Provider::Gitlab => "gitlab",
        }
    }
}

/// A validated `[webhook]`. It holds names of variables, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub provider: Provider,
    /// The server's environment variable holding the shared secret.
    pub secret_env: String,
    /// A push to `refs/heads/<branch>` deploys.
    pub branch: String,
    /// The variable holding a token for commit statuses (optional).
    pub status_token_env: Option<String>,
    /// The forge's API base URL, for statuses.
    pub api_url: Option<String>,
}

fn env_name(key: &str, v: &str) -> Result<String, (String, String)> {
    let b = v.as_bytes();
    let ok = !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if ok {
        Ok(v.to_string())
    } else {
        Err((
            key.into(),
            format!("expected the name of an environment variable, like \"SITE_WEBHOOK_SECRET\", got {v:?}"),
        ))
    }
}

pub(crate) fn parse_webhook(w: RawWebhook) -> Result<WebhookConfig, (String, String)> {
    let provider = match w.provider.as_deref() {
        None => {
            return Err((
                "webhook.provider".into(),
                "expected \"github\", \"gitea\" or \"gitlab\"".into(),
            ))
        }
        Some(p) => Provider::parse(p).ok_or_else(|| {
            (
                "webhook.provider".to_string(),
                format!("expected \"github\", \"gitea\" or \"gitlab\", got {p:?}"),
            )
        })?,
    };
    let secret_env = match w.secret_env.as_deref() {
        None => {
            return Err((
                "webhook.secret_env".into(),
                "expected the name of the server's environment variable holding the secret, e.g. \"SITE_WEBHOOK_SECRET\" (the secret itself never goes in a file)".into(),
            ))
        }
        Some(v) => env_name("webhook.secret_env", v)?,
    };
    let branch = w.branch.unwrap_or_else(|| "main".into());
    if branch.is_empty()
        || branch.starts_with("refs/")
        || branch.starts_with('-')
        || branch.contains("..")
        || branch
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
    {
        return Err((
            "webhook.branch".into(),
            format!("expected a branch name like \"main\" (without refs/heads/), got {branch:?}"),
        ));
    }
    let status_token_env = match w.status_token_env.as_deref() {
        None => None,
        Some(v) => Some(env_name("webhook.status_token_env", v)?),
    };
    let api_url = match w.api_url {
        None => None,
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => {
            Some(u.trim_end_matches('/').to_string())
        }
        Some(u) => {
            return Err((
                "webhook.api_url".into(),
                format!("expected an http(s) URL like \"https://api.github.com\", got {u:?}"),
            ))
        }
    };
    Ok(WebhookConfig {
        provider,
        secret_env,
        branch,
        status_token_env,
        api_url,
    })
}

#[cfg(test)]
mod tests {
    use crate::{Config, ConfigError};
    use std::path::Path;

    const BASE: &str = r#"
app = "site"
hosts = ["web1"]
[files]
root = "/srv/site"
[health]
url = "http://127.0.0.1/up"
"#;

    fn parse(webhook: &str) -> Result<Config, ConfigError> {
        Config::parse(
            Path::new("/etc/site/cutover.toml"),
            &format!("{BASE}[webhook]\n{webhook}"),
            None,
        )
    }

    #[test]
    fn a_webhook_section_names_variables_never_secrets() {
        let c = parse("provider = \"gitea\"\nsecret_env = \"SITE_HOOK\"\nbranch = \"release\"\nstatus_token_env = \"FORGE_TOKEN\"\napi_url = \"https://git.example.com/api/v1/\"").unwrap();
        let w = c.webhook.unwrap();
        assert_eq!(w.provider, super::Provider::Gitea);
        assert_eq!(
            (w.secret_env.as_str(), w.branch.as_str()),
            ("SITE_HOOK", "release")
        );
        assert_eq!(w.status_token_env.as_deref(), Some("FORGE_TOKEN"));
        assert_eq!(w.api_url.as_deref(), Some("https://git.example.com/api/v1"));
        let d = parse("provider = \"github\"\nsecret_env = \"S\"").unwrap();
        assert_eq!(d.webhook.unwrap().branch, "main");
        assert!(parse("").is_err());
        assert_eq!(
            Config::parse(Path::new("/c.toml"), BASE, None)
                .unwrap()
                .webhook,
            None
        );
    }

    #[test]
    fn bad_values_and_unknown_keys_name_the_key() {
        let key = |text: &str| parse(text).unwrap_err().key;
        assert_eq!(
            key("provider = \"bitbucket\"\nsecret_env = \"S\""),
            "webhook.provider"
        );
        assert_eq!(key("secret_env = \"S\""), "webhook.provider");
        assert_eq!(key("provider = \"github\""), "webhook.secret_env");
        assert_eq!(
            key("provider = \"github\"\nsecret_env = \"hunter2 is the secret\""),
            "webhook.secret_env"
        );
        assert_eq!(
            key("provider = \"github\"\nsecret_env = \"S\"\nbranch = \"refs/heads/main\""),
            "webhook.branch"
        );
        assert_eq!(
            key("provider = \"github\"\nsecret_env = \"S\"\nstatus_token_env = \"a-b\""),
            "webhook.status_token_env"
        );
        assert_eq!(
            key("provider = \"github\"\nsecret_env = \"S\"\napi_url = \"ftp://x\""),
            "webhook.api_url"
        );
        let e = parse("provider = \"github\"\nsecret_env = \"S\"\nsecret = \"x\"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/site/cutover.toml: unknown field `secret`, expected one of `provider`, `secret_env`, `branch`, `status_token_env`, `api_url` (line 11, column 1)"
        );
    }
}
