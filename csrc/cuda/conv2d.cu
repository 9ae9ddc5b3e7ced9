// CUDA kernels for pyconvext::conv2d and pyconvext::conv2d_backward.
//
// Every pass is an implicit GEMM: the kernel gathers its operand tiles
// straight from the NCHW tensors into shared memory (no im2col buffer), then
// multiplies them with FMA (float32, float64) or with tensor cores through
// WMMA (float16, bfloat16; float32 accumulation):
//
//   pass          M (rows)              N (columns)                      K (reduction)
//   forward       out channel of group  output pixel (n, oh, ow)         (c, i, j)
//   grad_input    in channel of group   input pixel of one stride phase  (k, i, j) of taps that reach it
//   grad_weight   out channel of group  (c, i, j)                        output pixel (n, oh, ow), split
//
// The input gradient is computed per stride phase: input pixels whose
// (ih + pad) mod stride agree are reached by the same kernel taps, so each
// phase is a dense GEMM over just those taps (no multiplications by the zeros
// a strided convolution leaves between output pixels). The weight gradient
// splits its long reduction across blocks and sums the partial products in a
// second, deterministic kernel.
//
// GEMM tiles are badly filled by convolutions with few channels per group
// (depthwise, a first layer with 1 or 3 input channels); direct kernels do
// those: one thread per output element for the forward, one thread per input
// pixel of a stride phase for the input gradient (all of a group's <= 4 input
// channels at once), and sums over output pixels split across blocks for the
// weight gradient (and for every bias gradient).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <type_traits>

#include "common/conv2d.h"

namespace pyconvext {
namespace {

using at::Tensor;

// Division by a divisor fixed for a whole launch, as a multiply and a shift
// (Granlund and Montgomery): integer division costs ~20 instructions on the
// GPU, and the gathers decompose every index. Exact for 0 <= n < 2^31.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 0, shift = 0;

  FastDivmod() = default;
  __host__ __device__ explicit FastDivmod(int d) : divisor(d) {
    if (d > 1) {
      uint32_t ceil_log2 = 0;
      while ((1u << ceil_log2) < divisor) ++ceil_log2;
      multiplier = static_cast<uint32_t>(((1ull << (31 + ceil_log2)) + divisor - 1) / divisor);
      shift = ceil_log2 - 1;
    }
  }
  __device__ int div(int n) const {
    return divisor == 1 ? n : static_cast<int>(__umulhi(static_cast<uint32_t>(n), multiplier) >> shift);
  }
  // Quotient, and n - quotient * divisor in *rem.
  __device__ int divmod(int n, int* rem) const {
    const int q = div(n);
    *rem = n - q * static_cast<int>(divisor);
    return q;
  }
};

// Sizes of one convolution, as 32-bit integers (checked to fit on the host).
struct ConvShape {
  int batch, in_channels, in_h, in_w;
  int out_channels, kernel_h, kernel_w, out_h, out_w;
  int in_per_group, out_per_group, groups;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> load_as_acc(const T* p) {
  return static_cast<acc_t<T>>(*p);
}

// ---------------------------------------------------------------------------
// Four consecutive shared-memory values in as few (16-byte) loads as possible.
__device__ __forceinline__ void load4(const float* p, float (&r)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  r[0] = v.x, r[1] = v.y, r[2] = v.z, r[3] = v.w;
}
__device__ __forceinline__ void load4(const double* p, double (&r)[4]) {
  const double2 v0 = reinterpret_cast<const double2*>(p)[0], v1 = reinterpret_cast<const double2*>(p)[1];
  r[0] = v0.x, r[1] = v0.y, r[2] = v1.x, r[3] = v1.y;
}

// The GEMM kernel. Tiles of BM x BN outputs, BK deep, 256 threads. Each stage
// every thread gathers EA elements of the A tile and EB of the B tile into
// registers (the next stage's, while the current one is multiplied from
// shared memory), at positions fixed by TileConfig so that the problem
// classes below can precompute everything that does not change along K.

constexpr int kThreads = 256;

template <int BM_, int BN_, int BK_, bool kTensorCores_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr bool kTensorCores = kTensorCores_;
  static constexpr int EA = BM * BK / kThreads, EB = BK * BN / kThreads;
  static_assert(kThreads % BK == 0 && kThreads % BN == 0 && EA > 0 && EB > 0, "tile shape");
  // A element q of thread t: row a_row(t) + q * kARowStep, reduction index k0 + a_k(t).
  static constexpr int kARowStep = kThreads / BK;
  __device__ static int a_row(int t) { return t / BK; }
  __device__ static int a_k(int t) { return t % BK; }
  // B element q, gathered along N (pixels contiguous in memory): column
  // b_col(t), reduction index k0 + b_k(t) + q * kBKStep.
  static constexpr int kBKStep = kThreads / BN;
  __device__ static int b_col(int t) { return t % BN; }
  __device__ static int b_k(int t) { return t / BN; }
  // B element q, gathered along K: column bk_col(t) + q * kBKColStep,
  // reduction index k0 + a_k(t).
  static constexpr int kBKColStep = kThreads / BK;
  __device__ static int bk_col(int t) { return t / BK; }
};

// FMA tiles: 64 x 64 (4 x 4 per thread), and wider ones for GEMMs with few
// rows (few channels per group). Tensor-core tiles: the same shapes, 32 deep,
// 16 x 16 x 16 WMMA fragments, 2 per warp.
using SimtTile = TileConfig<64, 64, 16, false>;
using SimtNarrowTile = TileConfig<32, 128, 16, false>;
using SimtTinyTile = TileConfig<16, 256, 16, false>;
using MmaTile = TileConfig<64, 64, 32, true>;
using MmaNarrowTile = TileConfig<32, 128, 32, true>;
using MmaTinyTile = TileConfig<16, 256, 32, true>;

template <typename T>
struct MmaType;
template <>
struct MmaType<c10::Half> {
  using type = __half;
  __device__ static type from_float(float v) { return __float2half_rn(v); }
};
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
  __device__ static type from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T, class Cfg>
struct SharedTiles {
  using Acc = acc_t<T>;
  static constexpr int kPadAcc = 16 / sizeof(Acc);  // keeps 16-byte rows, staggers banks
  struct Simt {
    Acc a[2][Cfg::BK][Cfg::BM + kPadAcc];  // k-major: a thread reads 4 rows at once
    Acc b[2][Cfg::BK][Cfg::BN + kPadAcc];
  };
  struct Epilogue {
    Acc c[Cfg::BM][Cfg::BN + kPadAcc];
  };
  static constexpr size_t kBytes = std::max(sizeof(Simt), sizeof(Epilogue));
};

template <typename T, class Cfg>
struct SharedMmaTiles {
  using E = typename MmaType<T>::type;
  static constexpr int kPad = 8;  // WMMA needs rows in multiples of 16 bytes
  struct Mma {
    E a[2][Cfg::BM][Cfg::BK + kPad];
    E b[2][Cfg::BK][Cfg::BN + kPad];
  };
  struct Epilogue {
    float c[Cfg::BM][Cfg::BN + 4];
  };
  static constexpr size_t kBytes = std::max(sizeof(Mma), sizeof(Epilogue));
};

template <class Problem, class Cfg>
__global__ void __launch_bounds__(kThreads) implicit_gemm_kernel(Problem problem) {
  using T = typename Problem::scalar_t;
  using Acc = acc_t<T>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, EA = Cfg::EA, EB = Cfg::EB;
  const int tid = threadIdx.x;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

  const typename Problem::Block block(problem, blockIdx.z);
  if (m0 >= block.rows || n0 >= block.cols) return;  // the same for the whole block
  typename Problem::template Thread<Cfg> thread(problem, block, m0, n0, tid);

  Acc a_regs[EA], b_regs[EB];
  auto gather = [&](int k0) { thread.load(problem, block, k0, a_regs, b_regs); };

  // WMMA wants 32-byte aligned fragments.
  using AnyTiles = std::conditional_t<Cfg::kTensorCores, SharedMmaTiles<T, Cfg>, SharedTiles<T, Cfg>>;
  __shared__ __align__(128) unsigned char shared[AnyTiles::kBytes];

  if constexpr (!Cfg::kTensorCores) {
    using Tiles = SharedTiles<T, Cfg>;
    auto& tiles = *reinterpret_cast<typename Tiles::Simt*>(shared);
    constexpr int TM = 4, TN = 4, TX = BN / TN;
    static_assert((BM / TM) * TX == kThreads, "thread tile");
    const int tx = tid % TX, ty = tid / TX;
    Acc acc[TM][TN] = {};

    auto stash = [&](int stage) {
#pragma unroll
      for (int q = 0; q < EA; ++q)
        tiles.a[stage][Cfg::a_k(tid)][Cfg::a_row(tid) + q * Cfg::kARowStep] = a_regs[q];
#pragma unroll
      for (int q = 0; q < EB; ++q) {
        if constexpr (Problem::kBAlongK) {
          tiles.b[stage][Cfg::a_k(tid)][Cfg::bk_col(tid) + q * Cfg::kBKColStep] = b_regs[q];
        } else {
          tiles.b[stage][Cfg::b_k(tid) + q * Cfg::kBKStep][Cfg::b_col(tid)] = b_regs[q];
        }
      }
    };

    if (block.k_begin < block.k_end) {
      gather(block.k_begin);
      stash(0);
      __syncthreads();
      int stage = 0;
      for (int k0 = block.k_begin; k0 < block.k_end; k0 += BK, stage ^= 1) {
        const bool more = k0 + BK < block.k_end;
        if (more) gather(k0 + BK);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          Acc a[TM], b[TN];
          load4(&tiles.a[stage][kk][ty * TM], a);
          load4(&tiles.b[stage][kk][tx * TN], b);
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        if (more) stash(stage ^ 1);
        __syncthreads();
      }
    }
    auto& out = *reinterpret_cast<typename Tiles::Epilogue*>(shared);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) out.c[ty * TM + i][tx * TN + j] = acc[i][j];
    __syncthreads();
#pragma unroll 4
    for (int e = tid; e < BM * BN; e += kThreads) {
      const int m = m0 + e / BN, n = n0 + e % BN;
      if (m < block.rows && n < block.cols) problem.store(block, m, n, out.c[e / BN][e % BN]);
    }
  } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    namespace wmma = nvcuda::wmma;
    using Tiles = SharedMmaTiles<T, Cfg>;
    using E = typename Tiles::E;
    auto& tiles = *reinterpret_cast<typename Tiles::Mma*>(shared);
    constexpr int kFragCols = BN / 16, kFragsPerWarp = (BM / 16) * kFragCols / (kThreads / 32);
    static_assert(kFragsPerWarp == 2 && kFragCols % 2 == 0, "two fragments of one row per warp");
    const int warp = tid / 32;
    const int frag_row = (warp * kFragsPerWarp) / kFragCols;
    const int frag_col = (warp * kFragsPerWarp) % kFragCols;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsPerWarp];
