//! What the proxy refuses to forward and which headers it never passes on. It owns the checks
//! of a request's framing and `Host` (each failure is one short plain-text answer), the list of
//! forwarding headers a client must not be able to forge, the hop-by-hop headers, and the
//! rewriting of a request's headers for the upstream hop (the forwarding headers the proxy
//! sets); it must not route or touch the network.
//!
//! The framing checks repeat what `guard` refuses before hyper sees a head (hyper drops a
//! `Content-Length` beside `Transfer-Encoding` and folds equal ones, so only the guard sees
//! those); they stay as a second line.
//!
//! Invariants:
//! - A request whose length or target is ambiguous is answered by the proxy and never reaches
//!   an upstream: `CONNECT`, more than one `Host`, a missing `Host`, a transfer coding other
//!   than exactly `chunked`, more than one `Content-Length` line or a list in one.
//! - A header a client could use to claim another address, scheme or port for itself
//!   (`Forwarded`, `X-Real-IP`, ...) and any header name with an underscore (which many app
//!   servers fold into the dash spelling) is dropped before forwarding.
//! - The client's `X-Forwarded-For`, `-Proto` and `-Host` are replaced, never appended to (the
//!   proxy is the edge: nothing before it is trusted), unless the client is a proxy the user
//!   listed in `trusted_proxies` (a load balancer or CDN in front): then its `X-Forwarded-For`
//!   is kept with its address appended, and its `-Proto` and `-Host` are kept ([`Relayed`]).
//!   With [`RelayHeader::Forwarded`] the same is read from RFC 7239's `Forwarded` instead,
//!   and the trusted proxy's `X-Forwarded-*` are replaced as anyone's. `Forwarded` itself
//!   and the other forwarding headers are dropped from trusted proxies too.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use std::net::IpAddr;

/// Why a request is answered by the proxy instead of forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) body: &'static str,
}

const fn refuse(status: StatusCode, body: &'static str) -> Refusal {
    Refusal { status, body }
}

/// Checks a request before it is routed. `has_authority` says whether the request target is
/// in absolute form (it then names the host itself).
pub(crate) fn check_request(
    method: &Method,
    headers: &HeaderMap,
    has_authority: bool,
) -> Result<(), Refusal> {
    if method == Method::CONNECT {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: this is not a forward proxy\n",
        ));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if !has_authority => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad request: no Host header\n",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad request: more than one Host header\n",
            ))
        }
        _ => {}
    }
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        // hyper has already refused a request whose last coding is not `chunked`.
        let only_chunked = te.next().is_none() && first.as_bytes().eq_ignore_ascii_case(b"chunked");
        if !only_chunked {
            return Err(refuse(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported\n",
            ));
        }
    }
    let mut cl = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = cl.next() {
        if cl.next().is_some() || first.as_bytes().contains(&b',') {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad request: more than one Content-Length\n",
            ));
        }
    }
    Ok(())
}

/// Client-supplied headers that claim something about the client's connection; only the
/// proxy says that (with `X-Forwarded-For`, `-Proto` and `-Host`).
static FORGEABLE: [HeaderName; 8] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-client-ip"),
];

