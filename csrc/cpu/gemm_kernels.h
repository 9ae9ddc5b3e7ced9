// The GEMM's packing and register tiles, compiled once per instruction set
// by cpu/gemm.cpp through cpu/per_isa.h. No include guard.
//
// A tile is kTileRows rows by kPanelWidth<T> columns of C, kept in registers
// (16 vectors with AVX-512, 12 with AVX2 and SSE) while the depth runs: each
// step loads one row of a B panel and broadcasts one element of each A row.

// 8 x 2 vectors with AVX-512 (batches of 8, 16, 32 ... fill whole tiles),
// 6 x 2 in the 16 registers of AVX2 and SSE.
constexpr int kTileVectors = 2;
constexpr int kTileRows = kVectorBytes == 64 ? 8 : 6;
template <typename T>
constexpr int64_t kPanelWidth = kVectorBytes / sizeof(T) * kTileVectors;

template <typename T>
int64_t panel_width() {
  return kPanelWidth<T>;
}

// Packs B(k0 + p, column j0 + j) for p < depth and j < count as
// panel[p][j], zero up to kPanelWidth; with `order`, B's column order[j0 + j].
template <typename T>
void pack_b_panel(const MatrixView<T>& b, int64_t k0, int64_t depth, int64_t j0, int64_t count,
                  const int64_t* order, T* panel) {
  using Vec = simd::Vec<T, kVectorBytes>;
  constexpr int64_t width = kPanelWidth<T>, lanes = kVectorBytes / sizeof(T);
  if (order == nullptr && b.col_stride == 1 && count == width) {
    for (int64_t p = 0; p < depth; ++p) {
      std::memcpy(panel + p * width, b.data + (k0 + p) * b.row_stride + j0, width * sizeof(T));
    }
    return;
  }
  const T* src[width];
  for (int64_t j = 0; j < count; ++j) {
    src[j] = b.data + k0 * b.row_stride + (order ? order[j0 + j] : j0 + j) * b.col_stride;
  }
  int64_t p0 = 0;
  if (b.row_stride == 1) {  // columns contiguous (B is a transposed matrix): block transposes
    for (; p0 + lanes <= depth; p0 += lanes) {
      for (int64_t v = 0; v < width; v += lanes) {
        Vec rows[lanes];
#pragma GCC unroll 16
        for (int64_t r = 0; r < lanes; ++r) {
          rows[r] = v + r < count ? simd::load<Vec>(src[v + r] + p0) : Vec{};
        }
        simd::transpose_block<lanes / 2>(rows);
#pragma GCC unroll 16
        for (int64_t r = 0; r < lanes; ++r) simd::store(panel + (p0 + r) * width + v, rows[r]);
      }
    }
  }
  for (int64_t p = p0; p < depth; ++p) {
    for (int64_t j = 0; j < width; ++j) {
      panel[p * width + j] = j < count ? src[j][p * b.row_stride] : T(0);
    }
  }
}

