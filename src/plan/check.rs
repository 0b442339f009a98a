//! An independent check of a plan: every kernel is well formed over its inputs, every
//! input exists in its model with the bytes claimed, and the peak is re-simulated.

use std::collections::HashMap;

use super::{Instr, Kernel, Plan};
use crate::diag::Diagnostic;
use crate::sema::hir::{self, ModelId};

pub fn check(plan: &Plan, program: &hir::Program) -> Result<(), Box<Diagnostic>> {
    check_order(plan, program)?;
    check_releases(plan)?;
    for (i, step) in plan.steps.iter().enumerate() {
        let bug = |what: String| {
            Box::new(Diagnostic::bug(format!(
                "plan step {i} (`{}`): {what}",
                step.tensor
            )))
        };
        for input in &step.inputs {
            let info = program
                .models
                .get(input.model.0 as usize)
                .and_then(|m| m.info.tensors.get(&input.tensor))
                .ok_or_else(|| bug(format!("reads `{}`, which its model lacks", input.tensor)))?;
            if info.len != input.bytes || info.numel() != step.numel() {
                return Err(bug(format!("reads `{}` with the wrong size", input.tensor)));
            }
        }
        match &step.kernel {
            Kernel::Copy => {
                if step.inputs.len() != 1 || step.inputs[0].dtype != step.dtype {
                    return Err(bug(
                        "copies something other than one input of its own dtype".into()
                    ));
                }
            }
            Kernel::Fused(program) | Kernel::Whole(program) => {
                let mut depth: usize = 0;
                for instr in program {
                    if let Instr::Load(slot) = instr {
                        if *slot >= step.inputs.len() {
                            return Err(bug(format!("loads slot {slot} of {}", step.inputs.len())));
                        }
                    }
                    let (pops, pushes) = instr.stack_effect();
                    depth = depth
                        .checked_sub(pops)
                        .ok_or_else(|| bug("pops an empty stack".into()))?
                        + pushes;
                }
                if depth != 1 {
                    return Err(bug(format!("leaves {depth} values on the stack")));
                }
                let whole = program.iter().any(|i| matches!(i, Instr::Method { .. }));
                if whole != matches!(step.kernel, Kernel::Whole(_)) {
                    return Err(bug("kernel kind does not match its program".into()));
                }
            }
        }
    }
    let peak = simulate_peak(plan);
    if peak != plan.peak_bytes {
        return Err(Box::new(Diagnostic::bug(format!(
            "plan claims a peak of {} bytes, re-simulation gives {peak}",
            plan.peak_bytes
        ))));
    }
    Ok(())
}

/// One step per output tensor, outputs in script order, each output's tensors in the
/// order the program lists them (natural name order: shards fill in layer order).
fn check_order(plan: &Plan, program: &hir::Program) -> Result<(), Box<Diagnostic>> {
    let mut wanted = program
        .outputs
        .iter()
        .enumerate()
        .flat_map(|(o, out)| out.tensors.iter().map(move |t| (o, t.name.as_str())));
    for (i, step) in plan.steps.iter().enumerate() {
        match wanted.next() {
            Some(w) if w == (step.output, step.tensor.as_str()) => {}
            Some((o, t)) => {
                let planned = plan.steps.iter().any(|s| s.output == o && s.tensor == t);
                let why = if planned {
                    format!("is out of order: output {o} `{t}` comes first")
                } else {
                    format!("comes where output {o} `{t}` should, which the plan is missing")
                };
                return Err(Box::new(Diagnostic::bug(format!(
                    "plan step {i} (output {} `{}`) {why}",
                    step.output, step.tensor
                ))));
            }
            None => {
                return Err(Box::new(Diagnostic::bug(format!(
                    "plan step {i} (`{}`) is one step too many",
                    step.tensor
                ))))
            }
        }
    }
    match wanted.next() {
        Some((o, t)) => Err(Box::new(Diagnostic::bug(format!(
            "plan is missing the step for output {o} `{t}`"
        )))),
        None => Ok(()),
    }
}

/// Re-simulates liveness: an input stays mapped from its first read to its release, so a
/// release before a later read (freed too early), a second release, or none at all (held
/// to the end) is a bug.
fn check_releases(plan: &Plan) -> Result<(), Box<Diagnostic>> {
    let bug = |m: String| Box::new(Diagnostic::bug(m));
    if plan.releases.len() != plan.steps.len() {
        return Err(bug(format!(
            "plan releases inputs after {} steps but has {}",
            plan.releases.len(),
            plan.steps.len()
        )));
    }
    let mut released: HashMap<(ModelId, &str), usize> = HashMap::new();
    let mut read: HashMap<(ModelId, &str), usize> = HashMap::new();
    for (i, (step, releases)) in plan.steps.iter().zip(&plan.releases).enumerate() {
        for input in &step.inputs {
            let key = (input.model, input.tensor.as_str());
            if let Some(r) = released.get(&key) {
                return Err(bug(format!(
                    "plan step {i} (`{}`) reads `{}`, whose pages were released after step {r}",
                    step.tensor, input.tensor
                )));
            }
            read.insert(key, i);
        }
        for &j in releases {
            let input = step.inputs.get(j).ok_or_else(|| {
                bug(format!(
                    "plan step {i} (`{}`) releases input {j} of {}",
                    step.tensor,
                    step.inputs.len()
                ))
            })?;
            if released.insert((input.model, input.tensor.as_str()), i).is_some() {
                return Err(bug(format!("plan releases `{}` twice", input.tensor)));
            }
        }
    }
    match read.keys().find(|k| !released.contains_key(*k)) {
        Some((_, tensor)) => Err(bug(format!(
            "plan reads `{tensor}` but it is never released (held to the end)"
        ))),
        None => Ok(()),
    }
}

