//! A YAML document tree with byte spans, read with `saphyr-parser`'s event stream.
//!
//! Plain scalars are resolved as PyYAML (YAML 1.1, which mergekit uses) resolves them:
//! `yes`/`no`/`on`/`off` are booleans, `~` and the empty scalar are null. Numbers are
//! read leniently: `1e-5` is a number here, where PyYAML would make it a string that
//! pydantic then turns into a number for most fields anyway. Quoted scalars are strings.
//! Anchors, aliases and merge keys (`<<: *anchor`) work as in PyYAML; aliases may expand
//! to at most a million values, so that no file can make the tree blow up.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError};

use crate::diag::{Code, Diagnostic};
use crate::source::{SourceId, Span};

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub value: Value,
    pub span: Span,
    /// The scalar as written (without quotes), for numbers worth keeping verbatim.
    pub raw: String,
}

impl Node {
    /// What kind of value this is, for messages ("a list", "a number").
    pub fn describe(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match &self.value {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Str(s) => parse_number(s.trim()),
            _ => None,
        }
    }
}

/// Every document of `text` (a multi-document stream has several), or the first syntax error.
pub(crate) fn load(text: &str, source: SourceId) -> Result<Vec<Node>, Box<Diagnostic>> {
    let offsets = CharOffsets::new(text);
    let mut events = Vec::new();
    for item in Parser::new_from_str(text) {
        match item {
            Ok((event, span)) => {
                let start = offsets.byte(span.start.index());
                let end = offsets.byte(span.end.index()).max(start);
                events.push((event, Span::new(source, start, end)));
            }
            Err(e) => return Err(Box::new(syntax_error(&e, &offsets, source, text))),
        }
    }
    let mut builder = Builder {
        text,
        events,
        pos: 0,
        anchors: HashMap::new(),
        expanded: 0,
    };
    let mut docs = Vec::new();
    while builder.pos < builder.events.len() {
        let at = builder.pos;
        builder.pos += 1;
        if let Event::DocumentStart(_) = builder.events[at].0 {
            let doc_span = builder.events[at].1;
            let node = match builder.peek_is_document_end() {
                true => Node {
                    value: Value::Null,
                    span: doc_span,
                    raw: String::new(),
                },
                false => builder.node(1)?.0,
            };
            docs.push(node);
        }
    }
    Ok(docs)
}

fn syntax_error(e: &ScanError, offsets: &CharOffsets, source: SourceId, text: &str) -> Diagnostic {
    let start = offsets.byte(e.marker().index());
    // Point at one character (or the end of the file).
    let end = text[start..]
        .chars()
        .next()
        .map_or(start, |c| start + c.len_utf8());
    Diagnostic::error(Code::E0601, format!("YAML syntax error: {}", e.info()))
        .at(Span::new(source, start, end), "here")
        .with_help(
            "mergekit reads the same YAML; check the indentation and the `:` and `-` before this point",
        )
}

struct CharOffsets {
    /// Byte offset of each character, plus the length of the text at the end.
    bytes: Vec<usize>,
}

impl CharOffsets {
    fn new(text: &str) -> CharOffsets {
        let mut bytes: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        bytes.push(text.len());
        CharOffsets { bytes }
    }

    fn byte(&self, char_index: usize) -> usize {
        let last = self.bytes.len() - 1;
        self.bytes[char_index.min(last)]
    }
}

struct Builder<'a> {
    text: &'a str,
    events: Vec<(Event<'a>, Span)>,
    pos: usize,
    /// Each anchored node, with its height.
    anchors: HashMap<usize, (Node, usize)>,
    /// Values added by aliases so far.
    expanded: usize,
}