#pragma unroll
    for (int f = 0; f < kFragsPerWarp; ++f) wmma::fill_fragment(acc[f], 0.0f);

    auto stash = [&](int stage) {
#pragma unroll
      for (int q = 0; q < EA; ++q)
        tiles.a[stage][Cfg::a_row(tid) + q * Cfg::kARowStep][Cfg::a_k(tid)] =
            MmaType<T>::from_float(a_regs[q]);
#pragma unroll
      for (int q = 0; q < EB; ++q) {
        if constexpr (Problem::kBAlongK) {
          tiles.b[stage][Cfg::a_k(tid)][Cfg::bk_col(tid) + q * Cfg::kBKColStep] =
              MmaType<T>::from_float(b_regs[q]);
        } else {
          tiles.b[stage][Cfg::b_k(tid) + q * Cfg::kBKStep][Cfg::b_col(tid)] =
              MmaType<T>::from_float(b_regs[q]);
        }
      }
    };

    if (block.k_begin < block.k_end) {
      gather(block.k_begin);
      stash(0);
      __syncthreads();
      int stage = 0;
      for (int k0 = block.k_begin; k0 < block.k_end; k0 += BK, stage ^= 1) {
        const bool more = k0 + BK < block.k_end;
        if (more) gather(k0 + BK);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
          wmma::load_matrix_sync(a, &tiles.a[stage][frag_row * 16][kk], BK + Tiles::kPad);
#pragma unroll
          for (int f = 0; f < kFragsPerWarp; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> b;
            wmma::load_matrix_sync(b, &tiles.b[stage][kk][(frag_col + f) * 16], BN + Tiles::kPad);
            wmma::mma_sync(acc[f], a, b, acc[f]);
          }
        }
        if (more) stash(stage ^ 1);
        __syncthreads();
      }
    }
    auto& out = *reinterpret_cast<typename Tiles::Epilogue*>(shared);
#pragma unroll
    for (int f = 0; f < kFragsPerWarp; ++f)
      wmma::store_matrix_sync(&out.c[frag_row * 16][(frag_col + f) * 16], acc[f], BN + 4,
                              wmma::mem_row_major);
    __syncthreads();
#pragma unroll 4
    for (int e = tid; e < BM * BN; e += kThreads) {
      const int m = m0 + e / BN, n = n0 + e % BN;
      if (m < block.rows && n < block.cols) problem.store(block, m, n, out.c[e / BN][e % BN]);
    }
#endif
  }
}

// ---------------------------------------------------------------------------
// The three GEMM problems. Each has a Block (what blockIdx.z selects: group,
// stride phase or reduction split; the GEMM's rows, columns and K range), a
// Thread (the gather positions fixed along K, decomposed once) with load(),
// and store(). Out-of-range elements load as zero in both operands, so a
// zero never meets an inf from outside the problem.

