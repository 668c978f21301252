//! Random and data-dependent initialisation: writes new values into the `Var`s that back a
//! model's parameter tensors.

use std::collections::HashMap;

use candle_core::{Tensor, TensorId, Var};
use candle_nn::VarMap;

use super::Result;

/// Finds the `Var` behind a parameter tensor (a layer's tensor shares its id with the `Var` of
/// the `VarMap` it came from) and overwrites it in place, so every holder sees the new value.
pub struct ParamWriter {
    vars: HashMap<TensorId, Var>,
}

impl ParamWriter {
    /// Indexes all variables of a map.
    pub fn new(varmap: &VarMap) -> Self {
        let vars = varmap
            .all_vars()
            .into_iter()
            .map(|v| (v.as_tensor().id(), v))
            .collect();
        Self { vars }
    }

    /// Overwrites `param` (a tensor handed out by the VarMap) with `value` (same shape/dtype).
    pub fn set(&self, param: &Tensor, value: &Tensor) -> Result<()> {
        let var = self.vars.get(&param.id()).ok_or_else(|| {
            super::GlowError::Config(format!(
                "parameter of shape {:?} is not backed by a trainable variable",
                param.shape()
            ))
        })?;
        var.set(&value.to_dtype(param.dtype())?.to_device(param.device())?)?;
        Ok(())
    }
}
