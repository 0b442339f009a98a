//! Stage 6, run: a [`Plan`] -> Hugging Face model folders and a [`RunReport`].
//!
//! Outputs are written one after another. For each, a writer thread streams tensors into
//! shards while the executor computes the next ones (a bounded queue keeps memory within
//! the plan's peak); copies go from the input's mapped bytes straight to the writer.
//!
//! Imports: `plan` (its only input: the checked [`Plan`] names every file, step and output),
//! `kernels` (WGSL for the GPU), the leaf modules `io`, `ops`, `moe_spec`. Never `sema` or
//! `syntax`: what the program said reaches a run only through the plan.

pub mod cpu;
pub mod gather;
pub mod gpu;
pub mod methods;
pub mod moe;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use crate::io::reader::{ReadError, TensorBytes};
use crate::io::{ModelWriter, TensorReader, WriteError, WrittenModel};
use crate::moe_spec::MoeOutput;
use crate::plan::{Draft, Kernel, Plan, Step, StepInput};

pub use cpu::CpuExecutor;
pub use gpu::{GpuContext, GpuError, GpuExecutor, GpuStats};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot read tensor `{tensor}` of model `{model}`: {source}")]
    Read {
        model: String,
        tensor: String,
        source: ReadError,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("the writer thread of `{0}` stopped unexpectedly")]
    WriterLost(String),
    #[error("cannot compute tensor `{tensor}` on the GPU: {source}")]
    Gpu { tensor: String, source: GpuError },
    #[error("cannot compute the routers of `{dir}`: {source}")]
    Moe { dir: String, source: moe::MoeError },
    #[error("cannot compute tensor `{tensor}`: {source}")]
    Method {
        tensor: String,
        source: methods::MethodError,
    },
    #[error("tensor `{tensor}` of model `{model}` has fewer rows than its vocabulary (a bug in mergec: check compares them)")]
    Gather { tensor: String, model: String },
    #[error("tensor `{0}` is a part of a mixture-of-experts tensor written out of order (a bug in mergec)")]
    PartOrder(String),
}

/// What [`run`] needs of an executor: one step's output bytes from its inputs' bytes
/// (one per input slot, as stored).
pub trait Executor {
    fn compute_step(&self, step: &Step, inputs: &[&[u8]]) -> Result<Vec<u8>, RunError>;
}

impl Executor for CpuExecutor {
    fn compute_step(&self, step: &Step, inputs: &[&[u8]]) -> Result<Vec<u8>, RunError> {
        self.compute(step, inputs).map_err(|source| RunError::Method {
            tensor: step.tensor.clone(),
            source,
        })
    }
}

/// The GPU executor, with the CPU executor for the steps the GPU refuses
/// ([`GpuError::is_unsupported`]): ops without a GPU kernel (a MoE expert's
/// `noise`), and steps past the adapter's limits. Other GPU errors
/// fail the run. [`GpuWithFallback::steps`] counts where the steps ran.
pub struct GpuWithFallback {
    pub gpu: GpuExecutor,
    pub cpu: CpuExecutor,
    on_gpu: AtomicU64,
    on_cpu: AtomicU64,
}

impl GpuWithFallback {
    pub fn new(gpu: GpuExecutor, cpu: CpuExecutor) -> GpuWithFallback {
        GpuWithFallback {
            gpu,
            cpu,
            on_gpu: AtomicU64::new(0),
            on_cpu: AtomicU64::new(0),
        }
    }

    /// Steps computed so far on the GPU and on the CPU.
    pub fn steps(&self) -> (u64, u64) {
        (
            self.on_gpu.load(Ordering::Relaxed),
            self.on_cpu.load(Ordering::Relaxed),
        )
    }
}

impl Executor for GpuWithFallback {
    fn compute_step(&self, step: &Step, inputs: &[&[u8]]) -> Result<Vec<u8>, RunError> {
        match self.gpu.compute(step, inputs) {
            Ok(out) => {
                self.on_gpu.fetch_add(1, Ordering::Relaxed);
                Ok(out)
            }
            Err(e) if e.is_unsupported() => {
                self.on_cpu.fetch_add(1, Ordering::Relaxed);
                self.cpu.compute_step(step, inputs)
            }
            Err(source) => Err(RunError::Gpu {
                tensor: step.tensor.clone(),
                source,
            }),
        }
    }
}

