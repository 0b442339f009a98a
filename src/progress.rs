//! A run's progress on stderr: one bar per output on a terminal (bytes written against the
//! plan's total, rate, time left, bytes read, the current tensor), or one JSON line per
//! finished step for tools (`--progress json`), or nothing.
//!
//! `exec::run` calls back as each step starts; a step is counted as done when the next one
//! starts, or when the run returns.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{DecimalBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mergec::plan::{Plan, Step};
use mergec::sema::hir::{ModelId, Program};

/// How a run reports its progress.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Mode {
    /// Bars when stderr is a terminal, else nothing.
    Auto,
    /// One JSON object per finished step on stderr.
    Json,
    /// Nothing.
    None,
}

/// The plan's totals for one output.
struct Output {
    dir: String,
    read: u64,
    write: u64,
}

pub struct Progress {
    sink: Sink,
    outputs: Vec<Output>,
    total_steps: usize,
    total_read: u64,
    total_write: u64,
    /// Inputs already read: a tensor read again stays mapped and is not read twice (the
    /// plan's `read_bytes` counts the same way).
    seen: BTreeSet<(ModelId, String)>,
    /// The step in flight: its output, tensor, and the bytes it reads and writes.
    current: Option<(usize, String, u64, u64)>,
    done_steps: usize,
    done_read: u64,
    done_write: u64,
    started: Instant,
}

enum Sink {
    None,
    Json,
    /// A bar per output that has started (so its rate and time left count from its
    /// start), with the bytes it has read so far.
    Bars(MultiProgress, ProgressStyle, Vec<Option<(ProgressBar, u64)>>),
}

impl Progress {
    pub fn new(mode: Mode, plan: &Plan, program: &Program) -> Progress {
        let mut outputs: Vec<Output> = program
            .outputs
            .iter()
            .map(|o| Output {
                dir: o.dir.display().to_string(),
                read: 0,
                write: 0,
            })
            .collect();
        let mut seen = BTreeSet::new();
        // In the order `exec::run` runs them: output by output.
        for (index, output) in outputs.iter_mut().enumerate() {
            for step in plan.steps.iter().filter(|s| s.output == index) {
                output.read += new_reads(&mut seen, step);
                output.write += step.out_bytes();
            }
        }
        let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let sink = match mode {
            Mode::Json => Sink::Json,
            Mode::Auto if interactive => bars(outputs.len()),
            Mode::Auto | Mode::None => Sink::None,
        };
        Progress {
            sink,
            total_steps: plan.steps.len(),
            total_read: outputs.iter().map(|o| o.read).sum(),
            total_write: outputs.iter().map(|o| o.write).sum(),
            outputs,
            seen: BTreeSet::new(),
            current: None,
            done_steps: 0,
            done_read: 0,
            done_write: 0,
            started: Instant::now(),
        }
    }

    /// `exec::run`'s callback: `step` starts, so the one before it is done.
    pub fn step(&mut self, step: &Step) {
        self.complete();
        let read = new_reads(&mut self.seen, step);
        self.current = Some((step.output, step.tensor.clone(), read, step.out_bytes()));
        if let Sink::Bars(multi, style, bars) = &mut self.sink {
            let Some(slot) = bars.get_mut(step.output) else {
                return;
            };
            let Some(output) = self.outputs.get(step.output) else {
                return;
            };
            let (bar, read_so_far) = slot.get_or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(output.write).with_style(style.clone()));
                bar.set_prefix(output.dir.clone());
                bar.enable_steady_tick(Duration::from_millis(200));
                (bar, 0)
            });
            bar.set_message(format!(
                "read {}/{}, now {}",
                DecimalBytes(*read_so_far + read),
                DecimalBytes(output.read),
                step.tensor
            ));
        }
    }

    /// The run returned: its last step is done if it succeeded; the bars go away either way.
    pub fn finish(&mut self, ok: bool) {
        if ok {
            self.complete();
        }
        if let Sink::Bars(multi, _, bars) = &self.sink {
            for (bar, _) in bars.iter().flatten() {
                bar.finish_and_clear();
            }
            let _ = multi.clear();
        }
    }

    fn complete(&mut self) {
        let Some((output, tensor, read, write)) = self.current.take() else {
            return;
        };
        self.done_steps += 1;
        self.done_read += read;
        self.done_write += write;
        match &mut self.sink {
            Sink::None => {}
            Sink::Json => {
                let line = serde_json::json!({
                    "step": self.done_steps,
                    "steps": self.total_steps,
                    "output": output,
                    "dir": self.outputs.get(output).map(|o| o.dir.as_str()),
                    "tensor": tensor,
                    "read_bytes": self.done_read,
                    "written_bytes": self.done_write,
                    "total_read_bytes": self.total_read,
                    "total_write_bytes": self.total_write,
                    "elapsed_s": self.started.elapsed().as_secs_f64(),
                });
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
            Sink::Bars(_, _, bars) => {
                if let Some(Some((bar, read_so_far))) = bars.get_mut(output) {
                    *read_so_far += read;
                    bar.inc(write);
                    if bar.position() >= bar.length().unwrap_or(0) {
                        bar.set_message(format!("read {}, done", DecimalBytes(*read_so_far)));
                        bar.finish();
                    }
                }
            }
        }
    }
}

/// The bytes of `step`'s inputs not read before.
fn new_reads(seen: &mut BTreeSet<(ModelId, String)>, step: &Step) -> u64 {
    step.inputs
        .iter()
        .filter(|i| seen.insert((i.model, i.tensor.clone())))
        .map(|i| i.bytes)
        .sum()
}

fn bars(outputs: usize) -> Sink {
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:24}] {decimal_bytes}/{decimal_total_bytes} written, {decimal_bytes_per_sec}, {eta} left\n  {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    Sink::Bars(multi, style, vec![None; outputs])
}
