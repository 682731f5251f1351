//! Moving adapters between devices: every trainable stays a trainable leaf (f32 on the device),
//! frozen factors (SVD factors, PiSSA's A0/B0) are uploaded as f32 constants.
//!
//! The device has fused kernels for LoRA, SpecLoRA and SpecLoRA-SVD (cuda/adapter.cu). The other
//! methods move, but their ops have no device path yet, so a forward on the GPU returns an error
//! naming the op (see docs/ARCHITECTURE.md, CUDA backend).

use super::Adapter;
use crate::device::Device;
use crate::error::Result;
use crate::tensor::Tensor;

impl Adapter {
    /// A copy of this adapter on `device` (fresh parameter ids: build the optimizer afterwards).
    pub fn to_device(&self, device: Device) -> Result<Adapter> {
        let mv = |t: &Tensor| t.to_device(device);
        Ok(match self {
            Adapter::Lora { a, b, scale, dropout } => Adapter::Lora { a: mv(a)?, b: mv(b)?, scale: *scale, dropout: *dropout },
            Adapter::SpecLora { d, rows, a, b, scale, dropout } => {
                Adapter::SpecLora { d: mv(d)?, rows: rows.clone(), a: mv(a)?, b: mv(b)?, scale: *scale, dropout: *dropout }
            }
            Adapter::SpecLoraSvd { d, u, sigma, v, a, b, scale, dropout } => {
                Adapter::SpecLoraSvd { d: mv(d)?, u: mv(u)?, sigma: mv(sigma)?, v: mv(v)?, a: mv(a)?, b: mv(b)?, scale: *scale, dropout: *dropout }
            }
            Adapter::SpectralA { du, dv, u, sigma, v, block } => {
                Adapter::SpectralA { du: mv(du)?, dv: mv(dv)?, u: mv(u)?, sigma: mv(sigma)?, v: mv(v)?, block: *block }
            }
            Adapter::SpectralR { qu, qv, c, u, sigma, v, block } => {
                Adapter::SpectralR { qu: mv(qu)?, qv: mv(qv)?, c: mv(c)?, u: mv(u)?, sigma: mv(sigma)?, v: mv(v)?, block: *block }
            }
            Adapter::Pissa { a, b, a0, b0, scale, dropout, milora } => {
                Adapter::Pissa { a: mv(a)?, b: mv(b)?, a0: mv(a0)?, b0: mv(b0)?, scale: *scale, dropout: *dropout, milora: *milora }
            }
            Adapter::Dora { a, b, mag, wnorm2, scale, dropout } => {
                // ‖W_i‖² is f64 for the CPU op; the device keeps it in f32.
                let wnorm2 = wnorm2.to_device_as(device, if device == Device::Cpu { wnorm2.dtype() } else { crate::DType::F32 })?;
                Adapter::Dora { a: mv(a)?, b: mv(b)?, mag: mv(mag)?, wnorm2, scale: *scale, dropout: *dropout }
            }
            Adapter::Full { w } => Adapter::Full { w: mv(w)? },
        })
    }
}
