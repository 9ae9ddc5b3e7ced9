// CPU kernels for pyconvext::max_pool2d, max_pool2d_values and
// max_pool2d_backward.
//
// They run on contiguous copies of the input in its layout, in a dtype of 4
// or 8 bytes (float16 and bfloat16 widen to float32, small integers to int32:
// both exact), vectorized, compiled per instruction set (cpu/simd.h).
//  * NCHW: each plane is pooled separably, a row pass (the maximum of every
//    row's windows, with its column) and then a column pass over those
//    results, both vectorized over output columns. Combining row maxima in
//    row order gives the winner of native's row-major scan (see
//    replaces_max in common/max_pool2d.h), so values and indices are exact.
//  * channels_last: a direct scan of each window, vectorized over channels.
// Indices are kept as 32-bit flat positions in a plane (the checks bound
// the plane) and widened to int64 when stored.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/max_pool2d.h"
#include "cpu/simd.h"

namespace pyconvext {
namespace {

using at::Tensor;

// Where native starts each scan: -inf, or the lowest integer.
template <typename T>
constexpr T scan_start() {
  return std::numeric_limits<T>::has_infinity ? -std::numeric_limits<T>::infinity()
                                              : std::numeric_limits<T>::lowest();
}

// Integer lanes as wide as T's, for the 32-bit indices of float32 and int32.
template <typename T>
using IndexLane = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Items per parallel task so that each task has at least ~32k elements of work.
int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kGrainSize = 32768;
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, work_per_item));
}

template <typename T>
struct PlaneArgs {
  const T* input;
  T* output;
  int64_t* indices;  // null for the values-only forward
  Pool2dGeometry g;
};

// Whether the windows of a row lie inside it, without padding, and the
// next row's windows continue at its end, so that the row pass can run over
// a whole plane as one row.
inline bool is_tiled_by_rows(const Pool2dGeometry& g) {
  return g.pad_w == 0 && g.out_w * g.stride_w == g.in_w &&
         (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w < g.in_w;
}

// The vector loops, compiled for each instruction set.
#define PYCONVEXT_ISA_KERNELS "cpu/max_pool2d_kernels.h"
#include "cpu/per_isa.h"

// ---------------------------------------------------------------------------
// Forward

template <typename T>
void forward_nchw(const Tensor& x, const Pool2dGeometry& g, Tensor& out, int64_t* indices) {
  const PlaneArgs<T> args{x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), indices, g};
  const int64_t work = g.in_h * g.in_w + g.out_h * g.out_w * g.kernel_h;
  at::parallel_for(0, g.batch * g.channels, grain_for(work), [&](int64_t begin, int64_t end) {
    PYCONVEXT_ISA_CALL(pool_planes, args, begin, end);
  });
}

template <typename T>
void forward_channels_last(const Tensor& x, const Pool2dGeometry& g, Tensor& out,
                           int64_t* indices) {
  const PlaneArgs<T> args{x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), indices, g};
  const int64_t work = g.out_w * g.channels * g.kernel_h * g.kernel_w;
  at::parallel_for(0, g.batch * g.out_h, grain_for(work), [&](int64_t begin, int64_t end) {
    PYCONVEXT_ISA_CALL(pool_channels, args, begin, end);
  });
}

// ---------------------------------------------------------------------------
// Backward: each output's gradient goes to the input element its index names
// (summed where windows overlap), in output order, as native does. An index
// outside its plane (only hand-made indices have one) adds nothing, as in
// the CUDA kernel and native's CUDA kernel.

template <typename T>
void backward_nchw(const Tensor& go, const Tensor& indices, const Pool2dGeometry& g,
                   Tensor& grad_input) {
  const T* go_data = go.const_data_ptr<T>();
  const int64_t* index = indices.const_data_ptr<int64_t>();
  T* gi_data = grad_input.mutable_data_ptr<T>();
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  at::parallel_for(0, g.batch * g.channels, grain_for(in_plane + out_plane),
                   [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      T* gi = gi_data + plane * in_plane;
      std::fill(gi, gi + in_plane, T(0));
      const int64_t* idx = index + plane * out_plane;
      const T* grad = go_data + plane * out_plane;
      for (int64_t o = 0; o < out_plane; ++o) {
        const int64_t k = idx[o];
        if (k >= 0 && k < in_plane) gi[k] += grad[o];
      }
    }
  });
}

