//! The only place that touches ariadne: diagnostics -> text (or JSON for tools).
//!
//! Text output is bounded whatever the input: at most [`MAX_SHOWN`] diagnostics are shown
//! (a last line counts the others), and each is rendered from an excerpt of its source
//! (the lines it points at, long lines cut to a window around each place) rather than from
//! the whole file. The excerpt renders exactly as the whole file would: line numbers and
//! the `file:line:column` headers are put back to the file's own. JSON output lists every
//! diagnostic.

use std::collections::HashMap;
use std::io::IsTerminal;

use ariadne::{Config, IndexType, Label, Report, ReportKind};
use serde_json::{json, Value};

use super::{Diagnostic, Severity};
use crate::source::{SourceId, SourceMap, Span};

/// At most this many diagnostics are rendered as text; a last line counts the others.
pub const MAX_SHOWN: usize = 100;

/// A line longer than this (in bytes, without its line break) is shown as an excerpt: a
/// window around each place the diagnostic points at on it, `…` for what is left out.
pub const LONG_LINE: usize = 200;

/// Bytes shown before and after a place on a long line.
const CONTEXT: usize = 60;

/// Bytes shown of a place's own text on a long line (its start, or for the last line of a
/// place over several lines, its end).
const PLACE_KEPT: usize = 80;

/// A run of lines left out between two lines shown stands for as many chars as it has, up
/// to this many.
const GAP_KEPT: usize = 4096;

/// The mark for text left out of a long line.
const ELLIPSIS: &str = "…";

/// Whether to colour output: only on a terminal, and never when `NO_COLOR` is set.
pub fn stderr_wants_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Renders diagnostics as human-readable text (ariadne, byte-indexed spans): the first
/// [`MAX_SHOWN`], then a line saying how many more there are.
pub fn render_text(diags: &[Diagnostic], sources: &SourceMap, colour: bool) -> String {
    let mut lines: HashMap<SourceId, Lines> = HashMap::new();
    let mut out = String::new();
    for d in diags.iter().take(MAX_SHOWN) {
        out.push_str(&render_one(d, sources, &mut lines, colour));
    }
    if let Some(rest) = diags.get(MAX_SHOWN..).filter(|r| !r.is_empty()) {
        out.push_str(&more_line(rest));
    }
    out
}

/// `and 3 more errors` (and warnings) for the diagnostics left out.
fn more_line(rest: &[Diagnostic]) -> String {
    let errors = rest.iter().filter(|d| d.is_error()).count();
    let warnings = rest.len() - errors;
    let count = |n: usize, what: &str| format!("{n} more {what}{}", if n == 1 { "" } else { "s" });
    let said = match (errors, warnings) {
        (e, 0) => count(e, "error"),
        (0, w) => count(w, "warning"),
        (e, w) => format!("{} and {}", count(e, "error"), count(w, "warning")),
    };
    format!("and {said} (only the first {MAX_SHOWN} diagnostics are shown; `--format json` lists them all)\n")
}

