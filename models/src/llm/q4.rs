//! kith's 4-bit linear layer for tract: `y = x @ W^T` with `W` in blocks of
//! 32 weights, `w = d * (q - 8) + o` (MatMulNBits, optionally with a
//! per-block offset: exact Q4_1).
//!
//! Why: profiling SmolLM2 decode showed ~60 % of the time in tract's Q4_0
//! matrix-vector kernel (f32 activations, 256-bit FMA, ~6 G weights/s on
//! one core) and another ~10 % in the separate small matmuls that carry Q4_1
//! offsets. This op computes the same sums in one pass per weight row with
//! f32 activations (no activation quantization: results equal onnxruntime's
//! up to float rounding order), keeps the codes in llama.cpp's nibble order
//! so one 16-byte load holds a whole block, and folds the offset term into
//! `c_b * sum(x_b)`. It runs where a SIMD kernel exists (x86-64 with AVX-512F
//! or AVX2+FMA); elsewhere the graph keeps tract's own MatMulNBits.
//!
//! Per block `b` of row `n`: `sum_j w_j x_j = d * sum_j q_j x_j + c * S_b`
//! with `S_b = sum_j x_j` and `c = o - 8 d` (`-8 d` without offsets).

use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable::{Expansion, expand};

/// Weights per block.
pub const BLOCK: usize = 32;

/// A weight matrix `[n, k]` in 4-bit blocks, laid out for the kernels as
/// one stream per row: each block is 20 bytes, `d` (f16), `c` (f16), then
/// 16 bytes of codes where byte `j` holds weight `j` (low nibble) and
/// `j + 16` (high) -- llama.cpp's Q4_1 layout, 0.625 bytes per weight.
///
/// 8-bit weights (`bits == 8`, llama.cpp's Q8_0) use 36-byte blocks: `d`,
/// `c` (0), then 32 signed codes.
#[derive(Debug)]
pub struct PackedQ4 {
    pub n: usize,
    pub k: usize,
    /// 4 or 8.
    pub bits: u8,
    blocks: Vec<u8>,
}

/// Bytes per packed 4-bit block.
const BLOCK_BYTES: usize = 20;
/// Bytes per packed 8-bit block.
const BLOCK_BYTES_Q8: usize = 36;

/// Which SIMD kernel this CPU runs, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust (tests and reference; the graph rewrite is not applied).
    Scalar,
}

impl Kernel {
    /// The best kernel for this CPU.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            let f16c = std::arch::is_x86_feature_detected!("f16c");
            if f16c && std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if f16c
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    }

    /// Whether this CPU has a SIMD kernel (the rewrite is worth doing).
    pub fn simd_available() -> bool {
        Kernel::detect() != Kernel::Scalar
    }
}

