//! The command line: the only place that turns errors into exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use mergec::diag::render;
use mergec::diag::Diagnostics;
use mergec::driver::{self, Compiled, Script};
use mergec::exec::CpuExecutor;
use mergec::io::{DType, TensorReader};
use mergec::plan::Limits;
use mergec::synth::{self, SynthSpec};

#[derive(Parser)]
#[command(name = "mergec", version, about = "Compile and run model-merge recipes")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check a script against the models' headers; print what a run would read, write and hold.
    Check {
        script: PathBuf,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
        /// Accept output folders that exist and are not empty (run would replace them).
        #[arg(long)]
        force: bool,
    },
    /// Check a script, then run it and write every saved model.
    Run {
        script: PathBuf,
        /// Replace output folders that exist and are not empty.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Print the execution plan: the order of steps, bytes moved and peak memory.
    Plan { script: PathBuf },
    /// Print one stage's output in a stable text form.
    Debug {
        #[arg(value_enum)]
        stage: Stage,
        script: PathBuf,
    },
    /// Write a synthetic Llama-shaped model (for examples, tests and benchmarks).
    Synth(SynthArgs),
    /// Generate three tiny models and run the example merge on them: no download needed.
    Demo {
        /// Where the models and the merged output go.
        #[arg(default_value = "demo")]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    Ast,
    Hir,
    Graph,
    Plan,
}

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output folder.
    dir: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// 0 is the base; k > 0 a fine-tune of it.
    #[arg(long, default_value_t = 0)]
    variant: u32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    dtype: Option<String>,
    /// Replace the folder if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    Tiny,
    Bench350m,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check {
            script,
            format,
            force,
        } => check(&script, format, force),
        Command::Run {
            script,
            force,
            threads,
            format,
        } => run_script(&script, force, threads, format),
        Command::Plan { script } => debug(&script, Stage::Plan),
        Command::Debug { stage, script } => debug(&script, stage),
        Command::Synth(args) => synth_cmd(args),
        Command::Demo { dir } => demo(&dir),
    }
}

fn load(path: &Path) -> Result<Script, ExitCode> {
    Script::from_file(path).map_err(|e| {
        eprintln!("error: cannot read `{}`: {e}", path.display());
        ExitCode::from(1)
    })
}

fn limits(threads: Option<usize>) -> Limits {
    let mut limits = Limits::default();
    if let Some(t) = threads {
        limits.threads = t.max(1);
    }
    limits
}

fn report(diags: &Diagnostics, script: &Script, format: Format) {
    if diags.is_empty() {
        return;
    }
    match format {
        Format::Human => {
            let text = render::render_text(&diags.0, &script.sources, render::stderr_wants_colour());
            eprint!("{text}");
        }
        Format::Json => {
            let json = serde_json::json!({ "diagnostics": render::to_json(&diags.0, &script.sources) });
            println!("{json}");
        }
    }
}

fn compile(script: &Script, force: bool, limits: &Limits, format: Format) -> Result<Compiled, ExitCode> {
    match driver::compile(script, force, limits) {
        Ok(c) => {
            if format == Format::Human {
                report(&c.warnings, script, format);
            }
            Ok(c)
        }
        Err(diags) => {
            report(&diags, script, format);
            let errors = diags.iter().filter(|d| d.is_error()).count();
            if format == Format::Human {
                eprintln!(
                    "{errors} error{} found; nothing was read or written",
                    plural(errors)
                );
            }
            Err(ExitCode::from(1))
        }
    }
}

fn check(path: &Path, format: Format, force: bool) -> ExitCode {
    let script = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let compiled = match compile(&script, force, &Limits::default(), format) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match format {
        Format::Human => print!("{}", summary(&compiled)),
        Format::Json => {
            let outputs: Vec<_> = compiled
                .program
                .outputs
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    let steps = compiled.plan.steps.iter().filter(|s| s.output == i);
                    serde_json::json!({
                        "dir": o.dir.display().to_string(),
                        "tensors": o.tensors.len(),
                        "bytes": steps.map(|s| s.out_bytes()).sum::<u64>(),
                    })
                })
                .collect();
            let json = serde_json::json!({
                "diagnostics": render::to_json(&compiled.warnings.0, &script.sources),
                "outputs": outputs,
                "read_bytes": compiled.plan.read_bytes,
                "write_bytes": compiled.plan.write_bytes,
                "peak_bytes": compiled.plan.peak_bytes,
            });
            println!("{json}");
        }
    }
    ExitCode::SUCCESS
}

fn summary(c: &Compiled) -> String {
    let mut out = String::new();
    let n = c.program.outputs.len();
    out.push_str(&format!("ok: {n} output{}\n", plural(n)));
    for (i, o) in c.program.outputs.iter().enumerate() {
        let bytes: u64 = c
            .plan
            .steps
            .iter()
            .filter(|s| s.output == i)
            .map(|s| s.out_bytes())
            .sum();
        let copies = c
            .plan
            .steps
            .iter()
            .filter(|s| s.output == i && s.kernel == mergec::plan::Kernel::Copy)
            .count();
        out.push_str(&format!(
            "  {}: {} tensors ({} copied unchanged), {}\n",
            o.dir.display(),
            o.tensors.len(),
            copies,
            human_bytes(bytes)
        ));
    }
    let models = c.program.models.len();
    out.push_str(&format!(
        "read {} from {models} model{}, write {}, peak memory {}\n",
        human_bytes(c.plan.read_bytes),
        plural(models),
        human_bytes(c.plan.write_bytes),
        human_bytes(c.plan.peak_bytes)
    ));
    out
}

