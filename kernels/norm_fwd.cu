// Forward of the fused (residual add +) LayerNorm / RMSNorm.
//
//   s = x + residual  (rounded to the sum's dtype, written out for the next residual; s = x alone)
//   LayerNorm: y = (s - mean(s)) * rstd * weight + bias,   rstd = 1 / sqrt(var(s) + eps)
//   RMSNorm:   y = s * rstd * weight (+ bias),              rstd = 1 / sqrt(mean(s^2) + eps)
//
// Statistics are fp32 and two-pass (mean first, then the centred sum of squares) over values held
// in registers, so there is no cancellation from E[s^2] - E[s]^2. Rows too long for registers are
// streamed: the same passes re-read the row (from L2) instead.
//
// Mixed precision: x (the branch, TX), the residual and sum (TS) and y (TY) may differ, e.g. a bf16
// attention output added to the fp32 residual stream under autocast, normalised into bf16 for the
// next matmul (norm.h lists the supported triples). The sum is rounded to TS once; y is rounded to
// TY once, from fp32.
#include "norm_common.cuh"

namespace craft {
namespace norm_detail {

using FwdKernel = void (*)(NormFwdArgs);

// Element types TX (x), TS (residual, sum), TY (y); VEC elements per load, NV vectors per thread
// cached (0 = streamed).
template <typename TX, typename TS, typename TY, int VEC, int NV>
__global__ void __launch_bounds__(kMaxBlockThreads, 1) norm_fwd_kernel(NormFwdArgs a) {
  __shared__ float smem[kMaxWarpsPerBlock];
  const TX* __restrict__ x = static_cast<const TX*>(a.x);
  const TS* __restrict__ res = static_cast<const TS*>(a.residual);
  TY* __restrict__ y = static_cast<TY*>(a.y);
  TS* sum_out = static_cast<TS*>(a.sum);  // written, then (streamed path) read back
  const int G = blockDim.x;
  const int R = blockDim.y;
  const int64_t cols = a.cols;
  const int nvec = int(cols / VEC);  // the binding keeps cols < 2^31
  const float inv_cols = 1.f / float(cols);

  // Every thread of the block runs the same number of iterations (row_allreduce needs them all).
  for (int64_t base = int64_t(blockIdx.x) * R; base < a.rows; base += int64_t(gridDim.x) * R) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < a.rows;
    const int64_t off = row * cols;  // first element of this row
    float red[1];

    if constexpr (NV > 0) {
      float v[NV][VEC];  // this thread's part of s, fp32
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int j = threadIdx.x + i * G;  // vector index within the row
        if (valid && j < nvec) {
          load_floats<TX, VEC>(x + off + j * VEC, v[i]);
          if (res != nullptr) {
            float r[VEC];
            load_floats<TS, VEC>(res + off + j * VEC, r);
            Pack<TS, VEC> s;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              s.v[k] = from_float<TS>(v[i][k] + r[k]);
              v[i][k] = to_float(s.v[k]);  // normalise exactly the sum that is returned
            }
            store_pack<TS, VEC>(sum_out + off + j * VEC, s);
          }
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += v[i][k];
      }

      float mean = 0.f;
      if (!a.rms) {
        red[0] = sum;
        row_allreduce<1>(red, smem);
        mean = red[0] * inv_cols;
      }
      float sq = 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int j = threadIdx.x + i * G;
        if (j < nvec) {  // padding lanes hold 0, which is not 0 after centring
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float d = v[i][k] - mean;
            sq += d * d;
          }
        }
      }
      red[0] = sq;
      row_allreduce<1>(red, smem);
      const float rstd = rsqrtf(red[0] * inv_cols + a.eps);

