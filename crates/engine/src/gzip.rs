//! The store's gzip writer: deflate level 1 for data that compresses, and for data that does
//! not, a gzip member of stored (uncompressed) deflate blocks written here directly.
//!
//! Why not flate2 at level 0 for the second: miniz_oxide's stored mode copies byte by byte
//! and took about half the controller's CPU of a 1 GiB deploy of incompressible files (more
//! than the SHA-256 of the artifact and of every file together). A stored block is five
//! header bytes and the data; the CRC-32 of the trailer is `crc32fast` (what flate2 uses, with
//! the CPU's carry-less multiply). The output is a standard gzip stream any `gzip -d`, `tar
//! -xz` or flate2 reader takes.

use crate::artifact::Packing;
use flate2::{Compression, GzBuilder};
use std::io::{self, Write};

/// The largest stored deflate block (RFC 1951, 3.2.4: LEN is 16 bits).
const BLOCK: usize = 65_535;

/// A gzip member of stored deflate blocks (RFC 1952 header with mtime 0, no name).
pub(crate) struct StoredGz<W: Write> {
    inner: W,
    pending: Vec<u8>,
    crc: crc32fast::Hasher,
    size: u64,
}

impl<W: Write> StoredGz<W> {
    pub(crate) fn new(mut inner: W) -> io::Result<Self> {
        // ID1 ID2, CM = deflate, FLG = 0, MTIME = 0, XFL = 0, OS = 255 (unknown), as flate2's
        // GzBuilder with mtime 0 writes it.
        inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        Ok(StoredGz {
            inner,
            pending: Vec::with_capacity(BLOCK),
            crc: crc32fast::Hasher::new(),
            size: 0,
        })
    }

    fn block(&mut self, last: bool) -> io::Result<()> {
        let len = self.pending.len() as u16;
        let [l0, l1] = len.to_le_bytes();
        let [n0, n1] = (!len).to_le_bytes();
        self.inner.write_all(&[u8::from(last), l0, l1, n0, n1])?;
        self.inner.write_all(&self.pending)?;
        self.pending.clear();
        Ok(())
    }

    /// Writes the last block and the trailer (CRC-32, size mod 2^32) and returns the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.block(true)?;
        let crc = self.crc.clone().finalize();
        self.inner.write_all(&crc.to_le_bytes())?;
        self.inner.write_all(&(self.size as u32).to_le_bytes())?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for StoredGz<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        self.size += n as u64;
        if self.pending.len() == BLOCK {
            self.block(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The gzip stream of an artifact or a delta, packed as [`Packing`] says.
pub(crate) enum GzOut<W: Write> {
    Deflate(flate2::write::GzEncoder<W>),
    Stored(StoredGz<W>),
}

impl<W: Write> GzOut<W> {
    pub(crate) fn new(inner: W, packing: Packing) -> io::Result<Self> {
        Ok(match packing {
            Packing::Gzip1 => {
                GzOut::Deflate(GzBuilder::new().mtime(0).write(inner, Compression::fast()))
            }
            Packing::Stored => GzOut::Stored(StoredGz::new(inner)?),
        })
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            GzOut::Deflate(gz) => gz.finish(),
            GzOut::Stored(gz) => gz.finish(),
        }
    }
}

impl<W: Write> Write for GzOut<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            GzOut::Deflate(gz) => gz.write(buf),
            GzOut::Stored(gz) => gz.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            GzOut::Deflate(gz) => gz.flush(),
            GzOut::Stored(gz) => gz.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn stored(data: &[u8], writes: usize) -> Vec<u8> {
        let mut gz = GzOut::new(Vec::new(), Packing::Stored).unwrap();
        for part in data.chunks(data.len().div_ceil(writes).max(1)) {
            gz.write_all(part).unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn a_stored_member_reads_back_byte_for_byte_with_flate2_and_gzip() {
        let mut data = vec![0u8; 3 * BLOCK + 17];
        let mut x = 0x2545_f491_u32;
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for (len, writes) in [(0, 1), (1, 1), (BLOCK, 1), (BLOCK + 1, 3), (data.len(), 7)] {
            let gz = stored(&data[..len], writes);
            // Header, one 5-byte header per block (a last, possibly empty, block), trailer.
            let blocks = len / BLOCK + 1;
            assert_eq!(gz.len(), 10 + 5 * blocks + len + 8, "length {len}");
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, &data[..len], "flate2 reads back {len} bytes");
            let mut child = std::process::Command::new("gzip")
                .args(["-d", "-c"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let input = gz.clone();
            let feed = std::thread::spawn(move || stdin.write_all(&input));
            let out = child.wait_with_output().unwrap();
            feed.join().unwrap().unwrap();
            assert!(out.status.success(), "gzip -d refuses {len} bytes");
            assert_eq!(out.stdout, &data[..len], "gzip -d reads back {len} bytes");
        }
    }
}
