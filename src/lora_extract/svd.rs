//! Truncated SVD of one weight delta, deterministic to the bit.
//!
//! Two ways to the top singular triplets of an `m × n` f32 matrix:
//!
//! - [`exact_svd`]: faer's thin SVD (bidiagonalisation + divide and conquer), all
//!   `min(m, n)` triplets. Cost `O(m·n·min(m, n))`.
//! - [`randomized_svd`]: a fixed-seed Gaussian sketch of `k = rank + oversampling` columns,
//!   `power_iterations` rounds of subspace iteration re-orthonormalised each half step,
//!   then the exact SVD of the small `k × n` projection (Halko, Martinsson and Tropp,
//!   2011). Cost `O(m·n·k·(2q + 2))` and `O((m + n)·k)` memory besides the matrix.
//!
//! [`choose_method`] takes the exact SVD where it is cheap or the sketch would not be
//! much smaller than the matrix, the sketch otherwise. Both run single-threaded
//! (`Par::Seq`): modules are extracted in parallel instead, and a sequential SVD gives
//! the same bits whatever the thread count. Singular vectors are unique only up to sign;
//! [`fix_signs`] makes the largest-magnitude entry of each left singular vector positive
//! (the first such entry on a tie), flipping the right vector with it.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
use faer::{Accum, Mat, MatRef, Par};

/// The top singular triplets of a matrix: `u` is `m × k`, `v` is `n × k`, `s` holds the
/// `k` singular values, largest first.
#[derive(Clone, Debug)]
pub struct Svd {
    pub u: Mat<f32>,
    pub s: Vec<f32>,
    pub v: Mat<f32>,
}

/// How a delta's SVD is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Exact,
    Randomized,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Exact => "exact",
            Method::Randomized => "randomized",
        }
    }
}

/// Extra sketch columns beyond the rank: the sketch catches the top `rank` directions
/// well once it is a little wider than them.
pub const OVERSAMPLING: usize = 16;
/// Rounds of subspace iteration: each sharpens the gap between kept and dropped
/// singular values by another power of `σ_k / σ_{k+1}`.
pub const POWER_ITERATIONS: usize = 4;
/// Up to this smaller side the exact SVD is cheap (a 512 × 1376 matrix takes a fraction
/// of a second); a 1024 × 2560 one already takes seconds, 50 times the sketch.
const EXACT_MAX_SIDE: usize = 512;
/// The seed of the Gaussian sketch; fixed, so the output is the same on every run.
const SKETCH_SEED: u64 = 0x6d65_7267_6563_4c52;

/// The SVD for a delta of `m × n` kept at `rank`: exact when the smaller side is at most
/// [`EXACT_MAX_SIDE`] or the sketch would have at least half of it, randomized otherwise.
pub fn choose_method(m: usize, n: usize, rank: usize) -> Method {
    let side = m.min(n);
    let sketch = rank.saturating_add(OVERSAMPLING);
    if side <= EXACT_MAX_SIDE || sketch.saturating_mul(2) >= side {
        Method::Exact
    } else {
        Method::Randomized
    }
}

/// Why an SVD failed: faer's iteration did not converge (only seen with NaN or infinite
/// entries, which the caller rules out first), or its workspace could not be allocated.
#[derive(Debug, thiserror::Error)]
pub enum SvdError {
    #[error("the SVD did not converge")]
    NoConvergence,
    #[error("cannot allocate {0} bytes of SVD workspace")]
    OutOfMemory(usize),
}

/// The thin SVD of `a`: all `min(m, n)` triplets, signs fixed.
pub fn exact_svd(a: MatRef<'_, f32>) -> Result<Svd, SvdError> {
    let (m, n) = a.shape();
    let k = m.min(n);
    let mut u = Mat::<f32>::zeros(m, k);
    let mut v = Mat::<f32>::zeros(n, k);
    let mut s = faer::diag::Diag::<f32>::zeros(k);
    let req = svd_scratch::<f32>(
        m,
        n,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        Par::Seq,
        Default::default(),
    );
    let mut buffer = MemBuffer::try_new(req).map_err(|_| SvdError::OutOfMemory(req.size_bytes()))?;
    svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        MemStack::new(&mut buffer),
        Default::default(),
    )
    .map_err(|_| SvdError::NoConvergence)?;
    let s: Vec<f32> = (0..k).map(|i| s[i]).collect();
    let mut out = Svd { u, s, v };
    fix_signs(&mut out);
    Ok(out)
}

