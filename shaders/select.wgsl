// Exact top-k selection over |x| (select.rs): two 16-bit histograms find the threshold
// key and how many keys equal to it are taken; masks hold one bit per element, 32 to a
// word, element 32·w + b at bit b of word w (chunks start on a word boundary).

// The histograms' key of an element's bits: |x| (abs_key), or with u1 = 1 the bits
// themselves, for tensors that already hold keys (arcee_fusion's importance).
fn histogram_key(bits: u32) -> u32 {
    if (pu(1u) == 1u) {
        return bits;
    }
    return abs_key(bitcast<f32>(bits));
}

// @kernel histogram_high
// Counts of the high 16 bits of every key of the chunk (params.n elements).
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> hist: array<atomic<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    atomicAdd(&hist[histogram_key(x[i]) >> 16u], 1u);
}

// @kernel histogram_low
// Counts of the low 16 bits of the keys whose high 16 bits are u0.
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> hist: array<atomic<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let key = histogram_key(x[i]);
    if ((key >> 16u) == pu(0u)) {
        atomicAdd(&hist[key & 0xffffu], 1u);
    }
}

// @kernel mask_at_least
// Bit set where key >= u0; one invocation per word of the chunk's params.n elements.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> mask: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = invocation(gid);
    let i0 = w * 32u;
    if (i0 >= params.n) {
        return;
    }
    var bits = 0u;
    for (var b = 0u; b < 32u && i0 + b < params.n; b++) {
        if (abs_key(x[i0 + b]) >= pu(0u)) {
            bits |= 1u << b;
        }
    }
    mask[w] = bits;
}

// @kernel count_equal
// Keys equal to u0 in each word's 32 elements.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> counts: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = invocation(gid);
    let i0 = w * 32u;
    if (i0 >= params.n) {
        return;
    }
    var c = 0u;
    for (var b = 0u; b < 32u && i0 + b < params.n; b++) {
        c += u32(abs_key(x[i0 + b]) == pu(0u));
    }
    counts[w] = c;
}

// @kernel mask_budget
// Bit set where key > u0, or key == u0 among the first budget[w] such keys of the word.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> budget: array<u32>;
@group(0) @binding(3) var<storage, read_write> mask: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = invocation(gid);
    let i0 = w * 32u;
    if (i0 >= params.n) {
        return;
    }
    let t = pu(0u);
    var left = budget[w];
    var bits = 0u;
    for (var b = 0u; b < 32u && i0 + b < params.n; b++) {
        let key = abs_key(x[i0 + b]);
        var take = key > t;
        if (key == t && left > 0u) {
            left -= 1u;
            take = true;
        }
        if (take) {
            bits |= 1u << b;
        }
    }
    mask[w] = bits;
}

// @kernel and_not
// a = a & !b over params.n words.
@group(0) @binding(1) var<storage, read_write> a: array<u32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = invocation(gid);
    if (w >= params.n) {
        return;
    }
    a[w] = a[w] & ~b[w];
}

// @kernel row_ranks
// The 0-based ascending rank of |x| within its row of u0 elements (ties: lower index
// first), one invocation per element; for short rows. The chunk holds whole rows.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> ranks: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = invocation(gid);
    if (i >= params.n) {
        return;
    }
    let len = pu(0u);
    let r0 = (i / len) * len;
    let key = abs_key(x[i]);
    var rank = 0u;
    for (var j = r0; j < r0 + len; j++) {
        let other = abs_key(x[j]);
        rank += u32(other < key || (other == key && j < i));
    }
    ranks[i] = rank;
}

// @kernel row_ranks_tiled
// The same ranks for rows of at least 256 elements: one workgroup covers 256 elements of one row (u1
// workgroups per row) and walks the row in tiles of 256 keys held in workgroup memory.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> ranks: array<u32>;
var<workgroup> tile: array<u32, 256>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u);
    let per_row = pu(1u);
    let wg = invocation(gid) / 256u;
    let r = wg / per_row;
    let j = (wg % per_row) * 256u + lid;
    // Past the last row (the grid's padding) or the row's end: no rank, but every
    // invocation takes part in the barriers.
    let valid = wg < params.n / 256u && j < len;
    let i = r * len + j;
    var key = 0u;
    if (valid) {
        key = abs_key(x[i]);
    }
    var rank = 0u;
    let tiles = (len + 255u) / 256u;
    for (var t = 0u; t < tiles; t++) {
        let k = t * 256u + lid;
        if (wg < params.n / 256u && k < len) {
            tile[lid] = abs_key(x[r * len + k]);
        }
        workgroupBarrier();
        let count = min(256u, len - t * 256u);
        if (valid) {
            for (var q = 0u; q < count; q++) {
                let other = tile[q];
                let o = t * 256u + q;
                rank += u32(other < key || (other == key && o < j));
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        ranks[i] = rank;
    }
}
