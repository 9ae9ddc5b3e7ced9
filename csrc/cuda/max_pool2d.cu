// CUDA kernels for pyconvext::max_pool2d, max_pool2d_values and
// max_pool2d_backward.
//
// Forward: one thread per output element (NCHW), or per output pixel and
// vector of channels (channels_last, 16-byte loads and stores where the
// channel count allows), scanning the window in native's order with the rule
// of common/max_pool2d.h (float16 and bfloat16 compare as float32, which is
// exact). The values-only forward writes no indices: for float32 they are
// two thirds of the bytes a pooling writes.
//
// Backward: one thread per input element sums, in output order, the
// gradients of the outputs whose window covers it and whose index names it
// (one output at most where windows do not overlap). No atomics, no zeroing
// pass, and every element of the input gradient is written once, coalesced;
// the result is deterministic. An index outside the plane names no element
// and is ignored, as by native's CUDA kernel and our CPU kernel.
//
// Index arithmetic is 32-bit where every tensor has fewer than 2^31
// elements, else 64-bit (the checks bound a plane below 2^31).

#include <ATen/Dispatch_v2.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "common/max_pool2d.h"

namespace pyconvext {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

// The geometry in 32-bit integers (the checks bound a padded plane below 2^31).
struct Pool {
  int in_h, in_w, out_h, out_w, channels;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;

  explicit Pool(const Pool2dGeometry& g)
      : in_h(g.in_h), in_w(g.in_w), out_h(g.out_h), out_w(g.out_w), channels(g.channels),
        kernel_h(g.kernel_h), kernel_w(g.kernel_w), stride_h(g.stride_h), stride_w(g.stride_w),
        pad_h(g.pad_h), pad_w(g.pad_w),
        // (A kernel of one tap has no use for its dilation, which the checks
        // leave unbounded there.)
        dil_h(g.kernel_h == 1 ? 1 : g.dil_h), dil_w(g.kernel_w == 1 ? 1 : g.dil_w) {}
};

// The value a scan starts from: -inf, or the lowest integer.
template <typename A>
__device__ constexpr A scan_start() {
  return std::numeric_limits<A>::has_infinity ? -std::numeric_limits<A>::infinity()
                                              : std::numeric_limits<A>::lowest();
}

// The taps of one window that lie inside the input, as native bounds them.
struct Window {
  int first_row, row_end, first_col, col_end;

  __device__ Window(const Pool& p, int oh, int ow) {
    const int ih0 = oh * p.stride_h - p.pad_h, iw0 = ow * p.stride_w - p.pad_w;
    first_row = static_cast<int>(first_tap_inside(ih0, p.dil_h));
    first_col = static_cast<int>(first_tap_inside(iw0, p.dil_w));
    row_end = min(p.in_h, ih0 + p.kernel_h * p.dil_h);
    col_end = min(p.in_w, iw0 + p.kernel_w * p.dil_w);
  }
  // Native's index before any tap wins (also where no tap lies inside).
  __device__ int start_index(const Pool& p) const { return first_row * p.in_w + first_col; }
};

int blocks_for(int64_t work) {
  const int64_t most = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min((work + kThreads - 1) / kThreads, most)));
}

// ---------------------------------------------------------------------------
// Forward

template <typename T, typename Index, bool WithIndices>
__global__ void forward_nchw_kernel(const T* __restrict__ input, T* __restrict__ output,
                                    int64_t* __restrict__ indices, Pool p, Index total) {
  using A = at::opmath_type<T>;
  for (Index o = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; o < total;
       o += static_cast<Index>(gridDim.x) * kThreads) {
    const int ow = static_cast<int>(o % p.out_w);
    const Index rows = o / p.out_w;
    const int oh = static_cast<int>(rows % p.out_h);
    const T* plane = input + rows / p.out_h * (Index{p.in_h} * p.in_w);
    const Window w(p, oh, ow);
    A best = scan_start<A>();
    int arg = w.start_index(p);
    for (int ih = w.first_row; ih < w.row_end; ih += p.dil_h) {
      for (int iw = w.first_col; iw < w.col_end; iw += p.dil_w) {
        const A v = static_cast<A>(plane[ih * p.in_w + iw]);
        if (replaces_max(v, best)) {
          best = v;
          arg = ih * p.in_w + iw;
        }
      }
    }
    output[o] = static_cast<T>(best);
    if constexpr (WithIndices) indices[o] = arg;
  }
}

// Lanes channels of one element, moved as one 16-byte (or narrower) access.
template <typename T, int Lanes>
struct alignas(sizeof(T) * Lanes) Channels {
  T lane[Lanes];
};

