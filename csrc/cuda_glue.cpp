// CUDA implementations of the sam_kernels_C ops: tensor lists -> raw pointers, grouped by dtype,
// handed to the torch-free launchers (cuda_launchers.h) on the current stream. No host reads:
// every scalar that may live on the device (scale, ok, lr, loss, seed, offset, step counters)
// is passed to the kernels as a device pointer.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda_launchers.h"
#include "glue.h"

namespace sam_kernels {
namespace {

namespace kc = sam_kernels::cuda;

kc::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kc::kFloat32;
    case at::kHalf:
      return kc::kFloat16;
    case at::kBFloat16:
      return kc::kBFloat16;
    default:
      TORCH_CHECK(false, "sam_kernels: unsupported dtype ", t);
  }
}

// One dtype group of a prepared call: owns the pointer arrays a kc::Group points into.
struct GroupBuf {
  at::ScalarType dtype;
  std::vector<int64_t> rows;  // indices into the prepared lists
  std::vector<int64_t> numel;
  std::vector<int> index;
  std::vector<int64_t> first;  // element 0's index in the concatenated list (noise counters)
  std::vector<std::vector<void*>> ptrs = std::vector<std::vector<void*>>(kc::kMaxLists);

  kc::Group group() const {
    kc::Group g;
    g.n = static_cast<int>(rows.size());
    g.dtype = to_dtype(dtype);
    g.numel = numel.data();
    g.index = index.data();
    g.first = first.data();
    for (int l = 0; l < kc::kMaxLists; ++l) g.lists[l] = ptrs[l].empty() ? nullptr : ptrs[l].data();
    return g;
  }
};

// slots[l] = launcher slot of prepared list l (-1: not passed). extra: (slot, tensors) lists
// that are not element lists (the 0-d step counters).
std::vector<GroupBuf> make_groups(const Prepared& p, const std::vector<int>& slots,
                                  const std::vector<std::pair<int, at::TensorList>>& extra = {}) {
  std::vector<GroupBuf> groups;
  int64_t before = 0;  // elements of the tensors before i, every dtype
  for (int64_t i = 0; i < p.n; ++i) {
    const at::ScalarType dt = p.lists[0][i].scalar_type();
    GroupBuf* g = nullptr;
    for (auto& cand : groups) {
      if (cand.dtype == dt) g = &cand;
    }
    if (g == nullptr) {
      groups.emplace_back();
      g = &groups.back();
      g->dtype = dt;
    }
    TORCH_CHECK(i <= INT32_MAX, "sam_kernels: too many tensors");
    g->rows.push_back(i);
    g->numel.push_back(p.lists[0][i].numel());
    g->index.push_back(static_cast<int>(i));
    g->first.push_back(before);
    before += p.lists[0][i].numel();
    for (size_t l = 0; l < slots.size(); ++l) {
      if (slots[l] < 0 || !p.has(l)) continue;
      g->ptrs[slots[l]].push_back(p.lists[l][i].data_ptr());
    }
    for (const auto& e : extra) g->ptrs[e.first].push_back(e.second[i].data_ptr());
  }
  return groups;
}

void* stream_of(at::Device d) { return c10::cuda::getCurrentCUDAStream(d.index()).stream(); }

at::Device device_of(at::TensorList l) {
  TORCH_CHECK(!l.empty(), "sam_kernels: empty tensor list");
  return l[0].device();
}

const float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

// ------------------------------------------------------------------ reductions
at::Tensor sumsq_partials(const char* op, at::TensorList grads, at::TensorList params,
                          double eta, at::Device dev, int64_t* count) {
  Prepared p = prepare_lists(op,
                             {{"grads", grads, Access::kRead, true},
                              {"params", params, Access::kRead, false}},
                             dev);
  auto groups = make_groups(p, {0, 1});
  int64_t total = 0;
  for (const auto& g : groups) total += kc::num_chunks(g.group());
  at::Tensor partials =
      at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kDouble).device(dev));
  int64_t base = 0;
  for (const auto& g : groups) {
    const kc::Group kg = g.group();
    kc::launch_sumsq_partials(kg, static_cast<float>(eta), partials.data_ptr<double>() + base,
                              stream_of(dev));
    base += kc::num_chunks(kg);
  }
  *count = total;
  return partials;
}

