// Autograd of pyconvext::max_pool2d and of its backward (double backward),
// and the refusal of max_pool2d_values to take a gradient, in C++ for the
// Autograd dispatch key.

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "pyconvext.h"

namespace pyconvext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

void save_params(AutogradContext* ctx, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                 c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  ctx->saved_data["kernel_size"] = kernel_size.vec();
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["ceil_mode"] = ceil_mode;
}

class MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, c10::IntArrayRef kernel_size,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               bool ceil_mode) {
    auto [output, indices] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return pyconvext::max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
    }();
    ctx->save_for_backward({input, indices});
    save_params(ctx, kernel_size, stride, padding, dilation, ceil_mode);
    ctx->mark_non_differentiable({indices});
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const Tensor grad_input = pyconvext::max_pool2d_backward(
        grads[0], saved[0], saved[1], d["kernel_size"].toIntVector(), d["stride"].toIntVector(),
        d["padding"].toIntVector(), d["dilation"].toIntVector(), d["ceil_mode"].toBool());
    return {grad_input, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// max_pool2d_backward is linear in grad_output: it scatters each element to
// its index, so its derivative gathers from the same indices.
class MaxPool2dBackwardFunction : public torch::autograd::Function<MaxPool2dBackwardFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& grad_output, const Tensor& input,
                        const Tensor& indices, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
    ctx->save_for_backward({indices});
    ctx->saved_data["grad_output_sizes"] = grad_output.sizes().vec();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pyconvext::max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor indices = ctx->get_saved_variables()[0];
    const Tensor g_grad_output = grads[0].flatten(-2).gather(-1, indices.flatten(-2))
                                     .view(ctx->saved_data["grad_output_sizes"].toIntVector());
    return {g_grad_output, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> max_pool2d_autograd(const Tensor& input, c10::IntArrayRef kernel_size,
                                               c10::IntArrayRef stride, c10::IntArrayRef padding,
                                               c10::IntArrayRef dilation, bool ceil_mode) {
  const auto outputs = MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation, ceil_mode);
  return {outputs[0], outputs[1]};
}

Tensor max_pool2d_backward_autograd(const Tensor& grad_output, const Tensor& input, const Tensor& indices,
                                    c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  if (!at::GradMode::is_enabled()) {  // a first backward: no graph to record
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pyconvext::max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation,
                                          ceil_mode);
  }
  return MaxPool2dBackwardFunction::apply(grad_output, input, indices, kernel_size, stride, padding, dilation,
                                          ceil_mode);
}

// max_pool2d_values has no gradient (its backward would need the indices it
// does not compute): it refuses an input that needs one and otherwise goes
// straight on to the CPU or CUDA kernel.
Tensor max_pool2d_values_autograd(const Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(!(input.requires_grad() && at::GradMode::is_enabled()),
              "pyconvext.max_pool2d_values: the input requires grad, but this operator has no "
              "gradient; use pyconvext::max_pool2d, which returns the indices its backward needs "
              "(pyconvext.functional.max_pool2d chooses it by itself)");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return pyconvext::max_pool2d_values(input, kernel_size, stride, padding, dilation, ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, Autograd, m) {
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("max_pool2d_backward", &max_pool2d_backward_autograd);
  m.impl("max_pool2d_values", &max_pool2d_values_autograd);
}

}  // namespace pyconvext
