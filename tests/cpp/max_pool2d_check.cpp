// Calls pyconvext::max_pool2d, max_pool2d_values and max_pool2d_backward from
// C++ through pyconvext.h and compares them with ATen's max pooling. Exits
// non-zero on any mismatch. Built by CMakeLists.txt and run by
// tests/test_cpp_api.py.

#include <ATen/ATen.h>
#include <pyconvext.h>

#include <cstdio>
#include <vector>

namespace {

struct Case {
  const char* name;
  std::vector<int64_t> input, kernel, stride, padding, dilation;
  bool ceil_mode;
  bool channels_last;
};

bool same(const char* what, const Case& c, const at::Tensor& got, const at::Tensor& want) {
  if (got.sizes() == want.sizes() && got.strides() == want.strides() && at::equal(got, want)) {
    return true;
  }
  std::printf("FAIL %s: %s differs from ATen\n", c.name, what);
  return false;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      {"basic", {2, 3, 9, 8}, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false, false},
      {"overlapping_padded_ceil", {2, 4, 11, 12}, {3, 3}, {2, 2}, {1, 1}, {1, 1}, true, false},
      {"dilated_channels_last", {2, 5, 10, 9}, {3, 2}, {1, 2}, {1, 1}, {2, 1}, false, true},
      {"batchless", {3, 7, 7}, {3, 3}, {2, 2}, {1, 1}, {1, 1}, true, false},
  };
  bool ok = true;
  for (const Case& c : cases) {
    at::Tensor x = at::randn(c.input, at::kDouble);
    if (c.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
    auto [out, indices] =
        pyconvext::max_pool2d(x, c.kernel, c.stride, c.padding, c.dilation, c.ceil_mode);
    auto [want, want_indices] =
        at::max_pool2d_with_indices(x, c.kernel, c.stride, c.padding, c.dilation, c.ceil_mode);
    ok &= same("output", c, out, want);
    ok &= same("indices", c, indices, want_indices);
    ok &= same("values-only output", c,
               pyconvext::max_pool2d_values(x, c.kernel, c.stride, c.padding, c.dilation,
                                            c.ceil_mode),
               want);
    const at::Tensor grad_out = at::randn_like(want);
    ok &= same("grad_input", c,
               pyconvext::max_pool2d_backward(grad_out, x, indices, c.kernel, c.stride, c.padding,
                                              c.dilation, c.ceil_mode),
               at::max_pool2d_with_indices_backward(grad_out, x, c.kernel, c.stride, c.padding,
                                                    c.dilation, c.ceil_mode, want_indices));
  }
  if (!ok) return 1;
  std::printf("ok: %zu cases match ATen\n", cases.size());
  return 0;
}