impl PackedQ4 {
    /// From MatMulNBits tensors: `b` `[n, k/32, 16]` (byte `i` = weights `2i`
    /// low, `2i+1` high), `scales` `[n * k/32]`, and optional `offsets`
    /// `[k/32, n]` (the converter's Q4_1 term).
    pub fn from_matmul_nbits(
        b: &[u8],
        scales: &[f32],
        offsets: Option<&[f32]>,
        n: usize,
        k: usize,
    ) -> TractResult<PackedQ4> {
        ensure!(
            k.is_multiple_of(BLOCK),
            "K = {k} is not a multiple of {BLOCK}"
        );
        let nb = k / BLOCK;
        ensure!(
            b.len() == n * nb * 16,
            "weight has {} bytes, expected {}",
            b.len(),
            n * nb * 16
        );
        ensure!(
            scales.len() == n * nb,
            "{} scales, expected {}",
            scales.len(),
            n * nb
        );
        if let Some(o) = offsets {
            ensure!(
                o.len() == n * nb,
                "{} offsets, expected {}",
                o.len(),
                n * nb
            );
        }
        let mut blocks = vec![0u8; n * nb * BLOCK_BYTES];
        for row in 0..n {
            for blk in 0..nb {
                let src = &b[(row * nb + blk) * 16..][..16];
                let mut q = [0u8; BLOCK];
                for (i, byte) in src.iter().enumerate() {
                    q[2 * i] = byte & 0x0F;
                    q[2 * i + 1] = byte >> 4;
                }
                let d = scales[row * nb + blk];
                let o = offsets.map(|o| o[blk * n + row]).unwrap_or(0.0);
                let dst = &mut blocks[(row * nb + blk) * BLOCK_BYTES..][..BLOCK_BYTES];
                dst[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                dst[2..4].copy_from_slice(&f16::from_f32(o - 8.0 * d).to_bits().to_le_bytes());
                for j in 0..16 {
                    dst[4 + j] = q[j] | (q[j + 16] << 4);
                }
            }
        }
        Ok(PackedQ4 {
            n,
            k,
            bits: 4,
            blocks,
        })
    }

    /// From an 8-bit MatMulNBits: `b` `[n, k/32, 32]` unsigned codes with
    /// zero point 128, `scales` `[n * k/32]`.
    pub fn from_matmul_nbits_q8(
        b: &[u8],
        scales: &[f32],
        n: usize,
        k: usize,
    ) -> TractResult<PackedQ4> {
        ensure!(
            k.is_multiple_of(BLOCK),
            "K = {k} is not a multiple of {BLOCK}"
        );
        let nb = k / BLOCK;
        ensure!(
            b.len() == n * nb * BLOCK,
            "weight has {} bytes, expected {}",
            b.len(),
            n * nb * BLOCK
        );
        ensure!(
            scales.len() == n * nb,
            "{} scales, expected {}",
            scales.len(),
            n * nb
        );
        let mut blocks = vec![0u8; n * nb * BLOCK_BYTES_Q8];
        for (ix, dst) in blocks.chunks_exact_mut(BLOCK_BYTES_Q8).enumerate() {
            dst[0..2].copy_from_slice(&f16::from_f32(scales[ix]).to_bits().to_le_bytes());
            for (d, q) in dst[4..].iter_mut().zip(&b[ix * BLOCK..][..BLOCK]) {
                *d = (i16::from(*q) - 128) as i8 as u8;
            }
        }
        Ok(PackedQ4 {
            n,
            k,
            bits: 8,
            blocks,
        })
    }

    /// Rows of x from which a product decodes weights once into f32 panels
    /// and runs a GEMM on them, instead of decoding them for every 4 rows.
    pub const GEMM_ROWS: usize = 8;

    /// Weight rows `rows` as f32, row-major, into `out` (`rows.len() * k`).
    fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.k;
        let nb = k / BLOCK;
        for (i, row) in rows.enumerate() {
            let dst = &mut out[i * k..(i + 1) * k];
            for b in 0..nb {
                let d = &mut dst[b * BLOCK..][..BLOCK];
                if self.bits == 8 {
                    let blk = &self.blocks[(row * nb + b) * BLOCK_BYTES_Q8..][..BLOCK_BYTES_Q8];
                    let scale = f16_at(blk, 0);
                    for (w, q) in d.iter_mut().zip(&blk[4..]) {
                        *w = scale * f32::from(*q as i8);
                    }
                } else {
                    let blk = &self.blocks[(row * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let (scale, c) = (f16_at(blk, 0), f16_at(blk, 2));
                    for j in 0..16 {
                        d[j] = scale * f32::from(blk[4 + j] & 0x0F) + c;
                        d[j + 16] = scale * f32::from(blk[4 + j] >> 4) + c;
                    }
                }
            }
        }
    }

    /// Prefill: 64 weight rows at a time decoded to f32, then one GEMM.
    fn matmul_gemm(&self, x: &[f32], y: &mut [f32]) {
        const PANEL: usize = 64;
        let (n, k) = (self.n, self.k);
        let m = x.len() / k;
        let mut panel = vec![0f32; PANEL * k];
        for n0 in (0..n).step_by(PANEL) {
            let cols = (n - n0).min(PANEL);
            self.dequantize_rows(n0..n0 + cols, &mut panel[..cols * k]);
            // Computed as y^T = W x^T. SAFETY: the panel is cols x k (row
            // stride k), x is m x k read as its k x m transpose (row stride
            // 1, column stride k), and y^T's rows n0..n0 + cols are y's
            // columns (row stride 1, column stride n), all inside y.
            unsafe {
                matrixmultiply::sgemm(
                    cols,
                    k,
                    m,
                    1.0,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    x.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    y.as_mut_ptr().add(n0),
                    1,
                    n as isize,
                );
            }
        }
    }

    /// `y[m][n] = sum_k x[m][k] * w[n][k]` for `m` rows of `x`, on this thread.
    pub fn matmul(&self, kernel: Kernel, x: &[f32], y: &mut [f32]) {
        if x.len() / self.k >= Self::GEMM_ROWS && y.len() == x.len() / self.k * self.n {
            return self.matmul_gemm(x, y);
        }
        let sums = block_sums(x);
        // SAFETY: y holds m * n values and only this call writes them.
        unsafe { self.matmul_rows(kernel, x, &sums, OutPtr(y.as_mut_ptr()), y.len(), 0..self.n) }
    }

    /// Output columns `cols` of `y` (weight rows); other columns are not touched.
    ///
    /// # Safety
    /// `y` points to `y_len == m * n` floats, and no one else writes columns `cols`.
    unsafe fn matmul_rows(
        &self,
        kernel: Kernel,
        x: &[f32],
        sums: &[f32],
        y: OutPtr,
        y_len: usize,
        cols: std::ops::Range<usize>,
    ) {
        let k = self.k;
        let m = x.len() / k;
        assert!(x.len() == m * k && y_len == m * self.n && cols.end <= self.n);
        let mut r = 0;
        while r < m {
            // Four activation rows share each decoded weight block; the rest one by one.
            let rows = if m - r >= 4 { 4 } else { 1 };
            let job = Rows {
                w: self,
                x,
                sums,
                y,
                r0: r,
                cols: cols.clone(),
            };
            if self.bits == 8 {
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Kernel::detect` chose this kernel only if the CPU has AVX-512F and F16C.
                    Kernel::Avx512 => unsafe { x86::rows_avx512_q8(&job) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Kernel::detect` chose this kernel only if the CPU has AVX2, FMA and F16C.
                    Kernel::Avx2 => unsafe { x86::rows_avx2_q8(&job) },
                    // SAFETY: forwarded from the caller.
                    Kernel::Scalar => unsafe { rows_scalar_q8(&job) },
                }
                r += 1;
                continue;
            }
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Kernel::detect` chose this kernel only if the CPU has AVX-512F and F16C.
                Kernel::Avx512 => unsafe {
                    if rows == 4 {
                        x86::rows_avx512::<4>(&job)
                    } else {
                        x86::rows_avx512::<1>(&job)
                    }
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Kernel::detect` chose this kernel only if the CPU has AVX2, FMA and F16C.
                Kernel::Avx2 => unsafe {
                    if rows == 4 {
                        x86::rows_avx2::<4>(&job)
                    } else {
                        x86::rows_avx2::<1>(&job)
                    }
                },
                // SAFETY: forwarded from the caller.
                Kernel::Scalar => unsafe { rows_scalar(&job, rows) },
            }
            r += rows;
        }
    }

