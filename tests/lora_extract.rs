//! `mergec extract-lora`: tiny synthetic base and fine-tune models written with the
//! safetensors crate, the fine-tune = base + known low-rank deltas; the extracted PEFT
//! adapter is read back and checked against those deltas.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mergec::diag::{Code, Diagnostics};
use mergec::lora_extract::{self, Options, SvdChoice};

/// A tensor to write: name, shape, f32 values.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Values in [-1, 1) from a fixed linear congruential sequence.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `b (m×r) · a (r×n)`, row-major, in f64 then rounded.
fn matmul(b: &[f32], a: &[f32], m: usize, r: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let sum: f64 = (0..r)
                .map(|k| f64::from(b[i * r + k]) * f64::from(a[k * n + j]))
                .sum();
            out[i * n + j] = sum as f32;
        }
    }
    out
}

const LAYERS: usize = 2;
const HIDDEN: usize = 24;
const Q_OUT: usize = 16;
const INTER: usize = 40;
const VOCAB: usize = 50;

/// A two-layer model: q_proj [16, 24] and down_proj [24, 40] per layer, a norm per
/// layer, embeddings and an output head.
fn base_tensors() -> Tensors {
    let mut t = Tensors::new();
    let mut seed = 1;
    let mut add = |name: String, shape: Vec<usize>| {
        seed += 1;
        let n = shape.iter().product();
        t.insert(name, (shape, values(n, seed)));
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]);
    add("lm_head.weight".into(), vec![VOCAB, HIDDEN]);
    add("model.norm.weight".into(), vec![HIDDEN]);
    for l in 0..LAYERS {
        add(
            format!("model.layers.{l}.self_attn.q_proj.weight"),
            vec![Q_OUT, HIDDEN],
        );
        add(
            format!("model.layers.{l}.mlp.down_proj.weight"),
            vec![HIDDEN, INTER],
        );
        add(format!("model.layers.{l}.input_layernorm.weight"), vec![HIDDEN]);
    }
    t
}

/// Adds a random rank-`rank` delta to the matrix `name`; returns the delta.
fn add_delta(t: &mut Tensors, name: &str, rank: usize, seed: u64) -> Vec<f32> {
    let (shape, w) = t.get_mut(name).unwrap();
    let (m, n) = (shape[0], shape[1]);
    let b = values(m * rank, seed);
    let a = values(rank * n, seed + 1000);
    let delta = matmul(&b, &a, m, rank, n);
    for (x, d) in w.iter_mut().zip(&delta) {
        *x += d;
    }
    // The delta as the model files hold it (after rounding the sum to f32).
    let base = base_tensors();
    w.iter().zip(&base[name].1).map(|(f, b)| f - b).collect()
}

fn write_model(dir: &Path, tensors: &Tensors) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, v))| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"]}"#,
    )
    .unwrap();
}

/// Writes base and fine-tune under `root`; returns their paths.
fn models(root: &Path, finetune: &Tensors) -> (PathBuf, PathBuf) {
    let (base, ft) = (root.join("base"), root.join("ft"));
    write_model(&base, &base_tensors());
    write_model(&ft, finetune);
    (ft, base)
}

fn extract(
    ft: &Path,
    base: &Path,
    out: &Path,
    options: &Options,
) -> Result<lora_extract::Report, Diagnostics> {
    lora_extract::run(
        &ft.display().to_string(),
        &base.display().to_string(),
        out,
        Path::new("."),
        options,
    )
}

/// The adapter's tensors (f32) and config.
fn read_adapter(dir: &Path) -> (Tensors, serde_json::Value) {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let v = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name.to_string(), (view.shape().to_vec(), v));
    }
    let config = serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    (out, config)
}

/// `B·A` of `module` from the adapter.
fn reconstruct(adapter: &Tensors, module: &str) -> Vec<f32> {
    let (sa, a) = &adapter[&format!("base_model.model.{module}.lora_A.weight")];
    let (sb, b) = &adapter[&format!("base_model.model.{module}.lora_B.weight")];
    assert_eq!(sa[0], sb[1], "{module}: rank of A and B");
    matmul(b, a, sb[0], sb[1], sa[1])
}

fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

fn codes(diags: &Diagnostics) -> Vec<Code> {
    diags.iter().map(|d| d.code).collect()
}

