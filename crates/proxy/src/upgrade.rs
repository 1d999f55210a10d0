//! `Upgrade` (WebSockets and any other protocol switch) through the proxy: the request goes to
//! the target with its `Connection: upgrade` and `Upgrade` headers, the target's `101` goes
//! back to the client, and from then on the two connections are one byte tunnel that holds the
//! request's in-flight guard. It owns the tunnel and how it ends; it must not route.
//!
//! Invariants:
//! - A tunnel counts as in flight on its target for as long as it is open, so a switch leaves
//!   it on the old target and its drain waits for it.
//! - When the old target is retired (its drain deadline passed), each of its tunnels is closed:
//!   a WebSocket gets a close frame (1001, going away) in both directions, sent between two
//!   frames, never inside one; any other protocol gets its connections shut down.

use std::time::Duration;

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::log;
use crate::table::InFlight;

/// How long a closing tunnel waits for a frame to end before it just shuts down.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The `Upgrade` a request asks for: only with `Connection: upgrade` (RFC 9110 7.8).
pub(crate) fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let asks = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    asks.then(|| upgrade.clone())
}

/// Puts the upgrade headers back on a message whose hop-by-hop headers were stripped.
pub(crate) fn restore(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// Joins the client and upstream connections once both have switched, until either side
/// closes or the target is retired. `keep` (the client connection's slot, marked busy) lives
/// as long as the tunnel, so that open tunnels count against the connection cap.
pub(crate) fn tunnel<K: Send + 'static>(
    client: OnUpgrade,
    upstream: OnUpgrade,
    guard: InFlight,
    websocket: bool,
    keep: K,
) {
    tokio::spawn(async move {
        let (c, u) = match tokio::try_join!(client, upstream) {
            Ok(x) => x,
            Err(e) => {
                log::line(format_args!(
                    "upgrade to {} failed: {e}",
                    guard.target().addr
                ));
                return;
            }
        };
        let retired = guard.target().retired();
        run(c, u, retired, websocket).await;
        drop(guard);
        drop(keep);
    });
}

async fn run(
    client: Upgraded,
    upstream: Upgraded,
    retired: watch::Receiver<bool>,
    websocket: bool,
) {
    let (cr, cw) = tokio::io::split(TokioIo::new(client));
    let (ur, uw) = tokio::io::split(TokioIo::new(upstream));
    // Toward the client frames are unmasked; toward the app, masked (RFC 6455 5.1).
    let down = pipe(
        ur,
        cw,
        retired.clone(),
        websocket.then_some(CLOSE_TO_CLIENT),
    );
    let up = pipe(cr, uw, retired, websocket.then_some(CLOSE_TO_APP));
    let _ = tokio::join!(down, up);
}

/// A close frame with status 1001 (going away), unmasked.
const CLOSE_TO_CLIENT: &[u8] = &[0x88, 0x02, 0x03, 0xe9];
/// The same, masked with key 0 (a mask the proxy chose; the payload is not the client's).
const CLOSE_TO_APP: &[u8] = &[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe9];

/// Copies `from` to `to` until `from` ends, or until the target is retired: then, between
/// two frames, writes `close` (if a WebSocket) and shuts `to` down.
async fn pipe<R, W>(
    mut from: R,
    mut to: W,
    mut retired: watch::Receiver<bool>,
    close: Option<&'static [u8]>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 8192];
    let mut frames = Frames::default();
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        if let Some(since) = closing {
            if close.is_none() || frames.at_boundary() || since.elapsed() > CLOSE_GRACE {
                if let (Some(c), true) = (close, frames.at_boundary()) {
                    let _ = to.write_all(c).await;
                }
                let _ = to.shutdown().await;
                return;
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    // Retired, and this side ended first (an app that answers the close frame
                    // sent to it by hanging up): the other side still gets its close frame,
                    // unless one already went through.
                    let retiring = closing.is_some() || *retired.borrow();
                    if let (Some(c), true) = (close, retiring && frames.at_boundary() && !frames.closed) {
                        let _ = to.write_all(c).await;
                    }
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            _ = retired_changed(&mut retired), if closing.is_none() => {
                closing = Some(tokio::time::Instant::now());
                continue;
            }
            () = tokio::time::sleep(CLOSE_GRACE), if closing.is_some() => continue,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        frames.advance(&buf[..n]);
    }
}

/// Completes when the target is retired (never, if the watch is gone without that).
async fn retired_changed(retired: &mut watch::Receiver<bool>) {
    if retired.wait_for(|r| *r).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Where a WebSocket byte stream is: inside a frame header, or in a payload.
#[derive(Default)]
struct Frames {
    head: [u8; 14],
    have: usize,
    remaining: u64,
    /// A close frame went through.
    closed: bool,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let k = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= k as u64;
                data = &data[k..];
                continue;
            }
            self.head[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if let Some((head_len, payload)) = frame_lengths(&self.head[..self.have]) {
                if self.have == head_len {
                    self.closed |= self.head[0] & 0x0f == 0x8;
                    self.have = 0;
                    self.remaining = payload;
                }
            }
        }
    }
}

/// A frame's header length and payload length, once enough of the header is known.
fn frame_lengths(h: &[u8]) -> Option<(usize, u64)> {
    if h.len() < 2 {
        return None;
    }
    let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
    let (ext, len) = match h[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let len = match len {
        Some(l) => l,
        None if h.len() >= 2 + ext => h[2..2 + ext]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        None => return None,
    };
    Some((2 + ext + mask, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_frame_boundaries_across_pieces() {
        let mut f = Frames::default();
        // A masked 5-byte text frame, split inside its header and payload.
        let frame = [0x81, 0x85, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o'];
        f.advance(&frame[..1]);
        assert!(!f.at_boundary());
        f.advance(&frame[1..8]);
        assert!(!f.at_boundary());
        f.advance(&frame[8..]);
        assert!(f.at_boundary());
        // A 300-byte unmasked frame (16-bit length) and an empty one.
        let mut big = vec![0x82, 126, 0x01, 0x2c];
        big.extend(std::iter::repeat_n(0u8, 300));
        big.extend([0x89, 0x00]);
        f.advance(&big[..100]);
        assert!(!f.at_boundary());
        f.advance(&big[100..]);
        assert!(f.at_boundary());
        // Text, binary and ping frames are not a close; a close frame (payload 1001) is.
        assert!(!f.closed);
        f.advance(CLOSE_TO_CLIENT);
        assert!(f.at_boundary() && f.closed);
    }

    #[test]
    fn an_upgrade_needs_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(requested(&h).is_none());
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(requested(&h).unwrap(), "websocket");
    }
}
