// Argument checks shared by the CPU and CUDA entry points. The Python wrapper already
// validates user input with friendlier messages; these guard direct calls into the
// extension so that a bad call fails loudly instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace birdie_scan {

inline void check_states_like(const at::Tensor& t, const at::Tensor& a, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be (B, T, D), got ", t.sizes());
  TORCH_CHECK(t.sizes() == a.sizes(), name, " has shape ", t.sizes(), " but a has ", a.sizes());
  TORCH_CHECK(t.device() == a.device(), name, " is on ", t.device(), " but a is on ", a.device());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, " needs unit stride along D");
}

inline void check_gate_and_value_types(const at::Tensor& a, const at::Tensor& x) {
  const auto g = a.scalar_type();
  const auto v = x.scalar_type();
  TORCH_CHECK(g == at::kFloat || g == at::kDouble, "gates a must be float32 or float64, got ", g);
  if (g == at::kDouble) {
    TORCH_CHECK(v == at::kDouble, "float64 gates need float64 inputs, got ", v);
  } else {
    TORCH_CHECK(v == at::kFloat || v == at::kBFloat16 || v == at::kHalf,
                "float32 gates take float32, bfloat16 or float16 inputs, got ", v);
  }
}

inline void check_initial_state(const std::optional<at::Tensor>& h0, const at::Tensor& a) {
  if (!h0.has_value()) return;
  TORCH_CHECK(h0->dim() == 2 && h0->size(0) == a.size(0) && h0->size(1) == a.size(2),
              "initial state must be (B, D) = (", a.size(0), ", ", a.size(2), "), got ",
              h0->sizes());
  TORCH_CHECK(h0->scalar_type() == a.scalar_type(), "initial state must have the gates' dtype ",
              a.scalar_type(), ", got ", h0->scalar_type());
  TORCH_CHECK(h0->is_contiguous(), "initial state must be contiguous");
  TORCH_CHECK(h0->device() == a.device(), "initial state is on ", h0->device(), " but a is on ",
              a.device());
}

inline void check_forward(const at::Tensor& a, const at::Tensor& x,
                          const std::optional<at::Tensor>& h0, int64_t split) {
  TORCH_CHECK(a.dim() == 3, "a must be (B, T, D), got ", a.sizes());
  TORCH_CHECK(a.size(2) <= 1 || a.stride(2) == 1, "a needs unit stride along D");
  check_states_like(x, a, "x");
  check_gate_and_value_types(a, x);
  check_initial_state(h0, a);
  TORCH_CHECK(split >= 0 && split <= a.size(2), "split must lie in [0, D], got ", split);
}

inline void check_backward(const at::Tensor& a, const at::Tensor& h, const at::Tensor& dh,
                           const std::optional<at::Tensor>& h0, int64_t split) {
  check_forward(a, h, h0, split);
  check_states_like(dh, a, "grad_h");
  TORCH_CHECK(dh.scalar_type() == h.scalar_type(), "grad_h must have the states' dtype ",
              h.scalar_type(), ", got ", dh.scalar_type());
}

}  // namespace birdie_scan

// The supported (gate, value) dtype pairs: (f64, f64) and (f32, f32 | bf16 | f16).
#define BIRDIE_DISPATCH_TYPES(a, x, CALL)                              \
  if ((a).scalar_type() == at::kDouble) {                              \
    using G = double;                                                  \
    using X = double;                                                  \
    CALL;                                                              \
  } else if ((x).scalar_type() == at::kFloat) {                        \
    using G = float;                                                   \
    using X = float;                                                   \
    CALL;                                                              \
  } else if ((x).scalar_type() == at::kBFloat16) {                     \
    using G = float;                                                   \
    using X = at::BFloat16;                                            \
    CALL;                                                              \
  } else if ((x).scalar_type() == at::kHalf) {                         \
    using G = float;                                                   \
    using X = at::Half;                                                \
    CALL;                                                              \
  } else {                                                             \
    TORCH_CHECK(false, "unsupported input dtype ", (x).scalar_type()); \
  }
