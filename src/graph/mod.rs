//! Stage 3, lower: [`hir::Program`] -> a dataflow [`Graph`] of tensor ops (petgraph).
//!
//! Every input tensor becomes one `Load` node however many outputs read it; every output
//! tensor ends in a `Store`. Edges carry the operand index.
//!
//! Imports: `sema::hir` (its input), the leaf modules `ids`, `io` (dtypes), `ops`, `diag`.

mod dump;
mod verify;

use std::collections::HashMap;
use std::sync::Arc;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::Direction;

use crate::ids::ModelId;
use crate::io::DType;
use crate::ops::gather::Gather;
use crate::ops::{Compute, Elementwise, MethodOp};
use crate::sema::hir::{self, TensorExpr};

pub use dump::dump;
pub use verify::verify;

/// The closed set of tensor operations. All are element-wise over tensors of one shape;
/// computation is in f32 and values are rounded once, on `Store`.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Load {
        model: ModelId,
        tensor: String,
        dtype: DType,
        /// Rows moved to the output vocabulary (embedding surgery); `None`: the tensor as
        /// stored.
        gather: Option<Arc<Gather>>,
    },
    /// An element-wise op (`ops::elementwise` defines each).
    Elementwise(Elementwise),
    /// A whole-tensor merge method over `inputs` operands (not element-wise), computed in
    /// `compute`.
    Method {
        op: MethodOp,
        compute: Compute,
        inputs: usize,
    },
    Store {
        output: usize,
        tensor: String,
        dtype: DType,
    },
}

impl Op {
    /// The op's name, as `debug graph` and kernel keys print it.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Load { .. } => "load",
            Op::Elementwise(op) => op.name(),
            Op::Method { op, .. } => op.name(),
            Op::Store { .. } => "store",
        }
    }

    /// How many operands the op takes.
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Load { .. } => Some(0),
            Op::Store { .. } => Some(1),
            Op::Elementwise(op) => Some(op.arity()),
            Op::Method { inputs, .. } => Some(*inputs),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub shape: Vec<usize>,
}

impl Node {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The whole computation of a script: ops plus what each output folder needs.
#[derive(Clone, Debug)]
pub struct Graph {
    pub nodes: StableDiGraph<Node, usize>,
    /// The stores of each output, in the order their tensors are written.
    pub stores: Vec<Vec<NodeIndex>>,
}

impl Graph {
    /// The operands of `node`, in operand order.
    pub fn operands(&self, node: NodeIndex) -> Vec<NodeIndex> {
        let mut edges: Vec<(usize, NodeIndex)> = self
            .nodes
            .edges_directed(node, Direction::Incoming)
            .map(|e| (*e.weight(), petgraph::visit::EdgeRef::source(&e)))
            .collect();
        edges.sort_by_key(|(i, _)| *i);
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// Makes every user of `from` read `to` in the same operand slot instead (`from` keeps
    /// its own operands; the caller removes it).
    pub fn redirect_users(&mut self, from: NodeIndex, to: NodeIndex) {
        let users: Vec<(NodeIndex, usize)> = self
            .nodes
            .edges_directed(from, Direction::Outgoing)
            .map(|e| (petgraph::visit::EdgeRef::target(&e), *e.weight()))
            .collect();
        for (user, slot) in users {
            self.nodes.add_edge(to, user, slot);
        }
    }

    fn add(&mut self, op: Op, shape: &[usize], operands: &[NodeIndex]) -> NodeIndex {
        let node = self.nodes.add_node(Node {
            op,
            shape: shape.to_vec(),
        });
        for (i, o) in operands.iter().enumerate() {
            self.nodes.add_edge(*o, node, i);
        }
        node
    }
}

/// Lowers a checked program to a graph; input tensors are shared between outputs.
pub fn lower(program: &hir::Program) -> Graph {
    let mut graph = Graph {
        nodes: StableDiGraph::new(),
        stores: Vec::new(),
    };
    let mut loads: HashMap<(ModelId, String), NodeIndex> = HashMap::new();
    for (o, output) in program.outputs.iter().enumerate() {
        let mut stores = Vec::with_capacity(output.tensors.len());
        for t in &output.tensors {
            let value = lower_expr(program, &mut graph, &mut loads, &t.expr, &t.shape);
            let store = graph.add(
                Op::Store {
                    output: o,
                    tensor: t.name.clone(),
                    dtype: t.dtype,
                },
                &t.shape,
                &[value],
            );
            stores.push(store);
        }
        graph.stores.push(stores);
    }
    graph
}

fn lower_expr(
    program: &hir::Program,
    g: &mut Graph,
    loads: &mut HashMap<(ModelId, String), NodeIndex>,
    e: &TensorExpr,
    shape: &[usize],
) -> NodeIndex {
    let mut lower = |g: &mut Graph, x: &TensorExpr| lower_expr(program, g, loads, x, shape);
    match e {
        TensorExpr::Load { model, name } => {
            if let Some(n) = loads.get(&(*model, name.clone())) {
                return *n;
            }
            let info = program.model(*model).info.tensors.get(name);
            let dtype = info.map_or(DType::F32, |t| t.dtype);
            // A load has its tensor's own shape: the factors of a LoRA product differ
            // from the result's.
            let load_shape = info.map_or(shape, |t| t.shape.as_slice());
            let node = g.add(
                Op::Load {
                    model: *model,
                    tensor: name.clone(),
                    dtype,
                    gather: None,
                },
                load_shape,
                &[],
            );
            loads.insert((*model, name.clone()), node);
            node
        }
        TensorExpr::Gather(gather) => {
            let (model, tensor, dtype) = gather.sources[gather.own].clone();
            g.add(
                Op::Load {
                    model,
                    tensor,
                    dtype,
                    gather: Some(gather.clone()),
                },
                shape,
                &[],
            )
        }
        TensorExpr::Elementwise { op, operands } => {
            let operands: Vec<NodeIndex> = operands.iter().map(|x| lower(g, x)).collect();
            g.add(Op::Elementwise(op.clone()), shape, &operands)
        }
        TensorExpr::Method { op, compute, inputs } => {
            let operands: Vec<NodeIndex> = inputs.iter().map(|x| lower(g, x)).collect();
            g.add(
                Op::Method {
                    op: op.clone(),
                    compute: *compute,
                    inputs: operands.len(),
                },
                shape,
                &operands,
            )
        }
    }
}
