//! `mergec-bench`: end-to-end benchmark of the real `mergec` binary.
//!
//! For each scenario it measures the merge's wall time and peak RSS against an I/O floor
//! (reading every input once plus writing one output-sized file with fsync, on the same
//! machine, right before the merge), so the ratio says how close mergec gets to the disk.
//!
//! The floor reads exactly the input tensors the merge's plan reads (coalesced byte ranges,
//! file by file) and writes as many bytes as the plan writes, so scenarios that read part
//! of a model (a layer stack) are measured against what they must move, not whole folders.
//!
//! Run as `cargo run --release --bin mergec-bench -- [--workdir DIR] [--keep] [--repeat N]`.
//! When launched by cargo it first builds `mergec` with the same profile, so the binary
//! measured is never stale.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "mergec-bench", about = "Benchmark mergec against the I/O floor")]
struct Args {
    /// Folder for generated models, scripts and outputs (kept between runs, so the
    /// models are generated only once).
    #[arg(long, default_value = "target/bench")]
    workdir: PathBuf,
    /// Keep each scenario's merged output instead of deleting it at the end.
    #[arg(long)]
    keep: bool,
    /// Measure each scenario N times (floor + merge each time); reports best and median.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Do not rebuild `mergec` first, even when launched by cargo.
    #[arg(long)]
    no_build: bool,
    /// Run only the scenarios with these names (default: all).
    #[arg(long = "only")]
    only: Vec<String>,
    /// Also run each scenario on a software GPU adapter (lavapipe) when no hardware one
    /// exists; its timings say nothing about GPUs, only that the path works.
    #[arg(long)]
    software_gpu: bool,
    /// The `mergec synth` preset of the inputs (`tiny` checks the scenarios run, quickly).
    #[arg(long, default_value = PRESET)]
    preset: String,
}

/// Peak RSS of a merge at the default budget must stay under this.
const TARGET_RSS_BYTES: u64 = 512 << 20;
/// With `--max-memory B`, peak RSS must stay under `B` plus this (code, stacks, allocator).
const BUDGET_SLACK_BYTES: u64 = 64 << 20;
/// Buffer of the floor's reads and writes.
const FLOOR_BUF: usize = 8 << 20;

/// Default preset and seed of the generated inputs; every input is a variant of one base.
const PRESET: &str = "bench350m";
const SEED: u64 = 42;
/// Bump when `mergec synth` changes its output, so stale inputs get regenerated.
const SYNTH_FORMAT: u32 = 2;
/// Input models as (folder name under `models/`, synth variant).
const MODELS: &[(&str, u32)] = &[("base", 0), ("ft1", 1), ("ft2", 2), ("ft3", 3)];

