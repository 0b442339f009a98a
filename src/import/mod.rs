//! mergekit YAML recipes: translated into `.merge` scripts, then compiled like any script.
//!
//! ```text
//!  config.yml ──yaml──▶ Node tree (byte spans) ──translate──▶ script text + places
//!             ──driver::compile──▶ Compiled   (diagnostics moved back onto the YAML)
//! ```
//!
//! The YAML and the generated script share one [`SourceMap`]: problems found in the YAML
//! itself (E06xx) point at it, and so do the script's own diagnostics wherever the piece
//! of script they point at came from a YAML place (a model reference, a parameter value,
//! `merge_method`). The rest are shown against the script, named `NAME (as .merge)`.
//! spec/import.md describes the translation.

mod pretty;
mod translate;
mod yaml;

use std::path::{Path, PathBuf};

use crate::diag::{Code, Diagnostics};
use crate::driver::{self, Compiled, Script};
use crate::plan::Limits;
use crate::source::{SourceId, SourceMap, Span};

/// How to translate a config.
#[derive(Clone, Debug)]
pub struct Options {
    /// The name the header comment gives the config.
    pub yaml_name: String,
    /// The folder relative model paths of the YAML resolve against: mergekit's working
    /// directory (the CLI passes the current folder).
    pub base_dir: PathBuf,
    /// The folder the script is compiled from (its relative paths resolve against it).
    pub script_dir: PathBuf,
    /// The output folder (mergekit's `OUT_PATH`), relative to `base_dir` unless absolute.
    pub out: PathBuf,
    /// mergekit's `--random-seed`: `set seed = N`.
    pub seed: Option<u64>,
    /// mergekit's `--out-shard-size`, in bytes.
    pub shard_bytes: Option<u64>,
    /// mergekit-multi: also save every named intermediate merge (beside `out`).
    pub save_intermediates: bool,
    /// mergekit-moe's `--i-understand-this-is-not-useful-without-training`: every expert
    /// may be the same model (`allow_same_experts: true`).
    pub allow_same_experts: bool,
    /// What mergekit ignores or tolerates is an error, not a warning (W0005).
    pub strict: bool,
    /// mergekit's `--unsafe-truncate-embeddings`: a save without a tokenizer policy cuts
    /// its vocabulary tensors to the smallest input's rows (`tokenizer: truncate`).
    pub truncate_embeddings: bool,
}

impl Options {
    /// Options for a config run from `base_dir`, writing to `out`, with the script compiled
    /// from the same folder.
    pub fn new(yaml_name: &str, base_dir: &Path, out: &Path) -> Options {
        Options {
            yaml_name: yaml_name.to_string(),
            base_dir: base_dir.to_path_buf(),
            script_dir: base_dir.to_path_buf(),
            out: out.to_path_buf(),
            seed: None,
            shard_bytes: None,
            save_intermediates: false,
            allow_same_experts: false,
            strict: false,
            truncate_embeddings: false,
        }
    }
}

/// A translated config: the YAML and the script in one source map.
#[derive(Clone, Debug)]
pub struct Import {
    pub sources: SourceMap,
    pub yaml: SourceId,
    pub script: SourceId,
    script_dir: PathBuf,
    /// `(start, end, YAML place)` for pieces of the script.
    places: Vec<(usize, usize, Span)>,
    /// What mergekit ignores or tolerates, against the YAML (W0005).
    pub warnings: Diagnostics,
    /// `--compute`: overrides the compute dtype the YAML's `dtype` gives.
    pub compute: Option<crate::ops::Compute>,
}

/// The YAML could not be translated: its diagnostics, against `sources`.
#[derive(Debug)]
pub struct Failure {
    pub sources: SourceMap,
    pub diagnostics: Diagnostics,
}

/// Whether `path` names a YAML file (`.yml` / `.yaml`).
pub fn is_yaml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yml") || e.eq_ignore_ascii_case("yaml"))
}

