// Shared by the kernels over f32 device tensors (the whole-tensor methods): the `params`
// uniform, `keep`, the invocation index and the magnitude key.
//
// Every such kernel binds `params` at binding 0 and its storage buffers from binding 1,
// in the order its section in the family file declares them. Tensors larger than one
// storage binding are split by the host into chunks of the same elements in every tensor;
// a dispatch covers one chunk, whose first element has the global index `params.start`.

struct Params {
    // Invocations of this dispatch (or elements of the chunk, as the kernel says).
    n: u32,
    // Invocations per row of the 2-D dispatch.
    row: u32,
    // Always 0 (see `keep`).
    zero: u32,
    // Global index of the chunk's first element.
    start: u32,
    // Integer and float parameters, four to a vector.
    u: array<vec4<u32>, 3>,
    f: array<vec4<f32>, 2>,
}

@group(0) @binding(0) var<uniform> params: Params;

// An arithmetic result rounded to f32 before it is used: `params.zero` is 0 at run time
// but unknown to the compiler, which can neither fuse `a * b + c` nor reassociate sums.
fn keep(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ params.zero);
}

fn pu(i: u32) -> u32 {
    return params.u[i / 4u][i % 4u];
}

fn pf(i: u32) -> f32 {
    return params.f[i / 4u][i % 4u];
}

fn invocation(gid: vec3<u32>) -> u32 {
    return gid.y * params.row + gid.x;
}

// The sort key of |x| (select.rs `abs_key`): non-negative f32 bits order like the values.
fn abs_key(x: f32) -> u32 {
    return bitcast<u32>(x) & 0x7fffffffu;
}

// Not inf or NaN.
fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// The power of two 2^k (|k| <= 126) as an exact f32.
fn pow2(k: i32) -> f32 {
    return bitcast<f32>(u32(k + 127) << 23u);
}

// The shift k that brings a magnitude of biased exponent `e` near 1: 2^k · 2^(e-127) ≈ 1,
// clamped to what `pow2` can represent (inf and NaN keep their value).
fn scale_shift(max_abs: f32) -> i32 {
    let e = i32((bitcast<u32>(max_abs) >> 23u) & 0xffu);
    return clamp(127 - e, -126, 126);
}

// Exact products and sums in two f32s (Dekker, Knuth): with no overflow or underflow,
// a·b = p + two_product_error(a, b, p) and a + b = s + two_sum_error(a, b, s) exactly.
// Every operation goes through `keep`, so none is fused or reassociated away.
fn split_hi(a: f32) -> f32 {
    let c = keep(4097.0 * a);
    return keep(c - keep(c - a));
}

fn two_product_error(a: f32, b: f32, p: f32) -> f32 {
    let ah = split_hi(a);
    let al = keep(a - ah);
    let bh = split_hi(b);
    let bl = keep(b - bh);
    return keep(keep(keep(keep(keep(ah * bh) - p) + keep(ah * bl)) + keep(al * bh)) + keep(al * bl));
}

fn two_sum_error(a: f32, b: f32, s: f32) -> f32 {
    let bb = keep(s - a);
    return keep(keep(a - keep(s - bb)) + keep(b - bb));
}

// A running sum as an f32 `hi` and the f32 sum of every rounding error `lo` (hi + lo is
// the sum to about 2^-44 relative); once `hi` is inf or NaN, `lo` stops.
struct Acc {
    hi: f32,
    lo: f32,
}

fn acc_add(acc: Acc, x: f32, x_error: f32) -> Acc {
    let s = keep(acc.hi + x);
    if (!finite(s) || !finite(x)) {
        return Acc(s, acc.lo);
    }
    return Acc(s, keep(keep(acc.lo + two_sum_error(acc.hi, x, s)) + x_error));
}
