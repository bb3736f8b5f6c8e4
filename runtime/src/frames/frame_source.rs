//! Cutting a byte stream into frames, into caller-owned buffers: fixed-size raw frames, or
//! JPEGs concatenated as `ffmpeg -f image2pipe -c:v mjpeg` writes them.
//!
//! Damage is reported per frame ([`FrameFault`]) and the source resynchronises on the next
//! frame, so one bad frame never ends a stream.

use std::io::{self, BufRead, BufReader, ErrorKind, Read};

/// Why the bytes of one frame could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameFault {
    /// A raw frame was cut short by the end of the stream; the source ends with it.
    #[error("truncated frame: the stream ended after {got} of its {expected} bytes")]
    Truncated {
        /// Bytes read before the stream ended.
        got: usize,
        /// Bytes of a whole frame.
        expected: usize,
    },
    /// A JPEG ended, at the next image's start or the stream's end, before its end-of-image
    /// marker.
    #[error("truncated JPEG: no end-of-image marker before the next image or the end")]
    TruncatedJpeg,
    /// A JPEG's structure broke: no marker where one must be, or a segment length below 2.
    #[error("malformed JPEG: expected a marker at byte {offset}")]
    BadMarker {
        /// Position in the image (its bytes copied so far, from its SOI) where it broke.
        offset: usize,
    },
    /// A JPEG did not fit the buffer passed to [`FrameSource::fill`]; the rest of it is skipped.
    #[error("JPEG larger than {limit} bytes (see --max-jpeg-bytes)")]
    TooLarge {
        /// The buffer's size in bytes.
        limit: usize,
    },
    /// Bytes that belong to no JPEG came before the next image.
    #[error("{skipped} bytes of data that is not a JPEG")]
    NotJpeg {
        /// How many bytes were skipped.
        skipped: usize,
    },
    /// Reading the input failed (other than by an interruption); the source ends with it.
    #[error("read error: {0}")]
    Read(ErrorKind),
}

/// What one [`FrameSource::fill`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// A frame of this many bytes is at the start of the buffer.
    Frame(usize),
    /// This frame is lost; the next call goes on with the next frame, or returns `End`.
    Fault(FrameFault),
    /// The input is over; every later call returns `End` too.
    End,
}

/// An input byte stream cut into frames, each read into a buffer the caller owns.
pub trait FrameSource: Send {
    /// Read the next frame into `buffer` (never more than its length).
    fn fill(&mut self, buffer: &mut [u8]) -> Fill;
}

/// Frames of exactly `frame_bytes` bytes back to back.
pub struct RawFrames<R> {
    reader: R,
    frame_bytes: usize,
    ended: bool,
}

impl<R: Read> RawFrames<R> {
    /// Frames of `frame_bytes` bytes from `reader`; the buffers given to `fill` must hold at least
    /// that many (a shorter one panics).
    pub fn new(reader: R, frame_bytes: usize) -> Self {
        RawFrames {
            reader,
            frame_bytes,
            ended: false,
        }
    }
}

impl<R: Read + Send> FrameSource for RawFrames<R> {
    fn fill(&mut self, buffer: &mut [u8]) -> Fill {
        // A zero-byte frame would be read forever; a buffer too short for a frame cannot
        // take one: either ends the stream rather than spin or panic.
        if self.ended || self.frame_bytes == 0 {
            return Fill::End;
        }
        let Some(frame) = buffer.get_mut(..self.frame_bytes) else {
            self.ended = true;
            return Fill::Fault(FrameFault::TooLarge {
                limit: buffer.len(),
            });
        };
        let mut got = 0;
        while got < frame.len() {
            match self.reader.read(&mut frame[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.ended = true;
                    return Fill::Fault(FrameFault::Read(e.kind()));
                }
            }
        }
        if got == frame.len() {
            return Fill::Frame(got);
        }
        self.ended = true;
        if got == 0 {
            Fill::End
        } else {
            Fill::Fault(FrameFault::Truncated {
                got,
                expected: frame.len(),
            })
        }
    }
}

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;

/// Concatenated JPEGs, split by walking their marker segments (so an EOI inside an embedded
/// thumbnail or a byte pattern inside entropy-coded data cannot cut a frame short).
pub struct JpegFrames<R> {
    reader: BufReader<R>,
    /// The SOI of the next image was already consumed while reading the previous one.
    pending_soi: bool,
    /// After a fault inside an image, its remaining bytes are skipped without a second report.
    resyncing: bool,
    ended: bool,
}

