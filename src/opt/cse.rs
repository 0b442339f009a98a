//! Common subexpressions: two nodes with the same op on the same operands become one
//! (`a - base` used by several terms is computed once).

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::graph::{Graph, Op};

pub(super) fn run(g: &mut Graph) -> usize {
    let Ok(order) = petgraph::algo::toposort(&g.nodes, None) else {
        return 0;
    };
    let mut seen: HashMap<String, NodeIndex> = HashMap::new();
    let mut removed = 0;
    for n in order {
        if matches!(g.nodes[n].op, Op::Store { .. }) {
            continue;
        }
        // Debug output of f32 round-trips exactly, so equal keys mean equal ops.
        let key = format!("{:?}|{:?}|{:?}", g.nodes[n].op, g.nodes[n].shape, g.operands(n));
        match seen.get(&key) {
            Some(&keep) => {
                let users: Vec<(NodeIndex, usize)> = g
                    .nodes
                    .edges_directed(n, Direction::Outgoing)
                    .map(|e| (e.target(), *e.weight()))
                    .collect();
                for (user, slot) in users {
                    g.nodes.add_edge(keep, user, slot);
                }
                g.nodes.remove_node(n);
                removed += 1;
            }
            None => {
                seen.insert(key, n);
            }
        }
    }
    removed
}
