//! Device primitives of the whole-tensor methods against the CPU's: software f64,
//! arcee's importance keys, sce's variance, the three-way dot product.

use super::arcee::*;
use super::*;
use crate::exec::gpu::device::Vectors;
use crate::exec::gpu::GpuContext;
use crate::exec::methods::portable;
use crate::exec::methods::select::from_ord_key;
use crate::exec::GpuExecutor;

fn executor() -> Option<GpuExecutor> {
    match GpuContext::new(None, true) {
        Ok(Some(ctx)) => Some(GpuExecutor::new(ctx)),
        _ if std::env::var_os("MERGEC_REQUIRE_GPU").is_some() => {
            panic!("MERGEC_REQUIRE_GPU is set but there is no GPU adapter")
        }
        _ => None,
    }
}

/// sce.rs's variance key: f64 sum, mean, sum of squares, rounded to f32; also the
/// mean and the sum of squares.
fn cpu_variance(ds: &[f32]) -> (f64, f64, f32) {
    let m = ds.len() as f64;
    let mean = ds.iter().map(|d| *d as f64).sum::<f64>() / m;
    let ss: f64 = ds
        .iter()
        .map(|d| {
            let e = *d as f64 - mean;
            e * e
        })
        .sum();
    (mean, ss, (ss / m) as f32)
}

fn f64s(dev: &mut Device, lo: &Tensor, hi: &Tensor) -> Vec<f64> {
    let lo: Vec<u32> = bytemuck::pod_collect_to_vec(&dev.download(lo, DType::F32).unwrap());
    let hi: Vec<u32> = bytemuck::pod_collect_to_vec(&dev.download(hi, DType::F32).unwrap());
    lo.iter()
        .zip(&hi)
        .map(|(l, h)| f64::from_bits((*h as u64) << 32 | *l as u64))
        .collect()
}

/// A device for `n` elements in rows of `row`, with storage bindings of `binding` bytes.
fn device(gpu: &GpuExecutor, n: usize, row: usize, binding: u64) -> Device<'_> {
    Device::new(
        &gpu.ctx,
        &gpu.pipelines,
        &gpu.pool,
        binding,
        gpu.max_workgroups_per_dimension,
        n,
        row,
    )
    .unwrap()
}

/// `arcee_exp` against portable.rs `exp`, bit for bit, over its whole domain: rows
/// `[0, v...]` have max 0, so each element is `exp(v)`.
#[test]
fn software_exp_is_portable_exp() {
    let Some(gpu) = executor() else { return };
    let mut values: Vec<f32> = vec![0.0, -0.0, f32::NEG_INFINITY, -708.0, -708.001, -745.2];
    let mut v = -800.0f32;
    while v < 0.0 {
        values.push(v);
        v += 0.0137;
    }
    // Tiny magnitudes, subnormals included (up to 2^-1).
    values.extend((0..2000).map(|k| -f32::from_bits(0x0000_0001 + k * 0x0001_fc01)));
    assert!(values.iter().all(|v| *v <= 0.0));
    let row = values.len() + 1;
    let mut x = vec![0.0f32];
    x.extend(&values);
    let mut dev = device(&gpu, row, row, 4 << 20);
    let t = dev.upload(bytemuck::cast_slice(&x), DType::F32).unwrap();
    let maxes = dev.zeros_small(1);
    let (lo, hi) = (dev.alloc(), dev.alloc());
    let rows = Params {
        n: 1,
        ..Params::default()
    }
    .u(&[row as u32]);
    let elements = Params {
        n: row as u32,
        ..Params::default()
    }
    .u(&[row as u32]);
    dev.dispatch("arcee_row_max", &[&t.chunks[0], &maxes], rows, 1)
        .unwrap();
    dev.dispatch(
        "arcee_exp",
        &[&t.chunks[0], &maxes, &lo.chunks[0], &hi.chunks[0]],
        elements,
        row as u64,
    )
    .unwrap();
    let got = f64s(&mut dev, &lo, &hi);
    let mut bad = 0;
    for (v, g) in x.iter().zip(&got) {
        let want = portable::exp(*v as f64);
        if want.to_bits() != g.to_bits() {
            bad += 1;
            eprintln!("exp({v:e}) = {want:e}, GPU {g:e}");
        }
    }
    assert_eq!(bad, 0, "of {row}");
}

