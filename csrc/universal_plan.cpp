// Frob-SAM's planned step (python_api/_universal_plan.py) on SAM's cached plan (step_plan.h):
// UniversalStep.step's ops with the Frob estimator (python_api/_universal_step.py,
// _universal_estimators.py), in their order, so the same bits. The caller runs the closure of
// each noisy sample between the calls:
//
//   frob_ascent   n0 = ||g0||, ok = finite(n0) [* finite(L0)], offset0 = offset, g0 kept;
//                 b = w, w = b + rho * eps_1 (counter noise at offset), offset += drawn
//   frob_sample   (after sample i) g_i collected, its norm and loss kept for the flag;
//                 i = 1: cross, gsum allocated, Lref = L_1, Lsum = 0;
//                 cross (=|+=) (L_i - Lref) g_i, gsum (=|+=) g_i, Lsum += L_i - Lref;
//                 (more) w = b + rho * eps_{i+1}, offset += drawn, p.grad = None
//   frob_descent  ok *= finite(||g_i||, L_i for every i); per base group the coefficients
//                 c = a + b * Lsum on (g0, cross, gsum), ok *= finite(c); the fused step from
//                 the backups; the counters; offset = ok ? offset : offset0; the marks
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <utility>

#include "plan_glue.h"
#include "step_plan.h"

