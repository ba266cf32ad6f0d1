// CPU implementations of the fused ops (but filter_noise_perturb_, cpu_filter_noise.cpp): loops
// over fixed-size chunks of every tensor, the chunks spread over threads, fp32 math (the
// formulas of ops_math.h, shared with the CUDA kernels), bf16/fp16 converted with the c10 types.
// The chunking, vectorisation and reductions are cpu_kernels.h's (its comment says how results
// stay bit-identical to scalar loops and independent of the thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "glue.h"
#include "ops_math.h"

namespace sam_kernels {
namespace {

using namespace cpu;

// the sum of the terms of the lists x = p.lists[0] (and y = p.lists[1]), in chunk order
double sum_lists(const Prepared& p, Sum kind, float eta) {
  const auto chunks = make_chunks(p.lists[0]);
  std::vector<double> partial(chunks.size(), 0.0);
  chunk_sums(p.lists[0], p.has(1) ? p.lists[1] : at::TensorList(), chunks, kind, eta, partial.data());
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

at::Tensor grad_norm_cpu(at::TensorList grads, at::TensorList params, double eta) {
  Prepared p = prepare_lists("grad_norm",
                             {{"grads", grads, Access::kRead, true},
                              {"params", params, Access::kRead, false}},
                             kCpu);
  const double s = sum_lists(p, p.has(1) ? Sum::kWeightedSquares : Sum::kSquares,
                             static_cast<float>(eta));
  return at::full({}, static_cast<float>(std::sqrt(s)), at::TensorOptions().dtype(at::kFloat));
}

at::Tensor aesam_stats_cpu(at::TensorList grads, const at::Tensor& stats, double delta,
                           double c) {
  TORCH_CHECK(stats.numel() == 2 && stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
                  stats.device().is_cpu(),
              "sam_kernels.aesam_stats: stats must be a contiguous float32 [2] tensor on the "
              "grads' device");
  Prepared p = prepare_lists("aesam_stats", {{"grads", grads, Access::kRead, true}}, kCpu);
  const float s = static_cast<float>(sum_lists(p, Sum::kSquares, 0.0f));
  const int d = aesam_update(s, stats.data_ptr<float>(), static_cast<float>(delta),
                             static_cast<float>(c));
  return at::full({}, d, at::TensorOptions().dtype(at::kInt));
}

// dot: sum_i <a_i, b_i> as a 0-d fp64 tensor, the products and sums in fp64 (sum_lists: fixed
// chunks, each summed in a fixed order, the chunk sums added in chunk order: the same bits
// whatever the thread count). A pair of different dtypes (fp32 with bf16, ...) is read through
// fp32 copies of both: exact (fp32 holds every bf16/fp16 value), so the products do not change,
// and the kernels keep one dtype per index.
at::Tensor dot_cpu(at::TensorList a, at::TensorList b) {
  const char* op = "dot";
  TORCH_CHECK(a.size() == b.size(), "sam_kernels.dot: b has ", b.size(), " tensors, expected ",
              a.size(), " (as a)");
  std::vector<at::Tensor> a32, b32;
  at::TensorList la = a, lb = b;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].scalar_type() == b[i].scalar_type()) continue;
    if (a32.empty()) {
      a32.assign(a.begin(), a.end());
      b32.assign(b.begin(), b.end());
      la = a32;
      lb = b32;
    }
    TORCH_CHECK(supported_dtype(a[i].scalar_type()) && supported_dtype(b[i].scalar_type()),
                "sam_kernels.dot: the compiled ops take float32, float16 or bfloat16 tensors, got ",
                a[i].scalar_type(), " and ", b[i].scalar_type(), " (a[", i, "], b[", i, "])");
    a32[i] = a[i].to(at::kFloat);
    b32[i] = b[i].to(at::kFloat);
  }
  Prepared p =
      prepare_lists(op, {{"a", la, Access::kRead, true}, {"b", lb, Access::kRead, true}}, kCpu);
  const double s = sum_lists(p, Sum::kProducts, 0.0f);
  return at::full({}, s, at::TensorOptions().dtype(at::kDouble));
}

