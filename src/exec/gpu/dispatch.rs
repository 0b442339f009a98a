//! One dispatch of a kernel over one slice: uploads, bind group, workgroup grid, submit,
//! and the readback through a staging buffer.

use std::num::NonZeroU64;
use std::sync::{mpsc, Mutex};

use super::buffers::{BufferPool, Role};
use super::pipelines::Pipeline;
use super::{scope, GpuContext, GpuError};

/// The workgroups of a dispatch. One dimension holds at most the adapter's
/// `max_compute_workgroups_per_dimension` (65535 on most), so larger dispatches are 2-D:
/// `y` rows of `x` workgroups, and the kernel numbers its invocations
/// `gid.y * row + gid.x` and skips those past the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub x: u32,
    pub y: u32,
    /// Invocations per row: `x * workgroup_size`.
    pub row: u32,
}

/// The grid for `invocations` in workgroups of `workgroup_size`.
pub fn grid(invocations: u64, workgroup_size: u32, max_per_dimension: u32) -> Result<Grid, GpuError> {
    let groups = invocations.div_ceil(workgroup_size.max(1) as u64).max(1);
    let max = max_per_dimension.max(1) as u64;
    let y = groups.div_ceil(max);
    let x = groups.div_ceil(y);
    let row = x * workgroup_size as u64;
    if y > max || row > u32::MAX as u64 {
        return Err(GpuError::Unsupported(format!(
            "{invocations} invocations need {groups} workgroups, more than a {max} x {max} grid"
        )));
    }
    Ok(Grid {
        x: x as u32,
        y: y as u32,
        row: row as u32,
    })
}

pub(super) fn align4(bytes: usize) -> u64 {
    bytes.next_multiple_of(4) as u64
}

/// Writes `bytes` at the start of `buffer`; a tail of 1 to 3 bytes is padded with zeros
/// (copies move whole 4-byte words).
pub(super) fn upload(queue: &wgpu::Queue, buffer: &wgpu::Buffer, bytes: &[u8]) {
    let whole = bytes.len() & !3;
    if whole > 0 {
        queue.write_buffer(buffer, 0, &bytes[..whole]);
    }
    if whole < bytes.len() {
        let mut tail = [0u8; 4];
        tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
        queue.write_buffer(buffer, whole as u64, &tail);
    }
}

pub(super) fn binding(buffer: &wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: NonZeroU64::new(bytes),
    })
}

/// A slice submitted to the queue whose result is not read back yet: its buffers, and the
/// staging buffer's map request.
pub(crate) struct InFlight {
    in_buffers: Vec<wgpu::Buffer>,
    out_buffer: wgpu::Buffer,
    params_buffer: wgpu::Buffer,
    staging: wgpu::Buffer,
    out_bytes: u64,
    submission: wgpu::SubmissionIndex,
    mapped: mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
}

/// Uploads one slice's inputs, dispatches `pipeline` over them, copies the output to a
/// staging buffer and asks for it to be mapped, without waiting: the caller can prepare
/// the next slice while this one computes, then [`finish`]es it.
pub(crate) fn submit(
    ctx: &GpuContext,
    pool: &Mutex<BufferPool>,
    pipeline: &Pipeline,
    params: &[u8],
    inputs: &[&[u8]],
    grid: Grid,
    out_len: usize,
) -> Result<InFlight, GpuError> {
    let device = &ctx.device;
    let out_bytes = align4(out_len);
    let (in_buffers, out_buffer, params_buffer, staging) = {
        let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
        let ins: Vec<wgpu::Buffer> = inputs
            .iter()
            .map(|b| pool.take(device, Role::Input, align4(b.len())))
            .collect();
        let out_buffer = pool.take(device, Role::Output, out_bytes);
        let params_buffer = pool.take(device, Role::Params, align4(params.len()));
        let staging = pool.take(device, Role::Staging, out_bytes);
        (ins, out_buffer, params_buffer, staging)
    };
    let (tx, rx) = mpsc::channel();
    let submission = scope(
        ctx,
        || "running a kernel".to_string(),
        || {
            for (buffer, bytes) in in_buffers.iter().zip(inputs) {
                upload(&ctx.queue, buffer, bytes);
            }
            upload(&ctx.queue, &params_buffer, params);
            let mut entries: Vec<wgpu::BindGroupEntry> = in_buffers
                .iter()
                .zip(inputs)
                .enumerate()
                .map(|(i, (buffer, bytes))| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: binding(buffer, align4(bytes.len())),
                })
                .collect();
            entries.push(wgpu::BindGroupEntry {
                binding: inputs.len() as u32,
                resource: binding(&out_buffer, out_bytes),
            });
            entries.push(wgpu::BindGroupEntry {
                binding: inputs.len() as u32 + 1,
                resource: binding(&params_buffer, align4(params.len())),
            });
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("mergec kernel"),
                layout: &pipeline.layout,
                entries: &entries,
            });
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("mergec kernel"),
            });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("mergec kernel"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&pipeline.pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(grid.x, grid.y, 1);
            }
            encoder.copy_buffer_to_buffer(&out_buffer, 0, &staging, 0, out_bytes);
            let submission = ctx.queue.submit([encoder.finish()]);
            staging
                .slice(..out_bytes)
                .map_async(wgpu::MapMode::Read, move |r| {
                    // The receiver waits in `finish`; it is gone only if the slice failed.
                    let _ = tx.send(r);
                });
            Ok(submission)
        },
    )?;
    // A buffer that saw an error is dropped (above, by `?`), not pooled.
    Ok(InFlight {
        in_buffers,
        out_buffer,
        params_buffer,
        staging,
        out_bytes,
        submission,
        mapped: rx,
    })
}

