//! Parsing and validating one safetensors header.
//!
//! A safetensors file is an 8-byte little-endian header length `N`, `N` bytes of JSON,
//! then the data section. Only the first `8 + N` bytes are read here: a model's index is
//! built from headers alone, and every offset is checked up front so that later reads
//! (memory-mapped) can trust them.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::io::DType;

/// Largest header accepted (the reference implementation's limit too): a length beyond it
/// is corruption, and refusing it keeps a bad file from causing a huge allocation.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Size of the little-endian header length that starts every file.
const LEN_BYTES: u64 = 8;

/// One tensor as the header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first byte in the file.
    pub start: u64,
    /// Absolute byte offset one past the last byte in the file.
    pub end: u64,
}

/// A validated header: every entry fits the data section and no two overlap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// Sorted by `start`.
    pub entries: Vec<HeaderEntry>,
    /// The optional `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
    /// Absolute offset of the data section (`8 + N`).
    pub data_start: u64,
    pub file_len: u64,
}

/// Why a header is unusable. Display is a reason in words; the caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read the header: {0}")]
    Io(#[from] std::io::Error),
    /// The path is not a regular file, or a broken link; the error names the path.
    #[error(transparent)]
    File(#[from] crate::io::input_file::InputError),
    #[error("the file is {len} bytes long, shorter than the 8-byte header length")]
    TooShort { len: u64 },
    #[error("header length {len} is larger than the file ({file_len} bytes)")]
    PastEnd { len: u64, file_len: u64 },
    #[error("header length {len} is larger than the 100 MB limit")]
    TooLarge { len: u64 },
    #[error("only {given} header bytes were given but {needed} are needed")]
    Truncated { given: u64, needed: u64 },
    #[error("header is not valid UTF-8 (bad byte at header offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("header is not valid JSON: {0}")]
    NotJson(String),
    #[error("header is not a JSON object: {0}")]
    NotObject(String),
    #[error("`__metadata__` is not a map of strings to strings: {reason}")]
    BadMetadata { reason: String },
    #[error("tensor `{name}` appears twice in the header")]
    Duplicate { name: String },
    #[error("tensor `{name}`: {reason}")]
    BadEntry { name: String, reason: String },
    #[error("tensor `{name}` has unknown dtype `{dtype}`")]
    UnknownDtype { name: String, dtype: String },
    #[error("tensor `{name}`: shape {shape:?} of {dtype} has more bytes than fit in 64 bits")]
    ShapeOverflow {
        name: String,
        shape: Vec<usize>,
        dtype: &'static str,
    },
    #[error("tensor `{name}`: data_offsets [{begin}, {end}] end before they begin")]
    ReversedOffsets { name: String, begin: u64, end: u64 },
    #[error(
        "tensor `{name}`: shape {shape:?} of {dtype} needs {needed} bytes but its data_offsets span {span}"
    )]
    SizeMismatch {
        name: String,
        shape: Vec<usize>,
        dtype: &'static str,
        needed: u64,
        span: u64,
    },
    #[error("tensor `{name}` ends at byte {end} of the data section, which is {data_len} bytes long")]
    PastData { name: String, end: u64, data_len: u64 },
    #[error("tensors `{first}` and `{second}` overlap")]
    Overlap { first: String, second: String },
}

/// Reads and validates the header of the safetensors file at `path`, reading only the
/// header bytes.
pub fn read_header(path: &Path) -> Result<FileHeader, HeaderError> {
    let mut file = crate::io::input_file::open_regular(path)?;
    let file_len = file.metadata()?.len();
    if file_len < LEN_BYTES {
        return Err(HeaderError::TooShort { len: file_len });
    }
    let mut prefix = [0u8; LEN_BYTES as usize];
    file.read_exact(&mut prefix)?;
    let n = header_len(prefix, file_len)?;
    // `n` is bounded by MAX_HEADER_BYTES and by the file length, so this allocation is too.
    let total = usize::try_from(LEN_BYTES + n).map_err(|_| HeaderError::TooLarge { len: n })?;
    let mut buf = prefix.to_vec();
    buf.resize(total, 0);
    if let Some(json) = buf.get_mut(prefix.len()..) {
        file.read_exact(json)?;
    }
    parse_header(&buf, file_len)
}

/// Checks the header length `N` against the file and the size limit.
fn header_len(prefix: [u8; LEN_BYTES as usize], file_len: u64) -> Result<u64, HeaderError> {
    let n = u64::from_le_bytes(prefix);
    if n > file_len.saturating_sub(LEN_BYTES) {
        return Err(HeaderError::PastEnd { len: n, file_len });
    }
    if n > MAX_HEADER_BYTES {
        return Err(HeaderError::TooLarge { len: n });
    }
    Ok(n)
}

