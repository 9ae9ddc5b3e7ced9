// Calls pyconvext's operators from C++ on tensors that require grad and
// takes gradients with backward(), through the autograd kernels the library
// registers; compares every gradient with ATen's. Exits non-zero on any
// mismatch. Built by CMakeLists.txt and run by tests/test_cpp_api.py.

#include <ATen/ATen.h>
#include <pyconvext.h>
#include <torch/autograd.h>

#include <cstdio>
#include <vector>

namespace {

using at::Tensor;

// Leaves of the same values for ours and for ATen's.
std::vector<Tensor> leaves(const std::vector<Tensor>& values) {
  std::vector<Tensor> out;
  for (const Tensor& v : values) out.push_back(v.clone().requires_grad_(true));
  return out;
}

bool same_grads(const char* name, const std::vector<Tensor>& ours, const std::vector<Tensor>& theirs) {
  for (size_t i = 0; i < ours.size(); ++i) {
    if (!ours[i].grad().defined() || !at::allclose(ours[i].grad(), theirs[i].grad(), 1e-7, 1e-7)) {
      std::printf("FAIL %s: the gradient of argument %zu differs from ATen's\n", name, i);
      return false;
    }
  }
  return true;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  bool ok = true;
  int cases = 0;

  {  // conv2d with bias, strided and padded
    const std::vector<Tensor> values = {at::randn({2, 3, 9, 8}, f64), at::randn({4, 3, 3, 3}, f64),
                                        at::randn({4}, f64)};
    auto ours = leaves(values), theirs = leaves(values);
    const Tensor g = at::randn({2, 4, 5, 8}, f64);
    pyconvext::conv2d(ours[0], ours[1], ours[2], {2, 1}, {1, 1}).backward(g);
    at::conv2d(theirs[0], theirs[1], theirs[2], {2, 1}, {1, 1}).backward(g);
    ok &= same_grads("conv2d", ours, theirs);
    ++cases;
  }
  {  // max_pool2d's values, through its indices
    const std::vector<Tensor> values = {at::randn({2, 3, 8, 7}, f64)};
    auto ours = leaves(values), theirs = leaves(values);
    const Tensor g = at::randn({2, 3, 4, 4}, f64);
    std::get<0>(pyconvext::max_pool2d(ours[0], {2, 2}, {2, 2}, {0, 1})).backward(g);
    at::max_pool2d(theirs[0], {2, 2}, {2, 2}, {0, 1}).backward(g);
    ok &= same_grads("max_pool2d", ours, theirs);
    ++cases;
  }
  {  // lstm_cell: both states and every weight
    const std::vector<Tensor> values = {at::randn({3, 5}, f64), at::randn({3, 4}, f64), at::randn({3, 4}, f64),
                                        at::randn({16, 5}, f64), at::randn({16, 4}, f64), at::randn({16}, f64),
                                        at::randn({16}, f64)};
    auto ours = leaves(values), theirs = leaves(values);
    auto [hy, cy, workspace] = pyconvext::lstm_cell(ours[0], ours[1], ours[2], ours[3], ours[4], ours[5], ours[6]);
    (hy.sum() + 2 * cy.sum()).backward();
    auto [h, c] = at::lstm_cell(theirs[0], {theirs[1], theirs[2]}, theirs[3], theirs[4], theirs[5], theirs[6]);
    (h.sum() + 2 * c.sum()).backward();
    ok &= same_grads("lstm_cell", ours, theirs);
    ++cases;
  }
  {  // lstm_layer over a whole sequence, against ATen's one-layer LSTM
    const std::vector<Tensor> values = {at::randn({6, 2, 5}, f64), at::randn({2, 4}, f64), at::randn({2, 4}, f64),
                                        at::randn({16, 5}, f64), at::randn({16, 4}, f64), at::randn({16}, f64),
                                        at::randn({16}, f64)};
    auto ours = leaves(values), theirs = leaves(values);
    auto [output, hy, cy, workspace] = pyconvext::lstm_layer(ours[0], ours[1], ours[2], ours[3], ours[4], ours[5],
                                                             ours[6], std::nullopt, std::nullopt, false);
    (output.sum() + hy.sum() + cy.sum()).backward();
    auto [out, h, c] = at::lstm(theirs[0], {theirs[1].unsqueeze(0), theirs[2].unsqueeze(0)},
                                {theirs[3], theirs[4], theirs[5], theirs[6]}, true, 1, 0.0, false, false, false);
    (out.sum() + h.sum() + c.sum()).backward();
    ok &= same_grads("lstm_layer", ours, theirs);
    ++cases;
  }
  if (!ok) return 1;
  std::printf("ok: %d cases match ATen\n", cases);
  return 0;
}
