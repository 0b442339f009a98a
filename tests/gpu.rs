//! The GPU executor against the CPU reference: every element-wise op, every input and
//! output dtype, shapes from empty to past 65535 workgroups and past a storage binding,
//! values from ±0 and subnormals to ±inf and NaN. Results must be bit-identical (NaN
//! payloads aside: spec/ops.md keeps NaN NaN, not its payload).
//!
//! Without a GPU adapter every test prints "skipped: no GPU adapter" and passes, unless
//! `MERGEC_REQUIRE_GPU` is set (CI sets it after installing lavapipe): then they fail.
//! `MERGEC_GPU_ADAPTER=<name part>` picks an adapter; `WGPU_BACKEND=gl` another backend.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use mergec::exec::{CpuExecutor, GpuContext, GpuError, GpuExecutor, GpuWithFallback};
use mergec::io::DType;
use mergec::ops::Elementwise as E;
use mergec::ops::{Compute, Half};
use mergec::plan::{Instr, Kernel, Step, StepInput};
use mergec::sema::hir::ModelId;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Says `line` once per test binary, on the real stderr: the test harness captures
/// `eprintln!` of passing tests, and a skip must show in CI logs.
fn say_once(line: String) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        let _ = writeln!(std::io::stderr(), "{line}");
    });
}

/// The GPU executor on the test adapter, or `None` (after saying so) when there is none.
fn gpu() -> Option<GpuExecutor> {
    let required = std::env::var_os("MERGEC_REQUIRE_GPU").is_some();
    let name = std::env::var("MERGEC_GPU_ADAPTER").ok();
    match GpuContext::new(name.as_deref(), true) {
        Ok(Some(ctx)) => {
            say_once(format!("GPU tests run on {}", ctx.summary()));
            Some(GpuExecutor::new(ctx))
        }
        Ok(None) if required => panic!("MERGEC_REQUIRE_GPU is set but there is no GPU adapter"),
        Ok(None) => {
            say_once("skipped: no GPU adapter (install mesa-vulkan-drivers)".to_string());
            None
        }
        Err(e) => panic!("cannot open the GPU: {e}"),
    }
}

fn cpu() -> CpuExecutor {
    // Small chunks, so the reference runs several chunks even on small tensors.
    CpuExecutor::new(2, 1000).unwrap()
}

fn step(program: Vec<Instr>, inputs: &[DType], output: DType, numel: usize) -> Step {
    Step {
        output: 0,
        tensor: "model.layers.0.mlp.up_proj.weight".into(),
        shape: vec![numel],
        dtype: output,
        kernel: Kernel::Fused(program),
        inputs: inputs
            .iter()
            .enumerate()
            .map(|(i, d)| StepInput {
                model: ModelId(i as u32),
                tensor: "model.layers.0.mlp.up_proj.weight".into(),
                dtype: *d,
                bytes: (numel * d.size_bytes()) as u64,
                gather: None,
            })
            .collect(),
    }
}

/// splitmix64: a small deterministic generator, so failures reproduce from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One f32 value of a mixed population: specials, subnormals, large magnitudes, rounding
/// ties of both 16-bit formats, ordinary values and raw random bits.
fn f32_value(rng: &mut Rng) -> f32 {
    let specials = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN
        f32::from_bits(0x7fbf_ffff),
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1), // smallest subnormal
        -f32::from_bits(0x007f_ffff),
        65504.0,  // largest f16
        65519.99, // rounds to 65504 in f16
        65520.0,  // rounds to inf in f16
        -65536.0,
        f32::from_bits(0x7f7f_8000), // a bf16 tie below bf16's max: rounds to inf
        2f32.powi(-24),              // smallest f16 subnormal
        2f32.powi(-25),              // half of it: ties to 0
        3.0 * 2f32.powi(-25),        // ties to even, up
        2f32.powi(-14),              // smallest normal f16
        1.0,
        -1.0,
        1.0 + 2f32.powi(-8),  // bf16 tie
        1.0 + 2f32.powi(-11), // f16 tie
    ];
    match rng.below(8) {
        0 => rng.pick(&specials),
        1 => f32::from_bits(rng.next() as u32),
        // Exact ties of bf16 (low 16 bits 0x8000) and f16 (low 13 bits 0x1000).
        2 => f32::from_bits((rng.next() as u32 & 0xffff_0000) | 0x8000),
        3 => f32::from_bits((rng.next() as u32 & 0xffff_e000) | 0x1000),
        // f32 and f16 subnormals.
        4 => f32::from_bits(rng.next() as u32 & 0x807f_ffff),
        5 => (rng.below(1 << 20) as f32 - (1 << 19) as f32) * 2f32.powi(-34),
        // Large magnitudes, around the f16 and f32 overflow thresholds.
        6 => {
            let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
            sign * rng.pick(&[6.0e4, 6.5e4, 7.0e4, 1.0e38, 3.0e38]) * (1.0 + rng.below(1000) as f32 / 1000.0)
        }
        _ => (rng.below(1 << 24) as f32 / (1 << 20) as f32) - 8.0,
    }
}

/// `n` elements of `dtype` as stored (little-endian), from the mixed population.
fn tensor(rng: &mut Rng, dtype: DType, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.size_bytes());
    for _ in 0..n {
        let v = f32_value(rng);
        match dtype {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            // Half of the 16-bit values are raw bit patterns: every class, every payload.
            DType::BF16 | DType::F16 if rng.below(2) == 0 => {
                out.extend_from_slice(&(rng.next() as u16).to_le_bytes())
            }
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
            other => panic!("no test values for {other}"),
        }
    }
    out
}

fn is_nan(bits: u32, dtype: DType) -> bool {
    match dtype {
        DType::F32 => f32::from_bits(bits).is_nan(),
        DType::F16 => bits & 0x7c00 == 0x7c00 && bits & 0x03ff != 0,
        DType::BF16 => bits & 0x7f80 == 0x7f80 && bits & 0x007f != 0,
        _ => false,
    }
}

/// Element `i` of a stored tensor, as bits.
fn element(bytes: &[u8], dtype: DType, i: usize) -> u32 {
    match dtype.size_bytes() {
        4 => u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
        _ => u16::from_le_bytes(bytes[2 * i..2 * i + 2].try_into().unwrap()) as u32,
    }
}

