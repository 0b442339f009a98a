//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod adapters;
pub mod llama_reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mergec::driver::{self, Compiled, Script};
use mergec::exec::{CpuExecutor, RunReport};
use mergec::io::TensorReader;
use mergec::plan::Limits;

/// Expands to `$suite! { case, ... }` with every conformance case (a script in
/// tests/conformance/scripts and a mergekit config in tests/conformance/configs each), so
/// the script and the YAML suites test the same list.
#[allow(unused_macros)] // used by conformance.rs and import.rs only
macro_rules! conformance_cases {
    ($suite:ident) => {
        $suite! {
            linear_f32, linear_nonorm_f32, linear_bf16, linear_sharded_f32,
            slerp_f32, slerp_bf16, slerp_f16, nuslerp_flat_f32, nuslerp_rowwise_base_f32,
            nuslerp_flat_bf16, nuslerp_rowwise_base_bf16,
            multislerp_f32, multislerp_base_f32, multislerp_bf16, multislerp_base_bf16,
            karcher_f32, karcher_bf16,
            task_arithmetic_f32, task_arithmetic_bf16, task_arithmetic_f16,
            task_arithmetic_f32compute_bf16out,
            ties_f32, ties_bf16, ties_f16, ties_gradient_f32,
            dare_ties_f32, dare_ties_bf16, dare_linear_f32, della_f32, della_bf16, della_linear_f32,
            breadcrumbs_f32, breadcrumbs_bf16, breadcrumbs_ties_f32, breadcrumbs_ties_bf16,
            sce_f32, sce_bf16, ram_f32, ram_bf16, ramplus_tl_f32, ramplus_tl_bf16,
            model_stock_2_f32, model_stock_3_f32, model_stock_2_bf16, model_stock_3_bf16,
            nearswap_f32, nearswap_bf16, arcee_fusion_f32, arcee_fusion_bf16,
            vlm_linear_f32, vlm_slerp_f32,
            passthrough_stack_f32, passthrough_stack_bf16, passthrough_scale_f32, slices_blend_f32,
        }
    };
}
#[allow(unused_imports)]
pub(crate) use conformance_cases;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn conformance_dir() -> PathBuf {
    repo().join("tests/fixtures/conformance")
}

/// A decoded tensor: dtype name, shape, values as f32.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every tensor of a model folder (single file or sharded with an index).
pub fn load_folder(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut files = Vec::new();
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let mut shards: Vec<String> = json["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        shards.sort();
        shards.dedup();
        files.extend(shards.into_iter().map(|s| dir.join(s)));
    } else {
        files.push(dir.join("model.safetensors"));
    }
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let dtype = format!("{:?}", view.dtype());
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            out.insert(
                name.to_string(),
                Tensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
    }
    out
}

/// Compiles `text` as if it were a script in `base_dir`, with outputs redirected from
/// `"out/` to `out_dir`.
pub fn compile_text(
    text: &str,
    base_dir: &Path,
    out_dir: &Path,
) -> Result<(Script, Compiled), (Script, mergec::diag::Diagnostics)> {
    let text = text.replace("to \"out/", &format!("to \"{}/", out_dir.display()));
    let script = Script::from_text("test.merge", text, base_dir.to_path_buf());
    match driver::compile(&script, false, &Limits::default()) {
        Ok(c) => Ok((script, c)),
        Err(d) => Err((script, d)),
    }
}

pub fn run_compiled(c: &Compiled, threads: usize) -> RunReport {
    let executor = CpuExecutor::new(threads, 1000).unwrap();
    let reader = TensorReader::new();
    mergec::exec::run(&c.plan, &executor, &reader, |_| {}).unwrap()
}

pub fn render(script: &Script, diags: &mergec::diag::Diagnostics) -> String {
    mergec::diag::render::render_text(&diags.0, &script.sources, false)
}

/// The spacing of the numbers of `dtype` at `|x|`, subnormals included (compare.py's
/// `ulp_of`).
fn ulp_of(x: f32, dtype: &str) -> f64 {
    let (bits, emin) = match dtype {
        "BF16" => (8, -133),
        "F16" => (11, -24),
        _ => (24, -149),
    };
    if x == 0.0 || !x.is_finite() {
        return 2f64.powi(emin);
    }
    // frexp's exponent: |x| = m·2^e with m in [0.5, 1)
    let e = (x.abs() as f64).log2().floor() as i32 + 1;
    2f64.powi((e - bits).max(emin))
}

fn ulp_bf16(x: f32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        2f64.powi(-133)
    } else {
        2f64.powf((x.abs() as f64).log2().floor() - 7.0)
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += *x as f64 * *x as f64;
        bb += *y as f64 * *y as f64;
    }
    match (aa == 0.0, bb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => ab / (aa.sqrt() * bb.sqrt()),
    }
}

fn config_without_version(dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("transformers_version");
    v
}

type Folder = BTreeMap<String, Tensor>;

/// `|a - b|`, with NaN against a number (or infinities of opposite sign) as infinitely far
/// and NaN against NaN as equal, as compare.py does.
fn diff(a: f32, b: f32) -> f64 {
    if a.is_nan() && b.is_nan() {
        return 0.0;
    }
    let d = (a as f64 - b as f64).abs();
    if d.is_nan() {
        f64::INFINITY
    } else {
        d
    }
}