template <typename T>
struct ForwardProblem {
  using scalar_t = T;
  using Acc = acc_t<T>;
  static constexpr bool kBAlongK = false;
  const T* input;
  const T* weight;
  const T* bias;  // or nullptr
  T* output;
  ConvShape s;
  FastDivmod taps, kernel_w, plane, out_w;  // K = (c, i, j); N = (n, oh, ow)

  explicit ForwardProblem(const ConvShape& shape)
      : s(shape),
        taps(shape.kernel_h * shape.kernel_w),
        kernel_w(shape.kernel_w),
        plane(shape.out_h * shape.out_w),
        out_w(shape.out_w) {}

  struct Block {
    int group, rows, cols, k_begin, k_end;
    __device__ Block(const ForwardProblem& p, int z)
        : group(z),
          rows(p.s.out_per_group),
          cols(p.s.batch * p.s.out_h * p.s.out_w),
          k_begin(0),
          k_end(p.s.in_per_group * p.s.kernel_h * p.s.kernel_w) {}
  };

  template <class Cfg>
  struct Thread {
    const T* weight_rows[Cfg::EA];  // nullptr past the last row
    const T* image;                 // this thread's column: first channel of the group
    int ih0, iw0;
    bool column_valid;

    __device__ Thread(const ForwardProblem& p, const Block& b, int m0, int n0, int tid) {
      const int k_size = b.k_end;
#pragma unroll
      for (int q = 0; q < Cfg::EA; ++q) {
        const int m = m0 + Cfg::a_row(tid) + q * Cfg::kARowStep;
        weight_rows[q] = m < b.rows
                             ? p.weight + static_cast<int64_t>(b.group * p.s.out_per_group + m) * k_size
                             : nullptr;
      }
      const int n = n0 + Cfg::b_col(tid);
      column_valid = n < b.cols;
      int pixel, ow;
      const int img = p.plane.divmod(column_valid ? n : 0, &pixel);
      const int oh = p.out_w.divmod(pixel, &ow);
      image = p.input + (static_cast<int64_t>(img) * p.s.in_channels + b.group * p.s.in_per_group) *
                            p.s.in_h * p.s.in_w;
      ih0 = oh * p.s.stride_h - p.s.pad_h;
      iw0 = ow * p.s.stride_w - p.s.pad_w;
    }

    __device__ void load(const ForwardProblem& p, const Block& b, int k0, Acc (&a)[Cfg::EA],
                         Acc (&bv)[Cfg::EB]) const {
      const int ka = k0 + Cfg::a_k(threadIdx.x);
#pragma unroll
      for (int q = 0; q < Cfg::EA; ++q)
        a[q] = weight_rows[q] != nullptr && ka < b.k_end ? load_as_acc(weight_rows[q] + ka) : Acc(0);
#pragma unroll
      for (int q = 0; q < Cfg::EB; ++q) {
        const int k = k0 + Cfg::b_k(threadIdx.x) + q * Cfg::kBKStep;
        int tap, j;
        const int c = p.taps.divmod(k, &tap);
        const int i = p.kernel_w.divmod(tap, &j);
        const int ih = ih0 + i * p.s.dil_h, iw = iw0 + j * p.s.dil_w;
        const bool inside = column_valid && k < b.k_end && ih >= 0 && ih < p.s.in_h && iw >= 0 &&
                            iw < p.s.in_w;
        bv[q] = inside ? load_as_acc(image + (c * p.s.in_h + ih) * p.s.in_w + iw) : Acc(0);
      }
    }
  };

  __device__ void store(const Block& b, int m, int n, Acc value) const {
    const int k = b.group * s.out_per_group + m;
    int pixel;
    const int img = plane.divmod(n, &pixel);
    if (bias != nullptr) value += load_as_acc(bias + k);
    output[(static_cast<int64_t>(img) * s.out_channels + k) * s.out_h * s.out_w + pixel] =
        static_cast<T>(value);
  }
};

// One stride phase along one axis: the input rows ih = first + stride * u
// (u < count) are reached exactly by the kernel taps i = tap0 + tap_step * t
// (t < taps), from output row oh = u + out_base - out_step * t.
struct Phase {
  int first, count, tap0, tap_step, taps, out_base, out_step;

  __device__ Phase(int residue, int size, int kernel, int stride, int pad, int dil) {
    first = ((residue - pad) % stride + stride) % stride;
    count = first < size ? (size - 1 - first) / stride + 1 : 0;
    int a = stride, b = dil;  // gcd
    while (b != 0) {
      const int r = a % b;
      a = b;
      b = r;
    }
    tap_step = stride / a;
    out_step = dil / a;
    tap0 = kernel;  // no tap reaches this phase unless one of the first tap_step does
    for (int i = 0; i < tap_step && i < kernel; ++i) {
      if ((i * dil - residue) % stride == 0) {
        tap0 = i;
        break;
      }
    }
    taps = tap0 < kernel ? (kernel - 1 - tap0) / tap_step + 1 : 0;
    out_base = tap0 < kernel ? (first + pad - tap0 * dil) / stride : 0;
  }
};

template <typename T>
struct GradInputProblem {
  using scalar_t = T;
  using Acc = acc_t<T>;
  static constexpr bool kBAlongK = false;
  const T* grad_output;
  const T* weight;
  T* grad_input;
  ConvShape s;

  explicit GradInputProblem(const ConvShape& shape) : s(shape) {}

  struct Block {
    int group, rows, cols, k_begin, k_end;
    Phase ph, pw;
    FastDivmod taps, taps_w, phase_plane, phase_w;  // K = (k, ti, tj); N = (n, u, v)
    __device__ Block(const GradInputProblem& p, int z)
        : group(z / (p.s.stride_h * p.s.stride_w)),
          ph((z % (p.s.stride_h * p.s.stride_w)) / p.s.stride_w, p.s.in_h, p.s.kernel_h,
             p.s.stride_h, p.s.pad_h, p.s.dil_h),
          pw(z % p.s.stride_w, p.s.in_w, p.s.kernel_w, p.s.stride_w, p.s.pad_w, p.s.dil_w) {
      rows = p.s.in_per_group;
      cols = p.s.batch * ph.count * pw.count;
      k_begin = 0;
      k_end = p.s.out_per_group * ph.taps * pw.taps;
      taps = FastDivmod(std::max(1, ph.taps * pw.taps));
      taps_w = FastDivmod(std::max(1, pw.taps));
      phase_plane = FastDivmod(std::max(1, ph.count * pw.count));
      phase_w = FastDivmod(std::max(1, pw.count));
    }
  };

  template <class Cfg>
  struct Thread {
    const T* grad_image;  // this thread's column: first channel of the group
    int oh_u, ow_v;       // output position of tap (tap0, tap0) for this column
    int m_first;          // row of A element 0
    bool column_valid;

