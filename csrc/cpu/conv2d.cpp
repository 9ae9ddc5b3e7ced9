// CPU kernels for pyconvext::conv2d and pyconvext::conv2d_backward.
//
// They compute in float32 (float16 and bfloat16 are widened once and rounded
// once at the end) or float64, on contiguous NCHW copies of the inputs, and
// return results in the dtype and memory format native PyTorch returns.
//  * Direct kernels, for most convolutions: the forward, the input gradient of
//    unit-stride convolutions and the weight gradient, register-tiled and
//    compiled for each instruction set (cpu/simd.h). Batches of 8 and more
//    with 16 and more channels per group take the batch tiles (images as
//    rows, output channels as vectors, padded taps skipped); the others the
//    pixel tiles (vectorized over output pixels, "virtual pixels" below).
//  * Our GEMM (cpu/gemm.h), where the data need no rearranging: 1x1 unit-stride
//    convolutions, and the input gradient of strided convolutions (a GEMM,
//    then our col2im); and on our im2col columns for small output planes
//    with many channels.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/conv2d.h"
#include "common/sizes.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"

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
  const int64_t lo = offset >= 0 ? 0 : sizes::ceil_div(-offset, stride);
  const int64_t last = in_size - 1 - offset;
  const int64_t hi = last >= 0 ? std::min(out_size, last / stride + 1) : 0;
  return {std::min(lo, hi), hi};
}

// Direct convolution on "virtual pixels", vectorized over output pixels.
//
// Each input channel is zero-padded and split into stride_h x stride_w phase
// planes of phase_h x phase_w: phase (a, b) holds the padded rows a, a + sh, ...
// and columns b, b + sw, .... Number output pixel (oh, ow) q = oh * phase_w + ow;
// then kernel tap (i, j) reads element q + offset(i, j) of the prepared
// channel, so a run of consecutive outputs reads a run of consecutive inputs,
// for any stride, padding and dilation. The columns ow >= out_w of this
// numbering are computed and dropped; zeros after each channel keep whole
// vector loads inside it. With unit stride along rows, neighbouring rows
// share their zero padding (row u's right padding is row u + 1's left), which
// halves the dropped columns of "same" convolutions; this needs output rows no
// wider than the shared pitch, i.e. padding <= dilation * (kernel - 1).
struct DirectLayout {
  int64_t phase_h, phase_w, phase_size;
  int64_t virtual_pixels;        // out_h * phase_w
  int64_t channel_size;          // elements of one prepared channel
  std::vector<int64_t> offsets;  // per tap (i, j), i major
};

constexpr int64_t kMaxVectorBytes = 64;                 // AVX-512
constexpr int64_t kMaxTileBytes = 8 * kMaxVectorBytes;  // the widest pixel tile

using sizes::ceil_div;

// Whether the layout above stays within a few times the input and output
// planes (it holds about the padded plane per channel). Padding or dilation
// far beyond the input (windows that mostly read zeros) would make it huge
// where the output is small; such convolutions run on the columns, whose
// workspace follows the output and the kernel.
bool pixel_tiles_fit(const Conv2dGeometry& g) {
  const auto padded = sizes::try_product({g.padded_h, g.padded_w});
  const auto in_plane = sizes::try_product({g.in_h, g.in_w});  // (may overflow with no channels)
  return padded.has_value() && in_plane.has_value() && *padded / 4 <= *in_plane + g.out_h * g.out_w + 16384;
}

DirectLayout direct_layout(const Conv2dGeometry& g, int64_t element_size) {
  TORCH_INTERNAL_ASSERT(pixel_tiles_fit(g));  // which bounds every size below
  DirectLayout l;
  const bool shared_padding = g.stride_w == 1 && g.pad_w <= g.dil_w * (g.kernel_w - 1);
  l.phase_h = ceil_div(g.padded_h, g.stride_h);
  l.phase_w = shared_padding ? g.in_w + g.pad_w : ceil_div(g.padded_w, g.stride_w);
  l.phase_size = l.phase_h * l.phase_w + (shared_padding ? g.pad_w : 0);
  l.virtual_pixels = g.out_h * l.phase_w;
  int64_t max_offset = 0;
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    for (int64_t j = 0; j < g.kernel_w; ++j) {
      const int64_t row = i * g.dil_h, col = j * g.dil_w;
      const int64_t phase = (row % g.stride_h) * g.stride_w + col % g.stride_w;
      l.offsets.push_back(phase * l.phase_size + row / g.stride_h * l.phase_w + col / g.stride_w);
      max_offset = std::max(max_offset, l.offsets.back());
    }
  }
  const int64_t tile = kMaxTileBytes / element_size;
  l.channel_size = std::max(g.stride_h * g.stride_w * l.phase_size,
                            ceil_div(l.virtual_pixels, tile) * tile + max_offset);
  return l;
}

// Writes `planes` (H, W) planes of x in the layout above.
template <typename T>
void prepare_direct_input(const T* x, int64_t planes, const Conv2dGeometry& g,
                          const DirectLayout& l, T* out) {
  for (int64_t p = 0; p < planes; ++p) {
    const T* src = x + p * g.in_h * g.in_w;
    T* dst = out + p * l.channel_size;
    std::fill(dst, dst + l.channel_size, T(0));
    for (int64_t a = 0; a < g.stride_h; ++a) {
      for (int64_t b = 0; b < g.stride_w; ++b) {
        T* phase = dst + (a * g.stride_w + b) * l.phase_size;
        const Span rows = valid_outputs(l.phase_h, g.in_h, g.stride_h, a - g.pad_h);
        const Span cols = valid_outputs(l.phase_w, g.in_w, g.stride_w, b - g.pad_w);
        for (int64_t u = rows.lo; u < rows.hi; ++u) {
          const T* row = src + (u * g.stride_h + a - g.pad_h) * g.in_w + b - g.pad_w;
          T* dst_row = phase + u * l.phase_w;
          if (g.stride_w == 1) {
            std::copy(row + cols.lo, row + cols.hi, dst_row + cols.lo);
          } else {
            for (int64_t v = cols.lo; v < cols.hi; ++v) dst_row[v] = row[v * g.stride_w];
          }
        }
      }
    }
  }
}

// Vector accumulators of a forward tile: most of the vector registers (32 for
// AVX-512, 16 else), the rest hold the loaded inputs and a weight.
template <int Bytes>
constexpr int kAccumulators = Bytes == 64 ? 24 : 12;

// Bytes per vector of the ISA the kernels run with.
int64_t vector_bytes() {
  switch (simd::cpu_isa()) {
    case simd::Isa::Avx512: return 64;
    case simd::Isa::Avx2: return 32;
    default: return 16;
  }
}

// Output channels per register block: tiles at least two vectors wide.
int64_t direct_max_block() {
  return (vector_bytes() == 64 ? kAccumulators<64> : kAccumulators<16>) / 2;
}

// Vectors of pixels per tile for a block of R channels: the widest of 8, 4, 2
// that fits, so that narrow blocks (depthwise layers) still get long tiles.
template <int Bytes, int R>
constexpr int tile_vectors() {
  return R * 8 <= kAccumulators<Bytes> ? 8 : R * 4 <= kAccumulators<Bytes> ? 4 : 2;
}

// The output channels of a group split into blocks of `size` or `size - 1`.
struct Blocks {
  int64_t count, size, full;  // the first `full` blocks have `size` channels
  int64_t start(int64_t b) const { return b * (size - 1) + std::min(b, full); }
  int64_t length(int64_t b) const { return b < full ? size : size - 1; }
};
Blocks split_blocks(int64_t channels, int64_t max_block) {
  const int64_t count = ceil_div(channels, max_block);
  if (count == 0) return {0, 1, 0};
  const int64_t size = ceil_div(channels, count);
  return {count, size, channels - count * (size - 1)};
}