/// Whether a header (its name, lowercase as `http` keeps names) is one the client may not
/// send on: a forgeable forwarding header, or any name with an underscore (as nginx drops by
/// default: `X_Forwarded_For` reaches a CGI-style app as `X-Forwarded-For`). Most names are
/// passed by their length alone.
pub(crate) fn is_client_forwarding(name: &str) -> bool {
    name.as_bytes().contains(&b'_')
        || (matches!(name.len(), 9 | 11 | 14 | 15 | 16 | 18)
            && FORGEABLE.iter().any(|f| f.as_str() == name))
}

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1, plus the usual extras).
pub(crate) static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes from a request's headers what must not reach the upstream: the hop-by-hop ones
/// (and those named in `Connection`), the client's claims about its connection
/// ([`is_client_forwarding`]) and the client's own copies of the forwarding headers
/// the proxy sets. One pass over the names finds them all (most requests have none), so that
/// only headers that are there get removed.
pub(crate) fn strip_for_upstream(headers: &mut HeaderMap) {
    let mut found = [false; HOP_BY_HOP.len()];
    let mut any = false;
    let mut others: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let s = name.as_str();
        if let Some(i) = hop_by_hop_index(s.as_bytes()) {
            found[i] = true;
            any = true;
        } else if is_client_forwarding(s) || SET_BY_PROXY.contains(name) {
            others.push(name.clone());
        }
    }
    for name in others {
        headers.remove(name);
    }
    if any {
        remove_hop_by_hop(headers, found);
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`. One pass over the
/// names finds them (most messages have none, or only `Connection: keep-alive`), so that only
/// headers that are there get removed.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name.as_str().as_bytes()) {
            found[i] = true;
            any = true;
        }
    }
    if any {
        remove_hop_by_hop(headers, found);
    }
}

/// Removes the hop-by-hop headers `found` marks (by their place in [`HOP_BY_HOP`]) and, if
/// `Connection` is one, the headers it names.
fn remove_hop_by_hop(headers: &mut HeaderMap, found: [bool; HOP_BY_HOP.len()]) {
    if found[0] {
        // Names listed in `Connection`, but for the usual `keep-alive` (which goes anyway)
        // and `close`, which name no header.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                // `Connection: host` must not make the upstream see another Host.
                if token.eq_ignore_ascii_case("keep-alive")
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("host")
                {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(n);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(found).filter(|(_, f)| *f) {
        headers.remove(name);
    }
}

/// The index of `name` (any case) in [`HOP_BY_HOP`]; most names are rejected by their
/// length alone, the rest compared with the one or two names of that length (every header
/// of every request and response comes through here).
pub(crate) fn hop_by_hop_index(name: &[u8]) -> Option<usize> {
    let places: &[usize] = match name.len() {
        2 => &[5],
        7 => &[6, 8],
        10 => &[0, 1],
        16 => &[2],
        17 => &[7],
        18 => &[3],
        19 => &[4],
        _ => return None,
    };
    places
        .iter()
        .copied()
        .find(|&i| HOP_BY_HOP_BYTES[i].eq_ignore_ascii_case(name))
}

/// [`HOP_BY_HOP`]'s names as bytes, in the same order.
const HOP_BY_HOP_BYTES: [&[u8]; 9] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// The forwarding headers the proxy sets (a client's are replaced).
pub(crate) static SET_BY_PROXY: [HeaderName; 3] =
    [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST];

/// Whether `ip` is in one of the `ranges` (network, prefix length): `trusted_proxies`. An
/// IPv4 client seen as an IPv4-mapped IPv6 address (a listener on `[::]`) matches its IPv4
/// ranges.
pub(crate) fn in_ranges(ranges: &[(IpAddr, u8)], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ranges.iter().any(|&(net, prefix)| match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    })
}

/// Where the proxies in `trusted_proxies` say whom they relay (`[proxy]
/// trusted_proxies_header`). A proxy in front writes one of the two and usually passes the
/// other through from its client untouched, so only the one it writes may be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayHeader {
    /// `X-Forwarded-For` (appended to by each proxy), `X-Forwarded-Proto` and
    /// `X-Forwarded-Host`: what most load balancers and CDNs send.
    #[default]
    XForwardedFor,
    /// RFC 7239's `Forwarded` (an element per proxy, with `for=`, `proto=` and `host=`).
    Forwarded,
}

/// What a trusted proxy in front (`trusted_proxies`) says about a request it relays, read
/// before the request's forwarding headers are stripped.
pub(crate) struct Relayed {
    /// `X-Forwarded-For` for the app: the proxy's chain with the proxy's own address
    /// (`peer`) appended (only `peer` if it sent none or an unreadable one).
    pub(crate) chain: Option<HeaderValue>,
    /// The client the chain names, for the access log: read from the right (each proxy
    /// appends the address it was reached from), its first address outside
    /// `trusted_proxies`; if every address up to the first that is not one is trusted, the
    /// furthest of them (as nginx's `real_ip_recursive`).
    pub(crate) client: Option<HeaderValue>,
    /// `X-Forwarded-Proto`, if it says `https` or `http` (with `Forwarded`: the `proto=` of
    /// the element that names `client`).
    pub(crate) https: Option<bool>,
    /// `X-Forwarded-Host`, if it sent one (with `Forwarded`: the `host=` of the element that
    /// names `client`).
    pub(crate) host: Option<HeaderValue>,
}

