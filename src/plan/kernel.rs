//! One fused kernel per stored tensor: its whole element-wise expression as a small
//! stack program, so each input is read once and no full-size intermediate exists.

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;

use crate::graph::{Graph, Op};
use crate::ops::{Compute, Elementwise, MethodOp};

/// One instruction of a fused kernel; operands are popped from a stack of chunk buffers.
#[derive(Clone, Debug, PartialEq)]
pub enum Instr {
    /// Push input slot `i`, decoded to f32.
    Load(usize),
    /// Pops the op's arity (first operand deepest), pushes its result.
    Elementwise(Elementwise),
    /// Pops `arity` whole tensors (first operand deepest), pushes the method's result.
    Method {
        op: MethodOp,
        compute: Compute,
        arity: usize,
    },
}

impl Instr {
    /// Values popped and pushed.
    pub fn stack_effect(&self) -> (usize, usize) {
        match self {
            Instr::Load(_) => (0, 1),
            Instr::Elementwise(op) => (op.arity(), 1),
            Instr::Method { arity, .. } => (*arity, 1),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// The input's bytes are written unchanged (same dtype, no arithmetic).
    Copy,
    /// Element-wise only: runs chunk by chunk.
    Fused(Vec<Instr>),
    /// Contains a whole-tensor method: runs on whole tensors.
    Whole(Vec<Instr>),
}

impl Kernel {
    /// Deepest stack the program reaches (buffers of scratch per chunk).
    pub fn stack_depth(&self) -> usize {
        let (mut depth, mut max) = (0usize, 0usize);
        for i in self.program() {
            let (pops, pushes) = i.stack_effect();
            depth = depth.saturating_sub(pops) + pushes;
            max = max.max(depth);
        }
        max
    }

    pub fn program(&self) -> &[Instr] {
        match self {
            Kernel::Copy => &[],
            Kernel::Fused(p) | Kernel::Whole(p) => p,
        }
    }

    /// What the kernel allocates besides its mapped inputs and its output bytes, for an
    /// output of `shape` and `threads` workers: 0 for copies and element-wise kernels
    /// (their scratch is charged per plan), and for a whole-tensor kernel the CPU
    /// executor's stack machine (`exec::cpu::whole`) re-enacted: computed values are f32
    /// tensors; an element-wise instruction holds each operand as one (loaded ones
    /// decoded); a method holds its computed operands twice (the f32 values and the bytes
    /// it reads) plus the op's declared [`working_bytes`](crate::ops::MethodOp::working_bytes),
    /// its result included.
    pub fn working_bytes(&self, shape: &[usize], threads: usize) -> u64 {
        let Kernel::Whole(program) = self else {
            return 0;
        };
        let f32s = shape.iter().map(|&d| d as u64).product::<u64>() * 4;
        // true: a computed f32 tensor; false: a loaded input (mapped, not copied)
        let mut stack: Vec<bool> = Vec::new();
        let mut peak = 0;
        for instr in program {
            let (pops, _) = instr.stack_effect();
            let args = stack.split_off(stack.len().saturating_sub(pops));
            let held = stack.iter().filter(|&&c| c).count() as u64 * f32s;
            let during = match instr {
                Instr::Load(_) => 0,
                Instr::Method { op, compute, .. } => {
                    let computed = args.iter().filter(|&&c| c).count() as u64;
                    2 * computed * f32s + op.working_bytes(*compute, args.len(), shape, threads)
                }
                _ => args.len() as u64 * f32s,
            };
            peak = peak.max(held + during);
            stack.push(!matches!(instr, Instr::Load(_)));
        }
        // A program that ends on a load decodes it into one f32 tensor.
        peak.max(f32s)
    }
}

/// Compiles the expression feeding `store` into a kernel; `slots` lists the loads it reads.
pub(crate) fn compile(g: &Graph, store: NodeIndex) -> (Kernel, Vec<NodeIndex>) {
    let mut slots: Vec<NodeIndex> = Vec::new();
    let mut slot_of: HashMap<NodeIndex, usize> = HashMap::new();
    let mut program = Vec::new();
    let Some(&value) = g.operands(store).first() else {
        return (Kernel::Fused(program), slots);
    };
    emit(g, value, &mut program, &mut slots, &mut slot_of);
    let store_dtype = match &g.nodes[store].op {
        Op::Store { dtype, .. } => Some(*dtype),
        _ => None,
    };
    let kernel = match (&g.nodes[value].op, store_dtype) {
        (Op::Load { dtype, .. }, Some(out)) if *dtype == out => Kernel::Copy,
        _ if program.iter().any(|i| matches!(i, Instr::Method { .. })) => Kernel::Whole(program),
        _ => Kernel::Fused(program),
    };
    (kernel, slots)
}

fn emit(
    g: &Graph,
    n: NodeIndex,
    program: &mut Vec<Instr>,
    slots: &mut Vec<NodeIndex>,
    slot_of: &mut HashMap<NodeIndex, usize>,
) {
    for o in g.operands(n) {
        emit(g, o, program, slots, slot_of);
    }
    program.push(match &g.nodes[n].op {
        Op::Load { .. } => {
            let slot = *slot_of.entry(n).or_insert_with(|| {
                slots.push(n);
                slots.len() - 1
            });
            Instr::Load(slot)
        }
        Op::Elementwise(op) => Instr::Elementwise(op.clone()),
        Op::Method { op, compute, inputs } => Instr::Method {
            op: op.clone(),
            compute: *compute,
            arity: *inputs,
        },
        // A store never feeds another node (graph::verify).
        Op::Store { .. } => return,
    });
}

/// The element counts of the input slots a step reads as LoRA factors (operands of a
/// `low_rank` instruction, which have their own shapes); every other input has the
/// step's shape.
pub(crate) fn factor_sizes(step: &super::Step) -> std::collections::HashMap<usize, u64> {
    let mut sizes = std::collections::HashMap::new();
    // the stack of the program: Some(slot) for a value loaded and not yet computed on
    let mut stack: Vec<Option<usize>> = Vec::new();
    for instr in step.kernel.program() {
        let (pops, _) = instr.stack_effect();
        let args = stack.split_off(stack.len().saturating_sub(pops));
        if let Instr::Method {
            op: crate::ops::MethodOp::LowRank { rank, transpose, .. },
            ..
        } = instr
        {
            if let (Some((b, a)), [Some(bs), Some(as_)]) = (
                crate::ops::lowrank::factor_shapes(&step.shape, *rank, *transpose),
                args.as_slice(),
            ) {
                sizes.insert(*bs, (b[0] * b[1]) as u64);
                sizes.insert(*as_, (a[0] * a[1]) as u64);
            }
        }
        stack.push(match instr {
            Instr::Load(slot) => Some(*slot),
            _ => None,
        });
    }
    sizes
}
