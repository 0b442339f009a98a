//! The parse tree: what the script says, with a span on every node.

use crate::source::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Script {
    pub stmts: Vec<Stmt>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StrLit {
    pub value: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StmtKind {
    /// `model name = "path"`
    Model { name: Ident, path: StrLit },
    /// `let name = value`
    Let { name: Ident, value: Expr },
    /// `set name = value`
    Set { name: Ident, value: Expr },
    /// `save value to "dir" { options }`
    Save {
        value: Expr,
        dir: StrLit,
        options: Vec<Named>,
    },
}

/// `name: value`, in calls, parameter blocks and save options.
#[derive(Clone, Debug, PartialEq)]
pub struct Named {
    pub name: Ident,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Positional(Expr),
    Named(Named),
}

impl Arg {
    pub fn span(&self) -> Span {
        match self {
            Arg::Positional(e) => e.span,
            Arg::Named(n) => n.name.span.join(n.value.span),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MatchArm {
    /// `None` for the `_` arm.
    pub pattern: Option<StrLit>,
    pub value: Expr,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Number(f64),
    /// A byte size such as `5GB`.
    Size(u64),
    Str(String),
    Name(String),
    List(Vec<Expr>),
    Neg(Box<Expr>),
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    Call {
        func: Ident,
        args: Vec<Arg>,
    },
    /// `target { name: value, ... }`
    Params {
        target: Box<Expr>,
        params: Vec<Named>,
    },
    /// `target.layers[start..end]`
    Layers {
        target: Box<Expr>,
        start: u64,
        end: u64,
        range_span: Span,
    },
    Match(Vec<MatchArm>),
}

/// `format!("{script:#?}\n")`, in time linear in what it writes: the derived pretty form
/// passes each line through one padding writer per level of nesting, which makes a deep
/// expression quadratic or worse. This writes the compact form (`{:?}`) and breaks it into
/// the pretty one's lines and indentation.
pub fn dump(script: &Script) -> String {
    let mut out = pretty(&format!("{script:?}"));
    out.push('\n');
    out
}

/// The `{:#?}` form of a value from its `{:?}` form: structs (`Name { a: 1 }`), tuples
/// (`Name(1)`) and lists (`[1, 2]`), strings and chars as Rust's `Debug` escapes them.
fn pretty(compact: &str) -> String {
    const INDENT: &str = "    ";
    let mut out = String::with_capacity(compact.len() * 2);
    let mut depth = 0usize;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(INDENT);
        }
    };
    let mut chars = compact.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                // A string or char literal, escapes and all, as it is.
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        out.extend(chars.next());
                    } else if d == c {
                        break;
                    }
                }
            }
            '{' | '(' | '[' => {
                let close = match c {
                    '{' => '}',
                    '(' => ')',
                    _ => ']',
                };
                // `{ }` of a struct has spaces inside; an empty `()`, `[]` or `{}` stays.
                if c == '{' && chars.peek() == Some(&' ') {
                    chars.next();
                } else if chars.peek() == Some(&close) {
                    out.push(c);
                    out.extend(chars.next());
                    continue;
                }
                out.push(c);
                depth += 1;
                newline(&mut out, depth);
            }
            ' ' if chars.peek() == Some(&'}') => {}
            '}' | ')' | ']' => {
                out.push(',');
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' if chars.peek() == Some(&' ') => {
                chars.next();
                out.push(',');
                newline(&mut out, depth);
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{SourceId, SourceMap};

    #[test]
    fn dump_is_the_pretty_debug_form() {
        let scripts = [
            "model a = \"m\"\nmodel b = \"x, \\\"y\\\" { z }\"\nlet c = -(a + b * 2) / 3\n",
            "save linear(a { weight: [0, 0.5, 1] }, b.layers[0..2], t: match tensor { \"x\" => 1, _ => 2e-5 }) to \"o\" { shard: 5GB }\nset seed = 42\n",
            "let e = stack()\nlet f = [[], [a]]\nsave select(a, \"é\\n\\t\") to \"o\" {}\n",
        ];
        for text in scripts {
            let mut sources = SourceMap::new();
            let id = sources.add("x.merge", None, text);
            assert_eq!(id, SourceId(0));
            let script = crate::syntax::parse(&sources, id).unwrap();
            assert_eq!(dump(&script), format!("{script:#?}\n"), "{text}");
        }
    }
}