/// Asserts the GPU's output equals the CPU's bit for bit (NaN for NaN, any payload).
fn assert_same(step: &Step, inputs: &[&[u8]], cpu_out: &[u8], gpu_out: &[u8]) {
    assert_eq!(cpu_out.len(), gpu_out.len(), "output length of {:?}", step.kernel);
    if cpu_out == gpu_out {
        return;
    }
    let size = step.dtype.size_bytes();
    let mut bad = Vec::new();
    // Blocks of 16 elements compared whole first: NaN payloads make most outputs differ
    // somewhere, and element by element is slow in debug builds.
    let block = 16 * size;
    for (b, (c_block, g_block)) in cpu_out.chunks(block).zip(gpu_out.chunks(block)).enumerate() {
        if c_block == g_block {
            continue;
        }
        for i in b * 16..b * 16 + c_block.len() / size {
            let (c, g) = (element(cpu_out, step.dtype, i), element(gpu_out, step.dtype, i));
            if c != g && !(is_nan(c, step.dtype) && is_nan(g, step.dtype)) {
                bad.push((i, c, g));
            }
        }
    }
    if bad.is_empty() {
        return;
    }
    let describe = |&(i, c, g): &(usize, u32, u32)| {
        let ins: Vec<String> = step
            .inputs
            .iter()
            .zip(inputs)
            .map(|(s, b)| format!("{}:{:#x}", s.dtype.script_name(), element(b, s.dtype, i)))
            .collect();
        format!("  [{i}] inputs {} -> cpu {c:#x}, gpu {g:#x}", ins.join(" "))
    };
    let first: Vec<String> = bad.iter().take(8).map(describe).collect();
    panic!(
        "{} of {} elements differ for {:?} ({} -> {}):\n{}",
        bad.len(),
        cpu_out.len() / size,
        step.kernel,
        step.inputs
            .iter()
            .map(|i| i.dtype.script_name())
            .collect::<Vec<_>>()
            .join(", "),
        step.dtype.script_name(),
        first.join("\n")
    );
}

/// A large tensor, cheaply (debug builds are slow): raw random 16-bit patterns, four per
/// draw; or f32 values of moderate exponents, two per draw, with every 64th element from
/// the mixed population.
fn large_tensor(rng: &mut Rng, dtype: DType, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n * dtype.size_bytes()];
    let mut words = out.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    let tail = words.into_remainder();
    let last = rng.next().to_le_bytes();
    tail.copy_from_slice(&last[..tail.len()]);
    if dtype == DType::F32 {
        for (k, v) in out.chunks_exact_mut(4).enumerate() {
            let r = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            let bits = match k % 64 {
                0 => f32_value(rng).to_bits(),
                // Exponents 2^-27 .. 2^36.
                _ => (r & 0x807f_ffff) | (((r >> 23 & 0x3f) + 100) << 23),
            };
            v.copy_from_slice(&bits.to_le_bytes());
        }
    }
    out
}

/// Runs `program` on random inputs of `dtypes` on both executors and compares.
fn check(
    gpu: &GpuExecutor,
    cpu: &CpuExecutor,
    seed: u64,
    program: &[Instr],
    dtypes: &[DType],
    out: DType,
    n: usize,
) {
    let mut rng = Rng(seed);
    let data: Vec<Vec<u8>> = dtypes
        .iter()
        .map(|d| match n {
            0..=100_000 => tensor(&mut rng, *d, n),
            _ => large_tensor(&mut rng, *d, n),
        })
        .collect();
    let inputs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let step = step(program.to_vec(), dtypes, out, n);
    let expected = cpu.compute(&step, &inputs).unwrap();
    let got = gpu
        .compute(&step, &inputs)
        .unwrap_or_else(|e| panic!("{:?}: {e}", step.kernel));
    assert_same(&step, &inputs, &expected, &got);
}

