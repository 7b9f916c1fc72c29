// Standalone check of scan_kernels.cuh against a float64 sequential reference on the host,
// without torch, so the kernels can be verified with nothing but nvcc and a GPU:
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -o /tmp/scan_check trainer/scan/csrc/scan_kernels_check.cu
//   /tmp/scan_check            # exit status 0 when every case passes
//
// Every case poisons the outputs first (NaN bytes), so an element the kernel forgets to
// write fails the comparison; every CUDA call is checked.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "scan_kernels.cuh"

#define CHECK_CUDA(call)                                                                   \
  do {                                                                                     \
    cudaError_t status_ = (call);                                                          \
    if (status_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                    \
                   cudaGetErrorString(status_));                                           \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

namespace {

float to_float(float v) { return v; }
float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename X>
X from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(&ptr, (count ? count : 1) * sizeof(T)));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  void upload(const std::vector<T>& host) {
    CHECK_CUDA(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n);
    CHECK_CUDA(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  void poison() { CHECK_CUDA(cudaMemset(ptr, 0xFF, n * sizeof(T))); }
};

struct Case {
  int64_t B, T, D, split;
  bool with_h0;
  int64_t t_stride_pad;  // extra elements per time step of x/a: a non-contiguous view
  birdie_scan::Tile tile;
};

// max |got - want| / max |want| over the tensor; NaN in got counts as failure (returns inf)
double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num = std::fmax(num, std::fabs(got[i] - want[i]));
    den = std::fmax(den, std::fabs(want[i]));
  }
  return num / (den > 0 ? den : 1.0);
}

