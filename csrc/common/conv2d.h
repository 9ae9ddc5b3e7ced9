#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <optional>

namespace pyconvext {

// Everything a kernel needs to know about one conv2d call, after validation.
// Sizes are always those of the batched (4-D) problem.
struct Conv2dGeometry {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t groups;
  // Strides as given, except along a dimension with one output position
  // (sizes::effective_stride); the output sizes follow native's rule
  // (sizes::conv_output_size).
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t padded_h, padded_w;  // in + 2 * padding
  bool batched;  // false for 3-D (C, H, W) input
  // Layout native uses for the output and the gradients: channels_last if the
  // input or the weight suggests it (but NCHW for float64 on CUDA).
  at::MemoryFormat memory_format;

  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
  std::array<int64_t, 4> output_sizes() const { return {batch, out_channels, out_h, out_w}; }
};

// Validates the arguments of pyconvext::conv2d and returns its geometry.
// Raises with a "pyconvext.conv2d: ..." message that names the problem.
Conv2dGeometry check_conv2d(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups);

// The same checks for pyconvext::conv2d_backward, plus the shape, dtype and
// device of grad_output.
Conv2dGeometry check_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups);

}  // namespace pyconvext