impl Builder<'_> {
    /// From the opening event to the closing `]`/`}` of a flow collection, or to the end of
    /// the last item of a block collection (its end event sits at the next token).
    fn collection_span(&self, start: Span, last: Option<Span>, end: Span) -> Span {
        let flow = matches!(
            self.text.get(start.range()).and_then(|s| s.chars().next()),
            Some('[' | '{')
        );
        let stop = match (flow, last) {
            (true, _) | (false, None) => end.end,
            (false, Some(l)) => l.end,
        };
        Span {
            end: stop.max(start.start),
            ..start
        }
    }

    fn peek_is_document_end(&self) -> bool {
        matches!(
            self.events.get(self.pos).map(|e| &e.0),
            Some(Event::DocumentEnd) | Some(Event::StreamEnd) | None
        )
    }

    fn unexpected_end(&self) -> Box<Diagnostic> {
        let span = self.events.last().map(|e| e.1);
        let mut d = Diagnostic::error(Code::E0601, "YAML syntax error: the document ends early");
        if let Some(s) = span {
            d = d.at(s, "here");
        }
        Box::new(d)
    }

    /// The node at `depth` (a document is at depth 1), with its height (a scalar is 1 high).
    /// Nodes deeper than [`MAX_DEPTH`] are refused (E0608), aliases included.
    fn node(&mut self, depth: usize) -> Result<(Node, usize), Box<Diagnostic>> {
        let Some((event, span)) = self.events.get(self.pos).cloned() else {
            return Err(self.unexpected_end());
        };
        self.pos += 1;
        if depth > MAX_DEPTH {
            return Err(too_deep(span));
        }
        let mut height = 1;
        let (node, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let forced_string = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !forced_string {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.to_string())
                };
                (
                    Node {
                        value,
                        span,
                        raw: text.to_string(),
                    },
                    anchor,
                )
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                let end = loop {
                    match self.events.get(self.pos) {
                        Some((Event::SequenceEnd, s)) => {
                            let s = *s;
                            self.pos += 1;
                            break s;
                        }
                        Some(_) => {
                            let (item, h) = self.node(depth + 1)?;
                            height = height.max(h + 1);
                            items.push(item);
                        }
                        None => return Err(self.unexpected_end()),
                    }
                };
                let span = self.collection_span(span, items.last().map(|n| n.span), end);
                (
                    Node {
                        value: Value::Seq(items),
                        span,
                        raw: String::new(),
                    },
                    anchor,
                )
            }
            Event::MappingStart(anchor, _) => {
                let mut entries = Vec::new();
                let end = loop {
                    match self.events.get(self.pos) {
                        Some((Event::MappingEnd, s)) => {
                            let s = *s;
                            self.pos += 1;
                            break s;
                        }
                        Some(_) => {
                            let (key, hk) = self.node(depth + 1)?;
                            let (value, hv) = self.node(depth + 1)?;
                            height = height.max(hk.max(hv) + 1);
                            entries.push((key, value));
                        }
                        None => return Err(self.unexpected_end()),
                    }
                };
                let span = self.collection_span(span, entries.last().map(|(_, v)| v.span), end);
                let entries = merge_keys(self.text, entries)?;
                (
                    Node {
                        value: Value::Map(entries),
                        span,
                        raw: String::new(),
                    },
                    anchor,
                )
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some((_, h)) if depth + h - 1 > MAX_DEPTH => return Err(too_deep(span)),
                Some((n, h)) => {
                    height = *h;
                    // Aliases of aliases grow a tree exponentially ("billion laughs").
                    self.expanded += size(n);
                    if self.expanded > MAX_EXPANDED {
                        return Err(Box::new(
                            Diagnostic::error(
                                Code::E0601,
                                "YAML syntax error: the aliases expand to too large a document",
                            )
                            .at(span, "this alias")
                            .with_help(format!(
                                "a config's aliases expand to at most {MAX_EXPANDED} values"
                            )),
                        ));
                    }
                    (Node { span, ..n.clone() }, 0)
                }
                None => {
                    return Err(Box::new(
                        Diagnostic::error(Code::E0601, "YAML syntax error: unknown alias").at(span, "here"),
                    ))
                }
            },
            _ => return Err(self.unexpected_end()),
        };
        if anchor != 0 {
            self.anchors.insert(anchor, (node.clone(), height));
        }
        Ok((node, height))
    }
}