at::Tensor grad_norm_cuda(at::TensorList grads, at::TensorList params, double eta) {
  const at::Device dev = device_of(grads);
  c10::cuda::CUDAGuard guard(dev);
  int64_t count = 0;
  at::Tensor partials = sumsq_partials("grad_norm", grads, params, eta, dev, &count);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(dev));
  kc::launch_norm_finalize(partials.data_ptr<double>(), count, out.data_ptr<float>(),
                           stream_of(dev));
  return out;
}

at::Tensor aesam_stats_cuda(at::TensorList grads, const at::Tensor& stats, double delta,
                            double c) {
  const at::Device dev = stats.device();
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(stats.numel() == 2 && stats.scalar_type() == at::kFloat && stats.is_contiguous(),
              "sam_kernels.aesam_stats: stats must be a contiguous float32 [2] tensor");
  int64_t count = 0;
  at::Tensor partials = sumsq_partials("aesam_stats", grads, {}, 0.0, dev, &count);
  at::Tensor decision = at::empty({}, at::TensorOptions().dtype(at::kInt).device(dev));
  kc::launch_aesam_finalize(partials.data_ptr<double>(), count, stats.data_ptr<float>(),
                            decision.data_ptr<int>(), static_cast<float>(delta),
                            static_cast<float>(c), stream_of(dev));
  return decision;
}

// ------------------------------------------------------------------ element-wise
void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  const at::Tensor& scale, bool adaptive, double eta, bool save_backup) {
  if (params.empty()) return;
  const char* op = "perturb";
  const at::Device dev = device_of(params);
  c10::cuda::CUDAGuard guard(dev);
  Prepared p = prepare_lists(
      op,
      {{"params", params, save_backup ? Access::kReadWrite : Access::kWrite, true},
       {"grads", grads, Access::kRead, true},
       {"backups", backups, save_backup ? Access::kWrite : Access::kRead, true}},
      dev);
  const int stride = scalar_or_vector(op, "scale", scale, p.n, dev);
  for (const auto& g : make_groups(p, {0, 1, 2})) {
    kc::launch_perturb(g.group(), fptr(scale), stride, adaptive, static_cast<float>(eta),
                       save_backup, stream_of(dev));
  }
  p.finish();
}

void noise_perturb_cuda(at::TensorList params, at::TensorList backups, const at::Tensor& scale,
                        int64_t kind, double half_cube_len, bool save_backup,
                        const at::Tensor& seed, const at::Tensor& offset) {
  if (params.empty()) return;
  const char* op = "noise_perturb";
  const at::Device dev = device_of(params);
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(kind == 0 || kind == 1, "sam_kernels.noise_perturb: kind must be 0 or 1");
  Prepared p = prepare_lists(
      op,
      {{"params", params, save_backup ? Access::kReadWrite : Access::kWrite, true},
       {"backups", backups, save_backup ? Access::kWrite : Access::kRead, true}},
      dev);
  const int stride = scalar_or_vector(op, "scale", scale, p.n, dev);
  check_scalar(op, "seed", seed, at::kLong, dev);
  check_scalar(op, "offset", offset, at::kLong, dev);
  for (const auto& g : make_groups(p, {0, 1})) {
    kc::launch_noise_perturb(g.group(), fptr(scale), stride, static_cast<int>(kind),
                             static_cast<float>(half_cube_len), save_backup,
                             seed.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
                             stream_of(dev));
  }
  p.finish();
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  if (params.empty()) return;
  const at::Device dev = device_of(params);
  c10::cuda::CUDAGuard guard(dev);
  Prepared p = prepare_lists("restore",
                             {{"params", params, Access::kWrite, true},
                              {"backups", backups, Access::kRead, true}},
                             dev);
  for (const auto& g : make_groups(p, {0, 1})) kc::launch_restore(g.group(), stream_of(dev));
  p.finish();
}

