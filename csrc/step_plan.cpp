// The cached SAM step plan (see step_plan.h): build-time setters, the per-call check, and the
// two halves of the step. The extension's own ops run through the dispatcher (CPU or CUDA), so
// what runs is what the unplanned path runs; the scalar glue is the glue ops python_api/sam.py
// calls (finite_and, ascent_scale, count_step_), in the same order, for bit-identical results.
#include "step_plan.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <utility>

#include "plan_glue.h"

namespace sam_kernels {
using namespace plan_glue;

// ---------------------------------------------------------------- building
void SamStepPlan::set_watch(std::vector<at::Tensor> params, std::vector<int64_t> grads_present) {
  TORCH_CHECK(params.size() == grads_present.size(), "SamStepPlan.set_watch: ", params.size(),
              " parameters but ", grads_present.size(), " flags");
  watch = std::move(params);
  with_grad.assign(grads_present.begin(), grads_present.end());
  dtypes.clear();
  devices.clear();
  sizes.clear();
  index.clear();
  marked.clear();
  marked_versions.clear();
  for (const auto& p : watch) {
    index.emplace(p.unsafeGetTensorImpl(), index.size());
    dtypes.push_back(p.scalar_type());
    devices.push_back(p.device());
    sizes.emplace_back(p.sizes().begin(), p.sizes().end());
  }
}

namespace {
// each of `params`' place in `norm_params` (every parameter of a base group has a gradient, so
// it is one of the norm's)
std::vector<int64_t> norm_places(const std::vector<at::Tensor>& norm_params,
                                 const std::vector<at::Tensor>& params) {
  std::unordered_map<const c10::TensorImpl*, int64_t> pos;
  for (size_t i = 0; i < norm_params.size(); ++i) {
    pos.emplace(norm_params[i].unsafeGetTensorImpl(), static_cast<int64_t>(i));
  }
  std::vector<int64_t> out;
  out.reserve(params.size());
  for (const auto& p : params) {
    const auto it = pos.find(p.unsafeGetTensorImpl());
    TORCH_CHECK(it != pos.end(), "SamStepPlan: a base group's parameter is not one of the norm's");
    out.push_back(it->second);
  }
  return out;
}
}  // namespace

void SamStepPlan::set_ascent(std::vector<at::Tensor> norm_params_, bool adaptive_, double eta_,
                             std::vector<at::Tensor> pert_params_,
                             std::vector<at::Tensor> pert_backups_, at::Tensor rho_,
                             at::Tensor counters_) {
  TORCH_CHECK(pert_params_.size() == pert_backups_.size(),
              "SamStepPlan.set_ascent: one backup per perturbed parameter");
  norm_params = std::move(norm_params_);
  adaptive = adaptive_;
  eta = eta_;
  pert_params = std::move(pert_params_);
  pert_backups = std::move(pert_backups_);
  rho = std::move(rho_);
  counters = std::move(counters_);
  pert_index = norm_places(norm_params, pert_params);
}

void SamStepPlan::add_sgd_group(std::vector<at::Tensor> params, std::vector<at::Tensor> bufs,
                                std::vector<at::Tensor> steps, std::vector<at::Tensor> backups,
                                bool has_momentum) {
  BaseGroupPlan g;
  g.adamw = false;
  g.has_momentum = has_momentum;
  g.params = std::move(params);
  g.bufs = std::move(bufs);
  g.steps = std::move(steps);
  g.backups = std::move(backups);
  g.norm_index = norm_places(norm_params, g.params);
  groups.push_back(std::move(g));
}

void SamStepPlan::add_adamw_group(std::vector<at::Tensor> params,
                                  std::vector<at::Tensor> exp_avgs,
                                  std::vector<at::Tensor> exp_avg_sqs,
                                  std::vector<at::Tensor> max_exp_avg_sqs,
                                  std::vector<at::Tensor> steps,
                                  std::vector<at::Tensor> backups, bool amsgrad) {
  BaseGroupPlan g;
  g.adamw = true;
  g.amsgrad = amsgrad;
  g.params = std::move(params);
  g.exp_avgs = std::move(exp_avgs);
  g.exp_avg_sqs = std::move(exp_avg_sqs);
  g.max_exp_avg_sqs = std::move(max_exp_avg_sqs);
  g.steps = std::move(steps);
  g.backups = std::move(backups);
  g.norm_index = norm_places(norm_params, g.params);
  groups.push_back(std::move(g));
}

std::vector<at::Tensor> SamStepPlan::kept() const {
  std::vector<at::Tensor> out(kept_g0);
  out.insert(out.end(), kept_gplus.begin(), kept_gplus.end());
  return out;
}

void SamStepPlan::release() {
  kept_g0.clear();
  kept_gplus.clear();
  neg_scale = at::Tensor();
  samples = 0;
  pending.clear();
  cross.clear();
  gsum.clear();
  acc.clear();
  offset0 = l0 = lref = lsum = coef_ok = x = at::Tensor();
}

// ---------------------------------------------------------------- the per-call checks
bool SamStepPlan::same_params() const {
  for (size_t i = 0; i < watch.size(); ++i) {
    const at::Tensor& p = watch[i];
    if (p.scalar_type() != dtypes[i] || p.device() != devices[i] ||
        !p.sizes().equals(sizes[i])) {
      return false;
    }
  }
  return true;
}

void SamStepPlan::drop_grads() {
  for (auto& p : watch) {
    if (grad_ref(p).defined()) p.mutable_grad().reset();
  }
}

bool SamStepPlan::matches() const {
  for (size_t i = 0; i < watch.size(); ++i) {
    const at::Tensor& p = watch[i];
    if (p.scalar_type() != dtypes[i] || p.device() != devices[i] ||
        !p.sizes().equals(sizes[i])) {
      return false;
    }
    const at::Tensor& g = grad_ref(p);
    if (g.defined() != with_grad[i]) return false;
    if (g.defined() && (g.layout() != at::kStrided || g.scalar_type() != dtypes[i] ||
                        g.device() != devices[i] || g.sizes() != p.sizes())) {
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------- stale-gradient marks
void SamStepPlan::mark() {
  marked.clear();
  marked_versions.assign(watch.size(), 0);
  marked.reserve(watch.size());
  for (size_t i = 0; i < watch.size(); ++i) {
    const at::Tensor& g = grad_ref(watch[i]);
    if (g.defined()) {
      marked.emplace_back(g.getIntrusivePtr());
      marked_versions[i] = g._version();
    } else {
      marked.emplace_back(c10::intrusive_ptr<c10::TensorImpl>());
    }
  }
}

// By place: marked[i] is watch[i]'s (mark() records them in that order), so no lookup. The
// identity is a pointer comparison, without locking the weak reference: while it is held, the
// marked TensorImpl's memory is not freed (a weak count keeps it), so no other tensor can be at
// that address, and `g` (alive, p's gradient) is at it only if it is that very tensor.
bool SamStepPlan::drop_stale_watched() {
  bool fresh = false;
  const size_t n_marked = marked.size();
  for (size_t i = 0; i < watch.size(); ++i) {
    at::Tensor& p = watch[i];
    const at::Tensor& g = grad_ref(p);
    if (!g.defined()) continue;
    if (i < n_marked && marked[i]._unsafe_get_target() == g.unsafeGetTensorImpl() &&
        g._version() - marked_versions[i] <= 1) {
      p.mutable_grad().reset();
    } else {
      fresh = true;
    }
  }
  return fresh;
}

bool SamStepPlan::drop_stale(std::vector<at::Tensor> params) {
  bool fresh = false;
  for (auto& p : params) {
    const at::Tensor& g = grad_ref(p);
    if (!g.defined()) continue;
    const auto it = index.find(p.unsafeGetTensorImpl());
    bool stale = false;
    if (it != index.end() && it->second < marked.size()) {
      const auto held = marked[it->second].lock();
      stale = held && held.get() == g.unsafeGetTensorImpl() &&
              g._version() - marked_versions[it->second] <= 1;
    }
    if (stale) {
      p.mutable_grad().reset();
    } else {
      fresh = true;
    }
  }
  return fresh;
}

// ---------------------------------------------------------------- the two halves
// SAM._ascend (+ the loss check of SAM.step): n = ||T(p) g0||, ok = finite(n) [* finite(L0)],
// backups = w, p += rho / (n + 1e-12) * T(p)^2 * g0. Returns [ok], or [] when the plan does not
// match the parameters (nothing written).
std::vector<at::Tensor> plan_ascent(const at::Tensor& counters,
                                    const c10::intrusive_ptr<SamStepPlan>& plan,
                                    const std::optional<at::Tensor>& loss, bool drop_grads) {
  if (!plan->matches()) return {};
  // below autograd: the extension's ops then run their kernels unboxed (their autograd key is
  // torch's boxed not-implemented fallback, which copies every tensor list into IValues)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto grads = grads_of(plan->norm_params);
  const std::vector<at::Tensor> none;
  at::Tensor norm =
      op_grad_norm().call(grads, plan->adaptive ? TL(plan->norm_params) : TL(none), plan->eta);
  // SAM._ascend's _ok_from(norm) and step's _and_finite(ok, L0) in one op: the same products
  std::vector<at::Tensor> values{norm};
  add_loss(values, loss);
  const at::Tensor ok = and_finite(std::nullopt, std::move(values), counters.device());
  if (!plan->pert_params.empty()) {
    const at::Tensor scale = op_ascent_scale().call(norm, plan->rho, std::nullopt, 1.0, false)[0];
    op_perturb().call(plan->pert_params, grads_of(plan->pert_params), plan->pert_backups, scale,
                      plan->adaptive, plan->eta, /*save_backup=*/true);
  }
  // step(closure): zero_grad(set_to_none=True) before the evaluation at w + e
  if (drop_grads) plan->drop_grads();
  return {ok};
}

// SAM._descend over the fused base step, in two parts so that a distributed step can put the
// unplanned path's MIN all-reduce of the flag (SAMFamily._gate_ok) between them; plan_descent
// runs both at once. The caller has checked the plan (matches) and is below autograd.
namespace {

// The part before the gate: ok *= finite(||g1||) [* finite(L1)]. Returns {ok, n1}: the flag and
// the norm of g1 (clipping reuses it).
std::pair<at::Tensor, at::Tensor> descent_local(const SamStepPlan& plan,
                                                const at::Tensor& ok_in,
                                                const std::optional<at::Tensor>& loss,
                                                const at::Device& device) {
  const std::vector<at::Tensor> none;
  at::Tensor n1 = op_grad_norm().call(grads_of(plan.norm_params), none, 0.0);
  std::vector<at::Tensor> values{n1};
  add_loss(values, loss);
  return {and_finite(ok_in, std::move(values), device), n1};
}

// The part after the gate (BaseStep._base_step from its _gate_ok on): with max_grad_norm > 0
// the gradient clipped by n1 (torch's clip_grad_norm_ rule, folded into the step as a
// coefficient); per group the fused SGD/AdamW step from the backups (restore fused in), gated
// by ok; counters += (ok, 1-ok); the stale-gradient marks.
void descent_rest(const at::Tensor& counters, SamStepPlan& plan, at::Tensor ok,
                  const at::Tensor& n1, const std::vector<double>& hyper, double max_grad_norm) {
  // BaseStep._clip_scale with the norm of g1 reused: ok *= finite(n1) (again);
  // scale = nan_to_num(clamp((1 / (n1 + 1e-6)) * max_grad_norm, max=1)), the gradient a
  // one-term combination with that coefficient (python_api._base_step._scaled)
  OptT coefs;
  if (max_grad_norm > 0.0) {
    ok = and_finite(ok.to(at::kFloat).reshape({}), {n1}, n1.device());
    const at::Tensor scale = at::nan_to_num(
        at::clamp(at::mul(at::reciprocal(at::add(n1, 1e-6)), max_grad_norm), std::nullopt, 1.0),
        0.0, 0.0, 0.0);
    coefs = scale.to(at::kFloat).reshape({1});
  }
  const OptT ok_arg = ok.to(at::kFloat).reshape({});
  for (size_t k = 0; k < plan.groups.size(); ++k) {
    const BaseGroupPlan& g = plan.groups[k];
    const double* h = hyper.data() + 6 * k;
    const auto grads = grads_of(g.params);
    group_step(g, grads, coefs, h, ok_arg);
  }
  count_and_mark(counters, plan, ok);
}


}  // namespace

// The whole descent (a single process: no gate between the parts). `hyper`, per group: SGD (lr,
// momentum, dampening, nesterov, weight_decay, maximize), AdamW (lr, beta1, beta2, eps,
// weight_decay, maximize). Returns false when the plan does not match the parameters (nothing
// written).
bool plan_descent(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                  const at::Tensor& ok_in, const std::optional<at::Tensor>& loss,
                  std::vector<double> hyper, double max_grad_norm) {
  check_hyper(*plan, hyper, "plan_descent");
  if (!plan->matches()) return false;
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in plan_ascent
  auto [ok, n1] = descent_local(*plan, ok_in, loss, counters.device());
  descent_rest(counters, *plan, std::move(ok), n1, hyper, max_grad_norm);
  return true;
}

// The descent's first part (a distributed step; see python_api/_step_plan.py): returns
// [ok, n1], this rank's flag before the gate and the norm of g1, or [] when the plan does not
// match the parameters (nothing written; the caller runs the unplanned descent, whose gate
// performs the same all-reduce).
std::vector<at::Tensor> plan_descent_flag(const at::Tensor& counters,
                                          const c10::intrusive_ptr<SamStepPlan>& plan,
                                          const at::Tensor& ok_in,
                                          const std::optional<at::Tensor>& loss) {
  if (!plan->matches()) return {};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [ok, n1] = descent_local(*plan, ok_in, loss, counters.device());
  return {std::move(ok), std::move(n1)};
}

// The descent's second part, with the gated (all-reduced) flag `ok` and the `norm` the first
// part returned. Checks the plan again: false when it does not match (nothing written; the
// caller continues the unplanned base step from after its gate, with no second all-reduce).
bool plan_descent_apply(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                        const at::Tensor& ok, const at::Tensor& norm, std::vector<double> hyper,
                        double max_grad_norm) {
  check_hyper(*plan, hyper, "plan_descent_apply");
  if (!plan->matches()) return false;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  descent_rest(counters, *plan, ok, norm, hyper, max_grad_norm);
  return true;
}

// ---------------------------------------------------------------- CR-SAM
// CRSAM.step (reference form, on_nonfinite="skip", no clipping, one process), its unplanned ops
// in its order. The caller (python_api/crsam.py) runs the closure between the calls.

// ok = finite(||g0||) [* finite(L0)]; e = rho * nan_to_num(1/(||g0|| + 1e-12)) * g0 (and the
// scale of w - e, its negation); b = w; w += e; g0 kept; p.grad = None (before w + e). [] when
// the plan does not match the parameters (matches(): a sparse gradient included) or a gradient
// is a view (nothing written).
std::vector<at::Tensor> crsam_ascent(const at::Tensor& counters,
                                     const c10::intrusive_ptr<SamStepPlan>& plan,
                                     const std::optional<at::Tensor>& loss) {
  if (!plan->matches() || any_grad_view(plan->norm_params)) return {};
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in plan_ascent
  Opening o = open_step(*plan, loss, counters.device());
  if (!plan->pert_params.empty()) {
    auto scales = op_ascent_scale().call(o.norm, plan->rho, std::nullopt, 1.0, true);
    op_perturb().call(plan->pert_params, pick(o.g0, plan->pert_index), plan->pert_backups,
                      scales[0], false, 0.0, /*save_backup=*/true);
    plan->neg_scale = std::move(scales[1]);
  }
  plan->kept_g0 = std::move(o.g0);
  plan->drop_grads();
  return {o.ok};
}

// After the evaluation at w + e: g+ collected and kept, its norm returned (its finite flag is
// folded into the descent's); w = b - e (from the backups); p.grad = None (before w - e).
std::vector<at::Tensor> crsam_middle(const at::Tensor& counters,
                                     const c10::intrusive_ptr<SamStepPlan>& plan) {
  TORCH_CHECK(plan->kept_g0.size() == plan->norm_params.size(),
              "crsam_middle: no crsam_ascent before it");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::vector<at::Tensor> none;
  std::vector<at::Tensor> gplus = collect_grads(*plan, "CRSAM");
  const at::Tensor n_plus = op_grad_norm().call(gplus, none, 0.0);
  plan->kept_gplus = take(std::move(gplus));
  if (!plan->pert_params.empty()) {
    op_perturb().call(plan->pert_params, pick(plan->kept_g0, plan->pert_index), plan->pert_backups,
                      plan->neg_scale, false, 0.0, /*save_backup=*/false);
  }
  plan->drop_grads();
  return {n_plus};
}

// After the evaluation at w - e: g- collected; ok *= finite(||g+||, L+, ||g-||, L-); per base
// group the fused step from the backups with g = c0 g+ + c1 g- + c2 g0 (coefs: CRSAM._coefs),
// gated by ok; counters += (ok, 1 - ok); the kept gradients dropped; the marks.
void crsam_descent(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                   const at::Tensor& ok_in, const at::Tensor& n_plus,
                   const std::optional<at::Tensor>& loss_plus,
                   const std::optional<at::Tensor>& loss_minus, const at::Tensor& coefs,
                   std::vector<double> hyper) {
  check_hyper(*plan, hyper, "crsam_descent");
  TORCH_CHECK(plan->kept_gplus.size() == plan->norm_params.size(),
              "crsam_descent: no crsam_middle before it");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::vector<at::Tensor> none;
  const std::vector<at::Tensor> gminus = collect_grads(*plan, "CRSAM");
  const at::Tensor n_minus = op_grad_norm().call(gminus, none, 0.0);
  std::vector<at::Tensor> values{n_plus};
  add_loss(values, loss_plus);
  values.push_back(n_minus);
  add_loss(values, loss_minus);
  const at::Tensor ok = and_finite(ok_in, std::move(values), counters.device());
  const OptT ok_arg = ok.to(at::kFloat).reshape({});
  const OptT coef_arg = coefs;
  for (size_t k = 0; k < plan->groups.size(); ++k) {
    const BaseGroupPlan& g = plan->groups[k];
    const double* h = hyper.data() + 6 * k;
    // the LinComb's terms concatenated: g+, g-, g0 of the group's parameters
    std::vector<at::Tensor> terms = pick(plan->kept_gplus, g.norm_index);
    const auto gm = pick(gminus, g.norm_index);
    const auto g0 = pick(plan->kept_g0, g.norm_index);
    terms.insert(terms.end(), gm.begin(), gm.end());
    terms.insert(terms.end(), g0.begin(), g0.end());
    group_step(g, terms, coef_arg, h, ok_arg);
  }
  plan->release();
  count_and_mark(counters, *plan, ok);
}

TORCH_LIBRARY_IMPL(sam_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("crsam_ascent", &crsam_ascent);
  m.impl("crsam_middle", &crsam_middle);
  m.impl("crsam_descent", &crsam_descent);
  m.impl("plan_ascent", &plan_ascent);
  m.impl("plan_descent", &plan_descent);
  m.impl("plan_descent_flag", &plan_descent_flag);
  m.impl("plan_descent_apply", &plan_descent_apply);
}

// No autograd formula and nothing to record: the plan's ops fall through autograd to the kernels
// above, unboxed (the steps run under no_grad; the plan's tensors are the optimizer's).
TORCH_LIBRARY_IMPL(sam_kernels_C, Autograd, m) {
  m.impl("crsam_ascent", torch::CppFunction::makeFallthrough());
  m.impl("crsam_middle", torch::CppFunction::makeFallthrough());
  m.impl("crsam_descent", torch::CppFunction::makeFallthrough());
  m.impl("plan_ascent", torch::CppFunction::makeFallthrough());
  m.impl("plan_descent", torch::CppFunction::makeFallthrough());
  m.impl("plan_descent_flag", torch::CppFunction::makeFallthrough());
  m.impl("plan_descent_apply", torch::CppFunction::makeFallthrough());
}

}  // namespace sam_kernels
