//! pest pairs -> AST. One builder per AST type; every node takes its pair's span.

use std::sync::LazyLock;

use pest::iterators::{Pair, Pairs};
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser as _;
use pest_derive::Parser;

use super::ast::*;
use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::source::{SourceId, Span};

#[derive(Parser)]
#[grammar = "../grammar/merge.pest"]
pub(crate) struct MergeParser;

/// Precedence, lowest first.
static PRATT: LazyLock<PrattParser<Rule>> = LazyLock::new(|| {
    PrattParser::new()
        .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
        .op(Op::infix(Rule::mul, Assoc::Left) | Op::infix(Rule::div, Assoc::Left))
        .op(Op::prefix(Rule::neg))
        .op(Op::postfix(Rule::layer_range) | Op::postfix(Rule::param_block))
});

/// Deeper bracket nesting than this is refused before parsing, so recursion stays bounded.
const MAX_NESTING: usize = 200;

pub(crate) fn parse_script(text: &str, source: SourceId) -> Result<Script, Diagnostics> {
    check_nesting(text, source)?;
    let mut pairs = MergeParser::parse(Rule::script, text)
        .map_err(|e| Diagnostics::from(super::pest_error::to_diagnostic(&e, text, source)))?;
    let builder = Builder {
        source,
        diags: Diagnostics::new(),
    };
    let script_pair = pairs
        .next()
        .ok_or_else(|| Diagnostics::from(Diagnostic::bug("empty parse")))?;
    builder.script(script_pair)
}

fn check_nesting(text: &str, source: SourceId) -> Result<(), Diagnostics> {
    let (mut depth, mut in_string, mut in_comment, mut escaped) = (0usize, false, false, false);
    for (i, c) in text.char_indices() {
        if in_comment {
            in_comment = c != '\n';
        } else if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') | (false, '\n') => in_string = false,
                _ => {}
            }
        } else {
            match c {
                '#' => in_comment = true,
                '"' => in_string = true,
                '(' | '[' | '{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(Diagnostic::error(Code::E0101, "brackets are nested too deeply")
                            .at(
                                Span::new(source, i, i + 1),
                                format!("more than {MAX_NESTING} levels deep"),
                            )
                            .with_help("split the expression with `let` bindings")
                            .into());
                    }
                }
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

struct Builder {
    source: SourceId,
    diags: Diagnostics,
}

impl Builder {
    fn span(&self, pair: &Pair<Rule>) -> Span {
        let s = pair.as_span();
        Span::new(self.source, s.start(), s.end())
    }

