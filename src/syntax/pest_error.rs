//! pest errors -> diagnostics in words: "expected a model or a number, found `)`".

use pest::error::{Error, ErrorVariant, InputLocation};

use super::parser::Rule;
use crate::diag::{Code, Diagnostic};
use crate::source::{SourceId, Span};

pub(crate) fn to_diagnostic(err: &Error<Rule>, text: &str, source: SourceId) -> Diagnostic {
    let pos = match err.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let (found, found_len) = found_at(text, pos);
    let expected = match &err.variant {
        ErrorVariant::ParsingError { positives, .. } => describe_expected(positives),
        ErrorVariant::CustomError { message } => message.clone(),
    };
    let span = Span::new(source, pos, pos + found_len);
    let mut d = Diagnostic::error(Code::E0101, format!("expected {expected}, found {found}"))
        .at(span, format!("expected {expected} here"));
    if let Some(help) = help_for(text, pos, &found) {
        d = d.with_help(help);
    }
    d
}

/// What stands at `pos`, in words, and its length in bytes.
fn found_at(text: &str, pos: usize) -> (String, usize) {
    let rest = text.get(pos..).unwrap_or("");
    let Some(first) = rest.chars().next() else {
        return ("the end of the file".to_string(), 0);
    };
    if first == '\n' || first == '\r' {
        return ("the end of the line".to_string(), first.len_utf8());
    }
    let word_len = if first.is_alphanumeric() || first == '_' {
        rest.char_indices()
            .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == '.'))
            .map_or(rest.len(), |(i, _)| i)
    } else if first == '"' {
        rest[1..].find('"').map_or(first.len_utf8(), |i| i + 2)
    } else {
        first.len_utf8()
    };
    let word = &rest[..word_len];
    (format!("`{word}`"), word_len)
}

/// Friendly names for what the parser expected, deduplicated, joined with "or".
fn describe_expected(rules: &[Rule]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for rule in rules {
        for name in rule_names(*rule) {
            if !names.contains(name) {
                names.push(name);
            }
        }
    }
    // Where an expression may start, "a model or a number" says it all.
    if names.contains(&"a model or a number") {
        names.retain(|n| !matches!(*n, "a string" | "a name" | "something else"));
    }
    if names.len() > 1 {
        names.retain(|n| *n != "something else");
    }
    match names.len() {
        0 => "something else".to_string(),
        1 => names[0].to_string(),
        n => format!("{} or {}", names[..n - 1].join(", "), names[n - 1]),
    }
}

fn rule_names(rule: Rule) -> &'static [&'static str] {
    match rule {
        Rule::EOI => &["the end of the file"],
        Rule::stmt | Rule::model_decl | Rule::let_decl | Rule::save_stmt | Rule::set_stmt => {
            &["a statement (`model`, `let`, `set` or `save`)"]
        }
        Rule::kw_model | Rule::kw_let | Rule::kw_save | Rule::kw_set => {
            &["a statement (`model`, `let`, `set` or `save`)"]
        }
        Rule::expr | Rule::primary | Rule::call | Rule::list | Rule::number | Rule::size | Rule::paren => {
            &["a model or a number"]
        }
        Rule::match_table => &["a model or a number"],
        Rule::neg => &["a model or a number"],
        Rule::ident => &["a name"],
        Rule::string => &["a string"],
        Rule::integer => &["a whole number"],
        Rule::kw_to => &["`to`"],
        Rule::kw_tensor => &["`tensor`"],
        Rule::kw_layers => &["`layers`"],
        Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::infix => &["an operator"],
        Rule::layer_range | Rule::param_block | Rule::postfix => &["an operator"],
        Rule::options => &["`{`"],
        Rule::named => &["`name: value`"],
        Rule::arm => &["a match arm (`\"pattern\" => value`)"],
        Rule::wildcard => &["`_`"],
        Rule::size_unit => &["a size unit (B, K, KB, M, MB, G, GB, T, TB, KiB, MiB, GiB, TiB)"],
        _ => &["something else"],
    }
}

fn help_for(text: &str, pos: usize, found: &str) -> Option<String> {
    let before = text.get(..pos).unwrap_or("").trim_end();
    if found == "`=`" && before.ends_with("save") {
        return Some("`save` takes a model and a folder: `save m to \"out/dir\"`".to_string());
    }
    if found.starts_with("`'") {
        return Some("strings use double quotes: \"...\"".to_string());
    }
    if found == "`:`" {
        return Some("named arguments go inside a call: `linear(a, b, normalize: false)`".to_string());
    }
    None
}
