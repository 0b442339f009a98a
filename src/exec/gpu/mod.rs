//! The GPU executor: every step as WGSL compute shaders through wgpu, checked against
//! the CPU reference ([`crate::exec::cpu`]).
//!
//! ```text
//!  Step (Kernel::Fused) ──kernels::ElementwiseKernel──▶ KernelKey + constants
//!    ──pipelines (cache by key)──▶ ComputePipeline
//!    ──per slice: buffers (pool) ─ dispatch (2-D grid) ─ staging readback──▶ output bytes
//!  Step (Kernel::Whole) ──whole: the stack program over device tensors──▶ per method,
//!    device primitives (decode, element-wise, reductions, selections, random masks)
//!    ──kernels::device catalogue, pipelines by name──▶ encode ─ readback──▶ output bytes
//! ```
//!
//! One long-lived [`GpuContext`] (device, queue, the adapter's own limits) is created once
//! and handed to [`GpuExecutor::new`]. A tensor larger than one storage binding (128 MiB
//! on many adapters) runs in slices (element-wise steps) or chunks (whole-tensor steps)
//! that fit, one dispatch each. Element-wise slices are double-buffered: the next slice is
//! uploaded and submitted while the previous one computes, and only then is the previous
//! one read back ([`GpuStats::overlapped`]).
//!
//! Exactness: inputs are decoded and outputs rounded (to nearest, ties to even) in
//! integer arithmetic, and every product and quotient is rounded to f32 before it is added
//! (no fused multiply-add), so element-wise results equal the CPU's bit for bit, NaN
//! payloads aside (spec/ops.md: NaN stays NaN, its payload is not guaranteed). Selections
//! and random masks of the methods are exact too; reductions are summed in another order
//! than the CPU's, within the bound of spec/ops.md ("GPU tolerances"). `tests/gpu.rs`
//! checks this on whatever adapter it runs on. What WGSL leaves to the adapter: division
//! may be less than correctly rounded, and f32 subnormals may be flushed to zero; lavapipe
//! does neither.

mod buffers;
mod context;
mod device;
mod dispatch;
mod pipelines;
mod whole;

use std::sync::Mutex;

use crate::io::DType;
use crate::kernels::{ElementwiseKernel, KernelError, ELEMENTS_PER_INVOCATION};
use crate::plan::{Instr, Kernel, Step};

use buffers::BufferPool;
use pipelines::PipelineCache;

pub use context::{list_adapters, AdapterSummary, GpuContext};
pub use dispatch::{grid, Grid};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter's name contains `{name}` (adapters: {available})")]
    AdapterNotFound { name: String, available: String },
    #[error("cannot open a device on the GPU adapter {adapter}: {source}")]
    RequestDevice {
        adapter: String,
        source: wgpu::RequestDeviceError,
    },
    /// The step has no GPU kernel (yet): run it on the CPU instead.
    #[error("not supported on the GPU: {0}")]
    Unsupported(String),
    /// A malformed program or template: an internal error.
    #[error(transparent)]
    Kernel(KernelError),
    #[error("the step has {expected} inputs but {got} were given")]
    InputCount { expected: usize, got: usize },
    #[error("input {slot} has {got} bytes, but its shape and dtype need {expected}")]
    InputSize { slot: usize, expected: u64, got: u64 },
    /// wgpu or the driver failed: validation, out of memory, device lost, mapping.
    #[error("GPU error while {during}: {message}")]
    Device { during: String, message: String },
}

impl GpuError {
    /// Whether the step should run on the CPU instead: the GPU has no kernel for it, or
    /// the adapter's limits rule it out. Other errors are failures.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, GpuError::Unsupported(_))
    }
}

impl From<KernelError> for GpuError {
    fn from(e: KernelError) -> GpuError {
        match e {
            KernelError::Method(_) | KernelError::Dtype { .. } | KernelError::Copy => {
                GpuError::Unsupported(e.to_string())
            }
            _ => GpuError::Kernel(e),
        }
    }
}

