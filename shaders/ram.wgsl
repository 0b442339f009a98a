// ram and ramplus_tl (exec/methods/ram.rs `ram`), one model per dispatch: a delta
// δ = x − base is active when |δ| > f0. Counts are integers, so exact in any order.

@group(0) @binding(1) var<storage, read> base: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

fn delta(i: u32) -> f32 {
    return keep(x[i] - base[i]);
}

fn is_active(d: f32) -> bool {
    return bitcast<f32>(abs_key(d)) > pf(0u);
}

// @kernel ram_count
// count += 1 where this model's delta is active.
@group(0) @binding(3) var<storage, read_write> count: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    count[i] = count[i] + u32(is_active(delta(i)));
}

// @kernel ram_tally
// Per segment of u0 elements of the chunk (u1 elements): this model's active elements
// shared with another model, and unique to it, at 2·id.
@group(0) @binding(3) var<storage, read> count: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let id = invocation(gid);
    if (id >= params.n) {
        return;
    }
    let i0 = id * pu(0u);
    let i1 = min(pu(1u), i0 + pu(0u));
    var n_shared = 0u;
    var n_unique = 0u;
    for (var i = i0; i < i1; i++) {
        if (is_active(delta(i))) {
            if (count[i] == 1u) {
                n_unique += 1u;
            } else {
                n_shared += 1u;
            }
        }
    }
    out[2u * id] = n_shared;
    out[2u * id + 1u] = n_unique;
}

// @kernel ram_merge
// Where this model's delta is active: merged += δ·f1 when it is the only active one,
// merged += δ / count when several are.
@group(0) @binding(3) var<storage, read> count: array<u32>;
@group(0) @binding(4) var<storage, read_write> merged: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let d = delta(i);
    let c = count[i];
    if (!is_active(d)) {
        return;
    }
    if (c == 1u) {
        merged[i] = keep(merged[i] + keep(d * pf(1u)));
    } else if (c > 1u) {
        merged[i] = keep(merged[i] + keep(d / f32(c)));
    }
}
