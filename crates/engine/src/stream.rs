//! One packing, many hosts, and a head start: a directory is packed into the artifact store
//! from the moment the hosts begin to connect ([`Growing`]), and every host, once ready, reads
//! the store's file as it is written (each feeding that host's `ssh` stdin) until it catches up
//! with the packing. The file (page cache, not this process's memory) holds what a host has
//! not read yet, so memory does not grow with the payload, and the packing's CPU overlaps the
//! connections instead of the upload. The format is decided from the first bytes packed (see
//! `artifact::Compressing`): a host gets the gzip stream when the artifact is compressed, or
//! the tar stream inside its stored deflate blocks ([`Unstored`]), so it spends no CPU on gzip
//! for data that does not shrink.
//!
//! Invariant: a stream the packing did not say is whole (it was refused, failed part-way or
//! was cancelled) is an error for every reader, never a clean end of file: a host must not take
//! a cut stream for a whole release.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

fn cut() -> io::Error {
    io::Error::other("the packing stopped before the end of the stream")
}

/// A head start: the artifact store's copy, packed while the hosts connect, read by every host
/// as it is written. The producer begins before any host can take a byte; the file (page
/// cache, not this process's memory) holds what the hosts have not read yet, so the packing's
/// CPU overlaps the connections instead of the upload. Hosts get the gzip stream when the
/// artifact is compressed, or the tar stream inside its stored deflate blocks ([`Unstored`]).
/// A stream that ends without the producer saying it is whole is an error
/// for every reader.
#[derive(Default)]
pub(crate) struct Growing {
    state: Mutex<Grown>,
    grew: Condvar,
}

#[derive(Default)]
struct Grown {
    file: Option<Arc<File>>,
    gz: Option<bool>,
    written: u64,
    /// `Some(true)`: every byte is written; `Some(false)`: the packing failed or was cancelled.
    end: Option<bool>,
    cancelled: bool,
}

impl Growing {
    fn state(&self) -> MutexGuard<'_, Grown> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Grown)) {
        f(&mut self.state());
        self.grew.notify_all();
    }

    /// The store's file being written, opened for reading.
    pub(crate) fn open(&self, file: File) {
        self.update(|g| g.file = Some(Arc::new(file)));
    }

    /// The stream's format: gzip (`true`) or stored deflate blocks around a tar.
    pub(crate) fn format(&self, gz: bool) {
        self.update(|g| g.gz = Some(gz));
    }

    /// `total` bytes are in the file.
    pub(crate) fn wrote(&self, total: u64) {
        self.update(|g| g.written = total);
    }

    /// The file is complete (`true`) or never will be (`false`); the first word stands.
    pub(crate) fn end(&self, whole: bool) {
        self.update(|g| {
            g.end.get_or_insert(whole);
        });
    }

    /// No host will read: the producer stops at its next write.
    pub(crate) fn cancel(&self) {
        self.update(|g| g.cancelled = true);
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.state().cancelled
    }

    /// A reader from the first byte.
    pub(crate) fn reader(self: &Arc<Self>) -> GrowingReader {
        GrowingReader {
            growing: self.clone(),
            at: 0,
        }
    }
}

/// A host's end of a [`Growing`] file.
pub(crate) struct GrowingReader {
    growing: Arc<Growing>,
    at: u64,
}

