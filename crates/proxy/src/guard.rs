//! The request-head guard: a layer between an HTTP/1.1 client connection and hyper that reads
//! every byte the client sends on its way to hyper, follows the message framing (head, then a
//! `Content-Length` or chunked body, then the next head) and, without keeping the bytes:
//! - refuses a head before hyper parses it when it is ambiguous about its length (both
//!   `Content-Length` and `Transfer-Encoding`, more than one `Content-Length`, a malformed
//!   one, a transfer coding other than `chunked`), too large, or malformed: hyper gets the
//!   bytes before that head and then the end of the stream, and once hyper has finished the
//!   requests before it, the client gets a short plain-text answer and the connection closes;
//! - ends a connection that stays idle between requests longer than `idle_timeout`, or takes
//!   longer than `header_timeout` to send a head (the first one counted from the accept);
//!   a connection whose framing it can no longer follow (bytes sent behind a protocol-switch
//!   request before its answer, or a chunked body it could not read) and that did not switch
//!   gets `header_timeout + idle_timeout` for all the rest. These are the only header
//!   deadlines: hyper keeps none;
//! - ends a connection whose client takes none of the bytes written to it for `send_timeout`
//!   (a client that stopped reading: it would hold its response's upstream connection for
//!   as long as it liked). This one holds for every connection, HTTP/2 and tunnels too
//!   (an HTTP/2 client can also stop one stream by flow control alone, which no write sees:
//!   the response body times that, `forward::Stalls`, and that stream is reset alone,
//!   `crate::h2exec`);
//! - when hyper closes a connection in the middle of a request body (it answered without
//!   reading it all: a 413, 408 or 400, or an app's early answer), hands the connection back
//!   so that the rest of the body is read and dropped for a while (a lingering close) instead
//!   of the close resetting the answer away from a client that is still sending.
//!
//! hyper would answer most of these itself, but with an empty body, and it reads a request
//! with both `Content-Length` and `Transfer-Encoding` as chunked (dropping the length) instead
//! of refusing it; and its header timeout also runs while a keep-alive connection is idle.
//! It must not route or look at anything but framing.
//!
//! What hyper still answers itself, with an empty body: a request target in absolute form
//! (`http://host/...`) whose authority the `http` crate refuses, and a bad head on a connection
//! the guard no longer reads (bytes were sent behind a protocol-switch request before its
//! answer, or a chunked body it could not follow, which hyper refuses anyway). hyper gives no
//! hook for its own error responses, so the guard can only get there first.
//!
//! Invariants:
//! - A head this guard refuses never reaches hyper (so never a service, never an upstream),
//!   and the answer is written after every response to the requests before it.
//! - The guard keeps no bytes but the first head: per connection it holds a few counters
//!   and at most [`VALUE_KEEP`] bytes of the header value being read, and until hyper has
//!   them, the bytes of the first head (or HTTP/2 header block) that [`Guard::first_head`]
//!   read.
//! - After a request that asks for a protocol switch (`Upgrade`, `CONNECT`), the bytes are
//!   looked at again only if the connection did not switch (`ConnState::upgraded`); a tunnel
//!   is never read as HTTP.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::headers::Refusal;
use crate::limits::{ConnState, Limits};

/// How many bytes of a header value are kept to read `Content-Length` and `Transfer-Encoding`
/// (longer values of those are refused).
const VALUE_KEEP: usize = 24;
/// How long a refused connection's further bytes are read and dropped after the answer, so
/// that closing does not reset the answer away before the client reads it.
const DRAIN_AFTER_REFUSAL: Duration = Duration::from_secs(1);

/// How long the rest of a request body is read and dropped at most after hyper answered and
/// closed a connection in the middle of it (see [`Leave::Linger`]): nginx's `lingering_time`.
const LINGER: Duration = Duration::from_secs(30);
/// The longest pause in what the client sends while lingering before the connection is closed
/// all the same: nginx's `lingering_timeout`.
const LINGER_PAUSE: Duration = Duration::from_secs(5);

/// A connection handed back by a dropped [`Guard`]: refused (its answer is to be written),
/// asked to move to another worker (see [`crate::limits::Slots::ask_to_move`]), or closed in
/// the middle of a request body (the rest is to be read and dropped).
pub(crate) type Refused<S> = oneshot::Receiver<(S, Leave)>;

/// Why a [`Guard`] ended hyper's part of a connection whose client had not closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leave {
    /// A head was refused: this is its answer.
    Refused(Refusal),
    /// The connection was idle between two requests and asked to move to this worker.
    Move(usize),
    /// hyper answered and closed the connection in the middle of a request body (a 413, 408
    /// or 400, or an app that answered before reading it all): the answer and the end of the
    /// stream are sent, and what the client still sends of the body is read and dropped for
    /// up to [`LINGER`] while it pauses no longer than [`LINGER_PAUSE`], so that the close
    /// does not reset the answer away while the client is still sending (nginx's lingering
    /// close).
    Linger,
}

/// Where in the byte stream the guard is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// In a request head (or before its first byte).
    Head(HeadScan),
    /// In a `Content-Length` body: this many bytes left.
    Length(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// After a request asking for a protocol switch: the next read says whether it happened.
    AfterUpgrade,
    /// Not HTTP/1.1 framing (a tunnel, an HTTP/2 connection, or a state hyper refuses
    /// anyway): bytes pass unread.
    Through,
}

/// Where in a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: the size so far and the number of hex digits seen, or past the
    /// digits (an extension).
    Size { size: u64, digits: u8, ext: bool },
    /// In chunk data: bytes left.
    Data(u64),
    /// After chunk data, until its line end.
    DataEnd,
    /// In the trailer section: bytes in the current line.
    Trailer(usize),
}

/// What is known of the head being read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct HeadScan {
    /// Bytes of the head so far (from the first byte of its request line).
    bytes: usize,
    /// Header lines so far.
    lines: usize,
    /// Past the request line.
    in_headers: bool,
    /// The request line so far.
    rl: RequestLine,
    /// The header line being read.
    line: Line,
    /// The previous byte was a CR.
    cr: bool,
    /// The request is HTTP/1.0.
    http10: bool,
    /// `Content-Length` lines, and the length of the first.
    cl_lines: u32,
    cl: Option<u64>,
    cl_bad: bool,
    /// `Transfer-Encoding` lines, and whether the only one is exactly `chunked`.
    te_lines: u32,
    te_chunked: bool,
    /// The request asks for a protocol switch.
    upgrade: bool,
}

/// The request line being read: method, a space, target, a space, version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RequestLine {
    /// 0: method, 1: target, 2: version.
    part: u8,
    method: [u8; 8],
    method_len: usize,
    target_len: usize,
    /// The target is in origin form (`/path?query#fragment`); where in it the scan is: 0
    /// path, 1 query, 2 fragment.
    origin: bool,
    target_part: u8,
    version_len: usize,
}

/// The header line being read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Line {
    /// Bytes in it (CR and LF not counted).
    len: usize,
    /// Past the colon.
    in_value: bool,
    /// Which header the name is, as far as read: bit `i` for `NAMES[i]`.
    candidates: u8,
    /// The value, trimmed at the start, up to [`VALUE_KEEP`] bytes.
    value: [u8; VALUE_KEEP],
    value_len: usize,
    value_long: bool,
}

/// The headers whose values the guard reads.
const NAMES: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"upgrade"];

/// The longest request target hyper takes (it answers 414 past it).
const MAX_TARGET: usize = 65_534;

/// A `token` byte (RFC 9110 5.6.2), as hyper's parser reads method and header names.
fn is_tchar(b: u8) -> bool {
    CLASS[b as usize] & TCHAR != 0
}

