//! `mergec lsp`: a language server over stdio for `.merge` scripts and mergekit YAML
//! configs. Diagnostics on open and on every change (model headers are read once and kept,
//! so typing stays fast), hover docs from the method registry, completion of methods,
//! parameters, bindings and tensor-name patterns, go to a binding's definition.

mod analysis;

use std::collections::HashMap;
use std::path::PathBuf;

use lsp_server::{Connection, Message, Notification, Request, Response};
use lsp_types::notification::{
    DidChangeTextDocument, DidCloseTextDocument, DidOpenTextDocument, Notification as _, PublishDiagnostics,
};
use lsp_types::request::{Completion, GotoDefinition, HoverRequest, Request as _};
use lsp_types::{
    CompletionItem, CompletionItemKind, CompletionOptions, CompletionResponse, Diagnostic,
    DiagnosticSeverity, Documentation, GotoDefinitionResponse, Hover, HoverContents, HoverProviderCapability,
    Location, MarkupContent, MarkupKind, NumberOrString, OneOf, Position, PublishDiagnosticsParams, Range,
    ServerCapabilities, TextDocumentPositionParams, TextDocumentSyncCapability, TextDocumentSyncKind, Uri,
};

use analysis::{HeaderCache, Item, Lang};

/// Serves one client on stdin/stdout until it asks to exit.
pub fn serve() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (connection, io) = Connection::stdio();
    let capabilities = ServerCapabilities {
        text_document_sync: Some(TextDocumentSyncCapability::Kind(TextDocumentSyncKind::FULL)),
        hover_provider: Some(HoverProviderCapability::Simple(true)),
        completion_provider: Some(CompletionOptions {
            trigger_characters: Some(["(", "{", "\"", ",", " "].map(String::from).to_vec()),
            ..CompletionOptions::default()
        }),
        definition_provider: Some(OneOf::Left(true)),
        ..ServerCapabilities::default()
    };
    connection.initialize(serde_json::to_value(capabilities)?)?;
    let mut server = Server {
        connection,
        documents: HashMap::new(),
        cache: HeaderCache::default(),
    };
    server.run()?;
    drop(server);
    io.join()?;
    Ok(())
}

struct Server {
    connection: Connection,
    documents: HashMap<Uri, String>,
    cache: HeaderCache,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

impl Server {
    fn run(&mut self) -> Result<(), Error> {
        while let Ok(message) = self.connection.receiver.recv() {
            match message {
                Message::Request(req) => {
                    if self.connection.handle_shutdown(&req)? {
                        return Ok(());
                    }
                    let response = self.request(req);
                    self.connection.sender.send(Message::Response(response))?;
                }
                Message::Notification(n) => {
                    // A malformed notification is the client's bug; the session goes on.
                    if let Err(e) = self.notification(n) {
                        eprintln!("mergec lsp: {e}");
                    }
                }
                Message::Response(_) => {}
            }
        }
        Ok(())
    }

    fn notification(&mut self, n: Notification) -> Result<(), Error> {
        match n.method.as_str() {
            DidOpenTextDocument::METHOD => {
                let p: lsp_types::DidOpenTextDocumentParams = serde_json::from_value(n.params)?;
                self.documents
                    .insert(p.text_document.uri.clone(), p.text_document.text);
                self.publish(&p.text_document.uri)
            }
            DidChangeTextDocument::METHOD => {
                let p: lsp_types::DidChangeTextDocumentParams = serde_json::from_value(n.params)?;
                // Full sync: the last change is the whole text.
                if let Some(change) = p.content_changes.into_iter().last() {
                    self.documents.insert(p.text_document.uri.clone(), change.text);
                }
                self.publish(&p.text_document.uri)
            }
            DidCloseTextDocument::METHOD => {
                let p: lsp_types::DidCloseTextDocumentParams = serde_json::from_value(n.params)?;
                self.documents.remove(&p.text_document.uri);
                self.send_diagnostics(p.text_document.uri, Vec::new())
            }
            _ => Ok(()),
        }
    }

    fn request(&mut self, req: Request) -> Response {
        let id = req.id.clone();
        let result = match req.method.as_str() {
            HoverRequest::METHOD => self.with_position(req, |_, _, text, at| {
                analysis::hover(text, at).map(|(markdown, start, end)| Hover {
                    contents: HoverContents::Markup(MarkupContent {
                        kind: MarkupKind::Markdown,
                        value: markdown,
                    }),
                    range: Some(range(text, start, end)),
                })
            }),
            Completion::METHOD => self.with_position(req, |s, path, text, at| {
                let items = analysis::complete(&path, text, at, Lang::of(&path), &mut s.cache);
                Some(CompletionResponse::Array(
                    items.into_iter().map(completion_item).collect(),
                ))
            }),
            GotoDefinition::METHOD => {
                let uri = position_params(&req).map(|p| p.text_document.uri);
                self.with_position(req, |_, _, text, at| {
                    let (word, _, _) = analysis::word_at(text, at)?;
                    let (start, end) = analysis::definition(text, word)?;
                    Some(GotoDefinitionResponse::Scalar(Location {
                        uri: uri.clone()?,
                        range: range(text, start, end),
                    }))
                })
            }
            _ => {
                return Response::new_err(
                    id,
                    lsp_server::ErrorCode::MethodNotFound as i32,
                    format!("unsupported request `{}`", req.method),
                )
            }
        };
        match result {
            Ok(value) => Response::new_ok(id, value),
            Err(e) => Response::new_err(id, lsp_server::ErrorCode::InvalidParams as i32, e.to_string()),
        }
    }

