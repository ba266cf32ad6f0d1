// The CPU kernels' shared machinery (cpu_ops.cpp, cpu_filter_noise.cpp): fixed-size chunks of
// every tensor spread over threads with at::parallel_for (OpenMP), the dtype dispatch, the
// per-instruction-set copies of each chunk kernel, blocks with software prefetch, and the
// deterministic fp64 reductions.
//
// Vectorisation: the inner loops are `#pragma omp simd` loops (no cross-iteration dependence, so
// the compiler vectorises them without alias checks) whose bodies are the per-element formulas
// of ops_math.h with every loop-invariant option turned into a compile-time parameter or a
// select, so each element is computed with exactly the operations, in exactly the order, of the
// scalar formula: element-wise results are bit-identical to a scalar loop (setup.py passes
// -ffp-contract=off, so no a*b+c is ever contracted into an FMA, whatever the -m flags; only the
// sign of a NaN produced from NaN/inf inputs may differ between vector and scalar code, or
// between the baseline and AVX2 copies of a kernel, see run_kernel).
//
// Reductions are deterministic whatever the thread count: each chunk's sum is accumulated in
// fp64 over kLanes interleaved partial sums (lane j takes the elements j, j + kLanes, ...)
// combined in a fixed order, and the callers add the chunk sums in chunk order (chunks read side
// by side give the same bits as chunks read one by one).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops_math.h"

namespace sam_kernels {
namespace cpu {

constexpr int64_t kCpuChunk = 32768;

struct Chunk {
  int64_t t;
  int64_t start;
  int64_t len;
};

inline std::vector<Chunk> make_chunks(at::TensorList ref) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < static_cast<int64_t>(ref.size()); ++t) {
    const int64_t n = ref[t].numel();
    for (int64_t s = 0; s < n; s += kCpuChunk) out.push_back({t, s, std::min(kCpuChunk, n - s)});
  }
  return out;
}

template <typename F>
inline void parallel_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(chunks[i]);
  });
}

// f(T{}) with T the C++ element type of dtype
template <typename F>
inline void dispatch(at::ScalarType dt, const F& f) {
  switch (dt) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "sam_kernels: unsupported dtype ", dt);
  }
}

template <typename T>
T* ptr(const at::Tensor& t, int64_t start) {
  return static_cast<T*>(t.data_ptr()) + start;
}

inline float f32(float x) { return x; }
inline float f32(c10::Half x) { return static_cast<float>(x); }
inline float f32(c10::BFloat16 x) { return static_cast<float>(x); }

inline const at::Device kCpu(at::kCPU);

#define SK_SIMD _Pragma("omp simd")
// the kernels of one chunk: plain inline functions, compiled inside run_kernel's wrappers
#define SK_KERNEL inline

// Instruction sets. The extension is built without -m flags (the baseline x86-64: SSE2), and
// SSE2 leaves the norms compute-bound on one core: 2 floats per fp64 convert, and 16 xmm
// registers, too few for grad_norm's 16 fp64 lanes (accumulators spilled to the stack, a
// store-to-load chain every iteration: a list that stays in the cache was summed at 14 GB/s,
// where torch's sum reads 23 GB/s). So every chunk kernel is compiled twice, for the baseline
// and for AVX2 (no FMA: -ffp-contract=off holds either way, so each element sees the same
// operations in the same order; only the sign of a NaN made from two NaN operands may differ,
// the compiler picking the operand order), and run_kernel picks the AVX2 copy where the CPU has
// it. The wrappers are `flatten`: every call inside the kernel (the formulas of ops_math.h, the
// c10 dtype conversions, the loop bodies) is inlined into the wrapper and compiled for its
// instruction set, so the simd loops have no calls left in them.
template <typename F>
__attribute__((flatten, noinline)) void run_baseline(const F& f) {
  f();
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename F>
__attribute__((flatten, noinline, target("avx2"))) void run_avx2(const F& f) {
  f();
}

inline const bool kHasAvx2 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") != 0;
}();

inline const bool kHasAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}();
#endif

// f() (one chunk's kernel call), compiled for the best instruction set the CPU has
template <typename F>
inline void run_kernel(const F& f) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHasAvx2) return run_avx2(f);
#endif
  run_baseline(f);
}

