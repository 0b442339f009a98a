// Element-wise kernels over f32 device tensors: decoding stored 16-bit values, encoding
// the result, and the arithmetic of programs around whole-tensor methods. One invocation
// per element (per output word when encoding 16-bit values); the f32 operations are the
// CPU executor's, each rounded through `keep`.

// @kernel decode_bf16
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    dst[i] = bf16_to_f32(half_of(src[i / 2u], i));
}

// @kernel decode_f16
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    dst[i] = f16_to_f32(half_of(src[i / 2u], i));
}

// @kernel encode_bf16
// One invocation per output word (two elements); an odd count leaves a high half of 0.
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = invocation(gid);
    let i = w * 2u;
    if (i >= params.n) {
        return;
    }
    var hi = 0u;
    if (i + 1u < params.n) {
        hi = f32_to_bf16(src[i + 1u]);
    }
    dst[w] = f32_to_bf16(src[i]) | (hi << 16u);
}

// @kernel encode_f16
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = invocation(gid);
    let i = w * 2u;
    if (i >= params.n) {
        return;
    }
    var hi = 0u;
    if (i + 1u < params.n) {
        hi = f32_to_f16(src[i + 1u]);
    }
    dst[w] = f32_to_f16(src[i]) | (hi << 16u);
}

// @kernel neg
// x = -x: the sign bit flipped, as Rust's `-x`.
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    x[i] = bitcast<f32>(bitcast<u32>(x[i]) ^ 0x80000000u);
}

// @kernel round_bf16
// x = x rounded to bf16 (ties to even), as the `half` crate rounds.
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

// @kernel round_f16
// x = x rounded to f16 (ties to even, subnormals kept, overflow to inf).
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    x[i] = f16_to_f32(f32_to_f16(x[i]));
}

// @kernel scale
// x = x · f0
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    x[i] = keep(x[i] * pf(0u));
}

// @kernel divide
// x = x / f0
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    x[i] = keep(x[i] / pf(0u));
}

// @kernel add
// a = a + b
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    a[i] = keep(a[i] + b[i]);
}

// @kernel sub
// a = a - b
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    a[i] = keep(a[i] - b[i]);
}

// @kernel axpy
// acc = acc + f0 · x
@group(0) @binding(1) var<storage, read_write> acc: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    acc[i] = keep(acc[i] + keep(pf(0u) * x[i]));
}

// @kernel difference
// out = a - b
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    out[i] = keep(a[i] - b[i]);
}

// @kernel gta_finish
// The end of gta.rs `combine`: mixed / (div, 0 -> 1) with consensus (u0 = 1), or mixed / f0
// without, when u1 = 1; × f1 when u2 = 1; + base.
@group(0) @binding(1) var<storage, read> base: array<f32>;
@group(0) @binding(2) var<storage, read_write> mixed: array<f32>;
@group(0) @binding(3) var<storage, read> div: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    var x = mixed[i];
    if (pu(1u) == 1u) {
        if (pu(0u) == 1u) {
            let d = div[i];
            x = keep(x / select(d, 1.0, d == 0.0));
        } else {
            x = keep(x / pf(0u));
        }
    }
    if (pu(2u) == 1u) {
        x = keep(x * pf(1u));
    }
    mixed[i] = keep(x + base[i]);
}
