//! Reading checkpoints: HF safetensors (single file or sharded) and GGUF, both memory-mapped.
//! Frozen weights come out as [`Tensor`](crate::Tensor)s viewing the mapped file.

pub mod gguf;
pub mod gguf_write;
pub mod safetensors;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The file(s) a model was loaded from, kept open (mapped) for as long as the model lives.
pub enum Checkpoint {
    Gguf(gguf::GgufFile),
    Safetensors(safetensors::SafetensorsCheckpoint),
}

/// One tensor of a checkpoint, for listing.
#[derive(Clone, Debug)]
pub struct TensorListing {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl Checkpoint {
    /// Opens a `.gguf` file, a `.safetensors` file, or an HF folder.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if path.extension().is_some_and(|e| e == "gguf") {
            Ok(Checkpoint::Gguf(gguf::GgufFile::open(path)?))
        } else {
            Ok(Checkpoint::Safetensors(safetensors::SafetensorsCheckpoint::open(path)?))
        }
    }

    /// Every tensor with its stored dtype and shape (HF [out, in] order).
    pub fn listing(&self) -> Vec<TensorListing> {
        match self {
            Checkpoint::Gguf(g) => {
                g.tensor_infos().iter().map(|t| TensorListing { name: t.name.clone(), dtype: t.type_name.to_string(), shape: t.dims.clone() }).collect()
            }
            Checkpoint::Safetensors(s) => s.tensor_infos().into_iter().map(|t| TensorListing { name: t.name, dtype: t.dtype, shape: t.shape }).collect(),
        }
    }

    /// The `config.json` beside safetensors weights (`None` for GGUF, whose config is metadata).
    pub fn config_json_path(&self) -> Result<Option<PathBuf>> {
        match self {
            Checkpoint::Gguf(_) => Ok(None),
            Checkpoint::Safetensors(s) => config_path(s.source()).map(Some),
        }
    }

    /// The tokenizer: built from GGUF metadata, or `tokenizer.json` beside the weights.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Checkpoint::Gguf(g) => Tokenizer::from_gguf(&g.vocab()?),
            Checkpoint::Safetensors(s) => {
                let p = folder_of(s.source()).join("tokenizer.json");
                if !p.exists() {
                    return Err(Error::Io { path: p, source: std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json beside the weights") });
                }
                Tokenizer::from_file(&p)
            }
        }
    }
}

fn folder_of(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.to_path_buf()
    } else {
        p.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
    }
}

fn config_path(source: &Path) -> Result<PathBuf> {
    let p = folder_of(source).join("config.json");
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::Io { path: p, source: std::io::Error::new(std::io::ErrorKind::NotFound, "no config.json beside the weights") })
    }
}

/// The buffered writer [`write_atomically`] hands its body, and the error mapper naming the
/// temporary file.
pub type AtomicWriter = std::io::BufWriter<std::fs::File>;

/// Writes `path` atomically: `body` writes into a buffered temporary file beside it
/// (`.NAME.tmp-PID`), which is synced and renamed over `path` only when `body` succeeded; the
/// folder is synced after the rename. On any error the temporary file is removed and `path` is
/// left as it was. `body` gets the writer and a function turning an I/O error into one naming
/// the temporary file.
pub fn write_atomically(path: &Path, body: impl FnOnce(&mut AtomicWriter, &dyn Fn(std::io::Error) -> Error) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
    let result = (|| -> Result<()> {
        let tio = |e| Error::Io { path: tmp.clone(), source: e };
        let file = std::fs::File::create(&tmp).map_err(tio)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        body(&mut w, &tio)?;
        let file = w.into_inner().map_err(|e| Error::Io { path: tmp.clone(), source: e.into_error() })?;
        file.sync_all().map_err(tio)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
