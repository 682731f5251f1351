//! The tensor handle: an id, a shape, a dtype, shared storage and its place in the autograd graph.
//!
//! A `Tensor` is a cheap `Arc` handle. Its storage is shared by [`Tensor::detach`] and by the
//! handles saved for backward, so saving a tensor never copies it. Only trainable leaves
//! (created by [`Tensor::param`]) are ever written in place, by the optimizer.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use memmap2::Mmap;

use crate::autograd::Node;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::{host_from_vec, HostData, MappedBytes, RowMap, Storage};

/// Unique identity of a tensor handle; gradients are keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    pub(crate) fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// How a tensor takes part in autograd.
#[derive(Clone)]
pub(crate) enum GradLink {
    /// Constant: frozen weights, data, anything produced without tracked inputs.
    None,
    /// A trainable leaf: its gradient lands in the `GradStore` under its id.
    Leaf,
    /// The output of a recorded op.
    Node(Arc<Node>),
}

struct Inner {
    id: TensorId,
    shape: Shape,
    dtype: DType,
    storage: Arc<RwLock<Storage>>,
    link: GradLink,
}

#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor(id={:?}, shape={}, dtype={}, grad={})", self.0.id, self.0.shape, self.0.dtype, self.grad_kind())
    }
}

impl Tensor {
    pub(crate) fn from_storage(storage: Storage, shape: Shape) -> Tensor {
        let dtype = storage.dtype();
        debug_assert_eq!(storage.len(), shape.numel());
        Tensor(Arc::new(Inner { id: TensorId::fresh(), shape, dtype, storage: Arc::new(RwLock::new(storage)), link: GradLink::None }))
    }

    /// A new handle on the same storage with a different autograd link (and a fresh id).
    pub(crate) fn relink(&self, link: GradLink) -> Tensor {
        Tensor(Arc::new(Inner { id: TensorId::fresh(), shape: self.0.shape.clone(), dtype: self.0.dtype, storage: self.0.storage.clone(), link }))
    }

    /// A constant handle on the same storage viewed with another shape of equal size.
    pub(crate) fn with_shape(&self, shape: Shape) -> Tensor {
        debug_assert_eq!(shape.numel(), self.numel());
        Tensor(Arc::new(Inner { id: TensorId::fresh(), shape, dtype: self.0.dtype, storage: self.0.storage.clone(), link: GradLink::None }))
    }