/// What a run did, for the CLI and the benchmark.
#[derive(Debug)]
pub struct RunReport {
    pub outputs: Vec<WrittenModel>,
    pub tensors: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    /// Things worth knowing about the outputs (degenerate MoE routers).
    pub warnings: Vec<String>,
}

/// A computed tensor on its way to the writer.
enum Payload {
    Owned(Vec<u8>),
    /// An unchanged input, written straight from the map; `true` when this is its last use,
    /// so its pages can be released once written.
    Mapped(TensorBytes, bool),
}

/// What the compute loop sends the writer thread: whole tensors, or a streamed tensor as
/// `Begin`, its blocks in order, `End`.
enum Message {
    Tensor(String, Payload),
    Begin(String),
    Block(Vec<u8>),
    End,
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Mapped(b, _) => b,
        }
    }
}

/// Runs every step of the checked `plan` on `executor` and writes every output folder.
pub fn run(
    plan: &Plan,
    executor: &impl Executor,
    reader: &TensorReader,
    mut progress: impl FnMut(&Step),
) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let mut outputs = Vec::new();
    let mut warnings = Vec::new();
    for (index, planned) in plan.outputs.iter().enumerate() {
        let steps: Vec<(usize, &Step)> = plan
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.output == index)
            .collect();
        let spec = planned.spec.clone();
        let dir = spec.dir.display().to_string();
        let moe_spec = planned.moe.as_deref();
        // Routers first: they read the base model, and a failure leaves nothing behind.
        let generated = match moe_spec {
            Some(m) => {
                let g =
                    moe::generate(m, &plan.model(m.base).info, reader).map_err(|source| RunError::Moe {
                        dir: dir.clone(),
                        source,
                    })?;
                warnings.extend(g.warnings.into_iter().map(|w| format!("{dir}: {w}")));
                g.tensors
            }
            None => Vec::new(),
        };
        let assembly = Assembly::new(moe_spec, generated);
        let writer = ModelWriter::create(spec)?;
        let (tx, rx) = mpsc::sync_channel::<Message>(plan.write_queue.saturating_sub(1));
        let written = std::thread::scope(|scope| {
            let handle = scope.spawn(move || write_all(writer, rx, assembly));
            let schedule = Schedule {
                releases: &plan.releases,
                block: plan.stream_block,
            };
            let computed = compute_all(plan, &steps, &schedule, executor, reader, &tx, &mut progress);
            drop(tx);
            let written = handle.join().map_err(|_| RunError::WriterLost(dir.clone()))?;
            // A compute error is the cause when there is one (the writer then only sees its
            // queue close early); otherwise the writer's own result stands. Either way an
            // unfinished writer removes its temporary folder.
            computed.and(written)
        })?;
        outputs.push(written);
    }
    Ok(RunReport {
        // Tensors as written: a fused MoE tensor once, generated routers included.
        tensors: plan.outputs.iter().map(|o| o.spec.tensors.len()).sum(),
        bytes_read: plan.read_bytes,
        bytes_written: outputs.iter().map(|o| o.bytes_written).sum(),
        outputs,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

/// Which inputs each step reads for the last time, and the block size of streamed steps.
struct Schedule<'a> {
    releases: &'a [Vec<usize>],
    block: u64,
}

fn compute_all(
    plan: &Draft,
    steps: &[(usize, &Step)],
    schedule: &Schedule,
    executor: &impl Executor,
    reader: &TensorReader,
    tx: &mpsc::SyncSender<Message>,
    progress: &mut impl FnMut(&Step),
) -> Result<(), RunError> {
    for (position, &(index, step)) in steps.iter().enumerate() {
        progress(step);
        // Read-ahead: the disk reads the next step's inputs while this one computes.
        if let Some((_, next)) = steps.get(position + 1) {
            read_ahead(plan, reader, next);
        }
        // An input used again later (a layer a stack repeats, a tensor two outputs read)
        // stays mapped until the step the plan releases it after, so it is read once.
        let released: Vec<&StepInput> = schedule
            .releases
            .get(index)
            .map(|r| r.iter().filter_map(|&j| step.inputs.get(j)).collect())
            .unwrap_or_default();
        let last = |i: &StepInput| {
            released
                .iter()
                .any(|r| r.model == i.model && r.tensor == i.tensor)
        };
        let inputs = step
            .inputs
            .iter()
            .map(|i| read_input(plan, reader, i))
            .collect::<Result<Vec<InputBytes>, RunError>>()?;
        if step.streamed(schedule.block) {
            if !stream_step(step, schedule.block, &inputs, &last, executor, tx)? {
                return Ok(()); // the writer stopped; its own error is reported by the caller
            }
            continue;
        }
        let payload = match (&step.kernel, inputs.first()) {
            (Kernel::Copy, Some(InputBytes::Mapped(bytes))) => {
                Payload::Mapped(bytes.clone(), step.inputs.first().is_some_and(last))
            }
            (Kernel::Copy, Some(InputBytes::Gathered(bytes))) => Payload::Owned(bytes.clone()),
            _ => {
                let slices: Vec<&[u8]> = inputs.iter().map(|b| &b[..]).collect();
                let out = executor.compute_step(step, &slices);
                for (bytes, input) in inputs.iter().zip(&step.inputs) {
                    if last(input) {
                        bytes.release();
                    }
                }
                Payload::Owned(out?)
            }
        };
        if tx.send(Message::Tensor(step.tensor.clone(), payload)).is_err() {
            // The writer stopped; its own error is reported by the caller.
            return Ok(());
        }
    }
    Ok(())
}

/// A step input's bytes: mapped as stored, or the rows of an embedding surgery.
enum InputBytes {
    Mapped(TensorBytes),
    Gathered(Vec<u8>),
}

impl std::ops::Deref for InputBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            InputBytes::Mapped(b) => b,
            InputBytes::Gathered(v) => v,
        }
    }
}

