//! Parameter values (numbers, gradients, filtered tables) and the level each one goes to.

use super::*;
use crate::sema::methods::{self, MethodSig};

pub(super) struct Param<'a> {
    pub(super) name: String,
    pub(super) key: Span,
    pub(super) value: &'a Node,
}

impl Param<'_> {
    /// `name: value` in the YAML.
    pub(super) fn place(&self) -> Span {
        self.key.join(self.value.span)
    }
}

/// One level of a parameter (a source's, a slice's or the whole config's): its arms, tried
/// in order; `None` is the catch-all.
pub(super) type Arms = Vec<(Option<String>, Expr)>;

pub(super) fn find<'p, 'n>(params: &'p [Param<'n>], name: &str) -> Option<&'p Param<'n>> {
    params.iter().find(|p| p.name == name)
}

pub(super) fn chain_arms(levels: Vec<Arms>) -> Arms {
    let mut out: Arms = Vec::new();
    for level in levels {
        for arm in level {
            let catch_all = arm.0.is_none();
            out.push(arm);
            if catch_all {
                return out;
            }
        }
    }
    out
}

pub(super) fn is_any_parameter(key: &str) -> bool {
    methods::METHODS.iter().any(|m| m.param(key).is_some())
}

/// A number as the script writes it: the YAML text when it is already a script literal.
pub(super) fn number_text(raw: &str, x: f64) -> String {
    let body = raw.strip_prefix('-').unwrap_or(raw);
    let is_literal = {
        let mut chars = body.chars().peekable();
        let mut ok = chars.peek().is_some_and(|c| c.is_ascii_digit());
        let mut state = 0; // 0 int, 1 after '.', 2 frac, 3 after e, 4 after sign, 5 exp
        for c in body.chars() {
            state = match (state, c) {
                (0, d) if d.is_ascii_digit() => 0,
                (0, '.') => 1,
                (1 | 2, d) if d.is_ascii_digit() => 2,
                (0 | 2, 'e' | 'E') => 3,
                (3, '+' | '-') => 4,
                (3..=5, d) if d.is_ascii_digit() => 5,
                _ => {
                    ok = false;
                    break;
                }
            };
        }
        ok && matches!(state, 0 | 2 | 5)
    };
    if is_literal
        && body
            .parse::<f64>()
            .ok()
            .map(|v| if raw.starts_with('-') { -v } else { v })
            == Some(x)
    {
        return raw.to_string();
    }
    if x == x.trunc() && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    format!("{x:?}")
}

