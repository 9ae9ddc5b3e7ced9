// CPU kernels for pyconvext::conv2d and pyconvext::conv2d_backward.
//
// Two algorithms, both computing in float32 (float16 and bfloat16 inputs are
// widened once and the result is rounded once) or float64:
//  * direct loops, for convolutions with one input channel per group
//    (depthwise layers, single-channel images), where a GEMM would have an
//    inner dimension of only kH*kW;
//  * im2col + GEMM per image and group: our own im2col / col2im into a buffer
//    of one image, then ATen's GEMM (at::mm / at::addmm).
// Tensors are processed as contiguous NCHW; other layouts are copied in and
// the results are returned in the layout native PyTorch returns.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "common/conv2d.h"

namespace pyconvext {
namespace {

using at::Tensor;

// Items per parallel task so that each task has at least ~32k elements of work
// (ATen's grain size), as threads cost more than they save on less.
int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kGrainSize = 32768;
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, work_per_item));
}

// Outputs o in [lo, hi) read input o * stride + offset inside [0, size);
// the others read zero padding.
struct Span {
  int64_t lo, hi;
};
Span valid_outputs(int64_t out_size, int64_t in_size, int64_t stride, int64_t offset) {
  const int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t last = in_size - 1 - offset;
  const int64_t hi = last >= 0 ? std::min(out_size, last / stride + 1) : 0;
  return {std::min(lo, hi), hi};
}

// The spans of one kernel tap (i, j) along both axes, and its input offsets.
struct Tap {
  Span rows, cols;
  int64_t row_offset, col_offset;
};
Tap tap(const Conv2dGeometry& g, int64_t i, int64_t j) {
  const int64_t row_offset = i * g.dil_h - g.pad_h, col_offset = j * g.dil_w - g.pad_w;
  return {valid_outputs(g.out_h, g.in_h, g.stride_h, row_offset),
          valid_outputs(g.out_w, g.in_w, g.stride_w, col_offset), row_offset, col_offset};
}

// ---------------------------------------------------------------------------
// im2col + GEMM

// col[(c, i, j), (oh, ow)] = in[c, oh*sh + i*dh - ph, ow*sw + j*dw - pw], zero outside.
template <typename T>
void im2col(const T* in, int64_t channels, const Conv2dGeometry& g, T* col) {
  const int64_t taps = g.kernel_h * g.kernel_w, plane = g.out_h * g.out_w;
  at::parallel_for(0, channels * taps, grain_for(plane), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r / taps, i = r % taps / g.kernel_w, j = r % g.kernel_w;
      const Tap t = tap(g, i, j);
      T* dst = col + r * plane;
      std::fill(dst, dst + t.rows.lo * g.out_w, T(0));
      for (int64_t oh = t.rows.lo; oh < t.rows.hi; ++oh) {
        T* row = dst + oh * g.out_w;
        const T* src = in + (c * g.in_h + oh * g.stride_h + t.row_offset) * g.in_w + t.col_offset;
        std::fill(row, row + t.cols.lo, T(0));
        if (g.stride_w == 1) {
          std::copy(src + t.cols.lo, src + t.cols.hi, row + t.cols.lo);
        } else {
          for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow) row[ow] = src[ow * g.stride_w];
        }
        std::fill(row + t.cols.hi, row + g.out_w, T(0));
      }
      std::fill(dst + t.rows.hi * g.out_w, dst + plane, T(0));
    }
  });
}

// The adjoint of im2col: in[c, ...] += col[(c, i, j), ...]. Parallel over
// channels, so no two threads touch the same input element.
template <typename T>
void col2im_add(const T* col, int64_t channels, const Conv2dGeometry& g, T* in) {
  const int64_t taps = g.kernel_h * g.kernel_w, plane = g.out_h * g.out_w;
  at::parallel_for(0, channels, grain_for(taps * plane), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        for (int64_t j = 0; j < g.kernel_w; ++j) {
          const Tap t = tap(g, i, j);
          const T* src = col + ((c * taps) + i * g.kernel_w + j) * plane;
          for (int64_t oh = t.rows.lo; oh < t.rows.hi; ++oh) {
            const T* row = src + oh * g.out_w;
            T* dst = in + (c * g.in_h + oh * g.stride_h + t.row_offset) * g.in_w + t.col_offset;
            if (g.stride_w == 1) {
#pragma omp simd
              for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow) dst[ow] += row[ow];
            } else {
              for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow) dst[ow * g.stride_w] += row[ow];
            }
          }
        }
      }
    }
  });
}