/// Waits for a submitted slice, copies its output into `out`, returns its buffers to the
/// pool.
pub(crate) fn finish(
    ctx: &GpuContext,
    pool: &Mutex<BufferPool>,
    flight: InFlight,
    out: &mut [u8],
) -> Result<(), GpuError> {
    let failed = |message: String| GpuError::Device {
        during: "reading a result back".to_string(),
        message,
    };
    // Waits for this slice only: a later one may still be computing.
    ctx.device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(flight.submission),
            timeout: None,
        })
        .map_err(|e| failed(e.to_string()))?;
    flight
        .mapped
        .recv()
        .map_err(|_| failed("the map callback never ran".to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    {
        let view = flight
            .staging
            .slice(..flight.out_bytes)
            .get_mapped_range()
            .map_err(|e| failed(e.to_string()))?;
        out.copy_from_slice(&view[..out.len()]);
    }
    flight.staging.unmap();
    if let Some(message) = ctx.take_fault() {
        return Err(failed(message));
    }
    let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
    for b in flight.in_buffers {
        pool.give(Role::Input, b);
    }
    pool.give(Role::Output, flight.out_buffer);
    pool.give(Role::Params, flight.params_buffer);
    pool.give(Role::Staging, flight.staging);
    Ok(())
}

/// Maps the first `bytes` of `staging`, waits for the queue, copies into `out`.
pub(super) fn read_back(
    ctx: &GpuContext,
    staging: &wgpu::Buffer,
    bytes: u64,
    out: &mut [u8],
) -> Result<(), GpuError> {
    let failed = |message: String| GpuError::Device {
        during: "reading a result back".to_string(),
        message,
    };
    let slice = staging.slice(..bytes);
    let (tx, rx) = mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        // The receiver waits below; it only goes away if this function already failed.
        let _ = tx.send(r);
    });
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| failed(e.to_string()))?;
    rx.recv()
        .map_err(|_| failed("the map callback never ran".to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    {
        let view = slice.get_mapped_range().map_err(|e| failed(e.to_string()))?;
        out.copy_from_slice(&view[..out.len()]);
    }
    staging.unmap();
    if let Some(message) = ctx.take_fault() {
        return Err(failed(message));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_stay_one_dimensional_up_to_the_limit() {
        assert_eq!(grid(0, 256, 65535).unwrap(), Grid { x: 1, y: 1, row: 256 });
        assert_eq!(grid(1, 256, 65535).unwrap(), Grid { x: 1, y: 1, row: 256 });
        assert_eq!(grid(257, 256, 65535).unwrap(), Grid { x: 2, y: 1, row: 512 });
        assert_eq!(
            grid(65535 * 256, 256, 65535).unwrap(),
            Grid {
                x: 65535,
                y: 1,
                row: 65535 * 256
            }
        );
    }

    #[test]
    fn larger_grids_are_two_dimensional_and_cover_every_invocation() {
        for (invocations, max) in [
            (65536 * 256, 65535),
            (131072 * 256 + 1, 65535),
            (1000, 3),
            (3 * 256 + 1, 2),
        ] {
            let g = grid(invocations, 256, max).unwrap();
            assert!(g.y > 1 && g.x <= max && g.y <= max, "{g:?}");
            let covered = g.y as u64 * g.row as u64;
            assert!(covered >= invocations, "{g:?}");
            // Less than one row of slack.
            assert!(covered - invocations < g.row as u64, "{g:?}");
        }
        assert!(grid(10 * 256, 256, 3).is_err());
    }
}