/// arcee_fusion's importance keys against the CPU's, bit for bit: rows of several
/// lengths; nearly equal rows (KL near rounding), identical rows (KL 0), peaked
/// softmaxes, −inf, +inf and NaN elements, large and subnormal differences.
#[test]
fn arcee_importance_keys_are_the_cpus() {
    let Some(gpu) = executor() else { return };
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut unit = move || ((next() >> 11) as f64 / (1u64 << 53) as f64) as f32;
    for row in [1usize, 2, 7, 64, 300, 1000] {
        let rows = 12usize;
        let n = row * rows;
        let (mut b, mut p) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for r in 0..rows {
            for j in 0..row {
                let x = unit() * 2.0 - 1.0;
                let (bv, pv) = match r {
                    0 => (x, x),
                    1 => (x, f32::from_bits(x.to_bits() ^ 1)),
                    2 => (x * 80.0, x * 80.0 + unit()),
                    3 => (x, x + 1e-3 * unit()),
                    4 if j == 0 => (f32::NEG_INFINITY, x),
                    5 if j == row / 2 => (x, f32::NEG_INFINITY),
                    6 if j == 0 => (f32::INFINITY, x),
                    7 if j == row - 1 => (x, f32::NAN),
                    8 => (x * 1e-38, x * 1e-39),
                    9 => (x * 3e38, -x * 3e38),
                    _ => (x, unit() * 2.0 - 1.0),
                };
                b.push(bv);
                p.push(pv);
            }
        }
        let ins = [
            crate::exec::methods::MethodInput {
                bytes: bytemuck::cast_slice(&b),
                dtype: DType::F32,
            },
            crate::exec::methods::MethodInput {
                bytes: bytemuck::cast_slice(&p),
                dtype: DType::F32,
            },
        ];
        let shape = [rows, row];
        let want = crate::exec::methods::arcee::arcee_importance_keys(&crate::exec::methods::Inputs {
            tensors: &ins,
            shape: &shape,
        });
        let mut dev = device(&gpu, n, row, 4 << 20);
        let tb = dev.upload(bytemuck::cast_slice(&b), DType::F32).unwrap();
        let tp = dev.upload(bytemuck::cast_slice(&p), DType::F32).unwrap();
        let keys = arcee_keys(&mut dev, &tb, &tp, row).unwrap();
        let got: Vec<u32> = bytemuck::pod_collect_to_vec(&dev.download(&keys, DType::F32).unwrap());
        let bad: Vec<usize> = (0..n).filter(|&i| want[i] != got[i]).collect();
        for &i in bad.iter().take(10) {
            eprintln!(
                "row {row}, element {i}: CPU {:e}, GPU {:e}",
                from_ord_key(want[i]),
                from_ord_key(got[i])
            );
        }
        assert!(bad.is_empty(), "{} of {n} keys differ (rows of {row})", bad.len());
        // The cases are what they say: zero, NaN and finite nonzero importances occur.
        let values: Vec<f32> = want.iter().map(|&k| from_ord_key(k)).collect();
        assert!(values.contains(&0.0));
        assert!(values.iter().any(|v| v.is_nan()));
        // (A row of one element has KL 0.)
        assert!(row == 1 || values.iter().any(|v| v.is_finite() && *v != 0.0));
    }
}

fn same(a: f64, b: f64) -> bool {
    // Zeros of either sign are the same here (see `shaders/sce.wgsl`: the CPU's sum
    // may start from −0.0; no key depends on the sign of a zero sum).
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) || (a == 0.0 && b == 0.0)
}

/// The software f64 of `shaders/sce.wgsl` against the CPU's f64, bit for bit: random
/// bit patterns of every finite exponent, subnormals, zeros, near-equal values whose
/// variance cancels, values whose variance is a subnormal f32 or overflows.
#[test]
fn software_f64_variance_is_the_cpus() {
    let Some(gpu) = executor() else { return };
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for models in 1..=5usize {
        let n = 20_000;
        let mut ds: Vec<Vec<f32>> = vec![Vec::with_capacity(n); models];
        for e in 0..n {
            let kind = e % 6;
            let centre = f32::from_bits((next() as u32) & 0x7f7f_ffff);
            for d in ds.iter_mut() {
                let r = next();
                let v = match kind {
                    // any finite value
                    0 => f32::from_bits((r as u32) & 0xff7f_ffff | ((r >> 40) as u32 & 1) << 31),
                    // near-equal values: the variance cancels
                    1 => f32::from_bits(centre.to_bits().wrapping_add((r % 5) as u32)),
                    // subnormals and zeros
                    2 => f32::from_bits((r as u32) & 0x8000_00ff),
                    // tiny normals: subnormal or zero variance
                    3 => f32::from_bits((r as u32) & 0x80ff_ffff | 0x0080_0000),
                    // huge values: an overflowing variance
                    4 => f32::from_bits((r as u32) & 0x807f_ffff | 0x7f00_0000),
                    _ => ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.01,
                };
                d.push(v);
            }
        }
        let mut dev = device(&gpu, n, 1, 4 * 8192);
        let tensors: Vec<Tensor> = ds
            .iter()
            .map(|d| dev.upload(bytemuck::cast_slice(d), DType::F32).unwrap())
            .collect();
        let m = Params::default().u(&[models as u32]);
        let (lo, hi) = (dev.zeros(), dev.zeros());
        for t in &tensors {
            dev.map("sce_sum", &[t, &lo, &hi], Params::default()).unwrap();
        }
        dev.map("sce_mean", &[&lo, &hi], m).unwrap();
        let means = f64s(&mut dev, &lo, &hi);
        let (ss_lo, ss_hi) = (dev.zeros(), dev.zeros());
        for t in &tensors {
            dev.map("sce_squares", &[t, &lo, &hi, &ss_lo, &ss_hi], Params::default())
                .unwrap();
        }
        let variance = dev.alloc();
        dev.map("sce_variance", &[&ss_lo, &ss_hi, &variance], m).unwrap();
        let squares = f64s(&mut dev, &ss_lo, &ss_hi);
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&dev.download(&variance, DType::F32).unwrap());
        let mut bad = 0;
        let (mut subnormal, mut infinite, mut zero) = (0, 0, 0);
        for e in 0..n {
            let column: Vec<f32> = ds.iter().map(|d| d[e]).collect();
            let (mean, ss, want) = cpu_variance(&column);
            let ok = same(mean, means[e])
                && same(ss, squares[e])
                && (want.to_bits() == got[e].to_bits() || (want.is_nan() && got[e].is_nan()));
            if !ok {
                bad += 1;
                eprintln!(
                    "{models} models, {column:?}: mean {mean:e} / {:e}, ss {ss:e} / {:e}, variance {want:e} / {:e}",
                    means[e], squares[e], got[e]
                );
            }
            subnormal += usize::from(want.is_subnormal());
            infinite += usize::from(want.is_infinite());
            zero += usize::from(want == 0.0);
        }
        if models > 1 {
            assert!(
                subnormal > 100 && infinite > 100 && zero > 100,
                "{subnormal} {infinite} {zero}"
            );
        }
        assert_eq!(bad, 0, "{models} models");
    }
}

