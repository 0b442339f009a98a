//! WGSL kernels: a [`KernelKey`] names one generated compute shader, and
//! [`KernelKey::wgsl`] writes its source by filling a template from `shaders/`.
//!
//! A key holds everything the source depends on and nothing else: the program's shape,
//! the dtypes of its inputs and output, and the workgroup size. The constants of a
//! program (scales, weights, divisors) are not part of it; they travel in the kernel's
//! `params` uniform, so one compiled pipeline serves every tensor with the same shape of
//! expression, whatever its weights.
//!
//! | family | template | programs |
//! | --- | --- | --- |
//! | [`Family::Elementwise`] | `shaders/elementwise.wgsl` | [`crate::plan::Kernel::Fused`] |
//! | [`device`] catalogue | `shaders/{tensor,reduce,select,random,geometry,gta}.wgsl` | the steps of [`crate::plan::Kernel::Whole`] methods |
//!
//! Imports: `plan` (the kernels it compiles), the leaf modules `io`, `ops`.

pub mod device;
mod fused;
mod template;

use std::fmt;

use crate::io::DType;
use crate::ops::Elementwise;
use crate::plan::{Kernel, Step};

pub use fused::ElementwiseKernel;

/// Threads per workgroup of every kernel (WebGPU's default limit allows 256).
pub const WORKGROUP_SIZE: u32 = 256;

/// Elements each invocation of an element-wise kernel computes: two, so a 16-bit output
/// is written one whole u32 word at a time.
pub const ELEMENTS_PER_INVOCATION: u32 = 2;

/// The op family of a kernel: which template its source comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// One fused element-wise expression (`shaders/elementwise.wgsl`).
    Elementwise,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Elementwise => "elementwise",
        }
    }
}

/// One instruction of a kernel's program, with its constants taken out (they are read
/// from the `params` uniform in program order).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyInstr {
    /// Push input slot `i`, decoded to f32.
    Load(usize),
    /// An element-wise op reading its constants from `params` in order.
    Elementwise(Elementwise<()>),
}

impl KeyInstr {
    /// Constants the instruction reads.
    pub fn constants(&self) -> usize {
        match self {
            KeyInstr::Load(_) => 0,
            KeyInstr::Elementwise(op) => op.constants().len(),
        }
    }
}

impl fmt::Display for KeyInstr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyInstr::Load(i) => write!(f, "load{i}"),
            KeyInstr::Elementwise(op) => write!(f, "{op}"),
        }
    }
}

/// Identifies one generated kernel; the pipeline cache's key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub family: Family,
    pub program: Vec<KeyInstr>,
    /// The dtype of each input slot, in binding order.
    pub inputs: Vec<DType>,
    pub output: DType,
    pub workgroup_size: u32,
}

impl KernelKey {
    /// Constants the program reads from `params`.
    pub fn constants(&self) -> usize {
        self.program.iter().map(KeyInstr::constants).sum()
    }

    /// The kernel's WGSL source.
    pub fn wgsl(&self) -> Result<String, KernelError> {
        match self.family {
            Family::Elementwise => fused::wgsl(self),
        }
    }
}

/// `elementwise(bf16, f32 -> bf16: load0 load1 weighted_sum2/; wg 256)`
impl fmt::Display for KernelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.family.name())?;
        for (i, d) in self.inputs.iter().enumerate() {
            write!(f, "{}{}", if i > 0 { ", " } else { "" }, d.script_name())?;
        }
        write!(f, " -> {}:", self.output.script_name())?;
        for i in &self.program {
            write!(f, " {i}")?;
        }
        write!(f, "; wg {})", self.workgroup_size)
    }
}

/// Why a program has no kernel. These are limits of the GPU path (the caller runs the step
/// on the CPU instead) or internal errors (a malformed program or template).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KernelError {
    #[error("the whole-tensor method `{0}` has no element-wise kernel (it runs on device tensors, see `kernels::device`)")]
    Method(&'static str),
    #[error("no GPU arithmetic on {dtype} ({what})")]
    Dtype { what: String, dtype: DType },
    #[error("internal error: kernel program loads slot {slot} but has {inputs} inputs")]
    Slot { slot: usize, inputs: usize },
    #[error("internal error: kernel program underflows its stack at instruction {0}")]
    Underflow(usize),
    #[error("internal error: kernel program leaves no value")]
    Empty,
    #[error("a copy has no kernel")]
    Copy,
    #[error("internal error: template `{template}` has an unknown slot `{slot}`")]
    Template { template: &'static str, slot: String },
}

/// Whether kernels can load and store `dtype`.
pub fn computable(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The kernel of `step`: element-wise ([`Kernel::Fused`]) steps have one; a
/// [`Kernel::Whole`] step fails with [`KernelError::Method`]. For `mergec debug wgsl`:
/// `for_step(step)?.key.wgsl()`.
pub fn for_step(step: &Step) -> Result<ElementwiseKernel, KernelError> {
    match &step.kernel {
        Kernel::Fused(program) | Kernel::Whole(program) => {
            let inputs: Vec<DType> = step.inputs.iter().map(|i| i.dtype).collect();
            ElementwiseKernel::new(program, &inputs, step.dtype)
        }
        Kernel::Copy => Err(KernelError::Copy),
    }
}

/// Every distinct element-wise kernel of `plan`: its key, the steps that use it and its
/// WGSL, for `mergec debug wgsl` and snapshots. Whole-tensor steps use the device's fixed
/// kernels (`shaders/`), not generated ones.
pub fn dump(plan: &crate::plan::Plan) -> String {
    use std::fmt::Write;
    let mut keys: Vec<(KernelKey, Vec<usize>)> = Vec::new();
    let mut out = String::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let Kernel::Fused(program) = &step.kernel else {
            continue;
        };
        let inputs: Vec<DType> = step.inputs.iter().map(|x| x.dtype).collect();
        match ElementwiseKernel::new(program, &inputs, step.dtype) {
            Ok(k) => match keys.iter_mut().find(|(key, _)| *key == k.key) {
                Some((_, steps)) => steps.push(i),
                None => keys.push((k.key, vec![i])),
            },
            Err(e) => {
                let _ = writeln!(out, "// step {i} (`{}`): no kernel: {e}", step.tensor);
            }
        }
    }
    for (key, steps) in keys {
        let _ = writeln!(out, "// ==== {key}\n// steps {steps:?}");
        match key.wgsl() {
            Ok(source) => out.push_str(&source),
            Err(e) => {
                let _ = writeln!(out, "// no source: {e}");
            }
        }
        out.push('\n');
    }
    out
}
