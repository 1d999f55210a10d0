//! `https://` repositories: TLS through rustls (ring), an access token from the environment
//! sent as HTTP Basic credentials only when the server asks for them, and error messages that
//! say what to do.
//!
//! The token is read from the environment inside gix's credential callback, handed to gix and
//! dropped: no struct here holds it, so it cannot reach a URL, a log line, an event, an error
//! or a `Debug` print.

use crate::GitError;
use gix::protocol::transport::client::blocking_io::http as gix_http;
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};

/// The variable the token is read from when `[build] token_env` is not set.
pub const DEFAULT_TOKEN_ENV: &str = "CUTOVER_GIT_TOKEN";
/// The HTTP Basic username sent with the token when `[build] token_user` is not set. GitHub
/// takes any non-empty username with a token (and documents this one for app tokens); GitLab
/// and Gitea accept a token with any username too; Bitbucket wants `x-token-auth`.
pub const DEFAULT_TOKEN_USER: &str = "x-access-token";

/// How to reach an `https://` repository. Holds the *name* of the token's variable, never
/// the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsOptions {
    /// The environment variable that holds the access token.
    pub token_env: String,
    /// The HTTP Basic username sent with the token.
    pub token_user: String,
    /// PEM file with the only CAs trusted for this repository (like git's `http.sslCAInfo`);
    /// `None`: the system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured).
    pub ca_file: Option<PathBuf>,
}

impl Default for HttpsOptions {
    fn default() -> Self {
        HttpsOptions {
            token_env: DEFAULT_TOKEN_ENV.into(),
            token_user: DEFAULT_TOKEN_USER.into(),
            ca_file: None,
        }
    }
}

/// What happened with credentials during one fetch (to explain a failure).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum AuthState {
    /// The server never asked.
    #[default]
    NotAsked,
    /// The server asked and the variable was unset or empty.
    Missing,
    /// The token was sent.
    Sent,
    /// The token was sent and the server refused it.
    Rejected,
}