// ------------------------------------------------------------------ element-wise
// (the pointers of one element index may alias one another, e.g. in-place steps: the simd loops
// only need distinct indices not to overlap)
// Streaming stores. An output that the kernel writes without reading (the backup of perturb,
// the weights of a step that restores them from the backup) would otherwise be read into the
// cache first (a read-for-ownership: one more stream of traffic than the op needs). Each block is
// copied out with non-temporal stores, which write whole lines without reading them, from where
// it is in L1 (perturb's weights, just read; a step's new weights, computed into a buffer on the
// stack). fp32 outputs aligned to 16 bytes on x86; others (and the tail) use plain stores. The
// values are the same; only the order of memory traffic changes.
//
// Where the CPU has AVX-512, fp32 blocks aligned to 64 bytes are written one whole line per
// store (stream_lines_avx512): measured 2-7% faster per op than 16-byte stores (perturb_ and
// the SGD step from backups, ResNet-50's shapes, 1 thread), presumably because a partly written
// line holds a line fill buffer, the resource that also bounds the reads, until it is complete.
// It is a call, not inlined: the kernels around it are compiled for AVX2 at most.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"), noinline)) void stream_lines_avx512(float* dst, const float* src,
                                                                      int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}
#endif

template <typename T>
inline void store_block(T* dst, const T* src, int64_t n) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (kHasAvx512 && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
      stream_lines_avx512(dst, src, n);
      return;
    }
#endif
    if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
      for (; i < n; ++i) dst[i] = src[i];
      return;
    }
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
}

// makes the streaming stores of this thread visible before the op returns (they are weakly
// ordered with respect to other cores' reads)
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename T, bool kAdaptive>
SK_KERNEL void perturb_chunk(T* w, const T* g, T* b, int64_t n, float s, float e) {
  for (int64_t i0 = 0; i0 < n; i0 += kStoreBlock) {
    const int64_t m = std::min(n - i0, kStoreBlock);
    T* wi = w + i0;
    const T* gi = g + i0;
    prefetch<kStoreBlock>(w, i0);
    prefetch<kStoreBlock>(g, i0);
    // the backup first, streamed straight from the weights, which the loop below then reads from
    // L1 (copied through a stack buffer instead, the copy was turned into `rep movsq`: 2.5x
    // slower with 128-element blocks)
    store_block(b + i0, wi, m);
    SK_SIMD
    for (int64_t i = 0; i < m; ++i) {
      wi[i] = static_cast<T>(perturb_value(f32(wi[i]), f32(gi[i]), s, kAdaptive, e));
    }
  }
  store_fence();
}

// without the backup's save: w = b + s * T(b)^2 * g, b read (w written without being read, so
// streamed like a step's weights, see step_blocks)
template <typename T, bool kAdaptive>
SK_KERNEL void perturb_from_chunk(T* w, const T* g, const T* b, int64_t n, float s, float e) {
  alignas(64) T out[kStoreBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kStoreBlock) {
    const int64_t m = std::min(n - i0, kStoreBlock);
    const T* gi = g + i0;
    const T* bi = b + i0;
    prefetch<kStoreBlock>(b, i0);
    prefetch<kStoreBlock>(g, i0);
    SK_SIMD
    for (int64_t i = 0; i < m; ++i) {
      out[i] = static_cast<T>(perturb_value(f32(bi[i]), f32(gi[i]), s, kAdaptive, e));
    }
    store_block(w + i0, out, m);
  }
  store_fence();
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 const at::Tensor& scale, bool adaptive, double eta, bool save_backup) {
  const char* op = "perturb";
  Prepared p = prepare_lists(
      op,
      {{"params", params, save_backup ? Access::kReadWrite : Access::kWrite, true},
       {"grads", grads, Access::kRead, true},
       {"backups", backups, save_backup ? Access::kWrite : Access::kRead, true}},
      kCpu);
  if (p.n == 0) return;
  const int stride = scalar_or_vector(op, "scale", scale, p.n, kCpu);
  const float* sc = scale.data_ptr<float>();
  const float e = static_cast<float>(eta);
  parallel_chunks(make_chunks(p.lists[0]), [&](const Chunk& c) {
    dispatch(p.lists[0][c.t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* w = ptr<T>(p.lists[0][c.t], c.start);
      const T* g = ptr<T>(p.lists[1][c.t], c.start);
      T* b = ptr<T>(p.lists[2][c.t], c.start);
      const float s = sc[c.t * stride];
      if (!save_backup) {
        if (adaptive) {
          run_kernel([&] { perturb_from_chunk<T, true>(w, g, b, c.len, s, e); });
        } else {
          run_kernel([&] { perturb_from_chunk<T, false>(w, g, b, c.len, s, e); });
        }
      } else if (adaptive) {
        run_kernel([&] { perturb_chunk<T, true>(w, g, b, c.len, s, e); });
      } else {
        run_kernel([&] { perturb_chunk<T, false>(w, g, b, c.len, s, e); });
      }
    });
  });
  p.finish();
}

