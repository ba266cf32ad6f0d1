// The cached step plan of SAM/ASAM over a fused SGD or AdamW base (issue 14, item 2).
//
// Everything of a SAM step that does not change from step to step is held here once: every
// parameter of every group (with whether its gradient must be present), the norm's and the
// ascent's lists, the backups, the per-tensor rho vector, each base group's state lists and the
// step/skip counters. A step then passes no tensor list across the Python boundary: the
// gradients are read from the parameters themselves (`Tensor::grad()`), and the scalar glue of
// the two halves (finite flags, the ascent scale, the counters) runs here as the glue ops the
// Python code calls (finite_and, ascent_scale, count_step_: one kernel each on a GPU), in its
// order, so the results are bit-identical to the unplanned path. The plan calls the extension's
// own ops through the dispatcher, so the CPU and CUDA implementations are the ones the unplanned
// path runs.
//
// A plan only answers for what it can see: before anything is written, every call checks that
// each parameter's gradient is present exactly where the plan expects it, dense, and shaped,
// typed and placed like its parameter, and that no parameter changed dtype or device. If not,
// the call does nothing and says so (`ascent` returns an empty list, `descent` false): the
// caller drops the plan and runs the unplanned path. What the plan cannot see (groups, hyper-
// parameters that change the lists, state dicts replaced) is keyed by the Python caller
// (python_api/_step_plan.py).
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <optional>
#include <unordered_map>
#include <vector>

namespace sam_kernels {

struct BaseGroupPlan {
  bool adamw = false;
  bool has_momentum = false;  // SGD: momentum != 0 when the plan was built
  bool amsgrad = false;       // AdamW
  std::vector<at::Tensor> params, bufs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups;
  std::vector<int64_t> norm_index;  // each parameter's place in the plan's norm_params
};

struct SamStepPlan : torch::CustomClassHolder {
  // every parameter of every group, in order, and whether its gradient must be present
  std::vector<at::Tensor> watch;
  std::vector<bool> with_grad;
  std::vector<at::ScalarType> dtypes;
  std::vector<at::Device> devices;
  std::vector<std::vector<int64_t>> sizes;
  // the norm's parameters (every one with a gradient, group order) and its (adaptive, eta)
  std::vector<at::Tensor> norm_params;
  bool adaptive = false;
  double eta = 0.0;
  // the ascent: perturbed parameters, their backups, per-tensor rho
  std::vector<at::Tensor> pert_params, pert_backups;
  std::vector<int64_t> pert_index;  // each perturbed parameter's place in norm_params
  at::Tensor rho;
  std::vector<BaseGroupPlan> groups;
  at::Tensor counters;  // [2] float32: steps applied, steps skipped

  void set_watch(std::vector<at::Tensor> params, std::vector<int64_t> with_grad);
  void set_ascent(std::vector<at::Tensor> norm_params, bool adaptive, double eta,
                  std::vector<at::Tensor> pert_params, std::vector<at::Tensor> pert_backups,
                  at::Tensor rho, at::Tensor counters);
  void add_sgd_group(std::vector<at::Tensor> params, std::vector<at::Tensor> bufs,
                     std::vector<at::Tensor> steps, std::vector<at::Tensor> backups,
                     bool has_momentum);
  void add_adamw_group(std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avgs,
                       std::vector<at::Tensor> exp_avg_sqs,
                       std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> steps,
                       std::vector<at::Tensor> backups, bool amsgrad);
  int64_t num_groups() const { return static_cast<int64_t>(groups.size()); }

  // true when every gradient and parameter is as the plan expects (nothing is changed)
  bool matches() const;

  // Stale-gradient marks (python_api/_closures.py): the gradient tensors a planned step leaves
  // behind, with their version counters, recorded here instead of in Python. `mark` records
  // them now; `drop_stale(params)` sets to None the gradient of each given parameter that is
  // still the marked tensor at most one in-place write later, and returns whether any given
  // parameter keeps a (fresh) gradient.
  void mark();
  bool drop_stale(std::vector<at::Tensor> params);
  bool drop_stale_watched();  // drop_stale over the watched parameters (no list passed)
  // true when no watched parameter changed dtype, device or shape (gradients not looked at)
  bool same_params() const;
  // p.grad = None for every watched parameter (zero_grad(set_to_none=True) of the groups)
  void drop_grads();
  std::unordered_map<const c10::TensorImpl*, size_t> index;  // parameter -> its place in watch
  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> marked;
  std::vector<int64_t> marked_versions;

  // CR-SAM's step (crsam_ascent, crsam_middle, crsam_descent): the gradients it keeps between
  // its calls (g0, g+; aligned with norm_params) and the scale of w - e. `kept` returns them
  // ([g0..., g+...], as far as taken) for a step that finishes unplanned; `release` drops them.
  std::vector<at::Tensor> kept_g0, kept_gplus;
  at::Tensor neg_scale;
  std::vector<at::Tensor> kept() const;
  void release();