/// [`CLASS`] bit: a `token` byte.
const TCHAR: u8 = 1;
/// [`CLASS`] bit: a byte a header value may hold (not a control byte but a tab).
const VALUE: u8 = 2;
/// [`CLASS`] bit: a byte of a request target that needs no look at its place in the target
/// (not one of the bytes [`HeadScan::request_line_byte`] treats apart).
const TARGET: u8 = 4;

/// What each byte is, for the runs [`HeadScan::run`] takes at once.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut bits = 0;
        if c.is_ascii_alphanumeric() {
            bits |= TCHAR;
        }
        let mut k = 0;
        let extra = b"!#$%&'*+-.^_`|~";
        while k < extra.len() {
            if extra[k] == c {
                bits |= TCHAR;
            }
            k += 1;
        }
        if (c >= b' ' || c == b'\t') && c != 0x7f {
            bits |= VALUE;
        }
        if c > b' ' && c != 0x7f && !matches!(c, b'#' | b'?' | b'<' | b'>' | b'`' | b'"') {
            bits |= TARGET;
        }
        t[b] = bits;
        b += 1;
    }
    t
};

/// How many bytes at the start of `bytes` have the class bit `bit`.
fn run_of(bytes: &[u8], bit: u8) -> usize {
    bytes
        .iter()
        .position(|&b| CLASS[b as usize] & bit == 0)
        .unwrap_or(bytes.len())
}

/// What one byte of a head did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    More,
    Ended,
    Refused(Refusal),
}

const fn bad(body: &'static str) -> Step {
    Step::Refused(Refusal {
        status: StatusCode::BAD_REQUEST,
        body,
    })
}

const BAD_LINE: Step = bad("bad request: malformed request line\n");
const BAD_HEADER: Step = bad("bad request: malformed header line\n");
const BAD_TARGET: Step = bad("bad request: malformed request target\n");

impl HeadScan {
    fn started(&self) -> bool {
        self.bytes > 0
    }