// noise_perturb_: eps of counters k0 .. k0 + n - 1 (ops_math.h noise_eps: the noise contract),
// a block at a time into a stack buffer, then (b = w;) w = b + s * eps. Every float operation is
// an exactly rounded one and none is contracted (-ffp-contract=off), so the simd and AVX2 copies
// give the scalar formula's bits.
template <typename T, bool kSave, int kKind>
SK_KERNEL void noise_chunk(T* w, T* b, int64_t n, uint64_t seed, uint64_t k0, float a, float s) {
  float eps[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min(n - i0, kBlock);
    const uint64_t k = k0 + static_cast<uint64_t>(i0);
    SK_SIMD
    for (int64_t i = 0; i < m; ++i) eps[i] = noise_eps(seed, k + static_cast<uint64_t>(i), kKind, a);
    T* wi = w + i0;
    T* bi = b + i0;
    SK_SIMD
    for (int64_t i = 0; i < m; ++i) {
      T raw;
      if constexpr (kSave) {
        raw = wi[i];
        bi[i] = raw;
      } else {
        raw = bi[i];
      }
      wi[i] = static_cast<T>(noise_value(f32(raw), eps[i], s));
    }
  }
}

void noise_perturb_cpu(at::TensorList params, at::TensorList backups, const at::Tensor& scale,
                       int64_t kind, double half_cube_len, bool save_backup,
                       const at::Tensor& seed, const at::Tensor& offset) {
  const char* op = "noise_perturb";
  // tensors used in place (same dense layout) take their counters in memory order, contiguous
  // stand-ins in logical order: the element order of the contract (philox.py memory_order)
  Prepared p = prepare_lists(
      op,
      {{"params", params, save_backup ? Access::kReadWrite : Access::kWrite, true},
       {"backups", backups, save_backup ? Access::kWrite : Access::kRead, true}},
      kCpu);
  if (p.n == 0) return;
  TORCH_CHECK(kind == 0 || kind == 1, "sam_kernels.noise_perturb: kind must be 0 or 1");
  const int stride = scalar_or_vector(op, "scale", scale, p.n, kCpu);
  check_scalar(op, "seed", seed, at::kLong, kCpu);
  check_scalar(op, "offset", offset, at::kLong, kCpu);
  const float* sc = scale.data_ptr<float>();
  const uint64_t sd = static_cast<uint64_t>(seed.data_ptr<int64_t>()[0]);
  const uint64_t off = static_cast<uint64_t>(offset.data_ptr<int64_t>()[0]);
  const float a = static_cast<float>(half_cube_len);
  // counter of each tensor's element 0: the offset plus the elements of the tensors before it
  std::vector<uint64_t> first(p.n);
  uint64_t acc = off;
  for (int64_t t = 0; t < p.n; ++t) {
    first[t] = acc;
    acc += static_cast<uint64_t>(p.lists[0][t].numel());
  }
  parallel_chunks(make_chunks(p.lists[0]), [&](const Chunk& c) {
    dispatch(p.lists[0][c.t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* w = ptr<T>(p.lists[0][c.t], c.start);
      T* b = ptr<T>(p.lists[1][c.t], c.start);
      const float s = sc[c.t * stride];
      const uint64_t k0 = first[c.t] + static_cast<uint64_t>(c.start);
      if (save_backup) {
        if (kind == 0) {
          run_compute_kernel([&] { noise_chunk<T, true, 0>(w, b, c.len, sd, k0, a, s); });
        } else {
          run_compute_kernel([&] { noise_chunk<T, true, 1>(w, b, c.len, sd, k0, a, s); });
        }
      } else if (kind == 0) {
        run_compute_kernel([&] { noise_chunk<T, false, 0>(w, b, c.len, sd, k0, a, s); });
      } else {
        run_compute_kernel([&] { noise_chunk<T, false, 1>(w, b, c.len, sd, k0, a, s); });
      }
    });
  });
  p.finish();
}

void restore_cpu(at::TensorList params, at::TensorList backups) {
  Prepared p = prepare_lists("restore",
                             {{"params", params, Access::kWrite, true},
                              {"backups", backups, Access::kRead, true}},
                             kCpu);
  if (p.n == 0) return;
  parallel_chunks(make_chunks(p.lists[0]), [&](const Chunk& c) {
    const int64_t es = p.lists[0][c.t].element_size();
    std::memcpy(static_cast<char*>(p.lists[0][c.t].data_ptr()) + c.start * es,
                static_cast<const char*>(p.lists[1][c.t].data_ptr()) + c.start * es, c.len * es);
  });
  p.finish();
}