/// Parses and validates a header from the file's first `8 + N` bytes (more are ignored);
/// `file_len` is the whole file's length. Pure, so tests and fuzzing can call it directly.
pub fn parse_header(prefix_len_and_json: &[u8], file_len: u64) -> Result<FileHeader, HeaderError> {
    if file_len < LEN_BYTES {
        return Err(HeaderError::TooShort { len: file_len });
    }
    let given = prefix_len_and_json.len() as u64;
    let Some(prefix) = prefix_len_and_json
        .get(..LEN_BYTES as usize)
        .and_then(|p| <[u8; LEN_BYTES as usize]>::try_from(p).ok())
    else {
        return Err(HeaderError::Truncated {
            given,
            needed: LEN_BYTES,
        });
    };
    let n = header_len(prefix, file_len)?;
    let data_start = LEN_BYTES + n;
    let json = usize::try_from(data_start)
        .ok()
        .and_then(|end| prefix_len_and_json.get(LEN_BYTES as usize..end))
        .ok_or(HeaderError::Truncated {
            given,
            needed: data_start,
        })?;
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let RawHeader(items) = serde_json::from_str(text).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            HeaderError::NotObject(e.to_string())
        } else {
            HeaderError::NotJson(e.to_string())
        }
    })?;

    let data_len = file_len - data_start;
    let mut metadata = BTreeMap::new();
    let mut seen_metadata = false;
    let mut names = HashSet::with_capacity(items.len());
    let mut entries = Vec::with_capacity(items.len());
    for (name, value) in items {
        if name == "__metadata__" {
            if seen_metadata {
                return Err(HeaderError::Duplicate { name });
            }
            seen_metadata = true;
            metadata = parse_metadata(value)?;
            continue;
        }
        if !names.insert(name.clone()) {
            return Err(HeaderError::Duplicate { name });
        }
        let entry = parse_entry(name, value, data_start, data_len)?;
        entries.push(entry);
    }

    entries.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    // Sorted by start, so a tensor overlaps an earlier one exactly when it starts before
    // the furthest end seen so far. Zero-length tensors occupy no bytes.
    let mut furthest: Option<&HeaderEntry> = None;
    for entry in &entries {
        if entry.start == entry.end {
            continue;
        }
        if let Some(prev) = furthest {
            if entry.start < prev.end {
                return Err(HeaderError::Overlap {
                    first: prev.name.clone(),
                    second: entry.name.clone(),
                });
            }
        }
        if furthest.is_none_or(|prev| entry.end > prev.end) {
            furthest = Some(entry);
        }
    }

    Ok(FileHeader {
        entries,
        metadata,
        data_start,
        file_len,
    })
}

fn parse_metadata(value: Value) -> Result<BTreeMap<String, String>, HeaderError> {
    let Value::Object(map) = value else {
        return Err(HeaderError::BadMetadata {
            reason: format!("it is {}", json_kind(&value)),
        });
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        match value {
            Value::String(s) => {
                out.insert(key, s);
            }
            other => {
                return Err(HeaderError::BadMetadata {
                    reason: format!("`{key}` is {}", json_kind(&other)),
                })
            }
        }
    }
    Ok(out)
}

