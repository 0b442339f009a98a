// A small software binary64 for kernels whose CPU reference computes in f64 (sce's
// variance, arcee_fusion's KL divergence); WGSL has no portable f64. Values are the bit
// patterns (hi, lo) = (y, x) of a vec2<u32>; add, multiply and divide are exact IEEE
// round-to-nearest-even. Only what those kernels meet is handled: operands and results
// are normal numbers or zeros (a result below the normal range becomes zero, which the
// callers absorb or never produce), and every non-finite value is one NaN (the callers
// deal with infinite inputs before they get here). `exp` and `ln` follow
// src/exec/methods/portable.rs step by step, so they give its bits.

const F64_NAN: vec2<u32> = vec2<u32>(0u, 0x7ff80000u);

fn u64_add(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + u32(lo < a.x));
}

fn u64_sub(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x - b.x, a.y - b.y - u32(a.x < b.x));
}

fn u64_less(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.y < b.y || (a.y == b.y && a.x < b.x);
}

fn u64_is_zero(a: vec2<u32>) -> bool {
    return a.x == 0u && a.y == 0u;
}

fn u64_shl(a: vec2<u32>, s: u32) -> vec2<u32> {
    if (s == 0u) {
        return a;
    }
    if (s >= 64u) {
        return vec2<u32>(0u, 0u);
    }
    if (s >= 32u) {
        return vec2<u32>(0u, a.x << (s - 32u));
    }
    return vec2<u32>(a.x << s, (a.y << s) | (a.x >> (32u - s)));
}

fn u64_shr(a: vec2<u32>, s: u32) -> vec2<u32> {
    if (s == 0u) {
        return a;
    }
    if (s >= 64u) {
        return vec2<u32>(0u, 0u);
    }
    if (s >= 32u) {
        return vec2<u32>(a.y >> (s - 32u), 0u);
    }
    return vec2<u32>((a.x >> s) | (a.y << (32u - s)), a.y >> s);
}

// a >> s with every bit shifted out OR-ed into bit 0 (sticky).
fn u64_shr_sticky(a: vec2<u32>, s: u32) -> vec2<u32> {
    if (s == 0u) {
        return a;
    }
    let out = u64_shr(a, s);
    let back = u64_shl(out, s);
    let lost = s >= 64u || back.x != a.x || back.y != a.y;
    return vec2<u32>(out.x | u32(lost && !u64_is_zero(a)), out.y);
}

fn u64_clz(a: vec2<u32>) -> u32 {
    if (a.y != 0u) {
        return countLeadingZeros(a.y);
    }
    return 32u + countLeadingZeros(a.x);
}

fn f64_is_nan(a: vec2<u32>) -> bool {
    return (a.y & 0x7ff00000u) == 0x7ff00000u;
}

fn f64_sign(a: vec2<u32>) -> u32 {
    return a.y >> 31u;
}

fn f64_exponent(a: vec2<u32>) -> i32 {
    return i32((a.y >> 20u) & 0x7ffu);
}

// The 53-bit significand with its implicit bit (0 for zero).
fn f64_man(a: vec2<u32>) -> vec2<u32> {
    if (f64_exponent(a) == 0) {
        return vec2<u32>(a.x, a.y & 0xfffffu);
    }
    return vec2<u32>(a.x, (a.y & 0xfffffu) | 0x100000u);
}

// Packs sign s and m·2^(e − 1085) rounded to nearest even, where m has its leading bit at
// bit 62 or 63 (or is 0) and bit 0 is sticky.
fn f64_round(s: u32, e_in: i32, m_in: vec2<u32>) -> vec2<u32> {
    if (u64_is_zero(m_in)) {
        return vec2<u32>(0u, s << 31u);
    }
    var e = e_in;
    var m = m_in;
    if ((m.y & 0x80000000u) != 0u) {
        m = u64_shr_sticky(m, 1u);
        e += 1;
    }
    let round = (m.x >> 9u) & 1u;
    let sticky = (m.x & 0x1ffu) != 0u;
    var keep = u64_shr(m, 10u);
    if (round == 1u && (sticky || (keep.x & 1u) == 1u)) {
        keep = u64_add(keep, vec2<u32>(1u, 0u));
        if ((keep.y & 0x200000u) != 0u) {
            keep = u64_shr(keep, 1u);
            e += 1;
        }
    }
    if (e >= 2047) {
        return vec2<u32>(0u, (s << 31u) | 0x7ff00000u);
    }
    if (e <= 0) {
        // Unreachable for the variance of f32 values (see the top of the file).
        return vec2<u32>(0u, s << 31u);
    }
    return vec2<u32>(keep.x, (s << 31u) | (u32(e) << 20u) | (keep.y & 0xfffffu));
}