void lincomb_cuda(at::TensorList out, at::TensorList terms, const at::Tensor& coefs) {
  if (out.empty()) return;
  const char* op = "lincomb";
  const at::Device dev = device_of(out);
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n = static_cast<int64_t>(out.size());
  const CoefInfo ci = coef_info(op, coefs, static_cast<int64_t>(terms.size()), n, dev);
  TORCH_CHECK(ci.k <= 4, "sam_kernels.lincomb: the CUDA kernel combines at most 4 terms");
  static const char* names[4] = {"terms[0]", "terms[1]", "terms[2]", "terms[3]"};
  std::vector<ListSpec> specs = {{"out", out, Access::kWrite, true}};
  for (int k = 0; k < ci.k; ++k) specs.push_back({names[k], term(terms, k, n), Access::kRead, true});
  Prepared p = prepare_lists(op, specs, dev);
  kc::Coefs cf;
  cf.ptr = fptr(coefs);
  cf.k = ci.k;
  cf.k_stride = ci.k_stride;
  cf.n_stride = ci.n_stride;
  std::vector<int> slots;
  for (int l = 0; l <= ci.k; ++l) slots.push_back(l);
  for (const auto& g : make_groups(p, slots)) kc::launch_lincomb(g.group(), cf, stream_of(dev));
  p.finish();
}

void frob_accumulate_cuda(at::TensorList cross, at::TensorList gsum, at::TensorList grads,
                          const at::Tensor& loss, bool init) {
  if (cross.empty()) return;
  const char* op = "frob_accumulate";
  const at::Device dev = device_of(cross);
  c10::cuda::CUDAGuard guard(dev);
  const Access sums = init ? Access::kWrite : Access::kReadWrite;
  Prepared p = prepare_lists(op,
                             {{"cross", cross, sums, true},
                              {"gsum", gsum, sums, true},
                              {"grads", grads, Access::kRead, true}},
                             dev);
  check_scalar(op, "loss", loss, at::kFloat, dev);
  for (const auto& g : make_groups(p, {0, 1, 2})) {
    kc::launch_frob_accumulate(g.group(), fptr(loss), init, stream_of(dev));
  }
  p.finish();
}

// ------------------------------------------------------------------ optimizer steps
struct StepSetup {
  Prepared p;
  kc::StepCommon common;
  std::vector<int> slots;
};

