//! Static targets: a service whose target is a directory on the proxy's own host rather than
//! an address, served by the proxy itself with tower-http's `ServeDir`. A files app's preview
//! is one: its target is the preview's `current` symlink.
//!
//! A request resolves the target once (one `canonicalize`, so `current` is read once) and is
//! served wholly from the release directory it pointed at. So the switch of a files preview
//! stays the files protocol's one `rename(2)` of `current`: the route never changes while the
//! preview lives, a request never mixes two releases, and nothing in the proxy has to be kept
//! in step with the host's `current` (after a crash, what `current` says is what is served).
//!
//! Defaults, for sites that were never meant to be served by anything but a web server:
//! - `GET` and `HEAD` only (else 405);
//! - no directory listing: a directory serves its `index.html`, or 404;
//! - no path component starting with `.` (404): the release's own `.cutover-release.json`, a
//!   stray `.git` or `.env`; except `/.well-known/`;
//! - nothing outside the release directory: `..` is refused, and a path whose real location
//!   (symlinks followed) is not inside the release is 404 (artifacts with escaping symlinks
//!   are refused before they reach a host; this holds even for a directory changed by hand).
//!
//! It owns nothing of the routing: a static target is acquired, counted and drained like any
//! other ([`crate::table`]).

use std::io;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use percent_encoding::percent_decode_str;
use tower_http::services::ServeDir;

use crate::Error;

/// The body of a static target's answer.
pub(crate) type StaticBody = UnsyncBoxBody<Bytes, io::Error>;

/// Largest health response body read from a static target.
const HEALTH_BODY_LIMIT: usize = 1024 * 1024;

/// Whether a target is a directory (an absolute path) rather than `host:port`.
pub(crate) fn is_static(target: &str) -> bool {
    target.starts_with('/')
}

/// Checks a static target: an absolute path without `.` or `..` components, empty
/// components, control characters or a trailing `/`.
pub(crate) fn parse(target: &str) -> Result<String, Error> {
    let bad = |why: &str| {
        Error::Invalid(format!(
            "target {target:?}: {why}; expected host:port or an absolute directory path"
        ))
    };
    if target.len() > 4096 {
        return Err(bad("too long"));
    }
    if target.chars().any(char::is_control) {
        return Err(bad("control characters"));
    }
    if target.len() > 1 && target.ends_with('/') {
        return Err(bad("trailing /"));
    }
    if target[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("empty, . or .. components"));
    }
    Ok(target.to_string())
}

fn plain(status: StatusCode, text: &'static str) -> Response<StaticBody> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Why a path is not served, before `ServeDir` looks at it.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// Nothing is deployed (the target does not resolve).
    Nothing,
    /// A hidden component, or a real location outside the release.
    NotFound,
}

/// Resolves `target` to its release directory and checks the request path against the
/// defaults above. `Ok` is the release directory to serve from. Blocking (file system).
fn resolve(target: &str, path: &str) -> Result<PathBuf, Refused> {
    let release = std::fs::canonicalize(target).map_err(|_| Refused::Nothing)?;
    if !release.is_dir() {
        return Err(Refused::Nothing);
    }
    // As `ServeDir` reads the path (it refuses what is not plain components itself).
    let Ok(decoded) = percent_decode_str(path.trim_start_matches('/')).decode_utf8() else {
        return Ok(release);
    };
    let mut candidate = release.clone();
    for c in Path::new(&*decoded).components() {
        match c {
            Component::Normal(name) => {
                let name = name.to_string_lossy();
                if name.starts_with('.') && name != ".well-known" {
                    return Err(Refused::NotFound);
                }
                candidate.push(&*name);
            }
            Component::CurDir => {}
            _ => return Err(Refused::NotFound),
        }
    }
    // A symlink out of the release: the real location must be inside it (a missing file
    // is `ServeDir`'s 404). A directory is served by its `index.html`: check that too.
    let inside = |p: &Path| match std::fs::canonicalize(p) {
        Ok(real) => real.starts_with(&release),
        Err(_) => true,
    };
    if !inside(&candidate) || (candidate.is_dir() && !inside(&candidate.join("index.html"))) {
        return Err(Refused::NotFound);
    }
    Ok(release)
}

