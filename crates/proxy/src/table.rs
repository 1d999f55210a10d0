//! The routing table: services, the domains routed to them, each service's current target,
//! its pause state and its counters. It owns the one atomic pointer swap of a switch. It does
//! no I/O and never awaits while holding a lock; it must not know about HTTP bodies, health
//! probes or the state file.
//!
//! Invariants:
//! - A service's current target is an `Arc<Target>` behind a `std::sync::RwLock`; a switch is
//!   one write-locked `mem::replace` of that pointer, nothing else.
//! - [`Service::acquire`] increments the target's in-flight counter *while holding the read
//!   lock*, so once [`Service::swap`] returns, every request that will ever use the old target
//!   is already counted: when the old counter reads 0 after a swap it stays 0.
//! - Pause is the mirror image: a request acquires first and checks the pause flag after
//!   (backing off if paused), and a pause sets the flag before reading the in-flight counter;
//!   so once a pause has seen the current target's counter at 0, no request reaches it until
//!   resume.
//! - A canary lives in the same lock as the current target: a request picks current or canary
//!   once, in [`Service::acquire`], and keeps it; promoting the canary is the same one-pointer
//!   swap (to the canary's own `Target`, so its counts carry on), and any install ends it.
//! - A domain belongs to at most one service.
//! - Locks are held only for map or pointer work and never across an `.await`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use hyper::http::uri::Authority;
use tokio::sync::watch;

use crate::Error;

/// One upstream address of a service, with its counters. A new `Target` is made for every
/// switch, so counters belong to one stint as the current target.
#[derive(Debug)]
pub(crate) struct Target {
    /// `host:port`, validated by [`parse_target`].
    pub(crate) addr: String,
    /// Unique per stint (see `stats`).
    pub(crate) id: u64,
    /// What this target answered (see `stats`).
    pub(crate) stats: crate::stats::Stats,
    in_flight: AtomicUsize,
    served: AtomicU64,
    /// Turns true when a switch away from this target reached its drain deadline: what is
    /// still open on it (upgraded connections) closes.
    retired: watch::Sender<bool>,
}

impl Target {
    pub(crate) fn new(addr: String) -> Arc<Target> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Arc::new(Target {
            addr,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stats: crate::stats::Stats::default(),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            retired: watch::channel(false).0,
        })
    }

    /// Closes what is still open on this target (see `upgrade`).
    pub(crate) fn retire(&self) {
        self.retired.send_replace(true);
    }

    /// Changes to true when the target is retired.
    pub(crate) fn retired(&self) -> watch::Receiver<bool> {
        self.retired.subscribe()
    }

    /// Requests sent to this target that have not finished (response body included).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Requests this target answered.
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// This target answered a request with `status`, `took` after it was sent: counted as
    /// served and recorded in its `stats`.
    pub(crate) fn answered(&self, status: u16, took: std::time::Duration) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.stats.answered(status, took);
    }
}

/// Counts one request as in flight on a target (and its service) until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    target: Arc<Target>,
    service: Arc<AtomicUsize>,
}

impl InFlight {
    pub(crate) fn target(&self) -> &Arc<Target> {
        &self.target
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.service.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts one request as held by a pause until dropped.
pub(crate) struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One app behind the proxy.
#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) name: String,
    route: RwLock<Route>,
    paused: watch::Sender<bool>,
    hold_ms: AtomicU64,
    held: AtomicUsize,
    in_flight: Arc<AtomicUsize>,
    requests: AtomicU64,
    removed: AtomicBool,
}

/// Where a service's new requests go.
#[derive(Debug)]
struct Route {
    current: Arc<Target>,
    /// A canary and its percentage of new requests.
    canary: Option<(Arc<Target>, u8)>,
    /// The target before the current one (for its counts).
    previous: Option<Arc<Target>>,
}

impl Service {
    fn new(name: String, target: Arc<Target>) -> Arc<Service> {
        Arc::new(Service {
            name,
            route: RwLock::new(Route {
                current: target,
                canary: None,
                previous: None,
            }),
            paused: watch::Sender::new(false),
            hold_ms: AtomicU64::new(0),
            held: AtomicUsize::new(0),
            in_flight: Arc::new(AtomicUsize::new(0)),
            requests: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        })
    }

