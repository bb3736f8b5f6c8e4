//! Decoding image files into frames, with limits against decompression bombs.

use crate::preprocess::{FrameRef, PixelFormat};
use std::io::Cursor;
use std::path::Path;

/// Largest side we accept: bigger files are refused before the decoder allocates.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Decoder allocation cap (the image crate's own limit, also bounding exotic formats).
pub const MAX_DECODE_BYTES: u64 = 512 * 1024 * 1024;

/// Why an image file could not become a [`DecodedImage`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Io {
        /// The file's path.
        path: String,
        /// The underlying I/O error.
        error: std::io::Error,
    },
    /// The bytes are in no format the decoder knows, or use a feature of one it does not support.
    #[error("not a supported image ({0})")]
    UnknownFormat(String),
    /// The image is damaged or cut short (a JPEG without its end-of-image marker included).
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
    /// The image has a side over [`MAX_IMAGE_SIDE`] or needs more than [`MAX_DECODE_BYTES`].
    #[error("image exceeds the decoding limits ({MAX_IMAGE_SIDE} px per side, {mib} MiB): {0}", mib = MAX_DECODE_BYTES >> 20)]
    TooLarge(String),
    /// The image decoded to no pixels.
    #[error("image is empty ({width}x{height})")]
    Empty {
        /// Decoded width in pixels.
        width: u32,
        /// Decoded height in pixels.
        height: u32,
    },
}

/// An owned decoded frame: 8-bit grey or RGB, tightly packed.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedImage {
    /// Rows top to bottom without padding: `width × height × bytes per pixel` bytes.
    pub pixels: Vec<u8>,
    /// Image width in pixels (never 0).
    pub width: u32,
    /// Image height in pixels (never 0).
    pub height: u32,
    /// [`PixelFormat::Gray8`] for grey images (alpha dropped), [`PixelFormat::Rgb8`] for the rest.
    pub format: PixelFormat,
}

impl DecodedImage {
    /// The image as a packed [`FrameRef`], for the preprocessing.
    pub fn frame(&self) -> FrameRef<'_> {
        FrameRef::packed(&self.pixels, self.width, self.height, self.format)
    }
}

/// Read and decode an image file, as [`decode_bytes`] does.
pub fn decode_file(path: &Path) -> Result<DecodedImage, DecodeError> {
    let bytes = std::fs::read(path).map_err(|error| DecodeError::Io {
        path: path.display().to_string(),
        error,
    })?;
    decode_bytes(&bytes)
}

/// Decode encoded bytes (JPEG, PNG, …). Grey images stay grey, everything else becomes RGB
/// (alpha is dropped).
pub fn decode_bytes(bytes: &[u8]) -> Result<DecodedImage, DecodeError> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(DecodeError::UnknownFormat(
            "unrecognised file signature".into(),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    if reader.format() == Some(image::ImageFormat::Jpeg) && !has_jpeg_end_marker(bytes) {
        // The JPEG decoder pads a cut-off stream with grey instead of failing.
        return Err(DecodeError::Corrupt(
            "truncated JPEG (no end-of-image marker)".into(),
        ));
    }
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => DecodeError::TooLarge(one_line(l)),
        image::ImageError::Unsupported(u) => DecodeError::UnknownFormat(one_line(u)),
        other => DecodeError::Corrupt(one_line(other)),
    })?;
    let (width, height) = (image.width(), image.height());
    if width == 0 || height == 0 {
        return Err(DecodeError::Empty { width, height });
    }
    let grey = matches!(
        image.color(),
        image::ColorType::L8
            | image::ColorType::La8
            | image::ColorType::L16
            | image::ColorType::La16
    );
    let (pixels, format) = if grey {
        (image.into_luma8().into_raw(), PixelFormat::Gray8)
    } else {
        (image.into_rgb8().into_raw(), PixelFormat::Rgb8)
    };
    Ok(DecodedImage {
        pixels,
        width,
        height,
        format,
    })
}

/// Decoder messages sometimes span lines; errors here are one line each.
fn one_line(message: impl ToString) -> String {
    message
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A complete JPEG ends with FF D9, possibly followed by a little padding.
fn has_jpeg_end_marker(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, grey: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let encoder = image::codecs::png::PngEncoder::new(&mut out);
        let (color, bpp) = if grey {
            (image::ExtendedColorType::L8, 1)
        } else {
            (image::ExtendedColorType::Rgb8, 3)
        };
        let pixels = vec![128u8; (width * height * bpp) as usize];
        image::ImageEncoder::write_image(encoder, &pixels, width, height, color).unwrap();
        out
    }

    #[test]
    fn grey_stays_grey_and_colour_becomes_rgb() {
        let grey = decode_bytes(&png(3, 2, true)).unwrap();
        assert_eq!(
            (grey.width, grey.height, grey.format, grey.pixels.len()),
            (3, 2, PixelFormat::Gray8, 6)
        );
        let rgb = decode_bytes(&png(3, 2, false)).unwrap();
        assert_eq!((rgb.format, rgb.pixels.len()), (PixelFormat::Rgb8, 18));
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(matches!(
            decode_bytes(b"definitely not an image"),
            Err(DecodeError::UnknownFormat(_))
        ));
        let full = png(16, 16, false);
        let cut = &full[..full.len() / 2];
        assert!(matches!(decode_bytes(cut), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn truncated_jpegs_are_errors() {
        let mut jpeg = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new(&mut jpeg);
        image::ImageEncoder::write_image(
            encoder,
            &[90u8; 64 * 64 * 3],
            64,
            64,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        assert!(decode_bytes(&jpeg).is_ok());
        let cut = &jpeg[..jpeg.len() - 40];
        assert!(
            matches!(decode_bytes(cut), Err(DecodeError::Corrupt(m)) if m.contains("truncated"))
        );
    }

    #[test]
    fn decompression_bombs_are_refused_from_the_header() {
        // A valid PNG header claiming 100000x100000 pixels: refused before any allocation.
        let mut bomb = png(1, 1, true);
        // IHDR width/height live at bytes 16..24; the CRC no longer matches, so patch it too.
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        assert!(
            matches!(decode_bytes(&bomb), Err(DecodeError::TooLarge(_))),
            "{:?}",
            decode_bytes(&bomb)
        );
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