/// One pass of `dot3` gives exactly the sums of three `dot` passes, for every layout,
/// across chunk boundaries.
#[test]
fn dot3_is_three_dots() {
    let Some(gpu) = executor() else { return };
    let (rows, cols) = (37usize, 91usize);
    let n = rows * cols;
    let values = |seed: u32| -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 20_011) as f32 / 1000.0 - 10.0)
            .collect()
    };
    let (x, y) = (values(1), values(7));
    // 1 KiB bindings: 256-element chunks, so rows and columns cross chunk boundaries.
    let mut dev = Device::new(&gpu.ctx, &gpu.pipelines, &gpu.pool, 1024, 65535, n, 1).unwrap();
    assert!(dev.ranges().len() > 10);
    let a = dev.upload(bytemuck::cast_slice(&x), DType::F32).unwrap();
    let b = dev.upload(bytemuck::cast_slice(&y), DType::F32).unwrap();
    for vectors in [
        Vectors::flat(n),
        Vectors::rows(n, cols),
        Vectors::cols(rows, cols),
    ] {
        let three = dev.dots3(&a, &b, vectors).unwrap();
        let one = dev.dots(&[(&a, &a), (&b, &b), (&a, &b)], vectors).unwrap();
        assert_eq!(three.to_vec(), one, "{vectors:?}");
        assert_eq!(one[2].len(), vectors.count);
        // And close to a plain f64 sum.
        for (v, got) in one[2].iter().enumerate() {
            let exact: f64 = (0..vectors.len)
                .map(|j| v * vectors.sv + j * vectors.sj)
                .map(|e| x[e] as f64 * y[e] as f64)
                .sum();
            assert!(
                (got - exact).abs() <= 1e-12 * exact.abs().max(1.0),
                "{vectors:?} {v}"
            );
        }
    }
}

/// The LoRA product over a result split into many chunks (bindings of 4 KiB), against
/// `ops::lowrank::row` bit for bit, in both orientations.
#[test]
fn low_rank_over_many_chunks_is_the_cpus() {
    let Some(gpu) = executor() else { return };
    let (rows, cols, rank) = (300usize, 129usize, 3usize);
    for transpose in [false, true] {
        let (p, q) = if transpose { (cols, rows) } else { (rows, cols) };
        let b: Vec<f32> = (0..p * rank)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let a: Vec<f32> = (0..rank * q)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 32.0)
            .collect();
        let mut want = vec![0f32; rows * cols];
        for (i, row) in want.chunks_mut(cols).enumerate() {
            crate::ops::lowrank::row(&b, &a, p, rank, q, 0.75, transpose, i, row);
        }
        let mut dev = device(&gpu, rows * cols, 1, 4096);
        assert!(dev.ranges().len() > 30);
        let factor = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        let (bb, ab) = (factor(&b), factor(&a));
        let out = lowrank::low_rank(
            &mut dev,
            lowrank::Factor {
                bytes: &bb,
                dtype: DType::F32,
            },
            lowrank::Factor {
                bytes: &ab,
                dtype: DType::F32,
            },
            &[rows, cols],
            0.75,
            rank,
            transpose,
        )
        .unwrap();
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&dev.download(&out, DType::F32).unwrap());
        dev.free(out);
        dev.flush();
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "transpose {transpose}"
        );
    }
}