/// Runs `f` inside error scopes for validation, out-of-memory and internal errors, so
/// wgpu reports them here, as a [`GpuError::Device`], instead of to its panicking default
/// handler.
fn scope<T>(
    ctx: &GpuContext,
    during: impl FnOnce() -> String,
    f: impl FnOnce() -> Result<T, GpuError>,
) -> Result<T, GpuError> {
    let validation = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let memory = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let internal = ctx.device.push_error_scope(wgpu::ErrorFilter::Internal);
    let result = f();
    // Scopes pop in reverse order.
    let errors = [internal.pop(), memory.pop(), validation.pop()].map(pollster::block_on);
    let message = errors
        .into_iter()
        .flatten()
        .map(|e| e.to_string())
        .chain(ctx.take_fault())
        .collect::<Vec<_>>();
    if !message.is_empty() {
        return Err(GpuError::Device {
            during: during(),
            message: message.join("; "),
        });
    }
    result
}

/// What an executor has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuStats {
    /// Kernel dispatches: one per slice of each tensor.
    pub dispatches: u64,
    /// Dispatches whose grid needed a second dimension.
    pub grids_2d: u64,
    pub bytes_uploaded: u64,
    pub bytes_read_back: u64,
    /// Whole-tensor ([`Kernel::Whole`]) steps computed, methods included.
    pub whole_steps: u64,
    /// Element-wise slices uploaded and submitted while the previous slice was still
    /// computing (double buffering).
    pub overlapped: u64,
}

impl GpuStats {
    fn add(&mut self, other: &GpuStats) {
        self.dispatches += other.dispatches;
        self.grids_2d += other.grids_2d;
        self.bytes_uploaded += other.bytes_uploaded;
        self.bytes_read_back += other.bytes_read_back;
        self.whole_steps += other.whole_steps;
        self.overlapped += other.overlapped;
    }
}

/// Idle pooled buffers kept between tensors.
const DEFAULT_MAX_IDLE_BYTES: u64 = 1 << 30;

/// Computes steps on a GPU: element-wise ([`Kernel::Fused`]) steps, and whole-tensor
/// ([`Kernel::Whole`]) steps whose ops have a GPU implementation (every merge method;
/// not a MoE expert's `noise`). The others, and steps past the adapter's limits
/// (rows longer than a binding for `della*` and `arcee_fusion`), are refused with [`GpuError::Unsupported`], so the caller runs them
/// on the CPU executor instead.
pub struct GpuExecutor {
    ctx: GpuContext,
    pipelines: PipelineCache,
    pool: Mutex<BufferPool>,
    /// Bytes per storage binding: the adapter's limit, or less (see
    /// [`GpuExecutor::with_max_binding_bytes`]).
    max_binding_bytes: u64,
    max_workgroups_per_dimension: u32,
    stats: Mutex<GpuStats>,
}

/// The step's inputs: one per input it reads, each `numel` values of that input's dtype.
fn check_inputs(step: &Step, inputs: &[&[u8]]) -> Result<(), GpuError> {
    if inputs.len() != step.inputs.len() {
        return Err(GpuError::InputCount {
            expected: step.inputs.len(),
            got: inputs.len(),
        });
    }
    for (slot, (input, bytes)) in step.inputs.iter().zip(inputs).enumerate() {
        let expected = step.input_numel(slot) * input.dtype.size_bytes() as u64;
        if bytes.len() as u64 != expected {
            return Err(GpuError::InputSize {
                slot,
                expected,
                got: bytes.len() as u64,
            });
        }
    }
    Ok(())
}

impl GpuExecutor {
    pub fn new(ctx: GpuContext) -> GpuExecutor {
        let limits = &ctx.limits;
        GpuExecutor {
            pool: Mutex::new(BufferPool::new(limits.max_buffer_size, DEFAULT_MAX_IDLE_BYTES)),
            pipelines: PipelineCache::default(),
            max_binding_bytes: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            max_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            stats: Mutex::default(),
            ctx,
        }
    }

    /// Caps the bytes of one storage binding below the adapter's limit: tensors beyond it
    /// run in more, smaller slices. For tests (slicing without gigabyte tensors) and to
    /// bound the device memory a step holds. At least 8 bytes (two f32 elements).
    pub fn with_max_binding_bytes(mut self, bytes: u64) -> GpuExecutor {
        self.max_binding_bytes = bytes.clamp(8, self.max_binding_bytes);
        self
    }

    /// Caps the workgroups per grid dimension below the adapter's limit, so tests reach 2-D
    /// grids with small tensors. At least 1.
    pub fn with_max_workgroups_per_dimension(mut self, groups: u32) -> GpuExecutor {
        self.max_workgroups_per_dimension = groups.clamp(1, self.max_workgroups_per_dimension);
        self
    }

