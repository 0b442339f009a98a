//! Stage 1, parse: source text -> [`ast::Script`], a span on every node (diagnostics E01xx).
//!
//! Imports: `diag`, `source` only.

pub mod ast;
mod parser;
mod pest_error;

use crate::diag::Diagnostics;
use crate::source::{SourceId, SourceMap};

/// Parses one source file of `sources` into a script.
pub fn parse(sources: &SourceMap, id: SourceId) -> Result<ast::Script, Diagnostics> {
    parser::parse_script(&sources.get(id).text, id)
}