    fn script(mut self, pair: Pair<Rule>) -> Result<Script, Diagnostics> {
        let mut stmts = Vec::new();
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::model_decl | Rule::let_decl | Rule::save_stmt | Rule::set_stmt => {
                    stmts.push(self.stmt(p))
                }
                _ => {}
            }
        }
        if self.diags.has_errors() {
            Err(self.diags)
        } else {
            Ok(Script { stmts })
        }
    }

    fn stmt(&mut self, pair: Pair<Rule>) -> Stmt {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut inner = pair.into_inner().filter(|p| !is_keyword(p.as_rule()));
        let kind = match rule {
            Rule::model_decl => {
                let name = self.ident(inner.next());
                let path = self.string(inner.next());
                StmtKind::Model { name, path }
            }
            Rule::let_decl => {
                let name = self.ident(inner.next());
                let value = self.expr_opt(inner.next(), span);
                StmtKind::Let { name, value }
            }
            Rule::set_stmt => {
                let name = self.ident(inner.next());
                let value = self.expr_opt(inner.next(), span);
                StmtKind::Set { name, value }
            }
            _ => {
                let value = self.expr_opt(inner.next(), span);
                let dir = self.string(inner.next());
                let options = inner.next().map(|p| self.named_list(p)).unwrap_or_default();
                StmtKind::Save { value, dir, options }
            }
        };
        Stmt { kind, span }
    }

    fn ident(&mut self, pair: Option<Pair<Rule>>) -> Ident {
        match pair {
            Some(p) => Ident {
                name: p.as_str().to_string(),
                span: self.span(&p),
            },
            None => Ident {
                name: String::new(),
                span: Span::new(self.source, 0, 0),
            },
        }
    }

    fn string(&mut self, pair: Option<Pair<Rule>>) -> StrLit {
        let Some(pair) = pair else {
            return StrLit {
                value: String::new(),
                span: Span::new(self.source, 0, 0),
            };
        };
        let span = self.span(&pair);
        let raw = pair.into_inner().next().map(|p| p.as_str()).unwrap_or("");
        let mut value = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                value.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => value.push('\n'),
                Some('t') => value.push('\t'),
                Some('"') => value.push('"'),
                Some('\\') => value.push('\\'),
                other => {
                    let shown = other.map(|c| format!("\\{c}")).unwrap_or_else(|| "\\".into());
                    self.diags.push(
                        Diagnostic::error(Code::E0102, format!("unknown escape `{shown}` in a string"))
                            .at(span, "in this string")
                            .with_help("the escapes are \\\", \\\\, \\n and \\t"),
                    );
                }
            }
        }
        StrLit { value, span }
    }

    fn named_list(&mut self, pair: Pair<Rule>) -> Vec<Named> {
        pair.into_inner().map(|p| self.named(p)).collect()
    }

    fn named(&mut self, pair: Pair<Rule>) -> Named {
        let span = self.span(&pair);
        let mut inner = pair.into_inner();
        let name = self.ident(inner.next());
        let value = self.expr_opt(inner.next(), span);
        Named { name, value }
    }

    fn expr_opt(&mut self, pair: Option<Pair<Rule>>, fallback: Span) -> Expr {
        match pair {
            Some(p) => self.expr(p),
            None => Expr {
                kind: ExprKind::Number(0.0),
                span: fallback,
            },
        }
    }

    fn expr(&mut self, pair: Pair<Rule>) -> Expr {
        self.pratt(pair.into_inner())
    }

    fn pratt(&mut self, pairs: Pairs<Rule>) -> Expr {
        // The Pratt parser's closures cannot borrow `self` mutably at once, so they share it
        // through a RefCell.
        let this = std::cell::RefCell::new(self);
        let expr = PRATT
            .map_primary(|p| this.borrow_mut().primary(p))
            .map_prefix(|op, rhs| {
                let span = this.borrow().span(&op).join(rhs.span);
                Expr {
                    kind: ExprKind::Neg(Box::new(rhs)),
                    span,
                }
            })
            .map_postfix(|lhs, op| this.borrow_mut().postfix(lhs, op))
            .map_infix(|lhs, op, rhs| {
                let op = match op.as_rule() {
                    Rule::add => BinOp::Add,
                    Rule::sub => BinOp::Sub,
                    Rule::mul => BinOp::Mul,
                    _ => BinOp::Div,
                };
                let span = lhs.span.join(rhs.span);
                Expr {
                    kind: ExprKind::Binary {
                        op,
                        lhs: Box::new(lhs),
                        rhs: Box::new(rhs),
                    },
                    span,
                }
            })
            .parse(pairs);
        expr
    }

    fn postfix(&mut self, lhs: Expr, op: Pair<Rule>) -> Expr {
        let op_span = self.span(&op);
        let span = lhs.span.join(op_span);
        match op.as_rule() {
            Rule::layer_range => {
                let mut ints = op.into_inner().filter(|p| p.as_rule() == Rule::integer);
                let start = self.integer(ints.next());
                let end = self.integer(ints.next());
                Expr {
                    kind: ExprKind::Layers {
                        target: Box::new(lhs),
                        start,
                        end,
                        range_span: op_span,
                    },
                    span,
                }
            }
            _ => {
                let params = self.named_list(op);
                Expr {
                    kind: ExprKind::Params {
                        target: Box::new(lhs),
                        params,
                    },
                    span,
                }
            }
        }
    }

    fn integer(&mut self, pair: Option<Pair<Rule>>) -> u64 {
        let Some(p) = pair else { return 0 };
        match p.as_str().parse::<u64>() {
            Ok(v) => v,
            Err(_) => {
                let span = self.span(&p);
                self.diags.push(
                    Diagnostic::error(Code::E0102, "layer index is too large")
                        .at(span, "does not fit in 64 bits"),
                );
                0
            }
        }
    }

    fn primary(&mut self, pair: Pair<Rule>) -> Expr {
        let span = self.span(&pair);
        let kind = match pair.as_rule() {
            Rule::number => ExprKind::Number(self.number(pair.as_str(), span)),
            Rule::size => ExprKind::Size(self.size(pair, span)),
            Rule::string => ExprKind::Str(self.string(Some(pair)).value),
            Rule::ident => ExprKind::Name(pair.as_str().to_string()),
            Rule::expr => return self.expr(pair),
            Rule::list => ExprKind::List(pair.into_inner().map(|p| self.expr(p)).collect()),
            Rule::call => {
                let mut inner = pair.into_inner();
                let func = self.ident(inner.next());
                let args = inner
                    .map(|p| match p.as_rule() {
                        Rule::named => Arg::Named(self.named(p)),
                        _ => Arg::Positional(self.expr(p)),
                    })
                    .collect();
                ExprKind::Call { func, args }
            }
            Rule::match_table => {
                let arms = pair
                    .into_inner()
                    .filter(|p| p.as_rule() == Rule::arm)
                    .map(|arm| {
                        let arm_span = self.span(&arm);
                        let mut inner = arm.into_inner();
                        let pattern = match inner.next() {
                            Some(p) if p.as_rule() == Rule::string => Some(self.string(Some(p))),
                            _ => None,
                        };
                        let value = self.expr_opt(inner.next(), arm_span);
                        MatchArm {
                            pattern,
                            value,
                            span: arm_span,
                        }
                    })
                    .collect();
                ExprKind::Match(arms)
            }
            other => {
                self.diags.push(
                    Diagnostic::bug(format!("unexpected rule {other:?} in an expression")).at(span, ""),
                );
                ExprKind::Number(0.0)
            }
        };
        Expr { kind, span }
    }

    fn number(&mut self, text: &str, span: Span) -> f64 {
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => v,
            _ => {
                self.diags.push(
                    Diagnostic::error(Code::E0102, format!("number `{text}` is out of range"))
                        .at(span, "not a finite 64-bit float"),
                );
                0.0
            }
        }
    }

    fn size(&mut self, pair: Pair<Rule>, span: Span) -> u64 {
        let pair_text = pair.as_str().to_string();
        let mut inner = pair.into_inner();
        let number = inner.next().map(|p| p.as_str()).unwrap_or("0");
        let unit = inner.next().map(|p| p.as_str()).unwrap_or_default();
        // The grammar admits only the units `size_unit_scale` knows.
        let scale = crate::units::size_unit_scale(unit).unwrap_or(1.0);
        let bytes = self.number(number, span) * scale;
        if bytes.fract() != 0.0 || bytes >= u64::MAX as f64 {
            self.diags.push(
                Diagnostic::error(
                    Code::E0102,
                    format!("size `{}` is not a whole number of bytes", pair_text),
                )
                .at(span, "not a whole number of bytes")
                .with_help("write a whole number of bytes, e.g. `1500MB` instead of `1.5000001GB`"),
            );
            return 0;
        }
        bytes as u64
    }
}

fn is_keyword(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::kw_model
            | Rule::kw_let
            | Rule::kw_save
            | Rule::kw_set
            | Rule::kw_to
            | Rule::kw_match
            | Rule::kw_tensor
            | Rule::kw_layers
    )
}
