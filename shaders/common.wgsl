// Storage formats <-> f32, shared by every kernel.
//
// 16-bit values travel packed two to a u32 word, element 2k in the low half. Every
// conversion is integer arithmetic on the bits, so the GPU decodes and rounds exactly as
// the CPU reference (the `half` crate) does, whatever the adapter's float conversions do
// with subnormals and NaN.

// The 16-bit half of `word` that holds element `i`.
fn half_of(word: u32, i: u32) -> u32 {
    return (word >> ((i & 1u) * 16u)) & 0xffffu;
}

// bf16 bits -> f32: the same sign, exponent and upper mantissa bits.
fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// f16 bits -> f32, exact for every value, subnormals included. NaN stays NaN (quiet bit
// set, payload kept).
fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let exp = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if (exp == 0x1fu) {
        if (man == 0u) {
            return bitcast<f32>(sign | 0x7f800000u);
        }
        return bitcast<f32>(sign | 0x7fc00000u | (man << 13u));
    }
    if (exp == 0u) {
        if (man == 0u) {
            return bitcast<f32>(sign);
        }
        // man * 2^-24 with the leading one at bit p: exponent p - 24, mantissa shifted up
        // so that bit p becomes the implicit one.
        let p = firstLeadingBit(man);
        return bitcast<f32>(sign | ((p + 103u) << 23u) | ((man << (23u - p)) & 0x7fffffu));
    }
    return bitcast<f32>(sign | ((exp + 112u) << 23u) | (man << 13u));
}

// True when the bits below `round_bit` (the highest dropped bit) make the kept value round
// up: more than half, or exactly half and the kept value odd (ties to even). The mask
// `3 * round_bit - 1` covers the kept value's lowest bit and every dropped bit below the
// round bit.
fn round_up(bits: u32, round_bit: u32) -> bool {
    return (bits & round_bit) != 0u && (bits & (3u * round_bit - 1u)) != 0u;
}

// f32 -> bf16 bits, round to nearest even; overflow becomes inf, NaN stays NaN.
fn f32_to_bf16(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (x >> 16u) | 0x40u;
    }
    return (x >> 16u) + select(0u, 1u, round_up(x, 0x8000u));
}

// f32 -> f16 bits, round to nearest even, f16 subnormals rounded like any other value;
// beyond the largest finite f16 becomes inf, NaN stays NaN.
fn f32_to_f16(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    let sign = (x >> 16u) & 0x8000u;
    let exp = (x >> 23u) & 0xffu;
    let man = x & 0x7fffffu;
    if (exp == 0xffu) {
        return sign | 0x7c00u | select(0u, 0x200u | (man >> 13u), man != 0u);
    }
    // The f16 biased exponent.
    let e = i32(exp) - 112;
    if (e >= 31) {
        return sign | 0x7c00u;
    }
    if (e <= 0) {
        // Below half the smallest subnormal: signed zero.
        if (e < -10) {
            return sign;
        }
        let m = man | 0x800000u;
        let shift = u32(14 - e);
        return sign | ((m >> shift) + select(0u, 1u, round_up(m, 1u << (shift - 1u))));
    }
    // A carry out of the mantissa steps the exponent, up to inf.
    return (sign | (u32(e) << 10u) | (man >> 13u)) + select(0u, 1u, round_up(man, 0x1000u));
}
