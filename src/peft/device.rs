//! Moving adapters between devices: every trainable stays a trainable leaf (f32 on the device),
//! frozen factors (SpecLoRA-SVD's U, σ, V) are uploaded as f32 constants.

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
        })
    }
}
