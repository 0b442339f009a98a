//! pest pairs -> AST. One builder per AST type; every node takes its pair's span.

use pest::iterators::Pair;
use pest::Parser as _;
use pest_derive::Parser;

use super::ast::*;
use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::source::{SourceId, Span};

#[derive(Parser)]
#[grammar = "../grammar/merge.pest"]
pub(crate) struct MergeParser;

/// Deeper bracket nesting than this is refused before parsing, so that the parser's
/// recursion stays bounded.
pub(crate) const MAX_NESTING: usize = 200;

/// The deepest expression tree accepted: operators, unary minus, `.layers[..]` and `{ }`
/// suffixes, calls, lists and tables each add a level. Every later stage walks expressions
/// recursively; this bound keeps them within a thread's stack.
pub(crate) const MAX_EXPR_DEPTH: u32 = 256;

pub(crate) fn parse_script(text: &str, source: SourceId) -> Result<Script, Diagnostics> {
    check_nesting(text, source)?;
    let mut pairs = MergeParser::parse(Rule::script, text)
        .map_err(|e| Diagnostics::from(super::pest_error::to_diagnostic(&e, text, source)))?;
    let builder = Builder {
        source,
        diags: Diagnostics::new(),
        too_deep: false,
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
                        return Err(Diagnostic::error(Code::E0103, "brackets are nested too deeply")
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
    /// Whether the current statement has already been reported as too deep (E0103).
    too_deep: bool,
}

/// An expression as built, with the depth of its tree (a leaf is 1 deep).
struct Built {
    expr: Expr,
    depth: u32,
}

impl Built {
    fn leaf(kind: ExprKind, span: Span) -> Built {
        Built {
            expr: Expr { kind, span },
            depth: 1,
        }
    }
}

/// How tightly an infix operator binds (higher first).
fn precedence(op: BinOp) -> u8 {
    match op {
        BinOp::Add | BinOp::Sub => 1,
        BinOp::Mul | BinOp::Div => 2,
    }
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
        self.too_deep = false;
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
                let value = self.expr_opt(inner.next(), span).expr;
                StmtKind::Let { name, value }
            }
            Rule::set_stmt => {
                let name = self.ident(inner.next());
                let value = self.expr_opt(inner.next(), span).expr;
                StmtKind::Set { name, value }
            }
            _ => {
                let value = self.expr_opt(inner.next(), span).expr;
                let dir = self.string(inner.next());
                let options = inner.next().map(|p| self.named_list(p).0).unwrap_or_default();
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

    /// The entries of an option or parameter block, with the depth of the deepest value.
    fn named_list(&mut self, pair: Pair<Rule>) -> (Vec<Named>, u32) {
        let mut depth = 0;
        let list = pair
            .into_inner()
            .map(|p| {
                let (named, d) = self.named(p);
                depth = depth.max(d);
                named
            })
            .collect();
        (list, depth)
    }

    fn named(&mut self, pair: Pair<Rule>) -> (Named, u32) {
        let span = self.span(&pair);
        let mut inner = pair.into_inner();
        let name = self.ident(inner.next());
        let value = self.expr_opt(inner.next(), span);
        (
            Named {
                name,
                value: value.expr,
            },
            value.depth,
        )
    }

    fn expr_opt(&mut self, pair: Option<Pair<Rule>>, fallback: Span) -> Built {
        match pair {
            Some(p) => self.expr(p),
            None => Built::leaf(ExprKind::Number(0.0), fallback),
        }
    }

    /// A new node `depth` levels deep, or, past [`MAX_EXPR_DEPTH`], an error (E0103, once
    /// per statement) and a placeholder leaf, so that no tree ever grows deeper.
    fn node(&mut self, kind: ExprKind, span: Span, depth: u32, at: Span) -> Built {
        if depth <= MAX_EXPR_DEPTH {
            return Built {
                expr: Expr { kind, span },
                depth,
            };
        }
        if !self.too_deep {
            self.too_deep = true;
            self.diags.push(
                Diagnostic::error(Code::E0103, "the expression is nested too deeply")
                    .at(at, format!("more than {MAX_EXPR_DEPTH} levels deep here"))
                    .with_help("split the expression with `let` bindings"),
            );
        }
        Built::leaf(ExprKind::Number(0.0), span)
    }

    /// An `expr` pair: its operands, prefixes, postfixes and infix operators come flat
    /// (see the grammar); precedence climbing puts them in a tree without recursion.
    /// Postfixes bind tightest, then unary minus, then `*` `/`, then `+` `-`, all left
    /// associative.
    fn expr(&mut self, pair: Pair<Rule>) -> Built {
        let fallback = self.span(&pair);
        let mut operands: Vec<Built> = Vec::new();
        let mut ops: Vec<(BinOp, Span)> = Vec::new();
        let mut prefixes: Vec<Span> = Vec::new();
        let mut current: Option<Built> = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::neg => prefixes.push(self.span(&p)),
                Rule::layer_range | Rule::param_block => {
                    let lhs = current
                        .take()
                        .unwrap_or_else(|| Built::leaf(ExprKind::Number(0.0), fallback));
                    current = Some(self.postfix(lhs, p));
                }
                Rule::add | Rule::sub | Rule::mul | Rule::div => {
                    let operand = self.operand(current.take(), &mut prefixes, fallback);
                    self.infix(&p, operand, &mut operands, &mut ops);
                }
                _ => current = Some(self.primary(p)),
            }
        }
        let operand = self.operand(current.take(), &mut prefixes, fallback);
        self.finish(operand, operands, ops)
    }

    /// Pushes an operand and the infix operator after it, applying the operators before
    /// it that bind at least as tightly.
    #[inline(never)]
    fn infix(
        &mut self,
        p: &Pair<Rule>,
        operand: Built,
        operands: &mut Vec<Built>,
        ops: &mut Vec<(BinOp, Span)>,
    ) {
        let op = match p.as_rule() {
            Rule::add => BinOp::Add,
            Rule::sub => BinOp::Sub,
            Rule::mul => BinOp::Mul,
            _ => BinOp::Div,
        };
        operands.push(operand);
        while ops
            .last()
            .is_some_and(|(top, _)| precedence(*top) >= precedence(op))
        {
            self.reduce(operands, ops);
        }
        ops.push((op, self.span(p)));
    }

    /// The last operand pushed, and every operator left applied.
    #[inline(never)]
    fn finish(&mut self, operand: Built, mut operands: Vec<Built>, mut ops: Vec<(BinOp, Span)>) -> Built {
        operands.push(operand);
        while !ops.is_empty() {
            self.reduce(&mut operands, &mut ops);
        }
        let fallback = operands.first().map(|o| o.expr.span);
        operands.pop().unwrap_or_else(|| {
            Built::leaf(
                ExprKind::Number(0.0),
                fallback.unwrap_or(Span::new(self.source, 0, 0)),
            )
        })
    }

    /// A primary with its postfixes applied, under its unary minus signs (the last one
    /// innermost).
    fn operand(&mut self, current: Option<Built>, prefixes: &mut Vec<Span>, fallback: Span) -> Built {
        let mut e = current.unwrap_or_else(|| Built::leaf(ExprKind::Number(0.0), fallback));
        while let Some(op) = prefixes.pop() {
            let span = op.join(e.expr.span);
            let depth = e.depth + 1;
            e = self.node(ExprKind::Neg(Box::new(e.expr)), span, depth, op);
        }
        e
    }

    /// Applies the operator on top of `ops` to the two operands on top of `operands`.
    fn reduce(&mut self, operands: &mut Vec<Built>, ops: &mut Vec<(BinOp, Span)>) {
        let (Some((op, op_span)), Some(rhs), Some(lhs)) = (ops.pop(), operands.pop(), operands.pop()) else {
            return;
        };
        let span = lhs.expr.span.join(rhs.expr.span);
        let depth = lhs.depth.max(rhs.depth) + 1;
        let kind = ExprKind::Binary {
            op,
            lhs: Box::new(lhs.expr),
            rhs: Box::new(rhs.expr),
        };
        let built = self.node(kind, span, depth, op_span);
        operands.push(built);
    }

    fn postfix(&mut self, lhs: Built, op: Pair<Rule>) -> Built {
        let op_span = self.span(&op);
        let span = lhs.expr.span.join(op_span);
        match op.as_rule() {
            Rule::layer_range => {
                let mut ints = op.into_inner().filter(|p| p.as_rule() == Rule::integer);
                let start = self.integer(ints.next());
                let end = self.integer(ints.next());
                let kind = ExprKind::Layers {
                    target: Box::new(lhs.expr),
                    start,
                    end,
                    range_span: op_span,
                };
                self.node(kind, span, lhs.depth + 1, op_span)
            }
            _ => {
                let (params, depth) = self.named_list(op);
                let kind = ExprKind::Params {
                    target: Box::new(lhs.expr),
                    params,
                };
                self.node(kind, span, lhs.depth.max(depth) + 1, op_span)
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

    fn primary(&mut self, pair: Pair<Rule>) -> Built {
        match pair.as_rule() {
            Rule::expr => self.expr(pair),
            Rule::list => self.list(pair),
            Rule::call => self.call(pair),
            Rule::match_table => self.match_table(pair),
            _ => self.leaf(pair),
        }
    }

    #[inline(never)]
    fn leaf(&mut self, pair: Pair<Rule>) -> Built {
        let span = self.span(&pair);
        let kind = match pair.as_rule() {
            Rule::number => ExprKind::Number(self.number(pair.as_str(), span)),
            Rule::size => ExprKind::Size(self.size(pair, span)),
            Rule::string => ExprKind::Str(self.string(Some(pair)).value),
            Rule::ident => ExprKind::Name(pair.as_str().to_string()),
            other => {
                self.diags.push(
                    Diagnostic::bug(format!("unexpected rule {other:?} in an expression")).at(span, ""),
                );
                ExprKind::Number(0.0)
            }
        };
        Built::leaf(kind, span)
    }

    /// The first character of `span`: where a too deep bracket is pointed at.
    fn opening(span: Span) -> Span {
        Span {
            end: span.start + 1,
            ..span
        }
    }

    fn list(&mut self, pair: Pair<Rule>) -> Built {
        let span = self.span(&pair);
        let mut depth = 0;
        let mut items = Vec::new();
        for p in pair.into_inner() {
            let item = self.expr(p);
            depth = depth.max(item.depth);
            items.push(item.expr);
        }
        self.node(ExprKind::List(items), span, depth + 1, Self::opening(span))
    }

    fn call(&mut self, pair: Pair<Rule>) -> Built {
        let span = self.span(&pair);
        let mut inner = pair.into_inner();
        let func = self.ident(inner.next());
        let mut depth = 0;
        let mut args = Vec::new();
        for p in inner {
            let (arg, d) = match p.as_rule() {
                Rule::named => {
                    let (named, d) = self.named(p);
                    (Arg::Named(named), d)
                }
                _ => {
                    let e = self.expr(p);
                    (Arg::Positional(e.expr), e.depth)
                }
            };
            depth = depth.max(d);
            args.push(arg);
        }
        self.node(
            ExprKind::Call { func, args },
            span,
            depth + 1,
            Self::opening(span),
        )
    }

    fn match_table(&mut self, pair: Pair<Rule>) -> Built {
        let span = self.span(&pair);
        let mut depth = 0;
        let mut arms = Vec::new();
        for arm in pair.into_inner().filter(|p| p.as_rule() == Rule::arm) {
            let arm_span = self.span(&arm);
            let mut inner = arm.into_inner();
            let pattern = match inner.next() {
                Some(p) if p.as_rule() == Rule::string => Some(self.string(Some(p))),
                _ => None,
            };
            let value = self.expr_opt(inner.next(), arm_span);
            depth = depth.max(value.depth);
            arms.push(MatchArm {
                pattern,
                value: value.expr,
                span: arm_span,
            });
        }
        self.node(ExprKind::Match(arms), span, depth + 1, Self::opening(span))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceMap;

    fn parse(text: &str) -> Result<Script, Diagnostics> {
        let mut sources = SourceMap::new();
        let id = sources.add("t.merge", None, text);
        crate::syntax::parse(&sources, id)
    }

    /// The saved expression, written back with every operation in brackets.
    fn shape(text: &str) -> String {
        fn show(e: &Expr) -> String {
            match &e.kind {
                ExprKind::Name(n) => n.clone(),
                ExprKind::Number(v) => v.to_string(),
                ExprKind::Neg(x) => format!("(-{})", show(x)),
                ExprKind::Binary { op, lhs, rhs } => format!("({} {} {})", show(lhs), op.symbol(), show(rhs)),
                ExprKind::Layers {
                    target, start, end, ..
                } => format!("{}[{start}..{end}]", show(target)),
                ExprKind::Params { target, params } => format!("{}{{{}}}", show(target), params.len()),
                ExprKind::Call { func, args } => format!("{}/{}", func.name, args.len()),
                other => format!("{other:?}"),
            }
        }
        let script = parse(&format!("save {text} to \"o\"")).unwrap();
        match &script.stmts[0].kind {
            StmtKind::Save { value, .. } => show(value),
            _ => unreachable!(),
        }
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(shape("a - b - c"), "((a - b) - c)");
        assert_eq!(shape("a / b * c"), "((a / b) * c)");
        assert_eq!(shape("a + b * c - d"), "((a + (b * c)) - d)");
        assert_eq!(shape("a * b + c * d"), "((a * b) + (c * d))");
        assert_eq!(shape("-a * b"), "((-a) * b)");
        assert_eq!(shape("a * - - b"), "(a * (-(-b)))");
        assert_eq!(shape("-a.layers[0..2] { w: 1 }"), "(-a[0..2]{1})");
        assert_eq!(shape("a - (b - c) * 2"), "(a - ((b - c) * 2))");
        assert_eq!(shape("f(a, b) + g(c)"), "(f/2 + g/1)");
    }

    #[test]
    fn spans_cover_each_node() {
        let text = "save -a + b.layers[0..1] to \"o\"";
        let script = parse(text).unwrap();
        let StmtKind::Save { value, .. } = &script.stmts[0].kind else {
            unreachable!()
        };
        assert_eq!(&text[value.span.range()], "-a + b.layers[0..1]");
        let ExprKind::Binary { lhs, rhs, .. } = &value.kind else {
            unreachable!()
        };
        assert_eq!(&text[lhs.span.range()], "-a");
        assert_eq!(&text[rhs.span.range()], "b.layers[0..1]");
    }

    #[test]
    fn depth_is_limited_at_each_kind_of_level() {
        let depth = MAX_EXPR_DEPTH as usize;
        let at = |n: usize| {
            [
                format!("save {}a to \"o\"", "- ".repeat(n - 1)),
                format!("save a{} to \"o\"", " + a".repeat(n - 1)),
                format!("save a{} to \"o\"", ".layers[0..1]".repeat(n - 1)),
                format!("save a{} to \"o\"", " { w: 1 }".repeat(n - 1)),
            ]
        };
        for text in at(depth) {
            assert!(parse(&text).is_ok(), "{}", &text[..40]);
        }
        for text in at(depth + 1) {
            let d = parse(&text).unwrap_err();
            assert_eq!(
                d.iter().map(|d| d.code).collect::<Vec<_>>(),
                [Code::E0103],
                "{}",
                &text[..40]
            );
        }
        // Once per statement, however far past.
        let two = format!("let x = {}1\nlet y = {}1\n", "- ".repeat(1000), "- ".repeat(1000));
        assert_eq!(parse(&two).unwrap_err().len(), 2);
    }
}
