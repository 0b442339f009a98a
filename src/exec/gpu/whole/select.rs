//! Top-k selection on the device by radix histograms, the selection as a mask, and key
//! counts: the twin of `exec::methods::select`.

use super::super::device::{Device, Mask, Params, Tensor};
use super::super::GpuError;

/// select.rs `Selection`, found on the device.
pub(super) struct Selection {
    pub(super) threshold: u32,
    pub(super) take_equal: usize,
    pub(super) equal_total: usize,
    pub(super) any: bool,
}

/// select.rs `bucket_of_kth`: the bucket holding the `k`-th largest (1-based) and how
/// many lie above it.
pub(super) fn bucket_of_kth(hist: &[u32], k: usize) -> (u32, usize) {
    let mut above = 0usize;
    for bucket in (0..hist.len()).rev() {
        let count = hist[bucket] as usize;
        if above + count >= k {
            return (bucket as u32, above);
        }
        above += count;
    }
    (0, above)
}

/// A 16-bit histogram of the keys `|x|`, or of the bits of `x` themselves under `raw`
/// (high halves, or low halves under `high`).
pub(super) fn histogram(
    dev: &mut Device,
    x: &Tensor,
    high: Option<u32>,
    raw: bool,
) -> Result<Vec<u32>, GpuError> {
    let hist = dev.zeros_small(1 << 16);
    let (name, u) = match high {
        None => ("histogram_high", 0),
        Some(h) => ("histogram_low", h),
    };
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        let p = Params::default().over(lo, hi).u(&[u, u32::from(raw)]);
        dev.dispatch(name, &[&x.chunks[c], &hist], p, (hi - lo) as u64)?;
    }
    let bytes = dev.read(&[&hist])?;
    dev.give_small(hist);
    Ok(bytemuck::pod_collect_to_vec(&bytes[0]))
}

/// select.rs `select_top_k` over the keys `|x|`, with the same two histograms.
pub(super) fn select_top_k(dev: &mut Device, x: &Tensor, k: usize) -> Result<Selection, GpuError> {
    select_top_k_of(dev, x, k, false)
}

/// [`select_top_k`] over the keys `|x|`, or over the bits of `x` under `raw`.
pub(super) fn select_top_k_of(
    dev: &mut Device,
    x: &Tensor,
    k: usize,
    raw: bool,
) -> Result<Selection, GpuError> {
    let k = k.min(dev.n);
    if k == 0 {
        return Ok(Selection {
            threshold: u32::MAX,
            take_equal: 0,
            equal_total: 0,
            any: false,
        });
    }
    let hist = histogram(dev, x, None, raw)?;
    let (high, above_high) = bucket_of_kth(&hist, k);
    let hist = histogram(dev, x, Some(high), raw)?;
    let (low, above_low) = bucket_of_kth(&hist, k - above_high);
    Ok(Selection {
        threshold: (high << 16) | low,
        take_equal: k - above_high - above_low,
        equal_total: hist[low as usize] as usize,
        any: true,
    })
}

/// The mask of a selection (ties at the threshold: lowest indices first).
pub(super) fn selection_mask(dev: &mut Device, x: &Tensor, sel: &Selection) -> Result<Mask, GpuError> {
    let mask = dev.alloc_mask();
    let ranges = dev.ranges();
    let words = |(lo, hi): (usize, usize)| (hi - lo).div_ceil(32);
    if !sel.any {
        dev.clear_mask(&mask);
        return Ok(mask);
    }
    let t = sel.threshold;
    if sel.take_equal == sel.equal_total {
        for (c, &(lo, hi)) in ranges.iter().enumerate() {
            let p = Params::default().over(lo, hi).u(&[t]);
            dev.dispatch(
                "mask_at_least",
                &[&x.chunks[c], &mask.chunks[c]],
                p,
                words((lo, hi)) as u64,
            )?;
        }
        return Ok(mask);
    }
    // How many threshold-equal keys each word takes: the first take_equal overall.
    let mut counts = Vec::new();
    for (c, &(lo, hi)) in ranges.iter().enumerate() {
        let out = dev.zeros_small(words((lo, hi)));
        let p = Params::default().over(lo, hi).u(&[t]);
        dev.dispatch("count_equal", &[&x.chunks[c], &out], p, words((lo, hi)) as u64)?;
        counts.push(out);
    }
    let read = dev.read(&counts.iter().collect::<Vec<_>>())?;
    for b in counts {
        dev.give_small(b);
    }
    let mut left = sel.take_equal;
    for (c, (&(lo, hi), bytes)) in ranges.iter().zip(&read).enumerate() {
        let budgets: Vec<u32> = bytemuck::pod_collect_to_vec::<u8, u32>(bytes)
            .into_iter()
            .map(|e| {
                let take = (e as usize).min(left);
                left -= take;
                take as u32
            })
            .collect();
        let budget = dev.small(&budgets);
        let p = Params::default().over(lo, hi).u(&[t]);
        dev.dispatch(
            "mask_budget",
            &[&x.chunks[c], &budget, &mask.chunks[c]],
            p,
            words((lo, hi)) as u64,
        )?;
        dev.give_small(budget);
    }
    Ok(mask)
}

/// How many elements have the key `|x|` equal to `key`.
pub(super) fn count_key(dev: &mut Device, x: &Tensor, key: u32) -> Result<usize, GpuError> {
    let mut counts = Vec::new();
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        let words = (hi - lo).div_ceil(32);
        let out = dev.zeros_small(words);
        let p = Params::default().over(lo, hi).u(&[key]);
        dev.dispatch("count_equal", &[&x.chunks[c], &out], p, words as u64)?;
        counts.push(out);
    }
    let read = dev.read(&counts.iter().collect::<Vec<_>>())?;
    for b in counts {
        dev.give_small(b);
    }
    Ok(read
        .iter()
        .flat_map(|bytes| bytemuck::pod_collect_to_vec::<u8, u32>(bytes))
        .map(|c| c as usize)
        .sum())
}
