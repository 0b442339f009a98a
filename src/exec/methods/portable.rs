//! `exp` and `ln` built from IEEE-754 binary64 basic operations only (+, −, ×, ÷, each
//! rounded to nearest even, never fused) and bit manipulation. Platform libms differ in
//! their last bits and WGSL has no f64, so arcee_fusion's KL divergence is defined through
//! these two: `shaders/f64.wgsl` implements the same steps on its software binary64 and
//! gives the same bits on any GPU. Both stay within a few ulps of the true values (tested
//! against the standard library).
//!
//! The constants are bit patterns because `shaders/f64.wgsl` spells them the same way.

/// 1.5·2^52: `t + MAGIC` rounds `t` (|t| < 2^51) to an integer held in the low word.
const MAGIC: u64 = 0x4338_0000_0000_0000;
const LOG2_E: u64 = 0x3ff7_1547_652b_82fe;
/// ln 2 split so that `k·LN2_HI` is exact for |k| < 2^11 (fdlibm's split).
const LN2_HI: u64 = 0x3fe6_2e42_fee0_0000;
const LN2_LO: u64 = 0x3dea_39ef_3579_3c76;
/// Below this `exp` is 0: the result would leave the normal range, where the software
/// binary64 stops.
const EXP_MIN: u64 = 0xc086_2000_0000_0000; // −708
/// Above this `exp` is +inf.
const EXP_MAX: u64 = 0x4086_2800_0000_0000; // 709
/// `1/k!`, k = 0..=13: the Taylor series of `exp` on |r| <= ln2/2 (truncation < 2^-57).
const EXP_COEFFS: [u64; 14] = [
    0x3ff0_0000_0000_0000,
    0x3ff0_0000_0000_0000,
    0x3fe0_0000_0000_0000,
    0x3fc5_5555_5555_5555,
    0x3fa5_5555_5555_5555,
    0x3f81_1111_1111_1111,
    0x3f56_c16c_16c1_6c17,
    0x3f2a_01a0_1a01_a01a,
    0x3efa_01a0_1a01_a01a,
    0x3ec7_1de3_a556_c734,
    0x3e92_7e4f_b778_9f5c,
    0x3e5a_e645_67f5_44e4,
    0x3e21_eed8_eff8_d898,
    0x3de6_1246_13a8_6d09,
];
/// The fraction bits of √2: mantissas above it are halved so that `m ∈ [√½, √2]`.
const SQRT2_FRACTION: u64 = 0x0006_a09e_667f_3bcd;
/// `1/(2k+1)`, k = 0..=10: `ln m = 2s·Σ s^2k/(2k+1)` with `s = (m−1)/(m+1)`, |s| <= 0.1716
/// (truncation < 2^-60).
const LN_COEFFS: [u64; 11] = [
    0x3ff0_0000_0000_0000,
    0x3fd5_5555_5555_5555,
    0x3fc9_9999_9999_999a,
    0x3fc2_4924_9249_2492,
    0x3fbc_71c7_1c71_c71c,
    0x3fb7_45d1_745d_1746,
    0x3fb3_b13b_13b1_3b14,
    0x3fb1_1111_1111_1111,
    0x3fae_1e1e_1e1e_1e1e,
    0x3faa_f286_bca1_af28,
    0x3fa8_6186_1861_8618,
];

fn c(bits: u64) -> f64 {
    f64::from_bits(bits)
}

/// `e^x`: NaN for NaN, 0 below −708, +inf above 709, otherwise
/// `2^k · P(x − k·ln2)` with `k = round(x·log2 e)` and `P` the degree-13 Taylor polynomial.
pub(crate) fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < c(EXP_MIN) {
        return 0.0;
    }
    if x > c(EXP_MAX) {
        return f64::INFINITY;
    }
    let shifted = x * c(LOG2_E) + c(MAGIC);
    // The low word of `shifted` is k in two's complement (|k| <= 1023).
    let k = shifted.to_bits() as u32 as i32;
    let kf = shifted - c(MAGIC);
    let r = (x - kf * c(LN2_HI)) - kf * c(LN2_LO);
    let mut p = c(EXP_COEFFS[13]);
    for &coeff in EXP_COEFFS[..13].iter().rev() {
        p = p * r + c(coeff);
    }
    // 2^k is exact and normal (−1022 <= k <= 1023 in the range above).
    p * f64::from_bits(((k + 1023) as u64) << 52)
}

