//! One token per row of a logits matrix by the Gumbel-max trick, on the logits' device:
//! `argmax_j (z_j + g_j)` with `z = zscale · logits + bias` and `g_j = −log(−log(u_j))`, `u_j`
//! uniform from a counter hash of (the row's key, j). That is exactly a draw from softmax(z)
//! (the distribution generation samples without top-k / top-p), and it needs nothing of the row
//! on the host: generation reads back 8 bytes a row, not the row (`omr_model::generate`).
//!
//! Keys make the draws reproducible: the caller derives one per (seed, row, step), so a resumed
//! run and an uninterrupted one draw the same, and rows leaving the batch shift nothing. The
//! CUDA kernel (`kernels/sample.cu`) and [`gumbel_ref`] hash and compare in the same order, so
//! CPU and GPU draw the same tokens up to the last bit of their logarithms.

use crate::host;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// splitmix64's finaliser.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The Gumbel noise of entry `j` under `key`: −log(−log(u)), u the hash's top 24 bits centred
/// in their cell, in (0, 1).
pub fn gumbel(key: u64, j: u64) -> f32 {
    let h = mix64(key ^ mix64(j));
    let u = ((h >> 40) as f32 + 0.5) * 5.960_464_5e-8;
    -(-u.ln()).ln()
}

/// The key of `row`'s draw at generation `step` under `seed`.
pub fn key(seed: u64, row: u64, step: u64) -> u64 {
    mix64(mix64(seed ^ mix64(row)) ^ step)
}

/// (token, log softmax(z)[token]) for one row, z = zscale · logits + bias: the reference the
/// kernel follows (online max and Σexp, strict `>` for the argmax so ties go to the lowest id).
pub fn gumbel_ref(logits: &[f32], bias: &[f32], key: u64, zscale: f32) -> (u32, f32) {
    let (mut m, mut s) = (f32::NEG_INFINITY, 0f32);
    let (mut best, mut bi) = (f32::NEG_INFINITY, 0usize);
    for (j, (&l, &b)) in logits.iter().zip(bias).enumerate() {
        let z = zscale * l + b;
        if z > m {
            s = s * (m - z).exp() + 1.0;
            m = z;
        } else {
            s += (z - m).exp();
        }
        let k = z + gumbel(key, j as u64);
        if k > best {
            best = k;
            bi = j;
        }
    }
    let zt = zscale * logits[bi] + bias[bi];
    (bi as u32, zt - (m + s.ln()))
}

/// One draw per row of `logits` (R, V) f32|bf16 with `bias` (V) f32 (finite) and one key per
/// row → (tokens, log-probabilities), on the host.
pub fn gumbel_sample(
    logits: &Tensor,
    bias: &Tensor,
    keys: &[u64],
    zscale: f32,
) -> Result<(Vec<u32>, Vec<f32>)> {
    host::check_float("gumbel_sample", logits.dtype())?;
    let (r, v) = logits.dims2()?;
    if bias.dims() != [v] || bias.dtype() != DType::F32 || keys.len() != r {
        bail!(
            "gumbel_sample: logits (R, V), bias (V) f32 and R keys; got {:?}, {:?} {:?}, {} keys",
            logits.dims(),
            bias.dims(),
            bias.dtype(),
            keys.len()
        )
    }
    if r == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let halves: Vec<u32> = keys
        .iter()
        .flat_map(|&k| [(k >> 32) as u32, k as u32])
        .collect();
    let op = Gumbel {
        bias: bias.contiguous()?,
        keys: Tensor::from_vec(halves, (r, 2), logits.device())?,
        zscale,
    };
    // Sampling has no gradient.
    let out = logits.contiguous()?.apply_op1_no_bwd(&op)?; // no-grad ok
    let rows = out.to_vec2::<f32>()?;
    Ok(rows.iter().map(|x| (x[0] as u32, x[1])).unzip())
}

struct Gumbel {
    bias: Tensor,
    /// (R, 2) u32: each row's key, high half first.
    keys: Tensor,
    zscale: f32,
}

impl CustomOp1 for Gumbel {
    fn name(&self) -> &'static str {
        "omr-gumbel-sample"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, v) = l.shape().dims2()?;
        let x = host::read_f32(s, l)?;
        let bias: Vec<f32> = self.bias.to_vec1()?;
        let keys: Vec<Vec<u32>> = self.keys.to_vec2()?;
        let mut out = Vec::with_capacity(2 * r);
        for (row, k) in x.chunks(v).zip(&keys) {
            let key = ((k[0] as u64) << 32) | k[1] as u64;
            let (t, lp) = gumbel_ref(row, &bias, key, self.zscale);
            out.extend([t as f32, lp]);
        }
        Ok((CpuStorage::F32(out), Shape::from((r, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, Scalar};
        let (r, v) = l.shape().dims2()?;
        let guards = [
            self.bias.storage_and_layout(),
            self.keys.storage_and_layout(),
        ];
        let out = cuda::launch_rowwise(
            s,
            l,
            &cuda::views(&guards)?,
            "sample",
            "gumbel_sample",
            (DType::F32, 2 * r),
            &[Scalar::I32(v as i32), Scalar::F32(self.zscale)],
            // One block of 256 threads per row (kernels/sample.cu: SAMPLE_THREADS).
            cuda::cfg(r, 256, 0),
        )?;
        Ok((out, Shape::from((r, 2))))
    }
}