    /// The current target (or, for its share of requests, the canary), counted as in flight
    /// until the guard drops.
    pub(crate) fn acquire(&self) -> InFlight {
        let route = read(&self.route);
        let target = match &route.canary {
            // A random pick per request (a fixed rotation could line up with a client's
            // own pattern, e.g. every second request of a page always on the old target).
            Some((canary, percent)) if roll_percent() < u64::from(*percent) => canary,
            Some(_) => &route.current,
            None => &route.current,
        };
        target.in_flight.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            target: target.clone(),
            service: self.in_flight.clone(),
        }
    }

    /// Counts a request routed to this service.
    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The current target.
    pub(crate) fn current(&self) -> Arc<Target> {
        read(&self.route).current.clone()
    }

    /// The canary and its percentage, if there is one.
    pub(crate) fn canary(&self) -> Option<(Arc<Target>, u8)> {
        read(&self.route).canary.clone()
    }

    /// Current, canary and previous target, with those role names.
    pub(crate) fn targets(&self) -> Vec<(Arc<Target>, &'static str)> {
        let route = read(&self.route);
        let mut out = vec![(route.current.clone(), "current")];
        out.extend(route.canary.iter().map(|(c, _)| (c.clone(), "canary")));
        out.extend(route.previous.iter().map(|p| (p.clone(), "previous")));
        out
    }

    /// The switch: replaces the current target (ending any canary), returns the old one.
    fn swap(&self, new: Arc<Target>) -> Arc<Target> {
        let mut route = write(&self.route);
        route.canary = None;
        let old = std::mem::replace(&mut route.current, new);
        route.previous = Some(old.clone());
        old
    }

    /// Ends the canary, if any, and returns it.
    fn end_canary(&self) -> Option<Arc<Target>> {
        write(&self.route).canary.take().map(|(c, _)| c)
    }

    /// Starts holding new requests for up to `hold` each. Returns whether it was paused.
    pub(crate) fn pause(&self, hold: Duration) -> bool {
        self.hold_ms.store(
            hold.as_millis().min(u64::MAX as u128) as u64,
            Ordering::SeqCst,
        );
        self.paused.send_replace(true)
    }

    /// Releases held requests; returns how many were held at that moment.
    pub(crate) fn resume(&self) -> usize {
        let held = self.held();
        self.paused.send_replace(false);
        held
    }

    pub(crate) fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Waits while the service is paused, up to the pause's hold. Returns false if the hold
    /// ran out (the caller answers 503).
    pub(crate) async fn wait_resumed(&self) -> bool {
        let mut rx = self.paused.subscribe();
        if !*rx.borrow_and_update() {
            return true;
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.held);
        let hold = Duration::from_millis(self.hold_ms.load(Ordering::SeqCst));
        // The sender lives as long as `self`, so `wait_for` only ends by resume.
        let resumed = tokio::time::timeout(hold, rx.wait_for(|paused| !*paused))
            .await
            .is_ok_and(|r| r.is_ok());
        resumed
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Requests currently held by a pause.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Requests in flight on any of this service's targets (old ones still draining included).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Requests routed to this service since the proxy started.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// What [`Table::install`] did.
pub(crate) struct Installed {
    /// The service did not exist.
    pub(crate) created: bool,
    /// The target that was current before, if the pointer was swapped.
    pub(crate) previous: Option<Arc<Target>>,
    /// A canary this install ended without making it current (to be drained).
    pub(crate) ended_canary: Option<Arc<Target>>,
}

/// A service as persisted and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) target: String,
    pub(crate) domains: Vec<String>,
}

/// All services, by name, and the domains routed to them.
#[derive(Debug, Default)]
pub(crate) struct Table {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    services: BTreeMap<String, Arc<Service>>,
    /// domain -> service name.
    domains: BTreeMap<String, String>,
    /// The one service without domains, when exactly one has none: it gets every request
    /// for a host no service has (previews with their own domains beside an app without).
    fallback: Option<String>,
}

impl Inner {
    fn refresh_fallback(&mut self) {
        let mut bare = self
            .services
            .keys()
            .filter(|n| !self.domains.values().any(|s| s == *n));
        self.fallback = match (bare.next(), bare.next()) {
            (Some(only), None) => Some(only.clone()),
            _ => None,
        };
    }