template <typename T, int K>
SK_KERNEL void lincomb_chunk(T* o, const T* const* tp, const float* co, int64_t n) {
  const T* t[K];
  float cf[K];
  for (int k = 0; k < K; ++k) {
    t[k] = tp[k];
    cf[k] = co[k];
  }
  blocked(
      n,
      [&](int64_t i0) {
        prefetch(o, i0);
        for (int k = 0; k < K; ++k) prefetch(t[k], i0);
      },
      [&](int64_t i) {
        float tv[K];
        for (int k = 0; k < K; ++k) tv[k] = f32(t[k][i]);
        o[i] = static_cast<T>(lincomb_value(cf, tv, K));
      });
}

void lincomb_cpu(at::TensorList out, at::TensorList terms, const at::Tensor& coefs) {
  const char* op = "lincomb";
  const int64_t n = static_cast<int64_t>(out.size());
  if (n == 0) return;
  const CoefInfo ci = coef_info(op, coefs, static_cast<int64_t>(terms.size()), n, kCpu);
  TORCH_CHECK(ci.k <= 8, "sam_kernels.lincomb: at most 8 terms");
  std::vector<ListSpec> specs = {{"out", out, Access::kWrite, true}};
  static const char* names[8] = {"terms[0]", "terms[1]", "terms[2]", "terms[3]",
                                 "terms[4]", "terms[5]", "terms[6]", "terms[7]"};
  for (int k = 0; k < ci.k; ++k) specs.push_back({names[k], term(terms, k, n), Access::kRead, true});
  Prepared p = prepare_lists(op, specs, kCpu);
  const float* cf = coefs.data_ptr<float>();
  parallel_chunks(make_chunks(p.lists[0]), [&](const Chunk& c) {
    dispatch(p.lists[0][c.t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* o = ptr<T>(p.lists[0][c.t], c.start);
      const T* tp[8];
      float co[8];
      for (int k = 0; k < ci.k; ++k) {
        tp[k] = ptr<T>(p.lists[1 + k][c.t], c.start);
        co[k] = cf[k * ci.k_stride + c.t * ci.n_stride];
      }
      switch (ci.k) {
        case 1: run_kernel([&] { lincomb_chunk<T, 1>(o, tp, co, c.len); }); break;
        case 2: run_kernel([&] { lincomb_chunk<T, 2>(o, tp, co, c.len); }); break;
        case 3: run_kernel([&] { lincomb_chunk<T, 3>(o, tp, co, c.len); }); break;
        case 4: run_kernel([&] { lincomb_chunk<T, 4>(o, tp, co, c.len); }); break;
        case 5: run_kernel([&] { lincomb_chunk<T, 5>(o, tp, co, c.len); }); break;
        case 6: run_kernel([&] { lincomb_chunk<T, 6>(o, tp, co, c.len); }); break;
        case 7: run_kernel([&] { lincomb_chunk<T, 7>(o, tp, co, c.len); }); break;
        default: run_kernel([&] { lincomb_chunk<T, 8>(o, tp, co, c.len); }); break;
      }
    });
  });
  p.finish();
}

// kInit: the sums start from zero (0 + x, the bits of zeroing then accumulating), not read
template <typename T, bool kInit>
SK_KERNEL void frob_chunk(T* cr, T* gs, const T* g, int64_t n, float L) {
  blocked(
      n,
      [&](int64_t i0) {
        if constexpr (!kInit) {
          prefetch(cr, i0);
          prefetch(gs, i0);
        }
        prefetch(g, i0);
      },
      [&](int64_t i) {
        const float gv = f32(g[i]);
        const float c0 = kInit ? 0.0f : f32(cr[i]);
        const float s0 = kInit ? 0.0f : f32(gs[i]);
        cr[i] = static_cast<T>(c0 + gv * L);
        gs[i] = static_cast<T>(s0 + gv);
      });
}