namespace sam_kernels {
using namespace plan_glue;

void SamStepPlan::set_noise(at::Tensor scale, int64_t kind, double half_cube_len_) {
  TORCH_CHECK(kind == 0 || kind == 1, "SamStepPlan.set_noise: kind must be 0 or 1, got ", kind);
  noise_scale = std::move(scale);
  noise_kind = kind;
  half_cube_len = half_cube_len_;
  drawn = 0;
  for (const auto& p : pert_params) drawn += p.numel();
  pert_place.assign(norm_params.size(), -1);
  for (size_t j = 0; j < pert_index.size(); ++j) {
    pert_place[pert_index[j]] = static_cast<int64_t>(j);
  }
}

std::vector<at::Tensor> SamStepPlan::frob_kept() const {
  std::vector<at::Tensor> out;
  if (!offset0.defined()) return out;
  out.push_back(offset0);
  if (!lsum.defined()) return out;
  out.push_back(lsum);
  for (const auto* part : {&pending, &kept_g0, &cross, &gsum}) {
    out.insert(out.end(), part->begin(), part->end());
  }
  return out;
}

namespace {

void draw_sample(SamStepPlan& plan, const at::Tensor& seed, const at::Tensor& offset, bool first) {
  op_noise_perturb().call(plan.pert_params, plan.pert_backups, plan.noise_scale, plan.noise_kind,
                          plan.half_cube_len, /*save_backup=*/first, seed, offset);
  const_cast<at::Tensor&>(offset).add_(plan.drawn);
}

std::vector<at::Tensor> step_local_like(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back(at::empty_like(p, at::MemoryFormat::Preserve));
  return out;
}

}  // namespace

// [ok], or [] when the plan does not match the parameters, a gradient is a view, or not every
// parameter with a gradient is perturbed (nothing written; the caller runs the unplanned step)
std::vector<at::Tensor> frob_ascent(const at::Tensor& counters,
                                    const c10::intrusive_ptr<SamStepPlan>& plan,
                                    const std::optional<at::Tensor>& loss, const at::Tensor& seed,
                                    const at::Tensor& offset) {
  TORCH_CHECK(plan->noise_scale.defined(), "frob_ascent: the plan has no noise (set_noise)");
  if (plan->pert_params.empty() || plan->pert_params.size() != plan->norm_params.size() ||
      !plan->matches() || any_grad_view(plan->norm_params)) {
    return {};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in plan_ascent
  const std::vector<at::Tensor> none;
  plan->release();
  std::vector<at::Tensor> g0 = grads_of(plan->norm_params);
  const at::Tensor n0 = op_grad_norm().call(g0, none, 0.0);
  at::Tensor ok = finite01(n0);
  if (loss.has_value()) ok = at::mul(ok, loss_ok(*loss, counters.device()));
  plan->offset0 = offset.clone();
  draw_sample(*plan, seed, offset, /*first=*/true);
  plan->kept_g0 = std::move(g0);
  plan->drop_grads();
  return {ok};
}

void frob_sample(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                 const at::Tensor& loss, const at::Tensor& seed, const at::Tensor& offset,
                 bool more) {
  TORCH_CHECK(plan->kept_g0.size() == plan->norm_params.size() && plan->offset0.defined(),
              "frob_sample: no frob_ascent before it");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::vector<at::Tensor> none;
  const std::vector<at::Tensor> grads = collect_grads(*plan, "FrobSAM");
  const at::Tensor norm = op_grad_norm().call(grads, none, 0.0);
  const at::Tensor li = loss.reshape({}).to(counters.device());
  const bool first = plan->pending.empty();
  plan->pending.push_back(norm);
  plan->pending.push_back(li);
  if (first) {
    // allocated after the first noisy backward (not during it), dropped by release()
    plan->cross = step_local_like(plan->pert_params);
    plan->gsum = step_local_like(plan->pert_params);
    plan->lref = li;
    plan->lsum = at::zeros_like(li);
  }
  const at::Tensor shifted = at::sub(li, plan->lref);
  op_frob_accumulate().call(plan->cross, plan->gsum, pick(grads, plan->pert_index),
                            shifted.to(counters.device(), at::kFloat).contiguous(), first);
  plan->lsum = at::add(plan->lsum, shifted);
  if (more) {
    draw_sample(*plan, seed, offset, /*first=*/false);
    plan->drop_grads();
  }
}

void frob_descent(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                  const at::Tensor& ok_in, const at::Tensor& offset,
                  std::vector<at::Tensor> consts, std::vector<double> hyper) {
  check_hyper(*plan, hyper, "frob_descent");
  TORCH_CHECK(consts.size() == 2 * plan->groups.size(), "frob_descent: ", consts.size(),
              " constants for ", plan->groups.size(), " groups (2 each)");
  TORCH_CHECK(plan->lsum.defined(), "frob_descent: no frob_sample before it");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor ok = ok_in;
  for (const auto& v : plan->pending) ok = at::mul(ok, loss_ok(v, counters.device()));
  // FrobEstimator._final per group: (a + b * Lsum).to(float32); then the step's check of every
  // combination's coefficients (one cat, as UniversalStep.step)
  const at::Tensor lsum =
      plan->lsum.to(at::promote_types(plan->lsum.scalar_type(), at::kFloat));
  std::vector<at::Tensor> coefs, flat;
  for (size_t k = 0; k < plan->groups.size(); ++k) {
    coefs.push_back(at::add(consts[2 * k], at::mul(consts[2 * k + 1], lsum)).to(at::kFloat));
    flat.push_back(coefs.back().reshape({-1}));
  }
  ok = at::mul(ok, at::isfinite(at::cat(flat)).all().to(at::kFloat));
  const OptT ok_arg = ok.to(at::kFloat).reshape({});
  for (size_t k = 0; k < plan->groups.size(); ++k) {
    const BaseGroupPlan& g = plan->groups[k];
    // the LinComb's terms concatenated: g0, cross, gsum of the group's parameters
    std::vector<int64_t> place;
    place.reserve(g.norm_index.size());
    for (const int64_t i : g.norm_index) place.push_back(plan->pert_place[i]);
    std::vector<at::Tensor> terms = pick(plan->kept_g0, g.norm_index);
    const auto c = pick(plan->cross, place);
    const auto s = pick(plan->gsum, place);
    terms.insert(terms.end(), c.begin(), c.end());
    terms.insert(terms.end(), s.begin(), s.end());
    group_step(g, terms, OptT(coefs[k]), hyper.data() + 6 * k, ok_arg);
  }
  count_and_mark(counters, *plan, ok);
  // a skipped step draws nothing: the next step uses the same counters
  const_cast<at::Tensor&>(offset).copy_(at::where(at::gt(ok, 0), offset, plan->offset0));
  plan->release();
}

TORCH_LIBRARY_IMPL(sam_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("frob_ascent", &frob_ascent);
  m.impl("frob_sample", &frob_sample);
  m.impl("frob_descent", &frob_descent);
}

// as the other planned ops (step_plan.cpp): no autograd formula, nothing to record
TORCH_LIBRARY_IMPL(sam_kernels_C, Autograd, m) {
  m.impl("frob_ascent", torch::CppFunction::makeFallthrough());
  m.impl("frob_sample", torch::CppFunction::makeFallthrough());
  m.impl("frob_descent", torch::CppFunction::makeFallthrough());
}

}  // namespace sam_kernels
