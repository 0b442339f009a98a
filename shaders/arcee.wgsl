// arcee_fusion (exec/methods/arcee.rs `arcee_fusion`, `row_kl`). The importance of an
// element is |p − b| times its row's KL divergence of softmax(p) from softmax(b), computed
// in f64 with the software binary64 of `f64.wgsl` and the portable `exp`/`ln`, so the
// importance keys are the CPU's bits. Rows (u0 elements) lie whole in one chunk; the
// row-wise kernels run one invocation per row (params.n rows) and sum in element order, as
// the CPU does; the element-wise ones run one invocation per element (params.n elements).
// Per-row results are f64 pairs in `sums`: words 4r, 4r + 1 for the fine-tune's row (then
// its KL), 4r + 2, 4r + 3 for the base's.

fn is_nan32(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// select.rs `ord_key`: unsigned order of keys is the order of the values.
fn ord_key(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    if ((bits & 0x80000000u) != 0u) {
        return ~bits;
    }
    return bits | 0x80000000u;
}

fn from_ord_key(key: u32) -> f32 {
    if ((key & 0x80000000u) != 0u) {
        return bitcast<f32>(key & 0x7fffffffu);
    }
    return bitcast<f32>(~key);
}

// @kernel arcee_row_max
// Per row: the key of its largest non-NaN value (+0 above −0), or of −inf.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> row_max: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = invocation(gid);
    if (r >= params.n) {
        return;
    }
    let len = pu(0u);
    var best = ord_key(bitcast<f32>(0xff800000u));
    for (var j = 0u; j < len; j++) {
        let v = x[r * len + j];
        if (!is_nan32(v)) {
            best = max(best, ord_key(v));
        }
    }
    row_max[r] = best;
}

// @kernel arcee_exp
// (hi, lo) = exp(f64(x) − f64(row max)). Non-finite inputs as the CPU meets them: −inf
// gives 0; NaN, or a row whose max is ±inf, gives NaN (on the CPU such a row's sum is
// NaN whatever its other elements give).
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> row_max: array<u32>;
@group(0) @binding(3) var<storage, read_write> lo: array<u32>;
@group(0) @binding(4) var<storage, read_write> hi: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let v = x[i];
    let m = from_ord_key(row_max[i / pu(0u)]);
    var e = F64_NAN;
    if (bitcast<u32>(v) == 0xff800000u && finite(m)) {
        e = vec2<u32>(0u, 0u);
    } else if (finite(v) && finite(m)) {
        e = f64_exp(f64_sub(f64_from_f32(v), f64_from_f32(m)));
    }
    lo[i] = e.x;
    hi[i] = e.y;
}

// @kernel arcee_row_sum
// Per row: Σ (hi, lo) from +0 in element order, into sums at slot u1.
@group(0) @binding(1) var<storage, read> lo: array<u32>;
@group(0) @binding(2) var<storage, read> hi: array<u32>;
@group(0) @binding(3) var<storage, read_write> sums: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = invocation(gid);
    if (r >= params.n) {
        return;
    }
    let len = pu(0u);
    var acc = vec2<u32>(0u, 0u);
    for (var j = r * len; j < (r + 1u) * len; j++) {
        acc = f64_add(acc, vec2<u32>(lo[j], hi[j]));
    }
    sums[4u * r + pu(1u)] = acc.x;
    sums[4u * r + pu(1u) + 1u] = acc.y;
}

// @kernel arcee_term
// P = e_p / Σe_p + 1e-8, Q = e_b / Σe_b + 1e-8; (p_hi, p_lo) = P·ln(P/Q).
@group(0) @binding(1) var<storage, read_write> p_lo: array<u32>;
@group(0) @binding(2) var<storage, read_write> p_hi: array<u32>;
@group(0) @binding(3) var<storage, read> b_lo: array<u32>;
@group(0) @binding(4) var<storage, read> b_hi: array<u32>;
@group(0) @binding(5) var<storage, read> sums: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let r = 4u * (i / pu(0u));
    let eps = vec2<u32>(0xe2308c3au, 0x3e45798eu);
    let pj = f64_add(f64_div(vec2<u32>(p_lo[i], p_hi[i]), vec2<u32>(sums[r], sums[r + 1u])), eps);
    let qj = f64_add(f64_div(vec2<u32>(b_lo[i], b_hi[i]), vec2<u32>(sums[r + 2u], sums[r + 3u])), eps);
    let t = f64_mul(pj, f64_ln(f64_div(pj, qj)));
    p_lo[i] = t.x;
    p_hi[i] = t.y;
}

// @kernel arcee_importance
// key = ord_key(f32(f64(|p − b|) · KL of the row)), NaN as 0x7fc00000.
@group(0) @binding(1) var<storage, read> p: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> sums: array<u32>;
@group(0) @binding(4) var<storage, read_write> keys: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let diff = bitcast<f32>(bitcast<u32>(keep(p[i] - b[i])) & 0x7fffffffu);
    let r = 4u * (i / pu(0u));
    let kl = vec2<u32>(sums[r], sums[r + 1u]);
    var imp = bitcast<f32>(0x7fc00000u);
    if (bitcast<u32>(diff) == 0x7f800000u) {
        // inf · kl: ±inf by the sign of a nonzero kl, NaN for zero or NaN.
        let zero = kl.x == 0u && (kl.y & 0x7fffffffu) == 0u;
        if (!f64_is_nan(kl) && !zero) {
            imp = bitcast<f32>(0x7f800000u | (f64_sign(kl) << 31u));
        }
    } else {
        imp = f64_to_f32(f64_mul(f64_from_f32(diff), kl));
    }
    keys[i] = ord_key(imp);
}

// @kernel arcee_fuse
// Where importance >= threshold (key u0; u1 = 1 when the threshold is NaN): the
// fine-tune's value as b + (p − b)·1, else b + (p − b)·0. Written over the keys.
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> p: array<f32>;
@group(0) @binding(3) var<storage, read_write> keys: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    var key = keys[i];
    var threshold = pu(0u);
    // −0 and +0 compare equal.
    if (key == 0x7fffffffu) {
        key = 0x80000000u;
    }
    if (threshold == 0x7fffffffu) {
        threshold = 0x80000000u;
    }
    let selected = !is_nan32(from_ord_key(key)) && pu(1u) == 0u && key >= threshold;
    let w = select(0.0, 1.0, selected);
    keys[i] = bitcast<u32>(keep(b[i] + keep(keep(p[i] - b[i]) * w)));
}
