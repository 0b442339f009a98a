//! Constant folding of per-tensor parameters: arithmetic whose constant makes it an
//! identity is removed, and constants are put in the cheaper form that gives the same bits.
//! Each op states its own identities ([`Elementwise::simplified`](crate::ops::Elementwise::simplified)).
//!
//! Only rewrites that give the same result for every input value, NaN, infinities and
//! signed zeros included, are made:
//! * `x * 1`, `x / 1` and a one-term weighted sum with weight 1 become `x`;
//! * `-(-x)` becomes `x` (negation flips the sign bit, twice is nothing);
//! * a rounding of a rounding to the same dtype, or of an input stored in that dtype,
//!   becomes its operand;
//! * a weighted sum's divisor 1 is dropped (`acc / 1 == acc`);
//! * `x / d` with `d` a power of two whose reciprocal is a normal number becomes
//!   `x * (1/d)`: both are the exact `x·2⁻ᵏ` rounded once.
//!
//! Not folded, because IEEE arithmetic disagrees with the algebra: `x * 0` (NaN and
//! infinities give NaN), `x + 0` (`-0 + 0 = +0`), `x - x`, `x * -1` into `-x` (a NaN's
//! sign), and `(x * a) * b` into `x * (a·b)` (two roundings are not one, and the
//! intermediate can overflow). One documented difference remains: an input's signalling
//! NaN is quieted by arithmetic, so a removed `x * 1` keeps its payload's quiet bit as
//! stored (as a copy of the tensor does).

use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;

use crate::graph::{Graph, Op};
use crate::ops::elementwise::Simplified;

pub(super) fn run(g: &mut Graph) -> usize {
    let Ok(order) = petgraph::algo::toposort(&g.nodes, None) else {
        return 0;
    };
    let mut removed = 0;
    for n in order {
        let Some(node) = g.nodes.node_weight(n) else {
            continue; // removed as a dead operand of an earlier rewrite
        };
        let operands = g.operands(n);
        let Some(&first) = operands.first() else {
            continue;
        };
        let Op::Elementwise(op) = &node.op else {
            continue;
        };
        let rewrite = match op.simplified() {
            Simplified::Identity => Rewrite::Bypass(first),
            Simplified::Replace(op) => Rewrite::Replace(Op::Elementwise(op)),
            Simplified::Keep => match &g.nodes[first].op {
                // `f(f(x))` is `x` for an involution (`-(-x)`).
                Op::Elementwise(inner) if op.is_involution() && inner == op => {
                    match g.operands(first).first() {
                        Some(&inner) => Rewrite::Bypass(inner),
                        None => Rewrite::Keep,
                    }
                }
                // `f(f(x))` is `f(x)` for a rounding.
                Op::Elementwise(inner) if op.is_idempotent() && inner == op => Rewrite::Bypass(first),
                // Rounding a bf16 input to bf16 changes nothing.
                Op::Load { dtype, .. } if op.preserves(*dtype) => Rewrite::Bypass(first),
                _ => Rewrite::Keep,
            },
        };
        match rewrite {
            Rewrite::Keep => {}
            Rewrite::Replace(op) => g.nodes[n].op = op,
            Rewrite::Bypass(to) => removed += bypass(g, n, to),
        }
    }
    removed
}

enum Rewrite {
    Keep,
    /// The node's users read this node instead; the node goes.
    Bypass(NodeIndex),
    /// Same operands, another op.
    Replace(Op),
}