    /// Reads `bytes` up to the end of the head or its refusal: how many bytes were read, and
    /// what the last of them did (`Step::More`: all were read and the head goes on).
    fn feed(&mut self, bytes: &[u8], max_bytes: usize, max_headers: usize) -> (usize, Step) {
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            let n = self.run(&bytes[i..], max_bytes, max_headers);
            if n > 0 {
                i += n;
                continue;
            }
            i += 1;
            let step = self.byte(b, max_bytes, max_headers);
            if !matches!(step, Step::More) {
                return (i, step);
            }
        }
        (i, Step::More)
    }

    /// Takes at once bytes at the start of `bytes` that [`HeadScan::byte`] would take one at a
    /// time with the same effect, in the common shapes: the request line after its first byte
    /// (see [`HeadScan::request_line_run`]) and a header line (its name, colon, and, for a
    /// header the guard does not read, its value and the CRLF that ends it). It stops before
    /// any byte that could be refused or needs a closer look (the empty line ending the head,
    /// every refusal), and short of the size limits (which [`HeadScan::byte`] then reports).
    /// Returns how many.
    fn run(&mut self, bytes: &[u8], max_bytes: usize, max_headers: usize) -> usize {
        if self.bytes == 0 || self.cr {
            return 0;
        }
        // `byte` refuses the byte that brings `bytes` to `max_bytes`.
        let room = max_bytes.saturating_sub(self.bytes + 1);
        let bytes = &bytes[..bytes.len().min(room)];
        let n = if self.in_headers {
            self.header_run(bytes, max_headers)
        } else {
            self.request_line_run(bytes)
        };
        self.bytes += n;
        n
    }

    /// The request-line part of [`HeadScan::run`] (`bytes` within the size limit; the caller
    /// counts them in `self.bytes`): the rest of the method and its space, the target up to a
    /// byte whose meaning depends on where it is (a target's first byte other than `/` is left
    /// to `byte`), its space, the version and the CRLF after it.
    fn request_line_run(&mut self, bytes: &[u8]) -> usize {
        let rl = &mut self.rl;
        let mut n = 0;
        if rl.part == 0 {
            if rl.method_len == 0 {
                return 0;
            }
            n = run_of(bytes, TCHAR);
            for &b in &bytes[..n] {
                if rl.method_len < rl.method.len() {
                    rl.method[rl.method_len] = b;
                }
                rl.method_len += 1;
            }
            if bytes.get(n) != Some(&b' ') {
                return n;
            }
            rl.part = 1;
            n += 1;
        }
        if rl.part == 1 {
            if rl.target_len == 0 {
                if bytes.get(n) != Some(&b'/') {
                    return n;
                }
                rl.origin = true;
                rl.target_len = 1;
                n += 1;
            }
            // `request_line_byte` refuses the byte past `MAX_TARGET`.
            let room = MAX_TARGET.saturating_sub(rl.target_len);
            let rest = &bytes[n..];
            let target = run_of(&rest[..rest.len().min(room)], TARGET);
            rl.target_len += target;
            n += target;
            if bytes.get(n) != Some(&b' ') {
                return n;
            }
            rl.part = 2;
            n += 1;
        }
        if rl.part != 2 {
            return n;
        }
        let want = &b"HTTP/1."[rl.version_len.min(7)..];
        let version = bytes[n..]
            .iter()
            .zip(want)
            .take_while(|(b, w)| b == w)
            .count();
        rl.version_len += version;
        n += version;
        if rl.version_len == 7 {
            let Some(&digit @ (b'0' | b'1')) = bytes.get(n) else {
                return n;
            };
            rl.version_len = 8;
            self.http10 = digit == b'0';
            n += 1;
        }
        if rl.version_len == 8 && bytes[n..].starts_with(b"\r\n") {
            // The request line ends.
            n += 2;
            self.in_headers = true;
            if rl.method_len == 7 && &rl.method[..7] == b"CONNECT" {
                self.upgrade = true;
            }
        }
        n
    }

    /// The header-line part of [`HeadScan::run`] (`bytes` within the size limit; the caller
    /// counts them in `self.bytes`).
    fn header_run(&mut self, bytes: &[u8], max_headers: usize) -> usize {
        let line = &mut self.line;
        let mut n = 0;
        if !line.in_value {
            if line.len == 0 {
                // The first byte of a line: one header too many is refused by `byte`, and
                // so is a byte that is not a name's (an empty line goes to `byte` too).
                if self.lines >= max_headers || !bytes.first().is_some_and(|&b| is_tchar(b)) {
                    return 0;
                }
                line.candidates = 0b111;
            }
            n = run_of(bytes, TCHAR);
            for (at, &b) in (line.len..).zip(&bytes[..n]) {
                if line.candidates == 0 {
                    break;
                }
                let lower = b.to_ascii_lowercase();
                for (i, name) in NAMES.iter().enumerate() {
                    if name.get(at) != Some(&lower) {
                        line.candidates &= !(1 << i);
                    }
                }
            }
            line.len += n;
            if bytes.get(n) != Some(&b':') {
                return n;
            }
            // The colon (after at least one name byte): a name matches only if all of it
            // was read.
            n += 1;
            line.in_value = true;
            for (i, name) in NAMES.iter().enumerate() {
                if name.len() != line.len {
                    line.candidates &= !(1 << i);
                }
            }
            line.len += 1;
        }
        if line.candidates != 0 {
            // A value the guard reads: `byte` keeps it.
            return n;
        }
        let value = run_of(&bytes[n..], VALUE);
        line.len += value;
        n += value;
        if bytes[n..].starts_with(b"\r\n") {
            // The line ends: it counts, and nothing of it is kept.
            self.line = Line::default();
            self.lines += 1;
            n += 2;
        }
        n
    }

    /// Reads one byte of a head. A malformed head is refused at its first bad byte (hyper's
    /// parser would answer it at that byte, with an empty body); one that is ambiguous about
    /// its length at its end.
    fn byte(&mut self, b: u8, max_bytes: usize, max_headers: usize) -> Step {
        // Empty lines before a request line are skipped (as hyper does).
        if self.bytes == 0 && (b == b'\r' || b == b'\n') {
            return Step::More;
        }
        self.bytes += 1;
        let step = if self.cr && b != b'\n' {
            if self.in_headers {
                BAD_HEADER
            } else {
                BAD_LINE
            }
        } else if b == b'\r' {
            self.cr = true;
            self.line_may_end()
        } else if b == b'\n' {
            self.cr = false;
            match self.line_may_end() {
                Step::More => self.end_line(),
                refused => refused,
            }
        } else if self.in_headers {
            if self.line.len == 0 && self.lines >= max_headers {
                // hyper's parser refuses at the first byte of one header too many.
                return Step::Refused(Refusal {
                    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    body: "too many header fields\n",
                });
            }
            self.header_byte(b)
        } else {
            self.request_line_byte(b)
        };
        if step == Step::More && self.bytes >= max_bytes {
            return Step::Refused(Refusal {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                body: "request header fields too large\n",
            });
        }
        step
    }

    /// A CR or LF: may the current line end here?
    fn line_may_end(&self) -> Step {
        if !self.in_headers {
            // Only after the whole version.
            if self.rl.part == 2 && self.rl.version_len == 8 {
                Step::More
            } else {
                BAD_LINE
            }
        } else if self.line.len > 0 && !self.line.in_value {
            BAD_HEADER
        } else {
            Step::More
        }
    }

    fn request_line_byte(&mut self, b: u8) -> Step {
        let rl = &mut self.rl;
        match rl.part {
            0 if b == b' ' && rl.method_len > 0 => rl.part = 1,
            0 if is_tchar(b) => {
                if rl.method_len < rl.method.len() {
                    rl.method[rl.method_len] = b;
                }
                rl.method_len += 1;
            }
            1 if b == b' ' && rl.target_len > 0 => rl.part = 2,
            1 if b > b' ' && b != 0x7f => {
                if rl.target_len == 0 {
                    rl.origin = b == b'/';
                }
                // Bytes hyper's parser takes but the `http` crate's URI refuses (hyper would
                // answer 400 with an empty body).
                if rl.origin {
                    match (rl.target_part, b) {
                        (0 | 1, b'#') => rl.target_part = 2,
                        (0, b'?') => rl.target_part = 1,
                        (0, b'<' | b'>' | b'`') | (1, b'"' | b'<' | b'>') => return BAD_TARGET,
                        _ => {}
                    }
                }
                rl.target_len += 1;
                if rl.target_len > MAX_TARGET {
                    return Step::Refused(Refusal {
                        status: StatusCode::URI_TOO_LONG,
                        body: "request target too long\n",
                    });
                }
            }
            2 if rl.version_len < 8 => {
                let ok = match rl.version_len {
                    7 => b == b'0' || b == b'1',
                    n => b"HTTP/1."[n] == b,
                };
                if !ok {
                    return BAD_LINE;
                }
                rl.version_len += 1;
                if rl.version_len == 8 {
                    self.http10 = b == b'0';
                }
            }
            _ => return BAD_LINE,
        }
        Step::More
    }

    fn header_byte(&mut self, b: u8) -> Step {
        let line = &mut self.line;
        if line.len == 0 {
            line.candidates = 0b111;
        }
        line.len += 1;
        if !line.in_value {
            if b == b':' && line.len > 1 {
                line.in_value = true;
                // A name matches only if all of it was read.
                let name_len = line.len - 1;
                for (i, n) in NAMES.iter().enumerate() {
                    if n.len() != name_len {
                        line.candidates &= !(1 << i);
                    }
                }
                return Step::More;
            }
            // Also a folded line (obs-fold), which starts with a space.
            if !is_tchar(b) {
                return BAD_HEADER;
            }
            let at = line.len - 1;
            let lower = b.to_ascii_lowercase();
            for (i, n) in NAMES.iter().enumerate() {
                if n.get(at) != Some(&lower) {
                    line.candidates &= !(1 << i);
                }
            }
            return Step::More;
        }
        if (b < b' ' && b != b'\t') || b == 0x7f {
            return BAD_HEADER;
        }
        if line.candidates == 0 || (line.value_len == 0 && (b == b' ' || b == b'\t')) {
            return Step::More;
        }
        if line.value_len < VALUE_KEEP {
            line.value[line.value_len] = b;
            line.value_len += 1;
        } else {
            line.value_long = true;
        }
        Step::More
    }

    /// A line ended (at its LF).
    fn end_line(&mut self) -> Step {
        if !self.in_headers {
            self.in_headers = true;
            if self.rl.method_len == 7 && &self.rl.method[..7] == b"CONNECT" {
                self.upgrade = true;
            }
            return Step::More;
        }
        let line = std::mem::take(&mut self.line);
        if line.len == 0 {
            return match self.verdict() {
                Ok(()) => Step::Ended,
                Err(r) => Step::Refused(r),
            };
        }
        self.lines += 1;
        let mut value = &line.value[..line.value_len];
        while let [rest @ .., b' ' | b'\t'] = value {
            value = rest;
        }
        match line.candidates {
            0b001 => {
                self.cl_lines += 1;
                let digits =
                    !line.value_long && !value.is_empty() && value.iter().all(u8::is_ascii_digit);
                let parsed = digits
                    .then(|| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
                    .flatten();
                match parsed {
                    Some(n) => {
                        self.cl.get_or_insert(n);
                    }
                    None => self.cl_bad = true,
                }
            }
            0b010 => {
                self.te_lines += 1;
                self.te_chunked = !line.value_long && value.eq_ignore_ascii_case(b"chunked");
            }
            0b100 => self.upgrade = true,
            _ => {}
        }
        Step::More
    }

    /// The head ended: is its framing unambiguous?
    fn verdict(&self) -> Result<(), Refusal> {
        let bad = |body| {
            Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                body,
            })
        };
        if self.cl_lines > 0 && self.te_lines > 0 {
            return bad("bad request: both Content-Length and Transfer-Encoding\n");
        }
        if self.cl_lines > 1 {
            return bad("bad request: more than one Content-Length\n");
        }
        if self.cl_bad {
            return bad("bad request: malformed Content-Length\n");
        }
        if self.te_lines > 0 && self.http10 {
            return bad("bad request: Transfer-Encoding in an HTTP/1.0 request\n");
        }
        if self.te_lines > 1 || (self.te_lines == 1 && !self.te_chunked) {
            // RFC 9112 6.1: a coding the server does not understand is a 501, as nginx
            // answers; the request is well-formed, the proxy just does not decode it.
            return Err(Refusal {
                status: StatusCode::NOT_IMPLEMENTED,
                body: "transfer codings other than chunked are not supported\n",
            });
        }
        Ok(())
    }
}

/// Which deadline is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    None,
    /// Waiting for the next request on a kept-alive connection.
    Idle,
    /// Waiting for the rest of a head.
    Head,
    /// The guard can no longer follow the framing ([`Guard::lose_track`]): unless the
    /// connection switches, the rest of it has `header_timeout + idle_timeout` (the guard's
    /// own limits end to end; this stands in for a header timer in hyper, which would cost
    /// one timer per request on every connection).
    Through,
}