// The compute-bound kernels (the noise contract: ten Philox rounds and the float32 log and cos
// per element, no memory to wait for) also get a copy with 16 lanes where the CPU has AVX-512:
// one core of the EPYC of benchmarks/results draws a normal element in 5.4 ns with it, 9.1 ns
// with AVX2 (uniform 3.1 / 5.8). The memory-bound kernels stay on run_kernel (no gain there,
// and some CPUs lower their clock for 512-bit work). Exactly rounded operations without
// contraction give the same bits at every width.
#if defined(__x86_64__) && defined(__GNUC__)
template <typename F>
__attribute__((flatten, noinline,
               target("avx512f,avx512vl,avx512dq,avx512bw,prefer-vector-width=512"))) void
run_avx512(const F& f) {
  f();
}

inline const bool kHasAvx512Wide = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
}();
#endif

template <typename F>
inline void run_compute_kernel(const F& f) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHasAvx512Wide) return run_avx512(f);
#endif
  run_kernel(f);
}

// Blocks and software prefetch. The kernels walk a chunk in blocks of kBlock elements (one simd
// loop each) and, per block, prefetch every stream kPrefetchBytes ahead: one core's hardware
// prefetchers alone leave these streaming loops 20-40% below the core's bandwidth (measured on
// the 2-core Xeon of benchmarks/results). A prefetch never faults, so running past the end of a
// tensor is harmless (the address is formed as an integer).
constexpr int64_t kBlock = 64;
constexpr uintptr_t kPrefetchBytes = 2048;
// the blocks of the kernels with streaming stores (perturb_, the steps): 128 elements, ~3%
// faster per op than 64 on ResNet-50's shapes (256: the same, 512: slower)
constexpr int64_t kStoreBlock = 128;

// (read prefetches for the written streams too: x86 builds without -mprfchw drop write
// prefetches, and a read prefetch brings the line in for the store just as well)
// (prefetches the kLen elements from p + i + kPrefetchBytes on)
template <int64_t kLen = kBlock, typename T>
inline void prefetch(const T* p, int64_t i) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p + i) + kPrefetchBytes;
  for (uintptr_t l = 0; l < kLen * sizeof(T); l += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(a + l), 0, 3);
  }
}

// body(i) for i < n, one simd loop per block; pf(i0) issues the block's prefetches
template <typename PF, typename F>
inline void blocked(int64_t n, const PF& pf, const F& body) {
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t e = std::min(n, i0 + kBlock);
    pf(i0);
    SK_SIMD
    for (int64_t i = i0; i < e; ++i) body(i);
  }
}

// ------------------------------------------------------------------ reductions
// fp64 sums of a per-element term (sum_term: a square or a product of fp32 values) over kLanes
// interleaved accumulators (vectorisable without reassociation: lane j is a plain serial sum of
// the elements j, j + kLanes, ...), combined as a fixed pairwise tree, then the tail.
constexpr int kLanes = 16;