impl Translator<'_> {
    pub(super) fn params<'n>(&mut self, v: &'n Node, what: &str) -> Vec<Param<'n>> {
        if v.value == Value::Null {
            return Vec::new();
        }
        let Value::Map(entries) = &v.value else {
            self.err(
                Code::E0603,
                format!("{what} must be a mapping, found {}", v.describe()),
                v.span,
                "expected `name: value` lines",
            );
            return Vec::new();
        };
        let mut out: Vec<Param> = Vec::new();
        for (k, value) in entries {
            let Some(name) = k.as_str() else {
                self.err(
                    Code::E0603,
                    format!("a parameter name is {}", k.describe()),
                    k.span,
                    "not a name",
                );
                continue;
            };
            if let Some(first) = out.iter().find(|p| p.name == name).map(|p| p.key) {
                self.given_twice(name, first, k.span);
                out.retain(|p| p.name != name);
            }
            out.push(Param {
                name: name.to_string(),
                key: k.span,
                value,
            });
        }
        out
    }

    /// Checks that `sig` takes `p` (per model when `per_model`); reports it otherwise.
    pub(super) fn check_param(&mut self, sig: &MethodSig, p: &Param, per_model: bool) {
        match sig.param(&p.name) {
            Some(spec) if spec.per_model || !per_model => {}
            Some(_) => {
                self.tolerated(
                    Code::E0605,
                    Diagnostic::error(
                        Code::W0005,
                        format!("`{}` is set for the whole merge, not per model", p.name),
                    )
                    .at(p.key, format!("a parameter of the whole `{}` merge", sig.name))
                    .with_help("move it to the top-level `parameters:`")
                    .with_note("mergekit ignores it here, and so does mergec"),
                );
            }
            None => {
                let takes: Vec<&str> = sig
                    .params
                    .iter()
                    .filter(|s| s.per_model || !per_model)
                    .map(|s| s.name)
                    .collect();
                let mut d =
                    Diagnostic::error(Code::W0005, format!("`{}` is ignored by {}", p.name, sig.name))
                        .at(p.key, "not a parameter of this method");
                if let Some(s) = suggest(&p.name, takes.iter().copied()) {
                    d = d.with_help(format!("did you mean `{s}`?"));
                } else if takes.is_empty() {
                    d = d.with_help(format!(
                        "`{}` takes no {}parameters: remove it",
                        sig.name,
                        if per_model { "per-model " } else { "" }
                    ));
                } else {
                    d = d.with_help(format!("`{}` takes: {}", sig.name, takes.join(", ")));
                }
                d = d.with_note("mergekit ignores it too; so does mergec");
                self.tolerated(Code::E0605, d);
            }
        }
    }

    /// The levels' arms, first match wins, falling through a level that matches nothing.
    pub(super) fn chain(&mut self, levels: &[Option<&Param>]) -> Arms {
        let arms: Vec<Arms> = levels
            .iter()
            .flatten()
            .filter_map(|p| self.setting(p.value))
            .collect();
        chain_arms(arms)
    }

    /// A parameter value: a number, a boolean, a gradient or a list of `{filter, value}`.
    pub(super) fn setting(&mut self, v: &Node) -> Option<Arms> {
        match &v.value {
            Value::Seq(items) if items.iter().any(|i| matches!(i.value, Value::Map(_))) => {
                let mut arms = Vec::new();
                for item in items {
                    let entries = self.entries(item, &["filter", "value"], "a filtered parameter value");
                    let filter = entries.iter().find(|e| e.0 == "filter").map(|e| e.2);
                    let Some(value) = entries.iter().find(|e| e.0 == "value").map(|e| e.2) else {
                        if matches!(item.value, Value::Map(_)) {
                            self.err(
                                Code::E0603,
                                "a filtered value needs `value`",
                                first_line(item),
                                "no `value` here",
                            );
                        }
                        continue;
                    };
                    let value = self.scalar_or_gradient(value)?;
                    let pattern = match filter.map(|f| (f, f.value.clone())) {
                        None | Some((_, Value::Null)) => None,
                        Some((_, Value::Str(s))) if s == "*" => None,
                        Some((f, Value::Str(s))) => {
                            if s.contains('*') {
                                // The entry never applies in mergekit: left out, as it is there.
                                self.tolerated(
                                    Code::E0603,
                                    Diagnostic::error(Code::W0005, format!("the filter `{s}` never matches in mergekit"))
                                        .at(f.span, "a plain substring, not a pattern")
                                        .with_help("write the substring without `*`, or remove the entry")
                                        .with_note("mergekit matches filters as substrings, and tensor names contain no `*`: it skips this entry, and so does mergec"),
                                );
                                continue;
                            }
                            Some(s)
                        }
                        Some((f, _)) => Some(f.raw.clone()),
                    };
                    let catch_all = pattern.is_none();
                    arms.push((pattern, value));
                    if catch_all {
                        break;
                    }
                }
                Some(arms)
            }
            Value::Map(_) => {
                // One `{filter, value}` on its own.
                let list = Node {
                    value: Value::Seq(vec![v.clone()]),
                    span: v.span,
                    raw: String::new(),
                };
                self.setting(&list)
            }
            _ => Some(vec![(None, self.scalar_or_gradient(v)?)]),
        }
    }

    pub(super) fn scalar_or_gradient(&mut self, v: &Node) -> Option<Expr> {
        match &v.value {
            Value::Bool(b) => Some(Expr::atom(b.to_string()).at(v.span)),
            Value::Seq(items) if items.is_empty() => {
                self.err(Code::E0603, "an empty list is not a value", v.span, "empty");
                None
            }
            Value::Seq(items) => {
                if items
                    .iter()
                    .any(|i| matches!(i.value, Value::Bool(_) | Value::Str(_)) && i.as_f64().is_none())
                {
                    self.err(
                        Code::E0606,
                        "lists of booleans or strings (a step per layer) are not supported yet",
                        v.span,
                        "not a list of numbers",
                    );
                    return None;
                }
                let nums: Option<Vec<Expr>> = items.iter().map(|i| self.number(i)).collect();
                let nums = nums?;
                if nums.len() == 1 {
                    return nums.into_iter().next();
                }
                Some(Expr::List(nums).at(v.span))
            }
            _ => self.number(v),
        }
    }

    pub(super) fn number(&mut self, v: &Node) -> Option<Expr> {
        let Some(x) = v.as_f64() else {
            self.err(
                Code::E0603,
                format!("expected a number, found {}", v.describe()),
                v.span,
                "not a number",
            );
            return None;
        };
        if !x.is_finite() {
            self.err(Code::E0603, "the value is not a finite number", v.span, "here");
            return None;
        }
        Some(Expr::atom(number_text(&v.raw, x)).at(v.span))
    }

    /// The arms as one value; a table with filters is bound by `let` to a name from `hint`.
    pub(super) fn arms_expr(&mut self, arms: Arms, hint: &str) -> Option<Expr> {
        match arms.len() {
            0 => None,
            1 if arms[0].0.is_none() => arms.into_iter().next().map(|a| a.1),
            _ => {
                let name = self.fresh(&ident_from(hint));
                self.lets.push((name.clone(), Expr::Table(arms)));
                Some(Expr::atom(name))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_text() {
        assert_eq!(number_text("5.0e-6", 5e-6), "5.0e-6");
        assert_eq!(number_text("0.25", 0.25), "0.25");
        assert_eq!(number_text(".5", 0.5), "0.5");
        assert_eq!(number_text("1.", 1.0), "1");
        assert_eq!(number_text("-0.5", -0.5), "-0.5");
        assert_eq!(number_text("+2", 2.0), "2");
        assert_eq!(number_text("1_000", 1000.0), "1000");
    }
}