// A 1x1 kernel with unit stride and no padding reads the input as it is.
bool is_pointwise(const Conv2dGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
         g.pad_h == 0 && g.pad_w == 0;
}

// Runs body(n, col) for every image n, col being a scratch tensor of `col_size`
// elements owned by the calling thread. With at least one image per thread,
// threads take whole images and the GEMMs inside run single-threaded; with
// fewer images, images run in turn and the loops and GEMMs inside use all
// threads.
template <typename Body>
void for_each_image(int64_t batch, int64_t col_size, const at::TensorOptions& options, Body body) {
  auto run = [&](int64_t begin, int64_t end) {
    // Dispatch guards are thread-local: worker threads need their own.
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    Tensor col = at::empty({col_size}, options);
    for (int64_t n = begin; n < end; ++n) body(n, col);
  };
  if (batch >= at::get_num_threads()) {
    at::parallel_for(0, batch, 1, run);
  } else {
    run(0, batch);
  }
}

template <typename T>
void forward_gemm(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                  const Conv2dGeometry& g, Tensor& out) {
  const int64_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const int64_t rows = in_per_group * g.kernel_h * g.kernel_w, plane = g.out_h * g.out_w;
  const bool pointwise = is_pointwise(g);
  const Tensor w3 = w.view({g.groups, out_per_group, rows});
  const Tensor x3 = x.view({g.batch, g.in_channels, g.in_h * g.in_w});
  const Tensor out4 = out.view({g.batch, g.groups, out_per_group, plane});
  const T* x_data = x.const_data_ptr<T>();
  for_each_image(g.batch, pointwise ? 0 : rows * plane, x.options(), [&](int64_t n, Tensor& col) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      Tensor cols;
      if (pointwise) {
        cols = x3[n].narrow(0, grp * in_per_group, in_per_group);
      } else {
        im2col(x_data + (n * g.in_channels + grp * in_per_group) * g.in_h * g.in_w,
               in_per_group, g, col.mutable_data_ptr<T>());
        cols = col.view({rows, plane});
      }
      Tensor dst = out4[n][grp];
      if (bias.has_value()) {
        at::addmm_out(dst, bias->narrow(0, grp * out_per_group, out_per_group).unsqueeze(1),
                      w3[grp], cols);
      } else {
        at::mm_out(dst, w3[grp], cols);
      }
    }
  });
}

// grad_input and grad_weight of the GEMM path; either may be undefined.
template <typename T>
void backward_gemm(const Tensor& grad_out, const Tensor& x, const Tensor& w,
                   const Conv2dGeometry& g, Tensor& grad_input, Tensor& grad_weight) {
  const int64_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const int64_t rows = in_per_group * g.kernel_h * g.kernel_w, plane = g.out_h * g.out_w;
  const int64_t image = g.in_channels * g.in_h * g.in_w;
  const bool pointwise = is_pointwise(g);
  const Tensor w3 = w.view({g.groups, out_per_group, rows});
  const Tensor x3 = x.view({g.batch, g.in_channels, g.in_h * g.in_w});
  const Tensor go4 = grad_out.view({g.batch, g.groups, out_per_group, plane});
  const T* x_data = x.const_data_ptr<T>();
  Tensor gi3 = grad_input.defined()
                   ? grad_input.view({g.batch, g.in_channels, g.in_h * g.in_w})
                   : Tensor();

  // Each thread sums grad_weight over its own images; the sums are added in
  // thread order at the end, so the result does not depend on scheduling.
  std::vector<Tensor> partial_grad_weight(at::get_num_threads());
  for_each_image(g.batch, pointwise ? 0 : rows * plane, x.options(), [&](int64_t n, Tensor& col) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const Tensor go = go4[n][grp];
      if (grad_weight.defined()) {
        Tensor cols;
        if (pointwise) {
          cols = x3[n].narrow(0, grp * in_per_group, in_per_group);
        } else {
          im2col(x_data + n * image + grp * in_per_group * g.in_h * g.in_w, in_per_group, g,
                 col.mutable_data_ptr<T>());
          cols = col.view({rows, plane});
        }
        Tensor& acc = partial_grad_weight[at::get_thread_num()];
        if (!acc.defined()) acc = at::zeros({g.groups, out_per_group, rows}, x.options());
        acc[grp].addmm_(go, cols.t());
      }
      if (grad_input.defined()) {
        Tensor dst = gi3[n].narrow(0, grp * in_per_group, in_per_group);
        if (pointwise) {
          at::mm_out(dst, w3[grp].t(), go);
        } else {
          Tensor cols = col.view({rows, plane});
          at::mm_out(cols, w3[grp].t(), go);
          col2im_add(cols.const_data_ptr<T>(), in_per_group, g, dst.mutable_data_ptr<T>());
        }
      }
    }
  });
  if (grad_weight.defined()) {
    Tensor gw3 = grad_weight.view({g.groups, out_per_group, rows});
    gw3.zero_();
    for (const Tensor& acc : partial_grad_weight) {
      if (acc.defined()) gw3.add_(acc);
    }
  }
}

