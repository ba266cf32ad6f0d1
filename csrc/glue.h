// Torch glue shared by the CPU ops (cpu_ops.cpp) and the CUDA binding (cuda_glue.cpp):
// validation of the tensor lists and their layout.
//
// Layout rule (both devices): the ops work on each tensor's storage as a flat array, so at every
// index i the tensors of all lists must be non-overlapping and dense with identical strides
// (contiguous, channels_last, ... all fine). Where they are not, the op runs on contiguous copies
// and writes the results back into the caller's tensors (correct, one extra copy per such
// tensor). Dtypes: float32, float16, bfloat16; at each index every list has the same dtype and
// shape.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sam_kernels {

enum class Access { kRead, kWrite, kReadWrite };

struct ListSpec {
  const char* name;
  at::TensorList tensors;  // empty: absent (only allowed when !required)
  Access access;
  bool required;
};

struct Prepared {
  int64_t n = 0;
  // lists[l][i]: the tensor the kernel uses (the caller's, or a contiguous stand-in); lists of
  // absent specs are empty. A list with no stand-in is a view of the caller's list (no copy:
  // copying a list of tensors costs an atomic reference count per tensor, ~10% of a step's host
  // time over ResNet-50's 161 tensors); one with a stand-in views its row of `owned`. The
  // caller's lists outlive the op that prepared them.
  std::vector<at::TensorList> lists;
  std::vector<std::vector<at::Tensor>> owned;
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (caller's tensor, stand-in)

  Prepared() = default;
  Prepared(const Prepared&) = delete;  // the views would point into the source's `owned`
  Prepared& operator=(const Prepared&) = delete;
  Prepared(Prepared&&) = default;  // a moved vector keeps its buffer: the views stay valid
  Prepared& operator=(Prepared&&) = default;

  bool has(size_t l) const { return l < lists.size() && !lists[l].empty(); }
  void finish() {
    for (auto& wb : writeback) wb.first.copy_(wb.second);
    writeback.clear();
  }
};

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// in_place_ok: an op's further condition on a layout it runs in place (nullptr: any layout the
// lists share); an index whose shared layout fails it runs on contiguous stand-ins, like one
// whose layouts differ.
inline Prepared prepare_lists(const char* op, const std::vector<ListSpec>& specs,
                              at::Device device,
                              bool (*in_place_ok)(const at::Tensor& ref) = nullptr) {
  Prepared out;
  out.n = static_cast<int64_t>(specs[0].tensors.size());
  out.lists.resize(specs.size());
  out.owned.resize(specs.size());
  for (const auto& s : specs) {
    const int64_t len = static_cast<int64_t>(s.tensors.size());
    TORCH_CHECK(len == out.n || (!s.required && len == 0), "sam_kernels.", op, ": ", s.name,
                " has ", len, " tensors, expected ", out.n, " (as ", specs[0].name, ")");
  }
  // the checks; the indices whose tensors do not share one dense layout (run on stand-ins)
  std::vector<int64_t> apart;
  for (int64_t i = 0; i < out.n; ++i) {
    const at::Tensor& ref = specs[0].tensors[i];
    TORCH_CHECK(supported_dtype(ref.scalar_type()), "sam_kernels.", op,
                ": the compiled ops take float32, float16 or bfloat16 tensors, got ",
                ref.scalar_type(), " (", specs[0].name, "[", i, "]); use backend='eager'");
    bool same_layout = ref.is_non_overlapping_and_dense();
    for (const auto& s : specs) {
      if (s.tensors.empty()) continue;
      const at::Tensor& t = s.tensors[i];
      TORCH_CHECK(t.defined(), "sam_kernels.", op, ": ", s.name, "[", i, "] is undefined");
      TORCH_CHECK(t.device() == device, "sam_kernels.", op, ": ", s.name, "[", i, "] is on ",
                  t.device(), ", expected ", device);
      TORCH_CHECK(t.layout() == at::kStrided, "sam_kernels.", op, ": ", s.name, "[", i,
                  "] is not a dense strided tensor");
      TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sam_kernels.", op, ": ", s.name, "[",
                  i, "] is ", t.scalar_type(), " but ", specs[0].name, "[", i, "] is ",
                  ref.scalar_type(), "; the compiled ops need one dtype per tensor index");
      TORCH_CHECK(t.sizes() == ref.sizes(), "sam_kernels.", op, ": ", s.name, "[", i,
                  "] has shape ", t.sizes(), " but ", specs[0].name, "[", i, "] has ",
                  ref.sizes());
      if (!(t.is_non_overlapping_and_dense() && t.strides() == ref.strides())) {
        same_layout = false;
      }
    }
    if (same_layout && in_place_ok != nullptr && !in_place_ok(ref)) same_layout = false;
    if (!same_layout) apart.push_back(i);
  }
  for (size_t l = 0; l < specs.size(); ++l) {
    const auto& s = specs[l];
    if (s.tensors.empty()) continue;
    // a list whose tensors at those indices are all contiguous runs as the caller's
    bool copy = false;
    for (const int64_t i : apart) copy = copy || !s.tensors[i].is_contiguous();
    if (!copy) {
      out.lists[l] = s.tensors;
      continue;
    }
    std::vector<at::Tensor>& row = out.owned[l];
    row.assign(s.tensors.begin(), s.tensors.end());
    for (const int64_t i : apart) {
      const at::Tensor& t = s.tensors[i];
      if (t.is_contiguous()) continue;
      at::Tensor tmp;
      if (s.access == Access::kWrite) {
        tmp = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
      } else {
        tmp = t.contiguous();
      }
      if (s.access != Access::kRead) out.writeback.emplace_back(t, tmp);
      row[i] = tmp;
    }
    out.lists[l] = row;
  }
  return out;
}

// A 0-d or [n] float32 coefficient tensor on `device`; returns its per-tensor stride (0 or 1).
inline int scalar_or_vector(const char* op, const char* name, const at::Tensor& t, int64_t n,
                            at::Device device) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "sam_kernels.", op, ": ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "sam_kernels.", op, ": ", name, " is on ", t.device(),
              ", expected ", device);
  TORCH_CHECK(t.is_contiguous(), "sam_kernels.", op, ": ", name, " must be contiguous");
  if (t.dim() == 0 || (t.dim() == 1 && t.numel() == 1 && n != 1)) return 0;
  TORCH_CHECK(t.dim() == 1 && t.numel() == n, "sam_kernels.", op, ": ", name,
              " must be 0-d or have ", n, " entries, got shape ", t.sizes());
  return 1;
}

