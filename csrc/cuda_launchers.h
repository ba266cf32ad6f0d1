// Host-side launchers of the CUDA kernels: plain C++, no torch and no CUDA headers.
//
// The torch glue (cuda_glue.cpp) turns tensor lists into raw pointers and calls these; the
// kernels themselves (*.cu) include only the CUDA toolkit, so every .cu compiles with plain
// `nvcc -c` (the CI compile check) and a CUDA build of the extension takes seconds.
//
// One call describes one group of tensors of a single dtype. Each launcher packs the group into
// a kernel-argument chunk table (multi_tensor.cuh) and issues one launch for it (more only when
// the group holds more tensors than one table fits, see kMaxArgBytes).
#pragma once

#include <cstdint>

namespace sam_kernels {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxLists = 10;

// A group of n tensors. lists[l][j] is the data pointer of tensor j in list l (nullptr lists are
// absent). index[j] is the tensor's position in the caller's full list: it selects per-tensor
// coefficients ([n] / [K, n] tensors). first[j] is the index of its element 0 in the
// concatenated list (the elements of the tensors before it, all dtypes): the noise counters.
struct Group {
  int n = 0;
  DType dtype = kFloat32;
  const int64_t* numel = nullptr;
  const int* index = nullptr;
  const int64_t* first = nullptr;
  void* const* lists[kMaxLists] = {};
};

// Number of norm partials (chunks) a group produces; the glue sizes the partials buffer with it.
int64_t num_chunks(const Group& g);

// ---- reductions (two stages, deterministic: per-chunk partials, then one fixed-order sum) ----
// lists: 0 grads, 1 params (nullptr: plain norm). Writes partials[0 .. num_chunks(g)).
// Partials are fp64 (squares summed in fp64).
void launch_sumsq_partials(const Group& g, float eta, double* partials, void* stream);
// out[0] = sqrt(sum(partials[0..count))) (fp64 sum and sqrt, rounded once to fp32)
void launch_norm_finalize(const double* partials, int64_t count, float* out, void* stream);
// stats = [mu, var] updated in place, decision[0] = 1 / 0 / -1 (see ops_math.h aesam_update)
void launch_aesam_finalize(const double* partials, int64_t count, float* stats, int* decision,
                           float delta, float c, void* stream);

// ---- element-wise ops ----
// lists: 0 params (in/out), 1 grads, 2 backups (out; save false: in, and params out only).
// scale: 0-d (stride 0) or [n] (stride 1).
void launch_perturb(const Group& g, const float* scale, int scale_stride, bool adaptive,
                    float eta, bool save, void* stream);
// lists: 0 params (out), 1 backups (in/out). kind 0 normal, 1 uniform; eps of element e of
// tensor j: the noise contract (ops_math.h noise_eps) at counter *offset + first[j] + e.
void launch_noise_perturb(const Group& g, const float* scale, int scale_stride, int kind,
                          float half_cube_len, bool save_backup, const int64_t* seed,
                          const int64_t* offset, void* stream);
// lists: 0 params (out), 1 backups (in)
void launch_restore(const Group& g, void* stream);
// lists: 0 out, 1..k terms. coefs: [k] (n_stride 0) or [k, N] row-major (n_stride 1, k_stride N)
struct Coefs {
  const float* ptr = nullptr;  // nullptr: a single term with coefficient 1 (plain gradient)
  int k = 1;
  int64_t k_stride = 0;
  int n_stride = 0;
};
void launch_lincomb(const Group& g, const Coefs& c, void* stream);
// lists: 0 cross (in/out; init: out), 1 gsum (in/out; init: out), 2 grads
void launch_frob_accumulate(const Group& g, const float* loss, bool init, void* stream);

// ---- optimizer steps, restore fused in, gated by ok ----
struct StepCommon {
  const float* lr_ptr = nullptr;  // device lr (0-d float32) or nullptr: use lr
  double lr = 0.0;
  const float* ok = nullptr;  // device flag (0-d float32) or nullptr: always step
  double weight_decay = 0.0;
  bool maximize = false;
  Coefs coefs;  // gradient = sum_k coefs * grads_k (k terms in lists 1..k)
};
// lists: 0 params, 1..3 grad terms, 4 backups (nullptr: step from params), 5 momentum buffers,
//        6 steps (0-d float32 per tensor)
void launch_sgd_step(const Group& g, const StepCommon& s, double momentum, double dampening,
                     bool nesterov, void* stream);
// lists: 0 params, 1..3 grad terms, 4 backups, 5 exp_avgs, 6 exp_avg_sqs, 7 max_exp_avg_sqs,
//        8 steps
void launch_adamw_step(const Group& g, const StepCommon& s, double beta1, double beta2,
                       double eps, bool amsgrad, void* stream);

// ---- the scalar glue (glue_kernels.cu; the CPU ops and their rules: scalar_glue.cpp) ----
// the kinds of the one-element values finite_and tests
enum ValueKind : int { kValueF32 = 0, kValueF64 = 1, kValueF16 = 2, kValueBF16 = 3, kValueInt = 4 };
constexpr int kMaxFiniteValues = 8;
struct FiniteValues {
  const void* ptr[kMaxFiniteValues] = {};
  int kind[kMaxFiniteValues] = {};
  int n = 0;
};
// out[0] = (ok ? ok[0] : 1) * prod_i [value i finite]  (float32; one thread)
void launch_finite_and(const float* ok, const FiniteValues& v, float* out, void* stream);
// scale[i] = rho[i] * inv, negated[i] = -scale[i] (nullptr: not written), i < n;
// inv = nan_to_num(1 / (norm + 1e-12)) [* factor_t[0] | * factor], in the norm's dtype, then cast
// to rho's (norm, factor_t: float64 where norm_f64; rho, scale, negated: float64 where rho_f64)
struct AscentScaleArgs {
  const void* norm = nullptr;
  bool norm_f64 = false;
  const void* rho = nullptr;
  bool rho_f64 = false;
  int64_t n = 0;
  const void* factor_t = nullptr;
  double factor = 1.0;
  void* scale = nullptr;
  void* negated = nullptr;
};
void launch_ascent_scale(const AscentScaleArgs& a, void* stream);
// counters[0] += ok[0]; counters[1] += 1 - ok[0]  (float32)
void launch_count_step(float* counters, const float* ok, void* stream);

// List slots of the step ops
constexpr int kParams = 0, kGrad0 = 1, kBackups = 4, kBufs = 5, kSgdSteps = 6;
constexpr int kExpAvg = 5, kExpAvgSq = 6, kMaxExpAvgSq = 7, kAdamSteps = 8;

}  // namespace cuda
}  // namespace sam_kernels
