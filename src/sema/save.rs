//! Checking `save` statements and their options (dtype, shard size, config, tokenizer and
//! chat-template donors, the output folder).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::hir::{self, ModelId};
use super::params::Param;
use super::value::{MExpr, Value};
use super::{describe, instantiate, names, templates, wrong_type, Checker, DEFAULT_SHARD_BYTES};
use crate::diag::{Code, Diagnostic};
use crate::io::{DType, WriteError};
use crate::ops::Compute;
use crate::source::Span;
use crate::syntax::ast::{self, Expr, ExprKind, Named};

impl Checker<'_> {
    pub(super) fn save(&mut self, stmt_span: Span, value: &Expr, dir: &ast::StrLit, options: &[Named]) {
        let model = match self.expr(value) {
            Value::Model(m) => Some(self.no_params(m)),
            Value::Error => None,
            other => {
                self.diags.push(wrong_type(
                    format!("`save` needs a model, found {}", other.describe()),
                    value.span,
                    &other,
                ));
                None
            }
        };
        let mut dtype = None;
        let mut compute = None;
        let mut max_shard_bytes = DEFAULT_SHARD_BYTES;
        let mut config_from = None;
        let mut chat_template = None;
        let mut tokenizer_from = None;
        let mut vocab_opts = super::vocab::VocabOptions::default();
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for opt in options {
            if let Some(first) = seen.insert(opt.name.name.as_str(), opt.name.span) {
                self.diags.push(
                    Diagnostic::error(Code::E0207, format!("option `{}` is given twice", opt.name.name))
                        .at(opt.name.span, "given again here")
                        .with_label(first, "first given here"),
                );
                continue;
            }
            match opt.name.name.as_str() {
                "dtype" => dtype = self.dtype_option(&opt.value),
                "compute" => compute = self.compute_option(&opt.value),
                "shard" => {
                    if let Some(n) = self.size_option(&opt.value) {
                        max_shard_bytes = n;
                    }
                }
                "config" => config_from = self.donor_option(&opt.value, "config"),
                "tokenizer" => {
                    let choice = self.tokenizer_choice(&opt.value);
                    if let Some(super::vocab::Choice::Model(m)) = choice {
                        tokenizer_from = Some(m);
                    }
                    vocab_opts.choice = choice.map(|c| (c, opt.value.span));
                }
                "tokens" => vocab_opts.tokens = self.tokens_option(&opt.value),
                "mixed_vocab" => vocab_opts.mixed = self.bool_option(&opt.value, "mixed_vocab"),
                "pad_vocab" => {
                    vocab_opts.pad = self.pad_vocab_option(&opt.value).map(|n| (n, opt.value.span))
                }
                "chat_template" => chat_template = self.chat_template_option(&opt.value),
                other => {
                    let mut d = Diagnostic::error(Code::E0208, format!("unknown save option `{other}`"))
                        .at(opt.name.span, "unknown option");
                    if let Some(s) = names::did_you_mean(other, SAVE_OPTIONS.iter().copied()) {
                        d = d.with_help(format!("did you mean `{s}`?"));
                    } else {
                        d = d.with_help(format!("the options are: {}", SAVE_OPTIONS.join(", ")));
                    }
                    self.diags.push(d);
                }
            }
        }
        let dir_path = resolve_dir(&self.options.base_dir, &dir.value);
        if let Some(&previous) = self.output_dirs.get(&dir_path) {
            self.diags.push(
                Diagnostic::error(Code::E0405, format!("two saves write to `{}`", dir.value))
                    .at(dir.span, "written again here")
                    .with_label(previous, "first written here")
                    .with_help("give each save its own folder"),
            );
            return;
        }
        if let Err(e) = crate::io::writer::check_output_target(
            &dir_path,
            self.options.force,
            &self.protected_paths(),
            Some(&self.options.base_dir),
        ) {
            self.diags.push(output_folder_diagnostic(&e, dir.span));
        }
        let Some(model) = model else { return };
        let config_from = config_from.or_else(|| model.inputs.first().copied());
        let tokenizer_from = tokenizer_from.or(config_from);
        let output = hir::Output {
            dir: dir_path,
            span: dir.span,
            tensors: Vec::new(),
            max_shard_bytes,
            config_from,
            tokenizer_from,
            dtype,
            // `--compute` wins over the save's option, which wins over `set compute`.
            compute: self
                .options
                .compute
                .or(compute)
                .or(self.compute.map(|(c, _)| c))
                .unwrap_or_default(),
            layer_count: model.layers(),
            layer_sources: model.layer_sources.to_vec(),
            inputs: model.inputs.clone(),
            chat_template,
            methods: describe(&model.expr),
            moe: None,
            vocab: None,
        };
        let mut output = instantiate::output(
            &self.models,
            self.seed,
            output,
            &model,
            &mut self.diags,
            &mut self.ops_left,
        );
        self.output_dirs.insert(output.dir.clone(), output.span);
        if output.moe.is_some() {
            // A mixture's embeddings come from its base: only refused when they would mix
            // vocabularies (a computed base), never rebuilt.
            vocab_opts = super::vocab::VocabOptions::default();
        }
        self.vocabulary(&mut output, vocab_opts, stmt_span);
        self.outputs.push(output);
    }

    /// `shard: 5GB` (a size) or a plain number of bytes, at least 1.
    pub(super) fn size_option(&mut self, value: &Expr) -> Option<u64> {
        let bytes = match self.expr(value) {
            Value::Size(n) => n as f64,
            Value::Param(Param::Number(x)) => x,
            Value::Error => return None,
            other => {
                self.diags.push(
                    wrong_type(
                        format!("`shard` expects a size, found {}", other.describe()),
                        value.span,
                        &other,
                    )
                    .with_help("for example `shard: 5GB` or `shard: 500MiB`"),
                );
                return None;
            }
        };
        if bytes < 1.0 || bytes.fract() != 0.0 {
            self.diags.push(
                Diagnostic::error(
                    Code::E0305,
                    "shard size must be a whole number of bytes, at least 1",
                )
                .at(value.span, "not a valid size")
                .with_help("for example `shard: 5GB`"),
            );
            return None;
        }
        Some(bytes as u64)
    }

    pub(super) fn protected_paths(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for m in &self.models {
            out.extend(m.info.protected_paths());
        }
        out
    }

    /// `compute: bf16`: the arithmetic of the save's merges (see `ops::compute`).
    pub(super) fn compute_option(&mut self, value: &Expr) -> Option<Compute> {
        self.dtype_name(value, "compute", "the compute dtypes")
            .and_then(Compute::of_dtype)
    }

    pub(super) fn dtype_option(&mut self, value: &Expr) -> Option<DType> {
        self.dtype_name(value, "dtype", "the output dtypes")
    }

    /// A dtype written as a name (`bf16`) or a string, for option `key`.
    fn dtype_name(&mut self, value: &Expr, key: &str, what: &str) -> Option<DType> {
        let text = match &value.kind {
            ExprKind::Name(n) if !self.env.contains_key(n) => n.clone(),
            ExprKind::Str(s) => s.clone(),
            _ => {
                let v = self.expr(value);
                if !matches!(v, Value::Error) {
                    self.diags.push(wrong_type(
                        format!("`{key}` expects f32, f16 or bf16, found {}", v.describe()),
                        value.span,
                        &v,
                    ));
                }
                return None;
            }
        };
        match DType::from_script_name(&text) {
            Some(d) => Some(d),
            None => {
                let mut d = Diagnostic::error(Code::E0305, format!("unknown dtype `{text}`"))
                    .at(value.span, "not a dtype");
                d = match names::did_you_mean(&text, ["f32", "f16", "bf16"]) {
                    Some(s) => d.with_help(format!("did you mean `{s}`? {what} are f32, f16 and bf16")),
                    None => d.with_help(format!("{what} are f32, f16 and bf16")),
                };
                self.diags.push(d);
                None
            }
        }
    }

    /// `chat_template: "chatml"` (a built-in name) or a literal Jinja template.
    pub(super) fn chat_template_option(&mut self, value: &Expr) -> Option<String> {
        let ExprKind::Str(text) = &value.kind else {
            let v = self.expr(value);
            if !matches!(v, Value::Error) {
                self.diags.push(
                    wrong_type(
                        format!("`chat_template` expects a string, found {}", v.describe()),
                        value.span,
                        &v,
                    )
                    .with_help("a built-in name such as \"chatml\", or a Jinja template in quotes"),
                );
            }
            return None;
        };
        if let Some(t) = templates::built_in(text) {
            return Some(t.to_string());
        }
        if templates::looks_like_jinja(text) {
            return Some(text.clone());
        }
        let names: Vec<&str> = templates::BUILT_IN.iter().map(|(n, _)| *n).collect();
        let mut d = Diagnostic::error(Code::E0305, format!("unknown chat template `{text}`"))
            .at(value.span, "neither a built-in name nor a Jinja template");
        d = match names::did_you_mean(text, names.iter().copied()) {
            Some(s) => d.with_help(format!(
                "did you mean `{s}`? the built-in templates are: {}",
                names.join(", ")
            )),
            None => d.with_help(format!(
                "the built-in templates are: {}; or write the template itself",
                names.join(", ")
            )),
        };
        self.diags.push(d);
        None
    }

    /// `config: m` / `tokenizer: m`: must name an input model.
    pub(super) fn donor_option(&mut self, value: &Expr, what: &str) -> Option<ModelId> {
        match self.expr(value) {
            Value::Model(m) => match (&*m.expr, m.params.is_empty()) {
                (MExpr::Input(id), true) => Some(*id),
                _ => {
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0301,
                            format!("`{what}` needs an input model, found a computed model"),
                        )
                        .at(value.span, "computed here")
                        .with_help(format!("name a model declared with `model`, e.g. `{what}: base`")),
                    );
                    None
                }
            },
            Value::Error => None,
            other => {
                self.diags.push(wrong_type(
                    format!("`{what}` needs an input model, found {}", other.describe()),
                    value.span,
                    &other,
                ));
                None
            }
        }
    }
}

