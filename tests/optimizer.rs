//! The optimizer keeps every result: on random graphs (shared and duplicated subterms,
//! identities, dead nodes, methods, every float dtype, sizes past a chunk and a stream
//! block), the optimised graph's plan computed on the CPU writes the same bytes for every
//! stored tensor as the unoptimised graph's plan.

use std::collections::HashMap;

use mergec::exec::cpu::encode;
use mergec::exec::CpuExecutor;
use mergec::graph::{verify, Graph, Node, Op};
use mergec::io::DType;
use mergec::ops::{Compute, Elementwise as E, Half, MethodOp};
use mergec::plan::{self, Step};
use mergec::sema::hir::ModelId;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())].clone()
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
/// Constants with identities among them (1, -1, 0, powers of two) and ones without.
const CONSTANTS: [f32; 10] = [1.0, 1.0, -1.0, 0.0, 2.0, 0.5, 4.0, 3.0, 0.3, -1e-3];

/// Values a tensor holds: ordinary ones, and ±0, ±inf, a quiet NaN, subnormals, large.
fn value(rng: &mut Rng) -> f32 {
    match rng.below(20) {
        0 => 0.0,
        1 => -0.0,
        2 => f32::INFINITY,
        3 => f32::NEG_INFINITY,
        4 => f32::NAN,
        5 => 1e-40,
        6 => -3e-39,
        7 => 6.0e4,
        _ => (rng.below(2001) as f32 - 1000.0) / 97.0,
    }
}

struct Case {
    graph: Graph,
    /// Stored bytes of each (model, tensor).
    inputs: HashMap<(u32, String), Vec<u8>>,
}

/// A random expression over the loads of one tensor name; `memo` holds subterms to share.
fn expr(
    g: &mut Graph,
    rng: &mut Rng,
    loads: &[NodeIndex],
    memo: &mut Vec<NodeIndex>,
    shape: &[usize],
    depth: u32,
) -> NodeIndex {
    let add = |g: &mut Graph, op: Op, operands: &[NodeIndex]| {
        let n = g.nodes.add_node(Node {
            op,
            shape: shape.to_vec(),
        });
        for (i, o) in operands.iter().enumerate() {
            g.nodes.add_edge(*o, n, i);
        }
        n
    };
    if depth == 0 || rng.below(5) == 0 {
        return rng.pick(loads);
    }
    if !memo.is_empty() && rng.below(4) == 0 {
        return rng.pick(memo);
    }
    let sub =
        |g: &mut Graph, rng: &mut Rng, memo: &mut Vec<NodeIndex>| expr(g, rng, loads, memo, shape, depth - 1);
    let n = match rng.below(10) {
        0 => {
            let x = sub(g, rng, memo);
            add(g, Op::Elementwise(E::Neg), &[x])
        }
        1 => {
            let x = sub(g, rng, memo);
            let y = add(g, Op::Elementwise(E::Neg), &[x]);
            add(g, Op::Elementwise(E::Neg), &[y])
        }
        2 => {
            let (a, b) = (sub(g, rng, memo), sub(g, rng, memo));
            add(g, Op::Elementwise(E::Add), &[a, b])
        }
        3 => {
            let (a, b) = (sub(g, rng, memo), sub(g, rng, memo));
            add(g, Op::Elementwise(E::Sub), &[a, b])
        }
        4 => {
            let x = sub(g, rng, memo);
            add(g, Op::Elementwise(E::Scale(rng.pick(&CONSTANTS))), &[x])
        }
        5 => {
            let x = sub(g, rng, memo);
            let d = rng.pick(&CONSTANTS);
            add(
                g,
                Op::Elementwise(E::Divide(if d == 0.0 { 8.0 } else { d })),
                &[x],
            )
        }
        6 => {
            let k = 1 + rng.below(3);
            let xs: Vec<NodeIndex> = (0..k).map(|_| sub(g, rng, memo)).collect();
            let weights = (0..k).map(|_| rng.pick(&CONSTANTS)).collect();
            let divisor = match rng.below(3) {
                0 => None,
                1 => Some(1.0),
                _ => Some(rng.pick(&[2.0, 3.0, 0.5])),
            };
            add(g, Op::Elementwise(E::WeightedSum { weights, divisor }), &xs)
        }
        8 => {
            // a 16-bit compute dtype's rounding, sometimes twice (folded to once), often of
            // a bf16 or f16 load (folded away)
            let x = sub(g, rng, memo);
            let h = rng.pick(&[Half::Bf16, Half::F16]);
            let once = add(g, Op::Elementwise(E::Round(h)), &[x]);
            if rng.below(2) == 0 {
                add(g, Op::Elementwise(E::Round(h)), &[once])
            } else {
                once
            }
        }
        7 => {
            // the same subterm built twice (for cse)
            let x = rng.pick(loads);
            let a = add(g, Op::Elementwise(E::Scale(0.25)), &[x]);
            let b = add(g, Op::Elementwise(E::Scale(0.25)), &[x]);
            add(g, Op::Elementwise(E::Add), &[a, b])
        }
        _ => {
            let (a, b) = (sub(g, rng, memo), sub(g, rng, memo));
            let t = rng.pick(&[0.0, 0.3, 1.0]);
            add(
                g,
                Op::Method {
                    op: MethodOp::Slerp { t },
                    compute: Compute::F32,
                    inputs: 2,
                },
                &[a, b],
            )
        }
    };
    memo.push(n);
    n
}

