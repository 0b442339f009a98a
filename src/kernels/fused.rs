//! `Kernel::Fused` stack programs -> the element-wise kernel (`shaders/elementwise.wgsl`).
//!
//! The stack program becomes straight-line WGSL, one `let` per instruction, with the
//! arithmetic of the CPU executor (`exec::cpu`): a weighted sum adds its products in order
//! starting from the first, and every result of `+ - * /` passes through `keep` (see
//! `shaders/elementwise.wgsl`), so no shader compiler can fuse a product into an add
//! (`fma`) or reorder a chain of additions. Mesa's GL compiler, for one, rebalances
//! `(((a + b) + c) + d) + e` into a tree unless stopped.

use std::fmt::Write;

use super::template::{self, COMMON, ELEMENTWISE};
use super::{computable, Family, KernelError, KernelKey, KeyInstr, WORKGROUP_SIZE};
use crate::io::DType;
use crate::plan::Instr;

/// An element-wise kernel for one step: its key and the constants its `params` carry.
#[derive(Clone, Debug, PartialEq)]
pub struct ElementwiseKernel {
    pub key: KernelKey,
    /// The program's constants in the order its instructions read them.
    pub constants: Vec<f32>,
}

impl ElementwiseKernel {
    /// The kernel of the fused `program` reading inputs of dtypes `inputs` (one per slot)
    /// and storing `output`.
    pub fn new(program: &[Instr], inputs: &[DType], output: DType) -> Result<ElementwiseKernel, KernelError> {
        let mut key_program = Vec::with_capacity(program.len());
        let mut constants = Vec::new();
        for instr in program {
            key_program.push(match instr {
                Instr::Load(slot) => KeyInstr::Load(*slot),
                Instr::Elementwise(op) => {
                    constants.extend(op.constants());
                    KeyInstr::Elementwise(op.key())
                }
                Instr::Method { op, .. } => return Err(KernelError::Method(op.name())),
            });
        }
        let key = KernelKey {
            family: Family::Elementwise,
            program: key_program,
            inputs: inputs.to_vec(),
            output,
            workgroup_size: WORKGROUP_SIZE,
        };
        body(&key)?;
        Ok(ElementwiseKernel { key, constants })
    }

    /// The `params` uniform's bytes for a slice of `n` elements dispatched in rows of `row`
    /// invocations (layout: `struct Params` in `shaders/elementwise.wgsl`).
    pub fn params(&self, n: u32, row: u32) -> Vec<u8> {
        let mut words: Vec<u32> = vec![n, row, 0, 0];
        words.extend(self.constants.iter().map(|c| c.to_bits()));
        words.resize(4 + 4 * constant_vectors(self.constants.len()), 0);
        bytemuck::cast_slice(&words).to_vec()
    }
}

/// `vec4<f32>`s holding `constants` (at least one: WGSL has no empty arrays).
fn constant_vectors(constants: usize) -> usize {
    constants.div_ceil(4).max(1)
}

/// The WGSL source of an element-wise key.
pub(super) fn wgsl(key: &KernelKey) -> Result<String, KernelError> {
    let body = body(key)?;
    let mut inputs = String::new();
    for (slot, dtype) in key.inputs.iter().enumerate() {
        // Writing into a String cannot fail.
        let _ = writeln!(
            inputs,
            "// slot {slot}: {}\n@group(0) @binding({slot}) var<storage, read> in{slot}: array<u32>;",
            dtype.script_name()
        );
    }
    let store = match key.output {
        DType::F32 => {
            "    out[i] = bitcast<u32>(a);\n    if (has_b) {\n        out[i + 1u] = bitcast<u32>(b);\n    }"
                .to_string()
        }
        DType::BF16 => "    out[pair] = f32_to_bf16(a) | (f32_to_bf16(b) << 16u);".to_string(),
        DType::F16 => "    out[pair] = f32_to_f16(a) | (f32_to_f16(b) << 16u);".to_string(),
        dtype => {
            return Err(KernelError::Dtype {
                what: "the output".into(),
                dtype,
            })
        }
    };
    let filled = template::fill(
        "elementwise.wgsl",
        ELEMENTWISE,
        &[
            ("key", key.to_string()),
            ("constant_vectors", constant_vectors(key.constants()).to_string()),
            ("input_bindings", inputs),
            ("output_binding", key.inputs.len().to_string()),
            ("params_binding", (key.inputs.len() + 1).to_string()),
            ("body", body),
            ("workgroup_size", key.workgroup_size.to_string()),
            ("store", store),
        ],
    )?;
    Ok(format!("{COMMON}\n{filled}"))
}