/// What a scenario runs.
#[derive(Clone, Copy)]
enum Work {
    /// `mergec run` of this script.
    Script(&'static str),
    /// `mergec extract-lora models/FINETUNE models/BASE OUTPUT --rank RANK`: reads both
    /// models whole and writes the adapter; its floor's write is the adapter's size.
    Extract {
        finetune: &'static str,
        base: &'static str,
        rank: &'static str,
    },
}

/// One benchmarked merge. Paths in `script` are relative to the workdir (where the script
/// is written); `output` names the folder the script writes.
struct Scenario {
    name: &'static str,
    work: Work,
    output: &'static str,
    /// `--max-memory` for the run, as the CLI takes it.
    max_memory: Option<&'static str>,
    /// Median wall time must stay under this multiple of the I/O floor.
    target_ratio: f64,
}

impl Scenario {
    /// Peak RSS must stay under the budget plus slack, or the default target.
    fn target_rss(&self) -> u64 {
        match self.max_memory.and_then(parse_size) {
            Some(budget) => budget + BUDGET_SLACK_BYTES,
            None => TARGET_RSS_BYTES,
        }
    }
}

/// `256MB` (powers of 1000), `256MiB` (powers of 1024) or bytes, as `mergec` reads them.
fn parse_size(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    number.parse::<u64>().ok().map(|n| n * scale)
}

const LINEAR3: &str = r#"model a = "models/ft1"
model b = "models/ft2"
model c = "models/ft3"
save linear(a { weight: 0.5 }, b { weight: 0.3 }, c { weight: 0.2 }) to "out/linear3" { dtype: bf16 }
"#;

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "linear3",
        work: Work::Script(LINEAR3),
        output: "out/linear3",
        max_memory: None,
        target_ratio: 1.3,
    },
    Scenario {
        name: "ties4",
        work: Work::Script(
            r#"model base = "models/base"
model a = "models/ft1"
model b = "models/ft2"
model c = "models/ft3"
save ties(base, a { weight: 0.5, density: 0.5 }, b { weight: 0.3, density: 0.5 }, c { weight: 0.2, density: 0.5 })
    to "out/ties4" { dtype: bf16 }
"#,
        ),
        output: "out/ties4",
        max_memory: None,
        target_ratio: 2.0,
    },
    // mergekit's own bf16 arithmetic (`compute: bf16`): whole tensors, op for op as torch.
    Scenario {
        name: "ties4-bf16",
        work: Work::Script(
            r#"model base = "models/base"
model a = "models/ft1"
model b = "models/ft2"
model c = "models/ft3"
save ties(base, a { weight: 0.5, density: 0.5 }, b { weight: 0.3, density: 0.5 }, c { weight: 0.2, density: 0.5 })
    to "out/ties4" { dtype: bf16, compute: bf16 }
"#,
        ),
        output: "out/ties4",
        max_memory: None,
        target_ratio: 4.0,
    },
    Scenario {
        name: "slerp2",
        work: Work::Script(
            r#"model a = "models/ft1"
model b = "models/ft2"
save slerp(a, b, t: 0.5) to "out/slerp2" { dtype: bf16 }
"#,
        ),
        output: "out/slerp2",
        max_memory: None,
        target_ratio: 1.5,
    },
    Scenario {
        name: "solar",
        work: Work::Script(
            r#"model a = "models/ft1"
model b = "models/ft2"
save stack(a.layers[0..16], b.layers[8..24]) to "out/solar" { dtype: bf16 }
"#,
        ),
        output: "out/solar",
        max_memory: None,
        target_ratio: 1.2,
    },
    // A rank-32 PEFT adapter (generated by `ensure_adapter`) applied to the base: the
    // product fused into the merge, no merged copy written first.
    Scenario {
        name: "lora-apply",
        work: Work::Script(
            r#"model base = "models/base"
save lora(base, "adapters/r32") to "out/lora" { dtype: bf16 }
"#,
        ),
        output: "out/lora",
        max_memory: None,
        target_ratio: 1.5,
    },
    Scenario {
        name: "linear3-256MB",
        work: Work::Script(LINEAR3),
        output: "out/linear3",
        max_memory: Some("256MB"),
        target_ratio: 1.3,
    },
    // Extraction is bound by the SVDs, not the disk: the ratio says how far from it.
    Scenario {
        name: "extract",
        work: Work::Extract {
            finetune: "ft1",
            base: "base",
            rank: "32",
        },
        output: "out/extract",
        max_memory: Some("1GB"),
        target_ratio: 30.0,
    },
];

/// Which executor a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Cpu,
    Gpu,
}

impl Backend {
    fn flag(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Gpu => "gpu",
        }
    }
}

/// One floor + merge measurement.
struct Sample {
    floor_read: Duration,
    floor_write: Duration,
    wall: Duration,
    peak_rss_bytes: Option<u64>,
}