    /// As [`PackedQ4::matmul`], splitting the weight rows over the pool of
    /// tract's current executor when there is one and the work is big enough.
    pub fn matmul_parallel(&self, kernel: Kernel, x: &[f32], y: &mut [f32]) {
        use tract_linalg::multithread::{Executor, current_tract_executor};
        let threads = match current_tract_executor() {
            Executor::MultiThread(pool) => Some(pool),
            _ => None,
        };
        let Some(pool) = threads.filter(|p| {
            p.current_num_threads() > 1 && self.n >= 256 && x.len() / self.k < Self::GEMM_ROWS
        }) else {
            return self.matmul(kernel, x, y);
        };
        let sums = block_sums(x);
        let parts = pool.current_num_threads();
        let chunk = self.n.div_ceil(parts).next_multiple_of(16);
        let out = OutPtr(y.as_mut_ptr());
        let len = y.len();
        let sums = &sums;
        pool.scope(|scope| {
            for start in (0..self.n).step_by(chunk) {
                let cols = start..(start + chunk).min(self.n);
                scope.spawn(move |_| {
                    // SAFETY: each task writes its own columns of y, which outlives the scope.
                    unsafe { self.matmul_rows(kernel, x, sums, out, len, cols) }
                });
            }
        });
    }
}

/// Sums of every 32-wide block of `x` (the offset term's factor).
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(BLOCK)
        .map(|blk| blk.iter().sum::<f32>())
        .collect()
}

