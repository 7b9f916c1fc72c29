// CPU backend of the linear scan: same contract as the CUDA kernels (scan_kernels.cuh).
//
// A work item is (batch row, range of channels of one direction) and walks T, keeping its
// states in a small buffer; the inner loop runs over contiguous channels and vectorises.
// Ranges are as wide as the thread count allows: walking whole rows turns the three
// strided streams into long sequential runs the prefetchers follow (at D = 512, 64-channel
// blocks ran at a third of the copy bandwidth, whole rows at the copy bandwidth).
// Accumulation is in the gate type (float or double).
//
// Lean headers (per-operator ATen, torch's pybind glue) instead of torch/extension.h:
// that halves the first-use JIT build.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <vector>

#include "scan_checks.h"

namespace {

// Ranges are never narrower than this (unless the direction has fewer channels) ...
constexpr int64_t kMinRange = 64;
// ... and a parallel region needs this many elements per item to pay for itself.
constexpr int64_t kMinElementsPerItem = 1 << 16;

// (batch row, first channel, channel count, direction) of one work item
struct WorkItem {
  int64_t b, c_begin, count;
  bool reverse;
};

// Channels [0, split) forward and [split, D) reverse, each (when not empty) cut into ranges.
struct WorkSplit {
  int64_t split, D, forward_pieces, reverse_pieces, forward_width, reverse_width;

  int64_t per_row() const { return forward_pieces + reverse_pieces; }
  int64_t max_width() const { return std::max(forward_width, reverse_width); }
  WorkItem item(int64_t index) const {
    const int64_t b = index / per_row();
    const int64_t k = index % per_row();
    const bool reverse = k >= forward_pieces;
    const int64_t begin = reverse ? split : 0, end = reverse ? D : split;
    const int64_t width = reverse ? reverse_width : forward_width;
    const int64_t piece = reverse ? k - forward_pieces : k;
    const int64_t c = std::min(end, begin + piece * width);
    return {b, c, std::min(width, end - c), reverse};  // count may be 0 after rounding
  }
};

int64_t range_width(int64_t channels, int64_t pieces) {
  const int64_t width = (channels + pieces - 1) / pieces;
  return std::min(channels, (width + 15) / 16 * 16);  // whole cache lines of floats
}

WorkSplit make_split(int64_t B, int64_t D, int64_t split) {
  // enough items per batch row that every thread gets one, but no narrower than kMinRange
  const int64_t threads = at::get_num_threads();
  int64_t pieces = std::max<int64_t>(1, (threads + B - 1) / B);
  pieces = std::min(pieces, std::max<int64_t>(1, std::max(split, D - split) / kMinRange));
  return {split, D, split > 0 ? pieces : 0, split < D ? pieces : 0,
          range_width(split, pieces), range_width(D - split, pieces)};
}

int64_t grain_size(int64_t T, const WorkSplit& work) {
  return std::max<int64_t>(1, kMinElementsPerItem / std::max<int64_t>(1, T * work.max_width()));
}

// ---- inner loops over contiguous channels; __restrict__ lets them vectorise

template <typename G, typename X>
inline void forward_step(const G* __restrict__ a, const X* __restrict__ x, X* __restrict__ h,
                         G* __restrict__ state, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const G s = a[c] * state[c] + static_cast<G>(x[c]);
    state[c] = s;
    h[c] = static_cast<X>(s);
  }
}

template <typename G, typename X>
inline void backward_grad_step(const G* __restrict__ a_next, const X* __restrict__ dh,
                               X* __restrict__ dx, G* __restrict__ grad, int64_t n) {
  if (a_next == nullptr) {  // the last forward step: nothing flows in from later
    for (int64_t c = 0; c < n; ++c) {
      grad[c] = static_cast<G>(dh[c]);
      dx[c] = static_cast<X>(grad[c]);
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const G g = a_next[c] * grad[c] + static_cast<G>(dh[c]);
      grad[c] = g;
      dx[c] = static_cast<X>(g);
    }
  }
}

template <typename G, typename P>
inline void gate_grad_step(const G* __restrict__ grad, const P* __restrict__ prev,
                           G* __restrict__ da, int64_t n) {
  if (prev == nullptr) {  // first forward step without an initial state
    for (int64_t c = 0; c < n; ++c) da[c] = G(0);
  } else {
    for (int64_t c = 0; c < n; ++c) da[c] = grad[c] * static_cast<G>(prev[c]);
  }
}

template <typename G, typename X>
void forward_impl(const at::Tensor& a, const at::Tensor& x, const std::optional<at::Tensor>& h0,
                  at::Tensor& h, int64_t split) {
  const int64_t B = a.size(0), T = a.size(1), D = a.size(2);
  const G* a_ptr = a.data_ptr<G>();
  const X* x_ptr = x.data_ptr<X>();
  const G* h0_ptr = h0.has_value() ? h0->data_ptr<G>() : nullptr;
  X* h_ptr = h.data_ptr<X>();
  const int64_t a_sb = a.stride(0), a_st = a.stride(1), x_sb = x.stride(0), x_st = x.stride(1);
  const WorkSplit work = make_split(B, D, split);

  at::parallel_for(0, B * work.per_row(), grain_size(T, work), [&](int64_t begin, int64_t end) {
    std::vector<G> state(work.max_width());
    for (int64_t index = begin; index < end; ++index) {
      const WorkItem w = work.item(index);
      if (w.count <= 0) continue;
      for (int64_t c = 0; c < w.count; ++c)
        state[c] = h0_ptr ? h0_ptr[w.b * D + w.c_begin + c] : G(0);
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = w.reverse ? T - 1 - step : step;
        forward_step<G, X>(a_ptr + w.b * a_sb + t * a_st + w.c_begin,
                           x_ptr + w.b * x_sb + t * x_st + w.c_begin,
                           h_ptr + (w.b * T + t) * D + w.c_begin, state.data(), w.count);
      }
    }
  });
}

