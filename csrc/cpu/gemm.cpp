// Drivers of our GEMM (cpu/gemm.h): depth blocks of kDepthBlock rows of B,
// chunks of B's panels that stay in a core's L2 cache while A's slivers run
// over them, and the split among threads.

#include "cpu/gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/simd.h"

namespace pyconvext::cpu {
namespace {

#define PYCONVEXT_ISA_KERNELS "cpu/gemm_kernels.h"
#include "cpu/per_isa.h"

constexpr int64_t kDepthBlock = PackedMatrix<float>::kDepthBlock;
constexpr int64_t kTileRowsMax = 8;  // at least any ISA's kTileRows
// Packed panels of one depth block that a thread keeps in its L2 cache.
constexpr int64_t kChunkBytes = 512 * 1024;

template <typename T>
int64_t chunk_panels(int64_t width) {
  return std::max<int64_t>(1, kChunkBytes / (kDepthBlock * width * static_cast<int64_t>(sizeof(T))));
}

}  // namespace

template <typename T>
int64_t gemm_panel_width() {
  PYCONVEXT_ISA_CALL(panel_width<T>);
}

namespace {

template <typename T>
void pack_b_panel_isa(const MatrixView<T>& b, int64_t k0, int64_t depth, int64_t j0, int64_t count,
                      const int64_t* order, T* panel) {
  PYCONVEXT_ISA_CALL(pack_b_panel, b, k0, depth, j0, count, order, panel);
}

template <typename T>
void gemm_block_isa(int64_t m, const MatrixView<T>& a, int64_t k0, int64_t depth, const T* panels,
                    int64_t panel_begin, int64_t panel_end, int64_t n, T* c, int64_t ldc,
                    bool accumulate, T* sliver) {
  PYCONVEXT_ISA_CALL(gemm_block, m, a, k0, depth, panels, panel_begin, panel_end, n, c, ldc,
                     accumulate, sliver);
}

// A per-thread packing buffer of at least `count` elements, kept between
// calls (the pool's threads live on).
template <typename T>
T* thread_buffer(int slot, int64_t count) {
  static thread_local std::vector<T> buffers[2];
  std::vector<T>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// Rows [0, m) and panels [panel_begin, panel_end) of C = A B, packing B's
// panels chunk by chunk on this thread.
template <typename T>
void gemm_panels(int64_t m, int64_t n, int64_t k, const MatrixView<T>& a, const MatrixView<T>& b,
                 T* c, int64_t ldc, bool accumulate, int64_t panel_begin, int64_t panel_end) {
  const int64_t width = gemm_panel_width<T>();
  const int64_t chunk = chunk_panels<T>(width);
  T* sliver = thread_buffer<T>(0, kTileRowsMax * kDepthBlock);
  for (int64_t q0 = panel_begin; q0 < panel_end; q0 += chunk) {
    const int64_t q1 = std::min(panel_end, q0 + chunk);
    for (int64_t k0 = 0; k0 < k; k0 += kDepthBlock) {
      const int64_t depth = std::min(kDepthBlock, k - k0);
      T* panels = thread_buffer<T>(1, (q1 - q0) * depth * width);
      for (int64_t q = q0; q < q1; ++q) {
        pack_b_panel_isa(b, k0, depth, q * width, std::min(width, n - q * width), nullptr,
                         panels + (q - q0) * depth * width);
      }
      gemm_block_isa(m, a, k0, depth, panels, q0, q1, n, c, ldc, accumulate || k0 > 0, sliver);
    }
  }
}

}  // namespace

template <typename T>
PackedMatrix<T>::PackedMatrix(const MatrixView<T>& b, int64_t k, int64_t n, const int64_t* order)
    : k_(k), n_(n), width_(gemm_panel_width<T>()) {
  const int64_t count = panels();
  data_.reset(new T[std::max<int64_t>(1, k * count * width_)]);
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k0 = 0; k0 < k; k0 += kDepthBlock) {
      const int64_t depth = std::min(kDepthBlock, k - k0);
      for (int64_t q = begin; q < end; ++q) {
        pack_b_panel_isa(b, k0, depth, q * width_, std::min(width_, n - q * width_), order,
                         data_.get() + k0 * count * width_ + q * depth * width_);
      }
    }
  });
}

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const MatrixView<T>& a, const MatrixView<T>& b, T* c,
          int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
    }
    return;
  }
  const int64_t width = gemm_panel_width<T>(), panels = (n + width - 1) / width;
  const int64_t threads = m * n * k < (1 << 18) ? 1 : at::get_num_threads();
  // Threads split the longer side (each packs all of the other operand), in
  // whole panels or in multiples of kTileRowsMax rows.
  const bool split_columns = m < kTileRowsMax * threads || (n >= m && panels >= threads);
  const int64_t units = split_columns ? panels : (m + kTileRowsMax - 1) / kTileRowsMax;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t u0 = units * t / threads, u1 = units * (t + 1) / threads;
      if (u0 == u1) continue;
      if (split_columns) {
        gemm_panels(m, n, k, a, b, c, ldc, accumulate, u0, u1);
      } else {
        const int64_t i0 = u0 * kTileRowsMax, i1 = std::min(m, u1 * kTileRowsMax);
        const MatrixView<T> rows{a.data + i0 * a.row_stride, a.row_stride, a.col_stride};
        gemm_panels(i1 - i0, n, k, rows, b, c + i0 * ldc, ldc, accumulate, 0, panels);
      }
    }
  });
}

