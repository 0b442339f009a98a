//! Output vocabularies: the tokenizer an output is written with when its inputs'
//! vocabularies differ (`tokenizer: union | base | MODEL`), and for each input the row plan
//! that moves its embedding rows (`embed_tokens`, `lm_head`) to the output's token ids.
//!
//! What mergekit 0.1.5 does (its `tokenizer/build.py` and `embed.py`), in a fixed order:
//! - the base's tokenizer loses the tokens whose id is at or past its config's
//!   `vocab_size` (BPE only);
//! - `union`: the base's tokenizer plus, model by model (base first, then the others in
//!   input order), every token it lacks: ordinary tokens first (by id within each model),
//!   then the models' added tokens with their settings (the first model's settings win);
//! - each token named in `tokens:` that is still missing is added last;
//! - an input's row for an output token is its own row of that token; a token it lacks
//!   (or a forced one) takes, in this order: the `tokens:` rule's source, else the row of
//!   the only input that has it, else the base's row, else the mean of the rows of the
//!   inputs that have it, else zeros;
//! - `pad_to_multiple_of` pads with rows equal to the mean of the model's other rows.
//!
//! Ordinary tokens of one model come in id order here; mergekit takes them in the order of
//! a hash map, so only one new ordinary token per model has a defined place there.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

use super::tokenizer::{self, TokenizerError};

/// Where the output's tokens come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VocabSource {
    /// The base's tokens plus every other input's (mergekit's default `union`).
    Union,
    /// The base's tokenizer as it is.
    Base,
    /// This input's tokenizer (an index into the inputs).
    Model(usize),
}

/// A token of another model's vocabulary, by text or by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenRef {
    Text(String),
    Id(u32),
}

/// Where a `tokens:` rule takes a token's row from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fill {
    /// That input's row of the same token.
    Model(usize),
    /// That input's row of another token.
    ModelToken { model: usize, token: TokenRef },
    /// Zeros.
    Zero,
}

/// One entry of `tokens:`: the token's source, and whether every input takes it (`force`)
/// or only those that lack the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRule {
    pub token: String,
    pub fill: Option<Fill>,
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabPolicy {
    pub source: VocabSource,
    pub tokens: Vec<TokenRule>,
    pub pad_to_multiple_of: Option<usize>,
}

/// One input as the vocabulary build sees it.
#[derive(Clone, Debug)]
pub struct VocabInput<'a> {
    /// The name the script gives it (for messages).
    pub name: &'a str,
    /// Its folder (tokenizer.json is read from there).
    pub root: &'a Path,
    /// Rows of its embedding: config.json's `vocab_size`, else the embedding's rows.
    pub rows: usize,
}

/// One output row of one input's embedding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    /// Row `row` of input `src`.
    Copy {
        src: u32,
        row: u32,
    },
    /// The mean of these (input, row) rows, summed in this order.
    Mean(Vec<(u32, u32)>),
    Zero,
}

/// How one input's embedding becomes the output vocabulary's: `rows` for the tokens, then
/// `pad` rows holding the mean of those.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowPlan {
    pub rows: Vec<Row>,
    pub pad: usize,
}

impl RowPlan {
    pub fn len(&self) -> usize {
        self.rows.len() + self.pad
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is the identity on an embedding of `rows` rows of input `me`.
    pub fn is_identity(&self, me: u32, rows: usize) -> bool {
        self.pad == 0
            && self.rows.len() == rows
            && self.rows.iter().enumerate().all(|(i, r)| {
                *r == Row::Copy {
                    src: me,
                    row: i as u32,
                }
            })
    }
}

/// Where one input's rows come from, counted for `mergec check`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FillCounts {
    /// Output tokens the input lacks.
    pub missing: usize,
    /// Its own rows dropped (tokens the output vocabulary lacks).
    pub dropped: usize,
    pub from_base: usize,
    /// From the only input that has the token.
    pub from_single: usize,
    pub mean: usize,
    pub zero: usize,
    /// Rows set by a `tokens:` rule.
    pub ruled: usize,
    /// Tokens of its own vocabulary, and how many of them the base has too.
    pub own: usize,
    pub shared_with_base: usize,
}

