#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>

#include "common/host_device.h"

namespace pyconvext {

// The first tap of a window that starts at `start` (the padded position of
// its tap 0, possibly negative) and lies at or after 0. Native starts every
// window's scan with this position as its index and -inf as its value.
PYCONVEXT_HOST_DEVICE inline int64_t first_tap_inside(int64_t start, int64_t dilation) {
  return start >= 0 ? start : start + (-start + dilation - 1) / dilation * dilation;
}

// The scan order of a window, as native's: taps in row-major order, and an
// element replaces the current maximum if it is greater or NaN. So among
// equal maxima the first in row-major order wins, the last NaN wins over
// everything, and padding never wins. The kernels keep this rule (vectorized
// or separated into a row pass then a column pass, which gives the same
// winner) so that values and indices equal native's.
template <typename T>
PYCONVEXT_HOST_DEVICE inline bool replaces_max(T value, T max) {
  return value > max || value != value;  // value != value: NaN
}

// Everything a kernel needs to know about one max_pool2d call, after
// validation. Sizes are those of the batched (4-D) problem.
struct Pool2dGeometry {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  // Strides as given, except along a dimension with one output position
  // (sizes::effective_stride); the output sizes follow native's rule
  // (sizes::pool_output_size).
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool batched;  // false for 3-D (C, H, W) input
  // Layout native uses for the outputs and the input gradient: the one the
  // input suggests (always NCHW for 3-D input).
  at::MemoryFormat memory_format;

  std::array<int64_t, 4> output_sizes() const { return {batch, channels, out_h, out_w}; }
  std::array<int64_t, 4> input_sizes() const { return {batch, channels, in_h, in_w}; }
};

// Validates the arguments of pyconvext::max_pool2d (and max_pool2d_values)
// and returns its geometry. Raises with a "pyconvext.max_pool2d: ..."
// message that names the problem.
Pool2dGeometry check_max_pool2d(
    const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode);

// The same checks for pyconvext::max_pool2d_backward, plus the shapes,
// dtypes and devices of grad_output and indices.
Pool2dGeometry check_max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode);

}  // namespace pyconvext
