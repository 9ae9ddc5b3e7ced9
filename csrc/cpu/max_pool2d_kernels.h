// The vector loops of the CPU max_pool2d, compiled once per instruction set
// by cpu/max_pool2d.cpp through cpu/per_isa.h. No include guard.

// Stores the first n lanes of v (n <= lanes) at p.
template <typename V, typename T>
inline void store_first(T* p, const V& v, int64_t n) {
  if (n * static_cast<int64_t>(sizeof(T)) == static_cast<int64_t>(sizeof(V))) {
    simd::store(p, v);
  } else {
    std::memcpy(p, &v, n * sizeof(T));
  }
}

// Stores 32- or 64-bit index lanes as int64.
template <typename I>
inline void store_indices(int64_t* p, const I& index, int64_t n) {
  constexpr int lanes = sizeof(I) / sizeof(index[0]);
  using Wide = simd::Vec<int64_t, lanes * 8>;
  store_first(p, __builtin_convertvector(index, Wide), n);
}

// Copies n elements with vector moves: short rows are too short for the
// fast path of memcpy.
template <typename V, typename T>
inline void copy_row(T* dst, const T* src, int64_t n) {
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) simd::store(dst + i, simd::load<V>(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// Lanes where value replaces max in native's scan (see replaces_max).
template <typename V>
inline auto replaces_max_lanes(const V& value, const V& max) {
  return (value > max) | (value != value);
}

template <typename V, size_t... L>
inline V even_lanes(const V& a, const V& b, std::index_sequence<L...>) {
  return __builtin_shufflevector(a, b, (2 * L)...);
}

// The lanes p[0], p[stride], p[2 * stride], ...: one load for stride 1, two
// loads and a shuffle for stride 2 (Stride 0: any stride, one lane at a time).
template <typename V, int Stride, typename T>
inline V strided_load(const T* p, int64_t stride) {
  constexpr int lanes = sizeof(V) / sizeof(T);
  if constexpr (Stride == 1) {
    return simd::load<V>(p);
  } else if constexpr (Stride == 2) {
    return even_lanes(simd::load<V>(p), simd::load<V>(p + lanes),
                      std::make_index_sequence<lanes>());
  } else {
    V v;
    for (int l = 0; l < lanes; ++l) v[l] = p[l * stride];
    return v;
  }
}

// Rows ahead of the row pass that are fetched into cache.
constexpr int64_t kPrefetchRows = 4;

// Input elements of the planes whose rows are pooled as one row (a few
// planes, kept in L1 with their row results).
constexpr int64_t kRowBatch = 4096;

template <int U>
using Group = std::integral_constant<int, U>;

// Output vectors that the loops below carry at once: the scan of a window is
// a chain of dependent compare-and-blends, so independent chains side by
// side keep the vector units busy.
constexpr int kGroup = 4;

// The row pass for U vectors of output columns from ow on, in one row: the
// maximum of each row window and its column, into row_max / row_arg. `col0`
// points at the column ow * stride_w - pad_w of the row.
template <int U, typename V, int Stride, bool WithIndices, typename T, typename I>
inline void row_windows(const Pool2dGeometry& g, const T* col0, int64_t ow,
                        const IndexLane<T>* first_col, const I& lane_col, T* row_max,
                        IndexLane<T>* row_arg) {
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  V best[U];
  I arg[U];
  for (int u = 0; u < U; ++u) {
    best[u] = V{} + scan_start<T>();
    if constexpr (WithIndices) arg[u] = simd::load<I>(first_col + ow + u * lanes);
  }
  for (int64_t j = 0; j < g.kernel_w; ++j) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const V v = strided_load<V, Stride>(col0 + u * lanes * g.stride_w + j * g.dil_w, g.stride_w);
      const auto wins = replaces_max_lanes(v, best[u]);
      best[u] = wins ? v : best[u];
      if constexpr (WithIndices) {
        const auto col = static_cast<IndexLane<T>>((ow + u * lanes) * g.stride_w + j * g.dil_w);
        arg[u] = wins ? lane_col + col : arg[u];
      }
    }
  }
  for (int u = 0; u < U; ++u) {
    simd::store(row_max + u * lanes, best[u]);
    if constexpr (WithIndices) simd::store(row_arg + u * lanes, arg[u]);
  }
}