      if (valid) {
        if (threadIdx.x == 0) {
          if (a.mean != nullptr) a.mean[row] = mean;
          a.rstd[row] = rstd;
        }
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int j = threadIdx.x + i * G;
          if (j < nvec) {
            const int c = j * VEC;
            float w[VEC], b[VEC], out[VEC];
            if (a.weight != nullptr) {
              load_floats<float, VEC>(a.weight + c, w);
            } else {
#pragma unroll
              for (int k = 0; k < VEC; ++k) w[k] = 1.f;
            }
            if (a.bias != nullptr) {
              load_floats<float, VEC>(a.bias + c, b);
            } else {
#pragma unroll
              for (int k = 0; k < VEC; ++k) b[k] = 0.f;
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] = (v[i][k] - mean) * rstd * w[k] + b[k];
            store_floats<TY, VEC>(y + off + c, out);
          }
        }
      }
    } else {
      // Streamed: pass 1 forms s (and writes it), then passes re-read s from where it lives:
      // the written sum (TS) with a residual, x itself (TX) without.
      auto load_s = [&](int j, float(&v)[VEC]) {
        if (res != nullptr) {
          load_floats<TS, VEC>(sum_out + off + j * VEC, v);
        } else {
          load_floats<TX, VEC>(x + off + j * VEC, v);
        }
      };
      float sum = 0.f;
      float sumsq = 0.f;
      if (valid) {
        for (int j = threadIdx.x; j < nvec; j += G) {
          float v[VEC];
          load_floats<TX, VEC>(x + off + j * VEC, v);
          if (res != nullptr) {
            float r[VEC];
            load_floats<TS, VEC>(res + off + j * VEC, r);
            Pack<TS, VEC> s;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              s.v[k] = from_float<TS>(v[k] + r[k]);
              v[k] = to_float(s.v[k]);
            }
            store_pack<TS, VEC>(sum_out + off + j * VEC, s);  // read back by this same thread
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            sum += v[k];
            sumsq += v[k] * v[k];
          }
        }
      }
      float mean = 0.f;
      float ms;
      if (a.rms) {
        red[0] = sumsq;
        row_allreduce<1>(red, smem);
        ms = red[0] * inv_cols;
      } else {
        red[0] = sum;
        row_allreduce<1>(red, smem);
        mean = red[0] * inv_cols;
        float sq = 0.f;
        if (valid) {
          for (int j = threadIdx.x; j < nvec; j += G) {
            float v[VEC];
            load_s(j, v);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const float d = v[k] - mean;
              sq += d * d;
            }
          }
        }
        red[0] = sq;
        row_allreduce<1>(red, smem);
        ms = red[0] * inv_cols;
      }
      const float rstd = rsqrtf(ms + a.eps);
      if (valid) {
        if (threadIdx.x == 0) {
          if (a.mean != nullptr) a.mean[row] = mean;
          a.rstd[row] = rstd;
        }
        for (int j = threadIdx.x; j < nvec; j += G) {
          const int c = j * VEC;
          float v[VEC], out[VEC];
          load_s(j, v);
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] = (v[k] - mean) * rstd;
          if (a.weight != nullptr) {
            float w[VEC];
            load_floats<float, VEC>(a.weight + c, w);
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] *= w[k];
          }
          if (a.bias != nullptr) {
            float b[VEC];
            load_floats<float, VEC>(a.bias + c, b);
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] += b[k];
          }
          store_floats<TY, VEC>(y + off + c, out);
        }
      }
    }
  }
}

template <typename TX, typename TS, typename TY>
struct FwdFamily {
  template <int VEC, int NV>
  struct K {
    static FwdKernel ptr() { return &norm_fwd_kernel<TX, TS, TY, VEC, NV>; }
  };
};

struct LaunchFwd {
  const NormFwdArgs& a;
  cudaStream_t stream;

  template <typename TX, typename TS, typename TY>
  cudaError_t operator()() const {
    constexpr int F = fast_vec<TX, TS, TY>();
    // The 16-byte path needs every row to start on a 16-byte boundary.
    const bool vector_ok = a.cols % F == 0 && is_aligned(a.x, 16) && is_aligned(a.y, 16) &&
                           (a.residual == nullptr || is_aligned(a.residual, 16)) &&
                           (a.sum == nullptr || is_aligned(a.sum, 16)) &&
                           (a.weight == nullptr || is_aligned(a.weight, 16)) &&
                           (a.bias == nullptr || is_aligned(a.bias, 16));
    using Fam = FwdFamily<TX, TS, TY>;
    RowLayout l;
    FwdKernel k;
    if (vector_ok) {
      l = choose_layout(a.cols, F);
      k = pick_variant<Fam::template K, F>(l.nv);
    } else if constexpr (all_same<TX, TS, TY>()) {
      l = choose_layout(a.cols, 1);
      k = pick_variant<Fam::template K, 1>(l.nv);
    } else {  // mixed dtypes: one scalar kernel keeps the number of instantiations down
      l = streamed_layout(a.cols);
      k = Fam::template K<1, 0>::ptr();
    }
    if (k == nullptr) return cudaErrorInvalidConfiguration;
    const int64_t blocks = (a.rows + l.rows_per_block - 1) / l.rows_per_block;
    const int64_t grid = blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20);
    k<<<dim3(unsigned(grid)), dim3(l.threads_x, l.rows_per_block), 0, stream>>>(a);
    return cudaGetLastError();
  }
};

}  // namespace norm_detail

cudaError_t norm_fwd(const NormFwdArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.cols <= 0 || args.x == nullptr || args.y == nullptr ||
      args.rstd == nullptr || (args.residual != nullptr) != (args.sum != nullptr) ||
      (!args.rms && args.mean == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (args.residual == nullptr && args.sum_dtype != args.dtype) return cudaErrorNotSupported;
  if (args.rows == 0) return cudaSuccess;
  return norm_detail::dispatch_dtypes3(args.dtype, args.sum_dtype, args.y_dtype,
                                       norm_detail::LaunchFwd{args, stream});
}

}  // namespace craft
