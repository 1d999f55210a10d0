//! One packing, many hosts: the bytes a directory packs into are handed, as they are produced,
//! to one reader per host (each feeding that host's `ssh` stdin), while the same pass hashes
//! them and writes the artifact store's copy.
//!
//! [`Fanout`] is the producer's end: it cuts the stream into shared chunks and sends each to
//! every host still reading, through a bounded channel per host, so memory stays at a few
//! chunks whatever the payload's size, and the slowest host sets the pace. [`HostStream`] is a
//! host's end. The first message says whether the bytes are a gzip stream or a plain tar
//! (decided from the first bytes packed, see `artifact::Compressing`). A stream that ends
//! without its end marker (the packing was refused or failed part-way) is an error for every
//! reader, never a clean end of file: a host must not take a cut stream for a whole release.
//!
//! Invariant: a host that stops reading (its connection failed) is dropped from the fan-out;
//! the others and the store's copy go on.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

/// Bytes per chunk sent to the hosts.
const CHUNK: usize = 256 << 10;
/// Chunks queued per host before the producer waits for it.
const DEPTH: usize = 8;

enum Msg {
    /// The stream's format: a gzip stream (`true`) or a plain tar.
    Start {
        gz: bool,
    },
    Data(Arc<Vec<u8>>),
    End,
}

/// The producer's end of a fan-out to hosts.
pub(crate) struct Fanout {
    hosts: Vec<Option<SyncSender<Msg>>>,
    chunk: Vec<u8>,
    started: bool,
}

impl Fanout {
    /// A fan-out to `n` hosts and their readers, in host order.
    pub(crate) fn new(n: usize) -> (Fanout, Vec<HostStream>) {
        let (hosts, readers) = (0..n)
            .map(|_| {
                let (tx, rx) = sync_channel(DEPTH);
                (
                    Some(tx),
                    HostStream {
                        rx,
                        chunk: Arc::new(Vec::new()),
                        at: 0,
                        ended: false,
                    },
                )
            })
            .unzip();
        (
            Fanout {
                hosts,
                chunk: Vec::with_capacity(CHUNK),
                started: false,
            },
            readers,
        )
    }

    /// Says the stream's format; every host's reader waits for this before its upload starts.
    pub(crate) fn start(&mut self, gz: bool) {
        if !self.started {
            self.started = true;
            self.broadcast(|| Msg::Start { gz });
        }
    }

    /// Queues bytes of the stream (sent in chunks).
    pub(crate) fn push(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            let n = buf.len().min(CHUNK - self.chunk.len());
            self.chunk.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.chunk.len() == CHUNK {
                self.send_chunk();
            }
        }
    }

    fn send_chunk(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let chunk = Arc::new(std::mem::replace(
            &mut self.chunk,
            Vec::with_capacity(CHUNK),
        ));
        self.broadcast(|| Msg::Data(chunk.clone()));
    }

    fn broadcast(&mut self, msg: impl Fn() -> Msg) {
        for slot in &mut self.hosts {
            if let Some(tx) = slot {
                if tx.send(msg()).is_err() {
                    // That host stopped reading: its own error says why.
                    *slot = None;
                }
            }
        }
    }

    /// The stream is complete: the last bytes and the end marker go out.
    pub(crate) fn finish(mut self) {
        self.send_chunk();
        self.broadcast(|| Msg::End);
    }
}

/// A host's end of a [`Fanout`].
pub(crate) struct HostStream {
    rx: Receiver<Msg>,
    chunk: Arc<Vec<u8>>,
    at: usize,
    ended: bool,
}

fn cut() -> io::Error {
    io::Error::other("the packing stopped before the end of the stream")
}

impl HostStream {
    /// Waits for the stream's format: `Ok(true)` for gzip, `Ok(false)` for a plain tar; an
    /// error if the packing stopped before it began.
    pub(crate) fn format(&mut self) -> io::Result<bool> {
        match self.rx.recv() {
            Ok(Msg::Start { gz }) => Ok(gz),
            _ => Err(cut()),
        }
    }
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Msg::Data(chunk)) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Ok(Msg::End) => self.ended = true,
                Ok(Msg::Start { .. }) => {}
                Err(_) => return Err(cut()),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_reads_the_whole_stream_and_a_gone_host_does_not_stop_the_others() {
        let (mut f, mut readers) = Fanout::new(3);
        let gone = readers.remove(1);
        drop(gone);
        let handles: Vec<_> = readers
            .into_iter()
            .map(|mut r| {
                std::thread::spawn(move || {
                    let gz = r.format().unwrap();
                    let mut all = Vec::new();
                    r.read_to_end(&mut all).unwrap();
                    (gz, all)
                })
            })
            .collect();
        f.start(true);
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(1000) {
            f.push(piece);
        }
        f.finish();
        for h in handles {
            let (gz, all) = h.join().unwrap();
            assert!(gz);
            assert_eq!(all, data);
        }
    }

    #[test]
    fn a_stream_cut_before_its_end_is_an_error_not_an_end_of_file() {
        let (mut f, mut readers) = Fanout::new(1);
        let mut r = readers.pop().unwrap();
        let h = std::thread::spawn(move || {
            r.format().unwrap();
            let mut all = Vec::new();
            r.read_to_end(&mut all)
        });
        f.start(false);
        f.push(&[1, 2, 3]);
        f.send_chunk();
        drop(f);
        let e = h.join().unwrap().unwrap_err();
        assert_eq!(
            e.to_string(),
            "the packing stopped before the end of the stream"
        );
    }
}
