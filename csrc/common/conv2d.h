#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <optional>

#include "common/host_device.h"

namespace pyconvext {

// Native PyTorch's rule: floor((in + 2p - d(k-1) - 1) / s) + 1.
PYCONVEXT_HOST_DEVICE inline int64_t conv_output_size(
    int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// Everything a kernel needs to know about one conv2d call, after validation.
// Sizes are always those of the batched (4-D) problem.
struct Conv2dGeometry {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t groups;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
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
