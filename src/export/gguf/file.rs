//! The GGUF file format, version 3, little-endian, as ggml's `docs/gguf.md` lays it out: a
//! header (magic, version, tensor count, metadata count), the metadata as typed key/value
//! pairs, each tensor's name, dimensions, type and offset, then the tensors' bytes, each
//! starting on a multiple of the alignment (32 unless `general.alignment` says otherwise).
//!
//! Written streaming (a tensor's bytes are made as they are written, so a model is not held
//! twice), and read back whole for checks.

use std::io::Write;

use anyhow::{bail, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// Where each tensor's bytes start: a multiple of this, counted from the data section's start
/// (itself aligned).
pub const ALIGNMENT: u64 = 32;

/// How a tensor's elements are stored: ggml's type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    /// Blocks of 32 elements: an f16 scale, then 32 signed bytes (value = scale × byte).
    Q8_0,
    Bf16,
}

impl TensorType {
    /// Elements per block.
    pub const Q8_0_BLOCK: usize = 32;

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
            Self::Bf16 => 30,
        }
    }

    fn from_id(id: u32) -> Option<Self> {
        [Self::F32, Self::F16, Self::Q8_0, Self::Bf16].into_iter().find(|t| t.id() == id)
    }

    /// Bytes of `elements` elements (a whole number of blocks for Q8_0).
    pub fn bytes(self, elements: u64) -> u64 {
        match self {
            Self::F32 => 4 * elements,
            Self::F16 | Self::Bf16 => 2 * elements,
            Self::Q8_0 => elements / Self::Q8_0_BLOCK as u64 * 34,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q8_0 => "Q8_0",
            Self::Bf16 => "BF16",
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            _ => None,
        }
    }

    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        match self {
            Self::U8(v) => out.write_all(&v.to_le_bytes()),
            Self::I8(v) => out.write_all(&v.to_le_bytes()),
            Self::U16(v) => out.write_all(&v.to_le_bytes()),
            Self::I16(v) => out.write_all(&v.to_le_bytes()),
            Self::U32(v) => out.write_all(&v.to_le_bytes()),
            Self::I32(v) => out.write_all(&v.to_le_bytes()),
            Self::F32(v) => out.write_all(&v.to_le_bytes()),
            Self::Bool(v) => out.write_all(&[u8::from(*v)]),
            Self::String(s) => write_string(out, s),
            Self::Array(items) => {
                // An empty array still names an element type: u8's, as ggml's writer does.
                let element = items.first().map_or(0, Value::type_id);
                out.write_all(&element.to_le_bytes())?;
                out.write_all(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|item| item.write(out))
            }
            Self::U64(v) => out.write_all(&v.to_le_bytes()),
            Self::I64(v) => out.write_all(&v.to_le_bytes()),
            Self::F64(v) => out.write_all(&v.to_le_bytes()),
        }
    }
}

fn write_string(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

/// A tensor to write: its name, its dimensions in ggml's order (the fastest-varying first,
/// so a PyTorch `[rows, cols]` is `[cols, rows]`), the type to store it as, and a way to
/// make its bytes when their turn comes.
pub struct Tensor<'a> {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: TensorType,
    pub bytes: Box<dyn FnOnce() -> Vec<u8> + 'a>,
}

impl Tensor<'_> {
    fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

fn padding(position: u64) -> usize {
    ((ALIGNMENT - position % ALIGNMENT) % ALIGNMENT) as usize
}

/// Write a GGUF file of `metadata` and `tensors` to `out`; `written` is told each tensor's
/// name as its bytes are written.
pub fn write(
    out: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: Vec<Tensor>,
    mut written: impl FnMut(&str),
) -> Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut header, key)?;
        header.extend_from_slice(&value.type_id().to_le_bytes());
        value.write(&mut header)?;
    }
    let mut offset = 0u64;
    for tensor in &tensors {
        write_string(&mut header, &tensor.name)?;
        header.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        for dim in &tensor.dims {
            header.extend_from_slice(&dim.to_le_bytes());
        }
        header.extend_from_slice(&tensor.ty.id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        let size = tensor.ty.bytes(tensor.elements());
        offset += size + padding(size) as u64;
    }
    header.resize(header.len() + padding(header.len() as u64), 0);
    out.write_all(&header)?;
    for tensor in tensors {
        let (name, size) = (tensor.name.clone(), tensor.ty.bytes(tensor.elements()));
        let bytes = (tensor.bytes)();
        if bytes.len() as u64 != size {
            bail!("tensor {name}: {} bytes made where its type and dimensions take {size}", bytes.len());
        }
        out.write_all(&bytes)?;
        out.write_all(&vec![0; padding(size)])?;
        written(&name);
    }
    Ok(())
}

/// A tensor of a file read back: where its bytes lie in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// From the start of the file.
    pub start: usize,
    pub len: usize,
}

/// A GGUF file read back: its metadata in file order and its tensors.
#[derive(Debug)]
pub struct File {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
}

impl File {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Read a GGUF file's metadata and tensor table from its bytes, checking that every tensor
/// lies inside them; an error says what is wrong where.
pub fn read(bytes: &[u8]) -> Result<File> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != MAGIC {
        bail!("not a GGUF file (no GGUF magic)");
    }
    let version = r.u32()?;
    if version != VERSION {
        bail!("GGUF version {version}; this reader reads version {VERSION}");
    }
    let tensor_count = r.u64()?;
    let metadata_count = r.u64()?;
    let mut metadata = Vec::new();
    for _ in 0..metadata_count {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty, 0).map_err(|e| anyhow::anyhow!("metadata {key}: {e}"))?;
        metadata.push((key, value));
    }
    let mut tensors = Vec::new();
    for _ in 0..tensor_count {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > 4 {
            bail!("tensor {name}: {n_dims} dimensions (ggml has at most 4)");
        }
        let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
        let id = r.u32()?;
        let ty =
            TensorType::from_id(id).ok_or_else(|| anyhow::anyhow!("tensor {name}: ggml type {id} is not read here"))?;
        let offset = r.u64()?;
        let elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let len = elements.map(|n| ty.bytes(n)).ok_or_else(|| anyhow::anyhow!("tensor {name}: dimensions overflow"))?;
        tensors.push((name, dims, ty, offset, len));
    }
    let data_start = r.at + padding(r.at as u64);
    let tensors = tensors
        .into_iter()
        .map(|(name, dims, ty, offset, len)| {
            let start = (data_start as u64).checked_add(offset).filter(|s| s % ALIGNMENT == 0);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() as u64 => {
                    Ok(TensorInfo { name, dims, ty, start: start as usize, len: len as usize })
                }
                _ => bail!("tensor {name}: offset {offset} and size {len} do not lie aligned inside the file"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(File { metadata, tensors })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else { bail!("the file ends at byte {} inside a field", self.bytes.len()) };
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = usize::try_from(self.u64()?)?;
        Ok(String::from_utf8(self.take(len)?.to_vec())?)
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array()?)),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.take(1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => bail!("a bool of value {other}"),
            },
            8 => Value::String(self.string()?),
            9 if depth == 0 => {
                let element = self.u32()?;
                let len = self.u64()?;
                // Each element takes at least a byte: a longer count is damage, not a size.
                if len > (self.bytes.len() - self.at) as u64 {
                    bail!("an array of {len} elements in the {} bytes left", self.bytes.len() - self.at);
                }
                Value::Array((0..len).map(|_| self.value(element, depth + 1)).collect::<Result<_>>()?)
            }
            9 => bail!("an array inside an array"),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown value type {other}"),
        })
    }
}