    fn domains_of(&self, name: &str) -> Vec<String> {
        self.domains
            .iter()
            .filter(|(_, s)| *s == name)
            .map(|(d, _)| d.clone())
            .collect()
    }

    fn check_domains(&self, name: &str, domains: &[String]) -> Result<(), Error> {
        for d in domains {
            if let Some(owner) = self.domains.get(d) {
                if owner != name {
                    return Err(Error::DomainConflict {
                        domain: d.clone(),
                        owner: owner.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Table {
    /// Number of services.
    pub(crate) fn len(&self) -> usize {
        read(&self.inner).services.len()
    }

    /// The service for a request's `Host` (already normalized by [`normalize_host`]): the one
    /// that has the domain, else the only service without domains if exactly one has none (a
    /// service with domains gets only requests for them: a forged `Host` must not reach it).
    pub(crate) fn route(&self, host: Option<&str>) -> Option<Arc<Service>> {
        let inner = read(&self.inner);
        if let Some(name) = host.and_then(|h| inner.domains.get(h)) {
            return inner.services.get(name).cloned();
        }
        inner
            .fallback
            .as_ref()
            .and_then(|name| inner.services.get(name).cloned())
    }

    /// [`Table::route`] for a raw `Host` value (normalized here, without allocating for
    /// names of up to 255 bytes).
    pub(crate) fn route_raw(&self, host: Option<&[u8]>) -> Option<Arc<Service>> {
        let mut buf = [0u8; 255];
        match host {
            None => self.route(None),
            Some(raw) => match normalize_host_into(raw, &mut buf) {
                Some(h) => self.route(Some(h)),
                // Longer than any domain we route, or not text: only the single-service rule.
                None => self.route(Some("")),
            },
        }
    }

    /// Every routed domain, of every service.
    pub(crate) fn domains(&self) -> std::collections::BTreeSet<String> {
        read(&self.inner).domains.keys().cloned().collect()
    }

    /// The domains routed to a service.
    pub(crate) fn domains_of(&self, name: &str) -> Vec<String> {
        read(&self.inner).domains_of(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Service>> {
        read(&self.inner).services.get(name).cloned()
    }

    /// Fails if a domain belongs to another service.
    pub(crate) fn check_domains(&self, name: &str, domains: &[String]) -> Result<(), Error> {
        read(&self.inner).check_domains(name, domains)
    }

    /// Makes `target` the service's current target (creating the service if needed) and, if
    /// `domains` is not empty, sets the service's domains to exactly these. A target equal to
    /// the current one is left as it is (no swap, counters kept).
    pub(crate) fn install(
        &self,
        name: &str,
        target: &str,
        domains: &[String],
    ) -> Result<Installed, Error> {
        let mut inner = write(&self.inner);
        inner.check_domains(name, domains)?;
        let installed = match inner.services.get(name) {
            Some(service) if service.current().addr == target => Installed {
                created: false,
                previous: None,
                ended_canary: service.end_canary(),
            },
            Some(service) => {
                // Promoting the canary keeps its `Target` (and its counts).
                let new = match service.canary() {
                    Some((canary, _)) if canary.addr == target => canary,
                    _ => Target::new(target.to_string()),
                };
                let canary = service.canary().map(|(c, _)| c);
                let previous = service.swap(new.clone());
                Installed {
                    created: false,
                    previous: Some(previous),
                    ended_canary: canary.filter(|c| !Arc::ptr_eq(c, &new)),
                }
            }
            None => {
                let service = Service::new(name.to_string(), Target::new(target.to_string()));
                inner.services.insert(name.to_string(), service);
                Installed {
                    created: true,
                    previous: None,
                    ended_canary: None,
                }
            }
        };
        if !domains.is_empty() {
            inner.domains.retain(|_, s| s != name);
            for d in domains {
                inner.domains.insert(d.clone(), name.to_string());
            }
        }
        inner.refresh_fallback();
        Ok(installed)
    }

    /// Sends `percent` of `name`'s new requests to `target` (replacing any canary) and returns
    /// the current target and the canary replaced, if any. The service must exist and
    /// `target` must not be its current target.
    pub(crate) fn set_canary(
        &self,
        name: &str,
        target: &str,
        percent: u8,
    ) -> Result<(Arc<Target>, Option<Arc<Target>>), Error> {
        let inner = read(&self.inner);
        let service = inner
            .services
            .get(name)
            .ok_or_else(|| Error::UnknownService(name.to_string()))?;
        let mut route = write(&service.route);
        if route.current.addr == target {
            return Err(Error::Invalid(format!(
                "canary {target} is already the current target of {name}"
            )));
        }
        let replaced = route
            .canary
            .replace((Target::new(target.to_string()), percent));
        Ok((route.current.clone(), replaced.map(|(c, _)| c)))
    }

    /// Removes a service and its domains; its held requests are released and answered 404.
    pub(crate) fn remove(&self, name: &str) -> Option<Arc<Service>> {
        let mut inner = write(&self.inner);
        let service = inner.services.remove(name)?;
        inner.domains.retain(|_, s| s != name);
        inner.refresh_fallback();
        drop(inner);
        service.removed.store(true, Ordering::SeqCst);
        service.paused.send_replace(false);
        Some(service)
    }

    /// Every service with its domains, by name.
    pub(crate) fn services(&self) -> Vec<(Arc<Service>, Vec<String>)> {
        let inner = read(&self.inner);
        inner
            .services
            .values()
            .map(|s| (s.clone(), inner.domains_of(&s.name)))
            .collect()
    }

    /// What the state file holds.
    pub(crate) fn snapshot(&self) -> Vec<Entry> {
        self.services()
            .into_iter()
            .map(|(s, domains)| Entry {
                name: s.name.clone(),
                target: s.current().addr.clone(),
                domains,
            })
            .collect()
    }
}

/// A uniform number in 0..100 from a per-thread xorshift generator (not for secrets: it only
/// spreads requests).
fn roll_percent() -> u64 {
    use std::cell::Cell;
    static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            (SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ nanos) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        // The high bits of a multiply: uniform enough for a percentage.
        ((u128::from(x) * 100) >> 64) as u64
    })
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// A `Host` header value (or URI authority) as used for routing: port stripped, lowercased,
/// trailing dot removed. `"API.example.com:8080"` -> `"api.example.com"`, `"[::1]:80"` ->
/// `"[::1]"`.
pub(crate) fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// [`normalize_host`] into `buf`; `None` if the result does not fit or is not UTF-8.
fn normalize_host_into<'a>(host: &[u8], buf: &'a mut [u8]) -> Option<&'a str> {
    let host = host.trim_ascii();
    let without_port = if host.first() == Some(&b'[') {
        match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(i) if host[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
            _ => host,
        }
    };
    let mut n = without_port.len();
    while n > 0 && without_port[n - 1] == b'.' {
        n -= 1;
    }
    let out = buf.get_mut(..n)?;
    for (o, b) in out.iter_mut().zip(without_port) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

/// Checks a service name: 1 to 64 of `[A-Za-z0-9._-]`.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "service name {name:?}: expected 1 to 64 of [A-Za-z0-9._-]"
        )))
    }
}

/// Checks a target address `host:port` (no scheme, no path, no user info), or a static
/// target's directory (`crate::static_target`), and returns it as the proxy stores it.
pub(crate) fn parse_target(target: &str) -> Result<String, Error> {
    if crate::static_target::is_static(target) {
        return crate::static_target::parse(target);
    }
    let bad = |why: &str| Error::Invalid(format!("target {target:?}: {why}; expected host:port"));
    if target.contains("://") {
        return Err(bad("no scheme allowed"));
    }
    let auth: Authority = target.parse().map_err(|_| bad("not an address"))?;
    if target.contains('@') {
        return Err(bad("no user info allowed"));
    }
    match auth.port_u16() {
        Some(p) if p > 0 => {}
        _ => return Err(bad("missing port")),
    }
    if auth.host().is_empty() {
        return Err(bad("missing host"));
    }
    Ok(auth.as_str().to_string())
}

/// Checks and normalizes the domains of a deploy.
pub(crate) fn parse_domains(domains: &[String]) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for d in domains {
        let n = normalize_host(d);
        let ok = !n.is_empty()
            && n.len() <= 253
            && n.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
            });
        if !ok {
            return Err(Error::Invalid(format!("domain {d:?}")));
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_hosts() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host("127.0.0.1:3000"), "127.0.0.1");
        assert_eq!(normalize_host(" site "), "site");
        for h in [
            "API.Example.com:8080",
            "example.com.",
            "[::1]:80",
            "[::1]",
            "127.0.0.1:3000",
            " site ",
            "a:b",
            "x.:",
            "",
        ] {
            let mut buf = [0u8; 255];
            assert_eq!(
                normalize_host_into(h.as_bytes(), &mut buf),
                Some(normalize_host(h).as_str()),
                "{h:?}"
            );
        }
        let long = "a".repeat(300);
        assert_eq!(normalize_host_into(long.as_bytes(), &mut [0u8; 255]), None);
    }

