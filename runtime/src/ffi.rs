//! The C ABI (`runtime/include/vit_runtime.h`): a classifier handle for C and C++ camera code.
//!
//! Every function catches panics and reports failure through its return value; the reason is
//! kept per thread for `vit_last_error`. Nothing allocates per frame.

use crate::classifier::Classifier;
use crate::model::{Model, ModelOptions};
use crate::preprocess::{FrameRef, PixelFormat};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::path::Path;

/// An opaque classifier and its labels as C strings.
pub struct VitClassifier {
    classifier: Classifier,
    labels: Vec<CString>,
}

/// One prediction, as `vit_classify` writes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VitPrediction {
    /// Index of the class in the model's output order; `vit_label` names it.
    pub class_index: usize,
    /// Softmax probability of the class, in [0, 1].
    pub probability: f32,
}

/// `format` of [`vit_classify`]: 8-bit grey, one byte per pixel.
pub const VIT_GRAY8: c_int = 0;
/// `format` of [`vit_classify`]: 8-bit RGB, three bytes per pixel.
pub const VIT_RGB8: c_int = 1;
/// `format` of [`vit_classify`]: 8-bit BGR (OpenCV's default order), three bytes per pixel.
pub const VIT_BGR8: c_int = 2;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: String) {
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

/// Run `body`, turning an error or a panic into `failed` and a message for `vit_last_error`.
fn guarded<T>(failed: T, body: impl FnOnce() -> Result<T, String>) -> T {
    match crate::catch_panic(body) {
        Ok(Ok(value)) => value,
        Ok(Err(message)) => {
            set_error(message);
            failed
        }
        Err(panic) => {
            set_error(format!("internal error (panic) in the runtime: {panic}"));
            failed
        }
    }
}

fn new_classifier(model: Model, top_k: usize) -> Result<*mut VitClassifier, String> {
    let labels = model
        .labels
        .iter()
        .map(|l| CString::new(l.replace('\0', " ")).unwrap_or_default())
        .collect();
    let classifier = Classifier::new(model, top_k).map_err(|e| e.to_string())?;
    Ok(Box::into_raw(Box::new(VitClassifier {
        classifier,
        labels,
    })))
}

/// Load an ONNX model with `vit.*` metadata. `model_path` NULL: the embedded default model.
/// `threads`: cores for matrix products (0 one per physical core, 1 the calling thread;
/// process-wide; a build without the `threads` feature takes 0 or 1).
/// Returns NULL on failure.
///
/// # Safety
/// `model_path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vit_classifier_new(
    model_path: *const c_char,
    top_k: usize,
    threads: usize,
) -> *mut VitClassifier {
    guarded(std::ptr::null_mut(), || {
        crate::set_threads(threads).map_err(|e| e.to_string())?;
        let options = ModelOptions::default();
        let model = if model_path.is_null() {
            let bytes = crate::embedded::DEFAULT_MODEL
                .ok_or("this build has no embedded model: pass a model path")?;
            Model::from_bytes(bytes, &options)
        } else {
            // SAFETY: the caller passes a NUL-terminated string.
            let path = unsafe { CStr::from_ptr(model_path) }
                .to_str()
                .map_err(|_| "the model path is not UTF-8")?;
            Model::load(Path::new(path), &options)
        }
        .map_err(|e| e.to_string())?;
        new_classifier(model, top_k)
    })
}

/// Classify one frame of `width`×`height` pixels, rows `stride` bytes apart, in `format`
/// (`VIT_GRAY8`, `VIT_RGB8`, `VIT_BGR8`). Writes up to `capacity` predictions, best first, to
/// `out` and their number to `written`. Returns 0, or -1 on failure.
///
/// # Safety
/// `classifier` comes from `vit_classifier_new`; `pixels` holds `stride × (height - 1)` plus
/// one row of bytes; `out` has room for `capacity` predictions; `written` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vit_classify(
    classifier: *mut VitClassifier,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
    format: c_int,
    out: *mut VitPrediction,
    capacity: usize,
    written: *mut usize,
) -> c_int {
    guarded(-1, || {
        if classifier.is_null() || pixels.is_null() || out.is_null() || written.is_null() {
            return Err("a NULL pointer was passed to vit_classify".into());
        }
        let format = match format {
            VIT_GRAY8 => PixelFormat::Gray8,
            VIT_RGB8 => PixelFormat::Rgb8,
            VIT_BGR8 => PixelFormat::Bgr8,
            other => return Err(format!("unknown pixel format {other}")),
        };
        let len =
            FrameRef::required_bytes(width, height, stride, format).map_err(|e| e.to_string())?;
        if (pixels as usize).checked_add(len).is_none() {
            return Err("the pixel buffer would end beyond the address space".into());
        }
        if !out.is_aligned() {
            return Err("out is not aligned for VitPrediction".into());
        }
        // At most MAX_TOP_K predictions are written, so a larger capacity (SIZE_MAX, say)
        // promises nothing more: the slice never claims more than that.
        let capacity = capacity.min(crate::MAX_TOP_K);
        // SAFETY: the caller guarantees the handle, that `pixels` holds `len` bytes (the
        // documented `stride × (height - 1)` plus one row, computed without overflow above)
        // and that `out` has room for `capacity` predictions.
        let (vit, data, out) = unsafe {
            (
                &mut *classifier,
                std::slice::from_raw_parts(pixels, len),
                std::slice::from_raw_parts_mut(out, capacity),
            )
        };
        let frame = FrameRef {
            data,
            width,
            height,
            stride,
            format,
        };
        let top = vit
            .classifier
            .classify_frame(&frame)
            .map_err(|e| e.to_string())?;
        let n = top.len().min(capacity);
        for (slot, p) in out.iter_mut().zip(top.iter()) {
            *slot = VitPrediction {
                class_index: p.class,
                probability: p.probability,
            };
        }
        // SAFETY: checked non-NULL above.
        unsafe { *written = n };
        Ok(0)
    })
}

/// Number of classes of the model.
///
/// # Safety
/// `classifier` comes from `vit_classifier_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vit_class_count(classifier: *const VitClassifier) -> usize {
    // SAFETY: the caller passes a live handle or NULL.
    unsafe { classifier.as_ref() }.map_or(0, |vit| vit.labels.len())
}

/// Name of a class, NUL-terminated, valid until the classifier is freed; NULL when out of range.
///
/// # Safety
/// `classifier` comes from `vit_classifier_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vit_label(
    classifier: *const VitClassifier,
    class_index: usize,
) -> *const c_char {
    // SAFETY: the caller passes a live handle or NULL.
    unsafe { classifier.as_ref() }
        .and_then(|vit| vit.labels.get(class_index))
        .map_or(std::ptr::null(), |label| label.as_ptr())
}

/// Why the last failing call on this thread failed; valid until the next failure on it.
#[unsafe(no_mangle)]
pub extern "C" fn vit_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// Free a classifier (NULL is ignored).
///
/// # Safety
/// `classifier` comes from `vit_classifier_new` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vit_classifier_free(classifier: *mut VitClassifier) {
    if !classifier.is_null() {
        // SAFETY: the pointer came from Box::into_raw in vit_classifier_new.
        drop(unsafe { Box::from_raw(classifier) });
    }
}
