//! The certificates the TLS listener serves, and what is known about each: rustls asks
//! [`Certs`] for a certificate on every handshake. It owns the certificate table, the ACME
//! challenge answers (HTTP-01 tokens, TLS-ALPN-01 certificates) and the per-domain status;
//! it must not issue certificates (that is `acme`) or touch connections (that is `tls`).
//!
//! Invariants:
//! - A certificate is replaced by one pointer swap under a short write lock; a handshake gets
//!   either the old or the new one, never none, so a renewal or a reload never fails a
//!   handshake.
//! - A certificate that does not load (bad PEM, key not matching) never replaces a good one.
//! - TLS-ALPN-01 challenge certificates are only ever given to a client that offers no ALPN
//!   protocol but `acme-tls/1`; normal clients never see them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use cutover_proxy_wire::CertificateStatus;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A loaded certificate chain and key, with the leaf's validity.
#[derive(Clone)]
pub(crate) struct Loaded {
    pub(crate) key: Arc<CertifiedKey>,
    /// The leaf's notBefore and notAfter, ms since the Unix epoch.
    pub(crate) not_before_ms: u64,
    pub(crate) not_after_ms: u64,
    /// The leaf's DER (for ARI's certificate identifier).
    pub(crate) leaf: CertificateDer<'static>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("not_before_ms", &self.not_before_ms)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

/// Parses a PEM certificate chain (leaf first) and a PEM private key, and checks that they
/// belong together. The error says which part is wrong.
pub(crate) fn load_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    let Some(leaf) = chain.first().cloned() else {
        return Err("no certificate in the certificate file".into());
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key is not a PEM private key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key: {e}"))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => {}
        // A key rustls cannot derive a public key from: accept it, the handshake will tell.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err("the key does not match the certificate".into()),
    }
    let (not_before_ms, not_after_ms) = validity(&leaf)?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_before_ms,
        not_after_ms,
        leaf,
    })
}

/// Reads and loads a certificate file and a key file.
pub(crate) fn load_files(cert: &Path, key: &Path) -> Result<Loaded, String> {
    let c = std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let k = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    load_pem(&c, &k).map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))
}

/// The leaf's notBefore and notAfter in ms since the Unix epoch.
fn validity(leaf: &CertificateDer<'_>) -> Result<(u64, u64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let ms = |t: x509_parser::time::ASN1Time| t.timestamp().max(0) as u64 * 1000;
    Ok((
        ms(cert.validity().not_before),
        ms(cert.validity().not_after),
    ))
}

/// The status of one domain's certificate.
#[derive(Debug, Clone, Default)]
pub(crate) struct Health {
    pub(crate) source: &'static str,
    pub(crate) not_after_ms: Option<u64>,
    pub(crate) renew_at_ms: Option<u64>,
    pub(crate) last_error: Option<String>,
    pub(crate) failed_at_ms: Option<u64>,
    pub(crate) next_retry_ms: Option<u64>,
}

/// The certificate table. `*` is the certificate for every name (`tls = "files"`).
#[derive(Default)]
pub(crate) struct Certs {
    served: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    tokens: RwLock<HashMap<String, String>>,
    health: Mutex<BTreeMap<String, Health>>,
    /// Domains whose renewal was asked for (`Request::Renew`), until the ACME task takes them.
    asked: Mutex<Vec<String>>,
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certs").finish_non_exhaustive()
    }
}

/// The wildcard entry: served for every name.
pub(crate) const ANY: &str = "*";

impl Certs {
    /// Serves `key` for `domain` (or every name, for [`ANY`]) from the next handshake on.
    pub(crate) fn install(&self, domain: &str, key: Arc<CertifiedKey>) {
        write(&self.served).insert(domain.to_string(), key);
    }

    /// Sets a TLS-ALPN-01 challenge certificate for `domain` (`None` removes it).
    pub(crate) fn set_challenge(&self, domain: &str, key: Option<Arc<CertifiedKey>>) {
        let mut c = write(&self.challenges);
        match key {
            Some(k) => c.insert(domain.to_string(), k),
            None => c.remove(domain),
        };
    }

    /// Sets the answer to an HTTP-01 token (`None` removes it).
    pub(crate) fn set_token(&self, token: &str, key_authorization: Option<String>) {
        let mut t = write(&self.tokens);
        match key_authorization {
            Some(k) => t.insert(token.to_string(), k),
            None => t.remove(token),
        };
    }

    /// The answer to an HTTP-01 token.
    pub(crate) fn token(&self, token: &str) -> Option<String> {
        read(&self.tokens).get(token).cloned()
    }

    /// Changes one domain's status.
    pub(crate) fn update(&self, domain: &str, f: impl FnOnce(&mut Health)) {
        let mut h = lock(&self.health);
        f(h.entry(domain.to_string()).or_default());
    }

    /// Asks the ACME task to renew `domains` at its next round (a second after
    /// the last, once an order in progress is done).
    pub(crate) fn ask_renewal(&self, domains: &[String]) {
        lock(&self.asked).extend_from_slice(domains);
    }

    /// The domains asked for since the last call.
    pub(crate) fn take_asked(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.asked))
    }

    /// Every domain's status, for `status`.
    pub(crate) fn status(&self) -> Vec<CertificateStatus> {
        lock(&self.health)
            .iter()
            .map(|(d, h)| CertificateStatus {
                domain: d.clone(),
                source: h.source.to_string(),
                not_after_ms: h.not_after_ms,
                renew_at_ms: h.renew_at_ms,
                last_error: h.last_error.clone(),
                failed_at_ms: h.failed_at_ms,
                next_retry_ms: h.next_retry_ms,
            })
            .collect()
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(|n| n.to_ascii_lowercase());
        let mut alpn = hello.alpn();
        let acme = alpn
            .as_mut()
            .is_some_and(|a| a.next() == Some(ACME_TLS_ALPN) && a.next().is_none());
        if acme {
            return read(&self.challenges).get(name.as_deref()?).cloned();
        }
        let served = read(&self.served);
        if let Some(any) = served.get(ANY) {
            return Some(any.clone());
        }
        served.get(name.as_deref()?).cloned()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn loads_a_pair_and_refuses_mismatches_and_garbage() {
        let (c1, k1) = self_signed("a.example");
        let (_, k2) = self_signed("b.example");
        let l = load_pem(c1.as_bytes(), k1.as_bytes()).unwrap();
        assert!(l.not_after_ms > l.not_before_ms);
        assert_eq!(
            load_pem(c1.as_bytes(), k2.as_bytes()).unwrap_err(),
            "the key does not match the certificate"
        );
        assert_eq!(
            load_pem(b"garbage", k1.as_bytes()).unwrap_err(),
            "no certificate in the certificate file"
        );
        assert!(load_pem(c1.as_bytes(), b"garbage")
            .unwrap_err()
            .starts_with("the key is not a PEM private key"));
    }
}