/// The output vocabulary: its tokenizer, size and each input's row plan.
pub struct OutputVocab {
    pub tokenizer: Tokenizer,
    /// Tokens in id order.
    pub tokens: Vec<String>,
    /// Rows of the output embedding (tokens plus padding).
    pub size: usize,
    pub plans: Vec<RowPlan>,
    pub counts: Vec<FillCounts>,
}

#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("`{model}`: {source}")]
    Tokenizer { model: String, source: TokenizerError },
    #[error("`{model}`'s tokenizer is of type {kind}; dropping its tokens past vocab_size {rows} needs a BPE tokenizer")]
    NotBpe {
        model: String,
        kind: String,
        rows: usize,
    },
    #[error("cannot rebuild the tokenizer: {0}")]
    Build(String),
    #[error("token {token:?} needs a row but its `tokens:` entry has no `source`")]
    NoSource { token: String },
    #[error("token {token:?} takes `{model}`'s row, but `{model}` has no such token")]
    NotInModel { token: String, model: String },
    #[error("token id {id} of `{model}` is past its {rows} rows")]
    IdOutOfRange { id: u32, model: String, rows: usize },
    #[error("the output tokenizer's ids are not contiguous ({len} tokens, largest id {max})")]
    Gaps { len: usize, max: u32 },
}

/// An input's tokenizer and the vocabulary its embedding rows follow.
struct Loaded {
    tokenizer: Tokenizer,
    /// token -> id, added tokens included, ids past `rows` left out.
    vocab: HashMap<String, u32>,
}

fn load(input: &VocabInput, strip: bool) -> Result<Loaded, VocabError> {
    let mut tokenizer = tokenizer::load(input.root).map_err(|source| VocabError::Tokenizer {
        model: input.name.to_string(),
        source,
    })?;
    let full = tokenizer.get_vocab(true);
    if strip && full.values().any(|&id| id as usize >= input.rows) {
        tokenizer = stripped(input, &tokenizer)?;
    }
    let vocab = tokenizer
        .get_vocab(true)
        .into_iter()
        .filter(|(_, id)| (*id as usize) < input.rows)
        .collect();
    Ok(Loaded { tokenizer, vocab })
}

/// `tokenizer` without the tokens whose id is at or past the input's rows (BPE only):
/// they leave the added tokens, the model's vocabulary and every merge naming them.
fn stripped(input: &VocabInput, tokenizer: &Tokenizer) -> Result<Tokenizer, VocabError> {
    let build = |e: String| VocabError::Build(e);
    let text = tokenizer.to_string(false).map_err(|e| build(e.to_string()))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| build(e.to_string()))?;
    let kind = json["model"]["type"].as_str().unwrap_or("?").to_string();
    if kind != "BPE" {
        return Err(VocabError::NotBpe {
            model: input.name.to_string(),
            kind,
            rows: input.rows,
        });
    }
    let rows = input.rows as u64;
    let mut unused: HashSet<String> = HashSet::new();
    if let Some(added) = json["added_tokens"].as_array_mut() {
        added.retain(|t| {
            let keep = t["id"].as_u64().is_some_and(|id| id < rows);
            if !keep {
                unused.insert(t["content"].as_str().unwrap_or("").to_string());
            }
            keep
        });
    }
    if let Some(vocab) = json["model"]["vocab"].as_object_mut() {
        vocab.retain(|tok, id| {
            let keep = id.as_u64().is_some_and(|id| id < rows);
            if !keep {
                unused.insert(tok.clone());
            }
            keep
        });
    }
    if let Some(merges) = json["model"]["merges"].as_array_mut() {
        merges.retain(|m| {
            let parts: Vec<String> = match m {
                serde_json::Value::String(s) => s.split(' ').map(str::to_string).collect(),
                serde_json::Value::Array(a) => {
                    a.iter().filter_map(|p| p.as_str().map(str::to_string)).collect()
                }
                _ => Vec::new(),
            };
            !parts.iter().any(|p| unused.contains(p))
        });
    }
    Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| build(e.to_string()))
}

/// The added tokens of `t` in id order.
fn added_in_order(t: &Tokenizer) -> Vec<(u32, AddedToken)> {
    let mut added: Vec<(u32, AddedToken)> = t.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    added
}

