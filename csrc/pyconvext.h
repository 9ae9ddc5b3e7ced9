#pragma once

// C++ API of pyconvext for libtorch programs: typed calls through the PyTorch
// dispatcher to the operators that the pyconvext library registers when it is
// loaded. Link the library with --no-as-needed (the CMake target does), since
// nothing here refers to its symbols directly.
//
// Autograd for these operators is registered from Python only; C++ callers
// call the backward operators themselves.

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

}  // namespace pyconvext
