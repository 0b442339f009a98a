//! `mergec-bench`: end-to-end benchmark of the real `mergec` binary.
//!
//! For each scenario it measures the merge's wall time and peak RSS against an I/O floor
//! (reading every input once plus writing one output-sized file with fsync, on the same
//! machine, right before the merge), so the ratio says how close mergec gets to the disk.
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
}

/// Merge time must stay under this multiple of the I/O floor.
const TARGET_RATIO: f64 = 2.0;
/// Peak RSS of the merge must stay under this.
const TARGET_RSS_BYTES: u64 = 1 << 30;
/// Buffer of the floor's reads and writes.
const FLOOR_BUF: usize = 8 << 20;

/// Preset and seed of the generated inputs; every input is a variant of one base.
const PRESET: &str = "bench350m";
const SEED: u64 = 42;
/// Bump when `mergec synth` changes its output, so stale inputs get regenerated.
const SYNTH_FORMAT: u32 = 2;
/// Input models as (folder name under `models/`, synth variant).
const MODELS: &[(&str, u32)] = &[("base", 0), ("ft1", 1), ("ft2", 2), ("ft3", 3)];

/// One benchmarked merge. Paths in `script` are relative to the workdir (where the script
/// is written); `inputs` and `output` name the same folders for the floor and byte counts.
struct Scenario {
    name: &'static str,
    script: &'static str,
    inputs: &'static [&'static str],
    output: &'static str,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "linear3",
        script: r#"model a = "models/ft1"
