//! torch's rules for 16-bit tensors on the CPU, as the 16-bit methods use them.

use crate::ops::Half;

use super::Inputs;

/// The compute dtype's arithmetic.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Torch {
    pub(crate) half: Half,
}

impl Torch {
    pub(crate) fn new(half: Half) -> Torch {
        Torch { half }
    }

    /// `x` rounded to the compute dtype: the result of every op on 16-bit tensors.
    pub(crate) fn r(&self, x: f32) -> f32 {
        self.half.round(x)
    }

    pub(crate) fn round_all(&self, xs: &mut [f32]) {
        xs.iter_mut().for_each(|x| *x = self.r(*x));
    }

    /// Every input as f32 values (already values of the compute dtype: the inputs are cast).
    pub(crate) fn tensors(&self, inputs: &Inputs) -> Vec<Vec<f32>> {
        (0..inputs.len()).map(|i| inputs.to_f32(i)).collect()
    }

    /// `a.sum()`: accumulated in f32, rounded once.
    pub(crate) fn sum(&self, a: &[f32]) -> f32 {
        self.r(a.iter().sum())
    }
}
