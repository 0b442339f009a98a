// Per-element parts of the geometric merges (slerp, nuslerp, multislerp, karcher,
// model_stock, nearswap): the f32 operations of exec/methods/geometry.rs in its order,
// with coefficients the host derived from reductions.

// The vector of global element `e`: u0 layout (0 the whole tensor, 1 rows of u1
// elements, 2 columns of a tensor with u1 elements per leading index).
fn vector_of(e: u32) -> u32 {
    switch pu(0u) {
        case 1u: {
            return e / max(pu(1u), 1u);
        }
        case 2u: {
            return e % max(pu(1u), 1u);
        }
        default: {
            return 0u;
        }
    }
}

// @kernel lin2
// out = c0·a + c1·b (+ base when u2 = 1), (c0, c1) = coefs[2v], coefs[2v + 1] for the
// element's vector v.
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> base: array<f32>;
@group(0) @binding(4) var<storage, read> coefs: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let v = vector_of(params.start + i);
    let y = keep(keep(coefs[2u * v] * a[i]) + keep(coefs[2u * v + 1u] * b[i]));
    if (pu(2u) == 1u) {
        out[i] = keep(base[i] + y);
    } else {
        out[i] = y;
    }
}

// @kernel nearswap
// w = clamp(f0 / max(|base − x|, f1), 0, 1) (NaN stays NaN), out = w·x + (1 − w)·base.
@group(0) @binding(1) var<storage, read> base: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let b = base[i];
    let v = x[i];
    var d = bitcast<f32>(abs_key(keep(b - v)));
    if (d < pf(1u)) {
        d = pf(1u);
    }
    var w = keep(pf(0u) / d);
    if (w < 0.0) {
        w = 0.0;
    }
    if (w > 1.0) {
        w = 1.0;
    }
    out[i] = keep(keep(w * v) + keep(keep(1.0 - w) * b));
}

// @kernel unit
// out = x / f0, or 0 when f0 = 0.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    if (pf(0u) == 0.0) {
        out[i] = 0.0;
    } else {
        out[i] = keep(x[i] / pf(0u));
    }
}

// @kernel tangent
// acc = acc + (u − f0·m)·f1
@group(0) @binding(1) var<storage, read_write> acc: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read> m: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    acc[i] = keep(acc[i] + keep(keep(u[i] - keep(pf(0u) * m[i])) * pf(1u)));
}

// @kernel multislerp_out
// r = (m̂·f0 + τ·f1)·f2, out = base + r when u0 = 1, else r.
@group(0) @binding(1) var<storage, read> mh: array<f32>;
@group(0) @binding(2) var<storage, read> tau: array<f32>;
@group(0) @binding(3) var<storage, read> base: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let r = keep(keep(keep(mh[i] * pf(0u)) + keep(tau[i] * pf(1u))) * pf(2u));
    if (pu(0u) == 1u) {
        out[i] = keep(base[i] + r);
    } else {
        out[i] = r;
    }
}
