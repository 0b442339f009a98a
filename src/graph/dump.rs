//! A stable text form of the graph for `mergec debug graph` and snapshots.

use std::fmt::Write;

use super::{Graph, Op};
use crate::ops::Elementwise;

pub fn dump(g: &Graph) -> String {
    let mut out = String::new();
    let order = petgraph::algo::toposort(&g.nodes, None).unwrap_or_default();
    for n in order {
        let node = &g.nodes[n];
        let operands: Vec<String> = g.operands(n).iter().map(|o| format!("n{}", o.index())).collect();
        let detail = match &node.op {
            Op::Load {
                model,
                tensor,
                dtype,
                gather,
            } => match gather {
                Some(g) => format!(" {model}:{tensor} {dtype} rows {}", g.plan.len()),
                None => format!(" {model}:{tensor} {dtype}"),
            },
            Op::Elementwise(Elementwise::WeightedSum { weights, divisor }) => {
                format!(" w={weights:?} div={divisor:?}")
            }
            Op::Elementwise(op) => op.constants().iter().map(|c| format!(" {c}")).collect(),
            Op::Store {
                output,
                tensor,
                dtype,
            } => format!(" out{output}:{tensor} {dtype}"),
            Op::Method { op, compute, .. } => match compute.half() {
                Some(h) => format!(" {op:?} compute={}", h.name()),
                None => format!(" {op:?}"),
            },
        };
        let _ = writeln!(
            out,
            "n{} = {}({}){} {:?}",
            n.index(),
            node.op.name(),
            operands.join(", "),
            detail,
            node.shape
        );
    }
    out
}
