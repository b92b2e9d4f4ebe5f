// Backward of the fused (residual add +) LayerNorm / RMSNorm.
//
// With xhat = (s - mean) * rstd (mean = 0 for RMSNorm) and g = dy * weight, per row:
//   LayerNorm: ds = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   ds = rstd * (g - xhat * mean(g * xhat))
//   dx = dresidual = ds + dsum          (dsum: gradient reaching the returned sum s)
//   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
//
// dweight/dbias are deterministic: each block of the row kernel keeps its rows' contributions in
// registers and writes one partial row; a second kernel sums the partial rows in a fixed order.
// No atomics touch the results. Rows too long for registers are streamed, and their dweight/dbias
// partials come from a column-parallel kernel instead.
//
// Mixed precision: dy has the forward's y dtype (TDY), the normalised input, dsum and dx the sum's
// (TN); when the branch x had a narrower dtype than the sum, its gradient (the same values) is
// also written rounded to TB, so autograd needs no extra cast kernel.
#include "norm_common.cuh"

namespace craft {
namespace norm_detail {

using BwdKernel = void (*)(NormBwdArgs, float*, float*);

constexpr int kAffineRows = 8;    // block rows of the column-parallel dweight/dbias kernel
constexpr int kReduceRows = 16;   // block rows of the partial-sum reduction
constexpr int kAffineBlocksPerSm = 16;

// Sums the R block rows' accumulators column by column (in a fixed order) into this block's
// partial row `part[blockIdx.x]`. With R == 1 each column has exactly one owner thread.
template <int NV, int VEC>
__device__ __forceinline__ void store_block_partial(const float (&acc)[NV][VEC], float* part,
                                                    int nvec, int64_t cols, float* dyn) {
  const int G = blockDim.x;
  const int R = blockDim.y;
  float* out = part + int64_t(blockIdx.x) * cols;
  if (R == 1) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int j = threadIdx.x + i * G;
      if (j < nvec) store_floats<float, VEC>(out + j * VEC, acc[i]);
    }
    return;
  }
  float* mine = dyn + int64_t(threadIdx.y) * cols;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int j = threadIdx.x + i * G;
    if (j < nvec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) mine[j * VEC + k] = acc[i][k];
    }
  }
  __syncthreads();
  for (int c = threadIdx.y * G + threadIdx.x; c < cols; c += G * R) {
    float t = 0.f;
    for (int r = 0; r < R; ++r) t += dyn[int64_t(r) * cols + c];
    out[c] = t;
  }
  __syncthreads();  // `dyn` is reused for the next parameter
}

// Stores one vector of dx (TN) and, when wanted, of dx_branch (TB).
template <typename TN, typename TB, int VEC>
__device__ __forceinline__ void store_dx(TN* dx, TB* dxb, int64_t at, const float (&v)[VEC]) {
  store_floats<TN, VEC>(dx + at, v);
  if constexpr (!std::is_same_v<TN, TB>) {
    if (dxb != nullptr) store_floats<TB, VEC>(dxb + at, v);
  }
}