/// The output matrix, shared by the tasks that fill disjoint columns of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `matmul_rows`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One kernel call: rows `r0..r0 + MR` of x against weight rows `cols`.
struct Rows<'a> {
    w: &'a PackedQ4,
    x: &'a [f32],
    sums: &'a [f32],
    y: OutPtr,
    r0: usize,
    cols: std::ops::Range<usize>,
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Plain Rust kernel.
///
/// # Safety
/// As `PackedQ4::matmul_rows`.
unsafe fn rows_scalar(job: &Rows, rows: usize) {
    let (n, k) = (job.w.n, job.w.k);
    let nb = k / BLOCK;
    for r in job.r0..job.r0 + rows {
        let xr = &job.x[r * k..(r + 1) * k];
        for row in job.cols.clone() {
            let mut acc = 0f32;
            for b in 0..nb {
                let blk = &job.w.blocks[(row * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                let xb = &xr[b * BLOCK..][..BLOCK];
                let mut s = 0f32;
                for j in 0..16 {
                    let q = blk[4 + j];
                    s += f32::from(q & 0x0F) * xb[j] + f32::from(q >> 4) * xb[j + 16];
                }
                acc += f16_at(blk, 0) * s + f16_at(blk, 2) * job.sums[r * nb + b];
            }
            // SAFETY: r < m and row < n, so the index is inside y (caller's contract).
            unsafe { *job.y.0.add(r * n + row) = acc };
        }
    }
}

/// Plain Rust 8-bit kernel, one row of x.
///
/// # Safety
/// As `PackedQ4::matmul_rows`.
unsafe fn rows_scalar_q8(job: &Rows) {
    let (n, k) = (job.w.n, job.w.k);
    let nb = k / BLOCK;
    let r = job.r0;
    let xr = &job.x[r * k..(r + 1) * k];
    for row in job.cols.clone() {
        let mut acc = 0f32;
        for b in 0..nb {
            let blk = &job.w.blocks[(row * nb + b) * BLOCK_BYTES_Q8..][..BLOCK_BYTES_Q8];
            let xb = &xr[b * BLOCK..][..BLOCK];
            // Eight independent lanes: LLVM turns this into NEON / SSE code,
            // which a single running sum (strict float order) would prevent.
            let mut lanes = [0f32; 8];
            for (q8, x8) in blk[4..].chunks_exact(8).zip(xb.chunks_exact(8)) {
                for l in 0..8 {
                    lanes[l] += f32::from(q8[l] as i8) * x8[l];
                }
            }
            acc += f16_at(blk, 0) * lanes.iter().sum::<f32>();
        }
        // SAFETY: r < m and row < n, so the index is inside y (caller's contract).
        unsafe { *job.y.0.add(r * n + row) = acc };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, BLOCK_BYTES, BLOCK_BYTES_Q8, Rows};

    /// AVX-512, 8-bit weights, one row of x.
    ///
    /// # Safety
    /// The CPU has AVX-512F and F16C; `job` follows `PackedQ4::matmul_rows`.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn rows_avx512_q8(job: &Rows) {
        let (n, k) = (job.w.n, job.w.k);
        let nb = k / BLOCK;
        assert!(job.x.len() >= (job.r0 + 1) * k);
        assert!(job.w.blocks.len() == n * nb * BLOCK_BYTES_Q8 && job.cols.end <= n);
        let xp = job.x.as_ptr().wrapping_add(job.r0 * k);
        for row in job.cols.clone() {
            let mut lo_acc = _mm512_setzero_ps();
            let mut hi_acc = _mm512_setzero_ps();
            let bp = job
                .w
                .blocks
                .as_ptr()
                .wrapping_add(row * nb * BLOCK_BYTES_Q8);
            for b in 0..nb {
                // SAFETY: the asserts bound every offset: b < nb, row < n.
                unsafe {
                    let p = bp.add(b * BLOCK_BYTES_Q8);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                    let dc = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    let db = _mm512_broadcastss_ps(dc);
                    let lo = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let hi = _mm_loadu_si128(p.add(20) as *const __m128i);
                    let w_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), db);
                    let w_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), db);
                    let xb = xp.add(b * BLOCK);
                    lo_acc = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xb), lo_acc);
                    hi_acc = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xb.add(16)), hi_acc);
                }
            }
            let dot = _mm512_reduce_add_ps(_mm512_add_ps(lo_acc, hi_acc));
            // SAFETY: r0 < m and row < n (caller's contract).
            unsafe { *job.y.0.add(job.r0 * n + row) = dot };
        }
    }

    /// AVX2 + FMA, 8-bit weights, one row of x.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `job` follows `PackedQ4::matmul_rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2_q8(job: &Rows) {
        let (n, k) = (job.w.n, job.w.k);
        let nb = k / BLOCK;
        assert!(job.x.len() >= (job.r0 + 1) * k);
        assert!(job.w.blocks.len() == n * nb * BLOCK_BYTES_Q8 && job.cols.end <= n);
        let xp = job.x.as_ptr().wrapping_add(job.r0 * k);
        for row in job.cols.clone() {
            let mut acc_a = _mm256_setzero_ps();
            let mut acc_b = _mm256_setzero_ps();
            let bp = job
                .w
                .blocks
                .as_ptr()
                .wrapping_add(row * nb * BLOCK_BYTES_Q8);
            for b in 0..nb {
                // SAFETY: as in rows_avx512_q8.
                unsafe {
                    let p = bp.add(b * BLOCK_BYTES_Q8);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                    let dc = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    let db = _mm256_broadcastss_ps(dc);
                    let xb = xp.add(b * BLOCK);
                    for part in 0..4 {
                        let q = _mm_loadl_epi64(p.add(4 + 8 * part) as *const __m128i);
                        let w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), db);
                        let x = _mm256_loadu_ps(xb.add(8 * part));
                        if part % 2 == 0 {
                            acc_a = _mm256_fmadd_ps(w, x, acc_a);
                        } else {
                            acc_b = _mm256_fmadd_ps(w, x, acc_b);
                        }
                    }
                }
            }
            let v = _mm256_add_ps(acc_a, acc_b);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            // SAFETY: r0 < m and row < n (caller's contract).
            unsafe { *job.y.0.add(job.r0 * n + row) = _mm_cvtss_f32(s) };
        }
    }

    /// How far ahead (bytes) the kernels prefetch weights.
    const PREFETCH: usize = 640;

    /// AVX-512: one block is two vectors of 16 weights, decoded once and used
    /// by the MR rows of x; two accumulators per row hide the FMA latency.
    /// The offset term `c * S_b` accumulates in a scalar lane.
    ///
    /// # Safety
    /// The CPU has AVX-512F and F16C; `job` follows `PackedQ4::matmul_rows`.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn rows_avx512<const MR: usize>(job: &Rows) {
        let (n, k) = (job.w.n, job.w.k);
        let nb = k / BLOCK;
        assert!(job.x.len() >= (job.r0 + MR) * k && job.sums.len() >= (job.r0 + MR) * nb);
        assert!(job.w.blocks.len() == n * nb * BLOCK_BYTES && job.cols.end <= n);
        let mask = _mm_set1_epi8(0x0F);
        let xp = job.x.as_ptr().wrapping_add(job.r0 * k);
        let sp = job.sums.as_ptr().wrapping_add(job.r0 * nb);
        for row in job.cols.clone() {
            let mut lo_acc = [_mm512_setzero_ps(); MR];
            let mut hi_acc = [_mm512_setzero_ps(); MR];
            let mut off_acc = [_mm_setzero_ps(); MR];
            let bp = job.w.blocks.as_ptr().wrapping_add(row * nb * BLOCK_BYTES);
            for b in 0..nb {
                // SAFETY: the asserts bound every offset: b < nb, row < n, r < MR.
                unsafe {
                    let p = bp.add(b * BLOCK_BYTES);
                    // Weights stream from L3 or DRAM: ask for them ahead.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                    let dc = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    let db = _mm512_broadcastss_ps(dc);
                    let cb = _mm_shuffle_ps(dc, dc, 0b01);
                    let raw = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                    let w_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), db);
                    let w_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), db);
                    for r in 0..MR {
                        let xb = xp.add(r * k + b * BLOCK);
                        lo_acc[r] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xb), lo_acc[r]);
                        hi_acc[r] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xb.add(16)), hi_acc[r]);
                        off_acc[r] = _mm_fmadd_ss(cb, _mm_load_ss(sp.add(r * nb + b)), off_acc[r]);
                    }
                }
            }
            for r in 0..MR {
                let dot = _mm512_reduce_add_ps(_mm512_add_ps(lo_acc[r], hi_acc[r]));
                // SAFETY: r0 + r < m and row < n (caller's contract).
                unsafe { *job.y.0.add((job.r0 + r) * n + row) = dot + _mm_cvtss_f32(off_acc[r]) };
            }
        }
    }

    /// AVX2 + FMA: one block is four vectors of 8 weights.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `job` follows `PackedQ4::matmul_rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<const MR: usize>(job: &Rows) {
        let (n, k) = (job.w.n, job.w.k);
        let nb = k / BLOCK;
        assert!(job.x.len() >= (job.r0 + MR) * k && job.sums.len() >= (job.r0 + MR) * nb);
        assert!(job.w.blocks.len() == n * nb * BLOCK_BYTES && job.cols.end <= n);
        let mask = _mm_set1_epi8(0x0F);
        let xp = job.x.as_ptr().wrapping_add(job.r0 * k);
        let sp = job.sums.as_ptr().wrapping_add(job.r0 * nb);
        for row in job.cols.clone() {
            let mut acc_a = [_mm256_setzero_ps(); MR];
            let mut acc_b = [_mm256_setzero_ps(); MR];
            let mut off_acc = [_mm_setzero_ps(); MR];
            let bp = job.w.blocks.as_ptr().wrapping_add(row * nb * BLOCK_BYTES);
            for b in 0..nb {
                // SAFETY: as in rows_avx512.
                unsafe {
                    let p = bp.add(b * BLOCK_BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                    let dc = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    let db = _mm256_broadcastss_ps(dc);
                    let cb = _mm_shuffle_ps(dc, dc, 0b01);
                    let raw = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                    let dq =
                        |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), db);
                    let w0 = dq(lo);
                    let w1 = dq(_mm_srli_si128(lo, 8));
                    let w2 = dq(hi);
                    let w3 = dq(_mm_srli_si128(hi, 8));
                    for r in 0..MR {
                        let xb = xp.add(r * k + b * BLOCK);
                        acc_a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc_a[r]);
                        acc_b[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(8)), acc_b[r]);
                        acc_a[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb.add(16)), acc_a[r]);
                        acc_b[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb.add(24)), acc_b[r]);
                        off_acc[r] = _mm_fmadd_ss(cb, _mm_load_ss(sp.add(r * nb + b)), off_acc[r]);
                    }
                }
            }
            for r in 0..MR {
                let v = _mm256_add_ps(acc_a[r], acc_b[r]);
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                let s = _mm_add_ss(s, off_acc[r]);
                // SAFETY: r0 + r < m and row < n (caller's contract).
                unsafe { *job.y.0.add((job.r0 + r) * n + row) = _mm_cvtss_f32(s) };
            }
        }
    }
}