    __device__ Thread(const GradInputProblem& p, const Block& b, int m0, int n0, int tid) {
      m_first = m0 + Cfg::a_row(tid);
      const int n = n0 + Cfg::b_col(tid);
      column_valid = n < b.cols;
      int rest, v;
      const int img = b.phase_plane.divmod(column_valid ? n : 0, &rest);
      const int u = b.phase_w.divmod(rest, &v);
      grad_image = p.grad_output + (static_cast<int64_t>(img) * p.s.out_channels +
                                    b.group * p.s.out_per_group) * p.s.out_h * p.s.out_w;
      oh_u = u + b.ph.out_base;
      ow_v = v + b.pw.out_base;
    }

    __device__ void load(const GradInputProblem& p, const Block& b, int k0, Acc (&a)[Cfg::EA],
                         Acc (&bv)[Cfg::EB]) const {
      {
        const int k = k0 + Cfg::a_k(threadIdx.x);
        int tap, tj;
        const int kout = b.taps.divmod(k, &tap);
        const int ti = b.taps_w.divmod(tap, &tj);
        const int i = b.ph.tap0 + ti * b.ph.tap_step, j = b.pw.tap0 + tj * b.pw.tap_step;
        const T* w = p.weight + ((static_cast<int64_t>(b.group * p.s.out_per_group + kout) *
                                      p.s.in_per_group + m_first) * p.s.kernel_h + i) * p.s.kernel_w + j;
        const int row_stride = Cfg::kARowStep * p.s.kernel_h * p.s.kernel_w;
#pragma unroll
        for (int q = 0; q < Cfg::EA; ++q)
          a[q] = k < b.k_end && m_first + q * Cfg::kARowStep < b.rows
                     ? load_as_acc(w + q * row_stride) : Acc(0);
      }
#pragma unroll
      for (int q = 0; q < Cfg::EB; ++q) {
        const int k = k0 + Cfg::b_k(threadIdx.x) + q * Cfg::kBKStep;
        int tap, tj;
        const int kout = b.taps.divmod(k, &tap);
        const int ti = b.taps_w.divmod(tap, &tj);
        const int oh = oh_u - ti * b.ph.out_step, ow = ow_v - tj * b.pw.out_step;
        const bool inside = column_valid && k < b.k_end && oh >= 0 && oh < p.s.out_h && ow >= 0 &&
                            ow < p.s.out_w;
        bv[q] = inside ? load_as_acc(grad_image + (kout * p.s.out_h + oh) * p.s.out_w + ow) : Acc(0);
      }
    }
  };

  __device__ void store(const Block& b, int m, int n, Acc value) const {
    int rest, v;
    const int img = b.phase_plane.divmod(n, &rest);
    const int u = b.phase_w.divmod(rest, &v);
    const int ih = b.ph.first + u * s.stride_h, iw = b.pw.first + v * s.stride_w;
    grad_input[((static_cast<int64_t>(img) * s.in_channels + b.group * s.in_per_group + m) * s.in_h +
                ih) * s.in_w + iw] = static_cast<T>(value);
  }
};

// The input gradient of a convolution with few input channels per group and
// many output channels, first pass: columns[g][(c, i, j)][(n, oh, ow)] = the
// sum over the group's output channels k of weight[k, c, i, j] *
// grad_output[n, k, oh, ow], a well-shaped GEMM (Cg * kH * kW rows) where the
// phase GEMM would have only Cg rows. col2im_kernel then adds up each input
// pixel's columns.
template <typename T>
struct ColumnsProblem {
  using scalar_t = T;
  using Acc = acc_t<T>;
  static constexpr bool kBAlongK = false;
  const T* grad_output;
  const T* weight;
  Acc* columns;  // [groups][in_per_group * kH * kW][batch * out_h * out_w]
  ConvShape s;
  FastDivmod plane;

  explicit ColumnsProblem(const ConvShape& shape) : s(shape), plane(shape.out_h * shape.out_w) {}

  struct Block {
    int group, rows, cols, k_begin, k_end;
    __device__ Block(const ColumnsProblem& p, int z)
        : group(z),
          rows(p.s.in_per_group * p.s.kernel_h * p.s.kernel_w),
          cols(p.s.batch * p.s.out_h * p.s.out_w),
          k_begin(0),
          k_end(p.s.out_per_group) {}
  };

  template <class Cfg>
  struct Thread {
    const T* grad_column;  // this thread's column, first output channel of the group
    int m_first;           // row of A element 0
    bool column_valid;

    __device__ Thread(const ColumnsProblem& p, const Block& b, int m0, int n0, int tid) {
      m_first = m0 + Cfg::a_row(tid);
      const int n = n0 + Cfg::b_col(tid);
      column_valid = n < b.cols;
      int pixel;
      const int img = p.plane.divmod(column_valid ? n : 0, &pixel);
      grad_column = p.grad_output + (static_cast<int64_t>(img) * p.s.out_channels +
                                     b.group * p.s.out_per_group) * p.s.out_h * p.s.out_w + pixel;
    }

    __device__ void load(const ColumnsProblem& p, const Block& b, int k0, Acc (&a)[Cfg::EA],
                         Acc (&bv)[Cfg::EB]) const {
      const int ka = k0 + Cfg::a_k(threadIdx.x);
      const T* w = p.weight + static_cast<int64_t>(b.group * p.s.out_per_group + ka) * b.rows;
#pragma unroll
      for (int q = 0; q < Cfg::EA; ++q) {
        const int m = m_first + q * Cfg::kARowStep;
        a[q] = ka < b.k_end && m < b.rows ? load_as_acc(w + m) : Acc(0);
      }
      const int plane_size = p.s.out_h * p.s.out_w;
#pragma unroll
      for (int q = 0; q < Cfg::EB; ++q) {
        const int k = k0 + Cfg::b_k(threadIdx.x) + q * Cfg::kBKStep;
        bv[q] = column_valid && k < b.k_end ? load_as_acc(grad_column + k * plane_size) : Acc(0);
      }
    }
  };

  __device__ void store(const Block& b, int m, int n, Acc value) const {
    columns[(static_cast<int64_t>(b.group) * b.rows + m) * b.cols + n] = value;
  }
};

template <typename T>
struct GradWeightProblem {
  using scalar_t = T;
  using Acc = acc_t<T>;
  static constexpr bool kBAlongK = true;
  const T* grad_output;
  const T* input;
  Acc* partial;  // [groups][splits][out_per_group][in_per_group * kH * kW]
  ConvShape s;
  int splits, split_size;                   // reduction indices per split (a multiple of BK)
  FastDivmod plane, out_w, taps, kernel_w;  // K = (n, oh, ow); N = (c, i, j)

  GradWeightProblem(const ConvShape& shape, int splits_, int split_size_)
      : s(shape),
        splits(splits_),
        split_size(split_size_),
        plane(shape.out_h * shape.out_w),
        out_w(shape.out_w),
        taps(shape.kernel_h * shape.kernel_w),
        kernel_w(shape.kernel_w) {}