fn parse_entry(
    name: String,
    value: Value,
    data_start: u64,
    data_len: u64,
) -> Result<HeaderEntry, HeaderError> {
    let bad = |name: &str, reason: String| HeaderError::BadEntry {
        name: name.to_owned(),
        reason,
    };
    let Value::Object(fields) = value else {
        return Err(bad(
            &name,
            format!("expected an object, found {}", json_kind(&value)),
        ));
    };

    let dtype = match fields.get("dtype") {
        Some(Value::String(s)) => match DType::from_safetensors_name(s) {
            Some(d) => d,
            None => {
                return Err(HeaderError::UnknownDtype {
                    name,
                    dtype: s.clone(),
                })
            }
        },
        Some(other) => return Err(bad(&name, format!("dtype is {}, not a string", json_kind(other)))),
        None => return Err(bad(&name, "no dtype".to_owned())),
    };

    let shape = match fields.get("shape") {
        Some(Value::Array(dims)) => {
            let mut shape = Vec::with_capacity(dims.len());
            for dim in dims {
                let d = dim
                    .as_u64()
                    .and_then(|d| usize::try_from(d).ok())
                    .ok_or_else(|| {
                        bad(
                            &name,
                            format!("shape dimension {dim} is not a non-negative integer"),
                        )
                    })?;
                shape.push(d);
            }
            shape
        }
        Some(other) => return Err(bad(&name, format!("shape is {}, not an array", json_kind(other)))),
        None => return Err(bad(&name, "no shape".to_owned())),
    };

    let (begin, end) = match fields.get("data_offsets") {
        Some(Value::Array(offsets)) => match offsets.as_slice() {
            [b, e] => match (b.as_u64(), e.as_u64()) {
                (Some(b), Some(e)) => (b, e),
                _ => {
                    return Err(bad(
                        &name,
                        "data_offsets are not non-negative integers".to_owned(),
                    ))
                }
            },
            _ => {
                return Err(bad(
                    &name,
                    format!("data_offsets has {} items, not 2", offsets.len()),
                ))
            }
        },
        Some(other) => {
            return Err(bad(
                &name,
                format!("data_offsets is {}, not an array", json_kind(other)),
            ))
        }
        None => return Err(bad(&name, "no data_offsets".to_owned())),
    };

    let needed = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .and_then(|numel| numel.checked_mul(dtype.size_bytes() as u64));
    let Some(needed) = needed else {
        return Err(HeaderError::ShapeOverflow {
            name,
            shape,
            dtype: dtype.safetensors_name(),
        });
    };
    if end < begin {
        return Err(HeaderError::ReversedOffsets { name, begin, end });
    }
    if end - begin != needed {
        return Err(HeaderError::SizeMismatch {
            name,
            shape,
            dtype: dtype.safetensors_name(),
            needed,
            span: end - begin,
        });
    }
    if end > data_len {
        return Err(HeaderError::PastData { name, end, data_len });
    }
    Ok(HeaderEntry {
        name,
        dtype,
        shape,
        // Cannot overflow: end <= data_len = file_len - data_start.
        start: data_start + begin,
        end: data_start + end,
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The top-level header object as its key/value pairs in file order, so that duplicate
/// tensor names are seen (a JSON map would silently keep only the last).
struct RawHeader(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                // No size hint: it would come from untrusted input.
                let mut pairs = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    pairs.push((key, value));
                }
                Ok(RawHeader(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    /// A file image from raw header JSON and a data section of `data_len` bytes.
    fn image(json: &str, data_len: usize) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    }

    fn parse(bytes: &[u8]) -> Result<FileHeader, HeaderError> {
        parse_header(bytes, bytes.len() as u64)
    }

    fn valid_file() -> Vec<u8> {
        let a: Vec<u8> = (0..24).collect();
        let b: Vec<u8> = (0..8).collect();
        let c: Vec<u8> = Vec::new();
        let tensors = vec![
            ("a", TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![4], &b).unwrap()),
            ("c", TensorView::new(Dtype::I64, vec![0, 5], &c).unwrap()),
        ];
        let meta = [("format".to_owned(), "pt".to_owned())].into_iter().collect();
        safetensors::serialize(tensors, Some(meta)).unwrap()
    }

    #[test]
    fn parses_a_file_written_by_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, valid_file()).unwrap();
        let h = read_header(&path).unwrap();
        let bytes = valid_file();
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap().tensors();
        assert_eq!(h.entries.len(), 3);
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(h.file_len, bytes.len() as u64);
        for e in &h.entries {
            let (_, view) = reference.iter().find(|(n, _)| *n == e.name).unwrap();
            assert_eq!(e.shape, view.shape());
            assert_eq!(&bytes[e.start as usize..e.end as usize], view.data());
        }
        let a = h.entries.iter().find(|e| e.name == "a").unwrap();
        assert_eq!((a.dtype, a.end - a.start), (DType::F32, 24));
        let b = h.entries.iter().find(|e| e.name == "b").unwrap();
        assert_eq!(b.dtype, DType::BF16);
        assert!(h.entries.windows(2).all(|w| w[0].start <= w[1].start));
    }

    #[test]
    fn gaps_and_no_metadata_are_fine() {
        let json = r#"{"x":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},"y":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let h = parse(&image(json, 10)).unwrap();
        assert_eq!(h.entries[0].name, "y");
        assert_eq!(h.entries[1].start, h.data_start + 4);
        assert!(h.metadata.is_empty());
    }

    #[test]
    fn short_file() {
        let e = parse(&[1, 2, 3, 4, 5]).unwrap_err();
        assert!(matches!(e, HeaderError::TooShort { len: 5 }));
        assert_eq!(
            e.to_string(),
            "the file is 5 bytes long, shorter than the 8-byte header length"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.safetensors");
        std::fs::write(&path, [0u8; 3]).unwrap();
        assert!(matches!(
            read_header(&path),
            Err(HeaderError::TooShort { len: 3 })
        ));
        assert!(matches!(
            read_header(&dir.path().join("missing")),
            Err(HeaderError::File(
                crate::io::input_file::InputError::NotFound { .. }
            ))
        ));
    }

    #[test]
    fn absurd_header_length() {
        let mut bytes = 123_456_789_012u64.to_le_bytes().to_vec();
        bytes.resize(2048, b' ');
        let e = parse(&bytes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "header length 123456789012 is larger than the file (2048 bytes)"
        );
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.push(b'{');
        assert!(matches!(parse(&bytes), Err(HeaderError::PastEnd { .. })));
        // Over the limit though the (claimed) file is big enough.
        let bytes = 200_000_000u64.to_le_bytes();
        let e = parse_header(&bytes, 300_000_000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "header length 200000000 is larger than the 100 MB limit"
        );
    }

    #[test]
    fn length_past_eof_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut bytes = valid_file();
        bytes.truncate(20);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read_header(&path), Err(HeaderError::PastEnd { .. })));
    }

    #[test]
    fn truncated_prefix_given() {
        let bytes = valid_file();
        assert!(matches!(
            parse_header(&bytes[..20], bytes.len() as u64),
            Err(HeaderError::Truncated { given: 20, .. })
        ));
        assert!(matches!(
            parse_header(&bytes[..3], bytes.len() as u64),
            Err(HeaderError::Truncated { given: 3, .. })
        ));
    }

    #[test]
    fn not_utf8() {
        let mut bytes = image(r#"{"a":1}"#, 0);
        bytes[10] = 0xff;
        assert!(matches!(parse(&bytes), Err(HeaderError::NotUtf8 { offset: 2 })));
    }

    #[test]
    fn not_json() {
        let e = parse(&image("{\"a\": ", 0)).unwrap_err();
        assert!(matches!(e, HeaderError::NotJson(_)), "{e}");
        assert!(e.to_string().starts_with("header is not valid JSON: "));
        let e = parse(&image("{} x", 0)).unwrap_err();
        assert!(matches!(e, HeaderError::NotJson(_)), "{e}");
    }

    #[test]
    fn json_array() {
        let e = parse(&image("[1, 2]", 0)).unwrap_err();
        assert!(matches!(e, HeaderError::NotObject(_)), "{e}");
        let e = parse(&image("\"s\"", 0)).unwrap_err();
        assert!(matches!(e, HeaderError::NotObject(_)), "{e}");
    }

    #[test]
    fn bad_metadata() {
        let e = parse(&image(r#"{"__metadata__":{"format":3}}"#, 0)).unwrap_err();
        assert!(matches!(e, HeaderError::BadMetadata { .. }), "{e}");
        let e = parse(&image(r#"{"__metadata__":[]}"#, 0)).unwrap_err();
        assert!(matches!(e, HeaderError::BadMetadata { .. }), "{e}");
    }

    #[test]
    fn unknown_dtype() {
        let json = r#"{"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#;
        let e = parse(&image(json, 1)).unwrap_err();
        assert_eq!(e.to_string(), "tensor `x` has unknown dtype `Q4`");
    }

    #[test]
    fn shape_offset_mismatch() {
        let json = r#"{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#;
        let e = parse(&image(json, 24)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor `x`: shape [2, 3] of F32 needs 24 bytes but its data_offsets span 20"
        );
    }

    #[test]
    fn malformed_entries() {
        for json in [
            r#"{"x":3}"#,
            r#"{"x":{"shape":[1],"data_offsets":[0,1]}}"#,
            r#"{"x":{"dtype":"U8","data_offsets":[0,1]}}"#,
            r#"{"x":{"dtype":"U8","shape":[1]}}"#,
            r#"{"x":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
            r#"{"x":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}"#,
            r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#,
            r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
            r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[-1,1]}}"#,
            r#"{"x":{"dtype":7,"shape":[1],"data_offsets":[0,1]}}"#,
        ] {
            let e = parse(&image(json, 4)).unwrap_err();
            assert!(matches!(e, HeaderError::BadEntry { .. }), "{json}: {e}");
        }
        let json = r#"{"x":{"dtype":"U8","shape":[0],"data_offsets":[3,2]}}"#;
        let e = parse(&image(json, 4)).unwrap_err();
        assert!(matches!(e, HeaderError::ReversedOffsets { .. }), "{e}");
    }

    #[test]
    fn end_past_data() {
        let json = r#"{"x":{"dtype":"U8","shape":[100],"data_offsets":[800,900]}}"#;
        let e = parse(&image(json, 800)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor `x` ends at byte 900 of the data section, which is 800 bytes long"
        );
    }

    #[test]
    fn overlap() {
        let json = r#"{"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        let e = parse(&image(json, 8)).unwrap_err();
        assert_eq!(e.to_string(), "tensors `a` and `b` overlap");
        // A small tensor nested inside a big one, after a zero-length one.
        let json = r#"{"big":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"z":{"dtype":"U8","shape":[0],"data_offsets":[3,3]},"in":{"dtype":"U8","shape":[1],"data_offsets":[5,6]}}"#;
        let e = parse(&image(json, 8)).unwrap_err();
        assert_eq!(e.to_string(), "tensors `big` and `in` overlap");
        // Zero-length tensors never overlap, even at the same offset as data.
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}"#;
        assert!(parse(&image(json, 4)).is_ok());
    }

    #[test]
    fn duplicate_name() {
        let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let e = parse(&image(json, 2)).unwrap_err();
        assert!(
            matches!(e, HeaderError::Duplicate { ref name } if name == "a"),
            "{e}"
        );
        let json = r#"{"__metadata__":{},"__metadata__":{}}"#;
        assert!(matches!(
            parse(&image(json, 0)),
            Err(HeaderError::Duplicate { .. })
        ));
    }

    #[test]
    fn shape_product_overflow() {
        let json = r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        let e = parse(&image(json, 0)).unwrap_err();
        assert!(matches!(e, HeaderError::ShapeOverflow { .. }), "{e}");
        // numel fits but bytes do not.
        let json = r#"{"x":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}}"#;
        let e = parse(&image(json, 0)).unwrap_err();
        assert!(matches!(e, HeaderError::ShapeOverflow { .. }), "{e}");
    }

    /// Deterministic xorshift64*, so the fuzz loop needs no extra crate and is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = valid_file();
        let tokens: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"\"",
            b"0",
            b"-1",
            b"18446744073709551615",
            b"99999999999999999999",
            b"\"F32\"",
            b"\"dtype\"",
            b"\"shape\"",
            b"\"data_offsets\"",
            b"\"__metadata__\"",
            b"null",
            b"1e3",
            b"\xff",
            b" ",
        ];
        for case in 0..6000 {
            let mut bytes = match case % 3 {
                // Pure noise, sometimes with a plausible length prefix.
                0 => {
                    let len = rng.below(64);
                    let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    if b.len() >= 8 && rng.below(2) == 0 {
                        let n = rng.below(b.len() - 7) as u64;
                        b[..8].copy_from_slice(&n.to_le_bytes());
                    }
                    b
                }
                // Byte flips, truncations and extensions of a valid file.
                1 => {
                    let mut b = valid.clone();
                    for _ in 0..1 + rng.below(4) {
                        match rng.below(4) {
                            0 => {
                                let i = rng.below(b.len());
                                if let Some(x) = b.get_mut(i) {
                                    *x = rng.next() as u8;
                                }
                            }
                            1 => b.truncate(rng.below(b.len() + 1)),
                            2 => b.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
                            _ => {
                                let i = rng.below(8.min(b.len()));
                                if let Some(x) = b.get_mut(i) {
                                    *x ^= 1 << rng.below(8);
                                }
                            }
                        }
                    }
                    b
                }
                // Token splices inside the JSON of a valid file, length prefix fixed up.
                _ => {
                    let n = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
                    let mut json = valid[8..8 + n].to_vec();
                    for _ in 0..1 + rng.below(3) {
                        let at = rng.below(json.len() + 1);
                        let cut = rng.below(4).min(json.len() - at);
                        let tok = tokens[rng.below(tokens.len())];
                        json.splice(at..at + cut, tok.iter().copied());
                    }
                    let mut b = (json.len() as u64).to_le_bytes().to_vec();
                    b.extend(json);
                    b.extend(&valid[8 + n..]);
                    b
                }
            };
            let file_len = if rng.below(8) == 0 {
                rng.next()
            } else {
                bytes.len() as u64
            };
            let _ = parse_header(&bytes, file_len);
            bytes.truncate(rng.below(bytes.len() + 1));
            let _ = parse_header(&bytes, file_len);
        }
    }
}
