// Reductions over f32 device tensors, as partial sums the host adds up in f64 in a fixed
// order. Each invocation sums one segment of up to `seg` elements of one vector. It first
// finds the segment's largest magnitudes and scales by exact powers of two so that no
// product overflows or underflows f32 where the CPU's f64 would not, then adds exact
// products into a two-f32 accumulator (`Acc`); it writes the sum's two parts and the
// power of two that undoes the scaling. A segment of one element is exact.

// The element range [j0, j1) of segment s of vector v that lies in this chunk: u3 vector
// length, u4 sv, u5 sj, u6 seg, u7 elements in the chunk.
fn segment_range(v: u32, s: u32) -> vec2<u32> {
    let len = pu(3u);
    let sv = pu(4u);
    let sj = max(pu(5u), 1u);
    let seg = pu(6u);
    let lo = params.start;
    let hi = params.start + pu(7u);
    var j0 = s * seg;
    var j1 = min(len, j0 + seg);
    let vb = v * sv;
    if (lo > vb) {
        j0 = max(j0, (lo - vb + sj - 1u) / sj);
    }
    if (hi <= vb) {
        j1 = j0;
    } else {
        j1 = min(j1, (hi - vb + sj - 1u) / sj);
    }
    return vec2<u32>(j0, j1);
}

// The chunk-local index of element j of vector v.
fn element(v: u32, j: u32) -> u32 {
    return v * pu(4u) + j * max(pu(5u), 1u) - params.start;
}

// acc + a·b, the product exact in two parts.
fn acc_product(acc: Acc, a: f32, b: f32) -> Acc {
    let p = keep(a * b);
    var err = 0.0;
    if (finite(p)) {
        err = two_product_error(a, b, p);
    }
    return acc_add(acc, p, err);
}

// @kernel dot
// Segments of Σ a·b over strided vectors: element j of vector v is the global index
// v·sv + j·sj. u0 first vector, u1 vectors, u2 first segment, u3 vector length, u4 sv,
// u5 sj, u6 seg, u7 elements in the chunk. Invocation `id` is vector v0 + id % nv,
// segment s0 + id / nv; it writes (hi, lo, exponent) at 3·id.
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let id = invocation(gid);
    if (id >= params.n) {
        return;
    }
    let nv = pu(1u);
    let v = pu(0u) + id % nv;
    let r = segment_range(v, pu(2u) + id / nv);
    var ka = 0u;
    var kb = 0u;
    for (var j = r.x; j < r.y; j++) {
        let e = element(v, j);
        ka = max(ka, abs_key(a[e]));
        kb = max(kb, abs_key(b[e]));
    }
    let sa = scale_shift(bitcast<f32>(ka));
    let sb = scale_shift(bitcast<f32>(kb));
    let fa = pow2(sa);
    let fb = pow2(sb);
    var acc = Acc(0.0, 0.0);
    for (var j = r.x; j < r.y; j++) {
        let e = element(v, j);
        acc = acc_product(acc, keep(a[e] * fa), keep(b[e] * fb));
    }
    out[3u * id] = acc.hi;
    out[3u * id + 1u] = acc.lo;
    out[3u * id + 2u] = f32(-(sa + sb));
}

// @kernel dot3
// The segments of Σ a·a, Σ b·b and Σ a·b in one pass (as three `dot` passes would give
// them): (hi, lo, exponent) of each at 9·id.
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let id = invocation(gid);
    if (id >= params.n) {
        return;
    }
    let nv = pu(1u);
    let v = pu(0u) + id % nv;
    let r = segment_range(v, pu(2u) + id / nv);
    var ka = 0u;
    var kb = 0u;
    for (var j = r.x; j < r.y; j++) {
        let e = element(v, j);
        ka = max(ka, abs_key(a[e]));
        kb = max(kb, abs_key(b[e]));
    }
    let sa = scale_shift(bitcast<f32>(ka));
    let sb = scale_shift(bitcast<f32>(kb));
    let fa = pow2(sa);
    let fb = pow2(sb);
    var aa = Acc(0.0, 0.0);
    var bb = Acc(0.0, 0.0);
    var ab = Acc(0.0, 0.0);
    for (var j = r.x; j < r.y; j++) {
        let e = element(v, j);
        let x = keep(a[e] * fa);
        let y = keep(b[e] * fb);
        aa = acc_product(aa, x, x);
        bb = acc_product(bb, y, y);
        ab = acc_product(ab, x, y);
    }
    out[9u * id] = aa.hi;
    out[9u * id + 1u] = aa.lo;
    out[9u * id + 2u] = f32(-(sa + sa));
    out[9u * id + 3u] = bb.hi;
    out[9u * id + 4u] = bb.lo;
    out[9u * id + 5u] = f32(-(sb + sb));
    out[9u * id + 6u] = ab.hi;
    out[9u * id + 7u] = ab.lo;
    out[9u * id + 8u] = f32(-(sa + sb));
}

// @kernel l1
// Segments of Σ|x| and of Σ|x| over the elements whose mask bit is set, in one chunk:
// u0 seg (a multiple of 32), u1 elements in the chunk. Writes (all hi, all lo, kept hi,
// kept lo, exponent) at 5·id.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let id = invocation(gid);
    if (id >= params.n) {
        return;
    }
    let i0 = id * pu(0u);
    let i1 = min(pu(1u), i0 + pu(0u));
    var k = 0u;
    for (var i = i0; i < i1; i++) {
        k = max(k, abs_key(x[i]));
    }
    let sh = scale_shift(bitcast<f32>(k));
    let f = pow2(sh);
    var all = Acc(0.0, 0.0);
    var kept = Acc(0.0, 0.0);
    for (var i = i0; i < i1; i++) {
        let p = keep(bitcast<f32>(abs_key(x[i])) * f);
        all = acc_add(all, p, 0.0);
        if (((mask[i / 32u] >> (i % 32u)) & 1u) == 1u) {
            kept = acc_add(kept, p, 0.0);
        }
    }
    out[5u * id] = all.hi;
    out[5u * id + 1u] = all.lo;
    out[5u * id + 2u] = kept.hi;
    out[5u * id + 3u] = kept.lo;
    out[5u * id + 4u] = f32(-sh);
}