// Moves the leading bit of a nonzero m to bit 62, adjusting e.
fn f64_normalize(e: ptr<function, i32>, m: ptr<function, vec2<u32>>) {
    let lz = u64_clz(*m);
    if (lz > 1u) {
        *m = u64_shl(*m, lz - 1u);
        *e -= i32(lz - 1u);
    }
}

fn f64_from_f32(v: f32) -> vec2<u32> {
    let b = bitcast<u32>(v);
    let s = b >> 31u;
    let e8 = (b >> 23u) & 0xffu;
    let man = b & 0x7fffffu;
    if (e8 == 0xffu) {
        return F64_NAN;
    }
    if (e8 == 0u) {
        if (man == 0u) {
            return vec2<u32>(0u, s << 31u);
        }
        // A subnormal f32: man·2^-149, leading bit p.
        let p = firstLeadingBit(man);
        let m = u64_shl(vec2<u32>(man, 0u), 52u - p);
        let e = u32(i32(p) - 149 + 1023);
        return vec2<u32>(m.x, (s << 31u) | (e << 20u) | (m.y & 0xfffffu));
    }
    return vec2<u32>(man << 29u, (s << 31u) | ((e8 + 896u) << 20u) | (man >> 3u));
}

fn f64_add(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    if (f64_is_nan(a) || f64_is_nan(b)) {
        return F64_NAN;
    }
    var ma = u64_shl(f64_man(a), 10u);
    var mb = u64_shl(f64_man(b), 10u);
    if (u64_is_zero(mb)) {
        if (u64_is_zero(ma)) {
            // +0 + −0 = +0; −0 + −0 = −0.
            return vec2<u32>(0u, (f64_sign(a) & f64_sign(b)) << 31u);
        }
        return a;
    }
    if (u64_is_zero(ma)) {
        return b;
    }
    var ea = f64_exponent(a);
    var eb = f64_exponent(b);
    var sa = f64_sign(a);
    let sb = f64_sign(b);
    if (eb > ea || (eb == ea && u64_less(ma, mb))) {
        let t = ma;
        ma = mb;
        mb = t;
        let te = ea;
        ea = eb;
        eb = te;
        sa = sb;
        // The sign of the larger magnitude; `sb` is only compared below.
    }
    mb = u64_shr_sticky(mb, u32(min(ea - eb, 64)));
    var e = ea;
    var m: vec2<u32>;
    if (f64_sign(a) == f64_sign(b)) {
        m = u64_add(ma, mb);
    } else {
        m = u64_sub(ma, mb);
        if (u64_is_zero(m)) {
            return vec2<u32>(0u, 0u);
        }
        f64_normalize(&e, &m);
    }
    return f64_round(sa, e, m);
}

fn f64_neg(a: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x, a.y ^ 0x80000000u);
}

// (high, low) words of a · b.
fn mul32(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let ll = a0 * b0;
    let hl = a1 * b0;
    let lh = a0 * b1;
    let hh = a1 * b1;
    let mid = (ll >> 16u) + (hl & 0xffffu) + (lh & 0xffffu);
    return vec2<u32>(hh + (hl >> 16u) + (lh >> 16u) + (mid >> 16u), a * b);
}