/// The body of `fn value(i: u32) -> f32`: the program as one `let` per instruction.
/// Checks the program on the way (slots, dtypes, stack effects).
fn body(key: &KernelKey) -> Result<String, KernelError> {
    if !computable(key.output) {
        return Err(KernelError::Dtype {
            what: "the output".into(),
            dtype: key.output,
        });
    }
    let mut out = String::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut next_constant = 0usize;
    let mut constant = || {
        let k = next_constant;
        next_constant += 1;
        format!("params.c[{}].{}", k / 4, ["x", "y", "z", "w"][k % 4])
    };
    for (index, instr) in key.program.iter().enumerate() {
        let v = index;
        let expr = match instr {
            KeyInstr::Load(slot) => {
                let dtype = *key.inputs.get(*slot).ok_or(KernelError::Slot {
                    slot: *slot,
                    inputs: key.inputs.len(),
                })?;
                match dtype {
                    DType::F32 => format!("bitcast<f32>(in{slot}[i])"),
                    DType::BF16 => format!("bf16_to_f32(half_of(in{slot}[i >> 1u], i))"),
                    DType::F16 => format!("f16_to_f32(half_of(in{slot}[i >> 1u], i))"),
                    dtype => {
                        return Err(KernelError::Dtype {
                            what: format!("input slot {slot}"),
                            dtype,
                        })
                    }
                }
            }
            KeyInstr::Elementwise(op) => {
                let k = op.arity();
                if k == 0 || stack.len() < k {
                    return Err(KernelError::Underflow(index));
                }
                let operands: Vec<String> = stack
                    .split_off(stack.len() - k)
                    .iter()
                    .map(|x| format!("v{x}"))
                    .collect();
                op.wgsl(&format!("v{v}"), &operands, &mut constant, &mut out)
            }
        };
        let _ = writeln!(out, "    let v{v} = {expr};");
        stack.push(v);
    }
    let top = stack.last().ok_or(KernelError::Empty)?;
    let _ = write!(out, "    return v{top};");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use wgpu::naga;

    use super::*;
    use crate::ops::Elementwise as E;

    const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Every instruction kind, in programs of one and several inputs.
    fn programs() -> Vec<Vec<Instr>> {
        use Instr::*;
        vec![
            vec![Load(0)],
            vec![Load(0), Instr::Elementwise(E::Neg)],
            vec![Load(0), Instr::Elementwise(E::Scale(0.5))],
            vec![Load(0), Instr::Elementwise(E::Divide(3.0))],
            vec![Load(0), Load(1), Instr::Elementwise(E::Add)],
            vec![Load(0), Load(1), Instr::Elementwise(E::Sub)],
            vec![
                Load(0),
                Load(1),
                Instr::Elementwise(E::WeightedSum {
                    weights: vec![0.3, 0.7],
                    divisor: None,
                }),
            ],
            vec![
                Load(0),
                Load(1),
                Load(2),
                Instr::Elementwise(E::WeightedSum {
                    weights: vec![0.1, 0.2, 0.3],
                    divisor: Some(0.6),
                }),
            ],
            vec![
                Load(0),
                Load(1),
                Load(0),
                Instr::Elementwise(E::Sub),
                Instr::Elementwise(E::Scale(0.5)),
                Instr::Elementwise(E::Add),
                Instr::Elementwise(E::Neg),
                Load(2),
                Load(3),
                Load(4),
                Load(5),
                Instr::Elementwise(E::WeightedSum {
                    weights: vec![1.0, 2.0, 3.0, 4.0, 5.0],
                    divisor: Some(15.0),
                }),
                Instr::Elementwise(E::Divide(7.0)),
            ],
        ]
    }

    fn slots(program: &[Instr]) -> usize {
        program
            .iter()
            .filter_map(|i| match i {
                Instr::Load(s) => Some(s + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    fn validate(source: &str) -> Result<(), String> {
        let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;
        Ok(())
    }

    #[test]
    fn every_generated_kernel_passes_naga_validation() {
        assert!(validate("fn f() -> u32 { return 1.0; }").is_err());
        let mut count = 0;
        for program in programs() {
            let n = slots(&program);
            // Each slot in each dtype would be 3^n; cycling the dtypes covers every dtype in
            // every slot position and every output.
            for output in DTYPES {
                for shift in 0..DTYPES.len() {
                    let inputs: Vec<DType> = (0..n).map(|s| DTYPES[(s + shift) % 3]).collect();
                    let kernel = ElementwiseKernel::new(&program, &inputs, output).unwrap();
                    let source = kernel.key.wgsl().unwrap();
                    if let Err(e) = validate(&source) {
                        panic!("{}\n{source}\n{e}", kernel.key);
                    }
                    count += 1;
                }
            }
        }
        assert_eq!(count, 9 * 3 * 3);
    }

    #[test]
    fn constants_follow_the_program_and_stay_out_of_the_key() {
        let program = |w: f32| {
            vec![
                Instr::Load(0),
                Instr::Elementwise(E::Scale(w)),
                Instr::Load(1),
                Instr::Load(0),
                Instr::Elementwise(E::WeightedSum {
                    weights: vec![w, 2.0],
                    divisor: Some(9.0),
                }),
                Instr::Elementwise(E::Divide(4.0)),
            ]
        };
        let a = ElementwiseKernel::new(&program(0.25), &[DType::BF16, DType::F32], DType::F16).unwrap();
        let b = ElementwiseKernel::new(&program(0.75), &[DType::BF16, DType::F32], DType::F16).unwrap();
        assert_eq!(a.constants, vec![0.25, 0.25, 2.0, 9.0, 4.0]);
        assert_eq!(a.key, b.key);
        assert_eq!(
            a.key.to_string(),
            "elementwise(bf16, f32 -> f16: load0 scale load1 load0 weighted_sum2/ divide; wg 256)"
        );
        let params = a.params(7, 512);
        assert_eq!(params.len(), 16 + 32);
        assert_eq!(&params[..8], &[7, 0, 0, 0, 0, 2, 0, 0]);
        assert_eq!(&params[16..20], &0.25f32.to_le_bytes());
        assert_eq!(&params[32..36], &4.0f32.to_le_bytes());
        let source = a.key.wgsl().unwrap();
        for line in [
            "let v4_0 = keep(v2 * params.c[0].y);",
            "let v4_1 = keep(v4_0 + keep(v3 * params.c[0].z));",
            "let v4 = keep(v4_1 / params.c[0].w);",
        ] {
            assert!(source.contains(line), "{line}\n{source}");
        }
        assert!(source.contains("let v5 = keep(v4 / params.c[1].x);"));
        assert!(!source.contains("fma"));
    }

    #[test]
    fn programs_without_a_kernel_are_errors() {
        use Instr::*;
        let err = |p: &[Instr], inputs: &[DType], out| ElementwiseKernel::new(p, inputs, out).unwrap_err();
        assert_eq!(err(&[], &[], DType::F32), KernelError::Empty);
        assert_eq!(
            err(&[Load(0), Instr::Elementwise(E::Add)], &[DType::F32], DType::F32),
            KernelError::Underflow(1)
        );
        assert_eq!(
            err(&[Load(1)], &[DType::F32], DType::F32),
            KernelError::Slot { slot: 1, inputs: 1 }
        );
        assert!(matches!(
            err(&[Load(0)], &[DType::I32], DType::F32),
            KernelError::Dtype {
                dtype: DType::I32,
                ..
            }
        ));
        assert!(matches!(
            err(&[Load(0)], &[DType::F32], DType::F64),
            KernelError::Dtype {
                dtype: DType::F64,
                ..
            }
        ));
        let slerp = Method {
            op: crate::ops::MethodOp::Slerp { t: 0.5 },
            compute: crate::ops::Compute::F32,
            arity: 2,
        };
        assert_eq!(
            err(&[Load(0), Load(1), slerp], &[DType::F32; 2], DType::F32),
            KernelError::Method("slerp")
        );
    }
}