fn case(seed: u64) -> Case {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut g = Graph {
        nodes: StableDiGraph::new(),
        stores: Vec::new(),
    };
    let mut inputs = HashMap::new();
    let models = 1 + rng.below(3) as u32;
    let model_dtype: Vec<DType> = (0..models).map(|_| rng.pick(&DTYPES)).collect();
    let outputs = 1 + rng.below(2);
    let tensors = 1 + rng.below(4);
    let mut loads: HashMap<(u32, usize), NodeIndex> = HashMap::new();
    let sizes: Vec<usize> = (0..tensors)
        .map(|_| rng.pick(&[0usize, 1, 7, 64, 1000, 70_000, 300_001]))
        .collect();
    for output in 0..outputs {
        let mut stores = Vec::new();
        for (t, &size) in sizes.iter().enumerate() {
            let shape = vec![size];
            let mut these = Vec::new();
            for m in 0..models {
                let dtype = model_dtype[m as usize];
                let node = *loads.entry((m, t)).or_insert_with(|| {
                    g.nodes.add_node(Node {
                        op: Op::Load {
                            model: ModelId(m),
                            tensor: format!("t{t}"),
                            dtype,
                            gather: None,
                        },
                        shape: shape.clone(),
                    })
                });
                inputs.entry((m, format!("t{t}"))).or_insert_with(|| {
                    let values: Vec<f32> = (0..size).map(|_| value(&mut rng)).collect();
                    let mut bytes = vec![0u8; size * dtype.size_bytes()];
                    encode(&values, dtype, &mut bytes);
                    bytes
                });
                these.push(node);
            }
            let mut memo = Vec::new();
            let value = expr(&mut g, &mut rng, &these, &mut memo, &shape, 4);
            // a dead term nobody stores (for dce)
            if rng.below(3) == 0 {
                let dead = g.nodes.add_node(Node {
                    op: Op::Elementwise(E::Neg),
                    shape: shape.clone(),
                });
                g.nodes.add_edge(value, dead, 0);
            }
            let store = g.nodes.add_node(Node {
                op: Op::Store {
                    output,
                    tensor: format!("t{t}"),
                    dtype: rng.pick(&DTYPES),
                },
                shape: shape.clone(),
            });
            g.nodes.add_edge(value, store, 0);
            stores.push(store);
        }
        g.stores.push(stores);
    }
    Case { graph: g, inputs }
}

/// Every stored tensor's bytes, computed step by step on the CPU.
fn run(
    steps: &[Step],
    inputs: &HashMap<(u32, String), Vec<u8>>,
    cpu: &CpuExecutor,
) -> Vec<(usize, String, Vec<u8>)> {
    steps
        .iter()
        .map(|step| {
            let slices: Vec<&[u8]> = step
                .inputs
                .iter()
                .map(|i| inputs[&(i.model.0, i.tensor.clone())].as_slice())
                .collect();
            (
                step.output,
                step.tensor.clone(),
                cpu.compute(step, &slices).unwrap(),
            )
        })
        .collect()
}

/// Bytes of the distinct input tensors the steps read.
fn read_bytes(steps: &[Step]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    steps
        .iter()
        .flat_map(|s| &s.inputs)
        .filter(|i| seen.insert((i.model, i.tensor.clone())))
        .map(|i| i.bytes)
        .sum()
}

#[test]
fn optimised_random_graphs_give_the_same_bytes() {
    // small chunks, so chunk edges fall inside the tensors
    let cpu = CpuExecutor::new(2, 4096).unwrap();
    let (mut folded, mut shared, mut swept) = (0, 0, 0);
    for seed in 0..150 {
        let Case { graph, inputs } = case(seed);
        let before = plan::steps(&graph);
        let (optimised, reports) = mergec::optimize(graph).unwrap();
        verify(&optimised).unwrap();
        for r in &reports {
            match r.pass {
                "fold" => folded += r.removed_nodes,
                "cse" => shared += r.removed_nodes,
                "dce" => swept += r.removed_nodes,
                _ => {}
            }
        }
        let after = plan::steps(&optimised);
        assert_eq!(before.len(), after.len(), "seed {seed}");
        assert!(read_bytes(&after) <= read_bytes(&before), "seed {seed}");
        let want = run(&before, &inputs, &cpu);
        let got = run(&after, &inputs, &cpu);
        for ((o, t, a), (_, _, b)) in want.iter().zip(&got) {
            assert!(
                a == b,
                "seed {seed}: output {o} tensor {t} differs after optimisation"
            );
        }
    }
    // the generator exercises every pass
    assert!(
        folded > 0 && shared > 0 && swept > 0,
        "fold {folded} cse {shared} dce {swept}"
    );
}