fn inputs_of(program: &[Instr]) -> usize {
    program
        .iter()
        .filter_map(|i| match i {
            Instr::Load(s) => Some(s + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Every dtype assignment of `slots` inputs (3^slots).
fn dtype_combinations(slots: usize) -> Vec<Vec<DType>> {
    let mut all = vec![vec![]];
    for _ in 0..slots {
        all = all
            .into_iter()
            .flat_map(|prefix: Vec<DType>| {
                DTYPES.iter().map(move |d| {
                    let mut v = prefix.clone();
                    v.push(*d);
                    v
                })
            })
            .collect();
    }
    all
}

/// The element-wise ops, each alone, with the constants a script can produce and some it
/// cannot (0, -0, huge, tiny: the executor takes any f32).
fn ops() -> Vec<(&'static str, Vec<Instr>)> {
    use Instr::*;
    let ws = |weights: &[f32], divisor: Option<f32>| {
        Instr::Elementwise(E::WeightedSum {
            weights: weights.to_vec(),
            divisor,
        })
    };
    vec![
        ("cast", vec![Load(0)]),
        ("neg", vec![Load(0), Instr::Elementwise(E::Neg)]),
        (
            "round-bf16",
            vec![Load(0), Instr::Elementwise(E::Round(Half::Bf16))],
        ),
        (
            "round-f16",
            vec![Load(0), Instr::Elementwise(E::Round(Half::F16))],
        ),
        (
            "sub-round-scale-round",
            vec![
                Load(0),
                Load(1),
                Instr::Elementwise(E::Sub),
                Instr::Elementwise(E::Round(Half::Bf16)),
                Instr::Elementwise(E::Scale(0.30078125)),
                Instr::Elementwise(E::Round(Half::Bf16)),
            ],
        ),
        ("add", vec![Load(0), Load(1), Instr::Elementwise(E::Add)]),
        ("sub", vec![Load(0), Load(1), Instr::Elementwise(E::Sub)]),
        ("scale", vec![Load(0), Instr::Elementwise(E::Scale(0.3))]),
        ("scale-tiny", vec![Load(0), Instr::Elementwise(E::Scale(1.0e-30))]),
        ("scale-huge", vec![Load(0), Instr::Elementwise(E::Scale(-3.0e35))]),
        ("scale-zero", vec![Load(0), Instr::Elementwise(E::Scale(-0.0))]),
        ("divide", vec![Load(0), Instr::Elementwise(E::Divide(3.0))]),
        ("divide-frac", vec![Load(0), Instr::Elementwise(E::Divide(0.7))]),
        (
            "divide-tiny",
            vec![Load(0), Instr::Elementwise(E::Divide(-1.0e-37))],
        ),
        ("weighted-sum", vec![Load(0), Load(1), ws(&[0.3, 0.7], None)]),
        (
            "weighted-sum-normalized",
            vec![Load(0), Load(1), ws(&[0.1, 0.2], Some(0.3))],
        ),
        (
            "weighted-sum-3",
            vec![Load(0), Load(1), Load(2), ws(&[0.5, -1.25, 0.1], Some(1.0 / 3.0))],
        ),
    ]
}

#[test]
fn every_op_matches_the_cpu_for_every_dtype() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    let mut seed = 1;
    let mut cases = 0;
    for (name, program) in ops() {
        let slots = inputs_of(&program);
        for dtypes in dtype_combinations(slots) {
            for out in DTYPES {
                for n in [1, 2, 3, 7, 512, 1027] {
                    seed += 1;
                    let _ = name;
                    check(&gpu, &cpu, seed, &program, &dtypes, out, n);
                    cases += 1;
                }
            }
        }
    }
    eprintln!("{cases} cases, {} pipelines", gpu.cached_pipelines());
}

/// Every bf16 and f16 bit pattern, decoded and stored in each dtype, and negated.
#[test]
fn every_16_bit_value_decodes_and_rounds_like_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for input in [DType::BF16, DType::F16] {
        for out in DTYPES {
            for program in [
                vec![Instr::Load(0)],
                vec![Instr::Load(0), Instr::Elementwise(E::Neg)],
            ] {
                let step = step(program, &[input], out, 1 << 16);
                let got = gpu.compute(&step, &[&all]).unwrap();
                assert_same(&step, &[&all], &cpu.compute(&step, &[&all]).unwrap(), &got);
            }
        }
    }
}

/// f32 values at and around every rounding boundary of bf16 and f16: each upper half of the
/// bits with lower halves that are ties, just below and just above them.
#[test]
fn f32_rounds_to_16_bits_like_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    let lows: [u32; 13] = [
        0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x0fff, 0x1000, 0x1001, 0x2000, 0x3000, 0x5000,
        0x1800,
    ];
    let values: Vec<u8> = (0..=u16::MAX as u32)
        .flat_map(|hi| lows.iter().map(move |lo| (hi << 16) | lo))
        .flat_map(u32::to_le_bytes)
        .collect();
    let n = values.len() / 4;
    for out in [DType::BF16, DType::F16, DType::F32] {
        let step = step(vec![Instr::Load(0)], &[DType::F32], out, n);
        let got = gpu.compute(&step, &[&values]).unwrap();
        assert_same(&step, &[&values], &cpu.compute(&step, &[&values]).unwrap(), &got);
    }
    // A 16-bit compute dtype's rounding step, kept in f32, in a fused kernel and in a
    // whole-tensor program's map kernel.
    for h in [Half::Bf16, Half::F16] {
        let fused = step(
            vec![Instr::Load(0), Instr::Elementwise(E::Round(h))],
            &[DType::F32],
            DType::F32,
            n,
        );
        let got = gpu.compute(&fused, &[&values]).unwrap();
        let want = cpu.compute(&fused, &[&values]).unwrap();
        assert_same(&fused, &[&values], &want, &got);
        let mut whole = step(vec![], &[DType::F32, DType::F32], DType::F32, n);
        whole.kernel = Kernel::Whole(vec![
            Instr::Load(0),
            Instr::Load(1),
            Instr::Method {
                op: MethodOp::Nearswap { t: 0.5 },
                compute: Compute::F32,
                arity: 2,
            },
            Instr::Elementwise(E::Round(h)),
        ]);
        let inputs: [&[u8]; 2] = [&values, &values];
        let got = gpu.compute(&whole, &inputs).unwrap();
        assert_same(&whole, &inputs, &cpu.compute(&whole, &inputs).unwrap(), &got);
    }
}

/// A long program touching every instruction, over random dtype assignments.
#[test]
fn fused_chains_match_the_cpu() {
    use Instr::*;
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    let program = vec![
        Load(0),
        Load(1),
        Load(0),
        Instr::Elementwise(E::Sub),
        Instr::Elementwise(E::Scale(0.5)),
        Instr::Elementwise(E::Add),
        Instr::Elementwise(E::Neg),
        Load(2),
        Load(3),
        Load(4),
        Load(5),
        Instr::Elementwise(E::WeightedSum {
            weights: vec![1.0, 0.2, -3.0, 0.4, 5.0],
            divisor: Some(3.6),
        }),
        Instr::Elementwise(E::Divide(7.0)),
        Load(1),
        Instr::Elementwise(E::Sub),
    ];
    let mut rng = Rng(99);
    for seed in 0..24 {
        let dtypes: Vec<DType> = (0..6).map(|_| rng.pick(&DTYPES)).collect();
        let out = rng.pick(&DTYPES);
        let n = rng.below(3000) as usize;
        check(&gpu, &cpu, 1000 + seed, &program, &dtypes, out, n);
    }
}

/// Tensors larger than one storage binding run in slices. With a 16 KiB binding limit and
/// at most 3 workgroups per grid dimension, small tensors take several slices (4096 f32 or
/// 8192 16-bit elements each) and 2-D grids with ragged last rows.
#[test]
fn slices_and_2d_grids_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let gpu = gpu
        .with_max_binding_bytes(16 << 10)
        .with_max_workgroups_per_dimension(3);
    let cpu = cpu();
    let binary = vec![Instr::Load(0), Instr::Load(1), Instr::Elementwise(E::Sub)];
    let ternary = vec![
        Instr::Load(0),
        Instr::Load(1),
        Instr::Load(2),
        Instr::Elementwise(E::WeightedSum {
            weights: vec![0.25, 0.6, 0.15],
            divisor: Some(1.0),
        }),
    ];
    let mut seed = 5000;
    for dtypes in dtype_combinations(2) {
        for out in DTYPES {
            for n in [0, 1, 2, 3, 1536, 1537, 4095, 4096, 4097, 8191, 8192, 8193, 20001] {
                seed += 1;
                check(&gpu, &cpu, seed, &binary, &dtypes, out, n);
            }
        }
    }
    for dtypes in dtype_combinations(3) {
        for out in DTYPES {
            seed += 1;
            check(&gpu, &cpu, seed, &ternary, &dtypes, out, 2345);
        }
    }
    let stats = gpu.stats();
    assert!(stats.grids_2d > 100 && stats.dispatches > 500, "{stats:?}");
    // Every slice after a tensor's first is submitted while the one before computes:
    // one dispatch per tensor is not overlapped (9 x 3 x 12 non-empty binary, 27 x 3
    // ternary tensors).
    assert_eq!(
        stats.overlapped,
        stats.dispatches - (9 * 3 * 12 + 27 * 3),
        "{stats:?}"
    );
}

/// A dispatch past 65535 workgroups in one dimension: 2^25 + 3 elements are 65537
/// workgroups of 256 invocations with two elements each.
#[test]
fn past_65535_workgroups() {
    let Some(gpu) = gpu() else { return };
    let n = (1 << 25) + 3;
    let program = vec![
        Instr::Load(0),
        Instr::Load(1),
        Instr::Elementwise(E::WeightedSum {
            weights: vec![0.3, 0.7],
            divisor: None,
        }),
    ];
    check(
        &gpu,
        &cpu(),
        7,
        &program,
        &[DType::BF16, DType::BF16],
        DType::BF16,
        n,
    );
}

