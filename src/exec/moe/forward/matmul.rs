//! Dot products and the tiled matrix product of the forward pass. Activations are row-major
//! `[tokens, width]` f32 buffers; every sum runs in index order, one thread per element.

use rayon::prelude::*;

/// `sum(a[i] * b[i])` in f32, plain multiply then add, in index order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (&x, &y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

/// Tokens per tile of the transposed activations in [`matmul`]: a tile's accumulators for
/// two weight rows fit in registers.
const TILE: usize = 16;

/// Weight rows per parallel task in [`matmul`] (even, so rows pair up).
const MATMUL_BLOCK: usize = 16;

/// For each weight row `ws[j]`, the dot products with the `TILE` tokens of `xtile`
/// (`[inp][TILE]`, transposed), each summed in index order like [`dot`]. The tokens are
/// the vector dimension, so the sums vectorise without reordering any of them.
fn tile_dots<const R: usize>(xtile: &[f32], ws: [&[f32]; R]) -> [[f32; TILE]; R] {
    let mut acc = [[0f32; TILE]; R];
    for (i, xs) in xtile.chunks_exact(TILE).enumerate() {
        for (a, w) in acc.iter_mut().zip(ws) {
            let wv = w[i];
            for (s, &xv) in a.iter_mut().zip(xs) {
                *s += xv * wv;
            }
        }
    }
    acc
}

/// `x @ w^T (+ bias)`: `x` is `[rows, inp]`, `w` is `[out, inp]` (a linear layer's
/// weight), the result `[rows, out]`. Each element is `dot(x[r], w[o])` (then `+ bias[o]`)
/// to the bit, computed by one thread, so the result does not depend on the number of
/// threads. Threads take blocks of weight rows, so each weight is read once per call.
pub fn matmul(x: &[f32], rows: usize, w: &[f32], out: usize, inp: usize, bias: Option<&[f32]>) -> Vec<f32> {
    if rows == 0 || out == 0 || inp == 0 {
        return vec![0f32; rows * out];
    }
    // Tokens in tiles of TILE, each tile transposed to [inp][TILE] (zero-padded).
    let tiles = rows.div_ceil(TILE);
    let mut xt = vec![0f32; tiles * inp * TILE];
    for (t, xr) in x.chunks_exact(inp).take(rows).enumerate() {
        let tile = &mut xt[(t / TILE) * inp * TILE..(t / TILE + 1) * inp * TILE];
        for (i, &v) in xr.iter().enumerate() {
            tile[i * TILE + t % TILE] = v;
        }
    }
    // Computed transposed ([out, rows]) so tasks own whole blocks of weight rows.
    let mut t = vec![0f32; out * rows];
    t.par_chunks_mut(MATMUL_BLOCK * rows)
        .enumerate()
        .for_each(|(block, dst)| {
            let n = dst.len() / rows;
            let wblock = &w[block * MATMUL_BLOCK * inp..(block * MATMUL_BLOCK + n) * inp];
            for (tile, xtile) in xt.chunks_exact(inp * TILE).enumerate() {
                let (t0, tw) = (tile * TILE, TILE.min(rows - tile * TILE));
                let mut store = |o: usize, acc: &[f32; TILE]| {
                    dst[o * rows + t0..o * rows + t0 + tw].copy_from_slice(&acc[..tw]);
                };
                let mut pairs = wblock.chunks_exact(2 * inp);
                for (p, wp) in pairs.by_ref().enumerate() {
                    let (w0, w1) = wp.split_at(inp);
                    let [a0, a1] = tile_dots(xtile, [w0, w1]);
                    store(2 * p, &a0);
                    store(2 * p + 1, &a1);
                }
                if !pairs.remainder().is_empty() {
                    let [a] = tile_dots(xtile, [pairs.remainder()]);
                    store(n - 1, &a);
                }
            }
        });
    let mut y = vec![0f32; rows * out];
    for (r, yr) in y.chunks_exact_mut(out).enumerate() {
        for (o, v) in yr.iter_mut().enumerate() {
            *v = t[o * rows + r];
        }
        if let Some(b) = bias {
            for (v, &b) in yr.iter_mut().zip(b) {
                *v += b;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_is_a_plain_f32_sum_per_element_plus_bias() {
        // Sizes beyond a tile of tokens and a block of rows, with an odd number of rows.
        for (rows, out, inp) in [(1, 1, 1), (6, 35, 3), (19, 35, 13), (33, 4, 40)] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 37 % 101) as f32 * 0.13).sin())
                .collect();
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i * 53 % 97) as f32 * 0.29).cos())
                .collect();
            let bias: Vec<f32> = (0..out).map(|i| i as f32 * 0.5).collect();
            let y = matmul(&x, rows, &w, out, inp, Some(&bias));
            for r in 0..rows {
                for o in 0..out {
                    let mut want = 0f32;
                    for i in 0..inp {
                        want += x[r * inp + i] * w[o * inp + i];
                    }
                    assert_eq!(
                        y[r * out + o].to_bits(),
                        (want + bias[o]).to_bits(),
                        "{rows}x{out}x{inp}"
                    );
                }
            }
        }
    }
}