template <typename T>
void gemm_packed(int64_t m, const MatrixView<T>& a, const PackedMatrix<T>& b, T* c, int64_t ldc,
                 bool accumulate, int64_t panel_begin, int64_t panel_end) {
  T* sliver = thread_buffer<T>(0, kTileRowsMax * kDepthBlock);
  const int64_t k = b.rows(), width = b.panel_width();
  if (k == 0 && !accumulate) {
    const int64_t j0 = panel_begin * width, j1 = std::min(b.cols(), panel_end * width);
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc + j0, c + i * ldc + j1, T(0));
  }
  const int64_t chunk = chunk_panels<T>(width);
  for (int64_t q0 = panel_begin; q0 < panel_end; q0 += chunk) {
    const int64_t q1 = std::min(panel_end, q0 + chunk);
    for (int64_t k0 = 0; k0 < k; k0 += kDepthBlock) {
      const int64_t depth = std::min(kDepthBlock, k - k0);
      const T* panels = b.block(k0 / kDepthBlock) + q0 * depth * width;
      gemm_block_isa(m, a, k0, depth, panels, q0, q1, b.cols(), c, ldc, accumulate || k0 > 0, sliver);
    }
  }
}

template <typename T>
void gemm(int64_t m, const MatrixView<T>& a, const PackedMatrix<T>& b, T* c, int64_t ldc,
          bool accumulate) {
  const int64_t panels = b.panels();
  const int64_t grain = m * b.rows() * b.panel_width() < (1 << 18) ? panels : 1;
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    gemm_packed(m, a, b, c, ldc, accumulate, begin, end);
  });
}

template int64_t gemm_panel_width<float>();
template int64_t gemm_panel_width<double>();
template class PackedMatrix<float>;
template class PackedMatrix<double>;
template void gemm(int64_t, int64_t, int64_t, const MatrixView<float>&, const MatrixView<float>&,
                   float*, int64_t, bool);
template void gemm(int64_t, int64_t, int64_t, const MatrixView<double>&, const MatrixView<double>&,
                   double*, int64_t, bool);
template void gemm(int64_t, const MatrixView<float>&, const PackedMatrix<float>&, float*, int64_t,
                   bool);
template void gemm(int64_t, const MatrixView<double>&, const PackedMatrix<double>&, double*,
                   int64_t, bool);
template void gemm_packed(int64_t, const MatrixView<float>&, const PackedMatrix<float>&, float*,
                          int64_t, bool, int64_t, int64_t);
template void gemm_packed(int64_t, const MatrixView<double>&, const PackedMatrix<double>&, double*,
                          int64_t, bool, int64_t, int64_t);

}  // namespace pyconvext::cpu
