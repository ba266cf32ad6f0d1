// Element-wise multi-tensor ops: perturb with backup, noise perturb (the counter noise contract),
// restore, linear combination of gradient lists, Frob-SAM accumulation. One launch per dtype
// group.
#include "multi_tensor.cuh"

namespace sam_kernels {
namespace cuda {

#define SK_CHUNK_LOOP(i, c) \
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < (c).len; \
       i += static_cast<int64_t>(kThreads) * kVec)

// ---- perturb: b = p;  p += s * T(p)^2 * g   (save_backup false: p = b + s * T(b)^2 * g) ----
template <typename T>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const __grid_constant__ Meta<3> m, const float* scale, int scale_stride,
                   bool adaptive, float eta, bool save) {
  const ChunkLoc c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.start;
  const T* g = static_cast<const T*>(m.ptr[1][c.t]) + c.start;
  T* b = static_cast<T*>(m.ptr[2][c.t]) + c.start;
  const bool vec = is_aligned<T>(p) && is_aligned<T>(g) && is_aligned<T>(b);
  const float s = scale[static_cast<int64_t>(m.index[c.t]) * scale_stride];
  SK_CHUNK_LOOP(i, c) {
    T praw[kVec];
    float gv[kVec], out[kVec];
    if (save) {
      load_raw(p, i, c.len, vec, praw);
      store_raw(b, i, c.len, vec, praw);
    } else {
      load_raw(b, i, c.len, vec, praw);
    }
    load_f(g, i, c.len, vec, gv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = perturb_value(to_f(praw[j]), gv[j], s, adaptive, eta);
    store_f(p, i, c.len, vec, out);
  }
}

void launch_perturb(const Group& g, const float* scale, int scale_stride, bool adaptive,
                    float eta, bool save, void* stream) {
  const int ids[3] = {0, 1, 2};
  dispatch_dtype(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_table<3>(g, ids, [&](const Meta<3>& m, int blocks, int64_t) {
      if (blocks == 0) return;
      perturb_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(m, scale, scale_stride,
                                                                     adaptive, eta, save);
      check_cuda(cudaGetLastError(), "perturb");
    });
  });
}

// ---- noise perturb: (b = p;)  p = b + s * eps,  eps: the noise contract (ops_math.h) ----
// element e of table slot t takes counter offset + first[t] + e (its index in the caller's
// concatenated list): the eager and Triton values, bit for bit (no contraction: the _rn
// intrinsics of ops_math.h)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    noise_perturb_kernel(const __grid_constant__ Meta<2, true> m, const float* scale,
                         int scale_stride, int kind, float a, bool save_backup,
                         const int64_t* seed_p, const int64_t* offset_p) {
  const ChunkLoc c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.start;
  T* b = static_cast<T*>(m.ptr[1][c.t]) + c.start;
  const bool vec = is_aligned<T>(p) && is_aligned<T>(b);
  const float s = scale[static_cast<int64_t>(m.index[c.t]) * scale_stride];
  const uint64_t seed = static_cast<uint64_t>(*seed_p);
  const uint64_t k0 = static_cast<uint64_t>(*offset_p) + static_cast<uint64_t>(m.first[c.t]) +
                      static_cast<uint64_t>(c.start);
  SK_CHUNK_LOOP(i, c) {
    T wraw[kVec];
    if (save_backup) {
      load_raw(p, i, c.len, vec, wraw);
      store_raw(b, i, c.len, vec, wraw);
    } else {
      load_raw(b, i, c.len, vec, wraw);
    }
    float out[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float eps = noise_eps(seed, k0 + static_cast<uint64_t>(i + j), kind, a);
      out[j] = noise_value(to_f(wraw[j]), eps, s);
    }
    store_f(p, i, c.len, vec, out);
  }
}

void launch_noise_perturb(const Group& g, const float* scale, int scale_stride, int kind,
                          float half_cube_len, bool save_backup, const int64_t* seed,
                          const int64_t* offset, void* stream) {
  const int ids[2] = {0, 1};
  dispatch_dtype(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_table<2, true>(g, ids, [&](const Meta<2, true>& m, int blocks, int64_t) {
      if (blocks == 0) return;
      noise_perturb_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(
          m, scale, scale_stride, kind, half_cube_len, save_backup, seed, offset);
      check_cuda(cudaGetLastError(), "noise_perturb");
    });
  });
}

