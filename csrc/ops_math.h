// Per-element math of every fused op, shared by the CPU (C++) and CUDA implementations.
//
// Torch-free and CUDA-free: compiled by the host compiler (cpu_ops.cpp) and by nvcc (*.cu), so
// both backends apply the same formulas in the same order, in fp32, as the eager reference in
// sam_kernels/ops/*.py (see the comment on each function for the eager expression it mirrors).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#define SK_UNROLL _Pragma("unroll")
#else
#define SK_HD inline
#define SK_UNROLL
#endif

namespace sam_kernels {

// ---------------------------------------------------------------------------------------------
// Counter-based noise: the noise contract of sam_kernels/ops/philox.py, bit for bit the values of
// the eager backend (torch ops) and of the Triton kernels (sam_kernels/triton/noise.py).
//
// Element j of the concatenated list (tensors in list order; within a tensor memory order where
// the op runs on it in place, which the glue arranges exactly where philox.py says), with the
// int64 seed s and offset o (device tensors, read, never modified: the caller advances the offset):
//   k = o + j (wrapping), counter = (lo32(k), hi32(k), 0, 0), key = (lo32(s), hi32(s)),
//   x0..x3 = Philox4x32-10(counter, key) (Salmon et al., SC 2011; Triton's tl.randint4x words)
//   f(x) = float(v) * 0x1.fffffep-32, v = x < 2^31 ? x : 2^32 - 1 - x   (Triton's conversion)
//   uniform: eps = f(x0) * float(2a) - float(a)
//   normal:  eps = sqrt_rn(-2 log_f32(max(float(1e-7), f(x0)))) * cos2pi_f32(f(x1))
// log_f32 and cos2pi_f32 are the project's own float32 functions (philox.py gives the formulas
// and their accuracy): only exactly rounded IEEE operations, in one fixed order, never
// contracted into an FMA. The host compiler gets -ffp-contract=off (setup.py); the CUDA code
// uses the _rn intrinsics (which nvcc never contracts), through the SK_F* macros below, so that
// host and device share this one source.
// ---------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
#define SK_FADD(a, b) __fadd_rn((a), (b))
#define SK_FSUB(a, b) __fsub_rn((a), (b))
#define SK_FMUL(a, b) __fmul_rn((a), (b))
#define SK_FDIV(a, b) __fdiv_rn((a), (b))
#define SK_FSQRT(a) __fsqrt_rn((a))
#else
#define SK_FADD(a, b) ((a) + (b))
#define SK_FSUB(a, b) ((a) - (b))
#define SK_FMUL(a, b) ((a) * (b))
#define SK_FDIV(a, b) ((a) / (b))
#define SK_FSQRT(a) std::sqrt(static_cast<float>(a))
#endif

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

// the float32 constants of the contract (the hex literals of philox.py)
namespace noise {
constexpr float kUniformScale = 0x1.fffffep-32f;  // float32(4.6566127342e-10)
constexpr float kUMin = 0x1.ad7f2ap-24f;          // float32(1e-7)
constexpr float kSqrt2 = 0x1.6a09e6p+0f;
constexpr float kLn2Hi = 0x1.62e3p-1f;  // 17 significant bits: k * kLn2Hi exact for |k| <= 23
constexpr float kLn2Lo = 0x1.2fefa4p-17f;
constexpr float kLg1 = 0x1.555556p-1f, kLg2 = 0x1.99999ap-2f, kLg3 = 0x1.24924ap-2f,
                kLg4 = 0x1.c71c72p-3f, kLg5 = 0x1.745d18p-3f;  // 2/3, 2/5, ..., 2/11
constexpr float kTwoPi = 0x1.921fb6p+2f;
constexpr float kTwoPiLo = -0x1.777a5cp-23f;  // 2 pi - kTwoPi
constexpr float kC2 = 0x1p-1f, kC4 = 0x1.555556p-5f, kC6 = 0x1.6c16c2p-10f,
                kC8 = 0x1.a01a02p-16f, kC10 = 0x1.27e4fcp-22f;  // 1/2!, ..., 1/10!
constexpr float kS3 = 0x1.555556p-3f, kS5 = 0x1.111112p-7f, kS7 = 0x1.a01a02p-13f,
                kS9 = 0x1.71de3ap-19f;  // 1/3!, ..., 1/9!
}  // namespace noise

SK_HD int32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof(i));
  return i;
#endif
}

SK_HD float bits_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float x;
  std::memcpy(&x, &i, sizeof(x));
  return x;
#endif
}

// log(u) for u in [1e-7, 1): within 0.83 ulp (every float32 u checked against float64)
SK_HD float log_f32(float u) {
  using namespace noise;
  const int32_t i = float_bits(u);
  int32_t e = (i >> 23) - 127;
  float m = bits_float((i & 0x7FFFFF) | 0x3F800000);  // [1, 2)
  const bool big = m > kSqrt2;
  m = big ? SK_FMUL(m, 0.5f) : m;  // (0.707, 1.414], exact
  e = big ? e + 1 : e;
  const float f = SK_FSUB(m, 1.0f);  // exact
  const float s = SK_FDIV(f, SK_FADD(f, 2.0f));
  const float z = SK_FMUL(s, s);
  float p = SK_FADD(kLg4, SK_FMUL(z, kLg5));
  p = SK_FADD(kLg3, SK_FMUL(z, p));
  p = SK_FADD(kLg2, SK_FMUL(z, p));
  p = SK_FADD(kLg1, SK_FMUL(z, p));
  const float r = SK_FMUL(z, p);
  const float h = SK_FMUL(SK_FMUL(f, 0.5f), f);
  const float k = static_cast<float>(e);
  // k * LN2_HI - ((h - (s * (h + r) + k * LN2_LO)) - f)
  const float t = SK_FADD(SK_FMUL(s, SK_FADD(h, r)), SK_FMUL(k, kLn2Lo));
  return SK_FSUB(SK_FMUL(k, kLn2Hi), SK_FSUB(SK_FSUB(h, t), f));
}

