// Runs the norm kernels' own source on the CPU: every CUDA thread of a block is a cooperative
// fiber (ucontext) on one OS thread; __syncthreads and warp shuffles are block-wide barriers at
// which the fibers take turns; blocks run one after another. The driver
// (tests/kernels/test_norm_emulated.py) rewrites `k<<<grid, block, smem, stream>>>(args)` into
// emu::launch(...) and `extern __shared__` into emu::dyn_smem(), then compiles this file with g++.
// Results are checked against a float64 reference; exit status 1 on any mismatch.
//
// What this checks: index math, masking, thread/row layouts, reductions, the partial-sum
// bookkeeping, and that every thread of a block reaches the same barriers (a barrier that some
// threads skip is reported). What it cannot check: timing, memory ordering between blocks, and
// device-specific code generation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace emu {

struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
ThreadCtx ctx;  // of the fiber that runs now

struct Fiber {
  ucontext_t uc;
  std::vector<char> stack;
  ThreadCtx tctx;
  bool done = false;
};

struct BlockState {
  std::vector<Fiber> fibers;
  int current = 0;
  ucontext_t scheduler;
  std::vector<float> slots;
  std::vector<float> dyn;
  std::function<void()> body;
};
BlockState block;

// A barrier: hand control back to the scheduler, which resumes this fiber once all have arrived.
inline void sync() {
  Fiber& f = block.fibers[block.current];
  swapcontext(&f.uc, &block.scheduler);
  ctx = f.tctx;
}

inline float shfl_xor(float v, int offset) {
  const int me = block.current;
  block.slots[me] = v;
  sync();
  const int partner = (me & ~31) | ((me & 31) ^ offset);
  const float out = block.slots[partner];
  sync();
  return out;
}

inline float* dyn_smem() { return block.dyn.data(); }

inline void fiber_main() {
  block.body();
  block.fibers[block.current].done = true;
  // returning resumes uc_link (the scheduler)
}

bool divergence = false;

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 blk, size_t smem, cudaStream_t, A... args) {
  const int n = int(blk.x * blk.y * blk.z);
  constexpr size_t kStack = 256 * 1024;
  block.fibers.resize(n);
  for (auto& f : block.fibers) f.stack.resize(kStack);
  block.body = [=] { kernel(args...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block.slots.assign(n, 0.f);
        block.dyn.assign(smem / sizeof(float) + 1, std::nanf(""));  // garbage, like real smem
        for (int t = 0; t < n; ++t) {
          Fiber& f = block.fibers[t];
          f.done = false;
          f.tctx = {make_uint3(t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y)),
                    make_uint3(bx, by, bz), blk, grid};
          getcontext(&f.uc);
          f.uc.uc_stack.ss_sp = f.stack.data();
          f.uc.uc_stack.ss_size = f.stack.size();
          f.uc.uc_link = &block.scheduler;
          makecontext(&f.uc, fiber_main, 0);
        }
        // Rounds: run every fiber to its next barrier (or its end); all must agree.
        for (;;) {
          int finished = 0;
          for (int t = 0; t < n; ++t) {
            block.current = t;
            ctx = block.fibers[t].tctx;
            swapcontext(&block.scheduler, &block.fibers[t].uc);
            finished += block.fibers[t].done;
          }
          if (finished == n) break;
          if (finished != 0) {  // some threads ended while others wait at a barrier: a hang on a GPU
            divergence = true;
            std::printf("FAIL barrier reached by %d of %d threads (block %u,%u)\n", n - finished,
                        n, bx, by);
            return;
          }
        }
      }
}

inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t device_attribute(int* v, cudaDeviceAttr, int) {
  *v = 3;  // few "SMs": the backward's grid-stride loops and partial rows get exercised
  return cudaSuccess;
}
template <class K>
cudaError_t occupancy(int* n, K, int, size_t) {
  *n = 2;
  return cudaSuccess;
}
inline cudaError_t last_error() { return cudaSuccess; }

}  // namespace emu

// Device-side names onto the emulator (the CUDA headers above are already parsed).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (emu::ctx.thread_idx)
#define blockIdx (emu::ctx.block_idx)
#define blockDim (emu::ctx.block_dim)
#define gridDim (emu::ctx.grid_dim)
#define __syncthreads() emu::sync()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor((v), (o))
#define rsqrtf(v) (1.f / std::sqrt(v))
#define cudaGetDevice emu::get_device
#define cudaDeviceGetAttribute emu::device_attribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor emu::occupancy
#define cudaGetLastError emu::last_error

