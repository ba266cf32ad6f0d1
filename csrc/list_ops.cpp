// Per-tensor bookkeeping of a step as one CPU op each (sam_kernels/ops/scratch.py): the loop over
// the tensors runs here instead of as one dispatched ATen op per tensor, so the host work of a
// step does not grow by a Python dispatch per parameter (issue 14).
//
// Bit-identical to the eager references: empty_like_list allocates what
// torch.empty_like(t, memory_format=torch.preserve_format) allocates (uninitialised), and
// zero_unless_ leaves a tensor's bits as they are (ok = 1) or writes +0 to every element (ok = 0),
// which is what multiplying its bits by the integer flag gives.
//
// CPU tensors only: the Python binding (sam_kernels/cuda_ext.py) declines other devices.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace sam_kernels {
namespace {

std::vector<at::Tensor> empty_like_list_cpu(at::TensorList like) {
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  for (const auto& t : like) {
    out.push_back(at::empty_like(t, at::MemoryFormat::Preserve));
  }
  return out;
}

// tensors = tensors if ok else +0 (ok: a 0-d float32 CPU flag, 1.0 or 0.0)
void zero_unless_cpu(at::TensorList tensors, const at::Tensor& ok) {
  TORCH_CHECK(ok.device().is_cpu() && ok.dim() == 0 && ok.scalar_type() == at::kFloat,
              "sam_kernels.zero_unless_: ok must be a 0-d float32 CPU tensor");
  // the eager reference multiplies the bits by ok cast to an integer; the flags of a step are
  // exactly 0.0 or 1.0 (checked as floats: casting a NaN to an integer is undefined)
  const float flag = *ok.const_data_ptr<float>();
  TORCH_CHECK(flag == 0.0f || flag == 1.0f, "sam_kernels.zero_unless_: ok must be 0 or 1");
  if (flag == 1.0f) {
    return;
  }
  for (const auto& t : tensors) {
    const_cast<at::Tensor&>(t).zero_();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels_C, CPU, m) {
  m.impl("empty_like_list", &empty_like_list_cpu);
  m.impl("zero_unless_", &zero_unless_cpu);
}

}  // namespace sam_kernels
