// Python binding of the fused norm kernels: validates tensors, allocates outputs through torch's
// caching allocator and launches on the current stream. Misuse raises a RuntimeError that names
// the argument and what was expected.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "norm.h"

namespace {

using craft::NormDType;

NormDType norm_dtype(at::ScalarType type, const char* name) {
  switch (type) {
    case at::kFloat:
      return NormDType::kFloat32;
    case at::kHalf:
      return NormDType::kFloat16;
    case at::kBFloat16:
      return NormDType::kBFloat16;
    default:
      TORCH_CHECK(false, "craft norm: ", name, " must be float32, float16 or bfloat16, got ",
                  type);
  }
  return NormDType::kFloat32;
}

NormDType norm_dtype(const at::Tensor& t, const char* name) {
  return norm_dtype(t.scalar_type(), name);
}

// x: a contiguous (rows, cols) CUDA tensor of a supported dtype.
void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "craft norm: ", name, " must be a CUDA tensor, got device ",
              x.device());
  TORCH_CHECK(x.dim() == 2, "craft norm: ", name, " must be 2-D (rows, cols), got shape ",
              x.sizes());
  TORCH_CHECK(x.size(1) > 0, "craft norm: ", name, " has no columns (shape ", x.sizes(), ")");
  TORCH_CHECK(x.size(1) < std::numeric_limits<int32_t>::max(), "craft norm: ", name, " has ",
              x.size(1), " columns; at most 2^31 - 2 are supported");
  TORCH_CHECK(x.is_contiguous(), "craft norm: ", name, " must be contiguous");
  norm_dtype(x, name);
}

// `t` must match `like` in shape and device, have a supported dtype and be contiguous; with
// `same_dtype` also like's dtype.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& like,
                const char* like_name, bool same_dtype = true) {
  TORCH_CHECK(t.device() == like.device(), "craft norm: ", name, " is on ", t.device(), " but ",
              like_name, " is on ", like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), "craft norm: ", name, " has shape ", t.sizes(), " but ",
              like_name, " has shape ", like.sizes());
  TORCH_CHECK(!same_dtype || t.scalar_type() == like.scalar_type(), "craft norm: ", name, " is ",
              t.scalar_type(), " but ", like_name, " is ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "craft norm: ", name, " must be contiguous");
  norm_dtype(t, name);
}

at::ScalarType scalar_type_of(NormDType d) {
  if (d == NormDType::kFloat32) return at::kFloat;
  return d == NormDType::kFloat16 ? at::kHalf : at::kBFloat16;
}

void check_dtypes(NormDType a, NormDType b, NormDType c, const char* what) {
  TORCH_CHECK(craft::norm_dtypes_supported(a, b, c), "craft norm: unsupported ", what, " dtypes (",
              scalar_type_of(a), ", ", scalar_type_of(b), ", ", scalar_type_of(c),
              "); see kernels/norm.h");
}

// A (cols,) parameter as a contiguous, 16-byte aligned fp32 tensor (undefined if absent).
at::Tensor affine_param(const std::optional<at::Tensor>& p, const char* name,
                        const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  const at::Tensor& t = *p;
  TORCH_CHECK(t.device() == x.device(), "craft norm: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "craft norm: ", name, " must have shape (",
              x.size(1), ",), got ", t.sizes());
  norm_dtype(t, name);
  at::Tensor f = t.to(at::kFloat).contiguous();
  if (reinterpret_cast<uintptr_t>(f.data_ptr()) % 16 != 0) f = f.clone();
  return f;
}

// A (rows,) fp32 statistic saved by the forward.
void check_stat(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "craft norm: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "craft norm: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), "craft norm: ", name,
              " must have shape (", x.size(0), ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "craft norm: ", name, " must be contiguous");
}

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "craft norm: ", what, " failed: ", cudaGetErrorString(e));
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace

// Returns [y, sum (None without residual), mean (None for rmsnorm), rstd]. The sum has the
// residual's dtype; y has `y_dtype` (default: the sum's dtype, x's without a residual).
std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, bool rms, double eps,
                                 std::optional<at::ScalarType> y_dtype) {
  check_input(x, "x");
  TORCH_CHECK(eps >= 0.0 && eps < std::numeric_limits<double>::infinity(),
              "craft norm: eps must be finite and >= 0, got ", eps);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like(*residual, "residual", x, "x", /*same_dtype=*/false);
  const at::ScalarType sum_type = has_res ? residual->scalar_type() : x.scalar_type();
  const at::ScalarType y_type = y_dtype.value_or(sum_type);
  const NormDType x_dt = norm_dtype(x, "x");
  const NormDType sum_dt = has_res ? norm_dtype(*residual, "residual") : x_dt;
  const NormDType y_dt = norm_dtype(y_type, "y_dtype");
  check_dtypes(x_dt, sum_dt, y_dt, "(x, sum, y)");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = affine_param(weight, "weight", x);
  const at::Tensor b = affine_param(bias, "bias", x);
  const auto stat_opts = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x, x.options().dtype(y_type));
  at::Tensor sum = has_res ? at::empty_like(x, x.options().dtype(sum_type)) : at::Tensor();
  at::Tensor mean = rms ? at::Tensor() : at::empty({x.size(0)}, stat_opts);
  at::Tensor rstd = at::empty({x.size(0)}, stat_opts);

  craft::NormFwdArgs a;
  a.x = x.data_ptr();
  a.residual = has_res ? residual->data_ptr() : nullptr;
  a.weight = w.defined() ? w.data_ptr<float>() : nullptr;
  a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  a.y = y.data_ptr();
  a.sum = sum.defined() ? sum.data_ptr() : nullptr;
  a.mean = mean.defined() ? mean.data_ptr<float>() : nullptr;
  a.rstd = rstd.data_ptr<float>();
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.eps = static_cast<float>(eps);
  a.rms = rms;
  a.dtype = x_dt;
  a.sum_dtype = sum_dt;
  a.y_dtype = y_dt;
  check_cuda(craft::norm_fwd(a, c10::cuda::getCurrentCUDAStream().stream()), "forward launch");
  return {y, sum, mean, rstd};
}