void frob_accumulate_cpu(at::TensorList cross, at::TensorList gsum, at::TensorList grads,
                         const at::Tensor& loss, bool init) {
  const char* op = "frob_accumulate";
  const Access sums = init ? Access::kWrite : Access::kReadWrite;
  Prepared p = prepare_lists(op,
                             {{"cross", cross, sums, true},
                              {"gsum", gsum, sums, true},
                              {"grads", grads, Access::kRead, true}},
                             kCpu);
  if (p.n == 0) return;
  check_scalar(op, "loss", loss, at::kFloat, kCpu);
  const float L = loss.data_ptr<float>()[0];
  parallel_chunks(make_chunks(p.lists[0]), [&](const Chunk& c) {
    dispatch(p.lists[0][c.t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* cr = ptr<T>(p.lists[0][c.t], c.start);
      T* gs = ptr<T>(p.lists[1][c.t], c.start);
      const T* g = ptr<T>(p.lists[2][c.t], c.start);
      if (init) {
        run_kernel([&] { frob_chunk<T, true>(cr, gs, g, c.len, L); });
      } else {
        run_kernel([&] { frob_chunk<T, false>(cr, gs, g, c.len, L); });
      }
    });
  });
  p.finish();
}

// ------------------------------------------------------------------ optimizer steps
struct StepInputs {
  Prepared p;
  CoefInfo ci;
  const float* coefs = nullptr;  // nullptr: plain gradient (one term)
  float ok = 1.0f;
  float lr = 0.0f;
  bool lr_is_tensor = false;
  std::vector<float> steps;  // each tensor's counter before this step
  size_t steps_list = 0;
};

// Common checks of the step ops. lists: params, grad terms (k of them), then `rest`.
StepInputs prepare_step(const char* op, at::TensorList params, at::TensorList grads,
                        const std::optional<at::Tensor>& coefs, at::TensorList backups,
                        std::vector<ListSpec> rest, at::TensorList steps,
                        const std::optional<at::Tensor>& lr_tensor, double lr,
                        const std::optional<at::Tensor>& ok) {
  StepInputs s;
  const int64_t n = static_cast<int64_t>(params.size());
  if (coefs.has_value()) {
    s.ci = coef_info(op, *coefs, static_cast<int64_t>(grads.size()), n, kCpu);
    TORCH_CHECK(s.ci.k <= 3, "sam_kernels.", op, ": a gradient combines at most 3 terms");
    s.coefs = coefs->data_ptr<float>();
  } else {
    TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "sam_kernels.", op, ": grads has ",
                grads.size(), " tensors, expected ", n);
    s.ci = CoefInfo{};
  }
  static const char* gnames[3] = {"grads[0]", "grads[1]", "grads[2]"};
  std::vector<ListSpec> specs;
  // params are only written when stepping from backups
  specs.push_back({"params", params, backups.empty() ? Access::kReadWrite : Access::kWrite, true});
  for (int k = 0; k < 3; ++k) {
    specs.push_back({gnames[k], k < s.ci.k ? term(grads, k, n) : at::TensorList(), Access::kRead,
                     false});
    if (k < s.ci.k) TORCH_CHECK(static_cast<int64_t>(specs.back().tensors.size()) == n,
                                "sam_kernels.", op, ": grads has the wrong length");
  }
  specs.push_back({"backups", backups, Access::kRead, false});
  for (auto& r : rest) specs.push_back(r);
  s.p = prepare_lists(op, specs, kCpu);
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == n, "sam_kernels.", op, ": steps has ",
              steps.size(), " tensors, expected ", n);
  s.steps.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    check_scalar(op, "steps[i]", steps[i], at::kFloat, kCpu);
    s.steps[i] = steps[i].data_ptr<float>()[0];
  }
  if (ok.has_value()) {
    check_scalar(op, "ok", *ok, at::kFloat, kCpu);
    s.ok = ok->data_ptr<float>()[0];
  }
  if (lr_tensor.has_value()) {
    check_scalar(op, "lr", *lr_tensor, at::kFloat, kCpu);
    s.lr = lr_tensor->data_ptr<float>()[0];
    s.lr_is_tensor = true;
  } else {
    s.lr = static_cast<float>(lr);
  }
  return s;
}

// The gradient of element i: the plain gradient (K == 0) or the combination of K terms.
template <typename T, int K>
inline float grad_at(const T* const* gp, const float* co, int64_t i) {
  if constexpr (K == 0) {
    return f32(gp[0][i]);
  } else {
    float tv[K];
    for (int k = 0; k < K; ++k) tv[k] = f32(gp[k][i]);
    return lincomb_value(co, tv, K);
  }
}