template <typename T, int Lanes, typename Index, bool WithIndices>
__global__ void forward_channels_last_kernel(const T* __restrict__ input, T* __restrict__ output,
                                             int64_t* __restrict__ indices, Pool p, Index total) {
  using A = at::opmath_type<T>;
  using Vec = Channels<T, Lanes>;
  const int groups = p.channels / Lanes;
  for (Index t = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; t < total;
       t += static_cast<Index>(gridDim.x) * kThreads) {
    const int c = static_cast<int>(t % groups) * Lanes;
    const Index pixel = t / groups;  // (n, oh, ow)
    const int ow = static_cast<int>(pixel % p.out_w);
    const int oh = static_cast<int>(pixel / p.out_w % p.out_h);
    const Index n = pixel / p.out_w / p.out_h;
    const T* image = input + n * (Index{p.in_h} * p.in_w * p.channels) + c;
    const Window w(p, oh, ow);
    A best[Lanes];
    int arg[Lanes];
    for (int l = 0; l < Lanes; ++l) {
      best[l] = scan_start<A>();
      arg[l] = w.start_index(p);
    }
    for (int ih = w.first_row; ih < w.row_end; ih += p.dil_h) {
      for (int iw = w.first_col; iw < w.col_end; iw += p.dil_w) {
        const Vec v = *reinterpret_cast<const Vec*>(image + (Index{ih} * p.in_w + iw) * p.channels);
#pragma unroll
        for (int l = 0; l < Lanes; ++l) {
          const A x = static_cast<A>(v.lane[l]);
          if (replaces_max(x, best[l])) {
            best[l] = x;
            arg[l] = ih * p.in_w + iw;
          }
        }
      }
    }
    Vec result;
#pragma unroll
    for (int l = 0; l < Lanes; ++l) result.lane[l] = static_cast<T>(best[l]);
    const Index o = pixel * p.channels + c;
    *reinterpret_cast<Vec*>(output + o) = result;
    if constexpr (WithIndices && Lanes % 2 == 0) {
      // 16-byte stores of index pairs (o is even: channels % Lanes == 0).
#pragma unroll
      for (int l = 0; l < Lanes; l += 2) {
        *reinterpret_cast<Channels<int64_t, 2>*>(indices + o + l) = {{arg[l], arg[l + 1]}};
      }
    } else if constexpr (WithIndices) {
      indices[o] = arg[0];
    }
  }
}

// Whether 32-bit indices serve a tensor: its elements, plus the largest grid
// stride a loop may add past the last one, stay below 2^31.
bool fits_int32(const Tensor& t) {
  return t.numel() <= std::numeric_limits<int32_t>::max() / 2;
}

