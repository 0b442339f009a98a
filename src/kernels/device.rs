//! Kernels over f32 device tensors, for the whole-tensor methods: a fixed catalogue of
//! hand-written WGSL sections (`// @kernel NAME` in the `shaders/` family files), each a
//! complete compute shader once `shaders/common.wgsl`, `shaders/device.wgsl` and the
//! family file's preamble (the text before its first section) are put in front.
//!
//! Every kernel binds the `params` uniform at binding 0 and its storage buffers from
//! binding 1, in the order of [`DeviceKernel::storage`].

use super::template::COMMON;
use super::KernelError;

const DEVICE: &str = include_str!("../../shaders/device.wgsl");
const TENSOR: &str = include_str!("../../shaders/tensor.wgsl");
const REDUCE: &str = include_str!("../../shaders/reduce.wgsl");
const SELECT: &str = include_str!("../../shaders/select.wgsl");
const RANDOM: &str = include_str!("../../shaders/random.wgsl");
const GEOMETRY: &str = include_str!("../../shaders/geometry.wgsl");
const GTA: &str = include_str!("../../shaders/gta.wgsl");
const RAM: &str = include_str!("../../shaders/ram.wgsl");
const SCE: &str = include_str!("../../shaders/sce.wgsl");
const ARCEE: &str = include_str!("../../shaders/arcee.wgsl");
const LOWRANK: &str = include_str!("../../shaders/lowrank.wgsl");
/// The software binary64 that the `sce` and `arcee` families build on.
const F64: &str = include_str!("../../shaders/f64.wgsl");

/// How a kernel binds one storage buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    ReadWrite,
}

/// One kernel of the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceKernel {
    pub name: &'static str,
    /// The family file it lives in (`shaders/<family>.wgsl`).
    pub family: &'static str,
    /// Its storage bindings, from binding 1 on.
    pub storage: &'static [Access],
}

use Access::{Read as R, ReadWrite as W};

macro_rules! kernels {
    ($($name:literal in $family:literal: [$($a:ident),*]),* $(,)?) => {
        /// Every device kernel.
        pub const DEVICE_KERNELS: &[DeviceKernel] = &[
            $(DeviceKernel { name: $name, family: $family, storage: &[$($a),*] }),*
        ];
    };
}

kernels! {
    "decode_bf16" in "tensor": [R, W],
    "decode_f16" in "tensor": [R, W],
    "encode_bf16" in "tensor": [R, W],
    "encode_f16" in "tensor": [R, W],
    "neg" in "tensor": [W],
    "round_bf16" in "tensor": [W],
    "round_f16" in "tensor": [W],
    "scale" in "tensor": [W],
    "divide" in "tensor": [W],
    "add" in "tensor": [W, R],
    "sub" in "tensor": [W, R],
    "axpy" in "tensor": [W, R],
    "difference" in "tensor": [R, R, W],
    "gta_finish" in "tensor": [R, W, R],
    "dot" in "reduce": [R, R, W],
    "dot3" in "reduce": [R, R, W],
    "l1" in "reduce": [R, R, W],
    "histogram_high" in "select": [R, W],
    "histogram_low" in "select": [R, W],
    "mask_at_least" in "select": [R, W],
    "count_equal" in "select": [R, W],
    "mask_budget" in "select": [R, R, W],
    "and_not" in "select": [W, R],
    "row_ranks" in "select": [R, W],
    "row_ranks_tiled" in "select": [R, W],
    "bernoulli" in "random": [W],
    "della" in "random": [R, W],
    "lin2" in "geometry": [R, R, R, R, W],
    "nearswap" in "geometry": [R, R, W],
    "unit" in "geometry": [R, W],
    "tangent" in "geometry": [W, R, R],
    "multislerp_out" in "geometry": [R, R, R, W],
    "gta_sum" in "gta": [R, R, R, W],
    "gta_vote" in "gta": [R, R, R, R, W, W],
    "ram_count" in "ram": [R, R, W],
    "ram_tally" in "ram": [R, R, R, W],
    "ram_merge" in "ram": [R, R, R, W],
    "sce_sum" in "sce": [R, W, W],
    "sce_mean" in "sce": [W, W],
    "sce_squares" in "sce": [R, R, R, W, W],
    "sce_variance" in "sce": [R, R, W],
    "sce_mask" in "sce": [W, R],
    "sce_vote" in "sce": [R, R, W, W],
    "sce_finish" in "sce": [R, W, R],
    "arcee_row_max" in "arcee": [R, W],
    "arcee_exp" in "arcee": [R, R, W, W],
    "arcee_row_sum" in "arcee": [R, R, W],
    "arcee_term" in "arcee": [W, W, R, R, R],
    "arcee_importance" in "arcee": [R, R, R, W],
    "arcee_fuse" in "arcee": [R, R, W],
    "low_rank" in "lowrank": [R, R, W],
}