/// Builds the output vocabulary of `inputs` (`base` indexes them) under `policy`.
pub fn build(policy: &VocabPolicy, base: usize, inputs: &[VocabInput]) -> Result<OutputVocab, VocabError> {
    let loaded: Vec<Loaded> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| load(input, i == base))
        .collect::<Result<_, _>>()?;
    let mut out = match &policy.source {
        VocabSource::Base => loaded[base].tokenizer.clone(),
        VocabSource::Model(m) => {
            tokenizer::load(inputs[*m].root).map_err(|source| VocabError::Tokenizer {
                model: inputs[*m].name.to_string(),
                source,
            })?
        }
        VocabSource::Union => union(base, &loaded)?,
    };
    let mut existing: HashSet<String> = out.get_vocab(true).into_keys().collect();
    for rule in &policy.tokens {
        if existing.insert(rule.token.clone()) {
            out.add_tokens([AddedToken::from(rule.token.clone(), false)])
                .map_err(|e| VocabError::Build(e.to_string()))?;
        }
    }
    let vocab = out.get_vocab(true);
    let max = vocab.values().copied().max().unwrap_or(0);
    if !vocab.is_empty() && max as usize + 1 != vocab.len() {
        return Err(VocabError::Gaps {
            len: vocab.len(),
            max,
        });
    }
    let mut tokens = vec![String::new(); vocab.len()];
    for (tok, id) in &vocab {
        tokens[*id as usize] = tok.clone();
    }
    let len = tokens.len();
    let size = match policy.pad_to_multiple_of {
        Some(m) if m > 0 && !len.is_multiple_of(m) => len.div_ceil(m) * m,
        _ => len,
    };
    // perm[m][i]: input m's row of output token i
    let perm: Vec<Vec<Option<u32>>> = loaded
        .iter()
        .map(|l| tokens.iter().map(|t| l.vocab.get(t).copied()).collect())
        .collect();
    let rules: HashMap<&str, &TokenRule> = policy.tokens.iter().map(|r| (r.token.as_str(), r)).collect();
    let mut counts = vec![FillCounts::default(); inputs.len()];
    // The row every input lacking token i (or forced to) takes.
    let mut defaults: Vec<Option<(Row, Kind)>> = vec![None; len];
    for (i, tok) in tokens.iter().enumerate() {
        let rule = rules.get(tok.as_str());
        let force = rule.is_some_and(|r| r.force);
        let present: Vec<usize> = (0..inputs.len()).filter(|&m| perm[m][i].is_some()).collect();
        if !force && present.len() == inputs.len() {
            continue;
        }
        defaults[i] = Some(match rule {
            Some(rule) => {
                let fill = rule
                    .fill
                    .as_ref()
                    .ok_or_else(|| VocabError::NoSource { token: tok.clone() })?;
                (rule_row(fill, tok, i, &perm, &loaded, inputs)?, Kind::Ruled)
            }
            None => match present.as_slice() {
                [] => (Row::Zero, Kind::Zero),
                [only] => (copy(*only, &perm, i), Kind::Single),
                _ if present.contains(&base) => (copy(base, &perm, i), Kind::Base),
                _ => (
                    Row::Mean(
                        present
                            .iter()
                            .map(|&m| (m as u32, perm[m][i].unwrap_or(0)))
                            .collect(),
                    ),
                    Kind::Mean,
                ),
            },
        });
    }
    let mut plans = Vec::with_capacity(inputs.len());
    for (m, input) in inputs.iter().enumerate() {
        let c = &mut counts[m];
        let mut rows = Vec::with_capacity(len);
        for (i, tok) in tokens.iter().enumerate() {
            let force = rules.get(tok.as_str()).is_some_and(|r| r.force);
            match (perm[m][i], &defaults[i]) {
                (Some(row), d) if !force || d.is_none() => rows.push(Row::Copy { src: m as u32, row }),
                (own, Some((row, kind))) => {
                    if own.is_none() {
                        c.missing += 1;
                    }
                    match kind {
                        Kind::Ruled => c.ruled += 1,
                        Kind::Zero => c.zero += 1,
                        Kind::Single => c.from_single += 1,
                        Kind::Base => c.from_base += 1,
                        Kind::Mean => c.mean += 1,
                    }
                    rows.push(row.clone());
                }
                (_, None) => {
                    c.missing += 1;
                    c.zero += 1;
                    rows.push(Row::Zero);
                }
            }
        }
        let kept: HashSet<u32> = perm[m].iter().flatten().copied().collect();
        c.own = loaded[m].vocab.len();
        c.shared_with_base = loaded[m]
            .vocab
            .keys()
            .filter(|t| loaded[base].vocab.contains_key(*t))
            .count();
        c.dropped = loaded[m].vocab.values().filter(|id| !kept.contains(id)).count()
            + input.rows.saturating_sub(loaded[m].vocab.len());
        plans.push(RowPlan {
            rows,
            pad: size - len,
        });
    }
    Ok(OutputVocab {
        tokenizer: out,
        tokens,
        size,
        plans,
        counts,
    })
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Ruled,
    Zero,
    Single,
    Base,
    Mean,
}