/// The deepest a YAML value may be nested (a top-level key is 2 deep): reading the tree
/// and translating it recurse once per level. mergekit configs nest a few levels.
pub(crate) const MAX_DEPTH: usize = 64;

fn too_deep(span: Span) -> Box<Diagnostic> {
    Box::new(
        Diagnostic::error(Code::E0608, "the YAML is nested too deeply")
            .at(span, format!("more than {MAX_DEPTH} levels deep here"))
            .with_help("a mergekit config nests a few levels: `slices`, `sources`, `parameters`, a value"),
    )
}

/// The most values the aliases of one file may expand to.
const MAX_EXPANDED: usize = 1_000_000;

/// The number of values in a node.
fn size(n: &Node) -> usize {
    match &n.value {
        Value::Seq(items) => 1 + items.iter().map(size).sum::<usize>(),
        Value::Map(entries) => 1 + entries.iter().map(|(k, v)| size(k) + size(v)).sum::<usize>(),
        _ => 1,
    }
}

/// PyYAML's merge keys: `<<: *anchor` (or a list of them) adds the anchored mapping's
/// entries that the mapping does not set itself; of several, the first one's win.
fn merge_keys(text: &str, entries: Vec<(Node, Node)>) -> Result<Vec<(Node, Node)>, Box<Diagnostic>> {
    // Plain `<<` only: a quoted one is an ordinary key.
    let is_merge = |k: &Node| k.raw == "<<" && text.get(k.span.range()) == Some("<<");
    if !entries.iter().any(|(k, _)| is_merge(k)) {
        return Ok(entries);
    }
    let mut own = Vec::new();
    let mut merged: Vec<(Node, Node)> = Vec::new();
    for (k, v) in entries {
        if !is_merge(&k) {
            own.push((k, v));
            continue;
        }
        let maps = match v.value {
            Value::Seq(items) => items,
            _ => vec![v],
        };
        for m in maps {
            let Value::Map(add) = m.value else {
                return Err(Box::new(
                    Diagnostic::error(Code::E0601, "YAML syntax error: `<<` merges mappings only")
                        .at(m.span, "not a mapping")
                        .with_help("write `<<: *anchor` with an anchor on a mapping"),
                ));
            };
            merged.extend(add);
        }
    }
    let mut out = own;
    for (k, v) in merged {
        if !out.iter().any(|(o, _)| o.value == k.value) {
            out.push((k, v));
        }
    }
    Ok(out)
}

/// PyYAML's implicit types for a plain scalar (numbers read leniently, see the module doc).
fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => return Value::Bool(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => {
            return Value::Bool(false)
        }
        _ => {}
    }
    let clean: String = text.chars().filter(|c| *c != '_').collect();
    let digits = clean.strip_prefix(['-', '+']).unwrap_or(&clean);
    if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
        if let Ok(i) = clean.parse::<i64>() {
            return Value::Int(i);
        }
    }
    if let Some(hex) = digits.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Value::Int(if clean.starts_with('-') { -i } else { i });
        }
    }
    match parse_number(&clean) {
        Some(f) => Value::Float(f),
        None => Value::Str(text.to_string()),
    }
}

