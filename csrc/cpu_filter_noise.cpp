// filter_noise_perturb_ on CPU tensors: R-SAM's filter-wise noise with its backup
// (sam_kernels/ops/filter_noise.py), b = w; d = eps * coef[row]; p = w + d, in the two passes of
// the Triton kernels (sam_kernels/triton/filter_noise.py):
//
// 1. the row coefficients: coef[row] = sigma_t * (float(sqrt(the row's fp64 sum of squares)),
//    + eps_1d for 0-d and 1-d tensors, whose one row is the whole tensor). Rows are cut into
//    chunks of at most kCpuChunk elements summed by chunk_sums (cpu_kernels.h), and each row's
//    chunk sums are added in chunk order: the same bits whatever the thread count.
// 2. the element-wise pass over the usual chunks: eps is the normal noise contract (ops_math.h
//    noise_eps: the bits of the eager reference and of Triton) at counter offset + j, j the
//    element's index in the concatenated list; d = eps * coef rounded to the deltas' dtype,
//    p = float(w) + float(d) rounded to the params' dtype (the Triton kernel's operations).
//
// Element order (counters and rows): memory order where an index runs in place (all three
// tensors contiguous, or sharing one dense layout with dim 0 outermost, as channels-last), else
// logical order on contiguous stand-ins: filter_noise.py's runs_in_place, so the counters match
// the other backends'.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"
#include "glue.h"
#include "ops_math.h"

namespace sam_kernels {
namespace {

using namespace cpu;

// Dim 0 outermost in memory (each row one contiguous run): the dense layouts used in place.
// A dense layout with another dim outermost (a transposed matrix) would put a row's elements
// apart, so it runs on a contiguous stand-in instead.
bool rows_outermost(const at::Tensor& t) {
  if (t.numel() <= 1 || t.is_contiguous() || t.dim() <= 1 || t.size(0) == 1) return true;
  return t.stride(0) == t.numel() / t.size(0);
}

// The rows of the prepared params: per tensor its row length and first row, and the row
// pieces (at most kCpuChunk elements, in row order) with the row of each.
struct Rows {
  std::vector<int64_t> len;
  std::vector<int64_t> base;
  std::vector<Chunk> pieces;
  std::vector<int64_t> row_of;
  int64_t total = 0;
};

Rows make_rows(at::TensorList params) {
  Rows r;
  const int64_t n = static_cast<int64_t>(params.size());
  r.len.resize(n);
  r.base.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& w = params[t];
    const int64_t numel = w.numel();
    const int64_t rows = numel == 0 ? 0 : (w.dim() > 1 ? w.size(0) : 1);
    r.len[t] = rows == 0 ? 1 : numel / rows;
    r.base[t] = r.total;
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t s = 0; s < r.len[t]; s += kCpuChunk) {
        r.pieces.push_back({t, row * r.len[t] + s, std::min(kCpuChunk, r.len[t] - s)});
        r.row_of.push_back(r.total + row);
      }
    }
    r.total += rows;
  }
  return r;
}

// coef[row], pass 1 (see the top of the file): fp64 sums, the square root rounded once to fp32
// like the Triton row kernel, then the fp32 guard and sigma
std::vector<float> row_coefs(const Prepared& p, const Rows& r, const float* sigma, int stride,
                             float eps_1d) {
  std::vector<double> partial(r.pieces.size(), 0.0);
  chunk_sums(p.lists[0], p.lists[0], r.pieces, Sum::kSquares, 0.0f, partial.data());
  std::vector<double> sums(r.total, 0.0);
  for (size_t c = 0; c < r.pieces.size(); ++c) sums[r.row_of[c]] += partial[c];
  std::vector<float> coef(r.total);
  for (int64_t t = 0; t < p.n; ++t) {
    const bool flat = p.lists[0][t].dim() <= 1;
    const int64_t end = t + 1 < p.n ? r.base[t + 1] : r.total;
    for (int64_t row = r.base[t]; row < end; ++row) {
      float s = static_cast<float>(std::sqrt(sums[row]));
      if (flat) s = s + eps_1d;
      coef[row] = s * sigma[t * stride];
    }
  }
  return coef;
}