/// Walks the steps in order: while step `i` runs, its inputs are mapped, its output buffer
/// is filled, and up to `write_queue` earlier outputs wait for (or are in) the writer.
pub(crate) fn simulate_peak(plan: &Plan) -> u64 {
    // An input stays mapped from its first use to its last (the executor releases its
    // pages then), so inputs used again later are held in between.
    // The last use is where the plan releases the input (the end when it never does).
    let mut first_last: HashMap<(ModelId, &str), (usize, usize, u64)> = HashMap::new();
    for (i, step) in plan.steps.iter().enumerate() {
        for input in &step.inputs {
            first_last.entry((input.model, input.tensor.as_str())).or_insert((
                i,
                plan.steps.len(),
                input.bytes,
            ));
        }
    }
    for (i, (step, releases)) in plan.steps.iter().zip(&plan.releases).enumerate() {
        for input in releases.iter().filter_map(|&j| step.inputs.get(j)) {
            if let Some(e) = first_last.get_mut(&(input.model, input.tensor.as_str())) {
                e.1 = e.1.min(i);
            }
        }
    }
    let mut held_between = vec![0u64; plan.steps.len() + 1];
    for (&(model, tensor), &(first, last, bytes)) in &first_last {
        // resident during the steps between its uses that do not read it themselves
        let between = plan
            .steps
            .iter()
            .zip(held_between.iter_mut())
            .take(last)
            .skip(first + 1);
        for (step, slot) in between {
            if !step.inputs.iter().any(|x| x.model == model && x.tensor == tensor) {
                *slot += bytes;
            }
        }
    }
    let mut peak = 0;
    let mut queued: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    for (i, step) in plan.steps.iter().enumerate() {
        // A streamed step holds one block of its output, and of each input it reads for
        // the last time (pages are released block by block); an input read again later
        // stays mapped whole.
        let (inputs, output) = if step.streamed(plan.stream_block) {
            let block = plan.stream_block;
            let inputs = step
                .inputs
                .iter()
                .map(|x| {
                    let last = first_last
                        .get(&(x.model, x.tensor.as_str()))
                        .is_some_and(|e| e.1 == i);
                    if last {
                        block * x.dtype.size_bytes() as u64
                    } else {
                        x.bytes
                    }
                })
                .sum::<u64>();
            (inputs, block * step.dtype.size_bytes() as u64)
        } else {
            (step.in_bytes(), step.out_bytes())
        };
        let held = inputs
            + held_between[i]
            + output
            + whole_tensor_bytes(step, plan.limits_threads)
            + queued.iter().sum::<u64>();
        peak = peak.max(held);
        queued.push_back(output);
        if queued.len() > plan.write_queue {
            queued.pop_front();
        }
    }
    peak + super::scratch_bytes(plan) + WRITER_BUFFER_BYTES
}

/// The writer's buffered-I/O buffer (io::writer).
pub(crate) const WRITER_BUFFER_BYTES: u64 = 8 * 1024 * 1024;

/// What a whole-tensor step allocates besides its mapped inputs and its output bytes,
/// re-enacting the CPU executor's stack machine (`exec::cpu::whole`): computed values are
/// f32 tensors; an element-wise instruction holds each operand as one (loaded ones
/// decoded); a method holds its computed operands twice (the f32 values and the bytes it
/// reads) plus the op's declared [`working_bytes`](crate::ops::MethodOp::working_bytes), its result included.
pub(crate) fn whole_tensor_bytes(step: &super::Step, threads: usize) -> u64 {
    let Kernel::Whole(program) = &step.kernel else {
        return 0;
    };
    let f32s = step.numel() * 4;
    // true: a computed f32 tensor; false: a loaded input (mapped, not copied)
    let mut stack: Vec<bool> = Vec::new();
    let mut peak = 0;
    for instr in program {
        let (pops, _) = instr.stack_effect();
        let args = stack.split_off(stack.len().saturating_sub(pops));
        let held = stack.iter().filter(|&&c| c).count() as u64 * f32s;
        let during = match instr {
            Instr::Load(_) => 0,
            Instr::Method { op, .. } => {
                let computed = args.iter().filter(|&&c| c).count() as u64;
                2 * computed * f32s + op.working_bytes(args.len(), &step.shape, threads)
            }
            _ => args.len() as u64 * f32s,
        };
        peak = peak.max(held + during);
        stack.push(!matches!(instr, Instr::Load(_)));
    }
    // A program that ends on a load decodes it into one f32 tensor.
    peak.max(f32s)
}