// Returns [dx, dweight (None unless need_dweight), dbias (None unless need_dbias), dx_branch (None
// unless branch_dtype differs from x's)]; dx has x's dtype (x: the normalised input), dx_branch the
// same values in branch_dtype. dweight and dbias are float32 (the caller casts them to the
// parameters' dtypes).
std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dsum,
                                 const at::Tensor& x, const std::optional<at::Tensor>& mean,
                                 const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                 bool need_dweight, bool need_dbias, bool rms,
                                 std::optional<at::ScalarType> branch_dtype) {
  check_input(x, "x");
  check_like(dy, "dy", x, "x", /*same_dtype=*/false);
  const NormDType x_dt = norm_dtype(x, "x");
  const NormDType dy_dt = norm_dtype(dy, "dy");
  const bool has_branch = branch_dtype.has_value() && *branch_dtype != x.scalar_type();
  const NormDType br_dt = has_branch ? norm_dtype(*branch_dtype, "branch_dtype") : x_dt;
  check_dtypes(dy_dt, x_dt, br_dt, "(dy, x, dx_branch)");
  const bool has_dsum = dsum.has_value() && dsum->defined();
  if (has_dsum) check_like(*dsum, "dsum", x, "x");
  const bool has_mean = mean.has_value() && mean->defined();
  TORCH_CHECK(rms || has_mean, "craft norm: layernorm backward needs the mean from the forward");
  if (has_mean) check_stat(*mean, "mean", x);
  check_stat(rstd, "rstd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = affine_param(weight, "weight", x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dxb = has_branch ? at::empty_like(x, x.options().dtype(*branch_dtype)) : at::Tensor();
  at::Tensor dw = need_dweight ? at::empty({x.size(1)}, f32) : at::Tensor();
  at::Tensor db = need_dbias ? at::empty({x.size(1)}, f32) : at::Tensor();
  if (x.size(0) == 0) {
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
  } else {
    craft::NormBwdArgs a;
    a.dy = dy.data_ptr();
    a.dsum = has_dsum ? dsum->data_ptr() : nullptr;
    a.x = x.data_ptr();
    a.mean = has_mean && !rms ? mean->data_ptr<float>() : nullptr;
    a.rstd = rstd.data_ptr<float>();
    a.weight = w.defined() ? w.data_ptr<float>() : nullptr;
    a.dx = dx.data_ptr();
    a.dx_branch = dxb.defined() ? dxb.data_ptr() : nullptr;
    a.dweight = dw.defined() ? dw.data_ptr<float>() : nullptr;
    a.dbias = db.defined() ? db.data_ptr<float>() : nullptr;
    a.rows = x.size(0);
    a.cols = x.size(1);
    a.rms = rms;
    a.dtype = x_dt;
    a.dy_dtype = dy_dt;
    a.branch_dtype = br_dt;
    craft::NormBwdPlan plan;
    check_cuda(craft::norm_bwd_plan(a, &plan), "backward planning");
    at::Tensor ws;
    if (plan.workspace_floats > 0) {
      ws = at::empty({static_cast<int64_t>(plan.workspace_floats)}, f32);
    }
    check_cuda(craft::norm_bwd(a, plan, ws.defined() ? ws.data_ptr<float>() : nullptr,
                               c10::cuda::getCurrentCUDAStream().stream()),
               "backward launch");
  }
  return {dx, dw, db, dxb};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Craft's compiled CUDA kernels: fused (residual add +) LayerNorm / RMSNorm.";
  m.def("norm_fwd", &norm_fwd, "Fused norm forward: [y, sum, mean, rstd]", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("rms"), py::arg("eps"),
        py::arg("y_dtype") = py::none());
  m.def("norm_bwd", &norm_bwd, "Fused norm backward: [dx, dweight, dbias, dx_branch]",
        py::arg("dy"), py::arg("dsum"), py::arg("x"), py::arg("mean"), py::arg("rstd"),
        py::arg("weight"), py::arg("need_dweight"), py::arg("need_dbias"), py::arg("rms"),
        py::arg("branch_dtype") = py::none());
}
