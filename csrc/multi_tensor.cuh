// Multi-tensor launch machinery (in the style of NVIDIA apex's multi_tensor_apply), torch-free.
//
// A launch covers a whole group of tensors: the kernel argument is a chunk table (Meta) holding
// every tensor's data pointers, element count and first block; block b finds its tensor by a
// binary search over the block starts (in the constant bank) and processes chunk
// b - block_start[t] of it (kChunk elements). Loads and stores are vectorised (kVec elements)
// when every pointer of the tensor is aligned, scalar otherwise; math is fp32.
//
// The table is passed by value as a __grid_constant__ kernel parameter of up to ~30 KB (CUDA
// 12.1+ on sm_70+ accepts 32764 bytes), so a group of a few hundred tensors is one launch; a
// larger group is split into several launches of full tables.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_launchers.h"
#include "ops_math.h"

namespace sam_kernels {
namespace cuda {

constexpr int kChunk = 16384;  // elements per block
constexpr int kThreads = 256;  // threads per block
constexpr int kVec = 4;        // elements per vector access
constexpr int kMaxArgBytes = 30000;
static_assert(kChunk % (kVec * kThreads) == 0, "a chunk is a whole number of block sweeps");

template <int NL, bool kCounters = false>
struct Meta {
  static constexpr int kMaxT = (kMaxArgBytes - 16) / (8 * NL + 8 + 4 + 4 + (kCounters ? 8 : 0));
  int n;                       // tensors in this launch
  int block_start[kMaxT + 1];  // first block of each tensor; block_start[n] = blocks
  int index[kMaxT];            // position in the caller's list
  int64_t numel[kMaxT];
  void* ptr[NL][kMaxT];
  // (noise ops, kCounters) each tensor's element 0: its index in the concatenated list
  int64_t first[kCounters ? kMaxT : 1];
};

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sam_kernels CUDA launch failed (") + what +
                             "): " + cudaGetErrorString(err));
  }
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Pack group g (lists `ids`, -1 = absent) into tables and call launch(meta, blocks, base) for
// each table; base counts the blocks of the tables before it (norm partial offsets).
template <int NL, bool kCounters = false, typename F>
void for_each_table(const Group& g, const int (&ids)[NL], F&& launch) {
  using M = Meta<NL, kCounters>;
  static_assert(sizeof(M) <= 32764, "kernel argument too large");
  M m;
  int j = 0;
  int64_t base = 0;
  while (j < g.n) {
    m.n = 0;
    int64_t blocks = 0;
    while (j < g.n && m.n < M::kMaxT) {
      const int64_t nc = chunks_of(g.numel[j]);
      if (blocks + nc > INT_MAX) {
        if (m.n == 0) throw std::runtime_error("sam_kernels: tensor too large for one launch");
        break;
      }
      m.block_start[m.n] = static_cast<int>(blocks);
      m.index[m.n] = g.index[j];
      m.numel[m.n] = g.numel[j];
      if constexpr (kCounters) m.first[m.n] = g.first[j];
      for (int l = 0; l < NL; ++l) {
        m.ptr[l][m.n] = (ids[l] >= 0 && g.lists[ids[l]] != nullptr) ? g.lists[ids[l]][j] : nullptr;
      }
      blocks += nc;
      ++m.n;
      ++j;
    }
    m.block_start[m.n] = static_cast<int>(blocks);
    launch(m, static_cast<int>(blocks), base);
    base += blocks;
  }
}

// The tensor of block b: the largest t with block_start[t] <= b (empty tensors own no block).
template <typename M>
__device__ __forceinline__ int find_tensor(const M& m, int b) {
  int lo = 0, hi = m.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (m.block_start[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

struct ChunkLoc {
  int t;          // tensor slot in the table
  int64_t start;  // first element of the chunk
  int64_t len;    // elements in the chunk
};

template <typename M>
__device__ __forceinline__ ChunkLoc locate(const M& m) {
  ChunkLoc c;
  c.t = find_tensor(m, static_cast<int>(blockIdx.x));
  c.start = static_cast<int64_t>(static_cast<int>(blockIdx.x) - m.block_start[c.t]) * kChunk;
  const int64_t rest = m.numel[c.t] - c.start;
  c.len = rest < kChunk ? rest : kChunk;
  return c;
}

template <typename T>
__device__ __forceinline__ bool is_aligned(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec)) == 0;
}

// ---- dtype conversion (round to nearest even on the way back) ----
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
struct alignas(sizeof(T) * kVec) VecT {
  T v[kVec];
};

// Raw loads/stores of kVec elements at i (< len); `vec`: the chunk's pointers are aligned.
template <typename T>
__device__ __forceinline__ void load_raw(const T* p, int64_t i, int64_t len, bool vec,
                                         T (&out)[kVec]) {
  if (vec && i + kVec <= len) {
    const VecT<T> v = *reinterpret_cast<const VecT<T>*>(p + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = v.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = (i + j < len) ? p[i + j] : from_f<T>(0.0f);
  }
}

template <typename T>
__device__ __forceinline__ void store_raw(T* p, int64_t i, int64_t len, bool vec,
                                          const T (&in)[kVec]) {
  if (vec && i + kVec <= len) {
    VecT<T> v;
#pragma unroll
    for (int j = 0; j < kVec; ++j) v.v[j] = in[j];
    *reinterpret_cast<VecT<T>*>(p + i) = v;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (i + j < len) p[i + j] = in[j];
    }
  }
}

template <typename T>
__device__ __forceinline__ void load_f(const T* p, int64_t i, int64_t len, bool vec,
                                       float (&out)[kVec]) {
  T r[kVec];
  load_raw(p, i, len, vec, r);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_f(r[j]);
}

template <typename T>
__device__ __forceinline__ void store_f(T* p, int64_t i, int64_t len, bool vec,
                                        const float (&in)[kVec]) {
  T r[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) r[j] = from_f<T>(in[j]);
  store_raw(p, i, len, vec, r);
}

// Deterministic block sum (fixed shuffle tree, then the warps' sums in order).
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  __shared__ Acc warp_sums[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  Acc total = 0;
  if (threadIdx.x == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    for (int w = 0; w < nw; ++w) total += warp_sums[w];
  }
  return total;  // valid in thread 0
}

// Dispatch a launcher body over the group's dtype: body(T{}) with T the element type.
template <typename F>
void dispatch_dtype(DType dt, F&& body) {
  switch (dt) {
    case kFloat32:
      body(float{});
      break;
    case kFloat16:
      body(__half{});
      break;
    case kBFloat16:
      body(__nv_bfloat16{});
      break;
    default:
      throw std::runtime_error("sam_kernels: unsupported dtype");
  }
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace cuda
}  // namespace sam_kernels
