//! `tls = "acme"`: obtains and renews a certificate for every routed domain from an ACME CA
//! (instant-acme over rustls/ring), answering HTTP-01 on the plain listener and TLS-ALPN-01 on
//! the TLS listener through [`Certs`], and keeps the account, keys and certificates under the
//! install directory. It owns the issuance schedule (first issuance, renewal, retries); it must
//! not serve connections or change routes.
//!
//! Invariants:
//! - A domain keeps its last good certificate until a new one is installed: a failed order,
//!   an unreachable CA or a certificate that does not load changes nothing but the status.
//! - Keys, certificates and the account are written 0600 (temp file, then rename) in a 0700
//!   directory; a certificate is installed only after it is on disk.
//! - A failure is retried after a delay that doubles from `retry_after` up to an hour; the
//!   next attempt uses the other challenge type (HTTP-01, then TLS-ALPN-01, and so on).
//! - Renewal is due when a third of the certificate's lifetime is left, or, when the CA offers
//!   ACME Renewal Information (ARI, RFC 9773), at a time in its suggested window that is
//!   drawn once per certificate and window (from its serial) and spread over what is left of
//!   the window, never later than a quarter of the lifetime before expiry; a window that has
//!   already ended (a revoked certificate) makes renewal due at once. A renewal the CA's ARI
//!   answered for names the certificate it replaces (`replaces`), and is ordered again
//!   without it if the CA refuses that.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::certs::{self, Certs, Loaded};
use crate::forward::{self, chain};
use crate::log;
use crate::switch::Shared;
use crate::tls::AcmeConfig;

/// How often the routing table is looked at for new domains and due renewals.
const TICK: Duration = Duration::from_secs(1);
/// The longest delay between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The longest one order may take, challenges and download included.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest an ARI look-up (opening the account included) may take.
const ARI_TIMEOUT: Duration = Duration::from_secs(20);
/// How often ARI is asked again at most, when the CA offers it.
const ARI_RECHECK: Duration = Duration::from_secs(6 * 3600);

/// What the scheduler knows about one domain.
#[derive(Default)]
struct Slot {
    /// The certificate being served: (notBefore, notAfter) in ms, and its leaf.
    current: Option<(u64, u64, CertificateDer<'static>)>,
    renew_at_ms: u64,
    /// When ARI is to be asked next (ms), if the CA offers it.
    ari_at_ms: u64,
    /// The suggested window (ms) of the CA's last ARI answer about `current`, if any.
    window: Option<(u64, u64)>,
    failures: u32,
    next_retry_ms: u64,
}

fn now_ms() -> u64 {
    log::unix_ms(SystemTime::now())
}

/// When a certificate valid from `nb` to `na` (ms) is due: a third of its lifetime left.
pub(crate) fn renew_at(nb: u64, na: u64) -> u64 {
    na.saturating_sub(na.saturating_sub(nb) / 3)
}

/// A file name for `domain`'s key and certificate (domains are validated by the table: only
/// letters, digits, `-` and `.`; anything else is replaced all the same).
fn file_stem(domain: &str) -> String {
    domain
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

fn cert_path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("{}.crt", file_stem(domain)))
}

fn key_path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("{}.key", file_stem(domain)))
}

fn account_path(dir: &Path) -> PathBuf {
    dir.join("account.json")
}