template <typename T>
struct DirectArgs {
  const T* weight;   // packed by pack_direct_weight
  const T* bias;     // [out_channels] or nullptr
  T* output;         // [batch][out_channels][out_h][out_w]
  const int64_t* offsets;
  int64_t taps, in_per_group, out_per_group, out_channels, channel_size;
  int64_t virtual_pixels, phase_w, out_h, out_w;
  Blocks blocks;     // per group
  int64_t tiles;     // pixel tiles per block
};

// The weights of block [k, k + R) of a group as [in_per_group][taps][R], at
// k * in_per_group * taps: the R values one tile step broadcasts are adjacent.
template <typename T>
void pack_direct_weight(const T* w, const Conv2dGeometry& g, const Blocks& blocks, T* out) {
  const int64_t per_channel = g.in_per_group() * g.kernel_h * g.kernel_w;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    for (int64_t b = 0; b < blocks.count; ++b) {
      const int64_t k0 = grp * g.out_per_group() + blocks.start(b), r_count = blocks.length(b);
      T* dst = out + k0 * per_channel;
      for (int64_t e = 0; e < per_channel; ++e) {
        for (int64_t r = 0; r < r_count; ++r) dst[e * r_count + r] = w[(k0 + r) * per_channel + e];
      }
    }
  }
}

// One tile: R output channels x NV vectors of virtual pixels, summed over the
// group's input channels and the kernel taps in registers.
template <typename V, typename T, int R, int NV>
[[gnu::always_inline]] inline void direct_tile(const T* in, const int64_t* offsets, int64_t taps,
                                               int64_t channels, int64_t channel_size,
                                               const T* w, const T* bias, T* tile) {
  constexpr int lanes = sizeof(V) / sizeof(T);
  V acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = V{} + (bias ? bias[r] : T(0));
  }
  for (int64_t c = 0; c < channels; ++c) {
    const T* plane = in + c * channel_size;
    for (int64_t t = 0; t < taps; ++t, w += R) {
      V x[NV];
      for (int v = 0; v < NV; ++v) x[v] = simd::load<V>(plane + offsets[t] + v * lanes);
      for (int r = 0; r < R; ++r) {
        for (int v = 0; v < NV; ++v) acc[r][v] += w[r] * x[v];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) simd::store(tile + (r * NV + v) * lanes, acc[r][v]);
  }
}

// The tiles of one block of R output channels over virtual pixels
// [q_begin, q_end), each stored to the real pixels (ow < out_w) of the output.
template <typename V, typename T, int R, int NV>
[[gnu::always_inline]] inline void direct_block(const DirectArgs<T>& a, const T* in, int64_t n,
                                                int64_t k0, int64_t q_begin, int64_t q_end) {
  constexpr int64_t width = NV * sizeof(V) / sizeof(T);
  const T* w = a.weight + k0 * a.in_per_group * a.taps;
  const T* bias = a.bias ? a.bias + k0 : nullptr;
  T tile[R * width];
  for (int64_t q0 = q_begin; q0 < q_end; q0 += width) {
    direct_tile<V, T, R, NV>(in + q0, a.offsets, a.taps, a.in_per_group, a.channel_size, w, bias, tile);
    const int64_t q_stop = std::min(q0 + width, q_end);
    for (int64_t q = q0; q < q_stop;) {
      const int64_t oh = q / a.phase_w, ow = q - oh * a.phase_w;
      const int64_t row_end = std::min(q_stop, (oh + 1) * a.phase_w);
      const int64_t count = std::min(row_end, oh * a.phase_w + a.out_w) - q;
      for (int64_t r = 0; count > 0 && r < R; ++r) {
        const T* src = tile + r * width + (q - q0);
        std::copy(src, src + count, a.output + ((n * a.out_channels + k0 + r) * a.out_h + oh) * a.out_w + ow);
      }
      q = row_end;
    }
  }
}

struct DirectForwardTiles {
  // Computes tiles [begin, end) of image n, group grp from its prepared input
  // channels `in`; tile = block * tiles + pixel tile of the widest width.
  template <int Bytes, typename T>
  [[gnu::always_inline]] void operator()(const DirectArgs<T>* args, const T* in, int64_t n,
                                         int64_t grp, int64_t begin, int64_t end) const {
    using V = simd::Vec<T, Bytes>;
    constexpr int64_t max_width = kMaxTileBytes / sizeof(T);
    const DirectArgs<T>& a = *args;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = t / a.tiles;
      const int64_t k0 = grp * a.out_per_group + a.blocks.start(block);
      const int64_t q_begin = t % a.tiles * max_width;
      const int64_t q_end = std::min(a.virtual_pixels, q_begin + max_width);
      switch (a.blocks.length(block)) {
#define PYCONVEXT_BLOCK_CASE(R) \
  case R: direct_block<V, T, R, tile_vectors<Bytes, R>()>(a, in, n, k0, q_begin, q_end); break;
        PYCONVEXT_BLOCK_CASE(1) PYCONVEXT_BLOCK_CASE(2) PYCONVEXT_BLOCK_CASE(3)
        PYCONVEXT_BLOCK_CASE(4) PYCONVEXT_BLOCK_CASE(5) PYCONVEXT_BLOCK_CASE(6)
        PYCONVEXT_BLOCK_CASE(7) PYCONVEXT_BLOCK_CASE(8) PYCONVEXT_BLOCK_CASE(9)
        PYCONVEXT_BLOCK_CASE(10) PYCONVEXT_BLOCK_CASE(11) PYCONVEXT_BLOCK_CASE(12)
#undef PYCONVEXT_BLOCK_CASE
      }
    }
  }
};
PYCONVEXT_DISPATCH_ISA(direct_forward_tiles, DirectForwardTiles)

// Splits the work of each (image, group) into `splits` tasks so that every
// thread gets a few; each task prepares its image's group channels itself, in
// a buffer that stays in cache, so the prepared input never goes to memory.
struct UnitSplit {
  int64_t splits, work;
  int64_t begin(int64_t split) const { return split * work / splits; }
  int64_t end(int64_t split) const { return (split + 1) * work / splits; }
};
UnitSplit split_units(int64_t units, int64_t work) {
  return {std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), units), 1, std::max<int64_t>(work, 1)),
          work};
}

template <typename T>
void forward_pixel_tiles(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                         const Conv2dGeometry& g, Tensor& out) {
  const DirectLayout l = direct_layout(g, sizeof(T));
  const Blocks blocks = split_blocks(g.out_per_group(), direct_max_block());
  Tensor packed = at::empty({w.numel()}, w.options());
  pack_direct_weight(w.const_data_ptr<T>(), g, blocks, packed.mutable_data_ptr<T>());
  const DirectArgs<T> args{packed.const_data_ptr<T>(),
                           bias.has_value() ? bias->const_data_ptr<T>() : nullptr,
                           out.mutable_data_ptr<T>(), l.offsets.data(), g.kernel_h * g.kernel_w,
                           g.in_per_group(), g.out_per_group(), g.out_channels, l.channel_size,
                           l.virtual_pixels, l.phase_w, g.out_h, g.out_w, blocks,
                           ceil_div(l.virtual_pixels, kMaxTileBytes / int64_t(sizeof(T)))};
  const T* x_data = x.const_data_ptr<T>();
  const UnitSplit split = split_units(g.batch * g.groups, blocks.count * args.tiles);
  at::parallel_for(0, g.batch * g.groups * split.splits, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // thread-local, like every dispatch guard
    Tensor prepared = at::empty({g.in_per_group() * l.channel_size}, x.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t unit = task / split.splits, s = task % split.splits;
      const int64_t n = unit / g.groups, grp = unit % g.groups;
      prepare_direct_input(x_data + (n * g.in_channels + grp * g.in_per_group()) * g.in_h * g.in_w,
                           g.in_per_group(), g, l, prepared.mutable_data_ptr<T>());
      direct_forward_tiles(&args, prepared.const_data_ptr<T>(), n, grp, split.begin(s), split.end(s));
    }
  });
}

