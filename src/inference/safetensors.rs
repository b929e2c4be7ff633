//! Hugging Face safetensors reader: one `model.safetensors` or sharded `model-*.safetensors`
//! files in a model directory, memory-mapped. F32, F16 and BF16 tensors load as `f32`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use super::error::{InferError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    F32,
    F16,
    BF16,
}

impl StDtype {
    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StTensor {
    pub shape: Vec<usize>,
    pub dtype: StDtype,
    file: usize,
    start: usize,
    end: usize,
}

/// All tensors of a model directory's safetensors files.
pub struct SafetensorsDir {
    pub dir: PathBuf,
    pub tensors: BTreeMap<String, StTensor>,
    maps: Vec<Mmap>,
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl SafetensorsDir {
    /// Opens every `*.safetensors` file of `dir` (sorted by name).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| InferError::io(dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(InferError::format(dir, "no *.safetensors file in the directory"));
        }
        let mut tensors = BTreeMap::new();
        let mut maps = Vec::new();
        for (index, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| InferError::io(path, e))?;
            // SAFETY: read-only map of a model file that is not modified while loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| InferError::io(path, e))?;
            for (name, tensor) in parse_header(path, &mmap, index)? {
                tensors.insert(name, tensor);
            }
            maps.push(mmap);
        }
        Ok(Self { dir: dir.to_path_buf(), tensors, maps })
    }

    /// One tensor as row-major `f32` values and its shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.tensors.get(name).ok_or_else(|| InferError::MissingTensor(name.to_string()))?;
        let bytes = &self.maps[t.file][t.start..t.end];
        let values = match t.dtype {
            StDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            StDtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            StDtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        Ok((values, t.shape.clone()))
    }
}

fn parse_header(path: &Path, data: &[u8], file: usize) -> Result<Vec<(String, StTensor)>> {
    let bad = |reason: String| InferError::format(path, reason);
    let len_bytes: [u8; 8] =
        data.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| bad("shorter than 8 bytes".into()))?;
    let header_len = u64::from_le_bytes(len_bytes) as usize;
    let header_end = 8usize
        .checked_add(header_len)
        .filter(|&e| e <= data.len())
        .ok_or_else(|| bad(format!("truncated: header of {header_len} bytes")))?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&data[8..header_end]).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut out = Vec::new();
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let dtype = match entry.dtype.as_str() {
            "F32" => StDtype::F32,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            other => return Err(InferError::UnsupportedTensorType { tensor: name, dtype: other.to_string() }),
        };
        let [begin, end] = entry.data_offsets;
        let numel: usize = entry.shape.iter().product();
        let start = header_end + begin;
        let stop = header_end + end;
        if end < begin || end - begin != numel * dtype.size() {
            return Err(bad(format!(
                "tensor `{name}`: byte range {begin}..{end} does not match shape {:?}",
                entry.shape
            )));
        }
        if stop > data.len() {
            return Err(bad(format!("truncated: tensor `{name}` ends past the end of the file")));
        }
        out.push((name, StTensor { shape: entry.shape, dtype, file, start, end: stop }));
    }
    Ok(out)
}
