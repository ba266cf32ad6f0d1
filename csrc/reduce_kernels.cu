// Reductions: global (optionally |p|+eta weighted) squared norm in two deterministic stages,
// and its two consumers, grad_norm (sqrt) and the AE-SAM statistics/decision.
//
// Stage 1: one block per chunk writes the chunk's fp64 sum of squares to partials[chunk] (a fixed
// per-thread order and a fixed shuffle tree: no atomics). Stage 2: one block sums the partials in
// a fixed order in fp64 and takes the fp64 square root. Same inputs, same bits, on every run.
// Squares are summed in fp64: in fp32 they overflow for elements above ~1.8e19 (a finite
// gradient reported as non-finite) and lose accuracy over millions of elements.
#include "multi_tensor.cuh"

namespace sam_kernels {
namespace cuda {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sumsq_kernel(const __grid_constant__ Meta<2> m, float eta, double* partials, int64_t base) {
  const ChunkLoc c = locate(m);
  const T* g = static_cast<const T*>(m.ptr[0][c.t]) + c.start;
  const T* p = m.ptr[1][c.t] ? static_cast<const T*>(m.ptr[1][c.t]) + c.start : nullptr;
  const bool vec = is_aligned<T>(g) && is_aligned<T>(p);
  double acc = 0.0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < c.len;
       i += static_cast<int64_t>(kThreads) * kVec) {
    float gv[kVec];
    load_f(g, i, c.len, vec, gv);
    if (p != nullptr) {
      float pv[kVec];
      load_f(p, i, c.len, vec, pv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) gv[j] = weighted(pv[j], gv[j], eta);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc += static_cast<double>(gv[j]) * static_cast<double>(gv[j]);
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) partials[base + blockIdx.x] = total;
}

__device__ __forceinline__ double sum_partials(const double* partials, int64_t count) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  return block_sum(acc);
}

__global__ void __launch_bounds__(kThreads)
    norm_finalize_kernel(const double* partials, int64_t count, float* out) {
  const double s = sum_partials(partials, count);
  // sqrt in fp64, then one rounding to fp32 (s itself may exceed the fp32 range)
  if (threadIdx.x == 0) out[0] = static_cast<float>(sqrt(s));
}

__global__ void __launch_bounds__(kThreads)
    aesam_finalize_kernel(const double* partials, int64_t count, float* stats, int* decision,
                          float delta, float c) {
  const double s = sum_partials(partials, count);
  if (threadIdx.x == 0) decision[0] = aesam_update(static_cast<float>(s), stats, delta, c);
}

int64_t num_chunks(const Group& g) {
  int64_t total = 0;
  for (int j = 0; j < g.n; ++j) total += chunks_of(g.numel[j]);
  return total;
}

void launch_sumsq_partials(const Group& g, float eta, double* partials, void* stream) {
  const int ids[2] = {0, 1};
  dispatch_dtype(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_table<2>(g, ids, [&](const Meta<2>& m, int blocks, int64_t base) {
      if (blocks == 0) return;
      sumsq_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(m, eta, partials, base);
      check_cuda(cudaGetLastError(), "sumsq");
    });
  });
}

void launch_norm_finalize(const double* partials, int64_t count, float* out, void* stream) {
  norm_finalize_kernel<<<1, kThreads, 0, as_stream(stream)>>>(partials, count, out);
  check_cuda(cudaGetLastError(), "norm_finalize");
}

void launch_aesam_finalize(const double* partials, int64_t count, float* stats, int* decision,
                           float delta, float c, void* stream) {
  aesam_finalize_kernel<<<1, kThreads, 0, as_stream(stream)>>>(partials, count, stats, decision,
                                                                delta, c);
  check_cuda(cudaGetLastError(), "aesam_finalize");
}

}  // namespace cuda
}  // namespace sam_kernels