#[test]
fn round_trip_recovers_a_rank_r_delta() {
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    let mut deltas = BTreeMap::new();
    for l in 0..LAYERS {
        for (i, module) in [
            format!("model.layers.{l}.self_attn.q_proj"),
            format!("model.layers.{l}.mlp.down_proj"),
        ]
        .into_iter()
        .enumerate()
        {
            let delta = add_delta(
                &mut ft,
                &format!("{module}.weight"),
                3,
                10 + l as u64 * 7 + i as u64,
            );
            deltas.insert(module, delta);
        }
    }
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let out = dir.path().join("adapter");
    let report = extract(&ft_dir, &base_dir, &out, &Options::new(3)).unwrap();
    assert_eq!((report.modules, report.max_rank, report.min_rank), (4, 3, 3));
    assert!(report.kept_fraction > 0.999_999, "{}", report.kept_fraction);
    let (adapter, config) = read_adapter(&out);
    for (module, delta) in &deltas {
        let scale = delta.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = max_abs_diff(&reconstruct(&adapter, module), delta);
        assert!(
            err < 1e-5 * scale.max(1.0),
            "{module}: B·A misses the delta by {err}"
        );
        assert_eq!(
            adapter[&format!("base_model.model.{module}.lora_A.weight")].0[0],
            3
        );
    }
    // Only the LoRA factors: nothing else changed.
    assert_eq!(adapter.len(), 8, "{:?}", adapter.keys().collect::<Vec<_>>());
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 3);
    assert_eq!(config["lora_alpha"], 3);
    assert_eq!(config["rank_pattern"], serde_json::json!({}));
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["down_proj", "q_proj"])
    );
    assert_eq!(config["modules_to_save"], serde_json::Value::Null);
    assert_eq!(config["base_model_name_or_path"], base_dir.display().to_string());
    assert!(out.join(mergec::io::writer::MARKER_FILE).is_file());
}

#[test]
fn reconstruction_error_is_the_dropped_singular_values() {
    // A full-rank delta kept at rank 4: the squared error of W_base + B·A against the
    // fine-tune is the energy of the dropped singular values (Eckart–Young), which the
    // report gives as (1 - kept fraction) of the delta's energy.
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    let name = "model.layers.0.mlp.down_proj";
    let delta = add_delta(&mut ft, &format!("{name}.weight"), HIDDEN, 5);
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let out = dir.path().join("adapter");
    let mut options = Options::new(4);
    options.svd = SvdChoice::Exact;
    let report = extract(&ft_dir, &base_dir, &out, &options).unwrap();
    let (adapter, _) = read_adapter(&out);
    let approx = reconstruct(&adapter, name);
    let error: f64 = approx
        .iter()
        .zip(&delta)
        .map(|(a, d)| f64::from(a - d).powi(2))
        .sum();
    let energy: f64 = delta.iter().map(|&d| f64::from(d).powi(2)).sum();
    let dropped = (1.0 - report.kept_fraction) * energy;
    assert!(
        report.kept_fraction < 0.99,
        "a full-rank delta loses something at rank 4"
    );
    assert!(
        (error - dropped).abs() < 1e-4 * energy,
        "error² {error} vs dropped σ² {dropped}"
    );
}

