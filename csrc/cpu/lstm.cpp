// CPU kernels for pyconvext::lstm_cell, lstm_layer and their backwards.
//
// A step is two matrix products (ATen's GEMM: the input and the recurrent
// projections, accumulated into one gates buffer with the biases) and one
// fused element-wise pass (common/lstm.h: activations, cell update, hidden
// state, and the activations saved for the backward, in one read of the
// gates). The backward mirrors it: one fused pass from the saved activations
// to the gradients of the gate pre-activations, then GEMMs for the input,
// state and weight gradients.
//
// A whole sequence (lstm_layer) projects the inputs of all steps in one GEMM
// before the recurrence, so that each step is one recurrent GEMM (plus the
// projection's, with proj_size) and one fused pass; its backward computes
// the input and weight gradients as one GEMM over all steps after it.
// Packed sequences run each step on its first batch_sizes[t] rows.

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "common/lstm.h"
#include "cpu/simd.h"

namespace pyconvext {
namespace {

using at::Tensor;

// Rows of one step's element-wise forward; strides are in elements per row.
template <typename T>
struct CellArgs {
  const T* gates;   // (rows, 4H) pre-activations
  const T* c_prev;  // (rows, H)
  T* workspace;     // rows of i, f, g, o, tanh(c) (and c_prev, with save_c_prev)
  T* c;             // (rows, H)
  T* h;             // (rows, H)
  int64_t hidden_size, c_prev_stride, workspace_stride, c_stride, h_stride;
  bool save_c_prev;
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
    PYCONVEXT_ISA_CALL(cell_forward_rows, args, begin, end);
  });
}

template <typename T>
void cell_backward(const CellGradArgs<T>& args, int64_t rows) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / args.hidden_size),
                   [&](int64_t begin, int64_t end) {
    PYCONVEXT_ISA_CALL(cell_backward_rows, args, begin, end);
  });
}