// Packs rows [i0, i0 + rows) of A(., k0 + p) as sliver[p][0, kTileRows).
template <typename T>
void pack_a_sliver(const MatrixView<T>& a, int64_t i0, int64_t rows, int64_t k0, int64_t depth,
                   T* sliver) {
  const T* src = a.data + i0 * a.row_stride + k0 * a.col_stride;
  if (a.row_stride == 1) {  // A transposed in memory: a sliver's rows are side by side
    for (int64_t p = 0; p < depth; ++p) {
      for (int64_t r = 0; r < rows; ++r) sliver[p * kTileRows + r] = src[p * a.col_stride + r];
    }
    return;
  }
  int64_t p0 = 0;
  constexpr int64_t block_bytes = kTileRows * sizeof(T);
  if constexpr (block_bytes == 32 || block_bytes == 64) {  // square blocks of kTileRows
    using Vec = simd::Vec<T, block_bytes>;
    if (a.col_stride == 1 && rows == kTileRows) {
      for (; p0 + kTileRows <= depth; p0 += kTileRows) {
        Vec block[kTileRows];
#pragma GCC unroll 8
        for (int r = 0; r < kTileRows; ++r) block[r] = simd::load<Vec>(src + r * a.row_stride + p0);
        simd::transpose_block<kTileRows / 2>(block);
#pragma GCC unroll 8
        for (int r = 0; r < kTileRows; ++r) simd::store(sliver + (p0 + r) * kTileRows, block[r]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p = p0; p < depth; ++p) {
      sliver[p * kTileRows + r] = src[r * a.row_stride + p * a.col_stride];
    }
  }
}

// C[Rows x cols] (+)= sliver^T panel over `depth`.
template <int Rows, typename T>
inline void gemm_tile(int64_t depth, const T* sliver, const T* panel, T* c, int64_t ldc,
                      int64_t cols, bool accumulate) {
  using Vec = simd::Vec<T, kVectorBytes>;
  constexpr int64_t lanes = kVectorBytes / sizeof(T), width = kPanelWidth<T>;
  Vec acc[Rows][kTileVectors];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < kTileVectors; ++v) acc[r][v] = Vec{};
#pragma GCC unroll 4
  for (int64_t p = 0; p < depth; ++p) {
    Vec bv[kTileVectors];
    for (int v = 0; v < kTileVectors; ++v) bv[v] = simd::load<Vec>(panel + p * width + v * lanes);
    for (int r = 0; r < Rows; ++r) {
      const T a = sliver[p * kTileRows + r];  // (Vec{} + a would add +0.0 to it first)
      for (int v = 0; v < kTileVectors; ++v) acc[r][v] += bv[v] * a;
    }
  }
  if (cols == width) {
    for (int r = 0; r < Rows; ++r) {
      for (int v = 0; v < kTileVectors; ++v) {
        T* out = c + r * ldc + v * lanes;
        simd::store(out, accumulate ? acc[r][v] + simd::load<Vec>(out) : acc[r][v]);
      }
    }
    return;
  }
  for (int r = 0; r < Rows; ++r) {
    T row[width];
    for (int v = 0; v < kTileVectors; ++v) simd::store(row + v * lanes, acc[r][v]);
    T* out = c + r * ldc;
    for (int64_t j = 0; j < cols; ++j) out[j] = accumulate ? out[j] + row[j] : row[j];
  }
}

// gemm_tile<rows> for rows <= Rows.
template <int Rows, typename T>
inline void gemm_tile_rows(int64_t rows, int64_t depth, const T* sliver, const T* panel, T* c,
                           int64_t ldc, int64_t cols, bool accumulate) {
  if constexpr (Rows > 1) {
    if (rows < Rows) {
      return gemm_tile_rows<Rows - 1>(rows, depth, sliver, panel, c, ldc, cols, accumulate);
    }
  }
  gemm_tile<Rows>(depth, sliver, panel, c, ldc, cols, accumulate);
}

// C (+)= A B over rows [0, m) and the packed panels [panel_begin,
// panel_end) of one depth block (`panels` points at panel_begin's), packing
// A sliver by sliver into `sliver` (kTileRows * depth elements).
template <typename T>
void gemm_block(int64_t m, const MatrixView<T>& a, int64_t k0, int64_t depth, const T* panels,
                int64_t panel_begin, int64_t panel_end, int64_t n, T* c, int64_t ldc,
                bool accumulate, T* sliver) {
  constexpr int64_t width = kPanelWidth<T>;
  for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
    const int64_t rows = std::min<int64_t>(kTileRows, m - i0);
    pack_a_sliver(a, i0, rows, k0, depth, sliver);
    for (int64_t q = panel_begin; q < panel_end; ++q) {
      const int64_t j0 = q * width, cols = std::min(width, n - j0);
      const T* panel = panels + (q - panel_begin) * depth * width;
      T* out = c + i0 * ldc + j0;
      gemm_tile_rows<kTileRows>(rows, depth, sliver, panel, out, ldc, cols, accumulate);
    }
  }
}