    /// Runs `f` on the document and byte offset a position request names; its answer, or
    /// null, is the result.
    fn with_position<T: serde::Serialize>(
        &mut self,
        req: Request,
        f: impl FnOnce(&mut Server, PathBuf, &str, usize) -> Option<T>,
    ) -> Result<serde_json::Value, Error> {
        let p = position_params(&req).ok_or("expected a text document position")?;
        let Some(text) = self.documents.get(&p.text_document.uri).cloned() else {
            return Ok(serde_json::Value::Null);
        };
        let at = offset(&text, p.position);
        let answer = f(self, uri_path(&p.text_document.uri), &text, at);
        Ok(serde_json::to_value(answer)?)
    }

    fn publish(&mut self, uri: &Uri) -> Result<(), Error> {
        let Some(text) = self.documents.get(uri) else {
            return Ok(());
        };
        let path = uri_path(uri);
        let found = analysis::diagnostics(&path, text, Lang::of(&path), &mut self.cache);
        let diagnostics = found
            .into_iter()
            .map(|(d, start, end)| lsp_diagnostic(d, range(text, start, end)))
            .collect();
        self.send_diagnostics(uri.clone(), diagnostics)
    }

    fn send_diagnostics(&self, uri: Uri, diagnostics: Vec<Diagnostic>) -> Result<(), Error> {
        let params = PublishDiagnosticsParams {
            uri,
            diagnostics,
            version: None,
        };
        let n = Notification::new(PublishDiagnostics::METHOD.to_string(), params);
        self.connection.sender.send(Message::Notification(n))?;
        Ok(())
    }
}

fn position_params(req: &Request) -> Option<TextDocumentPositionParams> {
    serde_json::from_value(req.params.clone()).ok()
}

fn lsp_diagnostic(d: crate::diag::Diagnostic, range: Range) -> Diagnostic {
    let mut message = d.message.clone();
    if let Some(label) = &d.primary_label {
        message.push_str(&format!(": {label}"));
    }
    for note in &d.notes {
        message.push_str(&format!("\nnote: {note}"));
    }
    for help in &d.help {
        message.push_str(&format!("\nhelp: {help}"));
    }
    Diagnostic {
        range,
        severity: Some(if d.is_error() {
            DiagnosticSeverity::ERROR
        } else {
            DiagnosticSeverity::WARNING
        }),
        code: Some(NumberOrString::String(d.code.as_str().to_string())),
        source: Some("mergec".to_string()),
        message,
        ..Diagnostic::default()
    }
}

fn completion_item(item: Item) -> CompletionItem {
    let (label, kind, doc, insert) = match item {
        Item::Method(name, doc) => (name.to_string(), CompletionItemKind::FUNCTION, Some(doc), None),
        Item::Param(name, doc) => (
            name.to_string(),
            CompletionItemKind::PROPERTY,
            Some(doc),
            Some(format!("{name}: ")),
        ),
        Item::Binding(name) => (name, CompletionItemKind::VARIABLE, None, None),
        Item::Pattern(p) => (p, CompletionItemKind::VALUE, None, None),
        Item::Keyword(k) => (k.to_string(), CompletionItemKind::KEYWORD, None, None),
    };
    CompletionItem {
        label,
        kind: Some(kind),
        documentation: doc.map(|value| {
            Documentation::MarkupContent(MarkupContent {
                kind: MarkupKind::Markdown,
                value,
            })
        }),
        insert_text: insert,
        ..CompletionItem::default()
    }
}

/// The file a `file://` URI names (percent escapes decoded).
fn uri_path(uri: &Uri) -> PathBuf {
    let text = uri.as_str();
    let path = text.strip_prefix("file://").unwrap_or(text);
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// The byte offset of an LSP position (a line and a UTF-16 column).
fn offset(text: &str, pos: Position) -> usize {
    let mut line_start = 0;
    for _ in 0..pos.line {
        match text[line_start..].find('\n') {
            Some(i) => line_start += i + 1,
            None => return text.len(),
        }
    }
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    let mut units = 0;
    for (i, c) in text[line_start..line_end].char_indices() {
        if units >= pos.character as usize {
            return line_start + i;
        }
        units += c.len_utf16();
    }
    line_end
}

/// The LSP position of a byte offset.
fn position(text: &str, at: usize) -> Position {
    let at = at.min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let character: usize = text[line_start..at].chars().map(char::len_utf16).sum();
    Position::new(line as u32, character as u32)
}

fn range(text: &str, start: usize, end: usize) -> Range {
    Range::new(position(text, start), position(text, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_utf16_units() {
        let text = "a = \"é𝄞\"\nmodel x";
        let at = text.find('x').unwrap_or(0);
        assert_eq!(position(text, at), Position::new(1, 6));
        assert_eq!(offset(text, Position::new(1, 6)), at);
        let quote = text.rfind('"').unwrap_or(0);
        assert_eq!(position(text, quote), Position::new(0, 8));
        assert_eq!(offset(text, Position::new(0, 8)), quote);
    }

    #[test]
    fn file_uris_become_paths() {
        let uri: Uri = "file:///tmp/my%20dir/x.merge"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(uri_path(&uri), PathBuf::from("/tmp/my dir/x.merge"));
    }
}