#include "norm_bwd_emu.cu"
#include "norm_fwd_emu.cu"

// ------------------------------------------------------------------------------------ checks

namespace {

using craft::NormDType;

int failures = 0;

template <typename T>
float tf(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}
template <typename T>
T ft(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}
template <typename T>
NormDType dt() {
  if constexpr (std::is_same_v<T, float>) return NormDType::kFloat32;
  else if constexpr (std::is_same_v<T, __half>) return NormDType::kFloat16;
  else return NormDType::kBFloat16;
}
template <typename T>
double tol() {
  if constexpr (std::is_same_v<T, float>) return 2e-5;
  else if constexpr (std::is_same_v<T, __half>) return 2e-3;
  else return 1.6e-2;
}

// A 256-byte aligned buffer; `shift` elements in, so callers can make it misaligned.
template <typename T>
struct Buf {
  std::vector<unsigned char> raw;
  T* p;
  Buf(size_t n, int shift = 0) : raw((n + shift) * sizeof(T) + 512) {
    uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + 255) & ~uintptr_t(255);
    p = reinterpret_cast<T*>(a) + shift;
  }
};

// max |a - ref| / max |ref| over n values
double rel_err(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num = std::max(num, std::fabs(a[i] - ref[i]));
    den = std::max(den, std::fabs(ref[i]));
  }
  return num / den;
}

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

template <typename T>
const char* dtname() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, __half>) return "f16";
  else return "bf16";
}