  struct Block {
    int group, split, rows, cols, k_begin, k_end;
    __device__ Block(const GradWeightProblem& p, int z)
        : group(z / p.splits),
          split(z % p.splits),
          rows(p.s.out_per_group),
          cols(p.s.in_per_group * p.s.kernel_h * p.s.kernel_w),
          k_begin(split * p.split_size),
          k_end(std::min(p.s.batch * p.s.out_h * p.s.out_w, (split + 1) * p.split_size)) {}
  };

  template <class Cfg>
  struct Thread {
    int row_offset[Cfg::EA];  // grad_output channel offsets; -1 past the last row
    int col_offset[Cfg::EB];  // input channel offsets; -1 past the last column
    int col_ih[Cfg::EB], col_iw[Cfg::EB];

    __device__ Thread(const GradWeightProblem& p, const Block& b, int m0, int n0, int tid) {
      const int plane_size = p.s.out_h * p.s.out_w;
#pragma unroll
      for (int q = 0; q < Cfg::EA; ++q) {
        const int m = m0 + Cfg::a_row(tid) + q * Cfg::kARowStep;
        row_offset[q] = m < b.rows ? (b.group * p.s.out_per_group + m) * plane_size : -1;
      }
#pragma unroll
      for (int q = 0; q < Cfg::EB; ++q) {
        const int n = n0 + Cfg::bk_col(tid) + q * Cfg::kBKColStep;
        int tap, j;
        const int c = p.taps.divmod(n < b.cols ? n : 0, &tap);
        const int i = p.kernel_w.divmod(tap, &j);
        col_offset[q] = n < b.cols ? (b.group * p.s.in_per_group + c) * p.s.in_h * p.s.in_w : -1;
        col_ih[q] = i * p.s.dil_h - p.s.pad_h;
        col_iw[q] = j * p.s.dil_w - p.s.pad_w;
      }
    }

    __device__ void load(const GradWeightProblem& p, const Block& b, int k0, Acc (&a)[Cfg::EA],
                         Acc (&bv)[Cfg::EB]) const {
      const int k = k0 + Cfg::a_k(threadIdx.x);
      const bool k_valid = k < b.k_end;
      int pixel, ow;
      const int img = p.plane.divmod(k_valid ? k : 0, &pixel);
      const int oh = p.out_w.divmod(pixel, &ow);
      const T* grad_image = p.grad_output + static_cast<int64_t>(img) * p.s.out_channels * p.s.out_h * p.s.out_w + pixel;
      const T* image = p.input + static_cast<int64_t>(img) * p.s.in_channels * p.s.in_h * p.s.in_w;
#pragma unroll
      for (int q = 0; q < Cfg::EA; ++q)
        a[q] = k_valid && row_offset[q] >= 0 ? load_as_acc(grad_image + row_offset[q]) : Acc(0);
      const int ih0 = oh * p.s.stride_h, iw0 = ow * p.s.stride_w;
#pragma unroll
      for (int q = 0; q < Cfg::EB; ++q) {
        const int ih = ih0 + col_ih[q], iw = iw0 + col_iw[q];
        const bool inside = k_valid && col_offset[q] >= 0 && ih >= 0 && ih < p.s.in_h && iw >= 0 &&
                            iw < p.s.in_w;
        bv[q] = inside ? load_as_acc(image + col_offset[q] + ih * p.s.in_w + iw) : Acc(0);
      }
    }
  };

  __device__ void store(const Block& b, int m, int n, Acc value) const {
    partial[(static_cast<int64_t>(b.group * splits + b.split) * b.rows + m) * b.cols + n] = value;
  }
};

// grad_weight[g, m, n] = the sum over splits of partial[g, split, m, n].
template <typename T>
__global__ void sum_splits_kernel(const acc_t<T>* partial, int splits, int64_t per_group,
                                  int64_t total, T* grad_weight) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t group = e / per_group, rest = e % per_group;
    const acc_t<T>* src = partial + group * splits * per_group + rest;
    acc_t<T> sum = 0;
    for (int split = 0; split < splits; ++split) sum += src[split * per_group];
    grad_weight[e] = static_cast<T>(sum);
  }
}

// ---------------------------------------------------------------------------
// Direct kernels, for few channels per group.

template <typename Acc>
__device__ Acc block_sum(Acc value) {
  __shared__ Acc warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  value = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : Acc(0);
  if (threadIdx.x < 32) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // in thread 0
}

// One thread per output element.
template <typename T>
__global__ void forward_direct_kernel(const T* input, const T* weight, const T* bias, T* output,
                                      ConvShape s, FastDivmod out_w, FastDivmod out_h,
                                      FastDivmod channels, int64_t total) {
  using Acc = acc_t<T>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    int ow, oh, k;
    const int rest = out_w.divmod(static_cast<int>(e), &ow);
    const int img = channels.divmod(out_h.divmod(rest, &oh), &k);
    const int group = k / s.out_per_group;
    Acc sum = bias != nullptr ? load_as_acc(bias + k) : Acc(0);
    const T* x = input + (static_cast<int64_t>(img) * s.in_channels + group * s.in_per_group) * s.in_h * s.in_w;
    const T* w = weight + static_cast<int64_t>(k) * s.in_per_group * s.kernel_h * s.kernel_w;
    for (int c = 0; c < s.in_per_group; ++c) {
      for (int i = 0; i < s.kernel_h; ++i) {
        const int ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
        if (ih < 0 || ih >= s.in_h) continue;
        for (int j = 0; j < s.kernel_w; ++j) {
          const int iw = ow * s.stride_w - s.pad_w + j * s.dil_w;
          if (iw < 0 || iw >= s.in_w) continue;
          sum += load_as_acc(x + (c * s.in_h + ih) * s.in_w + iw) *
                 load_as_acc(w + (c * s.kernel_h + i) * s.kernel_w + j);
        }
      }
    }
    output[e] = static_cast<T>(sum);
  }
}

// One thread per input pixel of one stride phase (blockIdx.y) of one group
// (blockIdx.z), for all of the group's (at most kMaxDirectChannels) input
// channels. The threads of a warp share their phase, hence the taps that
// reach them: weight loads are uniform across the warp and grad_output loads
// coalesced, and no thread visits a tap that skips its pixel.
constexpr int kMaxDirectChannels = 4;