// Direct convolution with the images of the batch as GEMM rows ("batch
// tiles"), for batches of 8 and more: an implicit GEMM whose rows are images,
// columns output channels and depth (input channel, tap), one output pixel
// per register tile. The input is transposed to [h][w][channel][image], so
// the images a tap step broadcasts are adjacent, and a tap's steps over the
// channels read consecutive memory. As every row of a tile reads the same
// taps, taps that fall into the padding are skipped rather than multiplied by
// zeros: on 7x7 planes that is a fifth of the work, which the pixel tiles
// above (and im2col columns) do in full. Each task packs the weights of its
// panel of 2 vectors of output channels, [tap][channel][width], into a
// buffer of its own, which stays in its core's L2 cache while the tiles run
// (packing all panels at once would send them to memory and back).
template <typename T>
struct BatchTileArgs {
  const T* input;       // [in_h][in_w][in_channels][batch]
  const T* weight;      // the convolution's, or for the input gradient the forward's
  const T* bias;        // [out_channels] or nullptr
  T* output;            // [batch][out_channels][out_h][out_w]
  const Conv2dGeometry* g;
  bool transposed;      // weight is the forward's: the input gradient
  int64_t panels, image_blocks;
};

// Rows (images; input channels for the weight gradient) per register tile of
// 2 vectors of channels: 24 of the 32 AVX-512 accumulators, 12 of the 16
// others.
template <int Bytes>
constexpr int kBatchTileRows = Bytes == 64 ? 12 : 6;

int64_t batch_tile_rows() { return vector_bytes() == 64 ? kBatchTileRows<64> : kBatchTileRows<16>; }

// Output channels per panel of the batch tiles: 2 vectors.
template <typename T>
int64_t batch_panel_width() {
  return 2 * vector_bytes() / int64_t(sizeof(T));
}

// Rows x 2 vectors of C over taps_h x taps_w taps and all channels of a
// group; x points at the first tap's input of channel 0 and the tile's first
// image, w at that tap's weights of channel 0; the steps are those to the
// next tap along each axis.
template <typename V, typename T, int Rows>
[[gnu::always_inline]] inline void batch_tile(const T* x, const T* w, const T* bias, int64_t channels,
                                              int64_t channel_stride, int64_t taps_h, int64_t taps_w,
                                              int64_t x_row_step, int64_t x_col_step, int64_t w_row_step,
                                              int64_t w_col_step, T* tile) {
  constexpr int lanes = sizeof(V) / sizeof(T);
  V acc[Rows][2];
  const V b0 = bias ? simd::load<V>(bias) : V{}, b1 = bias ? simd::load<V>(bias + lanes) : V{};
  for (int p = 0; p < Rows; ++p) {
    acc[p][0] = b0;
    acc[p][1] = b1;
  }
  for (int64_t i = 0; i < taps_h; ++i) {
    for (int64_t j = 0; j < taps_w; ++j) {
      const T* in = x + i * x_row_step + j * x_col_step;
      const T* panel = w + i * w_row_step + j * w_col_step;
      for (int64_t c = 0; c < channels; ++c, in += channel_stride, panel += 2 * lanes) {
        const V w0 = simd::load<V>(panel), w1 = simd::load<V>(panel + lanes);
        for (int p = 0; p < Rows; ++p) {
          const T a = in[p];  // (V{} + a would add +0.0 to it first)
          acc[p][0] += w0 * a;
          acc[p][1] += w1 * a;
        }
      }
    }
  }
  for (int p = 0; p < Rows; ++p) {
    simd::store(tile + p * 2 * lanes, acc[p][0]);
    simd::store(tile + p * 2 * lanes + lanes, acc[p][1]);
  }
}

// First and last + 1 kernel taps along one axis that read inside [0, size)
// for output o.
std::pair<int64_t, int64_t> valid_taps(int64_t o, int64_t stride, int64_t pad, int64_t dil,
                                       int64_t kernel, int64_t size) {
  const int64_t origin = o * stride - pad;  // input index of tap 0
  const int64_t lo = origin >= 0 ? 0 : sizes::ceil_div(-origin, dil);
  const int64_t hi = origin > size - 1 ? 0 : std::min(kernel, (size - 1 - origin) / dil + 1);
  return {std::min(lo, hi), hi};
}

// Packs output channels [k0, k0 + count) of group grp as a panel of `width`
// columns, zero past count: panel[(t * channels + c) * width + j] is the
// weight of output channel k0 + j, input channel c, tap t. For the input gradient (a
// convolution with the forward's kernel flipped and its channel axes
// swapped) that is forward weight [c][k0 + j][taps - 1 - t].
template <typename V, typename T>
[[gnu::always_inline]] inline void pack_batch_panel(const BatchTileArgs<T>& a, int64_t grp, int64_t k0,
                                                    int64_t count, T* panel) {
  constexpr int64_t lanes = sizeof(V) / sizeof(T), width = 2 * lanes;
  const Conv2dGeometry& g = *a.g;
  const int64_t taps = g.kernel_h * g.kernel_w, depth = g.in_per_group() * taps;
  if (a.transposed) {  // each input channel's taps for the panel are side by side
    for (int64_t c = 0; c < g.in_per_group(); ++c) {
      const T* src = a.weight + ((grp * g.in_per_group() + c) * g.out_per_group() + k0) * taps;
      for (int64_t t = 0; t < taps; ++t) {
        T* dst = panel + (t * g.in_per_group() + c) * width;
        for (int64_t j = 0; j < width; ++j) dst[j] = j < count ? src[j * taps + taps - 1 - t] : T(0);
      }
    }
    return;
  }
  // Each output channel's weights are a row of `depth`, d = c * taps + t:
  // transposed by blocks.
  const T* src = a.weight + (grp * g.out_per_group() + k0) * depth;
  auto position = [&](int64_t d) { return d % taps * g.in_per_group() + d / taps; };
  int64_t d0 = 0;
  for (; d0 + lanes <= depth; d0 += lanes) {
    for (int64_t jb = 0; jb < width; jb += lanes) {
      V rows[lanes];
#pragma GCC unroll 16
      for (int64_t r = 0; r < lanes; ++r) rows[r] = jb + r < count ? simd::load<V>(src + (jb + r) * depth + d0) : V{};
      simd::transpose_block<lanes / 2>(rows);
#pragma GCC unroll 16
      for (int64_t r = 0; r < lanes; ++r) simd::store(panel + position(d0 + r) * width + jb, rows[r]);
    }
  }
  for (int64_t d = d0; d < depth; ++d) {
    for (int64_t j = 0; j < width; ++j) panel[position(d) * width + j] = j < count ? src[j * depth + d] : T(0);
  }
}

