//! Tests of the GTA family: every kind against a whole-tensor reference, the threshold
//! path against the bitset path, edge cases, and the mergekit fixtures.

use super::super::select::select_top_k;
use super::super::{rng, Inputs, MethodInput, CHUNK};
use super::masks::*;
use super::threshold::*;
use super::*;
use crate::io::DType;
use crate::ops::{rng_key, GtaKind, GtaOp, MethodOp};

/// The method through the one dispatch, unwrapped (tests give it inputs).
fn apply(op: &MethodOp, inputs: &Inputs) -> Vec<f32> {
    crate::exec::methods::apply(op, crate::ops::Compute::F32, inputs).unwrap()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn run(op: &MethodOp, tensors: &[Vec<f32>], shape: &[usize]) -> Vec<f32> {
    let stored: Vec<Vec<u8>> = tensors.iter().map(|t| bytes(t)).collect();
    let inputs: Vec<MethodInput> = stored
        .iter()
        .map(|b| MethodInput {
            bytes: b,
            dtype: DType::F32,
        })
        .collect();
    apply(
        op,
        &Inputs {
            tensors: &inputs,
            shape,
        },
    )
}

#[allow(clippy::too_many_arguments)]
fn gta(
    kind: GtaKind,
    weights: &[f64],
    densities: &[f64],
    gammas: &[f64],
    epsilons: &[f64],
    lambda: f64,
    normalize: bool,
    rescale: bool,
) -> MethodOp {
    let m = weights.len();
    let or = |v: &[f64], d: f64| if v.is_empty() { vec![d; m] } else { v.to_vec() };
    MethodOp::Gta(GtaOp {
        kind,
        weights: weights.to_vec(),
        densities: or(densities, 1.0),
        gammas: or(gammas, 0.01),
        epsilons: or(epsilons, 0.0),
        lambda,
        normalize,
        rescale,
        keys: (0..m as u64).map(|i| 0x5eed_0000 + 77 * i).collect(),
    })
}

fn simple(kind: GtaKind, weights: &[f64], densities: &[f64], normalize: bool) -> MethodOp {
    gta(kind, weights, densities, &[], &[], 1.0, normalize, false)
}

// ---- an independent whole-tensor reference (sorts, no chunks, no bitsets) ----

/// Indices by descending |x|, ties by lower index.
fn order_desc(d: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.sort_by(|&a, &b| d[b].abs().total_cmp(&d[a].abs()).then(a.cmp(&b)));
    idx
}

fn reference(op: &MethodOp, tensors: &[Vec<f32>], shape: &[usize]) -> Vec<f32> {
    let MethodOp::Gta(GtaOp {
        kind,
        weights,
        densities,
        gammas,
        epsilons,
        lambda,
        normalize,
        rescale,
        keys,
    }) = op
    else {
        unreachable!()
    };
    let base = &tensors[0];
    let n = base.len();
    let row = *shape.last().unwrap();
    let mut wds = Vec::new();
    for (i, x) in tensors[1..].iter().enumerate() {
        let d: Vec<f32> = x.iter().zip(base).map(|(x, b)| x - b).collect();
        let dens = densities[i];
        let mask: Option<Vec<bool>> = if dens >= 1.0 {
            None
        } else {
            let mut mask = vec![false; n];
            match kind {
                GtaKind::TaskArithmetic => mask = vec![true; n],
                GtaKind::Ties if dens > 0.0 => {
                    let k = ((dens * n as f64) as usize).max(1);
                    for &j in &order_desc(&d)[..k] {
                        mask[j] = true;
                    }
                }
                GtaKind::Breadcrumbs | GtaKind::BreadcrumbsTies => {
                    // mergekit's index arithmetic on the ascending order, where the
                    // ascending order is the descending one reversed
                    let target = (dens * n as f64) as i64;
                    let mut n_top = (gammas[i] * n as f64) as i64;
                    let mut n_bot = n as i64 - target - n_top;
                    if n_bot < 0 {
                        n_top += n_bot;
                        n_bot = 0;
                    }
                    let asc: Vec<usize> = order_desc(&d).into_iter().rev().collect();
                    for &j in &asc[n_bot as usize..n - n_top as usize] {
                        mask[j] = true;
                    }
                }
                GtaKind::DareTies | GtaKind::DareLinear => {
                    for (j, m) in mask.iter_mut().enumerate() {
                        *m = rng::uniform(keys[i], j as u64) < dens as f32;
                    }
                }
                GtaKind::Della | GtaKind::DellaLinear if dens > 0.0 => {
                    let eps = epsilons[i];
                    for r in 0..n / row {
                        let rd = &d[r * row..(r + 1) * row];
                        let asc: Vec<usize> = order_desc(rd).into_iter().rev().collect();
                        // reversing turns index-ascending ties into descending ones:
                        // restore index order among equal magnitudes
                        let mut asc = asc;
                        asc.sort_by(|&a, &b| rd[a].abs().total_cmp(&rd[b].abs()).then(a.cmp(&b)));
                        for (rank, &j) in asc.iter().enumerate() {
                            let rn = if row > 1 {
                                rank as f32 / (row - 1) as f32
                            } else {
                                0.0
                            };
                            let p = (dens - eps) as f32 + rn * (2.0 * eps) as f32;
                            let g = r * row + j;
                            mask[g] = rng::uniform(keys[i], g as u64) < p;
                        }
                    }
                }
                _ => {}
            }
            Some(mask)
        };
        let mut s = 1f32;
        if let Some(mask) = &mask {
            if *rescale {
                let before: f64 = d.iter().map(|v| v.abs() as f64).sum();
                let after: f64 = d
                    .iter()
                    .zip(mask)
                    .filter(|(_, &m)| m)
                    .map(|(v, _)| v.abs() as f64)
                    .sum();
                if before >= 1e-7 && after >= 1e-7 {
                    s = (before / after) as f32;
                }
            }
        }
        let w = weights[i] as f32;
        wds.push(
            (0..n)
                .map(|j| {
                    let keep = mask.as_ref().is_none_or(|m| m[j]);
                    (if keep { d[j] * s } else { 0.0 }) * w
                })
                .collect::<Vec<f32>>(),
        );
    }
    let ws: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    (0..n)
        .map(|j| {
            let (mut mixed, mut div) = (0f32, 0f32);
            if kind.consensus() {
                let sum: f32 = wds.iter().fold(0.0, |s, wd| s + wd[j]);
                let maj = if sum >= 0.0 { 1.0 } else { -1.0 };
                for (wd, &w) in wds.iter().zip(&ws) {
                    if wd[j] != 0.0 && wd[j].signum() == maj {
                        mixed += wd[j];
                        div += w;
                    }
                }
                if div == 0.0 {
                    div = 1.0;
                }
            } else {
                for (wd, &w) in wds.iter().zip(&ws) {
                    mixed += wd[j];
                    div += w;
                }
                if div.abs() < 1e-8 {
                    div = 1.0;
                }
            }
            if *normalize {
                mixed /= div;
            }
            base[j] + mixed * *lambda as f32
        })
        .collect()
}

const KINDS: [GtaKind; 8] = [
    GtaKind::TaskArithmetic,
    GtaKind::Ties,
    GtaKind::DareTies,
    GtaKind::DareLinear,
    GtaKind::Breadcrumbs,
    GtaKind::BreadcrumbsTies,
    GtaKind::Della,
    GtaKind::DellaLinear,
];

/// Inputs with many tied magnitudes (deltas on a coarse grid), spanning several chunks.
fn random_models(n: usize, m: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let base: Vec<f32> = (0..n).map(|_| (next() % 1000) as f32 / 512.0 - 1.0).collect();
    let mut out = vec![base.clone()];
    for _ in 0..m {
        out.push(
            base.iter()
                .map(|b| b + ((next() % 33) as f32 - 16.0) / 64.0)
                .collect(),
        );
    }
    out
}

#[test]
fn all_kinds_match_the_whole_tensor_reference() {
    for (shape, seed) in [
        (vec![3, 50_000], 1u64),
        (vec![1300, 130], 2),
        (vec![2 * CHUNK + 5], 3),
        (vec![40, 1], 4),
    ] {
        let n: usize = shape.iter().product();
        let t = random_models(n, 3, seed);
        for kind in KINDS {
            for (normalize, rescale) in [(false, false), (true, true)] {
                let op = gta(
                    kind,
                    &[0.7, -0.3, 0.9],
                    &[0.45, 0.8, 0.3],
                    &[0.05, 0.0, 0.2],
                    &[0.2, 0.1, 0.25],
                    0.9,
                    normalize,
                    rescale,
                );
                let ours = run(&op, &t, &shape);
                let want = reference(&op, &t, &shape);
                let err = ours
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err <= 1e-6,
                    "{kind:?} {shape:?} normalize {normalize}: max err {err}"
                );
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let shape = [5, 40_000];
    let t = random_models(200_000, 3, 9);
    for kind in KINDS {
        let op = gta(
            kind,
            &[0.5, 0.6, 0.7],
            &[0.3, 0.5, 0.7],
            &[0.02; 3],
            &[0.1; 3],
            1.0,
            true,
            true,
        );
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| run(&op, &t, &shape));
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| run(&op, &t, &shape));
        assert!(
            one.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{kind:?}"
        );
    }
}

/// What [`magnitude_tops`] keeps, element by element.
fn top_mask(top: &Top, keys: &[u32]) -> Vec<bool> {
    let mut mask = Vec::with_capacity(keys.len());
    for (c, ks) in keys.chunks(CHUNK).enumerate() {
        let take = top.takes[c];
        let mut left = match take {
            Take::First(n) => n,
            _ => 0,
        };
        mask.extend(ks.iter().map(|&k| keeps(k, top.threshold, take, &mut left)));
    }
    mask
}

fn stored(tensors: &[Vec<f32>]) -> Vec<Vec<u8>> {
    tensors.iter().map(|t| bytes(t)).collect()
}

/// The thresholds keep exactly what the bitset path (all keys, `select_top_k`) keeps,
/// and the merged result is the same bits: sampled windows, histogram windows, and a
/// sample that misses (its blocks hold only small deltas) so the exact round runs.
#[test]
fn magnitude_thresholds_match_the_bitset_path() {
    let sampled = SAMPLE_MIN + 3 * CHUNK + 777;
    let mut missed = random_models(sampled, 3, 21);
    let base = missed[0].clone();
    for (j, v) in missed[1].iter_mut().enumerate() {
        if j % SAMPLE_STRIDE < SAMPLE_BLOCK {
            *v = base[j] + 1.0 / 4096.0;
        }
    }
    // Few distinct |δ|: masses of keys equal to the threshold.
    let mut ties = random_models(2 * CHUNK + 9, 3, 13);
    let base = ties[0].clone();
    for (i, model) in ties.iter_mut().enumerate().skip(1) {
        for (j, v) in model.iter_mut().enumerate() {
            *v = base[j] + ((j * i) % 5) as f32 * 0.25 - 0.5;
        }
    }
    let cases = [
        (random_models(sampled, 3, 11), "sampled"),
        (random_models(3 * CHUNK + 5, 3, 12), "histogram"),
        (missed, "missed sample"),
        (ties, "mass ties"),
    ];
    for (tensors, what) in &cases {
        let n = tensors[0].len();
        let raw = stored(tensors);
        let ins: Vec<MethodInput> = raw
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: DType::F32,
            })
            .collect();
        let inputs = Inputs {
            tensors: &ins,
            shape: &[n],
        };
        for densities in [[0.5, 0.3, 0.9], [0.01, 0.99, 1.0 / n as f64]] {
            let trims: Vec<(usize, usize)> = densities
                .iter()
                .enumerate()
                .map(|(i, d)| (i + 1, ((d * n as f64) as usize).max(1)))
                .collect();
            // The default cap, and caps that force narrower windows (down to one key)
            // and collections that overflow.
            for (rescale, cap) in [
                (false, candidate_cap(n)),
                (true, candidate_cap(n)),
                (false, 1),
                (true, 1000),
            ] {
                let tops = magnitude_tops_capped(&inputs, &trims, rescale, cap);
                let mut scratch = Vec::new();
                let mut old = Vec::new();
                for ((input, k), new) in trims.iter().zip(&tops) {
                    let keys = abs_keys(&inputs, *input, &mut scratch).to_vec();
                    let sel = select_top_k(&keys, *k);
                    let Mask::Top(top) = &new.mask else {
                        panic!("{what}: not a threshold")
                    };
                    assert_eq!(
                        top_mask(top, &keys),
                        sel.mask(&keys),
                        "{what} {densities:?} cap {cap}"
                    );
                    let bits = selection_bits(&keys, &sel);
                    let sums = key_sums(&keys, &bits, rescale);
                    let scale = if rescale { l1_factor(&sums) } else { 1.0 };
                    assert_eq!(new.scale.to_bits(), scale.to_bits(), "{what}");
                    old.push(Kept {
                        mask: Mask::Bits(bits),
                        scale,
                    });
                }
                let weights = [0.5f32, -0.3, 0.8];
                let a = combine(&inputs, true, &weights, &tops, true, 0.9);
                let b = combine(&inputs, true, &weights, &old, true, 0.9);
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn empty_tensor_and_base_only() {
    for kind in KINDS {
        let op = simple(kind, &[1.0], &[0.5], true);
        assert!(run(&op, &[vec![], vec![]], &[0, 4]).is_empty());
        let base = vec![1.0, -2.0, 3.5];
        assert_eq!(
            run(&simple(kind, &[], &[], true), std::slice::from_ref(&base), &[3]),
            base
        );
    }
}

#[test]
fn task_arithmetic_weights_lambda_and_normalize() {
    let base = vec![1.0, 2.0, 3.0];
    let a = vec![2.0, 2.0, 1.0];
    let b = vec![1.0, 4.0, 3.0];
    let t = [base, a, b];
    let op = gta(
        GtaKind::TaskArithmetic,
        &[0.5, 2.0],
        &[],
        &[],
        &[],
        0.5,
        false,
        false,
    );
    // deltas (1, 0, -2) and (0, 2, 0)
    assert_eq!(run(&op, &t, &[3]), vec![1.25, 4.0, 2.5]);
    let op = gta(
        GtaKind::TaskArithmetic,
        &[0.5, 2.0],
        &[],
        &[],
        &[],
        1.0,
        true,
        false,
    );
    assert_eq!(run(&op, &t, &[3]), vec![1.2, 3.6, 2.6]);
    // weights summing to 0: the divisor becomes 1
    let op = simple(GtaKind::TaskArithmetic, &[1.0, -1.0], &[], true);
    assert_eq!(run(&op, &t, &[3]), vec![2.0, 0.0, 1.0]);
}

#[test]
fn ties_zero_delta_neither_agrees_nor_divides() {
    let base = vec![1.0, 2.0, 3.0, 4.0];
    let a = vec![1.5, 1.5, 3.25, 4.0];
    let t = [base.clone(), a.clone(), base.clone()];
    let op = simple(GtaKind::Ties, &[1.0, 1.0], &[1.0, 1.0], true);
    assert_eq!(run(&op, &t, &[4]), a);
    // disagreeing signs: the sum elects, the loser is dropped
    let b = vec![0.0, 2.25, 3.0, 3.0];
    let op = simple(GtaKind::Ties, &[1.0, 3.0], &[1.0, 1.0], true);
    // weighted deltas (0.5, -0.5, 0.25, 0) and (-3, 0.75, 0, -3)
    assert_eq!(run(&op, &[base.clone(), a, b], &[4]), vec![0.0, 2.25, 3.25, 3.0]);
    // weights summing to 0 over the agreeing models: divisor 1
    let op = simple(GtaKind::Ties, &[1.0, -1.0], &[1.0, 1.0], true);
    let up = vec![2.0, 2.0, 3.0, 4.0];
    let down = vec![0.0, 2.0, 3.0, 4.0];
    assert_eq!(
        run(&op, &[base.clone(), up, down], &[4]),
        vec![3.0, 2.0, 3.0, 4.0]
    );
}

#[test]
fn ties_trim_keeps_at_least_one_and_breaks_ties_by_index() {
    let base = vec![0.0; 4];
    let x = vec![1.0, -1.0, 1.0, 0.5];
    let t = [base.clone(), x];
    assert_eq!(
        run(&simple(GtaKind::Ties, &[1.0], &[0.5], true), &t, &[4]),
        vec![1.0, -1.0, 0.0, 0.0]
    );
    // int(0.01 * 4) = 0, but one element is kept
    assert_eq!(
        run(&simple(GtaKind::Ties, &[1.0], &[0.01], true), &t, &[4]),
        vec![1.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(run(&simple(GtaKind::Ties, &[1.0], &[0.0], true), &t, &[4]), base);
    // rescaled: the kept L1 2 of 3.5
    let op = gta(GtaKind::Ties, &[1.0], &[0.5], &[], &[], 1.0, false, true);
    assert_eq!(run(&op, &t, &[4]), vec![1.75, -1.75, 0.0, 0.0]);
}

#[test]
fn breadcrumbs_window() {
    let base = vec![0.0; 10];
    let x: Vec<f32> = (1..=10)
        .map(|v| if v % 2 == 0 { v as f32 } else { -(v as f32) })
        .collect();
    let t = [base, x.clone()];
    let keep = |dens: f64, gamma: f64| {
        let op = gta(
            GtaKind::Breadcrumbs,
            &[1.0],
            &[dens],
            &[gamma],
            &[],
            1.0,
            false,
            false,
        );
        let out = run(&op, &t, &[10]);
        (0..10)
            .filter(|&j| out[j] != 0.0)
            .map(|j| j + 1)
            .collect::<Vec<usize>>()
    };
    // gamma·n < 1: no outliers removed, the top `density` kept (mergekit zeroes all)
    assert_eq!(keep(0.3, 0.0), vec![8, 9, 10]);
    assert_eq!(keep(0.3, 0.05), vec![8, 9, 10]);
    assert_eq!(keep(0.3, 0.1), vec![7, 8, 9]);
    assert_eq!(keep(0.3, 0.25), vec![6, 7, 8]);
    // target + top > n: the window starts at the bottom
    assert_eq!(keep(0.9, 0.2), (1..=9).collect::<Vec<_>>());
    assert_eq!(keep(0.0, 0.1), Vec::<usize>::new());
    assert_eq!(keep(1.0, 0.5), (1..=10).collect::<Vec<_>>());
}

#[test]
fn zero_delta_with_rescale_stays_zero() {
    let base = vec![0.25f32; 300];
    for kind in KINDS {
        let op = gta(
            kind,
            &[1.0, 1.0],
            &[0.5, 0.5],
            &[0.1, 0.1],
            &[0.1, 0.1],
            1.0,
            true,
            true,
        );
        let out = run(&op, &[base.clone(), base.clone(), base.clone()], &[10, 30]);
        assert_eq!(out, base, "{kind:?}");
    }
}

#[test]
fn dare_keeps_density_and_preserves_l1() {
    let n = 100_000;
    let t = random_models(n, 1, 5);
    let op = gta(GtaKind::DareLinear, &[1.0], &[0.3], &[], &[], 1.0, false, true);
    let out = run(&op, &t, &[n]);
    let d: Vec<f32> = out.iter().zip(&t[0]).map(|(o, b)| o - b).collect();
    let delta: Vec<f32> = t[1].iter().zip(&t[0]).map(|(x, b)| x - b).collect();
    let kept = d.iter().filter(|v| **v != 0.0).count() as f64;
    let nonzero = delta.iter().filter(|v| **v != 0.0).count() as f64;
    assert!((kept / nonzero - 0.3).abs() < 0.01, "kept {}", kept / nonzero);
    let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
    assert!((l1(&d) / l1(&delta) - 1.0).abs() < 1e-5);
    // kept elements are the draws below the density
    for j in 0..n {
        if delta[j] != 0.0 {
            assert_eq!(d[j] != 0.0, rng::uniform(op_key(&op), j as u64) < 0.3);
        }
    }
}

fn op_key(op: &MethodOp) -> u64 {
    match op {
        MethodOp::Gta(g) => g.keys[0],
        _ => unreachable!(),
    }
}

#[test]
fn della_edges_and_rank_probabilities() {
    // density <= 0: nothing kept
    let t = random_models(1000, 1, 6);
    let op = gta(
        GtaKind::DellaLinear,
        &[1.0],
        &[0.0],
        &[],
        &[0.1],
        1.0,
        false,
        true,
    );
    assert_eq!(run(&op, &t, &[10, 100]), t[0]);
    // one-element rows: rn = 0, p = density - epsilon (no NaN)
    let n = 20_000;
    let t = random_models(n, 1, 7);
    let op = gta(
        GtaKind::DellaLinear,
        &[1.0],
        &[0.5],
        &[],
        &[0.2],
        1.0,
        false,
        false,
    );
    let out = run(&op, &t, &[n, 1]);
    for j in 0..n {
        let delta = t[1][j] - t[0][j];
        let kept = rng::uniform(op_key(&op), j as u64) < 0.3;
        assert_eq!(out[j], t[0][j] + if kept { delta } else { 0.0 });
    }
    // the keep share rises with the rank, exactly (no bf16 rank rounding) in long rows
    let row = 2000;
    let t = random_models(10 * row, 1, 8);
    let base = t[0].clone();
    let x: Vec<f32> = (0..10 * row)
        .map(|j| base[j] + ((j % row) as f32 + 1.0) * 1e-3)
        .collect();
    let op = gta(
        GtaKind::DellaLinear,
        &[1.0],
        &[0.5],
        &[],
        &[0.4],
        1.0,
        false,
        false,
    );
    let out = run(&op, &[base.clone(), x], &[10, row]);
    let (mut lo, mut hi) = (0, 0);
    for j in 0..10 * row {
        let p = 0.1f32 + ((j % row) as f32 / (row - 1) as f32) * 0.8f32;
        let kept = out[j] != base[j];
        assert_eq!(kept, rng::uniform(op_key(&op), j as u64) < p, "element {j}");
        if j % row < row / 4 {
            lo += kept as u32;
        } else if j % row >= 3 * row / 4 {
            hi += kept as u32;
        }
    }
    assert!(hi > lo * 3, "lowest / highest quartile kept {lo} / {hi}");
}

// ---- mergekit 0.1.5 fixtures ----

fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance")
}

fn read(path: std::path::PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn model_file(model: &str) -> Vec<u8> {
    read(fixture_dir().join(format!("models/micro-llama-{model}-f32/model.safetensors")))
}

fn expected_file(name: &str) -> Vec<u8> {
    read(fixture_dir().join(format!("expected/{name}/model.safetensors")))
}

fn f32s(view: &safetensors::tensor::TensorView) -> Vec<f32> {
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

struct Merged {
    name: String,
    base: Vec<f32>,
    reference: Vec<f32>,
    ours: Vec<f32>,
}

/// Runs `make_op(tensor name)` on every tensor of the fixture `name`.
fn merge_fixture(name: &str, models: &[&str], make_op: impl Fn(&str) -> MethodOp) -> Vec<Merged> {
    let base_file = model_file("base");
    let model_files: Vec<Vec<u8>> = models.iter().map(|m| model_file(m)).collect();
    let expected_file = expected_file(name);
    let base = safetensors::SafeTensors::deserialize(&base_file).unwrap();
    let others: Vec<_> = model_files
        .iter()
        .map(|f| safetensors::SafeTensors::deserialize(f).unwrap())
        .collect();
    let expected = safetensors::SafeTensors::deserialize(&expected_file).unwrap();
    let mut names: Vec<&str> = base.names();
    names.sort();
    assert_eq!(names.len(), 39);
    names
        .into_iter()
        .map(|tensor| {
            let views: Vec<_> = std::iter::once(base.tensor(tensor).unwrap())
                .chain(others.iter().map(|o| o.tensor(tensor).unwrap()))
                .collect();
            let inputs: Vec<MethodInput> = views
                .iter()
                .map(|v| {
                    assert_eq!(v.dtype(), safetensors::Dtype::F32);
                    MethodInput {
                        bytes: v.data(),
                        dtype: DType::F32,
                    }
                })
                .collect();
            let shape = views[0].shape().to_vec();
            let ours = apply(
                &make_op(tensor),
                &Inputs {
                    tensors: &inputs,
                    shape: &shape,
                },
            );
            let reference = expected.tensor(tensor).unwrap();
            assert_eq!(reference.shape(), &shape[..]);
            Merged {
                name: tensor.to_string(),
                base: f32s(&views[0]),
                reference: f32s(&reference),
                ours,
            }
        })
        .collect()
}

fn check_f32_rule(name: &str, models: &[&str], op: MethodOp) {
    let mut worst = 0f64;
    for t in merge_fixture(name, models, |_| op.clone()) {
        let max_ref = t.reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        let bound = 1e-5 * max_ref.max(1.0);
        let err = t
            .reference
            .iter()
            .zip(&t.ours)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max((err / bound) as f64);
        assert!(
            err <= bound,
            "{name} {}: max err {err:e} > bound {bound:e}",
            t.name
        );
    }
    println!("{name}: worst max err / bound = {worst:.3e}");
}

#[test]
fn fixture_task_arithmetic_f32() {
    let op = gta(
        GtaKind::TaskArithmetic,
        &[0.8, 0.4, 0.6],
        &[],
        &[],
        &[],
        0.75,
        false,
        false,
    );
    check_f32_rule("task_arithmetic_f32", &["ft1", "ft2", "ft3"], op);
}

#[test]
fn fixture_ties_f32() {
    let op = gta(
        GtaKind::Ties,
        &[0.9, 0.4, 0.65],
        &[0.6, 0.8, 0.35],
        &[],
        &[],
        1.0,
        true,
        false,
    );
    check_f32_rule("ties_f32", &["ft1", "ft2", "ft3"], op);
}

#[test]
fn fixture_breadcrumbs_f32() {
    let op = gta(
        GtaKind::Breadcrumbs,
        &[0.7, 0.9],
        &[0.75, 0.5],
        &[0.03, 0.08],
        &[],
        1.0,
        false,
        false,
    );
    check_f32_rule("breadcrumbs_f32", &["ft1", "ft3"], op);
}

#[test]
fn fixture_breadcrumbs_ties_f32() {
    let op = gta(
        GtaKind::BreadcrumbsTies,
        &[0.55, 0.8, 0.4],
        &[0.7, 0.5, 0.9],
        &[0.06, 0.02, 0.01],
        &[],
        1.15,
        false,
        false,
    );
    check_f32_rule("breadcrumbs_ties_f32", &["ft1", "ft2", "ft3"], op);
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// compare.py's stats mode: kept fraction and L1 of `d = out - base` pooled and per
/// tensor, and the mean cosine against the reference vs the reference's second seed.
fn check_stats(name: &str, models: &[&str], op: MethodOp) {
    let seed = 20_260_501u64;
    let make = |tensor: &str| {
        let mut op = op.clone();
        if let MethodOp::Gta(g) = &mut op {
            for (i, k) in g.keys.iter_mut().enumerate() {
                *k = rng_key(seed, i as u32 + 1, tensor);
            }
        }
        op
    };
    let merged = merge_fixture(name, models, make);
    let seed8_file = expected_file(&format!("{name}.seed8"));
    let seed8 = safetensors::SafeTensors::deserialize(&seed8_file).unwrap();
    let (mut n_all, mut kept_ref, mut kept_ours, mut l1_ref, mut l1_ours) =
        (0usize, 0usize, 0usize, 0f64, 0f64);
    let (mut cos_ours, mut cos_seed8) = (Vec::new(), Vec::new());
    let mut kept_seed8 = 0usize;
    for t in &merged {
        let diff = |v: &[f32]| {
            v.iter()
                .zip(&t.base)
                .map(|(o, b)| (o - b) as f64)
                .collect::<Vec<f64>>()
        };
        let (dr, d) = (diff(&t.reference), diff(&t.ours));
        let d8 = diff(&f32s(&seed8.tensor(&t.name).unwrap()));
        kept_seed8 += d8.iter().filter(|v| **v != 0.0).count();
        let n = d.len();
        let (kr, ko) = (
            dr.iter().filter(|v| **v != 0.0).count(),
            d.iter().filter(|v| **v != 0.0).count(),
        );
        let (lr, lo) = (
            dr.iter().map(|v| v.abs()).sum::<f64>(),
            d.iter().map(|v| v.abs()).sum::<f64>(),
        );
        n_all += n;
        kept_ref += kr;
        kept_ours += ko;
        l1_ref += lr;
        l1_ours += lo;
        if n >= 256 {
            let (pa, pb) = (kr as f64 / n as f64, ko as f64 / n as f64);
            let p = (pa + pb) / 2.0;
            let ktol = f64::max(0.02, 6.0 * (2.0 * p * (1.0 - p) / n as f64).sqrt());
            assert!(
                (pa - pb).abs() <= ktol,
                "{name} {}: kept {pa:.4} vs {pb:.4}",
                t.name
            );
            let m1 = lr / n as f64;
            let var = dr.iter().map(|v| (v.abs() - m1).powi(2)).sum::<f64>() / n as f64;
            let rel_sd = if m1 > 0.0 {
                (var / n as f64).sqrt() / m1
            } else {
                0.0
            };
            let ltol = f64::max(0.05, 6.0 * 2f64.sqrt() * rel_sd);
            let rel = if lr > 0.0 { (lo - lr).abs() / lr } else { lo };
            assert!(rel <= ltol, "{name} {}: L1 {lr:e} vs {lo:e}", t.name);
            let nonzero = |v: &[f64]| v.iter().any(|x| *x != 0.0);
            if nonzero(&dr) && nonzero(&d) {
                cos_ours.push(cosine(&dr, &d));
            }
            if nonzero(&dr) && nonzero(&d8) {
                cos_seed8.push(cosine(&dr, &d8));
            }
        }
    }
    let (kr, ko) = (kept_ref as f64 / n_all as f64, kept_ours as f64 / n_all as f64);
    let l1_rel = (l1_ours - l1_ref) / l1_ref;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (co, c8) = (mean(&cos_ours), mean(&cos_seed8));
    let k8 = kept_seed8 as f64 / n_all as f64;
    println!(
        "{name}: kept {kr:.4} (ref) {k8:.4} (ref seed8) vs {ko:.4}; L1 rel diff {l1_rel:+.4}; mean cos(ref, ours) {co:.4} vs cos(ref, seed8) {c8:.4}"
    );
    assert!(
        (kr - ko).abs() <= 0.02,
        "{name}: pooled kept fraction {kr} vs {ko}"
    );
    assert!(l1_rel.abs() <= 0.05, "{name}: pooled L1 rel diff {l1_rel}");
    assert!((co - c8).abs() <= 0.02, "{name}: mean cosine {co} vs {c8}");
}

#[test]
fn fixture_dare_ties_f32_stats() {
    let op = gta(
        GtaKind::DareTies,
        &[0.8, 0.5, 0.35],
        &[0.35, 0.65, 0.45],
        &[],
        &[],
        1.0,
        false,
        true,
    );
    check_stats("dare_ties_f32", &["ft1", "ft2", "ft3"], op);
}

#[test]
fn fixture_dare_linear_f32_stats() {
    let op = gta(
        GtaKind::DareLinear,
        &[0.55, 0.45],
        &[0.3, 0.7],
        &[],
        &[],
        1.0,
        false,
        true,
    );
    check_stats("dare_linear_f32", &["ft1", "ft3"], op);
}

#[test]
fn fixture_della_f32_stats() {
    let op = gta(
        GtaKind::Della,
        &[0.7, 0.45, 0.9],
        &[0.55, 0.4, 0.6],
        &[],
        &[0.25, 0.15, 0.3],
        0.95,
        true,
        true,
    );
    check_stats("della_f32", &["ft1", "ft2", "ft3"], op);
}

#[test]
fn fixture_della_linear_f32_stats() {
    let op = gta(
        GtaKind::DellaLinear,
        &[0.6, 0.4],
        &[0.45, 0.65],
        &[],
        &[0.2, 0.25],
        1.0,
        false,
        true,
    );
    check_stats("della_linear_f32", &["ft2", "ft3"], op);
}
