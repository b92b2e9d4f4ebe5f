// Device helpers shared by the norm forward and backward kernels: dtype conversion, packed
// (16-byte) loads and stores, row reductions, and the choice of how threads map onto a row.
//
// Thread layout of the row kernels: a block is (G, R) threads. The G threads of block row
// threadIdx.y cooperate on one tensor row; R rows are processed side by side. G is a power of two:
// G <= 32 means one warp (or an aligned part of one) per row, G >= 64 means several warps per row
// and then R * G <= 256. Thread t of a row owns the vectors t, t + G, t + 2G, ... of that row, so
// a warp's loads are contiguous (coalesced).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "norm.h"

namespace craft {
namespace norm_detail {

constexpr int kMaxCachedElems = 32;  // fp32 values per thread and tensor kept in registers
constexpr int kMaxRowThreads = 256;  // most threads cooperating on one row (G)
constexpr int kSmallBlockThreads = 128;  // G * R when rows are small enough to share a block
constexpr int kMaxBlockThreads = 256;    // launch bound of every row kernel
constexpr int kMaxWarpsPerBlock = kMaxBlockThreads / 32;

// ------------------------------------------------------------------------------------- dtypes

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// --------------------------------------------------------------------------------- packed I/O

// N consecutive elements moved as one unit: a 16-byte access when sizeof(T) * N == 16 (two for
// fp32 weights next to 8-wide half rows), a scalar access when N == 1.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Loads N values of T as fp32.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = load_pack<T, N>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pk.v[k]);
}

// Stores N fp32 values rounded to T.
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_float<T>(in[k]);
  store_pack<T, N>(p, pk);
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// ------------------------------------------------------------------------------- reductions

// Sums v[0..K) over the G = blockDim.x threads of this block row; every one of them gets the same
// bits back (the butterfly adds commutative pairs, the cross-warp step runs in a fixed order).
// Every thread of the block must call it: it shuffles over full warps and may __syncthreads().
// `smem` holds at least kMaxWarpsPerBlock * K floats.
template <int K>
__device__ __forceinline__ void row_allreduce(float (&v)[K], float* smem) {
  const int G = blockDim.x;
  const int width = G < 32 ? G : 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int o = width >> 1; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  }
  if (G > 32) {  // G is a multiple of 32 here, so each warp belongs to exactly one row
    const int warps = G >> 5;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    float* s = smem + threadIdx.y * warps * K;
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) s[warp * K + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float t = 0.f;
      for (int i = 0; i < warps; ++i) t += s[i * K + k];
      v[k] = t;
    }
    __syncthreads();  // `smem` is reused by the next call
  }
}

// --------------------------------------------------------------------------------- row layout

struct RowLayout {
  int vec;             // elements per load: 16 bytes on the fast path, else 1
  int nv;              // vectors per thread cached in registers; 0 = streamed from memory
  int threads_x;       // G: threads per row (power of two, <= kMaxRowThreads)
  int rows_per_block;  // R
};

__host__ __device__ inline int pow2_ceil(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// One warp (or part of one) per row while a row fits in 32 threads x kMaxCachedElems values;
// several warps per row up to kMaxRowThreads; beyond that the row is streamed from memory
// (re-read from L2 in every pass) instead of cached in registers.
inline RowLayout choose_layout(int64_t cols, int vec) {
  const int64_t nvec = cols / vec;  // vec divides cols
  const int nv_max = kMaxCachedElems / vec;
  RowLayout l{vec, 1, 1, 1};
  if (nvec <= 32) {
    l.threads_x = pow2_ceil(nvec);
    l.nv = 1;
  } else if (nvec <= int64_t(32) * nv_max) {
    l.threads_x = 32;
    l.nv = pow2_ceil((nvec + 31) / 32);
  } else if (nvec <= int64_t(kMaxRowThreads) * nv_max) {
    l.nv = nv_max;
    l.threads_x = pow2_ceil((nvec + nv_max - 1) / nv_max);
  } else {
    l.nv = 0;
    l.threads_x = kMaxRowThreads;
  }
  l.rows_per_block = l.threads_x >= kSmallBlockThreads ? 1 : kSmallBlockThreads / l.threads_x;
  return l;
}

// Scalar loads, rows streamed from memory: the one layout the mixed-dtype kernels have for rows
// that cannot take 16-byte accesses (odd widths, misaligned tensors).
inline RowLayout streamed_layout(int64_t cols) {
  RowLayout l{1, 0, 1, 1};
  l.threads_x = cols >= kMaxRowThreads ? kMaxRowThreads : pow2_ceil(cols);
  l.rows_per_block = l.threads_x >= kSmallBlockThreads ? 1 : kSmallBlockThreads / l.threads_x;
  return l;
}

// Elements per 16-byte access of the narrowest of the element types.
template <typename... T>
constexpr int fast_vec() {
  return 16 / int(std::min({sizeof(T)...}));
}

inline cudaError_t sm_count(int* out) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  return cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, dev);
}

// Calls f.template operator()<A, B, C>() for a supported dtype triple (see norm.h): all three
// equal, or B fp32 with (A, C) one of (fp32, h), (h, h), (h, fp32) for h in {fp16, bf16}. The
// forward passes (x, sum, y), the backward (dy, x, dx_branch).
template <typename F>
cudaError_t dispatch_dtypes3(NormDType a, NormDType b, NormDType c, F&& f) {
  using D = NormDType;
  if (a == b && b == c) {
    switch (a) {
      case D::kFloat32:
        return f.template operator()<float, float, float>();
      case D::kFloat16:
        return f.template operator()<__half, __half, __half>();
      case D::kBFloat16:
        return f.template operator()<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>();
    }
    return cudaErrorInvalidValue;
  }
  if (b != D::kFloat32) return cudaErrorNotSupported;
  if (a == D::kFloat32 && c == D::kFloat16) return f.template operator()<float, float, __half>();
  if (a == D::kFloat32 && c == D::kBFloat16) {
    return f.template operator()<float, float, __nv_bfloat16>();
  }
  if (a == D::kFloat16 && c == D::kFloat16) return f.template operator()<__half, float, __half>();
  if (a == D::kBFloat16 && c == D::kBFloat16) {
    return f.template operator()<__nv_bfloat16, float, __nv_bfloat16>();
  }
  if (a == D::kFloat16 && c == D::kFloat32) return f.template operator()<__half, float, float>();
  if (a == D::kBFloat16 && c == D::kFloat32) {
    return f.template operator()<__nv_bfloat16, float, float>();
  }
  return cudaErrorNotSupported;
}

template <typename A, typename B, typename C>
constexpr bool all_same() {
  return std::is_same_v<A, B> && std::is_same_v<B, C>;
}

// Kernel for (VEC, NV) from a family `K<VEC, NV>::ptr()`; NV = 0 (streamed) or a power of two with
// VEC * NV <= kMaxCachedElems. Only those variants are instantiated. nullptr if nv is not valid.
template <template <int, int> class K, int VEC, int NV = 1>
auto pick_cached(int nv) -> decltype(K<VEC, 1>::ptr()) {
  if constexpr (VEC * NV > kMaxCachedElems) {
    return nullptr;
  } else {
    return nv == NV ? K<VEC, NV>::ptr() : pick_cached<K, VEC, NV * 2>(nv);
  }
}

template <template <int, int> class K, int VEC>
auto pick_variant(int nv) -> decltype(K<VEC, 1>::ptr()) {
  return nv == 0 ? K<VEC, 0>::ptr() : pick_cached<K, VEC, 1>(nv);
}

}  // namespace norm_detail
}  // namespace craft