impl<R: Read> JpegFrames<R> {
    /// JPEGs from `reader`, which is read through a 64 KiB buffer.
    pub fn new(reader: R) -> Self {
        JpegFrames {
            reader: BufReader::with_capacity(64 * 1024, reader),
            pending_soi: false,
            resyncing: false,
            ended: false,
        }
    }

    fn byte(&mut self) -> io::Result<u8> {
        let byte = *self
            .reader
            .fill_buf()?
            .first()
            .ok_or(ErrorKind::UnexpectedEof)?;
        self.reader.consume(1);
        Ok(byte)
    }

    /// Skip to just past the next SOI; `Ok(skipped)` counts the bytes before it.
    fn find_start(&mut self) -> io::Result<Option<usize>> {
        let mut skipped = 0;
        let mut after_ff = false;
        loop {
            let byte = match self.byte() {
                Ok(byte) => byte,
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            };
            if after_ff && byte == SOI {
                return Ok(Some(skipped - 1));
            }
            after_ff = byte == 0xFF;
            skipped += 1;
        }
    }

    /// Copy the rest of an image after its SOI into `out`.
    fn read_image(&mut self, out: &mut Output) -> io::Result<Result<usize, FrameFault>> {
        let mut next_marker = None;
        loop {
            let marker = match next_marker.take() {
                Some(marker) => marker,
                None => {
                    if self.byte()? != 0xFF {
                        return Ok(Err(FrameFault::BadMarker { offset: out.len }));
                    }
                    let mut marker = 0xFF;
                    while marker == 0xFF {
                        marker = self.byte()?;
                    }
                    marker
                }
            };
            match marker {
                EOI => {
                    out.push(&[0xFF, EOI])?;
                    return Ok(Ok(out.len));
                }
                SOI => {
                    self.pending_soi = true;
                    return Ok(Err(FrameFault::TruncatedJpeg));
                }
                0x01 | 0xD0..=0xD7 => out.push(&[0xFF, marker])?,
                0x00 => return Ok(Err(FrameFault::BadMarker { offset: out.len })),
                _ => {
                    let length = u16::from_be_bytes([self.byte()?, self.byte()?]);
                    if length < 2 {
                        return Ok(Err(FrameFault::BadMarker { offset: out.len }));
                    }
                    out.push(&[0xFF, marker])?;
                    out.push(&length.to_be_bytes())?;
                    let body = out.reserve(usize::from(length) - 2)?;
                    self.reader.read_exact(body)?;
                    if marker == SOS {
                        next_marker = Some(self.copy_entropy_data(out)?);
                    }
                }
            }
        }
    }

    /// Copy entropy-coded data up to the next real marker (not a stuffed `FF 00` or a restart
    /// marker) and return that marker.
    fn copy_entropy_data(&mut self, out: &mut Output) -> io::Result<u8> {
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            let Some(ff) = chunk.iter().position(|&b| b == 0xFF) else {
                let n = chunk.len();
                out.push(chunk)?;
                self.reader.consume(n);
                continue;
            };
            out.push(&chunk[..ff])?;
            self.reader.consume(ff + 1);
            let mut next = self.byte()?;
            while next == 0xFF {
                next = self.byte()?;
            }
            match next {
                0x00 | 0xD0..=0xD7 => out.push(&[0xFF, next])?,
                marker => return Ok(marker),
            }
        }
    }
}

impl<R: Read + Send> FrameSource for JpegFrames<R> {
    fn fill(&mut self, buffer: &mut [u8]) -> Fill {
        if self.ended {
            return Fill::End;
        }
        if !std::mem::take(&mut self.pending_soi) {
            match self.find_start() {
                Ok(Some(skipped)) if skipped > 0 && !self.resyncing => {
                    self.pending_soi = true;
                    return Fill::Fault(FrameFault::NotJpeg { skipped });
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.ended = true;
                    return Fill::End;
                }
                Err(e) => {
                    self.ended = true;
                    return Fill::Fault(FrameFault::Read(e.kind()));
                }
            }
        }
        self.resyncing = false;
        let mut out = Output {
            buffer,
            len: 0,
            overflowed: false,
        };
        let result = out
            .push(&[0xFF, SOI])
            .and_then(|()| self.read_image(&mut out));
        match result {
            Ok(Ok(len)) => Fill::Frame(len),
            Ok(Err(fault)) => {
                self.resyncing = !self.pending_soi;
                Fill::Fault(fault)
            }
            Err(_) if out.overflowed => {
                self.resyncing = true;
                Fill::Fault(FrameFault::TooLarge {
                    limit: out.buffer.len(),
                })
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                self.ended = true;
                Fill::Fault(FrameFault::TruncatedJpeg)
            }
            Err(e) => {
                self.ended = true;
                Fill::Fault(FrameFault::Read(e.kind()))
            }
        }
    }
}

