//! Output vocabularies at check time: the save options `tokenizer: union | base | truncate
//! | MODEL`, `tokens: [...]` and `pad_vocab: N`; inputs whose vocabularies differ; the
//! embedding surgery of each vocabulary tensor (`io::vocab` builds it, `ops::gather`
//! carries it).

use std::sync::Arc;

use super::hir::{self, ModelId, TensorExpr};
use super::Checker;
use crate::diag::{Code, Diagnostic};
use crate::io::vocab::{self, Fill, Row, RowPlan, TokenRef, TokenRule, VocabInput, VocabPolicy, VocabSource};
use crate::ops::gather::Gather;
use crate::source::Span;
use crate::syntax::ast::{Arg, Expr, ExprKind};

/// What a save's `tokenizer:` asks for.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Choice {
    Union,
    Base,
    Model(ModelId),
    /// Every vocabulary tensor cut to the smallest input's rows (mergekit's
    /// `--unsafe-truncate-embeddings`).
    Truncate,
}

/// A save's vocabulary options.
#[derive(Clone, Debug, Default)]
pub(super) struct VocabOptions {
    pub choice: Option<(Choice, Span)>,
    pub tokens: Vec<(TokenRule, Span)>,
    pub pad: Option<(usize, Span)>,
    /// `mixed_vocab: true`: inputs of different tokenizer families are meant (E0806 off).
    pub mixed: bool,
}

/// Below this share of tokens in common with the base (of the smaller vocabulary), an
/// input is of another tokenizer family: its rows mean other things, and a union mostly
/// fills them with copies (E0806).
const FAMILY_SHARE: f64 = 0.5;

/// Whether `name` is a tensor indexed by token id along its first axis (mergekit's
/// `vocabulary_axis: 0` weights).
pub fn is_vocab_tensor(name: &str) -> bool {
    const ENDINGS: [&str; 7] = [
        "embed_tokens.weight",
        "lm_head.weight",
        "wte.weight",
        "embed_in.weight",
        "embed_out.weight",
        "word_embeddings.weight",
        "tok_embeddings.weight",
    ];
    ENDINGS
        .iter()
        .any(|e| name == *e || name.ends_with(&format!(".{e}")))
}

