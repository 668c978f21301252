//! The container of a PyTorch checkpoint (`torch.save` since torch 1.6): a zip archive holding
//! one pickle (`<prefix>/data.pkl`) and one raw little-endian storage per key
//! (`<prefix>/data/<key>`). Tensors in the pickle are `_rebuild_tensor_v2` calls on persistent
//! storage references with an element offset, a size and strides.
//!
//! The pickle is run by candle's pickle reader ([`candle_core::pickle::Stack`]); it keeps copies
//! in its memo rather than shared references, which is enough for state dicts and, as
//! [`super::invglow`] explains, for the whole-module files of the paper authors' code.
//! Sources: the layout measured in `../shared/fixtures/torch-glow/FORMAT.md`; torch's
//! `torch/serialization.py` and `torch/_utils.py` (`_rebuild_tensor_v2`, `_rebuild_parameter`).

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::panic::AssertUnwindSafe;

use candle_core::pickle::{Object, Stack};

use super::ImportError;

/// First bytes of every zip archive (a local file header).
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// Element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    /// `torch.FloatStorage`.
    F32,
    /// `torch.DoubleStorage`.
    F64,
    /// `torch.HalfStorage`.
    F16,
    /// `torch.BFloat16Storage`.
    BF16,
    /// `torch.LongStorage` (indices; never a weight).
    I64,
}

impl StorageDtype {
    fn from_class(class: &str) -> Option<Self> {
        Some(match class {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 | Self::I64 => 8,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// A tensor of the pickle: a strided view of one storage (offset and strides in elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// Storage key (the member `data/<key>`).
    pub storage: String,
    /// Element type of the storage.
    pub dtype: StorageDtype,
    /// Offset of element [0, ..., 0] in the storage, in elements.
    pub offset: usize,
    /// Size per dimension.
    pub shape: Vec<usize>,
    /// Stride per dimension, in elements.
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Reads a tensor out of a pickle object: `_rebuild_tensor_v2(storage, offset, size,
    /// stride, ...)`, or a parameter (`_rebuild_parameter(tensor, ...)`) wrapping one.
    /// `None` when the object is not a tensor; an error when it is one but malformed.
    pub fn from_object(obj: &Object) -> Result<Option<Self>, ImportError> {
        let Object::Reduce { callable, args } = obj else {
            return Ok(None);
        };
        let Object::Class {
            module_name,
            class_name,
        } = callable.as_ref()
        else {
            return Ok(None);
        };
        let Object::Tuple(args) = args.as_ref() else {
            return Ok(None);
        };
        match (module_name.as_str(), class_name.as_str()) {
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.first() {
                    Some(inner) => Self::from_object(inner),
                    None => Err(corrupt("a parameter without its tensor")),
                }
            }
            ("torch._utils", "_rebuild_tensor_v2") => Self::from_rebuild_args(args).map(Some),
            ("torch._utils", other) if other.starts_with("_rebuild_") => Err(
                ImportError::Unsupported(format!("tensors stored as torch._utils.{other}")),
            ),
            _ => Ok(None),
        }
    }

    fn from_rebuild_args(args: &[Object]) -> Result<Self, ImportError> {
        let bad = || corrupt("a `_rebuild_tensor_v2` call with malformed arguments");
        if args.len() < 4 {
            return Err(bad());
        }
        let Object::PersistentLoad(pid) = &args[0] else {
            return Err(bad());
        };
        let Object::Tuple(pid) = pid.as_ref() else {
            return Err(bad());
        };
        // ('storage', <storage class>, key, location, numel)
        let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) =
            (pid.get(1), pid.get(2))
        else {
            return Err(bad());
        };
        let dtype = StorageDtype::from_class(class_name).ok_or_else(|| {
            ImportError::Unsupported(format!("tensors of storage type `{class_name}`"))
        })?;
        let offset = int(&args[1]).ok_or_else(bad)?;
        let shape = int_tuple(&args[2]).ok_or_else(bad)?;
        let stride = int_tuple(&args[3]).ok_or_else(bad)?;
        if shape.len() != stride.len() {
            return Err(bad());
        }
        Ok(Self {
            storage: key.clone(),
            dtype,
            offset,
            shape,
            stride,
        })
    }
}

/// A non-negative Python int (`Int` or `Long`).
pub fn int(obj: &Object) -> Option<usize> {
    match obj {
        Object::Int(v) => usize::try_from(*v).ok(),
        Object::Long(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}

/// A tuple of non-negative ints (sizes and strides; `torch.Size` too).
fn int_tuple(obj: &Object) -> Option<Vec<usize>> {
    match obj {
        Object::Tuple(items) => items.iter().map(int).collect(),
        Object::Reduce { args, .. } => match args.as_ref() {
            Object::Tuple(inner) if inner.len() == 1 => int_tuple(&inner[0]),
            _ => None,
        },
        _ => None,
    }
}

fn corrupt(problem: impl Into<String>) -> ImportError {
    ImportError::Corrupt(problem.into())
}

/// A torch zip checkpoint: its unpickled object and its storages.
pub struct Checkpoint {
    /// The object the pickle builds (a state dict, or a whole module).
    pub object: Object,
    storages: HashMap<String, Vec<u8>>,
}

impl Checkpoint {
    /// Parses a checkpoint from its bytes.
    ///
    /// Errors: [`ImportError::Unsupported`] for torch's legacy (pre-1.6, non-zip) format,
    /// [`ImportError::Corrupt`] for anything that is not a readable torch zip checkpoint
    /// (truncated, no `data.pkl`, a malformed pickle). Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ImportError> {
        if !bytes.starts_with(ZIP_MAGIC) {
            return Err(not_a_zip(bytes));
        }
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
            .map_err(|e| corrupt(format!("not a readable zip archive (truncated?): {e}")))?;
        let names: Vec<String> = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<Result<_, _>>()
            .map_err(|e| corrupt(format!("unreadable zip directory: {e}")))?;
        let pickles: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let pkl_name = match pickles.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(corrupt(
                    "the zip archive holds no `<name>/data.pkl`: not a torch checkpoint",
                ));
            }
            many => {
                return Err(corrupt(format!(
                    "the zip archive holds {} pickles ({:?}); expected one",
                    many.len(),
                    many
                )));
            }
        };
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        let pickle = read_member(&mut zip, &pkl_name)?;
        let object = unpickle(&pickle)?;
        let mut storages = HashMap::new();
        let data_prefix = format!("{prefix}data/");
        for name in &names {
            if let Some(key) = name.strip_prefix(&data_prefix)
                && !key.is_empty()
                && !key.contains('/')
            {
                storages.insert(key.to_string(), read_member(&mut zip, name)?);
            }
        }
        Ok(Self { object, storages })
    }