// f.template operator()<K>() for K = 0 (plain gradient) or the number of terms
template <typename F>
void dispatch_terms(const StepInputs& s, const F& f) {
  if (s.coefs == nullptr) return f(std::integral_constant<int, 0>{});
  switch (s.ci.k) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      return f(std::integral_constant<int, 3>{});
  }
}

// The step kernels' loop. p == w: the step updates the weights in place; p != w: it restores
// them from the backup w first, so p is written without being read (each block computed into a
// stack buffer and written out with streaming stores, see store_block). Per block of kStoreBlock
// elements from i0, pf(i0) issues the prefetches of the kernel's own streams (and may prepare
// the block), and body(i0, j) computes element i0 + j, updates its state and returns the new
// weight.
template <typename T, typename PF, typename F>
inline void step_blocks(T* p, const T* w, int64_t n, const PF& pf, const F& body) {
  const bool stream = w != p;
  alignas(64) T out[kStoreBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kStoreBlock) {
    const int64_t m = std::min(n - i0, kStoreBlock);
    prefetch<kStoreBlock>(w, i0);
    pf(i0);
    T* dst = stream ? out : p + i0;
    SK_SIMD
    for (int64_t j = 0; j < m; ++j) dst[j] = body(i0, j);
    if (stream) store_block(p + i0, out, m);
  }
  if (stream) store_fence();
}

// o is taken by value: a local the compiler knows no store through p/buf can change
template <typename T, int K, bool kBuf>
SK_KERNEL void sgd_chunk(T* p, const T* w, T* buf, const T* const* gp_in, const float* co_in, int64_t n,
               float coef, const SgdParams o) {
  const T* gp[3] = {gp_in[0], gp_in[1], gp_in[2]};
  const float co[3] = {co_in[0], co_in[1], co_in[2]};
  step_blocks(
      p, w, n,
      [&](int64_t i0) {
        for (int k = 0; k < (K == 0 ? 1 : K); ++k) prefetch<kStoreBlock>(gp[k], i0);
        if constexpr (kBuf) prefetch<kStoreBlock>(buf, i0);
      },
      [&](int64_t i0, int64_t j) {
        const int64_t i = i0 + j;
        const float g = grad_at<T, K>(gp, co, i);
        float b = kBuf ? f32(buf[i]) : 0.0f;
        const float nw = sgd_value(f32(w[i]), g, &b, coef, o);
        if constexpr (kBuf) buf[i] = static_cast<T>(b);
        return static_cast<T>(nw);
      });
}

template <typename T, int K, bool kAms>
SK_KERNEL void adamw_chunk(T* p, const T* w, T* m, T* v, T* x, const T* const* gp_in, const float* co_in,
                 int64_t n, const AdamWBias bias, AdamWParams o) {
  const T* gp[3] = {gp_in[0], gp_in[1], gp_in[2]};
  const float co[3] = {co_in[0], co_in[1], co_in[2]};
  // amsgrad a constant in the loop, and maximize a sign-bit xor (adamw_set_maximize): a select
  // on either runtime flag kept GCC from vectorising the loop once a combined gradient made it
  // too large to unswitch. CR-SAM's and Frob-SAM's AdamW steps ran scalar (ResNet-50's shapes,
  // 1 thread: 104 ms for K = 3; 37 ms with the combination formed a block ahead in a loop of
  // its own, ~27 ms inline and vectorised, against ~19 ms for one term)
  o.amsgrad = kAms;
  step_blocks(
      p, w, n,
      [&](int64_t i0) {
        for (int k = 0; k < (K == 0 ? 1 : K); ++k) prefetch<kStoreBlock>(gp[k], i0);
        prefetch<kStoreBlock>(m, i0);
        prefetch<kStoreBlock>(v, i0);
        if constexpr (kAms) prefetch<kStoreBlock>(x, i0);
      },
      [&](int64_t i0, int64_t j) {
        const int64_t i = i0 + j;
        const float g = grad_at<T, K>(gp, co, i);
        float mv = f32(m[i]), vv = f32(v[i]), xv = kAms ? f32(x[i]) : 0.0f;
        const float nw = adamw_value(f32(w[i]), g, &mv, &vv, &xv, bias, o);
        m[i] = static_cast<T>(mv);
        v[i] = static_cast<T>(vv);
        if constexpr (kAms) x[i] = static_cast<T>(xv);
        return static_cast<T>(nw);
      });
}

void bump_steps(at::TensorList steps, float ok) {
  for (const auto& t : steps) {
    float* v = t.data_ptr<float>();
    v[0] = v[0] + ok;
  }
}