template <typename T>
void backward_channels_last(const Tensor& go, const Tensor& indices, const Pool2dGeometry& g,
                            Tensor& grad_input) {
  const T* go_data = go.const_data_ptr<T>();
  const int64_t* index = indices.const_data_ptr<int64_t>();
  T* gi_data = grad_input.mutable_data_ptr<T>();
  const int64_t C = g.channels, in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  // Tasks of (image, block of channels), so that no two write one element.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, g.batch * blocks, grain_for((in_plane + out_plane) * kBlock),
                   [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t c0 = task % blocks * kBlock, c1 = std::min(C, c0 + kBlock);
      T* gi = gi_data + n * in_plane * C;
      for (int64_t p = 0; p < in_plane; ++p) std::fill(gi + p * C + c0, gi + p * C + c1, T(0));
      const int64_t* idx = index + n * out_plane * C;
      const T* grad = go_data + n * out_plane * C;
      for (int64_t o = 0; o < out_plane; ++o) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t k = idx[o * C + c];
          if (k >= 0 && k < in_plane) gi[k * C + c] += grad[o * C + c];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Entry points

// The computation dtype: 4 or 8 bytes, holding every value exactly.
at::ScalarType compute_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
    case at::kBFloat16: return at::kFloat;
    case at::kByte:
    case at::kChar:
    case at::kShort: return at::kInt;
    default: return dtype;
  }
}

// The batched form of t in the computation dtype, contiguous in `format`.
Tensor prepare(const Tensor& t, const Pool2dGeometry& g) {
  return (g.batched ? t : t.unsqueeze(0))
      .to(compute_dtype(t.scalar_type()))
      .contiguous(g.memory_format);
}

// A result in the dtype and batchedness native returns.
Tensor finish(const Tensor& result, at::ScalarType dtype, const Pool2dGeometry& g) {
  const Tensor out = result.scalar_type() == dtype ? result : result.to(dtype);
  return g.batched ? out : out.squeeze(0);
}

std::tuple<Tensor, Tensor> forward(const Tensor& input, c10::IntArrayRef kernel_size,
                                   c10::IntArrayRef stride, c10::IntArrayRef padding,
                                   c10::IntArrayRef dilation, bool ceil_mode,
                                   bool with_indices) {
  const Pool2dGeometry g =
      check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor x = prepare(input, g);
  const auto options = x.options().memory_format(g.memory_format);
  Tensor out = at::empty(g.output_sizes(), options);
  Tensor indices;
  if (with_indices) indices = at::empty(g.output_sizes(), options.dtype(at::kLong));
  int64_t* index_data = with_indices ? indices.mutable_data_ptr<int64_t>() : nullptr;
  const auto pool = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (g.memory_format == at::MemoryFormat::ChannelsLast) {
      forward_channels_last<T>(x, g, out, index_data);
    } else {
      forward_nchw<T>(x, g, out, index_data);
    }
  };
  if (g.batch > 0) {
    AT_DISPATCH_SWITCH(x.scalar_type(), "pyconvext.max_pool2d",
                       AT_DISPATCH_CASE_FLOATING_TYPES([&] { pool(scalar_t{}); })
                       AT_DISPATCH_CASE(at::kInt, [&] { pool(scalar_t{}); })
                       AT_DISPATCH_CASE(at::kLong, [&] { pool(scalar_t{}); }));
  }
  out = finish(out, input.scalar_type(), g);
  if (with_indices) indices = g.batched ? indices : indices.squeeze(0);
  return {out, indices};
}

std::tuple<Tensor, Tensor> max_pool2d_cpu(const Tensor& input, c10::IntArrayRef kernel_size,
                                          c10::IntArrayRef stride, c10::IntArrayRef padding,
                                          c10::IntArrayRef dilation, bool ceil_mode) {
  return forward(input, kernel_size, stride, padding, dilation, ceil_mode, true);
}

Tensor max_pool2d_values_cpu(const Tensor& input, c10::IntArrayRef kernel_size,
                             c10::IntArrayRef stride, c10::IntArrayRef padding,
                             c10::IntArrayRef dilation, bool ceil_mode) {
  return std::get<0>(forward(input, kernel_size, stride, padding, dilation, ceil_mode, false));
}

Tensor max_pool2d_backward_cpu(const Tensor& grad_output, const Tensor& input,
                               const Tensor& indices, c10::IntArrayRef kernel_size,
                               c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, bool ceil_mode) {
  const Pool2dGeometry g = check_max_pool2d_backward(grad_output, input, indices, kernel_size,
                                                     stride, padding, dilation, ceil_mode);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor go = prepare(grad_output, g);
  const Tensor idx = (g.batched ? indices : indices.unsqueeze(0)).contiguous(g.memory_format);
  Tensor grad_input = at::empty(g.input_sizes(), go.options().memory_format(g.memory_format));
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "pyconvext.max_pool2d_backward", [&] {
    if (g.memory_format == at::MemoryFormat::ChannelsLast) {
      backward_channels_last<scalar_t>(go, idx, g, grad_input);
    } else {
      backward_nchw<scalar_t>(go, idx, g, grad_input);
    }
  });
  return finish(grad_input, input.scalar_type(), g);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_values", &max_pool2d_values_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace pyconvext
