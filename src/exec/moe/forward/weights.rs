//! Where the forward pass gets its weights: the [`Weights`] trait and [`ModelWeights`], its
//! reader over a model's mapped safetensors files, decoding to f32.

use rayon::prelude::*;

use super::ForwardError;
use crate::exec::cpu::decode;
use crate::io::reader::ReadError;
use crate::io::{DType, ModelInfo, TensorReader};

/// Where the forward pass gets its weights, decoded to f32.
pub trait Weights {
    /// The shape and the values (row-major) of tensor `name`.
    fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ForwardError>;

    /// The shape of 2-D tensor `name` and its rows `rows`, concatenated in that order. The
    /// default decodes the whole tensor; readers of mapped files decode only the rows.
    fn rows(&self, name: &str, rows: &[usize]) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        let (shape, values) = self.tensor(name)?;
        let width = match shape.as_slice() {
            [_, w] => *w,
            _ => return Err(wrong_shape(name, &[0, 0], &shape)),
        };
        let mut out = Vec::with_capacity(rows.len() * width);
        for &r in rows {
            let row = values
                .get(r * width..(r + 1) * width)
                .ok_or_else(|| wrong_shape(name, &[r + 1, width], &shape))?;
            out.extend_from_slice(row);
        }
        Ok((shape, out))
    }
}

pub(super) fn wrong_shape(name: &str, expected: &[usize], found: &[usize]) -> ForwardError {
    ForwardError::WrongShape {
        name: name.to_owned(),
        expected: expected.to_vec(),
        found: found.to_vec(),
    }
}

/// [`Weights`] over a model's mapped safetensors files.
pub struct ModelWeights<'a> {
    model: &'a ModelInfo,
    reader: &'a TensorReader,
}

/// Elements decoded per task: large enough to amortise scheduling.
const DECODE_CHUNK: usize = 1 << 16;

impl<'a> ModelWeights<'a> {
    pub fn new(model: &'a ModelInfo, reader: &'a TensorReader) -> ModelWeights<'a> {
        ModelWeights { model, reader }
    }

    fn info(&self, name: &str) -> Result<(&'a crate::io::TensorInfo, usize), ForwardError> {
        let info = self
            .model
            .tensors
            .get(name)
            .ok_or_else(|| ForwardError::MissingTensor(name.to_owned()))?;
        if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ForwardError::UnsupportedDtype {
                name: name.to_owned(),
                dtype: info.dtype.to_string(),
            });
        }
        Ok((info, info.dtype.size_bytes()))
    }

    fn read(&self, name: &str) -> Result<crate::io::reader::TensorBytes, ForwardError> {
        self.reader.read(self.model, name).map_err(|source| match source {
            ReadError::UnknownTensor { .. } => ForwardError::MissingTensor(name.to_owned()),
            source => ForwardError::Read {
                name: name.to_owned(),
                source,
            },
        })
    }
}

impl Weights for ModelWeights<'_> {
    fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        let (info, size) = self.info(name)?;
        let numel: usize = info.shape.iter().product();
        let bytes = self.read(name)?;
        if bytes.len() != numel * size {
            return Err(wrong_shape(name, &info.shape, &[bytes.len() / size.max(1)]));
        }
        let mut out = vec![0f32; numel];
        out.par_chunks_mut(DECODE_CHUNK)
            .zip(bytes.par_chunks(DECODE_CHUNK * size))
            .for_each(|(o, b)| decode(b, info.dtype, o));
        // The values now live in `out`; drop the file pages so memory does not grow
        // with the model.
        bytes.release();
        Ok((info.shape.clone(), out))
    }

    fn rows(&self, name: &str, rows: &[usize]) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        let (info, size) = self.info(name)?;
        let (n, width) = match info.shape.as_slice() {
            [n, w] => (*n, *w),
            _ => return Err(wrong_shape(name, &[0, 0], &info.shape)),
        };
        let bytes = self.read(name)?;
        if bytes.len() != n * width * size {
            return Err(wrong_shape(name, &info.shape, &[bytes.len() / size.max(1)]));
        }
        let mut out = vec![0f32; rows.len() * width];
        let row_bytes = width * size;
        for (o, &r) in out.chunks_mut(width.max(1)).zip(rows) {
            let b = bytes
                .get(r * row_bytes..(r + 1) * row_bytes)
                .ok_or_else(|| wrong_shape(name, &[r + 1, width], &info.shape))?;
            decode(b, info.dtype, o);
        }
        bytes.release();
        Ok((info.shape.clone(), out))
    }
}
