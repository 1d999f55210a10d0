//! TLS to PostgreSQL with rustls (ring), no OpenSSL: the libpq URL parameters a managed
//! database's documentation gives (`sslmode`, `sslrootcert`), read here because
//! tokio-postgres (under the sync `postgres` client) knows only `disable|prefer|require` and verifies nothing itself.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default, as libpq's) | if the server offers it | not checked |
//! | `require` | always | not checked (checked as `verify-ca` if `sslrootcert` is given, as libpq does) |
//! | `verify-ca` | always | signed by a root of `sslrootcert` |
//! | `verify-full` | always | signed by a root of `sslrootcert`, and for the URL's host |
//!
//! `sslrootcert` is a PEM file of root certificates, or `system` for the operating system's
//! roots; without it `verify-ca`/`verify-full` use `~/.postgresql/root.crt`, as libpq does.

use postgres::config::SslMode;
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `sslmode=`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A database URL split into what tokio-postgres reads and what this module does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The URL without `sslmode` and `sslrootcert`.
    pub(crate) url: String,
    pub(crate) mode: Mode,
    pub(crate) root: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of `url`'s query; `Err` says what is wrong with them
/// (the URL is not repeated: the caller names it without its password).
pub(crate) fn parse(url: &str) -> Result<Parsed, String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => {
                mode = Some(match v {
                    "disable" => Mode::Disable,
                    "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(format!(
                    "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
                ))
                    }
                })
            }
            "sslrootcert" => root = Some(decode(v)),
            _ => kept.push(pair),
        }
    }
    let mode = match (mode, &root) {
        (None, _) => Mode::Prefer,
        // libpq: a root file given with `require` is used to verify the chain.
        (Some(Mode::Require), Some(_)) => Mode::VerifyCa,
        (Some(m), _) => m,
    };
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Parsed { url, mode, root })
}

/// `%XX` escapes of a URL parameter decoded (a path with spaces or `&`).
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// tokio-postgres's mode for ours: every verifying mode requires TLS.
pub(crate) fn ssl_mode(m: Mode) -> SslMode {
    match m {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots `root` names (see the module's docs).
fn roots(root: Option<&str>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    if root == Some("system") {
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = store.add(c);
        }
        if store.is_empty() {
            return Err("sslrootcert=system: no root certificates found on this system".into());
        }
        return Ok(store);
    }
    let path = match root {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::var_os("HOME")
            .map(|h| std::path::Path::new(&h).join(".postgresql/root.crt"))
            .ok_or("sslrootcert is not set and there is no HOME for ~/.postgresql/root.crt")?,
    };
    let shown = path.display();
    let pem =
        std::fs::read(&path).map_err(|e| format!("sslrootcert {shown}: cannot read it: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("sslrootcert {shown}: not a PEM file of certificates: {e}"))?;
    for c in certs {
        store
            .add(c)
            .map_err(|e| format!("sslrootcert {shown}: not a usable root certificate: {e}"))?;
    }
    if store.is_empty() {
        return Err(format!("sslrootcert {shown}: holds no certificate"));
    }
    Ok(store)
}

/// The connector for `mode` (`Disable`: never used, tokio-postgres does not ask).
pub(crate) fn connector(mode: Mode, root: Option<&str>) -> Result<MakeRustls, String> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        Mode::Disable | Mode::Prefer | Mode::Require => Arc::new(Unchecked(provider.clone())),
        Mode::VerifyCa | Mode::VerifyFull => {
            let webpki = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(root)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("sslrootcert: {e}"))?;
            if mode == Mode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        }
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustls(Arc::new(config)))
}

/// `prefer` and `require`: encrypted, the certificate not checked (libpq's meaning). The
/// handshake's signatures are still verified, so the peer holds the certificate's key.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain checked against the roots, the name not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's TLS connector over rustls.
#[derive(Clone)]
pub(crate) struct MakeRustls(Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Tls<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("host {host:?}: {e}"))
        })?;
        Ok(Connect {
            config: self.0.clone(),
            name,
        })
    }
}

pub(crate) struct Connect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Tls<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Tls<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let s = connector.connect(self.name, stream).await?;
            Ok(Tls(Box::new(s)))
        })
    }
}