struct BatchForwardTiles {
  // Computes tiles [begin, end) of panel `panel` of group grp, packing the
  // panel's weights into `packed` first: tile = image block * plane + pixel.
  template <int Bytes, typename T>
  [[gnu::always_inline]] void operator()(const BatchTileArgs<T>* args, int64_t grp, int64_t panel,
                                         T* packed, int64_t begin, int64_t end) const {
    using V = simd::Vec<T, Bytes>;
    constexpr int64_t width = 2 * Bytes / sizeof(T);
    const BatchTileArgs<T>& a = *args;
    const Conv2dGeometry& g = *a.g;
    const int64_t k0 = panel * width, channels = std::min(width, g.out_per_group() - k0);
    pack_batch_panel<V>(a, grp, k0, channels, packed);
    T bias[width] = {};
    for (int64_t k = 0; a.bias && k < channels; ++k) bias[k] = a.bias[grp * g.out_per_group() + k0 + k];
    const int64_t n_rows = ceil_div(g.batch, a.image_blocks);  // images per block
    const int64_t plane = g.out_h * g.out_w;
    const int64_t x_col_step = g.dil_w * g.in_channels * g.batch, x_row_step = g.dil_h * g.in_w * g.in_channels * g.batch;
    const int64_t w_col_step = g.in_per_group() * width, w_row_step = g.kernel_w * w_col_step;
    T tile[kBatchTileRows<Bytes> * width];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pixel = t % plane, n0 = t / plane * n_rows, rows = std::min(n_rows, g.batch - n0);
      const int64_t oh = pixel / g.out_w, ow = pixel % g.out_w;
      const auto [i0, i1] = valid_taps(oh, g.stride_h, g.pad_h, g.dil_h, g.kernel_h, g.in_h);
      const auto [j0, j1] = valid_taps(ow, g.stride_w, g.pad_w, g.dil_w, g.kernel_w, g.in_w);
      // (With no tap inside, i0 == i1 or j0 == j1 and x is not read.)
      const int64_t ih = oh * g.stride_h - g.pad_h + i0 * g.dil_h, iw = ow * g.stride_w - g.pad_w + j0 * g.dil_w;
      const T* x = a.input + ((std::clamp<int64_t>(ih, 0, g.in_h - 1) * g.in_w + std::clamp<int64_t>(iw, 0, g.in_w - 1)) *
                                  g.in_channels + grp * g.in_per_group()) * g.batch + n0;
      const T* w = packed + i0 * w_row_step + j0 * w_col_step;
      switch (rows) {
#define PYCONVEXT_ROWS_CASE(R)                                                                         \
  case R:                                                                                              \
    if constexpr (R <= kBatchTileRows<Bytes>) {                                                        \
      batch_tile<V, T, R>(x, w, a.bias ? bias : nullptr, g.in_per_group(), g.batch, i1 - i0, j1 - j0, \
                          x_row_step, x_col_step, w_row_step, w_col_step, tile);                      \
    }                                                                                                  \
    break;
        PYCONVEXT_ROWS_CASE(1) PYCONVEXT_ROWS_CASE(2) PYCONVEXT_ROWS_CASE(3) PYCONVEXT_ROWS_CASE(4)
        PYCONVEXT_ROWS_CASE(5) PYCONVEXT_ROWS_CASE(6) PYCONVEXT_ROWS_CASE(7) PYCONVEXT_ROWS_CASE(8)
        PYCONVEXT_ROWS_CASE(9) PYCONVEXT_ROWS_CASE(10) PYCONVEXT_ROWS_CASE(11) PYCONVEXT_ROWS_CASE(12)
#undef PYCONVEXT_ROWS_CASE
      }
      T* out = a.output + ((n0 * g.out_channels + grp * g.out_per_group() + k0) * g.out_h + oh) * g.out_w + ow;
      for (int64_t p = 0; p < rows; ++p) {
        for (int64_t k = 0; k < channels; ++k) out[(p * g.out_channels + k) * plane] = tile[p * width + k];
      }
    }
  }
};
PYCONVEXT_DISPATCH_ISA(batch_forward_tiles, BatchForwardTiles)

// The input x of geometry g as [h][w][channel][image], the batch tiles'
// layout.
template <typename T>
Tensor images_inner(const Tensor& x, const Conv2dGeometry& g) {
  const int64_t pixels = g.in_h * g.in_w, column = g.in_channels * g.batch;
  Tensor result = at::empty({pixels * column}, x.options());
  const T* src = x.const_data_ptr<T>();
  T* dst = result.mutable_data_ptr<T>();
  at::parallel_for(0, pixels, grain_for(column), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t c = 0; c < g.in_channels; ++c) {
        for (int64_t n = 0; n < g.batch; ++n) dst[e * column + c * g.batch + n] = src[(n * g.in_channels + c) * pixels + e];
      }
    }
  });
  return result;
}

// Whether a convolution's shape suits the batch tiles: enough images to fill
// a tile's rows, output channels for a panel at least (16 would leave half of
// each FMA idle), and enough input channels per tap to amortize the tap loops
// (stems with 3 input channels run faster on the pixel tiles).
bool batch_tiles_fit(const Conv2dGeometry& g) {
  return g.batch >= 8 && g.out_per_group() >= batch_panel_width<float>() && g.in_per_group() >= 16;
}

// Whether the batch tiles serve a convolution: its shape fits them, with
// enough depth per tile to amortize storing it (strided 1x1 layers of 64
// channels do not).
bool use_batch_tiles(const Conv2dGeometry& g) {
  return batch_tiles_fit(g) && g.in_per_group() * g.kernel_h * g.kernel_w >= 128;
}

// out = the convolution of x by geometry g with weight w (and bias); with
// `transposed`, w is the weight of the forward convolution whose input
// gradient this is (see grad_input_geometry).
template <typename T>
void batch_tiles(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                 const Conv2dGeometry& g, bool transposed, Tensor& out) {
  const int64_t width = batch_panel_width<T>(), panels = ceil_div(g.out_per_group(), width);
  const Tensor transposed_input = images_inner<T>(x, g);
  const T* t_data = transposed_input.const_data_ptr<T>();
  const BatchTileArgs<T> args{t_data, w.const_data_ptr<T>(), bias.has_value() ? bias->const_data_ptr<T>() : nullptr,
                              out.mutable_data_ptr<T>(), &g, transposed, panels, ceil_div(g.batch, batch_tile_rows())};
  const int64_t units = g.groups * panels, depth = g.in_per_group() * g.kernel_h * g.kernel_w;
  const UnitSplit split = split_units(units, args.image_blocks * g.out_h * g.out_w);
  at::parallel_for(0, units * split.splits, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    Tensor packed = at::empty({depth * width}, w.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t unit = task / split.splits, s = task % split.splits;
      batch_forward_tiles(&args, unit / panels, unit % panels, packed.mutable_data_ptr<T>(), split.begin(s),
                          split.end(s));
    }
  });
}

// The weight gradient on the batch tiles' layouts: grad_weight[k][c][tap] is
// the sum over images and output pixels of grad_output[n][k][pixel] times the
// input the tap reads for that pixel. An implicit GEMM whose rows are input
// channels (of one tap), columns output channels, and depth (pixel, image):
// grad_output as [group][panel][pixel][image][width], so that a step loads
// its panel's 2 vectors of output channels from one stream, and the input as
// [h][w][channel][image], so that the tile's channels of one image are
// broadcast from one cache line or two. Pixels whose tap falls into the
// padding are skipped.
template <typename T>
struct BatchWeightGradArgs {
  const T* input;     // [in_h][in_w][in_channels][batch]
  const T* grad_out;  // [groups][panels][out_h * out_w][batch][width], zero past out_per_group
  T* grad_weight;     // [out_channels][in_per_group][taps]
  const Conv2dGeometry* g;
  int64_t panels;
  Blocks channel_blocks;  // per group
};