/// A client connection seen through the guard (see the module docs).
pub(crate) struct Guard<S> {
    inner: Option<S>,
    phase: Phase,
    /// The request whose body is being read asked for a protocol switch.
    upgrade_after_body: bool,
    header_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
    conn: Arc<ConnState>,
    deadline: Deadline,
    at: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The refusal to answer once hyper is done; reads end from then on.
    refused: Option<Refusal>,
    /// A deadline passed: reads end.
    timed_out: bool,
    /// Asked to move, it was idle between requests: reads end, and the connection goes to
    /// this worker once hyper is done.
    moving: Option<usize>,
    handback: Option<oneshot::Sender<(S, Leave)>>,
    /// A head ended since the connection opened.
    head_ended: bool,
    /// Shut down by hyper in the middle of a request body (see [`Leave::Linger`]).
    linger: bool,
    /// Bytes read (and scanned) by [`Guard::first_head`] that hyper has not had yet, and how
    /// many of them it has had.
    pending: Vec<u8>,
    pending_at: usize,
    /// An HTTP/2 connection whose first request [`Guard::first_head`] has not read yet.
    h2_first: bool,
    send_timeout: Duration,
    /// How long the client has taken no byte of what is written to it.
    send_pause: crate::deadline::Pause,
}

impl<S> Guard<S> {
    /// `stream` guarded with `limits`; `http1`: false for a connection that is not HTTP/1.1
    /// (its bytes pass unread, and no deadline applies). The receiver gets the stream back
    /// when a head was refused.
    pub(crate) fn new(
        stream: S,
        limits: &Limits,
        conn: Arc<ConnState>,
        http1: bool,
    ) -> (Guard<S>, Refused<S>) {
        let (tx, rx) = oneshot::channel();
        let guard = Guard {
            inner: Some(stream),
            phase: if http1 {
                Phase::Head(HeadScan::default())
            } else {
                Phase::Through
            },
            upgrade_after_body: false,
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            conn,
            // The first head is timed from the accept (as nginx's client_header_timeout).
            deadline: if http1 {
                Deadline::Head
            } else {
                Deadline::None
            },
            at: Instant::now() + limits.header_timeout,
            sleep: None,
            refused: None,
            timed_out: false,
            moving: None,
            handback: Some(tx),
            head_ended: false,
            linger: false,
            pending: Vec::new(),
            pending_at: 0,
            h2_first: !http1,
            send_timeout: limits.send_timeout,
            send_pause: crate::deadline::Pause::default(),
        };
        (guard, rx)
    }

    /// The connection was moved here from another worker between two requests: idle, so its
    /// first head gets the idle deadline before the header deadline (as the next head on a
    /// kept-alive connection), not the header deadline from the accept.
    pub(crate) fn moved(mut self) -> Self {
        if matches!(self.phase, Phase::Head(_)) {
            self.deadline = Deadline::Idle;
            self.at = Instant::now() + self.idle_timeout;
        }
        self
    }

    fn inner(&mut self) -> io::Result<&mut S> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// What follows a message's body.
    fn after_body(&mut self) -> Phase {
        if std::mem::take(&mut self.upgrade_after_body) {
            Phase::AfterUpgrade
        } else {
            Phase::Head(HeadScan::default())
        }
    }

    /// The framing can no longer be followed: bytes pass unread from here, and unless the
    /// connection switches protocols, its rest is bounded by [`Deadline::Through`].
    fn lose_track(&mut self) {
        self.phase = Phase::Through;
        self.deadline = Deadline::Through;
        self.at = Instant::now() + self.header_timeout + self.idle_timeout;
    }

    /// Reads `bytes` (just received); `Some((n, refusal))`: the first `n` of them come before
    /// a refused head.
    fn scan(&mut self, bytes: &[u8]) -> Option<(usize, Refusal)> {
        let limits = (self.max_header_bytes, self.max_headers);
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.phase {
                Phase::AfterUpgrade => {
                    // Bytes right after a switch request, before its answer: not HTTP that
                    // can be followed any more (hyper still frames them). Unless the
                    // connection switches, its rest is bounded as a whole.
                    self.lose_track();
                    return None;
                }
                Phase::Through => return None,
                Phase::Length(left) => {
                    let take = (*left).min((bytes.len() - i) as u64);
                    *left -= take;
                    i += take as usize;
                    if *left == 0 {
                        self.phase = self.after_body();
                    }
                }
                Phase::Chunked(chunk) => {
                    if let Chunk::Data(left) = chunk {
                        let take = (*left).min((bytes.len() - i) as u64);
                        *left -= take;
                        i += take as usize;
                        if *left == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        continue;
                    }
                    match chunk_byte(chunk, bytes[i]) {
                        ChunkStep::More => {}
                        ChunkStep::End => self.phase = self.after_body(),
                        ChunkStep::Lost => {
                            // hyper refuses this body (and closes the connection).
                            self.lose_track();
                            return None;
                        }
                    }
                    i += 1;
                }
                Phase::Head(head) => {
                    let was_started = head.started();
                    let (n, step) = head.feed(&bytes[i..], limits.0, limits.1);
                    if !was_started && head.started() && self.deadline != Deadline::Head {
                        self.deadline = Deadline::Head;
                        self.at = Instant::now() + self.header_timeout;
                    }
                    i += n;
                    match step {
                        Step::More => {}
                        Step::Refused(r) => {
                            // The head's bytes in this read are held back (those of an
                            // earlier read are with hyper, an unfinished head it never
                            // answers).
                            return Some((i.saturating_sub(head.bytes), r));
                        }
                        Step::Ended => {
                            self.head_ended = true;
                            self.deadline = Deadline::None;
                            let head = std::mem::take(head);
                            self.upgrade_after_body = head.upgrade;
                            let cl = head.cl.unwrap_or(0);
                            self.phase = if head.te_lines > 0 {
                                Phase::Chunked(Chunk::Size {
                                    size: 0,
                                    digits: 0,
                                    ext: false,
                                })
                            } else if cl > 0 {
                                Phase::Length(cl)
                            } else {
                                self.after_body()
                            };
                        }
                    }
                }
            }
        }
        None
    }

    /// Whether the running deadline has passed; if not, arranges a wake-up for it.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        if self.deadline == Deadline::None {
            return false;
        }
        let at = self.at;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// What one byte of a chunked body did.
enum ChunkStep {
    More,
    End,
    /// Not a chunked body hyper reads.
    Lost,
}

fn chunk_byte(chunk: &mut Chunk, b: u8) -> ChunkStep {
    match chunk {
        Chunk::Data(_) => {}
        Chunk::DataEnd => {
            if b == b'\n' {
                *chunk = Chunk::Size {
                    size: 0,
                    digits: 0,
                    ext: false,
                };
            }
        }
        Chunk::Size { size, digits, ext } => {
            if b == b'\n' {
                if *digits == 0 {
                    return ChunkStep::Lost;
                }
                *chunk = if *size == 0 {
                    Chunk::Trailer(0)
                } else {
                    Chunk::Data(*size)
                };
            } else if !*ext && b.is_ascii_hexdigit() {
                if *digits >= 16 {
                    return ChunkStep::Lost;
                }
                let d = (b as char).to_digit(16).unwrap_or(0);
                *size = (*size << 4) | u64::from(d);
                *digits += 1;
            } else {
                *ext = true;
            }
        }
        Chunk::Trailer(len) => {
            if b == b'\n' {
                if *len == 0 {
                    return ChunkStep::End;
                }
                *len = 0;
            } else if b != b'\r' {
                *len += 1;
            }
        }
    }
    ChunkStep::More
}

