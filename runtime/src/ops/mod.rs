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
pub mod dense;
pub mod layer_norm;
mod patterns;
mod rows;
pub mod softmax;
#[cfg(feature = "threads")]
mod team;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;

/// f32 values whose first is on a 64-byte boundary (a cache line, an AVX-512 vector), so no
/// vector load of a whole panel row straddles two lines.
#[derive(Debug)]
pub(crate) struct AlignedBuffer {
    storage: Vec<f32>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    pub(crate) fn zeroed(len: usize) -> AlignedBuffer {
        let storage = vec![0f32; len + ALIGN_FLOATS];
        let start = aligned_start(&storage);
        AlignedBuffer {
            storage,
            start,
            len,
        }
    }
}

/// A 64-byte boundary in floats.
const ALIGN_FLOATS: usize = 64 / size_of::<f32>();

/// The index of the first value of `storage` on a 64-byte boundary (at most [`ALIGN_FLOATS`]
/// - 1, since the values are 4-byte aligned).
fn aligned_start(storage: &[f32]) -> usize {
    storage
        .as_ptr()
        .align_offset(ALIGN_FLOATS * size_of::<f32>())
        .min(ALIGN_FLOATS)
}

/// `len` values of a reused `buffer` from a 64-byte boundary, as [`AlignedBuffer`] holds
/// them; the buffer grows to hold them and otherwise keeps what it held.
pub(crate) fn aligned(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len + ALIGN_FLOATS {
        buffer.resize(len + ALIGN_FLOATS, 0.0);
    }
    let start = aligned_start(buffer);
    &mut buffer[start..][..len]
}

impl Deref for AlignedBuffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.storage[self.start..][..self.len]
    }
}

impl DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.storage[self.start..][..self.len]
    }
}

impl Clone for AlignedBuffer {
    /// A copy in a new allocation, aligned anew.
    fn clone(&self) -> AlignedBuffer {
        let mut copy = AlignedBuffer::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl PartialEq for AlignedBuffer {
    fn eq(&self, other: &AlignedBuffer) -> bool {
        **self == **other
    }
}

/// The environment variable that forces a kernel instruction set when no option does.
pub const ISA_VARIABLE: &str = "RUNTIME_ISA";

/// An instruction set the operators have kernels for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, as the compiler vectorises it for the build's target.
    Portable,
    /// aarch64 NEON (Advanced SIMD, part of every aarch64 core): 4 f32 lanes, 32 registers.
    Neon,
    /// x86-64 with AVX2 and FMA: 8 f32 lanes, 16 vector registers.
    Avx2,
    /// x86-64 with AVX-512F: 16 f32 lanes, 32 vector registers.
    Avx512,
}

impl Isa {
    /// Every instruction set, lowest first (x86's after ARM's: a CPU runs one or the other).
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Neon, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU runs the instruction set's kernels.
    pub fn runs_here(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Neon => cfg!(target_arch = "aarch64"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    /// The instruction sets this CPU runs, lowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.runs_here()).collect()
    }

    /// The kernel a row operator (the softmax, the LayerNorm) runs where `self` is the best:
    /// rows of a few hundred values are memory-bound, so AVX-512 runs the AVX2 kernel, and
    /// aarch64 the portable one (which the compiler vectorises with NEON).
    pub(crate) fn for_rows(self) -> Isa {
        match self {
            Isa::Avx2 | Isa::Avx512 => Isa::Avx2,
            Isa::Portable | Isa::Neon => Isa::Portable,
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

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IsaError {
    #[error("unknown kernel instruction set {0:?} (portable, neon, avx2 or avx512)")]
    Unknown(String),
    #[error("this CPU cannot run the {0} kernels; it runs {list}", list = names(&Isa::available()))]
    NotHere(Isa),
}

fn names(isas: &[Isa]) -> String {
    isas.iter()
        .map(|isa| isa.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

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