/// Past the adapter's own binding limit (128 MiB on lavapipe and many others): an f32 input
/// of 2^25 + 3 elements is 128 MiB + 12 bytes, so it runs in two slices, the first of
/// them a 2-D grid.
#[test]
fn past_the_adapters_binding_limit() {
    let Some(gpu) = gpu() else { return };
    let limit = gpu.context().limits.max_storage_buffer_binding_size;
    if limit > 1 << 27 {
        eprintln!("the adapter binds {limit} bytes; this tensor fits in one slice there");
    }
    let n = (1 << 25) + 3;
    let program = vec![
        Instr::Load(0),
        Instr::Load(1),
        Instr::Elementwise(E::Add),
        Instr::Elementwise(E::Scale(0.5)),
    ];
    check(
        &gpu,
        &cpu(),
        8,
        &program,
        &[DType::BF16, DType::F32],
        DType::F32,
        n,
    );
}

#[test]
fn pipelines_are_cached_by_key_not_by_constants() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    for (i, w) in [0.1f32, 0.2, 0.3, 0.4].into_iter().enumerate() {
        let program = vec![
            Instr::Load(0),
            Instr::Load(1),
            Instr::Elementwise(E::WeightedSum {
                weights: vec![w, 1.0 - w],
                divisor: Some(1.0),
            }),
        ];
        check(
            &gpu,
            &cpu,
            40 + i as u64,
            &program,
            &[DType::BF16, DType::BF16],
            DType::BF16,
            999,
        );
    }
    assert_eq!(gpu.cached_pipelines(), 1);
    check(
        &gpu,
        &cpu,
        50,
        &[Instr::Load(0), Instr::Elementwise(E::Neg)],
        &[DType::BF16],
        DType::BF16,
        999,
    );
    assert_eq!(gpu.cached_pipelines(), 2);
    // Finished work leaves its buffers in the pool for the next tensor.
    assert!(gpu.idle_bytes() > 0);
    gpu.trim();
    assert_eq!(gpu.idle_bytes(), 0);
}

#[test]
fn methods_without_a_gpu_kernel_are_left_to_the_cpu() {
    let Some(gpu) = gpu() else { return };
    // A MoE expert's noise (normals through f64 ln and cos).
    let op = MethodOp::Noise { scale: 0.01, key: 1 };
    let s = method_step(&op, &[DType::F32], DType::F32, &[4]);
    let data = vec![0u8; 16];
    let err = gpu.compute(&s, &[&data]).unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(err.to_string().contains("noise"), "{err}");
    // Inside an expression too: nothing of the step runs on the GPU.
    let mut s = s;
    if let Kernel::Whole(program) = &mut s.kernel {
        program.push(Instr::Elementwise(E::Scale(0.5)));
    }
    assert!(gpu.compute(&s, &[&data]).unwrap_err().is_unsupported());
    assert_eq!(gpu.stats().whole_steps, 0);
}

#[test]
fn wrong_inputs_and_bad_programs_are_errors_not_panics() {
    let Some(gpu) = gpu() else { return };
    let s = step(
        vec![Instr::Load(0), Instr::Load(1), Instr::Elementwise(E::Add)],
        &[DType::F16, DType::F32],
        DType::F32,
        3,
    );
    let (a, b) = (vec![0u8; 6], vec![0u8; 12]);
    assert!(matches!(
        gpu.compute(&s, &[&a]),
        Err(GpuError::InputCount { expected: 2, got: 1 })
    ));
    assert!(matches!(
        gpu.compute(&s, &[&a, &a]),
        Err(GpuError::InputSize {
            slot: 1,
            expected: 12,
            got: 6
        })
    ));
    assert!(gpu.compute(&s, &[&a, &b]).is_ok());
    let underflow = step(
        vec![Instr::Load(0), Instr::Elementwise(E::Add)],
        &[DType::F32],
        DType::F32,
        3,
    );
    let err = gpu.compute(&underflow, &[&b]).unwrap_err();
    assert!(
        matches!(err, GpuError::Kernel(_)) && !err.is_unsupported(),
        "{err}"
    );
    let ints = step(vec![Instr::Load(0)], &[DType::I32], DType::F32, 3);
    assert!(gpu.compute(&ints, &[&b]).unwrap_err().is_unsupported());
}

#[test]
fn more_inputs_than_storage_bindings_are_left_to_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let max = gpu.context().limits.max_storage_buffers_per_shader_stage as usize;
    if max > 64 {
        eprintln!("the adapter allows {max} storage buffers; not testing past them");
        return;
    }
    let cpu = cpu();
    // One binding goes to the output.
    for (inputs, fits) in [(max - 1, true), (max, false)] {
        let mut program: Vec<Instr> = (0..inputs).map(Instr::Load).collect();
        program.push(Instr::Elementwise(E::WeightedSum {
            weights: vec![1.0 / inputs as f32; inputs],
            divisor: None,
        }));
        if fits {
            check(
                &gpu,
                &cpu,
                77,
                &program,
                &vec![DType::BF16; inputs],
                DType::BF16,
                1001,
            );
        } else {
            let s = step(program, &vec![DType::BF16; inputs], DType::BF16, 2);
            let data = vec![0u8; 4];
            let err = gpu.compute(&s, &vec![data.as_slice(); inputs]).unwrap_err();
            assert!(err.is_unsupported(), "{err}");
        }
    }
}

#[test]
fn executors_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<GpuContext>();
    shareable::<GpuExecutor>();
    shareable::<GpuWithFallback>();
}

#[test]
fn copies_return_their_input() {
    let Some(gpu) = gpu() else { return };
    let mut s = step(vec![], &[DType::I32], DType::I32, 3);
    s.kernel = Kernel::Copy;
    let data: Vec<u8> = (0..12).collect();
    assert_eq!(gpu.compute(&s, &[&data]).unwrap(), data);
}

#[test]
fn the_adapter_in_use_is_listed() {
    let Some(gpu) = gpu() else { return };
    let listed = mergec::exec::gpu::list_adapters();
    assert!(listed.contains(&gpu.context().summary()), "{listed:?}");
}

/// Long sums keep their order: Mesa's GL compiler rebalanced `(((a + b) + c) + d) + e`
/// into a tree (1-2 ulp off) until every partial sum went through `keep`.
#[test]
fn long_sums_are_added_in_order() {
    use Instr::*;
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    for terms in 2..=9 {
        let mut chain: Vec<Instr> = vec![Load(0)];
        let mut sum: Vec<Instr> = (0..terms).map(Load).collect();
        for k in 1..terms {
            chain.extend([
                Load(k),
                Instr::Elementwise(E::Scale(0.1 * k as f32)),
                Instr::Elementwise(E::Add),
            ]);
        }
        for weights in [
            vec![1.0; terms],
            (0..terms).map(|k| 1.5 - 0.4 * k as f32).collect(),
        ] {
            let mut program = sum.clone();
            program.push(Instr::Elementwise(E::WeightedSum {
                weights,
                divisor: None,
            }));
            check(
                &gpu,
                &cpu,
                300 + terms as u64,
                &program,
                &vec![DType::F32; terms],
                DType::F32,
                3000,
            );
        }
        sum.push(Instr::Elementwise(E::WeightedSum {
            weights: vec![0.7; terms],
            divisor: Some(3.3),
        }));
        check(
            &gpu,
            &cpu,
            400 + terms as u64,
            &sum,
            &vec![DType::BF16; terms],
            DType::F32,
            3000,
        );
        check(
            &gpu,
            &cpu,
            500 + terms as u64,
            &chain,
            &vec![DType::F32; terms],
            DType::F32,
            3000,
        );
    }
}

