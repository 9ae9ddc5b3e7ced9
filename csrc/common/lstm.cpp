#include "common/lstm.h"

#include <c10/util/Exception.h>

#include "common/sizes.h"

namespace pyconvext {
namespace {

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": input (", input.scalar_type(),
              ") and ", name, " (", t.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(t.device() == input.device(), op, ": input (on ", input.device(), ") and ", name,
              " (on ", t.device(), ") must be on the same device");
}

// The input's dtype is supported; every other tensor has its dtype and device.
void check_dtypes_and_devices(const char* op, const at::Tensor& input, const at::Tensor& hx,
                              const at::Tensor& cx, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                              const std::optional<at::Tensor>& b_hh,
                              const std::optional<at::Tensor>& w_hr) {
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
  if (w_hr.has_value()) check_like(op, "w_hr", *w_hr, input);
}

// The sizes of w_ih, hx (batch by hx_size, named hx_size_name), cx and the
// biases, given those of the input and of the hidden state.
void check_sizes(const char* op, int64_t batch, int64_t input_size, int64_t hidden_size,
                 int64_t hx_size, const char* hx_size_name, const at::Tensor& w_ih,
                 const at::Tensor& hx, const at::Tensor& cx,
                 const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  const int64_t H = hidden_size;
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 4 * H && w_ih.size(1) == input_size, op,
              ": expected w_ih of size (4 * hidden_size, input_size) = [", 4 * H, ", ",
              input_size, "], but got w_ih of size ", w_ih.sizes());
  TORCH_CHECK(hx.dim() == 2 && hx.size(0) == batch && hx.size(1) == hx_size, op,
              ": expected hx of size (batch, ", hx_size_name, ") = [", batch, ", ", hx_size,
              "], but got hx of size ", hx.sizes());
  TORCH_CHECK(cx.dim() == 2 && cx.size(0) == batch && cx.size(1) == H, op,
              ": expected cx of size (batch, hidden_size) = [", batch, ", ", H,
              "], but got cx of size ", cx.sizes());
  for (const auto* bias : {&b_ih, &b_hh}) {
    if (bias->has_value()) {
      TORCH_CHECK((*bias)->dim() == 1 && (*bias)->size(0) == 4 * H, op,
                  ": expected biases of size (4 * hidden_size) = [", 4 * H,
                  "], but got a bias of size ", (*bias)->sizes());
    }
  }
}

}  // namespace

LstmCellGeometry check_lstm_cell(const at::Tensor& input, const at::Tensor& hx,
                                 const at::Tensor& cx, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                 const std::optional<at::Tensor>& b_hh) {
  constexpr const char* op = "pyconvext.lstm_cell";
  check_dtypes_and_devices(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, std::nullopt);

  TORCH_CHECK(input.dim() == 2, op, ": expected input of size (batch, input_size), but got input of size ",
              input.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2 && w_hh.size(0) % 4 == 0 &&
                  w_hh.size(0) == 4 * w_hh.size(1),
              op, ": expected w_hh of size (4 * hidden_size, hidden_size), but got w_hh of size ",
              w_hh.sizes());
  LstmCellGeometry g{input.size(0), input.size(1), w_hh.size(1)};
  check_sizes(op, g.batch, g.input_size, g.hidden_size, g.hidden_size, "hidden_size", w_ih, hx,
              cx, b_ih, b_hh);
  return g;
}

LstmLayerGeometry check_lstm_layer(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* op = "pyconvext.lstm_layer";
  check_dtypes_and_devices(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr);

  LstmLayerGeometry g{};
  if (batch_sizes.has_value()) {
    TORCH_CHECK(batch_sizes->dim() == 1 && batch_sizes->scalar_type() == at::kLong &&
                    batch_sizes->device().is_cpu(),
                op, ": expected batch_sizes to be a 1-D int64 CPU tensor, but got ",
                batch_sizes->sizes(), " ", batch_sizes->scalar_type(), " on ",
                batch_sizes->device());
    TORCH_CHECK(input.dim() == 2, op,
                ": expected packed input of size (rows, input_size), but got input of size ",
                input.sizes());
    const auto sizes = batch_sizes->contiguous();
    const int64_t* data = sizes.const_data_ptr<int64_t>();
    g.batch_sizes.assign(data, data + sizes.numel());
    g.steps = sizes.numel();
    g.batch = g.steps > 0 ? g.batch_sizes[0] : 0;
    int64_t rows = 0;
    for (int64_t t = 0; t < g.steps; ++t) {
      TORCH_CHECK(g.batch_sizes[t] >= 0 && (t == 0 || g.batch_sizes[t] <= g.batch_sizes[t - 1]),
                  op, ": batch_sizes must be non-negative and non-increasing, but got ",
                  c10::IntArrayRef(g.batch_sizes));
      g.offsets.push_back(rows);
      rows = sizes::add(rows, g.batch_sizes[t], op, "batch_sizes (their sum)");
    }
    TORCH_CHECK(rows == input.size(0), op, ": batch_sizes add up to ", rows,
                " rows, but the packed input has ", input.size(0));
    g.rows = rows;
  } else {
    TORCH_CHECK(input.dim() == 3, op,
                ": expected input of size (steps, batch, input_size), but got input of size ",
                input.sizes());
    g.steps = input.size(0);
    g.batch = input.size(1);
    g.rows = g.steps * g.batch;  // the input's own element count bounds it
    // (An empty batch has no rows to run: the kernels return at once, for
    // any number of steps, and need no per-step table.)
    for (int64_t t = 0; t < (g.batch > 0 ? g.steps : 0); ++t) {
      g.batch_sizes.push_back(g.batch);
      g.offsets.push_back(t * g.batch);
    }
  }
  // As native, which refuses an empty sequence.
  TORCH_CHECK(g.steps > 0, op, ": expected a sequence of at least one step, but got input of size ",
              input.sizes(), batch_sizes.has_value() ? " with no batch_sizes" : "");
  // Steps of no rows (last, as the sizes do not increase) change nothing: as
  // native, they are accepted, and the kernels never see them.
  while (batch_sizes.has_value() && g.steps > 0 && g.batch_sizes[g.steps - 1] == 0) {
    g.batch_sizes.pop_back();
    g.offsets.pop_back();
    --g.steps;
  }
  g.input_size = input.size(-1);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0, op,
              ": expected w_hh of size (4 * hidden_size, hidden_size or proj_size), but got "
              "w_hh of size ", w_hh.sizes());
  g.hidden_size = w_hh.size(0) / 4;
  const int64_t H = g.hidden_size;
  g.output_size = H;
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == H && w_hr->size(0) < H, op,
                ": expected w_hr of size (proj_size, hidden_size) with proj_size < hidden_size = ",
                H, ", but got w_hr of size ", w_hr->sizes());
    g.output_size = w_hr->size(0);
  }
  const int64_t P = g.output_size;
  TORCH_CHECK(w_hh.size(1) == P, op, ": expected w_hh of size [", 4 * H, ", ", P,
              "], but got w_hh of size ", w_hh.sizes());
  check_sizes(op, g.batch, g.input_size, H, P, w_hr.has_value() ? "proj_size" : "hidden_size",
              w_ih, hx, cx, b_ih, b_hh);
  return g;
}

}  // namespace pyconvext