/// The top `k` triplets of `a` (`k ≤ min(m, n)`) from a randomized range finder with
/// `power_iterations` rounds of subspace iteration; signs fixed.
pub fn randomized_svd(a: MatRef<'_, f32>, k: usize, power_iterations: usize) -> Result<Svd, SvdError> {
    let (m, n) = a.shape();
    let k = k.min(m).min(n);
    let omega = gaussian(n, k, SKETCH_SEED);
    // Y = A Ω spans (nearly) the top-k left singular subspace.
    let mut q = product(a, omega.as_ref());
    orthonormalize(&mut q);
    for _ in 0..power_iterations {
        let mut z = product(a.transpose(), q.as_ref());
        orthonormalize(&mut z);
        q = product(a, z.as_ref());
        orthonormalize(&mut q);
    }
    // A ≈ Q Qᵀ A; the SVD of the small k × n matrix Qᵀ A gives the triplets.
    let small = product(q.as_ref().transpose(), a);
    let inner = exact_svd(small.as_ref())?;
    let u = product(q.as_ref(), inner.u.as_ref());
    let mut out = Svd {
        u,
        s: inner.s,
        v: inner.v,
    };
    fix_signs(&mut out);
    Ok(out)
}

/// The SVD `method` computes, with at least the top `rank` triplets (fewer only when the
/// matrix has fewer).
pub fn top_svd(a: MatRef<'_, f32>, rank: usize, method: Method) -> Result<Svd, SvdError> {
    match method {
        Method::Exact => exact_svd(a),
        Method::Randomized => randomized_svd(a, rank.saturating_add(OVERSAMPLING), POWER_ITERATIONS),
    }
}

/// Workspace bytes one SVD of an `m × n` matrix at `rank` holds at its peak, besides the
/// matrix itself (for the memory budget). Exact: `U`, `V`, faer's workspace (bounded by
/// about two more copies of the matrix) and the input copy faer makes; randomized: a
/// handful of `(m + n) × k` panels and the exact SVD of the `k × n` projection.
pub fn workspace_bytes(m: usize, n: usize, rank: usize, method: Method) -> u64 {
    let (m, n) = (m as u64, n as u64);
    let side = m.min(n);
    let f32s = match method {
        Method::Exact => {
            let req = svd_scratch::<f32>(
                m as usize,
                n as usize,
                ComputeSvdVectors::Thin,
                ComputeSvdVectors::Thin,
                Par::Seq,
                Default::default(),
            );
            return (m + n) * side * 4 + req.size_bytes() as u64 + side * 4;
        }
        Method::Randomized => {
            let k = (rank as u64 + OVERSAMPLING as u64).min(side);
            // Ω, Q, Z and Qᵀ A, then the small SVD's U, V and workspace.
            4 * (m + n) * k + k * n + k * k + n * k + 4 * k * n
        }
    };
    f32s * 4
}

