//! Whole-tensor merge operations, each defined once: sema builds them with every parameter
//! resolved for one tensor, the graph carries them, and `exec::methods` computes them.
//! spec/ops.md gives each formula; [`cost`] gives each method's memory, [`elementwise`]
//! every element-wise op.
//!
//! A leaf module every stage may use; it imports only `io` (dtypes, headers) and `moe_spec`.

pub mod compute;
pub mod cost;
pub mod elementwise;
pub mod gather;
pub mod lowrank;

pub use compute::{Compute, Half};
pub use elementwise::Elementwise;

/// The family of a generalized task-arithmetic merge (mergekit's GTA table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GtaKind {
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
}

/// How a GTA method sparsifies each task vector before combining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsifier {
    /// Keep everything (task arithmetic).
    None,
    /// Keep the largest `|delta|` (TIES).
    Magnitude,
    /// Drop the largest and the smallest (breadcrumbs).
    Outliers,
    /// Keep each element with probability `density` (DARE).
    Bernoulli,
    /// Keep with probabilities ranked by magnitude (DELLA).
    Della,
}

impl GtaKind {
    pub const ALL: [GtaKind; 8] = [
        GtaKind::TaskArithmetic,
        GtaKind::Ties,
        GtaKind::DareTies,
        GtaKind::DareLinear,
        GtaKind::Breadcrumbs,
        GtaKind::BreadcrumbsTies,
        GtaKind::Della,
        GtaKind::DellaLinear,
    ];

    /// The method's name as scripts write it.
    pub fn name(self) -> &'static str {
        match self {
            GtaKind::TaskArithmetic => "task_arithmetic",
            GtaKind::Ties => "ties",
            GtaKind::DareTies => "dare_ties",
            GtaKind::DareLinear => "dare_linear",
            GtaKind::Breadcrumbs => "breadcrumbs",
            GtaKind::BreadcrumbsTies => "breadcrumbs_ties",
            GtaKind::Della => "della",
            GtaKind::DellaLinear => "della_linear",
        }
    }

    pub fn sparsifier(self) -> Sparsifier {
        match self {
            GtaKind::TaskArithmetic => Sparsifier::None,
            GtaKind::Ties => Sparsifier::Magnitude,
            GtaKind::Breadcrumbs | GtaKind::BreadcrumbsTies => Sparsifier::Outliers,
            GtaKind::DareTies | GtaKind::DareLinear => Sparsifier::Bernoulli,
            GtaKind::Della | GtaKind::DellaLinear => Sparsifier::Della,
        }
    }

    /// Sign consensus (TIES election) over the weighted deltas.
    pub fn consensus(self) -> bool {
        matches!(
            self,
            GtaKind::Ties | GtaKind::DareTies | GtaKind::BreadcrumbsTies | GtaKind::Della
        )
    }
}

/// Every merge method a script can call: the typed handle the registry
/// (`sema::methods`) gives each entry, so building a method's op is an exhaustive match,
/// never a lookup by name that can miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// Element-wise: lowers to a weighted sum.
    Linear,
    Slerp,
    Nuslerp,
    Multislerp,
    Karcher,
    /// The generalized task-arithmetic family (task_arithmetic lowers to arithmetic).
    Gta(GtaKind),
    Sce,
    Ram,
    RamPlusTl,
    ModelStock,
    Nearswap,
    ArceeFusion,
    /// A model's tensors, optionally scaled.
    Passthrough,
}

impl Method {
    /// The method's name as scripts write it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::Slerp => "slerp",
            Method::Nuslerp => "nuslerp",
            Method::Multislerp => "multislerp",
            Method::Karcher => "karcher",
            Method::Gta(kind) => kind.name(),
            Method::Sce => "sce",
            Method::Ram => "ram",
            Method::RamPlusTl => "ramplus_tl",
            Method::ModelStock => "model_stock",
            Method::Nearswap => "nearswap",
            Method::ArceeFusion => "arcee_fusion",
            Method::Passthrough => "passthrough",
        }
    }
}

