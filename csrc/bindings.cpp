// The custom-op schemas of the extension (namespace sam_kernels_C). Implementations are
// registered per device: CPU in cpu_ops.cpp (and cpu_filter_noise.cpp, cpu_looksam.cpp,
// scalar_glue.cpp, list_ops.cpp), CUDA in cuda_glue.cpp (CUDA builds only); fake
// (meta) implementations for torch.compile are registered from Python (sam_kernels/cuda_ext.py).
//
// Conventions: tensor lists are equal-length lists of dense tensors; a LinComb gradient is its
// K term lists concatenated (K * n tensors) plus `coefs` ([K] or [K, n] float32); an absent
// optional list (backups, momentum buffers, max_exp_avg_sqs, params of an unweighted norm) is an
// empty list. Scalars that must stay on the device (scale, ok, lr, loss, seed, offset) are
// tensors.
#include <torch/library.h>

#include "step_plan.h"

TORCH_LIBRARY(sam_kernels_C, m) {
  m.def("grad_norm(Tensor[] grads, Tensor[] params, float eta) -> Tensor");
  m.def("aesam_stats_(Tensor[] grads, Tensor(a!) stats, float delta, float c) -> Tensor");
  // fp64 global inner product, a 0-d fp64 tensor (CPU only: on CUDA tensors Triton's runs)
  m.def("dot(Tensor[] a, Tensor[] b) -> Tensor");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor scale, "
      "bool adaptive, float eta, bool save_backup) -> ()");
  m.def(
      "noise_perturb_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor scale, int kind, "
      "float half_cube_len, bool save_backup, Tensor seed, Tensor offset) -> ()");
  // R-SAM's filter-wise noise (CPU only: on CUDA tensors the chooser runs Triton's)
  m.def(
      "filter_noise_perturb_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor(c!)[] deltas, "
      "Tensor sigma, float eps_1d, Tensor seed, Tensor offset) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  // LookSAM's per-tensor projection and reuse coefficients (cpu_looksam.cpp; CPU only)
  m.def("looksam_project_(Tensor(a!)[] gv, Tensor[] g0, Tensor[] gs, Tensor? ok) -> ()");
  m.def("looksam_reuse_coefs(Tensor[] g0, Tensor[] gv, float alpha) -> Tensor");
  m.def("lincomb_(Tensor(a!)[] out, Tensor[] terms, Tensor coefs) -> ()");
  m.def(
      "frob_accumulate_(Tensor(a!)[] cross, Tensor(b!)[] gsum, Tensor[] grads, Tensor loss, "
      "bool init) -> ()");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor? coefs, "
      "Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, Tensor[] backups, Tensor? lr_tensor, "
      "float lr, float momentum, float dampening, bool nesterov, float weight_decay, "
      "bool maximize, Tensor? ok) -> ()");
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor? coefs, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, "
      "Tensor[] backups, Tensor? lr_tensor, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool amsgrad, bool maximize, Tensor? ok) -> ()");
  // the scalar glue of a step (scalar_glue.cpp; CPU only)
  m.def("finite_and(Tensor? ok, Tensor[] values) -> Tensor");
  m.def(
      "ascent_scale(Tensor norm, Tensor rho, Tensor? factor_tensor, float factor, bool negated) "
      "-> Tensor[]");
  m.def("count_step_(Tensor(a!) counters, Tensor ok) -> ()");
  // the per-tensor bookkeeping of a step as one op per list (list_ops.cpp; CPU only)
  m.def("empty_like_list(Tensor[] like) -> Tensor[]");
  m.def("zero_unless_(Tensor(a!)[] tensors, Tensor ok) -> ()");
  // the cached SAM step plan (step_plan.h): built once, then two calls per step
  m.class_<sam_kernels::SamStepPlan>("SamStepPlan")
      .def(torch::init<>())
      .def("set_watch", &sam_kernels::SamStepPlan::set_watch)
      .def("set_ascent", &sam_kernels::SamStepPlan::set_ascent)
      .def("add_sgd_group", &sam_kernels::SamStepPlan::add_sgd_group)
      .def("add_adamw_group", &sam_kernels::SamStepPlan::add_adamw_group)
      .def("num_groups", &sam_kernels::SamStepPlan::num_groups)
      .def("matches", &sam_kernels::SamStepPlan::matches)
      .def("mark", &sam_kernels::SamStepPlan::mark)
      .def("drop_stale", &sam_kernels::SamStepPlan::drop_stale)
      .def("drop_stale_watched", &sam_kernels::SamStepPlan::drop_stale_watched)
      .def("same_params", &sam_kernels::SamStepPlan::same_params)
      .def("drop_grads", &sam_kernels::SamStepPlan::drop_grads)
      .def("kept", &sam_kernels::SamStepPlan::kept)
      .def("release", &sam_kernels::SamStepPlan::release)
      .def("set_universal", &sam_kernels::SamStepPlan::set_universal)
      .def("universal_kept", &sam_kernels::SamStepPlan::universal_kept);
  m.def(
      "plan_ascent(Tensor counters, __torch__.torch.classes.sam_kernels_C.SamStepPlan plan, "
      "Tensor? loss, bool drop_grads) -> Tensor[]");
  m.def(
      "plan_descent(Tensor(a!) counters, __torch__.torch.classes.sam_kernels_C.SamStepPlan plan, "
      "Tensor ok, Tensor? loss, float[] hyper, float max_grad_norm) -> bool");
  // the descent in two parts, for a distributed step's all-reduce of the flag between them
  m.def(
      "plan_descent_flag(Tensor counters, __torch__.torch.classes.sam_kernels_C.SamStepPlan "
      "plan, Tensor ok, Tensor? loss) -> Tensor[]");
  m.def(
      "plan_descent_apply(Tensor(a!) counters, "
      "__torch__.torch.classes.sam_kernels_C.SamStepPlan plan, Tensor ok, Tensor norm, "
      "float[] hyper, float max_grad_norm) -> bool");
  // CR-SAM's planned step (step_plan.h): three calls around its two perturbed evaluations
  m.def(
      "crsam_ascent(Tensor counters, __torch__.torch.classes.sam_kernels_C.SamStepPlan plan, "
      "Tensor? loss) -> Tensor[]");
  m.def(
      "crsam_middle(Tensor counters, __torch__.torch.classes.sam_kernels_C.SamStepPlan plan) "
      "-> Tensor[]");
  m.def(
      "crsam_descent(Tensor(a!) counters, __torch__.torch.classes.sam_kernels_C.SamStepPlan "
      "plan, Tensor ok, Tensor n_plus, Tensor? loss_plus, Tensor? loss_minus, Tensor coefs, "
      "float[] hyper) -> ()");
  // the universal class's planned step (step_plan.h): an ascent, one call per noisy sample, a
  // descent
  m.def(
      "universal_ascent(Tensor counters, __torch__.torch.classes.sam_kernels_C.SamStepPlan "
      "plan, Tensor? loss, Tensor? seed, Tensor(a!)? offset) -> Tensor[]");
  m.def(
      "universal_sample(Tensor counters, __torch__.torch.classes.sam_kernels_C.SamStepPlan "
      "plan, Tensor? loss, Tensor? coef, Tensor? seed, Tensor(a!)? offset, int n, bool more) "
      "-> ()");
  m.def(
      "universal_descent(Tensor(a!) counters, "
      "__torch__.torch.classes.sam_kernels_C.SamStepPlan plan, Tensor ok, Tensor(b!)? offset, "
      "Tensor[] consts, float[] lams, float[] hyper) -> ()");
  // test hook: one Philox4x32-10 block (CPU)
  m.def("_philox4x32_10(Tensor(a!) out, int[] counter, int[] key) -> ()");
  // test hook: the noise contract's float32 functions (CPU; ops_math.h)
  m.def("_noise_math(Tensor(a!) out, Tensor x, Tensor y, int fn) -> ()");
}