/// A TLS connection to the database.
pub(crate) struct Tls<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> postgres::tls::TlsStream for Tls<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tls<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tls<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_read_and_taken_out_of_the_url() {
        let p = parse("postgres://u:pw@db:5432/x?sslmode=verify-full&application_name=a&sslrootcert=%2Ftmp%2Fca%20b.pem").unwrap();
        assert_eq!(
            p,
            Parsed {
                url: "postgres://u:pw@db:5432/x?application_name=a".into(),
                mode: Mode::VerifyFull,
                root: Some("/tmp/ca b.pem".into()),
            }
        );
        assert_eq!(parse("postgres://u@db/x").unwrap().mode, Mode::Prefer);
        assert_eq!(
            parse("postgres://u@db/x?sslmode=require").unwrap().mode,
            Mode::Require
        );
        // libpq: `require` with a root file verifies the chain.
        assert_eq!(
            parse("postgres://u@db/x?sslmode=require&sslrootcert=/r.pem")
                .unwrap()
                .mode,
            Mode::VerifyCa
        );
        assert_eq!(
            parse("postgres://u:pw@db/x?sslmode=allow").unwrap_err(),
            "sslmode=allow: expected disable, prefer, require, verify-ca or verify-full"
        );
    }
}

/// Against the local cluster `.ci/run` starts: Debian's PostgreSQL with `ssl = on` and the
/// snakeoil certificate (self-signed, for `localhost`).
#[cfg(test)]
mod cluster {
    use crate::testing::ScratchDb;

    const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

    /// Whether the session on `url` is encrypted, or the error as the user sees it.
    fn encrypted(url: &str) -> Result<bool, String> {
        let name = crate::pg::shown(url);
        let mut c = crate::pg::open_client(url, &name).map_err(|e| {
            let (shown, debug) = (e.to_string(), format!("{e:?}"));
            assert!(!shown.contains("cutover_test:cutover_test"), "{shown}");
            assert!(!debug.contains(":cutover_test@"), "{debug}");
            shown
        })?;
        Ok(c.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0))
    }

    #[test]
    fn each_sslmode_connects_as_libpq_would_and_a_wrong_root_is_refused_clearly() {
        let db = ScratchDb::new("tls");
        let on = |host: &str, params: &str| {
            let url = db.url.replacen("@127.0.0.1:", &format!("@{host}:"), 1);
            format!("{url}?{params}")
        };
        let shown = |url: &str| crate::pg::shown(url);
        assert_eq!(encrypted(&on("127.0.0.1", "sslmode=disable")), Ok(false));
        // The default is libpq's: prefer, so TLS when the server offers it.
        assert_eq!(encrypted(&db.url), Ok(true));
        assert_eq!(encrypted(&on("127.0.0.1", "sslmode=require")), Ok(true));
        let root = format!("sslrootcert={SNAKEOIL}");
        assert_eq!(
            encrypted(&on("localhost", &format!("sslmode=verify-full&{root}"))),
            Ok(true)
        );
        // verify-ca checks the chain, not the name.
        assert_eq!(
            encrypted(&on("127.0.0.1", &format!("sslmode=verify-ca&{root}"))),
            Ok(true)
        );
        let url = on("127.0.0.1", &format!("sslmode=verify-full&{root}"));
        assert_eq!(
            encrypted(&url),
            Err(format!("database {}: error performing TLS handshake: invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")", shown(&url)))
        );
        // A root that did not sign the server's certificate (Debian's ca-certificates).
        let url = on(
            "localhost",
            "sslmode=verify-full&sslrootcert=/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt",
        );
        assert_eq!(
            encrypted(&url),
            Err(format!(
                "database {}: error performing TLS handshake: invalid peer certificate: UnknownIssuer",
                shown(&url)
            ))
        );
        let url = on(
            "localhost",
            "sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
        );
        assert_eq!(
            encrypted(&url),
            Err(format!(
                "database {}: sslrootcert /nonexistent/root.crt: cannot read it: No such file or directory (os error 2)",
                shown(&url)
            ))
        );
        // A password in a parameter is hidden too.
        assert_eq!(
            shown("postgres://u@db/x?password=secret&sslmode=require"),
            "postgres://u@db/x?sslmode=require"
        );
    }
}
