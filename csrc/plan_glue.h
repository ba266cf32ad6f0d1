// What the planned steps (step_plan.cpp: SAM, CR-SAM; universal_plan.cpp: Frob-SAM) share: the
// extension's own ops, typed, called through the dispatcher (so the CPU or CUDA implementation
// that runs is the one the unplanned path runs), the scalar glue ops the Python code calls
// (finite_and, ascent_scale, count_step_: one launch each on CUDA), and the rest of the glue and
// list handling written as the Python code writes it (the same ATen ops in the same order: the
// same bits).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

#include "step_plan.h"

namespace sam_kernels {
namespace plan_glue {

using TL = at::TensorList;
using OptT = std::optional<at::Tensor>;

// ---------------------------------------------------------------- the extension's ops, typed
inline const auto& op_grad_norm() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::grad_norm", "")
                      .typed<at::Tensor(TL, TL, double)>();
  return h;
}

inline const auto& op_perturb() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::perturb_", "")
                      .typed<void(TL, TL, TL, const at::Tensor&, bool, double, bool)>();
  return h;
}

inline const auto& op_noise_perturb() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::noise_perturb_", "")
                      .typed<void(TL, TL, const at::Tensor&, int64_t, double, bool,
                                  const at::Tensor&, const at::Tensor&)>();
  return h;
}

inline const auto& op_frob_accumulate() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::frob_accumulate_", "")
                      .typed<void(TL, TL, TL, const at::Tensor&, bool)>();
  return h;
}

inline const auto& op_lincomb() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::lincomb_", "")
                      .typed<void(TL, TL, const at::Tensor&)>();
  return h;
}

inline const auto& op_ascent_scale() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::ascent_scale", "")
                      .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const OptT&, double, bool)>();
  return h;
}

inline const auto& op_finite_and() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::finite_and", "")
                      .typed<at::Tensor(const OptT&, TL)>();
  return h;
}

inline const auto& op_count_step() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::count_step_", "")
                      .typed<void(const at::Tensor&, const at::Tensor&)>();
  return h;
}

inline const auto& op_sgd_step() {
  static auto h =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sam_kernels_C::sgd_step_", "")
          .typed<void(TL, TL, const OptT&, TL, TL, TL, const OptT&, double, double, double, bool,
                      double, bool, const OptT&)>();
  return h;
}

inline const auto& op_adamw_step() {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("sam_kernels_C::adamw_step_", "")
                      .typed<void(TL, TL, const OptT&, TL, TL, TL, TL, TL, const OptT&, double,
                                  double, double, double, double, bool, bool, const OptT&)>();
  return h;
}

// ---------------------------------------------------------------- the scalar glue
// SAMFamily._and_finite: ok (absent: 1) times 1.0 where every given one-element value (norms,
// losses) is finite, else 0.0, the products in the values' order; values on another device are
// moved to `device` first. One op (sam_kernels_C::finite_and).
inline at::Tensor and_finite(const OptT& ok, std::vector<at::Tensor> values,
                             const at::Device& device) {
  for (auto& v : values) {
    if (v.device() != device) v = v.to(device);
  }
  return op_finite_and().call(ok, values);
}

// the optional losses among the values of and_finite (absent ones are not checked)
inline void add_loss(std::vector<at::Tensor>& values, const OptT& loss) {
  if (loss.has_value()) values.push_back(*loss);
}

// ---------------------------------------------------------------- gradients
// A parameter's gradient, read from its TensorImpl: at::Tensor::grad() asks autograd first
// whether the tensor is a leaf (for a warning about non-leaf tensors, which parameters are
// not), a call that doubled the cost of the plan's per-parameter loops.
inline const at::Tensor& grad_ref(const at::Tensor& p) {
  return p.unsafeGetTensorImpl()->grad();
}

inline std::vector<at::Tensor> grads_of(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back(grad_ref(p));
  return out;
}

// true when a gradient of `params` is a view (DDP's gradient_as_bucket_view): a step that keeps
// gradients across evaluations declines the plan then (_take_grads would copy it)
inline bool any_grad_view(const std::vector<at::Tensor>& params) {
  for (const auto& p : params) {
    if (grad_ref(p).is_view()) return true;
  }
  return false;
}

// _collect_grads after an evaluation: a gradient outside the step's set (the parameters with one
// at w) dropped, one of the set that is missing made zeros (in p.grad); then the set's gradients,
// dense (_dense_grads' refusal of a sparse one, a ValueError as there)
std::vector<at::Tensor> collect_grads(SamStepPlan& plan, const char* who);

// _take_grads: a gradient that is a view (the next backward writes its storage) copied
std::vector<at::Tensor> take(std::vector<at::Tensor> grads);

inline std::vector<at::Tensor> pick(const std::vector<at::Tensor>& kept,
                                    const std::vector<int64_t>& index) {
  std::vector<at::Tensor> out;
  out.reserve(index.size());
  for (const int64_t i : index) out.push_back(kept[i]);
  return out;
}

// The opening of a step that keeps g0 across its evaluations (CR-SAM, the universal class): what
// the plan kept from an earlier step dropped, g0 read, its norm, ok = finite(norm) [* finite(L0)].
// The caller has checked the plan and is below autograd.
struct Opening {
  std::vector<at::Tensor> g0;
  at::Tensor norm, ok;
};
Opening open_step(SamStepPlan& plan, const OptT& loss, const at::Device& device);

// ---------------------------------------------------------------- the base step
// One base group's fused step from its backups (its launch in BaseStep._base_step): `grads` the
// gradient (K term lists concatenated with `coefs`), `h` the group's six hyper-parameters.
void group_step(const BaseGroupPlan& g, const std::vector<at::Tensor>& grads, const OptT& coefs,
                const double* h, const OptT& ok);

// The end of a step: BaseStep._count (counters += [ok, 1 - ok], sam_kernels_C::count_step_),
// then the stale-gradient marks of this step (what SAMFamily._mark_grads records at its end: the caller
// changes no gradient in between, or drops them all)
void count_and_mark(const at::Tensor& counters, SamStepPlan& plan, const at::Tensor& ok);

void check_hyper(const SamStepPlan& plan, const std::vector<double>& hyper, const char* op);

}  // namespace plan_glue
}  // namespace sam_kernels
