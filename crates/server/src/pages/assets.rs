//! The panel's stylesheet and script, compiled into the binary and served under `/assets/`
//! with the first 12 hex digits of their SHA-256 in the name (`panel.3f2a….css`): a new build
//! gets new names, so they can be cached for a year (`immutable`). An unknown or outdated name
//! is 404.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

const CSS: &str = include_str!("../../assets/panel.css");
const JS: &str = include_str!("../../assets/panel.js");

struct Names {
    css: String,
    js: String,
}

fn names() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| {
        let name = |body: &str, ext: &str| {
            let h = Sha256::digest(body.as_bytes());
            format!("panel.{}.{ext}", &crate::secret::hex(&h)[..12])
        };
        Names {
            css: name(CSS, "css"),
            js: name(JS, "js"),
        }
    })
}

pub(crate) fn css_path() -> String {
    format!("/assets/{}", names().css)
}

pub(crate) fn js_path() -> String {
    format!("/assets/{}", names().js)
}

pub(crate) async fn serve(Path(name): Path<String>) -> Response {
    let n = names();
    let (body, kind) = if name == n.css {
        (CSS, "text/css; charset=utf-8")
    } else if name == n.js {
        (JS, "text/javascript; charset=utf-8")
    } else {
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}
