//! GGUF v2/v3 reader: header, metadata, tensor index and memory-mapped tensor data.
//!
//! Everything read from the file is bounds-checked: a truncated or corrupt file gives an
//! [`InferError::Format`] naming the problem, never a panic. Tensor data stays in the
//! memory map until [`GgufFile::tensor_f32`] dequantizes one tensor (see [`super::quant`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::{InferError, Result};
use super::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Upper bound on any count read from the header, so a corrupt file cannot make us allocate
/// terabytes before noticing.
const MAX_COUNT: u64 = 1 << 24;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Shape in PyTorch order (outermost first): GGUF stores it innermost first.
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: BTreeMap<String, TensorInfo>,
    mmap: Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.data.len()).ok_or_else(|| {
            InferError::format(self.path, format!("truncated header: wanted {n} bytes at offset {}", self.pos))
        })?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        Ok(bytes.try_into().expect("take returned exactly N bytes"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn count(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(InferError::format(self.path, format!("implausible {what} count {n}")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        if len > self.data.len() as u64 {
            return Err(InferError::format(self.path, format!("string length {len} exceeds the file")));
        }
        let bytes = self.take(len as usize)?;
        // Some tokenizers carry invalid UTF-8 fragments; keep them readable rather than failing.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, kind: u32, depth: usize) -> Result<MetaValue> {
        Ok(match kind {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(InferError::format(self.path, "metadata arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.count("array")?;
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(InferError::format(self.path, format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and indexes a GGUF file. Tensor data is not read until asked for.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| InferError::io(path, e))?;
        // SAFETY: the map is read-only; Ludus never writes model files while serving them.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| InferError::io(path, e))?;
        let mut cur = Cursor { path, data: &mmap, pos: 0 };
        if cur.take(4).ok() != Some(MAGIC.as_slice()) {
            return Err(InferError::format(path, "missing GGUF magic (is this a GGUF file?)"));
        }
        let version = cur.u32()?;
        if !(2..=3).contains(&version) {
            return Err(InferError::format(path, format!("GGUF version {version} (supported: 2, 3)")));
        }
        let n_tensors = cur.count("tensor")?;
        let n_meta = cur.count("metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_meta {
            let key = cur.string()?;
            let kind = cur.u32()?;
            let value = cur.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = cur.string()?;
            let n_dims = cur.u32()? as usize;
            if n_dims > 4 {
                return Err(InferError::format(path, format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(cur.u64()?);
            }
            let kind = cur.u32()?;
            let offset = cur.u64()?;
            raw.push((name, dims, kind, offset));
        }
        let alignment = metadata.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(InferError::format(path, format!("alignment {alignment} is not a power of two")));
        }
        let data_start = (cur.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, kind, offset) in raw {
            let dtype = GgmlType::from_id(kind).ok_or_else(|| InferError::UnsupportedTensorType {
                tensor: name.clone(),
                dtype: format!("GGML type {kind}"),
            })?;
            let numel = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let n_bytes = numel.and_then(|n| dtype.bytes_for(n)).ok_or_else(|| {
                InferError::format(path, format!("tensor `{name}` has invalid dimensions {dims:?} for {dtype:?}"))
            })?;
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= mmap.len() as u64 => {
                    let shape = dims.iter().rev().map(|&d| d as usize).collect();
                    let info = TensorInfo {
                        name: name.clone(),
                        shape,
                        dtype,
                        offset: start as usize,
                        n_bytes: n_bytes as usize,
                    };
                    tensors.insert(name, info);
                }
                _ => {
                    return Err(InferError::format(
                        path,
                        format!("truncated: tensor `{name}` ends past the end of the file ({} bytes)", mmap.len()),
                    ))
                }
            }
        }
        Ok(Self { path: path.to_path_buf(), version, metadata, tensors, mmap })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| InferError::MissingMetadata(key.to_string()))
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetaValue::as_u64)
    }

    /// The raw (still quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset..info.offset + info.n_bytes]
    }

    /// Dequantizes one tensor into a row-major `Vec<f32>` of [`TensorInfo::shape`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.tensors.get(name).ok_or_else(|| InferError::MissingTensor(name.to_string()))?;
        let values = info
            .dtype
            .dequantize(self.tensor_bytes(info), info.numel())
            .map_err(|reason| InferError::format(&self.path, format!("tensor `{name}`: {reason}")))?;
        Ok((values, info.shape.clone()))
    }
}

/// Writes a GGUF v3 file holding only `metadata` (no tensors): protected model bundles
/// carry their tokenizer and chat template this way.
pub fn write_metadata_only(path: &Path, metadata: &BTreeMap<String, MetaValue>) -> Result<()> {
    write_file(path, metadata, &[])
}

/// One f32 tensor to write: GGUF name, shape (row-major, outermost first), values.
pub type F32Tensor = (String, Vec<usize>, Vec<f32>);

/// Writes a GGUF v3 file with `metadata` and f32 `tensors` (distilled students).
pub fn write_file(path: &Path, metadata: &BTreeMap<String, MetaValue>, tensors: &[F32Tensor]) -> Result<()> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn kind(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }
    fn value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.push(*x as u8),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(*x as u8),
            MetaValue::Str(s) => string(out, s),
            MetaValue::Array(items) => {
                let inner = items.first().map_or(8, kind);
                out.extend_from_slice(&inner.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|i| value(out, i));
            }
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        out.extend_from_slice(&kind(v).to_le_bytes());
        value(&mut out, v);
    }
    // Tensor infos (dimensions innermost first, as ggml orders them), then the data,
    // each tensor at a 32-byte aligned offset.
    let mut offset = 0u64;
    for (name, shape, values) in tensors {
        string(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes()); // F32
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (values.len() as u64 * 4).div_ceil(32) * 32;
    }
    if !tensors.is_empty() {
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for (_, _, values) in tensors {
            out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
        }
    }
    std::fs::write(path, out).map_err(|e| InferError::io(path, e))
}