// dx_t = dh_t + a_{t+1} dx_{t+1}, da_t = dx_t h_{t-1}, dh0 = a_0 dx_0 for a left-to-right
// channel; mirrored for a right-to-left one. `u` walks in the backward direction.
template <typename G, typename X>
void backward_impl(const at::Tensor& a, const at::Tensor& h, const at::Tensor& dh,
                   const std::optional<at::Tensor>& h0, at::Tensor& da, at::Tensor& dx,
                   at::Tensor& dh0, int64_t split) {
  const int64_t B = a.size(0), T = a.size(1), D = a.size(2);
  const G* a_ptr = a.data_ptr<G>();
  const X* h_ptr = h.data_ptr<X>();
  const X* dh_ptr = dh.data_ptr<X>();
  const G* h0_ptr = h0.has_value() ? h0->data_ptr<G>() : nullptr;
  G* da_ptr = da.data_ptr<G>();
  X* dx_ptr = dx.data_ptr<X>();
  G* dh0_ptr = dh0.data_ptr<G>();
  const int64_t a_sb = a.stride(0), a_st = a.stride(1);
  const int64_t h_sb = h.stride(0), h_st = h.stride(1);
  const int64_t dh_sb = dh.stride(0), dh_st = dh.stride(1);
  const WorkSplit work = make_split(B, D, split);

  at::parallel_for(0, B * work.per_row(), grain_size(T, work), [&](int64_t begin, int64_t end) {
    std::vector<G> grad(work.max_width());
    for (int64_t index = begin; index < end; ++index) {
      const WorkItem w = work.item(index);
      if (w.count <= 0) continue;
      const int64_t later = w.reverse ? -1 : 1;  // next step in the forward direction
      for (int64_t u = 0; u < T; ++u) {
        const int64_t t = w.reverse ? u : T - 1 - u;
        const int64_t out = (w.b * T + t) * D + w.c_begin;
        const G* a_next = u == 0 ? nullptr : a_ptr + w.b * a_sb + (t + later) * a_st + w.c_begin;
        backward_grad_step<G, X>(a_next, dh_ptr + w.b * dh_sb + t * dh_st + w.c_begin,
                                 dx_ptr + out, grad.data(), w.count);
        if (u + 1 < T) {
          gate_grad_step<G, X>(grad.data(), h_ptr + w.b * h_sb + (t - later) * h_st + w.c_begin,
                               da_ptr + out, w.count);
        } else {
          gate_grad_step<G, G>(grad.data(), h0_ptr ? h0_ptr + w.b * D + w.c_begin : nullptr,
                               da_ptr + out, w.count);
        }
      }
      const int64_t t_first = w.reverse ? T - 1 : 0;
      const G* a_first = a_ptr + w.b * a_sb + t_first * a_st + w.c_begin;
      for (int64_t c = 0; c < w.count; ++c) dh0_ptr[w.b * D + w.c_begin + c] = a_first[c] * grad[c];
    }
  });
}

at::Tensor linear_scan_forward(const at::Tensor& a, const at::Tensor& x,
                               const std::optional<at::Tensor>& h0, int64_t split) {
  birdie_scan::check_forward(a, x, h0, split);
  TORCH_CHECK(a.device().is_cpu(), "the CPU backend needs CPU tensors, got ", a.device());
  at::Tensor h = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (h.numel() == 0) return h;
  BIRDIE_DISPATCH_TYPES(a, x, (forward_impl<G, X>(a, x, h0, h, split)));
  return h;
}

std::vector<at::Tensor> linear_scan_backward(const at::Tensor& a, const at::Tensor& h,
                                             const at::Tensor& dh,
                                             const std::optional<at::Tensor>& h0,
                                             int64_t split) {
  birdie_scan::check_backward(a, h, dh, h0, split);
  TORCH_CHECK(a.device().is_cpu(), "the CPU backend needs CPU tensors, got ", a.device());
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor da = at::empty(a.sizes(), a.options().memory_format(contiguous));
  at::Tensor dx = at::empty(h.sizes(), h.options().memory_format(contiguous));
  at::Tensor dh0 = at::zeros({a.size(0), a.size(2)}, a.options());
  if (da.numel() == 0) return {da, dx, dh0};
  BIRDIE_DISPATCH_TYPES(a, h, (backward_impl<G, X>(a, h, dh, h0, da, dx, dh0, split)));
  return {da, dx, dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Linear scan h_t = a_t h_{t-1} + x_t, CPU backend";
  m.def("forward", &linear_scan_forward, "states (B, T, D)", pybind11::arg("a"),
        pybind11::arg("x"), pybind11::arg("initial_state"), pybind11::arg("split"));
  m.def("backward", &linear_scan_backward, "(grad_a, grad_x, grad_initial_state)",
        pybind11::arg("a"), pybind11::arg("h"), pybind11::arg("grad_h"),
        pybind11::arg("initial_state"), pybind11::arg("split"));
}
