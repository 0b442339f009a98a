//! Graph invariants, checked after lowering and after every optimisation pass.

use petgraph::Direction;

use super::{Graph, Op};
use crate::diag::Diagnostic;
use crate::ops::MethodOp;

/// Acyclic; every op has its arity and operands of its shape; loads have no inputs;
/// stores feed nothing; every listed store exists and is a store.
pub fn verify(g: &Graph) -> Result<(), Box<Diagnostic>> {
    if petgraph::algo::is_cyclic_directed(&g.nodes) {
        return Err(bug("graph has a cycle"));
    }
    for n in g.nodes.node_indices() {
        let node = &g.nodes[n];
        let operands = g.operands(n);
        if node.op.arity() != Some(operands.len()) {
            return Err(bug(format!(
                "{} node {} has {} operands",
                node.op.name(),
                n.index(),
                operands.len()
            )));
        }
        if let Op::Method {
            op: MethodOp::LowRank { rank, transpose, .. },
            ..
        } = &node.op
        {
            let factors = crate::ops::lowrank::factor_shapes(&node.shape, *rank, *transpose);
            let given: Vec<&[usize]> = operands.iter().map(|o| g.nodes[*o].shape.as_slice()).collect();
            match factors {
                Some((b, a)) if given == [&b[..], &a[..]] => {}
                _ => {
                    return Err(bug(format!(
                        "low_rank node {} has factors of the wrong shapes",
                        n.index()
                    )))
                }
            }
        }
        for o in &operands {
            if matches!(
                node.op,
                Op::Method {
                    op: MethodOp::LowRank { .. },
                    ..
                }
            ) {
                continue;
            }
            if g.nodes[*o].shape != node.shape {
                return Err(bug(format!("{} node {} mixes shapes", node.op.name(), n.index())));
            }
            if matches!(g.nodes[*o].op, Op::Store { .. }) {
                return Err(bug(format!("store feeds node {}", n.index())));
            }
        }
        let mut users = g.nodes.neighbors_directed(n, Direction::Outgoing);
        if !matches!(node.op, Op::Store { .. }) && users.next().is_none() {
            return Err(bug(format!(
                "{} node {} is never used",
                node.op.name(),
                n.index()
            )));
        }
    }
    for stores in &g.stores {
        for s in stores {
            match g.nodes.node_weight(*s).map(|n| &n.op) {
                Some(Op::Store { .. }) => {}
                _ => return Err(bug("a listed store is missing")),
            }
        }
    }
    Ok(())
}

fn bug(message: impl Into<String>) -> Box<Diagnostic> {
    Box::new(Diagnostic::bug(message))
}