inline void check_scalar(const char* op, const char* name, const at::Tensor& t,
                         at::ScalarType dtype, at::Device device) {
  TORCH_CHECK(t.numel() == 1, "sam_kernels.", op, ": ", name, " must hold one value, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "sam_kernels.", op, ": ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "sam_kernels.", op, ": ", name, " is on ", t.device(),
              ", expected ", device);
}

// Coefficients of a K-term combination: [K] or [K, n] float32.
struct CoefInfo {
  int k = 1;
  int64_t k_stride = 0;
  int n_stride = 0;
};

inline CoefInfo coef_info(const char* op, const at::Tensor& coefs, int64_t n_terms_flat,
                          int64_t n, at::Device device) {
  TORCH_CHECK(coefs.scalar_type() == at::kFloat, "sam_kernels.", op, ": coefs must be float32");
  TORCH_CHECK(coefs.device() == device, "sam_kernels.", op, ": coefs is on ", coefs.device(),
              ", expected ", device);
  TORCH_CHECK(coefs.is_contiguous(), "sam_kernels.", op, ": coefs must be contiguous");
  TORCH_CHECK(coefs.dim() == 1 || coefs.dim() == 2, "sam_kernels.", op,
              ": coefs must be [K] or [K, n]");
  CoefInfo c;
  c.k = static_cast<int>(coefs.size(0));
  TORCH_CHECK(c.k >= 1 && n_terms_flat == c.k * n, "sam_kernels.", op, ": ", n_terms_flat,
              " term tensors for K = ", c.k, " terms of ", n, " tensors");
  if (coefs.dim() == 2) {
    TORCH_CHECK(coefs.size(1) == n, "sam_kernels.", op, ": coefs has shape ", coefs.sizes(),
                ", expected [", c.k, ", ", n, "]");
    c.k_stride = n;
    c.n_stride = 1;
  } else {
    c.k_stride = 1;
    c.n_stride = 0;
  }
  return c;
}

// Term k of a flattened K*n term list.
inline at::TensorList term(at::TensorList flat, int64_t k, int64_t n) {
  return flat.slice(k * n, n);
}

}  // namespace sam_kernels
