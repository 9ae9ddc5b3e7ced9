// CPU kernels for pyconvext::lstm_cell and pyconvext::lstm_cell_backward.
//
// A step is two matrix products (ATen's GEMM: the input and the recurrent
// projections, accumulated into one gates buffer with the biases) and one
// fused element-wise pass (common/lstm.h: activations, cell update, hidden
// state, and the activations saved for the backward, in one read of the
// gates). The backward mirrors it: one fused pass from the saved activations
// to the gradients of the gate pre-activations, then GEMMs for the input,
// state and weight gradients.

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
  T* workspace;     // (rows, 5H): i, f, g, o, tanh(c)
  T* c;             // (rows, H)
  T* h;             // (rows, H)
  int64_t hidden_size, c_prev_stride, c_stride, h_stride;
};

template <typename T>
struct CellGradArgs {
  const T* workspace;  // (rows, 5H) from the forward
  const T* c_prev;     // (rows, H)
  const T* grad_h;     // (rows, H)
  const T* grad_c;     // (rows, H)
  T* grad_gates;       // (rows, 4H)
  T* grad_c_prev;      // (rows, H)
  int64_t hidden_size, c_prev_stride, grad_h_stride, grad_c_stride, grad_c_prev_stride;
};

template <typename T>
struct ScalarActivations {
  static T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
  static T tanh(T x) { return std::tanh(x); }
};

// The element-wise loops, compiled for each instruction set (see
// cpu/lstm_kernels.h), and their dispatch on the CPU's.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYCONVEXT_X86_ISAS 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace avx512 {
constexpr int kVectorBytes = 64;
#include "cpu/lstm_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kVectorBytes = 32;
#include "cpu/lstm_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace baseline {
constexpr int kVectorBytes = 16;
#include "cpu/lstm_kernels.h"
}  // namespace baseline

#ifdef PYCONVEXT_X86_ISAS
#define PYCONVEXT_ISA_CALL(name, ...)                                     \
  switch (simd::cpu_isa()) {                                              \
    case simd::Isa::Avx512: return avx512::name(__VA_ARGS__);             \
    case simd::Isa::Avx2: return avx2::name(__VA_ARGS__);                 \
    default: return baseline::name(__VA_ARGS__);                          \
  }
#else
#define PYCONVEXT_ISA_CALL(name, ...) return baseline::name(__VA_ARGS__);
#endif

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

std::tuple<Tensor, Tensor, Tensor> lstm_cell_cpu(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  const LstmCellGeometry g = check_lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t H = g.hidden_size;
  // Either bias may be missing, as in native's.
  Tensor gates;
  if (b_ih.has_value() || b_hh.has_value()) {
    const Tensor bias = !b_hh.has_value() ? *b_ih : !b_ih.has_value() ? *b_hh : at::add(*b_ih, *b_hh);
    gates = at::addmm(bias, input, w_ih.t());
  } else {
    gates = at::mm(input, w_ih.t());
  }
  gates.addmm_(hx, w_hh.t());
  const Tensor c_prev = cx.contiguous();
  Tensor hy = at::empty({g.batch, H}, input.options());
  Tensor cy = at::empty({g.batch, H}, input.options());
  Tensor workspace = at::empty({g.batch, 5 * H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyconvext.lstm_cell", [&] {
    const CellArgs<scalar_t> args{gates.const_data_ptr<scalar_t>(), c_prev.const_data_ptr<scalar_t>(),
                                  workspace.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
                                  hy.mutable_data_ptr<scalar_t>(), H, H, H, H};
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
                                      grad_cx.mutable_data_ptr<scalar_t>(), H, H, H, H, H};
    cell_backward(args, g.batch);
  });
  return {at::mm(grad_gates, w_ih), at::mm(grad_gates, w_hh), grad_cx,
          at::mm(grad_gates.t(), input), at::mm(grad_gates.t(), hx),
          has_bias ? at::sum(grad_gates, 0) : Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, CPU, m) {
  m.impl("lstm_cell", &lstm_cell_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
}

}  // namespace pyconvext