impl InputBytes {
    fn release(&self) {
        if let InputBytes::Mapped(b) = self {
            b.release();
        }
    }

    fn release_part(&self, from: usize, to: usize) {
        if let InputBytes::Mapped(b) = self {
            b.release_part(from, to);
        }
    }
}

/// Reads one step input: its mapped bytes, or for an embedding surgery the rows gathered
/// from the tensors it names (each released once gathered; the result is as large as the
/// output's tensor).
fn read_input(plan: &Draft, reader: &TensorReader, input: &StepInput) -> Result<InputBytes, RunError> {
    let read = |model: crate::ids::ModelId, tensor: &str| {
        let info = &plan.model(model).info;
        reader.read(info, tensor).map_err(|source| RunError::Read {
            model: info.reference.clone(),
            tensor: tensor.to_string(),
            source,
        })
    };
    let Some(g) = &input.gather else {
        return read(input.model, &input.tensor).map(InputBytes::Mapped);
    };
    let sources = g
        .sources
        .iter()
        .map(|(m, t, _)| read(*m, t))
        .collect::<Result<Vec<TensorBytes>, RunError>>()?;
    let slices: Vec<&[u8]> = sources.iter().map(|b| &b[..]).collect();
    let out = gather::gather(g, &slices).map_err(|i| RunError::Gather {
        tensor: g.sources[i].1.clone(),
        model: plan.model(g.sources[i].0).name.clone(),
    })?;
    // The rows are copied out: the sources' pages go back (read again if needed later), so
    // a run over large vocabularies holds the gathered tensors, not every input's.
    sources.iter().for_each(TensorBytes::release);
    Ok(InputBytes::Gathered(out))
}

/// Bytes of one step's inputs [`read_ahead`] asks for at most.
const READ_AHEAD_BYTES: usize = 64 << 20;

/// Starts the disk on `step`'s inputs (the page cache holds them, not this process).
fn read_ahead(plan: &Draft, reader: &TensorReader, step: &Step) {
    let mut left = READ_AHEAD_BYTES;
    for input in &step.inputs {
        if left == 0 {
            break;
        }
        // An error here is reported when the step itself reads the tensor.
        if let Ok(bytes) = reader.read(&plan.model(input.model).info, &input.tensor) {
            bytes.will_need(left);
            left = left.saturating_sub(bytes.len());
        }
    }
}

