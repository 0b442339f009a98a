//! Device tensors and the primitive operations the whole-tensor methods are built from:
//! uploads that decode stored bytes to f32, element-wise kernels, reductions read back as
//! partial sums and added on the host in f64, selection histograms, random masks, and the
//! final rounding to the output dtype.
//!
//! Every tensor of one step has the step's element count and is split into the same
//! chunks of at most [`Device::cap`] elements, each chunk its own buffer, no larger than
//! one storage binding. A kernel is dispatched once per chunk. Commands are recorded into
//! one encoder and submitted when a result is read back or before an upload (an upload may
//! reuse a pooled buffer that recorded commands still read).

use std::sync::Mutex;

use wgpu::util::DeviceExt;

use super::buffers::{BufferPool, Role};
use super::dispatch::{align4, binding, grid, read_back, upload};
use super::pipelines::PipelineCache;
use super::{GpuContext, GpuError, GpuStats};
use crate::exec::methods::chunks::chunk_range_of;
use crate::io::DType;
use crate::kernels::device::device_kernel;
use crate::kernels::WORKGROUP_SIZE;

/// Elements summed by one invocation of a reduction.
pub(crate) const SEGMENT: u32 = 256;

/// A buffer and the bytes of it in use.
pub(crate) struct Buf {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) bytes: u64,
}

/// An f32 tensor on the device, one buffer per chunk.
pub(crate) struct Tensor {
    pub(crate) chunks: Vec<Buf>,
}

/// One bit per element, 32 to a u32 word, one buffer per chunk.
pub(crate) struct Mask {
    pub(crate) chunks: Vec<Buf>,
}

/// The integer and float parameters of one dispatch (`struct Params` in
/// `shaders/device.wgsl`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Params {
    pub(crate) n: u32,
    pub(crate) start: u32,
    pub(crate) u: [u32; 12],
    pub(crate) f: [f32; 8],
}

impl Params {
    /// These parameters for the elements `lo..hi` (one chunk's count and start).
    pub(crate) fn over(self, lo: usize, hi: usize) -> Params {
        Params {
            n: (hi - lo) as u32,
            start: lo as u32,
            ..self
        }
    }

    pub(crate) fn u(mut self, values: &[u32]) -> Params {
        self.u[..values.len()].copy_from_slice(values);
        self
    }

    pub(crate) fn f(mut self, values: &[f32]) -> Params {
        self.f[..values.len()].copy_from_slice(values);
        self
    }

    fn bytes(&self, row: u32) -> Vec<u8> {
        let mut words = vec![self.n, row, 0, self.start];
        words.extend_from_slice(&self.u);
        words.extend(self.f.iter().map(|x| x.to_bits()));
        bytemuck::cast_slice(&words).to_vec()
    }
}

/// The vectors a reduction sums over: element `j` of vector `v` is the global index
/// `v·sv + j·sj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Vectors {
    pub(crate) count: usize,
    pub(crate) len: usize,
    pub(crate) sv: usize,
    pub(crate) sj: usize,
}

impl Vectors {
    /// The whole tensor as one vector.
    pub(crate) fn flat(n: usize) -> Vectors {
        Vectors {
            count: 1,
            len: n,
            sv: 0,
            sj: 1,
        }
    }

    /// Consecutive rows of `len`.
    pub(crate) fn rows(n: usize, len: usize) -> Vectors {
        let len = len.max(1);
        Vectors {
            count: n / len,
            len,
            sv: len,
            sj: 1,
        }
    }

    /// Columns: `len` leading indices of `inner` elements each.
    pub(crate) fn cols(len: usize, inner: usize) -> Vectors {
        Vectors {
            count: inner,
            len,
            sv: 1,
            sj: inner.max(1),
        }
    }
}

