// Element-wise kernel: {{ key }}
//
// One fused expression evaluated per element over one slice of the tensor (the host
// splits tensors larger than a storage binding into slices). Each invocation computes two
// consecutive elements, so a 16-bit output is written one whole u32 word at a time.
// Bindings: the inputs (read-only, packed u32 words), then the output, then `params`.

struct Params {
    // Elements in this slice.
    n: u32,
    // Invocations per row of the 2-D dispatch.
    row: u32,
    // Always 0 (see `keep`).
    zero: u32,
    pad: u32,
    // The program's constants (scales, weights, divisors), four to a vector.
    c: array<vec4<f32>, {{ constant_vectors }}>,
}

{{ input_bindings }}
@group(0) @binding({{ output_binding }}) var<storage, read_write> out: array<u32>;
@group(0) @binding({{ params_binding }}) var<uniform> params: Params;

// An arithmetic result, rounded to f32 before it is used. `params.zero` is 0 at run time
// but unknown to the shader compiler, which therefore can neither contract `a * b + c`
// into a fused multiply-add nor reassociate `(a + b) + c`: SPIR-V and GLSL allow both
// unless told otherwise, and Mesa's GL compiler does rebalance long chains of additions.
fn keep(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ params.zero);
}

// The expression at element `i` of the slice.
fn value(i: u32) -> f32 {
{{ body }}
}

@compute @workgroup_size({{ workgroup_size }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let pair = gid.y * params.row + gid.x;
    let i = pair * 2u;
    if (i >= params.n) {
        return;
    }
    let a = value(i);
    // An odd element count leaves the last pair with one element.
    let has_b = i + 1u < params.n;
    var b = 0.0;
    if (has_b) {
        b = value(i + 1u);
    }
{{ store }}
}