// Adds the sums over output rows [oh_begin, oh_end) of one tile to grad_weight.
template <typename V, typename T, int Rows>
[[gnu::always_inline]] inline void batch_weight_grad_tile(const BatchWeightGradArgs<T>& a, int64_t grp, int64_t k0,
                                                          int64_t count, int64_t c0, int64_t i, int64_t j,
                                                          int64_t oh_begin, int64_t oh_end) {
  constexpr int lanes = sizeof(V) / sizeof(T);
  const Conv2dGeometry& g = *a.g;
  const int64_t batch = g.batch;
  V acc[Rows][2];
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = V{};
  const Span rows = valid_outputs(g.out_h, g.in_h, g.stride_h, i * g.dil_h - g.pad_h);
  const Span cols = valid_outputs(g.out_w, g.in_w, g.stride_w, j * g.dil_w - g.pad_w);
  for (int64_t oh = std::max(rows.lo, oh_begin); oh < std::min(rows.hi, oh_end); ++oh) {
    const int64_t ih = oh * g.stride_h + i * g.dil_h - g.pad_h;
    for (int64_t ow = cols.lo; ow < cols.hi; ++ow) {
      const int64_t iw = ow * g.stride_w + j * g.dil_w - g.pad_w;
      const T* go = a.grad_out + ((grp * a.panels + k0 / (2 * lanes)) * g.out_h * g.out_w + oh * g.out_w + ow) * batch * 2 * lanes;
      const T* x = a.input + ((ih * g.in_w + iw) * g.in_channels + grp * g.in_per_group() + c0) * batch;
      for (int64_t n = 0; n < batch; ++n, go += 2 * lanes, ++x) {
        const V g0 = simd::load<V>(go), g1 = simd::load<V>(go + lanes);
        for (int r = 0; r < Rows; ++r) {
          const T v = x[r * batch];
          acc[r][0] += g0 * v;
          acc[r][1] += g1 * v;
        }
      }
    }
  }
  const int64_t taps = g.kernel_h * g.kernel_w;
  T* out = a.grad_weight + ((grp * g.out_per_group() + k0) * g.in_per_group() + c0) * taps + i * g.kernel_w + j;
  for (int r = 0; r < Rows; ++r) {
    T sums[2 * lanes];
    simd::store(sums, acc[r][0]);
    simd::store(sums + lanes, acc[r][1]);
    for (int64_t k = 0; k < count; ++k) out[(k * g.in_per_group() + r) * taps] += sums[k];
  }
}

// Output rows per chunk of the weight-gradient tiles: a thread runs all its
// tiles over a chunk of about kWeightGradChunk pixels, whose grad_output and
// input stay in its L2 cache meanwhile, before the next chunk.
constexpr int64_t kWeightGradChunk = 64;

struct BatchWeightGradTiles {
  // Adds tiles [begin, end) to grad_weight: tile = ((group * panels + panel)
  // * taps + tap) * channel_blocks + block.
  template <int Bytes, typename T>
  [[gnu::always_inline]] void operator()(const BatchWeightGradArgs<T>* args, int64_t begin, int64_t end) const {
    using V = simd::Vec<T, Bytes>;
    constexpr int64_t width = 2 * Bytes / sizeof(T), max_rows = kBatchTileRows<Bytes>;
    const BatchWeightGradArgs<T>& a = *args;
    const Conv2dGeometry& g = *a.g;
    const int64_t taps = g.kernel_h * g.kernel_w;
    const int64_t chunk = std::max<int64_t>(1, kWeightGradChunk / g.out_w);
    for (int64_t oh0 = 0; oh0 < g.out_h; oh0 += chunk) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t blocks = a.channel_blocks.count, block = t % blocks, tap = t / blocks % taps;
        const int64_t panel = t / blocks / taps % a.panels, grp = t / blocks / taps / a.panels;
        const int64_t k0 = panel * width, count = std::min(width, g.out_per_group() - k0);
        const int64_t c0 = a.channel_blocks.start(block), rows = a.channel_blocks.length(block);
        const int64_t i = tap / g.kernel_w, j = tap % g.kernel_w;
        switch (rows) {
#define PYCONVEXT_ROWS_CASE(R) \
  case R: if constexpr (R <= max_rows) batch_weight_grad_tile<V, T, R>(a, grp, k0, count, c0, i, j, oh0, oh0 + chunk); break;
          PYCONVEXT_ROWS_CASE(1) PYCONVEXT_ROWS_CASE(2) PYCONVEXT_ROWS_CASE(3) PYCONVEXT_ROWS_CASE(4)
          PYCONVEXT_ROWS_CASE(5) PYCONVEXT_ROWS_CASE(6) PYCONVEXT_ROWS_CASE(7) PYCONVEXT_ROWS_CASE(8)
          PYCONVEXT_ROWS_CASE(9) PYCONVEXT_ROWS_CASE(10) PYCONVEXT_ROWS_CASE(11) PYCONVEXT_ROWS_CASE(12)
#undef PYCONVEXT_ROWS_CASE
        }
      }
    }
  }
};
PYCONVEXT_DISPATCH_ISA(batch_weight_grad_tiles, BatchWeightGradTiles)

// Whether the weight gradient runs on the batch tiles: the shape fits them,
// and output planes are from 5x5 to 16x16. Larger planes' grad_output and
// input outgrow L2, and the direct kernel is faster there; on smaller ones
// each tile's sums are short, and the columns' GEMM is faster (as measured on
// the layers of ResNets).
bool use_batch_weight_grad(const Conv2dGeometry& g) {
  const int64_t plane = g.out_h * g.out_w;
  return batch_tiles_fit(g) && plane > 16 && plane <= 256;
}

template <typename T>
void grad_weight_batch_tiles(const Tensor& grad_out, const Tensor& x, const Conv2dGeometry& g, Tensor& grad_weight) {
  const int64_t width = batch_panel_width<T>();
  const Tensor input = images_inner<T>(x, g);
  const int64_t panels = ceil_div(g.out_per_group(), width), plane = g.out_h * g.out_w;
  Tensor go = at::empty({g.groups * panels * plane * g.batch * width}, grad_out.options());
  const T* go_data = grad_out.const_data_ptr<T>();
  T* go_panels = go.mutable_data_ptr<T>();
  at::parallel_for(0, g.groups * panels * plane, grain_for(g.batch * width), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {  // e = (group * panels + panel) * plane + pixel
      const int64_t k0 = e / plane / panels * g.out_per_group() + e / plane % panels * width;
      const int64_t count = std::min(width, (e / plane / panels + 1) * g.out_per_group() - k0);
      for (int64_t n = 0; n < g.batch; ++n) {
        T* dst = go_panels + (e * g.batch + n) * width;
        for (int64_t j = 0; j < width; ++j) dst[j] = j < count ? go_data[(n * g.out_channels + k0 + j) * plane + e % plane] : T(0);
      }
    }
  });
  const BatchWeightGradArgs<T> args{input.const_data_ptr<T>(), go_panels, grad_weight.mutable_data_ptr<T>(), &g,
                                    panels, split_blocks(g.in_per_group(), batch_tile_rows())};
  const int64_t tiles = g.groups * panels * g.kernel_h * g.kernel_w * args.channel_blocks.count;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) { batch_weight_grad_tiles(&args, begin, end); });
}

template <typename T>
void forward_direct(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                    const Conv2dGeometry& g, Tensor& out) {
  if (out.numel() == 0) return;
  if (use_batch_tiles(g)) {
    batch_tiles<T>(x, w, bias, g, false, out);
  } else {
    forward_pixel_tiles<T>(x, w, bias, g, out);
  }
}

// grad_input of a unit-stride convolution is itself a unit-stride convolution:
// of grad_output, padded by dilation * (kernel - 1) - padding, with the kernel
// flipped and its two channel axes swapped within each group (which the
// batch tiles' packing does on the fly).
bool grad_input_is_convolution(const Conv2dGeometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.pad_h <= g.dil_h * (g.kernel_h - 1) &&
         g.pad_w <= g.dil_w * (g.kernel_w - 1);
}

Conv2dGeometry grad_input_geometry(const Conv2dGeometry& g) {
  Conv2dGeometry t = g;
  t.in_channels = g.out_channels;
  t.in_h = g.out_h;
  t.in_w = g.out_w;
  t.out_channels = g.in_channels;
  t.out_h = g.in_h;
  t.out_w = g.in_w;
  t.pad_h = g.dil_h * (g.kernel_h - 1) - g.pad_h;
  t.pad_w = g.dil_w * (g.kernel_w - 1) - g.pad_w;
  t.padded_h = sizes::padded_extent(t.in_h, t.pad_h, "pyconvext.conv2d_backward", "padding");
  t.padded_w = sizes::padded_extent(t.in_w, t.pad_w, "pyconvext.conv2d_backward", "padding");
  return t;
}