// The column pass for U vectors of outputs from ow on, in output row oh:
// reduces the row results of the window's rows, in order. Row ih's results
// start at ih * pitch; its columns become plane positions by adding
// ih * arg_row_step + arg_base.
template <int U, typename V, bool WithIndices, typename T>
inline void column_windows(const Pool2dGeometry& g, int64_t pitch, int64_t arg_row_step,
                           int64_t arg_base, const T* row_max, const IndexLane<T>* row_arg,
                           const IndexLane<T>* first_col, int64_t oh, int64_t ow, T* out,
                           int64_t* out_index) {
  using I = simd::Vec<IndexLane<T>, sizeof(V)>;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  const int64_t ih0 = oh * g.stride_h - g.pad_h;
  const int64_t first_row = first_tap_inside(ih0, g.dil_h);
  const int64_t ih_end = std::min(g.in_h, ih0 + g.kernel_h * g.dil_h);
  V best[U];
  I arg[U];
  for (int u = 0; u < U; ++u) {
    best[u] = V{} + scan_start<T>();
    if constexpr (WithIndices) {
      arg[u] = simd::load<I>(first_col + ow + u * lanes) +
               static_cast<IndexLane<T>>(first_row * g.in_w);
    }
  }
  for (int64_t ih = first_row; ih < ih_end; ih += g.dil_h) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const V v = simd::load<V>(row_max + ih * pitch + ow + u * lanes);
      const auto wins = replaces_max_lanes(v, best[u]);
      best[u] = wins ? v : best[u];
      if constexpr (WithIndices) {
        const I at = simd::load<I>(row_arg + ih * pitch + ow + u * lanes) +
                     static_cast<IndexLane<T>>(ih * arg_row_step + arg_base);
        arg[u] = wins ? at : arg[u];
      }
    }
  }
  for (int u = 0; u < U; ++u) {
    const int64_t o = oh * g.out_w + ow + u * lanes;
    const int64_t n = std::min(lanes, g.out_w - ow - u * lanes);
    store_first(out + o, best[u], n);
    if constexpr (WithIndices) store_indices(out_index + o, arg[u], n);
  }
}

// The columns of a row pass that edge vectors read, from a row of row_w
// columns: output vectors [inner_begin, inner_end) read only columns inside
// the row; the others read [0, left_cols) and [right_col, row_w).
struct RowEdges {
  int64_t vectors, inner_begin, inner_end, left_cols, right_col;

  RowEdges(const Pool2dGeometry& g, int64_t row_w, int64_t row_out, int64_t lanes, int64_t reach) {
    const int64_t vector_step = lanes * g.stride_w;  // input columns per output vector
    vectors = (row_out + lanes - 1) / lanes;
    inner_begin = std::min(vectors, (g.pad_w + vector_step - 1) / vector_step);
    const int64_t last_inner = row_w + g.pad_w - reach;
    inner_end = last_inner >= 0 ? std::min(vectors, last_inner / vector_step + 1) : inner_begin;
    inner_end = std::max(inner_begin, inner_end);
    left_cols = std::min(row_w, inner_begin * vector_step - g.pad_w + reach);
    right_col = std::max(left_cols, inner_end * vector_step - g.pad_w);
  }
};

