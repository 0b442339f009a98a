//! Element-wise ops, each defined once: its name, arity, constants, doc, the CPU's
//! arithmetic, the WGSL the GPU runs and the identities constant folding may use. The
//! program's expressions (`hir::TensorExpr`), the graph, the plan's kernels and the GPU's
//! kernel keys all carry an [`Elementwise`]; nothing downstream matches on a particular op.
//!
//! Arithmetic is f32 with every `+ - * /` rounded on its own (never fused into a
//! multiply-add), and sums go in operand order from the first term, so the CPU and every
//! GPU give the same bits (`shaders/elementwise.wgsl`'s `keep` stops shader compilers
//! from fusing or reordering).
//!
//! To add an op: a variant here and an arm in each `match` below; the parser and sema
//! decide how scripts write it.

use std::fmt::Write;

use super::Half;

/// An element-wise op over tensors of one shape. `C` is the type of its per-tensor
/// constants: `f32` where it is computed, `()` in a kernel key (the constants are then read
/// from the kernel's uniform, so one compiled kernel serves every value).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Elementwise<C = f32> {
    /// `-x`
    Neg,
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `x * factor`
    Scale(C),
    /// `x / divisor`
    Divide(C),
    /// `(Σ wᵢ·xᵢ) / divisor` over as many operands as weights, summed in operand order
    /// (mergekit's `linear`).
    WeightedSum { weights: Vec<C>, divisor: Option<C> },
    /// `x` rounded to a 16-bit dtype (ties to even) and back: the rounding a 16-bit
    /// compute dtype applies after every op (`ops::compute`).
    Round(Half),
}

/// What constant folding may do with one op, whatever its operands' values (NaN,
/// infinities and signed zeros included).
#[derive(Clone, Debug, PartialEq)]
pub enum Simplified {
    Keep,
    /// The op is its first operand unchanged.
    Identity,
    /// The same operands under a cheaper op with the same bits.
    Replace(Elementwise),
}

impl<C> Elementwise<C> {
    /// The op's name, as dumps and kernel keys print it.
    pub fn name(&self) -> &'static str {
        match self {
            Elementwise::Neg => "neg",
            Elementwise::Add => "add",
            Elementwise::Sub => "sub",
            Elementwise::Scale(_) => "scale",
            Elementwise::Divide(_) => "divide",
            Elementwise::WeightedSum { .. } => "weighted_sum",
            Elementwise::Round(Half::Bf16) => "round_bf16",
            Elementwise::Round(Half::F16) => "round_f16",
        }
    }

    /// How many operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Elementwise::Neg | Elementwise::Scale(_) | Elementwise::Divide(_) | Elementwise::Round(_) => 1,
            Elementwise::Add | Elementwise::Sub => 2,
            Elementwise::WeightedSum { weights, .. } => weights.len(),
        }
    }

    /// The op's constants, in the order its kernel reads them.
    pub fn constants(&self) -> Vec<&C> {
        match self {
            Elementwise::Neg | Elementwise::Add | Elementwise::Sub | Elementwise::Round(_) => Vec::new(),
            Elementwise::Scale(c) | Elementwise::Divide(c) => vec![c],
            Elementwise::WeightedSum { weights, divisor } => weights.iter().chain(divisor).collect(),
        }
    }

    /// The same op with constants `f(c)`.
    pub fn map<D>(&self, mut f: impl FnMut(&C) -> D) -> Elementwise<D> {
        match self {
            Elementwise::Neg => Elementwise::Neg,
            Elementwise::Add => Elementwise::Add,
            Elementwise::Sub => Elementwise::Sub,
            Elementwise::Round(h) => Elementwise::Round(*h),
            Elementwise::Scale(c) => Elementwise::Scale(f(c)),
            Elementwise::Divide(c) => Elementwise::Divide(f(c)),
            Elementwise::WeightedSum { weights, divisor } => Elementwise::WeightedSum {
                weights: weights.iter().map(&mut f).collect(),
                divisor: divisor.as_ref().map(f),
            },
        }
    }

    /// The op as a kernel key holds it: its shape without constant values.
    pub fn key(&self) -> Elementwise<()> {
        self.map(|_| ())
    }

    /// The WGSL of the op over the values named `x` (in operand order), reading its
    /// constants from `constant()` in [`constants`](Self::constants) order. Partial results
    /// go into `lets` as `let {v}_{k} = ...;` lines; the returned expression is the op's
    /// value. Every `+ - * /` goes through `keep` (no fusing, no reordering).
    pub fn wgsl(
        &self,
        v: &str,
        x: &[String],
        constant: &mut dyn FnMut() -> String,
        lets: &mut String,
    ) -> String {
        let arg = |i: usize| x.get(i).map_or("0.0", String::as_str);
        match self {
            Elementwise::Neg => format!("-{}", arg(0)),
            Elementwise::Add => format!("keep({} + {})", arg(0), arg(1)),
            Elementwise::Sub => format!("keep({} - {})", arg(0), arg(1)),
            Elementwise::Scale(_) => format!("keep({} * {})", arg(0), constant()),
            Elementwise::Divide(_) => format!("keep({} / {})", arg(0), constant()),
            // common.wgsl's conversions: integer arithmetic, the `half` crate's bits.
            Elementwise::Round(Half::Bf16) => format!("bf16_to_f32(f32_to_bf16({}))", arg(0)),
            Elementwise::Round(Half::F16) => format!("f16_to_f32(f32_to_f16({}))", arg(0)),
            Elementwise::WeightedSum { divisor, .. } => {
                // One `let` per partial sum, in order: `s = w0 * x0; s = s + w1 * x1; ...`.
                let mut sum = String::new();
                for (k, operand) in x.iter().enumerate() {
                    let product = format!("keep({operand} * {})", constant());
                    let partial = if k == 0 {
                        product
                    } else {
                        format!("keep({v}_{} + {product})", k - 1)
                    };
                    // Writing into a String cannot fail.
                    let _ = writeln!(lets, "    let {v}_{k} = {partial};");
                    sum = format!("{v}_{k}");
                }
                if divisor.is_some() {
                    format!("keep({sum} / {})", constant())
                } else {
                    sum
                }
            }
        }
    }
}