template <typename T>
void grad_input_direct(const Tensor& grad_out, const Tensor& w, const Conv2dGeometry& g,
                       Tensor& grad_input) {
  const Conv2dGeometry t = grad_input_geometry(g);
  if (grad_input.numel() == 0) return;
  if (use_batch_tiles(t)) {
    return batch_tiles<T>(grad_out, w, std::nullopt, t, true, grad_input);
  }
  const Tensor flipped = w.view({g.groups, g.out_per_group(), g.in_per_group(), g.kernel_h, g.kernel_w})
                             .transpose(1, 2)
                             .flip({3, 4})
                             .reshape({g.in_channels, g.out_per_group(), g.kernel_h, g.kernel_w})
                             .contiguous();
  forward_pixel_tiles<T>(grad_out, flipped, std::nullopt, t, grad_input);
}

// grad_weight[k, c, tap] = sum over images and output pixels of
// grad_output[k, q] * input[c, q + offset(tap)], on the same prepared input as
// the forward, with grad_output spread over the virtual pixels. Dropped pixels
// are masked out of the input (not just zero in grad_output) so that an
// infinite input they happen to read cannot turn 0 * inf into a NaN.
template <typename T>
struct WeightGradArgs {
  const T* input;                 // prepared: [batch][channels][channel_size]
  const T* grad_out;              // [batch][out_channels][pixels], zero at dropped pixels
  const T* mask;                  // [pixels]: all bits set at real pixels, zero at dropped ones
  const int64_t* element_offset;  // per (c, tap) of a group: c * channel_size + offset(tap)
  T* grad_weight;                 // [out_channels][elements]
  int64_t batch, groups, in_per_group, out_per_group, channels, out_channels, channel_size;
  int64_t pixels;                 // virtual pixels rounded up to whole vectors
  int64_t elements;               // in_per_group * taps
  Blocks k_blocks, e_blocks;      // per group
};

// One tile: R output channels x M (channel, tap) elements, summed over all
// images and pixels in registers.
template <typename V, typename T, int R, int M>
[[gnu::always_inline]] inline void weight_grad_tile(const WeightGradArgs<T>& a, int64_t grp,
                                                    int64_t k0, int64_t e0) {
  constexpr int lanes = sizeof(V) / sizeof(T);
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  using IV = simd::Vec<I, sizeof(V)>;
  V acc[R][M] = {};
  for (int64_t n = 0; n < a.batch; ++n) {
    const T* go = a.grad_out + (n * a.out_channels + k0) * a.pixels;
    const T* in = a.input + (n * a.channels + grp * a.in_per_group) * a.channel_size;
    for (int64_t q = 0; q < a.pixels; q += lanes) {
      const IV keep = simd::load<IV>(a.mask + q);
      V g[R];
      for (int r = 0; r < R; ++r) g[r] = simd::load<V>(go + r * a.pixels + q);
      for (int e = 0; e < M; ++e) {
        const V x = (V)(simd::load<IV>(in + a.element_offset[e0 + e] + q) & keep);
        for (int r = 0; r < R; ++r) acc[r][e] += g[r] * x;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int e = 0; e < M; ++e) {
      T sum = 0;
      for (int lane = 0; lane < lanes; ++lane) sum += acc[r][e][lane];
      a.grad_weight[(k0 + r) * a.elements + e0 + e] = sum;
    }
  }
}

struct WeightGradTiles {
  // Computes tiles [begin, end): tile = (group * k_blocks + k_block) * e_blocks + e_block.
  template <int Bytes, typename T>
  [[gnu::always_inline]] void operator()(const WeightGradArgs<T>* args, int64_t begin, int64_t end) const {
    using V = simd::Vec<T, Bytes>;
    const WeightGradArgs<T>& a = *args;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t eb = tile % a.e_blocks.count, kb = tile / a.e_blocks.count % a.k_blocks.count;
      const int64_t grp = tile / (a.e_blocks.count * a.k_blocks.count);
      const int64_t k0 = grp * a.out_per_group + a.k_blocks.start(kb), e0 = a.e_blocks.start(eb);
      switch (8 * a.k_blocks.length(kb) + a.e_blocks.length(eb)) {  // R in 1..4, M in 1..6
#define PYCONVEXT_CASE(R, M) \
  case 8 * R + M: weight_grad_tile<V, T, R, M>(a, grp, k0, e0); break;
#define PYCONVEXT_CASES(R) \
  PYCONVEXT_CASE(R, 1) PYCONVEXT_CASE(R, 2) PYCONVEXT_CASE(R, 3) PYCONVEXT_CASE(R, 4) PYCONVEXT_CASE(R, 5) PYCONVEXT_CASE(R, 6)
        PYCONVEXT_CASES(1) PYCONVEXT_CASES(2) PYCONVEXT_CASES(3) PYCONVEXT_CASES(4)
#undef PYCONVEXT_CASES
#undef PYCONVEXT_CASE
      }
    }
  }
};
PYCONVEXT_DISPATCH_ISA(weight_grad_tiles, WeightGradTiles)

// Register tile of the weight-gradient kernel: R output channels x M
// (channel, tap) elements, R * M + R + 2 vector registers.
std::pair<int64_t, int64_t> weight_grad_max_tile() {
  return simd::cpu_isa() == simd::Isa::Avx512 ? std::pair<int64_t, int64_t>{4, 6}
                                              : std::pair<int64_t, int64_t>{2, 5};
}

template <typename T>
void grad_weight_direct(const Tensor& grad_out, const Tensor& x, const Conv2dGeometry& g,
                        Tensor& grad_weight) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const DirectLayout l = direct_layout(g, sizeof(T));
  const int64_t planes = g.batch * g.in_channels;
  Tensor prepared = at::empty({planes * l.channel_size}, x.options());
  const T* x_data = x.const_data_ptr<T>();
  T* prepared_data = prepared.mutable_data_ptr<T>();
  at::parallel_for(0, planes, grain_for(l.channel_size), [&](int64_t begin, int64_t end) {
    prepare_direct_input(x_data + begin * g.in_h * g.in_w, end - begin, g, l,
                         prepared_data + begin * l.channel_size);
  });

  // grad_output on the virtual pixels (zero at the dropped columns), and the
  // mask of real pixels.
  const int64_t vector = kMaxVectorBytes / sizeof(T);
  const int64_t pixels = ceil_div(l.virtual_pixels, vector) * vector;
  Tensor go = at::zeros({g.batch, g.out_channels, pixels}, grad_out.options());
  go.narrow(2, 0, l.virtual_pixels)
      .view({g.batch, g.out_channels, g.out_h, l.phase_w})
      .narrow(3, 0, g.out_w)
      .copy_(grad_out);
  std::vector<I> mask(pixels, 0);
  for (int64_t q = 0; q < l.virtual_pixels; ++q) mask[q] = q % l.phase_w < g.out_w ? I(-1) : I(0);
  std::vector<int64_t> element_offset;
  for (int64_t c = 0; c < g.in_per_group(); ++c) {
    for (int64_t offset : l.offsets) element_offset.push_back(c * l.channel_size + offset);
  }

  const auto [max_r, max_m] = weight_grad_max_tile();
  const int64_t elements = static_cast<int64_t>(element_offset.size());
  const WeightGradArgs<T> args{prepared.const_data_ptr<T>(), go.const_data_ptr<T>(),
                               reinterpret_cast<const T*>(mask.data()), element_offset.data(),
                               grad_weight.mutable_data_ptr<T>(), g.batch, g.groups, g.in_per_group(),
                               g.out_per_group(), g.in_channels, g.out_channels, l.channel_size,
                               pixels, elements, split_blocks(g.out_per_group(), max_r),
                               split_blocks(elements, max_m)};
  const int64_t tiles = g.groups * args.k_blocks.count * args.e_blocks.count;
  at::parallel_for(0, tiles, grain_for(g.batch * pixels * max_r * max_m), [&](int64_t begin, int64_t end) {
    weight_grad_tiles(&args, begin, end);
  });
}

