//! AVX-512F arithmetic the operators' kernels share: the block product that keeps a block of
//! sums in registers, and e^x and GELU on 16 lanes (the same formulas as the portable
//! kernels', so every kernel gives the same answers to rounding).

use std::arch::x86_64::*;

/// f32 lanes of a vector.
pub(crate) const LANES: usize = 16;

/// `acc[r][v] += Σ_j rows[r][j] · panel[j][v]` for `j < len`, where a panel row is `V`
/// vectors. Each panel row loaded feeds all `R` rows; with `R · V` accumulators (24 of the 32
/// registers at 12 × 2) the loads stay well under the two FMAs a cycle.
///
/// # Safety
/// Each `rows[r]` is readable for `len` values and `panel` for `len · V · LANES`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn rows_times_panel<const R: usize, const V: usize>(
    rows: &[*const f32; R],
    len: usize,
    panel: *const f32,
    acc: &mut [[__m512; V]; R],
) {
    for j in 0..len {
        let mut p = [_mm512_setzero_ps(); V];
        for (v, p) in p.iter_mut().enumerate() {
            // SAFETY: within the panel (see above).
            *p = unsafe { _mm512_loadu_ps(panel.add((j * V + v) * LANES)) };
        }
        for r in 0..R {
            // SAFETY: within the row (see above).
            let a = _mm512_set1_ps(unsafe { *rows[r].add(j) });
            for v in 0..V {
                acc[r][v] = _mm512_fmadd_ps(a, p[v], acc[r][v]);
            }
        }
    }
}

/// The lanes below `n` (all for `n ≥ 16`).
#[inline]
pub(crate) fn first_lanes(n: usize) -> __mmask16 {
    if n >= LANES {
        !0
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// e^x for x ≤ 0: `softmax::exp_non_positive` on 16 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn exp_non_positive(x: __m512) -> __m512 {
    const ROUNDER: f32 = 12_582_912.0;
    // In this order a NaN lane stays NaN (vmaxps returns its second operand on NaN).
    let x = _mm512_max_ps(_mm512_set1_ps(-87.0), x);
    let rounder = _mm512_set1_ps(ROUNDER);
    let shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), rounder);
    let k = _mm512_sub_ps(shifted, rounder);
    let exponent = _mm512_sub_epi32(
        _mm512_castps_si512(shifted),
        _mm512_set1_epi32(ROUNDER.to_bits() as i32),
    );
    let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-0.693_359_4), x);
    let r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e_r = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let two_to_k = _mm512_slli_epi32::<23>(_mm512_add_epi32(exponent, _mm512_set1_epi32(127)));
    _mm512_mul_ps(e_r, _mm512_castsi512_ps(two_to_k))
}

/// GELU in its erf form: `dense::gelu` on 16 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::excessive_precision)]
pub(crate) fn gelu(x: __m512) -> __m512 {
    // erf(z) rounds to 1 from z = 4 on; past z ≈ 13 p^16 would overflow, and the Newton step
    // below would turn 0 · ∞ into NaN.
    let z = _mm512_min_ps(
        _mm512_abs_ps(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        )),
        _mm512_set1_ps(6.0),
    );
    let mut p = _mm512_set1_ps(0.0000430638);
    for c in [
        0.0002765672,
        0.0001520143,
        0.0092705272,
        0.0422820123,
        0.0705230784,
        1.0,
    ] {
        p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(c));
    }
    let p2 = _mm512_mul_ps(p, p);
    let p4 = _mm512_mul_ps(p2, p2);
    let p8 = _mm512_mul_ps(p4, p4);
    let one = _mm512_set1_ps(1.0);
    // 1 / p^16 from the 14-bit reciprocal estimate and one Newton step (a division costs
    // several times more on 16 lanes).
    let p16 = _mm512_mul_ps(p8, p8);
    let estimate = _mm512_rcp14_ps(p16);
    let reciprocal = _mm512_mul_ps(
        estimate,
        _mm512_fnmadd_ps(p16, estimate, _mm512_set1_ps(2.0)),
    );
    let erf_size = _mm512_sub_ps(one, reciprocal);
    let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
    let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_size), sign));
    _mm512_mul_ps(
        _mm512_mul_ps(_mm512_set1_ps(0.5), x),
        _mm512_add_ps(one, erf),
    )
}
