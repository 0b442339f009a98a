//! Common subexpressions: two nodes with the same op on the same operands become one
//! (`a - base` used by several terms is computed once).

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;

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
                g.redirect_users(n, keep);
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