    #[test]
    fn validates_targets_and_names() {
        assert_eq!(parse_target("127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(parse_target("[::1]:8080").unwrap(), "[::1]:8080");
        assert_eq!(parse_target("localhost:1").unwrap(), "localhost:1");
        for bad in [
            "127.0.0.1",
            "http://127.0.0.1:80",
            "a@b:1",
            "h:0",
            "",
            "h:80/x",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
        check_name("api-1.blue_x").unwrap();
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_by_domain_then_single_service() {
        let t = Table::default();
        assert!(t.route(Some("x")).is_none());
        // One service without domains: everything goes to it.
        t.install("a", "127.0.0.1:1", &[]).unwrap();
        assert_eq!(t.route(Some("other")).unwrap().name, "a");
        assert_eq!(t.route(None).unwrap().name, "a");
        // With domains: only they do (a forged Host does not reach it).
        t.install("a", "127.0.0.1:1", &["a.example".into()])
            .unwrap();
        assert_eq!(t.route(Some("a.example")).unwrap().name, "a");
        assert!(t.route(Some("other")).is_none());
        assert!(t.route(None).is_none());
        t.install("b", "127.0.0.1:2", &["b.example".into()])
            .unwrap();
        assert_eq!(t.route(Some("b.example")).unwrap().name, "b");
        assert_eq!(t.route(Some("a.example")).unwrap().name, "a");
        assert!(t.route(Some("other")).is_none());
        assert!(t.route(None).is_none());
        // A domain cannot be taken from another service.
        assert!(matches!(
            t.install("b", "127.0.0.1:2", &["a.example".into()]),
            Err(Error::DomainConflict { .. })
        ));
        t.remove("a").unwrap();
        assert!(t.route(Some("a.example")).is_none());
        assert_eq!(t.route(Some("b.example")).unwrap().name, "b");
        // One service without domains beside services with (an app and its previews): it
        // gets every other host; two without: nobody does.
        t.install("c", "127.0.0.1:3", &[]).unwrap();
        assert_eq!(t.route(Some("other")).unwrap().name, "c");
        assert_eq!(t.route(None).unwrap().name, "c");
        assert_eq!(t.route(Some("b.example")).unwrap().name, "b");
        t.install("d", "127.0.0.1:4", &[]).unwrap();
        assert!(t.route(Some("other")).is_none());
        t.remove("d").unwrap();
        assert_eq!(t.route(Some("other")).unwrap().name, "c");
    }

    #[test]
    fn swap_is_seen_by_new_requests_and_old_guards_drain() {
        let t = Table::default();
        t.install("a", "127.0.0.1:1", &[]).unwrap();
        let s = t.get("a").unwrap();
        let g1 = s.acquire();
        let old = g1.target().clone();
        let inst = t.install("a", "127.0.0.1:2", &[]).unwrap();
        assert!(!inst.created);
        assert!(Arc::ptr_eq(inst.previous.as_ref().unwrap(), &old));
        assert_eq!(old.in_flight(), 1);
        let g2 = s.acquire();
        assert_eq!(g2.target().addr, "127.0.0.1:2");
        assert_eq!(s.in_flight(), 2);
        s.count_request();
        drop(g1);
        assert_eq!(old.in_flight(), 0);
        // Same target again: no swap.
        assert!(t
            .install("a", "127.0.0.1:2", &[])
            .unwrap()
            .previous
            .is_none());
        drop(g2);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.requests(), 1);
    }

    #[test]
    fn a_canary_gets_its_share_and_promotion_keeps_its_target() {
        let t = Table::default();
        t.install("a", "127.0.0.1:1", &[]).unwrap();
        assert!(t.set_canary("a", "127.0.0.1:1", 10).is_err());
        assert!(t.set_canary("b", "127.0.0.1:2", 10).is_err());
        let (current, replaced) = t.set_canary("a", "127.0.0.1:2", 10).unwrap();
        assert_eq!(current.addr, "127.0.0.1:1");
        assert!(replaced.is_none());
        let s = t.get("a").unwrap();
        let picks: Vec<String> = (0..10_000)
            .map(|_| s.acquire().target().addr.clone())
            .collect();
        let to_canary = picks.iter().filter(|a| *a == "127.0.0.1:2").count();
        // 10% of 10,000 (one standard deviation is 30).
        assert!((850..=1150).contains(&to_canary), "{to_canary}");
        // No fixed pattern: even and odd requests both reach the canary about as often.
        let even = picks
            .iter()
            .step_by(2)
            .filter(|a| *a == "127.0.0.1:2")
            .count();
        assert!((400..=600).contains(&even), "{even} of {to_canary}");
        let canary = s.canary().unwrap().0;
        let roles: Vec<_> = s
            .targets()
            .iter()
            .map(|(t, r)| (t.addr.clone(), *r))
            .collect();
        assert_eq!(
            roles,
            [
                ("127.0.0.1:1".to_string(), "current"),
                ("127.0.0.1:2".to_string(), "canary")
            ]
        );
        // Promotion: the canary's own target becomes current.
        let inst = t.install("a", "127.0.0.1:2", &[]).unwrap();
        assert_eq!(inst.previous.unwrap().addr, "127.0.0.1:1");
        assert!(inst.ended_canary.is_none());
        assert!(Arc::ptr_eq(&s.current(), &canary));
        assert!(s.canary().is_none());
        assert_eq!(s.targets()[1].1, "previous");
        // A canary ended by installing the current target again.
        t.set_canary("a", "127.0.0.1:3", 50).unwrap();
        let inst = t.install("a", "127.0.0.1:2", &[]).unwrap();
        assert!(inst.previous.is_none());
        assert_eq!(inst.ended_canary.unwrap().addr, "127.0.0.1:3");
        assert!((0..10).all(|_| s.acquire().target().addr == "127.0.0.1:2"));
    }
}
