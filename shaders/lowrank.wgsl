// The LoRA product (src/ops/lowrank.rs `row`): out = scale·(B·A), or its transpose, for
// B [p, r] and A [r, q]. Each element is summed over the rank in order k = 0..r−1 and
// every step is rounded to f32 (`keep`), so the GPU gives the CPU's bits.

// @kernel low_rank
// Element `params.start + i` of the result, whose rows have u4 elements. u0 = p,
// u1 = r, u2 = q, u3 = 1 for the transpose; f0 = scale.
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let g = params.start + i;
    let row = g / pu(4u);
    let col = g % pu(4u);
    let rank = pu(1u);
    let q = pu(2u);
    var acc: f32 = 0.0;
    if (pu(3u) == 1u) {
        // out[row, col] = (B·A)[col, row]
        for (var k = 0u; k < rank; k++) {
            acc = keep(acc + keep(b[col * rank + k] * a[k * q + row]));
        }
    } else {
        for (var k = 0u; k < rank; k++) {
            acc = keep(acc + keep(b[row * rank + k] * a[k * q + col]));
        }
    }
    out[i] = keep(acc * pf(0u));
}
