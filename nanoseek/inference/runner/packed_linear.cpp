// nanoseek::packed_linear in C++: y = x @ w.T on a weight packed ahead of time (kind 0: MKL sgemm pack,
// kind 1: oneDNN-blocked, bf16 or fp32). Stateless: the runner owns the packs and passes them in. Registered for
// the CPU and MkldnnCPU keys (the packs are mkldnn-layout tensors), so a compiled decode step's C++
// wrapper calls the kernel without a round trip into Python (~5 us per call, ~20 calls a step).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w, int64_t kind) {
  static auto mkl = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("mkl::_mkl_linear", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, int64_t)>();
  static auto onednn = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                             c10::string_view, c10::List<std::optional<at::Scalar>>,
                                             std::optional<c10::string_view>)>();
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor y = kind == 0 ? mkl.call(x2, packed, w, std::nullopt, x2.size(0))
                           : onednn.call(x2, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), "");
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return y.view(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("packed_linear", packed_linear); }
TORCH_LIBRARY_IMPL(nanoseek, MkldnnCPU, m) { m.impl("packed_linear", packed_linear); }
