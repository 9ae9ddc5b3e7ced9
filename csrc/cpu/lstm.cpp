// CPU kernels for pyconvext::lstm_cell, lstm_layer (and lstm_layer_values)
// and their backwards.
//
// A step is two matrix products (our GEMM, cpu/gemm.h: the input and the
// recurrent projections, accumulated into one gates buffer) and one fused
// element-wise pass (common/lstm.h: bias, activations, cell update, hidden
// state, and the activations saved for the backward, in one read of the
// gates). The backward mirrors it: one fused pass from the saved activations
// to the gradients of the gate pre-activations, then GEMMs for the input,
// state and weight gradients.
//
// A whole sequence (lstm_layer) packs the weights for the GEMM once. Each
// step is then the input projection, the recurrent GEMM (plus the
// projection's, with proj_size) and one fused pass; with few rows per
// thread, the inputs of all steps are projected in one GEMM before the
// recurrence instead. The backward computes the input and weight gradients
// as one GEMM over all steps after the recurrence. lstm_layer_values, for
// inference, saves no activations. Packed sequences run each step on its
// first batch_sizes[t] rows.

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/lstm.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"

namespace pyconvext {
namespace {

using at::Tensor;

// Rows of one step's element-wise forward; strides are in elements per row.
template <typename T>
struct CellArgs {
  const T* gates;   // (rows, 4H) pre-activations without the bias, in groups of `group` units
  const T* bias;    // (4H), in the same order
  const T* c_prev;  // (rows, H)
  T* workspace;     // rows of i, f, g, o, tanh(c) (and c_prev, with save_c_prev), or null
  T* c;             // (rows, H)
  T* h;             // (rows, H)
  int64_t hidden_size, c_prev_stride, workspace_stride, c_stride, h_stride;
  bool save_c_prev;
  // Hidden units per group of gate columns: a group of w units holds their
  // i, f, g and o pre-activations, w of each, side by side (H: PyTorch's
  // order; see grouped_gate_order).
  int64_t group;
};

template <typename T>
struct CellGradArgs {
  const T* workspace;  // rows of i, f, g, o, tanh(c) from the forward
  const T* c_prev;     // (rows, H)
  const T* grad_h;     // (rows, H)
  const T* grad_c;     // (rows, H)
  T* grad_gates;       // (rows, 4H)
  T* grad_c_prev;      // (rows, H)
  int64_t hidden_size, workspace_stride, c_prev_stride, grad_h_stride, grad_c_stride,
      grad_c_prev_stride;
};

template <typename T>
struct ScalarActivations {
  static T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
  static T tanh(T x) { return std::tanh(x); }
};

// The vector loops, compiled for each instruction set.
#define PYCONVEXT_ISA_KERNELS "cpu/lstm_kernels.h"
#include "cpu/per_isa.h"

template <typename T>
void cell_forward(const CellArgs<T>& args, int64_t rows) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / args.hidden_size),
                   [&](int64_t begin, int64_t end) {
    PYCONVEXT_ISA_CALL(cell_forward_rows, args, begin, end, 0, args.hidden_size);
  });
}

template <typename T>
void cell_backward(const CellGradArgs<T>& args, int64_t rows) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / args.hidden_size),
                   [&](int64_t begin, int64_t end) {
    PYCONVEXT_ISA_CALL(cell_backward_rows, args, begin, end);
  });
}