// The gate pre-activations from the input, with the biases (either may be
// missing, as in native's).
Tensor input_gates(const Tensor& input, const Tensor& w_ih, const std::optional<Tensor>& b_ih,
                   const std::optional<Tensor>& b_hh) {
  if (!b_ih.has_value() && !b_hh.has_value()) return at::mm(input, w_ih.t());
  const Tensor bias = !b_hh.has_value() ? *b_ih : !b_ih.has_value() ? *b_hh : at::add(*b_ih, *b_hh);
  return at::addmm(bias, input, w_ih.t());
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_cpu(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  const LstmCellGeometry g = check_lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t H = g.hidden_size;
  Tensor gates = input_gates(input, w_ih, b_ih, b_hh);
  gates.addmm_(hx, w_hh.t());
  const Tensor c_prev = cx.contiguous();
  Tensor hy = at::empty({g.batch, H}, input.options());
  Tensor cy = at::empty({g.batch, H}, input.options());
  Tensor workspace = at::empty({g.batch, 5 * H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_cell", [&] {
    const CellArgs<scalar_t> args{gates.const_data_ptr<scalar_t>(), c_prev.const_data_ptr<scalar_t>(),
                                  workspace.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
                                  hy.mutable_data_ptr<scalar_t>(), H, H, 5 * H, H, H, false};
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
  return {at::mm(grad_gates, w_ih), at::mm(grad_gates, w_hh), grad_cx,
          at::mm(grad_gates.t(), input), at::mm(grad_gates.t(), hx),
          has_bias ? at::sum(grad_gates, 0) : Tensor()};
}

// Workspace columns of lstm_layer: i, f, g, o, tanh(c), c_prev, and the
// hidden state before its projection (with proj_size).
int64_t layer_workspace_columns(const LstmLayerGeometry& g) {
  return (g.output_size != g.hidden_size ? 7 : 6) * g.hidden_size;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_cpu(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& batch_sizes, bool reverse) {
  const LstmLayerGeometry g =
      check_lstm_layer(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t H = g.hidden_size, P = g.output_size, columns = layer_workspace_columns(g);
  Tensor gates = input_gates(input.reshape({g.rows, g.input_size}), w_ih, b_ih, b_hh);
  Tensor workspace = at::empty({g.rows, columns}, input.options());
  Tensor output = at::empty({g.rows, P}, input.options());
  Tensor h_state = hx.clone(at::MemoryFormat::Contiguous);
  Tensor c_state = cx.clone(at::MemoryFormat::Contiguous);
  // Row-major (P, 4H): the recurrent GEMM runs faster on it than on w_hh.t().
  const Tensor w_hh_t = w_hh.t().contiguous();
  for (int64_t s = 0; s < g.steps; ++s) {
    const int64_t t = reverse ? g.steps - 1 - s : s;
    const int64_t rows = g.batch_sizes[t], first = g.offsets[t];
    Tensor step_gates = gates.narrow(0, first, rows);
    step_gates.addmm_(h_state.narrow(0, 0, rows), w_hh_t);
    Tensor step_workspace = workspace.narrow(0, first, rows);
    Tensor step_output = output.narrow(0, first, rows);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_layer", [&] {
      // Without a projection h goes to the output, else to the workspace.
      scalar_t* h = w_hr.has_value() ? step_workspace.mutable_data_ptr<scalar_t>() + 6 * H
                                     : step_output.mutable_data_ptr<scalar_t>();
      const CellArgs<scalar_t> args{step_gates.const_data_ptr<scalar_t>(),
                                    c_state.const_data_ptr<scalar_t>(),
                                    step_workspace.mutable_data_ptr<scalar_t>(),
                                    c_state.mutable_data_ptr<scalar_t>(), h, H, H, columns, H,
                                    w_hr.has_value() ? columns : P, true};
      cell_forward(args, rows);
    });
    if (w_hr.has_value()) at::mm_out(step_output, step_workspace.narrow(1, 6 * H, H), w_hr->t());
    h_state.narrow(0, 0, rows).copy_(step_output);
  }
  if (!batch_sizes.has_value()) output = output.view({g.steps, g.batch, P});
  return {output, h_state, c_state, workspace};
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
  Tensor step_grad_h = at::empty({g.batch, P}, input.options());
  Tensor step_grad_full = w_hr.has_value() ? at::empty({g.batch, H}, input.options()) : Tensor();
  Tensor grad_projected = w_hr.has_value() ? at::empty({g.rows, P}, input.options()) : Tensor();
  // Steps in the reverse of the forward's order.
  for (int64_t s = 0; s < g.steps; ++s) {
    const int64_t t = reverse ? s : g.steps - 1 - s;
    const int64_t rows = g.batch_sizes[t], first = g.offsets[t];
    Tensor dh = step_grad_h.narrow(0, 0, rows);
    at::add_out(dh, grad_h.narrow(0, 0, rows), grad_out.narrow(0, first, rows));
    if (w_hr.has_value()) {
      grad_projected.narrow(0, first, rows).copy_(dh);
      Tensor dh_full = step_grad_full.narrow(0, 0, rows);
      at::mm_out(dh_full, dh, *w_hr);
      dh = dh_full;
    }
    Tensor step_grad_gates = grad_gates.narrow(0, first, rows);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_layer_backward", [&] {
      const scalar_t* step_ws = ws.const_data_ptr<scalar_t>() + first * columns;
      const CellGradArgs<scalar_t> args{step_ws, step_ws + 5 * H, dh.const_data_ptr<scalar_t>(),
                                        grad_c.const_data_ptr<scalar_t>(),
                                        step_grad_gates.mutable_data_ptr<scalar_t>(),
                                        grad_c.mutable_data_ptr<scalar_t>(), H, columns, columns,
                                        H, H, H};
      cell_backward(args, rows);
    });
    Tensor grad_h_rows = grad_h.narrow(0, 0, rows);
    at::mm_out(grad_h_rows, step_grad_gates, w_hh);
  }
  // Each row's previous hidden state: the output of the step before in the
  // forward's order, or hx where the sequence starts.
  Tensor h_prev = at::empty({g.rows, P}, input.options());
  for (int64_t t = 0; t < g.steps; ++t) {
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
  Tensor grad_input = at::mm(grad_gates, w_ih).view(input.sizes());
  return {grad_input,
          grad_h,
          grad_c,
          at::mm(grad_gates.t(), x),
          at::mm(grad_gates.t(), h_prev),
          has_bias ? at::sum(grad_gates, 0) : Tensor(),
          w_hr.has_value() ? at::mm(grad_projected.t(), ws.narrow(1, 6 * H, H)) : Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, CPU, m) {
  m.impl("lstm_cell", &lstm_cell_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
  m.impl("lstm_layer", &lstm_layer_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace pyconvext
