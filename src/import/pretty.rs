//! A small pretty-printer for generated script expressions that remembers, for each
//! piece of text it writes, the YAML place that piece came from.

use crate::source::Span;

/// An expression of the generated script, before layout.
#[derive(Clone, Debug)]
pub(crate) enum Expr {
    /// Literal text (a name, a number, a gradient, a string).
    Atom(String),
    /// `name(args)`: positional and named arguments, in order.
    Call(String, Vec<Expr>),
    /// `name: value` (a named argument or a block entry).
    Named(String, Box<Expr>),
    /// `model { name: value, ... }`.
    Block(Box<Expr>, Vec<Expr>),
    /// `match tensor { "pattern" => value, ..., _ => value }`; `None` is `_`.
    Table(Vec<(Option<String>, Expr)>),
    /// `[a, b]`.
    List(Vec<Expr>),
    /// The inner expression, which came from this YAML place.
    At(Box<Expr>, Span),
    /// Pieces written one after another (`ft1` then `.layers[0..2]`).
    Cat(Vec<Expr>),
}

impl Expr {
    pub fn atom(s: impl Into<String>) -> Expr {
        Expr::Atom(s.into())
    }

    pub fn at(self, span: Span) -> Expr {
        Expr::At(Box::new(self), span)
    }

    pub fn named(name: &str, value: Expr) -> Expr {
        Expr::Named(name.to_string(), Box::new(value))
    }
}

/// Generated text with the YAML place of some of its byte ranges.
#[derive(Default, Debug, Clone)]
pub(crate) struct Out {
    pub text: String,
    /// `(start, end, yaml place)`; ranges nest, and the innermost one describes a point best.
    pub frags: Vec<(usize, usize, Span)>,
}

pub(crate) const WIDTH: usize = 96;

impl Out {
    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }

    fn column(&self) -> usize {
        self.text.len() - self.text.rfind('\n').map_or(0, |i| i + 1)
    }

    /// Writes `e` at the current position; broken lines are indented by `indent` spaces
    /// (plus four per nesting level).
    pub fn expr(&mut self, e: &Expr, indent: usize) {
        let flat = flat(e);
        if !flat.contains('\n') && self.column() + flat.len() <= WIDTH {
            self.flat(e);
        } else {
            self.broken(e, indent);
        }
    }

    fn flat(&mut self, e: &Expr) {
        match e {
            Expr::Atom(s) => self.push(s),
            Expr::Call(name, args) => {
                self.push(name);
                self.push("(");
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        self.push(", ");
                    }
                    self.flat(a);
                }
                self.push(")");
            }
            Expr::Named(name, v) => {
                self.push(name);
                self.push(": ");
                self.flat(v);
            }
            Expr::Block(m, entries) => {
                self.flat(m);
                self.push(" { ");
                for (i, a) in entries.iter().enumerate() {
                    if i > 0 {
                        self.push(", ");
                    }
                    self.flat(a);
                }
                self.push(" }");
            }
            Expr::Table(arms) => {
                self.push("match tensor { ");
                for (i, (pat, v)) in arms.iter().enumerate() {
                    if i > 0 {
                        self.push(", ");
                    }
                    self.pattern(pat.as_deref());
                    self.flat(v);
                }
                self.push(" }");
            }
            Expr::List(items) => {
                self.push("[");
                for (i, a) in items.iter().enumerate() {
                    if i > 0 {
                        self.push(", ");
                    }
                    self.flat(a);
                }
                self.push("]");
            }
            Expr::At(inner, span) => {
                let start = self.text.len();
                self.flat(inner);
                self.frags.push((start, self.text.len(), *span));
            }
            Expr::Cat(parts) => {
                for p in parts {
                    self.flat(p);
                }
            }
        }
    }

    fn pattern(&mut self, pat: Option<&str>) {
        match pat {
            Some(p) => {
                self.push(&quote(p));
                self.push(" => ");
            }
            None => self.push("_ => "),
        }
    }

    /// Writes `e` broken over lines (when it is a call, table or block).
    pub fn broken(&mut self, e: &Expr, indent: usize) {
        let inner = indent + 4;
        let pad = " ".repeat(inner);
        let close = " ".repeat(indent);
        match e {
            Expr::Call(name, args) => {
                self.push(name);
                self.push("(\n");
                for a in args {
                    self.push(&pad);
                    self.expr(a, inner);
                    self.push(",\n");
                }
                self.push(&close);
                self.push(")");
            }
            Expr::Named(name, v) => {
                self.push(name);
                self.push(": ");
                self.expr(v, indent);
            }
            Expr::Block(m, entries) => {
                self.expr(m, indent);
                self.push(" {\n");
                for a in entries {
                    self.push(&pad);
                    self.expr(a, inner);
                    self.push(",\n");
                }
                self.push(&close);
                self.push("}");
            }
            Expr::Table(arms) => {
                self.push("match tensor {\n");
                for (pat, v) in arms {
                    self.push(&pad);
                    self.pattern(pat.as_deref());
                    self.expr(v, inner);
                    self.push(",\n");
                }
                self.push(&close);
                self.push("}");
            }
            Expr::At(inner_expr, span) => {
                let start = self.text.len();
                self.expr(inner_expr, indent);
                self.frags.push((start, self.text.len(), *span));
            }
            Expr::Cat(parts) => {
                for p in parts {
                    self.expr(p, indent);
                }
            }
            Expr::Atom(_) | Expr::List(_) => self.flat(e),
        }
    }
}

/// `e` on one line (used to measure it).
pub(crate) fn flat(e: &Expr) -> String {
    let mut o = Out::default();
    o.flat(e);
    o.text
}

/// A script string literal.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_calls_break_one_argument_a_line() {
        let args: Vec<Expr> = (0..6)
            .map(|i| {
                Expr::Block(
                    Box::new(Expr::atom(format!("model_{i}"))),
                    vec![Expr::named("weight", Expr::atom("0.125"))],
                )
            })
            .collect();
        let mut o = Out::default();
        o.push("save ");
        o.expr(&Expr::Call("linear".into(), args), 0);
        assert!(
            o.text
                .starts_with("save linear(\n    model_0 { weight: 0.125 },\n"),
            "{}",
            o.text
        );
        assert!(o.text.ends_with(",\n)"), "{}", o.text);
    }

    #[test]
    fn quotes_escape() {
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
