//! An independent check of a draft plan: every kernel is well formed over its inputs,
//! every input exists in its model with the bytes claimed, the outputs are the program's,
//! and the peak is re-derived on its own (intervals of each input's use, where the
//! scheduler keeps a running ledger) from the op-declared costs. Only this turns a
//! [`Draft`] into a [`Plan`].

use crate::io::vocab::Row;
use std::collections::HashMap;

use super::{Draft, Instr, Kernel, Plan};
use crate::diag::Diagnostic;
use crate::ids::ModelId;
use crate::sema::hir;

/// Proves `plan` against `program` (the program it was drafted from); every failure is a
/// bug in mergec, reported as such.
pub fn check(plan: Draft, program: &hir::Program) -> Result<Plan, Box<Diagnostic>> {
    check_order(&plan, program)?;
    check_models_and_outputs(&plan, program)?;
    check_releases(&plan)?;
    for (i, step) in plan.steps.iter().enumerate() {
        let bug = |what: String| {
            Box::new(Diagnostic::bug(format!(
                "plan step {i} (`{}`): {what}",
                step.tensor
            )))
        };
        for (slot, input) in step.inputs.iter().enumerate() {
            let expected = step.input_numel(slot);
            let info = plan
                .models
                .get(input.model.0 as usize)
                .and_then(|m| m.info.tensors.get(&input.tensor))
                .ok_or_else(|| bug(format!("reads `{}`, which its model lacks", input.tensor)))?;
            match &input.gather {
                None if info.len != input.bytes || info.numel() != expected => {
                    return Err(bug(format!("reads `{}` with the wrong size", input.tensor)));
                }
                None => {}
                Some(g) => {
                    // Every row asked for lies within its source tensor.
                    let rows_of = |s: u32| {
                        g.sources.get(s as usize).and_then(|(m, t, _)| {
                            let info = plan.models.get(m.0 as usize)?.info.tensors.get(t)?;
                            Some(info.numel() / g.width.max(1) as u64)
                        })
                    };
                    let fits = |s: u32, row: u32| rows_of(s).is_some_and(|n| (row as u64) < n);
                    let rows_ok = g.plan.rows.iter().all(|r| match r {
                        Row::Copy { src, row } => fits(*src, *row),
                        Row::Mean(terms) => terms.iter().all(|(s, r)| fits(*s, *r)),
                        Row::Zero => true,
                    });
                    if g.bytes() != input.bytes
                        || (g.plan.len() * g.width) as u64 != expected
                        || g.dtype() != input.dtype
                        || !rows_ok
                    {
                        return Err(bug(format!(
                            "gathers `{}` with the wrong size or rows",
                            input.tensor
                        )));
                    }
                }
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
    let peak = simulate_peak(&plan);
    if peak != plan.peak_bytes {
        return Err(Box::new(Diagnostic::bug(format!(
            "plan claims a peak of {} bytes, re-simulation gives {peak}",
            plan.peak_bytes
        ))));
    }
    Ok(Plan { draft: plan })
}

/// The plan reads the program's models and writes its outputs, each output's tensors
/// listed for the writer as the steps make them.
fn check_models_and_outputs(plan: &Draft, program: &hir::Program) -> Result<(), Box<Diagnostic>> {
    let bug = |m: String| Box::new(Diagnostic::bug(m));
    if plan.models.len() != program.models.len()
        || plan
            .models
            .iter()
            .zip(&program.models)
            .any(|(p, m)| p.name != m.name || !std::sync::Arc::ptr_eq(&p.info, &m.info))
    {
        return Err(bug("plan's input models are not the program's".into()));
    }
    if plan.outputs.len() != program.outputs.len() {
        return Err(bug(format!(
            "plan writes {} outputs, the program {}",
            plan.outputs.len(),
            program.outputs.len()
        )));
    }
    // Steps per output, counted once (not once per output).
    let mut steps_of = vec![0usize; plan.outputs.len()];
    for s in &plan.steps {
        if let Some(n) = steps_of.get_mut(s.output) {
            *n += 1;
        }
    }
    for (index, (planned, out)) in plan.outputs.iter().zip(&program.outputs).enumerate() {
        if planned.spec.dir != out.dir {
            return Err(bug(format!(
                "plan writes output {index} to {}, the program to {}",
                planned.spec.dir.display(),
                out.dir.display()
            )));
        }
        // Parts of an assembled tensor (a fused MoE layout) are written as one tensor.
        let parts = out.moe.as_deref().map_or(0, |m| {
            m.assembled.iter().map(|a| a.parts.len() - 1).sum::<usize>()
        });
        let generated = out.moe.as_deref().map_or(0, |m| m.generated.len());
        let steps = steps_of[index];
        if planned.spec.tensors.len() + parts != steps + generated {
            return Err(bug(format!(
                "plan lists {} tensors for output {index}, which has {steps} steps, {parts} assembled parts and {generated} generated tensors",
                planned.spec.tensors.len()
            )));
        }
    }
    Ok(())
}

/// One step per output tensor, outputs in script order, each output's tensors in the
/// order the program lists them (natural name order: shards fill in layer order).
fn check_order(plan: &Draft, program: &hir::Program) -> Result<(), Box<Diagnostic>> {
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
fn check_releases(plan: &Draft) -> Result<(), Box<Diagnostic>> {
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
/// is filled, and up to `write_queue` earlier outputs of the same output folder wait for
/// (or are in) the writer; a MoE output's routers are computed before its first step and
/// held until it is written.
fn simulate_peak(plan: &Draft) -> u64 {
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
    // Resident during the steps between its uses that do not read it themselves: added
    // over first+1..last with a running sum (each input once, not once per step between),
    // less the steps in between that read it.
    let mut delta = vec![0i128; plan.steps.len() + 2];
    for &(first, last, bytes) in first_last.values() {
        if first + 1 < last {
            delta[first + 1] += bytes as i128;
            delta[last] -= bytes as i128;
        }
    }
    for (i, step) in plan.steps.iter().enumerate() {
        let mut seen = std::collections::HashSet::new();
        for x in &step.inputs {
            let key = (x.model, x.tensor.as_str());
            match first_last.get(&key) {
                Some(&(first, last, bytes)) if first < i && i < last && seen.insert(key) => {
                    delta[i] -= bytes as i128;
                    delta[i + 1] += bytes as i128;
                }
                _ => {}
            }
        }
    }
    let mut held_between = vec![0u64; plan.steps.len() + 1];
    let mut running = 0i128;
    for (slot, d) in held_between.iter_mut().zip(&delta) {
        running += d;
        *slot = running as u64;
    }
    let mut peak = 0;
    let mut start = 0;
    for (index, output) in plan.outputs.iter().enumerate() {
        let end = start
            + plan.steps[start..]
                .iter()
                .take_while(|s| s.output == index)
                .count();
        let mut generated = 0;
        if let Some(moe) = output.moe.as_deref() {
            // Before the first step: every input read earlier and released later is mapped.
            let mapped: u64 = first_last
                .values()
                .filter(|&&(first, last, _)| first < start && last >= start)
                .map(|&(_, _, bytes)| bytes)
                .sum();
            let routers = crate::ops::cost::router_bytes(moe, &plan.model(moe.base).info);
            peak = peak.max(mapped + routers);
            generated = moe.generated.iter().map(|g| g.nbytes()).sum::<u64>();
        }
        // Each output has a writer of its own, so the queue starts empty.
        let mut queued: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
        for (i, step) in plan.steps.iter().enumerate().take(end).skip(start) {
            // A streamed step holds one block of its output, and of each input it reads
            // for the last time (pages are released block by block); an input read again
            // later stays mapped whole.
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
                + step.kernel.working_bytes(&step.shape, plan.limits_threads)
                + queued.iter().sum::<u64>()
                + generated;
            peak = peak.max(held);
            queued.push_back(output);
            if queued.len() > plan.write_queue {
                queued.pop_front();
            }
        }
        start = end;
    }
    peak + super::scratch_bytes(plan) + super::WRITER_BUFFER_BYTES
}