/// rustls needs one crypto provider for the process; cutover uses ring (reqwest is built
/// without a provider of its own).
pub(crate) fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err: something else installed one first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Reads the CA file (before connecting, so a bad path is its own clear error).
pub(crate) fn load_ca(
    opts: &HttpsOptions,
    url: &str,
) -> Result<Option<Vec<reqwest::Certificate>>, GitError> {
    let Some(path) = &opts.ca_file else {
        return Ok(None);
    };
    let ferr = |message: String| GitError::Fetch {
        url: url.to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| {
        ferr(format!(
            "cannot read [build] ca_file {}: {e}",
            path.display()
        ))
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        ferr(format!(
            "[build] ca_file {} is not a PEM certificate bundle: {e}",
            path.display()
        ))
    })?;
    if certs.is_empty() {
        return Err(ferr(format!(
            "[build] ca_file {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(Some(certs))
}

/// gix's HTTP options for the reqwest backend: `ca` (when given) are the only trusted roots.
pub(crate) fn transport_options(
    repo: &gix::Repository,
    url: &str,
    ca: Option<Vec<reqwest::Certificate>>,
) -> Box<dyn std::any::Any> {
    use gix::bstr::ByteSlice;
    let mut opts = repo
        .transport_options(url.as_bytes().as_bstr(), None)
        .ok()
        .flatten()
        .and_then(|o| o.downcast::<gix_http::Options>().ok())
        .map(|o| *o)
        .unwrap_or_default();
    if opts.user_agent.is_none() {
        opts.user_agent = Some(format!("cutover/{}", env!("CARGO_PKG_VERSION")));
    }
    let backend = gix_http::reqwest::Options {
        configure_client: Some(Box::new(
            move |builder: reqwest::blocking::ClientBuilder| {
                Ok(match &ca {
                    Some(certs) => builder.tls_certs_only(certs.iter().cloned()),
                    None => builder,
                })
            },
        )),
        configure_request: None,
    };
    opts.backend =
        Some(Arc::new(Mutex::new(backend)) as Arc<Mutex<dyn std::any::Any + Send + Sync>>);
    Box::new(opts)
}

/// gix's credential callback: on `Get`, the token from `opts.token_env` as the password of
/// `opts.token_user`; records what happened in `state`.
pub(crate) fn credentials<'a>(
    opts: &'a HttpsOptions,
    state: &'a Cell<AuthState>,
) -> impl FnMut(
    gix::credentials::helper::Action,
) -> gix::Result<Option<gix::credentials::protocol::Outcome>>
       + 'a {
    use gix::credentials::helper::Action;
    use gix::error::ErrorExt;
    move |action| match action {
        Action::Get(ctx) => {
            let token = std::env::var(&opts.token_env).unwrap_or_default();
            if token.trim().is_empty() {
                state.set(AuthState::Missing);
                return Err(gix::error::message!(
                    "the server asks for credentials and {} is not set",
                    opts.token_env
                )
                .raise());
            }
            state.set(AuthState::Sent);
            Ok(Some(gix::credentials::protocol::Outcome {
                identity: gix::sec::identity::Account {
                    username: opts.token_user.clone(),
                    password: token.trim().to_string(),
                    oauth_refresh_token: None,
                },
                next: ctx.into(),
            }))
        }
        Action::Erase(_) => {
            state.set(AuthState::Rejected);
            Ok(None)
        }
        Action::Store(_) => Ok(None),
    }
}

/// The message for a failed https fetch: what happened and what to do, from the credential
/// state and gix's error chain (which never holds the token: gix only ever saw it as a
/// password).
pub(crate) fn explain(opts: &HttpsOptions, state: AuthState, chain: &str) -> String {
    let var = &opts.token_env;
    match state {
        AuthState::Missing => {
            return format!(
                "the server asks for credentials (HTTP 401) and the environment variable {var} is not set; put an access token that can read the repository in {var}{}",
                if var == DEFAULT_TOKEN_ENV {
                    " (or name another variable with [build] token_env)"
                } else {
                    " ([build] token_env)"
                }
            )
        }
        AuthState::Rejected => {
            return format!(
                "the server refused the token in {var} (HTTP 401 Unauthorized, sent as user {:?}): check that it is valid, not expired and allowed to read this repository{}",
                opts.token_user,
                if opts.token_user == DEFAULT_TOKEN_USER {
                    "; if the server wants a particular username, set [build] token_user"
                } else {
                    ""
                }
            )
        }
        AuthState::NotAsked | AuthState::Sent => {}
    }
    let lower = chain.to_ascii_lowercase();
    let ca_hint = match &opts.ca_file {
        Some(p) => format!("it is not signed by a CA in [build] ca_file {}", p.display()),
        None => "it is not signed by a CA this machine trusts; for a private CA set [build] ca_file to its PEM file (or SSL_CERT_FILE)".into(),
    };
    let tls = if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        Some(format!(
            "TLS: the server's certificate is not trusted: {ca_hint}"
        ))
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        Some("TLS: the server's certificate is not valid for this host name (check the host in [build] repo)".into())
    } else if lower.contains("expired") && lower.contains("certificate") {
        Some("TLS: the server's certificate has expired (or this machine's clock is wrong)".into())
    } else if lower.contains("notyetvalid") {
        Some(
            "TLS: the server's certificate is not valid yet (or this machine's clock is wrong)"
                .into(),
        )
    } else if lower.contains("invalid peer certificate") || lower.contains("invalidcertificate") {
        Some(format!(
            "TLS: the server's certificate was refused: {ca_hint}"
        ))
    } else if lower.contains("corrupt message")
        || lower.contains("invalidcontenttype")
        || lower.contains("received corrupt")
    {
        Some(
            "TLS: the server did not answer with TLS (is it plain http, or the wrong port?)".into(),
        )
    } else {
        None
    };
    let status = if lower.contains("http status 403") {
        Some(format!(
            "the server refused access (HTTP 403){}",
            if state == AuthState::Sent {
                format!(": the token in {var} is valid but may not read this repository")
            } else {
                String::new()
            }
        ))
    } else if lower.contains("http status 404") {
        Some("the server has no repository at this URL (HTTP 404); check [build] repo".into())
    } else {
        None
    };
    match tls.or(status) {
        Some(what) => format!("{what} ({chain})"),
        None => chain.to_string(),
    }
}
