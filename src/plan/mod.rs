//! Stage 5, schedule: [`Graph`] + [`Limits`] -> [`Plan`], the complete description of a
//! run: the input models and the tensors read from them, the order tensors are computed
//! and written (one fused kernel each), when each input's pages are released, every output
//! folder's finished contents besides the weights, the MoE router jobs, and the peak memory
//! all of it needs.
//!
//! The scheduler makes a [`Draft`]; only [`check`], which re-derives every claim on its own
//! (burn's `is_valid_execution_order`), turns it into a [`Plan`], the one thing executors run.
//!
//! Imports: earlier stages (`graph`, `sema::hir` for the program's outputs) and the leaf
//! modules (`ids`, `io`, `ops`, `moe_spec`, `diag`); never `exec`.

mod budget;
mod check;
pub mod kernel;
mod output;

use std::fmt::Write;
use std::sync::Arc;

use crate::diag::Diagnostics;
use crate::graph::{Graph, Op};
use crate::ids::ModelId;
use crate::io::{DType, ModelInfo, OutputSpec};
use crate::moe_spec::MoeOutput;
use crate::sema::hir;

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
    /// Read as the rows of an embedding surgery (`ops::gather`), not as stored.
    pub gather: Option<Arc<crate::ops::gather::Gather>>,
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

    /// Elements of input `slot`: the step's, except for the factors of a LoRA product
    /// (operands of a `low_rank` instruction), which have their own shapes.
    pub fn input_numel(&self, slot: usize) -> u64 {
        kernel::factor_sizes(self)
            .get(&slot)
            .copied()
            .unwrap_or(self.numel())
    }
}

/// An input model as the run reads it.
#[derive(Clone, Debug)]
pub struct PlanModel {
    /// The name the script binds it to.
    pub name: String,
    pub info: Arc<ModelInfo>,
}

/// One output folder: everything written besides the computed tensors, and the MoE
/// router job whose tensors are generated before its merge starts.
#[derive(Clone, Debug)]
pub struct PlanOutput {
    pub spec: OutputSpec,
    pub moe: Option<Arc<MoeOutput>>,
}

/// A schedule as the scheduler makes it, not yet checked. [`check`] turns it into a
/// [`Plan`].
#[derive(Clone, Debug)]
pub struct Draft {
    /// Input models, indexed by [`ModelId`].
    pub models: Vec<PlanModel>,
    /// Output folders in script order; [`Step::output`] indexes them.
    pub outputs: Vec<PlanOutput>,
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

/// A checked [`Draft`]: only [`check`] makes one, so whatever runs has been proved.
#[derive(Clone, Debug)]
pub struct Plan {
    draft: Draft,
}

impl std::ops::Deref for Plan {
    type Target = Draft;
    fn deref(&self) -> &Draft {
        &self.draft
    }
}

impl Plan {
    /// The unchecked schedule again (to check it once more, or to corrupt it in a test).
    pub fn into_draft(self) -> Draft {
        self.draft
    }
}

impl Draft {
    pub fn model(&self, id: ModelId) -> &PlanModel {
        &self.models[id.0 as usize]
    }
}

/// Drafts the plan of `program` (lowered and optimised to `graph`), checks it, and holds
/// it to the memory budget (E0501).
pub fn schedule(
    graph: &Graph,
    program: &hir::Program,
    limits: &Limits,
    force: bool,
) -> Result<Plan, Diagnostics> {
    let plan = check(draft(graph, program, limits, force), program).map_err(|d| Diagnostics::from(*d))?;
    let budget = limits.max_memory.or(program.max_memory);
    if let Some(budget) = budget.filter(|b| plan.peak_bytes > *b) {
        return Err(budget::over_budget(&plan, program, budget).into());
    }
    Ok(plan)
}

/// Outputs in script order; within one, tensors in the order sema listed them (natural
/// name order, so layers go 0, 1, 2, ... and shards fill in layer order). `force` lets the
/// writer replace an existing output folder.
pub fn draft(graph: &Graph, program: &hir::Program, limits: &Limits, force: bool) -> Draft {
    let steps = steps(graph);
    let mut read = std::collections::BTreeSet::new();
    let mut read_bytes = 0;
    for s in &steps {
        for i in &s.inputs {
            if read.insert((i.model, i.tensor.clone())) {
                read_bytes += i.bytes;
            }
        }
    }
    // The steps' tensors, and the tensors a MoE output generates (routers, zero biases).
    let generated: u64 = program
        .outputs
        .iter()
        .filter_map(|o| o.moe.as_ref())
        .flat_map(|m| &m.generated)
        .map(|g| g.nbytes())
        .sum();
    let write_bytes = steps.iter().map(Step::out_bytes).sum::<u64>() + generated;
    let releases = last_uses(&steps);
    let models = program
        .models
        .iter()
        .map(|m| PlanModel {
            name: m.name.clone(),
            info: m.info.clone(),
        })
        .collect();
    // Each output's steps, gathered in one pass (not one pass per output).
    let mut own: Vec<Vec<&Step>> = vec![Vec::new(); program.outputs.len()];
    for s in &steps {
        if let Some(o) = own.get_mut(s.output) {
            o.push(s);
        }
    }
    let outputs = own
        .iter()
        .enumerate()
        .map(|(index, own)| PlanOutput {
            spec: output::output_spec(program, index, own, force),
            moe: program.outputs[index].moe.clone(),
        })
        .collect();
    let mut plan = Draft {
        models,
        outputs,
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
    plan.peak_bytes = budget::peak(&plan);
    plan
}

/// One step per stored tensor, each a kernel compiled from the expression feeding it, in
/// the graph's store order.
pub fn steps(graph: &Graph) -> Vec<Step> {
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
                    Op::Load {
                        model,
                        tensor,
                        dtype,
                        gather,
                    } => Some(StepInput {
                        model: *model,
                        tensor: tensor.clone(),
                        dtype: *dtype,
                        bytes: graph.nodes[*n].numel() * dtype.size_bytes() as u64,
                        gather: gather.clone(),
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
    steps
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

/// The writer's buffered-I/O buffer (io::writer).
pub(crate) const WRITER_BUFFER_BYTES: u64 = 8 * 1024 * 1024;

/// Bytes of scratch the CPU workers hold: one chunk per stack slot, per thread.
pub(crate) fn scratch_bytes(plan: &Draft) -> u64 {
    let depth = plan
        .steps
        .iter()
        .map(|s| s.kernel.stack_depth() + 1)
        .max()
        .unwrap_or(0);
    (plan.limits_threads * plan.limits_chunk * depth * 4) as u64
}

/// A stable text form for `mergec plan` / `debug plan` and snapshots.
pub fn dump(plan: &Draft) -> String {
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
            .map(|i| format!("{}:{}", plan.model(i.model).name, i.tensor))
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