model b = "models/ft2"
model c = "models/ft3"
save linear(a { weight: 0.5 }, b { weight: 0.3 }, c { weight: 0.2 }) to "out/linear3" { dtype: bf16 }
"#,
        inputs: &["models/ft1", "models/ft2", "models/ft3"],
        output: "out/linear3",
    },
    Scenario {
        name: "ties4",
        script: r#"model base = "models/base"
model a = "models/ft1"
model b = "models/ft2"
model c = "models/ft3"
save ties(base, a { weight: 0.5, density: 0.5 }, b { weight: 0.3, density: 0.5 }, c { weight: 0.2, density: 0.5 })
    to "out/ties4" { dtype: bf16 }
"#,
        inputs: &["models/base", "models/ft1", "models/ft2", "models/ft3"],
        output: "out/ties4",
    },
];

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

    ensure_models(&mergec, &workdir)?;

    let mut failed = false;
    for scenario in SCENARIOS
        .iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.name))
    {
        failed |= !run_scenario(&mergec, &workdir, scenario, &args)?;
    }
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
fn ensure_models(mergec: &Path, workdir: &Path) -> Result<()> {
    let models = workdir.join("models");
    fs::create_dir_all(&models)?;
    let mut generated = Duration::ZERO;
    for &(name, variant) in MODELS {
        let dir = models.join(name);
        let marker = models.join(format!("{name}.spec"));
        let spec = format!("synth-format={SYNTH_FORMAT} preset={PRESET} variant={variant} seed={SEED}\n");
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
            .args(["--preset", PRESET, "--variant", &variant.to_string()])
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

/// Runs one scenario `repeat` times and prints its table; false if the merge failed.
fn run_scenario(mergec: &Path, workdir: &Path, scenario: &Scenario, args: &Args) -> Result<bool> {
    let script = workdir.join(format!("{}.merge", scenario.name));
    fs::write(&script, scenario.script)?;
    let output = workdir.join(scenario.output);
    let mut inputs = Vec::new();
    for input in scenario.inputs {
        inputs.extend(safetensors_files(&workdir.join(input))?);
    }
    let bytes_read: u64 = total_size(&inputs)?;
    let first_input = scenario.inputs.first().context("scenario without inputs")?;
    let output_size = total_size(&safetensors_files(&workdir.join(first_input))?)?;
    let floor_file = workdir.join("floor.tmp");

    println!();
    println!("== {} ({} run(s)) ==", scenario.name, args.repeat);
    let mut samples = Vec::new();
    for i in 0..args.repeat {
        if output.exists() {
            fs::remove_dir_all(&output)?;
        }
        // Flush dirty pages left by synth or the previous run, so neither the floor nor
        // the merge pays for someone else's writeback.
        sync_filesystems();
        // Floor right before the merge, so both see the same page-cache state.
        let floor_read = read_all(&inputs)?;
        let floor_write = write_file(&floor_file, output_size)?;
        fs::remove_file(&floor_file)?;
        println!(
            "run {}: floor read {:.2} GB in {:.3} s ({:.2} GB/s), write {:.2} GB in {:.3} s ({:.2} GB/s)",
            i + 1,
            bytes_read as f64 / 1e9,
            floor_read.as_secs_f64(),
            bytes_read as f64 / 1e9 / floor_read.as_secs_f64().max(1e-9),
            output_size as f64 / 1e9,
            floor_write.as_secs_f64(),
            output_size as f64 / 1e9 / floor_write.as_secs_f64().max(1e-9),
        );

        let run = run_merge(mergec, &script)?;
        if !run.success {
            eprintln!("merge {} failed ({}); its stderr:", scenario.name, run.status);
            eprintln!("{}", run.stderr.trim_end());
            return Ok(false);
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
    print_table(&samples, bytes_read, bytes_written, output_size);
    if !args.keep {
        fs::remove_dir_all(&output)?;
    }
    Ok(true)
}

fn print_table(samples: &[Sample], bytes_read: u64, bytes_written: u64, floor_written: u64) {
    let stat = |f: &dyn Fn(&Sample) -> f64| -> (f64, f64) {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        (v.first().copied().unwrap_or(f64::NAN), median)
    };
    let wall = stat(&|s| s.wall.as_secs_f64());
    let read = stat(&|s| s.floor_read.as_secs_f64());
    let write = stat(&|s| s.floor_write.as_secs_f64());
    let floor = stat(&|s| s.floor().as_secs_f64());
    let ratio = stat(&|s| s.ratio());
    let rss = samples.iter().filter_map(|s| s.peak_rss_bytes).max();
    let gb = |b: u64| b as f64 / 1e9;
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };

    println!();
    println!("{:<22}{:>12}{:>12}   target", "", "best", "median");
    println!("{:<22}{:>10.3} s{:>10.3} s", "merge wall", wall.0, wall.1);
    println!("{:<22}{:>10.3} s{:>10.3} s", "I/O floor", floor.0, floor.1);
    println!(
        "{:<22}{:>10.3} s{:>10.3} s   ({:.2} GB/s median)",
        format!("  read {:.2} GB", gb(bytes_read)),
        read.0,
        read.1,
        gb(bytes_read) / read.1
    );
    println!(
        "{:<22}{:>10.3} s{:>10.3} s   ({:.2} GB/s median, fsync'd)",
        format!("  write {:.2} GB", gb(floor_written)),
        write.0,
        write.1,
        gb(floor_written) / write.1
    );
    println!(
        "{:<22}{:>12.2}{:>12.2}   < {TARGET_RATIO:.1} (median): {}",
        "ratio wall/floor",
        ratio.0,
        ratio.1,
        verdict(ratio.1 < TARGET_RATIO)
    );
    println!(
        "{:<22}{:>24}   < {} MiB: {}",
        "peak RSS (max)",
        fmt_rss(rss),
        TARGET_RSS_BYTES >> 20,
        match rss {
            Some(r) => verdict(r < TARGET_RSS_BYTES),
            None => "n/a",
        }
    );
    println!(
        "{:<22}{:>24}",
        "bytes read / written",
        format!("{:.2} GB / {:.2} GB", gb(bytes_read), gb(bytes_written))
    );
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

/// Reads every file once, sequentially, into one reused buffer.
fn read_all(files: &[PathBuf]) -> Result<Duration> {
    let mut buf = vec![0u8; FLOOR_BUF];
    let start = Instant::now();
    for path in files {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        while file.read(&mut buf)? != 0 {}
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

/// Runs `mergec run SCRIPT --force`, timing it and taking its own peak RSS.
fn run_merge(mergec: &Path, script: &Path) -> Result<MergeRun> {
    let start = Instant::now();
    let mut child = Command::new(mergec)
        .arg("run")
        .arg(script)
        .arg("--force")
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
