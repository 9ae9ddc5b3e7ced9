// Operator schemas of pyconvext. Kernels register per dispatch key in
// cpu/<op>.cpp and cuda/<op>.cu; autograd and fake (meta) kernels are
// registered from Python in pyconvext/_registrations.py, but for the autograd
// kernels of max_pool2d_values and lstm_layer_values (below).

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include "cpu/simd.h"

TORCH_LIBRARY(pyconvext, m) {
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Returns (output, indices): indices are flat positions in the input's H*W plane.
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The output of max_pool2d without its indices, for inference.
  m.def(
      "max_pool2d_values(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // One LSTM step (gates i, f, g, o): returns (hy, cy, workspace), the
  // workspace holding the activations the backward needs.
  m.def(
      "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of (input, hx, cx, w_ih, w_hh, bias): the bias gradient (of
  // b_ih and of b_hh alike) is undefined without has_bias.
  m.def(
      "lstm_cell_backward(Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, Tensor cx, "
      "Tensor w_ih, Tensor w_hh, Tensor workspace, bool has_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // A whole sequence in one direction: input (steps, batch, input_size), or
  // packed rows with batch_sizes; w_hr projects the hidden state (proj_size).
  // Returns (output, hy, cy, workspace).
  m.def(
      "lstm_layer(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The (output, hy, cy) of lstm_layer without its workspace, for inference.
  m.def(
      "lstm_layer_values(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of (input, hx, cx, w_ih, w_hh, bias, w_hr); bias and w_hr
  // undefined where absent.
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, "
      "Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, Tensor output, Tensor workspace, bool has_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

namespace {

// The operator `name`, typed as its autograd kernel F, to call below autograd.
template <typename F>
c10::TypedOperatorHandle<F> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

// max_pool2d_values has no gradient (its backward would need the indices it
// does not compute). Its autograd kernel refuses an input that needs one and
// otherwise goes straight on to the CPU or CUDA kernel; in C++ it costs a
// fraction of what a Python autograd kernel adds to every call.
at::Tensor max_pool2d_values_autograd(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                      c10::IntArrayRef stride, c10::IntArrayRef padding,
                                      c10::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(!(input.requires_grad() && at::GradMode::is_enabled()),
              "pyconvext.max_pool2d_values: the input requires grad, but this operator has no "
              "gradient; use pyconvext::max_pool2d, which returns the indices its backward needs "
              "(pyconvext.functional.max_pool2d chooses it by itself)");
  static const auto op = typed_op<decltype(max_pool2d_values_autograd)>("pyconvext::max_pool2d_values");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, kernel_size, stride, padding, dilation, ceil_mode);
}

// Likewise for lstm_layer_values, which saves no activations for a backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_values_autograd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const auto needs_grad = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(needs_grad(input) || needs_grad(hx) || needs_grad(cx) || needs_grad(w_ih) ||
                    needs_grad(w_hh) || needs_grad(b_ih.value_or(at::Tensor())) ||
                    needs_grad(b_hh.value_or(at::Tensor())) || needs_grad(w_hr.value_or(at::Tensor()))),
              "pyconvext.lstm_layer_values: an argument requires grad, but this operator has no "
              "gradient; use pyconvext::lstm_layer, which saves what its backward needs "
              "(pyconvext.functional.lstm chooses it by itself)");
  static const auto op = typed_op<decltype(lstm_layer_values_autograd)>("pyconvext::lstm_layer_values");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconvext, Autograd, m) {
  m.impl("max_pool2d_values", &max_pool2d_values_autograd);
  m.impl("lstm_layer_values", &lstm_layer_values_autograd);
}

// Built as the Python extension pyconvext._C: importing it loads this library,
// whose static initializers register the operators above. The module's one
// attribute names the vector instructions the CPU kernels use.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr &&
      PyModule_AddStringConstant(m, "cpu_capability",
                                 pyconvext::simd::isa_name(pyconvext::simd::cpu_isa())) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
