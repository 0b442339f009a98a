//! Byte-size units, shared by the script syntax (`shard: 2GB`) and the command line
//! (`--max-memory 8GB`). A leaf module: it imports nothing from the crate.

/// The bytes one `unit` stands for, case-insensitively: B, K/KB, M/MB, G/GB, T/TB (powers
/// of 1000), KiB, MiB, GiB, TiB (powers of 1024); an empty unit is bytes. `None` for any
/// other unit.
pub fn size_unit_scale(unit: &str) -> Option<f64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_binary_units_in_any_case() {
        assert_eq!(size_unit_scale(""), Some(1.0));
        assert_eq!(size_unit_scale("GB"), Some(1e9));
        assert_eq!(size_unit_scale("k"), Some(1e3));
        assert_eq!(size_unit_scale("MiB"), Some(1048576.0));
        assert_eq!(size_unit_scale("tib"), Some(1099511627776.0));
        assert_eq!(size_unit_scale("xb"), None);
    }
}