// ---- restore: p = b, bit for bit ----
template <typename T>
__global__ void __launch_bounds__(kThreads) restore_kernel(const __grid_constant__ Meta<2> m) {
  const ChunkLoc c = locate(m);
  T* p = static_cast<T*>(m.ptr[0][c.t]) + c.start;
  const T* b = static_cast<const T*>(m.ptr[1][c.t]) + c.start;
  const bool vec = is_aligned<T>(p) && is_aligned<T>(b);
  SK_CHUNK_LOOP(i, c) {
    T r[kVec];
    load_raw(b, i, c.len, vec, r);
    store_raw(p, i, c.len, vec, r);
  }
}

void launch_restore(const Group& g, void* stream) {
  const int ids[2] = {0, 1};
  dispatch_dtype(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_table<2>(g, ids, [&](const Meta<2>& m, int blocks, int64_t) {
      if (blocks == 0) return;
      restore_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(m);
      check_cuda(cudaGetLastError(), "restore");
    });
  });
}

// ---- lincomb: out = sum_k c_k * t_k (out may alias a term: each element is read first) ----
constexpr int kMaxTerms = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lincomb_kernel(const __grid_constant__ Meta<1 + kMaxTerms> m, Coefs cf) {
  const ChunkLoc c = locate(m);
  T* out = static_cast<T*>(m.ptr[0][c.t]) + c.start;
  const T* terms[kMaxTerms];
  bool vec = is_aligned<T>(out);
  float coef[kMaxTerms];
  const int64_t index = m.index[c.t];
#pragma unroll
  for (int k = 0; k < kMaxTerms; ++k) {
    terms[k] = k < cf.k ? static_cast<const T*>(m.ptr[1 + k][c.t]) + c.start : nullptr;
    vec = vec && is_aligned<T>(terms[k]);
    coef[k] = k < cf.k ? cf.ptr[k * cf.k_stride + index * cf.n_stride] : 0.0f;
  }
  SK_CHUNK_LOOP(i, c) {
    float tv[kMaxTerms][kVec];
#pragma unroll
    for (int k = 0; k < kMaxTerms; ++k) {
      if (k < cf.k) load_f(terms[k], i, c.len, vec, tv[k]);
    }
    float o[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float t[kMaxTerms];
#pragma unroll
      for (int k = 0; k < kMaxTerms; ++k) t[k] = k < cf.k ? tv[k][j] : 0.0f;
      o[j] = lincomb_value(coef, t, cf.k);
    }
    store_f(out, i, c.len, vec, o);
  }
}

void launch_lincomb(const Group& g, const Coefs& cf, void* stream) {
  if (cf.k < 1 || cf.k > kMaxTerms || cf.ptr == nullptr) {
    throw std::runtime_error("sam_kernels: lincomb takes 1 to 4 terms with coefficients");
  }
  const int ids[1 + kMaxTerms] = {0, 1, 2, 3, 4};
  dispatch_dtype(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_table<1 + kMaxTerms>(g, ids, [&](const Meta<1 + kMaxTerms>& m, int blocks, int64_t) {
      if (blocks == 0) return;
      lincomb_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(m, cf);
      check_cuda(cudaGetLastError(), "lincomb");
    });
  });
}

// ---- Frob-SAM accumulation: cross += L * g;  gsum += g   (init: from zero, not read) ----
template <typename T>
__global__ void __launch_bounds__(kThreads)
    frob_kernel(const __grid_constant__ Meta<3> m, const float* loss_p, bool init) {
  const ChunkLoc c = locate(m);
  T* cross = static_cast<T*>(m.ptr[0][c.t]) + c.start;
  T* gsum = static_cast<T*>(m.ptr[1][c.t]) + c.start;
  const T* g = static_cast<const T*>(m.ptr[2][c.t]) + c.start;
  const bool vec = is_aligned<T>(cross) && is_aligned<T>(gsum) && is_aligned<T>(g);
  const float loss = *loss_p;
  SK_CHUNK_LOOP(i, c) {
    float cv[kVec], sv[kVec], gv[kVec];
    if (init) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) cv[j] = sv[j] = 0.0f;
    } else {
      load_f(cross, i, c.len, vec, cv);
      load_f(gsum, i, c.len, vec, sv);
    }
    load_f(g, i, c.len, vec, gv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      cv[j] = cv[j] + gv[j] * loss;
      sv[j] = sv[j] + gv[j];
    }
    store_f(cross, i, c.len, vec, cv);
    store_f(gsum, i, c.len, vec, sv);
  }
}

void launch_frob_accumulate(const Group& g, const float* loss, bool init, void* stream) {
  const int ids[3] = {0, 1, 2};
  dispatch_dtype(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_table<3>(g, ids, [&](const Meta<3>& m, int blocks, int64_t) {
      if (blocks == 0) return;
      frob_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(m, loss, init);
      check_cuda(cudaGetLastError(), "frob_accumulate");
    });
  });
}

}  // namespace cuda
}  // namespace sam_kernels