    /// A constant tensor from a vector of a compute type (f32 or f64).
    pub fn from_vec<T: Float>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
        Self::from_host(host_from_vec(data), shape)
    }

    /// A constant tensor from host data of any dtype (bf16/f16 included).
    pub fn from_host(data: HostData, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape("Tensor::from_host", "data", format!("{} elements for {shape}", shape.numel()), format!("{} elements", data.len())));
        }
        Ok(Self::from_storage(Storage::Host(data), shape))
    }

    /// A tensor of zeros of compute type `T`.
    pub fn zeros<T: Float>(shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        Self::from_storage(Storage::Host(host_from_vec(vec![T::ZERO; shape.numel()])), shape)
    }

    /// A tensor filled with `value`.
    pub fn full<T: Float>(value: T, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        Self::from_storage(Storage::Host(host_from_vec(vec![value; shape.numel()])), shape)
    }

    /// A frozen tensor viewing `shape.numel()` elements of `dtype` at byte `offset` of a memory
    /// map. Nothing is copied. `name` is used in the error if the range is out of bounds.
    pub fn from_mmap(map: Arc<Mmap>, offset: usize, dtype: DType, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape = shape.into();
        let len = dtype.storage_bytes(shape.numel()).ok_or_else(|| {
            Error::invalid(
                "Tensor::from_mmap",
                format!("{name}: {shape} ({} elements) is not a whole number of {dtype} blocks of {}", shape.numel(), dtype.block_size()),
            )
        })?;
        let map_len = map.len();
        let bytes = MappedBytes::new(map, offset, len).ok_or_else(|| Error::Format {
            path: Path::new(name).to_path_buf(),
            msg: format!("tensor data at bytes {offset}..{} lies outside the {map_len}-byte file", offset as u128 + len as u128),
        })?;
        Ok(Self::from_storage(Storage::Mapped { bytes, dtype, numel: shape.numel(), rows: None }, shape))
    }

    /// For a memory-mapped tensor: release its pages after every converting read (see
    /// [`MappedBytes::release_after_read`]); no effect on other storage.
    pub fn release_pages_after_read(&self) {
        if let Storage::Mapped { bytes, .. } = &mut *self.write() {
            bytes.release_after_read();
        }
    }

    /// A frozen view of this matrix [rows, cols] whose logical row i is row `perm[i]` of this
    /// one. Mapped storage is not copied (rows are remapped on every read); host storage is
    /// reordered into a new buffer. `perm` must be a permutation of 0..rows.
    pub fn permute_rows(&self, perm: &[u32]) -> Result<Tensor> {
        const OP: &str = "Tensor::permute_rows";
        if self.dims().len() != 2 {
            return Err(Error::shape(OP, "tensor", "[rows, cols]", self.shape()));
        }
        let (rows, cols) = (self.dims()[0], self.dims()[1]);
        let mut seen = vec![false; rows];
        if perm.len() != rows || !perm.iter().all(|&p| (p as usize) < rows && !std::mem::replace(&mut seen[p as usize], true)) {
            return Err(Error::invalid(OP, format!("perm must be a permutation of 0..{rows}")));
        }
        if self.dtype().is_quantized() && cols % self.dtype().block_size() != 0 {
            return Err(Error::invalid(OP, format!("rows of {cols} elements split {} blocks", self.dtype())));
        }
        let storage = match &*self.read() {
            Storage::Mapped { bytes, dtype, numel, rows: None } => {
                Storage::Mapped { bytes: bytes.clone(), dtype: *dtype, numel: *numel, rows: Some(RowMap { row_len: cols, perm: perm.into() }) }
            }
            Storage::Mapped { bytes, dtype, numel, rows: Some(m) } => {
                let composed: Vec<u32> = perm.iter().map(|&p| m.perm[p as usize]).collect();
                Storage::Mapped { bytes: bytes.clone(), dtype: *dtype, numel: *numel, rows: Some(RowMap { row_len: cols, perm: composed.into() }) }
            }
            Storage::Cuda(_) => return Err(Error::invalid(OP, "permute the rows before moving the tensor to the device")),
            Storage::Host(h) => {
                fn gather<E: Copy>(v: &[E], perm: &[u32], cols: usize) -> Vec<E> {
                    perm.iter().flat_map(|&p| v[p as usize * cols..(p as usize + 1) * cols].iter().copied()).collect()
                }
                Storage::Host(match h {
                    HostData::F32(v) => HostData::F32(gather(v, perm, cols)),
                    HostData::F64(v) => HostData::F64(gather(v, perm, cols)),
                    HostData::BF16(v) => HostData::BF16(gather(v, perm, cols)),
                    HostData::F16(v) => HostData::F16(gather(v, perm, cols)),
                })
            }
        };
        Ok(Self::from_storage(storage, self.shape().clone()))
    }

    /// Marks this tensor's values as a trainable leaf (an adapter parameter). Returns a new handle
    /// (fresh id) sharing the storage. Only host tensors of a compute dtype can be trained.
    pub fn param(&self) -> Result<Tensor> {
        let mapped = self.read().is_mapped();
        if !self.dtype().is_compute() || mapped {
            return Err(Error::dtype(
                "Tensor::param",
                "tensor",
                "f32 or f64 in host or device memory",
                format!("{} ({})", self.dtype(), if mapped { "mapped" } else { "stored" }),
            ));
        }
        // A copy on the tensor's own device: the parameter never shares storage with the input.
        let data = crate::backend::kernels(self.device())?.upload(&self.read(), self.dtype(), "Tensor::param")?;
        Ok(Self::from_storage(data, self.shape().clone()).relink(GradLink::Leaf))
    }

    /// A handle on the same storage that does not take part in autograd.
    pub fn detach(&self) -> Tensor {
        self.relink(GradLink::None)
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn shape(&self) -> &Shape {
        &self.0.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.0.shape.dims()
    }
    pub fn numel(&self) -> usize {
        self.0.shape.numel()
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    /// True if gradients flow to or through this tensor.
    pub fn requires_grad(&self) -> bool {
        !matches!(self.0.link, GradLink::None)
    }
    /// True for trainable leaves created by [`Tensor::param`].
    pub fn is_param(&self) -> bool {
        matches!(self.0.link, GradLink::Leaf)
    }
    pub(crate) fn link(&self) -> &GradLink {
        &self.0.link
    }
    fn grad_kind(&self) -> &'static str {
        match &self.0.link {
            GradLink::None => "none",
            GradLink::Leaf => "param",
            GradLink::Node(_) => "node",
        }
    }
    /// Name of the op that produced this tensor, if it was recorded.
    pub fn op_name(&self) -> Option<&'static str> {
        match &self.0.link {
            GradLink::Node(n) => Some(n.name()),
            _ => None,
        }
    }

    /// Shared read access to the storage.
    pub fn read(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write().unwrap_or_else(|e| e.into_inner())
    }
    /// True if this handle is the only one on its storage (safe to update in place).
    pub(crate) fn is_exclusive(&self) -> bool {
        Arc::strong_count(&self.0) == 1 && Arc::strong_count(&self.0.storage) == 1
    }
    /// True if two handles share one storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// All elements converted to `T`. For a device tensor this panics if the copy back fails;
    /// [`Tensor::try_to_vec`] returns that as an error.
    pub fn to_vec<T: Float>(&self) -> Vec<T> {
        self.try_to_vec().unwrap_or_else(|e| panic!("{e}"))
    }
    /// All elements converted to `T`; a failed device-to-host copy is an error.
    pub fn try_to_vec<T: Float>(&self) -> Result<Vec<T>> {
        let mut out = vec![T::ZERO; self.numel()];
        self.read().try_read_into(0, &mut out)?;
        Ok(out)
    }
    pub fn to_vec_f64(&self) -> Vec<f64> {
        self.to_vec::<f64>()
    }
    pub fn to_vec_f32(&self) -> Vec<f32> {
        self.to_vec::<f32>()
    }
    /// The value of a one-element tensor.
    pub fn item(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape("Tensor::item", "tensor", "one element", self.shape()));
        }
        Ok(self.try_to_vec::<f64>()?[0])
    }

    /// Where the elements live.
    pub fn device(&self) -> crate::device::Device {
        if matches!(&*self.read(), Storage::Cuda(_)) {
            return crate::device::Device::Cuda;
        }
        crate::device::Device::Cpu
    }

    /// A copy on `device` keeping the dtype (f64 is refused on the device; f16 and block-quantized
    /// storage become bf16 there). A trainable leaf stays a trainable leaf (fresh id); anything
    /// else comes back as a constant. Returns `self` when it already lives there.
    pub fn to_device(&self, device: crate::device::Device) -> Result<Tensor> {
        let dtype = match self.dtype() {
            DType::F32 => DType::F32,
            DType::F64 if device == crate::device::Device::Cuda => {
                return Err(Error::dtype("Tensor::to_device", "tensor", "f32 or a storage dtype (the device computes in f32)", DType::F64))
            }
            DType::F64 => DType::F64,
            _ => DType::BF16,
        };
        self.to_device_as(device, dtype)
    }

    /// A copy on `device` stored as `dtype`: f32 or bf16 on the device (a frozen matrix is
    /// usually uploaded as bf16, converted a tile at a time from whatever the checkpoint stores);
    /// f32/f64 on the CPU.
    pub fn to_device_as(&self, device: crate::device::Device, dtype: DType) -> Result<Tensor> {
        let link = if self.is_param() { GradLink::Leaf } else { GradLink::None };
        if self.device() == device && self.dtype() == dtype && !self.is_param() {
            return Ok(self.clone());
        }
        let data = crate::backend::kernels(device)?.upload(&self.read(), dtype, "Tensor::to_device")?;
        Ok(Self::from_storage(data, self.shape().clone()).relink(link))
    }

    /// Overwrites a trainable tensor's values (used by optimizers and checkpoint loading).
    pub fn set_values<T: Float>(&self, values: &[T]) -> Result<()> {
        if values.len() != self.numel() {
            return Err(Error::shape("Tensor::set_values", "values", self.numel(), values.len()));
        }
        let mut g = self.write();
        let dtype = g.dtype();
        if let Storage::Cuda(_) = &*g {
            // Replace the device buffer's contents by an upload of the values (same dtype).
            let host = Storage::Host(host_from_vec(values.to_vec()));
            *g = crate::backend::kernels(crate::device::Device::Cuda)?.upload(&host, dtype, "Tensor::set_values")?;
            return Ok(());
        }
        match g.slice_mut::<T>() {
            Some(s) => {
                s.copy_from_slice(values);
                Ok(())
            }
            None => Err(Error::dtype("Tensor::set_values", "tensor", T::DTYPE, format!("{dtype} (or not host memory)"))),
        }
    }
}

/// The kernels of the device every one of `inputs` (named for the error) lives on; an input on
/// another device than the first is an error naming the op and that input.
pub fn kernels_for(op: &'static str, inputs: &[(&str, &Tensor)]) -> Result<&'static dyn crate::backend::Kernels> {
    let dev = inputs.first().map(|(_, t)| t.device()).unwrap_or_default();
    if let Some((name, t)) = inputs.iter().find(|(_, t)| t.device() != dev) {
        let first = inputs[0].0;
        return Err(Error::invalid(
            op,
            format!("{name} ({}) is on the {} while {first} is on the {dev}; move every input with Tensor::to_device", t.shape(), t.device()),
        ));
    }
    crate::backend::kernels(dev)
}