// Pass 2 on one chunk: n elements from element `start` of a tensor of rows of `rowlen`
// elements (coef: the tensor's row coefficients), counters k0 .. k0 + n - 1. The noise of a
// block goes to a stack buffer first (noise_perturb_'s kernel does the same), then each run of
// the block within one row is one simd loop with its coefficient.
template <typename T>
SK_KERNEL void filter_noise_chunk(T* w, T* b, T* d, int64_t n, int64_t start, int64_t rowlen,
                                  const float* coef, uint64_t seed, uint64_t k0) {
  float eps[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min(n - i0, kBlock);
    const uint64_t k = k0 + static_cast<uint64_t>(i0);
    SK_SIMD
    for (int64_t i = 0; i < m; ++i) eps[i] = noise_eps(seed, k + static_cast<uint64_t>(i), 0, 0.0f);
    T* wi = w + i0;
    T* bi = b + i0;
    T* di = d + i0;
    for (int64_t j0 = 0; j0 < m;) {
      const int64_t row = (start + i0 + j0) / rowlen;
      const int64_t j1 = std::min(m, (row + 1) * rowlen - start - i0);
      const float c = coef[row];
      SK_SIMD
      for (int64_t j = j0; j < j1; ++j) {
        const T raw = wi[j];
        bi[j] = raw;
        const T dv = static_cast<T>(eps[j] * c);
        di[j] = dv;
        wi[j] = static_cast<T>(f32(raw) + f32(dv));
      }
      j0 = j1;
    }
  }
}

void filter_noise_perturb_cpu(at::TensorList params, at::TensorList backups,
                              at::TensorList deltas, const at::Tensor& sigma, double eps_1d,
                              const at::Tensor& seed, const at::Tensor& offset) {
  const char* op = "filter_noise_perturb";
  Prepared p = prepare_lists(op,
                             {{"params", params, Access::kReadWrite, true},
                              {"backups", backups, Access::kWrite, true},
                              {"deltas", deltas, Access::kWrite, true}},
                             kCpu, &rows_outermost);
  if (p.n == 0) return;
  const int stride = scalar_or_vector(op, "sigma", sigma, p.n, kCpu);
  check_scalar(op, "seed", seed, at::kLong, kCpu);
  check_scalar(op, "offset", offset, at::kLong, kCpu);
  const uint64_t sd = static_cast<uint64_t>(seed.data_ptr<int64_t>()[0]);
  const uint64_t off = static_cast<uint64_t>(offset.data_ptr<int64_t>()[0]);
  const Rows rows = make_rows(p.lists[0]);
  // every coefficient from the weights before any of them is perturbed
  const std::vector<float> coef =
      row_coefs(p, rows, sigma.data_ptr<float>(), stride, static_cast<float>(eps_1d));
  // counter of each tensor's element 0: the offset plus the elements of the tensors before it
  std::vector<uint64_t> first(p.n);
  uint64_t acc = off;
  for (int64_t t = 0; t < p.n; ++t) {
    first[t] = acc;
    acc += static_cast<uint64_t>(p.lists[0][t].numel());
  }
  auto& L = p.lists;
  parallel_chunks(make_chunks(L[0]), [&](const Chunk& c) {
    dispatch(L[0][c.t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* w = ptr<T>(L[0][c.t], c.start);
      T* b = ptr<T>(L[1][c.t], c.start);
      T* d = ptr<T>(L[2][c.t], c.start);
      const float* cf = coef.data() + rows.base[c.t];
      const uint64_t k0 = first[c.t] + static_cast<uint64_t>(c.start);
      run_compute_kernel([&] {
        filter_noise_chunk<T>(w, b, d, c.len, c.start, rows.len[c.t], cf, sd, k0);
      });
    });
  });
  p.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels_C, CPU, m) {
  m.impl("filter_noise_perturb_", &filter_noise_perturb_cpu);
}

}  // namespace sam_kernels
