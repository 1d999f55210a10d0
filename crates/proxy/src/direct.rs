//! Upstream exchanges for requests without a body (almost all requests), driven by the
//! request's own task: the request head is written on a pooled (or new) HTTP/1.1 connection,
//! the response head is read and parsed here, and the response body is read from that
//! connection as the client side asks for the next piece. There is no connection task and no
//! channel between tasks: a response wakes the task that sent the request, once. Requests
//! with a body and upgrades go through hyper's client ([`crate::upstream::take`]), which
//! writes a body while it reads a response.
//!
//! It owns writing a request head, reading a response (framing by `Content-Length`, chunked
//! or to the close, RFC 9112 section 6) and deciding whether its connection can carry another
//! request. It must not route, rewrite headers or retry (`forward`), or pool (`upstream`).
//!
//! Invariants:
//! - A connection is handed back for reuse ([`DirectBody::take_reusable`]) only after its
//!   response was read exactly to its end with no byte after it, from an upstream that keeps
//!   the connection open (HTTP/1.1 without `Connection: close`, or HTTP/1.0 with
//!   `keep-alive`), and never after a response framed by `Transfer-Encoding` and
//!   `Content-Length` together.
//! - A response head is at most [`MAX_HEAD`] bytes with at most [`MAX_HEADERS`] headers (as
//!   hyper's client), a chunk-size line at most [`MAX_CHUNK_LINE`] bytes: anything else is
//!   an error, never a guess.
//! - Memory per connection is its read buffer, at most [`MAX_READ`] bytes more than the
//!   pieces of body handed on and not yet written to the client.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use crate::headers::HOP_BY_HOP;

/// Largest response head (hyper's client allows the same).
pub(crate) const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Most headers in a response head, or in a chunked body's trailers.
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size, extensions and CRLF).
pub(crate) const MAX_CHUNK_LINE: usize = 4096;
/// First read of a connection; reads that fill the buffer double it, up to [`MAX_READ`].
const MIN_READ: usize = 8 * 1024;
/// Largest read of a response body.
const MAX_READ: usize = 256 * 1024;

/// An HTTP/1.1 connection to an upstream, idle between requests. Boxed: a request moves its
/// connection from the pool into its exchange, its response body and back, and the futures
/// and responses that hold it move a few times per request, so a pointer moves instead of the
/// whole connection (made once per connection: pooled connections keep their box).
pub(crate) struct Conn(Box<ConnInner>);

/// What a [`Conn`] holds.
pub(crate) struct ConnInner {
    io: TcpStream,
    /// Bytes read and not yet consumed (empty between requests).
    buf: BytesMut,
    /// How much room the next read asks for.
    read_size: usize,
    /// The request head being written (kept to reuse its allocation).
    out: Vec<u8>,
    /// Room for a response head's header places (see [`parse_head`]).
    spans: Vec<[usize; 4]>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.io.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Conn {
    type Target = ConnInner;

    fn deref(&self) -> &ConnInner {
        &self.0
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut ConnInner {
        &mut self.0
    }
}

impl Conn {
    pub(crate) fn new(io: TcpStream) -> Conn {
        Conn(Box::new(ConnInner {
            io,
            buf: BytesMut::new(),
            read_size: MIN_READ,
            out: Vec::new(),
            spans: Vec::new(),
        }))
    }
}

impl ConnInner {
    /// Writes the request head in `out`.
    async fn write_out(&mut self) -> io::Result<()> {
        self.io.write_all(&self.out).await
    }

    /// The response head at the start of `buf`, if it is all there ([`parse_head`]).
    fn parse_head(&mut self, method: &Method) -> Result<Option<Head>, Error> {
        parse_head(&mut self.buf, &mut self.spans, method)
    }

    /// Whether an idle connection can still carry a request: the upstream has neither closed
    /// it nor sent anything on it (a system call; used only where it matters, see `upstream`).
    pub(crate) fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads what the socket has into `buf`: `Ok(0)` is the end of the stream. Through
    /// `AsyncRead::poll_read`, which forgets the socket's readiness after a read that did not
    /// fill the room it had (`try_read_buf` keeps it, and the next response's first read
    /// would then be a system call that finds nothing, once per request).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf))?;
        if n == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// How far an exchange got before it failed: what a retry may assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reached {
    /// The request head was not written in full: the upstream never saw a request.
    NotSent,
    /// Sent, and the connection ended (closed or reset) before any byte of a response.
    NoResponse,
    /// Part of a response (or a bad one) came back.
    Response,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) reached: Reached,
    what: String,
}

impl Error {
    fn new(reached: Reached, what: impl Into<String>) -> Error {
        Error {
            reached,
            what: what.into(),
        }
    }