fn f64_mul(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    if (f64_is_nan(a) || f64_is_nan(b)) {
        return F64_NAN;
    }
    let s = f64_sign(a) ^ f64_sign(b);
    let ma = f64_man(a);
    let mb = f64_man(b);
    if (u64_is_zero(ma) || u64_is_zero(mb)) {
        return vec2<u32>(0u, s << 31u);
    }
    // The 106-bit product in words w3 w2 w1 w0.
    let p00 = mul32(ma.x, mb.x);
    let p01 = mul32(ma.x, mb.y);
    let p10 = mul32(ma.y, mb.x);
    let p11 = mul32(ma.y, mb.y);
    let w0 = p00.y;
    var w1 = p00.x;
    var w2 = p11.y;
    var w3 = p11.x;
    // + p01 and p10 at word 1.
    for (var k = 0u; k < 2u; k++) {
        var p = p01;
        if (k == 1u) {
            p = p10;
        }
        let t1 = w1 + p.y;
        let c1 = u32(t1 < w1);
        w1 = t1;
        let t2 = w2 + p.x;
        let c2a = u32(t2 < w2);
        let t2b = t2 + c1;
        let c2b = u32(t2b < t2);
        w2 = t2b;
        w3 = w3 + c2a + c2b;
    }
    // Bits 42 and up, leading bit at 62 or 63; the rest sticky.
    let m = vec2<u32>((w1 >> 10u) | (w2 << 22u), (w2 >> 10u) | (w3 << 22u));
    let sticky = w0 != 0u || (w1 & 0x3ffu) != 0u;
    return f64_round(s, f64_exponent(a) + f64_exponent(b) - 1023, vec2<u32>(m.x | u32(sticky), m.y));
}

// a / k for an integer 1 <= k < 2^31, rounded to nearest even.
fn f64_div_int(a: vec2<u32>, k: u32) -> vec2<u32> {
    if (f64_is_nan(a)) {
        return F64_NAN;
    }
    let ma = f64_man(a);
    if (u64_is_zero(ma)) {
        return a;
    }
    // The dividend ma·2^42 as 96 bits (d2 d1 d0), long division one bit at a time.
    let d = u64_shl(ma, 10u);
    let d2 = d.y;
    let d1 = d.x;
    var q2 = 0u;
    var q1 = 0u;
    var q0 = 0u;
    var r = 0u;
    for (var i = 0u; i < 96u; i++) {
        var word = 0u;
        if (i < 32u) {
            word = d2;
        } else if (i < 64u) {
            word = d1;
        }
        let bit = (word >> (31u - (i % 32u))) & 1u;
        r = (r << 1u) | bit;
        var qbit = 0u;
        if (r >= k) {
            r -= k;
            qbit = 1u;
        }
        q2 = (q2 << 1u) | (q1 >> 31u);
        q1 = (q1 << 1u) | (q0 >> 31u);
        q0 = (q0 << 1u) | qbit;
    }
    // Leading bit L of the 96-bit quotient (at least 62); shift it to bit 62.
    var lead = 0u;
    if (q2 != 0u) {
        lead = 64u + firstLeadingBit(q2);
    } else {
        lead = 32u + firstLeadingBit(q1);
    }
    let t = lead - 62u;
    // (q2 q1 q0) >> t, t <= 32, sticky from the dropped bits and the remainder.
    var m: vec2<u32>;
    var dropped = false;
    if (t == 0u) {
        m = vec2<u32>(q0, q1);
    } else if (t == 32u) {
        m = vec2<u32>(q1, q2);
        dropped = q0 != 0u;
    } else {
        m = vec2<u32>((q0 >> t) | (q1 << (32u - t)), (q1 >> t) | (q2 << (32u - t)));
        dropped = (q0 << (32u - t)) != 0u;
    }
    let sticky = dropped || r != 0u;
    return f64_round(f64_sign(a), f64_exponent(a) + i32(t) - 32, vec2<u32>(m.x | u32(sticky), m.y));
}

