//! Concatenated JPEGs (MJPEG) split from any bytes arriving in pieces of any size: the splitter
//! terminates, stays within its buffer, and every frame it returns is one whole SOI…EOI image.
#![no_main]

mod common;

use common::Pieces;
use libfuzzer_sys::fuzz_target;
use runtime::frame_source::{Fill, FrameSource, JpegFrames};

fuzz_target!(|data: &[u8]| {
    let Some(([limit, piece], stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut source = JpegFrames::new(Pieces {
        data: stream,
        piece: 1 + usize::from(*piece),
    });
    let mut buffer = vec![0u8; 4 + usize::from(*limit) * 16];
    // Each fill consumes input, so there are never more results than bytes (plus the end).
    for _ in 0..=stream.len() + 1 {
        match source.fill(&mut buffer) {
            Fill::Frame(n) => {
                assert!(n >= 4 && n <= buffer.len());
                assert_eq!(buffer[..2], [0xFF, 0xD8], "starts with SOI");
                assert_eq!(buffer[n - 2..n], [0xFF, 0xD9], "ends with EOI");
            }
            Fill::Fault(_) => {}
            Fill::End => return,
        }
    }
    panic!(
        "the splitter did not reach the end of {} bytes",
        stream.len()
    );
});