/// Every file under `dir`, by path relative to it.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Whole runs through `exec::run`: a script of arithmetic in every output dtype, with a
/// whole-tensor method inside an expression, and every conformance script write the same
/// bytes on the GPU as on the CPU. Every step runs on the GPU except the method steps of
/// [`CPU_METHODS`].
#[test]
fn runs_write_the_cpus_bytes() {
    let Some(gpu) = gpu() else { return };
    let hybrid = GpuWithFallback::new(gpu, cpu());
    let arithmetic = r#"
model a = "models/micro-llama-ft1-bf16"
model b = "models/micro-llama-ft2-f32"
model c = "models/micro-llama-ft3-bf16"
save a + 0.5 * (b - a) to "out/arith-bf16"
save -(a - c) / 3 to "out/arith-f16" { dtype: f16 }
save linear(a { weight: 0.2 }, b { weight: 0.3 }, c { weight: 0.5 }) to "out/linear-f32" { dtype: f32 }
save 0.5 * slerp(a, c, t: 0.3) + 0.5 * b to "out/slerp-mix"
"#;
    let mut scripts = vec![("arithmetic".to_string(), arithmetic.to_string())];
    let dir = common::repo().join("tests/conformance");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "merge") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            scripts.push((name, std::fs::read_to_string(&path).unwrap()));
        }
    }
    scripts.sort();
    let reader = mergec::io::TensorReader::new();
    let mut whole_steps = 0;
    for (name, text) in &scripts {
        let mut written = Vec::new();
        let mut computed = 0;
        let mut sixteen_bit = false;
        let (gpu_before, cpu_before) = hybrid.steps();
        for on_gpu in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let (_, compiled) = common::compile_text(text, &common::conformance_dir(), tmp.path())
                .unwrap_or_else(|(s, d)| panic!("{name}: {}", common::render(&s, &d)));
            sixteen_bit = compiled.program.outputs[0].compute.half().is_some();
            if on_gpu {
                computed = compiled
                    .plan
                    .steps
                    .iter()
                    .filter(|s| !matches!(s.kernel, Kernel::Copy))
                    .count();
                whole_steps += compiled
                    .plan
                    .steps
                    .iter()
                    .filter(|s| matches!(s.kernel, Kernel::Whole(_)))
                    .count();
                mergec::exec::run(&compiled.plan, &hybrid, &reader, |_| {})
            } else {
                mergec::exec::run(&compiled.plan, &hybrid.cpu, &reader, |_| {})
            }
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            written.push(files(tmp.path()));
        }
        let (gpu_after, cpu_after) = hybrid.steps();
        // In a 16-bit compute dtype the whole-tensor methods run on the CPU (spec/ops.md);
        // the element-wise steps must still run on the GPU.
        if !sixteen_bit {
            assert_eq!(cpu_after, cpu_before, "{name}: steps left to the CPU");
        }
        if computed > 0 && !sixteen_bit {
            assert!(gpu_after > gpu_before, "{name}: nothing on the GPU");
        }
        assert_eq!(
            written[0].keys().collect::<Vec<_>>(),
            written[1].keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (file, bytes) in &written[0] {
            // The model card names the output folder, which differs.
            if !file.ends_with("README.md") {
                assert!(bytes == &written[1][file], "{name}: {file} differs");
            }
        }
    }
    let (on_gpu, on_cpu) = hybrid.steps();
    assert!(whole_steps > 100, "{whole_steps} whole-tensor steps");
    assert!(hybrid.gpu.stats().whole_steps as usize + on_cpu as usize >= whole_steps);
    let _ = writeln!(
        std::io::stderr(),
        "{} scripts: {on_gpu} steps on the GPU ({} whole-tensor), {on_cpu} on the CPU",
        scripts.len(),
        hybrid.gpu.stats().whole_steps,
    );
}

/// The conformance suite on the GPU backend: every fixture against mergekit's outputs with
/// the rules of tests/conformance.rs, and every step of a ported method on the GPU.
#[test]
fn conformance_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let hybrid = GpuWithFallback::new(gpu, cpu());
    let reader = mergec::io::TensorReader::new();
    let run = |name: &str, seed: Option<u64>| {
        let tmp = tempfile::tempdir().unwrap();
        let mut text =
            std::fs::read_to_string(common::repo().join(format!("tests/conformance/{name}.merge"))).unwrap();
        if let Some(seed) = seed {
            text = text.replace("set seed = 7", &format!("set seed = {seed}"));
        }
        let (_, compiled) = common::compile_text(&text, &common::conformance_dir(), tmp.path())
            .unwrap_or_else(|(s, d)| panic!("{name}: {}", common::render(&s, &d)));
        let (_, cpu_before) = hybrid.steps();
        mergec::exec::run(&compiled.plan, &hybrid, &reader, |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (_, cpu_after) = hybrid.steps();
        // In a 16-bit compute dtype the whole-tensor methods run on the CPU (spec/ops.md).
        if compiled.program.outputs[0].compute.half().is_none() {
            assert_eq!(cpu_after, cpu_before, "{name}: steps left to the CPU");
        }
        (tmp, compiled)
    };
    let mut names: Vec<String> = std::fs::read_dir(common::repo().join("tests/conformance"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "merge"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|n| common::conformance_dir().join("expected").join(n).exists())
        .collect();
    names.sort();
    assert!(names.len() > 30, "{} fixtures", names.len());
    for name in &names {
        let (tmp, compiled) = run(name, None);
        common::compare_with_expected(name, &tmp.path().join(name), &compiled, || {
            let (tmp2, _) = run(name, Some(8));
            let dir = tmp2.path().join(name);
            (tmp2, dir)
        });
    }
    assert!(hybrid.gpu.stats().whole_steps > 100, "{:?}", hybrid.gpu.stats());
}

// ---------------------------------------------------------------------------------------
// whole-tensor methods
// ---------------------------------------------------------------------------------------

use mergec::ops::{GtaKind, MethodOp};

/// A step computing `op` over `dtypes.len()` loaded inputs of `shape`.
fn method_step(op: &MethodOp, dtypes: &[DType], out: DType, shape: &[usize]) -> Step {
    let numel: usize = shape.iter().product();
    let mut s = step(vec![], dtypes, out, numel);
    s.shape = shape.to_vec();
    let mut program: Vec<Instr> = (0..dtypes.len()).map(Instr::Load).collect();
    program.push(Instr::Method {
        op: op.clone(),
        compute: mergec::ops::Compute::F32,
        arity: dtypes.len(),
    });
    s.kernel = Kernel::Whole(program);
    s
}

/// Values for method inputs: mostly ordinary (a shared component, so models are
/// correlated as fine-tunes are), with a sprinkling of ±0, subnormals and repeated
/// values; `specials` adds large magnitudes, infinities and NaN.
fn method_tensor(rng: &mut Rng, dtype: DType, n: usize, shared: &[f32], specials: bool) -> Vec<u8> {
    let values: Vec<f32> = (0..n)
        .map(|i| match rng.below(64) {
            0 => 0.0,
            1 => -0.0,
            2 => f32::from_bits(1 + rng.below(1000) as u32),
            3 => 0.25, // ties of |δ| at selection thresholds
            4 if specials => rng.pick(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 3e38, -1e30, 1e20]),
            _ => shared[i] + (rng.below(1 << 20) as f32 / (1 << 20) as f32 - 0.5) * 0.2,
        })
        .collect();
    let mut out = vec![0u8; n * dtype.size_bytes()];
    mergec::exec::cpu::encode(&values, dtype, &mut out);
    out
}

