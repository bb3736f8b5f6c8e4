//! Raw YUV 4:2:0 frames, as ffmpeg (`-pix_fmt yuv420p|nv12`) and V4L2 cameras write them,
//! turned into the 8-bit grey or RGB the preprocessing takes.
//!
//! Samples are BT.601 limited range (luma 16–235), ffmpeg's default for raw video. Chroma planes
//! are `⌈w/2⌉×⌈h/2⌉`; yuv420p stores U then V planes, nv12 one plane of interleaved U,V pairs.

/// How the two chroma planes follow the luma plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChromaLayout {
    /// yuv420p / I420: a U plane, then a V plane.
    Planar,
    /// NV12: one plane of U,V pairs.
    SemiPlanar,
}

/// Bytes of one `width`×`height` 4:2:0 frame.
pub fn yuv420_len(width: u32, height: u32) -> usize {
    let (w, h) = (width as usize, height as usize);
    // Saturating: absurd sizes must reach the callers' size checks, not overflow on the way.
    let chroma = w.div_ceil(2).saturating_mul(h.div_ceil(2));
    w.saturating_mul(h).saturating_add(chroma.saturating_mul(2))
}

/// Luma expanded to full range. For BT.601 this is the grey the preprocessing computes from
/// RGB (`0.299 R + 0.587 G + 0.114 B`: the chroma terms cancel), so grey models skip chroma.
pub fn luma_to_gray(frame: &[u8], width: u32, height: u32, out: &mut [u8]) {
    let n = width as usize * height as usize;
    for (g, &y) in out[..n].iter_mut().zip(&frame[..n]) {
        *g = expand_luma(y);
    }
}

fn expand_luma(y: u8) -> u8 {
    ((i32::from(y) - 16) * 255 + 109)
        .div_euclid(219)
        .clamp(0, 255) as u8
}

/// Packed RGB (`width`×`height`×3) of a 4:2:0 frame, chroma repeated over each 2×2 block.
pub fn yuv420_to_rgb(frame: &[u8], width: u32, height: u32, layout: ChromaLayout, out: &mut [u8]) {
    let (w, h) = (width as usize, height as usize);
    let chroma_w = w.div_ceil(2);
    let (luma, chroma) = frame.split_at(w * h);
    let plane = chroma_w * h.div_ceil(2);
    for y in 0..h {
        let luma_row = &luma[y * w..(y + 1) * w];
        let out_row = &mut out[y * w * 3..(y + 1) * w * 3];
        let chroma_row = (y / 2) * chroma_w;
        for (x, (rgb, &l)) in out_row.chunks_exact_mut(3).zip(luma_row).enumerate() {
            let c = chroma_row + x / 2;
            let (u, v) = match layout {
                ChromaLayout::Planar => (chroma[c], chroma[plane + c]),
                ChromaLayout::SemiPlanar => (chroma[2 * c], chroma[2 * c + 1]),
            };
            rgb.copy_from_slice(&bt601_to_rgb(l, u, v));
        }
    }
}

/// The usual fixed-point BT.601 limited-range conversion (8 fractional bits).
fn bt601_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = 298 * (i32::from(y) - 16) + 128;
    let d = i32::from(u) - 128;
    let e = i32::from(v) - 128;
    let clamp = |value: i32| (value >> 8).clamp(0, 255) as u8;
    [
        clamp(c + 409 * e),
        clamp(c - 100 * d - 208 * e),
        clamp(c + 516 * d),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_length_rounds_chroma_up() {
        assert_eq!(yuv420_len(640, 480), 640 * 480 * 3 / 2);
        assert_eq!(yuv420_len(3, 3), 9 + 2 * 2 * 2);
    }

    #[test]
    fn limited_range_luma_spans_black_to_white() {
        assert_eq!([expand_luma(16), expand_luma(235)], [0, 255]);
        assert_eq!([expand_luma(0), expand_luma(255)], [0, 255]);
        assert_eq!(expand_luma(126), 128);
    }

    #[test]
    fn primaries_and_grey_convert_back() {
        // BT.601 limited-range codes of pure red, green, blue and mid grey.
        let cases = [
            ((81, 90, 240), [255, 0, 0]),
            ((145, 54, 34), [0, 255, 0]),
            ((41, 240, 110), [0, 0, 255]),
            ((126, 128, 128), [128, 128, 128]),
        ];
        for ((y, u, v), rgb) in cases {
            let got = bt601_to_rgb(y, u, v);
            for (g, want) in got.iter().zip(rgb) {
                assert!((i32::from(*g) - want).abs() <= 2, "{got:?} vs {rgb:?}");
            }
        }
    }

    #[test]
    fn planar_and_semi_planar_agree() {
        // 4×2 frame: two 2×2 blocks with different chroma.
        let luma = [100u8, 110, 120, 130, 140, 150, 160, 170];
        let (u, v) = ([90u8, 200], [240u8, 60]);
        let planar: Vec<u8> = luma.iter().chain(&u).chain(&v).copied().collect();
        let semi: Vec<u8> = luma
            .iter()
            .copied()
            .chain([u[0], v[0], u[1], v[1]])
            .collect();
        let (mut a, mut b) = ([0u8; 24], [0u8; 24]);
        yuv420_to_rgb(&planar, 4, 2, ChromaLayout::Planar, &mut a);
        yuv420_to_rgb(&semi, 4, 2, ChromaLayout::SemiPlanar, &mut b);
        assert_eq!(a, b);
        assert_eq!(&a[..3], &bt601_to_rgb(100, 90, 240));
        assert_eq!(&a[21..], &bt601_to_rgb(170, 200, 60));
    }

    #[test]
    fn grey_from_luma_matches_grey_from_rgb() {
        // The preprocessing's grey of the converted RGB equals the expanded luma (±1 rounding).
        for (y, u, v) in [
            (81, 90, 240),
            (145, 54, 34),
            (60, 140, 120),
            (200, 100, 150),
        ] {
            let [r, g, b] = bt601_to_rgb(y, u, v).map(f32::from);
            let grey = 0.299 * r + 0.587 * g + 0.114 * b;
            assert!(
                (grey - f32::from(expand_luma(y))).abs() <= 1.5,
                "{y} {u} {v}"
            );
        }
    }
}
