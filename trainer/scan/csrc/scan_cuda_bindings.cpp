// Python bindings of the CUDA backend (kept out of the .cu so nvcc never sees pybind11).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

at::Tensor linear_scan_forward_cuda(const at::Tensor& a, const at::Tensor& x,
                                    const std::optional<at::Tensor>& h0, int64_t split,
                                    int64_t vec, int64_t warps, int64_t stages);

std::vector<at::Tensor> linear_scan_backward_cuda(const at::Tensor& a, const at::Tensor& h,
                                                  const at::Tensor& dh,
                                                  const std::optional<at::Tensor>& h0,
                                                  int64_t split, int64_t vec, int64_t warps,
                                                  int64_t stages);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Linear scan h_t = a_t h_{t-1} + x_t, CUDA backend";
  // vec / warps / stages: tile override for tuning, 0 = automatic choice
  m.def("forward", &linear_scan_forward_cuda, "states (B, T, D)", pybind11::arg("a"),
        pybind11::arg("x"), pybind11::arg("initial_state"), pybind11::arg("split"),
        pybind11::arg("vec") = 0, pybind11::arg("warps") = 0, pybind11::arg("stages") = 0);
  m.def("backward", &linear_scan_backward_cuda, "(grad_a, grad_x, grad_initial_state)",
        pybind11::arg("a"), pybind11::arg("h"), pybind11::arg("grad_h"),
        pybind11::arg("initial_state"), pybind11::arg("split"), pybind11::arg("vec") = 0,
        pybind11::arg("warps") = 0, pybind11::arg("stages") = 0);
}
