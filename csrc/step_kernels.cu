// Optimizer steps with the restore fused in (the step reads the saved weights), gated by a device
// ok flag: torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize) and
// torch.optim.AdamW (amsgrad, maximize), with per-tensor device step counters. The gradient may
// be a linear combination of up to three gradient lists (CR-SAM, Frob/Trace/Det-SAM), combined in
// the same pass.
//
// Two launches per group: the update (reads each tensor's step counter), then a tiny kernel that
// adds ok to the counters (a block cannot bump a counter other blocks of the tensor still read).
#include "multi_tensor.cuh"

namespace sam_kernels {
namespace cuda {

constexpr int kMaxGradTerms = 3;

#define SK_CHUNK_LOOP(i, c) \
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < (c).len; \
       i += static_cast<int64_t>(kThreads) * kVec)

struct GradTerms {
  float coef[kMaxGradTerms];
  int k;
};

__device__ __forceinline__ GradTerms grad_terms(const Coefs& cf, int64_t index) {
  GradTerms g;
  g.k = cf.ptr == nullptr ? 1 : cf.k;
#pragma unroll
  for (int k = 0; k < kMaxGradTerms; ++k) {
    g.coef[k] = (cf.ptr == nullptr) ? (k == 0 ? 1.0f : 0.0f)
                : (k < cf.k ? cf.ptr[k * cf.k_stride + index * cf.n_stride] : 0.0f);
  }
  return g;
}

// Load the gradient (combined) of kVec elements.
template <typename T>
__device__ __forceinline__ void load_grad(const T* const (&gp)[kMaxGradTerms], const GradTerms& gt,
                                          bool plain, int64_t i, int64_t len, bool vec,
                                          float (&out)[kVec]) {
  if (plain) {
    load_f(gp[0], i, len, vec, out);
    return;
  }
  float tv[kMaxGradTerms][kVec];
#pragma unroll
  for (int k = 0; k < kMaxGradTerms; ++k) {
    if (k < gt.k) {
      load_f(gp[k], i, len, vec, tv[k]);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) tv[k][j] = 0.0f;
    }
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    float t[kMaxGradTerms];
#pragma unroll
    for (int k = 0; k < kMaxGradTerms; ++k) t[k] = tv[k][j];
    out[j] = lincomb_value(gt.coef, t, gt.k);
  }
}

// When the step is skipped: params = backups (if stepping from backups), nothing else changes.
template <typename T, int NL>
__device__ __forceinline__ void skip_chunk(const Meta<NL>& m, const ChunkLoc& c) {
  if (m.ptr[kBackups][c.t] == nullptr) return;
  T* p = static_cast<T*>(m.ptr[kParams][c.t]) + c.start;
  const T* b = static_cast<const T*>(m.ptr[kBackups][c.t]) + c.start;
  const bool vec = is_aligned<T>(p) && is_aligned<T>(b);
  SK_CHUNK_LOOP(i, c) {
    T r[kVec];
    load_raw(b, i, c.len, vec, r);
    store_raw(p, i, c.len, vec, r);
  }
}

template <int NL>
__global__ void steps_add_kernel(const __grid_constant__ Meta<NL> m, int slot, const float* ok) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= m.n) return;
  float* s = static_cast<float*>(m.ptr[slot][t]);
  s[0] = s[0] + (ok != nullptr ? ok[0] : 1.0f);
}

// ---- SGD ----
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const __grid_constant__ Meta<7> m, StepCommon sc, float momentum, float dampening,
               bool nesterov) {
  const ChunkLoc c = locate(m);
  if (sc.ok != nullptr && sc.ok[0] == 0.0f) {
    skip_chunk<T>(m, c);
    return;
  }
  T* p = static_cast<T*>(m.ptr[kParams][c.t]) + c.start;
  const T* w = m.ptr[kBackups][c.t] ? static_cast<const T*>(m.ptr[kBackups][c.t]) + c.start : p;
  T* buf = m.ptr[kBufs][c.t] ? static_cast<T*>(m.ptr[kBufs][c.t]) + c.start : nullptr;
  const T* gp[kMaxGradTerms];
  bool vec = is_aligned<T>(p) && is_aligned<T>(w) && is_aligned<T>(buf);
  const GradTerms gt = grad_terms(sc.coefs, m.index[c.t]);
#pragma unroll
  for (int k = 0; k < kMaxGradTerms; ++k) {
    gp[k] = k < gt.k ? static_cast<const T*>(m.ptr[kGrad0 + k][c.t]) + c.start : nullptr;
    vec = vec && is_aligned<T>(gp[k]);
  }
  const bool plain = sc.coefs.ptr == nullptr;
  SgdParams o;
  o.lr = sc.lr_ptr != nullptr ? sc.lr_ptr[0] : static_cast<float>(sc.lr);
  o.momentum = momentum;
  o.dampening = dampening;
  o.weight_decay = static_cast<float>(sc.weight_decay);
  o.nesterov = nesterov;
  o.maximize = sc.maximize;
  const bool use_buf = momentum != 0.0f && buf != nullptr;
  const float coef = use_buf ? sgd_coef(static_cast<const float*>(m.ptr[kSgdSteps][c.t])[0],
                                        dampening)
                             : 1.0f;
  SK_CHUNK_LOOP(i, c) {
    float wv[kVec], gv[kVec], bv[kVec], out[kVec];
    load_f(w, i, c.len, vec, wv);
    load_grad(gp, gt, plain, i, c.len, vec, gv);
    if (use_buf) load_f(buf, i, c.len, vec, bv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = sgd_value(wv[j], gv[j], &bv[j], coef, o);
    store_f(p, i, c.len, vec, out);
    if (use_buf) store_f(buf, i, c.len, vec, bv);
  }
}

void launch_sgd_step(const Group& g, const StepCommon& s, double momentum, double dampening,
                     bool nesterov, void* stream) {
  if (s.coefs.ptr != nullptr && (s.coefs.k < 1 || s.coefs.k > kMaxGradTerms)) {
    throw std::runtime_error("sam_kernels: a step's gradient combines 1 to 3 terms");
  }
  const int ids[7] = {0, 1, 2, 3, 4, 5, 6};
  dispatch_dtype(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_table<7>(g, ids, [&](const Meta<7>& m, int blocks, int64_t) {
      if (blocks > 0) {
        sgd_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(
            m, s, static_cast<float>(momentum), static_cast<float>(dampening), nesterov);
        check_cuda(cudaGetLastError(), "sgd_step");
      }
      steps_add_kernel<7><<<(m.n + 127) / 128, 128, 0, as_stream(stream)>>>(m, kSgdSteps, s.ok);
      check_cuda(cudaGetLastError(), "sgd_step counters");
    });
  });
}