// Rounds to the nearest f32, ties to even, subnormals included; NaN is 0x7fc00000.
fn f64_to_f32(a: vec2<u32>) -> f32 {
    if (f64_is_nan(a)) {
        return bitcast<f32>(0x7fc00000u);
    }
    let s = f64_sign(a) << 31u;
    let m = f64_man(a);
    if (u64_is_zero(m)) {
        return bitcast<f32>(s);
    }
    var ef = f64_exponent(a) - 896;
    var shift = 29u;
    if (ef <= 0) {
        shift = u32(30 - ef);
        if (shift > 54u) {
            return bitcast<f32>(s);
        }
    }
    var keep = u64_shr(m, shift).x;
    let round = u64_shr(m, shift - 1u).x & 1u;
    let below = u64_shl(u64_shr(m, shift - 1u), shift - 1u);
    let sticky = below.x != m.x || below.y != m.y;
    if (round == 1u && (sticky || (keep & 1u) == 1u)) {
        keep += 1u;
    }
    if (ef <= 0) {
        // A subnormal (or, rounded up, the smallest normal: the same bits).
        return bitcast<f32>(s | keep);
    }
    if (keep == 0x1000000u) {
        keep = keep >> 1u;
        ef += 1;
    }
    if (ef >= 255) {
        return bitcast<f32>(s | 0x7f800000u);
    }
    return bitcast<f32>(s | (u32(ef) << 23u) | (keep & 0x7fffffu));
}

fn f64_sub(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return f64_add(a, f64_neg(b));
}

// An order key: unsigned comparison of keys is numeric comparison (−0 below +0).
fn f64_order(a: vec2<u32>) -> vec2<u32> {
    if (f64_sign(a) == 1u) {
        return vec2<u32>(~a.x, ~a.y);
    }
    return vec2<u32>(a.x, a.y | 0x80000000u);
}

// a < b for values that are not NaN, and not both zero.
fn f64_less(a: vec2<u32>, b: vec2<u32>) -> bool {
    return u64_less(f64_order(a), f64_order(b));
}

// a / b rounded to nearest even, for a nonzero b (zero b gives NaN; the callers divide by
// sums of at least 1e-8).
fn f64_div(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    if (f64_is_nan(a) || f64_is_nan(b)) {
        return F64_NAN;
    }
    let s = f64_sign(a) ^ f64_sign(b);
    let ma = f64_man(a);
    let mb = f64_man(b);
    if (u64_is_zero(mb)) {
        return F64_NAN;
    }
    if (u64_is_zero(ma)) {
        return vec2<u32>(0u, s << 31u);
    }
    // q = floor(ma·2^63 / mb), one bit at a time; ma/mb ∈ (1/2, 2) puts its leading bit
    // at 62 or 63, and the remainder is the sticky bit.
    var r = ma;
    var q = vec2<u32>(0u, 0u);
    for (var i = 0u; i < 64u; i++) {
        q = u64_shl(q, 1u);
        if (!u64_less(r, mb)) {
            r = u64_sub(r, mb);
            q.x = q.x | 1u;
        }
        r = u64_shl(r, 1u);
    }
    let sticky = u32(!u64_is_zero(r));
    return f64_round(s, f64_exponent(a) - f64_exponent(b) + 1022, vec2<u32>(q.x | sticky, q.y));
}

// portable.rs constants, as (lo, hi) words.
const F64_MAGIC: vec2<u32> = vec2<u32>(0u, 0x43380000u);
const F64_LOG2_E: vec2<u32> = vec2<u32>(0x652b82feu, 0x3ff71547u);
const F64_LN2_HI: vec2<u32> = vec2<u32>(0xfee00000u, 0x3fe62e42u);
const F64_LN2_LO: vec2<u32> = vec2<u32>(0x35793c76u, 0x3dea39efu);
const F64_EXP_MIN: vec2<u32> = vec2<u32>(0u, 0xc0862000u);
const F64_EXP_MAX: vec2<u32> = vec2<u32>(0u, 0x40862800u);
const F64_ONE: vec2<u32> = vec2<u32>(0u, 0x3ff00000u);
const F64_TWO: vec2<u32> = vec2<u32>(0u, 0x40000000u);
const F64_SQRT2_FRACTION: vec2<u32> = vec2<u32>(0x667f3bcdu, 0x6a09eu);
const F64_EXP_COEFFS = array<vec2<u32>, 14>(
    vec2<u32>(0x00000000u, 0x3ff00000u),
    vec2<u32>(0x00000000u, 0x3ff00000u),
    vec2<u32>(0x00000000u, 0x3fe00000u),
    vec2<u32>(0x55555555u, 0x3fc55555u),
    vec2<u32>(0x55555555u, 0x3fa55555u),
    vec2<u32>(0x11111111u, 0x3f811111u),
    vec2<u32>(0x16c16c17u, 0x3f56c16cu),
    vec2<u32>(0x1a01a01au, 0x3f2a01a0u),
    vec2<u32>(0x1a01a01au, 0x3efa01a0u),
    vec2<u32>(0xa556c734u, 0x3ec71de3u),
    vec2<u32>(0xb7789f5cu, 0x3e927e4fu),
    vec2<u32>(0x67f544e4u, 0x3e5ae645u),
    vec2<u32>(0xeff8d898u, 0x3e21eed8u),
    vec2<u32>(0x13a86d09u, 0x3de61246u),
);
const F64_LN_COEFFS = array<vec2<u32>, 11>(
    vec2<u32>(0x00000000u, 0x3ff00000u),
    vec2<u32>(0x55555555u, 0x3fd55555u),
    vec2<u32>(0x9999999au, 0x3fc99999u),
    vec2<u32>(0x92492492u, 0x3fc24924u),
    vec2<u32>(0x1c71c71cu, 0x3fbc71c7u),
    vec2<u32>(0x745d1746u, 0x3fb745d1u),
    vec2<u32>(0x13b13b14u, 0x3fb3b13bu),
    vec2<u32>(0x11111111u, 0x3fb11111u),
    vec2<u32>(0x1e1e1e1eu, 0x3fae1e1eu),
    vec2<u32>(0xbca1af28u, 0x3faaf286u),
    vec2<u32>(0x18618618u, 0x3fa86186u),
);

