//! The only place that touches ariadne: diagnostics -> text (or JSON for tools).

use std::io::IsTerminal;

use ariadne::{Config, IndexType, Label, Report, ReportKind};
use serde_json::{json, Value};

use super::{Diagnostic, Severity};
use crate::source::SourceMap;

/// Whether to colour output: only on a terminal, and never when `NO_COLOR` is set.
pub fn stderr_wants_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Renders diagnostics as human-readable text (ariadne, byte-indexed spans).
pub fn render_text(diags: &[Diagnostic], sources: &SourceMap, colour: bool) -> String {
    let mut out = String::new();
    for d in diags {
        out.push_str(&render_one(d, sources, colour));
    }
    out
}

fn render_one(d: &Diagnostic, sources: &SourceMap, colour: bool) -> String {
    let kind = match d.severity {
        Severity::Error => ReportKind::Error,
        Severity::Warning => ReportKind::Warning,
    };
    let Some(span) = d.span else {
        return render_without_place(d);
    };
    let name = |id| sources.get(id).name.clone();
    let config = Config::default()
        .with_index_type(IndexType::Byte)
        .with_color(colour);
    let mut report = Report::build(kind, (name(span.source), span.range()))
        .with_config(config)
        .with_code(d.code)
        .with_message(&d.message);
    let mut primary = Label::new((name(span.source), span.range())).with_order(0);
    if let Some(msg) = &d.primary_label {
        primary = primary.with_message(msg);
    }
    report = report.with_label(primary);
    for (i, l) in d.labels.iter().enumerate() {
        report = report.with_label(
            Label::new((name(l.span.source), l.span.range()))
                .with_message(&l.message)
                .with_order(i as i32 + 1),
        );
    }
    for n in &d.notes {
        report = report.with_note(n);
    }
    for h in &d.help {
        report = report.with_help(h);
    }
    let cache = ariadne::sources(sources.files().map(|(_, f)| (f.name.clone(), f.text.clone())));
    let mut buf = Vec::new();
    match report.finish().write(cache, &mut buf) {
        Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
        Err(_) => render_without_place(d),
    }
}

fn render_without_place(d: &Diagnostic) -> String {
    let word = match d.severity {
        Severity::Error => "Error",
        Severity::Warning => "Warning",
    };
    let mut out = format!("[{}] {}: {}\n", d.code, word, d.message);
    for n in &d.notes {
        out.push_str(&format!("  Note: {n}\n"));
    }
    for h in &d.help {
        out.push_str(&format!("  Help: {h}\n"));
    }
    out
}

/// Renders diagnostics as a JSON array for tools: code, severity, message, file, 1-based
/// line and column, byte span, labels, notes and help.
pub fn to_json(diags: &[Diagnostic], sources: &SourceMap) -> Value {
    let place = |span: crate::source::Span| {
        let (line, column) = sources.line_col(span.source, span.start);
        json!({
            "file": sources.get(span.source).name,
            "line": line,
            "column": column,
            "start": span.start,
            "end": span.end,
        })
    };
    Value::Array(
        diags
            .iter()
            .map(|d| {
                json!({
                    "code": d.code.as_str(),
                    "severity": match d.severity { Severity::Error => "error", Severity::Warning => "warning" },
                    "message": d.message,
                    "span": d.span.map(place),
                    "label": d.primary_label,
                    "labels": d.labels.iter().map(|l| json!({"span": place(l.span), "message": l.message})).collect::<Vec<_>>(),
                    "notes": d.notes,
                    "help": d.help,
                })
            })
            .collect(),
    )
}