fn copy(m: usize, perm: &[Vec<Option<u32>>], i: usize) -> Row {
    Row::Copy {
        src: m as u32,
        row: perm[m][i].unwrap_or(0),
    }
}

fn rule_row(
    fill: &Fill,
    tok: &str,
    i: usize,
    perm: &[Vec<Option<u32>>],
    loaded: &[Loaded],
    inputs: &[VocabInput],
) -> Result<Row, VocabError> {
    Ok(match fill {
        Fill::Zero => Row::Zero,
        Fill::Model(m) => match perm[*m][i] {
            Some(row) => Row::Copy { src: *m as u32, row },
            None => {
                return Err(VocabError::NotInModel {
                    token: tok.to_string(),
                    model: inputs[*m].name.to_string(),
                })
            }
        },
        Fill::ModelToken { model, token } => {
            let id = match token {
                TokenRef::Id(id) => *id,
                TokenRef::Text(t) => *loaded[*model]
                    .vocab
                    .get(t)
                    .ok_or_else(|| VocabError::NotInModel {
                        token: t.clone(),
                        model: inputs[*model].name.to_string(),
                    })?,
            };
            if id as usize >= inputs[*model].rows {
                return Err(VocabError::IdOutOfRange {
                    id,
                    model: inputs[*model].name.to_string(),
                    rows: inputs[*model].rows,
                });
            }
            Row::Copy {
                src: *model as u32,
                row: id,
            }
        }
    })
}

/// mergekit's union: the base's tokenizer with every other input's tokens added.
fn union(base: usize, loaded: &[Loaded]) -> Result<Tokenizer, VocabError> {
    let order = std::iter::once(base).chain((0..loaded.len()).filter(|&m| m != base));
    let mut ordinary: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut added: Vec<AddedToken> = Vec::new();
    let mut added_seen: HashSet<String> = HashSet::new();
    for m in order {
        let l = &loaded[m];
        let mut by_id: Vec<(&String, u32)> = l.vocab.iter().map(|(t, id)| (t, *id)).collect();
        by_id.sort_by_key(|(_, id)| *id);
        for (tok, _) in by_id {
            if seen.insert(tok.clone()) {
                ordinary.push(tok.clone());
            }
        }
        for (id, info) in added_in_order(&l.tokenizer) {
            if l.vocab.get(&info.content) == Some(&id) && added_seen.insert(info.content.clone()) {
                added.push(info);
            }
        }
    }
    let mut out = loaded[base].tokenizer.clone();
    let base_vocab = &loaded[base].vocab;
    for tok in ordinary {
        if added_seen.contains(&tok) || base_vocab.contains_key(&tok) {
            continue;
        }
        out.add_tokens([AddedToken::from(tok, false)])
            .map_err(|e| VocabError::Build(e.to_string()))?;
    }
    out.add_tokens(added)
        .map_err(|e| VocabError::Build(e.to_string()))?;
    Ok(out)
}