impl GrowingReader {
    /// Waits for the stream's format: `Ok(true)` for gzip, `Ok(false)` for stored blocks; an
    /// error if the packing stopped before it began.
    pub(crate) fn format(&mut self) -> io::Result<bool> {
        let mut g = self.growing.state();
        loop {
            if let Some(gz) = g.gz {
                return Ok(gz);
            }
            if g.end.is_some() {
                return Err(cut());
            }
            g = self.growing.grew.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
    /// Waits for the stream's format; returns whether the host gets gzip, and the bytes it
    /// gets (the tar inside the stored blocks when it does not).
    pub(crate) fn open(mut self) -> io::Result<(bool, Box<dyn Read + Send>)> {
        let gz = self.format()?;
        let bytes: Box<dyn Read + Send> = if gz {
            Box::new(self)
        } else {
            Box::new(Unstored::new(self))
        };
        Ok((gz, bytes))
    }
}

impl Read for GrowingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut g = self.growing.state();
        loop {
            if g.written > self.at {
                let (file, n) = match &g.file {
                    Some(f) => (f.clone(), (g.written - self.at).min(buf.len() as u64)),
                    None => return Err(cut()),
                };
                drop(g);
                let n = file.read_at(&mut buf[..n as usize], self.at)?;
                if n == 0 {
                    return Err(cut());
                }
                self.at += n as u64;
                return Ok(n);
            }
            match g.end {
                Some(true) => return Ok(0),
                Some(false) => return Err(cut()),
                None => {}
            }
            g = self.growing.grew.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The tar stream inside a gzip member of stored deflate blocks, as the store's
/// [`crate::gzip::StoredGz`] writes it (10-byte header, no optional fields).
pub(crate) struct Unstored<R> {
    inner: R,
    header: bool,
    left: usize,
    last: bool,
}

impl<R: Read> Unstored<R> {
    pub(crate) fn new(inner: R) -> Self {
        Unstored {
            inner,
            header: false,
            left: 0,
            last: false,
        }
    }
}

fn not_stored() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the store's copy is not a member of stored deflate blocks",
    )
}

impl<R: Read> Read for Unstored<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.header {
            let mut h = [0u8; 10];
            self.inner.read_exact(&mut h)?;
            if h[..4] != [0x1f, 0x8b, 8, 0] {
                return Err(not_stored());
            }
            self.header = true;
        }
        while self.left == 0 {
            if self.last {
                return Ok(0);
            }
            let mut b = [0u8; 5];
            self.inner.read_exact(&mut b)?;
            let len = u16::from_le_bytes([b[1], b[2]]);
            if b[0] & !1 != 0 || u16::from_le_bytes([b[3], b[4]]) != !len {
                return Err(not_stored());
            }
            self.last = b[0] & 1 == 1;
            self.left = len as usize;
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstored_gives_back_the_bytes_the_stored_writer_framed() {
        for len in [0usize, 1, 65_535, 65_536, 3 * 65_535 + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut gz = crate::gzip::StoredGz::new(Vec::new()).unwrap();
            std::io::Write::write_all(&mut gz, &data).unwrap();
            let framed = gz.finish().unwrap();
            let mut back = Vec::new();
            Unstored::new(&framed[..]).read_to_end(&mut back).unwrap();
            assert!(back == data, "{len} bytes");
        }
        let e = Unstored::new(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255, 2, 0, 0, 0, 0][..])
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the store's copy is not a member of stored deflate blocks"
        );
    }

    #[test]
    fn a_growing_file_is_read_as_it_grows_and_a_failed_one_is_an_error() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("growing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut w = std::fs::File::create(&path).unwrap();
        let g = Arc::new(Growing::default());
        g.open(std::fs::File::open(&path).unwrap());
        let mut r = g.reader();
        let h = std::thread::spawn(move || {
            let gz = r.format().unwrap();
            let mut all = Vec::new();
            r.read_to_end(&mut all).map(|_| (gz, all))
        });
        g.format(true);
        for i in 0..100u8 {
            w.write_all(&[i; 1000]).unwrap();
            g.wrote(1000 * (i as u64 + 1));
        }
        g.end(true);
        let (gz, all) = h.join().unwrap().unwrap();
        assert!(gz);
        assert_eq!(all.len(), 100_000);
        assert_eq!(all[99_999], 99);

        let g = Arc::new(Growing::default());
        g.open(std::fs::File::open(&path).unwrap());
        let mut r = g.reader();
        g.format(false);
        g.wrote(10);
        g.end(false);
        let mut some = [0u8; 4];
        assert_eq!(r.read(&mut some).unwrap(), 4);
        let e = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the packing stopped before the end of the stream"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