// b_ih + b_hh; either may be missing (zeros when both are), as in native's.
Tensor gate_bias(const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t size,
                 const at::TensorOptions& options) {
  if (!b_ih.has_value() && !b_hh.has_value()) return at::zeros({size}, options);
  return (!b_ih.has_value() ? *b_hh : !b_hh.has_value() ? *b_ih : at::add(*b_ih, *b_hh)).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_cpu(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  const LstmCellGeometry g = check_lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t H = g.hidden_size;
  Tensor gates = at::empty({g.batch, 4 * H}, input.options());
  const Tensor bias = gate_bias(b_ih, b_hh, 4 * H, input.options());
  const Tensor c_prev = cx.contiguous();
  Tensor hy = at::empty({g.batch, H}, input.options());
  Tensor cy = at::empty({g.batch, H}, input.options());
  Tensor workspace = at::empty({g.batch, 5 * H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_cell", [&] {
    cpu::gemm<scalar_t>(input, w_ih.t(), gates, false);
    cpu::gemm<scalar_t>(hx, w_hh.t(), gates, true);
    const CellArgs<scalar_t> args{gates.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                                  c_prev.const_data_ptr<scalar_t>(),
                                  workspace.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
                                  hy.mutable_data_ptr<scalar_t>(), H, H, 5 * H, H, H, false, H};
    cell_forward(args, g.batch);
  });
  return {hy, cy, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_cpu(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input, const Tensor& hx,
    const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh, const Tensor& workspace,
    bool has_bias) {
  const LstmCellGeometry g = check_lstm_cell(input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt);
  constexpr const char* op = "pyconvext.lstm_cell_backward";
  const int64_t H = g.hidden_size;
  for (const Tensor* grad : {&grad_hy, &grad_cy}) {
    TORCH_CHECK(grad->sizes() == cx.sizes() && grad->scalar_type() == input.scalar_type() &&
                    grad->device() == input.device(),
                op, ": expected the gradients of hy and cy to be like cx (", cx.sizes(), ", ",
                input.scalar_type(), "), but got ", grad->sizes(), ", ", grad->scalar_type());
  }
  TORCH_CHECK(workspace.sizes() == c10::IntArrayRef({g.batch, 5 * H}) &&
                  workspace.scalar_type() == input.scalar_type(),
              op, ": expected the workspace of the forward, of size [", g.batch, ", ", 5 * H,
              "], but got ", workspace.sizes());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor ws = workspace.contiguous(), c_prev = cx.contiguous();
  const Tensor dh = grad_hy.contiguous(), dc = grad_cy.contiguous();
  Tensor grad_gates = at::empty({g.batch, 4 * H}, input.options());
  Tensor grad_cx = at::empty({g.batch, H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_cell_backward", [&] {
    const CellGradArgs<scalar_t> args{ws.const_data_ptr<scalar_t>(), c_prev.const_data_ptr<scalar_t>(),
                                      dh.const_data_ptr<scalar_t>(), dc.const_data_ptr<scalar_t>(),
                                      grad_gates.mutable_data_ptr<scalar_t>(),
                                      grad_cx.mutable_data_ptr<scalar_t>(), H, 5 * H, H, H, H, H};
    cell_backward(args, g.batch);
  });
  Tensor grad_input = at::empty(input.sizes(), input.options());
  Tensor grad_hx = at::empty(hx.sizes(), input.options());
  Tensor grad_w_ih = at::empty(w_ih.sizes(), input.options());
  Tensor grad_w_hh = at::empty(w_hh.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_cell_backward", [&] {
    cpu::gemm<scalar_t>(grad_gates, w_ih, grad_input, false);
    cpu::gemm<scalar_t>(grad_gates, w_hh, grad_hx, false);
    cpu::gemm<scalar_t>(grad_gates.t(), input, grad_w_ih, false);
    cpu::gemm<scalar_t>(grad_gates.t(), hx, grad_w_hh, false);
  });
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh,
          has_bias ? at::sum(grad_gates, 0) : Tensor()};
}

// Workspace columns of lstm_layer: i, f, g, o, tanh(c), c_prev, and the
// hidden state before its projection (with proj_size).
int64_t layer_workspace_columns(const LstmLayerGeometry& g) {
  return (g.output_size != g.hidden_size ? 7 : 6) * g.hidden_size;
}

// The gate columns of lstm_layer's GEMMs, in groups of `group` hidden units:
// a group's i, f, g and o columns side by side. A thread that computes a
// panel of the recurrent GEMM then holds whole units, and runs their
// element-wise step while the panel is still in its cache.
std::vector<int64_t> grouped_gate_order(int64_t H, int64_t group) {
  std::vector<int64_t> order;
  order.reserve(4 * H);
  for (int64_t u0 = 0; u0 < H; u0 += group) {
    const int64_t w = std::min(group, H - u0);
    for (int64_t gate = 0; gate < 4; ++gate) {
      for (int64_t j = 0; j < w; ++j) order.push_back(gate * H + u0 + j);
    }
  }
  return order;
}

// Threads run the recurrence of a sequence in one of two ways:
//  - with at least kRowSplitMinRows rows each, every thread runs all steps
//    on its own rows (in blocks of kRowBlock): no synchronization between
//    steps, and each step's GEMM, gate pass and state stay in its caches;
//  - with fewer rows, they split each step's recurrent GEMM by columns
//    (whole gate groups, so each runs the element-wise step of its units),
//    meeting after every step. Each keeps its half of the weights in cache.
constexpr int64_t kRowBlock = 8, kRowSplitMinRows = 8;

bool split_rows(int64_t batch) {
  return batch >= kRowSplitMinRows * std::min<int64_t>(2, at::get_num_threads());
}

// Runs body(r0, r1) over blocks of the batch's rows, on as many threads.
template <typename Body>
void for_row_blocks(int64_t batch, Body body) {
  at::parallel_for(0, (batch + kRowBlock - 1) / kRowBlock, 1, [&](int64_t begin, int64_t end) {
    body(begin * kRowBlock, std::min(batch, end * kRowBlock));
  });
}

// The recurrence of lstm_layer, saving the activations in the workspace
// when it is defined.
template <typename T>
void layer_forward(const LstmLayerGeometry& g, const Tensor& input, const Tensor& w_ih,
                   const Tensor& w_hh, const Tensor& bias,
                   const std::optional<Tensor>& w_hr, bool reverse, Tensor& output,
                   Tensor& h_state, Tensor& c_state, const Tensor& workspace) {
  const int64_t H = g.hidden_size, P = g.output_size, G = 4 * H;
  // Groups of a vector of units; a column split runs in blocks of whole
  // panels and whole groups.
  const int64_t group = [] { PYCONVEXT_ISA_CALL(float_lanes); }();
  const int64_t block_columns = std::lcm(4 * group, cpu::gemm_panel_width<T>());
  const int64_t block_units = block_columns / 4, block_panels = block_columns / cpu::gemm_panel_width<T>();
  const std::vector<int64_t> order = grouped_gate_order(H, group);
  std::vector<T> grouped_bias(G);
  for (int64_t j = 0; j < G; ++j) grouped_bias[j] = bias.const_data_ptr<T>()[order[j]];
  const Tensor x = input.reshape({g.rows, g.input_size});
  const cpu::MatrixView<T> x_view = cpu::matrix_view<T>(x);
  const cpu::PackedMatrix<T> w_ih_packed(cpu::matrix_view<T>(w_ih).t(), g.input_size, G, order.data());
  const cpu::PackedMatrix<T> w_hh_packed(cpu::matrix_view<T>(w_hh).t(), P, G, order.data());
  std::optional<cpu::PackedMatrix<T>> w_hr_packed;
  if (w_hr.has_value()) w_hr_packed.emplace(cpu::matrix_view<T>(*w_hr).t(), H, P);
  const bool rows_split = split_rows(g.batch);
  // Split by rows, each thread projects its rows' inputs step by step into
  // its rows of a one-step gates buffer (small GEMMs on weights that stream
  // through its cache run nearer the peak than one large GEMM, and no
  // all-steps buffer goes through memory). Split by columns, all steps'
  // inputs are projected first, in one GEMM.
  Tensor gates = at::empty({rows_split ? g.batch : g.rows, G}, input.options());
  T* gates_data = gates.mutable_data_ptr<T>();
  if (!rows_split) cpu::gemm(g.rows, x_view, w_ih_packed, gates_data, G, false);
  T* h_data = h_state.mutable_data_ptr<T>();
  T* c_data = c_state.mutable_data_ptr<T>();
  T* out_data = output.mutable_data_ptr<T>();
  T* ws_data = workspace.defined() ? workspace.mutable_data_ptr<T>() : nullptr;
  const int64_t columns = workspace.defined() ? workspace.size(1) : 0;
  // With a projection, h before it: in the workspace, else in rows of H.
  const Tensor h_full = w_hr.has_value() && !workspace.defined()
      ? at::empty({g.batch, H}, input.options()) : Tensor();
  const auto projection_input = [&](int64_t first, int64_t r0) -> T* {
    return ws_data ? ws_data + first * columns + 6 * H : h_full.mutable_data_ptr<T>() + r0 * H;
  };
  const int64_t projection_stride = ws_data ? columns : H;
  // Rows [r0, r1) of step t, whose input projection is in step_gates: the
  // recurrent GEMM on panels [p0, p1) and the element-wise step of units
  // [u0, u1).
  const auto step = [&](int64_t t, int64_t r0, int64_t r1, T* step_gates, int64_t p0, int64_t p1,
                        int64_t u0, int64_t u1) {
    const int64_t first = g.offsets[t] + r0;
    // Without a projection h goes to the output, else to the projection's input.
    const CellArgs<T> args{step_gates, grouped_bias.data(), c_data + r0 * H,
                           ws_data ? ws_data + first * columns : nullptr, c_data + r0 * H,
                           w_hr.has_value() ? projection_input(first, r0) : out_data + first * P,
                           H, H, columns, H, w_hr.has_value() ? projection_stride : P, true, group};
    cpu::gemm_packed(r1 - r0, {h_data + r0 * P, P, 1}, w_hh_packed, step_gates, G, true, p0, p1);
    PYCONVEXT_ISA_CALL(cell_forward_rows, args, 0, r1 - r0, u0, u1);
  };
  // The step's new h of rows [r0, r1): projected (with proj_size) to the
  // output, and copied to the state.
  const auto finish = [&](int64_t t, int64_t r0, int64_t r1) {
    const int64_t first = g.offsets[t] + r0;
    if (w_hr_packed.has_value()) {
      cpu::gemm_packed(r1 - r0, {projection_input(first, r0), projection_stride, 1}, *w_hr_packed,
                       out_data + first * P, P, false, 0, w_hr_packed->panels());
    }
    std::memcpy(h_data + r0 * P, out_data + first * P, (r1 - r0) * P * sizeof(T));
  };
  const auto step_of = [&](int64_t s) { return reverse ? g.steps - 1 - s : s; };
  if (rows_split) {
    for_row_blocks(g.batch, [&](int64_t r0, int64_t r1) {
      T* step_gates = gates_data + r0 * G;
      for (int64_t s = 0; s < g.steps; ++s) {
        const int64_t t = step_of(s), rows = std::min(r1, g.batch_sizes[t]);
        if (rows <= r0) continue;
        const cpu::MatrixView<T> step_x{x_view.data + (g.offsets[t] + r0) * x_view.row_stride,
                                        x_view.row_stride, x_view.col_stride};
        cpu::gemm_packed(rows - r0, step_x, w_ih_packed, step_gates, G, false, 0, w_ih_packed.panels());
        step(t, r0, rows, step_gates, 0, w_hh_packed.panels(), 0, H);
        finish(t, r0, rows);
      }
    });
    return;
  }
  for (int64_t s = 0; s < g.steps; ++s) {
    const int64_t t = step_of(s), rows = g.batch_sizes[t];
    at::parallel_for(0, (H + block_units - 1) / block_units, 1, [&](int64_t begin, int64_t end) {
      step(t, 0, rows, gates_data + g.offsets[t] * G, begin * block_panels,
           std::min(w_hh_packed.panels(), end * block_panels), begin * block_units,
           std::min(H, end * block_units));
    });
    finish(t, 0, rows);
  }
}

// lstm_layer, or lstm_layer_values without save_workspace: (output, hy, cy,
// workspace or undefined).
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_cpu(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes, bool reverse,
    bool save_workspace) {
  const LstmLayerGeometry g =
      check_lstm_layer(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor bias = gate_bias(b_ih, b_hh, 4 * g.hidden_size, input.options());
  const Tensor workspace = save_workspace
      ? at::empty({g.rows, layer_workspace_columns(g)}, input.options()) : Tensor();
  Tensor output = at::empty({g.rows, g.output_size}, input.options());
  Tensor h_state = hx.clone(at::MemoryFormat::Contiguous);
  Tensor c_state = cx.clone(at::MemoryFormat::Contiguous);
  if (g.rows > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_layer", [&] {
      layer_forward<scalar_t>(g, input, w_ih, w_hh, bias, w_hr, reverse, output, h_state, c_state,
                              workspace);
    });
  }
  if (!batch_sizes.has_value()) output = output.view({g.steps, g.batch, g.output_size});
  return {output, h_state, c_state, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_cpu(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes, bool reverse) {
  return layer_cpu(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, true);
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer_values_cpu(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes, bool reverse) {
  auto [output, hy, cy, workspace] =
      layer_cpu(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, false);
  return {output, hy, cy};
}

// The recurrence of the backward, in the reverse of the forward's order:
// per step, the gradient of h (from the next step and the output; through
// the projection with proj_size), the fused element-wise backward into
// grad_gates and grad_c, and grad_h = grad_gates w_hh for the step before.
template <typename T>
void layer_backward_steps(const LstmLayerGeometry& g, const Tensor& grad_output, const Tensor& ws,
                          const Tensor& w_hh, const std::optional<Tensor>& w_hr, bool reverse,
                          Tensor& grad_gates, Tensor& grad_h, Tensor& grad_c, Tensor& grad_projected) {
  const int64_t H = g.hidden_size, P = g.output_size, G = 4 * H, columns = ws.size(1);
  const cpu::PackedMatrix<T> w_hh_packed(cpu::matrix_view<T>(w_hh), G, P);
  std::optional<cpu::PackedMatrix<T>> w_hr_packed;
  if (w_hr.has_value()) w_hr_packed.emplace(cpu::matrix_view<T>(*w_hr), P, H);
  Tensor dh = at::empty({g.batch, P}, grad_output.options());
  Tensor dh_full = w_hr.has_value() ? at::empty({g.batch, H}, grad_output.options()) : Tensor();
  const T* grad_out = grad_output.const_data_ptr<T>();
  const T* ws_data = ws.const_data_ptr<T>();
  T* dh_data = dh.mutable_data_ptr<T>();
  T* gg_data = grad_gates.mutable_data_ptr<T>();
  T* gh_data = grad_h.mutable_data_ptr<T>();
  T* gc_data = grad_c.mutable_data_ptr<T>();
  // Rows [r0, r1) of step t up to grad_gates.
  const auto gates_step = [&](int64_t t, int64_t r0, int64_t r1) {
    const int64_t first = g.offsets[t] + r0, rows = r1 - r0;
    T* d = dh_data + r0 * P;
    for (int64_t i = 0; i < rows * P; ++i) d[i] = gh_data[r0 * P + i] + grad_out[first * P + i];
    if (w_hr_packed.has_value()) {
      std::memcpy(grad_projected.mutable_data_ptr<T>() + first * P, d, rows * P * sizeof(T));
      T* full = dh_full.mutable_data_ptr<T>() + r0 * H;
      cpu::gemm_packed(rows, {d, P, 1}, *w_hr_packed, full, H, false, 0, w_hr_packed->panels());
      d = full;
    }
    const T* step_ws = ws_data + first * columns;
    const CellGradArgs<T> args{step_ws, step_ws + 5 * H, d, gc_data + r0 * H, gg_data + first * G,
                               gc_data + r0 * H, H, columns, columns, H, H, H};
    PYCONVEXT_ISA_CALL(cell_backward_rows, args, 0, rows);
  };
  const auto step_of = [&](int64_t s) { return reverse ? s : g.steps - 1 - s; };
  if (split_rows(g.batch)) {
    for_row_blocks(g.batch, [&](int64_t r0, int64_t r1) {
      for (int64_t s = 0; s < g.steps; ++s) {
        const int64_t t = step_of(s), rows = std::min(r1, g.batch_sizes[t]);
        if (rows <= r0) continue;
        gates_step(t, r0, rows);
        cpu::gemm_packed(rows - r0, {gg_data + (g.offsets[t] + r0) * G, G, 1}, w_hh_packed,
                         gh_data + r0 * P, P, false, 0, w_hh_packed.panels());
      }
    });
    return;
  }
  for (int64_t s = 0; s < g.steps; ++s) {
    const int64_t t = step_of(s), rows = g.batch_sizes[t];
    for_row_blocks(rows, [&](int64_t r0, int64_t r1) { gates_step(t, r0, r1); });
    cpu::gemm(rows, {gg_data + g.offsets[t] * G, G, 1}, w_hh_packed, gh_data, P, false);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes, bool reverse,
    const Tensor& output, const Tensor& workspace, bool has_bias) {
  const LstmLayerGeometry g =
      check_lstm_layer(input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, batch_sizes);
  constexpr const char* op = "pyconvext.lstm_layer_backward";
  const int64_t H = g.hidden_size, P = g.output_size, columns = layer_workspace_columns(g);
  TORCH_CHECK(grad_output.sizes() == output.sizes() && output.numel() == g.rows * P, op,
              ": expected grad_output and output of the output's size, but got ",
              grad_output.sizes(), " and ", output.sizes());
  TORCH_CHECK(grad_hy.sizes() == hx.sizes() && grad_cy.sizes() == cx.sizes(), op,
              ": expected the gradients of hy and cy to be like hx and cx, but got ",
              grad_hy.sizes(), " and ", grad_cy.sizes());
  TORCH_CHECK(workspace.sizes() == c10::IntArrayRef({g.rows, columns}), op,
              ": expected the workspace of the forward, of size [", g.rows, ", ", columns,
              "], but got ", workspace.sizes());
  for (const Tensor* t : {&grad_output, &grad_hy, &grad_cy, &output, &workspace}) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type() && t->device() == input.device(), op,
                ": gradients, output and workspace must have the input's dtype and device");
  }
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor x = input.reshape({g.rows, g.input_size});
  const Tensor grad_out = grad_output.reshape({g.rows, P}).contiguous();
  const Tensor out = output.reshape({g.rows, P});
  const Tensor ws = workspace.contiguous();
  Tensor grad_gates = at::empty({g.rows, 4 * H}, input.options());
  Tensor grad_h = grad_hy.clone(at::MemoryFormat::Contiguous);
  Tensor grad_c = grad_cy.clone(at::MemoryFormat::Contiguous);
  Tensor grad_projected = w_hr.has_value() ? at::empty({g.rows, P}, input.options()) : Tensor();
  // Each row's previous hidden state: the output of the step before in the
  // forward's order, or hx where the sequence starts.
  Tensor h_prev = at::empty({g.rows, P}, input.options());
  for (int64_t t = 0; t < (g.rows > 0 ? g.steps : 0); ++t) {
    const int64_t rows = g.batch_sizes[t], first = g.offsets[t];
    const int64_t before = reverse ? t + 1 : t - 1;
    const int64_t carried = before >= 0 && before < g.steps ? std::min(rows, g.batch_sizes[before]) : 0;
    if (carried > 0) {
      h_prev.narrow(0, first, carried).copy_(out.narrow(0, g.offsets[before], carried));
    }
    if (carried < rows) {
      h_prev.narrow(0, first + carried, rows - carried).copy_(hx.narrow(0, carried, rows - carried));
    }
  }
  Tensor grad_input = at::empty({g.rows, g.input_size}, input.options());
  Tensor grad_w_ih = at::empty(w_ih.sizes(), input.options());
  Tensor grad_w_hh = at::empty(w_hh.sizes(), input.options());
  Tensor grad_w_hr = w_hr.has_value() ? at::empty(w_hr->sizes(), input.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_layer_backward", [&] {
    if (g.rows > 0) {
      layer_backward_steps<scalar_t>(g, grad_out, ws, w_hh, w_hr, reverse, grad_gates, grad_h,
                                     grad_c, grad_projected);
    }
    // The input and weight gradients, each one GEMM over all steps.
    cpu::gemm<scalar_t>(grad_gates, w_ih, grad_input, false);
    cpu::gemm<scalar_t>(grad_gates.t(), x, grad_w_ih, false);
    cpu::gemm<scalar_t>(grad_gates.t(), h_prev, grad_w_hh, false);
    if (w_hr.has_value()) cpu::gemm<scalar_t>(grad_projected.t(), ws.narrow(1, 6 * H, H), grad_w_hr, false);
  });
  return {grad_input.view(input.sizes()),
          grad_h,
          grad_c,
          grad_w_ih,
          grad_w_hh,
          has_bias ? at::sum(grad_gates, 0) : Tensor(),
          grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, CPU, m) {
  m.impl("lstm_cell", &lstm_cell_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
  m.impl("lstm_layer", &lstm_layer_cpu);
  m.impl("lstm_layer_values", &lstm_layer_values_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace pyconvext
