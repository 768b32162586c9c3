//! Rotary position embedding as one op with a backward, for the language model's M-RoPE and
//! the vision tower's 2-D rotary. Positions enter as half tables cos/sin: (B, T, D/2) f32
//! (the second half of a head repeats the first half's frequencies), built on the host by
//! [`mrope_tables`] and [`vision_tables`] with exactly the f32 formulas of `omr_model::rope`
//! (same bits), so the op equals `omr_model::ops::apply_rotary` on those positions.
//!
//! x: (B, T, H, D) f32|bf16 (the projection's layout, no transpose) → y: (B, T, H, D).
//! The backward is the inverse rotation (sin negated), the same kernel. CPU: [`rotate_ref`];
//! CUDA: `kernels/rotary.cu`.

use crate::host;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

/// Applies the rotation given by cos/sin: (B, T, D/2) f32 to x: (B, T, H, D).
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check(x, cos, sin)?;
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rotary { sign: 1.0 })
}

/// The inverse rotation (the backward of [`rotary`]) on any device.
pub fn rotary_inverse(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check(dy, cos, sin)?;
    // This is the backward of `rotary`; no second derivative is taken.
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    dy.contiguous()?
        .apply_op3_no_bwd(&cos, &sin, &Rotary { sign: -1.0 }) // no-grad ok
}

fn check(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    host::check_float("rotary", x.dtype())?;
    let (b, t, _h, d) = x.dims4()?;
    let want = [b, t, d / 2];
    if d % 2 != 0 || cos.dims() != want || sin.dims() != want {
        bail!(
            "rotary: x {:?} needs f32 cos/sin of {want:?}, got {:?} / {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    if cos.dtype() != DType::F32 || sin.dtype() != DType::F32 {
        bail!("rotary: cos/sin must be f32")
    }
    Ok(())
}

/// `1 / theta^(2j/dim)` for j < dim/2, in f32 as torch (and `omr_model::rope::inv_freq`).
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|j| 1.0f32 / (theta as f32).powf((2 * j) as f32 / dim as f32))
        .collect()
}

/// M-RoPE half tables (B, T, D/2) from 3-D positions `pos[axis][b][t]` (temporal, height,
/// width): frequency j uses the axis `mrope_section` assigns it (sections sum to D/2).
pub fn mrope_tables(
    pos: &[Vec<Vec<i64>>; 3],
    mrope_section: &[usize],
    theta: f64,
    head_dim: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    if mrope_section.iter().sum::<usize>() != half {
        bail!("mrope_tables: mrope_section {mrope_section:?} must sum to head_dim/2 = {half}")
    }
    let inv = inv_freq(head_dim, theta);
    let axis_of: Vec<usize> = mrope_section
        .iter()
        .enumerate()
        .flat_map(|(a, &n)| std::iter::repeat_n(a, n))
        .collect();
    let b = pos[0].len();
    let t = pos[0].first().map_or(0, Vec::len);
    let (mut cos, mut sin) = (
        Vec::with_capacity(b * t * half),
        Vec::with_capacity(b * t * half),
    );
    for ((r0, r1), r2) in pos[0].iter().zip(&pos[1]).zip(&pos[2]) {
        for ((&p0, &p1), &p2) in r0.iter().zip(r1).zip(r2) {
            let p = [p0, p1, p2];
            for (&axis, &f) in axis_of.iter().zip(&inv) {
                let angle = p[axis] as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (b, t, half), device)?,
        Tensor::from_vec(sin, (b, t, half), device)?,
    ))
}

/// Vision 2-D rotary half tables (1, N, D/2) for patch coordinates `(row, col)`: the first
/// D/4 frequencies rotate with the row, the next D/4 with the column (θ = 10000).
pub fn vision_tables(
    coords: &[(usize, usize)],
    head_dim: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv = inv_freq(head_dim / 2, 10000.0);
    let half = head_dim / 2;
    let (mut cos, mut sin) = (
        Vec::with_capacity(coords.len() * half),
        Vec::with_capacity(coords.len() * half),
    );
    for &(h, w) in coords {
        for p in [h, w] {
            for &f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let n = coords.len();
    Ok((
        Tensor::from_vec(cos, (1, n, half), device)?,
        Tensor::from_vec(sin, (1, n, half), device)?,
    ))
}

/// Reference: x (B·T·H·D) rotated by cos/sin (B·T·D/2), `sign` −1 for the inverse.
pub fn rotate_ref(x: &[f32], cos: &[f32], sin: &[f32], h: usize, d: usize, sign: f32) -> Vec<f32> {
    let half = d / 2;
    let mut y = vec![0f32; x.len()];
    for (row, (xr, yr)) in x.chunks(h * d).zip(y.chunks_mut(h * d)).enumerate() {
        let c = &cos[row * half..(row + 1) * half];
        let s = &sin[row * half..(row + 1) * half];
        for hi in 0..h {
            for j in 0..half {
                let (x1, x2) = (xr[hi * d + j], xr[hi * d + j + half]);
                let sj = sign * s[j];
                yr[hi * d + j] = x1 * c[j] - x2 * sj;
                yr[hi * d + j + half] = x2 * c[j] + x1 * sj;
            }
        }
    }
    y
}

struct Rotary {
    sign: f32,
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "omr-rotary"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, h, d) = xl.shape().dims4()?;
        let y = rotate_ref(
            &host::read_f32(xs, xl)?,
            &host::read_f32(cs, cl)?,
            &host::read_f32(ss, sl)?,
            h,
            d,
            self.sign,
        );
        Ok((host::store(y, xs.dtype())?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, In, Out, PushKernelArg};
        let dev = xs.device().clone();
        let (b, t, h, d) = xl.shape().dims4()?;
        let f = cuda::kernel(
            &dev,
            "rotary",
            &format!("rotary_{}", cuda::suffix(xs.dtype())?),
        )?;
        let (x, c, s) = (In::new(xs, xl)?, In::new(cs, cl)?, In::new(ss, sl)?);
        let mut y = Out::alloc(&dev, xs.dtype(), b * t * h * d)?;
        let (bt, h_i, d_i) = ((b * t) as i32, h as i32, d as i32);
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        x.push(&mut bld);
        c.push(&mut bld);
        s.push(&mut bld);
        y.push(&mut bld);
        bld.arg(&bt).arg(&h_i).arg(&d_i).arg(&self.sign);
        // One thread per work item: 16 bytes of the head's first half and 16 of its second
        // (rotary.cu; one element each when D/2 is not a multiple of 16 bytes), blocks of 256
        // over all tokens and heads; the kernel's grid-stride loop covers any beyond 2^20 blocks.
        let per = 16 / xs.dtype().size_in_bytes();
        let per = if (d / 2) % per == 0 { per } else { 1 };
        let items = b * t * h * (d / 2) / per;
        cuda::run(
            bld,
            cuda::cfg(items.div_ceil(256).clamp(1, 1 << 20), 256, 0),
        )?;
        Ok((y.into_storage(&dev), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Inside the backward; no second derivative is taken.
        let inverse = Rotary { sign: -self.sign };
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?; // no-grad ok
        Ok((Some(dx), None, None))
    }
}