fn render_one(
    d: &Diagnostic,
    sources: &SourceMap,
    lines: &mut HashMap<SourceId, Lines>,
    colour: bool,
) -> String {
    let kind = match d.severity {
        Severity::Error => ReportKind::Error,
        Severity::Warning => ReportKind::Warning,
    };
    let Some(span) = d.span else {
        return render_without_place(d);
    };
    // Every place, the primary one first, as ariadne orders them.
    let places: Vec<Span> = std::iter::once(span)
        .chain(d.labels.iter().map(|l| l.span))
        .collect();
    let mut excerpts: Vec<Excerpt> = Vec::new();
    for p in &places {
        if excerpts.iter().all(|e| e.source != p.source) {
            let file = sources.get(p.source);
            let index = lines
                .entry(p.source)
                .or_insert_with(|| Lines::new(&file.text, Breaks::Ariadne));
            let own: Vec<Span> = places.iter().filter(|q| q.source == p.source).copied().collect();
            excerpts.push(Excerpt::new(p.source, &file.name, &file.text, index, &own));
        }
    }
    let excerpt_of = |s: Span| excerpts.iter().find(|e| e.source == s.source);
    // Ariadne takes char offsets: with byte offsets, it heads a group of lines from another
    // file than the primary place's with a char offset taken as a byte offset (off, or in
    // the middle of a char, a panic).
    let map = |s: Span| excerpt_of(s).map_or(0..0, |e| e.chars(e.map(s)));
    let name = |s: Span| sources.get(s.source).name.clone();
    let config = Config::default()
        .with_index_type(IndexType::Char)
        .with_color(colour);
    let mut report = Report::build(kind, (name(span), map(span)))
        .with_config(config)
        .with_code(d.code)
        .with_message(&d.message);
    let mut primary = Label::new((name(span), map(span))).with_order(0);
    if let Some(msg) = &d.primary_label {
        primary = primary.with_message(msg);
    }
    report = report.with_label(primary);
    for (i, l) in d.labels.iter().enumerate() {
        report = report.with_label(
            Label::new((name(l.span), map(l.span)))
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
    let cache = ariadne::sources(excerpts.iter().map(|e| (e.name.clone(), e.text.clone())));
    let mut buf = Vec::new();
    if report.finish().write(cache, &mut buf).is_err() {
        return render_without_place(d);
    }
    // Each place's start as `file:line:col`, in the excerpt and in the source: ariadne
    // heads each group of lines with one of them.
    let mut headers = Vec::new();
    for p in &places {
        let (Some(e), Some(index)) = (excerpt_of(*p), lines.get_mut(&p.source)) else {
            continue;
        };
        let file = &sources.get(p.source).text;
        let start = p.start as usize;
        if start > file.len() {
            continue;
        }
        let line = index.line_of(start);
        let column = index.column(file, line, start);
        let at = e.map(*p).start.min(e.text.len());
        let ex_line = e.own.line_of(at);
        let ex_column = e.text[e.own.starts[ex_line]..at].chars().count();
        headers.push((
            format!(" {}:{}:{} ", e.name, ex_line + 1, ex_column + 1),
            format!(" {}:{}:{} ", e.name, line + 1, column + 1),
        ));
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    restore_places(&text, &excerpts, &headers)
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

/// Where lines break: at `\n` only (JSON's line numbers), or wherever ariadne breaks them
/// (`\r\n`, `\n`, `\r`, vertical tab, form feed, U+0085, U+2028, U+2029).
#[derive(Clone, Copy, PartialEq)]
enum Breaks {
    Newline,
    Ariadne,
}

/// The lines of a text: where each starts, and for long lines the char count at
/// checkpoints, so that a column is found without counting the whole line each time.
struct Lines {
    /// Byte offset of each line's start; the first is 0.
    starts: Vec<usize>,
    /// For a long line (by index): `(byte offset, chars before it)` every [`CHECKPOINT`]
    /// bytes or so, from the line's start.
    checkpoints: HashMap<usize, Vec<(usize, usize)>>,
    len: usize,
}

const CHECKPOINT: usize = 4096;

impl Lines {
    fn new(text: &str, breaks: Breaks) -> Lines {
        let mut starts = vec![0];
        match breaks {
            Breaks::Newline => starts.extend(
                text.bytes()
                    .enumerate()
                    .filter(|(_, b)| *b == b'\n')
                    .map(|(i, _)| i + 1),
            ),
            Breaks::Ariadne => {
                let mut iter = text.char_indices().peekable();
                while let Some((i, c)) = iter.next() {
                    let end = match c {
                        '\r' if iter.peek().map(|p| p.1) == Some('\n') => {
                            iter.next();
                            i + 2
                        }
                        '\r' | '\n' | '\x0B' | '\x0C' | '\u{0085}' | '\u{2028}' | '\u{2029}' => {
                            i + c.len_utf8()
                        }
                        _ => continue,
                    };
                    starts.push(end);
                }
                // A break at the very end starts no line (as `split_inclusive` has it).
                if starts.len() > 1 && starts.last() == Some(&text.len()) {
                    starts.pop();
                }
            }
        }
        Lines {
            starts,
            checkpoints: HashMap::new(),
            len: text.len(),
        }
    }

    /// The line (0-based) a byte offset is on; the end of the text is on the last line.
    fn line_of(&self, pos: usize) -> usize {
        match self.starts.binary_search(&pos) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        }
    }

    /// Byte range of line `i`, with its line break.
    fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.starts[i]..self.starts.get(i + 1).copied().unwrap_or(self.len)
    }

    /// 0-based column (in chars) of byte offset `pos` on line `line` of `text`.
    fn column(&mut self, text: &str, line: usize, pos: usize) -> usize {
        let start = self.starts[line];
        let pos = floor_boundary(text, pos.min(text.len())).max(start);
        if pos - start <= CHECKPOINT {
            return text[start..pos].chars().count();
        }
        let end = self.range(line).end;
        let marks = self.checkpoints.entry(line).or_insert_with(|| {
            let mut marks = vec![(start, 0)];
            let (mut at, mut count) = (start, 0);
            while at + CHECKPOINT < end {
                let next = floor_boundary(text, at + CHECKPOINT).max(at + 1);
                let next = ceil_boundary(text, next);
                count += text[at..next].chars().count();
                marks.push((next, count));
                at = next;
            }
            marks
        });
        let k = match marks.binary_search_by_key(&pos, |m| m.0) {
            Ok(k) => k,
            Err(k) => k - 1,
        };
        let (at, count) = marks[k];
        count + text[at..pos].chars().count()
    }
}

fn floor_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(text: &str, mut i: usize) -> usize {
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// The part of a source a diagnostic shows: its lines with a place, one blank line for
/// each run of lines between them (ariadne shows no text there), long lines cut down.
struct Excerpt {
    source: SourceId,
    name: String,
    text: String,
    /// For each line of the excerpt: the source line it shows (None for a gap).
    shown: Vec<Option<usize>>,
    /// The source lines shown, in order.
    lines: Vec<ShownLine>,
    /// The excerpt's own line table.
    own: Lines,
    /// The source's length: offsets past it stay past the excerpt's end.
    source_len: usize,
}

/// A source line in an excerpt.
struct ShownLine {
    /// Where it starts in the source.
    source_start: usize,
    /// Where it starts in the excerpt.
    start: usize,
    /// What is kept of it: source bytes `from..to` (from the line's start) are at `at` (from
    /// the excerpt line's start). A whole line is one piece.
    pieces: Vec<Piece>,
}

struct Piece {
    from: usize,
    to: usize,
    at: usize,
}

impl Excerpt {
    fn new(source: SourceId, name: &str, text: &str, index: &Lines, places: &[Span]) -> Excerpt {
        // The lines ariadne looks at: where each place starts and where it ends.
        let mut wanted: Vec<usize> = Vec::new();
        for p in places {
            let (start, end) = (p.start as usize, p.end as usize);
            if start > text.len() {
                continue;
            }
            let line = index.line_of(start);
            wanted.push(line);
            if end > start {
                wanted.push(index.line_of((end - 1).min(text.len())));
            } else if line > 0 && index.starts[line] == start {
                // An empty place at a line's start is at the end of the line before too,
                // and ariadne may draw it there.
                wanted.push(line - 1);
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let mut out = String::new();
        let mut shown = Vec::new();
        let mut lines = Vec::new();
        // Lines left out are blank: ariadne shows no text of theirs. It draws the margin of
        // help and note rows as that of the first line of the file, so that one is there
        // as well.
        let mut previous: Option<usize> = None;
        let blank = |out: &mut String, shown: &mut Vec<Option<usize>>, from: usize, to: usize| {
            // As many chars as the lines left out, up to a bound: ariadne orders the places
            // over several lines by their length.
            let gap = &text[index.starts[from]..index.starts[to]];
            let chars = if gap.len() <= GAP_KEPT {
                gap.chars().count()
            } else {
                GAP_KEPT
            };
            out.push_str(&" ".repeat(chars.saturating_sub(1)));
            out.push('\n');
            shown.push(None);
        };
        for &l in &wanted {
            // The first line left out keeps its own length (ariadne draws a row for it when
            // it draws one), the others are one more line.
            let from = previous.map_or(0, |p| p + 1);
            if from < l {
                blank(&mut out, &mut shown, from, from + 1);
            }
            if from + 1 < l {
                blank(&mut out, &mut shown, from + 1, l);
            }
            previous = Some(l);
            let range = index.range(l);
            let full = &text[range.clone()];
            let content_len = full
                .trim_end_matches(['\r', '\n', '\x0B', '\x0C', '\u{0085}', '\u{2028}', '\u{2029}'])
                .len();
            let content = &full[..content_len];
            let line_start = out.len();
            let pieces = if content_len <= LONG_LINE {
                out.push_str(full);
                vec![Piece {
                    from: 0,
                    to: full.len(),
                    at: 0,
                }]
            } else {
                let windows = windows(content, range.start, content_len, places, index, l);
                let mut pieces = Vec::new();
                if windows.first().is_some_and(|w| w.0 > 0) {
                    out.push_str(ELLIPSIS);
                }
                for (k, (a, b)) in windows.iter().enumerate() {
                    if k > 0 {
                        out.push_str(ELLIPSIS);
                    }
                    pieces.push(Piece {
                        from: *a,
                        to: *b,
                        at: out.len() - line_start,
                    });
                    out.push_str(&content[*a..*b]);
                }
                if windows.last().is_some_and(|w| w.1 < content_len) {
                    out.push_str(ELLIPSIS);
                }
                // The line break, as it is.
                pieces.push(Piece {
                    from: content_len,
                    to: full.len(),
                    at: out.len() - line_start,
                });
                out.push_str(&full[content_len..]);
                pieces
            };
            shown.push(Some(l));
            lines.push(ShownLine {
                source_start: range.start,
                start: line_start,
                pieces,
            });
        }
        let own = Lines::new(&out, Breaks::Ariadne);
        Excerpt {
            source,
            name: name.to_string(),
            text: out,
            shown,
            lines,
            own,
            source_len: text.len(),
        }
    }

    /// The excerpt offset of source offset `pos`, on the last line shown that starts at or
    /// before `anchor`; `end` says whether it ends a place (then a position left out maps
    /// back to the end of the piece before it, else on to the start of the next).
    fn offset(&self, anchor: usize, pos: usize, end: bool) -> usize {
        let k = self.lines.partition_point(|l| l.source_start <= anchor);
        let Some(shown) = k.checked_sub(1).map(|k| &self.lines[k]) else {
            return 0;
        };
        let rel = pos.saturating_sub(shown.source_start);
        let mut before = None;
        for p in &shown.pieces {
            if (p.from..=p.to).contains(&rel) {
                return shown.start + p.at + (rel - p.from);
            }
            if rel < p.from {
                return shown.start
                    + match (end, before) {
                        (true, Some(prev)) => prev,
                        _ => p.at,
                    };
            }
            before = Some(p.at + (p.to - p.from));
        }
        shown.start + before.unwrap_or(0)
    }

    /// A byte range of the excerpt as a char range (past the end stays past it).
    fn chars(&self, r: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let count = |b: usize| match self.text.get(..b) {
            Some(t) => t.chars().count(),
            None => b - self.text.len() + self.text.chars().count(),
        };
        count(r.start)..count(r.end)
    }

    /// A span of the source as a byte range of the excerpt.
    fn map(&self, s: Span) -> std::ops::Range<usize> {
        let (start, end) = (s.start as usize, s.end as usize);
        if start > self.source_len {
            // Past the end: ariadne leaves such a label out, in the excerpt as well.
            let past = self.text.len() + 1;
            return past..past.max(end - start + past);
        }
        let a = self.offset(start, start, false);
        if end <= start {
            return a..a;
        }
        let last = (end - 1).min(self.source_len);
        let b = self.offset(last, end.min(self.source_len), true);
        a..b.max(a)
    }
}

/// The byte windows (relative to the line start, on char boundaries, sorted and apart) kept
/// of a long line `l`: around the start of each place on it, and around the end of each
/// place over several lines that ends on it.
fn windows(
    content: &str,
    line_start: usize,
    content_len: usize,
    places: &[Span],
    index: &Lines,
    l: usize,
) -> Vec<(usize, usize)> {
    let mut wanted: Vec<(usize, usize)> = Vec::new();
    for p in places {
        let (start, end) = (p.start as usize, p.end as usize);
        if start > index.len {
            continue;
        }
        let first = index.line_of(start);
        let last = if end > start {
            index.line_of((end - 1).min(index.len))
        } else {
            first
        };
        let rel = |pos: usize| pos.saturating_sub(line_start).min(content_len);
        if first == l {
            let s = rel(start);
            let e = if last == l { rel(end) } else { content_len };
            wanted.push((s.saturating_sub(CONTEXT), e.min(s + PLACE_KEPT) + CONTEXT));
        }
        if last == l && first != l {
            let e = rel(end);
            wanted.push((e.saturating_sub(PLACE_KEPT + CONTEXT), e + CONTEXT));
        }
    }
    wanted.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (a, b) in wanted {
        let a = floor_boundary(content, a.min(content_len));
        let b = ceil_boundary(content, b.min(content_len));
        match merged.last_mut() {
            // Windows closer than an ellipsis would save are joined.
            Some(last) if a <= last.1 + ELLIPSIS.len() * 4 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    if merged.is_empty() {
        merged.push((0, floor_boundary(content, LONG_LINE.min(content_len))));
    }
    merged
}

/// Ariadne's rendering of the excerpts with the source's line numbers and `file:line:col`
/// headers put back: `headers` pairs each header as the excerpt has it with the source's.
fn restore_places(text: &str, excerpts: &[Excerpt], headers: &[(String, String)]) -> String {
    let widest = excerpts
        .iter()
        .filter_map(|e| e.shown.iter().flatten().max())
        .max()
        .map_or(1, |l| l + 1);
    let mut out = String::with_capacity(text.len());
    // The margin width ariadne chose: the spaces before the first header's corner, less 2.
    let Some(from_width) = text
        .lines()
        .find(|l| l.contains('╭'))
        .map(|l| l.chars().take_while(|c| *c == ' ').count().saturating_sub(2))
    else {
        return text.to_string();
    };
    let to_width = digits(widest).max(from_width);
    // Which excerpt the rows come from: each group header names its file.
    let mut current: Option<&Excerpt> = excerpts.first();
    let mut seen_header = false;
    for line in text.split_inclusive('\n') {
        if !seen_header && !line.contains('╭') {
            // The `[CODE] Error: message` line(s).
            out.push_str(line);
            continue;
        }
        seen_header = true;
        let mut line = line.to_string();
        if line.contains('╭') || line.contains('├') {
            if let Some((from, to)) = headers.iter().find(|(from, _)| line.contains(from.as_str())) {
                line = line.replacen(from.as_str(), to, 1);
            }
            if let Some(e) = excerpts.iter().find(|e| line.contains(&format!(" {}:", e.name))) {
                current = Some(e);
            }
        }
        out.push_str(&renumber(&line, from_width, to_width, current));
    }
    out
}

fn digits(n: usize) -> usize {
    n.max(1).to_string().len()
}

/// One rendered line with its margin widened from `from` to `to` columns and its line
/// number (if it has one) put back to the source's. A line not shaped like a margin row
/// (` NN │`, `   ┆`, `   ╭─[`, `───╯`) is left as it is.
fn renumber(line: &str, from: usize, to: usize, excerpt: Option<&Excerpt>) -> String {
    // Visible chars and escape sequences (colour), in order.
    let mut tokens: Vec<(bool, String)> = Vec::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            let mut esc = String::from(c);
            for d in chars.by_ref() {
                esc.push(d);
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            tokens.push((false, esc));
        } else {
            tokens.push((true, c.to_string()));
        }
    }
    let visible: Vec<usize> = (0..tokens.len()).filter(|&i| tokens[i].0).collect();
    if visible.len() < from + 3 {
        return line.to_string();
    }
    let prefix: Vec<char> = (0..from + 2)
        .filter_map(|k| tokens[visible[k]].1.chars().next())
        .collect();
    let bar = tokens[visible[from + 2]].1.chars().next().unwrap_or(' ');
    let widened = if prefix.iter().all(|c| *c == '─') {
        "─".repeat(to + 2)
    } else {
        let field: String = prefix[1..=from].iter().collect();
        let number = field.trim_start();
        let shaped = prefix[0] == ' '
            && prefix[from + 1] == ' '
            && number.chars().all(|c| c.is_ascii_digit())
            && "│┆╭├".contains(bar);
        if !shaped {
            return line.to_string();
        }
        let shown = match number.parse::<usize>() {
            Ok(n) => excerpt
                .and_then(|e| e.shown.get(n.wrapping_sub(1)).copied().flatten())
                .map_or(n, |l| l + 1)
                .to_string(),
            Err(_) => String::new(),
        };
        format!(" {shown:>to$} ")
    };
    // The new prefix takes the place of the old one's first char and of its last; the
    // escapes among the old one stay where they were.
    let (first, last) = (visible[0], visible[from + 1]);
    let mut widened = widened.chars();
    let mut out = String::new();
    for (i, (is_char, t)) in tokens.iter().enumerate() {
        if !is_char || i > last {
            out.push_str(t);
        } else if i == first {
            out.extend(widened.next());
        } else if i == last {
            out.extend(widened.by_ref());
        }
    }
    out
}

/// Renders diagnostics as a JSON array for tools: code, severity, message, file, 1-based
/// line and column, byte span, labels, notes and help. Every diagnostic is listed.
pub fn to_json(diags: &[Diagnostic], sources: &SourceMap) -> Value {
    let mut lines: HashMap<SourceId, Lines> = HashMap::new();
    let mut place = |span: Span| {
        let text = &sources.get(span.source).text;
        let index = lines
            .entry(span.source)
            .or_insert_with(|| Lines::new(text, Breaks::Newline));
        let offset = (span.start as usize).min(text.len());
        let line = index.line_of(offset);
        let column = index.column(text, line, offset);
        json!({
            "file": sources.get(span.source).name,
            "line": line + 1,
            "column": column + 1,
            "start": span.start,
            "end": span.end,
        })
    };
    Value::Array(
        diags
            .iter()
            .map(|d| {
                let span = d.span.map(&mut place);
                let labels: Vec<Value> = d
                    .labels
                    .iter()
                    .map(|l| json!({"span": place(l.span), "message": l.message}))
                    .collect();
                json!({
                    "code": d.code.as_str(),
                    "severity": match d.severity { Severity::Error => "error", Severity::Warning => "warning" },
                    "message": d.message,
                    "span": span,
                    "label": d.primary_label,
                    "labels": labels,
                    "notes": d.notes,
                    "help": d.help,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::Code;
    use crate::source::SourceMap;

    /// Ariadne on the whole source: what the excerpts must render like.
    fn whole(d: &Diagnostic, sources: &SourceMap, colour: bool) -> String {
        let Some(span) = d.span else {
            return render_without_place(d);
        };
        let kind = match d.severity {
            Severity::Error => ReportKind::Error,
            Severity::Warning => ReportKind::Warning,
        };
        let name = |id| sources.get(id).name.clone();
        let config = Config::default()
            .with_index_type(IndexType::Char)
            .with_color(colour);
        let chars = |s: Span| {
            let text = &sources.get(s.source).text;
            text[..s.start as usize].chars().count()..text[..s.end as usize].chars().count()
        };
        let span_range = chars(span);
        let mut report = Report::build(kind, (name(span.source), span_range.clone()))
            .with_config(config)
            .with_code(d.code)
            .with_message(&d.message);
        let mut primary = Label::new((name(span.source), span_range)).with_order(0);
        if let Some(msg) = &d.primary_label {
            primary = primary.with_message(msg);
        }
        report = report.with_label(primary);
        for (i, l) in d.labels.iter().enumerate() {
            report = report.with_label(
                Label::new((name(l.span.source), chars(l.span)))
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
        report.finish().write(cache, &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn excerpted(d: &Diagnostic, sources: &SourceMap, colour: bool) -> String {
        render_one(d, sources, &mut HashMap::new(), colour)
    }

    /// xorshift64*, for reproducible spans.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1) as u64) as usize
        }
    }

    fn boundary_below(text: &str, n: usize, rng: &mut Rng) -> usize {
        floor_boundary(text, rng.below(n + 1))
    }

    #[test]
    fn excerpts_render_like_the_whole_source() {
        let texts = [
            "model a = \"x\"\nmodel b = \"y\"\n\nlet c = a + b\nsave c to \"out\"\n",
            "line one\r\nline two é\r\n\r\nline four\rline five\u{2028}six\x0Cseven\n",
            "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\nk\nl\nm\nn\no\np\nq\n",
            "no final newline\nsecond",
            "\n\n\n",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for text in texts {
            let mut long = String::new();
            for i in 0..120 {
                long.push_str(&format!("line {i} {}\n", "x".repeat(i % 7)));
            }
            for t in [text.to_string(), long] {
                let mut sources = SourceMap::new();
                let a = sources.add("first.merge", None, t.clone());
                let b = sources.add("second.yml", None, "key: value\nother: [1, 2]\n");
                for case in 0..400 {
                    let span = |rng: &mut Rng| {
                        let (id, text) = if rng.below(4) == 0 {
                            (b, "key: value\nother: [1, 2]\n".to_string())
                        } else {
                            (a, t.clone())
                        };
                        let x = boundary_below(&text, text.len(), rng);
                        let y = boundary_below(&text, text.len(), rng);
                        Span::new(id, x.min(y), x.max(y))
                    };
                    let mut d =
                        Diagnostic::error(Code::E0201, format!("case {case}")).at(span(&mut rng), "here");
                    for k in 0..rng.below(4) {
                        d = d.with_label(span(&mut rng), format!("label {k}"));
                    }
                    if rng.below(2) == 0 {
                        d = d.with_help("some help").with_note("a note\nover two lines");
                    }
                    let colour = case % 3 == 0;
                    assert_eq!(
                        excerpted(&d, &sources, colour),
                        whole(&d, &sources, colour),
                        "{d:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn places_at_and_past_the_end() {
        for text in ["a\nb\n", "a\nb", ""] {
            let mut sources = SourceMap::new();
            let id = sources.add("end.merge", None, text);
            let len = text.len();
            for (start, end) in [(len, len), (len.saturating_sub(1), len), (0, len)] {
                let d = Diagnostic::error(Code::E0101, "at the end").at(Span::new(id, start, end), "here");
                assert_eq!(
                    excerpted(&d, &sources, false),
                    whole(&d, &sources, false),
                    "{text:?} {start}..{end}"
                );
            }
            // Past the end: no panic, the label left out.
            let d = Diagnostic::error(Code::E0101, "past")
                .at(Span::new(id, 0, len.min(1)), "here")
                .with_label(Span::new(id, len + 3, len + 5), "nowhere");
            assert!(excerpted(&d, &sources, false).contains("past"));
        }
    }

    #[test]
    fn long_lines_are_cut_around_the_places() {
        let line = format!("let x = {}", "1 + ".repeat(5000));
        let text = format!("# first\n{line}\n");
        let mut sources = SourceMap::new();
        let id = sources.add("long.merge", None, text.clone());
        let at = 8 + 4 * 4000;
        let d = Diagnostic::error(Code::E0103, "too deep")
            .at(Span::new(id, at, at + 1), "here")
            .with_label(Span::new(id, 8, 9), "starts here");
        let shown = excerpted(&d, &sources, false);
        assert!(shown.len() < 2000, "{shown}");
        assert!(shown.contains("long.merge:2:16001"), "{shown}");
        assert!(shown.contains(" 2 │ let x = 1 + 1"), "{shown}");
        assert!(shown.contains(" + 1…1 + 1"), "{shown}");
        assert!(shown.contains("…\n"), "{shown}");
        // Coloured, the same bounds hold.
        let coloured = excerpted(&d, &sources, true);
        assert!(coloured.len() < 4000);
        assert!(coloured.contains("long.merge:2:16001"), "{coloured}");
    }

    #[test]
    fn line_numbers_are_the_files_own() {
        let text: String = (1..=12_345).map(|i| format!("line {i}\n")).collect();
        let mut sources = SourceMap::new();
        let id = sources.add("many.merge", None, text.clone());
        let start = text.find("line 12000\n").unwrap();
        let early = text.find("line 7\n").unwrap();
        let d = Diagnostic::error(Code::E0201, "far down")
            .at(Span::new(id, start, start + 4), "here")
            .with_label(Span::new(id, early, early + 4), "and here");
        assert_eq!(excerpted(&d, &sources, false), whole(&d, &sources, false));
        let coloured = excerpted(&d, &sources, true);
        assert!(coloured.contains("12000"), "{coloured}");
    }

    #[test]
    fn at_most_so_many_are_shown() {
        let mut sources = SourceMap::new();
        let id = sources.add("x.merge", None, "save x to \"o\"\n");
        let mut diags: Vec<Diagnostic> = (0..MAX_SHOWN + 7)
            .map(|_| {
                Diagnostic::error(Code::E0201, "unknown name `x`").at(Span::new(id, 5, 6), "not defined")
            })
            .collect();
        diags.push(Diagnostic::error(Code::W0001, "unused").at(Span::new(id, 0, 4), "never used"));
        let text = render_text(&diags, &sources, false);
        assert_eq!(text.matches("[E0201]").count(), MAX_SHOWN);
        assert!(text.ends_with(
            "and 7 more errors and 1 more warning (only the first 100 diagnostics are shown; `--format json` lists them all)\n"
        ));
        assert_eq!(to_json(&diags, &sources).as_array().unwrap().len(), diags.len());
    }

    #[test]
    fn json_columns_count_chars() {
        let line = format!("é{}", "a".repeat(10_000));
        let text = format!("x\n{line}\n");
        let mut sources = SourceMap::new();
        let id = sources.add("x.merge", None, text.clone());
        for at in [2, 4, 100, 4097, 4100, 9000, 10_002] {
            let d = Diagnostic::error(Code::E0201, "x").at(Span::new(id, at, at), "");
            let json = to_json(&[d], &sources);
            assert_eq!(json[0]["span"]["line"], 2);
            assert_eq!(
                json[0]["span"]["column"],
                (text[2..at].chars().count() + 1) as u64,
                "{at}"
            );
            let (l, c) = sources.line_col(id, at as u32);
            assert_eq!(
                (
                    json[0]["span"]["line"].as_u64(),
                    json[0]["span"]["column"].as_u64()
                ),
                (Some(l as u64), Some(c as u64))
            );
        }
    }
}