/// Redirects the users of `n` to `to`, removes `n` and every operand left unused; returns
/// how many nodes went.
fn bypass(g: &mut Graph, n: NodeIndex, to: NodeIndex) -> usize {
    g.redirect_users(n, to);
    let mut dead = g.operands(n);
    g.nodes.remove_node(n);
    let mut removed = 1;
    while let Some(d) = dead.pop() {
        if g.nodes.node_weight(d).is_none()
            || g.nodes
                .neighbors_directed(d, Direction::Outgoing)
                .next()
                .is_some()
        {
            continue;
        }
        let operands = g.operands(d);
        g.nodes.remove_node(d);
        removed += 1;
        dead.extend(operands);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{verify, Node};
    use crate::ids::ModelId;
    use crate::io::DType;
    use crate::ops::Elementwise as E;
    use petgraph::stable_graph::StableDiGraph;

    fn graph() -> (Graph, NodeIndex) {
        let mut g = Graph {
            nodes: StableDiGraph::new(),
            stores: vec![Vec::new()],
        };
        let load = g.nodes.add_node(Node {
            op: Op::Load {
                model: ModelId(0),
                tensor: "t".into(),
                dtype: DType::F32,
                gather: None,
            },
            shape: vec![4],
        });
        (g, load)
    }

    fn add(g: &mut Graph, op: Op, operands: &[NodeIndex]) -> NodeIndex {
        let n = g.nodes.add_node(Node { op, shape: vec![4] });
        for (i, o) in operands.iter().enumerate() {
            g.nodes.add_edge(*o, n, i);
        }
        n
    }

    fn store(g: &mut Graph, value: NodeIndex) -> NodeIndex {
        let s = add(
            g,
            Op::Store {
                output: 0,
                tensor: "t".into(),
                dtype: DType::F32,
            },
            &[value],
        );
        g.stores[0].push(s);
        s
    }

    #[test]
    fn identities_go_and_the_store_reads_the_operand() {
        let (mut g, load) = graph();
        let a = add(&mut g, Op::Elementwise(E::Scale(1.0)), &[load]);
        let b = add(&mut g, Op::Elementwise(E::Divide(1.0)), &[a]);
        let c = add(&mut g, Op::Elementwise(E::Neg), &[b]);
        let d = add(&mut g, Op::Elementwise(E::Neg), &[c]);
        let e = add(
            &mut g,
            Op::Elementwise(E::WeightedSum {
                weights: vec![1.0],
                divisor: None,
            }),
            &[d],
        );
        let s = store(&mut g, e);
        assert_eq!(run(&mut g), 5);
        verify(&g).unwrap();
        assert_eq!(g.operands(s), vec![load]);
        assert_eq!(g.nodes.node_count(), 2);
    }

    #[test]
    fn shared_operands_stay() {
        let (mut g, load) = graph();
        let neg = add(&mut g, Op::Elementwise(E::Neg), &[load]);
        let twice = add(&mut g, Op::Elementwise(E::Neg), &[neg]);
        store(&mut g, twice);
        store(&mut g, neg);
        assert_eq!(run(&mut g), 1);
        verify(&g).unwrap();
        assert!(g.nodes.node_weight(neg).is_some());
    }

    #[test]
    fn unsafe_constants_are_kept() {
        for op in [
            Op::Elementwise(E::Scale(0.0)),
            Op::Elementwise(E::Scale(-1.0)),
            Op::Elementwise(E::Scale(1.5)),
            Op::Elementwise(E::Divide(3.0)),
            Op::Elementwise(E::Divide(0.0)),
            Op::Elementwise(E::WeightedSum {
                weights: vec![1.0, 0.0],
                divisor: None,
            }),
        ] {
            let (mut g, load) = graph();
            let operands = vec![load; op.arity().unwrap()];
            let n = add(&mut g, op.clone(), &operands);
            store(&mut g, n);
            assert_eq!(run(&mut g), 0, "{op:?}");
            assert_eq!(g.nodes[n].op, op);
        }
    }

    #[test]
    fn constants_take_their_cheaper_exact_form() {
        let (mut g, load) = graph();
        let half = add(&mut g, Op::Elementwise(E::Divide(4.0)), &[load]);
        let ws = add(
            &mut g,
            Op::Elementwise(E::WeightedSum {
                weights: vec![0.5, 0.25],
                divisor: Some(1.0),
            }),
            &[half, load],
        );
        let one = add(
            &mut g,
            Op::Elementwise(E::WeightedSum {
                weights: vec![1.0],
                divisor: Some(3.0),
            }),
            &[ws],
        );
        store(&mut g, one);
        assert_eq!(run(&mut g), 0);
        verify(&g).unwrap();
        assert_eq!(g.nodes[half].op, Op::Elementwise(E::Scale(0.25)));
        assert_eq!(
            g.nodes[ws].op,
            Op::Elementwise(E::WeightedSum {
                weights: vec![0.5, 0.25],
                divisor: None
            })
        );
        assert_eq!(g.nodes[one].op, Op::Elementwise(E::Divide(3.0)));
    }
}