template <typename T>
__global__ void grad_input_direct_kernel(const T* grad_output, const T* weight, T* grad_input,
                                         ConvShape s) {
  using Acc = acc_t<T>;
  const int group = blockIdx.z;
  const Phase ph(blockIdx.y / s.stride_w, s.in_h, s.kernel_h, s.stride_h, s.pad_h, s.dil_h);
  const Phase pw(blockIdx.y % s.stride_w, s.in_w, s.kernel_w, s.stride_w, s.pad_w, s.dil_w);
  const int pixels = ph.count * pw.count;
  const int n = blockIdx.x * kThreads + threadIdx.x;
  if (n >= s.batch * pixels) return;
  const int img = n / pixels, rest = n % pixels;
  const int u = rest / pw.count, v = rest % pw.count;
  Acc sum[kMaxDirectChannels] = {};
  for (int kk = 0; kk < s.out_per_group; ++kk) {
    const int k = group * s.out_per_group + kk;
    const T* go = grad_output + (static_cast<int64_t>(img) * s.out_channels + k) * s.out_h * s.out_w;
    const T* w = weight + static_cast<int64_t>(k) * s.in_per_group * s.kernel_h * s.kernel_w;
    for (int ti = 0; ti < ph.taps; ++ti) {
      const int oh = u + ph.out_base - ti * ph.out_step;
      if (oh < 0 || oh >= s.out_h) continue;
      const int i = ph.tap0 + ti * ph.tap_step;
      for (int tj = 0; tj < pw.taps; ++tj) {
        const int ow = v + pw.out_base - tj * pw.out_step;
        if (ow < 0 || ow >= s.out_w) continue;
        const int j = pw.tap0 + tj * pw.tap_step;
        const Acc g = load_as_acc(go + oh * s.out_w + ow);
#pragma unroll
        for (int c = 0; c < kMaxDirectChannels; ++c) {
          if (c < s.in_per_group) sum[c] += g * load_as_acc(w + (c * s.kernel_h + i) * s.kernel_w + j);
        }
      }
    }
  }
  const int ih = ph.first + u * s.stride_h, iw = pw.first + v * s.stride_w;
#pragma unroll
  for (int c = 0; c < kMaxDirectChannels; ++c) {
    if (c < s.in_per_group) {
      grad_input[((static_cast<int64_t>(img) * s.in_channels + group * s.in_per_group + c) * s.in_h + ih) *
                     s.in_w + iw] = static_cast<T>(sum[c]);
    }
  }
}

// Second pass of ColumnsProblem: one thread per input pixel of one stride
// phase (blockIdx.y) of one group (blockIdx.z), all of the group's input
// channels, adding the columns of the taps that reach the pixel.
template <typename T>
__global__ void col2im_kernel(const acc_t<T>* columns, T* grad_input, ConvShape s) {
  using Acc = acc_t<T>;
  const int group = blockIdx.z;
  const Phase ph(blockIdx.y / s.stride_w, s.in_h, s.kernel_h, s.stride_h, s.pad_h, s.dil_h);
  const Phase pw(blockIdx.y % s.stride_w, s.in_w, s.kernel_w, s.stride_w, s.pad_w, s.dil_w);
  const int pixels = ph.count * pw.count;
  const int n = blockIdx.x * kThreads + threadIdx.x;
  if (n >= s.batch * pixels) return;
  const int img = n / pixels, rest = n % pixels;
  const int u = rest / pw.count, v = rest % pw.count;
  const int taps = s.kernel_h * s.kernel_w;
  const int64_t cols = static_cast<int64_t>(s.batch) * s.out_h * s.out_w;
  const Acc* image_columns = columns + static_cast<int64_t>(group) * s.in_per_group * taps * cols +
                             static_cast<int64_t>(img) * s.out_h * s.out_w;
  Acc sum[kMaxDirectChannels] = {};
  for (int ti = 0; ti < ph.taps; ++ti) {
    const int oh = u + ph.out_base - ti * ph.out_step;
    if (oh < 0 || oh >= s.out_h) continue;
    const int i = ph.tap0 + ti * ph.tap_step;
    for (int tj = 0; tj < pw.taps; ++tj) {
      const int ow = v + pw.out_base - tj * pw.out_step;
      if (ow < 0 || ow >= s.out_w) continue;
      const int j = pw.tap0 + tj * pw.tap_step;
      const Acc* column = image_columns + (i * s.kernel_w + j) * cols + oh * s.out_w + ow;
#pragma unroll
      for (int c = 0; c < kMaxDirectChannels; ++c) {
        if (c < s.in_per_group) sum[c] += column[c * taps * cols];
      }
    }
  }
  const int ih = ph.first + u * s.stride_h, iw = pw.first + v * s.stride_w;
#pragma unroll
  for (int c = 0; c < kMaxDirectChannels; ++c) {
    if (c < s.in_per_group) {
      grad_input[((static_cast<int64_t>(img) * s.in_channels + group * s.in_per_group + c) * s.in_h + ih) *
                     s.in_w + iw] = static_cast<T>(sum[c]);
    }
  }
}

// Sums over the output pixels (n, oh, ow) in split blockIdx.y of the reduction:
// for the bias, of grad_output[n, e, oh, ow] for channel e = blockIdx.x; for
// the weight, of grad_output * input under weight element e = blockIdx.x.
// Writes partial[split][e]; sum_splits_kernel adds the splits.
template <typename T, bool kBias>
__global__ void pixel_sum_kernel(const T* grad_output, const T* input, acc_t<T>* partial,
                                 ConvShape s, FastDivmod plane, FastDivmod out_w, int split_size) {
  using Acc = acc_t<T>;
  const int e = blockIdx.x;
  int k = e, in_channel = 0, i = 0, j = 0;
  if constexpr (!kBias) {
    j = e % s.kernel_w;
    i = (e / s.kernel_w) % s.kernel_h;
    const int c = (e / (s.kernel_w * s.kernel_h)) % s.in_per_group;
    k = e / (s.kernel_w * s.kernel_h * s.in_per_group);
    in_channel = (k / s.out_per_group) * s.in_per_group + c;
  }
  const int total = s.batch * s.out_h * s.out_w;
  const int begin = blockIdx.y * split_size, end = min(total, begin + split_size);
  Acc sum = 0;
  for (int p = begin + threadIdx.x; p < end; p += kThreads) {
    int pixel;
    const int img = plane.divmod(p, &pixel);
    const Acc g = load_as_acc(grad_output + (static_cast<int64_t>(img) * s.out_channels + k) * s.out_h * s.out_w + pixel);
    if constexpr (kBias) {
      sum += g;
    } else {
      int ow;
      const int oh = out_w.divmod(pixel, &ow);
      const int ih = oh * s.stride_h - s.pad_h + i * s.dil_h;
      const int iw = ow * s.stride_w - s.pad_w + j * s.dil_w;
      if (ih >= 0 && ih < s.in_h && iw >= 0 && iw < s.in_w) {
        sum += g * load_as_acc(input + ((static_cast<int64_t>(img) * s.in_channels + in_channel) * s.in_h + ih) *
                                           s.in_w + iw);
      }
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + e] = sum;
}

// ---------------------------------------------------------------------------
// Host side

// A group with this few (in x out) channel pairs leaves most of a GEMM tile
// empty: the forward and the weight gradient take the direct kernels.
bool use_direct(const ConvShape& s) { return s.in_per_group * s.out_per_group <= 16; }

// The input gradient's phase GEMM has one row per input channel of a group:
// with few of them, the direct kernel, or for many output channels the
// columns GEMM (ColumnsProblem) and col2im.
bool grad_input_direct(const ConvShape& s) {
  return s.in_per_group <= kMaxDirectChannels && s.out_per_group < 8;
}
bool grad_input_columns(const ConvShape& s) {
  return s.in_per_group <= kMaxDirectChannels && s.out_per_group >= 8;
}

ConvShape to_shape(const Conv2dGeometry& g, const char* op, std::initializer_list<const Tensor*> tensors) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  for (const Tensor* t : tensors) {
    TORCH_CHECK(t->numel() <= kMax, op, ": the CUDA kernels index tensors with 32-bit integers, "
                "but got a tensor of size ", t->sizes(), " (", t->numel(), " elements, more than 2^31 - 1)");
  }
  TORCH_CHECK(g.batch * g.out_channels * g.out_h * g.out_w <= kMax &&
                  g.out_channels * g.in_per_group() * g.kernel_h * g.kernel_w <= kMax,
              op, ": the CUDA kernels index tensors with 32-bit integers, but the output of size [",
              g.batch, ", ", g.out_channels, ", ", g.out_h, ", ", g.out_w, "] has more than 2^31 - 1 elements");
  // Every index the kernels form stays inside the padded input.
  TORCH_CHECK(g.padded_h <= kMax && g.padded_w <= kMax, op,
              ": the CUDA kernels index with 32-bit integers, but the padded input is ", g.padded_h, "x",
              g.padded_w, " (padding=[", g.pad_h, ", ", g.pad_w, "])");
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  return {i(g.batch), i(g.in_channels), i(g.in_h), i(g.in_w), i(g.out_channels), i(g.kernel_h),
          i(g.kernel_w), i(g.out_h), i(g.out_w), i(g.in_per_group()), i(g.out_per_group()),
          i(g.groups), i(g.stride_h), i(g.stride_w), i(g.pad_h), i(g.pad_w), i(g.dil_h), i(g.dil_w)};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int grid_for(int64_t elements) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(elements, kThreads), sms * 32)));
}

