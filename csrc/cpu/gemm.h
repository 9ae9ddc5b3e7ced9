#pragma once

// Our GEMM for the CPU kernels (float and double): B is packed into panels
// of columns, A into slivers of rows, and a register tile of C runs over each
// pair (cpu/gemm_kernels.h). MKL, behind at::mm, takes a slower code path on
// AMD CPUs; this runs at ~90% of an AVX-512 core's peak.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>

namespace pyconvext::cpu {

// A matrix in memory: element (r, c) at data[r * row_stride + c * col_stride].
template <typename T>
struct MatrixView {
  const T* data;
  int64_t row_stride, col_stride;
  MatrixView t() const { return {data, col_stride, row_stride}; }
};

// Columns per panel of packed B on this CPU: the unit in which gemm_packed
// splits columns.
template <typename T>
int64_t gemm_panel_width();

// B (k x n) packed once for products that reuse it. With `order`, packed
// column j is B's column order[j] (order holds n columns).
template <typename T>
class PackedMatrix {
 public:
  PackedMatrix(const MatrixView<T>& b, int64_t k, int64_t n, const int64_t* order = nullptr);
  int64_t rows() const { return k_; }
  int64_t cols() const { return n_; }
  int64_t panel_width() const { return width_; }
  int64_t panels() const { return (n_ + width_ - 1) / width_; }
  // The panels of depth block `block` (rows [block * kDepthBlock, ...)).
  const T* block(int64_t block) const { return data_.get() + block * kDepthBlock * panels() * width_; }

  static constexpr int64_t kDepthBlock = 256;

 private:
  int64_t k_, n_, width_;
  std::unique_ptr<T[]> data_;
};

// C = A B (or C += A B with accumulate), for A (m x k) and B (k x n), into C
// with row stride ldc; on at::get_num_threads() threads.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const MatrixView<T>& a, const MatrixView<T>& b, T* c,
          int64_t ldc, bool accumulate);

// The same with B packed.
template <typename T>
void gemm(int64_t m, const MatrixView<T>& a, const PackedMatrix<T>& b, T* c, int64_t ldc,
          bool accumulate);

// The same with B packed, for the columns of panels [panel_begin,
// panel_end) only, on the calling thread: for callers that split the columns
// among their own threads.
template <typename T>
void gemm_packed(int64_t m, const MatrixView<T>& a, const PackedMatrix<T>& b, T* c, int64_t ldc,
                 bool accumulate, int64_t panel_begin, int64_t panel_end);

// A 2-D tensor of T as a MatrixView.
template <typename T>
MatrixView<T> matrix_view(const at::Tensor& m) {
  return {m.const_data_ptr<T>(), m.stride(0), m.stride(1)};
}

// c = a b, or c += a b with accumulate, for 2-D tensors of T (c's rows
// contiguous).
template <typename T>
void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool accumulate) {
  TORCH_INTERNAL_ASSERT(c.size(0) == a.size(0) && c.size(1) == b.size(1) && a.size(1) == b.size(0) &&
                        (c.stride(1) == 1 || c.size(1) <= 1));
  gemm(a.size(0), b.size(1), a.size(1), matrix_view<T>(a), matrix_view<T>(b),
       c.mutable_data_ptr<T>(), c.stride(0), accumulate);
}

}  // namespace pyconvext::cpu