/// The largest difference of any element in ulps of the reference (in our dtype), over
/// every tensor: what the mk rule bounds by 1.
pub fn max_ulps(reference: &Folder, ours: &Folder) -> f64 {
    let mut worst = 0f64;
    for (tensor, r) in reference {
        let c = &ours[tensor];
        for (a, b) in r.values.iter().zip(&c.values) {
            worst = worst.max(diff(*a, *b) / ulp_of(*a, &c.dtype));
        }
    }
    worst
}

fn deterministic(
    name: &str,
    method: &str,
    mode: &str,
    reference: &Folder,
    ours: &Folder,
    base: Option<&Folder>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (tensor, r) in reference {
        let c = &ours[tensor];
        let n = r.values.len();
        let over = if mode == "mk" {
            r.values
                .iter()
                .zip(&c.values)
                .filter(|(a, b)| diff(**a, **b) > ulp_of(**a, &c.dtype))
                .count()
        } else if mode == "f32" {
            let max_ref = r.values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let limit = 1e-5 * max_ref.max(1.0) as f64;
            r.values
                .iter()
                .zip(&c.values)
                .filter(|(a, b)| diff(**a, **b) > limit)
                .count()
        } else {
            let d = base
                .and_then(|b| b.get(tensor))
                .map(|b| {
                    r.values
                        .iter()
                        .zip(&b.values)
                        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
                })
                .unwrap_or(0.0);
            let extra = 2.0 * if d == 0.0 { 0.0 } else { ulp_bf16(d) };
            r.values
                .iter()
                .zip(&c.values)
                .filter(|(a, b)| diff(**a, **b) > 2.0 * ulp_bf16(**a) + extra)
                .count()
        };
        let allowed = if method == "arcee_fusion" {
            (n / 100).max(4)
        } else if (mode == "bf16" || mode == "mk")
            && ["ties", "breadcrumbs", "breadcrumbs_ties", "sce"].contains(&method)
        {
            (n / 20).max(4)
        } else {
            0
        };
        let cos = cosine(&r.values, &c.values);
        let cos_ok = cos >= 0.999; // false for NaN
        if over > allowed || (over > 0 && !cos_ok) {
            failures.push(format!(
                "{name}: {tensor}: {over}/{n} elements out of tolerance (allowed {allowed}), cos {cos:.6}"
            ));
        }
    }
    failures
}