impl Relayed {
    /// Reads what the trusted proxy `peer` sent in `headers`, in the header `via` says.
    pub(crate) fn read(
        headers: &HeaderMap,
        peer: Option<&HeaderValue>,
        ranges: &[(IpAddr, u8)],
        via: RelayHeader,
    ) -> Relayed {
        match via {
            RelayHeader::XForwardedFor => Relayed::read_x_forwarded(headers, peer, ranges),
            RelayHeader::Forwarded => Relayed::read_forwarded(headers, peer, ranges),
        }
    }

    fn read_x_forwarded(
        headers: &HeaderMap,
        peer: Option<&HeaderValue>,
        ranges: &[(IpAddr, u8)],
    ) -> Relayed {
        let peer_text = peer.and_then(|p| p.to_str().ok());
        let mut hops: Vec<&str> = Vec::new();
        for v in headers.get_all(X_FORWARDED_FOR) {
            match v.to_str() {
                Ok(v) => hops.extend(v.split(',').map(str::trim).filter(|h| !h.is_empty())),
                Err(_) => {
                    hops.clear();
                    break;
                }
            }
        }
        hops.extend(peer_text);
        let chain = HeaderValue::try_from(hops.join(", ")).ok();
        let mut client = peer.cloned();
        for ip in hops.iter().rev().map_while(|h| h.parse::<IpAddr>().ok()) {
            client = HeaderValue::try_from(ip.to_string()).ok();
            if !in_ranges(ranges, ip) {
                break;
            }
        }
        let first = |name: &HeaderName| {
            let v = headers.get(name)?.to_str().ok()?;
            Some(v.split(',').next()?.trim()).filter(|v| !v.is_empty())
        };
        let https = scheme(first(&X_FORWARDED_PROTO));
        let host = first(&X_FORWARDED_HOST).and_then(|h| HeaderValue::try_from(h).ok());
        Relayed {
            chain,
            client,
            https,
            host,
        }
    }

    /// As [`Relayed::read_x_forwarded`], from `Forwarded`. Each proxy appends an element
    /// saying whom it was reached by (`for=`), over what (`proto=`) and for which `host=`.
    /// Read from the right, every element looked at was written by a trusted proxy: the
    /// last by `peer`, each one before it by the trusted address the next one names. The
    /// client is the first `for=` outside the ranges (or, stopping at an element without a
    /// readable address, the furthest trusted one), and `proto=` and `host=` are read from
    /// the element the walk stopped at. A header that does not parse is as none.
    fn read_forwarded(
        headers: &HeaderMap,
        peer: Option<&HeaderValue>,
        ranges: &[(IpAddr, u8)],
    ) -> Relayed {
        let elements = forwarded_elements(headers).unwrap_or_default();
        let mut hops: Vec<String> = elements
            .iter()
            .filter_map(|e| e.node.as_deref().map(node_text))
            .collect();
        hops.extend(peer.and_then(|p| p.to_str().ok()).map(str::to_string));
        let chain = HeaderValue::try_from(hops.join(", ")).ok();
        let mut client = peer.cloned();
        let mut stopped: Option<&Element> = None;
        for e in elements.iter().rev() {
            stopped = Some(e);
            let Some(ip) = e.node.as_deref().and_then(node_ip) else {
                break;
            };
            client = HeaderValue::try_from(ip.to_string()).ok();
            if !in_ranges(ranges, ip) {
                break;
            }
        }
        let https = scheme(stopped.and_then(|e| e.proto.as_deref()));
        let host = stopped
            .and_then(|e| e.host.as_deref())
            .filter(|h| !h.is_empty())
            .and_then(|h| HeaderValue::try_from(h).ok());
        Relayed {
            chain,
            client,
            https,
            host,
        }
    }
}