// ---------------------------------------------------------------------------
// Matrix products with our GEMM, where the data need no rearranging:
// 1x1 convolutions with unit stride and no padding, and the input gradient of
// strided convolutions (a GEMM, then our col2im).

bool is_pointwise(const Conv2dGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
         g.pad_h == 0 && g.pad_w == 0;
}

// Runs body(n, scratch) for every image n, scratch being a tensor of
// `scratch_size` elements owned by the calling thread. With at least one image
// per thread, threads take whole images and the GEMMs inside run
// single-threaded; with fewer images, images run in turn and the loops and
// GEMMs inside use all threads.
template <typename Body>
void for_each_image(int64_t batch, int64_t scratch_size, const at::TensorOptions& options, Body body) {
  auto run = [&](int64_t begin, int64_t end) {
    // Dispatch guards are thread-local: worker threads need their own.
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    Tensor scratch = at::empty({scratch_size}, options);
    for (int64_t n = begin; n < end; ++n) body(n, scratch);
  };
  if (batch >= at::get_num_threads()) {
    at::parallel_for(0, batch, 1, run);
  } else {
    run(0, batch);
  }
}

// Each row r of the (rows, cols) matrix at c (row stride ldc) set to bias[r].
template <typename T>
void fill_rows(T* c, int64_t rows, int64_t cols, int64_t ldc, const T* bias) {
  for (int64_t r = 0; r < rows; ++r) std::fill(c + r * ldc, c + r * ldc + cols, bias[r]);
}

template <typename T>
void forward_pointwise(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                       const Conv2dGeometry& g, Tensor& out) {
  const int64_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const Tensor w3 = w.view({g.groups, out_per_group, in_per_group});
  const Tensor x3 = x.view({g.batch, g.in_channels, g.in_h * g.in_w});
  const Tensor out4 = out.view({g.batch, g.groups, out_per_group, g.out_h * g.out_w});
  for_each_image(g.batch, 0, x.options(), [&](int64_t n, Tensor&) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const Tensor src = x3[n].narrow(0, grp * in_per_group, in_per_group);
      Tensor dst = out4[n][grp];
      if (bias.has_value()) {
        fill_rows(dst.mutable_data_ptr<T>(), out_per_group, dst.size(1), dst.stride(0),
                  bias->const_data_ptr<T>() + grp * out_per_group);
      }
      cpu::gemm<T>(w3[grp], src, dst, bias.has_value());
    }
  });
}

// grad_input and grad_weight (either may be undefined) of a pointwise convolution.
template <typename T>
void backward_pointwise(const Tensor& grad_out, const Tensor& x, const Tensor& w,
                        const Conv2dGeometry& g, Tensor& grad_input, Tensor& grad_weight) {
  const int64_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const Tensor w3 = w.view({g.groups, out_per_group, in_per_group});
  const Tensor x3 = x.view({g.batch, g.in_channels, g.in_h * g.in_w});
  const Tensor go4 = grad_out.view({g.batch, g.groups, out_per_group, g.out_h * g.out_w});
  const Tensor gi3 = grad_input.defined() ? grad_input.view(x3.sizes()) : Tensor();
  // Each thread sums grad_weight over its own images; the sums are added in
  // thread order at the end, so the result does not depend on scheduling.
  std::vector<Tensor> partial(at::get_num_threads());
  for_each_image(g.batch, 0, x.options(), [&](int64_t n, Tensor&) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const Tensor go = go4[n][grp];
      if (grad_weight.defined()) {
        Tensor& sums = partial[at::get_thread_num()];
        if (!sums.defined()) sums = at::zeros({g.groups, out_per_group, in_per_group}, x.options());
        Tensor sums_grp = sums[grp];
        cpu::gemm<T>(go, x3[n].narrow(0, grp * in_per_group, in_per_group).t(), sums_grp, true);
      }
      if (grad_input.defined()) {
        Tensor dst = gi3[n].narrow(0, grp * in_per_group, in_per_group);
        cpu::gemm<T>(w3[grp].t(), go, dst, false);
      }
    }
  });
  if (grad_weight.defined()) {
    Tensor gw3 = grad_weight.view({g.groups, out_per_group, in_per_group});
    for (const Tensor& sums : partial) {
      if (sums.defined()) gw3.add_(sums);
    }
  }
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

// Columns of `images` images: col[(c, i, j)][(m, oh, ow)] is the element of
// channel c of image m that kernel tap (i, j) reads for output (oh, ow):
// in[m * image_stride + c, oh*sh + i*dh - ph, ow*sw + j*dw - pw], or zero in
// the padding. Parallel over the rows (c, i, j).
template <typename T>
void im2col(const T* in, int64_t channels, int64_t images, int64_t image_stride,
            const Conv2dGeometry& g, T* col) {
  const int64_t taps = g.kernel_h * g.kernel_w, plane = g.out_h * g.out_w;
  at::parallel_for(0, channels * taps, grain_for(images * plane), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r / taps, i = r % taps / g.kernel_w, j = r % g.kernel_w;
      const Tap t = tap(g, i, j);
      for (int64_t m = 0; m < images; ++m) {
        T* dst = col + (r * images + m) * plane;
        const T* src = in + m * image_stride + c * g.in_h * g.in_w;
        std::fill(dst, dst + t.rows.lo * g.out_w, T(0));
        for (int64_t oh = t.rows.lo; oh < t.rows.hi; ++oh) {
          T* out_row = dst + oh * g.out_w;
          const T* in_row = src + (oh * g.stride_h + t.row_offset) * g.in_w + t.col_offset;
          std::fill(out_row, out_row + t.cols.lo, T(0));
          if (g.stride_w == 1) {
            std::copy(in_row + t.cols.lo, in_row + t.cols.hi, out_row + t.cols.lo);
          } else {
            for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow) out_row[ow] = in_row[ow * g.stride_w];
          }
          std::fill(out_row + t.cols.hi, out_row + g.out_w, T(0));
        }
        std::fill(dst + t.rows.hi * g.out_w, dst + plane, T(0));
      }
    }
  });
}

// The adjoint of im2col: in[m * image_stride + c, oh*sh + i*dh - ph,
// ow*sw + j*dw - pw] += col[(c, i, j)][(m, oh, ow)]. Parallel over channels,
// so no two threads touch the same input element.
template <typename T>
void col2im_add(const T* col, int64_t channels, int64_t images, int64_t image_stride,
                const Conv2dGeometry& g, T* in) {
  const int64_t taps = g.kernel_h * g.kernel_w, plane = g.out_h * g.out_w;
  at::parallel_for(0, channels, grain_for(taps * images * plane), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t m = 0; m < images; ++m) {
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            const Tap t = tap(g, i, j);
            const T* src = col + ((c * taps + i * g.kernel_w + j) * images + m) * plane;
            T* dst_plane = in + m * image_stride + c * g.in_h * g.in_w;
            for (int64_t oh = t.rows.lo; oh < t.rows.hi; ++oh) {
              const T* row = src + oh * g.out_w;
              T* dst = dst_plane + (oh * g.stride_h + t.row_offset) * g.in_w + t.col_offset;
              for (int64_t ow = t.cols.lo; ow < t.cols.hi; ++ow) dst[ow * g.stride_w] += row[ow];
            }
          }
        }
      }
    }
  });
}

// grad_input (zero on entry) of a strided convolution: per image and group the
// columns W^T grad_output, folded onto the input.
template <typename T>
void grad_input_col2im(const Tensor& grad_out, const Tensor& w, const Conv2dGeometry& g,
                       Tensor& grad_input) {
  const int64_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const int64_t rows = in_per_group * g.kernel_h * g.kernel_w, plane = g.out_h * g.out_w;
  const Tensor w3 = w.view({g.groups, out_per_group, rows});
  const Tensor go4 = grad_out.view({g.batch, g.groups, out_per_group, plane});
  grad_input.zero_();
  T* gi_data = grad_input.mutable_data_ptr<T>();
  const int64_t scratch_size = sizes::mul(rows, plane, "pyconvext.conv2d_backward", "the columns workspace");
  for_each_image(g.batch, scratch_size, w.options(), [&](int64_t n, Tensor& scratch) {
    Tensor cols = scratch.view({rows, plane});
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      cpu::gemm<T>(w3[grp].t(), go4[n][grp], cols, false);
      col2im_add(cols.const_data_ptr<T>(), in_per_group, 1, 0, g,
                 gi_data + (n * g.in_channels + grp * in_per_group) * g.in_h * g.in_w);
    }
  });
}

