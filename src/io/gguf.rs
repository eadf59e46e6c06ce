//! Memory-mapped reader for GGUF v2/v3 files (llama.cpp's model format).
//!
//! Layout (all little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count,
//! the metadata key/value pairs, the tensor table (name, dims, ggml type, offset), padding to
//! `general.alignment` (default 32), then the tensor data. Offsets in the table are relative to
//! the start of the data section.
//!
//! The file is mapped, not read: metadata is parsed once at [`GgufFile::open`], and tensor bytes
//! are only touched when a tensor is dequantised. Every length and count read from the file is
//! checked against the bytes that remain before anything is allocated, so a corrupted file
//! yields an error instead of a huge allocation or a panic.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use super::dequant::GgmlType;
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; a bound on nesting keeps a crafted file from exhausting the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// A metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
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
    String(String),
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as u64, if it is an integer that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f64, if it is numeric (integers convert, possibly rounding beyond 2^53).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v as f64),
            MetadataValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The boolean, if this is a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// llama.cpp tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Storage type of the elements.
    pub ggml_type: GgmlType,
    /// Row-major shape (ggml's `ne` reversed): a linear layer is `[out, in]`.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open, memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl GgufFile {
    /// Maps and parses `path`: header, metadata and tensor table. Fails if any tensor's data
    /// would lie outside the file, so later reads cannot go out of bounds.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only. As with any mmap, another process truncating or
        // rewriting the file while it is open is undefined behaviour; model files are not
        // expected to change under a running program, and every access is bounds-checked
        // against the length seen at open time.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let parsed = parse(&mmap)?;
        tracing::debug!(
            path = %path.display(),
            version = parsed.version,
            tensors = parsed.tensors.len(),
            metadata = parsed.metadata.len(),
            "opened GGUF"
        );
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: parsed.version,
            metadata_index: parsed.metadata_index,
            metadata: parsed.metadata,
            tensor_index: parsed.tensor_index,
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    /// Path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The metadata value stored under `key`.
    pub fn metadata(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    /// All metadata keys, in file order.
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.iter().map(|(k, _)| k.as_str())
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The table entry of tensor `name` (a llama.cpp name).
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// The raw (possibly quantised) bytes of tensor `name`, borrowed from the map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let range = usize::try_from(info.offset)
            .ok()
            .zip(usize::try_from(info.n_bytes).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?));
        // `open` validated every range, so this only fails if that invariant were broken.
        range
            .and_then(|r| self.mmap.get(r))
            .ok_or_else(|| Error::Truncated {
                what: format!("tensor `{name}` data"),
                offset: info.offset,
                needed: info.n_bytes,
                file_len: self.mmap.len() as u64,
            })
    }

    /// Tensor `name` (a llama.cpp name) dequantised to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let bytes = self.tensor_bytes(name)?;
        let values = super::dequant::dequantize(name, info.ggml_type, bytes, info.n_elements())?;
        Ok((values, info.shape.clone()))
    }
}