/// One unit in the last place of `dtype` at `x` (0 for f32: covered by the relative term).
fn ulp_of(dtype: DType, x: f32) -> f64 {
    let bits = match dtype {
        DType::BF16 => 8,
        DType::F16 => 11,
        _ => return 0.0,
    };
    let e = if x == 0.0 {
        -24
    } else {
        (x.abs() as f64).log2().floor() as i32
    };
    2f64.powi(e.max(-24) - bits + 1)
}

/// How a method's GPU result must agree with the CPU's (spec/ops.md, GPU tolerances).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Agreement {
    /// Bit for bit (NaN for NaN).
    Exact,
    /// Per element `|gpu − cpu| <= 1e-5·max|cpu| + 1 ulp of the output dtype`; the same
    /// elements NaN and the same infinities.
    Reduction,
}

fn decode_all(bytes: &[u8], dtype: DType) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / dtype.size_bytes()];
    mergec::exec::cpu::decode(bytes, dtype, &mut v);
    v
}

fn assert_agree(
    what: &str,
    step: &Step,
    inputs: &[&[u8]],
    cpu_out: &[u8],
    gpu_out: &[u8],
    agreement: Agreement,
) {
    match agreement {
        Agreement::Exact => assert_same(step, inputs, cpu_out, gpu_out),
        Agreement::Reduction => {
            assert_eq!(cpu_out.len(), gpu_out.len(), "{what}");
            let c = decode_all(cpu_out, step.dtype);
            let g = decode_all(gpu_out, step.dtype);
            let max = c
                .iter()
                .filter(|x| x.is_finite())
                .fold(0f64, |m, x| m.max(x.abs() as f64));
            if std::env::var_os("MERGEC_GPU_REPORT").is_some() {
                let same = c
                    .iter()
                    .zip(&g)
                    .filter(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()))
                    .count();
                let worst = c
                    .iter()
                    .zip(&g)
                    .filter(|(a, b)| a.is_finite() && b.is_finite())
                    .map(|(a, b)| (*a as f64 - *b as f64).abs() / max.max(f64::MIN_POSITIVE))
                    .fold(0f64, f64::max);
                let _ = writeln!(
                    std::io::stderr(),
                    "REPORT {what}: {same}/{} identical, worst {worst:e}",
                    c.len()
                );
            }
            for (i, (a, b)) in c.iter().zip(&g).enumerate() {
                let ok = if a.is_nan() || b.is_nan() || a.is_infinite() || b.is_infinite() {
                    a.is_nan() == b.is_nan() && (a.is_nan() || a == b)
                } else {
                    (*a as f64 - *b as f64).abs() <= 1e-5 * max + ulp_of(step.dtype, *a)
                };
                if !ok {
                    let ins: Vec<String> = step
                        .inputs
                        .iter()
                        .zip(inputs)
                        .map(|(s, b)| format!("{:e}", decode_all(b, s.dtype)[i]))
                        .collect();
                    panic!(
                        "{what}: element {i}: cpu {a:e}, gpu {b:e} (max |cpu| {max:e}); inputs {}",
                        ins.join(" ")
                    );
                }
            }
        }
    }
}

fn gta_op(kind: GtaKind, m: usize, density: f64, rescale: bool, normalize: bool) -> MethodOp {
    MethodOp::Gta(mergec::ops::GtaOp {
        kind,
        weights: (0..m).map(|i| [0.6, -0.3, 1.1, 0.45][i % 4]).collect(),
        densities: (0..m).map(|i| density * [1.0, 0.7, 0.9][i % 3]).collect(),
        gammas: vec![0.05; m],
        epsilons: vec![0.1 * density.min(1.0 - density).max(0.0); m],
        lambda: if normalize { 1.0 } else { 0.8 },
        normalize,
        rescale,
        keys: (0..m as u64)
            .map(|i| mergec::ops::rng_key(7, i as u32 + 1, "t"))
            .collect(),
    })
}

/// Every ported method: the op, its input count, how it must agree.
fn methods() -> Vec<(String, MethodOp, usize, Agreement)> {
    use Agreement::*;
    let mut out: Vec<(String, MethodOp, usize, Agreement)> = vec![
        ("slerp".into(), MethodOp::Slerp { t: 0.3 }, 2, Reduction),
        ("nearswap".into(), MethodOp::Nearswap { t: 0.01 }, 2, Exact),
        (
            "model_stock".into(),
            MethodOp::ModelStock { filter_wise: false },
            4,
            Reduction,
        ),
        (
            "model_stock filter_wise".into(),
            MethodOp::ModelStock { filter_wise: true },
            3,
            Reduction,
        ),
        (
            "karcher".into(),
            MethodOp::Karcher {
                max_iter: 10,
                tol: 1e-5,
            },
            3,
            Reduction,
        ),
        ("ram".into(), MethodOp::Ram { epsilon: 0.05 }, 4, Exact),
        (
            "ramplus_tl".into(),
            MethodOp::RamPlusTl {
                r: 0.4,
                alpha: 50.0,
                epsilon: 0.05,
            },
            4,
            Exact,
        ),
        ("ram lone".into(), MethodOp::Ram { epsilon: 0.05 }, 1, Exact),
        ("sce".into(), MethodOp::Sce { select_topk: 0.4 }, 4, Reduction),
        ("sce all".into(), MethodOp::Sce { select_topk: 1.0 }, 3, Reduction),
        (
            "sce none".into(),
            MethodOp::Sce { select_topk: 0.0 },
            3,
            Reduction,
        ),
        ("sce lone".into(), MethodOp::Sce { select_topk: 0.4 }, 1, Exact),
        ("arcee_fusion".into(), MethodOp::ArceeFusion, 2, Exact),
    ];
    for (flatten, row_wise) in [(true, false), (false, false), (false, true)] {
        for with_base in [false, true] {
            out.push((
                format!("nuslerp flatten={flatten} row_wise={row_wise} base={with_base}"),
                MethodOp::Nuslerp {
                    weights: [0.4, 0.9],
                    flatten,
                    row_wise,
                    with_base,
                },
                2 + usize::from(with_base),
                Reduction,
            ));
        }
    }
    for with_base in [false, true] {
        out.push((
            format!("multislerp base={with_base}"),
            MethodOp::Multislerp {
                weights: vec![0.2, 0.5, 0.3],
                normalize_weights: true,
                eps: 1e-8,
                with_base,
            },
            3 + usize::from(with_base),
            Reduction,
        ));
    }
    for kind in [
        GtaKind::TaskArithmetic,
        GtaKind::Ties,
        GtaKind::DareTies,
        GtaKind::DareLinear,
        GtaKind::Breadcrumbs,
        GtaKind::BreadcrumbsTies,
        GtaKind::Della,
        GtaKind::DellaLinear,
    ] {
        for (density, rescale, normalize) in [
            (0.5, false, true),
            (0.3, true, false),
            (1.0, false, false),
            (0.0, false, true),
        ] {
            let agreement = if rescale { Reduction } else { Exact };
            out.push((
                format!("{kind:?} density={density} rescale={rescale} normalize={normalize}"),
                gta_op(kind, 3, density, rescale, normalize),
                4,
                agreement,
            ));
        }
    }
    out
}

