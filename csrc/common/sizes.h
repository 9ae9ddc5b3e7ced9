#pragma once

// Size arithmetic on the integers a caller passes (shapes, strides, paddings,
// dilations, kernel sizes, batch sizes): every output size, padded extent,
// element count and workspace size is computed here, in 64 bits with overflow
// checks, for the CPU and the CUDA kernels alike. An overflow raises a
// RuntimeError that names the argument, instead of wrapping into a wrong size,
// a division by zero, an endless loop or a giant allocation.

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>

namespace pyconvext::sizes {

// a + b and a * b, or nullopt where the result does not fit in int64.
inline std::optional<int64_t> try_add(int64_t a, int64_t b) {
  int64_t out;
  return c10::add_overflows(a, b, &out) ? std::nullopt : std::optional<int64_t>(out);
}
inline std::optional<int64_t> try_mul(int64_t a, int64_t b) {
  int64_t out;
  return c10::mul_overflows(a, b, &out) ? std::nullopt : std::optional<int64_t>(out);
}

// a + b and a * b; `what` names the quantity (and so the argument) for the
// error message.
inline int64_t add(int64_t a, int64_t b, const char* op, const char* what) {
  const auto out = try_add(a, b);
  TORCH_CHECK(out.has_value(), op, ": ", what, " overflows 64-bit integers (", a, " + ", b, ")");
  return *out;
}
inline int64_t mul(int64_t a, int64_t b, const char* op, const char* what) {
  const auto out = try_mul(a, b);
  TORCH_CHECK(out.has_value(), op, ": ", what, " overflows 64-bit integers (", a, " * ", b, ")");
  return *out;
}

// The product of non-negative sizes, or nullopt where it does not fit.
inline std::optional<int64_t> try_product(std::initializer_list<int64_t> sizes) {
  int64_t out = 1;
  for (const int64_t size : sizes) {
    const auto next = try_mul(out, size);
    if (!next.has_value()) return std::nullopt;
    out = *next;
  }
  return out;
}

// Elements of a contiguous tensor of these sizes, checked to fit in int64
// as bytes of `element_size`, and so are its strides (the product of the
// sizes without the zeros: an empty tensor still has strides).
inline int64_t numel(std::initializer_list<int64_t> sizes, int64_t element_size, const char* op,
                     const char* what) {
  int64_t span = element_size;
  bool fits = true;
  for (const int64_t size : sizes) {
    const auto next = try_mul(span, std::max<int64_t>(size, 1));
    fits = fits && next.has_value();
    span = next.value_or(span);
  }
  TORCH_CHECK(fits, op, ": ", what, " of size ", c10::IntArrayRef(sizes),
              " would have more elements than 64-bit integers count");
  const bool empty = std::find(sizes.begin(), sizes.end(), 0) != sizes.end();
  return empty ? 0 : span / element_size;
}

// ceil(a / b) and floor(a / b) for b > 0, without the overflow of a + b - 1.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b > 0 ? 1 : 0); }
inline int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b < 0 ? 1 : 0); }

// The extent of a padded input dimension, in + 2 * padding.
inline int64_t padded_extent(int64_t in, int64_t padding, const char* op, const char* padding_name) {
  return add(in, mul(2, padding, op, padding_name), op, padding_name);
}

// The extent of a dilated kernel, dilation * (kernel - 1) + 1.
inline int64_t dilated_extent(int64_t kernel, int64_t dilation, const char* op, const char* dilation_name) {
  return add(mul(dilation, kernel - 1, op, dilation_name), 1, op, dilation_name);
}

// Native's output size of a convolution, floor((in + 2p - d(k-1) - 1) / s) + 1,
// from the padded input and the dilated kernel extents: negative where the
// kernel does not fit (the caller raises).
inline int64_t conv_output_size(int64_t padded, int64_t dilated_kernel, int64_t stride) {
  return floor_div(padded - dilated_kernel, stride) + 1;
}

// Native's output size of max pooling: as a convolution's, rounded up instead
// with ceil_mode, but then the last window must start inside the input or its
// left padding.
inline int64_t pool_output_size(int64_t in, int64_t padding, int64_t padded, int64_t dilated_kernel,
                                int64_t stride, bool ceil_mode) {
  const int64_t span = padded - dilated_kernel;
  int64_t out = (ceil_mode ? (span >= 0 ? ceil_div(span, stride) : -(-span / stride))
                           : floor_div(span, stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + padding) --out;
  return out;
}

// The stride a kernel should use along a dimension with `out` output
// positions. With one position the window never moves and the stride given
// is irrelevant: the smallest stride that still gives one position (the span
// the window can move in, plus one) keeps kernels that lay out stride phases,
// or step by the stride, from looping or allocating by a huge one.
inline int64_t effective_stride(int64_t stride, int64_t out, int64_t padded, int64_t dilated_kernel) {
  return out == 1 ? std::clamp<int64_t>(padded - dilated_kernel + 1, 1, stride) : stride;
}

// Checks that every value of an int[2] argument fits in a 32-bit integer, as
// native's max_pool2d requires of its arguments.
inline void check_fits_int32(const char* op, const char* name, c10::IntArrayRef values) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(values[0] <= kMax && values[1] <= kMax, op, ": ", name,
              " must fit in a 32-bit integer (at most 2147483647), but got ", name, "=", values);
}

}  // namespace pyconvext::sizes