// Pools planes [begin, end). Per plane: the row pass writes, for every input
// row and output column, the row window's maximum and its column into
// row_max / row_arg; the column pass reduces kernel_h of those rows per
// output. Where the windows tile the rows exactly (is_tiled_by_rows), the
// rows of a batch of planes are pooled as one long row: short rows then fill
// whole vectors, and small planes share the row pass's fixed costs.
//
// Vectors of outputs whose taps all lie inside the row read the input; those
// at the edges read a copy of the row's ends between margins of scan start
// values (which never win). The copy is made before the interior vectors and
// read after them, so that no load waits for the copy's stores.
template <typename V, int Stride, bool WithIndices, typename T>
inline void pool_planes_with(const PlaneArgs<T>& a, int64_t begin, int64_t end) {
  using I = simd::Vec<IndexLane<T>, sizeof(V)>;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  const Pool2dGeometry& g = a.g;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  const bool one_row = is_tiled_by_rows(g);
  const int64_t batch = one_row ? std::max<int64_t>(1, kRowBatch / in_plane) : 1;
  // A row pass row: the rows of `batch` planes, or one row of a plane.
  const int64_t rows = one_row ? 1 : g.in_h;
  const int64_t row_w = one_row ? batch * in_plane : g.in_w;
  const int64_t row_out = one_row ? batch * g.in_h * g.out_w : g.out_w;
  const int64_t pitch = round_up(row_out, lanes);
  // Columns that a vector reads, from its first tap's column.
  const int64_t reach =
      (Stride == 2 ? 2 * lanes : (lanes - 1) * g.stride_w + 1) + (g.kernel_w - 1) * g.dil_w;

  std::vector<T> row(std::max(pitch * g.stride_w + reach, g.pad_w + row_w), scan_start<T>());
  // (One row: the column pass reads up to a vector past the last result.)
  std::vector<T> row_max(rows * pitch + lanes);
  std::vector<IndexLane<T>> row_arg(WithIndices ? rows * pitch + lanes : 0);
  // Native's initial column per output column, and each lane's column offset.
  std::vector<IndexLane<T>> first_col(pitch);
  for (int64_t ow = 0; ow < pitch; ++ow) {
    first_col[ow] = first_tap_inside(ow * g.stride_w - g.pad_w, g.dil_w);
  }
  I lane_col;
  for (int64_t l = 0; l < lanes; ++l) lane_col[l] = l * g.stride_w - g.pad_w;

  for (int64_t plane0 = begin; plane0 < end; plane0 += batch) {
    const int64_t planes = std::min(batch, end - plane0);
    const int64_t this_row_w = one_row ? planes * in_plane : g.in_w;
    const RowEdges edges(g, this_row_w, one_row ? planes * g.in_h * g.out_w : g.out_w, lanes,
                         reach);
    const T* in = a.input + plane0 * in_plane;
    for (int64_t ih = 0; ih < rows; ++ih) {
      const T* in_row = in + ih * this_row_w;
      // The hardware prefetcher alone leaves the loads waiting on memory.
      const T* ahead = in_row + kPrefetchRows * this_row_w;
      for (int64_t c = 0; c < this_row_w; c += 64 / sizeof(T)) __builtin_prefetch(ahead + c);
      T* edge_row = row.data() + g.pad_w;
      copy_row<V>(edge_row, in_row, edges.left_cols);
      copy_row<V>(edge_row + edges.right_col, in_row + edges.right_col,
                  this_row_w - edges.right_col);
      T* max_row = row_max.data() + ih * pitch;
      IndexLane<T>* arg_row = WithIndices ? row_arg.data() + ih * pitch : nullptr;
      const auto vectors_at = [&](auto group, int64_t v, const T* source_row) {
        const int64_t ow = v * lanes;
        row_windows<decltype(group)::value, V, Stride, WithIndices>(
            g, source_row + ow * g.stride_w - g.pad_w, ow, first_col.data(), lane_col,
            max_row + ow, WithIndices ? arg_row + ow : nullptr);
      };
      int64_t v = edges.inner_begin;
      for (; v + kGroup <= edges.inner_end; v += kGroup) vectors_at(Group<kGroup>{}, v, in_row);
      for (; v < edges.inner_end; ++v) vectors_at(Group<1>{}, v, in_row);
      for (v = 0; v < edges.inner_begin; ++v) vectors_at(Group<1>{}, v, edge_row);
      for (v = edges.inner_end; v < edges.vectors; ++v) vectors_at(Group<1>{}, v, edge_row);
    }
    for (int64_t b = 0; b < planes; ++b) {
      T* out = a.output + (plane0 + b) * out_plane;
      int64_t* out_index = WithIndices ? a.indices + (plane0 + b) * out_plane : nullptr;
      // Where plane b's row results start, and how their columns become
      // positions in the plane.
      const int64_t row_pitch = one_row ? g.out_w : pitch;
      const int64_t result_base = b * g.in_h * g.out_w;
      const int64_t arg_row_step = one_row ? 0 : g.in_w, arg_base = -b * in_plane;
      const T* max_base = row_max.data() + result_base;
      const IndexLane<T>* arg_rows = WithIndices ? row_arg.data() + result_base : nullptr;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        int64_t ow = 0;
        for (; ow + kGroup * lanes <= g.out_w; ow += kGroup * lanes) {
          column_windows<kGroup, V, WithIndices>(g, row_pitch, arg_row_step, arg_base, max_base,
                                                 arg_rows, first_col.data(), oh, ow, out,
                                                 out_index);
        }
        for (; ow < g.out_w; ow += lanes) {
          column_windows<1, V, WithIndices>(g, row_pitch, arg_row_step, arg_base, max_base,
                                            arg_rows, first_col.data(), oh, ow, out, out_index);
        }
      }
    }
  }
}

// The window scan of one output pixel for U vectors of channels from c on
// (channels_last): taps in row-major order.
template <int U, typename V, bool WithIndices, typename T>
inline void pixel_windows(const Pool2dGeometry& g, const T* in, int64_t ih0, int64_t iw0,
                          int64_t c, T* out, int64_t* out_index) {
  using I = simd::Vec<IndexLane<T>, sizeof(V)>;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  const int64_t C = g.channels;
  const int64_t first_row = first_tap_inside(ih0, g.dil_h);
  const int64_t ih_end = std::min(g.in_h, ih0 + g.kernel_h * g.dil_h);
  const int64_t first_col = first_tap_inside(iw0, g.dil_w);
  const int64_t iw_end = std::min(g.in_w, iw0 + g.kernel_w * g.dil_w);
  V best[U];
  I arg[U];
  for (int u = 0; u < U; ++u) {
    best[u] = V{} + scan_start<T>();
    arg[u] = I{} + static_cast<IndexLane<T>>(first_row * g.in_w + first_col);
  }
  for (int64_t ih = first_row; ih < ih_end; ih += g.dil_h) {
    for (int64_t iw = first_col; iw < iw_end; iw += g.dil_w) {
      const T* tap = in + (ih * g.in_w + iw) * C + c;
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const V v = simd::load<V>(tap + u * lanes);
        const auto wins = replaces_max_lanes(v, best[u]);
        best[u] = wins ? v : best[u];
        if constexpr (WithIndices) {
          arg[u] = wins ? I{} + static_cast<IndexLane<T>>(ih * g.in_w + iw) : arg[u];
        }
      }
    }
  }
  for (int u = 0; u < U; ++u) {
    simd::store(out + u * lanes, best[u]);
    if constexpr (WithIndices) store_indices(out_index + u * lanes, arg[u], lanes);
  }
}

