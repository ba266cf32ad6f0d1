// LookSAM's two per-tensor ops on CPU tensors (the math, and the eager reference these follow:
// sam_kernels/ops/looksam.py). Each is one or two passes of the shared CPU machinery of
// cpu_kernels.h: per-tensor fp64 sums (the chunk sums of chunk_sums, added per tensor in chunk
// order, so the same bits whatever the thread count), then, for the projection, one element-wise
// pass. The eager reference takes ten or more passes and its fp64 dot product of ResNet-50's
// gradients alone took 0.6 s on one core; these take two reads of g0 and gs and one write of gv.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu_kernels.h"
#include "glue.h"

namespace sam_kernels {
namespace {

using namespace cpu;

// the guard of the reuse coefficient ||g0|| / (||gv|| + kReuseEps) (REUSE_EPS in looksam.py)
constexpr double kReuseEps = 1e-8;

// out[t] = the sum of the terms of tensor t of x (and y): its chunks' fp64 sums in chunk order
std::vector<double> tensor_sums(at::TensorList x, at::TensorList y,
                                Sum kind, int64_t n) {
  const auto chunks = make_chunks(x);
  std::vector<double> partial(chunks.size(), 0.0);
  chunk_sums(x, y, chunks, kind, 0.0f, partial.data());
  std::vector<double> out(static_cast<size_t>(n), 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].t] += partial[c];
  return out;
}

// gv = fl(fl(g0 * -c) + gs) in fp32, as the eager reference's foreach multiply then add (one
// rounding to T at the end: bf16/fp16 tensors round once where the reference rounds twice)
template <typename T>
SK_KERNEL void project_chunk(T* gv, const T* g0, const T* gs, int64_t n, float neg_c) {
  blocked(
      n,
      [&](int64_t i0) {
        prefetch(g0, i0);
        prefetch(gs, i0);
      },
      [&](int64_t i) {
        const float t = f32(g0[i]) * neg_c;
        gv[i] = static_cast<T>(t + f32(gs[i]));
      });
}

// gv_i = gs_i - (<g0_i, gs_i> / ||g0_i||^2) g0_i (coefficient 0 where ||g0_i||^2 is 0 or not a
// number), written only when ok (absent, or not 0): ok == 0 leaves gv as it was, whatever g0 and
// gs hold. The products and sums are fp64 (exact products of fp32 values), the coefficient
// rounded to fp32 as the reference's.
void looksam_project_cpu(at::TensorList gv, at::TensorList g0, at::TensorList gs,
                         const std::optional<at::Tensor>& ok) {
  const char* op = "looksam_project_";
  float okv = 1.0f;
  if (ok.has_value()) {
    check_scalar(op, "ok", *ok, at::kFloat, kCpu);
    okv = ok->data_ptr<float>()[0];
  }
  Prepared p = prepare_lists(op,
                             {{"gv", gv, Access::kWrite, true},
                              {"g0", g0, Access::kRead, true},
                              {"gs", gs, Access::kRead, true}},
                             kCpu);
  // a skipped step: nothing written (the stand-ins of non-contiguous gv are not copied back)
  if (p.n == 0 || okv == 0.0f) return;
  auto& L = p.lists;
  const std::vector<double> dot = tensor_sums(L[1], L[2], Sum::kProducts, p.n);
  const std::vector<double> sq = tensor_sums(L[1], at::TensorList(), Sum::kSquares, p.n);
  std::vector<float> neg_c(static_cast<size_t>(p.n));
  for (int64_t t = 0; t < p.n; ++t) {
    const float c = sq[t] > 0.0 ? static_cast<float>(dot[t] / sq[t]) : 0.0f;
    neg_c[t] = -c;
  }
  parallel_chunks(make_chunks(L[0]), [&](const Chunk& c) {
    dispatch(L[0][c.t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* v = ptr<T>(L[0][c.t], c.start);
      const T* a = ptr<T>(L[1][c.t], c.start);
      const T* b = ptr<T>(L[2][c.t], c.start);
      const float nc = neg_c[c.t];
      run_kernel([&] { project_chunk<T>(v, a, b, c.len, nc); });
    });
  });
  p.finish();
}

// [2, n] float32: ones, then alpha ||g0_i|| / (||gv_i|| + 1e-8) (0 where ||gv_i|| is 0 or not a
// number), the norms and the coefficient in fp64 as the reference's
at::Tensor looksam_reuse_coefs_cpu(at::TensorList g0, at::TensorList gv, double alpha) {
  const char* op = "looksam_reuse_coefs";
  Prepared p = prepare_lists(
      op, {{"g0", g0, Access::kRead, true}, {"gv", gv, Access::kRead, true}}, kCpu);
  at::Tensor out = at::empty({2, p.n}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const std::vector<double> s0 = tensor_sums(p.lists[0], at::TensorList(), Sum::kSquares, p.n);
  const std::vector<double> sv = tensor_sums(p.lists[1], at::TensorList(), Sum::kSquares, p.n);
  for (int64_t t = 0; t < p.n; ++t) {
    const double n0 = std::sqrt(s0[t]);
    const double nv = std::sqrt(sv[t]);
    o[t] = 1.0f;
    o[p.n + t] = nv > 0.0 ? static_cast<float>(alpha * n0 / (nv + kReuseEps)) : 0.0f;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels_C, CPU, m) {
  m.impl("looksam_project_", &looksam_project_cpu);
  m.impl("looksam_reuse_coefs", &looksam_reuse_coefs_cpu);
}

}  // namespace sam_kernels
