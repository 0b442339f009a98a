//! Dead code: nodes from which no store is reachable are removed (mark from the stores,
//! then sweep).

use std::collections::HashSet;

use petgraph::Direction;

use crate::graph::Graph;

pub(super) fn run(g: &mut Graph) -> usize {
    let mut live = HashSet::new();
    let mut stack: Vec<_> = g.stores.iter().flatten().copied().collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.nodes.neighbors_directed(n, Direction::Incoming));
        }
    }
    let dead: Vec<_> = g.nodes.node_indices().filter(|n| !live.contains(n)).collect();
    for n in &dead {
        g.nodes.remove_node(*n);
    }
    dead.len()
}
