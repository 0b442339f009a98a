//! Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers:
//! as easy as 1, 2, 3", SC 2011).
//!
//! A draw depends only on `(key, index)`: no state, no thread or schedule dependence. The
//! generator is defined on 32-bit words; its one wide operation, the high half of a 32x32
//! product, is taken from a native 64-bit multiply here and from 16-bit limbs
//! ([`mulhilo_32bit`]) where only 32-bit integers exist (WGSL): both give the same bits.

/// Round multipliers and Weyl key increments of Philox4x32.
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// `(high, low)` 32-bit halves of the 64-bit product `a * b`, from 32-bit operations only:
/// the form a WGSL port uses (it has no 64-bit integers).
pub fn mulhilo_32bit(a: u32, b: u32) -> (u32, u32) {
    let (a0, a1) = (a & 0xffff, a >> 16);
    let (b0, b1) = (b & 0xffff, b >> 16);
    let ll = a0 * b0;
    let hl = a1 * b0;
    let lh = a0 * b1;
    let hh = a1 * b1;
    let mid = (ll >> 16) + (hl & 0xffff) + (lh & 0xffff);
    let hi = hh + (hl >> 16) + (lh >> 16) + (mid >> 16);
    (hi, a.wrapping_mul(b))
}

/// The same product through one native 64-bit multiply (4x faster on CPUs; bit-identical to
/// [`mulhilo_32bit`], which the tests check).
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds: the four output words for `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// A uniform draw in `[0, 1)` with 24 random bits: the first Philox word of counter
/// `(index low, index high, 0, 0)` under key `(key low, key high)`.
pub fn uniform(key: u64, index: u64) -> f32 {
    let out = philox4x32_10(
        [index as u32, (index >> 32) as u32, 0, 0],
        [key as u32, (key >> 32) as u32],
    );
    (out[0] >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// True with probability `p` (never for `p <= 0`, always for `p >= 1`).
pub fn bernoulli(key: u64, index: u64, p: f32) -> bool {
    uniform(key, index) < p
}

/// A standard normal draw (Box-Muller over the first two Philox words of counter
/// `(index low, index high, 1, 0)`, a stream apart from [`uniform`]'s).
pub fn normal(key: u64, index: u64) -> f32 {
    let out = philox4x32_10(
        [index as u32, (index >> 32) as u32, 1, 0],
        [key as u32, (key >> 32) as u32],
    );
    // u1 in (0, 1] so its logarithm is finite; u2 in [0, 1).
    let u1 = ((out[0] >> 8) as f64 + 1.0) * (1.0 / 16_777_216.0);
    let u2 = (out[1] >> 8) as f64 * (1.0 / 16_777_216.0);
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// `x + scale·N(0, 1)` element by element, in f32 (one product, one sum).
pub fn add_noise(inputs: &super::Inputs, scale: f64, key: u64) -> Vec<f32> {
    let mut x = inputs.to_f32(0);
    let s = scale as f32;
    for (i, v) in x.iter_mut().enumerate() {
        *v += normal(key, i as u64) * s;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_unit_variance_and_depend_on_key_and_index() {
        let n = 200_000u64;
        let (mut sum, mut sq) = (0f64, 0f64);
        for i in 0..n {
            let z = normal(42, i) as f64;
            assert!(z.is_finite());
            sum += z;
            sq += z * z;
        }
        let mean = sum / n as f64;
        let var = sq / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        assert_eq!(normal(42, 7), normal(42, 7));
        assert_ne!(normal(42, 7), normal(43, 7));
        assert_ne!(normal(42, 7), normal(42, 8));
    }

    #[test]
    fn mulhilo_32bit_matches_64_bit_products() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut cases = vec![(0u32, 0u32), (u32::MAX, u32::MAX), (1, u32::MAX), (M0, M1)];
        for _ in 0..10_000 {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            cases.push(((s >> 32) as u32, s as u32));
        }
        for (a, b) in cases {
            let p = a as u64 * b as u64;
            assert_eq!(
                mulhilo_32bit(a, b),
                ((p >> 32) as u32, p as u32),
                "{a:#x} * {b:#x}"
            );
            assert_eq!(mulhilo(a, b), mulhilo_32bit(a, b));
        }
    }

    /// Random123's known-answer vectors (kat_vectors, philox4x32 with 10 rounds).
    #[test]
    fn random123_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    /// Our own mapping of (key, index) to words and floats, frozen.
    #[test]
    fn fixed_values_regression() {
        assert_eq!(uniform(0, 0), (0x6627_e8d5u32 >> 8) as f32 / 16_777_216.0);
        let key = 0x0123_4567_89ab_cdefu64;
        let words = philox4x32_10([7, 0, 0, 0], [0x89ab_cdef, 0x0123_4567]);
        assert_eq!(uniform(key, 7), (words[0] >> 8) as f32 / 16_777_216.0);
        let index = (5u64 << 32) | 3;
        let words = philox4x32_10([3, 5, 0, 0], [0x89ab_cdef, 0x0123_4567]);
        assert_eq!(uniform(key, index), (words[0] >> 8) as f32 / 16_777_216.0);
        let got: Vec<u32> = (0..4).map(|i| (uniform(42, i) * 16_777_216.0) as u32).collect();
        assert_eq!(got, FROZEN, "frozen draws of key 42, indices 0..4: {got:#x?}");
    }

    const FROZEN: [u32; 4] = [0x9c_eaf0, 0xfc_db21, 0xd3_6c02, 0xba_c704];

    #[test]
    fn range_and_moments() {
        let n = 1_000_000u64;
        let (mut sum, mut sum2) = (0f64, 0f64);
        let (mut lo, mut hi) = (1f32, 0f32);
        for i in 0..n {
            let u = uniform(0xdead_beef, i);
            assert!((0.0..1.0).contains(&u));
            lo = lo.min(u);
            hi = hi.max(u);
            sum += u as f64;
            sum2 += (u as f64) * (u as f64);
        }
        let mean = sum / n as f64;
        let var = sum2 / n as f64 - mean * mean;
        // sd of the mean: sqrt(1/12 / 1e6) = 2.9e-4
        assert!((mean - 0.5).abs() < 2e-3, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 1e-3, "variance {var}");
        assert!(lo < 1e-5 && hi > 1.0 - 1e-5, "range {lo} {hi}");
        // ten equal bins
        let mut bins = [0u32; 10];
        for i in 0..100_000u64 {
            bins[(uniform(3, i) * 10.0) as usize] += 1;
        }
        for b in bins {
            assert!((b as i64 - 10_000).abs() < 600, "bins {bins:?}");
        }
    }

    #[test]
    fn nearby_keys_and_indices_are_independent() {
        let n = 100_000u64;
        for (ka, kb) in [(0u64, 1u64), (1, 1 << 32), (7, 6), (u64::MAX, u64::MAX - 1)] {
            let mut same_bit = 0u32;
            let (mut sab, mut sa, mut sb, mut saa, mut sbb) = (0f64, 0f64, 0f64, 0f64, 0f64);
            for i in 0..n {
                let a = uniform(ka, i) as f64;
                let b = uniform(kb, i) as f64;
                sab += a * b;
                sa += a;
                sb += b;
                saa += a * a;
                sbb += b * b;
                same_bit += ((a < 0.5) == (b < 0.5)) as u32;
            }
            let nf = n as f64;
            let cov = sab / nf - sa / nf * sb / nf;
            let corr = cov / ((saa / nf - (sa / nf).powi(2)) * (sbb / nf - (sb / nf).powi(2))).sqrt();
            // sd of the correlation: 1/sqrt(n) = 3.2e-3
            assert!(corr.abs() < 0.02, "keys {ka} {kb}: correlation {corr}");
            let share = same_bit as f64 / nf;
            assert!((share - 0.5).abs() < 0.01, "keys {ka} {kb}: agreement {share}");
        }
        // consecutive indices under one key
        let (mut sab, mut sa) = (0f64, 0f64);
        let mut prev = uniform(9, 0) as f64;
        for i in 1..=n {
            let u = uniform(9, i) as f64;
            sab += prev * u;
            sa += u;
            prev = u;
        }
        let lag1 = sab / n as f64 - (sa / n as f64).powi(2);
        assert!(lag1.abs() < 2e-3, "lag-1 covariance {lag1}");
    }

    #[test]
    fn depends_only_on_key_and_index() {
        let first: Vec<f32> = (0..1000).map(|i| uniform(5, i)).collect();
        // in another order, interleaved with other keys, and from other threads
        let again: Vec<f32> = (0..1000)
            .rev()
            .map(|i| {
                let _ = uniform(6, i);
                uniform(5, i)
            })
            .rev()
            .collect();
        assert_eq!(first, again);
        let threaded = std::thread::spawn(|| (0..1000).map(|i| uniform(5, i)).collect::<Vec<f32>>())
            .join()
            .unwrap();
        assert_eq!(first, threaded);
        assert!(bernoulli(5, 0, 1.0) && !bernoulli(5, 0, 0.0));
        assert_eq!(bernoulli(5, 3, 0.5), uniform(5, 3) < 0.5);
        assert_ne!(uniform(5, 1), uniform(5, 1 << 32), "the high index half counts");
    }
}