/// `ln y`: NaN for NaN and negative `y`, −inf for zero and for subnormal `y` (which
/// arcee_fusion never produces), +inf for +inf, otherwise
/// `e·ln2 + ln m` with `y = m·2^e`, `m ∈ [√½, √2]`.
pub(crate) fn ln(y: f64) -> f64 {
    if y == 0.0 {
        return f64::NEG_INFINITY;
    }
    if y.is_nan() || y < 0.0 {
        return f64::NAN;
    }
    if y == f64::INFINITY {
        return y;
    }
    let bits = y.to_bits();
    let field = (bits >> 52) as i32;
    if field == 0 {
        return f64::NEG_INFINITY;
    }
    let fraction = bits & ((1 << 52) - 1);
    let (m, e) = if fraction > SQRT2_FRACTION {
        (f64::from_bits(fraction | (1022 << 52)), field - 1022)
    } else {
        (f64::from_bits(fraction | (1023 << 52)), field - 1023)
    };
    // Exact: m ∈ [0.7, 1.5) (Sterbenz).
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut r = c(LN_COEFFS[10]);
    for &coeff in LN_COEFFS[..10].iter().rev() {
        r = r * z + c(coeff);
    }
    let ln_m = (s + s) * r;
    let ef = e as f64;
    ef * c(LN2_HI) + (ef * c(LN2_LO) + ln_m)
}

#[cfg(test)]
mod tests {
    use std::f64::consts::SQRT_2;

    use super::*;

    /// Distance in ulps between two finite f64 of one sign.
    fn ulps(a: f64, b: f64) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    #[test]
    fn the_constants_are_what_their_names_say() {
        let mut fact = 1.0f64;
        for (k, &bits) in EXP_COEFFS.iter().enumerate() {
            if k > 0 {
                fact *= k as f64;
            }
            assert_eq!(c(bits), 1.0 / fact, "1/{k}!");
        }
        for (k, &bits) in LN_COEFFS.iter().enumerate() {
            assert_eq!(c(bits), 1.0 / (2 * k + 1) as f64);
        }
        assert_eq!(c(LOG2_E), std::f64::consts::LOG2_E);
        assert_eq!(c(MAGIC), 1.5 * (1u64 << 52) as f64);
        assert_eq!(c(EXP_MIN), -708.0);
        assert_eq!(c(EXP_MAX), 709.0);
        assert_eq!(
            f64::from_bits(SQRT2_FRACTION | (1023 << 52)),
            std::f64::consts::SQRT_2
        );
        assert!((c(LN2_HI) + c(LN2_LO) - std::f64::consts::LN_2).abs() < 1e-30);
        // k·LN2_HI is exact for |k| < 2^11: LN2_HI has 32 significant bits.
        assert!(c(LN2_HI).to_bits().trailing_zeros() >= 21);
    }

    #[test]
    fn exp_is_within_two_ulps_of_std() {
        let mut worst = 0;
        let mut x = -708.0f64;
        while x <= 709.0 {
            for dx in [0.0, 1e-9, 0.123_456_789, 0.5] {
                let v = (x + dx).min(709.0);
                let (ours, std) = (exp(v), v.exp());
                if std.is_normal() {
                    assert!(ulps(ours, std) <= 2, "exp({v}) = {ours}, std {std}");
                    worst = worst.max(ulps(ours, std));
                }
            }
            x += 0.37;
        }
        for v in [-1e-300, -1e-20, -1e-10, -0.0, 0.0, -0.3465, 0.3466, -1.0] {
            worst = worst.max(ulps(exp(v), v.exp()));
        }
        assert!(worst <= 2, "{worst} ulps");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(-709.0), 0.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(710.0), f64::INFINITY);
        assert!(exp(f64::NAN).is_nan());
    }

    #[test]
    fn ln_is_within_two_ulps_of_std() {
        let mut worst = 0;
        let mut y = 1e-300f64;
        while y < 1e300 {
            for f in [1.0, 1.000_000_1, SQRT_2 - 1e-9, SQRT_2 + 1e-9, 1.999_999] {
                let v = y * f;
                let (ours, std) = (ln(v), v.ln());
                if std != 0.0 {
                    // Relative to the result near y = 1, where ln is small.
                    worst = worst.max(ulps(ours, std));
                }
            }
            y *= 1.7;
        }
        for v in [1.0 + 1e-15, 1.0 - 1e-15, 0.999_999_99, 1.000_000_01, 2.0, 0.5] {
            worst = worst.max(ulps(ln(v), v.ln()));
        }
        assert!(worst <= 2, "{worst} ulps");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert_eq!(ln(-0.0), f64::NEG_INFINITY);
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
        assert!(ln(-1.0).is_nan());
        assert!(ln(f64::NAN).is_nan());
    }
}
