// The scalar glue of a SAM-family step as three CPU ops (sam_kernels/ops/finite_and.py,
// ascent_scale.py, count_step.py): a few float32/float64 scalars each, computed here directly
// instead of as a chain of ATen ops (each a dispatch, a TensorIterator and a 0-d allocation).
//
// Bit-identical to the eager references: each value is formed by the same IEEE operations in the
// same order as the ATen chain (setup.py passes -ffp-contract=off, so no a*b+c becomes an FMA):
// the finite test is isfinite (what (x - x) == 0 tests), 1/(n + 1e-12) is one add and one
// division in the norm's dtype, a product with a Python float multiplies by that float cast to
// the tensor's dtype (ATen's scalar cast), a 0-d value of another dtype is cast (static_cast)
// before a product with a 1-d tensor (the 1-d tensor's dtype wins the promotion).
//
// CPU tensors here; their CUDA kernels (one launch each) are in glue_kernels.cu, with the same
// rules. The Python binding (sam_kernels/cuda_ext.py) declines tensors on several devices.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace sam_kernels {
namespace {

// isfinite of a one-element CPU tensor of any real dtype (integers and bool: always finite)
bool one_value_is_finite(const at::Tensor& v) {
  TORCH_CHECK(v.device().is_cpu() && v.numel() == 1,
              "sam_kernels.finite_and: values must be one-element CPU tensors");
  switch (v.scalar_type()) {
    case at::kFloat:
      return std::isfinite(*v.const_data_ptr<float>());
    case at::kDouble:
      return std::isfinite(*v.const_data_ptr<double>());
    case at::kHalf:
      return std::isfinite(static_cast<float>(*v.const_data_ptr<c10::Half>()));
    case at::kBFloat16:
      return std::isfinite(static_cast<float>(*v.const_data_ptr<c10::BFloat16>()));
    default:
      TORCH_CHECK(at::isIntegralType(v.scalar_type(), /*includeBool=*/true),
                  "sam_kernels.finite_and: unsupported dtype ", v.scalar_type());
      return true;
  }
}

// ok_out = ok * prod_i [values_i finite]  (float32 0-d; ok absent: 1)
at::Tensor finite_and_cpu(const std::optional<at::Tensor>& ok, at::TensorList values) {
  float acc = 1.0f;
  if (ok.has_value()) {
    TORCH_CHECK(ok->device().is_cpu() && ok->dim() == 0 && ok->scalar_type() == at::kFloat,
                "sam_kernels.finite_and: ok must be a 0-d float32 CPU tensor");
    acc = *ok->const_data_ptr<float>();
  }
  for (const at::Tensor& v : values) {
    // acc * 0 or acc * 1: the eager chain's products (a NaN ok stays NaN, as there)
    const float flag = one_value_is_finite(v) ? 1.0f : 0.0f;
    acc = acc * flag;
  }
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *out.mutable_data_ptr<float>() = acc;
  return out;
}

// 1 / (n + 1e-12), or 0 where that is not finite (nan_to_num(nan=0, posinf=0, neginf=0))
template <typename N>
N safe_inverse(N n) {
  const N d = n + static_cast<N>(1e-12);
  const N r = static_cast<N>(1) / d;
  return std::isfinite(r) ? r : static_cast<N>(0);
}

template <typename N, typename R>
void fill_scale(const at::Tensor& norm, const at::Tensor& rho,
                const std::optional<at::Tensor>& factor_tensor, double factor, R* scale,
                R* negated) {
  N inv = safe_inverse<N>(*norm.const_data_ptr<N>());
  if (factor_tensor.has_value()) {
    inv = inv * *factor_tensor->const_data_ptr<N>();
  } else if (factor != 1.0) {
    inv = inv * static_cast<N>(factor);
  }
  const R inv_r = static_cast<R>(inv);
  const R* r = rho.const_data_ptr<R>();
  const int64_t n = rho.numel();
  for (int64_t i = 0; i < n; ++i) {
    scale[i] = r[i] * inv_r;
    if (negated != nullptr) negated[i] = -scale[i];
  }
}

template <typename R>
void fill_scale_rho(const at::Tensor& norm, const at::Tensor& rho,
                    const std::optional<at::Tensor>& factor_tensor, double factor, R* scale,
                    R* negated) {
  if (norm.scalar_type() == at::kDouble) {
    fill_scale<double, R>(norm, rho, factor_tensor, factor, scale, negated);
  } else {
    fill_scale<float, R>(norm, rho, factor_tensor, factor, scale, negated);
  }
}

bool is_f32_or_f64(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// [rho * inv] (+ [-(rho * inv)] when negated), inv = nan_to_num(1/(norm + 1e-12)) [* factor]
std::vector<at::Tensor> ascent_scale_cpu(const at::Tensor& norm, const at::Tensor& rho,
                                         const std::optional<at::Tensor>& factor_tensor,
                                         double factor, bool negated) {
  TORCH_CHECK(norm.device().is_cpu() && norm.dim() == 0 && is_f32_or_f64(norm),
              "sam_kernels.ascent_scale: norm must be a 0-d float32/float64 CPU tensor");
  TORCH_CHECK(rho.device().is_cpu() && rho.dim() == 1 && rho.is_contiguous() && is_f32_or_f64(rho),
              "sam_kernels.ascent_scale: rho must be a contiguous 1-d float32/float64 CPU tensor");
  if (factor_tensor.has_value()) {
    TORCH_CHECK(factor_tensor->device().is_cpu() && factor_tensor->dim() == 0 &&
                    factor_tensor->scalar_type() == norm.scalar_type(),
                "sam_kernels.ascent_scale: factor must be a 0-d CPU tensor of norm's dtype");
  }
  std::vector<at::Tensor> out{at::empty_like(rho)};
  if (negated) out.push_back(at::empty_like(rho));
  if (rho.scalar_type() == at::kDouble) {
    fill_scale_rho<double>(norm, rho, factor_tensor, factor, out[0].mutable_data_ptr<double>(),
                           negated ? out[1].mutable_data_ptr<double>() : nullptr);
  } else {
    fill_scale_rho<float>(norm, rho, factor_tensor, factor, out[0].mutable_data_ptr<float>(),
                          negated ? out[1].mutable_data_ptr<float>() : nullptr);
  }
  return out;
}

// counters = [applied, skipped] += [ok, 1 - ok]
void count_step_cpu(const at::Tensor& counters, const at::Tensor& ok) {
  TORCH_CHECK(counters.device().is_cpu() && counters.scalar_type() == at::kFloat &&
                  counters.dim() == 1 && counters.numel() == 2 && counters.is_contiguous(),
              "sam_kernels.count_step_: counters must be a contiguous float32 [2] CPU tensor");
  TORCH_CHECK(ok.device().is_cpu() && ok.dim() == 0 && ok.scalar_type() == at::kFloat,
              "sam_kernels.count_step_: ok must be a 0-d float32 CPU tensor");
  const float o = *ok.const_data_ptr<float>();
  float* c = counters.mutable_data_ptr<float>();
  const float skipped = 1.0f - o;
  c[0] = c[0] + o;
  c[1] = c[1] + skipped;
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels_C, CPU, m) {
  m.impl("finite_and", &finite_and_cpu);
  m.impl("ascent_scale", &ascent_scale_cpu);
  m.impl("count_step_", &count_step_cpu);
}

}  // namespace sam_kernels