// The integer k (|k| < 2^31) as an f64: MAGIC + k is MAGIC's bits plus k.
fn f64_from_i32(k: i32) -> vec2<u32> {
    let wide = vec2<u32>(bitcast<u32>(k), select(0u, 0xffffffffu, k < 0));
    return f64_sub(u64_add(F64_MAGIC, wide), F64_MAGIC);
}

// portable.rs `exp` (its +inf is this library's NaN; the callers never reach it).
fn f64_exp(x: vec2<u32>) -> vec2<u32> {
    if (f64_is_nan(x) || f64_less(F64_EXP_MAX, x)) {
        return F64_NAN;
    }
    if (f64_less(x, F64_EXP_MIN)) {
        return vec2<u32>(0u, 0u);
    }
    let shifted = f64_add(f64_mul(x, F64_LOG2_E), F64_MAGIC);
    let k = bitcast<i32>(shifted.x);
    let kf = f64_sub(shifted, F64_MAGIC);
    let r = f64_sub(f64_sub(x, f64_mul(kf, F64_LN2_HI)), f64_mul(kf, F64_LN2_LO));
    var coeffs = F64_EXP_COEFFS;
    var p = coeffs[13];
    for (var j = 13; j > 0; j--) {
        p = f64_add(f64_mul(p, r), coeffs[j - 1]);
    }
    return f64_mul(p, vec2<u32>(0u, u32(k + 1023) << 20u));
}

// portable.rs `ln` for positive normal y; anything else (never reached from arcee_fusion)
// gives NaN.
fn f64_ln(y: vec2<u32>) -> vec2<u32> {
    let field = f64_exponent(y);
    if (f64_sign(y) == 1u || field == 0 || field == 2047) {
        return F64_NAN;
    }
    let fraction = vec2<u32>(y.x, y.y & 0xfffffu);
    var m = vec2<u32>(fraction.x, fraction.y | (1023u << 20u));
    var e = field - 1023;
    if (u64_less(F64_SQRT2_FRACTION, fraction)) {
        m = vec2<u32>(fraction.x, fraction.y | (1022u << 20u));
        e = field - 1022;
    }
    let f = f64_sub(m, F64_ONE);
    let s = f64_div(f, f64_add(F64_TWO, f));
    let z = f64_mul(s, s);
    var coeffs = F64_LN_COEFFS;
    var r = coeffs[10];
    for (var j = 10; j > 0; j--) {
        r = f64_add(f64_mul(r, z), coeffs[j - 1]);
    }
    let ln_m = f64_mul(f64_add(s, s), r);
    let ef = f64_from_i32(e);
    return f64_add(f64_mul(ef, F64_LN2_HI), f64_add(f64_mul(ef, F64_LN2_LO), ln_m));
}