/// A generalized task-arithmetic merge: inputs `[base, m...]`; the per-model vectors have
/// one entry per non-base model. `keys` seed the random masks (DARE, DELLA).
#[derive(Clone, Debug, PartialEq)]
pub struct GtaOp {
    pub kind: GtaKind,
    pub weights: Vec<f64>,
    pub densities: Vec<f64>,
    pub gammas: Vec<f64>,
    pub epsilons: Vec<f64>,
    pub lambda: f64,
    pub normalize: bool,
    pub rescale: bool,
    pub keys: Vec<u64>,
}

/// A merge of whole tensors. Inputs are listed in the order the variant documents; all
/// have the same shape and the result has that shape too, except for [`MethodOp::LowRank`],
/// whose two factors have their own shapes. Parameters are plain numbers for this one
/// tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum MethodOp {
    /// Inputs `[v0, v1]` (`v0` is the `t = 0` end). One angle for the flattened tensor;
    /// lerp when |cos| > 0.9995.
    Slerp { t: f64 },
    /// Inputs `[a, b]`, or `[base, a, b]` when `with_base` (then on task vectors).
    /// `t = w_b / (w_a + w_b)` (0.5 when the sum is below 1e-6).
    Nuslerp {
        weights: [f64; 2],
        flatten: bool,
        row_wise: bool,
        with_base: bool,
    },
    /// Inputs `[m...]`, or `[base, m...]` when `with_base`.
    Multislerp {
        weights: Vec<f64>,
        normalize_weights: bool,
        eps: f64,
        with_base: bool,
    },
    /// Inputs `[m...]`; equal weights.
    Karcher { max_iter: u32, tol: f64 },
    /// Inputs `[base, m...]`.
    Gta(GtaOp),
    /// Inputs `[base, m...]`.
    Sce { select_topk: f64 },
    /// Inputs `[base, m...]`.
    Ram { epsilon: f64 },
    /// Inputs `[base, m...]`.
    RamPlusTl { r: f64, alpha: f64, epsilon: f64 },
    /// Inputs `[base, m...]` (at least two besides the base).
    ModelStock { filter_wise: bool },
    /// Inputs `[base, m]`.
    Nearswap { t: f64 },
    /// Inputs `[base, m]`.
    ArceeFusion,
    /// `x + scale·N(0, 1)`, the normal draws keyed by `key` and the element index (an
    /// expert's `noise_scale` in `moe(...)`).
    Noise { scale: f64, key: u64 },
    /// Inputs `[b, a]` of shapes `[p, rank]` and `[rank, q]`: `scale·(B·A)`, shape `[p, q]`,
    /// or its transpose `[q, p]` when `transpose` (a LoRA adapter's delta; see
    /// [`lowrank`]). Sums over the rank in f32, in rank order.
    LowRank {
        scale: f64,
        rank: usize,
        transpose: bool,
    },
}

impl MethodOp {
    /// The method's name as scripts write it (for dumps and messages).
    pub fn name(&self) -> &'static str {
        match self {
            MethodOp::Slerp { .. } => "slerp",
            MethodOp::Nuslerp { .. } => "nuslerp",
            MethodOp::Multislerp { .. } => "multislerp",
            MethodOp::Karcher { .. } => "karcher",
            MethodOp::Gta(g) => g.kind.name(),
            MethodOp::Sce { .. } => "sce",
            MethodOp::Ram { .. } => "ram",
            MethodOp::RamPlusTl { .. } => "ramplus_tl",
            MethodOp::ModelStock { .. } => "model_stock",
            MethodOp::Nearswap { .. } => "nearswap",
            MethodOp::ArceeFusion => "arcee_fusion",
            MethodOp::Noise { .. } => "noise",
            MethodOp::LowRank { .. } => "low_rank",
        }
    }
}

/// The key of one model's random stream for one tensor: FNV-1a over the tensor name, mixed
/// with the script's seed and the model's position in the call. The stream then depends on
/// nothing else (not on threads, schedule or backend).
pub fn rng_key(seed: u64, model_position: u32, tensor: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tensor.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut x = h ^ seed.rotate_left(17) ^ ((model_position as u64) << 48 | model_position as u64);
    // splitmix64 finaliser, so nearby seeds give unrelated keys
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