/// The first read of [`Guard::first_head`]; its buffer then doubles when full, up to the
/// head limit (and by this much past it, for the bytes that come with a head).
const FIRST_READ: usize = 1024;

impl<S: AsyncRead + Unpin> Guard<S> {
    /// Reads the connection's first request head (and what arrives with it) before hyper
    /// takes the connection, into a buffer that grows only as bytes arrive: hyper's own
    /// buffers (8 KiB to read and 8 KiB to write, per connection) are made only once a head
    /// is complete, so a client that connects and sends nothing, or half a head, costs its
    /// bytes and little more. The bytes are scanned as [`AsyncRead::poll_read`] scans them, and
    /// handed to hyper first. Returns at the head's end, its refusal, the header deadline, or
    /// the end of the stream or an error (which hyper's next read then meets).
    ///
    /// On an HTTP/2 connection it reads the client's preface and frames up to the end of the
    /// first request's header block instead (see [`H2First`]), waiting for it at most
    /// `idle_timeout` (the time an HTTP/2 connection may stay without a request).
    pub(crate) async fn first_head(&mut self) {
        if std::mem::take(&mut self.h2_first) {
            self.at = Instant::now() + self.idle_timeout;
            let mut h2 = H2First::default();
            let cap = h2_first_cap(self.max_header_bytes);
            self.read_first(|_, buf, _| h2.done(buf) || buf.len() >= cap)
                .await;
            return;
        }
        if !matches!(self.phase, Phase::Head(_)) {
            return;
        }
        self.read_first(|g, buf, before| {
            if let Some((keep, refusal)) = g.scan(&buf[before..]) {
                buf.truncate(before + keep);
                g.refused = Some(refusal);
            }
            g.head_ended || g.refused.is_some()
        })
        .await;
    }

    /// Reads into a buffer that doubles when full (from [`FIRST_READ`], up to the head
    /// limit at a time) until `enough` (given the guard, the bytes so far, and where this
    /// read's start) says so, the end of the stream or an error, or the deadline (a slowloris
    /// client: hyper then gets the end of the stream, nothing else). The bytes are handed to
    /// hyper first.
    async fn read_first(&mut self, mut enough: impl FnMut(&mut Self, &mut Vec<u8>, usize) -> bool) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if buf.capacity() == buf.len() {
                let want = (buf.len() * 2)
                    .clamp(FIRST_READ, self.max_header_bytes.max(FIRST_READ))
                    .max(buf.len() + FIRST_READ);
                buf.reserve_exact(want - buf.len());
            }
            let Some(inner) = self.inner.as_mut() else {
                break;
            };
            let before = buf.len();
            match tokio::time::timeout_at(self.at, inner.read_buf(&mut buf)).await {
                Err(_) => {
                    self.timed_out = true;
                    buf = Vec::new();
                    break;
                }
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {
                    if enough(self, &mut buf, before) {
                        break;
                    }
                }
            }
        }
        self.pending = buf;
    }
}

/// The HTTP/2 connection preface a client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many bytes of an HTTP/2 connection [`Guard::first_head`] reads at most before its
/// first header block ends: a header block of the head limit, in frames of up to 16 KiB
/// (HTTP/2's default largest frame), and the small frames a client sends first (SETTINGS,
/// WINDOW_UPDATE). A client that sends more is handed to hyper, whose limits then apply.
fn h2_first_cap(max_header_bytes: usize) -> usize {
    max_header_bytes.max(16 * 1024) + 16 * 1024 + 1024
}

/// Follows an HTTP/2 connection's first bytes, frame by frame, up to the end of the first
/// header block (a HEADERS or CONTINUATION frame with END_HEADERS, received whole), so that a
/// client holding half a request costs its bytes and not hyper's HTTP/2 state and buffers.
#[derive(Debug, Default)]
struct H2First {
    /// Where the next frame starts in the bytes.
    at: usize,
}