// cos(2 pi u) for u in [0, 1): within 1.65 ulps (every float32 u checked against float64)
SK_HD float cos2pi_f32(float u) {
  using namespace noise;
  const int32_t q = static_cast<int32_t>(SK_FADD(SK_FMUL(u, 4.0f), 0.5f));  // truncation: 0..4
  const float f = SK_FSUB(u, SK_FMUL(static_cast<float>(q), 0.25f));          // exact
  const float x = SK_FMUL(f, kTwoPi);
  const float xl = SK_FMUL(f, kTwoPiLo);
  const float z = SK_FMUL(x, x);
  float c = SK_FADD(SK_FMUL(z, -kC10), kC8);
  c = SK_FSUB(SK_FMUL(z, c), kC6);
  c = SK_FADD(SK_FMUL(z, c), kC4);
  c = SK_FSUB(SK_FMUL(z, c), kC2);
  c = SK_FADD(SK_FMUL(z, c), 1.0f);
  float p = SK_FSUB(SK_FMUL(z, kS9), kS7);
  p = SK_FADD(SK_FMUL(z, p), kS5);
  p = SK_FSUB(SK_FMUL(z, p), kS3);
  p = SK_FMUL(z, p);
  const float sn = SK_FADD(x, SK_FADD(xl, SK_FMUL(x, p)));
  // c, -s, -c, s by quadrant, the sign as a product by -1 or 1 (as eager and Triton: zeros
  // included)
  const float v = (q & 1) == 0 ? c : sn;
  return SK_FMUL(v, ((q + 1) & 2) == 0 ? 1.0f : -1.0f);
}

// Triton's uint_to_uniform_float: [0, 1), never 1
SK_HD float uniform_from_word(uint32_t x) {
  const uint32_t v = x >= 0x80000000u ? ~x : x;  // 2^32 - 1 - x
  return SK_FMUL(static_cast<float>(static_cast<int32_t>(v)), noise::kUniformScale);
}

SK_HD float normal_from_uniform(float u1, float u2) {
  u1 = u1 < noise::kUMin ? noise::kUMin : u1;
  return SK_FMUL(SK_FSQRT(SK_FMUL(log_f32(u1), -2.0f)), cos2pi_f32(u2));
}

// The eps of counter k (= offset + j) under seed (kind 0: normal, 1: uniform in [-a, a]).
SK_HD float noise_eps(uint64_t seed, uint64_t k, int kind, float a) {
  U32x4 c;
  c.x[0] = static_cast<uint32_t>(k);
  c.x[1] = static_cast<uint32_t>(k >> 32);
  c.x[2] = 0;
  c.x[3] = 0;
  const U32x4 r = philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  if (kind == 0) return normal_from_uniform(uniform_from_word(r.x[0]), uniform_from_word(r.x[1]));
  // float32(2a) == 2 * float32(a) (scaling by 2 is exact)
  return SK_FSUB(SK_FMUL(uniform_from_word(r.x[0]), SK_FMUL(2.0f, a)), a);
}

// noise_perturb_: b + s * eps, two roundings (eager: eps * s, then + b)
SK_HD float noise_value(float b, float eps, float s) { return SK_FADD(b, SK_FMUL(eps, s)); }

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
  bool amsgrad;
  // maximize, as the word adamw_value flips the gradient's sign bit with (adamw_set_maximize):
  // -g as an integer xor by a loop-invariant word (exactly -g, NaN included), which GCC
  // vectorises, where a select on a flag, in a loop too large to unswitch (AdamW with a combined
  // gradient), kept the loop scalar
  int32_t neg_bits = 0;
};

SK_HD void adamw_set_maximize(AdamWParams& o, bool maximize) {
  o.neg_bits = maximize ? static_cast<int32_t>(0x80000000u) : 0;
}

struct AdamWBias {
  float bc1;       // 1 - beta1^t
  float bc2_sqrt;  // sqrt(1 - beta2^t)
};

// in fp64 from the betas as given (torch's AdamW takes them as Python floats), rounded once:
// from the fp32 rounding of beta2 = 0.9999, 1 - beta2^t would be off by up to 2e-4 relative at
// small t
SK_HD AdamWBias adamw_bias(double beta1, double beta2, double t) {
  AdamWBias b;
  b.bc1 = static_cast<float>(1.0 - pow(beta1, t));
  b.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, t)));
  return b;
}

// torch.optim.AdamW for one element (eager order of operations). m, v, vmax in/out.
SK_HD float adamw_value(float w, float g, float* m, float* v, float* vmax, const AdamWBias& b,
                        const AdamWParams& o) {
  g = bits_float(float_bits(g) ^ o.neg_bits);  // -g where maximizing
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