template <typename X>
bool run_case(const Case& c, std::mt19937& rng, double tol) {
  const int64_t B = c.B, T = c.T, D = c.D, S = D + c.t_stride_pad;
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // inputs in strided storage (B, T, S), the view is [..., :D]
  std::vector<float> a(B * T * S, 0.5f);
  std::vector<X> x(B * T * S, from_float<X>(0.0f));
  std::vector<X> dh(B * T * D);
  std::vector<float> h0(B * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) {
        const float r = unit(rng);
        // gates near 1 (long memory) with some exact zeros (resets)
        a[(b * T + t) * S + d] = r < 0.05f ? 0.0f : 0.9f + 0.1f * unit(rng);
        x[(b * T + t) * S + d] = from_float<X>(normal(rng));
        dh[(b * T + t) * D + d] = from_float<X>(normal(rng));
      }
  for (auto& v : h0) v = normal(rng);

  // float64 reference, sequential, straight from the definitions
  std::vector<double> h_ref(B * T * D), da_ref(B * T * D), dx_ref(B * T * D), dh0_ref(B * D);
  auto A = [&](int64_t b, int64_t t, int64_t d) { return double(a[(b * T + t) * S + d]); };
  auto Xv = [&](int64_t b, int64_t t, int64_t d) { return double(to_float(x[(b * T + t) * S + d])); };
  auto G = [&](int64_t b, int64_t t, int64_t d) { return double(to_float(dh[(b * T + t) * D + d])); };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d) {
      const bool rev = d >= c.split;
      const double init = c.with_h0 ? h0[b * D + d] : 0.0;
      double state = init;
      for (int64_t k = 0; k < T; ++k) {
        const int64_t t = rev ? T - 1 - k : k;
        state = A(b, t, d) * state + Xv(b, t, d);
        h_ref[(b * T + t) * D + d] = state;
      }
      // backward, from the chain rule, walking opposite to the forward direction
      double g = 0;
      for (int64_t k = T - 1; k >= 0; --k) {
        const int64_t t = rev ? T - 1 - k : k;
        const int64_t t_next = rev ? t - 1 : t + 1;  // one forward step later
        const int64_t t_prev = rev ? t + 1 : t - 1;  // one forward step earlier
        g = G(b, t, d) + (k + 1 < T ? A(b, t_next, d) * g : 0.0);
        dx_ref[(b * T + t) * D + d] = g;
        // da uses the states as the kernel sees them: rounded to X
        const double prev =
            k > 0 ? double(to_float(from_float<X>(float(h_ref[(b * T + t_prev) * D + d])))) : init;
        da_ref[(b * T + t) * D + d] = g * prev;
      }
      const int64_t t_first = rev ? T - 1 : 0;
      dh0_ref[b * D + d] = A(b, t_first, d) * g;
    }

  DeviceBuffer<float> a_d(a.size()), h0_d(h0.size()), da_d(B * T * D), dh0_d(B * D);
  DeviceBuffer<X> x_d(x.size()), dh_d(dh.size()), h_d(B * T * D), dx_d(B * T * D);
  a_d.upload(a);
  x_d.upload(x);
  dh_d.upload(dh);
  h0_d.upload(h0);
  h_d.poison();
  da_d.poison();
  dx_d.poison();
  dh0_d.poison();

  int device = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));

  birdie_scan::ForwardParams<float, X> fp{};
  fp.a = a_d.ptr;
  fp.a_sb = T * S;
  fp.a_st = S;
  fp.x = x_d.ptr;
  fp.x_sb = T * S;
  fp.x_st = S;
  fp.h0 = c.with_h0 ? h0_d.ptr : nullptr;
  fp.h = h_d.ptr;
  fp.B = B;
  fp.T = T;
  fp.D = D;
  fp.split = c.split;
  const birdie_scan::Tile ftile = birdie_scan::choose_tile(fp, sms, c.tile);
  CHECK_CUDA(birdie_scan::launch_forward(fp, ftile, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());

  birdie_scan::BackwardParams<float, X> bp{};
  bp.a = a_d.ptr;
  bp.a_sb = T * S;
  bp.a_st = S;
  bp.h = h_d.ptr;
  bp.h_sb = T * D;
  bp.h_st = D;
  bp.dh = dh_d.ptr;
  bp.dh_sb = T * D;
  bp.dh_st = D;
  bp.h0 = c.with_h0 ? h0_d.ptr : nullptr;
  bp.da = da_d.ptr;
  bp.dx = dx_d.ptr;
  bp.dh0 = dh0_d.ptr;
  bp.B = B;
  bp.T = T;
  bp.D = D;
  bp.split = c.split;
  const birdie_scan::Tile btile = birdie_scan::choose_tile(bp, sms, c.tile);
  CHECK_CUDA(birdie_scan::launch_backward(bp, btile, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());

  auto widen_all = [](const auto& v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = double(to_float(v[i]));
    return out;
  };
  const double e_h = relative_error(widen_all(h_d.download()), h_ref);
  const double e_dx = relative_error(widen_all(dx_d.download()), dx_ref);
  const double e_da = relative_error(widen_all(da_d.download()), da_ref);
  const double e_dh0 = relative_error(widen_all(dh0_d.download()), dh0_ref);
  const bool ok = e_h <= tol && e_dx <= tol && e_da <= tol && e_dh0 <= tol;
  std::printf("%s %-5s B=%lld T=%-5lld D=%-4lld split=%-4lld h0=%d pad=%lld vec=%d/%d warps=%-2d stages=%d"
              "  err h=%.1e dx=%.1e da=%.1e dh0=%.1e\n",
              ok ? "ok  " : "FAIL", sizeof(X) == 4 ? "f32" : "bf16", (long long)B, (long long)T,
              (long long)D, (long long)c.split, int(c.with_h0), (long long)c.t_stride_pad,
              ftile.vec, btile.vec, ftile.warps, ftile.stages, e_h, e_dx, e_da, e_dh0);
  return ok;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  const int64_t lengths[] = {1, 2, 7, 127, 128, 129, 1000, 4097};
  const int64_t widths[] = {1, 3, 33, 96, 130, 256};
  for (int64_t T : lengths)
    for (int64_t D : widths) {
      const int64_t half = (D / 2) / 4 * 4;  // a split that still allows wide lanes
      cases.push_back({2, T, D, D, false, 0, {0, 0}});
      cases.push_back({2, T, D, 0, true, 0, {0, 0}});
      cases.push_back({3, T, D, half, true, 0, {0, 0}});
      cases.push_back({1, T, D, D / 2, true, 4, {0, 0}});  // odd split, strided view
    }
  // every tile variant on awkward and on aligned shapes
  for (int vec : {1, 2, 4})
    for (int warps : {1, 3, 8, 16})
      for (int stages : {1, 2}) {
        cases.push_back({2, 1000, 256, 128, true, 0, {vec, warps, stages}});
        cases.push_back({2, 4097, 64, 32, false, 8, {vec, warps, stages}});
        cases.push_back({1, 5, 36, 12, true, 0, {vec, warps, stages}});
      }
  int failures = 0;
  for (const Case& c : cases) {
    failures += run_case<float>(c, rng, 2e-5) ? 0 : 1;
    // bf16 outputs are rounded (2^-9 relative), and the errors of rounded states compound
    failures += run_case<__nv_bfloat16>(c, rng, 2e-2) ? 0 : 1;
  }
  std::printf("%d of %zu cases failed\n", failures, 2 * cases.size());
  return failures == 0 ? 0 : 1;
}