/// The README's stats rules; `ours2` is a second run of ours with another seed.
fn statistical(
    name: &str,
    reference: &Folder,
    reference2: &Folder,
    ours: &Folder,
    ours2: &Folder,
    base: &Folder,
) -> Vec<String> {
    let mut failures = Vec::new();
    let (mut n_all, mut kept_r, mut kept_c, mut l1_r, mut l1_c) = (0usize, 0usize, 0usize, 0f64, 0f64);
    let (mut cos_rc, mut cos_rr, mut cos_cc) = (Vec::new(), Vec::new(), Vec::new());
    for (tensor, r) in reference {
        let b = &base[tensor].values;
        let delta = |v: &[f32]| -> Vec<f32> { v.iter().zip(b).map(|(x, y)| x - y).collect() };
        let (dr, dc) = (delta(&r.values), delta(&ours[tensor].values));
        let (dr2, dc2) = (delta(&reference2[tensor].values), delta(&ours2[tensor].values));
        let n = dr.len();
        let (kr, kc) = (
            dr.iter().filter(|x| **x != 0.0).count(),
            dc.iter().filter(|x| **x != 0.0).count(),
        );
        let (lr, lc): (f64, f64) = (
            dr.iter().map(|x| x.abs() as f64).sum(),
            dc.iter().map(|x| x.abs() as f64).sum(),
        );
        n_all += n;
        kept_r += kr;
        kept_c += kc;
        l1_r += lr;
        l1_c += lc;
        if n >= 256 {
            let (pr, pc) = (kr as f64 / n as f64, kc as f64 / n as f64);
            let p = (pr + pc) / 2.0;
            let ktol = 0.02f64.max(6.0 * (2.0 * p * (1.0 - p) / n as f64).sqrt());
            if (pr - pc).abs() > ktol {
                failures.push(format!(
                    "{name}: {tensor}: kept {pr:.4} vs {pc:.4} (tol {ktol:.4})"
                ));
            }
            let abs: Vec<f64> = dr.iter().map(|x| x.abs() as f64).collect();
            let mean = abs.iter().sum::<f64>() / n as f64;
            let var = abs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
            let rel_sd = if mean > 0.0 {
                (var / n as f64).sqrt() / mean
            } else {
                0.0
            };
            let ltol = 0.05f64.max(6.0 * 2f64.sqrt() * rel_sd);
            let rel = if lr > 0.0 { (lc - lr).abs() / lr } else { 0.0 };
            if rel > ltol {
                failures.push(format!(
                    "{name}: {tensor}: L1 of delta differs by {rel:.4} (tol {ltol:.4})"
                ));
            }
            let nonzero = |v: &[f32]| v.iter().any(|x| *x != 0.0);
            if nonzero(&dr) && nonzero(&dc) {
                cos_rc.push(cosine(&dr, &dc));
            }
            if nonzero(&dr) && nonzero(&dr2) {
                cos_rr.push(cosine(&dr, &dr2));
            }
            if nonzero(&dc) && nonzero(&dc2) {
                cos_cc.push(cosine(&dc, &dc2));
            }
        }
    }
    let (pr, pc) = (kept_r as f64 / n_all as f64, kept_c as f64 / n_all as f64);
    if (pr - pc).abs() > 0.02 {
        failures.push(format!("{name}: pooled kept fraction {pr:.4} vs {pc:.4}"));
    }
    if (l1_c - l1_r).abs() / l1_r > 0.05 {
        failures.push(format!("{name}: pooled L1 of delta {l1_r:.4e} vs {l1_c:.4e}"));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (rc, rr, cc) = (mean(&cos_rc), mean(&cos_rr), mean(&cos_cc));
    assert!(
        !cos_rr.is_empty(),
        "{name}: no tensor large enough for the cosine check"
    );
    if (rc - rr).abs() > 0.02 {
        failures.push(format!(
            "{name}: mean cos(d_ref, d_ours) {rc:.4} vs cos(d_ref, d_ref2) {rr:.4}"
        ));
    }
    if (cc - rr).abs() > 0.02 {
        failures.push(format!(
            "{name}: mean cos(d_ours, d_ours2) {cc:.4} vs cos(d_ref, d_ref2) {rr:.4}"
        ));
    }
    failures
}

/// Compares the output folder `ours_dir` (compiled as `compiled`) with
/// `expected/NAME` as its fixture.json says; `seed8` runs the same merge with seed 8
/// (for the random methods) and returns its output folder.
pub fn compare_with_expected(
    name: &str,
    ours_dir: &Path,
    compiled: &Compiled,
    seed8: impl FnOnce() -> (tempfile::TempDir, PathBuf),
) {
    let expected = conformance_dir().join("expected").join(name);
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(expected.join("fixture.json")).unwrap()).unwrap();
    let method = fixture["merge_method"].as_str().unwrap();
    // A 16-bit compute dtype reproduces mergekit's own arithmetic: 1 ulp (compare.py's mk).
    let mode = match fixture["tol_mode"].as_str().unwrap() {
        "stats" => "stats",
        _ if compiled.program.outputs[0].compute.half().is_some() => "mk",
        mode => mode,
    };
    let base = fixture["base_model"]
        .as_str()
        .map(|b| load_folder(&conformance_dir().join(b)));
    let ours = load_folder(ours_dir);
    let reference = load_folder(&expected);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>(),
        "{name}: tensor names"
    );
    for (tensor, r) in &reference {
        // mergekit promotes arcee_fusion and ramplus_tl to F32 in a 16-bit merge; we keep
        // the dtype asked for (compare.py's mk mode accepts it).
        let promoted = mode == "mk" && r.dtype == "F32";
        assert_eq!(ours[tensor].shape, r.shape, "{name}: {tensor}");
        assert!(
            ours[tensor].dtype == r.dtype || promoted,
            "{name}: {tensor}: {} vs {}",
            ours[tensor].dtype,
            r.dtype
        );
    }
    let failures = if mode == "stats" {
        let (_tmp2, dir2) = seed8();
        let ours2 = load_folder(&dir2);
        let reference2 = load_folder(&conformance_dir().join("expected").join(format!("{name}.seed8")));
        statistical(
            name,
            &reference,
            &reference2,
            &ours,
            &ours2,
            base.as_ref().unwrap(),
        )
    } else {
        if mode == "mk" {
            eprintln!(
                "{name}: max {:.2} ulp of mergekit's output",
                max_ulps(&reference, &ours)
            );
        }
        deterministic(name, method, mode, &reference, &ours, base.as_ref())
    };
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        config_without_version(ours_dir),
        config_without_version(&expected),
        "{name}: config.json"
    );
    // Tokenizer and generation files are byte copies of the donor's (the first input).
    let donor = compiled.program.models[compiled.program.outputs[0].tokenizer_from.unwrap().0 as usize]
        .info
        .root
        .clone();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(ours_dir.join(f)).unwrap(),
            std::fs::read(donor.join(f)).unwrap(),
            "{name}: {f}"
        );
    }
}

/// Writes the three tiny bf16 models `mergec demo` uses (base, chat, math) under `dir/models`.
pub fn write_demo_models(dir: &Path) {
    mergec::synth::write_demo_models(dir).unwrap_or_else(|(p, e)| panic!("{}: {e}", p.display()));
}

/// A checkout's layout in `dir`: the demo models under `demo/` and an empty `examples/`;
/// returns `examples/`, the folder the scripts of `examples/` resolve their paths against.
pub fn demo_checkout(dir: &Path) -> PathBuf {
    write_demo_models(&dir.join("demo"));
    let examples = dir.join("examples");
    std::fs::create_dir_all(&examples).unwrap();
    examples
}
