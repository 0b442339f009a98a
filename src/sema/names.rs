//! Tensor-name helpers: layer indices, renumbering, grouped listings, "did you mean".

use std::collections::BTreeMap;

/// Path segments that introduce a layer index (`model.layers.3.`, `transformer.h.3.`).
const LAYER_SEGMENTS: &[&str] = &["layers", "h", "blocks", "layer", "block"];

/// The layer index in a tensor name and the byte range of its digits.
pub(crate) fn layer_of(name: &str) -> Option<(usize, std::ops::Range<usize>)> {
    let mut offset = 0;
    let mut previous: Option<&str> = None;
    for segment in name.split('.') {
        if let Some(prev) = previous {
            if LAYER_SEGMENTS.contains(&prev)
                && !segment.is_empty()
                && segment.bytes().all(|b| b.is_ascii_digit())
            {
                if let Ok(index) = segment.parse() {
                    return Some((index, offset..offset + segment.len()));
                }
            }
        }
        previous = Some(segment);
        offset += segment.len() + 1;
    }
    None
}

/// The layer modules of a set of names: each prefix before a layer index (such as
/// `model.language_model.layers.` or `model.visual.blocks.`) with its layer count, so each
/// module of a multi-modal model has its own depth.
pub(crate) fn module_layers<'a>(names: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    for name in names {
        if let Some((i, range)) = layer_of(name) {
            let count = out.entry(name[..range.start].to_string()).or_insert(0);
            *count = (*count).max(i + 1);
        }
    }
    out
}

/// The decoder stack that `.layers[..]` and `stack` work on: the module with the most
/// layers, preferring one that is not a vision tower, then the first by name.
pub(crate) fn main_module<'a>(names: impl IntoIterator<Item = &'a String>) -> Option<String> {
    let modules = module_layers(names);
    modules
        .iter()
        .max_by(|(a, na), (b, nb)| {
            let vision = |m: &str| m.contains("vision") || m.contains("visual");
            na.cmp(nb)
                .then_with(|| vision(b).cmp(&vision(a)))
                .then_with(|| b.cmp(a))
        })
        .map(|(m, _)| m.clone())
}

/// Layer count of the main module.
pub(crate) fn main_layer_count<'a>(names: impl IntoIterator<Item = &'a String> + Clone) -> Option<usize> {
    let main = main_module(names.clone())?;
    module_layers(names).get(&main).copied()
}

/// Whether a tensor outside the main layer module goes with the embeddings when stacking:
/// embeddings themselves and other layered modules (vision towers) come first.
pub(crate) fn stacks_before(name: &str) -> bool {
    is_pre_layer(name) || layer_of(name).is_some()
}

/// The layer index of `name` when it belongs to layer module `module`.
pub(crate) fn layer_in(name: &str, module: &str) -> Option<(usize, std::ops::Range<usize>)> {
    layer_of(name).filter(|(_, range)| &name[..range.start] == module)
}

/// Whether a tensor outside the layers comes before them (embeddings), as opposed to after
/// them (final norm, lm_head). Stacks take the former from their first segment and the
/// latter from their last, as mergekit does.
pub(crate) fn is_pre_layer(name: &str) -> bool {
    name.contains("embed")
        || name
            .split('.')
            .any(|s| matches!(s, "wte" | "wpe" | "word_embeddings"))
}

/// `name` with its layer index replaced by `index`.
pub(crate) fn with_layer(name: &str, index: usize) -> String {
    match layer_of(name) {
        Some((_, range)) => format!("{}{}{}", &name[..range.start], index, &name[range.end..]),
        None => name.to_string(),
    }
}

/// Groups names that differ only in their layer index, so 300 missing tensors read as a
/// few lines: `model.layers.*.mlp.up_proj.weight (layers 0-31)`.
pub(crate) fn grouped<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut plain = Vec::new();
    for name in names {
        match layer_of(name) {
            Some((index, range)) => groups
                .entry(format!("{}*{}", &name[..range.start], &name[range.end..]))
                .or_default()
                .push(index),
            None => plain.push(name.to_string()),
        }
    }
    let mut out = plain;
    for (pattern, mut layers) in groups {
        layers.sort_unstable();
        layers.dedup();
        let word = if layers.len() == 1 { "layer" } else { "layers" };
        out.push(format!("{pattern} ({word} {})", ranges(&layers)));
    }
    out
}

/// `[0, 1, 2, 5, 7, 8]` -> `0-2, 5, 7-8`.
fn ranges(sorted: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

/// A bulleted list of at most `limit` lines, then "and N more".
pub(crate) fn bullet_list(lines: &[String], limit: usize) -> String {
    let mut out: Vec<String> = lines.iter().take(limit).map(|l| format!("  {l}")).collect();
    if lines.len() > limit {
        out.push(format!("  ... and {} more", lines.len() - limit));
    }
    out.join("\n")
}

/// The closest candidate to `name`, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // The distance takes time in the product of the lengths: no suggestion for a very long
    // name, and none is worked out for a candidate whose length alone rules it out.
    const LONGEST: usize = 100;
    if name.len() > LONGEST {
        return None;
    }
    let chars = name.chars().count();
    candidates
        .into_iter()
        .filter(|c| c.chars().count().abs_diff(chars) <= (name.len().max(c.len()) / 3).max(1))
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, c)| *d <= (name.len().max(c.len()) / 3).max(1) && *d < name.len().max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_layer_indices() {
        assert_eq!(
            layer_of("model.layers.12.mlp.up_proj.weight").map(|x| x.0),
            Some(12)
        );
        assert_eq!(
            layer_of("transformer.h.3.attn.c_attn.weight").map(|x| x.0),
            Some(3)
        );
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(
            with_layer("model.layers.12.mlp.weight", 3),
            "model.layers.3.mlp.weight"
        );
    }

    #[test]
    fn groups_by_layer() {
        let names = [
            "model.layers.0.mlp.w",
            "model.layers.1.mlp.w",
            "model.layers.3.mlp.w",
            "lm_head.weight",
        ];
        assert_eq!(
            grouped(names),
            vec!["lm_head.weight", "model.layers.*.mlp.w (layers 0-1, 3)"]
        );
    }

    #[test]
    fn suggests_close_names() {
        assert_eq!(did_you_mean("lienar", ["linear", "slerp"]), Some("linear"));
        assert_eq!(did_you_mean("zzz", ["linear", "slerp"]), None);
    }
}
