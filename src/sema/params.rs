//! Per-tensor parameters: a number, a layer gradient, or a `match tensor` table.
//! Resolved at compile time, so the graph carries plain numbers.

use std::rc::Rc;

use crate::source::Span;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Param {
    Number(f64),
    /// Interpolated over the layer position `t` in [0, 1] exactly as mergekit does.
    Gradient(Rc<[f64]>),
    /// First matching arm wins; `None` when no arm matches (the caller falls back).
    Table(Rc<[TableArm]>),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TableArm {
    pub pattern: Option<Pattern>,
    pub value: Param,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Pattern {
    /// Matches when it occurs anywhere in the tensor name (mergekit's filters).
    Substring(String),
    /// Contains `*`: matches the whole tensor name, `*` standing for any run of characters.
    Glob(String),
}

impl Pattern {
    pub fn new(text: &str) -> Pattern {
        if text.contains('*') {
            Pattern::Glob(text.to_string())
        } else {
            Pattern::Substring(text.to_string())
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Substring(s) => name.contains(s.as_str()),
            Pattern::Glob(g) => glob_match(g, name),
        }
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return name.is_empty(),
    };
    let Some(mut remaining) = name.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty();
    };
    for part in middle {
        match remaining.find(part) {
            Some(i) => remaining = &remaining[i + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

impl Param {
    /// The value for tensor `name` at layer position `t`; `None` if a table has no match.
    pub fn eval(&self, name: &str, t: f64) -> Option<f64> {
        match self {
            Param::Number(v) => Some(*v),
            Param::Gradient(values) => Some(gradient_at(values, t)),
            Param::Table(arms) => arms
                .iter()
                .find(|arm| arm.pattern.as_ref().is_none_or(|p| p.matches(name)))
                .and_then(|arm| arm.value.eval(name, t)),
        }
    }

    /// Every literal number this parameter can produce (for range checks at check time).
    pub fn literals(&self) -> Vec<f64> {
        match self {
            Param::Number(v) => vec![*v],
            Param::Gradient(values) => values.to_vec(),
            Param::Table(arms) => arms.iter().flat_map(|a| a.value.literals()).collect(),
        }
    }
}

/// mergekit's gradient: `s = t·(L−1)`, lerp between `v[floor(s)]` and the next entry.
pub(crate) fn gradient_at(values: &[f64], t: f64) -> f64 {
    match values.len() {
        0 => 0.0,
        1 => values[0],
        len => {
            let s = t * (len - 1) as f64;
            let i0 = (s.floor() as usize).min(len - 1);
            let i1 = (i0 + 1).min(len - 1);
            let f = s - i0 as f64;
            (1.0 - f) * values[i0] + f * values[i1]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_mergekit_examples() {
        let v = [0.2, 0.8, 0.4];
        let at = |t: f64| gradient_at(&v, t);
        assert!((at(0.0) - 0.2).abs() < 1e-12);
        assert!((at(1.0 / 3.0) - 0.6).abs() < 1e-12);
        assert!((at(2.0 / 3.0) - 0.666_666_666_666_666_6).abs() < 1e-12);
        assert!((at(1.0) - 0.4).abs() < 1e-12);
        // the worked example of reference section 2.2: layer 10 of a 40-layer slice
        let w = [0.0, 0.5, 0.3, 0.7, 1.0];
        assert!((gradient_at(&w, 10.0 / 39.0) - 0.4949).abs() < 1e-4);
    }

    #[test]
    fn globs_and_substrings() {
        assert!(Pattern::new("mlp").matches("model.layers.0.mlp.up_proj.weight"));
        assert!(!Pattern::new("attn").matches("model.layers.0.mlp.up_proj.weight"));
        assert!(Pattern::new("model.layers.*.mlp.*").matches("model.layers.3.mlp.up_proj.weight"));
        assert!(!Pattern::new("*.bias").matches("model.layers.3.mlp.up_proj.weight"));
        assert!(Pattern::new("*weight").matches("a.weight"));
        assert!(Pattern::new("lm_head*").matches("lm_head.weight"));
        assert!(!Pattern::new("lm_head*").matches("x.lm_head.weight"));
    }
}
