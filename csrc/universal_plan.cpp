// The universal class's planned step (python_api/_universal_plan.py) on SAM's cached plan
// (step_plan.h): UniversalStep.step's ops with the estimator of Frob-, Trace- or Det-SAM
// (python_api/_universal_step.py, _universal_estimators.py), in their order, so the same bits.
// The caller runs the closure of each noisy sample between the calls:
//
//   universal_ascent   n0 = ||g0||, ok = finite(n0) [* finite(L0)], offset0 = offset, g0 kept;
//                      b = w, w = b + rho * eps_1 (counter noise at offset, offset += drawn;
//                      or the reference's global stream, one draw per tensor)
//   universal_sample   (after sample i) g_i collected, its norm and loss kept for the flag;
//                      the estimator's accumulation (below); (more) w = b + rho * eps_{i+1},
//                      offset += drawn, p.grad = None
//   universal_descent  ok *= finite(||g_i||, L_i for every i); per base group the coefficients
//                      of its combination, ok *= finite(every coefficient) [* finite(Trace/Det's
//                      sample coefficients)]; the fused step from the backups; the counters;
//                      offset = ok ? offset : offset0; the marks
//
// The accumulations and combinations (FrobEstimator, TraceEstimator, DetEstimator):
//   Frob   cross (=|+=) (L_i - L_1) g_i, gsum (=|+=) g_i, Lsum += L_i - L_1;
//          g = (a + b Lsum) . (g0, cross, gsum)
//   Trace  acc (=|+=) c (g_i - g0), c = 1/n;  g = g0 + lam acc
//   Det    d = (L_i - L0) / rho^2, psi = exp(-d/2), x += psi/n, acc (=|+=) c (g_i - g0) with
//          c = -psi/(2n);  g = g0 + lam (-2/x^3) acc
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <utility>

#include "plan_glue.h"
#include "step_plan.h"

