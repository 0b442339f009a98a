//! Stage 4, optimize: rewrite the graph without changing any result; the graph is
//! re-verified after every pass.
//!
//! Passes, in order: dead code ([`dce`], so every later pass sees only live nodes),
//! constant folding of per-tensor parameters ([`fold`]: identities such as `x * 1` go,
//! exact cheaper forms of constants), common subexpressions ([`cse`], after folding so
//! terms that fold alike are shared), and dead code again. Element-wise chains need no
//! separate fusion pass here: the planner turns each stored tensor's whole expression into
//! one fused kernel (see `plan::kernel`), and a tensor stored unchanged in its own dtype
//! becomes a raw copy.
//!
//! Imports: `graph`, the leaf modules `ids`, `io`, `ops`, `diag`.

mod cse;
mod dce;
mod fold;

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
    let passes: [(&'static str, Pass); 4] = [
        ("dce", dce::run),
        ("fold", fold::run),
        ("cse", cse::run),
        ("dce", dce::run),
    ];
    for (pass, run) in passes {
        let removed_nodes = run(&mut graph);
        verify(&graph).map_err(|d| Box::new(Diagnostic::bug(format!("after pass {pass}: {}", d.message))))?;
        reports.push(PassReport { pass, removed_nodes });
    }
    Ok((graph, reports))
}
