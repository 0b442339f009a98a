//! Checking expressions: names, lists, match tables, arithmetic between models and
//! parameters, `model { params }` blocks, and the tensor-set agreement they need.

use std::collections::BTreeSet;
use std::rc::Rc;

use super::methods::{self};
use super::params::{Param, Pattern, TableArm};
use super::value::{MExpr, ModelVal, ParamEntry, TensorSig, Value};
use super::{names, union_inputs, wrong_type, Checker, MAX_MODEL_DEPTH};
use crate::diag::{Code, Diagnostic};
use crate::source::Span;
use crate::syntax::ast::{self, BinOp, Expr, ExprKind, Named};

impl Checker<'_> {
    /// Checks an expression. A model value nested deeper than [`MAX_MODEL_DEPTH`] (through
    /// `let` bindings, say) is refused here (E0210), before any later walk over it, once
    /// per tensor, could recurse that deep.
    ///
    /// Expressions nest as deep as the parser allows (`syntax::MAX_EXPR_DEPTH`), and every
    /// level goes through this function: the functions on that path evaluate their operands
    /// and leave the rest to helpers (`combine`, `negate`, ...), so that each level takes
    /// little stack.
    pub(super) fn expr(&mut self, expr: &Expr) -> Value {
        let value = self.eval(expr);
        match &value {
            Value::Model(m) if self.model_depth(&m.expr) > MAX_MODEL_DEPTH => self.too_deep(expr.span),
            _ => value,
        }
    }

    #[inline(never)]
    fn too_deep(&mut self, span: Span) -> Value {
        self.error(
            Diagnostic::error(Code::E0210, "the model expression is nested too deeply")
                .at(
                    span,
                    format!("more than {MAX_MODEL_DEPTH} merges and operations deep"),
                )
                .with_note("each `let` binding a model is used in adds the depth of that model")
                .with_help(
                    "save an intermediate model and merge further from the saved folder in another script",
                ),
        )
    }

    fn eval(&mut self, expr: &Expr) -> Value {
        match &expr.kind {
            ExprKind::Number(v) => Value::Param(Param::Number(*v)),
            ExprKind::Size(v) => Value::Size(*v),
            ExprKind::Str(_) => Value::Str,
            ExprKind::Name(name) => self.name(name, expr.span),
            ExprKind::List(items) => self.list(items, expr.span),
            ExprKind::Neg(inner) => self.neg(inner, expr.span),
            ExprKind::Binary { op, lhs, rhs } => self.binary(*op, lhs, rhs, expr.span),
            ExprKind::Call { func, args } => self.call(func, args, expr.span),
            ExprKind::Params { target, params } => self.param_block(target, params, expr.span),
            ExprKind::Layers {
                target,
                start,
                end,
                range_span,
            } => self.layers(target, *start, *end, *range_span, expr.span),
            ExprKind::Match(arms) => self.table(arms, expr.span),
        }
    }

    fn neg(&mut self, inner: &Expr, span: Span) -> Value {
        let value = self.expr(inner);
        self.negate(value, inner, span)
    }

    #[inline(never)]
    fn negate(&mut self, value: Value, inner: &Expr, span: Span) -> Value {
        match value {
            Value::Param(Param::Number(v)) => Value::Param(Param::Number(-v)),
            Value::Model(m) => {
                let m = self.no_params(m);
                self.derive(&m, span, MExpr::Neg(Rc::clone(&m.expr)))
            }
            Value::Error => Value::Error,
            other => self.error(wrong_type(
                format!("cannot negate {}", other.describe()),
                inner.span,
                &other,
            )),
        }
    }

    #[inline(never)]
    pub(super) fn name(&mut self, name: &str, span: Span) -> Value {
        if let Some(binding) = self.env.get_mut(name) {
            binding.used = true;
            return match binding.value.clone() {
                // Diagnostics about this use point here, not at the declaration.
                Value::Model(m) => Value::Model(ModelVal { span, ..m }),
                other => other,
            };
        }
        match name {
            "true" => return Value::Bool(true),
            "false" => return Value::Bool(false),
            _ => {}
        }
        let mut d = Diagnostic::error(Code::E0201, format!("unknown name `{name}`")).at(span, "not defined");
        let suggestion = match self.suggestions_left.checked_sub(1) {
            Some(left) => {
                self.suggestions_left = left;
                names::did_you_mean(name, self.env.keys().map(String::as_str))
            }
            None => None,
        };
        if let Some(s) = suggestion {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else if methods::lookup(name).is_some() {
            d = d.with_help(format!(
                "`{name}` is a merge method: call it, e.g. `{name}(a, b)`"
            ));
        } else {
            d = d.with_help("declare models with `model NAME = \"path\"` and values with `let NAME = ...`, before their use");
        }
        self.error(d)
    }

    pub(super) fn list(&mut self, items: &[Expr], span: Span) -> Value {
        let values: Vec<(Value, Span)> = items.iter().map(|e| (self.expr(e), e.span)).collect();
        self.list_value(values, span)
    }

    #[inline(never)]
    fn list_value(&mut self, values: Vec<(Value, Span)>, span: Span) -> Value {
        if values.is_empty() {
            return self.error(
                Diagnostic::error(Code::E0301, "empty list")
                    .at(span, "a list needs at least one element")
                    .with_help(
                        "a list is either a layer gradient `[0, 0.5, 1]` or a list of models `[a, b]`",
                    ),
            );
        }
        if values.iter().any(|(v, _)| matches!(v, Value::Error)) {
            return Value::Error;
        }
        if values
            .iter()
            .all(|(v, _)| matches!(v, Value::Param(Param::Number(_))))
        {
            let numbers: Vec<f64> = values
                .iter()
                .filter_map(|(v, _)| match v {
                    Value::Param(Param::Number(x)) => Some(*x),
                    _ => None,
                })
                .collect();
            return Value::Param(Param::Gradient(numbers.into()));
        }
        if values.iter().all(|(v, _)| matches!(v, Value::Model(_))) {
            let models = values
                .into_iter()
                .filter_map(|(v, _)| match v {
                    Value::Model(m) => Some(m),
                    _ => None,
                })
                .collect();
            return Value::Models(models);
        }
        let (first, first_span) = &values[0];
        let expect_models = matches!(first, Value::Model(_));
        let (odd, odd_span) = values
            .iter()
            .find(|(v, _)| {
                matches!(v, Value::Model(_)) != expect_models
                    || !matches!(v, Value::Model(_) | Value::Param(Param::Number(_)))
            })
            .map(|(v, s)| (v.describe(), *s))
            .unwrap_or(("a different kind of value", span));
        let expected = if expect_models { "a model" } else { "a number" };
        self.error(
            Diagnostic::error(Code::E0301, format!("expected {expected}, found {odd} in a list"))
                .at(odd_span, format!("this is {odd}"))
                .with_label(*first_span, format!("the list starts with {}", first.describe()))
                .with_help("a list is either a layer gradient `[0, 0.5, 1]` (numbers only) or a list of models `[a, b]`"),
        )
    }

    pub(super) fn table(&mut self, arms: &[ast::MatchArm], span: Span) -> Value {
        let values: Vec<Value> = arms.iter().map(|arm| self.expr(&arm.value)).collect();
        self.table_value(arms, values, span)
    }

    /// The table of `arms`, whose values are `values` (evaluated in order).
    #[inline(never)]
    fn table_value(&mut self, arms: &[ast::MatchArm], values: Vec<Value>, span: Span) -> Value {
        let mut out = Vec::new();
        let mut failed = false;
        let mut wildcard_at: Option<Span> = None;
        for (arm, value) in arms.iter().zip(values) {
            if let Some(w) = wildcard_at {
                self.diags.push(
                    Diagnostic::error(Code::E0305, "this arm can never match")
                        .at(arm.span, "unreachable")
                        .with_label(w, "`_` matches every tensor first")
                        .with_help("move `_` to the end of the table"),
                );
            }
            let value = match value {
                Value::Param(p) => p,
                Value::Error => {
                    failed = true;
                    continue;
                }
                other => {
                    failed = true;
                    self.diags.push(
                        wrong_type(
                            format!("expected a number, found {}", other.describe()),
                            arm.value.span,
                            &other,
                        )
                        .with_help("table values are numbers, layer gradients or nested tables"),
                    );
                    continue;
                }
            };
            if arm.pattern.is_none() {
                wildcard_at = Some(arm.span);
            }
            out.push(TableArm {
                pattern: arm.pattern.as_ref().map(|p| Pattern::new(&p.value)),
                value,
                span: arm.span,
            });
        }
        if out.is_empty() && !failed {
            return self.error(
                Diagnostic::error(Code::E0301, "empty table").at(span, "a table needs at least one arm"),
            );
        }
        if failed {
            Value::Error
        } else {
            Value::Param(Param::Table(out.into()))
        }
    }

    /// A model value derived from `from` by `expr`, with the same tensors.
    pub(super) fn derive(&self, from: &ModelVal, span: Span, expr: MExpr) -> Value {
        Value::Model(ModelVal {
            expr: Rc::new(expr),
            tensors: Rc::clone(&from.tensors),
            layer_sources: Rc::clone(&from.layer_sources),
            span,
            inputs: from.inputs.clone(),
            params: Vec::new(),
        })
    }

    /// Warns when a parameter block is attached where no method call consumes it.
    pub(super) fn no_params(&mut self, m: ModelVal) -> ModelVal {
        if let Some(first) = m.params.first() {
            let span = m.params.iter().fold(first.span, |s, p| s.join(p.span));
            self.diags.push(
                Diagnostic::error(Code::W0003, "per-model parameters are ignored here")
                    .at(span, "not inside a merge method call")
                    .with_help("per-model parameters belong to a model passed to a method: `linear(a { weight: 0.5 }, b { weight: 0.5 })`"),
            );
        }
        ModelVal {
            params: Vec::new(),
            ..m
        }
    }

    pub(super) fn binary(&mut self, op: BinOp, lhs_e: &Expr, rhs_e: &Expr, span: Span) -> Value {
        let lhs = self.expr(lhs_e);
        let rhs = self.expr(rhs_e);
        self.combine(op, lhs_e, rhs_e, lhs, rhs, span)
    }

    /// `lhs op rhs`, the operands evaluated already.
    #[inline(never)]
    fn combine(
        &mut self,
        op: BinOp,
        lhs_e: &Expr,
        rhs_e: &Expr,
        lhs: Value,
        rhs: Value,
        span: Span,
    ) -> Value {
        match (op, lhs, rhs) {
            (_, Value::Error, _) | (_, _, Value::Error) => Value::Error,
            (_, Value::Param(Param::Number(a)), Value::Param(Param::Number(b))) => {
                let v = match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    BinOp::Div => {
                        if b == 0.0 {
                            return self.error(
                                Diagnostic::error(Code::E0305, "division by zero")
                                    .at(rhs_e.span, "this is 0"),
                            );
                        }
                        a / b
                    }
                };
                Value::Param(Param::Number(v))
            }
            (BinOp::Add | BinOp::Sub, Value::Model(a), Value::Model(b)) => {
                let a = self.no_params(a);
                let b = self.no_params(b);
                if !self.same_tensors(&a, lhs_e.span, &b, rhs_e.span, op.symbol()) {
                    return Value::Error;
                }
                let expr = match op {
                    BinOp::Add => MExpr::Add(Rc::clone(&a.expr), Rc::clone(&b.expr)),
                    _ => MExpr::Sub(Rc::clone(&a.expr), Rc::clone(&b.expr)),
                };
                let inputs = union_inputs(a.inputs.iter().chain(&b.inputs));
                Value::Model(ModelVal {
                    expr: Rc::new(expr),
                    tensors: Rc::clone(&a.tensors),
                    layer_sources: Rc::clone(&a.layer_sources),
                    span,
                    inputs,
                    params: Vec::new(),
                })
            }
            (BinOp::Mul, Value::Param(p), Value::Model(m))
            | (BinOp::Mul, Value::Model(m), Value::Param(p)) => {
                let m = self.no_params(m);
                let factor_span = if matches!(self.peek_kind(lhs_e), Some(true)) {
                    rhs_e.span
                } else {
                    lhs_e.span
                };
                self.derive(&m, span, MExpr::Scale(Rc::clone(&m.expr), p, factor_span))
            }
            (BinOp::Div, Value::Model(m), Value::Param(p)) => {
                if p.literals().iter().any(|v| *v as f32 == 0.0) {
                    let label = if matches!(p, Param::Number(_)) {
                        "this is 0"
                    } else {
                        "this can be 0"
                    };
                    return self.error(
                        Diagnostic::error(Code::E0305, "division by zero")
                            .at(rhs_e.span, label)
                            .with_help("a model can only be divided by a non-zero number"),
                    );
                }
                let m = self.no_params(m);
                self.derive(&m, span, MExpr::Divide(Rc::clone(&m.expr), p, rhs_e.span))
            }
            (op, lhs, rhs) => {
                let (l, r) = (lhs.describe(), rhs.describe());
                let help = match op {
                    BinOp::Add | BinOp::Sub => "models add to models and numbers to numbers; to scale a model, multiply it: `0.5 * a`",
                    BinOp::Mul => "a model can be multiplied by a number, not by another model",
                    BinOp::Div => "a model can be divided by a number; a number cannot be divided by a model",
                };
                self.error(
                    Diagnostic::error(
                        Code::E0301,
                        format!("cannot apply `{}` to {l} and {r}", op.symbol()),
                    )
                    .at(span, "")
                    .with_label(lhs_e.span, format!("this is {l}"))
                    .with_label(rhs_e.span, format!("this is {r}"))
                    .with_help(help),
                )
            }
        }
    }

    /// Whether an expression is syntactically a model (used only to point at the factor).
    pub(super) fn peek_kind(&self, e: &Expr) -> Option<bool> {
        match &e.kind {
            ExprKind::Number(_) | ExprKind::List(_) | ExprKind::Match(_) => Some(false),
            ExprKind::Name(n) => self.env.get(n).map(|b| matches!(b.value, Value::Model(_))),
            _ => Some(true),
        }
    }

    /// Checks that two models have the same tensor names and shapes; reports differences
    /// grouped by layer, with both spans.
    pub(super) fn same_tensors(
        &mut self,
        a: &ModelVal,
        a_span: Span,
        b: &ModelVal,
        b_span: Span,
        what: &str,
    ) -> bool {
        let a_names: BTreeSet<&str> = a.tensors.keys().map(String::as_str).collect();
        let b_names: BTreeSet<&str> = b.tensors.keys().map(String::as_str).collect();
        let only_a: Vec<&str> = a_names.difference(&b_names).copied().collect();
        let only_b: Vec<&str> = b_names.difference(&a_names).copied().collect();
        let mut ok = true;
        if !only_a.is_empty() || !only_b.is_empty() {
            ok = false;
            let mut d = Diagnostic::error(
                Code::E0302,
                format!("the models combined by `{what}` have different tensors"),
            )
            .at(b_span, format!("this model has {} tensors", b_names.len()))
            .with_label(a_span, format!("this model has {} tensors", a_names.len()));
            if let (Some(la), Some(lb)) = (a.layers(), b.layers()) {
                if la != lb {
                    d = d.with_note(format!(
                        "the left model has {la} layers and the right one {lb}: models combined layer by layer need as many layers (ranges of equal length)"
                    ));
                }
            }
            if !only_a.is_empty() {
                d = d.with_note(format!(
                    "{} tensors of the left model are missing from the right one:\n{}",
                    only_a.len(),
                    names::bullet_list(&names::grouped(only_a.iter().copied()), 8)
                ));
            }
            if !only_b.is_empty() {
                d = d.with_note(format!(
                    "{} tensors of the right model are missing from the left one:\n{}",
                    only_b.len(),
                    names::bullet_list(&names::grouped(only_b.iter().copied()), 8)
                ));
            }
            d = d.with_help(
                "merge models of the same architecture, or select matching layers with `.layers[a..b]`",
            );
            self.diags.push(d);
        }
        let mismatched: Vec<(&String, &TensorSig, &TensorSig)> = a
            .tensors
            .iter()
            .filter_map(|(n, sa)| {
                b.tensors
                    .get(n)
                    .filter(|sb| sb.shape != sa.shape)
                    // Vocabulary tensors may differ in rows: the save aligns them to its
                    // output vocabulary, or refuses them (E0801).
                    .filter(|sb| {
                        !(super::vocab::is_vocab_tensor(n)
                            && sb.shape.len() == sa.shape.len()
                            && sb.shape[1..] == sa.shape[1..])
                    })
                    .map(|sb| (n, sa, sb))
            })
            .collect();
        if let Some((name, sa, sb)) = mismatched.first() {
            ok = false;
            let mut d = Diagnostic::error(
                Code::E0303,
                format!(
                    "shape mismatch: `{name}` is {:?} on the left but {:?} on the right",
                    sa.shape, sb.shape
                ),
            )
            .at(b_span, format!("`{name}` is {:?} here", sb.shape))
            .with_label(a_span, format!("`{name}` is {:?} here", sa.shape));
            if mismatched.len() > 1 {
                let others: Vec<String> = mismatched[1..]
                    .iter()
                    .map(|(n, x, y)| format!("{n}: {:?} vs {:?}", x.shape, y.shape))
                    .collect();
                d = d.with_note(format!(
                    "{} more tensors differ in shape:\n{}",
                    others.len(),
                    names::bullet_list(&others, 5)
                ));
            }
            d = d.with_help("the models must have the same architecture and sizes");
            self.diags.push(d);
        }
        ok
    }

    pub(super) fn param_block(&mut self, target: &Expr, params: &[Named], span: Span) -> Value {
        let value = self.expr(target);
        let values: Vec<Value> = params.iter().map(|p| self.expr(&p.value)).collect();
        self.with_params(target, params, value, values, span)
    }

    #[inline(never)]
    fn with_params(
        &mut self,
        target: &Expr,
        params: &[Named],
        value: Value,
        values: Vec<Value>,
        span: Span,
    ) -> Value {
        let entries: Vec<ParamEntry> = params
            .iter()
            .zip(values)
            .map(|(p, value)| ParamEntry {
                name: p.name.clone(),
                value,
                span: p.name.span.join(p.value.span),
            })
            .collect();
        match value {
            Value::Model(mut m) => {
                m.params.extend(entries);
                m.span = span;
                Value::Model(m)
            }
            Value::Error => Value::Error,
            other => self.error(wrong_type(
                format!(
                    "parameters can only be attached to a model, not to {}",
                    other.describe()
                ),
                target.span,
                &other,
            )),
        }
    }
}