    fn bad(what: impl Into<String>) -> Error {
        Error::new(Reached::Response, what)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Error {}

/// Sends a request without a body on `conn` and reads the response head: the response's
/// body reads the rest from the connection. `target` is the request target in origin form
/// (`/path?query`); `headers` go out as they are (the caller has rewritten them), then the
/// `extra` lines (the headers the proxy sets, as names and values of `http`'s types).
pub(crate) async fn send(
    mut conn: Conn,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    extra: &[(&str, &[u8])],
) -> Result<Response<DirectBody>, Error> {
    write_head(&mut conn.out, method, target, headers, extra);
    if let Err(e) = conn.write_out().await {
        return Err(Error::new(Reached::NotSent, format!("write request: {e}")));
    }
    // A `1xx` came: the upstream has answered, so an end now is not a missing response.
    let mut answered = false;
    loop {
        if conn.buf.is_empty() {
            // Nothing to parse yet (the usual case right after sending).
        } else if let Some(head) = conn.parse_head(method)? {
            if head.status.is_informational() {
                // `100 Continue` and friends come before the response: they are dropped (a
                // request without a body asked for none). `101` was never asked for.
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Error::bad(
                        "101 Switching Protocols to a request without Upgrade",
                    ));
                }
                answered = true;
                continue;
            }
            return Ok(respond(conn, head));
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err(Error::bad(format!(
                "response head larger than {MAX_HEAD} bytes"
            )));
        }
        let started = answered || !conn.buf.is_empty();
        match conn.fill().await {
            Ok(0) if started => return Err(Error::bad("connection closed in the response head")),
            Ok(0) => {
                return Err(Error::new(
                    Reached::NoResponse,
                    "connection closed before any response",
                ))
            }
            Ok(_) => {}
            Err(e) if started => return Err(Error::bad(format!("read response: {e}"))),
            Err(e) => {
                return Err(Error::new(
                    Reached::NoResponse,
                    format!("read response: {e}"),
                ))
            }
        }
    }
}

/// Writes a request head into `out` (cleared first). Every piece is already valid where it
/// goes: `http`'s types hold no CR, LF or NUL in a name, value, method or target.
fn write_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    extra: &[(&str, &[u8])],
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in extra {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    // A request that usually has a body says it has none (as hyper's client does).
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    /// Its headers but the hop-by-hop ones.
    headers: HeaderMap,
    framing: Framing,
    /// The connection may carry another request after this response.
    keep_alive: bool,
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// It has no body (`HEAD`, 204, 304, or `Content-Length: 0`).
    Empty,
    Length(u64),
    Chunked,
    /// It ends when the upstream closes the connection.
    Close,
}

/// What the framing headers of a head said, gathered in the one pass over its headers.
#[derive(Default)]
struct Seen {
    close: bool,
    keep_alive: bool,
    /// `Connection` names other headers (to be removed as hop-by-hop).
    names_others: bool,
    /// `Transfer-Encoding` present, and whether its last coding (so far) is `chunked`.
    te: bool,
    chunked: bool,
    /// `Content-Length` values agreed so far (`Err`: they did not, or one was malformed).
    length: Option<Result<u64, ()>>,
}

impl Seen {
    fn connection(&mut self, value: &[u8]) {
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !token.is_empty() {
                self.names_others = true;
            }
        }
    }

