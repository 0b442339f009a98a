//! Checking calls: method calls, their base and positional/named arguments, arity, and
//! the dispatch of built-in names to the layer-surgery and MoE checks.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use super::methods::{self, MethodSig, ParamKind};
use super::value::{ArgValue, CallModel, MExpr, MethodCall, ModelVal, Value};
use super::{names, union_inputs, wrong_type, Checker};
use crate::diag::{Code, Diagnostic};
use crate::source::Span;
use crate::syntax::ast::{self, Arg};

/// A method call's arguments, as they are checked.
#[derive(Default)]
struct CallArgs<'a> {
    models: Vec<ModelVal>,
    base: Option<ModelVal>,
    globals: BTreeMap<&'static str, ArgValue>,
    seen: HashMap<&'a str, Span>,
    failed: bool,
}

impl Checker<'_> {
    pub(super) fn call(&mut self, func: &ast::Ident, args: &[Arg], span: Span) -> Value {
        match func.name.as_str() {
            "stack" => return self.stack(args, span),
            "select" => return self.select(args, span),
            "graft" => return self.graft(args, span),
            "rename" => return self.rename(args, span),
            "moe" => return self.moe(args, span),
            "lora" => return self.lora(args, span),
            _ => {}
        }
        let Some(sig) = methods::lookup(&func.name) else {
            for a in args {
                let _ = match a {
                    Arg::Positional(e) => self.expr(e),
                    Arg::Named(n) => self.expr(&n.value),
                };
            }
            return self.unknown_function(func);
        };
        // Arguments are evaluated here, and handled out of the recursion (see `expr`).
        let mut st = CallArgs::default();
        for arg in args {
            match arg {
                Arg::Positional(e) => {
                    let value = self.expr(e);
                    self.positional_arg(sig, e, value, &mut st);
                }
                Arg::Named(n) => {
                    if self.argument_twice(n, &mut st) {
                        continue;
                    }
                    let value = self.expr(&n.value);
                    self.named_arg(sig, n, value, &mut st);
                }
            }
        }
        self.method_call(sig, st, span)
    }

    #[inline(never)]
    fn unknown_function(&mut self, func: &ast::Ident) -> Value {
        let mut d = Diagnostic::error(Code::E0203, format!("unknown function `{}`", func.name))
            .at(func.span, "no such method");
        if let Some(s) = names::did_you_mean(&func.name, methods::METHODS.iter().map(|m| m.name)) {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else {
            let all: Vec<&str> = methods::METHODS.iter().map(|m| m.name).collect();
            d = d.with_help(format!("the methods are: {}", all.join(", ")));
        }
        self.error(d)
    }

    #[inline(never)]
    fn positional_arg(&mut self, sig: &MethodSig, e: &ast::Expr, value: Value, st: &mut CallArgs) {
        match value {
            Value::Model(m) => st.models.push(m),
            Value::Models(ms) => st.models.extend(ms),
            Value::Error => st.failed = true,
            other => {
                st.failed = true;
                self.diags.push(
                    wrong_type(
                        format!("expected a model, found {}", other.describe()),
                        e.span,
                        &other,
                    )
                    .with_help(format!(
                        "`{}` takes models as positional arguments and parameters by name, e.g. `{}`",
                        sig.name,
                        example_call(sig)
                    )),
                );
            }
        }
    }

    /// Whether the named argument `n` was given before (E0207); records it otherwise.
    #[inline(never)]
    fn argument_twice<'a>(&mut self, n: &'a ast::Named, st: &mut CallArgs<'a>) -> bool {
        let Some(first) = st.seen.insert(n.name.name.as_str(), n.name.span) else {
            return false;
        };
        st.failed = true;
        self.diags.push(
            Diagnostic::error(Code::E0207, format!("argument `{}` is given twice", n.name.name))
                .at(n.name.span, "given again here")
                .with_label(first, "first given here"),
        );
        true
    }

    #[inline(never)]
    fn named_arg(&mut self, sig: &'static MethodSig, n: &ast::Named, value: Value, st: &mut CallArgs) {
        if n.name.name == "base" {
            match self.base_argument(sig, &n.name, value, n.value.span) {
                Some(m) => st.base = Some(m),
                None => st.failed = true,
            }
            return;
        }
        match self.arg_value(sig, &n.name, value, n.value.span, false) {
            Some((name, v)) => {
                st.globals.insert(name, v);
            }
            None => st.failed = true,
        }
    }

    /// The call of `sig` with its arguments checked one by one.
    #[inline(never)]
    fn method_call(&mut self, sig: &'static MethodSig, st: CallArgs, span: Span) -> Value {
        let CallArgs {
            mut models,
            mut base,
            globals,
            seen: _,
            mut failed,
        } = st;
        if sig.base == methods::Base::Required && !models.is_empty() {
            base = Some(models.remove(0));
        }
        if let Some(b) = base.take() {
            if let Some(first) = b.params.first() {
                let span = b.params.iter().fold(first.span, |s, p| s.join(p.span));
                self.diags.push(
                    Diagnostic::error(Code::W0003, "per-model parameters are ignored here")
                        .at(
                            span,
                            format!("the base model of `{}` takes no parameters", sig.name),
                        )
                        .with_help("the base is the reference the other models are merged against"),
                );
            }
            base = Some(ModelVal {
                params: Vec::new(),
                ..b
            });
        }
        if (sig.base == methods::Base::Required && base.is_none())
            || models.len() < sig.min_models
            || sig.max_models.is_some_and(|max| models.len() > max)
        {
            // An argument that failed (a model that did not load) has its own error: the
            // count is not the user's mistake.
            if failed {
                return Value::Error;
            }
            return self.error(self.arity_error(sig, base.is_some(), models.len(), span));
        }
        let mut all: Vec<&ModelVal> = base.iter().collect();
        all.extend(models.iter());
        for m in all.iter().skip(1) {
            if !self.same_tensors(all[0], all[0].span, m, m.span, sig.name) {
                failed = true;
            }
        }
        let Some(first) = all.first() else {
            return Value::Error;
        };
        let tensors = Rc::clone(&first.tensors);
        let layer_sources = Rc::clone(&first.layer_sources);
        let inputs = union_inputs(all.iter().flat_map(|m| m.inputs.iter()));
        let mut call_models = Vec::new();
        for m in models {
            let mut params: BTreeMap<&'static str, ArgValue> = BTreeMap::new();
            let mut bad_param = false;
            for entry in &m.params {
                if let Some(first) = m
                    .params
                    .iter()
                    .find(|p| p.name.name == entry.name.name && p.span != entry.span)
                {
                    if first.span.start < entry.span.start {
                        failed = true;
                        self.diags.push(
                            Diagnostic::error(
                                Code::E0207,
                                format!("parameter `{}` is given twice", entry.name.name),
                            )
                            .at(entry.name.span, "given again here")
                            .with_label(first.name.span, "first given here"),
                        );
                        continue;
                    }
                }
                match self.arg_value(sig, &entry.name, entry.value.clone(), entry.span, true) {
                    Some((name, v)) => {
                        params.insert(name, v);
                    }
                    None => {
                        failed = true;
                        bad_param = true;
                    }
                }
            }
            // Required per-model parameters must be set on the model or for the whole call.
            for p in sig
                .params
                .iter()
                .filter(|p| p.per_model && p.default == methods::Default::Required)
            {
                if !bad_param && !params.contains_key(p.name) && !globals.contains_key(p.name) {
                    failed = true;
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0205,
                            format!("missing argument `{}` for this model of `{}`", p.name, sig.name),
                        )
                        .at(m.span, format!("`{}` is not set for this model", p.name))
                        .with_help(format!(
                            "set it per model, `{}`, or once for all models, `{}(..., {}: 0.5)`",
                            "m { weight: 0.5 }".replace("weight", p.name),
                            sig.name,
                            p.name
                        )),
                    );
                }
            }
            call_models.push(CallModel {
                expr: m.expr,
                params,
                span: m.span,
            });
        }
        for p in sig
            .params
            .iter()
            .filter(|p| !p.per_model && p.default == methods::Default::Required)
        {
            if !globals.contains_key(p.name) {
                failed = true;
                self.diags.push(
                    Diagnostic::error(
                        Code::E0205,
                        format!("missing argument `{}` of `{}`", p.name, sig.name),
                    )
                    .at(span, format!("`{}` is required", p.name))
                    .with_help(format!("add `{}: ...` to the call", p.name)),
                );
            }
        }
        if failed {
            return Value::Error;
        }
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Method(MethodCall {
                sig,
                base: base.map(|b| b.expr),
                models: call_models,
                globals,
                span,
            })),
            tensors,
            layer_sources,
            span,
            inputs,
            params: Vec::new(),
        })
    }

    pub(super) fn arity_error(
        &self,
        sig: &MethodSig,
        has_base: bool,
        given: usize,
        span: Span,
    ) -> Diagnostic {
        let wanted = match sig.max_models {
            Some(max) if max == sig.min_models => format!("exactly {max}"),
            Some(max) => format!("{} to {max}", sig.min_models),
            None => format!("at least {}", sig.min_models),
        };
        let noun = if sig.max_models.unwrap_or(sig.min_models) == 1 {
            "model"
        } else {
            "models"
        };
        let what = match sig.base {
            methods::Base::Required => format!("a base model, then {wanted} {noun}"),
            _ => format!("{wanted} {noun}"),
        };
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let got = match (sig.base, has_base) {
            (methods::Base::Required, true) => format!("a base and {given} model{}", plural(given)),
            (methods::Base::Required, false) => "no models".to_string(),
            _ => format!("{given} model{}", plural(given)),
        };
        Diagnostic::error(Code::E0206, format!("`{}` takes {what}, but got {got}", sig.name))
            .at(span, format!("{got} here"))
            .with_help(format!("for example: `{}`", example_call(sig)))
    }

    /// `base: m` for methods whose base is optional.
    pub(super) fn base_argument(
        &mut self,
        sig: &MethodSig,
        name: &ast::Ident,
        value: Value,
        span: Span,
    ) -> Option<ModelVal> {
        if sig.base != methods::Base::Optional {
            let help = match sig.base {
                methods::Base::Required => format!(
                    "the base of `{}` is its first model: `{}`",
                    sig.name,
                    example_call(sig)
                ),
                _ => format!("`{}` does not use a base model", sig.name),
            };
            self.diags.push(
                Diagnostic::error(Code::E0204, format!("`{}` has no parameter `base`", sig.name))
                    .at(name.span, "not a parameter here")
                    .with_help(help),
            );
            return None;
        }
        match value {
            Value::Model(m) => Some(self.no_params(m)),
            Value::Error => None,
            other => {
                self.diags.push(wrong_type(
                    format!("`base` needs a model, found {}", other.describe()),
                    span,
                    &other,
                ));
                None
            }
        }
    }

    /// Checks a named argument or per-model parameter against the method's registry entry.
    pub(super) fn arg_value(
        &mut self,
        sig: &'static MethodSig,
        name: &ast::Ident,
        value: Value,
        value_span: Span,
        per_model: bool,
    ) -> Option<(&'static str, ArgValue)> {
        let Some(spec) = sig.param(&name.name) else {
            let mut d = Diagnostic::error(
                Code::E0204,
                format!("`{}` has no parameter `{}`", sig.name, name.name),
            )
            .at(name.span, "unknown parameter");
            let candidates = sig
                .params
                .iter()
                .filter(|p| p.per_model || !per_model)
                .map(|p| p.name);
            if let Some(s) = names::did_you_mean(&name.name, candidates) {
                d = d.with_help(format!("did you mean `{s}`?"));
            } else {
                let all: Vec<&str> = sig.params.iter().map(|p| p.name).collect();
                d = d.with_help(format!(
                    "the parameters of `{}` are: {}",
                    sig.name,
                    all.join(", ")
                ));
            }
            self.diags.push(d);
            return None;
        };
        if per_model && !spec.per_model {
            self.diags.push(
                Diagnostic::error(
                    Code::E0204,
                    format!(
                        "`{}` is a parameter of the whole call, not of one model",
                        spec.name
                    ),
                )
                .at(name.span, "set for one model here")
                .with_help(format!(
                    "pass it to the call instead: `{}(a, b, {}: ...)`",
                    sig.name, spec.name
                )),
            );
            return None;
        }
        match (spec.kind, value) {
            (_, Value::Error) => None,
            (ParamKind::Number | ParamKind::Integer, Value::Param(p)) => {
                let bad = p.literals().into_iter().find(|v| {
                    !spec.range.contains(*v) || (spec.kind == ParamKind::Integer && v.fract() != 0.0)
                });
                if let Some(v) = bad {
                    let whole = if spec.kind == ParamKind::Integer {
                        "a whole number "
                    } else {
                        ""
                    };
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0305,
                            format!(
                                "`{}` must be {whole}{}, found {v}",
                                spec.name,
                                spec.range.describe()
                            ),
                        )
                        .at(value_span, "out of range")
                        .with_help(format!("`{}` of `{}`: {}", spec.name, sig.name, spec.doc)),
                    );
                    return None;
                }
                Some((spec.name, ArgValue::Param(p, value_span)))
            }
            (ParamKind::Bool, Value::Bool(b)) => Some((spec.name, ArgValue::Bool(b))),
            (kind, other) => {
                let expected = match kind {
                    ParamKind::Number | ParamKind::Integer => "a number, a layer gradient or a tensor table",
                    ParamKind::Bool => "`true` or `false`",
                };
                self.diags.push(wrong_type(
                    format!("`{}` expects {expected}, found {}", spec.name, other.describe()),
                    value_span,
                    &other,
                ));
                None
            }
        }
    }
}

/// A call of `sig` that would check, for help lines.
fn example_call(sig: &MethodSig) -> String {
    let per_model: Vec<String> = sig
        .params
        .iter()
        .filter(|p| p.per_model && p.default == methods::Default::Required)
        .map(|p| format!("{}: 0.5", p.name))
        .collect();
    let block = if per_model.is_empty() {
        String::new()
    } else {
        format!(" {{ {} }}", per_model.join(", "))
    };
    let mut args: Vec<String> = Vec::new();
    if sig.base == methods::Base::Required {
        args.push("base".to_string());
    }
    let count = sig.min_models.max(if sig.max_models == Some(1) { 1 } else { 2 });
    for name in ["a", "b", "c", "d"].iter().take(count) {
        args.push(format!("{name}{block}"));
    }
    for p in sig
        .params
        .iter()
        .filter(|p| !p.per_model && p.default == methods::Default::Required)
    {
        args.push(format!("{}: 0.5", p.name));
    }
    format!("{}({})", sig.name, args.join(", "))
}
