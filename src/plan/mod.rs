//! Stage 5, schedule: [`Graph`] + [`Limits`] -> [`Plan`]: the order tensors are computed
//! and written, one fused kernel each, and the peak memory that order needs.
//!
//! [`check`] re-derives the plan's claims independently (burn's `is_valid_execution_order`).

mod check;
pub mod kernel;

use std::fmt::Write;

use crate::graph::{Graph, Op};
use crate::io::DType;
use crate::sema::hir::{self, ModelId};

pub use check::check;
pub use kernel::{Instr, Kernel};

/// What the executor will have to work with.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Worker threads of the CPU executor.
    pub threads: usize,
    /// Elements per chunk each worker computes at a time.
    pub chunk_elems: usize,
    /// Output tensors that may wait for the writer thread at once.
    pub write_queue: usize,
    /// A hard memory budget (`--max-memory`, or the script's `set max_memory`).
    pub max_memory: Option<u64>,
    /// Elements per block of a streamed element-wise step.
    pub stream_block_elems: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            chunk_elems: 64 * 1024,
            write_queue: 2,
            max_memory: None,
            stream_block_elems: STREAM_BLOCK_ELEMS,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StepInput {
    pub model: ModelId,
    pub tensor: String,
    pub dtype: DType,
    pub bytes: u64,
}

/// Compute one output tensor and hand it to its output's writer.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub output: usize,
    pub tensor: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kernel: Kernel,
    pub inputs: Vec<StepInput>,
}

/// Element-wise steps larger than this are computed and written block by block, so neither
/// their output nor their mapped inputs are ever held whole.
pub const STREAM_BLOCK_ELEMS: u64 = 1 << 22;

impl Step {
    /// Computed and written in blocks of `block` elements.
    pub fn streamed(&self, block: u64) -> bool {
        matches!(self.kernel, Kernel::Fused(_)) && self.numel() > block
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    pub fn out_bytes(&self) -> u64 {
        self.numel() * self.dtype.size_bytes() as u64
    }

    pub fn in_bytes(&self) -> u64 {
        self.inputs.iter().map(|i| i.bytes).sum()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub limits_threads: usize,
    pub limits_chunk: usize,
    pub write_queue: usize,
    /// Elements per block of a streamed element-wise step.
    pub stream_block: u64,
    /// Bytes of input tensors read (each once).
    pub read_bytes: u64,
    /// Bytes of output tensors written.
    pub write_bytes: u64,
    /// Most memory the run holds at once: mapped inputs of a step, its output buffer, the
    /// buffers queued for writing and the workers' scratch.
    pub peak_bytes: u64,
    /// `releases[i]`: the inputs of step `i` (indices into its `inputs`) read there for the
    /// last time, whose pages the run releases once the step is done. An input used by
    /// several steps stays mapped (read once) until its last; [`check`] proves each input
    /// is released exactly once, after its last use.
    pub releases: Vec<Vec<usize>>,
}

/// Outputs in script order; within one, tensors in the order sema listed them (natural
/// name order, so layers go 0, 1, 2, ... and shards fill in layer order).
pub fn schedule(graph: &Graph, limits: &Limits) -> Plan {
    let mut steps = Vec::new();
    for stores in &graph.stores {
        for &store in stores {
            let Op::Store {
                output,
                tensor,
                dtype,
            } = &graph.nodes[store].op
            else {
                continue;
            };
            let (kernel, slots) = kernel::compile(graph, store);
            let inputs = slots
                .iter()
                .filter_map(|n| match &graph.nodes[*n].op {
                    Op::Load { model, tensor, dtype } => Some(StepInput {
                        model: *model,
                        tensor: tensor.clone(),
                        dtype: *dtype,
                        bytes: graph.nodes[*n].numel() * dtype.size_bytes() as u64,
                    }),
                    _ => None,
                })
                .collect();
            steps.push(Step {
                output: *output,
                tensor: tensor.clone(),
                shape: graph.nodes[store].shape.clone(),
                dtype: *dtype,
                kernel,
                inputs,
            });
        }
    }
    let mut read = std::collections::BTreeSet::new();
    let mut read_bytes = 0;
    for s in &steps {
        for i in &s.inputs {
            if read.insert((i.model, i.tensor.clone())) {
                read_bytes += i.bytes;
            }
        }
    }
    let write_bytes = steps.iter().map(Step::out_bytes).sum();
    let releases = last_uses(&steps);
    let mut plan = Plan {
        steps,
        limits_threads: limits.threads,
        limits_chunk: limits.chunk_elems,
        write_queue: limits.write_queue,
        stream_block: limits.stream_block_elems.max(1),
        read_bytes,
        write_bytes,
        peak_bytes: 0,
        releases,
    };
    plan.peak_bytes = check::simulate_peak(&plan);
    plan
}

/// Per step, the inputs read there for the last time.
fn last_uses(steps: &[Step]) -> Vec<Vec<usize>> {
    let mut last: std::collections::HashMap<(ModelId, &str), (usize, usize)> =
        std::collections::HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        for (j, input) in step.inputs.iter().enumerate() {
            last.insert((input.model, input.tensor.as_str()), (i, j));
        }
    }
    let mut releases = vec![Vec::new(); steps.len()];
    for (i, j) in last.into_values() {
        releases[i].push(j);
    }
    releases.iter_mut().for_each(|r| r.sort_unstable());
    releases
}

/// Bytes of scratch the CPU workers hold: one chunk per stack slot, per thread.
pub(crate) fn scratch_bytes(plan: &Plan) -> u64 {
    let depth = plan
        .steps
        .iter()
        .map(|s| s.kernel.stack_depth() + 1)
        .max()
        .unwrap_or(0);
    (plan.limits_threads * plan.limits_chunk * depth * 4) as u64
}

/// A stable text form for `mergec plan` / `debug plan` and snapshots.
pub fn dump(plan: &Plan, program: &hir::Program) -> String {
    let mut out = String::new();
    for (i, s) in plan.steps.iter().enumerate() {
        let kernel = match &s.kernel {
            Kernel::Copy => "copy".to_string(),
            Kernel::Fused(p) => format!("fused[{}]", p.len()),
            Kernel::Whole(p) => format!("whole[{}]", p.len()),
        };
        let inputs: Vec<String> = s
            .inputs
            .iter()
            .map(|i| format!("{}:{}", program.model(i.model).name, i.tensor))
            .collect();
        let _ = writeln!(
            out,
            "{i:>4} out{} {} {} {:?} {kernel} <- {}",
            s.output,
            s.tensor,
            s.dtype,
            s.shape,
            inputs.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "read {} B, write {} B, peak {} B",
        plan.read_bytes, plan.write_bytes, plan.peak_bytes
    );
    out
}