    fn transfer_encoding(&mut self, value: &[u8]) {
        self.te = true;
        if let Some(last) = value.split(|&b| b == b',').next_back() {
            self.chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        }
    }

    fn content_length(&mut self, value: &[u8]) {
        for piece in value.split(|&b| b == b',') {
            let n = parse_length(piece.trim_ascii()).ok_or(());
            self.length = Some(match (self.length, n) {
                (None, n) => n,
                (Some(Ok(a)), Ok(b)) if a == b => Ok(a),
                _ => Err(()),
            });
        }
    }
}

/// Parses a complete response head at the start of `buf` and removes it from there; `None`
/// if more bytes are needed. Header values share the bytes read (no copy); `spans` is room
/// for the headers' places in the head (kept by the connection, so that it is not made for
/// every response).
fn parse_head(
    buf: &mut BytesMut,
    spans: &mut Vec<[usize; 4]>,
    method: &Method,
) -> Result<Option<Head>, Error> {
    let mut seen = Seen::default();
    spans.clear();
    let (len, code, minor) = {
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::bad(format!(
                    "more than {MAX_HEADERS} headers in the response"
                )))
            }
            Err(e) => return Err(Error::bad(format!("malformed response head: {e}"))),
        };
        let base = buf.as_ptr() as usize;
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            if let Some(hop) = crate::headers::hop_by_hop_index(name).map(|i| &HOP_BY_HOP[i]) {
                if *hop == header::CONNECTION {
                    seen.connection(h.value);
                } else if *hop == header::TRANSFER_ENCODING {
                    seen.transfer_encoding(h.value);
                }
                continue;
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                seen.content_length(h.value);
            }
            let n = name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            spans.push([n, n + name.len(), v, v + h.value.len()]);
        }
        (len, resp.code.unwrap_or(0), resp.version.unwrap_or(1))
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code)
        .map_err(|_| Error::bad(format!("response status {code} out of range")))?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &[n0, n1, v0, v1] in spans.iter() {
        let name = HeaderName::from_bytes(&head[n0..n1])
            .map_err(|_| Error::bad("malformed response header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| Error::bad("malformed response header value"))?;
        headers.append(name, value);
    }
    if seen.names_others {
        // Headers named by `Connection` are this hop's too (rare: one more look at the head).
        remove_named(&head, &mut headers);
    }
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let (framing, keep_alive) = framing(method, status, version, &seen, &mut headers)?;
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// Removes from `headers` those named in the `Connection` headers of `head` (but `Host`).
fn remove_named(head: &[u8], headers: &mut HeaderMap) {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    if httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, head, &mut slots)
        .is_err()
    {
        return;
    }
    for h in resp.headers.iter() {
        if !h.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        for token in h.value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"host") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                headers.remove(name);
            }
        }
    }
}

