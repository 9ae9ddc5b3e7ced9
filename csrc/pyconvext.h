#pragma once

// C++ API of pyconvext for libtorch programs: typed calls through the PyTorch
// dispatcher to the operators that the pyconvext library registers when it is
// loaded. Link the library with --no-as-needed (the CMake target does), since
// nothing here refers to its symbols directly.
//
// Autograd for these operators is registered in the library itself
// (csrc/autograd/), so tensors that require grad get gradients through them
// with backward(), as with ATen's operators.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace pyconvext {

// The operator `pyconvext::<name>` with the C++ signature Signature.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Same semantics as at::conv2d with integer padding: input (N, C, H, W) or
// (C, H, W), weight (K, C / groups, kH, kW), optional bias (K).
inline at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias = std::nullopt,
                         c10::IntArrayRef stride = {1, 1}, c10::IntArrayRef padding = {0, 0},
                         c10::IntArrayRef dilation = {1, 1}, int64_t groups = 1) {
  static const auto op = find_op<at::Tensor(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::IntArrayRef,
      c10::IntArrayRef, c10::IntArrayRef, int64_t)>("pyconvext::conv2d");
  return op.call(input, weight, bias, stride, padding, dilation, groups);
}

// Gradients of conv2d with respect to (input, weight, bias); those not
// requested in output_mask are undefined tensors.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
      c10::IntArrayRef, int64_t, std::array<bool, 3>)>("pyconvext::conv2d_backward");
  return op.call(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
}

// Same semantics as at::max_pool2d_with_indices: input (N, C, H, W) or
// (C, H, W); returns (output, int64 indices into each input plane).
inline std::tuple<at::Tensor, at::Tensor> max_pool2d(
    const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding = {0, 0}, c10::IntArrayRef dilation = {1, 1},
    bool ceil_mode = false) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
      bool)>("pyconvext::max_pool2d");
  return op.call(input, kernel_size, stride, padding, dilation, ceil_mode);
}

// The output of max_pool2d alone (no indices are computed).
inline at::Tensor max_pool2d_values(
    const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding = {0, 0}, c10::IntArrayRef dilation = {1, 1},
    bool ceil_mode = false) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, c10::IntArrayRef,
                                            c10::IntArrayRef, c10::IntArrayRef,
                                            c10::IntArrayRef, bool)>("pyconvext::max_pool2d_values");
  return op.call(input, kernel_size, stride, padding, dilation, ceil_mode);
}

// The gradient of max_pool2d with respect to its input.
inline at::Tensor max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode) {
  static const auto op = find_op<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
      c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool)>("pyconvext::max_pool2d_backward");
  return op.call(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode);
}

// One LSTM step (gates i, f, g, o), as at::lstm_cell: returns (hy, cy,
// workspace), the workspace holding the activations the backward needs.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih = std::nullopt,
    const std::optional<at::Tensor>& b_hh = std::nullopt) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>("pyconvext::lstm_cell");
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
}

// Gradients of lstm_cell with respect to (input, hx, cx, w_ih, w_hh, bias);
// the bias gradient (of b_ih and b_hh alike) is undefined without has_bias.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& workspace, bool has_bias) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("pyconvext::lstm_cell_backward");
  return op.call(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, workspace, has_bias);
}

// One direction of one LSTM layer over a whole sequence: input (steps,
// batch, input_size), or packed rows with batch_sizes; w_hr projects the
// hidden state (proj_size). Returns (output, hy, cy, workspace).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, bool)>("pyconvext::lstm_layer");
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

// The (output, hy, cy) of lstm_layer without its workspace, for inference
// (it refuses arguments that require grad).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_values(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, bool)>("pyconvext::lstm_layer_values");
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

// Gradients of lstm_layer with respect to (input, hx, cx, w_ih, w_hh, bias,
// w_hr); bias and w_hr undefined where absent.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                    const std::optional<at::Tensor>& batch_sizes, bool reverse, const at::Tensor& output,
                    const at::Tensor& workspace, bool has_bias) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                            at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, bool, const at::Tensor&, const at::Tensor&, bool)>(
      "pyconvext::lstm_layer_backward");
  return op.call(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr, batch_sizes, reverse,
                 output, workspace, has_bias);
}

}  // namespace pyconvext
