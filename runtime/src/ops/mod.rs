//! The runtime's own operators, which replace tract's in the graphs it loads, and the choice
//! of the kernels they run: one per instruction set, picked once when a model loads.
//!
//! Each operator has a portable kernel (plain Rust, vectorised by the compiler) and kernels
//! for the instruction sets where a hand-written one pays; a kernel lives beside its operator
//! (`dense/avx512.rs`), the vector arithmetic operators share in this folder (`avx512.rs`).
//! [`Isa::choose`] takes the best this CPU runs, or a lower one asked for with `--isa` or
//! the `RUNTIME_ISA` environment variable, so one machine tests every x86 path.

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod conv;
pub mod dense;
pub mod dense_int8;
pub mod layer_norm;
mod patterns;
mod rows;
pub mod softmax;
#[cfg(feature = "threads")]
mod team;

use std::cell::RefCell;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::thread::LocalKey;

/// Whether `tensor`'s values lie in row-major order with no gaps. Strides of axes of length 1
/// do not matter: tract leaves them as they were (a `[1, 1, 16]` reduced from a larger tensor
/// may keep strides `[16, 1, 1]`).
pub(crate) fn is_row_major(tensor: &tract_onnx::prelude::Tensor) -> bool {
    row_major_layout(tensor.shape(), tensor.strides())
}

fn row_major_layout(shape: &[usize], strides: &[isize]) -> bool {
    let mut expected = 1isize;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim > 1 && stride != expected {
            return false;
        }
        expected *= dim as isize;
    }
    true
}

/// Values whose first is on a 64-byte boundary (a cache line, an AVX-512 vector), so no
/// vector load of a whole panel row straddles two lines.
#[derive(Debug)]
pub(crate) struct AlignedBuffer<T = f32> {
    storage: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> AlignedBuffer<T> {
    pub(crate) fn zeroed(len: usize) -> AlignedBuffer<T> {
        let storage = vec![T::default(); len + align_len::<T>()];
        let start = aligned_start(&storage);
        AlignedBuffer {
            storage,
            start,
            len,
        }
    }
}

/// A 64-byte boundary in values of `T`.
const fn align_len<T>() -> usize {
    64 / size_of::<T>()
}

/// The index of the first value of `storage` on a 64-byte boundary (below [`align_len`],
/// since the values are aligned to their own size).
fn aligned_start<T>(storage: &[T]) -> usize {
    storage.as_ptr().align_offset(64).min(align_len::<T>())
}

/// `len` values of a reused `buffer` from a 64-byte boundary, as [`AlignedBuffer`] holds
/// them; the buffer grows to hold them and otherwise keeps what it held.
pub(crate) fn aligned<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len + align_len::<T>() {
        buffer.resize(len + align_len::<T>(), T::default());
    }
    let start = aligned_start(buffer);
    &mut buffer[start..][..len]
}

/// `f` on this thread's `buffer`, or on a fresh one if an evaluation on this thread already
/// holds it (a thread waiting in the pool can be handed another model's work).
pub(crate) fn with_buffer<T: 'static, R>(
    buffer: &'static LocalKey<RefCell<Vec<T>>>,
    f: impl FnOnce(&mut Vec<T>) -> R,
) -> R {
    buffer.with(|cell| match cell.try_borrow_mut() {
        Ok(mut reused) => f(&mut reused),
        Err(_) => f(&mut Vec::new()),
    })
}

impl<T> Deref for AlignedBuffer<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.storage[self.start..][..self.len]
    }
}

impl<T> DerefMut for AlignedBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.storage[self.start..][..self.len]
    }
}