// Pools output rows [begin, end) (row = n * out_h + oh) of channels_last
// planes, vectorized over channels; a last partial vector is moved back to
// end at C, recomputing a few channels.
template <typename V, bool WithIndices, typename T>
inline void pool_channels_with(const PlaneArgs<T>& a, int64_t begin, int64_t end) {
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  const Pool2dGeometry& g = a.g;
  const int64_t C = g.channels;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / g.out_h, oh = r % g.out_h;
    const T* in = a.input + n * g.in_h * g.in_w * C;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t o = (r * g.out_w + ow) * C;
      const auto vectors_at = [&](auto group, int64_t c) {
        pixel_windows<decltype(group)::value, V, WithIndices>(
            g, in, oh * g.stride_h - g.pad_h, ow * g.stride_w - g.pad_w, c, a.output + o + c,
            WithIndices ? a.indices + o + c : nullptr);
      };
      int64_t c = 0;
      for (; c + kGroup * lanes <= C; c += kGroup * lanes) vectors_at(Group<kGroup>{}, c);
      for (; c + lanes <= C; c += lanes) vectors_at(Group<1>{}, c);
      if (c < C) vectors_at(Group<1>{}, C - lanes);
    }
  }
}

template <int Bytes, typename T>
void pool_planes_of_width(const PlaneArgs<T>& args, int64_t begin, int64_t end) {
  using V = simd::Vec<T, Bytes>;
  if (args.indices) {
    switch (args.g.stride_w) {
      case 1: return pool_planes_with<V, 1, true>(args, begin, end);
      case 2: return pool_planes_with<V, 2, true>(args, begin, end);
      default: return pool_planes_with<V, 0, true>(args, begin, end);
    }
  }
  switch (args.g.stride_w) {
    case 1: return pool_planes_with<V, 1, false>(args, begin, end);
    case 2: return pool_planes_with<V, 2, false>(args, begin, end);
    default: return pool_planes_with<V, 0, false>(args, begin, end);
  }
}

// The narrowest vectors that hold the row pass's outputs of a row in one,
// else the widest.
template <typename T>
void pool_planes(const PlaneArgs<T>& args, int64_t begin, int64_t end) {
  const Pool2dGeometry& g = args.g;
  const int64_t row_out = is_tiled_by_rows(g) ? g.in_h * g.out_w : g.out_w;
  const int64_t row_bytes = row_out * static_cast<int64_t>(sizeof(T));
  if constexpr (kVectorBytes > 16) {
    if (row_bytes <= 16) return pool_planes_of_width<16>(args, begin, end);
  }
  if constexpr (kVectorBytes > 32) {
    if (row_bytes <= 32) return pool_planes_of_width<32>(args, begin, end);
  }
  pool_planes_of_width<kVectorBytes>(args, begin, end);
}

template <typename V, typename T>
void pool_channels_of_width(const PlaneArgs<T>& args, int64_t begin, int64_t end) {
  if (args.indices) return pool_channels_with<V, true>(args, begin, end);
  pool_channels_with<V, false>(args, begin, end);
}

// The widest vectors that fit the channels; single lanes below 16 bytes.
template <typename T>
void pool_channels(const PlaneArgs<T>& args, int64_t begin, int64_t end) {
  constexpr int wide = kVectorBytes, half = kVectorBytes > 16 ? kVectorBytes / 2 : 16;
  const int64_t bytes = args.g.channels * static_cast<int64_t>(sizeof(T));
  if (bytes >= wide) {
    pool_channels_of_width<simd::Vec<T, wide>>(args, begin, end);
  } else if (bytes >= half) {
    pool_channels_of_width<simd::Vec<T, half>>(args, begin, end);
  } else if (bytes >= 16) {
    pool_channels_of_width<simd::Vec<T, 16>>(args, begin, end);
  } else {
    pool_channels_of_width<simd::Vec<T, sizeof(T)>>(args, begin, end);
  }
}