// ok == 0: params = backups (if stepping from them); nothing else changes
void skip_step(StepInputs& s, size_t backups_list) {
  if (s.p.has(backups_list)) {
    parallel_chunks(make_chunks(s.p.lists[0]), [&](const Chunk& c) {
      const int64_t es = s.p.lists[0][c.t].element_size();
      std::memcpy(static_cast<char*>(s.p.lists[0][c.t].data_ptr()) + c.start * es,
                  static_cast<const char*>(s.p.lists[backups_list][c.t].data_ptr()) + c.start * es,
                  c.len * es);
    });
  }
  s.p.finish();
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads,
                  const std::optional<at::Tensor>& coefs, at::TensorList momentum_buffers,
                  at::TensorList steps, at::TensorList backups,
                  const std::optional<at::Tensor>& lr_tensor, double lr, double momentum,
                  double dampening, bool nesterov, double weight_decay, bool maximize,
                  const std::optional<at::Tensor>& ok) {
  const char* op = "sgd_step";
  if (params.empty()) return;
  const bool use_buf = momentum != 0.0;
  StepInputs s = prepare_step(
      op, params, grads, coefs, backups,
      {{"momentum_buffers", use_buf ? momentum_buffers : at::TensorList(), Access::kReadWrite,
        use_buf}},
      steps, lr_tensor, lr, ok);
  constexpr size_t kB = 4, kBuf = 5;
  if (s.ok == 0.0f) {
    skip_step(s, kB);
    return;
  }
  SgdParams o;
  o.lr = s.lr;
  o.momentum = static_cast<float>(momentum);
  o.dampening = static_cast<float>(dampening);
  o.weight_decay = static_cast<float>(weight_decay);
  o.nesterov = nesterov;
  o.maximize = maximize;
  auto& L = s.p.lists;
  parallel_chunks(make_chunks(L[0]), [&](const Chunk& c) {
    dispatch(L[0][c.t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* p = ptr<T>(L[0][c.t], c.start);
      const T* w = s.p.has(kB) ? ptr<T>(L[kB][c.t], c.start) : p;
      T* buf = use_buf ? ptr<T>(L[kBuf][c.t], c.start) : nullptr;
      const T* gp[3] = {nullptr, nullptr, nullptr};
      float co[3] = {1.0f, 0.0f, 0.0f};
      for (int k = 0; k < s.ci.k; ++k) {
        gp[k] = ptr<T>(L[1 + k][c.t], c.start);
        if (s.coefs != nullptr) co[k] = s.coefs[k * s.ci.k_stride + c.t * s.ci.n_stride];
      }
      const float coef = use_buf ? sgd_coef(s.steps[c.t], o.dampening) : 1.0f;
      dispatch_terms(s, [&](auto kt) {
        constexpr int K = decltype(kt)::value;
        if (use_buf) {
          run_kernel([&] { sgd_chunk<T, K, true>(p, w, buf, gp, co, c.len, coef, o); });
        } else {
          run_kernel([&] { sgd_chunk<T, K, false>(p, w, buf, gp, co, c.len, coef, o); });
        }
      });
    });
  });
  bump_steps(steps, s.ok);
  s.p.finish();
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads,
                    const std::optional<at::Tensor>& coefs, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList steps, at::TensorList backups,
                    const std::optional<at::Tensor>& lr_tensor, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    const std::optional<at::Tensor>& ok) {
  const char* op = "adamw_step";
  if (params.empty()) return;
  StepInputs s = prepare_step(
      op, params, grads, coefs, backups,
      {{"exp_avgs", exp_avgs, Access::kReadWrite, true},
       {"exp_avg_sqs", exp_avg_sqs, Access::kReadWrite, true},
       {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList(), Access::kReadWrite,
        amsgrad}},
      steps, lr_tensor, lr, ok);
  constexpr size_t kB = 4, kM = 5, kV = 6, kX = 7;
  if (s.ok == 0.0f) {
    skip_step(s, kB);
    return;
  }
  AdamWParams o;
  o.lr = s.lr;
  o.decay = s.lr_is_tensor ? 1.0f - s.lr * static_cast<float>(weight_decay)
                           : static_cast<float>(1.0 - lr * weight_decay);
  o.beta1 = static_cast<float>(beta1);
  o.beta2 = static_cast<float>(beta2);
  o.eps = static_cast<float>(eps);
  o.lerp_weight = static_cast<float>(1.0 - beta1);
  o.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  o.amsgrad = amsgrad;
  adamw_set_maximize(o, maximize);
  auto& L = s.p.lists;
  parallel_chunks(make_chunks(L[0]), [&](const Chunk& c) {
    dispatch(L[0][c.t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* p = ptr<T>(L[0][c.t], c.start);
      const T* w = s.p.has(kB) ? ptr<T>(L[kB][c.t], c.start) : p;
      T* m = ptr<T>(L[kM][c.t], c.start);
      T* v = ptr<T>(L[kV][c.t], c.start);
      T* x = amsgrad ? ptr<T>(L[kX][c.t], c.start) : nullptr;
      const T* gp[3] = {nullptr, nullptr, nullptr};
      float co[3] = {1.0f, 0.0f, 0.0f};
      for (int k = 0; k < s.ci.k; ++k) {
        gp[k] = ptr<T>(L[1 + k][c.t], c.start);
        if (s.coefs != nullptr) co[k] = s.coefs[k * s.ci.k_stride + c.t * s.ci.n_stride];
      }
      const AdamWBias bias = adamw_bias(beta1, beta2, static_cast<double>(s.steps[c.t]) + 1.0);
      dispatch_terms(s, [&](auto kt) {
        constexpr int K = decltype(kt)::value;
        if (amsgrad) {
          run_kernel([&] { adamw_chunk<T, K, true>(p, w, m, v, x, gp, co, c.len, bias, o); });
        } else {
          run_kernel([&] { adamw_chunk<T, K, false>(p, w, m, v, x, gp, co, c.len, bias, o); });
        }
      });
    });
  });
  bump_steps(steps, s.ok);
  s.p.finish();
}

