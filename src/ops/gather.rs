//! Embedding surgery: an input's vocabulary tensor (`embed_tokens`, `lm_head`) with its
//! rows moved to the output vocabulary's token ids ([`crate::io::vocab`] decides which).
//! It is a load whose rows come from several tensors: its own rows, other inputs' rows of
//! the same tensor, means of those, zeros, and padding rows (the mean of the others).
//! `exec::gather` computes it; spec/language.md describes it.

use std::sync::Arc;

use crate::ids::ModelId;
use crate::io::vocab::RowPlan;
use crate::io::DType;

#[derive(Clone, Debug, PartialEq)]
pub struct Gather {
    /// The tensors rows are taken from, as `Row::Copy { src, .. }` indexes them, with
    /// their dtypes.
    pub sources: Vec<(ModelId, String, DType)>,
    /// Which of `sources` this is a load of (its dtype is the result's).
    pub own: usize,
    pub plan: Arc<RowPlan>,
    /// Elements per row.
    pub width: usize,
}

impl Gather {
    pub fn dtype(&self) -> DType {
        self.sources[self.own].2
    }

    /// Bytes of the result.
    pub fn bytes(&self) -> u64 {
        (self.plan.len() * self.width * self.dtype().size_bytes()) as u64
    }
}
