// Per-element math of every fused op, shared by the CPU (C++) and CUDA implementations.
//
// Torch-free and CUDA-free: compiled by the host compiler (cpu_ops.cpp) and by nvcc (*.cu), so
// both backends apply the same formulas in the same order, in fp32, as the eager reference in
// sam_kernels/ops/*.py (see the comment on each function for the eager expression it mirrors).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#define SK_UNROLL _Pragma("unroll")
#else
#define SK_HD inline
#define SK_UNROLL
#endif

namespace sam_kernels {

// ---------------------------------------------------------------------------------------------
// Counter-based noise: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC 2011), written out here so that the CPU and CUDA builds produce the same bits.
//
// Noise contract of noise_perturb_ (both devices): for tensor i of the call (its position in the
// list) and element e of that tensor (in memory order), with seed s and offset o (int64 device
// tensors, read, never modified: the caller advances the offset, e.g. by one per sample):
//   counter = (e / 4, i, lo32(o), hi32(o)),  key = (lo32(s), hi32(s))
//   x[0..3] = Philox4x32-10(counter, key);   element e uses lane e % 4.
//   normal:  lanes (0,1) and (2,3) are Box-Muller pairs over u = ((x >> 9) + 0.5) * 2^-23
//            (u in (0, 1), never 0): z0 = r cos(2 pi u1), z1 = r sin(2 pi u1),
//            r = sqrt(-2 log u0)
//   uniform: eps = 2a * u - a with u = (x >> 8) * 2^-24 in [0, 1)
// ---------------------------------------------------------------------------------------------
struct U32x4 {
  uint32_t x[4];
};

SK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

SK_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
SK_UNROLL
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, ctr.x[0], &hi0);
    const uint32_t lo1 = mulhilo32(kM1, ctr.x[2], &hi1);
    U32x4 next;
    next.x[0] = hi1 ^ ctr.x[1] ^ k0;
    next.x[1] = lo1;
    next.x[2] = hi0 ^ ctr.x[3] ^ k1;
    next.x[3] = lo0;
    ctr = next;
  }
  return ctr;
}