/// Translates the YAML text `text`, shown in diagnostics as `name`.
pub fn translate(name: &str, text: String, opts: &Options) -> Result<Import, Failure> {
    let mut sources = SourceMap::new();
    let yaml_id = sources.add(name, None, text);
    let yaml_text = sources.get(yaml_id).text.clone();
    let docs = match yaml::load(&yaml_text, yaml_id) {
        Ok(d) => d,
        Err(d) => {
            return Err(Failure {
                sources,
                diagnostics: Diagnostics::from(*d),
            })
        }
    };
    match translate::translate(&docs, &yaml_text, opts) {
        Ok(t) => {
            let script = sources.add(format!("{name} (as .merge)"), None, t.out.text);
            Ok(Import {
                sources,
                yaml: yaml_id,
                script,
                script_dir: opts.script_dir.clone(),
                places: t.out.frags,
                warnings: t.warnings,
                compute: None,
            })
        }
        Err(mut diagnostics) => {
            diagnostics.sort();
            Err(Failure { sources, diagnostics })
        }
    }
}

/// Reads ([`driver::read_source`]: a regular file, at most 16 MiB, UTF-8) and translates
/// a YAML file.
pub fn translate_file(path: &Path, opts: &Options) -> Result<Import, Failure> {
    match driver::read_source(path) {
        Ok(text) => translate(&path.display().to_string(), text, opts),
        Err(driver::ReadError::Unreadable(message)) => Err(Failure {
            sources: SourceMap::new(),
            diagnostics: Diagnostics::from(crate::diag::Diagnostic::error(Code::E0401, message)),
        }),
        Err(driver::ReadError::NotUtf8 { sources, diagnostics }) => Err(Failure { sources, diagnostics }),
    }
}

impl Import {
    /// The generated script.
    pub fn text(&self) -> &str {
        &self.sources.get(self.script).text
    }

    /// The generated script, ready for [`driver::compile`] (the YAML stays in its sources).
    pub fn script(&self) -> Script {
        Script {
            sources: self.sources.clone(),
            id: self.script,
            base_dir: self.script_dir.clone(),
            mergekit_config: Some(self.sources.get(self.yaml).text.clone()),
            compute: self.compute,
        }
    }

    /// Compiles the generated script; its diagnostics point at the YAML where they can.
    pub fn compile(&self, force: bool, limits: &Limits) -> Result<(Script, Compiled), (Script, Diagnostics)> {
        let script = self.script();
        match driver::compile(&script, force, limits) {
            Ok(mut c) => {
                let mut w = self.warnings.clone();
                w.extend(self.remap(c.warnings));
                c.warnings = w;
                Ok((script, c))
            }
            Err(d) => {
                let mut d = self.remap(d);
                d.extend(self.warnings.clone());
                Err((script, d))
            }
        }
    }

    /// Moves diagnostics on pieces of the script that came from the YAML onto the YAML.
    pub fn remap(&self, diags: Diagnostics) -> Diagnostics {
        let spans: Vec<Span> = diags
            .iter()
            .flat_map(|d| d.span.into_iter().chain(d.labels.iter().map(|l| l.span)))
            .collect();
        let mut places = self.places_of(&spans).into_iter();
        let mut out = Diagnostics::new();
        for mut d in diags {
            let mut moved = false;
            if d.span.is_some() {
                if let Some(y) = places.next().flatten() {
                    d.span = Some(y);
                    moved = true;
                }
            }
            for l in &mut d.labels {
                if let Some(y) = places.next().flatten() {
                    l.span = y;
                }
            }
            if moved && d.code == Code::E0703 {
                for h in &mut d.help {
                    *h = h.replace(
                        "set `allow_same_experts: true`",
                        "pass `--i-understand-this-is-not-useful-without-training`, as to mergekit-moe,",
                    );
                }
            }
            if moved && d.code == Code::E0401 {
                for h in &mut d.help {
                    *h = h.replace(
                        "relative model paths are resolved against the script's folder",
                        "relative model paths in a mergekit config are resolved against the current folder, as mergekit does",
                    );
                }
            }
            out.push(d);
        }
        out
    }

