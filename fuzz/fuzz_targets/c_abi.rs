//! `vit_classify` called as careless C code would: any width, height, stride (huge, or a
//! bottom-up image's negative stride), pixel format and capacity, over a real buffer. Calls the
//! contract allows must succeed or fail with -1 and a message; calls whose buffer size overflows
//! must fail. Never a panic across the ABI, never an access outside the buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::ffi::{
    VitClassifier, VitPrediction, vit_classifier_new, vit_classify, vit_last_error,
};
use std::sync::OnceLock;

/// One classifier for the whole run (the embedded model), as a camera program keeps it.
fn classifier() -> *mut VitClassifier {
    static HANDLE: OnceLock<usize> = OnceLock::new();
    *HANDLE.get_or_init(|| {
        // SAFETY: NULL asks for the embedded model.
        let handle = unsafe { vit_classifier_new(std::ptr::null(), 5, 1) };
        assert!(!handle.is_null());
        handle as usize
    }) as *mut VitClassifier
}

fuzz_target!(|data: &[u8]| {
    let Some((head, pixels)) = data.split_first_chunk::<16>() else {
        return;
    };
    let width = u32::from(u16::from_le_bytes([head[0], head[1]])) % 300;
    let height = u32::from(u16::from_le_bytes([head[2], head[3]])) % 300;
    let format = i32::from(head[4] % 4) - i32::from(head[4] >> 7);
    let bytes_per_pixel = if format == 0 { 1 } else { 3 };
    let row = width as usize * bytes_per_pixel;
    let stride = match head[5] % 4 {
        0 => row + usize::from(head[6]),
        1 => 0usize.wrapping_sub(row),
        2 => usize::from_le_bytes(head[8..16].try_into().unwrap()),
        _ => usize::from(head[6]),
    };
    let capacity = match head[7] % 3 {
        0 => usize::from(head[7] % 20),
        1 => usize::MAX,
        _ => usize::MAX / 2 + usize::from(head[6]),
    };
    // What the documented contract asks the buffer to hold, without overflow.
    let needed = (stride as u128) * u128::from(height.saturating_sub(1)) + row as u128;
    let overflows = needed > isize::MAX as u128;
    if !overflows && needed > pixels.len() as u128 {
        return; // the caller would break the contract: nothing to learn
    }
    let mut out = [VitPrediction::default(); 16];
    let mut written = usize::MAX;
    // SAFETY: the handle is live, `pixels` holds what the contract asks when it can be
    // computed, and `out` holds 16 predictions, the most the runtime writes.
    let status = unsafe {
        vit_classify(
            classifier(),
            pixels.as_ptr(),
            width,
            height,
            stride,
            format,
            out.as_mut_ptr(),
            capacity,
            &mut written,
        )
    };
    match status {
        0 => {
            assert!(!overflows);
            assert!(written <= 5 && written <= capacity);
            for prediction in &out[..written] {
                assert!(prediction.class_index < 10);
                assert!((0.0..=1.0).contains(&prediction.probability));
            }
        }
        -1 => {
            // SAFETY: the runtime keeps a NUL-terminated message.
            let message = unsafe { std::ffi::CStr::from_ptr(vit_last_error()) };
            assert!(!message.to_bytes().is_empty());
            assert!(!message.to_string_lossy().contains("panic"), "{message:?}");
        }
        other => panic!("vit_classify returned {other}"),
    }
});
