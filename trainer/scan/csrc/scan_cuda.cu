// Torch side of the CUDA backend: tensors in, kernels from scan_kernels.cuh launched on the
// current stream, tensors out.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "scan_checks.h"
#include "scan_kernels.cuh"

namespace {

template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};

template <typename T>
auto device_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename DeviceType<T>::type*>(t.data_ptr<T>());
}

// Only c10's CUDA headers are used: ATen/cuda/CUDAContext.h pulls in the cuBLAS and
// cuSPARSE headers, which a bare nvcc install may lack.
int sm_count(const at::Tensor& t) {
  int count = 0;
  const cudaError_t status =
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index());
  TORCH_CHECK(status == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(status));
  return count;
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

template <typename G, typename X>
void forward_typed(const at::Tensor& a, const at::Tensor& x, const std::optional<at::Tensor>& h0,
                   at::Tensor& h, int64_t split, birdie_scan::Tile requested) {
  using DG = typename DeviceType<G>::type;
  using DX = typename DeviceType<X>::type;
  birdie_scan::ForwardParams<DG, DX> p{};
  p.a = device_ptr<G>(a);
  p.a_sb = a.stride(0);
  p.a_st = a.stride(1);
  p.x = device_ptr<X>(x);
  p.x_sb = x.stride(0);
  p.x_st = x.stride(1);
  p.h0 = h0.has_value() ? device_ptr<G>(*h0) : nullptr;
  p.h = device_ptr<X>(h);
  p.B = a.size(0);
  p.T = a.size(1);
  p.D = a.size(2);
  p.split = split;
  const birdie_scan::Tile tile = birdie_scan::choose_tile(p, sm_count(a), requested);
  check_launch(birdie_scan::launch_forward(p, tile, c10::cuda::getCurrentCUDAStream().stream()),
               "linear_scan forward kernel");
}

template <typename G, typename X>
void backward_typed(const at::Tensor& a, const at::Tensor& h, const at::Tensor& dh,
                    const std::optional<at::Tensor>& h0, at::Tensor& da, at::Tensor& dx,
                    at::Tensor& dh0, int64_t split, birdie_scan::Tile requested) {
  using DG = typename DeviceType<G>::type;
  using DX = typename DeviceType<X>::type;
  birdie_scan::BackwardParams<DG, DX> p{};
  p.a = device_ptr<G>(a);
  p.a_sb = a.stride(0);
  p.a_st = a.stride(1);
  p.h = device_ptr<X>(h);
  p.h_sb = h.stride(0);
  p.h_st = h.stride(1);
  p.dh = device_ptr<X>(dh);
  p.dh_sb = dh.stride(0);
  p.dh_st = dh.stride(1);
  p.h0 = h0.has_value() ? device_ptr<G>(*h0) : nullptr;
  p.da = device_ptr<G>(da);
  p.dx = device_ptr<X>(dx);
  p.dh0 = device_ptr<G>(dh0);
  p.B = a.size(0);
  p.T = a.size(1);
  p.D = a.size(2);
  p.split = split;
  const birdie_scan::Tile tile = birdie_scan::choose_tile(p, sm_count(a), requested);
  check_launch(birdie_scan::launch_backward(p, tile, c10::cuda::getCurrentCUDAStream().stream()),
               "linear_scan backward kernel");
}

}  // namespace

at::Tensor linear_scan_forward_cuda(const at::Tensor& a, const at::Tensor& x,
                                    const std::optional<at::Tensor>& h0, int64_t split,
                                    int64_t vec, int64_t warps, int64_t stages) {
  birdie_scan::check_forward(a, x, h0, split);
  TORCH_CHECK(a.is_cuda(), "the CUDA backend needs CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor h = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (h.numel() == 0) return h;
  const birdie_scan::Tile requested{static_cast<int>(vec), static_cast<int>(warps),
                                    static_cast<int>(stages)};
  BIRDIE_DISPATCH_TYPES(a, x, (forward_typed<G, X>(a, x, h0, h, split, requested)));
  return h;
}

std::vector<at::Tensor> linear_scan_backward_cuda(const at::Tensor& a, const at::Tensor& h,
                                                  const at::Tensor& dh,
                                                  const std::optional<at::Tensor>& h0,
                                                  int64_t split, int64_t vec, int64_t warps,
                                                  int64_t stages) {
  birdie_scan::check_backward(a, h, dh, h0, split);
  TORCH_CHECK(a.is_cuda(), "the CUDA backend needs CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor da = at::empty(a.sizes(), a.options().memory_format(contiguous));
  at::Tensor dx = at::empty(h.sizes(), h.options().memory_format(contiguous));
  at::Tensor dh0 = at::zeros({a.size(0), a.size(2)}, a.options());
  if (da.numel() == 0) return {da, dx, dh0};
  const birdie_scan::Tile requested{static_cast<int>(vec), static_cast<int>(warps),
                                    static_cast<int>(stages)};
  BIRDIE_DISPATCH_TYPES(a, h, (backward_typed<G, X>(a, h, dh, h0, da, dx, dh0, split, requested)));
  return {da, dx, dh0};
}