/// Everything `open` extracts from the bytes of a file.
struct Parsed {
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian cursor. `context` names what is being read, for errors.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    context: String,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, needed: u64) -> Error {
        Error::Truncated {
            what: self.context.clone(),
            offset: self.pos as u64,
            needed,
            file_len: self.buf.len() as u64,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or_else(|| self.truncated(n as u64))?;
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A length or count, checked to need no more than the remaining bytes when each item
    /// occupies at least `min_item_bytes`: a corrupted count fails here, before allocation.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64()?;
        let needed = n.saturating_mul(min_item_bytes as u64);
        if needed > self.remaining() as u64 {
            return Err(self.truncated(needed));
        }
        // `needed` fits in the file, so `n` fits in usize.
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let len = self.count(1)?;
        let bytes = self.take(len)?;
        Ok(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => {
                // GGUF strings must be UTF-8; keep going with replacement characters rather
                // than rejecting a whole model for one odd vocabulary entry.
                tracing::warn!(context = %self.context, "GGUF string is not valid UTF-8");
                String::from_utf8_lossy(bytes).into_owned()
            }
        })
    }

    fn value(&mut self, type_id: u32, depth: usize) -> Result<MetadataValue> {
        Ok(match type_id {
            0 => MetadataValue::U8(u8::from_le_bytes(self.array()?)),
            1 => MetadataValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetadataValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetadataValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetadataValue::U32(self.u32()?),
            5 => MetadataValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetadataValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()? {
                [0] => MetadataValue::Bool(false),
                [1] => MetadataValue::Bool(true),
                [b] => {
                    return Err(Error::InvalidGguf(format!(
                        "{}: boolean byte is {b}, not 0 or 1",
                        self.context
                    )));
                }
            },
            8 => MetadataValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::InvalidGguf(format!(
                        "{}: arrays nested deeper than {MAX_ARRAY_DEPTH}",
                        self.context
                    )));
                }
                let elem_type = self.u32()?;
                let min = min_value_bytes(elem_type).ok_or_else(|| self.bad_type(elem_type))?;
                let n = self.count(min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_type, depth + 1)?);
                }
                MetadataValue::Array(items)
            }
            10 => MetadataValue::U64(self.u64()?),
            11 => MetadataValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetadataValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.bad_type(other)),
        })
    }

    fn bad_type(&self, type_id: u32) -> Error {
        Error::InvalidGguf(format!(
            "{}: unknown metadata value type {type_id}",
            self.context
        ))
    }
}

/// Smallest encoding of one value of GGUF metadata type `type_id`, or `None` if unknown.
fn min_value_bytes(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,     // u64 length, possibly empty
        9 => 4 + 8, // element type + count, possibly empty
        10..=12 => 8,
        _ => return None,
    })
}