  // The universal class's step (universal_plan.cpp: universal_ascent, universal_sample per noisy
  // sample, universal_descent), for one estimator (0 Frob-SAM, 1 Trace-SAM, 2 Det-SAM). Set once
  // per plan by `set_universal`: the estimator, the scale of the noise (rho, 0-d when every
  // perturbed group has the same), its kind and half-cube length, and the elements drawn per
  // sample. Kept between the calls of a step (dropped by `release`, with g0 in kept_g0): the
  // samples' gradient norms and losses (their finite flags are folded in by the descent), the
  // noise offset at the step's start, the samples taken, L0 (Det-SAM), and the estimator's
  // sums: Frob-SAM's `cross`, `gsum` (aligned with pert_params), the first sample's loss (the
  // shift) and the sum of the shifted losses; Trace/Det-SAM's `acc`, the finite flag of their
  // coefficients and Det-SAM's x. `universal_kept` returns, for a step that finishes unplanned,
  // [offset0 (counter noise only), pending..., g0..., then Frob: lsum, cross..., gsum...;
  // Trace: coef_ok, acc...; Det: coef_ok, x, acc...] ([offset0] or [] before the first sample,
  // [] outside a step).
  int64_t estimator = 0;
  // the noise: the counter-based contract (seed, offset), or the reference's global stream (the
  // eager default on CPU tensors: one draw per tensor from the global generator, as
  // noise_perturb_'s eager implementation without a seed)
  bool reference_stream = false;
  at::Tensor noise_scale;
  int64_t noise_kind = 0;
  double half_cube_len = 1.0;
  int64_t drawn = 0;
  // each base group's parameters' places in pert_params (their sums' columns)
  std::vector<std::vector<int64_t>> group_pert_index;
  int64_t samples = 0;
  std::vector<at::Tensor> pending, cross, gsum, acc;
  at::Tensor offset0, l0, lref, lsum, coef_ok, x;
  void set_universal(int64_t estimator, at::Tensor scale, int64_t kind, double half_cube_len,
                     bool reference_stream);
  std::vector<at::Tensor> universal_kept() const;
};

// The two halves of the step (schemas in bindings.cpp). `counters` is the plan's counter tensor:
// it gives the op its device for dispatch. A distributed step runs the descent as its two parts,
// plan_descent_flag and plan_descent_apply, with the MIN all-reduce of the flag in between
// (python_api/_step_plan.py).
std::vector<at::Tensor> plan_ascent(const at::Tensor& counters,
                                    const c10::intrusive_ptr<SamStepPlan>& plan,
                                    const std::optional<at::Tensor>& loss, bool drop_grads);
bool plan_descent(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                  const at::Tensor& ok, const std::optional<at::Tensor>& loss,
                  std::vector<double> hyper, double max_grad_norm);
std::vector<at::Tensor> plan_descent_flag(const at::Tensor& counters,
                                          const c10::intrusive_ptr<SamStepPlan>& plan,
                                          const at::Tensor& ok,
                                          const std::optional<at::Tensor>& loss);
bool plan_descent_apply(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                        const at::Tensor& ok, const at::Tensor& norm, std::vector<double> hyper,
                        double max_grad_norm);

// CR-SAM's planned step (python_api/crsam.py, the reference form): three calls around its two
// perturbed evaluations. crsam_ascent returns [ok] or [] (the plan does not match: nothing
// written); crsam_middle returns [||g+||]; crsam_descent takes the step.
std::vector<at::Tensor> crsam_ascent(const at::Tensor& counters,
                                     const c10::intrusive_ptr<SamStepPlan>& plan,
                                     const std::optional<at::Tensor>& loss);
std::vector<at::Tensor> crsam_middle(const at::Tensor& counters,
                                     const c10::intrusive_ptr<SamStepPlan>& plan);
void crsam_descent(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                   const at::Tensor& ok, const at::Tensor& n_plus,
                   const std::optional<at::Tensor>& loss_plus,
                   const std::optional<at::Tensor>& loss_minus, const at::Tensor& coefs,
                   std::vector<double> hyper);

// The universal class's planned step (python_api/_universal_plan.py): universal_ascent returns
// [ok] or [] (the plan does not match: nothing written); universal_sample after each noisy
// evaluation (`loss` that sample's, None where the closure returned none (Trace-SAM); `coef`:
// Trace-SAM's 1/n, Det-SAM's 1/rho^2 (one entry, or one per perturbed tensor), as cached
// tensors; `n` the number of samples; `more`: another sample follows; `seed` and `offset` the
// counter noise's, None with the reference stream); universal_descent takes
// the step (`consts`: Frob-SAM's (a, b) per base group, the coefficients being a + b * Lsum;
// Trace-SAM's lam per group; `lams`: Det-SAM's lam per group).
std::vector<at::Tensor> universal_ascent(const at::Tensor& counters,
                                         const c10::intrusive_ptr<SamStepPlan>& plan,
                                         const std::optional<at::Tensor>& loss,
                                         const std::optional<at::Tensor>& seed,
                                         const std::optional<at::Tensor>& offset);
void universal_sample(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                      const std::optional<at::Tensor>& loss, const std::optional<at::Tensor>& coef,
                      const std::optional<at::Tensor>& seed,
                      const std::optional<at::Tensor>& offset, int64_t n, bool more);
void universal_descent(const at::Tensor& counters, const c10::intrusive_ptr<SamStepPlan>& plan,
                       const at::Tensor& ok, const std::optional<at::Tensor>& offset,
                       std::vector<at::Tensor> consts, std::vector<double> lams,
                       std::vector<double> hyper);

}  // namespace sam_kernels
