#include "common/conv2d.h"

#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/sizes.h"

namespace pyconvext {
namespace {

void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": ", name, " has dtype ", dtype,
      ", but only float32, float64, float16 and bfloat16 are supported");
}

Conv2dGeometry check(
    const char* op, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups) {
  check_dtype(op, "input", input);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": input (",
              input.scalar_type(), ") and weight (", weight.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(weight.device() == input.device(), op, ": input (on ", input.device(),
              ") and weight (on ", weight.device(), ") must be on the same device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": input (",
                input.scalar_type(), ") and bias (", bias->scalar_type(),
                ") must have the same dtype");
    TORCH_CHECK(bias->device() == input.device(), op, ": input (on ", input.device(),
                ") and bias (on ", bias->device(), ") must be on the same device");
  }

  TORCH_CHECK(input.dim() == 3 || input.dim() == 4, op,
              ": expected 3-D (unbatched) or 4-D (batched) input, but got input of size ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, op,
              ": expected 4-D weight (out_channels, in_channels / groups, kH, kW), "
              "but got weight of size ", weight.sizes());
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "dilation", dilation);
  check_positive(op, "stride", stride);
  check_positive(op, "padding", padding, /*zero_allowed=*/true);
  check_positive(op, "dilation", dilation);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, but got groups=", groups);

  Conv2dGeometry g{};
  g.batched = input.dim() == 4;
  const int64_t off = g.batched ? 1 : 0;
  g.batch = g.batched ? input.size(0) : 1;
  g.in_channels = input.size(off);
  g.in_h = input.size(off + 1);
  g.in_w = input.size(off + 2);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.groups = groups;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];

  TORCH_CHECK(g.out_channels > 0, op, ": weight must have at least one output channel, but got weight of size ",
              weight.sizes());
  TORCH_CHECK(g.out_channels % groups == 0, op, ": out_channels (", g.out_channels,
              ") must be divisible by groups (", groups, "), but got weight of size ",
              weight.sizes());
  TORCH_CHECK(g.in_channels == weight.size(1) * groups, op, ": given groups=", groups,
              " and weight of size ", weight.sizes(), ", expected input of size ", input.sizes(),
              " to have ", weight.size(1) * groups, " channels, but got ", g.in_channels,
              " channels instead");
  TORCH_CHECK(g.kernel_h > 0 && g.kernel_w > 0, op,
              ": kernel size must be positive, but got weight of size ", weight.sizes());
  TORCH_CHECK((g.in_h > 0 && g.in_w > 0) || g.batch == 0 || g.in_channels == 0, op,
              ": only zero batch or zero channel inputs may be empty, but got input of size ", input.sizes());

  g.padded_h = sizes::padded_extent(g.in_h, g.pad_h, op, "padding (the padded input height)");
  g.padded_w = sizes::padded_extent(g.in_w, g.pad_w, op, "padding (the padded input width)");
  const int64_t padded_h = g.padded_h, padded_w = g.padded_w;
  const int64_t dilated_kh = sizes::dilated_extent(g.kernel_h, g.dil_h, op, "dilation (the dilated kernel height)");
  const int64_t dilated_kw = sizes::dilated_extent(g.kernel_w, g.dil_w, op, "dilation (the dilated kernel width)");
  TORCH_CHECK(padded_h >= dilated_kh && padded_w >= dilated_kw, op,
              ": the (dilated) kernel ", dilated_kh, "x", dilated_kw,
              " is larger than the padded input ", padded_h, "x", padded_w,
              ", so the output would be empty");
  g.out_h = sizes::conv_output_size(padded_h, dilated_kh, g.stride_h);
  g.out_w = sizes::conv_output_size(padded_w, dilated_kw, g.stride_w);
  sizes::numel({g.batch, g.out_channels, g.out_h, g.out_w}, input.element_size(), op, "the output");
  g.stride_h = sizes::effective_stride(g.stride_h, g.out_h, padded_h, dilated_kh);
  g.stride_w = sizes::effective_stride(g.stride_w, g.out_w, padded_w, dilated_kw);

  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_channels, op,
                ": expected bias to be 1-D with ", g.out_channels,
                " elements (weight has size ", weight.sizes(), "), but got bias of size ",
                bias->sizes());
  }

  // Native's rule: channels_last if the input or the weight suggests it,
  // except for float64 on CUDA, which native (cuDNN) keeps in NCHW.
  const auto batched_input = g.batched ? input : input.unsqueeze(0);
  const bool suggests_channels_last =
      batched_input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
      weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const bool cuda_float64 = input.is_cuda() && input.scalar_type() == at::kDouble;
  g.memory_format = suggests_channels_last && !cuda_float64 ? at::MemoryFormat::ChannelsLast
                                                            : at::MemoryFormat::Contiguous;
  return g;
}

}  // namespace

Conv2dGeometry check_conv2d(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  return check("pyconvext.conv2d", input, weight, bias, stride, padding, dilation, groups);
}

Conv2dGeometry check_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "pyconvext.conv2d_backward";
  const auto g = check(op, input, weight, std::nullopt, stride, padding, dilation, groups);
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": input (",
              input.scalar_type(), ") and grad_output (", grad_output.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(grad_output.device() == input.device(), op, ": input (on ", input.device(),
              ") and grad_output (on ", grad_output.device(), ") must be on the same device");
  const auto expected = g.output_sizes();
  const auto expected_sizes =
      g.batched ? c10::IntArrayRef(expected) : c10::IntArrayRef(expected).slice(1);
  TORCH_CHECK(grad_output.sizes() == expected_sizes, op, ": expected grad_output of size ",
              expected_sizes, " (the output size for this input and weight), but got ",
              grad_output.sizes());
  return g;
}

}  // namespace pyconvext