// ---------------------------------------------------------------------------
// Direct loops, for one input channel per group.

template <typename T>
void forward_direct(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                    const Conv2dGeometry& g, Tensor& out) {
  const int64_t out_per_group = g.out_per_group(), taps = g.kernel_h * g.kernel_w;
  const T* x_data = x.const_data_ptr<T>();
  const T* w_data = w.const_data_ptr<T>();
  const T* b_data = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  T* out_data = out.mutable_data_ptr<T>();
  const int64_t planes = g.batch * g.out_channels;
  at::parallel_for(0, planes, grain_for(taps * g.out_h * g.out_w), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / g.out_channels, k = p % g.out_channels;
      const T* src = x_data + (n * g.in_channels + k / out_per_group) * g.in_h * g.in_w;
      const T* wk = w_data + k * taps;
      T* dst = out_data + p * g.out_h * g.out_w;
      std::fill(dst, dst + g.out_h * g.out_w, b_data ? b_data[k] : T(0));
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        for (int64_t j = 0; j < g.kernel_w; ++j) {
          const Tap t = tap(g, i, j);
          const T wv = wk[i * g.kernel_w + j];
          for (int64_t oh = t.rows.lo; oh < t.rows.hi; ++oh) {
            const T* in_row =
                src + (oh * g.stride_h + t.row_offset) * g.in_w + t.col_offset;
            T* out_row = dst + oh * g.out_w;
            if (g.stride_w == 1) {
#pragma omp simd
              for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow) out_row[ow] += wv * in_row[ow];
            } else {
              for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow)
                out_row[ow] += wv * in_row[ow * g.stride_w];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void backward_input_direct(const Tensor& grad_out, const Tensor& w, const Conv2dGeometry& g,
                           Tensor& grad_input) {
  const int64_t out_per_group = g.out_per_group(), taps = g.kernel_h * g.kernel_w;
  const T* go_data = grad_out.const_data_ptr<T>();
  const T* w_data = w.const_data_ptr<T>();
  T* gi_data = grad_input.mutable_data_ptr<T>();
  const int64_t planes = g.batch * g.in_channels, plane = g.out_h * g.out_w;
  at::parallel_for(0, planes, grain_for(out_per_group * taps * plane), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / g.in_channels, c = p % g.in_channels;
      T* dst = gi_data + p * g.in_h * g.in_w;
      std::fill(dst, dst + g.in_h * g.in_w, T(0));
      for (int64_t k = c * out_per_group; k < (c + 1) * out_per_group; ++k) {
        const T* src = go_data + (n * g.out_channels + k) * plane;
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            const Tap t = tap(g, i, j);
            const T wv = w_data[k * taps + i * g.kernel_w + j];
            for (int64_t oh = t.rows.lo; oh < t.rows.hi; ++oh) {
              const T* go_row = src + oh * g.out_w;
              T* in_row = dst + (oh * g.stride_h + t.row_offset) * g.in_w + t.col_offset;
              if (g.stride_w == 1) {
#pragma omp simd
                for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow) in_row[ow] += wv * go_row[ow];
              } else {
                for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow)
                  in_row[ow * g.stride_w] += wv * go_row[ow];
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
void backward_weight_direct(const Tensor& grad_out, const Tensor& x, const Conv2dGeometry& g,
                            Tensor& grad_weight) {
  const int64_t out_per_group = g.out_per_group(), taps = g.kernel_h * g.kernel_w;
  const int64_t plane = g.out_h * g.out_w;
  const T* go_data = grad_out.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  T* gw_data = grad_weight.mutable_data_ptr<T>();
  // One task per weight element: a dot product over all images and outputs.
  at::parallel_for(0, g.out_channels * taps, grain_for(g.batch * plane), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t k = e / taps, i = e % taps / g.kernel_w, j = e % g.kernel_w;
      const int64_t c = k / out_per_group;
      const Tap t = tap(g, i, j);
      T total = 0;
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* go = go_data + (n * g.out_channels + k) * plane;
        const T* in = x_data + (n * g.in_channels + c) * g.in_h * g.in_w;
        T sum = 0;
        for (int64_t oh = t.rows.lo; oh < t.rows.hi; ++oh) {
          const T* go_row = go + oh * g.out_w;
          const T* in_row = in + (oh * g.stride_h + t.row_offset) * g.in_w + t.col_offset;
          if (g.stride_w == 1) {
#pragma omp simd reduction(+ : sum)
            for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow) sum += go_row[ow] * in_row[ow];
          } else {
            for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow)
              sum += go_row[ow] * in_row[ow * g.stride_w];
          }
        }
        total += sum;
      }
      gw_data[e] = total;
    }
  });
}

// ---------------------------------------------------------------------------

bool use_direct(const Conv2dGeometry& g) { return g.in_per_group() == 1; }

template <typename T>
void grad_bias_sum(const Tensor& grad_out, const Conv2dGeometry& g, Tensor& grad_bias) {
  const int64_t plane = g.out_h * g.out_w;
  const T* go_data = grad_out.const_data_ptr<T>();
  T* gb_data = grad_bias.mutable_data_ptr<T>();
  at::parallel_for(0, g.out_channels, grain_for(g.batch * plane), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      T total = 0;
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* src = go_data + (n * g.out_channels + k) * plane;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t e = 0; e < plane; ++e) sum += src[e];
        total += sum;
      }
      gb_data[k] = total;
    }
  });
}