/// The frame buffer being written; running out of room is an error that ends the image.
struct Output<'a> {
    buffer: &'a mut [u8],
    len: usize,
    overflowed: bool,
}

impl Output<'_> {
    fn reserve(&mut self, n: usize) -> io::Result<&mut [u8]> {
        if self.buffer.len() - self.len < n {
            self.overflowed = true;
            return Err(ErrorKind::OutOfMemory.into());
        }
        self.len += n;
        Ok(&mut self.buffer[self.len - n..self.len])
    }

    fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reserve(bytes.len())?.copy_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(side: u32, shade: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new(&mut out);
        // Busy pixels, so most of the file is entropy-coded data.
        let pixels: Vec<u8> = (0..side * side * 3)
            .map(|i| ((i * 7919) % 251) as u8 ^ shade)
            .collect();
        image::ImageEncoder::write_image(
            encoder,
            &pixels,
            side,
            side,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        out
    }

    fn drain(source: &mut impl FrameSource, capacity: usize) -> Vec<Result<Vec<u8>, FrameFault>> {
        let mut buffer = vec![0; capacity];
        let mut out = Vec::new();
        loop {
            match source.fill(&mut buffer) {
                Fill::Frame(n) => out.push(Ok(buffer[..n].to_vec())),
                Fill::Fault(fault) => out.push(Err(fault)),
                Fill::End => return out,
            }
        }
    }

    #[test]
    fn raw_frames_and_a_truncated_tail() {
        let bytes: Vec<u8> = (0..25).collect();
        let frames = drain(&mut RawFrames::new(&bytes[..], 10), 10);
        assert_eq!(
            frames,
            vec![
                Ok((0..10).collect()),
                Ok((10..20).collect()),
                Err(FrameFault::Truncated {
                    got: 5,
                    expected: 10
                })
            ]
        );
        assert!(
            drain(&mut RawFrames::new(&bytes[..20], 10), 10)
                .iter()
                .all(Result::is_ok)
        );
    }

    #[test]
    fn empty_frames_and_short_buffers_end_the_stream() {
        // A frame of 0 bytes used to be returned forever; a short buffer used to panic.
        let mut empty = RawFrames::new(&[1u8, 2, 3][..], 0);
        assert_eq!(empty.fill(&mut [0; 4]), Fill::End);
        let mut short = RawFrames::new(&[1u8; 8][..], 8);
        assert_eq!(
            short.fill(&mut [0; 4]),
            Fill::Fault(FrameFault::TooLarge { limit: 4 })
        );
        assert_eq!(short.fill(&mut [0; 8]), Fill::End);
    }

    #[test]
    fn concatenated_jpegs_split_exactly() {
        let images = [jpeg(16, 10), jpeg(40, 200), jpeg(8, 90)];
        let stream = images.concat();
        let frames = drain(&mut JpegFrames::new(&stream[..]), 1 << 20);
        let frames: Vec<Vec<u8>> = frames.into_iter().map(Result::unwrap).collect();
        assert_eq!(frames, images);
    }

    #[test]
    fn damage_costs_one_frame_each() {
        let (a, b, c) = (jpeg(32, 10), jpeg(32, 120), jpeg(32, 240));
        // Junk before the first image, an image cut short by the next one, a cut-off tail.
        let mut stream = b"junk!".to_vec();
        stream.extend_from_slice(&a);
        stream.extend_from_slice(&b[..b.len() - 100]);
        stream.extend_from_slice(&c);
        stream.extend_from_slice(&a[..a.len() - 10]);
        let frames = drain(&mut JpegFrames::new(&stream[..]), 1 << 20);
        assert_eq!(frames.len(), 5, "{frames:?}");
        assert_eq!(frames[0], Err(FrameFault::NotJpeg { skipped: 5 }));
        assert_eq!(frames[1], Ok(a.clone()));
        assert!(frames[2].is_err());
        assert_eq!(frames[3], Ok(c));
        assert_eq!(frames[4], Err(FrameFault::TruncatedJpeg));
    }

    #[test]
    fn oversized_images_are_skipped_whole() {
        let (big, small) = (jpeg(64, 30), jpeg(8, 30));
        let stream = [big.clone(), small.clone()].concat();
        let frames = drain(&mut JpegFrames::new(&stream[..]), small.len() + 10);
        assert_eq!(
            frames,
            vec![
                Err(FrameFault::TooLarge {
                    limit: small.len() + 10
                }),
                Ok(small)
            ]
        );
    }
}