namespace sam_kernels {
using namespace plan_glue;

namespace {
enum Estimator : int64_t { kFrob = 0, kTrace = 1, kDet = 2 };
const char* const kWho[] = {"FrobSAM", "TraceSAM", "DetSAM"};
}  // namespace

void SamStepPlan::set_universal(int64_t estimator_, at::Tensor scale, int64_t kind,
                                double half_cube_len_, bool reference_stream_) {
  TORCH_CHECK(estimator_ >= kFrob && estimator_ <= kDet,
              "SamStepPlan.set_universal: estimator must be 0, 1 or 2, got ", estimator_);
  TORCH_CHECK(kind == 0 || kind == 1, "SamStepPlan.set_universal: kind must be 0 or 1, got ",
              kind);
  estimator = estimator_;
  reference_stream = reference_stream_;
  noise_scale = std::move(scale);
  noise_kind = kind;
  half_cube_len = half_cube_len_;
  drawn = 0;
  for (const auto& p : pert_params) drawn += p.numel();
  std::vector<int64_t> pert_place(norm_params.size(), -1);  // norm_params' places in pert
  for (size_t j = 0; j < pert_index.size(); ++j) {
    pert_place[pert_index[j]] = static_cast<int64_t>(j);
  }
  group_pert_index.clear();
  for (const auto& g : groups) {
    std::vector<int64_t> place;
    place.reserve(g.norm_index.size());
    for (const int64_t i : g.norm_index) place.push_back(pert_place[i]);
    group_pert_index.push_back(std::move(place));
  }
}

std::vector<at::Tensor> SamStepPlan::universal_kept() const {
  std::vector<at::Tensor> out;
  if (kept_g0.empty()) return out;  // outside a step
  if (offset0.defined()) out.push_back(offset0);
  if (samples == 0) return out;
  auto add = [&](const std::vector<at::Tensor>& part) {
    out.insert(out.end(), part.begin(), part.end());
  };
  add(pending);
  add(kept_g0);
  if (estimator == kFrob) {
    out.push_back(lsum);
    add(cross);
    add(gsum);
  } else {
    out.push_back(coef_ok);
    if (estimator == kDet) out.push_back(x);
    add(acc);
  }
  return out;
}

namespace {

// noise_perturb_eager without a seed (sam_kernels/ops/perturb.py), its ops in its order: [b = w;]
// eps per tensor from the global generator, in parameter order (normal(0, 1) in float32, or
// 2a * rand - a), eps *= s (per tensor with per-group rho), w = b, w += eps
void draw_reference(SamStepPlan& plan, bool first) {
  const auto& ps = plan.pert_params;
  const auto& bs = plan.pert_backups;
  if (first) at::_foreach_copy_(bs, ps);
  std::vector<at::Tensor> noise;
  noise.reserve(ps.size());
  for (const auto& p : ps) {
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(p.device());
    if (plan.noise_kind == 0) {
      noise.push_back(at::normal(0.0, 1.0, p.sizes(), std::nullopt, opts));
    } else {
      const double a = plan.half_cube_len;
      noise.push_back(at::sub(at::mul(at::rand(p.sizes(), opts), 2 * a), a));
    }
  }
  const auto eps = plan.noise_scale.dim() == 0
                       ? at::_foreach_mul(noise, plan.noise_scale)
                       : at::_foreach_mul(noise, plan.noise_scale.unbind(0));
  at::_foreach_copy_(ps, bs);
  at::_foreach_add_(ps, eps);
}

void draw_sample(SamStepPlan& plan, const std::optional<at::Tensor>& seed,
                 const std::optional<at::Tensor>& offset, bool first) {
  if (plan.reference_stream) return draw_reference(plan, first);
  TORCH_CHECK(seed.has_value() && offset.has_value(),
              "the universal class's planned step: the counter noise needs a seed and an offset");
  op_noise_perturb().call(plan.pert_params, plan.pert_backups, plan.noise_scale, plan.noise_kind,
                          plan.half_cube_len, /*save_backup=*/first, *seed, *offset);
  const_cast<at::Tensor&>(*offset).add_(plan.drawn);
}

// Perturbation._scratch: step-local buffers, allocated after the first noisy backward (not
// during it), dropped by release()
std::vector<at::Tensor> step_local_like(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back(at::empty_like(p, at::MemoryFormat::Preserve));
  return out;
}

std::vector<at::Tensor> concat(std::initializer_list<const std::vector<at::Tensor>*> parts) {
  std::vector<at::Tensor> out;
  for (const auto* part : parts) out.insert(out.end(), part->begin(), part->end());
  return out;
}

// FrobEstimator._accumulate (li: this sample's loss, reshaped, on the device)
void frob_accumulate(SamStepPlan& plan, const std::vector<at::Tensor>& grads,
                     const at::Tensor& li, bool first, const at::Device& device) {
  if (first) {
    plan.cross = step_local_like(plan.pert_params);
    plan.gsum = step_local_like(plan.pert_params);
    plan.lref = li;
    plan.lsum = at::zeros_like(li);
  }
  const at::Tensor shifted = at::sub(li, plan.lref);
  op_frob_accumulate().call(plan.cross, plan.gsum, pick(grads, plan.pert_index),
                            shifted.to(device, at::kFloat).contiguous(), first);
  plan.lsum = at::add(plan.lsum, shifted);
}

// ISAMEstimator._add_to_acc: acc (=|+=) c (g_i - g0), c 0-d or one per perturbed tensor
void add_to_acc(SamStepPlan& plan, const std::vector<at::Tensor>& grads, const at::Tensor& c,
                bool first) {
  const at::Tensor fin = at::isfinite(c).all();
  plan.coef_ok = first ? fin : at::bitwise_and(plan.coef_ok, fin);
  const auto gi = pick(grads, plan.pert_index);
  const auto g0 = pick(plan.kept_g0, plan.pert_index);
  if (first) {
    plan.acc = step_local_like(plan.pert_params);
    op_lincomb().call(plan.acc, concat({&gi, &g0}), at::stack({c, at::neg(c)}));
  } else {
    op_lincomb().call(plan.acc, concat({&plan.acc, &gi, &g0}),
                      at::stack({at::ones_like(c), c, at::neg(c)}));
  }
}

// DetEstimator._accumulate: d = (L_i - L0) * (1/rho^2), psi = exp(-0.5 d), x (=|+=) psi / n,
// c = (-0.5/n * psi) in float32
void det_accumulate(SamStepPlan& plan, const std::vector<at::Tensor>& grads,
                    const at::Tensor& li, const at::Tensor& inv_rho2, int64_t n, bool first) {
  TORCH_CHECK(plan.l0.defined(), "DetSAM's planned step: no L0");
  const auto dt = at::promote_types(at::promote_types(li.scalar_type(), plan.l0.scalar_type()),
                                    at::kFloat);
  const at::Tensor d = at::mul(at::sub(li.to(dt), plan.l0.to(dt)), inv_rho2);
  const at::Tensor psi = at::exp(at::mul(d, -0.5));
  const at::Tensor term = at::div(psi, n);
  plan.x = first ? term : at::add(plan.x, term);
  add_to_acc(plan, grads, at::mul(psi, -0.5 / static_cast<double>(n)).to(at::kFloat), first);
}

// a per-group 0-d tensor from a cached one-entry tensor (the estimators' `_const(...)[0]`)
at::Tensor entry0(const at::Tensor& t) { return t.select(0, 0); }

}  // namespace

// [ok], or [] when the plan does not match the parameters, a gradient is a view, or not every
// parameter with a gradient is perturbed (nothing written; the caller runs the unplanned step)
std::vector<at::Tensor> universal_ascent(const at::Tensor& counters,
                                         const c10::intrusive_ptr<SamStepPlan>& plan,
                                         const std::optional<at::Tensor>& loss,
                                         const std::optional<at::Tensor>& seed,
                                         const std::optional<at::Tensor>& offset) {
  TORCH_CHECK(plan->noise_scale.defined(),
              "universal_ascent: the plan has no noise (set_universal)");
  if (plan->pert_params.empty() || plan->pert_params.size() != plan->norm_params.size() ||
      !plan->matches() || any_grad_view(plan->norm_params)) {
    return {};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in plan_ascent
  Opening o = open_step(*plan, loss, counters.device());
  if (loss.has_value()) plan->l0 = loss->reshape({}).to(counters.device());  // (Det-SAM's L0)
  if (!plan->reference_stream) {
    TORCH_CHECK(offset.has_value(), "universal_ascent: the counter noise needs an offset");
    plan->offset0 = offset->clone();
  }
  draw_sample(*plan, seed, offset, /*first=*/true);
  plan->kept_g0 = std::move(o.g0);
  plan->drop_grads();
  return {o.ok};
}

void universal_sample(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                      const std::optional<at::Tensor>& loss, const std::optional<at::Tensor>& coef,
                      const std::optional<at::Tensor>& seed,
                      const std::optional<at::Tensor>& offset, int64_t n, bool more) {
  TORCH_CHECK(plan->kept_g0.size() == plan->norm_params.size() && !plan->kept_g0.empty(),
              "universal_sample: no universal_ascent before it");
  const int64_t est = plan->estimator;
  TORCH_CHECK(loss.has_value() || est == kTrace, "universal_sample: ", kWho[est],
              " needs the loss of every sample");
  TORCH_CHECK(coef.has_value() || est == kFrob, "universal_sample: ", kWho[est],
              " needs its coefficient tensor");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::vector<at::Tensor> none;
  const at::Device device = counters.device();
  const std::vector<at::Tensor> grads = collect_grads(*plan, kWho[est]);
  plan->pending.push_back(op_grad_norm().call(grads, none, 0.0));
  at::Tensor li;
  if (loss.has_value()) {
    plan->pending.push_back(*loss);
    li = loss->reshape({}).to(device);  // (_reduce_loss(L_i).reshape(()).to(device), one rank)
  }
  const bool first = plan->samples == 0;
  if (est == kFrob) {
    frob_accumulate(*plan, grads, li, first, device);
  } else if (est == kTrace) {
    add_to_acc(*plan, grads, entry0(*coef), first);
  } else {
    const at::Tensor inv = plan->noise_scale.dim() == 0 ? entry0(*coef) : *coef;
    det_accumulate(*plan, grads, li, inv, n, first);
  }
  plan->samples += 1;
  if (more) {
    draw_sample(*plan, seed, offset, /*first=*/false);
    plan->drop_grads();
  }
}

void universal_descent(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                       const at::Tensor& ok_in, const std::optional<at::Tensor>& offset,
                       std::vector<at::Tensor> consts, std::vector<double> lams,
                       std::vector<double> hyper) {
  check_hyper(*plan, hyper, "universal_descent");
  const int64_t est = plan->estimator;
  const size_t n_groups = plan->groups.size();
  const size_t want = est == kFrob ? 2 * n_groups : est == kTrace ? n_groups : 0;
  TORCH_CHECK(consts.size() == want, "universal_descent: ", consts.size(), " constants for ",
              n_groups, " groups (", want, " expected)");
  TORCH_CHECK(est != kDet || lams.size() == n_groups, "universal_descent: ", lams.size(),
              " lam values for ", n_groups, " groups");
  TORCH_CHECK(plan->samples > 0, "universal_descent: no universal_sample before it");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Device device = counters.device();
  at::Tensor ok = plan->pending.empty() ? ok_in : and_finite(ok_in, plan->pending, device);
  // each group's coefficients (the estimators' _final), then the step's check of them all (one
  // cat, as UniversalStep._finish)
  const at::Tensor lsum = est == kFrob ? plan->lsum.to(at::promote_types(
                                             plan->lsum.scalar_type(), at::kFloat))
                                       : at::Tensor();
  const auto& places = plan->group_pert_index;
  std::vector<at::Tensor> coefs, flat;
  for (size_t k = 0; k < n_groups; ++k) {
    at::Tensor c;
    if (est == kFrob) {
      c = at::add(consts[2 * k], at::mul(consts[2 * k + 1], lsum)).to(at::kFloat);
    } else {
      at::Tensor scale;
      if (est == kTrace) {
        scale = entry0(consts[k]);
      } else {
        // phi'(x) = -2 / x^3 (Python's float / tensor: reciprocal, then the product)
        const at::Tensor xk =
            plan->noise_scale.dim() == 0 ? plan->x : plan->x.select(0, places[k][0]);
        const at::Tensor phi = at::mul(at::reciprocal(at::mul(at::mul(xk, xk), xk)), -2.0);
        scale = at::mul(phi, lams[k]);
      }
      c = at::stack({at::ones_like(scale), scale}).to(at::kFloat);
    }
    coefs.push_back(c);
    flat.push_back(c.reshape({-1}));
  }
  ok = at::mul(ok, at::isfinite(at::cat(flat)).all().to(at::kFloat));
  if (est != kFrob) ok = at::mul(ok, plan->coef_ok.to(at::kFloat));
  const OptT ok_arg = ok.to(at::kFloat).reshape({});
  for (size_t k = 0; k < n_groups; ++k) {
    const BaseGroupPlan& g = plan->groups[k];
    // the LinComb's terms concatenated: g0 and the estimator's sums, of the group's parameters
    const auto g0 = pick(plan->kept_g0, g.norm_index);
    std::vector<at::Tensor> terms;
    if (est == kFrob) {
      const auto c = pick(plan->cross, places[k]);
      const auto s = pick(plan->gsum, places[k]);
      terms = concat({&g0, &c, &s});
    } else {
      const auto a = pick(plan->acc, places[k]);
      terms = concat({&g0, &a});
    }
    group_step(g, terms, OptT(coefs[k]), hyper.data() + 6 * k, ok_arg);
  }
  count_and_mark(counters, *plan, ok);
  if (!plan->reference_stream) {
    // a skipped step draws nothing: the next step uses the same counters
    TORCH_CHECK(offset.has_value(), "universal_descent: the counter noise needs its offset");
    const_cast<at::Tensor&>(*offset).copy_(at::where(at::gt(ok, 0), *offset, plan->offset0));
  }
  plan->release();
}

TORCH_LIBRARY_IMPL(sam_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("universal_ascent", &universal_ascent);
  m.impl("universal_sample", &universal_sample);
  m.impl("universal_descent", &universal_descent);
}

// as the other planned ops (step_plan.cpp): no autograd formula, nothing to record
TORCH_LIBRARY_IMPL(sam_kernels_C, Autograd, m) {
  m.impl("universal_ascent", torch::CppFunction::makeFallthrough());
  m.impl("universal_sample", torch::CppFunction::makeFallthrough());
  m.impl("universal_descent", torch::CppFunction::makeFallthrough());
}

}  // namespace sam_kernels