// Row kernel: dx for every row; with NV > 0 also the block's dweight/dbias partial rows
// (part_w / part_b may be nullptr when not wanted). With NV == 0 the rows are streamed and the
// partials are left to norm_bwd_affine_kernel. TDY: dy; TN: x, dsum, dx; TB: dx_branch.
template <typename TDY, typename TN, typename TB, int VEC, int NV>
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    norm_bwd_kernel(NormBwdArgs a, float* part_w, float* part_b) {
  __shared__ float smem[kMaxWarpsPerBlock * 2];
  extern __shared__ float dyn[];  // R * cols floats when R > 1 and partials are wanted
  constexpr int NA = NV > 0 ? NV : 1;
  const TN* __restrict__ x = static_cast<const TN*>(a.x);
  const TDY* __restrict__ dy = static_cast<const TDY*>(a.dy);
  const TN* __restrict__ dsum = static_cast<const TN*>(a.dsum);
  TN* __restrict__ dx = static_cast<TN*>(a.dx);
  TB* __restrict__ dxb = static_cast<TB*>(a.dx_branch);
  const float* __restrict__ weight = a.weight;
  const int G = blockDim.x;
  const int R = blockDim.y;
  const int64_t cols = a.cols;
  const int nvec = int(cols / VEC);  // the binding keeps cols < 2^31
  const float inv_cols = 1.f / float(cols);

  float acc_w[NA][VEC];  // this thread's columns: sum over its rows of dy * xhat
  float acc_b[NA][VEC];  // ... and of dy
#pragma unroll
  for (int i = 0; i < NA; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc_w[i][k] = acc_b[i][k] = 0.f;
  }

  for (int64_t base = int64_t(blockIdx.x) * R; base < a.rows; base += int64_t(gridDim.x) * R) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < a.rows;
    const int64_t off = row * cols;
    const float mean = (valid && !a.rms) ? a.mean[row] : 0.f;
    const float rstd = valid ? a.rstd[row] : 0.f;
    float red[2];

    if constexpr (NV > 0) {
      float xh[NV][VEC];  // xhat
      float g[NV][VEC];   // dy * weight
      float s1 = 0.f;
      float s2 = 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int j = threadIdx.x + i * G;
        if (valid && j < nvec) {
          float xv[VEC], dv[VEC], w[VEC];
          load_floats<TN, VEC>(x + off + j * VEC, xv);
          load_floats<TDY, VEC>(dy + off + j * VEC, dv);
          if (weight != nullptr) {
            load_floats<float, VEC>(weight + j * VEC, w);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) w[k] = 1.f;
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            xh[i][k] = (xv[k] - mean) * rstd;
            g[i][k] = dv[k] * w[k];
            s1 += g[i][k];
            s2 += g[i][k] * xh[i][k];
            acc_w[i][k] += dv[k] * xh[i][k];
            acc_b[i][k] += dv[k];
          }
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) xh[i][k] = g[i][k] = 0.f;
        }
      }
      red[0] = s1;
      red[1] = s2;
      row_allreduce<2>(red, smem);
      const float m1 = a.rms ? 0.f : red[0] * inv_cols;
      const float m2 = red[1] * inv_cols;
      if (valid) {
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int j = threadIdx.x + i * G;
          if (j < nvec) {
            float out[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] = rstd * (g[i][k] - m1 - xh[i][k] * m2);
            if (dsum != nullptr) {
              float d[VEC];
              load_floats<TN, VEC>(dsum + off + j * VEC, d);
#pragma unroll
              for (int k = 0; k < VEC; ++k) out[k] += d[k];
            }
            store_dx<TN, TB, VEC>(dx, dxb, off + j * VEC, out);
          }
        }
      }
    } else {
      float s1 = 0.f;
      float s2 = 0.f;
      if (valid) {
        for (int j = threadIdx.x; j < nvec; j += G) {
          float xv[VEC], dv[VEC];
          load_floats<TN, VEC>(x + off + j * VEC, xv);
          load_floats<TDY, VEC>(dy + off + j * VEC, dv);
          if (weight != nullptr) {
            float w[VEC];
            load_floats<float, VEC>(weight + j * VEC, w);
#pragma unroll
            for (int k = 0; k < VEC; ++k) dv[k] *= w[k];
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            s1 += dv[k];
            s2 += dv[k] * (xv[k] - mean) * rstd;
          }
        }
      }
      red[0] = s1;
      red[1] = s2;
      row_allreduce<2>(red, smem);
      const float m1 = a.rms ? 0.f : red[0] * inv_cols;
      const float m2 = red[1] * inv_cols;
      if (valid) {
        for (int j = threadIdx.x; j < nvec; j += G) {
          float xv[VEC], dv[VEC], out[VEC];
          load_floats<TN, VEC>(x + off + j * VEC, xv);
          load_floats<TDY, VEC>(dy + off + j * VEC, dv);
          if (weight != nullptr) {
            float w[VEC];
            load_floats<float, VEC>(weight + j * VEC, w);
#pragma unroll
            for (int k = 0; k < VEC; ++k) dv[k] *= w[k];
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] = rstd * (dv[k] - m1 - (xv[k] - mean) * rstd * m2);
          if (dsum != nullptr) {
            float d[VEC];
            load_floats<TN, VEC>(dsum + off + j * VEC, d);
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] += d[k];
          }
          store_dx<TN, TB, VEC>(dx, dxb, off + j * VEC, out);
        }
      }
    }
  }

  if constexpr (NV > 0) {
    if (part_w != nullptr) store_block_partial<NV, VEC>(acc_w, part_w, nvec, cols, dyn);
    if (part_b != nullptr) store_block_partial<NV, VEC>(acc_b, part_b, nvec, cols, dyn);
  }
}