impl H2First {
    /// Whether `buf` (the connection's first bytes) holds a whole first header block, or is
    /// not HTTP/2 (hyper answers that).
    fn done(&mut self, buf: &[u8]) -> bool {
        if self.at == 0 {
            let n = buf.len().min(H2_PREFACE.len());
            if buf[..n] != H2_PREFACE[..n] {
                return true;
            }
            if n < H2_PREFACE.len() {
                return false;
            }
            self.at = H2_PREFACE.len();
        }
        while let Some(head) = buf.get(self.at..self.at + 9) {
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let end = self.at + 9 + len;
            if buf.len() < end {
                return false;
            }
            // HEADERS (1) or CONTINUATION (9) with END_HEADERS (0x4).
            if matches!(head[3], 1 | 9) && head[4] & 0x4 != 0 {
                return true;
            }
            self.at = end;
        }
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending_at < this.pending.len() {
            // What `first_head` read, already scanned.
            let n = buf.remaining().min(this.pending.len() - this.pending_at);
            buf.put_slice(&this.pending[this.pending_at..this.pending_at + n]);
            this.pending_at += n;
            if this.pending_at == this.pending.len() {
                this.pending = Vec::new();
                this.pending_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if this.refused.is_some() || this.timed_out || this.moving.is_some() {
            // The end of the stream, as far as hyper is concerned.
            return Poll::Ready(Ok(()));
        }
        match &this.phase {
            Phase::Through if this.deadline == Deadline::Through && this.conn.upgraded() => {
                // It did switch: a tunnel has no deadline here.
                this.deadline = Deadline::None;
                return Pin::new(this.inner()?).poll_read(cx, buf);
            }
            Phase::Through if this.deadline != Deadline::Through => {
                return Pin::new(this.inner()?).poll_read(cx, buf)
            }
            Phase::AfterUpgrade => {
                if this.conn.upgraded() {
                    this.phase = Phase::Through;
                    return Pin::new(this.inner()?).poll_read(cx, buf);
                }
                this.phase = Phase::Head(HeadScan::default());
            }
            _ => {}
        }
        if let Phase::Head(h) = &this.phase {
            if !h.started() && this.head_ended {
                if let Some(to) = this.conn.move_to() {
                    // Between two requests (hyper has answered every one before: with
                    // `half_close` it reads only then), with nothing of the next one read:
                    // hyper gets the end of the stream, finishes, and hands the connection
                    // back (when the guard is dropped) to move.
                    this.moving = Some(to);
                    return Poll::Ready(Ok(()));
                }
            }
            if !h.started() && this.deadline == Deadline::None {
                // hyper asks for the next request: the connection is idle from now on.
                this.deadline = Deadline::Idle;
                this.at = Instant::now() + this.idle_timeout;
            }
        }
        let before = buf.filled().len();
        match Pin::new(this.inner()?).poll_read(cx, buf) {
            Poll::Pending => {
                if this.deadline_passed(cx) {
                    this.timed_out = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                if got == 0 {
                    return Poll::Ready(Ok(()));
                }
                if this.deadline != Deadline::None && Instant::now() >= this.at {
                    // Still sending a head past its deadline (a slowloris client).
                    buf.set_filled(before);
                    this.timed_out = true;
                    return Poll::Ready(Ok(()));
                }
                let scanned = this.scan(&buf.filled()[before..]);
                if let Some((keep, refusal)) = scanned {
                    buf.set_filled(before + keep);
                    this.refused = Some(refusal);
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S> Guard<S> {
    /// A write (or flush) to the client polled with this outcome: a pending one past
    /// `send_timeout` in one pause ends the connection.
    fn sent<T>(&mut self, polled: Poll<io::Result<T>>, cx: &Context<'_>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.send_pause.progressed();
            return polled;
        }
        if self.send_pause.waiting(self.send_timeout, cx.waker()) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing written to it within send_timeout",
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(this.inner()?).poll_write(cx, buf);
        this.sent(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(this.inner()?).poll_write_vectored(cx, bufs);
        this.sent(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(S::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(this.inner()?).poll_flush(cx);
        this.sent(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refused.is_some() || this.moving.is_some() {
            // The answer goes first (when the guard is dropped), or the connection lives on
            // on another worker: no shutdown here.
            return Pin::new(this.inner()?).poll_flush(cx);
        }
        this.linger = match this.phase {
            Phase::Length(left) => left > 0,
            Phase::Chunked(_) => true,
            _ => false,
        };
        Pin::new(this.inner()?).poll_shutdown(cx)
    }
}

impl<S> Drop for Guard<S> {
    fn drop(&mut self) {
        let leave = match (self.refused, self.moving) {
            (Some(refusal), _) => Leave::Refused(refusal),
            (None, Some(to)) => Leave::Move(to),
            (None, None) if self.linger => Leave::Linger,
            (None, None) => return,
        };
        if let (Some(tx), Some(inner)) = (self.handback.take(), self.inner.take()) {
            let _ = tx.send((inner, leave));
        }
    }
}

/// The connection handed back and why, once hyper is done with it (the guard was dropped);
/// `None` if it was not (it ended, or lives on as a tunnel).
pub(crate) fn handed_back<S>(rx: &mut Refused<S>) -> Option<(S, Leave)> {
    rx.try_recv().ok()
}

/// What is left of a connection hyper is done with, other than a move (which the worker
/// does): a refused head's answer, or the rest of a request body read and dropped.
pub(crate) async fn wind_up<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, leave: Leave) {
    match leave {
        // Boxed: their timers would otherwise grow every connection's task.
        Leave::Refused(refusal) => Box::pin(answer(stream, refusal)).await,
        Leave::Linger => {
            let _ = Box::pin(tokio::time::timeout(
                LINGER,
                discard(&mut stream, LINGER_PAUSE),
            ))
            .await;
        }
        Leave::Move(_) => {}
    }
}

/// Writes a refused head's answer on its connection, then closes it, reading and dropping
/// what the client still sends for a moment so that the close does not reset the answer away.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, r: Refusal) {
    let text = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{}",
        r.status.as_u16(),
        r.status.canonical_reason().unwrap_or(""),
        r.body.len(),
        r.body
    );
    let answered = async {
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await?;
        discard(&mut stream, DRAIN_AFTER_REFUSAL).await
    };
    let _ = tokio::time::timeout(DRAIN_AFTER_REFUSAL, answered).await;
}

/// Reads and drops what the client sends until it closes, pauses longer than `pause`, or an
/// error.
async fn discard<S: AsyncRead + Unpin>(stream: &mut S, pause: Duration) -> io::Result<()> {
    // On the heap: this future is part of every connection's task, which must stay small.
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = tokio::time::timeout(pause, stream.read(&mut buf)).await {
        if n? == 0 {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Slots;

    #[tokio::test]
    async fn a_connection_asked_to_move_leaves_between_two_requests_with_nothing_of_the_next_read()
    {
        let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let second = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        let third = b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        let stream = [&first[..], second, third].concat();
        let slots = Slots::for_workers(4, 2);
        let mut slot = slots.admit().unwrap();
        slot.assign(0);
        slot.state.set_movable();
        let (mut g, mut back) = Guard::new(
            std::io::Cursor::new(stream.clone()),
            &Limits::default(),
            slot.state.clone(),
            true,
        );
        // hyper reads the first request whole.
        let mut buf = vec![0u8; first.len()];
        g.read_exact(&mut buf).await.unwrap();
        // Asked to move while hyper reads the second one's head: the head, its body and
        // the next head's start pass; the move waits for the end of that request.
        let mut buf = vec![0u8; 20];
        g.read_exact(&mut buf).await.unwrap();
        // Its first request, as the service counts it, and a busier connection beside it on
        // the same worker (whose move would leave the other worker the busier one).
        drop(slot.state.busy());
        let mut busier = slots.admit().unwrap();
        busier.assign(0);
        busier.state.set_movable();
        for _ in 0..5 {
            drop(busier.state.busy());
        }
        assert!(slots.ask_to_move(0, 1));
        assert_eq!(busier.state.move_to(), None);
        let mut buf = vec![0u8; second.len() - 20];
        g.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf[..], &second[20..]);
        // Between requests: the end of the stream for hyper, and nothing more read.
        let mut buf = [0u8; 64];
        assert_eq!(g.read(&mut buf).await.unwrap(), 0);
        assert_eq!(g.read(&mut buf).await.unwrap(), 0);
        assert!(
            handed_back(&mut back).is_none(),
            "handed back before hyper was done"
        );
        // hyper finishes: no shutdown of the connection, which is handed back to move with
        // the third request unread.
        g.shutdown().await.unwrap();
        drop(g);
        let (cursor, leave) = handed_back(&mut back).unwrap();
        assert_eq!(leave, Leave::Move(1));
        assert_eq!(&cursor.get_ref()[cursor.position() as usize..], &third[..]);
    }

    #[tokio::test]
    async fn a_moved_connection_waits_for_its_next_head_as_an_idle_one() {
        let slot = Slots::new(4).admit().unwrap();
        let limits = Limits {
            header_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_millis(50),
            ..Limits::default()
        };
        let (client, _server_end) = tokio::io::duplex(64);
        let (g, _) = Guard::new(client, &limits, slot.state.clone(), true);
        let mut g = g.moved();
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), g.first_head())
            .await
            .expect("the idle deadline did not end the wait");
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut buf = [0u8; 8];
        assert_eq!(g.read(&mut buf).await.unwrap(), 0);
    }

    fn guard() -> Guard<()> {
        let slot = Slots::new(4).admit().unwrap();
        Guard::new((), &Limits::default(), slot.state.clone(), true).0
    }

    /// Scans `bytes` whole and one byte at a time; both must agree. Returns where the
    /// refused head starts and its status and body.
    fn scan(bytes: &[u8]) -> Option<(usize, u16, &'static str)> {
        let whole = guard()
            .scan(bytes)
            .map(|(n, r)| (n, r.status.as_u16(), r.body));
        let mut g = guard();
        let mut bytewise = None;
        for (i, b) in bytes.iter().enumerate() {
            if let Some((n, r)) = g.scan(std::slice::from_ref(b)) {
                // One byte per read: the refused head started `n` bytes into this read (0),
                // so where it started overall is where its first byte was.
                assert_eq!(n, 0);
                bytewise = Some((i, r.status.as_u16(), r.body));
                break;
            }
        }
        match (whole, bytewise) {
            (None, None) => None,
            (Some(w), Some((i, s, b))) => {
                assert_eq!((w.1, w.2), (s, b), "{:?}", String::from_utf8_lossy(bytes));
                // Byte-wise, the refusal comes at its deciding byte, at or after the start.
                assert!(i >= w.0);
                Some(w)
            }
            (w, b) => panic!(
                "whole {w:?} but byte-wise {b:?} for {:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

    #[test]
    fn follows_framing_and_passes_good_requests() {
        let mut s = Vec::new();
        s.extend_from_slice(GET);
        // A body that looks like headers is a body.
        s.extend_from_slice(
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 45\r\n\r\nTransfer-Encoding: chunked\r\nContent-Length: 1",
        );
        // Chunked with an extension, a chunk holding a CRLF, and a trailer.
        s.extend_from_slice(
            b"POST /c HTTP/1.1\r\nHost: a\r\ntransfer-encoding:  Chunked \r\n\r\n4;ext=1\r\n\r\n\r\n\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        s.extend_from_slice(b"\r\nGET /lf HTTP/1.0\nHost: a\n\n");
        s.extend_from_slice(GET);
        assert_eq!(scan(&s), None);
    }

    #[test]
    fn refuses_ambiguous_framing_at_the_start_of_its_head() {
        let cases: [(&[u8], u16, &str); 9] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                "bad request: both Content-Length and Transfer-Encoding\n",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
                400,
                "bad request: both Content-Length and Transfer-Encoding\n",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
                400,
                "bad request: more than one Content-Length\n",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\n",
                400,
                "bad request: malformed Content-Length\n",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n",
                400,
                "bad request: malformed Content-Length\n",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400,
                "bad request: malformed Content-Length\n",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
                "transfer codings other than chunked are not supported\n",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
                "transfer codings other than chunked are not supported\n",
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                "bad request: Transfer-Encoding in an HTTP/1.0 request\n",
            ),
        ];
        for (head, status, body) in cases {
            let mut s = GET.to_vec();
            s.extend_from_slice(head);
            assert_eq!(
                scan(&s),
                Some((GET.len(), status, body)),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn refuses_malformed_and_oversized_heads_at_their_first_bad_byte() {
        let cases: [(&[u8], u16, &str); 10] = [
            (
                b"GET /a<b HTTP/1.1\r\n\r\n",
                400,
                "bad request: malformed request target\n",
            ),
            (
                b"GET /a`b HTTP/1.1\r\n\r\n",
                400,
                "bad request: malformed request target\n",
            ),
            (
                b"GET /a?\"b HTTP/1.1\r\n\r\n",
                400,
                "bad request: malformed request target\n",
            ),
            (
                b"GET / HTTP/2.0\r\n\r\n",
                400,
                "bad request: malformed request line\n",
            ),
            (
                b"GET  / HTTP/1.1\r\n\r\n",
                400,
                "bad request: malformed request line\n",
            ),
            (
                b"GET /\r\n\r\n",
                400,
                "bad request: malformed request line\n",
            ),
            (
                b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
                400,
                "bad request: malformed header line\n",
            ),
            (
                b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
                400,
                "bad request: malformed header line\n",
            ),
            (
                b"GET / HTTP/1.1\r\nA: b\x01c\r\n\r\n",
                400,
                "bad request: malformed header line\n",
            ),
            (
                b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
                400,
                "bad request: malformed header line\n",
            ),
        ];
        for (head, status, body) in cases {
            assert_eq!(
                scan(head),
                Some((0, status, body)),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(16 * 1024 + 10, b'x');
        assert_eq!(
            scan(&big),
            Some((0, 431, "request header fields too large\n"))
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        assert_eq!(scan(&many), Some((0, 431, "too many header fields\n")));
        // What the `http` crate takes is fine.
        assert_eq!(scan(b"GET /a{b}|^?x=`{}#<> HTTP/1.1\r\n\r\n"), None);
        // 100 headers are fine.
        let mut fine = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            fine.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        fine.extend_from_slice(b"\r\n");
        assert_eq!(scan(&fine), None);
    }

    /// A small deterministic generator (xorshift64*), for the property tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// One of `good`, or now and then one of `bad`.
        fn pick<'a>(&mut self, good: &[&'a [u8]], bad: &[&'a [u8]]) -> &'a [u8] {
            if !bad.is_empty() && self.below(24) == 0 {
                bad[self.below(bad.len())]
            } else {
                good[self.below(good.len())]
            }
        }
    }

    /// A request head, mostly well-formed, with the bytes that sit on the edges of the runs
    /// [`HeadScan::run`] takes at once, now and then a byte put in anywhere, and now and then
    /// cut short.
    fn random_head(rng: &mut Rng) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(rng.pick(&[b"", b"", b"", b"\r\n", b"\n"], &[b"\r\r"]));
        h.extend_from_slice(rng.pick(
            &[
                b"GET",
                b"POST",
                b"CONNECT",
                b"CONNEC",
                b"CONNECTX",
                b"M-SEARCH",
            ],
            &[b"G\x01T", b"", b"G:T"],
        ));
        h.extend_from_slice(rng.pick(&[b" "], &[b"  ", b"\t"]));
        h.extend_from_slice(rng.pick(
            &[
                b"/",
                b"/a/b.c",
                b"/a?x=1&y=`{}`#frag<>\"",
                b"/a#b?c`",
                b"/\x80\xff~",
                b"*",
                b"http://h.example/<`>",
                b"/a{b}|^?x=`{}#<>",
            ],
            &[b"/a<b", b"/a`b", b"/q?\"", b"/q?>", b"/a\x7fb", b""],
        ));
        h.extend_from_slice(rng.pick(&[b" "], &[b"  ", b""]));
        h.extend_from_slice(rng.pick(
            &[b"HTTP/1.1", b"HTTP/1.0"],
            &[
                b"HTTP/1.2",
                b"HTTP/2.0",
                b"HTTP/1",
                b"HTTP/1.11",
                b"http/1.1",
            ],
        ));
        let eol_good: &[&[u8]] = &[b"\r\n", b"\r\n", b"\n"];
        let eol_bad: &[&[u8]] = &[b"\r", b"\rx", b"\r\r\n"];
        h.extend_from_slice(rng.pick(eol_good, eol_bad));
        for _ in 0..rng.below(8) {
            h.extend_from_slice(rng.pick(
                &[
                    b"Host",
                    b"content-length",
                    b"Content-Length",
                    b"CONTENT-LENGTHS",
                    b"content-len",
                    b"Transfer-Encoding",
                    b"transfer-encodin",
                    b"upgrade",
                    b"Upgrade-Insecure-Requests",
                    b"UP",
                    b"X-A_b.c!~",
                ],
                &[b"Bad Name", b" folded", b"", b"\tx"],
            ));
            h.extend_from_slice(rng.pick(&[b":", b": ", b":\t "], &[b" :", b""]));
            h.extend_from_slice(rng.pick(
                &[
                    b"4",
                    b"0",
                    b"chunked",
                    b" Chunked \t",
                    b"websocket",
                    b"a\tb c\x80\xfe:/;",
                    b"",
                ],
                &[
                    b"gzip, chunked",
                    b"123456789012345678901234567890",
                    b"x\x01y",
                    b"x\x7fy",
                ],
            ));
            h.extend_from_slice(rng.pick(eol_good, eol_bad));
        }
        h.extend_from_slice(rng.pick(eol_good, &[b"\r"]));
        if rng.below(8) == 0 {
            let at = rng.below(h.len() + 1);
            let b = [b'\r', b'\n', b':', b' ', b'\t', 0, 0x7f, 0x80, b'#', b'?'];
            h.insert(at, b[rng.below(b.len())]);
        }
        if rng.below(5) == 0 {
            h.truncate(rng.below(h.len() + 1));
        }
        h
    }

    /// What [`HeadScan::byte`] alone makes of `bytes`, one at a time: how many bytes up to
    /// the deciding one, what it did, and the state then.
    fn bytewise_head(
        bytes: &[u8],
        max_bytes: usize,
        max_headers: usize,
    ) -> (usize, Step, HeadScan) {
        let mut h = HeadScan::default();
        for (i, &b) in bytes.iter().enumerate() {
            let step = h.byte(b, max_bytes, max_headers);
            if step != Step::More {
                return (i + 1, step, h);
            }
        }
        (bytes.len(), Step::More, h)
    }

    /// [`HeadScan::feed`] on `bytes` in the reads `cuts` make of them.
    fn fed_head(
        bytes: &[u8],
        cuts: &[usize],
        max_bytes: usize,
        max_headers: usize,
    ) -> (usize, Step, HeadScan) {
        let mut h = HeadScan::default();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let (n, step) = h.feed(&bytes[from..to], max_bytes, max_headers);
            if step != Step::More {
                return (from + n, step, h);
            }
            assert_eq!(n, to - from);
            from = to;
        }
        (bytes.len(), Step::More, h)
    }

    #[test]
    fn reading_runs_at_once_decides_as_reading_byte_by_byte_wherever_the_reads_split() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut decided = [0usize; 3];
        for _ in 0..1500 {
            let head = random_head(&mut rng);
            // Limits in and around the head's own size and line count.
            let max_bytes = match rng.below(4) {
                0 => 1 + rng.below(head.len() + 4),
                _ => 16 * 1024,
            };
            let max_headers = match rng.below(4) {
                0 => rng.below(6),
                _ => 100,
            };
            let want = bytewise_head(&head, max_bytes, max_headers);
            decided[match want.1 {
                Step::More => 0,
                Step::Ended => 1,
                Step::Refused(_) => 2,
            }] += 1;
            let show = || String::from_utf8_lossy(&head).into_owned();
            assert_eq!(
                fed_head(&head, &[], max_bytes, max_headers),
                want,
                "{}",
                show()
            );
            for at in 0..=head.len() {
                assert_eq!(
                    fed_head(&head, &[at], max_bytes, max_headers),
                    want,
                    "split at {at}: {}",
                    show()
                );
            }
            let ones: Vec<usize> = (1..head.len()).collect();
            assert_eq!(
                fed_head(&head, &ones, max_bytes, max_headers),
                want,
                "{}",
                show()
            );
            let mut cuts = Vec::new();
            let mut at = 0;
            while at < head.len() {
                at += 1 + rng.below(7);
                if at < head.len() {
                    cuts.push(at);
                }
            }
            assert_eq!(
                fed_head(&head, &cuts, max_bytes, max_headers),
                want,
                "{}",
                show()
            );
        }
        // The generator reaches every verdict often.
        assert!(decided.iter().all(|&n| n > 150), "{decided:?}");
    }

    #[test]
    fn the_class_table_says_what_the_byte_tests_it_replaces_say() {
        for b in 0..=255u8 {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(is_tchar(b), tchar, "{b:#x}");
            let value = !((b < b' ' && b != b'\t') || b == 0x7f);
            assert_eq!(CLASS[b as usize] & VALUE != 0, value, "{b:#x}");
            let target = b > b' ' && b != 0x7f && !b"#?<>`\"".contains(&b);
            assert_eq!(CLASS[b as usize] & TARGET != 0, target, "{b:#x}");
        }
    }

    #[test]
    fn runs_stop_at_the_target_and_size_limits_as_byte_by_byte() {
        let mut heads = Vec::new();
        for len in [MAX_TARGET - 1, MAX_TARGET, MAX_TARGET + 1] {
            let mut h = b"GET /".to_vec();
            h.resize(4 + len, b'a');
            h.extend_from_slice(b" HTTP/1.1\r\n\r\n");
            heads.push(h);
        }
        let mut value = b"GET / HTTP/1.1\r\nX: ".to_vec();
        value.resize(300, b'v');
        value.extend_from_slice(b"\r\n\r\n");
        heads.push(value);
        let mut name = b"GET / HTTP/1.1\r\nX-".to_vec();
        name.resize(300, b'n');
        name.extend_from_slice(b": v\r\n\r\n");
        heads.push(name);
        for head in &heads {
            for max_bytes in [
                200,
                299,
                300,
                301,
                302,
                303,
                MAX_TARGET + 13,
                MAX_TARGET + 14,
                1 << 20,
            ] {
                let want = bytewise_head(head, max_bytes, 100);
                for cuts in [&[][..], &[5], &[250], &[MAX_TARGET - 2, MAX_TARGET + 3]] {
                    let cuts: Vec<usize> =
                        cuts.iter().copied().filter(|&c| c <= head.len()).collect();
                    assert_eq!(
                        fed_head(head, &cuts, max_bytes, 100),
                        want,
                        "{} bytes, limit {max_bytes}, cuts {cuts:?}",
                        head.len()
                    );
                }
            }
        }
        // The cases are the edges they are meant to be.
        assert_eq!(bytewise_head(&heads[1], 1 << 20, 100).1, Step::Ended);
        assert!(
            matches!(bytewise_head(&heads[2], 1 << 20, 100).1, Step::Refused(r) if r.status == StatusCode::URI_TOO_LONG)
        );
    }

    #[test]
    fn a_stream_of_requests_split_at_every_offset_reads_as_in_one_read() {
        let mut s = Vec::new();
        s.extend_from_slice(GET);
        s.extend_from_slice(
            b"POST /x?a=b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Long: 0123456789abcdef\r\n\r\nhello",
        );
        s.extend_from_slice(
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        );
        s.extend_from_slice(b"GET /z#f HTTP/1.0\nUser-Agent: t\n\n");
        let bad = b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n";
        let mut refused = s.clone();
        refused.extend_from_slice(bad);
        for bytes in [&s, &refused] {
            let whole = guard().scan(bytes).map(|(n, r)| (n, r.status));
            for at in 0..=bytes.len() {
                let mut g = guard();
                let split = match g.scan(&bytes[..at]) {
                    Some((n, r)) => Some((n, r.status)),
                    None => g.scan(&bytes[at..]).map(|(n, r)| (at + n, r.status)),
                };
                // A refused head's start: in the second read unless it began in the first
                // (whose bytes hyper then has had).
                let want = whole.map(|(n, st)| {
                    let decided_in_first = at == bytes.len();
                    (if n < at && !decided_in_first { at } else { n }, st)
                });
                assert_eq!(split, want, "split at {at}");
            }
        }
        assert_eq!(guard().scan(&s), None);
        assert_eq!(
            guard().scan(&refused).map(|(n, r)| (n, r.status.as_u16())),
            Some((s.len(), 400))
        );
    }

    #[test]
    fn an_http2_first_request_is_complete_at_its_end_headers_frame_received_whole() {
        let mut bytes = H2_PREFACE.to_vec();
        // SETTINGS (empty), WINDOW_UPDATE, HEADERS without END_HEADERS, then CONTINUATION
        // with it.
        bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 3, 1, 0, 0, 0, 0, 1, 0x82, 0x84, 0x86]);
        bytes.extend_from_slice(&[0, 0, 2, 9, 4, 0, 0, 0, 1, 0x87, 0x41]);
        // Byte by byte: not done until the very last byte.
        let mut h2 = H2First::default();
        for n in 1..bytes.len() {
            assert!(!h2.done(&bytes[..n]), "done at {n}");
        }
        assert!(h2.done(&bytes));
        // At once, too.
        assert!(H2First::default().done(&bytes));
        // Not HTTP/2: handed to hyper at once.
        assert!(H2First::default().done(b"GET / HTTP/1.1\r\n"));
        assert!(!H2First::default().done(b"PRI * HT"));
    }

    #[test]
    fn a_protocol_switch_stops_the_reading_until_it_is_known_to_have_failed() {
        let mut g = guard();
        let up =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert!(g.scan(up).is_none());
        assert_eq!(g.phase, Phase::AfterUpgrade);
        // Bytes behind it before the answer are not read as HTTP.
        assert!(g.scan(b"\x81\x05hello").is_none());
        assert_eq!(g.phase, Phase::Through);
        assert!(g
            .scan(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .is_none());
    }
}