// The batched, contiguous NCHW form of a tensor in the computation dtype
// (float32 for float16 and bfloat16).
Tensor prepare(const Tensor& t, bool batched) {
  return (batched ? t : t.unsqueeze(0))
      .to(at::toOpMathType(t.scalar_type()))
      .contiguous();
}

// A result in the dtype, layout and batchedness native returns.
Tensor finish(const Tensor& result, at::ScalarType dtype, at::MemoryFormat format, bool batched) {
  Tensor out = result;
  if (result.scalar_type() != dtype || !result.is_contiguous(format)) {
    out = at::empty(result.sizes(), result.options().dtype(dtype).memory_format(format));
    out.copy_(result);
  }
  return batched ? out : out.squeeze(0);
}

Tensor conv2d_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                  c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                  int64_t groups) {
  const Conv2dGeometry g = check_conv2d(input, weight, bias, stride, padding, dilation, groups);
  // Autograd is handled one level up; the ATen calls below are plain compute.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor x = prepare(input, g.batched);
  const Tensor w = prepare(weight, true);
  const std::optional<Tensor> b =
      bias.has_value() ? std::optional<Tensor>(prepare(*bias, true)) : std::nullopt;
  Tensor out = at::empty(g.output_sizes(), x.options());
  if (g.batch > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyconvext.conv2d", [&] {
      if (use_direct(g)) {
        forward_direct<scalar_t>(x, w, b, g, out);
      } else {
        forward_gemm<scalar_t>(x, w, b, g, out);
      }
    });
  }
  return finish(out, input.scalar_type(), g.memory_format, g.batched);
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const Conv2dGeometry g =
      check_conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor go = prepare(grad_output, g.batched);
  const Tensor x = prepare(input, g.batched);
  const Tensor w = prepare(weight, true);
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = at::zeros(x.sizes(), x.options());
  if (output_mask[1]) grad_weight = at::zeros(w.sizes(), w.options());
  if (output_mask[2]) grad_bias = at::zeros({g.out_channels}, go.options());
  if (g.batch > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyconvext.conv2d_backward", [&] {
      if (use_direct(g)) {
        if (grad_input.defined()) backward_input_direct<scalar_t>(go, w, g, grad_input);
        if (grad_weight.defined()) backward_weight_direct<scalar_t>(go, x, g, grad_weight);
      } else {
        backward_gemm<scalar_t>(go, x, w, g, grad_input, grad_weight);
      }
      if (grad_bias.defined()) grad_bias_sum<scalar_t>(go, g, grad_bias);
    });
  }
  if (grad_input.defined()) {
    grad_input = finish(grad_input, input.scalar_type(), g.memory_format, g.batched);
  }
  if (grad_weight.defined()) {
    grad_weight = finish(grad_weight, weight.scalar_type(), g.memory_format, true);
  }
  if (grad_bias.defined()) grad_bias = finish(grad_bias, grad_output.scalar_type(), at::MemoryFormat::Contiguous, true);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace pyconvext
