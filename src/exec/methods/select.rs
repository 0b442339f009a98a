//! O(n) top-k selection by radix histogram, ties broken by element index.
//!
//! Keys are `u32`s; for magnitudes use [`abs_key`], whose order is the order of `|x|`
//! (non-negative f32 bit patterns sort like the values). NaN magnitudes sort above +inf.

use rayon::prelude::*;

/// Which elements are the `k` largest keys: every key above `threshold`, plus the first
/// `take_equal` elements (lowest index first) whose key equals `threshold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub threshold: u32,
    pub take_equal: usize,
    /// How many keys equal `threshold` in all (when it is `take_equal`, every key at or
    /// above the threshold is selected and no index order is needed).
    pub equal_total: usize,
    /// False when `k == 0`: nothing is selected.
    pub any: bool,
}

impl Selection {
    /// Marks the selected elements of `keys` (which must be the keys the selection was
    /// computed from, in order).
    pub fn mask(&self, keys: &[u32]) -> Vec<bool> {
        let mut equal_left = self.take_equal;
        keys.iter()
            .map(|&key| {
                if !self.any {
                    false
                } else if key > self.threshold {
                    true
                } else if key == self.threshold && equal_left > 0 {
                    equal_left -= 1;
                    true
                } else {
                    false
                }
            })
            .collect()
    }
}

/// The sort key of `|x|`.
pub fn abs_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Selects the `k` largest of `keys` in two passes of 16-bit histograms.
pub fn select_top_k(keys: &[u32], k: usize) -> Selection {
    let k = k.min(keys.len());
    if k == 0 {
        return Selection {
            threshold: u32::MAX,
            take_equal: 0,
            equal_total: 0,
            any: false,
        };
    }
    // Pass 1: the high 16 bits of the k-th largest key.
    let hist = histogram(keys, |key| Some(key >> 16));
    let (high, above_high) = bucket_of_kth(&hist, k);
    // Pass 2: the low 16 bits, among keys in that high bucket.
    let hist = histogram(keys, |key| (key >> 16 == high).then_some(key & 0xffff));
    let (low, above_low) = bucket_of_kth(&hist, k - above_high);
    let threshold = (high << 16) | low;
    let greater = above_high + above_low;
    Selection {
        threshold,
        take_equal: k - greater,
        equal_total: hist[low as usize],
        any: true,
    }
}

/// Counts of `bucket(key)` over 16-bit buckets, in parallel over chunks (counts are sums,
/// so the order of combining does not matter).
fn histogram(keys: &[u32], bucket: impl Fn(u32) -> Option<u32> + Sync) -> Vec<usize> {
    const PART: usize = 1 << 20;
    keys.par_chunks(PART)
        .map(|part| {
            let mut hist = vec![0u32; 1 << 16];
            for &key in part {
                if let Some(b) = bucket(key) {
                    hist[b as usize] += 1;
                }
            }
            hist
        })
        .fold(
            || vec![0usize; 1 << 16],
            |mut acc, h| {
                acc.iter_mut().zip(&h).for_each(|(a, c)| *a += *c as usize);
                acc
            },
        )
        .reduce(
            || vec![0usize; 1 << 16],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += *y);
                a
            },
        )
}

/// The bucket holding the `k`-th largest element (1-based) and how many lie above it.
fn bucket_of_kth(hist: &[usize], k: usize) -> (u32, usize) {
    let mut above = 0usize;
    for bucket in (0..hist.len()).rev() {
        if above + hist[bucket] >= k {
            return (bucket as u32, above);
        }
        above += hist[bucket];
    }
    (0, above)
}

/// An order-preserving map of f32 values to u32 (negative values below positive ones).
pub(crate) fn ord_key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The f32 value of an [`ord_key`].
pub(crate) fn from_ord_key(key: u32) -> f32 {
    if key & 0x8000_0000 != 0 {
        f32::from_bits(key & 0x7fff_ffff)
    } else {
        f32::from_bits(!key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ord_key_orders_like_values() {
        let vals = [-f32::INFINITY, -2.0, -1e-30, -0.0, 0.0, 1e-40, 1.0, f32::INFINITY];
        for w in vals.windows(2) {
            assert!(ord_key(w[0]) < ord_key(w[1]), "{w:?}");
        }
        for v in vals {
            assert_eq!(from_ord_key(ord_key(v)).to_bits(), v.to_bits());
        }
    }

    /// The reference: a stable sort by key descending, then index ascending.
    fn by_sorting(keys: &[u32], k: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..keys.len()).collect();
        idx.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
        let mut mask = vec![false; keys.len()];
        for &i in idx.iter().take(k) {
            mask[i] = true;
        }
        mask
    }

    #[test]
    fn matches_a_stable_sort_with_ties() {
        let mut state = 0x1234_5678_9abc_def0u64;
        for case in 0..300 {
            let n: usize = (case * 7) % 97;
            let keys: Vec<u32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // few distinct values in some cases, so ties straddle the cut
                    if case % 3 == 0 {
                        (state % 5) as u32
                    } else {
                        abs_key(f32::from_bits(state as u32))
                    }
                })
                .collect();
            for k in [0, 1, n / 3, n / 2, n.saturating_sub(1), n] {
                let sel = select_top_k(&keys, k);
                assert_eq!(sel.mask(&keys), by_sorting(&keys, k), "case {case} k {k}");
            }
        }
    }

    #[test]
    fn magnitudes_order_like_values() {
        let values = [0.0f32, -0.0, 1e-40, -2.0, 1.5, f32::INFINITY, -0.5];
        let keys: Vec<u32> = values.iter().map(|v| abs_key(*v)).collect();
        let top2 = select_top_k(&keys, 2).mask(&keys);
        assert_eq!(top2, vec![false, false, false, true, false, true, false]);
    }
}