// One case: x in TX, residual and sum in TS, y (and dy) in TY. Without a residual TS == TX.
template <typename TX, typename TS, typename TY>
void check_case(int64_t rows, int64_t cols, bool rms, bool residual, bool weight, bool bias,
                bool misalign, std::mt19937& rng) {
  constexpr bool kBranch = !std::is_same_v<TX, TS>;  // dx_branch is written
  using TN = TS;                                     // the normalised input: the sum (or x)
  const std::string name = std::string("x=") + dtname<TX>() + " sum=" + dtname<TS>() +
                           " y=" + dtname<TY>() + " rows=" + std::to_string(rows) +
                           " cols=" + std::to_string(cols) + (rms ? " rms" : " ln") +
                           (residual ? " +res" : "") + (weight ? " w" : "") + (bias ? " b" : "") +
                           (misalign ? " misaligned" : "");
  std::normal_distribution<float> nd(0.f, 1.f);
  const size_t n = size_t(rows * cols);
  const int shift = misalign ? 1 : 0;
  Buf<TX> x(n, shift), dxb(n);
  Buf<TS> r(n, shift), s(n), ds(n), dx(n);
  Buf<TY> y(n), dy(n);
  Buf<float> w(cols), b(cols), mean(rows), rstd(rows), dw(cols), db(cols);
  for (size_t i = 0; i < n; ++i) {
    x.p[i] = ft<TX>(nd(rng) * 2.f + 0.5f);
    r.p[i] = ft<TS>(nd(rng));
    dy.p[i] = ft<TY>(nd(rng));
    ds.p[i] = ft<TS>(nd(rng));
  }
  for (int64_t c = 0; c < cols; ++c) {
    w.p[c] = tf(ft<TX>(0.5f + std::fabs(nd(rng))));
    b.p[c] = tf(ft<TX>(0.1f * nd(rng)));
  }
  const float eps = 1e-5f;

  craft::NormFwdArgs fa;
  fa.x = x.p;
  fa.residual = residual ? r.p : nullptr;
  fa.weight = weight ? w.p : nullptr;
  fa.bias = bias ? b.p : nullptr;
  fa.y = y.p;
  fa.sum = residual ? s.p : nullptr;
  fa.mean = rms ? nullptr : mean.p;
  fa.rstd = rstd.p;
  fa.rows = rows;
  fa.cols = cols;
  fa.eps = eps;
  fa.rms = rms;
  fa.dtype = dt<TX>();
  fa.sum_dtype = dt<TS>();
  fa.y_dtype = dt<TY>();
  expect(craft::norm_fwd(fa, nullptr) == cudaSuccess, name + ": forward launch");

  craft::NormBwdArgs ba;
  ba.dy = dy.p;
  ba.dsum = residual ? ds.p : nullptr;
  ba.x = residual ? static_cast<const void*>(s.p) : static_cast<const void*>(x.p);
  ba.mean = rms ? nullptr : mean.p;
  ba.rstd = rstd.p;
  ba.weight = weight ? w.p : nullptr;
  ba.dx = dx.p;
  ba.dx_branch = kBranch ? dxb.p : nullptr;
  ba.dweight = weight ? dw.p : nullptr;
  ba.dbias = bias ? db.p : nullptr;
  ba.rows = rows;
  ba.cols = cols;
  ba.rms = rms;
  ba.dtype = dt<TN>();
  ba.dy_dtype = dt<TY>();
  ba.branch_dtype = dt<TX>();
  craft::NormBwdPlan plan;
  expect(craft::norm_bwd_plan(ba, &plan) == cudaSuccess, name + ": backward plan");
  Buf<float> ws(plan.workspace_floats + 1);
  for (size_t i = 0; i < plan.workspace_floats; ++i) ws.p[i] = std::nanf("");
  expect(craft::norm_bwd(ba, plan, ws.p, nullptr) == cudaSuccess, name + ": backward launch");

  // float64 reference on the same (rounded) inputs
  std::vector<double> ry(n), gy(n), rdx(n), gdx(n), rdw(cols, 0), rdb(cols, 0), gdw(cols), gdb(cols);
  bool sum_exact = true, branch_exact = true;
  for (int64_t i = 0; i < rows; ++i) {
    std::vector<double> sv(cols);
    for (int64_t c = 0; c < cols; ++c) {
      const size_t k = size_t(i * cols + c);
      if (residual) {
        const TS sr = ft<TS>(tf(x.p[k]) + tf(r.p[k]));
        sum_exact = sum_exact && std::memcmp(&sr, &s.p[k], sizeof(TS)) == 0;
        sv[c] = tf(sr);
      } else {
        sv[c] = tf(x.p[k]);
      }
    }
    double mu = 0, var = 0;
    if (!rms) {
      for (double v : sv) mu += v;
      mu /= double(cols);
    }
    for (double v : sv) var += (v - mu) * (v - mu);
    var /= double(cols);
    const double rs = 1.0 / std::sqrt(var + eps);
    double m1 = 0, m2 = 0;
    std::vector<double> xh(cols), g(cols);
    for (int64_t c = 0; c < cols; ++c) {
      const size_t k = size_t(i * cols + c);
      xh[c] = (sv[c] - mu) * rs;
      const double wc = weight ? w.p[c] : 1.0;
      ry[k] = xh[c] * wc + (bias ? b.p[c] : 0.0);
      gy[k] = tf(y.p[k]);
      const double d = tf(dy.p[k]);
      g[c] = d * wc;
      m1 += g[c];
      m2 += g[c] * xh[c];
      rdw[c] += d * xh[c];
      rdb[c] += d;
    }
    m1 = rms ? 0 : m1 / double(cols);
    m2 /= double(cols);
    for (int64_t c = 0; c < cols; ++c) {
      const size_t k = size_t(i * cols + c);
      rdx[k] = rs * (g[c] - m1 - xh[c] * m2) + (residual ? tf(ds.p[k]) : 0.0);
      gdx[k] = tf(dx.p[k]);
      if constexpr (kBranch) {
        const TX want = ft<TX>(tf(dx.p[k]));  // the same gradient, rounded to the branch dtype
        branch_exact = branch_exact && std::memcmp(&want, &dxb.p[k], sizeof(TX)) == 0;
      }
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    gdw[c] = dw.p[c];
    gdb[c] = db.p[c];
  }
  char msg[160];
  const double ey = rel_err(gy, ry), ex = rel_err(gdx, rdx);
  std::snprintf(msg, sizeof msg, ": y rel err %.3g, dx rel err %.3g", ey, ex);
  expect(ey <= tol<TY>() && ex <= 4 * tol<TS>(), name + msg);
  if (residual) expect(sum_exact, name + ": returned sum differs from round(x + residual)");
  if (kBranch) expect(branch_exact, name + ": dx_branch is not dx rounded to the branch dtype");
  if (weight) {
    const double e = rel_err(gdw, rdw);
    std::snprintf(msg, sizeof msg, ": dweight rel err %.3g", e);
    expect(e <= 1e-4, name + msg);  // fp32 sums of exact products
  }
  if (bias) {
    const double e = rel_err(gdb, rdb);
    std::snprintf(msg, sizeof msg, ": dbias rel err %.3g", e);
    expect(e <= 1e-4, name + msg);
  }
}

template <typename T>
void run_all(std::mt19937& rng, int* cases) {
  // warp-per-row, several rows per warp, block-per-row, scalar (odd) path, streamed rows
  const int64_t col_list[] = {1, 7, 8, 64, 100, 264, 768, 1000, 2048, 4096, 4097, 8192, 8200, 9001};
  for (int64_t cols : col_list) {
    const int64_t rows = cols >= 4096 ? 9 : 37;
    for (int variant = 0; variant < 4; ++variant) {
      const bool rms = variant & 1;
      const bool residual = variant >= 2;
      const bool weight = variant != 1;
      const bool bias = !rms && variant != 2;
      check_case<T, T, T>(rows, cols, rms, residual, weight, bias, false, rng);
      ++*cases;
    }
    if (cols % 8 == 0) {  // a fast-path size with a misaligned input falls back to scalar loads
      check_case<T, T, T>(rows, cols, false, true, true, true, true, rng);
      ++*cases;
    }
  }
  check_case<T, T, T>(0, 64, false, false, true, true, false, rng);  // no rows: nothing launched
  ++*cases;
}

// Mixed precision (autocast): a low-precision branch H on an fp32 residual stream, or an fp32
// input normalised into H. Vector paths (cached and streamed) and the scalar fallback.
template <typename H>
void run_mixed(std::mt19937& rng, int* cases) {
  const int64_t col_list[] = {7, 64, 100, 768, 4096, 9000};
  for (int64_t cols : col_list) {
    const int64_t rows = cols >= 4096 ? 5 : 19;
    for (int variant = 0; variant < 2; ++variant) {
      const bool rms = variant == 1;
      check_case<H, float, H>(rows, cols, rms, true, true, !rms, false, rng);  // ln_2 under autocast
      check_case<H, float, float>(rows, cols, rms, true, true, !rms, false, rng);  // no autocast
      check_case<float, float, H>(rows, cols, rms, false, true, !rms, false, rng);  // ln_1, ln_f
      check_case<float, float, H>(rows, cols, rms, true, !rms, false, false, rng);
      *cases += 4;
    }
    if (cols % 8 == 0) {
      check_case<H, float, H>(rows, cols, false, true, true, true, true, rng);
      ++*cases;
    }
  }
}

// Dtype triples the kernels do not take are refused, never run with the wrong element size.
void check_refusals(int* cases) {
  using D = NormDType;
  Buf<float> x(64), y(64), s(64), rstd(1), mean(1);
  craft::NormFwdArgs fa;
  fa.x = x.p;
  fa.residual = s.p;
  fa.sum = s.p;
  fa.y = y.p;
  fa.rstd = rstd.p;
  fa.mean = mean.p;
  fa.rows = 1;
  fa.cols = 64;
  const D bad[][3] = {{D::kBFloat16, D::kFloat32, D::kFloat16},
                      {D::kBFloat16, D::kBFloat16, D::kFloat32},
                      {D::kFloat16, D::kBFloat16, D::kFloat16}};
  for (const auto& t : bad) {
    fa.dtype = t[0];
    fa.sum_dtype = t[1];
    fa.y_dtype = t[2];
    expect(craft::norm_fwd(fa, nullptr) == cudaErrorNotSupported, "unsupported triple refused");
    expect(!craft::norm_dtypes_supported(t[0], t[1], t[2]), "norm_dtypes_supported agrees");
    ++*cases;
  }
  fa.residual = fa.sum = nullptr;  // without a residual the sum dtype must be x's
  fa.dtype = D::kBFloat16;
  fa.sum_dtype = D::kFloat32;
  fa.y_dtype = D::kBFloat16;
  expect(craft::norm_fwd(fa, nullptr) == cudaErrorNotSupported, "no residual, sum dtype != x");
  ++*cases;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int cases = 0;
  run_all<float>(rng, &cases);
  run_all<__half>(rng, &cases);
  run_all<__nv_bfloat16>(rng, &cases);
  run_mixed<__nv_bfloat16>(rng, &cases);
  run_mixed<__half>(rng, &cases);
  check_refusals(&cases);
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures == 0 && !emu::divergence ? 0 : 1;
}