inline double combine_lanes(double* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

static_assert(kBlock % kLanes == 0, "blocks hold whole lane groups");

// the fp32 value whose square is summed: g, or the ASAM-weighted (|w| + eta) * g
template <bool kWeighted, typename T>
inline double norm_value(const T* g, const T* w, int64_t i, float eta) {
  if constexpr (kWeighted) {
    return weighted(f32(w[i]), f32(g[i]), eta);
  } else {
    return f32(g[i]);
  }
}

// What a reduction sums per element: squares (norms), squares of the ASAM-weighted values
// (weighted norms; y holds the weights), or products x * y (dot). A product of two fp32 values
// is exact in fp64 (24-bit significands), so every kind's terms are exact but the weighted one
// (rounded in fp32 like the eager reference), and only the fp64 sums round.
enum class Sum { kSquares, kWeightedSquares, kProducts };

template <Sum kSum, typename T>
inline double sum_term(const T* x, const T* y, int64_t i, float eta) {
  if constexpr (kSum == Sum::kProducts) {
    return static_cast<double>(f32(x[i])) * static_cast<double>(f32(y[i]));
  } else {
    const double v = norm_value<kSum == Sum::kWeightedSquares>(x, y, i, eta);
    return v * v;
  }
}

// Chunks summed side by side. One read stream leaves a core's memory pipeline mostly waiting:
// on the 2-core Xeon of benchmarks/results a cold 100 MB list reads at ~8-10 GB/s in one stream,
// ~30% faster in 4 (a fused SGD step reads its 3 streams at ~14 GB/s). So the norms read
// kNormGroup chunks in turns of one block each (256 bytes per stream with fp32; turns of 2, 8
// and 32 blocks and groups of 2 chunks were slower, groups of 8 no faster). Each chunk keeps its
// own lanes, summed in the same order as one chunk alone, so the partial sums are the same bits.
constexpr int kNormGroup = 4;

// out[k] = the sum of the terms of chunk k (n[k] elements from x[k], y[k]), k < m <= kNormGroup
template <Sum kSum, typename T>
SK_KERNEL void sum_group(const T* const* x, const T* const* y, const int64_t* n, int m, float eta,
                         double* out) {
  double acc[kNormGroup][kLanes] = {};
  int64_t full[kNormGroup];
  int64_t longest = 0;
  for (int k = 0; k < m; ++k) {
    full[k] = n[k] - n[k] % kLanes;
    longest = std::max(longest, full[k]);
  }
  for (int64_t i0 = 0; i0 < longest; i0 += kBlock) {
    for (int k = 0; k < m; ++k) {
      if (i0 >= full[k]) continue;
      const T* xk = x[k];
      const T* yk = y[k];
      prefetch(xk, i0);
      if constexpr (kSum != Sum::kSquares) prefetch(yk, i0);
      const int64_t e = std::min(full[k], i0 + kBlock);
      double a[kLanes];
      for (int j = 0; j < kLanes; ++j) a[j] = acc[k][j];
      for (int64_t i = i0; i < e; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          a[j] += sum_term<kSum>(xk, yk, i + j, eta);
        }
      }
      for (int j = 0; j < kLanes; ++j) acc[k][j] = a[j];
    }
  }
  for (int k = 0; k < m; ++k) {
    double tail = 0.0;
    for (int64_t i = full[k]; i < n[k]; ++i) {
      tail += sum_term<kSum>(x[k], y[k], i, eta);
    }
    out[k] = combine_lanes(acc[k]) + tail;
  }
}

// partial[c] = the sum of chunk c's terms (chunks of x; y the second list of the weighted and
// product kinds, else unused). Threads take runs of chunks; each chunk's sum is the same bits
// whoever computes it, so the partials do not depend on the thread count.
inline void chunk_sums(at::TensorList x, at::TensorList y,
                       const std::vector<Chunk>& chunks, Sum kind, float eta, double* partial) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c0 = b; c0 < e;) {
      // a group: up to kNormGroup consecutive chunks of one dtype
      const at::ScalarType dt = x[chunks[c0].t].scalar_type();
      int m = 1;
      while (m < kNormGroup && c0 + m < e && x[chunks[c0 + m].t].scalar_type() == dt) ++m;
      dispatch(dt, [&](auto tag) {
        using T = decltype(tag);
        const T* xs[kNormGroup];
        const T* ys[kNormGroup] = {};
        int64_t n[kNormGroup];
        for (int k = 0; k < m; ++k) {
          const Chunk& c = chunks[c0 + k];
          xs[k] = ptr<T>(x[c.t], c.start);
          if (kind != Sum::kSquares) ys[k] = ptr<T>(y[c.t], c.start);
          n[k] = c.len;
        }
        double* out = partial + c0;
        switch (kind) {
          case Sum::kSquares:
            run_kernel([&] { sum_group<Sum::kSquares>(xs, ys, n, m, eta, out); });
            break;
          case Sum::kWeightedSquares:
            run_kernel([&] { sum_group<Sum::kWeightedSquares>(xs, ys, n, m, eta, out); });
            break;
          case Sum::kProducts:
            run_kernel([&] { sum_group<Sum::kProducts>(xs, ys, n, m, eta, out); });
            break;
        }
      });
      c0 += m;
    }
  });
}

}  // namespace cpu
}  // namespace sam_kernels