    /// Caps the bytes of idle buffers the pool keeps between uses (1 GiB by default);
    /// buffers beyond it are freed. 0 frees every buffer after use.
    pub fn with_max_idle_bytes(mut self, bytes: u64) -> GpuExecutor {
        let max_buffer_size = self.ctx.limits.max_buffer_size;
        self.pool = Mutex::new(BufferPool::new(max_buffer_size, bytes));
        self
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Pipelines compiled so far (one per distinct [`crate::kernels::KernelKey`]).
    pub fn cached_pipelines(&self) -> usize {
        self.pipelines.len()
    }

    pub fn stats(&self) -> GpuStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees the idle pooled buffers.
    pub fn trim(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Bytes of device memory held by idle pooled buffers.
    pub fn idle_bytes(&self) -> u64 {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).idle_bytes()
    }

    /// Computes `step` over `inputs` (raw bytes, one per input slot) into its output bytes:
    /// the contract of [`crate::exec::CpuExecutor::compute`], with the same bits.
    ///
    /// Steps with a method that has no GPU kernel, and steps that need more bindings or
    /// uniform space than the adapter has (or, for `della*`, rows longer than one storage
    /// binding), return [`GpuError::Unsupported`] ([`GpuError::is_unsupported`]): the
    /// caller computes those on the CPU. A [`Kernel::Copy`] step (normally written
    /// straight from its input) returns its input's bytes.
    pub fn compute(&self, step: &Step, inputs: &[&[u8]]) -> Result<Vec<u8>, GpuError> {
        let program = match &step.kernel {
            Kernel::Fused(program) => program,
            Kernel::Whole(program) => return self.compute_whole(step, program, inputs),
            Kernel::Copy => {
                let mut out = vec![0u8; step.out_bytes() as usize];
                if let Some(first) = inputs.first() {
                    let n = out.len().min(first.len());
                    out[..n].copy_from_slice(&first[..n]);
                }
                return Ok(out);
            }
        };
        let numel = step.numel();
        check_inputs(step, inputs)?;
        let in_dtypes: Vec<DType> = step.inputs.iter().map(|i| i.dtype).collect();
        let kernel = ElementwiseKernel::new(program, &in_dtypes, step.dtype)?;
        self.check_limits(&kernel)?;
        let mut out = vec![0u8; step.out_bytes() as usize];
        if numel == 0 {
            return Ok(out);
        }
        let pipeline = self.pipelines.get(&self.ctx, &kernel.key)?;
        let out_size = step.dtype.size_bytes();
        let slice = self.slice_elements(&in_dtypes, step.dtype, kernel.key.workgroup_size)?;
        // Two slices in flight: the next slice's inputs are uploaded and submitted while
        // the previous one computes, then the previous one is read back.
        let mut start = 0usize;
        let mut pending: Option<(dispatch::InFlight, &mut [u8])> = None;
        for out_slice in out.chunks_mut(slice * out_size) {
            let n = out_slice.len() / out_size;
            let ins: Vec<&[u8]> = inputs
                .iter()
                .zip(&in_dtypes)
                .map(|(bytes, d)| &bytes[start * d.size_bytes()..(start + n) * d.size_bytes()])
                .collect();
            let invocations = (n as u64).div_ceil(ELEMENTS_PER_INVOCATION as u64);
            let grid = grid(
                invocations,
                kernel.key.workgroup_size,
                self.max_workgroups_per_dimension,
            )?;
            // `n` fits in a u32: `slice_elements` caps slices at `u32::MAX`.
            let params = kernel.params(n as u32, grid.row);
            let flight = dispatch::submit(
                &self.ctx,
                &self.pool,
                &pipeline,
                &params,
                &ins,
                grid,
                out_slice.len(),
            )?;
            {
                let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                stats.dispatches += 1;
                stats.grids_2d += u64::from(grid.y > 1);
                stats.bytes_uploaded += ins.iter().map(|b| b.len() as u64).sum::<u64>();
                stats.bytes_read_back += out_slice.len() as u64;
                stats.overlapped += u64::from(pending.is_some());
            }
            if let Some((previous, previous_out)) = pending.take() {
                dispatch::finish(&self.ctx, &self.pool, previous, previous_out)?;
            }
            pending = Some((flight, out_slice));
            start += n;
        }
        if let Some((previous, previous_out)) = pending {
            dispatch::finish(&self.ctx, &self.pool, previous, previous_out)?;
        }
        Ok(out)
    }

    /// A [`Kernel::Whole`] step: its program over device tensors (see [`whole`]).
    fn compute_whole(&self, step: &Step, program: &[Instr], inputs: &[&[u8]]) -> Result<Vec<u8>, GpuError> {
        for instr in program {
            if let Instr::Method { op, compute, .. } = instr {
                if let Some(h) = compute.half() {
                    // The 16-bit methods follow torch op by op on the CPU; see spec/ops.md.
                    return Err(GpuError::Unsupported(format!(
                        "`{}` in {} compute runs on the CPU",
                        op.name(),
                        h.name()
                    )));
                }
                whole::supported(op).map_err(GpuError::Unsupported)?;
            }
        }
        check_inputs(step, inputs)?;
        let numel = step.numel();
        let mut dtypes = Vec::with_capacity(inputs.len());
        for input in &step.inputs {
            if !crate::kernels::computable(input.dtype) {
                return Err(GpuError::Unsupported(format!(
                    "no GPU arithmetic on {} inputs",
                    input.dtype
                )));
            }
            dtypes.push(input.dtype);
        }
        if !crate::kernels::computable(step.dtype) {
            return Err(GpuError::Unsupported(format!(
                "no GPU arithmetic on {} outputs",
                step.dtype
            )));
        }
        let align = whole::row_alignment(program, &step.shape);
        let mut dev = device::Device::new(
            &self.ctx,
            &self.pipelines,
            &self.pool,
            self.max_binding_bytes,
            self.max_workgroups_per_dimension,
            numel as usize,
            align,
        )?;
        let out = scope(
            &self.ctx,
            || format!("computing `{}`", step.tensor),
            || whole::run(&mut dev, program, inputs, &dtypes, &step.shape, step.dtype),
        )?;
        dev.flush();
        dev.stats.whole_steps = 1;
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(&dev.stats);
        Ok(out)
    }

    /// Elements per slice: the most whose bytes fit one binding in every input and the
    /// output and whose invocations fit one grid, even (16-bit values travel in pairs)
    /// and at most `u32::MAX`.
    fn slice_elements(
        &self,
        inputs: &[DType],
        output: DType,
        workgroup_size: u32,
    ) -> Result<usize, GpuError> {
        let widest = inputs
            .iter()
            .chain([&output])
            .map(|d| d.size_bytes() as u64)
            .max()
            .unwrap_or(4);
        let side = self.max_workgroups_per_dimension as u64;
        let grid = side * side * workgroup_size as u64 * ELEMENTS_PER_INVOCATION as u64;
        let elements = (self.max_binding_bytes / widest).min(grid).min(u32::MAX as u64) & !1;
        if elements == 0 {
            return Err(GpuError::Unsupported(format!(
                "a storage binding of {} bytes holds no element pair",
                self.max_binding_bytes
            )));
        }
        Ok(elements as usize)
    }

    fn check_limits(&self, kernel: &ElementwiseKernel) -> Result<(), GpuError> {
        let limits = &self.ctx.limits;
        let storage = kernel.key.inputs.len() as u64 + 1;
        if storage > limits.max_storage_buffers_per_shader_stage as u64 {
            return Err(GpuError::Unsupported(format!(
                "{} inputs need {storage} storage buffers; the adapter allows {}",
                kernel.key.inputs.len(),
                limits.max_storage_buffers_per_shader_stage
            )));
        }
        if storage + 1 > limits.max_bindings_per_bind_group as u64 {
            return Err(GpuError::Unsupported(format!(
                "{} inputs need {} bindings; the adapter allows {}",
                kernel.key.inputs.len(),
                storage + 1,
                limits.max_bindings_per_bind_group
            )));
        }
        let uniform = kernel.params(0, 0).len() as u64;
        if uniform > limits.max_uniform_buffer_binding_size {
            return Err(GpuError::Unsupported(format!(
                "{} constants need a {uniform}-byte uniform; the adapter allows {}",
                kernel.constants.len(),
                limits.max_uniform_buffer_binding_size
            )));
        }
        Ok(())
    }
}
