//! 2x2 space-to-depth squeeze with the channel order of method.md: output channel
//! `c*4 + 2*i + j` holds input channel `c` at row offset `i`, column offset `j` of each block.
//! Volume preserving: its log-determinant is 0.

use candle_core::{Result, Tensor};

/// (N, C, H, W) -> (N, 4C, H/2, W/2).
pub fn squeeze(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((n, c * 4, h / 2, w / 2))
}

/// (N, 4C, H, W) -> (N, C, 2H, 2W); exact inverse of [`squeeze`].
pub fn unsqueeze(x: &Tensor) -> Result<Tensor> {
    let (n, c4, h, w) = x.dims4()?;
    x.reshape((n, c4 / 4, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((n, c4 / 4, h * 2, w * 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    #[allow(clippy::needless_range_loop)] // index arithmetic is the point of this test
    fn channel_order_is_c4_2i_j() -> Result<()> {
        // 2 channels of 4x4 holding their own flat index.
        let x = Tensor::arange(0f32, 32., &Device::Cpu)?.reshape((1, 2, 4, 4))?;
        let y = squeeze(&x)?;
        assert_eq!(y.dims(), &[1, 8, 2, 2]);
        let yv = squeeze(&x)?.squeeze(0)?.to_vec3::<f32>()?;
        for c in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    for hh in 0..2 {
                        for ww in 0..2 {
                            let expect = (c * 16 + (2 * hh + i) * 4 + (2 * ww + j)) as f32;
                            assert_eq!(yv[c * 4 + 2 * i + j][hh][ww], expect);
                        }
                    }
                }
            }
        }
        let back = unsqueeze(&squeeze(&x)?)?;
        assert_eq!(back.dims(), x.dims());
        let diff = (back - &x)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