/// The framing of a response (RFC 9112 section 6.3) and whether its connection may carry
/// another request after it; removes a `Content-Length` that `Transfer-Encoding` overrides.
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    seen: &Seen,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), Error> {
    let mut keep_alive = !seen.close && (version == Version::HTTP_11 || seen.keep_alive);
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        return Ok((Framing::Empty, keep_alive));
    }
    if seen.te {
        // The last coding decides; with a `Content-Length` beside it, the length is dropped
        // and the connection is not trusted with another request.
        if seen.length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        return Ok(if seen.chunked {
            (Framing::Chunked, keep_alive)
        } else {
            (Framing::Close, false)
        });
    }
    Ok(match seen.length {
        Some(Err(())) => {
            return Err(Error::bad(
                "invalid or conflicting Content-Length in the response",
            ))
        }
        Some(Ok(0)) => (Framing::Empty, keep_alive),
        Some(Ok(n)) => (Framing::Length(n), keep_alive),
        None => (Framing::Close, false),
    })
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn respond(conn: Conn, head: Head) -> Response<DirectBody> {
    let state = match head.framing {
        Framing::Empty => State::Length(0),
        Framing::Length(n) => State::Length(n),
        Framing::Chunked => State::Chunked(Chunk::Size),
        Framing::Close => State::Close,
    };
    let mut body = DirectBody {
        conn: Some(conn),
        state,
        keep_alive: head.keep_alive,
        failed: None,
    };
    if head.framing == Framing::Empty {
        body.complete();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    resp
}

/// Where a chunked body is (RFC 9112 section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers, then the empty line.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

/// What one step over buffered chunked bytes gave.
#[derive(Debug)]
enum Step {
    Data(Bytes),
    /// The body ended, with these trailers (if any).
    End(Option<HeaderMap>),
    /// Needs more bytes.
    More,
}

/// Decodes from the start of `buf` as far as one piece of data, or the end.
fn step_chunked(chunk: &mut Chunk, buf: &mut BytesMut) -> Result<Step, Error> {
    loop {
        match *chunk {
            Chunk::Size => {
                let Some(nl) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                    if buf.len() >= MAX_CHUNK_LINE {
                        return Err(Error::bad("chunk-size line too long"));
                    }
                    return Ok(Step::More);
                };
                let size = parse_chunk_line(&buf[..nl])
                    .ok_or_else(|| Error::bad("malformed chunk size in the response"))?;
                buf.advance(nl + 1);
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(n).freeze();
                *chunk = match left - n as u64 {
                    0 => Chunk::DataEnd,
                    rest => Chunk::Data(rest),
                };
                return Ok(Step::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::bad("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] == b"\r\n" {
                    buf.advance(2);
                    return Ok(Step::End(None));
                }
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                return match httparse::parse_headers(buf, &mut slots) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::with_capacity(fields.len());
                        for f in fields {
                            let (Ok(n), Ok(v)) = (
                                HeaderName::from_bytes(f.name.as_bytes()),
                                HeaderValue::from_bytes(f.value),
                            ) else {
                                return Err(Error::bad("malformed trailer in the response"));
                            };
                            trailers.append(n, v);
                        }
                        buf.advance(len);
                        Ok(Step::End(Some(trailers)))
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(Step::More),
                    Ok(httparse::Status::Partial) => {
                        Err(Error::bad(format!("trailers larger than {MAX_HEAD} bytes")))
                    }
                    Err(e) => Err(Error::bad(format!(
                        "malformed trailers in the response: {e}"
                    ))),
                };
            }
        }
    }
}

/// The size of a chunk-size line (`1a;ext=1\r`, the LF already cut): hex digits, then
/// optional extensions (ignored), then CR.
fn parse_chunk_line(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r")?;
    let end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(end);
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        Some((n << 4) | u64::from(v))
    })
}

/// A response body read from its upstream connection by the task that sends it on.
#[derive(Debug)]
pub(crate) struct DirectBody {
    /// The connection: until the body ends, and after that if it can carry another request.
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    /// The body failed: the error it ends with at the next poll (see `fail`).
    failed: Option<String>,
}

impl DirectBody {
    /// The connection, if the body ended cleanly and the connection may be reused (once).
    pub(crate) fn take_reusable(&mut self) -> Option<Conn> {
        if self.state == State::Done {
            self.conn.take()
        } else {
            None
        }
    }

    fn complete(&mut self) {
        self.state = State::Done;
        if !self.keep_alive || self.conn.as_ref().is_some_and(|c| !c.buf.is_empty()) {
            self.conn = None;
        }
    }