StepSetup prepare_step(const char* op, at::TensorList params, at::TensorList grads,
                       const std::optional<at::Tensor>& coefs, at::TensorList backups,
                       const std::vector<std::pair<ListSpec, int>>& rest, at::TensorList steps,
                       const std::optional<at::Tensor>& lr_tensor, double lr,
                       const std::optional<at::Tensor>& ok, double weight_decay, bool maximize,
                       at::Device dev) {
  StepSetup s;
  const int64_t n = static_cast<int64_t>(params.size());
  CoefInfo ci;
  if (coefs.has_value()) {
    ci = coef_info(op, *coefs, static_cast<int64_t>(grads.size()), n, dev);
    TORCH_CHECK(ci.k <= 3, "sam_kernels.", op, ": a gradient combines at most 3 terms");
    s.common.coefs.ptr = fptr(*coefs);
    s.common.coefs.k = ci.k;
    s.common.coefs.k_stride = ci.k_stride;
    s.common.coefs.n_stride = ci.n_stride;
  } else {
    TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "sam_kernels.", op, ": grads has ",
                grads.size(), " tensors, expected ", n);
  }
  static const char* gnames[3] = {"grads[0]", "grads[1]", "grads[2]"};
  std::vector<ListSpec> specs;
  specs.push_back({"params", params, backups.empty() ? Access::kReadWrite : Access::kWrite, true});
  s.slots.push_back(kc::kParams);
  for (int k = 0; k < ci.k; ++k) {
    specs.push_back({gnames[k], term(grads, k, n), Access::kRead, true});
    s.slots.push_back(kc::kGrad0 + k);
  }
  specs.push_back({"backups", backups, Access::kRead, false});
  s.slots.push_back(kc::kBackups);
  for (const auto& r : rest) {
    specs.push_back(r.first);
    s.slots.push_back(r.second);
  }
  s.p = prepare_lists(op, specs, dev);
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == n, "sam_kernels.", op, ": steps has ",
              steps.size(), " tensors, expected ", n);
  for (const auto& t : steps) check_scalar(op, "steps[i]", t, at::kFloat, dev);
  if (ok.has_value()) {
    check_scalar(op, "ok", *ok, at::kFloat, dev);
    s.common.ok = fptr(*ok);
  }
  if (lr_tensor.has_value()) {
    check_scalar(op, "lr", *lr_tensor, at::kFloat, dev);
    s.common.lr_ptr = fptr(*lr_tensor);
  }
  s.common.lr = lr;
  s.common.weight_decay = weight_decay;
  s.common.maximize = maximize;
  return s;
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads,
                   const std::optional<at::Tensor>& coefs, at::TensorList momentum_buffers,
                   at::TensorList steps, at::TensorList backups,
                   const std::optional<at::Tensor>& lr_tensor, double lr, double momentum,
                   double dampening, bool nesterov, double weight_decay, bool maximize,
                   const std::optional<at::Tensor>& ok) {
  if (params.empty()) return;
  const at::Device dev = device_of(params);
  c10::cuda::CUDAGuard guard(dev);
  const bool use_buf = momentum != 0.0;
  StepSetup s = prepare_step(
      "sgd_step", params, grads, coefs, backups,
      {{{"momentum_buffers", use_buf ? momentum_buffers : at::TensorList(), Access::kReadWrite,
         use_buf},
        kc::kBufs}},
      steps, lr_tensor, lr, ok, weight_decay, maximize, dev);
  for (const auto& g : make_groups(s.p, s.slots, {{kc::kSgdSteps, steps}})) {
    kc::launch_sgd_step(g.group(), s.common, momentum, dampening, nesterov, stream_of(dev));
  }
  s.p.finish();
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads,
                     const std::optional<at::Tensor>& coefs, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList steps, at::TensorList backups,
                     const std::optional<at::Tensor>& lr_tensor, double lr, double beta1,
                     double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                     const std::optional<at::Tensor>& ok) {
  if (params.empty()) return;
  const at::Device dev = device_of(params);
  c10::cuda::CUDAGuard guard(dev);
  StepSetup s = prepare_step(
      "adamw_step", params, grads, coefs, backups,
      {{{"exp_avgs", exp_avgs, Access::kReadWrite, true}, kc::kExpAvg},
       {{"exp_avg_sqs", exp_avg_sqs, Access::kReadWrite, true}, kc::kExpAvgSq},
       {{"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList(), Access::kReadWrite,
         amsgrad},
        kc::kMaxExpAvgSq}},
      steps, lr_tensor, lr, ok, weight_decay, maximize, dev);
  for (const auto& g : make_groups(s.p, s.slots, {{kc::kAdamSteps, steps}})) {
    kc::launch_adamw_step(g.group(), s.common, beta1, beta2, eps, amsgrad, stream_of(dev));
  }
  s.p.finish();
}

// ------------------------------------------------------------------ the scalar glue
// (the CPU ops, their checks and their rules of bit-identity: scalar_glue.cpp)
void check_on(const at::Tensor& t, const at::Device& dev, const char* op, const char* name) {
  TORCH_CHECK(t.device() == dev, "sam_kernels.", op, ": ", name, " is on ", t.device(),
              ", expected ", dev);
}

kc::ValueKind value_kind(const at::Tensor& v) {
  switch (v.scalar_type()) {
    case at::kFloat:
      return kc::kValueF32;
    case at::kDouble:
      return kc::kValueF64;
    case at::kHalf:
      return kc::kValueF16;
    case at::kBFloat16:
      return kc::kValueBF16;
    default:
      TORCH_CHECK(at::isIntegralType(v.scalar_type(), /*includeBool=*/true),
                  "sam_kernels.finite_and: unsupported dtype ", v.scalar_type());
      return kc::kValueInt;
  }
}