// Test hook: Philox4x32-10 of one counter/key, written into a CPU int64 tensor of 4 entries.
void philox_cpu(const at::Tensor& out, c10::IntArrayRef counter, c10::IntArrayRef key) {
  TORCH_CHECK(counter.size() == 4 && key.size() == 2, "philox: 4 counter words and 2 key words");
  TORCH_CHECK(out.numel() == 4 && out.scalar_type() == at::kLong && out.is_contiguous(),
              "philox: out must be a contiguous int64 tensor of 4 entries");
  U32x4 c;
  for (int j = 0; j < 4; ++j) c.x[j] = static_cast<uint32_t>(counter[j]);
  const U32x4 r =
      philox4x32_10(c, static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  int64_t* o = out.data_ptr<int64_t>();
  for (int j = 0; j < 4; ++j) o[j] = static_cast<int64_t>(r.x[j]);
}

// Test hook: the noise contract's float32 functions of ops_math.h, element by element (CPU
// float32 tensors of one size, contiguous): fn 0 log_f32(x), 1 cos2pi_f32(x), 2 the uniform
// float of the int32 words x (bits), 3 normal_from_uniform(x, y).
void noise_math_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& y, int64_t fn) {
  TORCH_CHECK(fn >= 0 && fn <= 3, "noise_math: fn must be 0..3");
  for (const at::Tensor* t : {&out, &x, &y}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->numel() == out.numel() &&
                    t->element_size() == 4,
                "noise_math: contiguous CPU tensors of 4-byte elements, one size");
  }
  TORCH_CHECK(out.scalar_type() == at::kFloat, "noise_math: out must be float32");
  float* o = static_cast<float*>(out.data_ptr());
  const float* xf = static_cast<const float*>(x.data_ptr());
  const uint32_t* xu = static_cast<const uint32_t*>(x.data_ptr());
  const float* yf = static_cast<const float*>(y.data_ptr());
  const int64_t n = out.numel();
  for (int64_t i = 0; i < n; ++i) {
    switch (fn) {
      case 0:
        o[i] = log_f32(xf[i]);
        break;
      case 1:
        o[i] = cos2pi_f32(xf[i]);
        break;
      case 2:
        o[i] = uniform_from_word(xu[i]);
        break;
      default:
        o[i] = normal_from_uniform(xf[i], yf[i]);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels_C, CPU, m) {
  m.impl("grad_norm", &grad_norm_cpu);
  m.impl("aesam_stats_", &aesam_stats_cpu);
  m.impl("dot", &dot_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("noise_perturb_", &noise_perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("lincomb_", &lincomb_cpu);
  m.impl("frob_accumulate_", &frob_accumulate_cpu);
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("_philox4x32_10", &philox_cpu);
  m.impl("_noise_math", &noise_math_cpu);
}

}  // namespace sam_kernels