    /// Ends the body with an error, one poll later: the pieces already handed on (and the
    /// response head) get written to the client first, so that it sees a response cut short
    /// of its length rather than nothing.
    fn fail(
        &mut self,
        what: String,
        cx: &Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        self.failed = Some(what);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Body for DirectBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if let Some(what) = this.failed.take() {
            this.state = State::Done;
            return Poll::Ready(Some(Err(Error::bad(what))));
        }
        loop {
            if this.state == State::Done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            this.complete();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(chunk) => match step_chunked(chunk, &mut conn.buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::End(trailers)) => {
                        this.complete();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(Step::More) => {}
                    Err(e) => return this.fail(e.what, cx),
                },
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.state == State::Close => {
                    // The end of a body that ends with its connection.
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return this.fail(
                        "connection closed before the end of the response body".into(),
                        cx,
                    )
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(format!("read response body: {e}"), cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            State::Chunked(_) | State::Close => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// What a test exchange gave: the request head the upstream read, and the response
    /// (status, headers, body, trailers, connection reusable) or the error.
    type Outcome = (
        String,
        Result<(StatusCode, HeaderMap, Vec<u8>, Option<HeaderMap>, bool), Error>,
    );

    /// Sends `method /p?q` with `host: app` through [`send`] to a real upstream socket that
    /// answers with `response` written `piece` bytes at a time (1 ms apart), then closes
    /// if `close`; reads the whole body.
    async fn exchange(method: Method, response: &[u8], piece: usize, close: bool) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let response = response.to_vec();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap() == 0 {
                    break;
                }
                head.push(b[0]);
            }
            for p in response.chunks(piece.max(1)) {
                s.write_all(p).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            if !close {
                // Held open until the client is done.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            }
            String::from_utf8(head).unwrap()
        });
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("app"));
        let result = async {
            let resp = send(conn, &method, "/p?q", &headers, &[]).await?;
            let (parts, mut body) = resp.into_parts();
            let mut data = Vec::new();
            let mut trailers = None;
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                }
            }
            assert!(body.is_end_stream());
            let reusable = body.take_reusable().is_some();
            Ok((parts.status, parts.headers, data, trailers, reusable))
        }
        .await;
        // The client side is closed once the result is in (the body owned it).
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), upstream)
            .await
            .expect("upstream done")
            .unwrap();
        (seen, result)
    }

    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n\
        5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-sum: 42\r\n\r\n";

    #[tokio::test]
    async fn bodies_arrive_whole_however_the_upstream_splits_them() {
        // (method, response, closes after, body, trailer x-sum, reusable)
        type Case<'a> = (Method, &'a [u8], bool, &'a str, Option<&'a str>, bool);
        let cases: [Case; 9] = [
            (Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-App: a\r\n\r\n0123456789", false, "0123456789", None, true),
            (Method::GET, CHUNKED, false, "hello, world!!!", Some("42"), true),
            (Method::GET, b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true, "until the end", None, false),
            (Method::HEAD, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", false, "", None, true),
            (Method::GET, b"HTTP/1.1 204 No Content\r\n\r\n", false, "", None, true),
            (Method::GET, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n", false, "", None, true),
            (Method::GET, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false, "ok", None, true),
            (Method::GET, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", false, "ok", None, false),
            (Method::GET, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", false, "ok", None, true),
        ];
        for (method, response, close, body, trailer, reusable) in cases {
            for piece in [1, 3, 7, response.len()] {
                let (seen, got) = exchange(method.clone(), response, piece, close).await;
                assert_eq!(seen, format!("{method} /p?q HTTP/1.1\r\nhost: app\r\n\r\n"));
                let (status, _, data, trailers, again) =
                    got.unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(response)));
                let what = format!("{} in pieces of {piece}", String::from_utf8_lossy(response));
                assert!(!status.is_informational(), "{what}");
                assert_eq!(String::from_utf8(data).unwrap(), body, "{what}");
                assert_eq!(
                    trailers
                        .as_ref()
                        .and_then(|t| t.get("x-sum"))
                        .map(|v| v.to_str().unwrap()),
                    trailer,
                    "{what}"
                );
                assert_eq!(again, reusable, "{what}");
            }
        }
    }

    #[tokio::test]
    async fn hop_by_hop_headers_of_the_response_are_left_out() {
        let (_, got) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
              Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\n\
              Proxy-Connection: x\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n0\r\n\r\n",
            64,
            false,
        )
        .await;
        let (_, headers, _, _, _) = got.unwrap();
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["set-cookie"]);
        assert_eq!(headers.get_all("set-cookie").iter().count(), 2);
    }

    #[tokio::test]
    async fn a_length_beside_transfer_encoding_is_dropped_and_the_connection_not_reused() {
        let (_, got) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            64,
            false,
        )
        .await;
        let (_, headers, data, _, reusable) = got.unwrap();
        assert_eq!(data, b"ok");
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
        assert!(!reusable);
    }

    #[tokio::test]
    async fn bad_responses_are_errors_with_what_was_wrong() {
        let too_many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let too_many = format!("HTTP/1.1 200 OK\r\n{too_many}\r\n");
        let too_big = format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let long_line = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\n",
            "e".repeat(MAX_CHUNK_LINE)
        );
        // (response, closes after, error, how far it got)
        let cases: [(&[u8], bool, &str, Reached); 12] = [
            (
                b"",
                true,
                "connection closed before any response",
                Reached::NoResponse,
            ),
            (
                b"HTTP/1.1 200",
                true,
                "connection closed in the response head",
                Reached::Response,
            ),
            (
                b"HTTP/1.1 100 Continue\r\n\r\n",
                true,
                "connection closed in the response head",
                Reached::Response,
            ),
            (
                b"HTTQ/1.1 200 OK\r\n\r\n",
                false,
                "malformed response head: invalid HTTP version",
                Reached::Response,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                false,
                "101 Switching Protocols to a request without Upgrade",
                Reached::Response,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
                false,
                "invalid or conflicting Content-Length in the response",
                Reached::Response,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab",
                false,
                "invalid or conflicting Content-Length in the response",
                Reached::Response,
            ),
            (
                too_many.as_bytes(),
                false,
                "more than 100 headers in the response",
                Reached::Response,
            ),
            (
                too_big.as_bytes(),
                false,
                "response head larger than 417792 bytes",
                Reached::Response,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234",
                true,
                "connection closed before the end of the response body",
                Reached::Response,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false,
                "malformed chunk size in the response",
                Reached::Response,
            ),
            (
                long_line.as_bytes(),
                false,
                "chunk-size line too long",
                Reached::Response,
            ),
        ];
        for (response, close, what, reached) in cases {
            let (_, got) = exchange(Method::GET, response, 4096, close).await;
            let e = got.err().unwrap_or_else(|| panic!("{what}: no error"));
            assert_eq!((e.to_string().as_str(), e.reached), (what, reached));
        }
        let (_, got) = exchange(
            Method::GET,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n",
            4096,
            false,
        )
        .await;
        assert_eq!(
            got.err().unwrap().to_string(),
            "chunk data not followed by CRLF"
        );
    }

    #[test]
    fn chunk_size_lines() {
        for (line, size) in [
            (&b"0\r"[..], Some(0)),
            (b"1a\r", Some(26)),
            (b"FFFFFFFFFFFFFFFF\r", Some(u64::MAX)),
            (b"10;name=value\r", Some(16)),
            (b"10 ;x\r", Some(16)),
            (b"10000000000000000\r", None),
            (b"\r", None),
            (b"1a", None),
            (b"-1\r", None),
            (b"1 2\r", None),
        ] {
            assert_eq!(
                parse_chunk_line(line),
                size,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn the_request_head_is_the_method_target_and_headers_as_given() {
        let mut out = Vec::new();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("site.example"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        write_head(&mut out, &Method::DELETE, "/a?b=c", &h, &[]);
        assert_eq!(
            out,
            b"DELETE /a?b=c HTTP/1.1\r\nhost: site.example\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        // The proxy's own lines follow the request's, before a POST's missing length.
        let extra: [(&str, &[u8]); 2] = [("x-forwarded-proto", b"https"), ("host", b"b.test")];
        write_head(&mut out, &Method::POST, "/", &h, &extra);
        assert!(out.ends_with(
            b"x-a: 2\r\nx-forwarded-proto: https\r\nhost: b.test\r\ncontent-length: 0\r\n\r\n"
        ));
    }
}