/// The kernel called `name`.
pub fn device_kernel(name: &str) -> Option<&'static DeviceKernel> {
    DEVICE_KERNELS.iter().find(|k| k.name == name)
}

/// A family's file name, its text, and the library it builds on (or "").
fn family_source(family: &str) -> Option<(&'static str, &'static str, &'static str)> {
    let (file, text) = match family {
        "tensor" => ("tensor.wgsl", TENSOR),
        "reduce" => ("reduce.wgsl", REDUCE),
        "select" => ("select.wgsl", SELECT),
        "random" => ("random.wgsl", RANDOM),
        "geometry" => ("geometry.wgsl", GEOMETRY),
        "gta" => ("gta.wgsl", GTA),
        "ram" => ("ram.wgsl", RAM),
        "sce" => ("sce.wgsl", SCE),
        "arcee" => ("arcee.wgsl", ARCEE),
        "lowrank" => ("lowrank.wgsl", LOWRANK),
        _ => return None,
    };
    let library = if matches!(family, "sce" | "arcee") {
        F64
    } else {
        ""
    };
    Some((file, text, library))
}

const MARKER: &str = "// @kernel ";

impl DeviceKernel {
    /// The kernel's complete WGSL source.
    pub fn wgsl(&self) -> Result<String, KernelError> {
        let missing = || KernelError::Template {
            template: "device kernel",
            slot: self.name.to_string(),
        };
        let (file, text, library) = family_source(self.family).ok_or_else(missing)?;
        let preamble = text.split(MARKER).next().unwrap_or_default();
        let section = text
            .split(MARKER)
            .skip(1)
            .find(|s| s.lines().next().map(str::trim) == Some(self.name))
            .ok_or_else(missing)?;
        Ok(format!(
            "{COMMON}\n{DEVICE}\n{library}\n// {file}\n{preamble}\n// kernel {}{section}",
            self.name,
            section = section.trim_start_matches(self.name)
        ))
    }
}

#[cfg(test)]
mod tests {
    use wgpu::naga;

    use super::*;

    /// Parses and validates `source`; returns the storage bindings of `main` in order.
    fn validate(source: &str) -> Result<Vec<(u32, bool)>, String> {
        let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .map_err(|e| format!("{e:?}"))?;
        let ep = module.entry_points.first().ok_or("no entry point")?;
        let fi = info.get_entry_point(0);
        let mut out = Vec::new();
        for (handle, var) in module.global_variables.iter() {
            if fi[handle].is_empty() {
                continue;
            }
            let Some(b) = &var.binding else { continue };
            if let naga::AddressSpace::Storage { access } = var.space {
                out.push((b.binding, access.contains(naga::StorageAccess::STORE)));
            }
        }
        assert_eq!(ep.name, "main");
        out.sort();
        Ok(out)
    }

    #[test]
    fn every_device_kernel_passes_naga_and_binds_what_the_catalogue_says() {
        for k in DEVICE_KERNELS {
            let source = k.wgsl().unwrap();
            let bindings = validate(&source).unwrap_or_else(|e| panic!("{}: {e}", k.name));
            let expected: Vec<(u32, bool)> = k
                .storage
                .iter()
                .enumerate()
                .map(|(i, a)| (i as u32 + 1, *a == Access::ReadWrite))
                .collect();
            assert_eq!(bindings, expected, "{}", k.name);
        }
    }

    #[test]
    fn names_are_unique_and_unknown_ones_are_absent() {
        for (i, k) in DEVICE_KERNELS.iter().enumerate() {
            assert!(DEVICE_KERNELS[..i].iter().all(|o| o.name != k.name), "{}", k.name);
            assert_eq!(device_kernel(k.name), Some(k));
        }
        assert!(device_kernel("no_such_kernel").is_none());
    }
}
