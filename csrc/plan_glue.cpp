// The shared parts of the planned steps (plan_glue.h): gradient collection, the base groups'
// fused steps, the counters and marks.
#include "plan_glue.h"

namespace sam_kernels {
namespace plan_glue {

std::vector<at::Tensor> collect_grads(SamStepPlan& plan, const char* who) {
  for (size_t i = 0; i < plan.watch.size(); ++i) {
    if (!plan.with_grad[i] && grad_ref(plan.watch[i]).defined()) {
      plan.watch[i].mutable_grad().reset();
    }
  }
  // not one gradient where each parameter of the set had one at w: the closure ran no backward
  // (python_api._perturbation's _collect_grads raises the same)
  bool any = plan.norm_params.empty();
  for (const auto& p : plan.norm_params) any = any || grad_ref(p).defined();
  TORCH_CHECK(any, who,
              ": the closure's evaluation at a perturbed point left no gradient on any "
              "parameter; it must call loss.backward() (the weights are restored, the step not "
              "taken)");
  std::vector<at::Tensor> out;
  out.reserve(plan.norm_params.size());
  for (auto& p : plan.norm_params) {
    if (!grad_ref(p).defined()) {
      p.mutable_grad() = at::zeros_like(p, at::MemoryFormat::Preserve);
    }
    const at::Tensor& g = grad_ref(p);
    TORCH_CHECK_VALUE(g.layout() == at::kStrided,
                      who, " does not support sparse gradients (layout ", g.layout(), ")");
    out.push_back(g);
  }
  return out;
}

Opening open_step(SamStepPlan& plan, const OptT& loss, const at::Device& device) {
  const std::vector<at::Tensor> none;
  plan.release();
  Opening o;
  o.g0 = grads_of(plan.norm_params);
  o.norm = op_grad_norm().call(o.g0, none, 0.0);
  std::vector<at::Tensor> values{o.norm};
  add_loss(values, loss);
  o.ok = and_finite(std::nullopt, std::move(values), device);
  return o;
}

std::vector<at::Tensor> take(std::vector<at::Tensor> grads) {
  for (auto& g : grads) {
    if (g.is_view()) g = at::empty_like(g, at::MemoryFormat::Preserve).copy_(g);
  }
  return grads;
}

void group_step(const BaseGroupPlan& g, const std::vector<at::Tensor>& grads, const OptT& coefs,
                const double* h, const OptT& ok) {
  const std::vector<at::Tensor> none;
  const OptT no_tensor;
  if (!g.adamw) {
    op_sgd_step().call(g.params, grads, coefs, g.has_momentum ? TL(g.bufs) : TL(none), g.steps,
                       g.backups, no_tensor, h[0], h[1], h[2], h[3] != 0.0, h[4], h[5] != 0.0,
                       ok);
  } else {
    op_adamw_step().call(g.params, grads, coefs, g.exp_avgs, g.exp_avg_sqs,
                         g.amsgrad ? TL(g.max_exp_avg_sqs) : TL(none), g.steps, g.backups,
                         no_tensor, h[0], h[1], h[2], h[3], h[4], g.amsgrad, h[5] != 0.0, ok);
  }
}

void count_and_mark(const at::Tensor& counters, SamStepPlan& plan, const at::Tensor& ok) {
  op_count_step().call(counters, ok.to(at::kFloat).reshape({}));
  plan.mark();
}

void check_hyper(const SamStepPlan& plan, const std::vector<double>& hyper, const char* op) {
  TORCH_CHECK(hyper.size() == 6 * plan.groups.size(), op, ": ", hyper.size(),
              " hyper-parameters for ", plan.groups.size(), " groups (6 each)");
}

}  // namespace plan_glue

}  // namespace sam_kernels
