// Random masks from Philox4x32-10 (rng.rs), keyed by (key, global element index): the
// same bits as the CPU's. The 32x32 -> 64-bit product is taken from 16-bit limbs
// (`rng::mulhilo_32bit`); WGSL has no 64-bit integers. One invocation per mask word.

// (high, low) halves of a * b.
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let ll = a0 * b0;
    let hl = a1 * b0;
    let lh = a0 * b1;
    let hh = a1 * b1;
    let mid = (ll >> 16u) + (hl & 0xffffu) + (lh & 0xffffu);
    let hi = hh + (hl >> 16u) + (lh >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, a * b);
}

fn philox(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var round = 0u; round < 10u; round++) {
        if (round > 0u) {
            k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let p0 = mulhilo(0xD2511F53u, c.x);
        let p1 = mulhilo(0xCD9E8D57u, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
    }
    return c;
}

// rng::uniform for an index below 2^32: 24 random bits in [0, 1).
fn draw(key: vec2<u32>, index: u32) -> f32 {
    let w = philox(vec4<u32>(index, 0u, 0u, 0u), key).x;
    return f32(w >> 8u) * (1.0 / 16777216.0);
}

// @kernel bernoulli
// Bit set where uniform((u0, u1), start + i) < f0.
@group(0) @binding(1) var<storage, read_write> mask: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = invocation(gid);
    let i0 = w * 32u;
    if (i0 >= params.n) {
        return;
    }
    let key = vec2<u32>(pu(0u), pu(1u));
    var bits = 0u;
    for (var b = 0u; b < 32u && i0 + b < params.n; b++) {
        if (draw(key, params.start + i0 + b) < pf(0u)) {
            bits |= 1u << b;
        }
    }
    mask[w] = bits;
}

// @kernel della
// Bit set where uniform((u0, u1), start + i) < f0 + rn·f1, rn = rank / f2 for rows of
// u2 > 1 elements (else 0).
@group(0) @binding(1) var<storage, read> ranks: array<u32>;
@group(0) @binding(2) var<storage, read_write> mask: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = invocation(gid);
    let i0 = w * 32u;
    if (i0 >= params.n) {
        return;
    }
    let key = vec2<u32>(pu(0u), pu(1u));
    var bits = 0u;
    for (var b = 0u; b < 32u && i0 + b < params.n; b++) {
        var rn = 0.0;
        if (pu(2u) > 1u) {
            rn = keep(f32(ranks[i0 + b]) / pf(2u));
        }
        let p = keep(pf(0u) + keep(rn * pf(1u)));
        if (draw(key, params.start + i0 + b) < p) {
            bits |= 1u << b;
        }
    }
    mask[w] = bits;
}