fn parse(buf: &[u8]) -> Result<Parsed> {
    let mut r = Reader {
        buf,
        pos: 0,
        context: "GGUF header".to_string(),
    };
    let magic = r.array::<4>()?;
    if &magic != MAGIC {
        return Err(Error::InvalidGguf(format!(
            "bad magic {:02x?} ({:?}), expected \"GGUF\"",
            magic,
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = r.u32()?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::InvalidGguf(
                "GGUF version 1 is not supported (re-convert the model with a current llama.cpp)"
                    .to_string(),
            ));
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(Error::InvalidGguf(
                "big-endian GGUF files are not supported".to_string(),
            ));
        }
        v => {
            return Err(Error::InvalidGguf(format!(
                "unsupported GGUF version {v} (supported: 2 and 3)"
            )));
        }
    }
    // Minimal sizes: a tensor entry has a name length, n_dims, type and offset; a metadata
    // entry a key length, a value type and at least one value byte.
    r.context = "tensor count".to_string();
    let n_tensors = r.count(8 + 4 + 4 + 8)?;
    r.context = "metadata count".to_string();
    let n_kv = r.count(8 + 4 + 1)?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut metadata_index = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        r.context = format!("metadata entry {i}");
        let key = r.string()?;
        r.context = format!("metadata value `{key}`");
        let type_id = r.u32()?;
        let value = r.value(type_id, 0)?;
        if metadata_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(Error::InvalidGguf(format!(
                "duplicate metadata key `{key}`"
            )));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata_index.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => match metadata.get(i).map(|(_, v)| v) {
            Some(MetadataValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            other => {
                return Err(Error::InvalidGguf(format!(
                    "general.alignment must be a power-of-two u32, found {other:?}"
                )));
            }
        },
    };

    // Tensor entries first (sizes and relative offsets); absolute ranges need the data offset,
    // which is known only after the whole table.
    let mut raw_tensors = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        r.context = format!("tensor entry {i}");
        let name = r.string()?;
        r.context = format!("tensor entry `{name}`");
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            return Err(Error::InvalidGguf(format!(
                "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(r.u64()?);
        }
        let type_id = r.u32()?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| Error::UnsupportedQuantization {
                tensor: name.clone(),
                kind: format!("unknown ggml type id {type_id}"),
            })?;
        let rel_offset = r.u64()?;

        let n_elements = ne
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::InvalidGguf(format!(
                    "tensor `{name}`: element count of {ne:?} overflows"
                ))
            })?;
        if ne
            .first()
            .is_some_and(|&row| row % ggml_type.block_size() as u64 != 0)
        {
            return Err(Error::InvalidGguf(format!(
                "tensor `{name}`: row length {} is not a multiple of the {ggml_type} block size {}",
                ne.first().copied().unwrap_or(0),
                ggml_type.block_size()
            )));
        }
        let n_bytes = ggml_type.bytes_for(n_elements).ok_or_else(|| {
            Error::InvalidGguf(format!(
                "tensor `{name}`: {ne:?} is not a whole number of {ggml_type} blocks, or its size overflows"
            ))
        })?;
        let shape = ne
            .iter()
            .rev()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::InvalidGguf(format!("tensor `{name}`: dimension too large")))?;
        // The element count must also fit in usize for the dequantised Vec.
        usize::try_from(n_elements)
            .map_err(|_| Error::InvalidGguf(format!("tensor `{name}`: too many elements")))?;
        if tensor_index
            .insert(name.clone(), raw_tensors.len())
            .is_some()
        {
            return Err(Error::InvalidGguf(format!(
                "duplicate tensor name `{name}`"
            )));
        }
        raw_tensors.push((name, ggml_type, shape, rel_offset, n_bytes));
    }

    let data_offset = (r.pos as u64).next_multiple_of(alignment);
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raw_tensors.len());
    for (name, ggml_type, shape, rel_offset, n_bytes) in raw_tensors {
        let offset = data_offset.checked_add(rel_offset);
        let end = offset.and_then(|o| o.checked_add(n_bytes));
        if end.is_none_or(|e| e > file_len) {
            return Err(Error::Truncated {
                what: format!("tensor `{name}` data"),
                offset: offset.unwrap_or(u64::MAX),
                needed: n_bytes,
                file_len,
            });
        }
        if rel_offset % alignment != 0 {
            tracing::warn!(tensor = %name, rel_offset, alignment, "misaligned GGUF tensor offset");
        }
        tensors.push(GgufTensorInfo {
            name,
            ggml_type,
            shape,
            offset: offset.unwrap_or(0),
            n_bytes,
        });
    }

    Ok(Parsed {
        version,
        metadata,
        metadata_index,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}

/// A minimal GGUF writer for building synthetic files in tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// Serialises one metadata value with its type id prefix.
    fn write_value(out: &mut Vec<u8>, v: &MetadataValue, with_type: bool) {
        let (id, body): (u32, Vec<u8>) = match v {
            MetadataValue::U8(x) => (0, x.to_le_bytes().to_vec()),
            MetadataValue::I8(x) => (1, x.to_le_bytes().to_vec()),
            MetadataValue::U16(x) => (2, x.to_le_bytes().to_vec()),
            MetadataValue::I16(x) => (3, x.to_le_bytes().to_vec()),
            MetadataValue::U32(x) => (4, x.to_le_bytes().to_vec()),
            MetadataValue::I32(x) => (5, x.to_le_bytes().to_vec()),
            MetadataValue::F32(x) => (6, x.to_le_bytes().to_vec()),
            MetadataValue::Bool(x) => (7, vec![u8::from(*x)]),
            MetadataValue::String(s) => {
                let mut b = (s.len() as u64).to_le_bytes().to_vec();
                b.extend_from_slice(s.as_bytes());
                (8, b)
            }
            MetadataValue::Array(items) => {
                let elem = items.first().map_or(4, type_id_of);
                let mut b = elem.to_le_bytes().to_vec();
                b.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    write_value(&mut b, it, false);
                }
                (9, b)
            }
            MetadataValue::U64(x) => (10, x.to_le_bytes().to_vec()),
            MetadataValue::I64(x) => (11, x.to_le_bytes().to_vec()),
            MetadataValue::F64(x) => (12, x.to_le_bytes().to_vec()),
        };
        if with_type {
            out.extend(id.to_le_bytes());
        }
        out.extend(body);
    }

    fn type_id_of(v: &MetadataValue) -> u32 {
        let mut b = Vec::new();
        write_value(&mut b, v, true);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// A tensor to write: llama.cpp name, row-major shape, type id and raw data.
    pub struct RawTensor {
        pub name: String,
        pub shape: Vec<usize>,
        pub type_id: u32,
        pub data: Vec<u8>,
    }

    impl RawTensor {
        /// An F32 tensor.
        pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
            RawTensor {
                name: name.to_string(),
                shape: shape.to_vec(),
                type_id: 0,
                data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            }
        }
    }

    /// Bytes of a GGUF v3 file with the given metadata and tensors (alignment 32).
    pub fn build_gguf(metadata: &[(&str, MetadataValue)], tensors: &[RawTensor]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            out.extend((k.len() as u64).to_le_bytes());
            out.extend(k.as_bytes());
            write_value(&mut out, v, true);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            out.extend((t.name.len() as u64).to_le_bytes());
            out.extend(t.name.as_bytes());
            out.extend((t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        // Data offsets are relative to the aligned start of the data section.
        let data_start = (out.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend(&t.data);
        }
        out
    }

    /// A unique scratch path under the system temp dir.
    pub fn temp_path(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("redrafter-test-{}-{n}-{tag}", std::process::id()))
    }

    /// Writes `bytes` to a fresh temp file and returns its path.
    pub fn write_temp(tag: &str, bytes: &[u8]) -> PathBuf {
        let path = temp_path(tag);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    fn small_file() -> Vec<u8> {
        build_gguf(
            &[
                (
                    "general.architecture",
                    MetadataValue::String("llama".into()),
                ),
                ("answer", MetadataValue::U32(42)),
                ("pi", MetadataValue::F32(3.5)),
                ("flag", MetadataValue::Bool(true)),
                (
                    "list",
                    MetadataValue::Array(vec![
                        MetadataValue::String("a".into()),
                        MetadataValue::String("bc".into()),
                    ]),
                ),
            ],
            &[
                RawTensor::f32("a.weight", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                RawTensor::f32("b.weight", &[4], &[-1.0, 0.5, 0.25, 8.0]),
            ],
        )
    }

    #[test]
    fn reads_a_synthetic_file() {
        let path = write_temp("small.gguf", &small_file());
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(
            f.metadata_keys().collect::<Vec<_>>(),
            ["general.architecture", "answer", "pi", "flag", "list"]
        );
        assert_eq!(
            f.metadata("general.architecture").and_then(|v| v.as_str()),
            Some("llama")
        );
        assert_eq!(f.metadata("answer").and_then(|v| v.as_u64()), Some(42));
        assert_eq!(f.metadata("pi").and_then(|v| v.as_f64()), Some(3.5));
        assert_eq!(f.metadata("flag").and_then(|v| v.as_bool()), Some(true));
        let list = f.metadata("list").and_then(|v| v.as_array()).unwrap();
        assert_eq!(
            list.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>(),
            ["a", "bc"]
        );
        assert!(f.metadata("nope").is_none());
        assert_eq!(f.tensors().len(), 2);
        assert_eq!(f.tensors()[0].shape, [2, 3]);
        assert_eq!(f.tensors()[0].offset % 32, 0);
        let (a, shape) = f.tensor_f32("a.weight").unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(a, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let (b, shape) = f.tensor_f32("b.weight").unwrap();
        assert_eq!(shape, [4]);
        assert_eq!(b, [-1.0, 0.5, 0.25, 8.0]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn accessors_convert_only_what_fits() {
        assert_eq!(MetadataValue::I32(-1).as_u64(), None);
        assert_eq!(MetadataValue::I64(7).as_u64(), Some(7));
        assert_eq!(MetadataValue::U8(7).as_f64(), Some(7.0));
        assert_eq!(MetadataValue::String("x".into()).as_u64(), None);
        assert_eq!(MetadataValue::U32(1).as_bool(), None);
        assert_eq!(MetadataValue::U32(1).as_str(), None);
        assert_eq!(MetadataValue::U32(1).as_array(), None);
    }

    #[test]
    fn missing_tensor_is_reported() {
        let path = write_temp("missing.gguf", &small_file());
        let f = GgufFile::open(&path).unwrap();
        let err = f.tensor_f32("c.weight").unwrap_err();
        assert!(
            matches!(&err, Error::MissingTensor(n) if n == "c.weight"),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn wrong_magic_names_the_bytes() {
        let mut bytes = small_file();
        bytes[..4].copy_from_slice(b"GGML");
        let path = write_temp("magic.gguf", &bytes);
        let err = GgufFile::open(&path).unwrap_err();
        match &err {
            Error::InvalidGguf(msg) => assert!(msg.contains("GGML"), "{msg}"),
            other => panic!("unexpected error {other}"),
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unsupported_versions_are_rejected() {
        for (version, needle) in [
            (1u32, "version 1"),
            (7, "version 7"),
            (3u32.swap_bytes(), "big-endian"),
        ] {
            let mut bytes = small_file();
            bytes[4..8].copy_from_slice(&version.to_le_bytes());
            let path = write_temp("version.gguf", &bytes);
            let err = GgufFile::open(&path).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidGguf(m) if m.contains(needle)),
                "{err}"
            );
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = small_file();
        for len in 0..bytes.len() {
            let path = write_temp("cut.gguf", &bytes[..len]);
            let result = GgufFile::open(&path);
            std::fs::remove_file(&path).unwrap();
            let err = result.unwrap_err();
            assert!(matches!(err, Error::Truncated { .. }), "len {len}: {err}");
        }
    }

    #[test]
    fn truncated_tensor_data_names_the_tensor() {
        let bytes = small_file();
        // b.weight is the last 16 bytes; cut half of it.
        let path = write_temp("trunc.gguf", &bytes[..bytes.len() - 8]);
        let err = GgufFile::open(&path).unwrap_err();
        match &err {
            Error::Truncated { what, .. } => assert!(what.contains("b.weight"), "{what}"),
            other => panic!("unexpected error {other}"),
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unknown_type_id_names_tensor_and_type() {
        let mut t = RawTensor::f32("odd.weight", &[4], &[0.0; 4]);
        t.type_id = 99;
        let path = write_temp("type.gguf", &build_gguf(&[], &[t]));
        let err = GgufFile::open(&path).unwrap_err();
        match &err {
            Error::UnsupportedQuantization { tensor, kind } => {
                assert_eq!(tensor, "odd.weight");
                assert!(kind.contains("99"), "{kind}");
            }
            other => panic!("unexpected error {other}"),
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn known_but_unsupported_type_opens_and_fails_on_read() {
        // IQ4_NL (id 20): 32 values in 18 bytes. The file is valid; only dequantisation fails.
        let t = RawTensor {
            name: "iq.weight".into(),
            shape: vec![32],
            type_id: 20,
            data: vec![0; 18],
        };
        let path = write_temp("iq.gguf", &build_gguf(&[], &[t]));
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensor_bytes("iq.weight").unwrap().len(), 18);
        let err = f.tensor_f32("iq.weight").unwrap_err();
        assert!(
            matches!(&err, Error::UnsupportedQuantization { tensor, kind } if tensor == "iq.weight" && kind == "IQ4_NL"),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn absurd_counts_fail_without_allocating() {
        // A tensor count of 2^60 must be rejected by the size bound, not attempted.
        let mut bytes = small_file();
        bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let path = write_temp("count.gguf", &bytes);
        assert!(matches!(
            GgufFile::open(&path),
            Err(Error::Truncated { .. })
        ));
        std::fs::remove_file(&path).unwrap();

        // A string length of u64::MAX in the first key.
        let mut bytes = small_file();
        bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        let path = write_temp("strlen.gguf", &bytes);
        assert!(matches!(
            GgufFile::open(&path),
            Err(Error::Truncated { .. })
        ));
        std::fs::remove_file(&path).unwrap();

        // An array claiming 2^40 u64 elements.
        let file = build_gguf(
            &[("arr", MetadataValue::Array(vec![MetadataValue::U64(1)]))],
            &[],
        );
        let mut bytes = file.clone();
        // Layout: 24-byte header, key (8 + 3), value type (4), element type (4), count (8).
        let count_at = 24 + 8 + 3 + 4 + 4;
        bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let path = write_temp("arr.gguf", &bytes);
        assert!(matches!(
            GgufFile::open(&path),
            Err(Error::Truncated { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn deeply_nested_arrays_are_rejected() {
        let mut v = MetadataValue::Array(vec![MetadataValue::U8(1)]);
        for _ in 0..MAX_ARRAY_DEPTH + 1 {
            v = MetadataValue::Array(vec![v]);
        }
        let path = write_temp("deep.gguf", &build_gguf(&[("deep", v)], &[]));
        assert!(matches!(GgufFile::open(&path), Err(Error::InvalidGguf(_))));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = GgufFile::open(temp_path("does-not-exist.gguf")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    /// The real SmolLM2-135M-Instruct file: metadata, every tensor finite with the expected
    /// shape, and reference values computed by gguf-py (`scripts/make_dequant_fixtures.py`).
    #[test]
    fn smollm2_tensors_match_gguf_py() {
        let path = crate::hub::smollm2_instruct_gguf().expect("SmolLM2 GGUF");
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensors().len(), 272);
        assert_eq!(
            f.metadata("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len()),
            Some(49152)
        );
        assert_eq!(
            f.metadata("tokenizer.ggml.merges")
                .and_then(|v| v.as_array())
                .map(|a| a.len()),
            Some(48900)
        );
        let mut counts: HashMap<GgmlType, usize> = HashMap::new();
        for t in f.tensors() {
            *counts.entry(t.ggml_type).or_default() += 1;
            let (values, shape) = f.tensor_f32(&t.name).unwrap();
            assert_eq!(shape, t.shape);
            assert_eq!(values.len(), shape.iter().product::<usize>());
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{} has non-finite values",
                t.name
            );
            let expected: &[usize] = match t.name.as_str() {
                "token_embd.weight" => &[49152, 576],
                n if n.ends_with("_norm.weight") => &[576],
                n if n.ends_with("attn_q.weight") || n.ends_with("attn_output.weight") => {
                    &[576, 576]
                }
                n if n.ends_with("attn_k.weight") || n.ends_with("attn_v.weight") => &[192, 576],
                n if n.ends_with("ffn_gate.weight") || n.ends_with("ffn_up.weight") => &[1536, 576],
                n if n.ends_with("ffn_down.weight") => &[576, 1536],
                n => panic!("unexpected tensor {n}"),
            };
            assert_eq!(shape, expected, "{}", t.name);
        }
        assert_eq!(counts.get(&GgmlType::Q4_1), Some(&210));
        assert_eq!(counts.get(&GgmlType::F32), Some(&61));
        assert_eq!(counts.get(&GgmlType::Q8_0), Some(&1));

        let reference: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/dequant/smollm2_reference.json"
        )))
        .unwrap();
        for (name, entry) in reference.as_object().unwrap() {
            let (values, shape) = f.tensor_f32(name).unwrap();
            assert_eq!(f.tensor_info(name).unwrap().ggml_type.name(), entry["type"]);
            let ref_shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
            assert_eq!(shape, ref_shape, "{name}");
            let first: Vec<f32> = serde_json::from_value(entry["first"].clone()).unwrap();
            for (i, (g, e)) in values.iter().zip(&first).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-6 * e.abs(),
                    "{name}[{i}]: {g} vs gguf-py {e}"
                );
            }
            let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
            let abs_sum: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
            let ref_sum = entry["sum"].as_f64().unwrap();
            let ref_abs = entry["abs_sum"].as_f64().unwrap();
            assert!(
                (sum - ref_sum).abs() <= 1e-6 * ref_abs,
                "{name}: sum {sum} vs {ref_sum}"
            );
            assert!(
                (abs_sum - ref_abs).abs() <= 1e-9 * ref_abs,
                "{name}: |sum| {abs_sum} vs {ref_abs}"
            );
        }
    }
}
