//! sce, ram, ramplus_tl and arcee_fusion in 16 bits.

use super::{in_f32, Inputs, Torch};
use crate::ops::MethodOp;

pub(super) fn apply(op: &MethodOp, t: &Torch, inputs: &Inputs) -> Vec<f32> {
    in_f32(op, t, inputs)
}