    /// The values of `t` as f32 in row-major order, read through its offset and strides.
    ///
    /// Errors: a missing storage, a view reaching outside its storage, or a non-float storage.
    pub fn values_f32(&self, t: &TensorRef) -> Result<Vec<f32>, ImportError> {
        let bytes = self.storages.get(&t.storage).ok_or_else(|| {
            corrupt(format!(
                "storage `data/{}` is missing from the archive",
                t.storage
            ))
        })?;
        let size = t.dtype.size();
        let available = bytes.len() / size;
        let numel = t.numel();
        if numel > 0 {
            let last = t
                .shape
                .iter()
                .zip(&t.stride)
                .try_fold(t.offset, |acc, (&n, &s)| {
                    acc.checked_add((n - 1).checked_mul(s)?)
                });
            if last.is_none_or(|l| l >= available) {
                return Err(corrupt(format!(
                    "a tensor of shape {:?} (offset {}, strides {:?}) reaches past the end of \
                     storage `data/{}` ({} elements)",
                    t.shape, t.offset, t.stride, t.storage, available
                )));
            }
        }
        let read = |i: usize| -> Result<f32, ImportError> {
            let b = &bytes[i * size..(i + 1) * size];
            Ok(match t.dtype {
                StorageDtype::F32 => f32::from_le_bytes(b.try_into().expect("4 bytes")),
                StorageDtype::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
                StorageDtype::F16 => {
                    half::f16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32()
                }
                StorageDtype::BF16 => {
                    half::bf16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32()
                }
                StorageDtype::I64 => {
                    return Err(ImportError::Unsupported(format!(
                        "an integer tensor (storage `data/{}`) where weights were expected",
                        t.storage
                    )));
                }
            })
        };
        let mut out = Vec::with_capacity(numel);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let pos = t.offset
                + index
                    .iter()
                    .zip(&t.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.push(read(pos)?);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(out)
    }
}

/// Says what a non-zip file is: torch's legacy format starts with a pickle (protocol 2) of
/// its magic number.
fn not_a_zip(bytes: &[u8]) -> ImportError {
    if bytes.starts_with(&[0x80, 0x02]) {
        ImportError::Unsupported(
            "torch's legacy checkpoint format (torch < 1.6, a sequence of pickles, not a zip \
             archive); load and save it again with torch >= 1.6 (`torch.save(torch.load(f), g)`)"
                .into(),
        )
    } else {
        corrupt("not a torch checkpoint: the file does not start with a zip header")
    }
}

fn read_member(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
) -> Result<Vec<u8>, ImportError> {
    let mut f = zip
        .by_name(name)
        .map_err(|e| corrupt(format!("cannot open `{name}` in the archive: {e}")))?;
    let mut out = Vec::with_capacity(f.size().min(1 << 30) as usize);
    f.read_to_end(&mut out)
        .map_err(|e| corrupt(format!("cannot read `{name}` (truncated archive?): {e}")))?;
    Ok(out)
}

/// Runs the pickle. candle's reader returns errors for truncated streams and unknown opcodes;
/// a panic inside it on a malformed stream is caught and reported as corruption too, so a bad
/// file never takes the process down.
fn unpickle(pickle: &[u8]) -> Result<Object, ImportError> {
    let run = || -> candle_core::Result<Object> {
        let mut stack = Stack::empty();
        stack.read_loop(&mut Cursor::new(pickle))?;
        stack.finalize()
    };
    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(obj)) => Ok(obj),
        Ok(Err(e)) => Err(corrupt(format!("malformed pickle `data.pkl`: {e}"))),
        Err(_) => Err(corrupt("malformed pickle `data.pkl` (the reader gave up)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage_of(values: &[f32]) -> Checkpoint {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Checkpoint {
            object: Object::None,
            storages: HashMap::from([("0".to_string(), bytes)]),
        }
    }