// ok_out = ok * prod_i [values_i finite]  (float32 0-d; ok absent: 1)
at::Tensor finite_and_cuda(const std::optional<at::Tensor>& ok, at::TensorList values) {
  TORCH_CHECK(ok.has_value() || !values.empty(), "sam_kernels.finite_and: no tensor");
  const at::Device dev = ok.has_value() ? ok->device() : values[0].device();
  c10::cuda::CUDAGuard guard(dev);
  if (ok.has_value()) {
    TORCH_CHECK(ok->dim() == 0 && ok->scalar_type() == at::kFloat,
                "sam_kernels.finite_and: ok must be a 0-d float32 tensor");
  }
  // values read in place (a view's own element): one-element tensors of one device
  std::vector<at::Tensor> vals;
  vals.reserve(values.size());
  for (const at::Tensor& v : values) {
    check_on(v, dev, "finite_and", "a value");
    TORCH_CHECK(v.numel() == 1, "sam_kernels.finite_and: values must hold one element, got shape ",
                v.sizes());
    vals.push_back(v);
  }
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(dev));
  const float* acc = ok.has_value() ? ok->const_data_ptr<float>() : nullptr;
  size_t i = 0;
  do {  // kMaxFiniteValues per launch; a longer list chains them (the same products in order)
    kc::FiniteValues fv;
    for (; i < vals.size() && fv.n < kc::kMaxFiniteValues; ++i, ++fv.n) {
      fv.ptr[fv.n] = vals[i].const_data_ptr();
      fv.kind[fv.n] = value_kind(vals[i]);
    }
    kc::launch_finite_and(acc, fv, out.mutable_data_ptr<float>(), stream_of(dev));
    acc = out.const_data_ptr<float>();
  } while (i < vals.size());
  return out;
}

bool f32_or_f64(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// [rho * inv] (+ [-(rho * inv)] when negated), inv = nan_to_num(1/(norm + 1e-12)) [* factor]
std::vector<at::Tensor> ascent_scale_cuda(const at::Tensor& norm, const at::Tensor& rho,
                                          const std::optional<at::Tensor>& factor_tensor,
                                          double factor, bool negated) {
  const at::Device dev = norm.device();
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(norm.dim() == 0 && f32_or_f64(norm),
              "sam_kernels.ascent_scale: norm must be a 0-d float32/float64 tensor");
  check_on(rho, dev, "ascent_scale", "rho");
  TORCH_CHECK(rho.dim() == 1 && rho.is_contiguous() && f32_or_f64(rho),
              "sam_kernels.ascent_scale: rho must be a contiguous 1-d float32/float64 tensor");
  if (factor_tensor.has_value()) {
    check_on(*factor_tensor, dev, "ascent_scale", "factor");
    TORCH_CHECK(factor_tensor->dim() == 0 && factor_tensor->scalar_type() == norm.scalar_type(),
                "sam_kernels.ascent_scale: factor must be a 0-d tensor of norm's dtype");
  }
  std::vector<at::Tensor> out{at::empty_like(rho)};
  if (negated) out.push_back(at::empty_like(rho));
  kc::AscentScaleArgs a;
  a.norm = norm.const_data_ptr();
  a.norm_f64 = norm.scalar_type() == at::kDouble;
  a.rho = rho.const_data_ptr();
  a.rho_f64 = rho.scalar_type() == at::kDouble;
  a.n = rho.numel();
  a.factor_t = factor_tensor.has_value() ? factor_tensor->const_data_ptr() : nullptr;
  a.factor = factor;
  a.scale = out[0].mutable_data_ptr();
  a.negated = negated ? out[1].mutable_data_ptr() : nullptr;
  kc::launch_ascent_scale(a, stream_of(dev));
  return out;
}

// counters = [applied, skipped] += [ok, 1 - ok]
void count_step_cuda(const at::Tensor& counters, const at::Tensor& ok) {
  const at::Device dev = counters.device();
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(counters.scalar_type() == at::kFloat && counters.dim() == 1 &&
                  counters.numel() == 2 && counters.is_contiguous(),
              "sam_kernels.count_step_: counters must be a contiguous float32 [2] tensor");
  check_on(ok, dev, "count_step_", "ok");
  TORCH_CHECK(ok.dim() == 0 && ok.scalar_type() == at::kFloat,
              "sam_kernels.count_step_: ok must be a 0-d float32 tensor");
  kc::launch_count_step(counters.mutable_data_ptr<float>(), ok.const_data_ptr<float>(),
                        stream_of(dev));
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels_C, CUDA, m) {
  m.impl("grad_norm", &grad_norm_cuda);
  m.impl("aesam_stats_", &aesam_stats_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("noise_perturb_", &noise_perturb_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("lincomb_", &lincomb_cuda);
  m.impl("frob_accumulate_", &frob_accumulate_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("finite_and", &finite_and_cuda);
  m.impl("ascent_scale", &ascent_scale_cuda);
  m.impl("count_step_", &count_step_cuda);
}

}  // namespace sam_kernels