#[test]
fn ranks_that_differ_go_to_rank_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    add_delta(&mut ft, "model.layers.0.self_attn.q_proj.weight", 2, 1);
    add_delta(&mut ft, "model.layers.1.self_attn.q_proj.weight", 2, 2);
    let d0 = add_delta(&mut ft, "model.layers.0.mlp.down_proj.weight", 5, 3);
    add_delta(&mut ft, "model.layers.1.mlp.down_proj.weight", 5, 4);
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let out = dir.path().join("adapter");
    let mut options = Options::new(8);
    // Float noise leaves singular values of about 1e-6 past the true rank.
    options.sv_epsilon = 1e-3;
    let report = extract(&ft_dir, &base_dir, &out, &options).unwrap();
    assert_eq!((report.min_rank, report.max_rank), (2, 5));
    let (adapter, config) = read_adapter(&out);
    assert_eq!(config["r"], 5);
    assert_eq!(config["lora_alpha"], 5);
    let pattern = serde_json::json!({
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.self_attn.q_proj": 2,
    });
    assert_eq!(config["rank_pattern"], pattern);
    assert_eq!(config["alpha_pattern"], pattern);
    assert_eq!(
        adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].0,
        vec![Q_OUT, 2]
    );
    let err = max_abs_diff(&reconstruct(&adapter, "model.layers.0.mlp.down_proj"), &d0);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn embeddings_and_changed_norms_are_saved_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    add_delta(&mut ft, "model.layers.0.self_attn.q_proj.weight", 2, 1);
    // A low-rank change of the embeddings is still saved whole, as is a changed norm.
    add_delta(&mut ft, "model.embed_tokens.weight", 1, 2);
    ft.get_mut("model.layers.1.input_layernorm.weight").unwrap().1[3] += 0.5;
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let out = dir.path().join("adapter");
    let report = extract(&ft_dir, &base_dir, &out, &Options::new(2)).unwrap();
    assert_eq!((report.modules, report.whole_modules), (1, 2));
    let (adapter, config) = read_adapter(&out);
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["model.embed_tokens", "model.layers.1.input_layernorm"])
    );
    assert_eq!(
        adapter["base_model.model.model.embed_tokens.weight"].1,
        ft["model.embed_tokens.weight"].1
    );
    assert_eq!(
        adapter["base_model.model.model.layers.1.input_layernorm.weight"].1,
        ft["model.layers.1.input_layernorm.weight"].1
    );
    // Not every q_proj is in the adapter: the targets are named in full, so PEFT puts no
    // LoRA layer on layer 1's.
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["model.layers.0.self_attn.q_proj"])
    );
    assert!(!adapter.contains_key("base_model.model.lm_head.weight"));
}

#[test]
fn output_bytes_are_the_same_on_every_run_and_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    for (i, name) in ft.keys().cloned().collect::<Vec<_>>().iter().enumerate() {
        if ft[name].0.len() == 2 {
            add_delta(&mut ft, name, 4, i as u64);
        }
    }
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let mut outputs = Vec::new();
    for (i, (threads, svd)) in [
        (1, SvdChoice::Auto),
        (4, SvdChoice::Auto),
        (3, SvdChoice::Randomized),
        (1, SvdChoice::Randomized),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}"));
        let mut options = Options::new(3);
        options.threads = threads;
        options.svd = svd;
        extract(&ft_dir, &base_dir, &out, &options).unwrap();
        outputs.push((
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(out.join("adapter_config.json")).unwrap(),
        ));
    }
    assert!(outputs[0] == outputs[1], "exact SVD: 1 vs 4 threads");
    assert!(outputs[2] == outputs[3], "randomized SVD: 3 vs 1 threads");
}

#[test]
fn force_replaces_an_adapter_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    add_delta(&mut ft, "model.layers.0.self_attn.q_proj.weight", 2, 1);
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let out = dir.path().join("adapter");
    extract(&ft_dir, &base_dir, &out, &Options::new(2)).unwrap();
    let again = extract(&ft_dir, &base_dir, &out, &Options::new(2)).unwrap_err();
    assert_eq!(codes(&again), vec![Code::E0405]);
    let mut forced = Options::new(2);
    forced.force = true;
    extract(&ft_dir, &base_dir, &out, &forced).unwrap();
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let refused = extract(&ft_dir, &base_dir, &foreign, &forced).unwrap_err();
    assert_eq!(codes(&refused), vec![Code::E0416]);
    let inside = extract(&ft_dir, &base_dir, &ft_dir.join("adapter"), &forced).unwrap_err();
    assert_eq!(codes(&inside), vec![Code::E0405]);
    assert!(std::fs::read_to_string(foreign.join("notes.txt")).unwrap() == "mine");
}