/// The GPU state of one step: what it dispatches with, and its counters.
pub(crate) struct Device<'a> {
    pub(crate) ctx: &'a GpuContext,
    pipelines: &'a PipelineCache,
    pool: &'a Mutex<BufferPool>,
    max_workgroups: u32,
    /// Elements of every tensor of the step.
    pub(crate) n: usize,
    /// Elements per chunk: a multiple of the rows that must stay whole, else of 64.
    pub(crate) cap: usize,
    encoder: Option<wgpu::CommandEncoder>,
    /// Buffers given back while recorded commands may still use them (see [`Device::give`]).
    retired: Mutex<Vec<(Role, wgpu::Buffer)>>,
    pub(crate) stats: GpuStats,
}

impl<'a> Device<'a> {
    pub(crate) fn new(
        ctx: &'a GpuContext,
        pipelines: &'a PipelineCache,
        pool: &'a Mutex<BufferPool>,
        max_binding_bytes: u64,
        max_workgroups: u32,
        n: usize,
        align: usize,
    ) -> Result<Device<'a>, GpuError> {
        if n as u64 >= 1 << 31 {
            return Err(GpuError::Unsupported(format!(
                "{n} elements: whole-tensor kernels index elements with 31-bit integers"
            )));
        }
        let side = max_workgroups.max(1) as u64;
        let by_grid = side * side * WORKGROUP_SIZE as u64;
        let most = (max_binding_bytes / 4).min(by_grid).min(u32::MAX as u64 / 2) as usize;
        // Kernels index chunks locally, so any chunk length works; rows that must stay
        // whole (`align`) set it, otherwise a multiple of 64 keeps 16-bit pairs and mask
        // words of every chunk full.
        let unit = if align > 1 { align } else { 64 };
        let cap = most / unit * unit;
        if cap == 0 {
            return Err(GpuError::Unsupported(format!(
                "a chunk of whole rows of {align} elements does not fit one storage binding of {max_binding_bytes} bytes"
            )));
        }
        Ok(Device {
            ctx,
            pipelines,
            pool,
            max_workgroups,
            n,
            cap,
            encoder: None,
            retired: Mutex::default(),
            stats: GpuStats::default(),
        })
    }

    /// The element ranges of the chunks.
    pub(crate) fn ranges(&self) -> Vec<(usize, usize)> {
        (0..self.n.div_ceil(self.cap))
            .map(|c| chunk_range_of(c, self.n, self.cap))
            .map(|r| (r.start, r.end))
            .collect()
    }

    fn take(&self, role: Role, bytes: u64) -> Buf {
        let bytes = bytes.max(4);
        let buffer = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&self.ctx.device, role, bytes);
        Buf { buffer, bytes }
    }

    /// Returns a buffer to the pool once the commands recorded so far are submitted: the
    /// pool may destroy a buffer it has no room for, and a submission that uses a
    /// destroyed buffer fails.
    fn give(&self, role: Role, b: Buf) {
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((role, b.buffer));
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        let device = &self.ctx.device;
        self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("mergec method"),
            })
        })
    }

    /// Submits the recorded commands, then returns the buffers they were the last to use
    /// to the pool (wgpu keeps a destroyed buffer alive until submitted work is done).
    pub(crate) fn flush(&mut self) {
        if let Some(encoder) = self.encoder.take() {
            self.ctx.queue.submit([encoder.finish()]);
        }
        let retired: Vec<(Role, wgpu::Buffer)> = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        for (role, buffer) in retired {
            pool.give(role, buffer);
        }
    }

    /// A new tensor, its contents undefined.
    pub(crate) fn alloc(&self) -> Tensor {
        Tensor {
            chunks: self
                .ranges()
                .iter()
                .map(|(a, b)| self.take(Role::Work, ((b - a) * 4) as u64))
                .collect(),
        }
    }

    /// A new tensor of zeros (+0.0).
    pub(crate) fn zeros(&mut self) -> Tensor {
        let t = self.alloc();
        for c in &t.chunks {
            let bytes = c.bytes;
            self.encoder().clear_buffer(&c.buffer, 0, Some(bytes));
        }
        t
    }

    /// A new mask, its contents undefined.
    pub(crate) fn alloc_mask(&self) -> Mask {
        Mask {
            chunks: self
                .ranges()
                .iter()
                .map(|(a, b)| self.take(Role::Work, ((b - a).div_ceil(32) * 4) as u64))
                .collect(),
        }
    }

    /// Sets every bit of `m` to 0.
    pub(crate) fn clear_mask(&mut self, m: &Mask) {
        for c in &m.chunks {
            let bytes = c.bytes;
            self.encoder().clear_buffer(&c.buffer, 0, Some(bytes));
        }
    }

    /// A copy of `t`.
    pub(crate) fn copy(&mut self, t: &Tensor) -> Tensor {
        let out = self.alloc();
        for (src, dst) in t.chunks.iter().zip(&out.chunks) {
            let bytes = src.bytes;
            self.encoder()
                .copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, bytes);
        }
        out
    }

    /// A small buffer of `values` (coefficients, budgets), not chunked.
    pub(crate) fn small<T: bytemuck::Pod>(&mut self, values: &[T]) -> Buf {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let b = self.take(Role::Work, bytes.len() as u64);
        self.flush();
        upload(&self.ctx.queue, &b.buffer, bytes);
        self.stats.bytes_uploaded += bytes.len() as u64;
        b
    }

    /// A small buffer of `words` zero words.
    pub(crate) fn zeros_small(&mut self, words: usize) -> Buf {
        let b = self.take(Role::Work, (words * 4) as u64);
        let bytes = b.bytes;
        self.encoder().clear_buffer(&b.buffer, 0, Some(bytes));
        b
    }

    pub(crate) fn give_small(&self, b: Buf) {
        self.give(Role::Work, b);
    }

    /// Returns a tensor's buffers to the pool.
    pub(crate) fn free(&self, t: Tensor) {
        for c in t.chunks {
            self.give(Role::Work, c);
        }
    }

    pub(crate) fn free_mask(&self, m: Mask) {
        for c in m.chunks {
            self.give(Role::Work, c);
        }
    }

    /// Stored bytes of `dtype` (the whole tensor) decoded to a new f32 tensor.
    pub(crate) fn upload(&mut self, bytes: &[u8], dtype: DType) -> Result<Tensor, GpuError> {
        let size = dtype.size_bytes();
        if bytes.len() != self.n * size {
            return Err(GpuError::InputSize {
                slot: 0,
                expected: (self.n * size) as u64,
                got: bytes.len() as u64,
            });
        }
        let kernel = match dtype {
            DType::F32 => None,
            DType::BF16 => Some("decode_bf16"),
            DType::F16 => Some("decode_f16"),
            other => {
                return Err(GpuError::Unsupported(format!(
                    "no GPU arithmetic on {other} inputs"
                )))
            }
        };
        let t = self.alloc();
        for (&(a, b), dst) in self.ranges().iter().zip(&t.chunks) {
            let part = &bytes[a * size..b * size];
            // An upload lands before the commands recorded so far unless they go first.
            self.flush();
            self.stats.bytes_uploaded += part.len() as u64;
            match kernel {
                None => upload(&self.ctx.queue, &dst.buffer, part),
                Some(name) => {
                    let staged = self.take(Role::Input, align4(part.len()));
                    upload(&self.ctx.queue, &staged.buffer, part);
                    let p = Params::default().over(a, b);
                    self.dispatch(name, &[&staged, dst], p, (b - a) as u64)?;
                    // Reused only by a later upload, which flushes first.
                    self.give(Role::Input, staged);
                }
            }
        }
        Ok(t)
    }

    /// Runs kernel `name` once over `invocations` with `buffers` bound from binding 1.
    pub(crate) fn dispatch(
        &mut self,
        name: &'static str,
        buffers: &[&Buf],
        p: Params,
        invocations: u64,
    ) -> Result<(), GpuError> {
        if invocations == 0 {
            return Ok(());
        }
        let kernel = device_kernel(name).ok_or_else(|| GpuError::Device {
            during: "choosing a kernel".to_string(),
            message: format!("internal error: no device kernel `{name}`"),
        })?;
        let pipeline = self.pipelines.get_device(self.ctx, kernel)?;
        let g = grid(invocations, WORKGROUP_SIZE, self.max_workgroups)?;
        let uniform = self
            .ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("mergec params"),
                contents: &p.bytes(g.row),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: binding(&b.buffer, b.bytes),
            });
        }
        let group = self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(name),
            layout: &pipeline.layout,
            entries: &entries,
        });
        {
            let mut pass = self.encoder().begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(name),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(g.x, g.y, 1);
        }
        self.stats.dispatches += 1;
        self.stats.grids_2d += u64::from(g.y > 1);
        Ok(())
    }

    /// An element-wise kernel over every chunk: `tensors` are bound chunk by chunk, `p`
    /// gets each chunk's count and start.
    pub(crate) fn map(&mut self, name: &'static str, tensors: &[&Tensor], p: Params) -> Result<(), GpuError> {
        for (c, (a, b)) in self.ranges().into_iter().enumerate() {
            let bufs: Vec<&Buf> = tensors.iter().map(|t| &t.chunks[c]).collect();
            let p = p.over(a, b);
            self.dispatch(name, &bufs, p, (b - a) as u64)?;
        }
        Ok(())
    }

    /// Reads buffers back, all in one submit.
    pub(crate) fn read(&mut self, bufs: &[&Buf]) -> Result<Vec<Vec<u8>>, GpuError> {
        let total: u64 = bufs.iter().map(|b| align4(b.bytes as usize)).sum();
        if total == 0 {
            return Ok(bufs.iter().map(|_| Vec::new()).collect());
        }
        let staging = self.take(Role::Staging, total);
        let mut at = 0u64;
        for b in bufs {
            let bytes = align4(b.bytes as usize);
            self.encoder()
                .copy_buffer_to_buffer(&b.buffer, 0, &staging.buffer, at, bytes);
            at += bytes;
        }
        self.flush();
        let mut all = vec![0u8; total as usize];
        read_back(self.ctx, &staging.buffer, total, &mut all)?;
        self.give(Role::Staging, staging);
        self.stats.bytes_read_back += total;
        let mut out = Vec::with_capacity(bufs.len());
        let mut at = 0usize;
        for b in bufs {
            out.push(all[at..at + b.bytes as usize].to_vec());
            at += align4(b.bytes as usize) as usize;
        }
        Ok(out)
    }

    /// The tensor rounded to `dtype`, as stored bytes.
    pub(crate) fn download(&mut self, t: &Tensor, dtype: DType) -> Result<Vec<u8>, GpuError> {
        let kernel = match dtype {
            DType::F32 => None,
            DType::BF16 => Some("encode_bf16"),
            DType::F16 => Some("encode_f16"),
            other => {
                return Err(GpuError::Unsupported(format!(
                    "no GPU arithmetic on {other} outputs"
                )))
            }
        };
        let size = dtype.size_bytes();
        let mut out = Vec::with_capacity(self.n * size);
        let ranges = self.ranges();
        let mut encoded = Vec::new();
        if let Some(name) = kernel {
            for (&(a, b), src) in ranges.iter().zip(&t.chunks) {
                let words = self.take(Role::Work, ((b - a).div_ceil(2) * 4) as u64);
                let p = Params::default().over(a, b);
                self.dispatch(name, &[src, &words], p, (b - a).div_ceil(2) as u64)?;
                encoded.push(words);
            }
        }
        let sources: Vec<&Buf> = if kernel.is_some() {
            encoded.iter().collect()
        } else {
            t.chunks.iter().collect()
        };
        let parts = self.read(&sources)?;
        for (&(a, b), part) in ranges.iter().zip(&parts) {
            out.extend_from_slice(&part[..(b - a) * size]);
        }
        for w in encoded {
            self.give(Role::Work, w);
        }
        Ok(out)
    }

    /// Per vector, `Σ a·b` for each pair: one reduction pass per pair, one readback for
    /// all. Partial sums of segments are added in f64, per vector in chunk order then
    /// segment order.
    pub(crate) fn dots(
        &mut self,
        pairs: &[(&Tensor, &Tensor)],
        vectors: Vectors,
    ) -> Result<Vec<Vec<f64>>, GpuError> {
        Ok(self
            .segment_sums("dot", pairs, vectors, 1)?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Per vector, `(Σ a·a, Σ b·b, Σ a·b)` in one pass over `a` and `b`, the same sums
    /// as [`Device::dots`] gives.
    pub(crate) fn dots3(
        &mut self,
        a: &Tensor,
        b: &Tensor,
        vectors: Vectors,
    ) -> Result<[Vec<f64>; 3], GpuError> {
        let mut sums = self.segment_sums("dot3", &[(a, b)], vectors, 3)?;
        let mut three = sums.pop().unwrap_or_default().into_iter();
        let mut next = || three.next().unwrap_or_default();
        Ok([next(), next(), next()])
    }

    /// Runs reduction `kernel` (`shaders/reduce.wgsl`: `sums` partial sums of
    /// (hi, lo, exponent) per invocation) over each pair; per pair, `sums` sums per vector.
    fn segment_sums(
        &mut self,
        kernel: &'static str,
        pairs: &[(&Tensor, &Tensor)],
        vectors: Vectors,
        sums: usize,
    ) -> Result<Vec<Vec<Vec<f64>>>, GpuError> {
        let seg = SEGMENT as usize;
        let nseg = vectors.len.div_ceil(seg).max(1);
        let stride = 12 * sums;
        let mut partials: Vec<Buf> = Vec::new();
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (first vector, vectors) per chunk
        let ranges = self.ranges();
        let limit = self.ctx.limits.max_storage_buffer_binding_size;
        for &(lo, hi) in &ranges {
            let (v0, nv, _, ns) = chunk_segments(vectors, lo, hi, nseg);
            let inv = nv * ns;
            if (inv * stride) as u64 > limit {
                return Err(GpuError::Unsupported(format!(
                    "{inv} partial sums do not fit one storage binding"
                )));
            }
            plan.push((v0, nv));
        }
        for (a, b) in pairs {
            for (c, &(lo, hi)) in ranges.iter().enumerate() {
                let (v0, nv, s0, ns) = chunk_segments(vectors, lo, hi, nseg);
                let inv = nv * ns;
                let out = self.take(Role::Work, (inv.max(1) * stride) as u64);
                let p = Params {
                    n: inv as u32,
                    start: lo as u32,
                    ..Params::default()
                }
                .u(&[
                    v0 as u32,
                    nv as u32,
                    s0 as u32,
                    vectors.len as u32,
                    vectors.sv as u32,
                    vectors.sj as u32,
                    SEGMENT,
                    (hi - lo) as u32,
                ]);
                self.dispatch(kernel, &[&a.chunks[c], &b.chunks[c], &out], p, inv as u64)?;
                partials.push(Buf {
                    buffer: out.buffer,
                    bytes: (inv * stride) as u64,
                });
            }
        }
        let read = self.read(&partials.iter().collect::<Vec<_>>())?;
        for b in partials {
            self.give(Role::Work, b);
        }
        let mut out = Vec::with_capacity(pairs.len());
        let mut parts = read.iter();
        for _ in pairs {
            let mut acc = vec![vec![0f64; vectors.count.max(1)]; sums];
            for &(v0, nv) in &plan {
                let Some(part) = parts.next() else { break };
                for (id, t) in part.chunks_exact(stride).enumerate() {
                    let v = v0 + id % nv.max(1);
                    for (k, a) in acc.iter_mut().enumerate() {
                        if let Some(a) = a.get_mut(v) {
                            *a += partial(t, 12 * k);
                        }
                    }
                }
            }
            for a in &mut acc {
                a.truncate(vectors.count);
            }
            out.push(acc);
        }
        Ok(out)
    }

    /// `(Σ|x|, Σ|x| over the mask's elements)` over the whole tensor.
    pub(crate) fn l1(&mut self, x: &Tensor, mask: &Mask) -> Result<(f64, f64), GpuError> {
        let seg = SEGMENT as usize;
        let mut partials = Vec::new();
        for (c, (a, b)) in self.ranges().into_iter().enumerate() {
            let inv = (b - a).div_ceil(seg);
            let out = self.take(Role::Work, (inv * 20) as u64);
            let p = Params {
                n: inv as u32,
                start: a as u32,
                ..Params::default()
            }
            .u(&[SEGMENT, (b - a) as u32]);
            self.dispatch("l1", &[&x.chunks[c], &mask.chunks[c], &out], p, inv as u64)?;
            partials.push(Buf {
                buffer: out.buffer,
                bytes: (inv * 20) as u64,
            });
        }
        let read = self.read(&partials.iter().collect::<Vec<_>>())?;
        for b in partials {
            self.give(Role::Work, b);
        }
        let (mut all, mut kept) = (0f64, 0f64);
        for part in &read {
            for t in part.chunks_exact(20) {
                all += partial(&[&t[0..8], &t[16..20]].concat(), 0);
                kept += partial(&t[8..20], 0);
            }
        }
        Ok((all, kept))
    }
}

impl Drop for Device<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// One partial sum `(hi, lo, exponent)` at byte `at` of `t`: `(hi + lo)·2^exponent`.
fn partial(t: &[u8], at: usize) -> f64 {
    let f = |i: usize| f32::from_le_bytes([t[at + i], t[at + i + 1], t[at + i + 2], t[at + i + 3]]);
    let (hi, lo, exp) = (f(0), f(4), f(8));
    (f64::from(hi) + f64::from(lo)) * 2f64.powi(exp as i32)
}

/// For the chunk `[lo, hi)`: the first vector and count, the first segment and count
/// of the invocations that may touch it.
fn chunk_segments(v: Vectors, lo: usize, hi: usize, nseg: usize) -> (usize, usize, usize, usize) {
    let seg = SEGMENT as usize;
    if hi <= lo {
        return (0, 0, 0, 0);
    }
    if v.sv == 0 || v.count <= 1 {
        // One vector, contiguous when sj = 1.
        if v.sj == 1 {
            return (0, 1, lo / seg, (hi - 1) / seg - lo / seg + 1);
        }
        return (0, 1, 0, nseg);
    }
    if v.sj == 1 {
        // Rows.
        let v0 = lo / v.sv;
        let v1 = ((hi - 1) / v.sv).min(v.count.saturating_sub(1));
        let nv = v1.saturating_sub(v0) + 1;
        if nv == 1 {
            let s0 = (lo - v0 * v.sv) / seg;
            let s1 = ((hi - 1 - v0 * v.sv) / seg).min(nseg - 1);
            return (v0, 1, s0, s1.saturating_sub(s0) + 1);
        }
        return (v0, nv, 0, nseg);
    }
    // Columns: every vector, the segments of the leading indices in the chunk.
    let r0 = lo / v.sj;
    let r1 = (hi - 1) / v.sj;
    let s0 = r0 / seg;
    let s1 = (r1 / seg).min(nseg - 1);
    (0, v.count, s0, s1.saturating_sub(s0) + 1)
}