/// Creates `dir` mode 0700 if needed.
fn make_dir(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Writes `bytes` to `path` mode 0600 (a temp file renamed over it).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    r.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// Serves the certificates kept in `config.dir` (from before a restart) at once.
pub(crate) fn restore(certs: &Certs, config: &AcmeConfig) -> Result<(), String> {
    make_dir(&config.dir)?;
    let entries = std::fs::read_dir(&config.dir)
        .map_err(|e| format!("cannot read {}: {e}", config.dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(domain) = name.strip_suffix(".crt") else {
            continue;
        };
        match certs::load_files(&entry.path(), &key_path(&config.dir, domain)) {
            Ok(l) => install(certs, domain, &l),
            Err(e) => log::line(format_args!("acme: ignoring a stored certificate: {e}")),
        }
    }
    Ok(())
}

fn install(certs: &Certs, domain: &str, l: &Loaded) {
    certs.install(domain, l.key.clone());
    certs.update(domain, |h| {
        h.source = "acme";
        h.not_after_ms = Some(l.not_after_ms);
        h.renew_at_ms = Some(renew_at(l.not_before_ms, l.not_after_ms));
    });
}

/// Checks the CA's certificate and key (PEM) for `domain`, then writes them to `config.dir`.
fn store(config: &AcmeConfig, domain: &str, cert: &str, key: &str) -> Result<Loaded, String> {
    let l = certs::load_pem(cert.as_bytes(), key.as_bytes())
        .map_err(|e| format!("the CA's certificate does not load: {e}"))?;
    write_private(&key_path(&config.dir, domain), key.as_bytes())?;
    write_private(&cert_path(&config.dir, domain), cert.as_bytes())?;
    Ok(l)
}

impl Slot {
    /// A new certificate `l` for `domain`, stored: served from now on, its renewal scheduled,
    /// ARI to be asked about it, failures forgotten.
    fn installed(&mut self, certs: &Certs, domain: &str, l: Loaded, replaced: bool) {
        let renewal = self.current.is_some();
        install(certs, domain, &l);
        certs.update(domain, |h| {
            h.last_error = None;
            h.failed_at_ms = None;
            h.next_retry_ms = None;
        });
        self.renew_at_ms = renew_at(l.not_before_ms, l.not_after_ms);
        self.current = Some((l.not_before_ms, l.not_after_ms, l.leaf));
        self.ari_at_ms = 0;
        self.window = None;
        self.failures = 0;
        self.next_retry_ms = 0;
        log::line(format_args!(
            "acme: {} a certificate for {domain} (expires {}, renewal due {}){}",
            if renewal { "renewed" } else { "obtained" },
            log::rfc3339(l.not_after_ms),
            log::rfc3339(self.renew_at_ms),
            if replaced {
                ", ordered as the replacement of the one before (ARI)"
            } else {
                ""
            }
        ));
    }

    /// An attempt for `domain` failed with `e`: the next one after a delay doubling from
    /// `retry_after`, and the status says why and when.
    fn failed(&mut self, certs: &Certs, config: &AcmeConfig, domain: &str, e: String) {
        self.failures += 1;
        let backoff = config
            .retry_after
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(MAX_BACKOFF);
        let now = now_ms();
        self.next_retry_ms = now + backoff.as_millis() as u64;
        log::line(format_args!(
            "acme: {domain}: {e}; {}retrying at {}",
            if self.current.is_some() {
                "keeping the current certificate, "
            } else {
                ""
            },
            log::rfc3339(self.next_retry_ms)
        ));
        let next = self.next_retry_ms;
        certs.update(domain, |h| {
            h.source = "acme";
            h.last_error = Some(e);
            h.failed_at_ms = Some(now);
            h.next_retry_ms = Some(next);
        });
    }
}

/// Obtains and renews certificates for every routed domain until `stop`.
pub(crate) async fn run(shared: Arc<Shared>, config: AcmeConfig, mut stop: watch::Receiver<bool>) {
    let mut slots: HashMap<String, Slot> = HashMap::new();
    let mut account: Option<Account> = None;
    loop {
        // Renewals asked for (`Request::Renew`) are due now, any backoff forgotten.
        let mut asked: BTreeSet<String> = shared.certs.take_asked().into_iter().collect();
        for domain in shared.table.domains() {
            let slot = slots.entry(domain.clone()).or_insert_with(|| {
                let mut s = Slot::default();
                if let Ok(l) = certs::load_files(
                    &cert_path(&config.dir, &domain),
                    &key_path(&config.dir, &domain),
                ) {
                    s.renew_at_ms = renew_at(l.not_before_ms, l.not_after_ms);
                    s.current = Some((l.not_before_ms, l.not_after_ms, l.leaf));
                }
                s
            });
            let now = now_ms();
            if slot.current.is_some() && now >= slot.ari_at_ms {
                recheck_ari(&config, &mut account, &shared.certs, &domain, slot, now).await;
            }
            // After ARI, which must not move it back.
            if asked.remove(&domain) {
                slot.renew_at_ms = 0;
                slot.next_retry_ms = 0;
                shared.certs.update(&domain, |h| {
                    h.renew_at_ms = Some(now);
                    h.next_retry_ms = None;
                });
                log::line(format_args!(
                    "acme: {domain}: a new certificate was asked for: ordering one now"
                ));
            }
            let due = slot.current.is_none() || now >= slot.renew_at_ms;
            if !due || now < slot.next_retry_ms {
                continue;
            }
            let challenge = if slot.failures.is_multiple_of(2) {
                ChallengeType::Http01
            } else {
                ChallengeType::TlsAlpn01
            };
            let attempt = async {
                let acct = match &account {
                    Some(a) => a.clone(),
                    None => {
                        let a = open_account(&config).await?;
                        account = Some(a.clone());
                        a
                    }
                };
                let replaces = match (&slot.current, slot.window) {
                    (Some((_, _, leaf)), Some(_)) => Some(leaf),
                    _ => None,
                };
                issue(&shared.certs, &acct, &domain, challenge, replaces).await
            };
            let result = tokio::select! {
                r = tokio::time::timeout(ORDER_TIMEOUT, attempt) => match r {
                    Ok(r) => r,
                    Err(_) => Err(format!("no certificate within {} s", ORDER_TIMEOUT.as_secs())),
                },
                _ = forward::stopped(&mut stop) => return,
            };
            match result.and_then(|(cert, key, replaced)| {
                Ok((store(&config, &domain, &cert, &key)?, replaced))
            }) {
                Ok((l, replaced)) => slot.installed(&shared.certs, &domain, l, replaced),
                Err(e) => {
                    if e.contains("accountDoesNotExist") {
                        // The CA forgot the account (a test CA restarted): make a new one.
                        account = None;
                        let _ = std::fs::remove_file(account_path(&config.dir));
                    }
                    slot.failed(&shared.certs, &config, &domain, e);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = forward::stopped(&mut stop) => return,
        }
    }
}

/// The stored account, or a new one (stored 0600).
async fn open_account(config: &AcmeConfig) -> Result<Account, String> {
    let builder = match &config.ca_file {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    }
    .map_err(|e| format!("ACME client setup: {}", chain(&e)))?;
    let path = account_path(&config.dir);
    if let Ok(text) = std::fs::read(&path) {
        if let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&text) {
            return builder
                .from_credentials(creds)
                .await
                .map_err(|e| format!("the stored ACME account: {}", chain(&e)));
        }
    }
    let contact = config.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await
        .map_err(|e| {
            format!(
                "cannot create an ACME account at {}: {}",
                config.directory,
                chain(&e)
            )
        })?;
    let text = serde_json::to_vec(&creds).map_err(|e| e.to_string())?;
    write_private(&path, &text)?;
    Ok(account)
}

/// Orders a certificate for `domain`, answering `challenge`, as the replacement of
/// `replaces` (RFC 9773 section 5) if given; returns (chain PEM, key PEM, whether the CA took
/// the order as that replacement).
///
/// A CA that refuses the replacement (it answers a problem: it already has one, say from an
/// attempt that failed after it was finalized) is asked again for a plain order, so that a
/// renewal never depends on it.
async fn issue(
    certs: &Certs,
    account: &Account,
    domain: &str,
    challenge: ChallengeType,
    replaces: Option<&CertificateDer<'static>>,
) -> Result<(String, String, bool), String> {
    let ids = [Identifier::Dns(domain.to_string())];
    let replaces =
        replaces.and_then(|leaf| instant_acme::CertificateIdentifier::try_from(leaf).ok());
    let mut replaced = false;
    let mut order = None;
    if let Some(id) = replaces {
        match account.new_order(&NewOrder::new(&ids).replaces(id)).await {
            Ok(o) => {
                replaced = true;
                order = Some(o);
            }
            Err(e @ instant_acme::Error::Api(_)) => log::line(format_args!(
                "acme: {domain}: the CA refused the order as a replacement ({}); ordering without",
                chain(&e)
            )),
            Err(e) => return Err(format!("new order: {}", chain(&e))),
        }
    }
    let mut order = match order {
        Some(o) => o,
        None => account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(|e| format!("new order: {}", chain(&e)))?,
    };
    let mut cleanup = Cleanup {
        certs,
        domain,
        tokens: Vec::new(),
    };
    let mut authzs = order.authorizations();
    while let Some(authz) = authzs.next().await {
        let mut authz = authz.map_err(|e| format!("authorization: {}", chain(&e)))?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            s => return Err(format!("authorization is {s:?}")),
        }
        let name = challenge_name(&challenge);
        let mut ch = authz
            .challenge(challenge.clone())
            .ok_or_else(|| format!("the CA offers no {name} challenge"))?;
        let key_auth = ch.key_authorization();
        match challenge {
            ChallengeType::Http01 => {
                certs.set_token(&ch.token, Some(key_auth.as_str().to_string()));
                cleanup.tokens.push(ch.token.clone());
            }
            _ => {
                let key = alpn_challenge_cert(domain, key_auth.digest().as_ref())?;
                certs.set_challenge(domain, Some(key));
            }
        }
        ch.set_ready()
            .await
            .map_err(|e| format!("{name} challenge: {}", chain(&e)))?;
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(100))
        .backoff(1.5)
        .timeout(Duration::from_secs(60));
    let status = order.poll_ready(&retries).await.map_err(|e| {
        format!(
            "{} validation failed: {}",
            challenge_name(&challenge),
            chain(&e)
        )
    })?;
    if status != OrderStatus::Ready {
        let mut why = format!(
            "the order is {status:?} ({} challenge)",
            challenge_name(&challenge)
        );
        let mut authzs = order.authorizations();
        while let Some(Ok(a)) = authzs.next().await {
            for c in &a.challenges {
                if let Some(e) = &c.error {
                    why.push_str(&format!(": {e}"));
                }
            }
        }
        return Err(why);
    }
    let key_pem = order
        .finalize()
        .await
        .map_err(|e| format!("finalize: {}", chain(&e)))?;
    let chain = order
        .poll_certificate(&retries)
        .await
        .map_err(|e| format!("certificate download: {}", chain(&e)))?;
    drop(cleanup);
    Ok((chain, key_pem, replaced))
}

fn challenge_name(c: &ChallengeType) -> &'static str {
    match c {
        ChallengeType::Http01 => "http-01",
        ChallengeType::TlsAlpn01 => "tls-alpn-01",
        _ => "other",
    }
}

/// Removes an order's challenge answers when it is over, however it ended.
struct Cleanup<'a> {
    certs: &'a Certs,
    domain: &'a str,
    tokens: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.certs.set_token(t, None);
        }
        self.certs.set_challenge(self.domain, None);
    }
}