/// Runs every method on both executors over `shape` and compares.
fn check_methods(
    gpu: &GpuExecutor,
    cpu: &CpuExecutor,
    seed: u64,
    shape: &[usize],
    dtypes: &[DType],
    out: DType,
    specials: bool,
) {
    check_methods_in(gpu, cpu, seed, shape, dtypes, out, specials, false)
}

#[allow(clippy::too_many_arguments)]
fn check_methods_in(
    gpu: &GpuExecutor,
    cpu: &CpuExecutor,
    seed: u64,
    shape: &[usize],
    dtypes: &[DType],
    out: DType,
    specials: bool,
    long_rows: bool,
) {
    let n: usize = shape.iter().product();
    for (name, op, arity, agreement) in methods() {
        let mut rng = Rng(seed ^ name.len() as u64);
        let shared: Vec<f32> = (0..n)
            .map(|_| rng.below(1 << 16) as f32 / 32768.0 - 1.0)
            .collect();
        let data: Vec<Vec<u8>> = (0..arity)
            .map(|i| method_tensor(&mut rng, dtypes[i % dtypes.len()], n, &shared, specials))
            .collect();
        let inputs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let in_dtypes: Vec<DType> = (0..arity).map(|i| dtypes[i % dtypes.len()]).collect();
        let step = method_step(&op, &in_dtypes, out, shape);
        let expected = cpu.compute(&step, &inputs).unwrap();
        let got = match gpu.compute(&step, &inputs) {
            Ok(got) => got,
            // DELLA ranks and arcee_fusion's KL work within rows, and a chunk holds whole
            // rows: a row longer than a storage binding is left to the CPU.
            Err(e)
                if e.is_unsupported()
                    && (name.starts_with("Della") || name == "arcee_fusion")
                    && long_rows =>
            {
                continue
            }
            Err(e) => panic!("{name} {shape:?}: {e}"),
        };
        assert_agree(
            &format!("{name} {shape:?} {in_dtypes:?} -> {out:?}"),
            &step,
            &inputs,
            &expected,
            &got,
            agreement,
        );
    }
}

#[test]
fn methods_match_the_cpu_over_shapes() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    for (k, shape) in [
        vec![0],
        vec![1],
        vec![7],
        vec![3, 5],
        vec![1, 9],
        vec![33, 17],
        vec![4, 257],
        vec![2000],
    ]
    .iter()
    .enumerate()
    {
        check_methods(
            &gpu,
            &cpu,
            100 + k as u64,
            shape,
            &[DType::F32],
            DType::F32,
            false,
        );
    }
    let whole = gpu.stats().whole_steps;
    assert!(
        whole >= 8 * methods().len() as u64,
        "{whole} whole-tensor steps on the GPU"
    );
}

#[test]
fn methods_match_the_cpu_in_16_bit_dtypes() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    let mixed = [DType::BF16, DType::F16, DType::F32];
    for (k, out) in [DType::BF16, DType::F16, DType::F32].into_iter().enumerate() {
        check_methods(&gpu, &cpu, 200 + k as u64, &[33, 17], &mixed, out, false);
        check_methods(&gpu, &cpu, 210 + k as u64, &[5], &[DType::BF16], out, false);
    }
}

#[test]
fn methods_match_the_cpu_with_special_values() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    for (k, shape) in [vec![1], vec![9, 31], vec![700]].iter().enumerate() {
        check_methods(&gpu, &cpu, 300 + k as u64, shape, &[DType::F32], DType::F32, true);
        check_methods(
            &gpu,
            &cpu,
            310 + k as u64,
            shape,
            &[DType::BF16],
            DType::BF16,
            true,
        );
    }
}

/// A storage binding of 1 KiB (256 f32 elements per chunk) and grids of at most 2 x 2
/// workgroups: tensors of several chunks, rows and columns crossing chunk boundaries,
/// 2-D dispatches.
#[test]
fn methods_match_the_cpu_past_the_binding_and_dispatch_limits() {
    let Some(gpu) = gpu() else { return };
    let gpu = gpu
        .with_max_binding_bytes(1024)
        .with_max_workgroups_per_dimension(2);
    let cpu = cpu();
    let before = gpu.stats();
    for (k, shape) in [
        vec![40, 50],
        vec![3, 700],
        vec![1100],
        vec![2, 3, 333],
        vec![20, 64],
        vec![5, 256],
    ]
    .iter()
    .enumerate()
    {
        let long_rows = shape.last().unwrap() * 4 > 1024;
        check_methods_in(
            &gpu,
            &cpu,
            400 + k as u64,
            shape,
            &[DType::F32, DType::BF16],
            DType::BF16,
            false,
            long_rows,
        );
    }
    let after = gpu.stats();
    assert!(after.grids_2d > before.grids_2d, "no 2-D grid: {after:?}");
}

