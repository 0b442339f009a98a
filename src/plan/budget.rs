//! The scheduler's own account of the memory a plan holds, and E0501 when it is over the
//! budget. [`check`](super::check) re-derives the same peak by a different walk (intervals
//! of each input's use rather than this running ledger), so a mistake in either shows.

use std::collections::{HashMap, HashSet, VecDeque};

use super::{Draft, Step};
use crate::diag::{Code, Diagnostic};
use crate::ids::ModelId;
use crate::sema::hir;

/// The most bytes the run holds at once: a running ledger of mapped inputs (added at
/// their first read, removed after the step that releases them), outputs queued for the
/// writer, each step's own charge, each output's MoE routers (computed before its first
/// step, then held until the output is written) and the fixed buffers.
pub(super) fn peak(plan: &Draft) -> u64 {
    let mut mapped: HashMap<(ModelId, &str), u64> = HashMap::new();
    let mut mapped_bytes = 0u64;
    let mut peak = 0u64;
    let mut steps = plan.steps.iter().zip(&plan.releases).peekable();
    for (index, output) in plan.outputs.iter().enumerate() {
        // A new output starts with an empty write queue: the previous writer has finished.
        let mut queue: VecDeque<u64> = VecDeque::new();
        let generated = match output.moe.as_deref() {
            Some(moe) => {
                let routers = crate::ops::cost::router_bytes(moe, &plan.model(moe.base).info);
                peak = peak.max(mapped_bytes + routers);
                moe.generated.iter().map(|g| g.nbytes()).sum()
            }
            None => 0,
        };
        while let Some((step, releases)) = steps.next_if(|(s, _)| s.output == index) {
            // This step's distinct inputs, mapped from now on if they were not yet.
            let mut own = 0u64;
            let mut seen = HashSet::new();
            for input in &step.inputs {
                let key = (input.model, input.tensor.as_str());
                if seen.insert(key) {
                    own += *mapped.entry(key).or_insert_with(|| {
                        mapped_bytes += input.bytes;
                        input.bytes
                    });
                }
            }
            let released: Vec<&super::StepInput> =
                releases.iter().filter_map(|&j| step.inputs.get(j)).collect();
            let charged = step_charge(plan, step, &released);
            let held = (mapped_bytes - own) + charged + queue.iter().sum::<u64>() + generated;
            peak = peak.max(held);
            queue.push_back(output_bytes(plan, step));
            if queue.len() > plan.write_queue {
                queue.pop_front();
            }
            for input in released {
                if let Some(bytes) = mapped.remove(&(input.model, input.tensor.as_str())) {
                    mapped_bytes -= bytes;
                }
            }
        }
    }
    peak + super::scratch_bytes(plan) + super::WRITER_BUFFER_BYTES
}

/// What step `step` itself holds: its inputs (one block of each it reads for the last
/// time when streamed, since their pages go block by block), its output (one block when
/// streamed) and its kernel's working memory.
fn step_charge(plan: &Draft, step: &Step, released: &[&super::StepInput]) -> u64 {
    let inputs: u64 = step
        .inputs
        .iter()
        .map(|x| {
            let last = released
                .iter()
                .any(|r| r.model == x.model && r.tensor == x.tensor);
            if step.streamed(plan.stream_block) && last {
                plan.stream_block * x.dtype.size_bytes() as u64
            } else {
                x.bytes
            }
        })
        .sum();
    inputs + output_bytes(plan, step) + step.kernel.working_bytes(&step.shape, plan.limits_threads)
}

/// The bytes of `step`'s output buffer: one block when streamed.
fn output_bytes(plan: &Draft, step: &Step) -> u64 {
    if step.streamed(plan.stream_block) {
        plan.stream_block * step.dtype.size_bytes() as u64
    } else {
        step.out_bytes()
    }
}

/// E0501: the plan needs more memory at its peak than the budget allows. Says where the
/// peak is and the smallest budget that works.
pub(super) fn over_budget(plan: &Draft, program: &hir::Program, budget: u64) -> Diagnostic {
    let biggest = plan.steps.iter().max_by_key(|s| s.in_bytes() + s.out_bytes());
    let mut d = Diagnostic::error(
        Code::E0501,
        format!(
            "the merge needs {} bytes of memory at its peak, over the budget of {budget} bytes",
            plan.peak_bytes
        ),
    )
    .with_help(format!(
        "a budget of at least {} bytes works; element-wise steps are streamed in blocks, but a whole-tensor method holds its tensor's inputs, output and working memory together",
        plan.peak_bytes
    ));
    if let Some(step) = biggest {
        let out = plan
            .outputs
            .get(step.output)
            .map_or(String::new(), |o| o.spec.dir.display().to_string());
        d = d.with_note(format!(
            "the largest step writes `{}` of {out}: {} bytes in, {} bytes out",
            step.tensor,
            step.in_bytes(),
            step.out_bytes()
        ));
    }
    if let Some(first) = program.outputs.first() {
        d = d.at(first.span, "this output does not fit");
    }
    d
}
