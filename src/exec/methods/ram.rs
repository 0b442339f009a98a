//! ram and ramplus_tl (reference/mergekit.md 1.9): active deltas (`|δ_i| > ε`) averaged
//! where several models are active, a lone one kept (ramplus_tl rescales it by the model's
//! shared/unique activity).

use rayon::prelude::*;

use super::chunks::{chunk_range, num_chunks};
use super::deltas::decode_deltas;
use super::{Inputs, CHUNK};

/// RAM: a delta is active when `|δ_i| > ε`; with `c` active models at an element, a lone
/// active delta is kept (times `λ_i` for ramplus_tl) and `c > 1` active ones are averaged.
/// `plus = Some((r, alpha))` gives ramplus_tl: `λ_i = 1 + r·clamp(shared_i / max(uniq_i, ε),
/// 0, α)` from the tensor-wide counts of model i's active elements that are shared / unique.
pub(super) fn ram(inputs: &Inputs, epsilon: f64, plus: Option<(f64, f64)>) -> Vec<f32> {
    let n = inputs.numel();
    let models = inputs.len() - 1;
    // torch compares the f32 tensor with the Python float in f32.
    let eps = epsilon as f32;
    let active = move |x: f32| x.abs() > eps;

    let lambdas: Vec<f32> = match plus {
        None => vec![1.0; models],
        Some((r, alpha)) => {
            // Integer counts: exact, so their order does not matter.
            let partials: Vec<Vec<(u64, u64)>> = (0..num_chunks(n))
                .into_par_iter()
                .map(|c| {
                    let ch = decode_deltas(inputs, chunk_range(c, n));
                    let mut counts = vec![(0u64, 0u64); models];
                    for j in 0..ch.base.len() {
                        let cnt = ch.deltas.iter().filter(|d| active(d[j])).count();
                        for (d, (shared, uniq)) in ch.deltas.iter().zip(counts.iter_mut()) {
                            if active(d[j]) {
                                if cnt == 1 {
                                    *uniq += 1;
                                } else {
                                    *shared += 1;
                                }
                            }
                        }
                    }
                    counts
                })
                .collect();
            let mut totals = vec![(0u64, 0u64); models];
            for p in &partials {
                for (t, x) in totals.iter_mut().zip(p) {
                    t.0 += x.0;
                    t.1 += x.1;
                }
            }
            // Computed in f64 and rounded once (mergekit: float32 tensor ops). The clamp is
            // `min(max(ρ, 0), α)`, torch's order when α < 0; `uniq = 0` gives a huge ρ.
            totals
                .iter()
                .map(|&(shared, uniq)| {
                    let rho = shared as f64 / (uniq as f64).max(epsilon);
                    (1.0 + r * rho.max(0.0).min(alpha)) as f32
                })
                .collect()
        }
    };

    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let ch = decode_deltas(inputs, chunk_range(c, n));
        for (j, out_j) in o.iter_mut().enumerate() {
            let cnt = ch.deltas.iter().filter(|d| active(d[j])).count();
            let mut merged = 0f32;
            if cnt == 1 {
                for (d, &lambda) in ch.deltas.iter().zip(&lambdas) {
                    if active(d[j]) {
                        merged += d[j] * lambda;
                    }
                }
            } else if cnt > 1 {
                let div = cnt as f32;
                for d in &ch.deltas {
                    if active(d[j]) {
                        merged += d[j] / div;
                    }
                }
            }
            *out_j = ch.base[j] + merged;
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::methods::deltas::tests::{noise, run};
    use crate::ops::MethodOp;

    #[test]
    fn ram_by_hand() {
        let base = vec![1.0f32; 5];
        let a = vec![1.0f32, 1.5, 1.5, 1.000001, 3.0];
        let b = vec![1.0f32, 1.0, 2.0, 1.0, 0.0];
        // active: a = [F, T, T, F, T], b = [F, F, T, F, T]
        let out = run(&MethodOp::Ram { epsilon: 1e-5 }, &[5], &[base.clone(), a, b]);
        assert_eq!(
            out,
            vec![
                1.0,
                1.5,
                1.0 + (0.5 / 2.0 + 1.0 / 2.0),
                1.0,
                1.0 + (2.0 / 2.0 + -1.0 / 2.0)
            ]
        );
    }

    #[test]
    fn ramplus_by_hand() {
        let base = vec![0.0f32; 4];
        let a = vec![1.0f32, 1.0, 1.0, 0.0];
        let b = vec![0.0f32, 0.0, 2.0, 2.0];
        // a: unique 2, shared 1 -> rho 0.5 -> clamp 0.2 -> lambda 1 + 0.1 * 0.2
        // b: unique 1, shared 1 -> rho 1 -> lambda 1.02 too
        let op = MethodOp::RamPlusTl {
            r: 0.1,
            alpha: 0.2,
            epsilon: 1e-5,
        };
        let out = run(&op, &[4], &[base, a, b]);
        let l = (1.0f64 + 0.1 * 0.2) as f32;
        assert_eq!(out, vec![l, l, 1.0 / 2.0 + 2.0 / 2.0, 2.0 * l]);
        // a model with no unique element: rho = shared / epsilon, clamped at alpha.
        let out = run(&op, &[2], &[vec![0.0; 2], vec![1.0, 1.0], vec![1.0, 1.0]]);
        assert_eq!(out, vec![1.0, 1.0]);
        let out = run(
            &MethodOp::RamPlusTl {
                r: 0.5,
                alpha: 10.0,
                epsilon: 1e-5,
            },
            &[3],
            &[vec![0.0; 3], vec![1.0, 1.0, 1.0], vec![0.0, 1.0, 0.0]],
        );
        // a: unique 2, shared 1 -> lambda 1.25; b: unique 0 -> rho 1e5 -> clamp 10 -> 6
        assert_eq!(out, vec![1.25, 1.0, 1.25]);
    }

    #[test]
    fn ram_matches_across_chunks() {
        // More than one chunk, with ragged end; the result must not depend on chunking,
        // which equals the result computed element by element on small pieces.
        let n = CHUNK * 2 + 123;
        let base = noise(5, n);
        let ms: Vec<Vec<f32>> = (6..9)
            .map(|s| {
                noise(s, n)
                    .iter()
                    .zip(&base)
                    .map(|(x, b)| if x.abs() < 0.3 { *b } else { b + x * 1e-3 })
                    .collect()
            })
            .collect();
        let mut all = vec![base.clone()];
        all.extend(ms.iter().cloned());
        let op = MethodOp::Ram { epsilon: 2e-4 };
        let whole = run(&op, &[n], &all);
        for start in [0, CHUNK - 5, n - 7] {
            let piece: Vec<Vec<f32>> = all.iter().map(|t| t[start..start + 7].to_vec()).collect();
            assert_eq!(run(&op, &[7], &piece), whole[start..start + 7].to_vec());
        }
    }
}