    /// For each span, the YAML place of the smallest piece of script that holds it (of
    /// equally small ones, the first recorded). All at once, in O((pieces + spans) log):
    /// the spans by start, the pieces entered by start as the sweep passes them, each
    /// answered by the smallest piece entered that ends at or after its end.
    fn places_of(&self, spans: &[Span]) -> Vec<Option<Span>> {
        let mut answers = vec![None; spans.len()];
        let mut queries: Vec<usize> = (0..spans.len())
            .filter(|&i| spans[i].source == self.script)
            .collect();
        queries.sort_by_key(|&i| spans[i].start);
        let mut pieces: Vec<usize> = (0..self.places.len()).collect();
        pieces.sort_by_key(|&k| self.places[k].0);
        // Ends, largest first: a prefix of this order is every end at or after a bound.
        let mut ends: Vec<usize> = self.places.iter().map(|p| p.1).collect();
        ends.sort_unstable_by(|a, b| b.cmp(a));
        ends.dedup();
        // A Fenwick tree over `ends` keeping the least (length, order) entered.
        let mut tree: Vec<(usize, usize)> = vec![(usize::MAX, usize::MAX); ends.len() + 1];
        let mut next = 0;
        for i in queries {
            let (start, end) = (spans[i].start as usize, spans[i].end as usize);
            while let Some(&k) = pieces.get(next).filter(|&&k| self.places[k].0 <= start) {
                let (a, b, _) = self.places[k];
                let mut at = ends.partition_point(|&e| e > b) + 1;
                while at < tree.len() {
                    tree[at] = tree[at].min((b - a, k));
                    at += at & at.wrapping_neg();
                }
                next += 1;
            }
            // The pieces ending at or after `end`: the first so many of `ends`.
            let mut at = ends.partition_point(|&e| e >= end);
            let mut best = (usize::MAX, usize::MAX);
            while at > 0 {
                best = best.min(tree[at]);
                at -= at & at.wrapping_neg();
            }
            answers[i] = self.places.get(best.1).map(|p| p.2);
        }
        answers
    }
}

/// mergekit's `--out-shard-size`: a number with an optional `K`, `M` or `B` suffix
/// (thousands, millions, billions of bytes).
pub fn parse_shard_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && (v * mult).is_finite() && (v * mult) >= 1.0 => Ok((v * mult).round() as u64),
        _ => Err(format!(
            "`{s}` is not a shard size: write a number of bytes with an optional K, M or B suffix (as mergekit: 5B is 5 billion bytes)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_the_smallest_pieces_holding_a_span() {
        let mut sources = SourceMap::new();
        let yaml = sources.add("x.yml", None, "");
        let script = sources.add("x.merge", None, "");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut below = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..50 {
            let places: Vec<(usize, usize, Span)> = (0..1 + below(40))
                .map(|k| {
                    let a = below(100);
                    (a, a + below(30), Span::new(yaml, k, k + 1))
                })
                .collect();
            let import = Import {
                sources: sources.clone(),
                yaml,
                script,
                script_dir: PathBuf::new(),
                places: places.clone(),
                warnings: Diagnostics::new(),
                compute: None,
            };
            let spans: Vec<Span> = (0..60)
                .map(|_| {
                    let a = below(120);
                    let source = if below(10) == 0 { yaml } else { script };
                    Span::new(source, a, a + below(10))
                })
                .collect();
            let naive = |s: Span| {
                (s.source == script)
                    .then(|| {
                        places
                            .iter()
                            .filter(|(a, b, _)| *a <= s.start as usize && s.end as usize <= *b)
                            .min_by_key(|(a, b, _)| b - a)
                            .map(|p| p.2)
                    })
                    .flatten()
            };
            let fast = import.places_of(&spans);
            for (s, f) in spans.iter().zip(fast) {
                assert_eq!(f, naive(*s), "round {round}, {s:?}");
            }
        }
    }

    #[test]
    fn shard_sizes_as_mergekit() {
        assert_eq!(parse_shard_size("12K"), Ok(12_000));
        assert_eq!(parse_shard_size("5B"), Ok(5_000_000_000));
        assert_eq!(parse_shard_size("1.5M"), Ok(1_500_000));
        assert_eq!(parse_shard_size("4096"), Ok(4096));
        assert!(parse_shard_size("lots").is_err());
    }
}