template <typename T>
constexpr bool kHasTensorCorePath = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// Calls f with the tile for a GEMM of `rows` rows in dtype T. (The widest
// float64 tile would not fit in 48 KB of shared memory.)
template <typename T, class F>
void with_tile(int64_t rows, F f) {
  if constexpr (kHasTensorCorePath<T>) {
    rows <= 16 ? f(MmaTinyTile{}) : rows <= 32 ? f(MmaNarrowTile{}) : f(MmaTile{});
  } else if constexpr (std::is_same_v<T, float>) {
    rows <= 16 ? f(SimtTinyTile{}) : rows <= 32 ? f(SimtNarrowTile{}) : f(SimtTile{});
  } else {
    rows <= 32 ? f(SimtNarrowTile{}) : f(SimtTile{});
  }
}

// Launches problem over rows x cols per blockIdx.z.
template <class Cfg, template <typename> class Problem, typename T>
void launch_gemm(const Problem<T>& problem, int64_t rows, int64_t cols, int64_t z) {
  TORCH_CHECK(z <= 65535, "pyconvext.conv2d: too many groups for the CUDA kernels (", z,
              " GEMM problems, at most 65535)");
  const dim3 grid(ceil_div(cols, Cfg::BN), ceil_div(rows, Cfg::BM), z);
  implicit_gemm_kernel<Problem<T>, Cfg><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(problem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_device_supports(const Tensor& t, const char* op) {
  if (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) {
    const auto* props = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK_NOT_IMPLEMENTED(props->major >= 8, op, ": float16 and bfloat16 need a GPU of compute capability 8.0 or newer, but ",
                                props->name, " has ", props->major, ".", props->minor);
  }
}

Tensor batched_contiguous(const Tensor& t, bool batched) {
  return (batched ? t : t.unsqueeze(0)).contiguous();
}

// A result in the layout and batchedness native returns.
Tensor finish(const Tensor& result, at::MemoryFormat format, bool batched) {
  const Tensor out = result.is_contiguous(format) ? result : result.contiguous(format);
  return batched ? out : out.squeeze(0);
}

Tensor conv2d_cuda(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                   int64_t groups) {
  constexpr const char* op = "pyconvext.conv2d";
  const Conv2dGeometry g = check_conv2d(input, weight, bias, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard device_guard(input.device());
  check_device_supports(input, op);
  const ConvShape s = to_shape(g, op, {&input, &weight});
  const Tensor x = batched_contiguous(input, g.batched);
  const Tensor w = weight.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  Tensor out = at::empty(g.output_sizes(), x.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      const scalar_t* bias_data = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
      if (use_direct(s)) {
        forward_direct_kernel<scalar_t><<<grid_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bias_data,
            out.mutable_data_ptr<scalar_t>(), s, FastDivmod(s.out_w), FastDivmod(s.out_h),
            FastDivmod(s.out_channels), out.numel());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        ForwardProblem<scalar_t> problem(s);
        problem.input = x.const_data_ptr<scalar_t>();
        problem.weight = w.const_data_ptr<scalar_t>();
        problem.bias = bias_data;
        problem.output = out.mutable_data_ptr<scalar_t>();
        with_tile<scalar_t>(s.out_per_group, [&](auto tile) {
          launch_gemm<decltype(tile)>(problem, s.out_per_group, int64_t(s.batch) * s.out_h * s.out_w, s.groups);
        });
      }
    });
  }
  return finish(out, g.memory_format, g.batched);
}

// Reduction splits for the weight gradient: enough blocks to fill the GPU
// twice, each split at least 4 tiles deep (a block's few stages are
// latency-bound, so small problems gain from many short splits).
std::pair<int, int> weight_grad_splits(const ConvShape& s, int bk, int bm, int bn) {
  const int64_t reduction = int64_t(s.batch) * s.out_h * s.out_w;
  const int64_t tiles = ceil_div(s.out_per_group, bm) *
                        ceil_div(int64_t(s.in_per_group) * s.kernel_h * s.kernel_w, bn) * s.groups;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t max_splits = std::max<int64_t>(1, reduction / (4 * bk));
  const int64_t wanted = std::clamp<int64_t>(ceil_div(2 * sms, tiles), 1, max_splits);
  const int64_t split_size = ceil_div(ceil_div(reduction, wanted), bk) * bk;
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(reduction, split_size), 65535 / s.groups));
  return {static_cast<int>(splits), static_cast<int>(ceil_div(reduction, splits * bk) * bk)};
}