/// A whole-tensor method at full size: 2^24 + 3 elements are 65537 workgroups of one
/// element per invocation (a 2-D grid with the adapter's own limits), and an f32 tensor of
/// 64 MiB + 12 bytes; slerp reduces over all of it, then combines.
#[test]
fn a_method_past_65535_workgroups() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    let n = (1 << 24) + 3;
    let mut rng = Rng(99);
    let data: Vec<Vec<u8>> = (0..2).map(|_| large_tensor(&mut rng, DType::BF16, n)).collect();
    // Raw bf16 bit patterns include NaN: keep the values finite and moderate so the
    // reduction means something.
    let data: Vec<Vec<u8>> = data
        .into_iter()
        .map(|d| {
            d.chunks_exact(2)
                .flat_map(|c| {
                    let bits = u16::from_le_bytes([c[0], c[1]]);
                    ((bits & 0x807f) | 0x3c00).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let inputs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let step = method_step(&MethodOp::Slerp { t: 0.3 }, &[DType::BF16; 2], DType::BF16, &[n]);
    let before = gpu.stats();
    let got = gpu.compute(&step, &inputs).unwrap();
    let after = gpu.stats();
    assert!(after.grids_2d > before.grids_2d, "{after:?}");
    let expected = cpu.compute(&step, &inputs).unwrap();
    assert_agree(
        "slerp 2^24 + 3",
        &step,
        &inputs,
        &expected,
        &got,
        Agreement::Reduction,
    );
}

/// With no idle buffers kept, the pool frees every buffer given back: none may be freed
/// while recorded commands still use it.
#[test]
fn methods_run_with_no_pooled_buffers() {
    let Some(gpu) = gpu() else { return };
    let gpu = gpu.with_max_idle_bytes(0).with_max_binding_bytes(4096);
    let cpu = cpu();
    check_methods(
        &gpu,
        &cpu,
        500,
        &[9, 130],
        &[DType::BF16, DType::F32],
        DType::F16,
        false,
    );
    assert_eq!(gpu.idle_bytes(), 0);
}

/// The LoRA product `W + scale·(B·A)` (and its transpose) on the GPU against the CPU,
/// bit for bit: f32 and 16-bit factors, ranks 1 to 33, odd shapes, a result of several
/// chunks.
#[test]
fn lora_products_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    let mut rng = Rng(41);
    let before = gpu.stats().whole_steps;
    let cases: [(usize, usize, usize, bool, DType); 6] = [
        (32, 16, 4, false, DType::F32),
        (17, 33, 1, true, DType::F32),
        (64, 48, 33, false, DType::BF16),
        (5, 300, 8, true, DType::F16),
        (1, 1, 2, false, DType::F32),
        (700, 513, 16, false, DType::BF16),
    ];
    for (rows, cols, rank, transpose, factor_dtype) in cases {
        let (p, q) = if transpose { (cols, rows) } else { (rows, cols) };
        let numel = rows * cols;
        let values = |rng: &mut Rng, n: usize, dtype: DType| {
            let v: Vec<f32> = (0..n)
                .map(|_| (rng.below(1 << 20) as f32 / (1 << 20) as f32 - 0.5) * 0.5)
                .collect();
            let mut out = vec![0u8; n * dtype.size_bytes()];
            mergec::exec::cpu::encode(&v, dtype, &mut out);
            out
        };
        let w = values(&mut rng, numel, DType::F32);
        let b = values(&mut rng, p * rank, factor_dtype);
        let a = values(&mut rng, rank * q, factor_dtype);
        let program = vec![
            Instr::Load(0),
            Instr::Load(1),
            Instr::Load(2),
            Instr::Method {
                op: mergec::ops::MethodOp::LowRank {
                    scale: 0.37,
                    rank,
                    transpose,
                },
                compute: Compute::F32,
                arity: 2,
            },
            Instr::Elementwise(E::Add),
        ];
        let mut s = step(
            vec![],
            &[DType::F32, factor_dtype, factor_dtype],
            DType::F32,
            numel,
        );
        s.shape = vec![rows, cols];
        s.kernel = Kernel::Whole(program);
        s.inputs[1].bytes = b.len() as u64;
        s.inputs[2].bytes = a.len() as u64;
        let inputs: Vec<&[u8]> = vec![&w, &b, &a];
        let expected = cpu.compute(&s, &inputs).unwrap();
        let got = gpu
            .compute(&s, &inputs)
            .unwrap_or_else(|e| panic!("{rows}x{cols} rank {rank}: {e}"));
        assert_same(&s, &inputs, &expected, &got);
        // and the product is not zero: the factors reached the kernel
        assert_ne!(got, w, "{rows}x{cols} rank {rank}");
    }
    assert_eq!(
        gpu.stats().whole_steps,
        before + cases.len() as u64,
        "every case ran on the GPU"
    );
}

/// Embedding surgery under the GPU executor: the gathered rows reach the GPU kernels as
/// ordinary inputs; every vocabulary fixture matches the CPU run (within the f32 rule) and
/// mergekit's shapes, with no step left to the CPU.
#[test]
fn vocabularies_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let hybrid = GpuWithFallback::new(gpu, cpu());
    let reader = mergec::io::TensorReader::new();
    let dir = common::repo().join("tests/fixtures/vocab");
    for name in ["union_ta", "base_ties", "tokens_linear", "source_model_slerp"] {
        let text = std::fs::read_to_string(dir.join(format!("scripts/{name}.merge"))).unwrap();
        let (gpu_tmp, cpu_tmp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_, compiled) = common::compile_text(&text, &dir.join("scripts"), gpu_tmp.path())
            .unwrap_or_else(|(s, d)| panic!("{name}: {}", common::render(&s, &d)));
        assert!(
            compiled
                .plan
                .steps
                .iter()
                .any(|s| s.inputs.iter().any(|i| i.gather.is_some())),
            "{name}: no surgery"
        );
        let (_, cpu_before) = hybrid.steps();
        mergec::exec::run(&compiled.plan, &hybrid, &reader, |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(hybrid.steps().1, cpu_before, "{name}: steps left to the CPU");
        let (_, on_cpu) = common::compile_text(&text, &dir.join("scripts"), cpu_tmp.path())
            .unwrap_or_else(|(s, d)| panic!("{name}: {}", common::render(&s, &d)));
        common::run_compiled(&on_cpu, 2);
        let (g, c) = (gpu_tmp.path().join(name), cpu_tmp.path().join(name));
        assert_eq!(
            std::fs::read(g.join("tokenizer.json")).unwrap(),
            std::fs::read(c.join("tokenizer.json")).unwrap(),
            "{name}: tokenizer.json"
        );
        let expected = common::load_folder(&dir.join("expected").join(name));
        let (gt, ct) = (common::load_folder(&g), common::load_folder(&c));
        for (tensor, r) in &expected {
            assert_eq!(gt[tensor].shape, r.shape, "{name}: {tensor}");
        }
        for (tensor, c) in &ct {
            let max_ref = c.values.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
            let err = c
                .values
                .iter()
                .zip(&gt[tensor].values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err <= 1e-5 * max_ref,
                "{name}: {tensor}: GPU differs from CPU by {err:e}"
            );
        }
    }
}