// dweight/dbias partials for streamed rows: block (32, kAffineRows) owns 32 columns and the rows
// blockIdx.y, blockIdx.y + gridDim.y, ... (in steps of kAffineRows); writes part[blockIdx.y].
template <typename TDY, typename TN>
__global__ void __launch_bounds__(32 * kAffineRows)
    norm_bwd_affine_kernel(NormBwdArgs a, float* part_w, float* part_b) {
  __shared__ float sw[kAffineRows][33];
  __shared__ float sb[kAffineRows][33];
  const TN* __restrict__ x = static_cast<const TN*>(a.x);
  const TDY* __restrict__ dy = static_cast<const TDY*>(a.dy);
  const int64_t cols = a.cols;
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float aw = 0.f;
  float ab = 0.f;
  if (col < cols) {
    for (int64_t row = int64_t(blockIdx.y) * kAffineRows + threadIdx.y; row < a.rows;
         row += int64_t(gridDim.y) * kAffineRows) {
      const float mean = a.rms ? 0.f : a.mean[row];
      const float d = to_float(dy[row * cols + col]);
      aw += d * (to_float(x[row * cols + col]) - mean) * a.rstd[row];
      ab += d;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float tw = 0.f;
    float tb = 0.f;
    for (int r = 0; r < kAffineRows; ++r) {
      tw += sw[r][threadIdx.x];
      tb += sb[r][threadIdx.x];
    }
    if (part_w != nullptr) part_w[int64_t(blockIdx.y) * cols + col] = tw;
    if (part_b != nullptr) part_b[int64_t(blockIdx.y) * cols + col] = tb;
  }
}

// out[c] = sum over p of part[p][c], summed in a fixed order. blockIdx.y: 0 = weight, 1 = bias.
__global__ void __launch_bounds__(32 * kReduceRows)
    reduce_partials_kernel(const float* part_w, const float* part_b, int64_t parts, int64_t cols,
                           float* dweight, float* dbias) {
  __shared__ float s[kReduceRows][33];
  const float* part = blockIdx.y == 0 ? part_w : part_b;
  float* out = blockIdx.y == 0 ? dweight : dbias;
  if (part == nullptr || out == nullptr) return;  // the same for the whole block
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float t = 0.f;
  if (col < cols) {
    for (int64_t p = threadIdx.y; p < parts; p += kReduceRows) t += part[p * cols + col];
  }
  s[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
    for (int r = 0; r < kReduceRows; ++r) total += s[r][threadIdx.x];
    out[col] = total;
  }
}

template <typename TDY, typename TN, typename TB>
struct BwdFamily {
  template <int VEC, int NV>
  struct K {
    static BwdKernel ptr() { return &norm_bwd_kernel<TDY, TN, TB, VEC, NV>; }
  };
};

// The row kernel for a plan's (vec, nv). Mixed dtypes have only the streamed scalar variant
// besides the 16-byte ones.
template <typename TDY, typename TN, typename TB>
BwdKernel pick_bwd(int vec, int nv) {
  constexpr int F = fast_vec<TDY, TN, TB>();
  using Fam = BwdFamily<TDY, TN, TB>;
  if (vec == F) return pick_variant<Fam::template K, F>(nv);
  if constexpr (all_same<TDY, TN, TB>()) {
    return pick_variant<Fam::template K, 1>(nv);
  } else {
    return nv == 0 ? Fam::template K<1, 0>::ptr() : nullptr;
  }
}

struct PlanBwd {
  const NormBwdArgs& a;
  NormBwdPlan* p;

  template <typename TDY, typename TN, typename TB>
  cudaError_t operator()() const {
    constexpr int F = fast_vec<TDY, TN, TB>();
    const bool vector_ok = a.cols % F == 0 && is_aligned(a.x, 16) && is_aligned(a.dy, 16) &&
                           is_aligned(a.dx, 16) && (a.dsum == nullptr || is_aligned(a.dsum, 16)) &&
                           (a.dx_branch == nullptr || is_aligned(a.dx_branch, 16)) &&
                           (a.weight == nullptr || is_aligned(a.weight, 16));
    const RowLayout l = vector_ok                       ? choose_layout(a.cols, F)
                        : all_same<TDY, TN, TB>() ? choose_layout(a.cols, 1)
                                                        : streamed_layout(a.cols);
    const BwdKernel k = pick_bwd<TDY, TN, TB>(l.vec, l.nv);
    if (k == nullptr) return cudaErrorInvalidConfiguration;
    const bool affine = a.dweight != nullptr || a.dbias != nullptr;
    const int threads = l.threads_x * l.rows_per_block;

    NormBwdPlan q;
    q.vec = l.vec;
    q.nv = l.nv;
    q.threads_x = l.threads_x;
    q.rows_per_block = l.rows_per_block;
    q.smem_bytes = (affine && l.nv > 0 && l.rows_per_block > 1)
                       ? size_t(l.rows_per_block) * size_t(a.cols) * sizeof(float)
                       : 0;
    int sms = 0;
    cudaError_t e = sm_count(&sms);
    if (e != cudaSuccess) return e;
    int per_sm = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, threads, q.smem_bytes);
    if (e != cudaSuccess) return e;
    if (per_sm < 1) per_sm = 1;
    const int64_t row_blocks = (a.rows + l.rows_per_block - 1) / l.rows_per_block;
    const int64_t resident = int64_t(sms) * per_sm;
    q.grid = row_blocks < resident ? row_blocks : resident;
    if (q.grid < 1) q.grid = 1;
    if (l.nv > 0) {
      q.partial_rows = q.grid;
      q.affine_grid_x = 0;
    } else {
      const int64_t tiles = (a.cols + 31) / 32;
      const int64_t want = (int64_t(sms) * kAffineBlocksPerSm + tiles - 1) / tiles;
      const int64_t row_slabs = (a.rows + kAffineRows - 1) / kAffineRows;
      int64_t gy = want < row_slabs ? want : row_slabs;
      if (gy > 65535) gy = 65535;
      if (gy < 1) gy = 1;
      q.partial_rows = gy;
      q.affine_grid_x = int(tiles);
    }
    const int n_params = (a.dweight != nullptr) + (a.dbias != nullptr);
    q.workspace_floats = affine ? size_t(n_params) * size_t(q.partial_rows) * size_t(a.cols) : 0;
    *p = q;
    return cudaSuccess;
  }
};

