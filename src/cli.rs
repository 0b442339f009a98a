//! The command line: the only place that turns errors into exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use mergec::diag::render;
use mergec::diag::Diagnostics;
use mergec::diag::{Code, Diagnostic};
use mergec::driver::{self, Compiled, Script};
use mergec::exec::gpu::{GpuContext, GpuExecutor};
use mergec::exec::{CpuExecutor, GpuWithFallback};
use mergec::import::{self, Import};
use mergec::io::{writer, DType, TensorReader};
use mergec::ops::{Compute, Half};
use mergec::plan::Limits;
use mergec::source::SourceMap;
use mergec::synth::{self, SynthSpec};

use crate::progress::{self, Progress};

#[derive(Parser)]
#[command(name = "mergec", version, about = "Compile and run model-merge recipes")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// A hard memory budget for check, plan and run (`8GB`, `512MiB`); over it, the script
    /// is refused before anything runs (E0501). Overrides the script's `set max_memory`.
    #[arg(long, global = true, value_parser = parse_size)]
    max_memory: Option<u64>,
}

/// A size as scripts write it: `8GB` (powers of 1000), `512MiB` (powers of 1024), or bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 8GB, 512MiB)"))?;
    let scale = mergec::units::size_unit_scale(unit).ok_or_else(|| {
        format!(
            "unknown size unit `{}` (use B, KB, MB, GB, KiB, MiB, GiB)",
            unit.to_ascii_lowercase()
        )
    })?;
    let bytes = value * scale;
    if bytes < 1.0 || bytes.fract() != 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{text}` is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Backend {
    Auto,
    Gpu,
    Cpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum ComputeArg {
    F32,
    Bf16,
    F16,
}

impl From<ComputeArg> for Compute {
    fn from(c: ComputeArg) -> Compute {
        match c {
            ComputeArg::F32 => Compute::F32,
            ComputeArg::Bf16 => Compute::Half(Half::Bf16),
            ComputeArg::F16 => Compute::Half(Half::F16),
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check a script (or a mergekit YAML config) against the models' headers; print what a
    /// run would read, write and hold.
    Check {
        /// A `.merge` script, or a mergekit config (`.yml` / `.yaml`).
        script: PathBuf,
        /// For a mergekit config: the output folder a run would write.
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
        /// Accept output folders that mergec wrote before (run would replace them).
        #[arg(long)]
        force: bool,
        /// The compute dtype of every save (see `run --compute`).
        #[arg(long, value_enum)]
        compute: Option<ComputeArg>,
        #[command(flatten)]
        yaml: YamlArgs,
    },
    /// Check a script, then run it and write every saved model. A mergekit config runs as
    /// `mergekit-yaml` does: `mergec run config.yml OUT_DIR`.
    Run {
        /// A `.merge` script, or a mergekit config (`.yml` / `.yaml`).
        script: PathBuf,
        /// For a mergekit config: the output folder (mergekit's OUT_PATH).
        out: Option<PathBuf>,
        /// Replace output folders that mergec wrote before (they hold a `.mergec` file).
        /// Never the current folder, a folder above it, the script's folder, the home
        /// folder, `/` or an input model.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// The compute dtype of every save, over the script's `compute` option: `f32`
        /// computes in f32 and rounds once; `bf16` / `f16` round every step as mergekit
        /// does with `dtype: bfloat16` / `float16`, reproducing its weights.
        #[arg(long, value_enum)]
        compute: Option<ComputeArg>,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
        /// `auto`: a hardware GPU when there is one, else the CPU; `gpu`: a GPU adapter even
        /// if it is a software one (how CI tests it); `cpu`: the CPU executor.
        #[arg(long, value_enum, default_value = "auto")]
        backend: Backend,
        /// Use the GPU adapter whose name contains this (see `mergec info`).
        #[arg(long)]
        adapter: Option<String>,
        /// `auto`: a bar per output when stderr is a terminal; `json`: one JSON line per
        /// finished step on stderr, for tools; `none`.
        #[arg(long, value_enum, default_value = "auto")]
        progress: progress::Mode,
        /// No progress and no notes on stderr: only warnings and errors.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        yaml: YamlArgs,
    },
    /// List the GPU adapters this machine offers and their limits.
    Info,
    /// Print the execution plan: the order of steps, bytes moved and peak memory.
    Plan {
        script: PathBuf,
        /// For a mergekit config: the output folder.
        out: Option<PathBuf>,
        #[command(flatten)]
        yaml: YamlArgs,
    },
    /// Print one stage's output in a stable text form.
    Debug {
        #[arg(value_enum)]
        stage: Stage,
        script: PathBuf,
        /// For a mergekit config: the output folder.
        out: Option<PathBuf>,
        #[command(flatten)]
        yaml: YamlArgs,
    },
    /// Translate a mergekit YAML config into a `.merge` script that does the same merge.
    Import {
        /// The mergekit config (`.yml` / `.yaml`); several `---` documents for mergekit-multi.
        config: PathBuf,
        /// The output folder the script saves to (default: `out/NAME`, NAME the config's).
        out: Option<PathBuf>,
        /// Write the script here (default: standard output). Its relative paths are
        /// rewritten to be relative to this file's folder.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Replace the script file if it exists (never a file of an input model).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        yaml: YamlArgs,
    },
    /// Extract a LoRA adapter from a fine-tune: per linear module a truncated SVD of
    /// `W_finetune - W_base`, written as a PEFT adapter folder (adapter_model.safetensors
    /// and adapter_config.json). `--max-memory` bounds the SVDs in flight.
    ExtractLora(ExtractArgs),
    /// Write a synthetic Llama-shaped model (for examples, tests and benchmarks).
    Synth(SynthArgs),
    /// A language server over stdin/stdout for `.merge` scripts and mergekit YAML
    /// configs (diagnostics, hover, completion, go to definition), for editors.
    Lsp,
    /// Compare the vocabularies of models (their tokenizer.json and embedding rows) with
    /// the first one's, to choose a `tokenizer:` policy before merging them.
    Tokens {
        /// Model folders (or references as a script writes them), two or more.
        #[arg(required = true, num_args = 2..)]
        models: Vec<String>,
        /// How many differing tokens to list per model.
        #[arg(long, default_value_t = 8)]
        show: usize,
    },
    /// Generate three tiny models and run the example merge on them: no download needed.
    Demo {
        /// Where the models and the merged output go.
        #[arg(default_value = "demo")]
        dir: PathBuf,
    },
}

/// mergekit's options, for YAML configs only.
#[derive(clap::Args, Clone, Default)]
pub struct YamlArgs {
    /// The seed of the random methods (mergekit's `--random-seed`): `set seed = N`.
    #[arg(long, alias = "random-seed")]
    seed: Option<u64>,
    /// The largest output shard, as mergekit writes it: bytes with an optional K, M or B
    /// suffix (thousands, millions, billions).
    #[arg(long)]
    out_shard_size: Option<String>,
    /// mergekit-multi: also write every named merge, in a folder of its name beside the
    /// output folder (by default only the final merge is written).
    #[arg(long)]
    save_intermediates: bool,
    /// mergekit-moe: allow every expert to be the same model (`allow_same_experts: true`).
    #[arg(long = "i-understand-this-is-not-useful-without-training")]
    allow_same_experts: bool,
    /// What mergekit ignores or tolerates is an error, not a warning (for CI).
    #[arg(long)]
    strict: bool,
    /// mergekit's `--unsafe-truncate-embeddings`: models whose vocabularies differ and
    /// that have no tokenizer setting keep the first rows of each vocabulary tensor, as
    /// many as the smallest has (a warning; the ids must mean the same tokens).
    #[arg(long)]
    unsafe_truncate_embeddings: bool,
}

impl YamlArgs {
    fn given(&self) -> Option<&'static str> {
        if self.seed.is_some() {
            Some("--seed")
        } else if self.out_shard_size.is_some() {
            Some("--out-shard-size")
        } else if self.save_intermediates {
            Some("--save-intermediates")
        } else if self.allow_same_experts {
            Some("--i-understand-this-is-not-useful-without-training")
        } else if self.strict {
            Some("--strict")
        } else if self.unsafe_truncate_embeddings {
            Some("--unsafe-truncate-embeddings")
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    Ast,
    Hir,
    /// The graph as lowered.
    Graph,
    /// The graph after optimisation.
    Opt,
    Plan,
    /// The generated WGSL kernels.
    Wgsl,
}

impl From<Stage> for mergec::driver::Stage {
    fn from(stage: Stage) -> Self {
        use mergec::driver::Stage as S;
        match stage {
            Stage::Ast => S::Ast,
            Stage::Hir => S::Hir,
            Stage::Graph => S::Graph,
            Stage::Opt => S::Opt,
            Stage::Plan => S::Plan,
            Stage::Wgsl => S::Wgsl,
        }
    }
}

#[derive(clap::Args)]
pub struct ExtractArgs {
    /// The fine-tuned model: a folder, a `.safetensors` file or `hf:org/name[@rev]`.
    finetune: String,
    /// The model it was fine-tuned from.
    base: String,
    /// The adapter folder to write.
    out: PathBuf,
    /// The largest rank kept per module.
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Singular values at or below this are dropped, so a module's rank may be lower.
    #[arg(long, default_value_t = 0.0)]
    sv_epsilon: f32,
    /// Only modules whose name matches this regular expression (repeatable).
    #[arg(long)]
    include: Vec<String>,
    /// Leave out modules whose name matches this regular expression (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// `auto`: the exact SVD for small matrices, a randomized one for large ones.
    #[arg(long, value_enum, default_value = "auto")]
    svd: SvdArg,
    /// Modules decomposed at once (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Replace an output folder that mergec wrote before.
    #[arg(long)]
    force: bool,
    /// Only warnings and errors on stderr.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum SvdArg {
    Auto,
    Exact,
    Randomized,
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
    /// Replace the folder if mergec wrote it.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    Tiny,
    Bench350m,
}

pub fn run(cli: Cli) -> ExitCode {
    let max_memory = cli.max_memory;
    MAX_MEMORY.with(|m| m.set(max_memory));
    match cli.command {
        Command::Check {
            script,
            out,
            format,
            force,
            compute,
            yaml,
        } => check(
            &Input::new(script, out, yaml, false).computing(compute),
            format,
            force,
        ),
        Command::Run {
            script,
            out,
            force,
            threads,
            compute,
            format,
            backend,
            adapter,
            progress,
            quiet,
            yaml,
        } => run_script(
            &Input::new(script, out, yaml, true).computing(compute),
            &RunOptions {
                force,
                threads,
                format,
                backend,
                adapter,
                progress: if quiet { progress::Mode::None } else { progress },
                notes: !quiet && format == Format::Human,
                quiet,
            },
        ),
        Command::Info => info(),
        Command::Plan { script, out, yaml } => debug(&Input::new(script, out, yaml, false), Stage::Plan),
        Command::Debug {
            stage,
            script,
            out,
            yaml,
        } => debug(&Input::new(script, out, yaml, false), stage),
        Command::Import {
            config,
            out,
            output,
            force,
            yaml,
        } => import_cmd(&config, out, output.as_deref(), force, &yaml),
        Command::ExtractLora(args) => extract_lora(args),
        Command::Synth(args) => synth_cmd(args),
        Command::Demo { dir } => demo(&dir),
        Command::Tokens { models, show } => tokens(&models, show),
        Command::Lsp => match mergec::lsp::serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: language server: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// What a command reads: a script, or a mergekit config with mergekit's options.
struct Input {
    path: PathBuf,
    out: Option<PathBuf>,
    yaml: YamlArgs,
    /// The command writes (run): a config needs its output folder.
    writes: bool,
    /// `--compute`
    compute: Option<Compute>,
}

impl Input {
    fn new(path: PathBuf, out: Option<PathBuf>, yaml: YamlArgs, writes: bool) -> Input {
        Input {
            path,
            out,
            yaml,
            writes,
            compute: None,
        }
    }

    fn computing(mut self, compute: Option<ComputeArg>) -> Input {
        self.compute = compute.map(Compute::from);
        self
    }
}

/// A loaded input: the script to compile, and for a config the translation that moves
/// diagnostics back onto the YAML.
struct Loaded {
    script: Script,
    import: Option<Import>,
    /// For a config checked without an output folder: output-folder checks are relaxed.
    placeholder_out: bool,
}

fn load_input(input: &Input, format: Format) -> Result<Loaded, ExitCode> {
    let yaml = import::is_yaml(&input.path);
    // No output may be the script's folder or one above it, even with --force.
    writer::keep(
        &input.path,
        if yaml { "the mergekit config" } else { "the script" },
    );
    if !yaml {
        if let Some(out) = &input.out {
            eprintln!(
                "error: `{}` is a script: its `save` statements name the output folders, so `{}` is not needed",
                input.path.display(),
                out.display()
            );
            return Err(ExitCode::from(2));
        }
        if let Some(flag) = input.yaml.given() {
            eprintln!("error: `{flag}` is a mergekit option, for YAML configs only; in a script use `set seed = N` or `save ... {{ shard: SIZE }}`");
            return Err(ExitCode::from(2));
        }
        let mut script = load(&input.path, format)?;
        script.compute = input.compute;
        return Ok(Loaded {
            script,
            import: None,
            placeholder_out: false,
        });
    }
    let (out, placeholder_out) = match &input.out {
        Some(o) => (o.clone(), false),
        None if input.writes => {
            eprintln!(
                "error: a mergekit config needs an output folder: `mergec run {} OUT_DIR`",
                input.path.display()
            );
            return Err(ExitCode::from(2));
        }
        None => (placeholder_out(&input.path), true),
    };
    let opts = yaml_options(&input.path, out, Path::new("."), &input.yaml)?;
    let mut imported = translate_or_report(&input.path, &opts, format)?;
    imported.compute = input.compute;
    Ok(Loaded {
        script: imported.script(),
        import: Some(imported),
        placeholder_out,
    })
}

/// The output folder a config is checked with when none is given: `out/NAME`, or, where
/// that is a folder a run could not replace (so checking it would report a folder the user
/// never named), `out/NAME-2`, `out/NAME-3`, ...
fn placeholder_out(config: &Path) -> PathBuf {
    let first = default_out(config);
    let usable = |p: &Path| writer::check_output_target(p, true, &[], None).is_ok();
    if usable(&first) {
        return first;
    }
    let name = first
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    (2..100)
        .map(|i| first.with_file_name(format!("{name}-{i}")))
        .find(|p| usable(p))
        .unwrap_or(first)
}

/// `out/NAME` for `NAME.yml`.
fn default_out(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map_or("merged".into(), |s| s.to_string_lossy().to_string());
    Path::new("out").join(stem)
}

fn yaml_options(
    config: &Path,
    out: PathBuf,
    script_dir: &Path,
    args: &YamlArgs,
) -> Result<import::Options, ExitCode> {
    let mut opts = import::Options::new(&config.display().to_string(), Path::new("."), &out);
    opts.script_dir = script_dir.to_path_buf();
    opts.seed = args.seed;
    opts.save_intermediates = args.save_intermediates;
    opts.allow_same_experts = args.allow_same_experts;
    opts.strict = args.strict;
    opts.truncate_embeddings = args.unsafe_truncate_embeddings;
    if let Some(s) = &args.out_shard_size {
        match import::parse_shard_size(s) {
            Ok(b) => opts.shard_bytes = Some(b),
            Err(e) => {
                eprintln!("error: {e}");
                return Err(ExitCode::from(2));
            }
        }
    }
    Ok(opts)
}

fn translate_or_report(config: &Path, opts: &import::Options, format: Format) -> Result<Import, ExitCode> {
    import::translate_file(config, opts).map_err(|f| {
        report(&f.diagnostics, &f.sources, format);
        if format == Format::Human {
            let errors = f.diagnostics.iter().filter(|d| d.is_error()).count();
            eprintln!(
                "{errors} error{} found; nothing was read or written",
                plural(errors)
            );
        }
        ExitCode::from(1)
    })
}

fn import_cmd(
    config: &Path,
    out: Option<PathBuf>,
    output: Option<&Path>,
    force: bool,
    args: &YamlArgs,
) -> ExitCode {
    let out = out.unwrap_or_else(|| default_out(config));
    let script_dir = match output.and_then(Path::parent) {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let opts = match yaml_options(config, out, &script_dir, args) {
        Ok(o) => o,
        Err(code) => return code,
    };
    let imported = match translate_or_report(config, &opts, Format::Human) {
        Ok(i) => i,
        Err(code) => return code,
    };
    report(&imported.warnings, &imported.sources, Format::Human);
    match output {
        None => {
            print!("{}", imported.text());
            ExitCode::SUCCESS
        }
        Some(path) => {
            if let Some(d) = script_target_problem(path, config, &imported, &script_dir, force) {
                report(&Diagnostics(vec![d]), &imported.sources, Format::Human);
                return ExitCode::from(1);
            }
            if let Err(e) = std::fs::write(path, imported.text()) {
                eprintln!("error: cannot write `{}`: {e}", path.display());
                return ExitCode::from(1);
            }
            eprintln!(
                "wrote {}; check it with `mergec check {}`",
                path.display(),
                path.display()
            );
            ExitCode::SUCCESS
        }
    }
}

/// Why `import -o path` may not write the script to `path`. Never a file of an input model
/// or the config itself, even with `--force`; an existing file only with `--force`.
fn script_target_problem(
    path: &Path,
    config: &Path,
    imported: &Import,
    script_dir: &Path,
    force: bool,
) -> Option<Diagnostic> {
    let target = writer::comparable_path(path);
    let error = |code, message: String, help: &str| Some(Diagnostic::error(code, message).with_help(help));
    if target == writer::comparable_path(config) {
        return error(
            Code::E0405,
            format!("`{}` is the config being imported", path.display()),
            "write the script to a file of its own, e.g. `merge.merge`",
        );
    }
    // The models the script reads, as its relative paths resolve from its own folder.
    let script = imported.script();
    let references = match mergec::syntax::parse(&script.sources, script.id) {
        Ok(ast) => mergec::sema::model_references(&ast)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    };
    for reference in references {
        let Ok(input) = mergec::io::model::resolve_reference(&reference, script_dir) else {
            continue;
        };
        if target.starts_with(writer::comparable_path(&input)) {
            return error(
                Code::E0405,
                format!(
                    "`{}` is inside the input model `{}`",
                    path.display(),
                    input.display()
                ),
                "write the script outside every input model; --force never overwrites an input",
            );
        }
    }
    let meta = std::fs::symlink_metadata(path).ok()?;
    if meta.is_dir() {
        return error(
            Code::E0405,
            format!("`{}` is a folder", path.display()),
            "name the script file, e.g. `merge.merge`",
        );
    }
    if force {
        return None;
    }
    if is_imported_script(path) {
        error(
            Code::E0405,
            format!("`{}` exists", path.display()),
            "pass --force to replace it (it is a script `mergec import` wrote)",
        )
    } else {
        error(
            Code::E0416,
            format!("`{}` exists and was not written by mergec", path.display()),
            "choose another file name, or pass --force to overwrite it",
        )
    }
}

/// Whether `path` starts with the header comment `mergec import` writes.
fn is_imported_script(path: &Path) -> bool {
    let mut head = [0u8; 4096];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    let first = head[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    first.starts_with(b"# Translated from ") && first.ends_with(b" by `mergec import`.")
}

fn load(path: &Path, format: Format) -> Result<Script, ExitCode> {
    Script::from_file(path).map_err(|e| {
        match e {
            driver::ReadError::Unreadable(message) => eprintln!("error: {message}"),
            driver::ReadError::NotUtf8 { sources, diagnostics } => {
                report(&diagnostics, &sources, format);
                if format == Format::Human {
                    eprintln!("1 error found; nothing was read or written");
                }
            }
        }
        ExitCode::from(1)
    })
}

thread_local! {
    /// `--max-memory`, set once from the command line before any command runs.
    static MAX_MEMORY: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn limits(threads: Option<usize>) -> Limits {
    let mut limits = Limits {
        max_memory: MAX_MEMORY.with(|m| m.get()),
        ..Limits::default()
    };
    if let Some(t) = threads {
        limits.threads = t.max(1);
    }
    limits
}

fn report(diags: &Diagnostics, sources: &SourceMap, format: Format) {
    if diags.is_empty() {
        return;
    }
    match format {
        Format::Human => {
            let text = render::render_text(&diags.0, sources, render::stderr_wants_colour());
            eprint!("{text}");
        }
        Format::Json => {
            let json = serde_json::json!({ "diagnostics": render::to_json(&diags.0, sources) });
            println!("{json}");
        }
    }
}

fn compile(loaded: &Loaded, force: bool, limits: &Limits, format: Format) -> Result<Compiled, ExitCode> {
    let script = &loaded.script;
    let force = force || loaded.placeholder_out;
    let result = match &loaded.import {
        Some(i) => i.compile(force, limits).map(|(_, c)| c).map_err(|(_, d)| d),
        None => driver::compile(script, force, limits),
    };
    match result {
        Ok(c) => {
            if format == Format::Human {
                report(&c.warnings, &script.sources, format);
            }
            Ok(c)
        }
        Err(diags) => {
            report(&diags, &script.sources, format);
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

fn check(input: &Input, format: Format, force: bool) -> ExitCode {
    let loaded = match load_input(input, format) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let script = &loaded.script;
    let compiled = match compile(&loaded, force, &limits(None), format) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match format {
        Format::Human => print!("{}", summary(&compiled)),
        Format::Json => {
            let by_output = steps_by_output(&compiled);
            let outputs: Vec<_> = compiled
                .program
                .outputs
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    let steps = by_output[i].iter();
                    serde_json::json!({
                        "dir": o.dir.display().to_string(),
                        "tensors": compiled.plan.outputs[i].spec.tensors.len(),
                        "bytes": steps.map(|s| s.out_bytes()).sum::<u64>()
                            + o.moe.iter().flat_map(|m| &m.generated).map(|g| g.nbytes()).sum::<u64>(),
                        "compute": o.compute.name(),
                        // The rebuilt vocabulary, as `check` prints it (null when none).
                        "vocabulary": o.vocab.as_ref().map(|v| v.report.clone()),
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

/// Each output's plan steps, gathered in one pass.
fn steps_by_output(c: &Compiled) -> Vec<Vec<&mergec::plan::Step>> {
    let mut by_output = vec![Vec::new(); c.program.outputs.len()];
    for s in &c.plan.steps {
        if let Some(o) = by_output.get_mut(s.output) {
            o.push(s);
        }
    }
    by_output
}

fn summary(c: &Compiled) -> String {
    let mut out = String::new();
    let n = c.program.outputs.len();
    out.push_str(&format!("ok: {n} output{}\n", plural(n)));
    let by_output = steps_by_output(c);
    for (i, o) in c.program.outputs.iter().enumerate() {
        let generated: u64 = o.moe.iter().flat_map(|m| &m.generated).map(|g| g.nbytes()).sum();
        let bytes: u64 = by_output[i].iter().map(|s| s.out_bytes()).sum::<u64>() + generated;
        // Parts of a fused MoE tensor are copied but not written as they are.
        let written = &c.plan.outputs[i].spec.tensors;
        let names: std::collections::HashSet<&str> = written.iter().map(|(n, _, _)| n.as_str()).collect();
        let copies = by_output[i]
            .iter()
            .filter(|s| s.kernel == mergec::plan::Kernel::Copy)
            .filter(|s| names.contains(s.tensor.as_str()))
            .count();
        out.push_str(&format!(
            "  {}: {} tensors ({} copied unchanged), {}, computed in {}\n",
            o.dir.display(),
            // As written: a fused MoE tensor once, generated routers included.
            written.len(),
            copies,
            human_bytes(bytes),
            o.compute
        ));
        // The rebuilt vocabulary, and per input what it lacks and where those rows come from.
        if let Some(v) = &o.vocab {
            for (k, line) in v.report.iter().enumerate() {
                let indent = if k == 0 { "    " } else { "      " };
                out.push_str(&format!("{indent}{line}\n"));
            }
        }
        // Which architecture a mixture of experts is written as, and why not the others.
        if let Some(moe) = &o.moe {
            out.push_str(&format!("    written as {}", moe.arch.name()));
            for (arch, why) in &moe.refused {
                out.push_str(&format!("; not {}: {why}", arch.name()));
            }
            out.push('\n');
        }
        if let Some(line) = o.moe.as_deref().and_then(|m| gate_cost(c, m)) {
            out.push_str(&line);
        }
    }
    let adapters = c.program.models.iter().filter(|m| m.adapter).count();
    let models = c.program.models.len() - adapters;
    let adapters = match adapters {
        0 => String::new(),
        n => format!(" and {n} adapter{}", plural(n)),
    };
    out.push_str(&format!(
        "read {} from {models} model{}{adapters}, write {}, peak memory {}\n",
        human_bytes(c.plan.read_bytes),
        plural(models),
        human_bytes(c.plan.write_bytes),
        human_bytes(c.plan.peak_bytes)
    ));
    out
}

/// The estimated cost of a `hidden` gate's forward pass over the routing prompts: the
/// tokens it runs through each layer of the base model.
fn gate_cost(c: &Compiled, moe: &mergec::moe_spec::MoeOutput) -> Option<String> {
    use mergec::moe_spec::GateMode;
    if !matches!(moe.gate, GateMode::Hidden | GateMode::HiddenAvg) {
        return None;
    }
    let base = c.program.models.get(moe.base.0 as usize)?;
    let bos = mergec::io::tokenizer::bos_token(&base.info.root).unwrap_or_default();
    let prompts: Vec<&String> = moe
        .experts
        .iter()
        .chain(moe.shared.as_ref())
        .flat_map(|e| e.positive.iter().chain(&e.negative))
        .collect();
    let tokens = mergec::io::tokenizer::checked_prompts_bound(&bos, prompts.iter().copied());
    let prompts = prompts.len();
    Some(format!(
        "    gate \"{}\": a forward pass over {prompts} prompt{}, at most {tokens} tokens × {} layers = {} token-layers\n",
        moe.gate.name(),
        plural(prompts),
        moe.num_layers,
        tokens.saturating_mul(moe.num_layers)
    ))
}

/// How `run` runs, from its command line.
struct RunOptions {
    force: bool,
    threads: Option<usize>,
    format: Format,
    backend: Backend,
    adapter: Option<String>,
    progress: progress::Mode,
    /// Notes on stderr (the backend taken); off with `--quiet` and for JSON output.
    notes: bool,
    /// `--quiet`: only warnings and errors on stderr.
    quiet: bool,
}

fn run_script(input: &Input, options: &RunOptions) -> ExitCode {
    let RunOptions {
        force,
        threads,
        format,
        backend,
        ..
    } = *options;
    let loaded = match load_input(input, format) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let script = &loaded.script;
    let limits = limits(threads);
    let compiled = match compile(&loaded, force, &limits, format) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let cpu = match CpuExecutor::new(limits.threads, limits.chunk_elems) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot start the CPU executor: {e}");
            return ExitCode::from(1);
        }
    };
    let executor = match choose_executor(cpu, backend, options.adapter.as_deref(), options.notes) {
        Ok(e) => e,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(1);
        }
    };
    if options.notes {
        eprintln!("backend: {}", executor.describe());
    }
    for o in &compiled.program.outputs {
        let leftovers = writer::remove_leftovers(&o.dir);
        if !options.quiet {
            report_leftovers(&leftovers);
        }
    }
    let reader = TensorReader::new();
    let mut progress = Progress::new(options.progress, &compiled.plan, &compiled.program);
    let result = mergec::exec::run(&compiled.plan, &executor, &reader, |step| progress.step(step));
    progress.finish(result.is_ok());
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
                    "warnings": report.warnings,
                });
                println!("{json}");
            } else {
                for w in &report.warnings {
                    eprintln!("warning: {w}");
                }
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
                if let Chosen::Gpu(g, _) = &executor {
                    let (on_gpu, on_cpu) = g.steps();
                    println!("{on_gpu} steps computed on the GPU, {on_cpu} on the CPU");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("the output folder being written was left as it was; inputs are untouched");
            ExitCode::from(1)
        }
    }
}

/// Says on stderr what [`writer::remove_leftovers`] cleaned up.
fn report_leftovers(leftovers: &[writer::Leftover]) {
    for l in leftovers {
        match &l.restored_to {
            None => eprintln!(
                "note: removed a leftover temporary folder `{}` of an interrupted run",
                l.path.display()
            ),
            Some(to) => eprintln!(
                "note: moved `{}`, the previous output an interrupted run had moved aside, back to `{}`",
                l.path.display(),
                to.display()
            ),
        }
    }
}

/// The executor a run uses: the CPU, or a GPU adapter with the CPU for what it cannot run.
enum Chosen {
    Cpu(CpuExecutor),
    Gpu(Box<GpuWithFallback>, String),
}

impl Chosen {
    fn describe(&self) -> String {
        match self {
            Chosen::Cpu(_) => "CPU executor".to_string(),
            Chosen::Gpu(_, name) => format!("GPU `{name}`"),
        }
    }
}

impl mergec::exec::Executor for Chosen {
    fn compute_step(
        &self,
        step: &mergec::plan::Step,
        inputs: &[&[u8]],
    ) -> Result<Vec<u8>, mergec::exec::RunError> {
        match self {
            Chosen::Cpu(c) => c.compute_step(step, inputs),
            Chosen::Gpu(g, _) => g.compute_step(step, inputs),
        }
    }
}

fn choose_executor(
    cpu: CpuExecutor,
    backend: Backend,
    adapter: Option<&str>,
    notes: bool,
) -> Result<Chosen, String> {
    if backend == Backend::Cpu {
        return Ok(Chosen::Cpu(cpu));
    }
    // `auto` wants hardware: a software adapter is slower than the CPU executor.
    let allow_software = backend == Backend::Gpu;
    match GpuContext::new(adapter, allow_software) {
        Ok(Some(ctx)) => {
            let name = ctx.adapter_info.name.clone();
            Ok(Chosen::Gpu(
                Box::new(GpuWithFallback::new(GpuExecutor::new(ctx), cpu)),
                name,
            ))
        }
        Ok(None) if backend == Backend::Auto => Ok(Chosen::Cpu(cpu)),
        Ok(None) => Err(match adapter {
            Some(a) => format!("no GPU adapter named like `{a}` (see `mergec info`)"),
            None => "no GPU adapter (on Linux without a GPU, install mesa-vulkan-drivers for a software one)"
                .to_string(),
        }),
        Err(e) if backend == Backend::Auto && adapter.is_none() => {
            if notes {
                eprintln!("note: GPU unavailable ({e}); using the CPU executor");
            }
            Ok(Chosen::Cpu(cpu))
        }
        Err(e) => Err(format!("cannot start the GPU: {e}")),
    }
}

fn info() -> ExitCode {
    let adapters = mergec::exec::gpu::list_adapters();
    if adapters.is_empty() {
        println!("no GPU adapters; runs use the CPU executor");
    }
    for a in adapters {
        println!("{a}");
    }
    ExitCode::SUCCESS
}

fn debug(input: &Input, stage: Stage) -> ExitCode {
    let loaded = match load_input(input, Format::Human) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let script = &loaded.script;
    if let Stage::Ast = stage {
        return match mergec::syntax::parse(&script.sources, script.id) {
            Ok(ast) => {
                emit(&mergec::syntax::ast::dump(&ast));
                ExitCode::SUCCESS
            }
            Err(d) => {
                let d = match &loaded.import {
                    Some(i) => i.remap(d),
                    None => d,
                };
                report(&d, &script.sources, Format::Human);
                ExitCode::from(1)
            }
        };
    }
    let compiled = match compile(&loaded, true, &limits(None), Format::Human) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let text = mergec::driver::dump(&compiled, stage.into());
    emit(&text);
    ExitCode::SUCCESS
}

/// Writes to stdout; a closed pipe (`mergec debug graph x | head`) just ends the output.
fn emit(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn extract_lora(args: ExtractArgs) -> ExitCode {
    use mergec::lora_extract::{self, SvdChoice};
    let mut options = lora_extract::Options::new(args.rank);
    options.sv_epsilon = args.sv_epsilon;
    options.include = args.include;
    options.exclude = args.exclude;
    options.svd = match args.svd {
        SvdArg::Auto => SvdChoice::Auto,
        SvdArg::Exact => SvdChoice::Exact,
        SvdArg::Randomized => SvdChoice::Randomized,
    };
    options.max_memory = MAX_MEMORY.with(|m| m.get());
    if let Some(t) = args.threads {
        options.threads = t.max(1);
    }
    options.force = args.force;
    let leftovers = writer::remove_leftovers(&args.out);
    if !args.quiet {
        report_leftovers(&leftovers);
    }
    let sources = SourceMap::new();
    let started = std::time::Instant::now();
    match lora_extract::run(&args.finetune, &args.base, &args.out, Path::new("."), &options) {
        Ok(r) => {
            report(&r.warnings, &sources, Format::Human);
            if !args.quiet {
                let ranks = if r.min_rank == r.max_rank {
                    format!("rank {}", r.max_rank)
                } else {
                    format!("ranks {}..{}", r.min_rank, r.max_rank)
                };
                println!(
                    "wrote {} ({} LoRA module{} at {ranks}: {} exact, {} randomized SVD; {} module{} saved whole)",
                    r.written.dir.display(),
                    r.modules,
                    plural(r.modules),
                    r.exact,
                    r.randomized,
                    r.whole_modules,
                    plural(r.whole_modules)
                );
                println!(
                    "kept {:.2}% of the deltas' squared Frobenius norm; {} unchanged target module{}; wrote {} in {:.2} s",
                    100.0 * r.kept_fraction,
                    r.unchanged_targets,
                    plural(r.unchanged_targets),
                    human_bytes(r.written.bytes_written),
                    started.elapsed().as_secs_f64()
                );
            }
            ExitCode::SUCCESS
        }
        Err(diags) => {
            report(&diags, &sources, Format::Human);
            let errors = diags.iter().filter(|d| d.is_error()).count();
            eprintln!("{errors} error{} found; nothing was written", plural(errors));
            ExitCode::from(1)
        }
    }
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
    report_leftovers(&writer::remove_leftovers(&args.dir));
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

/// The example script `demo` runs; it is also `examples/demo.merge`, whose paths point
/// into `demo/` from `examples/`.
const DEMO_SCRIPT: &str = include_str!("../examples/demo.merge");

fn demo(dir: &Path) -> ExitCode {
    if let Err((target, e)) = synth::write_demo_models(dir) {
        eprintln!("error: cannot write the demo model `{}`: {e}", target.display());
        return ExitCode::from(1);
    }
    // Beside its models, the script names them without the `../demo/` that `examples/` needs.
    let script_path = dir.join("demo.merge");
    if let Err(e) = std::fs::write(&script_path, DEMO_SCRIPT.replace("\"../demo/", "\"")) {
        eprintln!("error: cannot write `{}`: {e}", script_path.display());
        return ExitCode::from(1);
    }
    println!("generated three tiny models in {}", dir.join("models").display());
    println!("running {}:\n", script_path.display());
    let input = Input::new(script_path, None, YamlArgs::default(), true);
    let code = check(&input, Format::Human, true);
    if code != ExitCode::SUCCESS {
        return code;
    }
    let options = RunOptions {
        force: true,
        threads: None,
        format: Format::Human,
        backend: Backend::Auto,
        adapter: None,
        progress: progress::Mode::Auto,
        notes: true,
        quiet: false,
    };
    run_script(&input, &options)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
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

/// `mergec tokens A B ...`: each model's vocabulary against the first one's.
fn tokens(models: &[String], show: usize) -> ExitCode {
    let mut rows = Vec::new();
    for reference in models {
        let root = match mergec::io::model::resolve_reference(reference, Path::new(".")) {
            Ok(p) if p.is_file() => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {reference}: {e}");
                return ExitCode::from(1);
            }
        };
        match mergec::io::vocab::describe(&root) {
            Ok(v) => rows.push((reference.clone(), v)),
            Err(e) => {
                eprintln!("error: {reference}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    print!("{}", mergec::io::vocab::table(&rows, show));
    ExitCode::SUCCESS
}