// ---- AdamW ----
template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const __grid_constant__ Meta<9> m, StepCommon sc, double beta1, double beta2,
                 float eps, bool amsgrad) {
  const ChunkLoc c = locate(m);
  if (sc.ok != nullptr && sc.ok[0] == 0.0f) {
    skip_chunk<T>(m, c);
    return;
  }
  T* p = static_cast<T*>(m.ptr[kParams][c.t]) + c.start;
  const T* w = m.ptr[kBackups][c.t] ? static_cast<const T*>(m.ptr[kBackups][c.t]) + c.start : p;
  T* ea = static_cast<T*>(m.ptr[kExpAvg][c.t]) + c.start;
  T* eas = static_cast<T*>(m.ptr[kExpAvgSq][c.t]) + c.start;
  T* mx = amsgrad ? static_cast<T*>(m.ptr[kMaxExpAvgSq][c.t]) + c.start : nullptr;
  const T* gp[kMaxGradTerms];
  bool vec = is_aligned<T>(p) && is_aligned<T>(w) && is_aligned<T>(ea) && is_aligned<T>(eas) &&
             is_aligned<T>(mx);
  const GradTerms gt = grad_terms(sc.coefs, m.index[c.t]);
#pragma unroll
  for (int k = 0; k < kMaxGradTerms; ++k) {
    gp[k] = k < gt.k ? static_cast<const T*>(m.ptr[kGrad0 + k][c.t]) + c.start : nullptr;
    vec = vec && is_aligned<T>(gp[k]);
  }
  const bool plain = sc.coefs.ptr == nullptr;
  const float steps = static_cast<const float*>(m.ptr[kAdamSteps][c.t])[0];
  const AdamWBias bias = adamw_bias(beta1, beta2, static_cast<double>(steps) + 1.0);
  AdamWParams o;
  if (sc.lr_ptr != nullptr) {
    o.lr = sc.lr_ptr[0];
    o.decay = 1.0f - o.lr * static_cast<float>(sc.weight_decay);
  } else {
    o.lr = static_cast<float>(sc.lr);
    o.decay = static_cast<float>(1.0 - sc.lr * sc.weight_decay);
  }
  // (as the CPU kernels: 1 - beta from the fp64 beta, where 1 - fp32(beta2) was off by 1.3e-5
  // relative for beta2 = 0.999)
  o.beta1 = static_cast<float>(beta1);
  o.beta2 = static_cast<float>(beta2);
  o.eps = eps;
  o.lerp_weight = static_cast<float>(1.0 - beta1);
  o.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  o.amsgrad = amsgrad;
  adamw_set_maximize(o, sc.maximize);
  SK_CHUNK_LOOP(i, c) {
    float wv[kVec], gv[kVec], mv[kVec], vv[kVec], xv[kVec], out[kVec];
    load_f(w, i, c.len, vec, wv);
    load_grad(gp, gt, plain, i, c.len, vec, gv);
    load_f(ea, i, c.len, vec, mv);
    load_f(eas, i, c.len, vec, vv);
    if (amsgrad) {
      load_f(mx, i, c.len, vec, xv);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) xv[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = adamw_value(wv[j], gv[j], &mv[j], &vv[j], &xv[j], bias, o);
    store_f(p, i, c.len, vec, out);
    store_f(ea, i, c.len, vec, mv);
    store_f(eas, i, c.len, vec, vv);
    if (amsgrad) store_f(mx, i, c.len, vec, xv);
  }
}

void launch_adamw_step(const Group& g, const StepCommon& s, double beta1, double beta2,
                       double eps, bool amsgrad, void* stream) {
  if (s.coefs.ptr != nullptr && (s.coefs.k < 1 || s.coefs.k > kMaxGradTerms)) {
    throw std::runtime_error("sam_kernels: a step's gradient combines 1 to 3 terms");
  }
  const int ids[9] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  dispatch_dtype(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_table<9>(g, ids, [&](const Meta<9>& m, int blocks, int64_t) {
      if (blocks > 0) {
        adamw_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(
            m, s, beta1, beta2, static_cast<float>(eps), amsgrad);
        check_cuda(cudaGetLastError(), "adamw_step");
      }
      steps_add_kernel<9><<<(m.n + 127) / 128, 128, 0, as_stream(stream)>>>(m, kAdamSteps, s.ok);
      check_cuda(cudaGetLastError(), "adamw_step counters");
    });
  });
}

}  // namespace cuda
}  // namespace sam_kernels
