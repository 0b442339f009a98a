// The combination step of the task-vector methods (exec/methods/gta.rs `combine`), one
// model per dispatch so that every element adds its models in model order:
// wd = mask·((x − base)·f0)·f1 with the kept bit when u0 = 1.

@group(0) @binding(1) var<storage, read> base: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<u32>;

fn weighted_delta(i: u32) -> f32 {
    let d = keep(keep(x[i] - base[i]) * pf(0u));
    var kept = true;
    if (pu(0u) == 1u) {
        kept = ((mask[i / 32u] >> (i % 32u)) & 1u) == 1u;
    }
    return keep(select(0.0, d, kept) * pf(1u));
}

// @kernel gta_sum
// sum = sum + wd
@group(0) @binding(4) var<storage, read_write> sum: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    sum[i] = keep(sum[i] + weighted_delta(i));
}

// @kernel gta_vote
// Where wd agrees with the elected sign of `sum` (>= 0 is +): mixed += wd, div += f1.
@group(0) @binding(4) var<storage, read> sum: array<f32>;
@group(0) @binding(5) var<storage, read_write> mixed: array<f32>;
@group(0) @binding(6) var<storage, read_write> div: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let v = weighted_delta(i);
    var agrees = v < 0.0;
    if (sum[i] >= 0.0) {
        agrees = v > 0.0;
    }
    mixed[i] = keep(mixed[i] + select(0.0, v, agrees));
    div[i] = keep(div[i] + select(0.0, pf(1u), agrees));
}
