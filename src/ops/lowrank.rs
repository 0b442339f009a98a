//! The low-rank product of a LoRA adapter, `scale·(B·A)`: the one definition of
//! [`MethodOp::LowRank`](super::MethodOp::LowRank). The CPU executor runs [`row`] over
//! every output row; the GPU kernel (`shaders/lowrank.wgsl`) computes the same sums in
//! the same order, and spec/ops.md states the formula.
//!
//! Factors: `b` is `[p, rank]` and `a` is `[rank, q]`, both row-major f32. The product is
//! `[p, q]`; `transpose` gives `[q, p]` instead (PEFT's `fan_in_fan_out` layers and
//! embedding adapters, whose weights are stored the other way round).

/// The shapes of `b` and `a` for a result of `out_shape` (`[rows, cols]`).
pub fn factor_shapes(out_shape: &[usize], rank: usize, transpose: bool) -> Option<([usize; 2], [usize; 2])> {
    let [rows, cols] = *out_shape else {
        return None;
    };
    let (p, q) = if transpose { (cols, rows) } else { (rows, cols) };
    Some(([p, rank], [rank, q]))
}

/// Output row `i` of the product into `out` (its length is the row's): each element is
/// `Σ_k b[·,k]·a[k,·]` summed in f32 in rank order, then multiplied by `scale` (as PEFT
/// computes `(B @ A) * scaling` in f32).
#[allow(clippy::too_many_arguments)]
pub fn row(
    b: &[f32],
    a: &[f32],
    p: usize,
    rank: usize,
    q: usize,
    scale: f32,
    transpose: bool,
    i: usize,
    out: &mut [f32],
) {
    out.iter_mut().for_each(|o| *o = 0.0);
    if transpose {
        // out[i, j] = (B·A)[j, i] = Σ_k b[j, k]·a[k, i]
        for k in 0..rank {
            let coef = a[k * q + i];
            for (j, o) in out.iter_mut().enumerate().take(p) {
                *o += b[j * rank + k] * coef;
            }
        }
    } else {
        for k in 0..rank {
            let coef = b[i * rank + k];
            let a_row = &a[k * q..(k + 1) * q];
            for (o, &x) in out.iter_mut().zip(a_row) {
                *o += coef * x;
            }
        }
    }
    out.iter_mut().for_each(|o| *o *= scale);
}

/// Bytes the product allocates besides its result: both factors decoded to f32.
pub fn factor_bytes(out_shape: &[usize], rank: usize) -> u64 {
    let rows = out_shape.first().copied().unwrap_or(0) as u64;
    let cols = out_shape.get(1).copied().unwrap_or(0) as u64;
    4 * rank as u64 * (rows + cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_and_transpose() {
        // B = [[1, 2], [3, 4], [5, 6]] (3x2), A = [[1, 0, -1, 2], [0.5, 1, 0, -2]] (2x4)
        let b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let a = [1.0, 0.0, -1.0, 2.0, 0.5, 1.0, 0.0, -2.0];
        let mut full = [0f32; 12];
        for i in 0..3 {
            row(&b, &a, 3, 2, 4, 0.5, false, i, &mut full[i * 4..(i + 1) * 4]);
        }
        // row 0: [1+1, 2, -1, 2-4] * 0.5
        assert_eq!(&full[0..4], &[1.0, 1.0, -0.5, -1.0]);
        let mut t = [0f32; 12];
        for j in 0..4 {
            row(&b, &a, 3, 2, 4, 0.5, true, j, &mut t[j * 3..(j + 1) * 3]);
        }
        for i in 0..3 {
            for j in 0..4 {
                assert_eq!(t[j * 3 + i], full[i * 4 + j]);
            }
        }
        assert_eq!(factor_shapes(&[4, 3], 2, true), Some(([3, 2], [2, 4])));
    }
}
