//! Stage 4, optimize: rewrite the graph without changing any result; the graph is
//! re-verified after every pass.
//!
//! Passes, in order: common subexpressions ([`cse`]), then dead code ([`dce`]). Element-wise
//! chains need no separate fusion pass here: the planner turns each stored tensor's whole
//! expression into one fused kernel (see `plan::kernel`).

mod cse;
mod dce;

use crate::diag::Diagnostic;
use crate::graph::{verify, Graph};

/// What a pass did, for `mergec debug opt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassReport {
    pub pass: &'static str,
    pub removed_nodes: usize,
}

/// A pass rewrites the graph in place and says how many nodes it removed.
type Pass = fn(&mut Graph) -> usize;

pub fn optimize(mut graph: Graph) -> Result<(Graph, Vec<PassReport>), Box<Diagnostic>> {
    let mut reports = Vec::new();
    let passes: [(&'static str, Pass); 2] = [("cse", cse::run), ("dce", dce::run)];
    for (pass, run) in passes {
        let removed_nodes = run(&mut graph);
        verify(&graph).map_err(|d| Box::new(Diagnostic::bug(format!("after pass {pass}: {}", d.message))))?;
        reports.push(PassReport { pass, removed_nodes });
    }
    Ok((graph, reports))
}
