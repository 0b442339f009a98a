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