    fn view(offset: usize, shape: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            storage: "0".into(),
            dtype: StorageDtype::F32,
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        }
    }

    #[test]
    fn strided_views_read_like_torch() {
        // 2x3 row-major [[0,1,2],[3,4,5]]; its transpose is stride [1, 3].
        let ck = storage_of(&[0., 1., 2., 3., 4., 5.]);
        assert_eq!(
            ck.values_f32(&view(0, &[2, 3], &[3, 1])).unwrap(),
            [0., 1., 2., 3., 4., 5.]
        );
        assert_eq!(
            ck.values_f32(&view(0, &[3, 2], &[1, 3])).unwrap(),
            [0., 3., 1., 4., 2., 5.]
        );
        assert_eq!(ck.values_f32(&view(4, &[2], &[1])).unwrap(), [4., 5.]);
        assert_eq!(ck.values_f32(&view(0, &[], &[])).unwrap(), [0.]);
    }

    #[test]
    fn a_view_past_its_storage_is_an_error() {
        let ck = storage_of(&[0., 1., 2.]);
        let e = ck.values_f32(&view(2, &[2], &[1])).unwrap_err().to_string();
        assert!(e.contains("reaches past the end"), "{e}");
        let e = ck
            .values_f32(&view(0, &[2], &[usize::MAX]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reaches past the end"), "{e}");
        let mut missing = view(0, &[1], &[1]);
        missing.storage = "7".into();
        let e = ck.values_f32(&missing).unwrap_err().to_string();
        assert!(e.contains("data/7") && e.contains("missing"), "{e}");
    }

    #[test]
    fn legacy_and_foreign_files_are_named() {
        let legacy = [0x80u8, 0x02, 0x8a, 0x0a, 0x6c, 0xfc];
        let e = Checkpoint::from_bytes(&legacy).err().unwrap().to_string();
        assert!(e.contains("legacy"), "{e}");
        let e = Checkpoint::from_bytes(b"GIF89a").err().unwrap().to_string();
        assert!(e.contains("zip header"), "{e}");
        let e = Checkpoint::from_bytes(b"PK\x03\x04 cut")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("zip"), "{e}");
    }

    #[test]
    fn a_malformed_pickle_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"\x80\x02}q\x00(",          // cut inside a dict
            b"\x80\x02\xff",             // unknown opcode
            b"\x80\x02h\x05.",           // memo key never stored
            b"\x80\x02\x8a\xff\x01\x02", // LONG1 longer than the data (and than 8 bytes)
        ] {
            let e = unpickle(bad).unwrap_err().to_string();
            assert!(e.contains("malformed pickle"), "{e}");
        }
    }
}