/// The self-signed TLS-ALPN-01 certificate for `domain` (RFC 8737: the acmeIdentifier
/// extension holds the SHA-256 of the key authorization).
fn alpn_challenge_cert(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let e = |e: rcgen::Error| format!("TLS-ALPN-01 certificate: {e}");
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(e)?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let cert = params.self_signed(&key).map_err(e)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("TLS-ALPN-01 key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

/// Asks the CA's ARI when to renew `slot`'s certificate, if the CA offers it, and sets the
/// slot's renewal time and next look-up from the answer (the account is opened for it after a
/// restart); with no usable answer, asks again after [`ARI_RECHECK`]. A window the slot
/// already had keeps the time drawn in it.
async fn recheck_ari(
    config: &AcmeConfig,
    account: &mut Option<Account>,
    certs: &Certs,
    domain: &str,
    slot: &mut Slot,
    now: u64,
) {
    slot.ari_at_ms = now + ARI_RECHECK.as_millis() as u64;
    if account.is_none() {
        let opened = tokio::time::timeout(ARI_TIMEOUT, open_account(config)).await;
        *account = opened.ok().and_then(Result::ok);
    }
    let (Some(acct), Some((nb, na, leaf))) = (account.as_ref(), &slot.current) else {
        return;
    };
    let Ok(Some((window, recheck))) = tokio::time::timeout(ARI_TIMEOUT, ari(acct, leaf)).await
    else {
        return;
    };
    slot.ari_at_ms = now + recheck.max(60_000);
    if slot.window == Some(window) {
        return;
    }
    let at = ari_renew_at(window, serial_draw(leaf), now, (*nb, *na));
    slot.window = Some(window);
    slot.renew_at_ms = at;
    certs.update(domain, |h| h.renew_at_ms = Some(at));
    log::line(format_args!(
        "acme: {domain}: the CA suggests renewing from {} to {} (ARI): {}",
        log::rfc3339(window.0),
        log::rfc3339(window.1),
        if window.1 < now {
            "that window has passed, renewing now".to_string()
        } else {
            format!("renewal due {}", log::rfc3339(at))
        }
    ));
}

/// ARI: the CA's suggested window for renewing `leaf` (ms) and when to ask again (ms from
/// now). `None` when the CA does not offer ARI, the certificate has no authority key
/// identifier, or the answer is unusable.
async fn ari(account: &Account, leaf: &CertificateDer<'static>) -> Option<((u64, u64), u64)> {
    let id = instant_acme::CertificateIdentifier::try_from(leaf).ok()?;
    let (info, again) = account.renewal_info(&id).await.ok()?;
    let w = info.suggested_window;
    let ms = |unix_s: i64| unix_s.max(0) as u64 * 1000;
    let window = (ms(w.start.unix_timestamp()), ms(w.end.unix_timestamp()));
    Some((window, again.as_millis() as u64))
}

/// When to renew a certificate valid from `nb` to `na` (ms), by the CA's suggested window
/// `start..=end` (ms) read at `now`.
/// - A window that has passed: now. RFC 9773 says to renew at once; a CA answers so about a
///   revoked certificate.
/// - Otherwise a time drawn by `draw` across what is left of the window ([`in_window`]), so
///   that a window that opened in the past does not make half the certificates renew at once.
/// - Never later than a quarter of the lifetime before `na`: a window reaching past that
///   (Pebble suggests a day either side of two thirds of the lifetime, even for certificates
///   of minutes) must not leave the certificate to run out.
fn ari_renew_at((start, end): (u64, u64), draw: u64, now: u64, (nb, na): (u64, u64)) -> u64 {
    if end < now {
        return now;
    }
    let latest = na.saturating_sub(na.saturating_sub(nb) / 4);
    in_window(start.max(now), end, draw).min(latest)
}

/// The time in the suggested window `start..=end` (ms) at which to renew, `draw` placing it
/// uniformly: RFC 9773 (section 4.2) asks for a random time in the window, so that the
/// certificates a CA suggests renewing together are not renewed in one burst. A window that
/// ends before it starts is its start. A time already past means renew now (the scheduler
/// renews whatever is due).
fn in_window(start: u64, end: u64, draw: u64) -> u64 {
    let span = end.saturating_sub(start);
    start + draw % span.saturating_add(1)
}

/// A draw for [`in_window`] that is the same every time the window is asked for the same
/// certificate (drawing again at each look-up would pull renewal towards the window's start),
/// and spread over certificates: the low bytes of the serial, which CAs fill with at least 64
/// random bits (CA/Browser Forum Baseline Requirements 7.1).
fn serial_draw(leaf: &CertificateDer<'_>) -> u64 {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return 0;
    };
    let serial = cert.tbs_certificate.raw_serial();
    let low = &serial[serial.len().saturating_sub(8)..];
    low.iter().fold(0, |n, &b| (n << 8) | u64::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_with_a_third_of_the_lifetime_left() {
        assert_eq!(renew_at(0, 90_000), 60_000);
        assert_eq!(renew_at(1_000, 1_000), 1_000);
        assert_eq!(renew_at(10, 5), 5);
    }

    /// A leaf issued by a CA whose key identifier is `aki`, with serial `serial`.
    fn leaf(aki: &[u8], serial: &[u8]) -> CertificateDer<'static> {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(aki.to_vec());
        let ca = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["site.example".into()]).unwrap();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial.to_vec().into());
        params.signed_by(&key, &ca).unwrap().der().clone()
    }

    #[test]
    fn ari_asks_about_the_served_certificate_by_rfc_9773s_identifier() {
        // RFC 9773 section 4.1's example: this AKI and serial make this identifier.
        let aki = [
            0x69, 0x88, 0x5B, 0x6B, 0x87, 0x46, 0x40, 0x41, 0xE1, 0xB3, 0x7B, 0x84, 0x7B, 0xA0,
            0xAE, 0x2C, 0xDE, 0x01, 0xC8, 0xD4,
        ];
        let leaf = leaf(&aki, &[0x00, 0x87, 0x65, 0x43, 0x21]);
        let id = instant_acme::CertificateIdentifier::try_from(&leaf).unwrap();
        assert_eq!(id.to_string(), "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE");
        // Its draw is the serial's value, and stays the same at every look-up.
        assert_eq!(serial_draw(&leaf), 0x8765_4321);
        assert_eq!(serial_draw(&leaf), serial_draw(&leaf.clone()));
    }

    #[test]
    fn ari_renews_at_a_time_drawn_across_the_suggested_window() {
        let (start, end) = (1_000_000, 1_000_000 + 86_400_000);
        for draw in [0, 1, 86_400_000, 86_400_001, u64::MAX] {
            let at = in_window(start, end, draw);
            assert!((start..=end).contains(&at), "{draw}: {at}");
        }
        assert_eq!(in_window(start, end, 0), start);
        assert_eq!(in_window(start, end, 86_400_000), end);
        assert_eq!(in_window(start, end, 43_200_000), start + 43_200_000);
        // A window of one instant, and one that ends before it starts: its start.
        assert_eq!(in_window(5_000, 5_000, 12_345), 5_000);
        assert_eq!(in_window(9_000, 1_000, 7), 9_000);
        // Certificates with random serials (as CAs issue them) renew all over the window,
        // not in one burst: 200 leaves land in every tenth of it.
        let mut tenths = [0; 10];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let serial = [&[0x01][..], &x.to_be_bytes()[..]].concat();
            let at = in_window(start, end, serial_draw(&leaf(&[7; 20], &serial)));
            tenths[((at - start) * 10 / (end - start + 1)) as usize] += 1;
        }
        assert!(tenths.iter().all(|&n| n >= 5), "{tenths:?}");
    }

    #[test]
    fn ari_windows_are_honoured_within_the_certificates_lifetime() {
        let day = 86_400_000;
        let life = (0, 90 * day);
        // A window ahead, inside the lifetime (as Let's Encrypt's): a time in it.
        let w = (59 * day, 61 * day);
        for draw in [0, 1, day, 2 * day, u64::MAX] {
            let at = ari_renew_at(w, draw, day, life);
            assert!((w.0..=w.1).contains(&at), "{draw}: {at}");
        }
        assert_eq!(ari_renew_at(w, day / 2, day, life), 59 * day + day / 2);
        // A window that has passed (a revoked certificate): now.
        assert_eq!(
            ari_renew_at((10 * day, 10 * day + 1), 7, 11 * day, life),
            11 * day
        );
        // A window open since before now: drawn over what is left of it, never in the past.
        let now = 60 * day;
        for draw in [0, 1, day, u64::MAX] {
            let at = ari_renew_at(w, draw, now, life);
            assert!((now..=w.1).contains(&at), "{draw}: {at}");
        }
        assert_eq!(ari_renew_at(w, day / 2, now, life), now + day / 2);
        // Pebble's window for a certificate of 30 s (a day either side of its 20th second):
        // 7.5 s before expiry at the latest, never a day later.
        let (nb, na) = (100 * day, 100 * day + 30_000);
        let pebble = (nb + 20_000 - day, nb + 20_000 + day);
        assert_eq!(ari_renew_at(pebble, day, nb + 1_000, (nb, na)), nb + 22_500);
        assert_eq!(
            ari_renew_at(pebble, 3_000, nb + 1_000, (nb, na)),
            nb + 4_000
        );
    }

    #[test]
    fn file_names_stay_in_the_directory() {
        assert_eq!(file_stem("site.example"), "site.example");
        assert_eq!(file_stem("../../etc/x"), "_.._etc_x");
        assert_eq!(file_stem(".hidden"), "hidden");
    }
}