// Convolutions with small output planes and many channels (the late layers
// of ResNets) leave the direct kernel's tiles mostly empty. They run as GEMMs
// over the columns of a chunk of images at once: out = W cols,
// grad_weight = grad_out cols^T, grad_input = col2im(W^T grad_out). On
// larger planes the im2col copies cost more than the direct kernel loses, so
// (as measured on ResNet-18's layers) the forward takes this path up to 4x4
// output planes and the backward up to 7x7.
constexpr int64_t kColumnsForwardMaxPlane = 16, kColumnsBackwardMaxPlane = 49;
constexpr int64_t kColumnsMinRows = 64;  // channels x taps of a group
constexpr int64_t kColumnsMaxElements = int64_t(1) << 22;  // per chunk: 16 MB in float32

bool use_columns(const Conv2dGeometry& g, int64_t max_plane) {
  return g.out_h * g.out_w <= max_plane && g.in_per_group() * g.kernel_h * g.kernel_w >= kColumnsMinRows;
}

// Runs body(n0, count, cols) for chunks of images [n0, n0 + count), as many
// per chunk as keep its columns within kColumnsMaxElements; cols is one
// [rows, count * plane] buffer that every chunk reuses.
template <typename Body>
void for_each_column_chunk(const Conv2dGeometry& g, const at::TensorOptions& options, Body body) {
  const int64_t rows = g.in_per_group() * g.kernel_h * g.kernel_w, plane = g.out_h * g.out_w;
  const int64_t per_image = sizes::mul(rows, plane, "pyconvext.conv2d", "the columns workspace");
  const int64_t chunk = std::clamp<int64_t>(kColumnsMaxElements / std::max<int64_t>(per_image, 1), 1, g.batch);
  Tensor cols = at::empty({per_image * chunk}, options);  // chunk > 1 only below kColumnsMaxElements
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t count = std::min(chunk, g.batch - n0);
    body(n0, count, cols.narrow(0, 0, rows * count * plane).view({rows, count * plane}));
  }
}

template <typename T>
void forward_columns(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                     const Conv2dGeometry& g, Tensor& out) {
  const int64_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const int64_t plane = g.out_h * g.out_w, image = g.in_channels * g.in_h * g.in_w;
  const Tensor w3 = w.view({g.groups, out_per_group, -1});
  const Tensor out4 = out.view({g.batch, g.groups, out_per_group, plane});
  for_each_column_chunk(g, x.options(), [&](int64_t n0, int64_t count, Tensor cols) {
    Tensor product = at::empty({out_per_group, count * plane}, x.options());
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      im2col(x.const_data_ptr<T>() + (n0 * g.in_channels + grp * in_per_group) * g.in_h * g.in_w,
             in_per_group, count, image, g, cols.mutable_data_ptr<T>());
      if (bias.has_value()) {
        fill_rows(product.mutable_data_ptr<T>(), out_per_group, count * plane, count * plane,
                  bias->const_data_ptr<T>() + grp * out_per_group);
      }
      cpu::gemm<T>(w3[grp], cols, product, bias.has_value());
      out4.narrow(0, n0, count).select(1, grp).copy_(product.view({out_per_group, count, plane}).transpose(0, 1));
    }
  });
}

// grad_input (zero on entry) and grad_weight (zero on entry); either may be undefined.
template <typename T>
void backward_columns(const Tensor& grad_out, const Tensor& x, const Tensor& w, const Conv2dGeometry& g,
                      Tensor& grad_input, Tensor& grad_weight) {
  const int64_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const int64_t plane = g.out_h * g.out_w, image = g.in_channels * g.in_h * g.in_w;
  const Tensor w3 = w.view({g.groups, out_per_group, -1});
  const Tensor go4 = grad_out.view({g.batch, g.groups, out_per_group, plane});
  for_each_column_chunk(g, x.options(), [&](int64_t n0, int64_t count, Tensor cols) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const int64_t offset = (n0 * g.in_channels + grp * in_per_group) * g.in_h * g.in_w;
      // grad_output of the chunk as [out_per_group, (image, pixel)].
      const Tensor go = go4.narrow(0, n0, count).select(1, grp).transpose(0, 1).reshape({out_per_group, count * plane});
      if (grad_weight.defined()) {
        im2col(x.const_data_ptr<T>() + offset, in_per_group, count, image, g, cols.mutable_data_ptr<T>());
        Tensor gw = grad_weight.view({g.groups, out_per_group, -1})[grp];
        cpu::gemm<T>(go, cols.t(), gw, true);
      }
      if (grad_input.defined()) {
        cpu::gemm<T>(w3[grp].t(), go, cols, false);
        col2im_add(cols.const_data_ptr<T>(), in_per_group, count, image, g,
                   grad_input.mutable_data_ptr<T>() + offset);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Entry points

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
      if (is_pointwise(g)) {
        forward_pointwise<scalar_t>(x, w, b, g, out);
      } else if ((use_columns(g, kColumnsForwardMaxPlane) || !pixel_tiles_fit(g)) && !use_batch_tiles(g)) {
        forward_columns<scalar_t>(x, w, b, g, out);
      } else {
        forward_direct<scalar_t>(x, w, b, g, out);
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
  if (output_mask[0]) grad_input = at::empty(x.sizes(), x.options());
  if (output_mask[1]) grad_weight = at::zeros(w.sizes(), w.options());
  if (output_mask[2]) grad_bias = at::zeros({g.out_channels}, go.options());
  if (g.batch == 0) {
    if (grad_input.defined()) grad_input.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyconvext.conv2d_backward", [&] {
      if (is_pointwise(g)) {
        backward_pointwise<scalar_t>(go, x, w, g, grad_input, grad_weight);
      } else {
        // Each gradient on the first that serves it of: the batch tiles, the
        // columns (small planes, or padding the pixel tiles cannot afford),
        // the direct kernels.
        const bool columns = use_columns(g, kColumnsBackwardMaxPlane) || !pixel_tiles_fit(g) ||
                             (grad_input_is_convolution(g) && !pixel_tiles_fit(grad_input_geometry(g)));
        const bool input_by_batch = grad_input_is_convolution(g) && use_batch_tiles(grad_input_geometry(g));
        Tensor columns_input = columns && !input_by_batch ? grad_input : Tensor();
        const bool weight_by_batch = use_batch_weight_grad(g);
        Tensor columns_weight = columns && !weight_by_batch ? grad_weight : Tensor();
        if (columns_input.defined() || columns_weight.defined()) {
          if (columns_input.defined()) columns_input.zero_();
          backward_columns<scalar_t>(go, x, w, g, columns_input, columns_weight);
        }
        if (grad_weight.defined() && !columns_weight.defined()) {
          if (weight_by_batch) {
            grad_weight_batch_tiles<scalar_t>(go, x, g, grad_weight);
          } else {
            grad_weight_direct<scalar_t>(go, x, g, grad_weight);
          }
        }
        if (grad_input.defined() && !columns_input.defined()) {
          if (grad_input_is_convolution(g)) {
            grad_input_direct<scalar_t>(go, w, g, grad_input);
          } else {
            grad_input_col2im<scalar_t>(go, w, g, grad_input);
          }
        }
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
  if (grad_bias.defined()) {
    grad_bias = finish(grad_bias, grad_output.scalar_type(), at::MemoryFormat::Contiguous, true);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace pyconvext