#[test]
fn malformed_inputs_give_coded_diagnostics() {
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    add_delta(&mut ft, "model.layers.0.self_attn.q_proj.weight", 2, 1);
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let out = dir.path().join("adapter");

    // Options: rank 0, a negative epsilon, a bad regex (E0920), all reported at once.
    let mut bad = Options::new(0);
    bad.sv_epsilon = -1.0;
    bad.include = vec!["(unclosed".into()];
    let diags = extract(&ft_dir, &base_dir, &out, &bad).unwrap_err();
    assert_eq!(codes(&diags), vec![Code::E0920; 3]);

    // A tensor only the fine-tune has (E0921).
    let mut extra = ft.clone();
    extra.insert("model.extra.weight".into(), (vec![4, 4], values(16, 9)));
    write_model(&dir.path().join("extra"), &extra);
    let diags = extract(&dir.path().join("extra"), &base_dir, &out, &Options::new(2)).unwrap_err();
    assert_eq!(codes(&diags), vec![Code::E0921]);
    assert!(
        diags.0[0].message.contains("model.extra.weight"),
        "{}",
        diags.0[0].message
    );

    // A resized vocabulary (E0922).
    let mut resized = ft.clone();
    resized.insert(
        "model.embed_tokens.weight".into(),
        (vec![VOCAB + 2, HIDDEN], values((VOCAB + 2) * HIDDEN, 3)),
    );
    write_model(&dir.path().join("resized"), &resized);
    let diags = extract(&dir.path().join("resized"), &base_dir, &out, &Options::new(2)).unwrap_err();
    assert_eq!(codes(&diags), vec![Code::E0922]);
    assert!(diags.0[0].help[0].contains("vocabulary"));

    // The same model twice: nothing to extract (E0923); nothing written.
    let diags = extract(&base_dir, &base_dir, &out, &Options::new(2)).unwrap_err();
    assert_eq!(codes(&diags), vec![Code::E0923]);
    assert!(!out.exists());

    // One module's SVD over the memory budget (E0924), refused before anything is read.
    let mut small = Options::new(2);
    small.max_memory = Some(1000);
    let diags = extract(&ft_dir, &base_dir, &out, &small).unwrap_err();
    assert_eq!(codes(&diags), vec![Code::E0924]);

    // NaN in a fine-tuned weight (E0925).
    let mut nan = ft.clone();
    nan.get_mut("model.layers.1.mlp.down_proj.weight").unwrap().1[7] = f32::NAN;
    write_model(&dir.path().join("nan"), &nan);
    let diags = extract(&dir.path().join("nan"), &base_dir, &out, &Options::new(2)).unwrap_err();
    assert_eq!(codes(&diags), vec![Code::E0925]);
    assert!(!out.exists());

    // A missing model: the model-reference codes every command uses.
    let diags = extract(&dir.path().join("missing"), &base_dir, &out, &Options::new(2)).unwrap_err();
    assert_eq!(codes(&diags), vec![Code::E0401]);
}

#[test]
fn excluded_differences_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    add_delta(&mut ft, "model.layers.0.self_attn.q_proj.weight", 2, 1);
    add_delta(&mut ft, "model.layers.1.mlp.down_proj.weight", 2, 2);
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let out = dir.path().join("adapter");
    let mut options = Options::new(2);
    options.exclude = vec!["mlp".into()];
    let report = extract(&ft_dir, &base_dir, &out, &options).unwrap();
    assert_eq!(codes(&report.warnings), vec![Code::W0030]);
    assert!(report.warnings.0[0]
        .message
        .contains("model.layers.1.mlp.down_proj.weight"));
    let (adapter, _) = read_adapter(&out);
    assert_eq!(adapter.len(), 2);
    // --include keeps only what matches.
    let mut only = Options::new(2);
    only.include = vec![r"layers\.1\.".into()];
    only.force = true;
    let report = extract(&ft_dir, &base_dir, &out, &only).unwrap();
    assert_eq!(report.modules, 1);
    assert_eq!(codes(&report.warnings), vec![Code::W0030]);
}

#[test]
fn the_command_line_reports_codes_and_writes_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let mut ft = base_tensors();
    add_delta(&mut ft, "model.layers.0.self_attn.q_proj.weight", 2, 1);
    let (ft_dir, base_dir) = models(dir.path(), &ft);
    let out = dir.path().join("adapter");
    let mergec = env!("CARGO_BIN_EXE_mergec");
    let run = |args: &[&str]| std::process::Command::new(mergec).args(args).output().unwrap();
    let (f, b, o) = (
        ft_dir.to_str().unwrap(),
        base_dir.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let refused = run(&["extract-lora", f, b, o, "--rank", "0"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("[E0920]"), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    let ok = run(&["extract-lora", f, b, o, "--rank", "2", "--max-memory", "64MB"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("1 LoRA module at rank 2"), "{stdout}");
    assert!(out.join("adapter_model.safetensors").is_file());
}
