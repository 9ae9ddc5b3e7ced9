#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/host_device.h"

namespace pyconvext {

// The element-wise part of an LSTM step, shared by the CPU and CUDA kernels.
// Gates are in PyTorch's order (i, f, g, o); `Act` supplies sigmoid and tanh
// for T, which may be a scalar or a vector of lanes (only + - * and the two
// activations are used, no branches).
//
//   i = sigmoid(gate_i)   f = sigmoid(gate_f)   g = tanh(gate_g)   o = sigmoid(gate_o)
//   c = f * c_prev + i * g
//   h = o * tanh(c)
template <typename Act, typename T>
PYCONVEXT_HOST_DEVICE inline void lstm_forward_element(T gate_i, T gate_f, T gate_g, T gate_o,
                                                       T c_prev, T& i, T& f, T& g, T& o,
                                                       T& c, T& tanh_c) {
  i = Act::sigmoid(gate_i);
  f = Act::sigmoid(gate_f);
  g = Act::tanh(gate_g);
  o = Act::sigmoid(gate_o);
  c = f * c_prev + i * g;
  tanh_c = Act::tanh(c);
}

// The backward of lstm_forward_element from the saved activations: given the
// gradients dh of h and dc of c (from the next step and the loss), the
// gradients of the four gate pre-activations and of c_prev.
template <typename T>
PYCONVEXT_HOST_DEVICE inline void lstm_backward_element(T i, T f, T g, T o, T tanh_c, T c_prev,
                                                        T dh, T dc, T& d_i, T& d_f, T& d_g,
                                                        T& d_o, T& dc_prev) {
  const T one = T{} + 1;
  const T dc_total = dc + dh * o * (one - tanh_c * tanh_c);
  d_o = dh * tanh_c * o * (one - o);
  d_i = dc_total * g * i * (one - i);
  d_f = dc_total * c_prev * f * (one - f);
  d_g = dc_total * i * (one - g * g);
  dc_prev = dc_total * f;
}

// Sizes of one lstm_cell call, after validation.
struct LstmCellGeometry {
  int64_t batch, input_size, hidden_size;
};

// Validates the arguments of pyconvext::lstm_cell. Raises with a
// "pyconvext.lstm_cell: ..." message that names the problem.
LstmCellGeometry check_lstm_cell(const at::Tensor& input, const at::Tensor& hx,
                                 const at::Tensor& cx, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                 const std::optional<at::Tensor>& b_hh);

// Sizes of one lstm_layer call, after validation. The input is (steps,
// batch, input_size), or packed: (rows, input_size) with batch_sizes, the
// rows of each step (non-increasing), in order.
struct LstmLayerGeometry {
  int64_t steps, batch, rows, input_size, hidden_size;
  int64_t output_size;  // proj_size with a projection, else hidden_size
  std::vector<int64_t> batch_sizes, offsets;  // per step: rows, first row
};

// Validates the arguments of pyconvext::lstm_layer. Raises with a
// "pyconvext.lstm_layer: ..." message that names the problem.
LstmLayerGeometry check_lstm_layer(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes);

}  // namespace pyconvext