// Four noise values for elements 4q .. 4q+3 of tensor `index` (kind 0: normal, 1: uniform).
SK_HD void noise4(uint64_t seed, uint64_t offset, uint32_t index, uint64_t q, int kind, float a,
                  float out[4]) {
  U32x4 c;
  c.x[0] = static_cast<uint32_t>(q);
  c.x[1] = index;
  c.x[2] = static_cast<uint32_t>(offset);
  c.x[3] = static_cast<uint32_t>(offset >> 32);
  // tensors beyond 2^34 elements: fold the high bits of q into the tensor-index word
  c.x[1] ^= static_cast<uint32_t>(q >> 32) << 24;
  const U32x4 r = philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  if (kind == 0) {
SK_UNROLL
    for (int j = 0; j < 4; j += 2) {
      const float u0 = (static_cast<float>(r.x[j] >> 9) + 0.5f) * 1.1920928955078125e-07f;
      const float u1 = (static_cast<float>(r.x[j + 1] >> 9) + 0.5f) * 1.1920928955078125e-07f;
      const float rad = sqrtf(-2.0f * logf(u0));
      const float th = 6.2831853071795864769f * u1;
      out[j] = rad * cosf(th);
      out[j + 1] = rad * sinf(th);
    }
  } else {
SK_UNROLL
    for (int j = 0; j < 4; ++j) {
      const float u = static_cast<float>(r.x[j] >> 8) * 5.9604644775390625e-08f;
      out[j] = (2.0f * a) * u - a;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Element-wise update rules (fp32 in, fp32 out)
// ---------------------------------------------------------------------------------------------

// grad_norm / perturb weight: T(p) * g with T = |p| + eta (ASAM) -- eager: (|p| + eta) * g
SK_HD float weighted(float p, float g, float eta) { return (fabsf(p) + eta) * g; }

// perturb_: p + s * T(p)^2 * g -- eager: t = |p| (+eta); t = t*t; t = t*g; t = t*s; p + t
SK_HD float perturb_value(float p, float g, float s, bool adaptive, float eta) {
  float t = g;
  if (adaptive) {
    float w = fabsf(p) + eta;
    w = w * w;
    t = w * g;
  }
  t = t * s;
  return p + t;
}

// lincomb_ / LinComb gradients: sum_k c_k * t_k, accumulated in term order (eager order)
SK_HD float lincomb_value(const float* c, const float* t, int k) {
  float acc = t[0] * c[0];
  for (int j = 1; j < k; ++j) acc = acc + t[j] * c[j];
  return acc;
}

// torch.lerp(a, b, w) as ATen evaluates it
SK_HD float lerp_value(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

struct SgdParams {
  float lr;  // already read from the device tensor when lr is a tensor
  float momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// torch.optim.SGD for one element. `first` = this tensor has had no step applied yet
// (steps == 0): the buffer starts at g (coefficient 1 instead of 1 - dampening).
// w: the weight the step starts from; buf: in/out momentum buffer. Returns the new weight.
SK_HD float sgd_value(float w, float g, float* buf, float coef, const SgdParams& o) {
  if (o.maximize) g = -g;
  if (o.weight_decay != 0.0f) g = g + o.weight_decay * w;
  float d = g;
  if (o.momentum != 0.0f) {
    const float nb = o.momentum * *buf + g * coef;
    *buf = nb;
    d = o.nesterov ? g + o.momentum * nb : nb;
  }
  return w + (-o.lr) * d;
}

// SGD's coefficient of g in the new buffer: 1 on the tensor's first step, else 1 - dampening
// (eager: first = clamp(1 - steps, 0); coef = first * dampening + (1 - dampening)).
SK_HD float sgd_coef(float steps, float dampening) {
  float first = 1.0f - steps;
  first = first > 0.0f ? first : 0.0f;
  return first * dampening + (1.0f - dampening);
}

struct AdamWParams {
  float lr, beta1, beta2, eps;
  float decay;        // 1 - lr * weight_decay
  float lerp_weight;  // 1 - beta1
  float one_minus_beta2;
  bool amsgrad, maximize;
};

struct AdamWBias {
  float bc1;       // 1 - beta1^t
  float bc2_sqrt;  // sqrt(1 - beta2^t)
};

SK_HD AdamWBias adamw_bias(float beta1, float beta2, float t) {
  AdamWBias b;
  b.bc1 = 1.0f - powf(beta1, t);
  b.bc2_sqrt = sqrtf(1.0f - powf(beta2, t));
  return b;
}

// torch.optim.AdamW for one element (eager order of operations). m, v, vmax in/out.
SK_HD float adamw_value(float w, float g, float* m, float* v, float* vmax, const AdamWBias& b,
                        const AdamWParams& o) {
  if (o.maximize) g = -g;
  const float nw = w * o.decay;
  const float nm = lerp_value(*m, g, o.lerp_weight);
  const float nv = *v * o.beta2 + (o.one_minus_beta2 * g) * g;
  float den_src = nv;
  if (o.amsgrad) {
    const float mx = *vmax > nv ? *vmax : nv;
    // NaN-propagating like torch.maximum
    *vmax = (*vmax != *vmax) ? *vmax : ((nv != nv) ? nv : mx);
    den_src = *vmax;
  }
  float den = sqrtf(den_src) / b.bc2_sqrt + o.eps;
  den = den * b.bc1;
  const float upd = (nm / den) * (-o.lr);
  *m = nm;
  *v = nv;
  return nw + upd;
}

// AE-SAM: statistics update and decision from s = ||g||^2 (fp32, eager order).
// stats = [mu, var]; returns 1 (SAM), 0 (ERM) or -1 (s not finite: stats unchanged).
SK_HD int aesam_update(float s, float* stats, float delta, float c) {
  const float one_minus = static_cast<float>(1.0 - static_cast<double>(delta));
  const float mu = delta * stats[0] + one_minus * s;
  const float dv = s - mu;
  const float var = delta * stats[1] + one_minus * (dv * dv);
  const bool finite = (s - s) == 0.0f;  // false for inf and nan
  if (!finite) return -1;
  const bool use_sam = s >= mu + c * sqrtf(var);
  stats[0] = mu;
  stats[1] = var;
  return use_sam ? 1 : 0;
}

}  // namespace sam_kernels