/// Computes an element-wise step block by block and streams the blocks to the writer,
/// releasing each input's pages block by block where this is its last use. Returns false
/// when the writer has stopped.
fn stream_step(
    step: &Step,
    block: u64,
    inputs: &[InputBytes],
    last: &impl Fn(&StepInput) -> bool,
    executor: &impl Executor,
    tx: &mpsc::SyncSender<Message>,
) -> Result<bool, RunError> {
    if tx.send(Message::Begin(step.tensor.clone())).is_err() {
        return Ok(false);
    }
    let n = step.numel() as usize;
    let block = block as usize;
    let mut start = 0;
    while start < n {
        let end = (start + block).min(n);
        let part = Step {
            shape: vec![end - start],
            ..step.clone()
        };
        let slices: Vec<&[u8]> = inputs
            .iter()
            .zip(&step.inputs)
            .map(|(bytes, input)| {
                let size = input.dtype.size_bytes();
                &bytes[start * size..end * size]
            })
            .collect();
        let out = executor.compute_step(&part, &slices)?;
        for (bytes, input) in inputs.iter().zip(&step.inputs) {
            if last(input) {
                let size = input.dtype.size_bytes();
                bytes.release_part(start * size, end * size);
            }
        }
        if tx.send(Message::Block(out)).is_err() {
            return Ok(false);
        }
        start = end;
    }
    Ok(tx.send(Message::End).is_ok())
}

/// How computed tensors become written ones: parts of an assembled tensor (a MoE's fused
/// experts) go one after another into it, and generated tensors (routers) come last.
struct Assembly {
    /// Part name -> (assembled name, its index, number of parts).
    parts: HashMap<String, (String, usize, usize)>,
    generated: Vec<(String, Vec<u8>)>,
}

impl Assembly {
    fn new(moe: Option<&MoeOutput>, generated: Vec<(String, Vec<u8>)>) -> Assembly {
        let mut parts = HashMap::new();
        for a in moe.map(|m| m.assembled.as_slice()).unwrap_or_default() {
            for (k, p) in a.parts.iter().enumerate() {
                parts.insert(p.clone(), (a.name.clone(), k, a.parts.len()));
            }
        }
        Assembly { parts, generated }
    }
}

/// Writes the tensors the compute loop sends, then the generated ones.
fn write_all(
    mut writer: ModelWriter,
    rx: mpsc::Receiver<Message>,
    assembly: Assembly,
) -> Result<WrittenModel, RunError> {
    // The part being streamed (its index and count), if any.
    let mut streaming: Option<(usize, usize)> = None;
    // The next part expected: (assembled name, index).
    let mut expected: Option<(String, usize)> = None;
    let mut begin_part = |writer: &mut ModelWriter, name: &str| -> Result<Option<(usize, usize)>, RunError> {
        let Some((whole, k, n)) = assembly.parts.get(name) else {
            return Ok(None);
        };
        let in_order = match &expected {
            Some((w, next)) => w == whole && next == k,
            None => *k == 0,
        };
        if !in_order {
            return Err(RunError::PartOrder(name.to_string()));
        }
        if *k == 0 {
            writer.begin_tensor(whole)?;
        }
        expected = (k + 1 < *n).then(|| (whole.clone(), k + 1));
        Ok(Some((*k, *n)))
    };
    for message in rx {
        match message {
            Message::Tensor(name, payload) => {
                match begin_part(&mut writer, &name)? {
                    Some((k, n)) => {
                        writer.write_bytes(payload.bytes())?;
                        if k + 1 == n {
                            writer.end_tensor()?;
                        }
                    }
                    None => writer.write_tensor(&name, payload.bytes())?,
                }
                if let Payload::Mapped(bytes, true) = &payload {
                    bytes.release();
                }
            }
            Message::Begin(name) => match begin_part(&mut writer, &name)? {
                Some(part) => streaming = Some(part),
                None => writer.begin_tensor(&name)?,
            },
            Message::Block(bytes) => writer.write_bytes(&bytes)?,
            Message::End => match streaming.take() {
                Some((k, n)) if k + 1 < n => {}
                _ => writer.end_tensor()?,
            },
        }
    }
    for (name, bytes) in &assembly.generated {
        writer.write_tensor(name, bytes)?;
    }
    Ok(writer.finish()?)
}
