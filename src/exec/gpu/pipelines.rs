//! Compute pipelines, compiled once per [`KernelKey`] and kept for the context's life.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{scope, GpuContext, GpuError};
use crate::kernels::device::{Access, DeviceKernel};
use crate::kernels::KernelKey;

/// A compiled kernel and the layout of its one bind group.
pub(crate) struct Pipeline {
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) pipeline: wgpu::ComputePipeline,
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    map: Mutex<HashMap<KernelKey, Arc<Pipeline>>>,
    /// The device-tensor kernels ([`crate::kernels::device`]), by name.
    device: Mutex<HashMap<&'static str, Arc<Pipeline>>>,
}

impl PipelineCache {
    /// The pipeline of `key`, compiled on first use.
    pub(crate) fn get(&self, ctx: &GpuContext, key: &KernelKey) -> Result<Arc<Pipeline>, GpuError> {
        // Compiling under the lock keeps two threads from compiling the same key.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get(key) {
            return Ok(Arc::clone(p));
        }
        let pipeline = Arc::new(compile(ctx, key)?);
        map.insert(key.clone(), Arc::clone(&pipeline));
        Ok(pipeline)
    }

    /// The pipeline of a device-tensor kernel, compiled on first use.
    pub(crate) fn get_device(
        &self,
        ctx: &GpuContext,
        kernel: &'static DeviceKernel,
    ) -> Result<Arc<Pipeline>, GpuError> {
        let mut map = self.device.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get(kernel.name) {
            return Ok(Arc::clone(p));
        }
        let source = kernel.wgsl()?;
        let mut entries = vec![uniform_entry(0)];
        entries.extend(
            kernel
                .storage
                .iter()
                .enumerate()
                .map(|(i, a)| storage_entry(i as u32 + 1, *a == Access::Read)),
        );
        let pipeline = Arc::new(build(ctx, kernel.name, source, &entries)?);
        map.insert(kernel.name, Arc::clone(&pipeline));
        Ok(pipeline)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
            + self.device.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

/// Bindings: every input (read-only storage), the output (storage), `params` (uniform).
fn compile(ctx: &GpuContext, key: &KernelKey) -> Result<Pipeline, GpuError> {
    let source = key.wgsl()?;
    let label = key.to_string();
    let inputs = key.inputs.len() as u32;
    let mut entries: Vec<wgpu::BindGroupLayoutEntry> = (0..inputs).map(|b| storage_entry(b, true)).collect();
    entries.push(storage_entry(inputs, false));
    entries.push(uniform_entry(inputs + 1));
    build(ctx, &label, source, &entries)
}

fn build(
    ctx: &GpuContext,
    label: &str,
    source: String,
    entries: &[wgpu::BindGroupLayoutEntry],
) -> Result<Pipeline, GpuError> {
    scope(
        ctx,
        || format!("compiling kernel {label}"),
        || {
            let module = ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            let layout = ctx
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(label),
                    entries,
                });
            let pipeline_layout = ctx
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(label),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
            let pipeline = ctx
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(label),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                });
            Ok(Pipeline { layout, pipeline })
        },
    )
}
