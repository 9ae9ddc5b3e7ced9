// Operator schemas of pyconvext. Kernels register per dispatch key: CPU in
// cpu/<op>.cpp, CUDA in cuda/<op>.cu, Autograd in autograd/<op>.cpp; fake
// (meta) kernels from Python, in pyconvext/_registrations.py.

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
