//! The arithmetic a merge computes in. `f32` (the default for scripts) computes every
//! method in f32, accumulating reductions in f64, and rounds once, when the result is
//! stored. A 16-bit compute dtype reproduces mergekit's arithmetic instead: inputs and
//! scalar parameters are cast to it and every intermediate is rounded to it, as torch
//! does when mergekit runs with `dtype: bfloat16` or `float16`.

use half::{bf16, f16};

use crate::io::DType;

/// A 16-bit floating-point compute dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    /// `x` rounded to the nearest value of this dtype (ties to even), as f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Half::Bf16 => bf16::from_f32(x).to_f32(),
            Half::F16 => f16::from_f32(x).to_f32(),
        }
    }

    /// Whether every value of `dtype` is a value of this one (so rounding is a no-op).
    pub fn represents(self, dtype: DType) -> bool {
        dtype == self.dtype()
    }

    /// The 16-bit dtype `dtype` is, if it is one.
    pub fn of_dtype(dtype: DType) -> Option<Half> {
        match dtype {
            DType::BF16 => Some(Half::Bf16),
            DType::F16 => Some(Half::F16),
            _ => None,
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Half::Bf16 => DType::BF16,
            Half::F16 => DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Half::Bf16 => "bf16",
            Half::F16 => "f16",
        }
    }
}

/// The compute dtype of a merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compute {
    /// f32 arithmetic (f64 reductions), rounded once when stored.
    #[default]
    F32,
    /// mergekit's arithmetic in a 16-bit dtype, every intermediate rounded.
    Half(Half),
}

impl Compute {
    /// The names scripts write: `f32`, `bf16`, `f16`.
    pub const NAMES: [&'static str; 3] = ["f32", "bf16", "f16"];

    pub fn name(self) -> &'static str {
        match self {
            Compute::F32 => "f32",
            Compute::Half(h) => h.name(),
        }
    }

    pub fn from_name(name: &str) -> Option<Compute> {
        match name {
            "f32" => Some(Compute::F32),
            "bf16" => Some(Compute::Half(Half::Bf16)),
            "f16" => Some(Compute::Half(Half::F16)),
            _ => None,
        }
    }

    /// The compute dtype of values stored as `dtype` (mergekit's `dtype:` key).
    pub fn of_dtype(dtype: DType) -> Option<Compute> {
        match dtype {
            DType::F32 => Some(Compute::F32),
            DType::BF16 => Some(Compute::Half(Half::Bf16)),
            DType::F16 => Some(Compute::Half(Half::F16)),
            _ => None,
        }
    }

    pub fn half(self) -> Option<Half> {
        match self {
            Compute::F32 => None,
            Compute::Half(h) => Some(h),
        }
    }
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even_and_idempotent() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: even (1) wins.
        assert_eq!(Half::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(Half::Bf16.round(0.3), 0.30078125);
        assert_eq!(Half::F16.round(0.3), 1229.0 / 4096.0);
        // f16 overflows to infinity and keeps subnormals.
        assert_eq!(Half::F16.round(1e6), f32::INFINITY);
        assert_eq!(Half::F16.round(2f32.powi(-24)), 2f32.powi(-24));
        for h in [Half::Bf16, Half::F16] {
            for x in [0.1f32, -3.7e-5, 123.456, -0.0, 6.1e-8] {
                assert_eq!(h.round(h.round(x)).to_bits(), h.round(x).to_bits());
            }
            assert!(h.round(f32::NAN).is_nan());
        }
    }
}