impl<T: Copy + Default> Clone for AlignedBuffer<T> {
    /// A copy in a new allocation, aligned anew.
    fn clone(&self) -> AlignedBuffer<T> {
        let mut copy = AlignedBuffer::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl<T: PartialEq> PartialEq for AlignedBuffer<T> {
    fn eq(&self, other: &AlignedBuffer<T>) -> bool {
        **self == **other
    }
}

/// The environment variable that forces a kernel instruction set when no option does.
pub const ISA_VARIABLE: &str = "RUNTIME_ISA";

/// An instruction set the operators have kernels for. The `…Vnni` and `NeonDot` sets add
/// int8 dot products to the one below them: the int8 operator's kernels use them, the f32
/// operators run the kernels of the set below ([`Isa::float`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, as the compiler vectorises it for the build's target.
    Portable,
    /// aarch64 NEON (Advanced SIMD, part of every aarch64 core): 4 f32 lanes, 32 registers.
    Neon,
    /// NEON with SDOT (Cortex-A76 and later: Pi 5, Jetson Orin).
    NeonDot,
    /// x86-64 with AVX2 and FMA: 8 f32 lanes, 16 vector registers.
    Avx2,
    /// AVX2 with AVX-VNNI's `vpdpbusd` on 256 bits (Alder Lake and later, Zen 4 and later).
    AvxVnni,
    /// x86-64 with AVX-512F and BW: 16 f32 lanes, 32 vector registers.
    Avx512,
    /// AVX-512 with VNNI's `vpdpbusd` (Ice Lake, Sapphire Rapids, Zen 4).
    Avx512Vnni,
}

impl Isa {
    /// Every instruction set, lowest first (x86's after ARM's: a CPU runs one or the other).
    pub const ALL: [Isa; 7] = [
        Isa::Portable,
        Isa::Neon,
        Isa::NeonDot,
        Isa::Avx2,
        Isa::AvxVnni,
        Isa::Avx512,
        Isa::Avx512Vnni,
    ];

    /// The name `--isa`, `RUNTIME_ISA` and reports use (`avx2`, `neon-dot`, …).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dot",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// The instruction set of the f32 kernels where `self` is the best: the int8 dot
    /// products add nothing to them.
    pub fn float(self) -> Isa {
        match self {
            Isa::NeonDot => Isa::Neon,
            Isa::AvxVnni => Isa::Avx2,
            Isa::Avx512Vnni => Isa::Avx512,
            other => other,
        }
    }

    /// Whether this CPU runs the instruction set's kernels.
    pub fn runs_here(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Neon => cfg!(target_arch = "aarch64"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Isa::Avx2.runs_here() && std::arch::is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx512.runs_here() && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::AvxVnni | Isa::Avx512 | Isa::Avx512Vnni => false,
            #[cfg(not(target_arch = "aarch64"))]
            Isa::NeonDot => false,
        }
    }

    /// The instruction sets this CPU runs, lowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.runs_here()).collect()
    }

    /// The f32 kernels' instruction sets this CPU runs, lowest first.
    #[cfg(test)]
    pub(crate) fn available_float() -> Vec<Isa> {
        let mut float: Vec<Isa> = Isa::available().into_iter().map(Isa::float).collect();
        float.dedup();
        float
    }

    /// The kernel a row operator (the softmax, the LayerNorm) runs where `self` is the best:
    /// rows of a few hundred values are memory-bound, so AVX-512 runs the AVX2 kernel, and
    /// aarch64 the portable one (which the compiler vectorises with NEON).
    pub(crate) fn for_rows(self) -> Isa {
        match self.float() {
            Isa::Avx2 | Isa::Avx512 => Isa::Avx2,
            _ => Isa::Portable,
        }
    }

    /// The best instruction set this CPU runs.
    pub fn best() -> Isa {
        Isa::available().pop().unwrap_or(Isa::Portable)
    }

