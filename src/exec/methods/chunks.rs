//! Chunk ranges of the chunked passes: elements `c·CHUNK ..` of a tensor, in order.

use std::ops::Range;

use super::CHUNK;

/// How many chunks cover `n` elements.
pub(crate) fn num_chunks(n: usize) -> usize {
    n.div_ceil(CHUNK)
}

/// The elements of chunk `c` of a tensor of `n` elements.
pub(crate) fn chunk_range(c: usize, n: usize) -> Range<usize> {
    let start = c * CHUNK;
    start..n.min(start + CHUNK)
}
