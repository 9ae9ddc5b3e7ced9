// Autograd of pyconvext::conv2d and of its backward (double backward), in
// C++ for the Autograd dispatch key: a call costs what a native call costs.
// Both compute with our own operators, called through the dispatcher.

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/outputs.h"
#include "pyconvext.h"

namespace pyconvext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

// The integer arguments every conv2d call carries, saved for the backward.
void save_params(AutogradContext* ctx, c10::IntArrayRef stride, c10::IntArrayRef padding,
                 c10::IntArrayRef dilation, int64_t groups) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
}

struct Params {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  explicit Params(AutogradContext* ctx)
      : stride(ctx->saved_data["stride"].toIntVector()),
        padding(ctx->saved_data["padding"].toIntVector()),
        dilation(ctx->saved_data["dilation"].toIntVector()),
        groups(ctx->saved_data["groups"].toInt()) {}
};

class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({input, weight});
    save_params(ctx, stride, padding, dilation, groups);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pyconvext::conv2d(input, weight, bias, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Params p(ctx);
    // Edges are numbered over the tensors given: input, weight, bias if any.
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    auto [grad_input, grad_weight, grad_bias] =
        pyconvext::conv2d_backward(grads[0], saved[0], saved[1], p.stride, p.padding, p.dilation, p.groups, mask);
    return {grad_input, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// conv2d_backward is bilinear: grad_input in (grad_output, weight),
// grad_weight in (grad_output, input), so its derivatives are convolutions
// again.
class Conv2dBackwardFunction : public torch::autograd::Function<Conv2dBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_output, const Tensor& input,
                               const Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
    ctx->save_for_backward({grad_output, input, weight});
    save_params(ctx, stride, padding, dilation, groups);
    ctx->saved_data["output_mask"] = int64_t(output_mask[0]) | int64_t(output_mask[1]) << 1 | int64_t(output_mask[2]) << 2;
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_weight, grad_bias] =
        pyconvext::conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
    return defined_only<3>({grad_input, grad_weight, grad_bias});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &grad_output = saved[0], &input = saved[1], &weight = saved[2];
    const int64_t mask = ctx->saved_data["output_mask"].toInt();
    const auto [gg_input, gg_weight, gg_bias] = in_place<3>(grads, {(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0});
    const Params p(ctx);
    Tensor g_grad_output, g_input, g_weight;
    if (ctx->needs_input_grad(0)) {
      if (gg_input.defined()) {
        g_grad_output = pyconvext::conv2d(gg_input, weight, gg_bias.defined() ? std::optional<Tensor>(gg_bias) : std::nullopt,
                               p.stride, p.padding, p.dilation, p.groups);
      } else if (gg_bias.defined()) {
        g_grad_output = gg_bias.view({-1, 1, 1}).expand_as(grad_output);
      }
      if (gg_weight.defined()) {
        const Tensor term = pyconvext::conv2d(input, gg_weight, std::nullopt, p.stride, p.padding, p.dilation, p.groups);
        g_grad_output = g_grad_output.defined() ? g_grad_output.add(term) : term;
      }
    }
    if (ctx->needs_input_grad(1) && gg_weight.defined()) {
      g_input = std::get<0>(pyconvext::conv2d_backward(grad_output, input, gg_weight, p.stride, p.padding, p.dilation,
                                            p.groups, {true, false, false}));
    }
    if (ctx->needs_input_grad(2) && gg_input.defined()) {
      g_weight = std::get<1>(pyconvext::conv2d_backward(grad_output, gg_input, weight, p.stride, p.padding, p.dilation,
                                             p.groups, {false, true, false}));
    }
    return {g_grad_output, g_input, g_weight, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor conv2d_autograd(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                       int64_t groups) {
  return Conv2dFunction::apply(input, weight, bias, stride, padding, dilation, groups);
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_autograd(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  if (!at::GradMode::is_enabled()) {  // a first backward: no graph to record
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pyconvext::conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
  }
  const auto [grad_input, grad_weight, grad_bias] = in_place<3>(
      Conv2dBackwardFunction::apply(grad_output, input, weight, stride, padding, dilation, groups, output_mask),
      output_mask);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
  m.impl("conv2d_backward", &conv2d_backward_autograd);
}

}  // namespace pyconvext