    /// `requested`, else the one `RUNTIME_ISA` names, else the best this CPU runs; an error if
    /// the CPU cannot run the one asked for. The flag says whether it was asked for.
    pub fn choose(requested: Option<Isa>) -> Result<(Isa, bool), IsaError> {
        let requested = match requested {
            Some(isa) => Some(isa),
            None => match std::env::var(ISA_VARIABLE) {
                Ok(name) if !name.is_empty() => Some(name.parse()?),
                _ => None,
            },
        };
        match requested {
            Some(isa) if isa.runs_here() => Ok((isa, true)),
            Some(isa) => Err(IsaError::NotHere(isa)),
            None => Ok((Isa::best(), false)),
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Isa {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = IsaError;

    fn from_str(name: &str) -> Result<Isa, IsaError> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| IsaError::Unknown(name.to_string()))
    }
}

/// Why an instruction set cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IsaError {
    /// The name (from `--isa` or `RUNTIME_ISA`) is none of [`Isa::ALL`]'s.
    #[error("unknown kernel instruction set {0:?} ({list})", list = names(&Isa::ALL))]
    Unknown(String),
    /// This CPU lacks the instruction set asked for.
    #[error("this CPU cannot run the {0} kernels; it runs {list}", list = names(&Isa::available()))]
    NotHere(Isa),
}

fn names(isas: &[Isa]) -> String {
    isas.iter()
        .map(|isa| isa.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inputs for the operators' tests (seeded, and random for proptest), shared by their modules.
#[cfg(test)]
pub(crate) mod properties {
    use proptest::prelude::*;
    use tract_onnx::tract_core::internal::*;

    /// `len` values in [-4, 4); with `specials`, now and then NaN, +∞ or −∞ among them.
    pub fn values(len: usize, specials: bool) -> impl Strategy<Value = Vec<f32>> {
        let rare = u32::from(specials);
        let value = prop_oneof![
            200 => -4.0f32..4.0,
            rare => Just(f32::NAN),
            rare => Just(f32::INFINITY),
            rare => Just(f32::NEG_INFINITY),
        ];
        prop::collection::vec(value, len)
    }

    /// The output of `model` on `inputs`: its shape and values.
    pub fn run_model(model: TypedModel, inputs: &TVec<TValue>) -> (Vec<usize>, Vec<f32>) {
        let plan = model.into_runnable().unwrap();
        let output = plan.run(inputs.clone()).unwrap()[0].clone().into_tensor();
        let values = output
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec();
        (output.shape().to_vec(), values)
    }

    /// `len` values in [-1, 1] from `seed` (xorshift): the same inputs on every run, for the
    /// kernels' tests against their definitions.
    pub fn seeded(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `got` against the definition's double-precision `want`: within `tolerance` where
    /// `want` is finite, and not finite where it is not (NaN in, NaN out: never a confident
    /// number from a corrupt input).
    pub fn agrees(got: f32, want: f64, tolerance: f64) -> bool {
        match want.is_finite() {
            true => (got as f64 - want).abs() <= tolerance,
            false => !got.is_finite(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_ignores_the_strides_of_single_axes_only() {
        assert!(row_major_layout(&[1, 1, 16], &[16, 16, 1]));
        // A [1, 1, 16] reduced from a larger tensor, with its leftover stride.
        assert!(row_major_layout(&[1, 1, 16], &[16, 1, 1]));
        // A transposed [2, 3], and a [2, 3] with a gap after each row: not row-major.
        assert!(!row_major_layout(&[2, 3], &[1, 2]));
        assert!(!row_major_layout(&[2, 3], &[4, 1]));
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
        }
        assert_eq!("AVX512".parse::<Isa>(), Ok(Isa::Avx512));
        assert!(matches!("sse9".parse::<Isa>(), Err(IsaError::Unknown(_))));
    }

    #[test]
    fn a_lower_instruction_set_can_be_forced_and_an_absent_one_cannot() {
        assert_eq!(Isa::choose(Some(Isa::Portable)), Ok((Isa::Portable, true)));
        assert!(Isa::available().contains(&Isa::best()));
        for isa in Isa::ALL {
            let chosen = Isa::choose(Some(isa));
            if isa.runs_here() {
                assert_eq!(chosen, Ok((isa, true)));
            } else {
                assert_eq!(chosen, Err(IsaError::NotHere(isa)));
                assert!(chosen.unwrap_err().to_string().contains("portable"));
            }
        }
    }
}