/// `https` or `http` (any case) as whether it is https; anything else as not said.
fn scheme(proto: Option<&str>) -> Option<bool> {
    match proto {
        Some(p) if p.eq_ignore_ascii_case("https") => Some(true),
        Some(p) if p.eq_ignore_ascii_case("http") => Some(false),
        _ => None,
    }
}

const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// One element of `Forwarded` (what one proxy said), its values unquoted.
#[derive(Debug, Default, PartialEq, Eq)]
struct Element {
    node: Option<String>,
    proto: Option<String>,
    host: Option<String>,
}

/// The elements of every `Forwarded` line, in order; `None` if one does not parse (RFC 7239
/// section 4, with a parameter given twice in one element as an error).
fn forwarded_elements(headers: &HeaderMap) -> Option<Vec<Element>> {
    let mut out = Vec::new();
    for line in headers.get_all(FORWARDED) {
        parse_forwarded(line.to_str().ok()?.as_bytes(), &mut out)?;
    }
    Some(out)
}

/// RFC 9110's `tchar`.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn parse_forwarded(b: &[u8], out: &mut Vec<Element>) -> Option<()> {
    let skip_ows = |i: &mut usize| {
        while matches!(b.get(*i), Some(b' ' | b'\t')) {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while b.get(*i).copied().is_some_and(is_tchar) {
            *i += 1;
        }
        (*i > start).then(|| String::from_utf8_lossy(&b[start..*i]).into_owned())
    };
    let mut i = 0;
    let mut el = Element::default();
    let mut empty = true;
    loop {
        skip_ows(&mut i);
        match b.get(i) {
            None => break,
            Some(b',') => {
                if !empty {
                    out.push(std::mem::take(&mut el));
                }
                empty = true;
                i += 1;
                continue;
            }
            Some(b';') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let name = token(&mut i)?;
        if b.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        let value = if b.get(i) == Some(&b'"') {
            i += 1;
            let mut v = Vec::new();
            loop {
                match *b.get(i)? {
                    b'"' => break,
                    b'\\' => {
                        i += 1;
                        v.push(*b.get(i)?);
                    }
                    c => v.push(c),
                }
                i += 1;
            }
            i += 1;
            String::from_utf8(v).ok()?
        } else {
            token(&mut i)?
        };
        let slot = match name.to_ascii_lowercase().as_str() {
            "for" => Some(&mut el.node),
            "proto" => Some(&mut el.proto),
            "host" => Some(&mut el.host),
            _ => None, // `by` and extensions: not needed
        };
        if let Some(slot) = slot {
            if slot.replace(value).is_some() {
                return None;
            }
        }
        empty = false;
        skip_ows(&mut i);
        if !matches!(b.get(i), None | Some(b';' | b',')) {
            return None;
        }
    }
    if !empty {
        out.push(el);
    }
    Some(())
}

/// The address a `for=` node names: `192.0.2.43`, `192.0.2.43:47011`, `"[2001:db8::17]"`,
/// `"[2001:db8::17]:4711"` (a port may be obfuscated, `_abc`); `unknown` and obfuscated
/// identifiers (`_hidden`) name none.
fn node_ip(node: &str) -> Option<IpAddr> {
    let port_ok =
        |p: &str| !p.is_empty() && (p.bytes().all(|c| c.is_ascii_digit()) || p.starts_with('_'));
    if let Some(rest) = node.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return None;
        }
        return v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (addr, port) = node.split_once(':').unwrap_or((node, "0"));
    if !port_ok(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A `for=` node as an `X-Forwarded-For` entry: its address without port or brackets, else
/// the identifier itself if it is one token (`unknown`, `_hidden`), else `unknown`.
fn node_text(node: &str) -> String {
    match node_ip(node) {
        Some(ip) => ip.to_string(),
        None if !node.is_empty() && node.bytes().all(is_tchar) => node.to_string(),
        None => "unknown".to_string(),
    }
}

/// Rewrites a request's headers for the upstream hop: `client` is the client's address as a
/// header value (or the chain of a trusted proxy), `host` the `Host` it asked for (or the one
/// a trusted proxy relays).
pub(crate) fn forwarded_headers(
    headers: &mut HeaderMap,
    client: Option<HeaderValue>,
    host: Option<HeaderValue>,
    https: bool,
) {
    strip_for_upstream(headers);
    match client {
        Some(v) => headers.insert(X_FORWARDED_FOR, v),
        None => headers.remove(X_FORWARDED_FOR),
    };
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(v) => headers.insert(X_FORWARDED_HOST, v),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn refuses_ambiguous_requests() {
        let ok = headers(&[("host", "a.test")]);
        assert_eq!(check_request(&Method::GET, &ok, false), Ok(()));
        let cases: [(&[(&str, &str)], u16); 5] = [
            (&[("host", "a"), ("host", "b")], 400),
            (&[], 400),
            (
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
                501,
            ),
            (
                &[
                    ("host", "a"),
                    ("content-length", "5"),
                    ("content-length", "5"),
                ],
                400,
            ),
            (&[("host", "a"), ("content-length", "5, 5")], 400),
        ];
        for (lines, status) in cases {
            let r = check_request(&Method::POST, &headers(lines), false).unwrap_err();
            assert_eq!(r.status.as_u16(), status, "{lines:?}");
        }
        let r = check_request(&Method::CONNECT, &ok, true).unwrap_err();
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        // Absolute form names the host.
        assert_eq!(check_request(&Method::GET, &HeaderMap::new(), true), Ok(()));
    }

    #[test]
    fn every_forgeable_name_is_of_a_length_the_check_looks_at() {
        for f in &FORGEABLE {
            assert!(is_client_forwarding(f.as_str()), "{f}");
        }
        assert!(!is_client_forwarding("x-forwarded-for"));
        assert!(!is_client_forwarding("user-agent"));
    }

    #[test]
    fn strips_forgeable_and_underscored_headers() {
        let mut h = headers(&[
            ("forwarded", "for=6.6.6.6;proto=https"),
            ("x-real-ip", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-scheme", "https"),
            ("x-forwarded-port", "443"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x-app", "kept"),
        ]);
        strip_for_upstream(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn strips_hop_by_hop_and_sets_forwarded_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        forwarded_headers(
            &mut h,
            Some(HeaderValue::from_static("10.0.0.9")),
            Some(HeaderValue::from_static("Site:8080")),
            false,
        );
        for gone in [
            "connection",
            "x-hop",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "Site:8080");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn every_hop_by_hop_name_is_found_in_any_case_and_no_other_name() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(HOP_BY_HOP_BYTES[i], name.as_str().as_bytes());
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(
                hop_by_hop_index(name.as_str().as_bytes()),
                Some(i),
                "{name}"
            );
            assert_eq!(hop_by_hop_index(upper.as_bytes()), Some(i), "{upper}");
        }
        for other in [
            "user-agent",
            "connectionx",
            "tf",
            "trailers",
            "upgrade-",
            "content-length",
            "proxy-authenticatx",
            "x-forwarded-for",
            "",
        ] {
            assert_eq!(hop_by_hop_index(other.as_bytes()), None, "{other}");
        }
    }

    fn ranges(list: &[&str]) -> Vec<(IpAddr, u8)> {
        list.iter()
            .map(|r| {
                let (a, p) = r.split_once('/').unwrap();
                (a.parse().unwrap(), p.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn trusted_ranges_match_by_prefix_and_mapped_ipv4() {
        let r = ranges(&["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        for (ip, is) in [
            ("10.255.1.2", true),
            ("11.0.0.1", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("::ffff:10.1.1.1", true),
            ("2001:db8:ffff::1", true),
            ("2001:db9::1", false),
            ("::1", false),
        ] {
            assert_eq!(in_ranges(&r, ip.parse().unwrap()), is, "{ip}");
        }
        assert!(in_ranges(
            &ranges(&["0.0.0.0/0"]),
            "203.0.113.9".parse().unwrap()
        ));
        assert!(!in_ranges(&[], "10.0.0.1".parse().unwrap()));
    }

    /// What the trusted proxy 10.0.0.5 relays (10.0.0.0/8 trusted) in `lines`, read from `via`.
    fn relayed_by_10_0_0_5(lines: &[(&'static str, &'static str)], via: RelayHeader) -> Relayed {
        let peer = HeaderValue::from_static("10.0.0.5");
        Relayed::read(&headers(lines), Some(&peer), &ranges(&["10.0.0.0/8"]), via)
    }

    fn text(v: &Option<HeaderValue>) -> Option<String> {
        v.as_ref().map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn a_trusted_proxys_forwarding_headers_are_kept_and_its_address_appended() {
        let read = |lines: &[(&'static str, &'static str)]| {
            relayed_by_10_0_0_5(lines, RelayHeader::XForwardedFor)
        };

        // A load balancer that terminated TLS for 203.0.113.9.
        let r = read(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
        ]);
        assert_eq!(text(&r.chain).as_deref(), Some("203.0.113.9, 10.0.0.5"));
        assert_eq!(text(&r.client).as_deref(), Some("203.0.113.9"));
        assert_eq!(
            (r.https, text(&r.host).as_deref()),
            (Some(true), Some("shop.example"))
        );

        // A client that forged an address before the trusted proxy appended the real one:
        // the log names the real one (read from the right); the app gets the whole chain.
        let r = read(&[
            ("x-forwarded-for", "1.2.3.4, 198.51.100.7"),
            ("x-forwarded-for", "10.9.9.9"),
        ]);
        assert_eq!(
            text(&r.chain).as_deref(),
            Some("1.2.3.4, 198.51.100.7, 10.9.9.9, 10.0.0.5")
        );
        assert_eq!(text(&r.client).as_deref(), Some("198.51.100.7"));
        assert_eq!((r.https, r.host), (None, None));

        // Nothing relayed, or only trusted hops: the peer is the client.
        let r = read(&[("x-forwarded-proto", "HTTP, https")]);
        assert_eq!(text(&r.chain).as_deref(), Some("10.0.0.5"));
        assert_eq!(text(&r.client).as_deref(), Some("10.0.0.5"));
        assert_eq!(r.https, Some(false));
        let r = read(&[
            ("x-forwarded-for", "10.1.1.1"),
            ("x-forwarded-proto", "gopher"),
        ]);
        assert_eq!(text(&r.client).as_deref(), Some("10.1.1.1"));
        assert_eq!(r.https, None);

        // Garbage in the chain stops the walk: the client is the last address before it.
        let r = read(&[("x-forwarded-for", "203.0.113.9, not-an-address")]);
        assert_eq!(text(&r.client).as_deref(), Some("10.0.0.5"));
        assert_eq!(
            text(&r.chain).as_deref(),
            Some("203.0.113.9, not-an-address, 10.0.0.5")
        );
    }

    #[test]
    fn forwarded_parses_as_rfc_7239_writes_it_and_refuses_what_does_not() {
        let el = |node: Option<&str>, proto: Option<&str>, host: Option<&str>| Element {
            node: node.map(str::to_string),
            proto: proto.map(str::to_string),
            host: host.map(str::to_string),
        };
        // RFC 7239's own examples, two lines, quoting, escapes, case and empty elements.
        let h = headers(&[
            (
                "forwarded",
                "for=\"_gazonk\", For=\"[2001:db8:cafe::17]:4711\"",
            ),
            (
                "forwarded",
                "for=192.0.2.60;proto=http;by=203.0.113.43 , ,for=\"a\\\"b;c,d\";HOST=x.example",
            ),
        ]);
        assert_eq!(
            forwarded_elements(&h).unwrap(),
            [
                el(Some("_gazonk"), None, None),
                el(Some("[2001:db8:cafe::17]:4711"), None, None),
                el(Some("192.0.2.60"), Some("http"), None),
                el(Some("a\"b;c,d"), None, Some("x.example")),
            ]
        );
        for bad in [
            "for",
            "for=",
            "for=1.2.3.4 proto=https",
            "for=\"1.2.3.4",
            "=1.2.3.4",
            "for=1.2.3.4;for=5.6.7.8",
            "for=1.2.3.4;proto=https;proto=http",
            "for=[::1]",
        ] {
            let h = headers(&[("forwarded", bad)]);
            assert_eq!(forwarded_elements(&h), None, "{bad}");
        }
        for (node, ip, text) in [
            ("192.0.2.43", Some("192.0.2.43"), "192.0.2.43"),
            ("192.0.2.43:47011", Some("192.0.2.43"), "192.0.2.43"),
            ("192.0.2.43:_p", Some("192.0.2.43"), "192.0.2.43"),
            ("[2001:db8::17]", Some("2001:db8::17"), "2001:db8::17"),
            ("[2001:db8::17]:4711", Some("2001:db8::17"), "2001:db8::17"),
            ("2001:db8::17", None, "unknown"),
            ("192.0.2.43:", None, "unknown"),
            ("[2001:db8::17]x", None, "unknown"),
            ("unknown", None, "unknown"),
            ("_hidden", None, "_hidden"),
            ("a\"b;c,d", None, "unknown"),
        ] {
            assert_eq!(
                node_ip(node).map(|i| i.to_string()).as_deref(),
                ip,
                "{node}"
            );
            assert_eq!(node_text(node), text, "{node}");
        }
    }

    #[test]
    fn a_trusted_proxys_forwarded_is_read_from_the_right_and_its_x_forwarded_ignored() {
        let read = |lines: &[(&'static str, &'static str)]| {
            relayed_by_10_0_0_5(lines, RelayHeader::Forwarded)
        };

        // A client forged an element and an X-Forwarded-*; the balancer (10.0.0.5) appended
        // the truth, which another trusted hop (10.1.1.1) relayed.
        let r = read(&[
            (
                "forwarded",
                "for=6.6.6.6;proto=https;host=evil.example, for=198.51.100.7;proto=http;host=shop.example",
            ),
            ("forwarded", "for=\"10.1.1.1:1234\";proto=https;host=inner"),
            ("x-forwarded-for", "7.7.7.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "forged.example"),
        ]);
        assert_eq!(
            text(&r.chain).as_deref(),
            Some("6.6.6.6, 198.51.100.7, 10.1.1.1, 10.0.0.5")
        );
        assert_eq!(text(&r.client).as_deref(), Some("198.51.100.7"));
        assert_eq!(
            (r.https, text(&r.host).as_deref()),
            (Some(false), Some("shop.example"))
        );

        // A balancer that ended TLS for an IPv6 client.
        let r = read(&[(
            "forwarded",
            "for=\"[2001:db8::9]:4711\";proto=HTTPS;host=shop.example",
        )]);
        assert_eq!(text(&r.chain).as_deref(), Some("2001:db8::9, 10.0.0.5"));
        assert_eq!(text(&r.client).as_deref(), Some("2001:db8::9"));
        assert_eq!(r.https, Some(true));

        // An element that names no address stops the walk at the trusted hop after it, and
        // its own proto= is what that trusted hop said.
        let r = read(&[("forwarded", "for=_hidden;proto=https, for=10.2.2.2")]);
        assert_eq!(
            text(&r.chain).as_deref(),
            Some("_hidden, 10.2.2.2, 10.0.0.5")
        );
        assert_eq!(text(&r.client).as_deref(), Some("10.2.2.2"));
        assert_eq!(r.https, Some(true));

        // Only X-Forwarded-* (not what this balancer writes), or a Forwarded that does not
        // parse: the peer is the client, and nothing it relays is believed.
        for lines in [
            &[
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-proto", "https"),
            ][..],
            &[
                ("forwarded", "for=203.0.113.9;proto=https"),
                ("forwarded", "for=1.2.3.4 junk"),
            ][..],
        ] {
            let r = read(lines);
            assert_eq!(text(&r.chain).as_deref(), Some("10.0.0.5"), "{lines:?}");
            assert_eq!(text(&r.client).as_deref(), Some("10.0.0.5"), "{lines:?}");
            assert_eq!((r.https, r.host), (None, None), "{lines:?}");
        }
    }
}
