// Autograd of pyconvext::lstm_cell and pyconvext::lstm_layer, the refusal of
// their backward operators to be differentiated again, and of
// lstm_layer_values to take a gradient, in C++ for the Autograd dispatch key.

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/outputs.h"
#include "pyconvext.h"

namespace pyconvext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// A gradient that autograd left undefined (an output the loss does not use)
// as zeros like the output.
Tensor or_zeros(const Tensor& grad, const Tensor& like) { return grad.defined() ? grad : at::zeros_like(like); }

// The gradients of both biases: they add to the same gate pre-activations,
// so each one that was given gets the one bias gradient.
std::pair<Tensor, Tensor> bias_grads(AutogradContext* ctx, const Tensor& grad_bias) {
  return {ctx->saved_data["has_b_ih"].toBool() ? grad_bias : Tensor(),
          ctx->saved_data["has_b_hh"].toBool() ? grad_bias : Tensor()};
}

class LstmCellFunction : public torch::autograd::Function<LstmCellFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx, const Tensor& cx,
                               const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh) {
    auto [hy, cy, workspace] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return pyconvext::lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
    }();
    ctx->save_for_backward({input, hx, cx, w_ih, w_hh, workspace});
    ctx->saved_data["has_b_ih"] = given(b_ih);
    ctx->saved_data["has_b_hh"] = given(b_hh);
    ctx->mark_non_differentiable({workspace});
    // No zeros for the workspace's gradient on every call (nor for an unused state).
    ctx->set_materialize_grads(false);
    return {hy, cy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_b_ih"].toBool() || ctx->saved_data["has_b_hh"].toBool();
    auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_bias] = pyconvext::lstm_cell_backward(
        or_zeros(grads[0], s[1]), or_zeros(grads[1], s[2]), s[0], s[1], s[2], s[3], s[4], s[5], has_bias);
    const auto [g_b_ih, g_b_hh] = bias_grads(ctx, g_bias);
    return {g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh};
  }
};

class LstmLayerFunction : public torch::autograd::Function<LstmLayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx, const Tensor& cx,
                               const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
                               const std::optional<Tensor>& batch_sizes, bool reverse) {
    auto [output, hy, cy, workspace] = [&] {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return pyconvext::lstm_layer(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
    }();
    ctx->save_for_backward({input, hx, cx, w_ih, w_hh, w_hr.value_or(Tensor()), batch_sizes.value_or(Tensor()),
                            output, workspace});
    ctx->saved_data["has_b_ih"] = given(b_ih);
    ctx->saved_data["has_b_hh"] = given(b_hh);
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);
    return {output, hy, cy, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &hx = s[1], &cx = s[2], &output = s[7];
    const auto optional = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
    const bool has_bias = ctx->saved_data["has_b_ih"].toBool() || ctx->saved_data["has_b_hh"].toBool();
    auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_bias, g_w_hr] = pyconvext::lstm_layer_backward(
        or_zeros(grads[0], output), or_zeros(grads[1], hx), or_zeros(grads[2], cx), input, hx, cx, s[3], s[4],
        optional(s[5]), optional(s[6]), ctx->saved_data["reverse"].toBool(), output, s[8], has_bias);
    const auto [g_b_ih, g_b_hh] = bias_grads(ctx, g_bias);
    return {g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr, Tensor(), Tensor()};
  }
};

// The backward operators' own backward: refused, with the message that
// names the forward operator.
[[noreturn]] void refuse_double_backward(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "pyconvext.", op,
                              ": double backward (a gradient of the LSTM's gradients, e.g. "
                              "create_graph=True) is not supported");
}

class LstmCellBackwardFunction : public torch::autograd::Function<LstmCellBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& grad_hy, const Tensor& grad_cy,
                               const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                               const Tensor& w_hh, const Tensor& workspace, bool has_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [a, b, c, d, e, f] = pyconvext::lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, workspace, has_bias);
    return defined_only<6>({a, b, c, d, e, f});
  }
  static variable_list backward(AutogradContext*, variable_list) { refuse_double_backward("lstm_cell"); }
};

class LstmLayerBackwardFunction : public torch::autograd::Function<LstmLayerBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const Tensor& grad_output, const Tensor& grad_hy,
                               const Tensor& grad_cy, const Tensor& input, const Tensor& hx, const Tensor& cx,
                               const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                               const std::optional<Tensor>& batch_sizes, bool reverse, const Tensor& output,
                               const Tensor& workspace, bool has_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [a, b, c, d, e, f, g] = pyconvext::lstm_layer_backward(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh,
                                                     w_hr, batch_sizes, reverse, output, workspace, has_bias);
    return defined_only<7>({a, b, c, d, e, f, g});
  }
  static variable_list backward(AutogradContext*, variable_list) { refuse_double_backward("lstm_layer"); }
};

std::tuple<Tensor, Tensor, Tensor> lstm_cell_autograd(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                                      const Tensor& w_ih, const Tensor& w_hh,
                                                      const std::optional<Tensor>& b_ih,
                                                      const std::optional<Tensor>& b_hh) {
  const auto out = LstmCellFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_autograd(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& workspace, bool has_bias) {
  if (!at::GradMode::is_enabled()) {  // a first backward: no graph to record
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pyconvext::lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, workspace, has_bias);
  }
  const auto g = in_place<6>(
      LstmCellBackwardFunction::apply(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, workspace, has_bias),
      {true, true, true, true, true, has_bias});
  return {g[0], g[1], g[2], g[3], g[4], g[5]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_autograd(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& batch_sizes, bool reverse) {
  const auto out = LstmLayerFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_autograd(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& batch_sizes, bool reverse, const Tensor& output, const Tensor& workspace,
    bool has_bias) {
  if (!at::GradMode::is_enabled()) {  // a first backward: no graph to record
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pyconvext::lstm_layer_backward(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr,
                                          batch_sizes, reverse, output, workspace, has_bias);
  }
  const auto g = in_place<7>(LstmLayerBackwardFunction::apply(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih,
                                                              w_hh, w_hr, batch_sizes, reverse, output, workspace,
                                                              has_bias),
                             {true, true, true, true, true, has_bias, given(w_hr)});
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6]};
}

// lstm_layer_values saves no activations for a backward: it refuses
// arguments that require grad and otherwise goes straight to the kernel.
std::tuple<Tensor, Tensor, Tensor> lstm_layer_values_autograd(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& batch_sizes, bool reverse) {
  const auto needs_grad = [](const std::optional<Tensor>& t) { return given(t) && t->requires_grad(); };
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(needs_grad(input) || needs_grad(hx) || needs_grad(cx) || needs_grad(w_ih) ||
                    needs_grad(w_hh) || needs_grad(b_ih) || needs_grad(b_hh) || needs_grad(w_hr)),
              "pyconvext.lstm_layer_values: an argument requires grad, but this operator has no "
              "gradient; use pyconvext::lstm_layer, which saves what its backward needs "
              "(pyconvext.functional.lstm chooses it by itself)");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return pyconvext::lstm_layer_values(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, Autograd, m) {
  m.impl("lstm_cell", &lstm_cell_autograd);
  m.impl("lstm_cell_backward", &lstm_cell_backward_autograd);
  m.impl("lstm_layer", &lstm_layer_autograd);
  m.impl("lstm_layer_backward", &lstm_layer_backward_autograd);
  m.impl("lstm_layer_values", &lstm_layer_values_autograd);
}

}  // namespace pyconvext
