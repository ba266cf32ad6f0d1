// The scalar glue of a SAM-family step on CUDA tensors: finite_and, ascent_scale, count_step_
// (their CPU ops and the rules of bit-identity: scalar_glue.cpp). Each is one launch of one
// small block instead of a chain of ATen kernels (four to six launches each), so a planned step
// launches a few kernels, not dozens.
//
// Bit-identical to the CPU ops and the eager chains: every value is formed by the same IEEE
// operations in the same order, written with the round-to-nearest intrinsics (__fadd_rn, ...),
// which nvcc never contracts into an FMA or replaces with an approximation.
#include "multi_tensor.cuh"

namespace sam_kernels {
namespace cuda {
namespace {

// isfinite of one value of the given kind, read from its bits (half and bfloat16: all exponent
// bits set is inf or NaN, exactly what isfinite of the value converted to float tests)
__device__ bool value_is_finite(const void* p, int kind) {
  switch (kind) {
    case kValueF32:
      return isfinite(*static_cast<const float*>(p));
    case kValueF64:
      return isfinite(*static_cast<const double*>(p));
    case kValueF16:
      return (*static_cast<const uint16_t*>(p) & 0x7C00u) != 0x7C00u;
    case kValueBF16:
      return (*static_cast<const uint16_t*>(p) & 0x7F80u) != 0x7F80u;
    default:  // integers and bool
      return true;
  }
}

__global__ void finite_and_kernel(const float* ok, FiniteValues v, float* out) {
  float acc = ok != nullptr ? *ok : 1.0f;
  for (int i = 0; i < v.n; ++i) {
    // acc * 0 or acc * 1: the eager chain's products (a NaN ok stays NaN, as there)
    acc = __fmul_rn(acc, value_is_finite(v.ptr[i], v.kind[i]) ? 1.0f : 0.0f);
  }
  *out = acc;
}

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// scale[i] = rho[i] * R(inv), inv = nan_to_num(1 / (norm + 1e-12)) [* factor], in N
template <typename N, typename R>
__global__ void ascent_scale_kernel(const N* norm, const R* rho, int64_t n, const N* factor_t,
                                    double factor, R* scale, R* negated) {
  const N d = add_rn(*norm, static_cast<N>(1e-12));
  const N r = div_rn(static_cast<N>(1), d);
  N inv = isfinite(r) ? r : static_cast<N>(0);
  if (factor_t != nullptr) {
    inv = mul_rn(inv, *factor_t);
  } else if (factor != 1.0) {
    inv = mul_rn(inv, static_cast<N>(factor));
  }
  const R inv_r = static_cast<R>(inv);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const R s = mul_rn(rho[i], inv_r);
    scale[i] = s;
    if (negated != nullptr) negated[i] = -s;
  }
}

// counters = [applied, skipped] += [ok, 1 - ok]
__global__ void count_step_kernel(float* counters, const float* ok) {
  const float o = *ok;
  const float skipped = __fsub_rn(1.0f, o);
  counters[0] = __fadd_rn(counters[0], o);
  counters[1] = __fadd_rn(counters[1], skipped);
}

constexpr int kGlueThreads = 256;

template <typename N, typename R>
void launch_scale(const AscentScaleArgs& a, cudaStream_t s) {
  const int64_t blocks64 = (a.n + kGlueThreads - 1) / kGlueThreads;
  const int blocks = static_cast<int>(blocks64 < 1 ? 1 : (blocks64 > 1024 ? 1024 : blocks64));
  ascent_scale_kernel<N, R><<<blocks, kGlueThreads, 0, s>>>(
      static_cast<const N*>(a.norm), static_cast<const R*>(a.rho), a.n,
      static_cast<const N*>(a.factor_t), a.factor, static_cast<R*>(a.scale),
      static_cast<R*>(a.negated));
}

}  // namespace

void launch_finite_and(const float* ok, const FiniteValues& v, float* out, void* stream) {
  finite_and_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(ok, v, out);
  check_cuda(cudaGetLastError(), "finite_and");
}

void launch_ascent_scale(const AscentScaleArgs& a, void* stream) {
  if (a.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (a.norm_f64) {
    if (a.rho_f64) {
      launch_scale<double, double>(a, s);
    } else {
      launch_scale<double, float>(a, s);
    }
  } else if (a.rho_f64) {
    launch_scale<float, double>(a, s);
  } else {
    launch_scale<float, float>(a, s);
  }
  check_cuda(cudaGetLastError(), "ascent_scale");
}

void launch_count_step(float* counters, const float* ok, void* stream) {
  count_step_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(counters, ok);
  check_cuda(cudaGetLastError(), "count_step_");
}

}  // namespace cuda
}  // namespace sam_kernels