// Sums over all output pixels (pixel_sum_kernel), in enough blocks that each
// thread adds about 8 pixels: the bias gradient, or the weight gradient of a
// direct convolution.
template <typename T, bool kBias>
void pixel_sum(const Tensor& go, const Tensor& x, const ConvShape& s, Tensor& result) {
  using Acc = acc_t<T>;
  const int64_t total = int64_t(s.batch) * s.out_h * s.out_w;
  const int64_t splits = std::clamp<int64_t>(ceil_div(total, 8 * kThreads), 1, 65535);
  const int split_size = static_cast<int>(ceil_div(total, splits));
  const int64_t numel = result.numel();
  Tensor partial = at::empty({splits * numel}, go.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  const auto stream = at::cuda::getCurrentCUDAStream();
  pixel_sum_kernel<T, kBias><<<dim3(numel, splits), kThreads, 0, stream>>>(
      go.const_data_ptr<T>(), kBias ? nullptr : x.const_data_ptr<T>(), partial.mutable_data_ptr<Acc>(),
      s, FastDivmod(s.out_h * s.out_w), FastDivmod(s.out_w), split_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_splits_kernel<T><<<grid_for(numel), kThreads, 0, stream>>>(
      partial.const_data_ptr<Acc>(), splits, numel, numel, result.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The columns GEMM and col2im, a chunk of images at a time so that the
// columns take at most 2^24 elements (or one image's worth).
template <typename T>
void grad_input_by_columns(const Tensor& go, const Tensor& w, const ConvShape& s, Tensor& grad_input) {
  using Acc = acc_t<T>;
  const int64_t rows = int64_t(s.in_per_group) * s.kernel_h * s.kernel_w;
  const int64_t per_image = rows * s.groups * s.out_h * s.out_w;
  const int chunk = static_cast<int>(std::clamp<int64_t>((int64_t(1) << 24) / per_image, 1, s.batch));
  Tensor columns = at::empty({chunk * per_image}, go.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int img0 = 0; img0 < s.batch; img0 += chunk) {
    ConvShape part = s;
    part.batch = std::min(chunk, s.batch - img0);
    ColumnsProblem<T> problem(part);
    problem.grad_output = go.const_data_ptr<T>() + int64_t(img0) * s.out_channels * s.out_h * s.out_w;
    problem.weight = w.const_data_ptr<T>();
    problem.columns = columns.mutable_data_ptr<Acc>();
    with_tile<T>(rows, [&](auto tile) {
      launch_gemm<decltype(tile)>(problem, rows, int64_t(part.batch) * s.out_h * s.out_w, s.groups);
    });
    const int64_t phase_pixels = int64_t(part.batch) * ceil_div(s.in_h, s.stride_h) * ceil_div(s.in_w, s.stride_w);
    col2im_kernel<T><<<dim3(ceil_div(phase_pixels, kThreads), s.stride_h * s.stride_w, s.groups), kThreads, 0, stream>>>(
        columns.const_data_ptr<Acc>(),
        grad_input.mutable_data_ptr<T>() + int64_t(img0) * s.in_channels * s.in_h * s.in_w, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void grad_weight_gemm(const Tensor& go, const Tensor& x, const ConvShape& s, Tensor& grad_weight) {
  using Acc = acc_t<T>;
  with_tile<T>(s.out_per_group, [&](auto tile) {
    using Cfg = decltype(tile);
    const auto [splits, split_size] = weight_grad_splits(s, Cfg::BK, Cfg::BM, Cfg::BN);
    const int64_t per_group = int64_t(s.out_per_group) * s.in_per_group * s.kernel_h * s.kernel_w;
    Tensor partial = at::empty({s.groups * splits * per_group},
                               go.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    GradWeightProblem<T> problem(s, splits, split_size);
    problem.grad_output = go.const_data_ptr<T>();
    problem.input = x.const_data_ptr<T>();
    problem.partial = partial.mutable_data_ptr<Acc>();
    launch_gemm<Cfg>(problem, s.out_per_group, int64_t(s.in_per_group) * s.kernel_h * s.kernel_w,
                     int64_t(s.groups) * splits);
    sum_splits_kernel<T><<<grid_for(grad_weight.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        partial.const_data_ptr<Acc>(), splits, per_group, grad_weight.numel(),
        grad_weight.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "pyconvext.conv2d_backward";
  const Conv2dGeometry g =
      check_conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard device_guard(input.device());
  check_device_supports(input, op);
  const ConvShape s = to_shape(g, op, {&grad_output, &input, &weight});
  const Tensor go = batched_contiguous(grad_output, g.batched);
  const Tensor x = batched_contiguous(input, g.batched);
  const Tensor w = weight.contiguous();
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = at::empty(x.sizes(), x.options());
  if (output_mask[1]) grad_weight = at::empty(w.sizes(), w.options());
  if (output_mask[2]) grad_bias = at::empty({g.out_channels}, go.options());
  const bool no_pixels = go.numel() == 0;  // N = 0 (out_channels > 0 is checked)
  if (no_pixels) {
    for (Tensor* t : {&grad_input, &grad_weight, &grad_bias})
      if (t->defined()) t->zero_();
  } else {
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      if (grad_input.defined() && grad_input.numel() > 0) {
        // Columns: the pixels of the largest stride phase.
        const int64_t cols = int64_t(s.batch) * ceil_div(s.in_h, s.stride_h) * ceil_div(s.in_w, s.stride_w);
        if (grad_input_direct(s) || grad_input_columns(s)) {
          TORCH_CHECK(int64_t(s.stride_h) * s.stride_w <= 65535 && s.groups <= 65535, op,
                      ": the CUDA kernels support at most 65535 stride phases and groups, but got stride [",
                      s.stride_h, ", ", s.stride_w, "] and ", s.groups, " groups");
        }
        if (grad_input_columns(s)) {
          grad_input_by_columns<scalar_t>(go, w, s, grad_input);
        } else if (grad_input_direct(s)) {
          const dim3 grid(ceil_div(cols, kThreads), s.stride_h * s.stride_w, s.groups);
          grad_input_direct_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
              go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
              grad_input.mutable_data_ptr<scalar_t>(), s);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          GradInputProblem<scalar_t> problem(s);
          problem.grad_output = go.const_data_ptr<scalar_t>();
          problem.weight = w.const_data_ptr<scalar_t>();
          problem.grad_input = grad_input.mutable_data_ptr<scalar_t>();
          with_tile<scalar_t>(s.in_per_group, [&](auto tile) {
            launch_gemm<decltype(tile)>(problem, s.in_per_group, cols, int64_t(s.groups) * s.stride_h * s.stride_w);
          });
        }
      }
      if (grad_weight.defined() && grad_weight.numel() > 0) {
        if (use_direct(s)) {
          pixel_sum<scalar_t, false>(go, x, s, grad_weight);
        } else {
          grad_weight_gemm<scalar_t>(go, x, s, grad_weight);
        }
      }
      if (grad_bias.defined()) pixel_sum<scalar_t, true>(go, x, s, grad_bias);
    });
  }
  if (grad_input.defined()) grad_input = finish(grad_input, g.memory_format, g.batched);
  if (grad_weight.defined()) grad_weight = finish(grad_weight, g.memory_format, true);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, CUDA, m) {
  m.impl("conv2d", &conv2d_cuda);
  m.impl("conv2d_backward", &conv2d_backward_cuda);
}

}  // namespace pyconvext
