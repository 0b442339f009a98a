//! The generalized task-arithmetic family in 16 bits (mergekit's
//! generalized_task_arithmetic.py and sparsify.py).

use super::{in_f32, Inputs, Torch};
use crate::ops::{GtaOp, MethodOp};

pub(super) fn apply(op: &GtaOp, t: &Torch, inputs: &Inputs) -> Vec<f32> {
    in_f32(&MethodOp::Gta(op.clone()), t, inputs)
}