impl Elementwise {
    /// The CPU's arithmetic: `acc` holds the first operand's values and receives the
    /// result; `rest` are the other operands (as long as `acc`).
    pub fn apply(&self, acc: &mut [f32], rest: &[&[f32]]) {
        match self {
            Elementwise::Neg => acc.iter_mut().for_each(|x| *x = -*x),
            Elementwise::Add => binary(acc, rest, |a, b| a + b),
            Elementwise::Sub => binary(acc, rest, |a, b| a - b),
            Elementwise::Scale(f) => acc.iter_mut().for_each(|x| *x *= *f),
            Elementwise::Divide(d) => acc.iter_mut().for_each(|x| *x /= *d),
            Elementwise::Round(h) => acc.iter_mut().for_each(|x| *x = h.round(*x)),
            Elementwise::WeightedSum { weights, divisor } => {
                let Some((&w0, others)) = weights.split_first() else {
                    return;
                };
                acc.iter_mut().for_each(|x| *x *= w0);
                for (b, &w) in rest.iter().zip(others) {
                    acc.iter_mut().zip(b.iter()).for_each(|(a, x)| *a += w * *x);
                }
                if let Some(d) = divisor {
                    acc.iter_mut().for_each(|x| *x /= *d);
                }
            }
        }
    }

    /// What constant folding may do with this op (see `opt::fold` for the rules).
    pub fn simplified(&self) -> Simplified {
        match self {
            Elementwise::Scale(f) if *f == 1.0 => Simplified::Identity,
            Elementwise::Divide(d) if *d == 1.0 => Simplified::Identity,
            Elementwise::Divide(d) => match exact_reciprocal(*d) {
                Some(r) => Simplified::Replace(Elementwise::Scale(r)),
                None => Simplified::Keep,
            },
            Elementwise::WeightedSum { weights, divisor } if weights.len() == 1 && weights[0] == 1.0 => {
                match divisor {
                    None => Simplified::Identity,
                    Some(d) if *d == 1.0 => Simplified::Identity,
                    Some(d) => Simplified::Replace(Elementwise::Divide(*d)),
                }
            }
            Elementwise::WeightedSum {
                weights,
                divisor: Some(d),
            } if *d == 1.0 => Simplified::Replace(Elementwise::WeightedSum {
                weights: weights.clone(),
                divisor: None,
            }),
            _ => Simplified::Keep,
        }
    }

    /// Whether applying the op twice gives the operand back bit for bit (`-(-x)`).
    pub fn is_involution(&self) -> bool {
        matches!(self, Elementwise::Neg)
    }

    /// Whether applying the op twice is applying it once (a rounding).
    pub fn is_idempotent(&self) -> bool {
        matches!(self, Elementwise::Round(_))
    }

    /// Whether the op leaves every value stored as `dtype` unchanged (rounding to a dtype
    /// the value already has).
    pub fn preserves(&self, dtype: crate::io::DType) -> bool {
        matches!(self, Elementwise::Round(h) if h.represents(dtype))
    }
}

fn binary(acc: &mut [f32], rest: &[&[f32]], f: impl Fn(f32, f32) -> f32) {
    if let Some(b) = rest.first() {
        acc.iter_mut().zip(b.iter()).for_each(|(x, y)| *x = f(*x, *y));
    }
}

/// `1/d` when `d` is a power of two and `1/d` is a normal number (so `x / d` and
/// `x * (1/d)` are the same exact value rounded once).
fn exact_reciprocal(d: f32) -> Option<f32> {
    if !d.is_normal() {
        return None;
    }
    let bits = d.to_bits();
    if bits & 0x007f_ffff != 0 {
        return None; // a mantissa: not a power of two
    }
    let r = 1.0 / d;
    (r.is_normal() && r * d == 1.0).then_some(r)
}

/// `scale`, `weighted_sum2/` (divided): how kernel keys print an op.
impl std::fmt::Display for Elementwise<()> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Elementwise::WeightedSum { weights, divisor } => write!(
                f,
                "weighted_sum{}{}",
                weights.len(),
                if divisor.is_some() { "/" } else { "" }
            ),
            op => f.write_str(op.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reciprocals_are_exact() {
        for d in [2.0f32, 0.5, -8.0, 1024.0] {
            let r = exact_reciprocal(d).unwrap();
            for x in [1.0f32, 3.3, -7.1e-30, 1e-40, f32::MAX, f32::INFINITY, -0.0] {
                assert_eq!((x / d).to_bits(), (x * r).to_bits(), "{x} / {d}");
            }
        }
        assert_eq!(exact_reciprocal(3.0), None);
        assert_eq!(exact_reciprocal(f32::MAX), None);
        assert_eq!(exact_reciprocal(2f32.powi(127)), None);
        assert_eq!(exact_reciprocal(f32::MIN_POSITIVE), Some(2f32.powi(126)));
    }
}