fn run_script(path: &Path, force: bool, threads: Option<usize>, format: Format) -> ExitCode {
    let script = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let limits = limits(threads);
    let compiled = match compile(&script, force, &limits, format) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let executor = match CpuExecutor::new(limits.threads, limits.chunk_elems) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot start the CPU executor: {e}");
            return ExitCode::from(1);
        }
    };
    let reader = TensorReader::new();
    let total = compiled.plan.steps.len();
    let mut done = 0usize;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr()) && format == Format::Human;
    let result = mergec::exec::run(
        &compiled.program,
        &compiled.plan,
        &executor,
        &reader,
        force,
        |step| {
            done += 1;
            if interactive {
                eprint!("\r[{done}/{total}] {:<60}", truncate(&step.tensor, 60));
                let _ = std::io::stderr().flush();
            }
        },
    );
    if interactive {
        eprint!("\r{:<80}\r", "");
    }
    match result {
        Ok(report) => {
            if format == Format::Json {
                let json = serde_json::json!({
                    "diagnostics": render::to_json(&compiled.warnings.0, &script.sources),
                    "outputs": report.outputs.iter().map(|o| o.dir.display().to_string()).collect::<Vec<_>>(),
                    "tensors": report.tensors,
                    "read_bytes": report.bytes_read,
                    "written_bytes": report.bytes_written,
                    "seconds": report.seconds,
                });
                println!("{json}");
            } else {
                for o in &report.outputs {
                    println!("wrote {} ({} files)", o.dir.display(), o.files.len());
                }
                println!(
                    "{} tensors, read {}, wrote {} in {:.2} s",
                    report.tensors,
                    human_bytes(report.bytes_read),
                    human_bytes(report.bytes_written),
                    report.seconds
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("the output folder was not created; inputs are untouched");
            ExitCode::from(1)
        }
    }
}

fn debug(path: &Path, stage: Stage) -> ExitCode {
    let script = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Stage::Ast = stage {
        return match mergec::syntax::parse(&script.sources, script.id) {
            Ok(ast) => {
                println!("{ast:#?}");
                ExitCode::SUCCESS
            }
            Err(d) => {
                report(&d, &script, Format::Human);
                ExitCode::from(1)
            }
        };
    }
    let compiled = match compile(&script, true, &Limits::default(), Format::Human) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match stage {
        Stage::Hir => {
            for o in &compiled.program.outputs {
                println!("output {}", o.dir.display());
                for t in &o.tensors {
                    println!("  {} {} {:?} = {:?}", t.name, t.dtype, t.shape, t.expr);
                }
            }
        }
        Stage::Graph => print!("{}", mergec::graph::dump(&compiled.graph)),
        _ => print!("{}", mergec::plan::dump(&compiled.plan, &compiled.program)),
    }
    ExitCode::SUCCESS
}

fn synth_spec(args: &SynthArgs) -> Result<SynthSpec, String> {
    let mut spec = match args.preset {
        Preset::Tiny => SynthSpec::tiny(args.variant),
        Preset::Bench350m => SynthSpec::bench_350m(args.variant),
    };
    if let Some(seed) = args.seed {
        spec.seed = seed;
    }
    if let Some(d) = &args.dtype {
        spec.dtype =
            DType::from_script_name(d).ok_or_else(|| format!("unknown dtype `{d}`: use f32, f16 or bf16"))?;
    }
    Ok(spec)
}

fn synth_cmd(args: SynthArgs) -> ExitCode {
    let spec = match synth_spec(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match synth::write_model(&spec, &args.dir, args.force) {
        Ok(w) => {
            println!("wrote {} ({} parameters)", w.dir.display(), spec.param_count());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The example script `demo` runs; it is also `examples/demo.merge`.
const DEMO_SCRIPT: &str = include_str!("../examples/demo.merge");

fn demo(dir: &Path) -> ExitCode {
    for (name, variant) in [("base", 0), ("chat", 1), ("math", 2)] {
        let target = dir.join("models").join(name);
        if target.join("model.safetensors").exists() {
            continue;
        }
        let mut spec = SynthSpec::tiny(variant);
        spec.dtype = DType::BF16;
        if let Err(e) = synth::write_model(&spec, &target, true) {
            eprintln!("error: cannot write the demo model `{}`: {e}", target.display());
            return ExitCode::from(1);
        }
    }
    let script_path = dir.join("demo.merge");
    if let Err(e) = std::fs::write(&script_path, DEMO_SCRIPT) {
        eprintln!("error: cannot write `{}`: {e}", script_path.display());
        return ExitCode::from(1);
    }
    println!("generated three tiny models in {}", dir.join("models").display());
    println!("running {}:\n", script_path.display());
    let code = check(&script_path, Format::Human, true);
    if code != ExitCode::SUCCESS {
        return code;
    }
    run_script(&script_path, true, None, Format::Human)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
