// Operator schemas of pyconvext. Kernels register per dispatch key in
// cpu/<op>.cpp and cuda/<op>.cu; autograd and fake (meta) kernels are
// registered from Python in pyconvext/_registrations.py.

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
