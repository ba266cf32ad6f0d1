// The custom-op schemas of the extension (namespace sam_kernels_C). Implementations are
// registered per device: CPU in cpu_ops.cpp, CUDA in cuda_glue.cpp (CUDA builds only); fake
// (meta) implementations for torch.compile are registered from Python (sam_kernels/cuda_ext.py).
//
// Conventions: tensor lists are equal-length lists of dense tensors; a LinComb gradient is its
// K term lists concatenated (K * n tensors) plus `coefs` ([K] or [K, n] float32); an absent
// optional list (backups, momentum buffers, max_exp_avg_sqs, params of an unweighted norm) is an
// empty list. Scalars that must stay on the device (scale, ok, lr, loss, seed, offset) are
// tensors.
#include <torch/library.h>

TORCH_LIBRARY(sam_kernels_C, m) {
  m.def("grad_norm(Tensor[] grads, Tensor[] params, float eta) -> Tensor");
  m.def("aesam_stats_(Tensor[] grads, Tensor(a!) stats, float delta, float c) -> Tensor");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor scale, "
      "bool adaptive, float eta) -> ()");
  m.def(
      "noise_perturb_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor scale, int kind, "
      "float half_cube_len, bool save_backup, Tensor seed, Tensor offset) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def("lincomb_(Tensor(a!)[] out, Tensor[] terms, Tensor coefs) -> ()");
  m.def("frob_accumulate_(Tensor(a!)[] cross, Tensor(b!)[] gsum, Tensor[] grads, Tensor loss) -> ()");
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
  // test hook: one Philox4x32-10 block (CPU)
  m.def("_philox4x32_10(Tensor(a!) out, int[] counter, int[] key) -> ()");
}