/// How two inputs' vocabularies (token -> id, added tokens included) compare; `None` when
/// either has no readable tokenizer.json.
pub fn compare(a: &Path, b: &Path) -> Option<VocabComparison> {
    let va = tokenizer::load(a).ok()?.get_vocab(true);
    let vb = tokenizer::load(b).ok()?.get_vocab(true);
    Some(VocabComparison {
        same: va == vb,
        shared: va.keys().filter(|t| vb.contains_key(*t)).count(),
        smaller: va.len().min(vb.len()),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabComparison {
    /// The same tokens with the same ids.
    pub same: bool,
    /// Tokens both have.
    pub shared: usize,
    /// Tokens of the smaller vocabulary.
    pub smaller: usize,
}

/// A model's vocabulary as `mergec tokens` shows it.
pub struct Described {
    /// token -> id, added tokens included.
    pub vocab: HashMap<String, u32>,
    /// config.json's `vocab_size` (or `text_config.vocab_size`), if any.
    pub rows: Option<usize>,
}

/// Reads `root`'s tokenizer.json and config.json's vocabulary size.
pub fn describe(root: &Path) -> Result<Described, TokenizerError> {
    let vocab = tokenizer::load(root)?.get_vocab(true);
    let config: Option<serde_json::Value> =
        super::input_file::read_capped(&root.join("config.json"), super::input_file::MAX_JSON_BYTES)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let rows = config.and_then(|c| {
        c.get("vocab_size")
            .or_else(|| c.get("text_config").and_then(|t| t.get("vocab_size")))
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize)
    });
    Ok(Described { vocab, rows })
}

/// The table of `mergec tokens`: per model its tokens and rows, and against the first model
/// the tokens in common, only its own, and in common under another id; then up to `show`
/// of each model's own tokens and the policies that fit.
pub fn table(models: &[(String, Described)], show: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some((first_name, first)) = models.first() else {
        return out;
    };
    let width = models
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        out,
        "{:width$}  {:>7}  {:>7}  {:>7}  {:>9}  {:>8}",
        "model", "tokens", "rows", "shared", "only here", "other id"
    );
    let mut details = Vec::new();
    let mut differ = false;
    for (name, d) in models {
        let shared = d.vocab.keys().filter(|t| first.vocab.contains_key(*t)).count();
        let mut own: Vec<(&String, u32)> = d
            .vocab
            .iter()
            .filter(|(t, _)| !first.vocab.contains_key(*t))
            .map(|(t, id)| (t, *id))
            .collect();
        own.sort_by_key(|(_, id)| *id);
        let moved = d
            .vocab
            .iter()
            .filter(|(t, id)| first.vocab.get(*t).is_some_and(|f| f != *id))
            .count();
        let rows = d.rows.map_or("?".to_string(), |r| r.to_string());
        let _ = writeln!(
            out,
            "{name:width$}  {:>7}  {rows:>7}  {shared:>7}  {:>9}  {moved:>8}",
            d.vocab.len(),
            own.len()
        );
        differ |= !own.is_empty() || moved > 0 || d.vocab.len() != first.vocab.len() || d.rows != first.rows;
        if !own.is_empty() {
            let listed: Vec<String> = own
                .iter()
                .take(show)
                .map(|(t, id)| format!("{t:?} ({id})"))
                .collect();
            let more = if own.len() > show {
                format!(", and {} more", own.len() - show)
            } else {
                String::new()
            };
            details.push(format!("only in {name}: {}{more}", listed.join(", ")));
        }
        let mut lacks: Vec<(&String, u32)> = first
            .vocab
            .iter()
            .filter(|(t, _)| !d.vocab.contains_key(*t))
            .map(|(t, id)| (t, *id))
            .collect();
        lacks.sort_by_key(|(_, id)| *id);
        if !lacks.is_empty() {
            let listed: Vec<String> = lacks.iter().take(show).map(|(t, _)| format!("{t:?}")).collect();
            let more = if lacks.len() > show {
                format!(", and {} more", lacks.len() - show)
            } else {
                String::new()
            };
            details.push(format!(
                "{name} lacks {} of {first_name}'s tokens: {}{more}",
                lacks.len(),
                listed.join(", ")
            ));
        }
        let smaller = d.vocab.len().min(first.vocab.len()).max(1);
        if (shared as f64) < 0.5 * smaller as f64 {
            details.push(format!("{name} shares {shared} tokens with {first_name}: another tokenizer family (`mixed_vocab: true` to merge anyway)"));
        }
    }
    for d in details {
        let _ = writeln!(out, "{d}");
    }
    if differ {
        let _ = writeln!(
            out,
            "the vocabularies differ: save with `tokenizer: union` (every model's tokens), `tokenizer: base` or `tokenizer: MODEL` (that model's)"
        );
    } else {
        let _ = writeln!(out, "one vocabulary: the models merge row by row as they are");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BPE tokenizer.json without merges: `vocab` in id order, then `added` (special).
    fn write_tokenizer(dir: &Path, vocab: &[&str], added: &[(&str, u32)]) {
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), serde_json::Value::from(i as u64)))
            .collect();
        let added: Vec<serde_json::Value> = added
            .iter()
            .map(|(t, id)| {
                serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    }

    #[test]
    fn union_strips_the_base_past_its_rows_and_fills_missing_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        // the base's `<x>` (id 4) is past its 4 rows: dropped from the union
        write_tokenizer(&a, &["<unk>", "a", "b", "c"], &[("<x>", 4)]);
        write_tokenizer(&b, &["<unk>", "b", "a", "d", "e"], &[]);
        write_tokenizer(&c, &["<unk>", "e", "a", "b"], &[]);
        let inputs = [
            VocabInput {
                name: "a",
                root: &a,
                rows: 4,
            },
            VocabInput {
                name: "b",
                root: &b,
                rows: 5,
            },
            VocabInput {
                name: "c",
                root: &c,
                rows: 4,
            },
        ];
        let policy = VocabPolicy {
            source: VocabSource::Union,
            tokens: Vec::new(),
            pad_to_multiple_of: Some(4),
        };
        let v = build(&policy, 0, &inputs).unwrap();
        assert_eq!(v.tokens, ["<unk>", "a", "b", "c", "d", "e"]);
        assert_eq!(v.size, 8);
        let copy = |src, row| Row::Copy { src, row };
        // a: own rows, `d` from b (only one has it), `e` the mean of b's and c's rows
        assert_eq!(
            v.plans[0].rows,
            [
                copy(0, 0),
                copy(0, 1),
                copy(0, 2),
                copy(0, 3),
                copy(1, 3),
                Row::Mean(vec![(1, 4), (2, 1)])
            ]
        );
        // c lacks `c` (only the base has it) and `d` (only b)
        assert_eq!(
            v.plans[2].rows,
            [
                copy(2, 0),
                copy(2, 2),
                copy(2, 3),
                copy(0, 3),
                copy(1, 3),
                copy(2, 1)
            ]
        );
        assert_eq!(v.plans[2].pad, 2);
        assert_eq!((v.counts[2].missing, v.counts[2].from_single), (2, 2));
        assert_eq!(v.tokenizer.token_to_id("<x>"), None);
    }

    #[test]
    fn rules_need_a_source_that_has_the_token() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        write_tokenizer(&a, &["<unk>", "a"], &[]);
        write_tokenizer(&b, &["<unk>", "b"], &[]);
        let inputs = [
            VocabInput {
                name: "a",
                root: &a,
                rows: 2,
            },
            VocabInput {
                name: "b",
                root: &b,
                rows: 2,
            },
        ];
        let rule = |token: &str, fill| TokenRule {
            token: token.into(),
            fill,
            force: false,
        };
        let policy = |tokens| VocabPolicy {
            source: VocabSource::Base,
            tokens,
            pad_to_multiple_of: None,
        };
        // `a` is in the base only, so b needs a row; b has no `a`
        let err = build(&policy(vec![rule("a", Some(Fill::Model(1)))]), 0, &inputs)
            .err()
            .unwrap();
        assert!(matches!(err, VocabError::NotInModel { .. }), "{err}");
        let err = build(&policy(vec![rule("<new>", None)]), 0, &inputs)
            .err()
            .unwrap();
        assert!(matches!(err, VocabError::NoSource { .. }), "{err}");
        let token = TokenRef::Id(7);
        let err = build(
            &policy(vec![rule("a", Some(Fill::ModelToken { model: 1, token }))]),
            0,
            &inputs,
        )
        .err()
        .unwrap();
        assert!(matches!(err, VocabError::IdOutOfRange { .. }), "{err}");
        let v = build(&policy(vec![rule("a", Some(Fill::Model(0)))]), 0, &inputs).unwrap();
        assert_eq!(
            v.plans[1].rows,
            [Row::Copy { src: 1, row: 0 }, Row::Copy { src: 0, row: 1 }]
        );
    }
}
