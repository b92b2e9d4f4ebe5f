// Forward of the fused (residual add +) LayerNorm / RMSNorm.
//
//   s = x + residual  (rounded to the input dtype, written out for the next residual; s = x if none)
//   LayerNorm: y = (s - mean(s)) * rstd * weight + bias,   rstd = 1 / sqrt(var(s) + eps)
//   RMSNorm:   y = s * rstd * weight (+ bias),              rstd = 1 / sqrt(mean(s^2) + eps)
//
// Statistics are fp32 and two-pass (mean first, then the centred sum of squares) over values held
// in registers, so there is no cancellation from E[s^2] - E[s]^2. Rows too long for registers are
// streamed: the same passes re-read the row (from L2) instead.
#include "norm_common.cuh"

namespace craft {
namespace norm_detail {

using FwdKernel = void (*)(NormFwdArgs);

// Element type T, VEC elements per load, NV vectors per thread cached (0 = streamed).
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(kMaxBlockThreads, 1) norm_fwd_kernel(NormFwdArgs a) {
  __shared__ float smem[kMaxWarpsPerBlock];
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ res = static_cast<const T*>(a.residual);
  T* __restrict__ y = static_cast<T*>(a.y);
  T* sum_out = static_cast<T*>(a.sum);  // written, then (streamed path) read back
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
          load_floats<T, VEC>(x + off + j * VEC, v[i]);
          if (res != nullptr) {
            float r[VEC];
            load_floats<T, VEC>(res + off + j * VEC, r);
            Pack<T, VEC> s;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              s.v[k] = from_float<T>(v[i][k] + r[k]);
              v[i][k] = to_float(s.v[k]);  // normalise exactly the sum that is returned
            }
            store_pack<T, VEC>(sum_out + off + j * VEC, s);
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
            store_floats<T, VEC>(y + off + c, out);
          }
        }
      }
    } else {
      // Streamed: pass 1 forms s (and writes it), then passes re-read s from where it lives.
      const T* src = res != nullptr ? sum_out : x;
      float sum = 0.f;
      float sumsq = 0.f;
      if (valid) {
        for (int j = threadIdx.x; j < nvec; j += G) {
          float v[VEC];
          load_floats<T, VEC>(x + off + j * VEC, v);
          if (res != nullptr) {
            float r[VEC];
            load_floats<T, VEC>(res + off + j * VEC, r);
            Pack<T, VEC> s;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              s.v[k] = from_float<T>(v[k] + r[k]);
              v[k] = to_float(s.v[k]);
            }
            store_pack<T, VEC>(sum_out + off + j * VEC, s);  // read back by this same thread
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
            load_floats<T, VEC>(src + off + j * VEC, v);
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
          load_floats<T, VEC>(src + off + c, v);
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
          store_floats<T, VEC>(y + off + c, out);
        }
      }
    }
  }
}

template <typename T>
struct FwdFamily {
  template <int VEC, int NV>
  struct K {
    static FwdKernel ptr() { return &norm_fwd_kernel<T, VEC, NV>; }
  };
};

struct LaunchFwd {
  const NormFwdArgs& a;
  cudaStream_t stream;

  template <typename T>
  cudaError_t operator()() const {
    constexpr int F = fast_vec<T>();
    // The 16-byte path needs every row to start on a 16-byte boundary.
    const bool vector_ok = a.cols % F == 0 && is_aligned(a.x, 16) && is_aligned(a.y, 16) &&
                           (a.residual == nullptr || is_aligned(a.residual, 16)) &&
                           (a.sum == nullptr || is_aligned(a.sum, 16)) &&
                           (a.weight == nullptr || is_aligned(a.weight, 16)) &&
                           (a.bias == nullptr || is_aligned(a.bias, 16));
    const RowLayout l = choose_layout(a.cols, vector_ok ? F : 1);
    const FwdKernel k = vector_ok ? pick_variant<FwdFamily<T>::template K, F>(l.nv)
                                  : pick_variant<FwdFamily<T>::template K, 1>(l.nv);
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
  if (args.rows == 0) return cudaSuccess;
  return norm_detail::dispatch_dtype(args.dtype, norm_detail::LaunchFwd{args, stream});
}

}  // namespace craft
