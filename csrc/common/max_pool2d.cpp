#include "common/max_pool2d.h"

#include <c10/util/Exception.h>

#include <limits>

#include "common/checks.h"
#include "common/sizes.h"

namespace pyconvext {
namespace {

bool is_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

Pool2dGeometry check(const char* op, const at::Tensor& input, c10::IntArrayRef kernel_size,
                     c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                     bool ceil_mode) {
  // The dtypes native's CPU max_pool2d takes.
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      is_float(dtype) || dtype == at::kByte || dtype == at::kChar || dtype == at::kShort ||
          dtype == at::kInt || dtype == at::kLong,
      op, ": input has dtype ", dtype, ", but only float32, float64, float16, bfloat16, uint8, "
      "int8, int16, int32 and int64 are supported");
  check_pair(op, "kernel_size", kernel_size);
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "dilation", dilation);
  check_positive(op, "kernel_size", kernel_size);
  check_positive(op, "stride", stride);
  check_positive(op, "padding", padding, /*zero_allowed=*/true);
  check_positive(op, "dilation", dilation);
  for (const auto& [name, values] : {std::pair<const char*, c10::IntArrayRef>{"kernel_size", kernel_size},
                                     {"stride", stride}, {"padding", padding}, {"dilation", dilation}}) {
    sizes::check_fits_int32(op, name, values);
  }
  // (Native also checks padding against half the dilated kernel, which is
  // never smaller.)
  TORCH_CHECK(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
              ": padding must be at most half of kernel_size, but got padding=", padding,
              " and kernel_size=", kernel_size);

  const bool has_sizes = input.dim() == 4 || input.dim() == 3;
  const int64_t off = input.dim() == 4 ? 1 : 0;
  TORCH_CHECK(has_sizes && input.size(off) > 0 && input.size(off + 1) > 0 &&
                  input.size(off + 2) > 0,
              op, ": expected 3-D (C, H, W) or 4-D (N, C, H, W) input with non-zero C, H and W "
              "(N may be 0), but got input of size ", input.sizes());

  Pool2dGeometry g{};
  g.batched = input.dim() == 4;
  g.batch = g.batched ? input.size(0) : 1;
  g.channels = input.size(off);
  g.in_h = input.size(off + 1);
  g.in_w = input.size(off + 2);
  g.kernel_h = kernel_size[0];
  g.kernel_w = kernel_size[1];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  const int64_t padded_h = sizes::padded_extent(g.in_h, g.pad_h, op, "padding (the padded input height)");
  const int64_t padded_w = sizes::padded_extent(g.in_w, g.pad_w, op, "padding (the padded input width)");
  const int64_t dilated_kh = sizes::dilated_extent(g.kernel_h, g.dil_h, op, "dilation (the dilated kernel height)");
  const int64_t dilated_kw = sizes::dilated_extent(g.kernel_w, g.dil_w, op, "dilation (the dilated kernel width)");
  g.out_h = sizes::pool_output_size(g.in_h, g.pad_h, padded_h, dilated_kh, g.stride_h, ceil_mode);
  g.out_w = sizes::pool_output_size(g.in_w, g.pad_w, padded_w, dilated_kw, g.stride_w, ceil_mode);
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, op, ": input of size ", input.sizes(),
              " is too small for kernel_size=", kernel_size, ", padding=", padding,
              " and dilation=", dilation, ": the output would be ", g.out_h, "x", g.out_w);
  g.stride_h = sizes::effective_stride(g.stride_h, g.out_h, padded_h, dilated_kh);
  g.stride_w = sizes::effective_stride(g.stride_w, g.out_w, padded_w, dilated_kw);
  // The kernels number the elements of a (padded) plane, and the channels,
  // with 32-bit integers.
  const auto padded_plane = sizes::try_product({padded_h + g.stride_h, padded_w + g.stride_w});
  TORCH_CHECK(padded_plane.has_value() && *padded_plane < std::numeric_limits<int32_t>::max() &&
                  g.channels < std::numeric_limits<int32_t>::max(),
              op, ": planes or channels of 2^31 or more elements are not supported, but got "
              "input of size ", input.sizes());
  sizes::numel({g.batch, g.channels, g.out_h, g.out_w}, input.element_size(), op, "the output");

  g.memory_format = g.batched ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  return g;
}

}  // namespace

Pool2dGeometry check_max_pool2d(
    const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  return check("pyconvext.max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode);
}

Pool2dGeometry check_max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "pyconvext.max_pool2d_backward";
  const auto g = check(op, input, kernel_size, stride, padding, dilation, ceil_mode);
  TORCH_CHECK(is_float(input.scalar_type()), op,
              ": gradients need a floating point input, but got input of dtype ",
              input.scalar_type());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": input (",
              input.scalar_type(), ") and grad_output (", grad_output.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(indices.scalar_type() == at::kLong, op,
              ": indices must have dtype int64, but got ", indices.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device() && indices.device() == input.device(), op,
              ": input (on ", input.device(), "), grad_output (on ", grad_output.device(),
              ") and indices (on ", indices.device(), ") must be on the same device");
  const auto expected = g.output_sizes();
  const auto expected_sizes =
      g.batched ? c10::IntArrayRef(expected) : c10::IntArrayRef(expected).slice(1);
  TORCH_CHECK(grad_output.sizes() == expected_sizes, op, ": expected grad_output of size ",
              expected_sizes, " (the output size for this input), but got ", grad_output.sizes());
  TORCH_CHECK(indices.sizes() == expected_sizes, op, ": expected indices of size ",
              expected_sizes, " (the output size for this input), but got ", indices.sizes());
  return g;
}

}  // namespace pyconvext
