#pragma once

// The outputs of a torch::autograd::Function must be defined tensors, but a
// backward operator leaves undefined the gradients it was not asked for:
// its Function returns the defined ones only, and these put them back in
// place.

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/variable.h>

#include <array>
#include <cstddef>

namespace pyconvext {

template <size_t N>
torch::autograd::variable_list defined_only(const std::array<at::Tensor, N>& results) {
  torch::autograd::variable_list out;
  for (const at::Tensor& t : results) {
    if (t.defined()) out.push_back(t);
  }
  return out;
}

// The tensors of `compact` at the positions where `present` is true, in order.
template <size_t N>
std::array<at::Tensor, N> in_place(const torch::autograd::variable_list& compact, const std::array<bool, N>& present) {
  std::array<at::Tensor, N> out;
  size_t next = 0;
  for (size_t i = 0; i < N; ++i) {
    if (present[i]) out[i] = compact.at(next++);
  }
  return out;
}

}  // namespace pyconvext