/// Why the output folder of a save cannot be written, with its code and what to do.
fn output_folder_diagnostic(e: &WriteError, span: Span) -> Diagnostic {
    let (code, help) = output_folder_problem(e);
    Diagnostic::error(code, e.to_string())
        .at(span, "output folder")
        .with_help(help)
}

/// The code of an output folder that cannot be written, and what to do about it.
pub fn output_folder_problem(e: &WriteError) -> (Code, String) {
    const NEW_FOLDER: &str = "name a new folder for the output, e.g. \"out/merged\"";
    match e {
        WriteError::WorkingFolder { .. } => (
            Code::E0413,
            format!("{NEW_FOLDER}; --force never replaces the current folder or a folder above it"),
        ),
        WriteError::HoldsScript { .. } => (
            Code::E0414,
            format!("{NEW_FOLDER}; --force never replaces the folder that holds the script"),
        ),
        WriteError::Root { .. } | WriteError::Home { .. } => (
            Code::E0415,
            format!("{NEW_FOLDER}; --force never replaces the home folder, a folder above it or `/`"),
        ),
        WriteError::NotMergecOutput { .. } => (
            Code::E0416,
            format!(
                "choose another folder, or delete this one yourself: --force replaces only a folder mergec wrote (it holds a `{}` file)",
                crate::io::writer::MARKER_FILE
            ),
        ),
        WriteError::NameTooLong { .. } => (
            Code::E0417,
            format!(
                "file systems take names of up to {} bytes; choose a shorter name",
                crate::io::writer::NAME_MAX
            ),
        ),
        WriteError::NotEmpty { .. } => (
            Code::E0405,
            "choose another folder, or pass --force to replace it".to_owned(),
        ),
        WriteError::SameAsInput { .. } | WriteError::InsideInput { .. } | WriteError::ContainsInput { .. } => (
            Code::E0405,
            "choose a folder outside every input model; --force never overwrites an input".to_owned(),
        ),
        _ => (Code::E0405, "choose another folder".to_owned()),
    }
}

/// The options `save ... to "dir" { ... }` takes.
const SAVE_OPTIONS: &[&str] = &[
    "dtype",
    "compute",
    "shard",
    "config",
    "tokenizer",
    "tokens",
    "pad_vocab",
    "mixed_vocab",
    "chat_template",
];

fn resolve_dir(base: &Path, dir: &str) -> PathBuf {
    let p = Path::new(dir);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}