impl Checker<'_> {
    /// `tokenizer: union | base | truncate | MODEL`: the keywords unless a model has that name.
    pub(super) fn tokenizer_choice(&mut self, value: &Expr) -> Option<Choice> {
        if let ExprKind::Name(n) = &value.kind {
            if !self.env.contains_key(n) {
                match n.as_str() {
                    "union" => return Some(Choice::Union),
                    "base" => return Some(Choice::Base),
                    "truncate" => return Some(Choice::Truncate),
                    _ => {}
                }
            }
        }
        self.donor_option(value, "tokenizer").map(Choice::Model)
    }

    /// `mixed_vocab: true` / `false`.
    pub(super) fn bool_option(&mut self, value: &Expr, what: &str) -> bool {
        match &value.kind {
            ExprKind::Name(b) if b == "true" => true,
            ExprKind::Name(b) if b == "false" => false,
            _ => {
                self.diags.push(
                    Diagnostic::error(Code::E0305, format!("`{what}` must be true or false"))
                        .at(value.span, "not true or false"),
                );
                false
            }
        }
    }

    /// `pad_vocab: N`: the output vocabulary's rows rounded up to a multiple of N.
    pub(super) fn pad_vocab_option(&mut self, value: &Expr) -> Option<usize> {
        match &value.kind {
            ExprKind::Number(n) if *n >= 1.0 && n.fract() == 0.0 && *n <= 1e9 => Some(*n as usize),
            _ => {
                self.diags.push(
                    Diagnostic::error(Code::E0305, "`pad_vocab` must be a whole number, at least 1")
                        .at(value.span, "not a valid multiple")
                        .with_help("for example `pad_vocab: 64`"),
                );
                None
            }
        }
    }

    /// `tokens: [token("TEXT", from: MODEL | zero, row: "TEXT" | ID, force: true), ...]`.
    pub(super) fn tokens_option(&mut self, value: &Expr) -> Vec<(TokenRule, Span)> {
        let ExprKind::List(items) = &value.kind else {
            self.diags.push(token_syntax(
                value.span,
                "`tokens` expects a list of `token(...)` entries",
            ));
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|e| self.token_rule(e).map(|r| (r, e.span)))
            .collect()
    }

    fn token_rule(&mut self, e: &Expr) -> Option<TokenRule> {
        let ExprKind::Call { func, args } = &e.kind else {
            self.diags.push(token_syntax(
                e.span,
                "each entry of `tokens` is `token(\"TEXT\", ...)`",
            ));
            return None;
        };
        if func.name != "token" {
            self.diags.push(token_syntax(
                func.span,
                "each entry of `tokens` is `token(\"TEXT\", ...)`",
            ));
            return None;
        }
        let mut text = None;
        let mut from: Option<Result<ModelId, ()>> = None;
        let mut row: Option<TokenRef> = None;
        let mut force = false;
        for a in args {
            match a {
                Arg::Positional(Expr {
                    kind: ExprKind::Str(s),
                    ..
                }) if text.is_none() => text = Some(s.clone()),
                Arg::Named(n) => match (n.name.name.as_str(), &n.value.kind) {
                    ("from", ExprKind::Name(z)) if z == "zero" && !self.env.contains_key(z) => {
                        from = Some(Err(()))
                    }
                    ("from", _) => from = Some(Ok(self.donor_option(&n.value, "from")?)),
                    ("row", ExprKind::Str(s)) => row = Some(TokenRef::Text(s.clone())),
                    ("row", ExprKind::Number(x)) if *x >= 0.0 && x.fract() == 0.0 && *x < 4e9 => {
                        row = Some(TokenRef::Id(*x as u32))
                    }
                    ("force", ExprKind::Name(b)) if b == "true" || b == "false" => force = b == "true",
                    _ => {
                        self.diags.push(token_syntax(
                            a.span(),
                            "`token(...)` takes `from: MODEL` or `from: zero`, `row: \"TEXT\"` or `row: ID`, `force: true`",
                        ));
                        return None;
                    }
                },
                _ => {
                    self.diags.push(token_syntax(
                        a.span(),
                        "the token's text comes first, as a string",
                    ));
                    return None;
                }
            }
        }
        let Some(token) = text else {
            self.diags
                .push(token_syntax(e.span, "`token(...)` needs the token's text first"));
            return None;
        };
        let fill = match (from, row) {
            (None, None) => None,
            (Some(Err(())), None) => Some(Fill::Zero),
            (Some(Ok(m)), None) => Some(Fill::Model(m.0 as usize)),
            (Some(Ok(m)), Some(token)) => Some(Fill::ModelToken {
                model: m.0 as usize,
                token,
            }),
            (_, Some(_)) => {
                self.diags
                    .push(token_syntax(e.span, "`row:` needs `from: MODEL`"));
                return None;
            }
        };
        Some(TokenRule { token, fill, force })
    }

    /// Resizes the output's vocabulary tensors as its options say, or refuses inputs whose
    /// vocabularies differ without a policy (E0801). Rules' model numbers are script model
    /// ids here and become input positions.
    pub(super) fn vocabulary(&mut self, out: &mut hir::Output, opts: VocabOptions, save_span: Span) {
        let names: Vec<String> = out
            .tensors
            .iter()
            .filter(|t| is_vocab_tensor(&t.name))
            .map(|t| t.name.clone())
            .collect();
        // The inputs whose vocabulary tensors the output reads, with their rows.
        let mut inputs: Vec<(ModelId, usize)> = Vec::new();
        for t in out.tensors.iter().filter(|t| is_vocab_tensor(&t.name)) {
            visit_loads(&t.expr, &mut |m, name| {
                let rows = self.models[m.0 as usize]
                    .info
                    .tensors
                    .get(name)
                    .and_then(|i| i.shape.first().copied());
                if let (Some(rows), false) = (rows, inputs.iter().any(|(x, _)| *x == m)) {
                    inputs.push((m, rows));
                }
            });
        }
        if names.is_empty() || inputs.is_empty() {
            if let Some((_, span)) = &opts.choice {
                if opts.pad.is_some() || !opts.tokens.is_empty() {
                    self.diags.push(
                        Diagnostic::error(Code::E0802, "the output has no vocabulary tensors to resize")
                            .at(*span, "no embed_tokens or lm_head here")
                            .with_help("remove `tokens` and `pad_vocab`"),
                    );
                }
            }
            return;
        }
        inputs.sort_by_key(|(m, _)| *m);
        let rows_differ = inputs.iter().any(|(_, r)| *r != inputs[0].1);
        let comparisons: Vec<(ModelId, vocab::VocabComparison)> = inputs
            .iter()
            .skip(1)
            .filter_map(|(m, _)| {
                let first = &self.models[inputs[0].0 .0 as usize].info.root;
                vocab::compare(first, &self.models[m.0 as usize].info.root).map(|c| (*m, c))
            })
            .collect();
        let needs_policy = rows_differ || comparisons.iter().any(|(_, c)| !c.same);
        let Some((choice, choice_span)) = opts.choice.clone() else {
            if rows_differ {
                self.differing_vocab_error(&inputs, save_span);
            } else if needs_policy && (opts.mixed || !self.foreign_families(&inputs, &comparisons, save_span))
            {
                let list: Vec<&str> = inputs
                    .iter()
                    .map(|(m, _)| self.models[m.0 as usize].name.as_str())
                    .collect();
                self.diags.push(
                    Diagnostic::error(Code::W0010, "the inputs' tokenizers differ but their embeddings have as many rows")
                        .at(save_span, "merged row by row, token id by token id")
                        .with_note(format!("inputs: {}", list.join(", ")))
                        .with_help("if the same id means another token in another input, give the save `tokenizer: union` (or `base`, or a model)"),
                );
            }
            return;
        };
        if choice == Choice::Truncate {
            self.truncate(out, &inputs, choice_span);
            return;
        }
        if !needs_policy && opts.tokens.is_empty() && opts.pad.is_none() {
            // Same vocabulary everywhere: the tokenizer files are copied as they are.
            if let Choice::Model(m) = choice {
                out.tokenizer_from = Some(m);
            }
            return;
        }
        let position = |m: ModelId| inputs.iter().position(|(x, _)| *x == m);
        let base = out.config_from.and_then(position).unwrap_or(0);
        let source = match choice {
            Choice::Union => VocabSource::Union,
            Choice::Base => VocabSource::Base,
            Choice::Model(m) => match position(m) {
                Some(i) => VocabSource::Model(i),
                None => {
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0803,
                            format!(
                                "`{}` is not an input of this save",
                                self.models[m.0 as usize].name
                            ),
                        )
                        .at(choice_span, "its tokenizer cannot order the others' rows")
                        .with_help("name a model the save merges, or `union` / `base`"),
                    );
                    return;
                }
            },
            Choice::Truncate => return,
        };
        let mut tokens = Vec::new();
        for (mut rule, span) in opts.tokens {
            let model = match &rule.fill {
                Some(Fill::Model(m)) | Some(Fill::ModelToken { model: m, .. }) => Some(*m),
                _ => None,
            };
            if let Some(m) = model {
                let Some(i) = position(ModelId(m as u32)) else {
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0803,
                            format!("`{}` is not an input of this save", self.models[m].name),
                        )
                        .at(span, "rows come only from the merged models")
                        .with_help("take the row from a model the save merges"),
                    );
                    return;
                };
                rule.fill = match rule.fill {
                    Some(Fill::Model(_)) => Some(Fill::Model(i)),
                    Some(Fill::ModelToken { token, .. }) => Some(Fill::ModelToken { model: i, token }),
                    other => other,
                };
            }
            tokens.push(rule);
        }
        let policy = VocabPolicy {
            source,
            tokens,
            pad_to_multiple_of: opts.pad.map(|(n, _)| n),
        };
        let vocab_inputs: Vec<VocabInput> = inputs
            .iter()
            .map(|(m, rows)| {
                let model = &self.models[m.0 as usize];
                VocabInput {
                    name: &model.name,
                    root: &model.info.root,
                    rows: *rows,
                }
            })
            .collect();
        let built = match vocab::build(&policy, base, &vocab_inputs) {
            Ok(b) => b,
            Err(e) => {
                self.diags.push(
                    Diagnostic::error(Code::E0804, format!("cannot build the output vocabulary: {e}"))
                        .at(choice_span, "this vocabulary")
                        .with_help("every input needs a readable tokenizer.json; a `tokens` rule needs a source that has the token"),
                );
                return;
            }
        };
        if !opts.mixed {
            let base_len = built.counts[base].own;
            let foreign: Vec<String> = vocab_inputs
                .iter()
                .zip(&built.counts)
                .filter(|(_, c)| {
                    let smaller = c.own.min(base_len).max(1);
                    (c.shared_with_base as f64) < FAMILY_SHARE * smaller as f64
                })
                .map(|(input, c)| {
                    format!(
                        "`{}` shares {} of its {} tokens with `{}`",
                        input.name, c.shared_with_base, c.own, vocab_inputs[base].name
                    )
                })
                .collect();
            if !foreign.is_empty() {
                self.diags.push(
                    Diagnostic::error(Code::E0806, "inputs of different tokenizer families")
                        .at(choice_span, "their rows cannot be aligned token by token")
                        .with_note(foreign.join("; "))
                        .with_help("merge models of one tokenizer family; to merge them anyway, add `mixed_vocab: true` to the save"),
                );
                return;
            }
        }
        let tokenizer_json = match built.tokenizer.to_string(true) {
            Ok(t) => t,
            Err(e) => {
                self.diags
                    .push(Diagnostic::bug(format!("cannot write the output tokenizer: {e}")));
                return;
            }
        };
        let mut report = vec![format!(
            "vocabulary: {} tokens{} from {}",
            built.tokens.len(),
            if built.size != built.tokens.len() {
                format!(", padded to {} rows", built.size)
            } else {
                String::new()
            },
            match &policy.source {
                VocabSource::Union => "the union of the inputs' tokenizers".to_string(),
                VocabSource::Base => format!("`{}`'s tokenizer", vocab_inputs[base].name),
                VocabSource::Model(i) => format!("`{}`'s tokenizer", vocab_inputs[*i].name),
            }
        )];
        for (input, c) in vocab_inputs.iter().zip(&built.counts) {
            let mut from = Vec::new();
            for (n, what) in [
                (c.ruled, "from `tokens` rules"),
                (c.from_base, "from the base"),
                (c.from_single, "from the only input with the token"),
                (c.mean, "means of the inputs with the token"),
                (c.zero, "zeros"),
            ] {
                if n > 0 {
                    from.push(format!("{n} {what}"));
                }
            }
            report.push(format!(
                "{}: lacks {} token{}{}{}",
                input.name,
                c.missing,
                if c.missing == 1 { "" } else { "s" },
                if from.is_empty() {
                    String::new()
                } else {
                    format!(" (rows: {})", from.join(", "))
                },
                if c.dropped > 0 {
                    format!("; {} of its rows dropped", c.dropped)
                } else {
                    String::new()
                }
            ));
        }
        let plans: Vec<Arc<RowPlan>> = built.plans.into_iter().map(Arc::new).collect();
        self.apply_plans(out, &inputs, &plans, built.size);
        if let Choice::Model(m) = choice {
            out.tokenizer_from = Some(m);
        } else if out.tokenizer_from.is_none() {
            out.tokenizer_from = Some(inputs[base].0);
        }
        out.vocab = Some(Arc::new(hir::VocabOut {
            tokenizer_json: Some(tokenizer_json),
            size: built.size,
            report,
        }));
    }

    /// `tokenizer: truncate`: every vocabulary tensor keeps its first rows, as many as the
    /// smallest input has (W0011).
    fn truncate(&mut self, out: &mut hir::Output, inputs: &[(ModelId, usize)], span: Span) {
        let min = inputs.iter().map(|(_, r)| *r).min().unwrap_or(0);
        let cut: Vec<String> = inputs
            .iter()
            .filter(|(_, r)| *r > min)
            .map(|(m, r)| format!("`{}` loses {} rows", self.models[m.0 as usize].name, r - min))
            .collect();
        if cut.is_empty() {
            return;
        }
        self.diags.push(
            Diagnostic::error(Code::W0011, format!("vocabulary tensors truncated to {min} rows"))
                .at(span, "rows past the smallest vocabulary are dropped")
                .with_note(cut.join("; "))
                .with_help("this assumes the same ids mean the same tokens in every input; `tokenizer: union` aligns them by token instead"),
        );
        let plans: Vec<Arc<RowPlan>> = (0..inputs.len())
            .map(|i| {
                Arc::new(RowPlan {
                    rows: (0..min as u32)
                        .map(|row| Row::Copy { src: i as u32, row })
                        .collect(),
                    pad: 0,
                })
            })
            .collect();
        self.apply_plans(out, inputs, &plans, min);
        out.vocab = Some(Arc::new(hir::VocabOut {
            tokenizer_json: None,
            size: min,
            report: vec![format!("vocabulary: truncated to {min} rows")],
        }));
    }

    /// Replaces the loads of every vocabulary tensor by its surgery, and sets its rows.
    fn apply_plans(
        &mut self,
        out: &mut hir::Output,
        inputs: &[(ModelId, usize)],
        plans: &[Arc<RowPlan>],
        size: usize,
    ) {
        for t in out.tensors.iter_mut().filter(|t| is_vocab_tensor(&t.name)) {
            let models = &self.models;
            let expr = std::mem::replace(
                &mut t.expr,
                TensorExpr::Load {
                    model: ModelId(0),
                    name: String::new(),
                },
            );
            t.expr = rewrite(expr, &mut |model, name| {
                let own = inputs.iter().position(|(m, _)| *m == model)?;
                let info = &models[model.0 as usize].info;
                let tensor = info.tensors.get(name)?;
                let width = tensor.shape.iter().skip(1).product::<usize>();
                if plans[own].is_identity(own as u32, inputs[own].1) && tensor.shape.first() == Some(&size) {
                    return None;
                }
                let sources = inputs
                    .iter()
                    .map(|(m, _)| {
                        let dtype = models[m.0 as usize]
                            .info
                            .tensors
                            .get(name)
                            .map_or(tensor.dtype, |i| i.dtype);
                        (*m, name.to_string(), dtype)
                    })
                    .collect();
                Some(TensorExpr::Gather(Arc::new(Gather {
                    sources,
                    own,
                    plan: plans[own].clone(),
                    width,
                })))
            });
            if let Some(first) = t.shape.first_mut() {
                *first = size;
            }
        }
    }

    /// E0806 for inputs that share under half their tokens with the first; true if any.
    fn foreign_families(
        &mut self,
        inputs: &[(ModelId, usize)],
        comparisons: &[(ModelId, vocab::VocabComparison)],
        span: Span,
    ) -> bool {
        let first = &self.models[inputs[0].0 .0 as usize].name;
        let foreign: Vec<String> = comparisons
            .iter()
            .filter(|(_, c)| (c.shared as f64) < FAMILY_SHARE * c.smaller.max(1) as f64)
            .map(|(m, c)| {
                format!(
                    "`{}` shares {} tokens with `{first}` (of {} in the smaller vocabulary)",
                    self.models[m.0 as usize].name, c.shared, c.smaller
                )
            })
            .collect();
        if foreign.is_empty() {
            return false;
        }
        self.diags.push(
            Diagnostic::error(Code::E0806, "inputs of different tokenizer families")
                .at(span, "merged row by row, their rows mean different tokens")
                .with_note(foreign.join("; "))
                .with_help("merge models of one tokenizer family; to merge them anyway, add `mixed_vocab: true` to the save"),
        );
        true
    }

    fn differing_vocab_error(&mut self, inputs: &[(ModelId, usize)], span: Span) {
        let sizes: Vec<String> = inputs
            .iter()
            .map(|(m, r)| format!("`{}`: {r} rows", self.models[m.0 as usize].name))
            .collect();
        self.diags.push(
            Diagnostic::error(Code::E0801, "the inputs' vocabularies differ and the save has no tokenizer policy")
                .at(span, "this save merges them")
                .with_note(format!("embedding rows: {}", sizes.join(", ")))
                .with_help(
                    "give the save `tokenizer: union` (every input's tokens), `tokenizer: base` (the config donor's), or `tokenizer: MODEL`; `tokenizer: truncate` keeps the first rows of each, unsafely",
                ),
        );
    }
}