/// `lhs · rhs`, single-threaded.
fn product(lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(lhs.nrows(), rhs.ncols());
    matmul(out.as_mut(), Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
    out
}

/// Makes the columns of `q` orthonormal in place: modified Gram–Schmidt, run twice
/// ("twice is enough" for f32 round-off). A column that is (numerically) in the span of
/// the earlier ones becomes zero: it adds nothing to the subspace, and a zero column's
/// singular value is zero, so it is never kept.
fn orthonormalize(q: &mut Mat<f32>) {
    let (m, k) = q.shape();
    let mut columns: Vec<f32> = (0..k).flat_map(|j| q.col_as_slice(j).to_vec()).collect();
    for j in 0..k {
        let (done, rest) = columns.split_at_mut(j * m);
        let column = &mut rest[..m];
        let norm_before = norm(column);
        for _pass in 0..2 {
            for earlier in done.chunks_exact(m) {
                let dot: f32 = earlier.iter().zip(column.iter()).map(|(a, b)| a * b).sum();
                for (c, e) in column.iter_mut().zip(earlier) {
                    *c -= dot * e;
                }
            }
        }
        let after = norm(column);
        let scale = if after > norm_before * 1e-5 && after > 0.0 {
            1.0 / after
        } else {
            0.0
        };
        column.iter_mut().for_each(|c| *c *= scale);
    }
    *q = Mat::from_fn(m, k, |r, c| columns[c * m + r]);
}

fn norm(column: &[f32]) -> f32 {
    column.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt() as f32
}

/// Flips each pair of singular vectors so the largest-magnitude entry of the left one is
/// positive (the first such entry on a tie): the SVD is then a function of the matrix.
pub fn fix_signs(svd: &mut Svd) {
    for j in 0..svd.u.ncols() {
        let mut best = 0.0f32;
        let mut sign = 1.0f32;
        for r in 0..svd.u.nrows() {
            let value = svd.u[(r, j)];
            if value.abs() > best {
                best = value.abs();
                sign = value.signum();
            }
        }
        if sign < 0.0 {
            for r in 0..svd.u.nrows() {
                svd.u[(r, j)] = -svd.u[(r, j)];
            }
            for r in 0..svd.v.nrows() {
                svd.v[(r, j)] = -svd.v[(r, j)];
            }
        }
    }
}

/// An `rows × cols` matrix of standard normal entries from `seed`: splitmix64 into
/// Box–Muller, so the sketch is the same on every platform and version.
pub fn gaussian(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
    let mut state = seed;
    let mut next_unit = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 53 random bits in (0, 1]: never 0, so the logarithm is finite.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut pending: Option<f64> = None;
    Mat::from_fn(rows, cols, |_, _| {
        if let Some(value) = pending.take() {
            return value as f32;
        }
        let (u1, u2) = (next_unit(), next_unit());
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        pending = Some(radius * angle.sin());
        (radius * angle.cos()) as f32
    })
}

/// The rank a delta is kept at: `min(rank, min(m, n), #{σ > sv_epsilon})`.
pub fn kept_rank(singular_values: &[f32], rank: usize, sv_epsilon: f32) -> usize {
    singular_values
        .iter()
        .take(rank)
        .take_while(|&&s| s > sv_epsilon)
        .count()
}

/// The LoRA factors of a delta `D ≈ B·A` at `rank` (taken from `svd`, already truncated
/// or not): `A = diag(√s)·Vᵀ` (`rank × n`, row-major) and `B = U·diag(√s)` (`m × rank`,
/// row-major), so the scale is split evenly between the two.
pub fn lora_factors(svd: &Svd, rank: usize) -> (Vec<f32>, Vec<f32>) {
    let (m, n) = (svd.u.nrows(), svd.v.nrows());
    let roots: Vec<f32> = svd.s.iter().take(rank).map(|s| s.max(0.0).sqrt()).collect();
    let mut a = Vec::with_capacity(rank * n);
    for (i, root) in roots.iter().enumerate() {
        a.extend((0..n).map(|c| root * svd.v[(c, i)]));
    }
    let mut b = Vec::with_capacity(m * rank);
    for r in 0..m {
        b.extend(roots.iter().enumerate().map(|(i, root)| svd.u[(r, i)] * root));
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix of the given singular values with random orthonormal singular vectors.
    fn with_spectrum(m: usize, n: usize, spectrum: &[f32], seed: u64) -> Mat<f32> {
        let k = spectrum.len();
        let mut u = gaussian(m, k, seed);
        let mut v = gaussian(n, k, seed ^ 0xabcdef);
        orthonormalize(&mut u);
        orthonormalize(&mut v);
        for (j, s) in spectrum.iter().enumerate() {
            for r in 0..m {
                u[(r, j)] *= s;
            }
        }
        product(u.as_ref(), v.as_ref().transpose())
    }

    fn frobenius_sq(a: MatRef<'_, f32>) -> f64 {
        let mut sum = 0.0f64;
        for c in 0..a.ncols() {
            for r in 0..a.nrows() {
                sum += f64::from(a[(r, c)]).powi(2);
            }
        }
        sum
    }

    /// `a - B·A` for the factors at `rank`.
    fn residual(a: MatRef<'_, f32>, svd: &Svd, rank: usize) -> Mat<f32> {
        let (fa, fb) = lora_factors(svd, rank);
        let lora_a = MatRef::from_row_major_slice(&fa, rank, a.ncols());
        let lora_b = MatRef::from_row_major_slice(&fb, a.nrows(), rank);
        let approx = product(lora_b, lora_a);
        Mat::from_fn(a.nrows(), a.ncols(), |r, c| a[(r, c)] - approx[(r, c)])
    }

    #[test]
    fn eckart_young_error_is_the_dropped_singular_values() {
        let a = gaussian(60, 45, 7);
        let svd = exact_svd(a.as_ref()).unwrap();
        assert_eq!(svd.s.len(), 45);
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "sorted: {:?}", svd.s);
        for rank in [1, 5, 20, 44] {
            let error = frobenius_sq(residual(a.as_ref(), &svd, rank).as_ref());
            let dropped: f64 = svd.s[rank..].iter().map(|&s| f64::from(s).powi(2)).sum();
            let relative = (error - dropped).abs() / dropped;
            assert!(
                relative < 1e-4,
                "rank {rank}: error² {error} vs dropped σ² {dropped}"
            );
        }
        // Full rank reconstructs the matrix.
        let error = frobenius_sq(residual(a.as_ref(), &svd, 45).as_ref());
        assert!(error < 1e-8 * frobenius_sq(a.as_ref()), "{error}");
    }

    #[test]
    fn the_sum_of_squared_singular_values_is_the_frobenius_norm() {
        let a = gaussian(30, 70, 3);
        let svd = exact_svd(a.as_ref()).unwrap();
        let total: f64 = svd.s.iter().map(|&s| f64::from(s).powi(2)).sum();
        let norm = frobenius_sq(a.as_ref());
        assert!((total - norm).abs() / norm < 1e-5, "{total} vs {norm}");
    }

    #[test]
    fn exact_and_randomized_agree_on_a_low_rank_matrix() {
        let spectrum = [40.0, 25.0, 17.0, 9.0, 5.0, 3.0, 2.0, 1.0];
        let a = with_spectrum(300, 200, &spectrum, 11);
        let exact = exact_svd(a.as_ref()).unwrap();
        let randomized = randomized_svd(a.as_ref(), 8 + OVERSAMPLING, POWER_ITERATIONS).unwrap();
        for (i, s) in spectrum.iter().enumerate() {
            assert!(
                (exact.s[i] - s).abs() < 1e-3 * s,
                "exact σ{i} {} vs {s}",
                exact.s[i]
            );
            assert!(
                (randomized.s[i] - s).abs() < 1e-3 * s,
                "randomized σ{i} {}",
                randomized.s[i]
            );
        }
        // Same vectors, same signs: the factors agree entry by entry.
        let (ea, eb) = lora_factors(&exact, 8);
        let (ra, rb) = lora_factors(&randomized, 8);
        let max_diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
        assert!(max_diff(&ea, &ra) < 1e-3, "A differs by {}", max_diff(&ea, &ra));
        assert!(max_diff(&eb, &rb) < 1e-3, "B differs by {}", max_diff(&eb, &rb));
        // Both reconstruct the matrix.
        for svd in [&exact, &randomized] {
            let error = frobenius_sq(residual(a.as_ref(), svd, 8).as_ref());
            assert!(error < 1e-8 * frobenius_sq(a.as_ref()), "{error}");
        }
    }

    #[test]
    fn randomized_error_is_near_the_bound_on_a_decaying_spectrum() {
        let spectrum: Vec<f32> = (0..60).map(|i| 0.9f32.powi(i)).collect();
        let a = with_spectrum(400, 300, &spectrum, 5);
        let randomized = randomized_svd(a.as_ref(), 10 + OVERSAMPLING, POWER_ITERATIONS).unwrap();
        let error = frobenius_sq(residual(a.as_ref(), &randomized, 10).as_ref());
        let bound: f64 = spectrum[10..].iter().map(|&s| f64::from(s).powi(2)).sum();
        assert!(
            error >= bound * (1.0 - 1e-4),
            "below the optimum: {error} < {bound}"
        );
        assert!(error < bound * 1.01, "{error} vs the optimum {bound}");
    }

    #[test]
    fn signs_follow_the_largest_entry_and_results_repeat() {
        let a = gaussian(50, 40, 9);
        let first = exact_svd(a.as_ref()).unwrap();
        for j in 0..first.u.ncols() {
            let col: Vec<f32> = (0..first.u.nrows()).map(|r| first.u[(r, j)]).collect();
            let largest = col
                .iter()
                .fold(0.0f32, |acc, &x| if x.abs() > acc.abs() { x } else { acc });
            assert!(largest > 0.0, "column {j}");
        }
        // The negated matrix has the same U up to sign, so after fixing signs the same U
        // and a negated V.
        let negated = Mat::from_fn(50, 40, |r, c| -a[(r, c)]);
        let second = exact_svd(negated.as_ref()).unwrap();
        for j in 0..10 {
            for r in 0..50 {
                assert!((first.u[(r, j)] - second.u[(r, j)]).abs() < 1e-4);
            }
            for r in 0..40 {
                assert!((first.v[(r, j)] + second.v[(r, j)]).abs() < 1e-4);
            }
        }
        let again = exact_svd(a.as_ref()).unwrap();
        assert_eq!(first.s, again.s);
        assert!(first.u == again.u && first.v == again.v);
        let r1 = randomized_svd(a.as_ref(), 12, 2).unwrap();
        let r2 = randomized_svd(a.as_ref(), 12, 2).unwrap();
        assert!(r1.u == r2.u && r1.v == r2.v && r1.s == r2.s);
    }

    /// Times one SVD of each kind at a 7B model's largest shapes:
    /// `cargo test --lib svd::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        for (m, n, method) in [
            (4096, 11008, Method::Randomized),
            (4096, 4096, Method::Randomized),
            (1024, 2560, Method::Exact),
        ] {
            let a = gaussian(m, n, 1);
            let start = std::time::Instant::now();
            let svd = top_svd(a.as_ref(), 32, method).unwrap();
            println!(
                "{m} x {n} {}: {:.2} s (σ1 {})",
                method.name(),
                start.elapsed().as_secs_f64(),
                svd.s[0]
            );
        }
    }

    #[test]
    fn kept_rank_counts_values_over_epsilon() {
        assert_eq!(kept_rank(&[5.0, 3.0, 1e-9, 0.0], 8, 0.0), 3);
        assert_eq!(kept_rank(&[5.0, 3.0, 1e-9, 0.0], 8, 1e-6), 2);
        assert_eq!(kept_rank(&[5.0, 3.0, 2.0], 2, 0.0), 2);
        assert_eq!(kept_rank(&[0.0, 0.0], 4, 0.0), 0);
    }

    #[test]
    fn method_by_size() {
        assert_eq!(choose_method(64, 64, 8), Method::Exact);
        assert_eq!(choose_method(4096, 11008, 32), Method::Randomized);
        assert_eq!(choose_method(4096, 4096, 2100), Method::Exact);
    }

    #[test]
    fn gaussian_is_standard_normal_and_fixed() {
        let g = gaussian(200, 50, 1);
        let values: Vec<f64> = (0..50)
            .flat_map(|c| (0..200).map(move |r| (r, c)))
            .map(|(r, c)| f64::from(g[(r, c)]))
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / values.len() as f64;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
        assert!(gaussian(200, 50, 1) == g);
        assert!(gaussian(200, 50, 2) != g);
    }
}