/// A decimal number (`0.5`, `.5`, `1e-5`, `-2`), or YAML's `.inf` / `.nan`.
pub(crate) fn parse_number(s: &str) -> Option<f64> {
    match s.to_ascii_lowercase().as_str() {
        ".inf" | "+.inf" => return Some(f64::INFINITY),
        "-.inf" => return Some(f64::NEG_INFINITY),
        ".nan" => return Some(f64::NAN),
        _ => {}
    }
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let first = body.chars().next()?;
    if !(first.is_ascii_digit() || first == '.') {
        return None;
    }
    if !body
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
    {
        return None;
    }
    s.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Node {
        load(text, SourceId(0)).unwrap().remove(0)
    }

    fn entries(n: &Node) -> Vec<(String, Value)> {
        let Value::Map(m) = &n.value else { panic!() };
        m.iter()
            .map(|(k, v)| (k.as_str().unwrap().to_string(), v.value.clone()))
            .collect()
    }

    #[test]
    fn merge_keys_as_pyyaml() {
        let n = one("a: &a {x: 1, y: 2}
b: &b {y: 3, z: 4}
c:
  <<: [*a, *b]
  x: 5
");
        let Value::Map(m) = &n.value else { panic!() };
        let c = entries(&m[2].1);
        assert_eq!(
            c,
            [
                ("x".to_string(), Value::Int(5)),
                ("y".to_string(), Value::Int(2)),
                ("z".to_string(), Value::Int(4)),
            ]
        );
        assert!(load(
            "a: &a 1
b:
  <<: *a
",
            SourceId(0)
        )
        .is_err());
        // A quoted `<<` is an ordinary key.
        assert_eq!(
            entries(&one("'<<': 1
"))[0]
                .0,
            "<<"
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n".to_string();
        for i in 1..9 {
            let p = format!("*a{}", i - 1);
            text.push_str(&format!("a{i}: &a{i} [{}]\n", [p.as_str(); 10].join(", ")));
        }
        let e = load(&text, SourceId(0)).unwrap_err();
        assert!(e.message.contains("too large"), "{}", e.message);
    }

    #[test]
    fn nesting_is_limited_aliases_included() {
        // The document is 1 deep, the value of `a` 2, each list one more: the `1` inside
        // n lists is n + 2 deep.
        let nested = |n: usize| format!("a: {}1{}\n", "[".repeat(n), "]".repeat(n));
        assert!(load(&nested(MAX_DEPTH - 2), SourceId(0)).is_ok());
        let e = load(&nested(MAX_DEPTH - 1), SourceId(0)).unwrap_err();
        assert_eq!(e.code, Code::E0608);
        // An alias is as deep as where it is used plus what it stands for.
        let deep = "[".repeat(MAX_DEPTH - 10) + "1" + &"]".repeat(MAX_DEPTH - 10);
        let ok = format!("a: &x {deep}\nb: *x\n");
        assert!(load(&ok, SourceId(0)).is_ok());
        let used_deeper = format!("a: &x {deep}\nb: [[[[[[[[[[[[*x]]]]]]]]]]]]\n");
        assert_eq!(load(&used_deeper, SourceId(0)).unwrap_err().code, Code::E0608);
    }

    #[test]
    fn scalars_resolve_like_pyyaml() {
        let n = one("a: 1\nb: 0.5\nc: 1e-5\nd: yes\ne: '0.5'\nf: ~\ng: models/x\nh: .5\n");
        let Value::Map(m) = n.value else { panic!() };
        let v: Vec<&Value> = m.iter().map(|(_, v)| &v.value).collect();
        assert_eq!(v[0], &Value::Int(1));
        assert_eq!(v[1], &Value::Float(0.5));
        assert_eq!(v[2], &Value::Float(1e-5));
        assert_eq!(v[3], &Value::Bool(true));
        assert_eq!(v[4], &Value::Str("0.5".into()));
        assert_eq!(v[5], &Value::Null);
        assert_eq!(v[6], &Value::Str("models/x".into()));
        assert_eq!(v[7], &Value::Float(0.5));
    }

    #[test]
    fn spans_are_bytes() {
        let text = "# é comment\nmerge_method: linear\n";
        let n = one(text);
        let Value::Map(m) = n.value else { panic!() };
        let (k, v) = &m[0];
        assert_eq!(&text[k.span.range()], "merge_method");
        assert_eq!(&text[v.span.range()], "linear");
    }

    #[test]
    fn several_documents_and_aliases() {
        let docs = load("a: &x [1, 2]\n---\nb: *x\n", SourceId(0)).unwrap();
        assert_eq!(docs.len(), 2);
        let Value::Map(m) = &docs[1].value else { panic!() };
        assert!(matches!(&m[0].1.value, Value::Seq(s) if s.len() == 2));
    }

    #[test]
    fn syntax_errors_have_a_place() {
        let d = load("models:\n  - model: a\n   parameters: {", SourceId(0)).unwrap_err();
        assert_eq!(d.code, Code::E0601);
        assert!(d.span.is_some());
    }
}
