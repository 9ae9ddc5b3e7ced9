#include "common/lstm.h"

#include <c10/util/Exception.h>

namespace pyconvext {
namespace {

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": input (", input.scalar_type(),
              ") and ", name, " (", t.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(t.device() == input.device(), op, ": input (on ", input.device(), ") and ", name,
              " (on ", t.device(), ") must be on the same device");
}

}  // namespace

LstmCellGeometry check_lstm_cell(const at::Tensor& input, const at::Tensor& hx,
                                 const at::Tensor& cx, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                 const std::optional<at::Tensor>& b_hh) {
  constexpr const char* op = "pyconvext.lstm_cell";
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(dtype == at::kFloat || dtype == at::kDouble, op,
                              ": input has dtype ", dtype,
                              ", but only float32 and float64 are supported");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"hx", hx}, {"cx", cx},
                                {"w_ih", w_ih}, {"w_hh", w_hh}}) {
    check_like(op, name, t, input);
  }
  if (b_ih.has_value()) check_like(op, "b_ih", *b_ih, input);
  if (b_hh.has_value()) check_like(op, "b_hh", *b_hh, input);

  TORCH_CHECK(input.dim() == 2, op, ": expected input of size (batch, input_size), but got input of size ",
              input.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2 && w_hh.size(0) % 4 == 0 &&
                  w_hh.size(0) == 4 * w_hh.size(1),
              op, ": expected w_hh of size (4 * hidden_size, hidden_size), but got w_hh of size ",
              w_hh.sizes());
  LstmCellGeometry g{input.size(0), input.size(1), w_hh.size(1)};
  const int64_t H = g.hidden_size;
  TORCH_CHECK(w_ih.size(0) == 4 * H && w_ih.size(1) == g.input_size, op,
              ": expected w_ih of size (4 * hidden_size, input_size) = [", 4 * H, ", ",
              g.input_size, "], but got w_ih of size ", w_ih.sizes());
  TORCH_CHECK(hx.dim() == 2 && hx.size(0) == g.batch && hx.size(1) == H, op,
              ": expected hx of size (batch, hidden_size) = [", g.batch, ", ", H,
              "], but got hx of size ", hx.sizes());
  TORCH_CHECK(cx.dim() == 2 && cx.size(0) == g.batch && cx.size(1) == H, op,
              ": expected cx of size (batch, hidden_size) = [", g.batch, ", ", H,
              "], but got cx of size ", cx.sizes());
  for (const auto* bias : {&b_ih, &b_hh}) {
    if (bias->has_value()) {
      TORCH_CHECK((*bias)->dim() == 1 && (*bias)->size(0) == 4 * H, op,
                  ": expected biases of size (4 * hidden_size) = [", 4 * H,
                  "], but got a bias of size ", (*bias)->sizes());
    }
  }
  return g;
}

}  // namespace pyconvext
