//! Raw and YUV frames cut from a byte stream that arrives in pieces of any size: every frame
//! is whole, a short tail is one truncation fault, and the stream ends.
#![no_main]

mod common;

use common::Pieces;
use libfuzzer_sys::fuzz_target;
use runtime::frame_source::{Fill, FrameFault, FrameSource, RawFrames};

fuzz_target!(|data: &[u8]| {
    let Some(([size_low, size_high, piece], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let frame_bytes = 1 + usize::from(u16::from_le_bytes([*size_low, *size_high]) % 2048);
    let mut source = RawFrames::new(
        Pieces {
            data: stream,
            piece: 1 + usize::from(*piece),
        },
        frame_bytes,
    );
    let mut buffer = vec![0u8; frame_bytes];
    let (mut frames, mut tail) = (0, 0);
    loop {
        match source.fill(&mut buffer) {
            Fill::Frame(n) => {
                assert_eq!(n, frame_bytes);
                assert_eq!(buffer[..], stream[frames * frame_bytes..][..frame_bytes]);
                frames += 1;
            }
            Fill::Fault(FrameFault::Truncated { got, expected }) => {
                assert_eq!(expected, frame_bytes);
                tail = got;
            }
            Fill::Fault(other) => panic!("unexpected fault {other:?}"),
            Fill::End => break,
        }
    }
    assert_eq!(frames * frame_bytes + tail, stream.len());
    assert_eq!(source.fill(&mut buffer), Fill::End, "the end stays the end");
});
