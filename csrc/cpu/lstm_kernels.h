// The element-wise loops of the CPU LSTM kernels, compiled once per
// instruction set by cpu/lstm.cpp through cpu/per_isa.h. No include guard.

// x rounded to the nearest integer, lane by lane (for the exp below, whose
// inputs are clamped to well within int32).
template <typename V>
inline V round_lanes(V x) {
#ifdef PYCONVEXT_X86_ISAS
  if constexpr (kVectorBytes == 64) {
    return (V)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else if constexpr (kVectorBytes == 32) {
    return (V)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
#endif
  using I = simd::Vec<int32_t, sizeof(V)>;
  const V up = x + 0.5f;
  I n = __builtin_convertvector(up, I);
  n += (__builtin_convertvector(n, V) > up);  // truncation to floor: -1 where it rounded up
  return __builtin_convertvector(n, V);
}

// exp of float32 lanes (Cephes' expf: range reduction to [-ln2/2, ln2/2] and
// a degree-6 polynomial; within 2 ulp), and the activations built on it.
// NaN stays NaN. With AVX-512, scalef applies 2^n, so exp overflows to inf
// and underflows to 0 as it should; elsewhere 2^n goes through the exponent
// bits, which hold 2^-127..2^127, so inputs are clamped to +-88 (exp(-88)
// gives 0; no gate result can tell exp(88) from exp(88.7)).
template <typename V>
inline V exp_lanes(V x) {
  constexpr float limit = kVectorBytes == 64 ? 104.0f : 88.0f;
  const V hi = V{} + limit, lo = V{} - limit;
  x = x > hi ? hi : x;  // (a NaN fails both comparisons)
  x = x < lo ? lo : x;
  const V n = round_lanes(x * 1.44269504088896341f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const V z = x * x;
  V y = V{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
#ifdef PYCONVEXT_X86_ISAS
  if constexpr (kVectorBytes == 64) return (V)_mm512_scalef_ps((__m512)y, (__m512)n);
#endif
  using I = simd::Vec<int32_t, sizeof(V)>;
  const I scale = (__builtin_convertvector(n, I) + 127) << 23;
  V pow2n;
  std::memcpy(&pow2n, &scale, sizeof(V));
  return y * pow2n;
}

template <typename V>
struct VectorActivations {
  static V sigmoid(V x) { return 1.0f / (1.0f + exp_lanes(-x)); }
  // 1 - 2 / (e^2x + 1): exact at both ends; near 0 its absolute error stays
  // within a float32 rounding of 1.
  static V tanh(V x) { return 1.0f - 2.0f / (exp_lanes(x + x) + 1.0f); }
};

// Lanes of a float32 vector: the gate group of lstm_layer's GEMMs.
inline int64_t float_lanes() { return kVectorBytes / 4; }

// float32 runs on vectors, float64 (and the tails) one element at a time.
template <typename T>
constexpr int64_t activation_lanes() {
  return std::is_same_v<T, float> ? kVectorBytes / static_cast<int64_t>(sizeof(float)) : 1;
}

// Stores the results of cell_forward_rows for the unit(s) from u of a row.
template <typename T, typename V>
inline void store_forward(const CellArgs<T>& a, T* ws, T* c, T* h, int64_t u, V i, V f, V g, V o,
                          V c_old, V c_new, V tanh_c) {
  const int64_t H = a.hidden_size;
  if (ws != nullptr) {
    if (a.save_c_prev) simd::store(ws + 5 * H + u, c_old);
    simd::store(ws + u, i);
    simd::store(ws + H + u, f);
    simd::store(ws + 2 * H + u, g);
    simd::store(ws + 3 * H + u, o);
    simd::store(ws + 4 * H + u, tanh_c);
  }
  simd::store(c + u, c_new);
  simd::store(h + u, o * tanh_c);
}

// The forward of rows [begin, end) and hidden units [unit_begin, unit_end)
// (a whole number of gate groups) of a step: from the gate pre-activations
// and c_prev, the activations i, f, g, o and tanh(c) into the workspace (and
// c_prev after them, with save_c_prev) unless it is null, and c and h. c may overwrite c_prev
// in place.
template <typename T>
void cell_forward_rows(const CellArgs<T>& a, int64_t begin, int64_t end, int64_t unit_begin,
                       int64_t unit_end) {
  const int64_t H = a.hidden_size;
  constexpr int64_t lanes = activation_lanes<T>();
  for (int64_t b = begin; b < end; ++b) {
    const T* c_prev = a.c_prev + b * a.c_prev_stride;
    T* ws = a.workspace != nullptr ? a.workspace + b * a.workspace_stride : nullptr;
    T* c = a.c + b * a.c_stride;
    T* h = a.h + b * a.h_stride;
    for (int64_t u0 = unit_begin; u0 < unit_end; u0 += a.group) {
      const int64_t w = std::min(a.group, H - u0);
      const T* gates = a.gates + b * 4 * H + 4 * u0;
      const T* bias = a.bias + 4 * u0;
      int64_t j = 0;
      if constexpr (lanes > 1) {
        using V = simd::Vec<T, lanes * sizeof(T)>;
        for (; j + lanes <= w; j += lanes) {
          V i, f, g, o, c_new, tanh_c;
          const V c_old = simd::load<V>(c_prev + u0 + j);
          const auto gate = [&](int64_t k) {
            return simd::load<V>(gates + k * w + j) + simd::load<V>(bias + k * w + j);
          };
          lstm_forward_element<VectorActivations<V>>(gate(0), gate(1), gate(2), gate(3), c_old, i,
                                                     f, g, o, c_new, tanh_c);
          store_forward(a, ws, c, h, u0 + j, i, f, g, o, c_old, c_new, tanh_c);
        }
      }
      for (; j < w; ++j) {
        T i, f, g, o, c_new, tanh_c;
        const T c_old = c_prev[u0 + j];
        lstm_forward_element<ScalarActivations<T>>(
            gates[j] + bias[j], gates[w + j] + bias[w + j], gates[2 * w + j] + bias[2 * w + j],
            gates[3 * w + j] + bias[3 * w + j], c_old, i, f, g, o, c_new, tanh_c);
        store_forward(a, ws, c, h, u0 + j, i, f, g, o, c_old, c_new, tanh_c);
      }
    }
  }
}

// The backward of rows [begin, end) of a step: from the workspace, c_prev
// and the gradients of h and c, the gradients of the gate pre-activations
// (rows of 4 * H) and of c_prev (which may overwrite those of c in place).
template <typename T>
void cell_backward_rows(const CellGradArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden_size;
  constexpr int64_t lanes = kVectorBytes / static_cast<int64_t>(sizeof(T));
  using V = simd::Vec<T, kVectorBytes>;
  for (int64_t b = begin; b < end; ++b) {
    const T* ws = a.workspace + b * a.workspace_stride;
    const T* c_prev = a.c_prev + b * a.c_prev_stride;
    const T* dh = a.grad_h + b * a.grad_h_stride;
    const T* dc = a.grad_c + b * a.grad_c_stride;
    T* d = a.grad_gates + b * 4 * H;
    T* dc_prev = a.grad_c_prev + b * a.grad_c_prev_stride;
    int64_t j = 0;
    for (; j + lanes <= H; j += lanes) {
      V d_i, d_f, d_g, d_o, d_c;
      lstm_backward_element(simd::load<V>(ws + j), simd::load<V>(ws + H + j),
                            simd::load<V>(ws + 2 * H + j), simd::load<V>(ws + 3 * H + j),
                            simd::load<V>(ws + 4 * H + j), simd::load<V>(c_prev + j),
                            simd::load<V>(dh + j), simd::load<V>(dc + j), d_i, d_f, d_g, d_o, d_c);
      simd::store(d + j, d_i);
      simd::store(d + H + j, d_f);
      simd::store(d + 2 * H + j, d_g);
      simd::store(d + 3 * H + j, d_o);
      simd::store(dc_prev + j, d_c);
    }
    for (; j < H; ++j) {
      lstm_backward_element(ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j], ws[4 * H + j],
                            c_prev[j], dh[j], dc[j], d[j], d[H + j], d[2 * H + j], d[3 * H + j],
                            dc_prev[j]);
    }
  }
}