fn token_syntax(span: Span, what: &str) -> Diagnostic {
    Diagnostic::error(Code::E0805, what.to_string())
        .at(span, "here")
        .with_help("for example `tokens: [token(\"<|im_end|>\", from: chat), token(\"<pad>\", from: zero)]`")
}

fn visit_loads(e: &TensorExpr, f: &mut impl FnMut(ModelId, &str)) {
    match e {
        TensorExpr::Load { model, name } => f(*model, name),
        other => other.operands().iter().for_each(|o| visit_loads(o, f)),
    }
}

/// `e` with each load `f` answers for replaced by the answer.
fn rewrite(e: TensorExpr, f: &mut impl FnMut(ModelId, &str) -> Option<TensorExpr>) -> TensorExpr {
    match e {
        TensorExpr::Load { model, name } => f(model, &name).unwrap_or(TensorExpr::Load { model, name }),
        TensorExpr::Gather(g) => TensorExpr::Gather(g),
        TensorExpr::Elementwise { op, operands } => TensorExpr::Elementwise {
            op,
            operands: operands.into_iter().map(|o| rewrite(o, f)).collect(),
        },
        TensorExpr::Method { op, compute, inputs } => TensorExpr::Method {
            op,
            compute,
            inputs: inputs.into_iter().map(|o| rewrite(o, f)).collect(),
        },
    }
}