bool aligned(const Tensor& t, int bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

template <typename T, typename Index, bool WithIndices>
void launch_forward(const Tensor& x, const Pool2dGeometry& g, Tensor& out, int64_t* indices) {
  const Pool p(g);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const T* in = x.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  if (g.memory_format != at::MemoryFormat::ChannelsLast) {
    const Index total = out.numel();
    forward_nchw_kernel<T, Index, WithIndices>
        <<<blocks_for(total), kThreads, 0, stream>>>(in, o, indices, p, total);
  } else {
    constexpr int lanes = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
    if (lanes > 1 && g.channels % lanes == 0 && aligned(x, 16) && aligned(out, 16)) {
      const Index total = out.numel() / lanes;
      forward_channels_last_kernel<T, lanes, Index, WithIndices>
          <<<blocks_for(total), kThreads, 0, stream>>>(in, o, indices, p, total);
    } else {
      const Index total = out.numel();
      forward_channels_last_kernel<T, 1, Index, WithIndices>
          <<<blocks_for(total), kThreads, 0, stream>>>(in, o, indices, p, total);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> forward(const Tensor& input, c10::IntArrayRef kernel_size,
                                   c10::IntArrayRef stride, c10::IntArrayRef padding,
                                   c10::IntArrayRef dilation, bool ceil_mode,
                                   bool with_indices) {
  const Pool2dGeometry g =
      check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const Tensor x = (g.batched ? input : input.unsqueeze(0)).contiguous(g.memory_format);
  const auto options = x.options().memory_format(g.memory_format);
  Tensor out = at::empty(g.output_sizes(), options);
  Tensor indices;
  if (with_indices) indices = at::empty(g.output_sizes(), options.dtype(at::kLong));
  int64_t* index_data = with_indices ? indices.mutable_data_ptr<int64_t>() : nullptr;
  if (out.numel() > 0) {
    AT_DISPATCH_V2(x.scalar_type(), "pyconvext.max_pool2d", AT_WRAP([&] {
      const bool small = fits_int32(x) && fits_int32(out);
      if (small && with_indices) launch_forward<scalar_t, int32_t, true>(x, g, out, index_data);
      if (small && !with_indices) launch_forward<scalar_t, int32_t, false>(x, g, out, index_data);
      if (!small && with_indices) launch_forward<scalar_t, int64_t, true>(x, g, out, index_data);
      if (!small && !with_indices) launch_forward<scalar_t, int64_t, false>(x, g, out, index_data);
    }), AT_EXPAND(AT_ALL_TYPES), at::kHalf, at::kBFloat16);
  }
  if (!g.batched) {
    out = out.squeeze(0);
    if (with_indices) indices = indices.squeeze(0);
  }
  return {out, indices};
}

std::tuple<Tensor, Tensor> max_pool2d_cuda(const Tensor& input, c10::IntArrayRef kernel_size,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation, bool ceil_mode) {
  return forward(input, kernel_size, stride, padding, dilation, ceil_mode, true);
}

Tensor max_pool2d_values_cuda(const Tensor& input, c10::IntArrayRef kernel_size,
                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation, bool ceil_mode) {
  return std::get<0>(forward(input, kernel_size, stride, padding, dilation, ceil_mode, false));
}

// ---------------------------------------------------------------------------
// Backward

// Input element e's gradient: the sum, in output order, of the gradients of
// the outputs whose window covers it and whose index names it.
template <typename T, typename Index, bool ChannelsLast>
__global__ void backward_gather_kernel(const T* __restrict__ grad_output,
                                       const int64_t* __restrict__ indices,
                                       T* __restrict__ grad_input, Pool p, Index total) {
  using A = at::opmath_type<T>;
  const int out_plane = p.out_h * p.out_w;
  for (Index e = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<Index>(gridDim.x) * kThreads) {
    int ih, iw;
    Index base, step;  // output (oh, ow) of this plane is at base + (oh * out_w + ow) * step
    if constexpr (ChannelsLast) {
      const Index c = e % p.channels, pixel = e / p.channels;
      iw = static_cast<int>(pixel % p.in_w);
      ih = static_cast<int>(pixel / p.in_w % p.in_h);
      base = pixel / p.in_w / p.in_h * out_plane * p.channels + c;
      step = p.channels;
    } else {
      iw = static_cast<int>(e % p.in_w);
      ih = static_cast<int>(e / p.in_w % p.in_h);
      base = e / p.in_w / p.in_h * out_plane;
      step = 1;
    }
    // The outputs whose windows can reach row ih: oh * stride - pad + i * dil == ih.
    const int span_h = (p.kernel_h - 1) * p.dil_h + 1, span_w = (p.kernel_w - 1) * p.dil_w + 1;
    const int oh_begin = ih + p.pad_h < span_h ? 0 : (ih + p.pad_h - span_h) / p.stride_h + 1;
    const int oh_end = min((ih + p.pad_h) / p.stride_h + 1, p.out_h);
    const int ow_begin = iw + p.pad_w < span_w ? 0 : (iw + p.pad_w - span_w) / p.stride_w + 1;
    const int ow_end = min((iw + p.pad_w) / p.stride_w + 1, p.out_w);
    const int64_t target = ih * p.in_w + iw;
    A sum = 0;
    for (int oh = oh_begin; oh < oh_end; ++oh) {
      for (int ow = ow_begin; ow < ow_end; ++ow) {
        const Index o = base + (Index{oh} * p.out_w + ow) * step;
        if (indices[o] == target) sum += static_cast<A>(grad_output[o]);
      }
    }
    grad_input[e] = static_cast<T>(sum);
  }
}

template <typename T, typename Index>
void launch_backward(const Tensor& grad_output, const Tensor& indices, const Pool2dGeometry& g,
                     Tensor& grad_input) {
  const Pool p(g);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const T* go = grad_output.const_data_ptr<T>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  T* gi = grad_input.mutable_data_ptr<T>();
  const Index total = grad_input.numel();
  if (g.memory_format == at::MemoryFormat::ChannelsLast) {
    backward_gather_kernel<T, Index, true>
        <<<blocks_for(total), kThreads, 0, stream>>>(go, idx, gi, p, total);
  } else {
    backward_gather_kernel<T, Index, false>
        <<<blocks_for(total), kThreads, 0, stream>>>(go, idx, gi, p, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor max_pool2d_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                const Tensor& indices, c10::IntArrayRef kernel_size,
                                c10::IntArrayRef stride, c10::IntArrayRef padding,
                                c10::IntArrayRef dilation, bool ceil_mode) {
  const Pool2dGeometry g = check_max_pool2d_backward(grad_output, input, indices, kernel_size,
                                                     stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto format = g.memory_format;
  const Tensor go = (g.batched ? grad_output : grad_output.unsqueeze(0)).contiguous(format);
  const Tensor idx = (g.batched ? indices : indices.unsqueeze(0)).contiguous(format);
  Tensor grad_input = at::empty(g.input_sizes(), go.options().memory_format(format));
  if (grad_input.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                    "pyconvext.max_pool2d_backward", [&] {
      if (fits_int32(grad_input) && fits_int32(go)) {
        launch_backward<scalar_t, int32_t>(go, idx, g, grad_input);
      } else {
        launch_backward<scalar_t, int64_t>(go, idx, g, grad_input);
      }
    });
  }
  return g.batched ? grad_input : grad_input.squeeze(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, CUDA, m) {
  m.impl("max_pool2d", &max_pool2d_cuda);
  m.impl("max_pool2d_values", &max_pool2d_values_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
}

}  // namespace pyconvext
