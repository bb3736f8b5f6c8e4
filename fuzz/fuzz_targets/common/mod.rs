//! What several targets share.

use std::io::Read;

/// A pipe that hands out at most `piece` bytes per read, as a camera or ffmpeg pipe does.
pub struct Pieces<'a> {
    pub data: &'a [u8],
    pub piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