impl Sample {
    fn floor(&self) -> Duration {
        self.floor_read + self.floor_write
    }
    fn ratio(&self) -> f64 {
        self.wall.as_secs_f64() / self.floor().as_secs_f64().max(1e-9)
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("mergec-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let workdir = std::path::absolute(&args.workdir)?;
    fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let mergec = mergec_binary(!args.no_build)?;
    println!("mergec: {}", mergec.display());
    println!("workdir: {}", workdir.display());
    println!(
        "cores: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let mut backends = vec![Backend::Cpu];
    let adapters = mergec::exec::gpu::list_adapters();
    match adapters.iter().find(|a| !a.is_software()) {
        Some(hw) => {
            println!("GPU: {hw}");
            backends.push(Backend::Gpu);
        }
        None if args.software_gpu && !adapters.is_empty() => {
            println!("GPU: no hardware adapter; --software-gpu runs on a software one (timings say nothing about GPUs)");
            backends.push(Backend::Gpu);
        }
        None => {
            let seen: Vec<String> = adapters.iter().map(|a| a.to_string()).collect();
            println!(
                "GPU: no hardware adapter (seen: {}); GPU rows skipped",
                if seen.is_empty() {
                    "none".to_string()
                } else {
                    seen.join("; ")
                }
            );
        }
    }

    ensure_models(&mergec, &workdir, &args.preset)?;
    ensure_adapter(&workdir, &args.preset)?;

    let mut failed = false;
    let mut rows = Vec::new();
    for scenario in SCENARIOS
        .iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.name))
    {
        for &backend in &backends {
            // Extraction has no GPU path: its SVDs run on the CPU.
            if matches!(scenario.work, Work::Extract { .. }) && backend != Backend::Cpu {
                continue;
            }
            match run_scenario(&mergec, &workdir, scenario, backend, &args)? {
                Some(row) => rows.push(row),
                None => failed = true,
            }
        }
    }
    print_summary(&rows);
    if failed {
        bail!("a merge failed");
    }
    Ok(())
}

/// The `mergec` next to this executable; rebuilt first when cargo launched us.
fn mergec_binary(build: bool) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mergec = exe.with_file_name(format!("mergec{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var_os("CARGO");
    if let (true, Some(cargo)) = (build, cargo) {
        // <target>/<profile dir>/mergec-bench: "debug" is the dev profile's folder.
        let profile_dir = exe.parent().and_then(Path::file_name).and_then(|s| s.to_str());
        let target_dir = exe.parent().and_then(Path::parent);
        if let (Some(profile_dir), Some(target_dir)) = (profile_dir, target_dir) {
            let profile = if profile_dir == "debug" {
                "dev"
            } else {
                profile_dir
            };
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
            let status = Command::new(cargo)
                .args(["build", "--quiet", "--bin", "mergec", "--profile", profile])
                .arg("--manifest-path")
                .arg(&manifest)
                .arg("--target-dir")
                .arg(target_dir)
                .status()
                .context("running cargo build for mergec")?;
            if !status.success() {
                bail!("cargo build --bin mergec failed ({status})");
            }
        }
    }
    if !mergec.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`",
            mergec.display()
        );
    }
    Ok(mergec)
}

/// Generates each input model unless its marker says it already holds this spec.
fn ensure_models(mergec: &Path, workdir: &Path, preset: &str) -> Result<()> {
    let models = workdir.join("models");
    fs::create_dir_all(&models)?;
    let mut generated = Duration::ZERO;
    for &(name, variant) in MODELS {
        let dir = models.join(name);
        let marker = models.join(format!("{name}.spec"));
        let spec = format!("synth-format={SYNTH_FORMAT} preset={preset} variant={variant} seed={SEED}\n");
        let present = fs::read_to_string(&marker).is_ok_and(|m| m == spec)
            && dir.join("config.json").is_file()
            && !safetensors_files(&dir)?.is_empty();
        if present {
            continue;
        }
        // Remove the marker first, so an interrupted generation is redone next time.
        if marker.exists() {
            fs::remove_file(&marker)?;
        }
        let start = Instant::now();
        let status = Command::new(mergec)
            .arg("synth")
            .arg(&dir)
            .args(["--preset", preset, "--variant", &variant.to_string()])
            .args(["--seed", &SEED.to_string(), "--force"])
            .status()
            .context("running mergec synth")?;
        if !status.success() {
            bail!("mergec synth {} failed ({status})", dir.display());
        }
        generated += start.elapsed();
        fs::write(&marker, spec)?;
    }
    if !generated.is_zero() {
        println!("generated inputs in {:.2} s", generated.as_secs_f64());
    }
    Ok(())
}

/// Rank of the generated adapter.
const ADAPTER_RANK: usize = 32;

/// Writes `adapters/r32`, a PEFT LoRA adapter of rank 32 (bf16 factors, alpha 64) on every
/// `*_proj` weight of the base's layers, unless its marker says it is there.
fn ensure_adapter(workdir: &Path, preset: &str) -> Result<()> {
    let dir = workdir.join("adapters/r32");
    let marker = workdir.join("adapters/r32.spec");
    let spec = format!("synth-format={SYNTH_FORMAT} preset={preset} rank={ADAPTER_RANK} seed={SEED}\n");
    if fs::read_to_string(&marker).is_ok_and(|m| m == spec) && dir.join("adapter_model.safetensors").is_file()
    {
        return Ok(());
    }
    let base = mergec::io::model::load_model("models/base", workdir).context("reading the base's header")?;
    let modules: Vec<(String, usize, usize)> = base
        .tensors
        .iter()
        .filter(|(name, t)| name.contains(".layers.") && name.ends_with("_proj.weight") && t.shape.len() == 2)
        .map(|(name, t)| {
            (
                name.trim_end_matches(".weight").to_string(),
                t.shape[0],
                t.shape[1],
            )
        })
        .collect();
    if modules.is_empty() {
        bail!("the base has no `*_proj` weights to adapt");
    }
    // Deterministic small values (a 64-bit LCG), as bf16 bytes.
    let mut state = SEED;
    let mut factor = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                half::bf16::from_f32((u - 0.5) * 0.02).to_bits().to_le_bytes()
            })
            .collect()
    };
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (module, rows, cols) in &modules {
        let a = factor(ADAPTER_RANK * cols);
        let b = factor(rows * ADAPTER_RANK);
        data.push((
            format!("base_model.model.{module}.lora_A.weight"),
            vec![ADAPTER_RANK, *cols],
            a,
        ));
        data.push((
            format!("base_model.model.{module}.lora_B.weight"),
            vec![*rows, ADAPTER_RANK],
            b,
        ));
    }
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    fs::create_dir_all(&dir)?;
    if marker.exists() {
        fs::remove_file(&marker)?;
    }
    fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None)?,
    )?;
    let targets: std::collections::BTreeSet<&str> = modules
        .iter()
        .filter_map(|(m, _, _)| m.rsplit('.').next())
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": ADAPTER_RANK,
        "lora_alpha": 2 * ADAPTER_RANK,
        "target_modules": targets,
        "fan_in_fan_out": false,
        "use_rslora": false,
    });
    fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    fs::write(&marker, spec)?;
    println!(
        "generated a rank-{ADAPTER_RANK} adapter on {} modules",
        modules.len()
    );
    Ok(())
}

/// What the floor must move for one scenario: the input byte ranges its plan reads
/// (coalesced, in file order) and the bytes it writes.
struct FloorSpec {
    ranges: Vec<(PathBuf, u64, u64)>,
    read_bytes: u64,
    write_bytes: u64,
    planned_peak: u64,
}

fn floor_spec(script: &Path, max_memory: Option<u64>) -> Result<FloorSpec> {
    let loaded =
        mergec::driver::Script::from_file(script).with_context(|| format!("reading {}", script.display()))?;
    let limits = mergec::plan::Limits {
        max_memory,
        ..mergec::plan::Limits::default()
    };
    let compiled = mergec::driver::compile(&loaded, true, &limits).map_err(|d| {
        let messages: Vec<String> = d.0.iter().map(|d| d.message.clone()).collect();
        anyhow::anyhow!("{} does not compile: {}", script.display(), messages.join("; "))
    })?;
    let mut ranges: Vec<(PathBuf, u64, u64)> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for step in &compiled.plan.steps {
        for input in &step.inputs {
            if !seen.insert((input.model, input.tensor.clone())) {
                continue;
            }
            let model = &compiled.program.model(input.model).info;
            let info = model
                .tensors
                .get(&input.tensor)
                .with_context(|| format!("no tensor {}", input.tensor))?;
            let file = model
                .files
                .get(info.file as usize)
                .context("tensor in a missing file")?;
            ranges.push((file.clone(), info.offset, info.offset + info.len));
        }
    }
    ranges.sort();
    let mut merged: Vec<(PathBuf, u64, u64)> = Vec::new();
    for (file, start, end) in ranges {
        match merged.last_mut() {
            Some((f, _, e)) if *f == file && start <= *e => *e = (*e).max(end),
            _ => merged.push((file, start, end)),
        }
    }
    let read_bytes = merged.iter().map(|(_, s, e)| e - s).sum();
    Ok(FloorSpec {
        ranges: merged,
        read_bytes,
        write_bytes: compiled.plan.write_bytes,
        planned_peak: compiled.plan.peak_bytes,
    })
}

/// An extraction's floor: every tensor of both models, read once (the write is the
/// adapter's size, set after the run).
fn extract_floor_spec(finetune: &Path, base: &Path) -> Result<FloorSpec> {
    let mut ranges = Vec::new();
    for dir in [finetune, base] {
        let model = mergec::io::model::load_model(&dir.display().to_string(), Path::new("."))
            .with_context(|| format!("loading {}", dir.display()))?;
        for info in model.tensors.values() {
            let file = model
                .files
                .get(info.file as usize)
                .context("tensor in a missing file")?;
            ranges.push((file.clone(), info.offset, info.offset + info.len));
        }
    }
    ranges.sort();
    let read_bytes = ranges.iter().map(|(_, s, e)| e - s).sum();
    Ok(FloorSpec {
        ranges,
        read_bytes,
        write_bytes: 0,
        planned_peak: 0,
    })
}

/// One scenario on one backend, summarised over its runs.
struct Row {
    name: String,
    backend: Backend,
    wall_median: f64,
    floor_median: f64,
    ratio_median: f64,
    target_ratio: f64,
    rss_max: Option<u64>,
    target_rss: u64,
}

/// Runs one scenario `repeat` times and prints its table; `None` if the merge failed.
fn run_scenario(
    mergec: &Path,
    workdir: &Path,
    scenario: &Scenario,
    backend: Backend,
    args: &Args,
) -> Result<Option<Row>> {
    let output = workdir.join(scenario.output);
    let budget = scenario.max_memory.and_then(parse_size);
    let (mut spec, command) = match scenario.work {
        Work::Script(text) => {
            let script = workdir.join(format!("{}.merge", scenario.name));
            fs::write(&script, text)?;
            let spec = floor_spec(&script, budget)?;
            let mut command: Vec<String> = vec!["run".into(), script.display().to_string(), "--force".into()];
            command.extend(["--backend".into(), backend.flag().into()]);
            (spec, command)
        }
        Work::Extract { finetune, base, rank } => {
            let models = workdir.join("models");
            let (finetune, base) = (models.join(finetune), models.join(base));
            let spec = extract_floor_spec(&finetune, &base)?;
            let command = vec![
                "extract-lora".into(),
                finetune.display().to_string(),
                base.display().to_string(),
                output.display().to_string(),
                "--rank".into(),
                rank.into(),
                "--force".into(),
            ];
            (spec, command)
        }
    };
    let floor_file = workdir.join("floor.tmp");

    println!();
    println!(
        "== {} on {} ({} run(s)){} ==",
        scenario.name,
        backend.flag(),
        args.repeat,
        match scenario.max_memory {
            Some(m) => format!(", --max-memory {m}"),
            None => String::new(),
        }
    );
    if matches!(scenario.work, Work::Extract { .. }) {
        println!(
            "reads both models whole: {:.3} GB; writes the adapter",
            spec.read_bytes as f64 / 1e9
        );
    } else {
        println!(
            "plan: read {:.3} GB, write {:.3} GB, peak {:.1} MiB",
            spec.read_bytes as f64 / 1e9,
            spec.write_bytes as f64 / 1e9,
            spec.planned_peak as f64 / (1u64 << 20) as f64
        );
    }
    let mut samples = Vec::new();
    for i in 0..args.repeat {
        if output.exists() {
            fs::remove_dir_all(&output)?;
        }
        // Flush dirty pages left by synth or the previous run, so neither the floor nor
        // the merge pays for someone else's writeback.
        sync_filesystems();
        // Floor right before the merge, so both see the same page-cache state.
        let floor_read = read_ranges(&spec.ranges)?;
        // An extraction's output size is known only once written: its write floor follows.
        let extract = matches!(scenario.work, Work::Extract { .. });
        let mut floor_write = Duration::ZERO;
        if !extract {
            floor_write = write_file(&floor_file, spec.write_bytes)?;
            fs::remove_file(&floor_file)?;
        }
        println!(
            "run {}: floor read {:.2} GB in {:.3} s ({:.2} GB/s), write {:.2} GB in {:.3} s ({:.2} GB/s)",
            i + 1,
            spec.read_bytes as f64 / 1e9,
            floor_read.as_secs_f64(),
            spec.read_bytes as f64 / 1e9 / floor_read.as_secs_f64().max(1e-9),
            spec.write_bytes as f64 / 1e9,
            floor_write.as_secs_f64(),
            spec.write_bytes as f64 / 1e9 / floor_write.as_secs_f64().max(1e-9),
        );

        let mut args: Vec<&str> = command.iter().map(String::as_str).collect();
        if let Some(m) = scenario.max_memory {
            args.extend(["--max-memory", m]);
        }
        let run = run_merge(mergec, &args)?;
        if !run.success {
            eprintln!("merge {} failed ({}); its stderr:", scenario.name, run.status);
            eprintln!("{}", run.stderr.trim_end());
            return Ok(None);
        }
        if extract {
            spec.write_bytes = total_size(&safetensors_files(&output)?)?;
            floor_write = write_file(&floor_file, spec.write_bytes)?;
            fs::remove_file(&floor_file)?;
        }
        let sample = Sample {
            floor_read,
            floor_write,
            wall: run.wall,
            peak_rss_bytes: run.peak_rss_bytes,
        };
        println!(
            "run {}: merge {:.3} s, ratio {:.2}, peak RSS {}",
            i + 1,
            sample.wall.as_secs_f64(),
            sample.ratio(),
            fmt_rss(sample.peak_rss_bytes),
        );
        samples.push(sample);
    }
    let bytes_written = total_size(&safetensors_files(&output)?)?;
    let row = print_table(scenario, backend, &samples, &spec, bytes_written);
    if !args.keep {
        fs::remove_dir_all(&output)?;
    }
    Ok(Some(row))
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (v.first().copied().unwrap_or(f64::NAN), median)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn print_table(
    scenario: &Scenario,
    backend: Backend,
    samples: &[Sample],
    spec: &FloorSpec,
    bytes_written: u64,
) -> Row {
    let stat = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let wall = stat(&|s| s.wall.as_secs_f64());
    let read = stat(&|s| s.floor_read.as_secs_f64());
    let write = stat(&|s| s.floor_write.as_secs_f64());
    let floor = stat(&|s| s.floor().as_secs_f64());
    let ratio = stat(&|s| s.ratio());
    let rss = samples.iter().filter_map(|s| s.peak_rss_bytes).max();
    let gb = |b: u64| b as f64 / 1e9;
    let target_rss = scenario.target_rss();

    println!();
    println!("{:<22}{:>12}{:>12}   target", "", "best", "median");
    println!("{:<22}{:>10.3} s{:>10.3} s", "merge wall", wall.0, wall.1);
    println!("{:<22}{:>10.3} s{:>10.3} s", "I/O floor", floor.0, floor.1);
    println!(
        "{:<22}{:>10.3} s{:>10.3} s   ({:.2} GB/s median)",
        format!("  read {:.2} GB", gb(spec.read_bytes)),
        read.0,
        read.1,
        gb(spec.read_bytes) / read.1
    );
    println!(
        "{:<22}{:>10.3} s{:>10.3} s   ({:.2} GB/s median, fsync'd)",
        format!("  write {:.2} GB", gb(spec.write_bytes)),
        write.0,
        write.1,
        gb(spec.write_bytes) / write.1
    );
    println!(
        "{:<22}{:>12.2}{:>12.2}   < {:.1} (median): {}",
        "ratio wall/floor",
        ratio.0,
        ratio.1,
        scenario.target_ratio,
        verdict(ratio.1 < scenario.target_ratio)
    );
    println!(
        "{:<22}{:>24}   < {} MiB: {}",
        "peak RSS (max)",
        fmt_rss(rss),
        target_rss >> 20,
        match rss {
            Some(r) => verdict(r < target_rss),
            None => "n/a",
        }
    );
    println!(
        "{:<22}{:>24}",
        "bytes written",
        format!("{:.2} GB", gb(bytes_written))
    );
    Row {
        name: scenario.name.to_string(),
        backend,
        wall_median: wall.1,
        floor_median: floor.1,
        ratio_median: ratio.1,
        target_ratio: scenario.target_ratio,
        rss_max: rss,
        target_rss,
    }
}

fn print_summary(rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("== summary (medians) ==");
    println!(
        "{:<16}{:<8}{:>10}{:>10}{:>8}{:>8}{:>7}{:>12}{:>10}{:>7}",
        "scenario", "backend", "wall s", "floor s", "ratio", "target", "", "peak RSS", "target", ""
    );
    for r in rows {
        println!(
            "{:<16}{:<8}{:>10.3}{:>10.3}{:>8.2}{:>8.1}{:>7}{:>12}{:>10}{:>7}",
            r.name,
            r.backend.flag(),
            r.wall_median,
            r.floor_median,
            r.ratio_median,
            r.target_ratio,
            verdict(r.ratio_median < r.target_ratio),
            fmt_rss(r.rss_max),
            format!("{} MiB", r.target_rss >> 20),
            match r.rss_max {
                Some(x) => verdict(x < r.target_rss),
                None => "n/a",
            }
        );
    }
}

fn fmt_rss(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        None => "unknown".to_string(),
    }
}

/// The `*.safetensors` files of a model folder, sorted (empty if the folder is missing).
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn total_size(files: &[PathBuf]) -> Result<u64> {
    files.iter().try_fold(0, |acc, f| {
        Ok(acc
            + fs::metadata(f)
                .with_context(|| format!("stat {}", f.display()))?
                .len())
    })
}

/// Reads every byte range once, in file order, into one reused buffer.
fn read_ranges(ranges: &[(PathBuf, u64, u64)]) -> Result<Duration> {
    use std::io::{Seek, SeekFrom};
    let mut buf = vec![0u8; FLOOR_BUF];
    let start = Instant::now();
    let mut open: Option<(&Path, File)> = None;
    for (path, from, to) in ranges {
        let file = match &mut open {
            Some((p, f)) if *p == path.as_path() => f,
            _ => {
                let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
                &mut open.insert((path.as_path(), f)).1
            }
        };
        file.seek(SeekFrom::Start(*from))?;
        let mut left = to - from;
        while left > 0 {
            let n = left.min(FLOOR_BUF as u64) as usize;
            file.read_exact(&mut buf[..n])?;
            left -= n as u64;
        }
    }
    Ok(start.elapsed())
}

/// Writes `size` bytes from one reused buffer and fsyncs, as a merge's output must be.
fn write_file(path: &Path, size: u64) -> Result<Duration> {
    // Non-zero bytes, so no layer can treat the file as sparse or compressible zeros.
    let buf: Vec<u8> = (0..FLOOR_BUF).map(|i| (i % 251) as u8 + 1).collect();
    let start = Instant::now();
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut left = size;
    while left > 0 {
        let n = left.min(FLOOR_BUF as u64) as usize;
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(start.elapsed())
}

#[cfg(unix)]
fn sync_filesystems() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

#[cfg(not(unix))]
fn sync_filesystems() {}

struct MergeRun {
    success: bool,
    status: String,
    stderr: String,
    wall: Duration,
    peak_rss_bytes: Option<u64>,
}

/// Runs `mergec ARGS..`, timing it and taking its own peak RSS.
fn run_merge(mergec: &Path, args: &[&str]) -> Result<MergeRun> {
    let start = Instant::now();
    let mut child = Command::new(mergec)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mergec run")?;
    // Drain both pipes while waiting, so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (success, status, peak_rss_bytes) = wait_child(&mut child)?;
    let wall = start.elapsed();
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    if !stdout.trim().is_empty() {
        for line in stdout.lines() {
            println!("  | {line}");
        }
    }
    Ok(MergeRun {
        success,
        status,
        stderr,
        wall,
        peak_rss_bytes,
    })
}

/// Waits for the child with `wait4`, which returns that child's own resource usage:
/// unlike `getrusage(RUSAGE_CHILDREN)`, its `ru_maxrss` is not the maximum over every child
/// reaped so far (the synth runs would otherwise count).
#[cfg(unix)]
fn wait_child(child: &mut std::process::Child) -> Result<(bool, String, Option<u64>)> {
    let pid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
    let mut status: libc::c_int = 0;
    let usage = loop {
        // SAFETY: rusage is plain integers and timevals, for which all-zero bytes are valid.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `usage` are live, writable locals of the types wait4 expects;
        // `pid` is our own unreaped child (std's Child never waited on it).
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break usage;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4 on mergec");
        }
    };
    // ru_maxrss is in KiB on Linux and the BSDs, in bytes on macOS.
    let max_rss = u64::try_from(usage.ru_maxrss).unwrap_or(0);
    let rss = if cfg!(target_os = "macos") {
        max_rss
    } else {
        max_rss * 1024
    };
    let (success, text) = if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        (code == 0, format!("exit code {code}"))
    } else if libc::WIFSIGNALED(status) {
        (false, format!("killed by signal {}", libc::WTERMSIG(status)))
    } else {
        (false, format!("wait status {status}"))
    };
    Ok((success, text, Some(rss)))
}

/// Elsewhere there is no per-child peak RSS; only the exit status is reported.
#[cfg(not(unix))]
fn wait_child(child: &mut std::process::Child) -> Result<(bool, String, Option<u64>)> {
    let status = child.wait()?;
    Ok((status.success(), status.to_string(), None))
}
