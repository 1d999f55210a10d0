//! What the proxy refuses to forward and which client headers it never passes on. It owns the
//! checks of a request's framing and `Host` (each failure is one short plain-text answer) and
//! the list of forwarding headers a client must not be able to forge; it must not route or
//! touch the network.
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

use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Method, StatusCode};

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

/// Removes the headers [`is_client_forwarding`] names.
#[cfg(test)]
pub(crate) fn strip_client_forwarding(headers: &mut HeaderMap) {
    let names: Vec<_> = headers
        .keys()
        .filter(|n| is_client_forwarding(n.as_str()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
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
        strip_client_forwarding(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");
    }
}