/// The tract operator: `x [.., k] -> y [.., n]`.
#[derive(Debug, Clone)]
pub struct Q4Linear {
    weights: Arc<PackedQ4>,
    kernel: Kernel,
}

impl PartialEq for Q4Linear {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights) && self.kernel == other.kernel
    }
}
impl Eq for Q4Linear {}

impl Op for Q4Linear {
    fn name(&self) -> StaticName {
        "KithQ4Linear".into()
    }
    op_as_typed_op!();
}

impl EvalOp for Q4Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        ensure!(
            shape.last() == Some(&self.weights.k),
            "KithQ4Linear: input {shape:?} does not end in K = {}",
            self.weights.k
        );
        let mut out_shape: TVec<usize> = shape.into();
        *out_shape.last_mut().context("rank 0 input")? = self.weights.n;
        let x_view = input.try_as_plain_ram()?;
        let x = x_view.as_slice::<f32>()?;
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        {
            let mut view = out.to_plain_array_view_mut::<f32>()?;
            let y = view.as_slice_mut().context("output is not contiguous")?;
            self.weights.matmul_parallel(self.kernel, x, y);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Q4Linear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        *shape.last_mut().context("rank 0 input")? = self.weights.n.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (self.weights.n * self.weights.k).to_dim()
        )))
    }

    as_op!();
}

