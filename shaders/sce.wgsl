// sce (exec/methods/sce.rs `sce`). Its ranking key is a per-element variance over the
// models computed in f64 and rounded to f32, here with the software binary64 of
// `f64.wgsl` (no f64 subnormals arise from f32 inputs, and a non-finite delta makes the
// CPU's variance NaN too: inf − inf), so the keys are the CPU's bits.

// @kernel sce_sum
// (hi, lo) += f64(d) for this model's delta d.
@group(0) @binding(1) var<storage, read> d: array<f32>;
@group(0) @binding(2) var<storage, read_write> lo: array<u32>;
@group(0) @binding(3) var<storage, read_write> hi: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let r = f64_add(vec2<u32>(lo[i], hi[i]), f64_from_f32(d[i]));
    lo[i] = r.x;
    hi[i] = r.y;
}

// @kernel sce_mean
// (hi, lo) /= u0.
@group(0) @binding(1) var<storage, read_write> lo: array<u32>;
@group(0) @binding(2) var<storage, read_write> hi: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let r = f64_div_int(vec2<u32>(lo[i], hi[i]), pu(0u));
    lo[i] = r.x;
    hi[i] = r.y;
}

// @kernel sce_squares
// (ss hi, ss lo) += (f64(d) − mean)².
@group(0) @binding(1) var<storage, read> d: array<f32>;
@group(0) @binding(2) var<storage, read> mean_lo: array<u32>;
@group(0) @binding(3) var<storage, read> mean_hi: array<u32>;
@group(0) @binding(4) var<storage, read_write> lo: array<u32>;
@group(0) @binding(5) var<storage, read_write> hi: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let e = f64_add(f64_from_f32(d[i]), f64_neg(vec2<u32>(mean_lo[i], mean_hi[i])));
    let r = f64_add(vec2<u32>(lo[i], hi[i]), f64_mul(e, e));
    lo[i] = r.x;
    hi[i] = r.y;
}

// @kernel sce_variance
// var = f32(ss / u0), the ranking value (its bits are the key).
@group(0) @binding(1) var<storage, read> lo: array<u32>;
@group(0) @binding(2) var<storage, read> hi: array<u32>;
@group(0) @binding(3) var<storage, read_write> var_out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    var_out[i] = f64_to_f32(f64_div_int(vec2<u32>(lo[i], hi[i]), pu(0u)));
}

// @kernel sce_mask
// d = 0 where the mask bit is clear.
@group(0) @binding(1) var<storage, read_write> d: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    if (((mask[i / 32u] >> (i % 32u)) & 1u) == 0u) {
        d[i] = 0.0;
    }
}

// @kernel sce_vote
// With the majority sign of `s` (>= 0 is +): where sign(d) is it, num += d·f0, den += f0
// (num += d·0 and den += 0 elsewhere, as the CPU does).
@group(0) @binding(1) var<storage, read> d: array<f32>;
@group(0) @binding(2) var<storage, read> s: array<f32>;
@group(0) @binding(3) var<storage, read_write> num: array<f32>;
@group(0) @binding(4) var<storage, read_write> den: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let x = d[i];
    var agrees = x < 0.0;
    if (s[i] >= 0.0) {
        agrees = x > 0.0;
    }
    let ew = select(0.0, pf(0u), agrees);
    num[i] = keep(num[i] + keep(x * ew));
    den[i] = keep(den[i] + ew);
}

// @kernel sce_finish
// num = base + num / max(den, f0) (den below f0 becomes f0).
@group(0) @binding(1) var<storage, read> base: array<f32>;
@group(0) @binding(2) var<storage, read_write> num: array<f32>;
@group(0) @binding(3) var<storage, read> den: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    var dd = den[i];
    if (dd < pf(0u)) {
        dd = pf(0u);
    }
    num[i] = keep(base[i] + keep(num[i] / dd));
}
