//! What the runtime's own operators ([`crate::softmax`], [`crate::layer_norm`]) share: rewriting
//! an f32 tensor row by row in place, with the rows spread over tract's threads.

use tract_onnx::tract_core::internal::*;

/// Accumulator lanes: one AVX2 vector of f32 (two NEON vectors), which the compiler keeps in
/// registers when a loop sums into `[f32; LANES]`.
pub(crate) const LANES: usize = 8;

/// `input` (f32, or an error) with `update` applied to chunks of whole `row_len` rows of its
/// row-major storage, in place when nothing else holds the tensor.
pub(crate) fn update_rows(
    input: TValue,
    row_len: usize,
    update: impl Fn(&mut [f32]) + Sync + Send,
) -> TractResult<TValue> {
    let mut output = input.into_tensor();
    {
        let mut plain = output.try_as_plain_ram_mut()?;
        let data = plain.as_slice_mut::<f32>()?;
        let total = data.len();
        tract_linalg::multithread::par_chunks_mut(data, row_len, total, |_, rows| {
            update(rows);
            Ok(())
        })?;
    }
    Ok(output.into_tvalue())
}