/// The parse-time form: reads the constant weights once the graph is typed.
#[derive(Debug, Clone)]
struct Q4LinearExpansion {
    k: usize,
    n: usize,
    bits: usize,
    has_offsets: bool,
}

impl Expansion for Q4LinearExpansion {
    fn name(&self) -> StaticName {
        "KithQ4Linear".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        let n = self.n.to_dim();
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            s.equals(&outputs[0].rank, rank as i64)?;
            for ax in 0..rank - 1 {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&outputs[0].shape[rank - 1], n.clone())
        })?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |ix: usize, what: &str| -> TractResult<Arc<Tensor>> {
            model
                .outlet_fact(inputs[ix])?
                .konst
                .clone()
                .with_context(|| format!("KithQ4Linear: {what} must be a constant"))
        };
        let b = konst(1, "the quantized weight")?;
        let scales = konst(2, "the scales")?.cast_to::<f32>()?.into_owned();
        let offsets = if self.has_offsets {
            Some(konst(3, "the offsets")?.cast_to::<f32>()?.into_owned())
        } else {
            None
        };
        let b_plain = b.try_as_plain_ram()?;
        let s_plain = scales.try_as_plain_ram()?;
        let o_plain = offsets.as_ref().map(|o| o.try_as_plain_ram()).transpose()?;
        let packed = if self.bits == 8 {
            PackedQ4::from_matmul_nbits_q8(
                b_plain.as_slice::<u8>()?,
                s_plain.as_slice::<f32>()?,
                self.n,
                self.k,
            )?
        } else {
            PackedQ4::from_matmul_nbits(
                b_plain.as_slice::<u8>()?,
                s_plain.as_slice::<f32>()?,
                o_plain.as_ref().map(|o| o.as_slice::<f32>()).transpose()?,
                self.n,
                self.k,
            )?
        };
        let op = Q4Linear {
            weights: Arc::new(packed),
            kernel: Kernel::detect(),
        };
        model.wire_node(prefix, op, &inputs[..1])
    }
}