struct LaunchBwd {
  const NormBwdArgs& a;
  const NormBwdPlan& p;
  float* workspace;
  cudaStream_t stream;

  template <typename TDY, typename TN, typename TB>
  cudaError_t operator()() const {
    const BwdKernel k = pick_bwd<TDY, TN, TB>(p.vec, p.nv);
    if (k == nullptr) return cudaErrorInvalidConfiguration;
    const bool affine = a.dweight != nullptr || a.dbias != nullptr;
    if (affine && (workspace == nullptr || (p.vec > 1 && !is_aligned(workspace, 16)))) {
      return cudaErrorInvalidValue;
    }
    const size_t part_size = size_t(p.partial_rows) * size_t(a.cols);
    float* part_w = a.dweight != nullptr ? workspace : nullptr;
    float* part_b = a.dbias != nullptr ? workspace + (part_w != nullptr ? part_size : 0) : nullptr;
    const dim3 block(p.threads_x, p.rows_per_block);
    if (p.nv > 0) {
      k<<<dim3(unsigned(p.grid)), block, p.smem_bytes, stream>>>(a, part_w, part_b);
    } else {
      k<<<dim3(unsigned(p.grid)), block, 0, stream>>>(a, nullptr, nullptr);
      if (affine) {
        norm_bwd_affine_kernel<TDY, TN>
            <<<dim3(unsigned(p.affine_grid_x), unsigned(p.partial_rows)), dim3(32, kAffineRows), 0,
               stream>>>(a, part_w, part_b);
      }
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || !affine) return e;
    const unsigned tiles = unsigned((a.cols + 31) / 32);
    reduce_partials_kernel<<<dim3(tiles, 2), dim3(32, kReduceRows), 0, stream>>>(
        part_w, part_b, p.partial_rows, a.cols, a.dweight, a.dbias);
    return cudaGetLastError();
  }
};

bool valid_args(const NormBwdArgs& a) {
  return a.rows >= 0 && a.cols > 0 && a.dy != nullptr && a.x != nullptr && a.dx != nullptr &&
         a.rstd != nullptr && (a.rms || a.mean != nullptr);
}

// The dtype triple of the backward: (dy, x, dx_branch), the branch being x's dtype when absent.
template <typename F>
cudaError_t dispatch_bwd(const NormBwdArgs& a, F&& f) {
  const NormDType branch = a.dx_branch != nullptr ? a.branch_dtype : a.dtype;
  if (a.dx_branch != nullptr && branch == a.dtype) return cudaErrorInvalidValue;
  return dispatch_dtypes3(a.dy_dtype, a.dtype, branch, f);
}

}  // namespace norm_detail

cudaError_t norm_bwd_plan(const NormBwdArgs& args, NormBwdPlan* plan) {
  if (plan == nullptr || !norm_detail::valid_args(args)) return cudaErrorInvalidValue;
  *plan = NormBwdPlan{};
  if (args.rows == 0) return cudaSuccess;
  return norm_detail::dispatch_bwd(args, norm_detail::PlanBwd{args, plan});
}

cudaError_t norm_bwd(const NormBwdArgs& args, const NormBwdPlan& plan, float* workspace,
                     cudaStream_t stream) {
  if (!norm_detail::valid_args(args)) return cudaErrorInvalidValue;
  if (args.rows == 0) return cudaSuccess;  // the caller zero-fills dweight/dbias
  return norm_detail::dispatch_bwd(args, norm_detail::LaunchBwd{args, plan, workspace, stream});
}

}  // namespace craft