/// Answers one request from the static target `target` (see the module docs).
pub(crate) async fn respond(
    target: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response<StaticBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let (t, p) = (target.to_string(), uri.path().to_string());
    let release = match tokio::task::spawn_blocking(move || resolve(&t, &p)).await {
        Ok(Ok(release)) => release,
        Ok(Err(Refused::NotFound)) => return plain(StatusCode::NOT_FOUND, "not found\n"),
        Ok(Err(Refused::Nothing)) | Err(_) => {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "nothing is deployed here yet\n",
            )
        }
    };
    // Only what `ServeDir` reads of a request: method, path, conditionals and ranges.
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.path_and_query().map_or_else(
        || Uri::from_static("/"),
        |pq| Uri::try_from(pq.as_str()).unwrap_or_else(|_| Uri::from_static("/")),
    );
    for name in [
        header::RANGE,
        header::IF_RANGE,
        header::IF_MODIFIED_SINCE,
        header::IF_UNMODIFIED_SINCE,
        header::ACCEPT_ENCODING,
    ] {
        if let Some(v) = headers.get(&name) {
            req.headers_mut().insert(name, v.clone());
        }
    }
    let mut serve = ServeDir::new(release).append_index_html_on_directories(true);
    let mut resp = match serve.try_call(req).await {
        Ok(r) => r.map(|b| b.boxed_unsync()),
        Err(e) => {
            crate::log::line(format_args!("static target {target}: {e}"));
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file\n");
        }
    };
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// A health probe of a static target: `Ok` on a 2xx answer to `GET path` with its body read.
pub(crate) async fn probe(
    target: &str,
    path: &hyper::http::uri::PathAndQuery,
) -> Result<(), String> {
    let uri = Uri::try_from(path.as_str()).map_err(|e| e.to_string())?;
    let resp = respond(target, &Method::GET, &uri, &HeaderMap::new()).await;
    let status = resp.status();
    Limited::new(resp.into_body(), HEALTH_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("reading body: {e}"))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cutover-static-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn targets_are_absolute_clean_paths() {
        assert!(is_static("/srv/a/current") && !is_static("127.0.0.1:80"));
        assert_eq!(parse("/srv/a/current").unwrap(), "/srv/a/current");
        for bad in ["/srv/../etc", "/srv/./a", "/srv//a", "/srv/a/", "/srv/a\n"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    async fn get(target: &str, path: &str) -> (u16, String) {
        let uri: Uri = path.parse().unwrap();
        let r = respond(target, &Method::GET, &uri, &HeaderMap::new()).await;
        let status = r.status().as_u16();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The defaults of the module docs, on a release reached through a `current` symlink.
    #[tokio::test]
    async fn serves_the_release_current_points_at_and_nothing_else() {
        let d = scratch("serve");
        let rel = d.join("releases/r1");
        std::fs::create_dir_all(rel.join("docs/.well-known")).unwrap();
        std::fs::create_dir_all(rel.join("empty")).unwrap();
        std::fs::write(rel.join("index.html"), "r1\n").unwrap();
        std::fs::write(rel.join("docs/index.html"), "docs\n").unwrap();
        std::fs::write(rel.join(".cutover-release.json"), "{}").unwrap();
        std::fs::write(rel.join("docs/.well-known/x"), "known\n").unwrap();
        std::fs::write(d.join("secret"), "outside\n").unwrap();
        symlink(d.join("secret"), rel.join("leak")).unwrap();
        symlink("../../secret", rel.join("leak2")).unwrap();
        symlink(&d, rel.join("up")).unwrap();
        std::fs::create_dir_all(rel.join("sub")).unwrap();
        symlink(d.join("secret"), rel.join("sub/index.html")).unwrap();
        std::fs::write(rel.join("inner"), "inner\n").unwrap();
        symlink("inner", rel.join("alias")).unwrap();
        let cur = d.join("current");
        let target = cur.to_str().unwrap();
        assert_eq!(get(target, "/").await.0, 503, "nothing deployed yet");
        symlink("releases/r1", &cur).unwrap();

        assert_eq!(get(target, "/").await, (200, "r1\n".into()));
        assert_eq!(get(target, "/docs/").await, (200, "docs\n".into()));
        assert_eq!(
            get(target, "/docs/.well-known/x").await,
            (200, "known\n".into())
        );
        assert_eq!(
            get(target, "/alias").await,
            (200, "inner\n".into()),
            "a link inside"
        );
        for path in [
            "/.cutover-release.json",
            "/%2ecutover-release.json",
            "/leak",
            "/leak2",
            "/up/secret",
            "/sub/",
            "/../secret",
            "/%2e%2e/secret",
            "/docs/%2e%2e/%2e%2e/secret",
            "/empty/",
            "/missing",
        ] {
            assert_eq!(get(target, path).await.0, 404, "{path}");
        }
        let r = respond(
            target,
            &Method::POST,
            &"/".parse().unwrap(),
            &HeaderMap::new(),
        )
        .await;
        assert_eq!(r.status(), 405);
        probe(target, &"/".parse().unwrap()).await.unwrap();
        assert_eq!(
            probe(target, &"/missing".parse().unwrap())
                .await
                .unwrap_err(),
            "HTTP 404 Not Found"
        );

        // The switch is a rename of `current`: the next request serves the new release.
        let rel2 = d.join("releases/r2");
        std::fs::create_dir_all(&rel2).unwrap();
        std::fs::write(rel2.join("index.html"), "r2\n").unwrap();
        symlink("releases/r2", d.join("current.tmp")).unwrap();
        std::fs::rename(d.join("current.tmp"), &cur).unwrap();
        assert_eq!(get(target, "/").await, (200, "r2\n".into()));
        std::fs::remove_dir_all(d).unwrap();
    }
}
