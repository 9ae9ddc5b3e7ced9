// Calls pyconvext::conv2d and conv2d_backward from C++ through pyconvext.h and
// compares them with ATen's convolution. Exits non-zero on any mismatch.
// Built by CMakeLists.txt and run by tests/test_cpp_api.py.

#include <ATen/ATen.h>
#include <pyconvext.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

struct Case {
  const char* name;
  std::vector<int64_t> input, weight;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

bool close(const char* what, const Case& c, const at::Tensor& got, const at::Tensor& want) {
  if (got.sizes() == want.sizes() && at::allclose(got, want, 1e-7, 1e-7)) return true;
  std::printf("FAIL %s: %s differs from ATen\n", c.name, what);
  return false;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const std::vector<Case> cases = {
      {"basic", {2, 3, 9, 8}, {4, 3, 3, 3}, {1, 1}, {0, 0}, {1, 1}, 1},
      {"strided_padded_dilated", {2, 4, 11, 12}, {6, 2, 3, 2}, {2, 1}, {1, 2}, {2, 1}, 2},
      {"depthwise", {2, 5, 8, 9}, {5, 1, 3, 3}, {1, 1}, {1, 1}, {1, 1}, 5},
      {"pointwise", {2, 8, 6, 5}, {4, 8, 1, 1}, {1, 1}, {0, 0}, {1, 1}, 1},
      {"batchless", {3, 7, 7}, {2, 3, 3, 3}, {1, 1}, {1, 1}, {1, 1}, 1},
  };
  bool ok = true;
  for (const Case& c : cases) {
    const at::Tensor x = at::randn(c.input, f64), w = at::randn(c.weight, f64);
    const at::Tensor b = at::randn({c.weight[0]}, f64);
    const at::Tensor out = pyconvext::conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    const at::Tensor want = at::conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    ok &= close("output", c, out, want);

    const at::Tensor grad_out = at::randn_like(want);
    const bool batched = x.dim() == 4;
    auto [gi, gw, gb] = pyconvext::conv2d_backward(grad_out, x, w, c.stride, c.padding, c.dilation,
                                                   c.groups, {true, true, true});
    auto [ri, rw, rb] = at::convolution_backward(
        batched ? grad_out : grad_out.unsqueeze(0), batched ? x : x.unsqueeze(0), w,
        c10::IntArrayRef{c.weight[0]}, c.stride, c.padding, c.dilation, false, {0, 0}, c.groups,
        {true, true, true});
    ok &= close("grad_input", c, gi, batched ? ri : ri.squeeze(0));
    ok &= close("grad_weight", c, gw, rw);
    ok &= close("grad_bias", c, gb, rb);
  }

  // Bad input raises the shared check's message.
  try {
    pyconvext::conv2d(at::randn({1, 3, 8, 8}), at::randn({4, 3, 3, 3}), std::nullopt, {0, 1});
    std::printf("FAIL: stride 0 was accepted\n");
    ok = false;
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    if (message.rfind("pyconvext.conv2d: stride must be positive", 0) != 0) {
      std::printf("FAIL: unexpected message: %s\n", message.c_str());
      ok = false;
    }
  }

  if (!ok) return 1;
  std::printf("ok: %zu cases match ATen\n", cases.size());
  return 0;
}
