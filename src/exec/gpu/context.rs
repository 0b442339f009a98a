//! The long-lived GPU context: one adapter, one device, one queue, created once per run
//! and handed to the executor (wgpu's `execute_gpu` / `execute_gpu_inner` split).

use std::fmt;
use std::sync::{Arc, Mutex};

use super::GpuError;

/// One device and its queue, with what the adapter said about itself.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter_info: wgpu::AdapterInfo,
    /// The device's limits: the adapter's own, not WebGPU's defaults (which cap buffers at
    /// 256 MiB).
    pub limits: wgpu::Limits,
    /// The first error wgpu reported outside an error scope, or the device's loss.
    fault: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &AdapterSummary::from(&self.adapter_info).to_string())
            .finish_non_exhaustive()
    }
}

impl GpuContext {
    /// Opens a device on the best adapter, or on the first whose name contains
    /// `adapter_name` (case-insensitive).
    ///
    /// Without a name, hardware adapters are preferred (discrete, then integrated, then
    /// virtual), and software ones (Mesa lavapipe/llvmpipe, WARP: `DeviceType::Cpu`) are
    /// taken only when `allow_software` is set: they are for tests, not for speed. A named
    /// adapter is taken whatever its type, since naming it is explicit.
    ///
    /// `Ok(None)`: no adapter qualifies (no driver installed, or only software ones and
    /// `allow_software` is off). `Err`: the named adapter does not exist, or its device
    /// could not be opened. Honours `WGPU_BACKEND` (`vulkan`, `gl`, ...).
    pub fn new(adapter_name: Option<&str>, allow_software: bool) -> Result<Option<GpuContext>, GpuError> {
        let instance = instance();
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        if let Some(name) = adapter_name {
            let wanted = name.to_lowercase();
            let available: Vec<String> = adapters
                .iter()
                .map(|a| AdapterSummary::from(&a.get_info()).to_string())
                .collect();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&wanted));
            if adapters.is_empty() {
                return Err(GpuError::AdapterNotFound {
                    name: name.to_string(),
                    available: if available.is_empty() {
                        "none".to_string()
                    } else {
                        available.join("; ")
                    },
                });
            }
        } else if !allow_software {
            adapters.retain(|a| a.get_info().device_type != wgpu::DeviceType::Cpu);
        }
        // Stable: among equals, the enumeration order (Vulkan first) decides.
        adapters.sort_by_key(|a| {
            let info = a.get_info();
            rank(info.device_type, info.backend)
        });
        let Some(adapter) = adapters.into_iter().next() else {
            return Ok(None);
        };
        Self::open(adapter).map(Some)
    }

    fn open(adapter: wgpu::Adapter) -> Result<GpuContext, GpuError> {
        let adapter_info = adapter.get_info();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("mergec"),
            required_features: wgpu::Features::empty(),
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|source| GpuError::RequestDevice {
            adapter: AdapterSummary::from(&adapter_info).to_string(),
            source,
        })?;
        let limits = device.limits();
        // wgpu's default handler panics; errors outside a scope are kept and reported by
        // the next operation instead.
        let fault: Arc<Mutex<Option<String>>> = Arc::default();
        let sink = Arc::clone(&fault);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            record(&sink, e.to_string());
        }));
        let sink = Arc::clone(&fault);
        device.set_device_lost_callback(move |reason, message| {
            record(&sink, format!("device lost ({reason:?}): {message}"));
        });
        Ok(GpuContext {
            device,
            queue,
            adapter_info,
            limits,
            fault,
        })
    }

    /// What the adapter is, in one line.
    pub fn summary(&self) -> AdapterSummary {
        AdapterSummary::from(&self.adapter_info)
    }

    /// Whether the adapter is a software rasteriser (lavapipe, llvmpipe, WARP).
    pub fn is_software(&self) -> bool {
        self.adapter_info.device_type == wgpu::DeviceType::Cpu
    }

    /// The error wgpu reported outside an error scope, if any (once).
    pub(super) fn take_fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

fn record(fault: &Mutex<Option<String>>, message: String) {
    let mut slot = fault.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        *slot = Some(message);
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Lower is better: hardware before software, native APIs before GL.
fn rank(device_type: wgpu::DeviceType, backend: wgpu::Backend) -> (u8, u8) {
    let device = match device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let backend = match backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    };
    (device, backend)
}

/// One adapter as `mergec info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: wgpu::Backend,
    pub device_type: wgpu::DeviceType,
    /// Driver name and version, as the driver reports them (may be empty).
    pub driver: String,
}

impl AdapterSummary {
    pub fn is_software(&self) -> bool {
        self.device_type == wgpu::DeviceType::Cpu
    }
}

impl From<&wgpu::AdapterInfo> for AdapterSummary {
    fn from(info: &wgpu::AdapterInfo) -> AdapterSummary {
        let driver = [info.driver.as_str(), info.driver_info.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        AdapterSummary {
            name: info.name.clone(),
            backend: info.backend,
            device_type: info.device_type,
            driver,
        }
    }
}

/// `llvmpipe (LLVM 15.0.6, 256 bits) [vulkan, software; llvmpipe Mesa 22.3.6]`
impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.device_type {
            wgpu::DeviceType::DiscreteGpu => "discrete",
            wgpu::DeviceType::IntegratedGpu => "integrated",
            wgpu::DeviceType::VirtualGpu => "virtual",
            wgpu::DeviceType::Cpu => "software",
            wgpu::DeviceType::Other => "other",
        };
        write!(f, "{} [{}, {kind}", self.name, self.backend)?;
        if !self.driver.is_empty() {
            write!(f, "; {}", self.driver)?;
        }
        f.write_str("]")
    }
}

/// Every adapter wgpu can see, best first, software ones included (for `mergec info`).
pub fn list_adapters() -> Vec<AdapterSummary> {
    let mut adapters: Vec<AdapterSummary> =
        pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
            .iter()
            .map(|a| AdapterSummary::from(&a.get_info()))
            .collect();
    adapters.sort_by_key(|a| rank(a.device_type, a.backend));
    adapters
}
