// Host API of the fused (residual add +) LayerNorm / RMSNorm kernels.
//
// Plain C++ over raw device pointers: the kernels do not depend on torch headers, so they compile
// (and are checked in CI) with nvcc alone. norm_binding.cpp validates tensors and calls these.
//
// Layout: every (rows, cols) tensor is contiguous and row-major. weight and bias are fp32 (the
// binding converts fp16/bf16 parameters; the result is the same because the kernels do all math in
// fp32). Row statistics (mean, rstd) are fp32.
//
// Dtypes (mixed precision): the branch x has `dtype`; the residual and the returned sum share
// `sum_dtype` (x's dtype, or fp32 for an fp32 residual stream under autocast); y has `y_dtype`
// (the sum's dtype, or the autocast dtype). Supported (x, sum, y): all three equal; and with h in
// {fp16, bf16}: (fp32, fp32, h), (h, fp32, h), (h, fp32, fp32). Anything else returns
// cudaErrorNotSupported. Without a residual, sum_dtype must equal dtype.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace craft {

enum class NormDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct NormFwdArgs {
  const void* x = nullptr;         // (rows, cols)
  const void* residual = nullptr;  // (rows, cols) or nullptr
  const float* weight = nullptr;   // (cols,) or nullptr (scale 1)
  const float* bias = nullptr;     // (cols,) or nullptr (shift 0)
  void* y = nullptr;               // (rows, cols) out: norm(x [+ residual])
  void* sum = nullptr;             // (rows, cols) out: x + residual; required iff residual is set
  float* mean = nullptr;           // (rows,) out; nullptr for rmsnorm
  float* rstd = nullptr;           // (rows,) out
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-5f;
  bool rms = false;
  NormDType dtype = NormDType::kFloat32;      // x
  NormDType sum_dtype = NormDType::kFloat32;  // residual and sum (dtype when there is no residual)
  NormDType y_dtype = NormDType::kFloat32;    // y
};

// Backward dtypes: x (the normalised input: the sum when a residual was fused), dsum and dx have
// `dtype`; dy has `dy_dtype` (the forward's y_dtype); `dx_branch`, when set, receives the same
// gradient as dx rounded to `branch_dtype` (the forward's x dtype when it differs from the sum's).
// Supported (dy, x, branch): all equal (no dx_branch); and with h in {fp16, bf16}: (h, fp32, -),
// (h, fp32, h), (fp32, fp32, h).
struct NormBwdArgs {
  const void* dy = nullptr;       // (rows, cols) gradient of y
  const void* dsum = nullptr;     // (rows, cols) gradient of the returned sum, or nullptr
  const void* x = nullptr;        // (rows, cols) the normalised input (the sum when fused)
  const float* mean = nullptr;    // (rows,) from the forward; nullptr for rmsnorm
  const float* rstd = nullptr;    // (rows,) from the forward
  const float* weight = nullptr;  // (cols,) or nullptr
  void* dx = nullptr;             // (rows, cols) out: gradient of x (and of the residual)
  void* dx_branch = nullptr;      // (rows, cols) out: the same gradient in branch_dtype, or nullptr
  float* dweight = nullptr;       // (cols,) out, or nullptr when not needed
  float* dbias = nullptr;         // (cols,) out, or nullptr when not needed
  int64_t rows = 0;
  int64_t cols = 0;
  bool rms = false;
  NormDType dtype = NormDType::kFloat32;         // x, dsum, dx
  NormDType dy_dtype = NormDType::kFloat32;      // dy
  NormDType branch_dtype = NormDType::kFloat32;  // dx_branch (ignored when it is nullptr)
};

// How the backward runs on the current device; `workspace_floats` fp32 values of scratch are
// needed for the per-block dweight/dbias partial sums (0 when neither is requested).
struct NormBwdPlan {
  int vec = 1;             // elements per vector load (16 bytes on the fast path, else 1)
  int nv = 0;              // vectors per thread cached in registers; 0 = streamed (large rows)
  int threads_x = 32;      // threads per row
  int rows_per_block = 1;  // rows handled side by side in one block
  int64_t grid = 0;        // blocks of the row kernel (grid-stride over rows)
  int64_t partial_rows = 0;  // rows of partial sums per parameter gradient
  int affine_grid_x = 0;   // streamed path only: column tiles of the dweight/dbias kernel
  size_t smem_bytes = 0;   // dynamic shared memory of the row kernel
  size_t workspace_floats = 0;
};

// Whether the kernels take this dtype triple: (x, sum, y) for the forward, (dy, x, dx_branch or x)
// for the backward. All equal, or the middle one fp32 with the outer pair one of (fp32, h),
// (h, h), (h, fp32) for one h in {fp16, bf16}.
inline bool norm_dtypes_supported(NormDType a, NormDType b, NormDType c) {
  if (a == b && b == c) return true;
  if (b != NormDType::kFloat32) return false;
  const bool a_half = a != NormDType::kFloat32;
  const bool c_half = c != NormDType::kFloat32;
  return (a_half || c_half) && (!a_half || !c_half || a == c);
}

// Forward. Returns the first CUDA error met (launch configuration or earlier sticky error).
cudaError_t norm_fwd(const NormFwdArgs& args, cudaStream_t stream);

// Plans the backward for the current device (deterministic for a given device and shape).
cudaError_t norm_bwd_plan(const NormBwdArgs& args, NormBwdPlan* plan);

// Backward with a plan from norm_bwd_plan and `workspace` of plan.workspace_floats floats.
cudaError_t norm_bwd(const NormBwdArgs& args, const NormBwdPlan& plan, float* workspace,
                     cudaStream_t stream);

}  // namespace craft
