//! A size-class buffer pool: buffers are rounded up to a power of two and kept, per usage
//! and size class, for the next slice or tensor, so a run allocates a handful of buffers
//! instead of several per tensor. Staging buffers (`MAP_READ | COPY_DST`, for readback)
//! come from the same pool.

use std::collections::HashMap;

/// What a pooled buffer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// A kernel input, filled with `Queue::write_buffer`.
    Input,
    /// A kernel output, copied to a staging buffer afterwards.
    Output,
    /// A kernel's `params` uniform.
    Params,
    /// Host-visible readback: the output is copied here and mapped.
    Staging,
    /// A device tensor of a whole-tensor method: written and read by kernels, filled by
    /// uploads and clears, copied out for readback.
    Work,
}

impl Role {
    fn usage(self) -> wgpu::BufferUsages {
        use wgpu::BufferUsages as U;
        match self {
            Role::Input => U::STORAGE | U::COPY_DST,
            Role::Output => U::STORAGE | U::COPY_SRC,
            Role::Params => U::UNIFORM | U::COPY_DST,
            Role::Staging => U::MAP_READ | U::COPY_DST,
            Role::Work => U::STORAGE | U::COPY_SRC | U::COPY_DST,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::Input => "mergec input",
            Role::Output => "mergec output",
            Role::Params => "mergec params",
            Role::Staging => "mergec staging",
            Role::Work => "mergec tensor",
        }
    }
}

/// The smallest buffer the pool makes.
const MIN_CLASS: u64 = 256;

pub(crate) struct BufferPool {
    free: HashMap<(Role, u64), Vec<wgpu::Buffer>>,
    idle_bytes: u64,
    /// Idle buffers beyond this many bytes are freed rather than kept.
    max_idle_bytes: u64,
    /// The largest buffer the device allows (a multiple of 4).
    max_buffer_size: u64,
}

impl BufferPool {
    pub(crate) fn new(max_buffer_size: u64, max_idle_bytes: u64) -> BufferPool {
        BufferPool {
            free: HashMap::new(),
            idle_bytes: 0,
            max_idle_bytes,
            max_buffer_size: max_buffer_size & !3,
        }
    }

    /// The size of the buffer that serves a request for `bytes`.
    pub(crate) fn size_class(&self, bytes: u64) -> u64 {
        bytes
            .max(MIN_CLASS)
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX)
            .min(self.max_buffer_size)
            .max(bytes)
    }

    /// A buffer of at least `bytes` for `role`: an idle one of the same class, or a new one.
    pub(crate) fn take(&mut self, device: &wgpu::Device, role: Role, bytes: u64) -> wgpu::Buffer {
        let class = self.size_class(bytes);
        if let Some(buffer) = self.free.get_mut(&(role, class)).and_then(Vec::pop) {
            self.idle_bytes -= class;
            return buffer;
        }
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(role.label()),
            size: class,
            usage: role.usage(),
            mapped_at_creation: false,
        })
    }

    /// Returns a buffer taken for `role` (unmapped), keeping it while the pool has room.
    pub(crate) fn give(&mut self, role: Role, buffer: wgpu::Buffer) {
        let class = buffer.size();
        if self.idle_bytes + class > self.max_idle_bytes {
            buffer.destroy();
            return;
        }
        self.idle_bytes += class;
        self.free.entry((role, class)).or_default().push(buffer);
    }

    /// Bytes held by idle buffers.
    pub(crate) fn idle_bytes(&self) -> u64 {
        self.idle_bytes
    }

    /// Frees every idle buffer.
    pub(crate) fn clear(&mut self) {
        for buffer in self.free.drain().flat_map(|(_, v)| v) {
            buffer.destroy();
        }
        self.idle_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_powers_of_two_within_the_device_limit() {
        let pool = BufferPool::new(1 << 30, 0);
        assert_eq!(pool.size_class(0), 256);
        assert_eq!(pool.size_class(4), 256);
        assert_eq!(pool.size_class(257), 512);
        assert_eq!(pool.size_class(1 << 20), 1 << 20);
        assert_eq!(pool.size_class((1 << 20) + 4), 1 << 21);
        // Past the last power of two below the limit, the limit itself.
        let pool = BufferPool::new((1 << 31) - 1, 0);
        assert_eq!(pool.size_class((1 << 30) + 4), (1 << 31) - 4);
    }
}