/// Operator name of fused nodes in the rewritten proto.
const OP_TYPE: &str = "KithQ4Linear";

fn q4_linear_builder(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k: usize = node.get_attr("K")?;
    let n: usize = node.get_attr("N")?;
    Ok((
        expand(Q4LinearExpansion {
            k,
            n,
            bits: node.get_attr_opt("bits")?.unwrap_or(4),
            has_offsets: node.input.len() > 3,
        }),
        vec![],
    ))
}

/// Registers the fused operator with the ONNX parser.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(OP_TYPE, q4_linear_builder);
}

fn attr_int(node: &pb::NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// Rewrites every 4-bit, block-32 `MatMulNBits` without zero points or bias
/// into a `KithQ4Linear` node, absorbing the Q4_1 offset pattern
/// `Add(y, MatMul(ReduceSum(Reshape(x)), offsets))` where present. Returns
/// how many nodes were rewritten and how many offsets were absorbed.
pub fn fuse_q4_linears(proto: &mut pb::ModelProto, only_8bit: bool) -> (usize, usize) {
    let Some(graph) = proto.graph.as_mut() else {
        return (0, 0);
    };
    let initializers: std::collections::HashSet<String> =
        graph.initializer.iter().map(|t| t.name.clone()).collect();
    let producer = |graph: &pb::GraphProto, name: &str| {
        graph
            .node
            .iter()
            .position(|n| n.output.iter().any(|o| o == name))
    };
    let consumers = |graph: &pb::GraphProto, name: &str| {
        graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == name))
            .count()
    };
    let mut rewritten = 0;
    let mut absorbed = 0;
    let mut remove: Vec<usize> = Vec::new();
    for ix in 0..graph.node.len() {
        let node = &graph.node[ix];
        if node.op_type != "MatMulNBits" {
            continue;
        }
        let bits = attr_int(node, "bits").unwrap_or(4);
        let usable = (bits == 8 || (bits == 4 && !only_8bit))
            && attr_int(node, "block_size") == Some(BLOCK as i64)
            && attr_int(node, "K").is_some_and(|k| k % BLOCK as i64 == 0)
            && node.input.len() == 3
            && initializers.contains(&node.input[1])
            && initializers.contains(&node.input[2]);
        if !usable {
            continue;
        }
        let x = node.input[0].clone();
        let y = node.output[0].clone();
        let mut new = node.clone();
        new.op_type = OP_TYPE.into();
        new.domain = "ai.kith".into();
        // Absorb `Add(y, MatMul(ReduceSum(Reshape(x)), offsets))`.
        if bits == 4
            && consumers(graph, &y) == 1
            && let Some(add_ix) = graph
                .node
                .iter()
                .position(|n| n.op_type == "Add" && n.input.first() == Some(&y))
            && let Some(mm_ix) = producer(graph, &graph.node[add_ix].input[1])
            && graph.node[mm_ix].op_type == "MatMul"
            && initializers.contains(&graph.node[mm_ix].input[1])
            && let Some(rs_ix) = producer(graph, &graph.node[mm_ix].input[0])
            && graph.node[rs_ix].op_type == "ReduceSum"
            && let Some(rh_ix) = producer(graph, &graph.node[rs_ix].input[0])
            && graph.node[rh_ix].op_type == "Reshape"
            && graph.node[rh_ix].input[0] == x
        {
            new.input.push(graph.node[mm_ix].input[1].clone());
            new.output[0] = graph.node[add_ix].output[0].clone();
            remove.push(add_ix);
            absorbed += 1;
        }
        graph.node[ix] = new;
        rewritten += 1;
    }
    remove.sort_unstable();
    for ix in remove.into_iter().rev() {
        graph.node.remove(ix);
    }
    (rewritten, absorbed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random weight in MatMulNBits form and its dense copy.
    fn weight(
        n: usize,
        k: usize,
        offsets: bool,
    ) -> (Vec<u8>, Vec<f32>, Option<Vec<f32>>, Vec<f32>) {
        let nb = k / BLOCK;
        let mut state = 0x1234_5678u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut q = vec![0u8; n * k];
        for v in q.iter_mut() {
            *v = (next() % 16) as u8;
        }
        // Scales and offsets are stored as f16: draw values f16 holds exactly.
        let f16_exact = |v: f32| f16::from_f32(v).to_f32();
        let scales: Vec<f32> = (0..n * nb)
            .map(|_| f16_exact((next() % 1000) as f32 / 20000.0 + 0.001))
            .collect();
        let offs: Option<Vec<f32>> = offsets.then(|| {
            (0..n * nb)
                .map(|_| f16_exact((next() % 1000) as f32 / 10000.0 - 0.05))
                .collect()
        });
        let mut b = vec![0u8; n * nb * 16];
        for row in 0..n {
            for i in 0..k / 2 {
                b[row * k / 2 + i] = q[row * k + 2 * i] | (q[row * k + 2 * i + 1] << 4);
            }
        }
        let mut dense = vec![0f32; n * k];
        for row in 0..n {
            for kk in 0..k {
                let blk = kk / BLOCK;
                let o = offs.as_ref().map(|o| o[blk * n + row]).unwrap_or(0.0);
                // As stored: c = o - 8 d rounded to f16.
                let d = scales[row * nb + blk];
                let c = f16_exact(o - 8.0 * d);
                dense[row * k + kk] = q[row * k + kk] as f32 * d + c;
            }
        }
        (b, scales, offs, dense)
    }

    fn check(kernel: Kernel, m: usize, offsets: bool) {
        let (n, k) = (37, 96);
        let (b, scales, offs, dense) = weight(n, k, offsets);
        let packed = PackedQ4::from_matmul_nbits(&b, &scales, offs.as_deref(), n, k).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
            .collect();
        let mut y = vec![0f32; m * n];
        packed.matmul(kernel, &x, &mut y);
        for r in 0..m {
            for row in 0..n {
                let want: f64 = (0..k)
                    .map(|kk| f64::from(x[r * k + kk]) * f64::from(dense[row * k + kk]))
                    .sum();
                let got = f64::from(y[r * n + row]);
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{kernel:?} m={m} [{r},{row}]: {got} vs {want}"
                );
            }
        }
    }

    fn kernels() -> Vec<Kernel> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let f16c = std::arch::is_x86_feature_detected!("f16c");
            if f16c && std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
            if f16c
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels
    }

    #[test]
    fn every_8_bit_kernel_equals_the_dense_product() {
        let (n, k, m) = (21, 64, 3);
        let nb = k / BLOCK;
        let b: Vec<u8> = (0..n * k).map(|i| ((i * 7919 + 13) % 256) as u8).collect();
        let scales: Vec<f32> = (0..n * nb)
            .map(|i| f16::from_f32(0.001 + i as f32 * 1e-4).to_f32())
            .collect();
        let packed = PackedQ4::from_matmul_nbits_q8(&b, &scales, n, k).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        for kernel in kernels() {
            let mut y = vec![0f32; m * n];
            packed.matmul(kernel, &x, &mut y);
            for r in 0..m {
                for row in 0..n {
                    let want: f64 = (0..k)
                        .map(|kk| {
                            let w = (f64::from(b[row * k + kk]) - 128.0)
                                * f64::from(scales[row * nb + kk / BLOCK]);
                            w * f64::from(x[r * k + kk])
                        })
                        .sum();
                    let got = f64::from(y[r * n + row]);
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{kernel:?} [{r},{row}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_kernel_equals_the_dense_product_for_one_and_many_rows() {
        for kernel in kernels() {
            for m in [1, 3, 4, 9, 16] {
                check(kernel, m, false);
                check(kernel, m, true);
            }
        }
    }
}
