// Linear scan h_t = a_t * h_{t-1} + x_t over dim 1 of (B, T, D) tensors, D contiguous.
//
// Pure CUDA (no torch headers) so that it can be compiled and checked on its own
// (scan_kernels_check.cu) as well as from the torch extension (scan_cuda.cu).
//
// Channels [0, split) scan left to right, channels [split, D) right to left, so one
// launch serves the forward, the reverse and the bidirectional scan.
//
// Work layout: one block owns VEC*32 channels of one batch row and walks the whole of T
// in rounds. In a round each warp takes STEPS consecutive time steps: it loads them all
// (independent loads, in flight together), scans them locally with a zero start while
// keeping the running product of the gates, publishes (product, end state) to shared
// memory, and after one barrier folds the earlier warps' pairs onto the block's carry to
// get its own starting state. Outputs are then local_state + cumulative_gate * start.
// Each element of every input is read once and every output written once, there is no
// dependency between blocks, and T can be anything.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace birdie_scan {

// ---- conversions between the storage type of x/h and the accumulation type (= gate type)
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

template <typename Out>
__device__ __forceinline__ Out narrow(float v);
template <>
__device__ __forceinline__ float narrow<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }
template <typename Out>
__device__ __forceinline__ Out narrow(double v) { return static_cast<Out>(v); }

// ---- VEC contiguous elements moved as one access (8 or 16 bytes when VEC allows)
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The machine word of a pack's size. Global accesses go through __ldg / __stwb on these
// words: those are fixed-width instructions, whereas a plain vector-typed access was split
// by the compiler into one access per element wherever it could not prove the alignment
// from the pointer arithmetic (the strided steps along T). The host guarantees alignment.
template <int BYTES>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

// Inputs are never written while a kernel runs (outputs are separate allocations), so the
// read-only path (ld.global.nc) is safe. Loads return the raw storage type: the kernels
// issue every load of a round first and widen the values only where they are used, so a
// bf16 round keeps as many loads in flight, in as many registers, as a float32 round
// (widening right after each load let the compiler serialise loads and conversions).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  using W = typename Word<sizeof(T) * VEC>::type;
  Pack<T, VEC> p;
  *reinterpret_cast<W*>(&p) = __ldg(reinterpret_cast<const W*>(ptr));
  return p;
}

// A pack of +0.0 (all bits zero in every storage type).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> zero_pack() {
  using W = typename Word<sizeof(T) * VEC>::type;
  Pack<T, VEC> p;
  *reinterpret_cast<W*>(&p) = W{};
  return p;
}

template <typename Acc, typename T, int VEC>
__device__ __forceinline__ void load_widened(const T* ptr, Acc (&out)[VEC]) {
  const Pack<T, VEC> p = load_pack<T, VEC>(ptr);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = static_cast<Acc>(widen(p.v[v]));
}

__device__ __forceinline__ unsigned int raw_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned long long raw_bits(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(v));
}
__device__ __forceinline__ unsigned short raw_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned short raw_bits(__half v) { return __half_as_ushort(v); }

// Stores VEC elements as one 2/4/8/16-byte access, the word assembled from the raw bits.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* ptr, const T (&v)[VEC]) {
  constexpr int bytes = int(sizeof(T)) * VEC;
  if constexpr (bytes == 2) {
    __stwb(reinterpret_cast<unsigned short*>(ptr), raw_bits(v[0]));
  } else {
    constexpr int n_words = bytes / 4;
    unsigned int w[n_words];
#pragma unroll
    for (int i = 0; i < n_words; ++i) {
      if constexpr (sizeof(T) == 2) {  // little endian: element 2i in the low half
        w[i] = unsigned(raw_bits(v[2 * i])) | (unsigned(raw_bits(v[2 * i + 1])) << 16);
      } else if constexpr (sizeof(T) == 4) {
        w[i] = raw_bits(v[i]);
      } else {
        const unsigned long long b = raw_bits(v[i / 2]);
        w[i] = (i % 2 == 0) ? unsigned(b) : unsigned(b >> 32);
      }
    }
    if constexpr (n_words == 1) {
      __stwb(reinterpret_cast<unsigned int*>(ptr), w[0]);
    } else if constexpr (n_words == 2) {
      __stwb(reinterpret_cast<uint2*>(ptr), make_uint2(w[0], w[1]));
    } else {
      static_assert(n_words == 4, "packs are at most 16 bytes");
      __stwb(reinterpret_cast<uint4*>(ptr), make_uint4(w[0], w[1], w[2], w[3]));
    }
  }
}

template <typename T, typename Acc, int VEC>
__device__ __forceinline__ void store_narrowed(T* ptr, const Acc (&in)[VEC]) {
  T out[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = narrow<T>(in[v]);
  store_pack<T, VEC>(ptr, out);
}

template <typename G, typename X>
struct ForwardParams {
  const G* a;  // gates (B, T, D), unit channel stride
  int64_t a_sb, a_st;
  const X* x;  // inputs (B, T, D), unit channel stride
  int64_t x_sb, x_st;
  const G* h0;  // initial state (B, D) contiguous, or nullptr for zeros
  X* h;         // states (B, T, D) contiguous
  int64_t B, T, D, split;
};

template <typename G, typename X>
struct BackwardParams {
  const G* a;
  int64_t a_sb, a_st;
  const X* h;  // states written by the forward pass
  int64_t h_sb, h_st;
  const X* dh;  // upstream gradient of the states
  int64_t dh_sb, dh_st;
  const G* h0;  // nullptr for zeros
  G* da;        // (B, T, D) contiguous
  X* dx;        // (B, T, D) contiguous
  G* dh0;       // (B, D) contiguous, always written
  int64_t B, T, D, split;
};

// Publishes this warp's (gate product, local end state) and returns the state entering its
// segment; `carry` enters the round and leaves it as the state after the round. Shared
// memory is double buffered, so a single barrier per round suffices: a warp can only
// rewrite a buffer after passing the next round's barrier, which every reader of that
// buffer must have reached first.
template <typename G, int VEC>
__device__ __forceinline__ void combine_round(const G (&prod)[VEC], const G (&end_state)[VEC],
                                              G (&carry)[VEC], G (&start)[VEC], int& buffer) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  G* smem = reinterpret_cast<G*>(smem_raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  // layout [warp][v][lane]: consecutive lanes hit consecutive banks
  G* prods = smem + buffer * (2 * warps * VEC * 32);
  G* ends = prods + warps * VEC * 32;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    prods[(warp * VEC + v) * 32 + lane] = prod[v];
    ends[(warp * VEC + v) * 32 + lane] = end_state[v];
  }
  __syncthreads();
  G running[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) running[v] = carry[v];
#pragma unroll 4
  for (int w = 0; w < warps; ++w) {
    if (w == warp) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) start[v] = running[v];
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      running[v] = prods[(w * VEC + v) * 32 + lane] * running[v] + ends[(w * VEC + v) * 32 + lane];
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) carry[v] = running[v];
  buffer ^= 1;
}

// Where a thread works: batch row b and the first of its VEC channels, c0. The host picks
// VEC dividing D and split, so all VEC channels exist (active) and share one direction.
struct Lanes {
  int64_t b, c0;
  bool active, reverse;
};

template <int VEC>
__device__ __forceinline__ Lanes thread_lanes(int lane, int64_t D, int64_t split) {
  const int64_t tiles = (D + 32 * VEC - 1) / (32 * VEC);
  const int64_t b = blockIdx.x / tiles;
  const int64_t c0 = ((blockIdx.x % tiles) * 32 + lane) * VEC;
  return Lanes{b, c0, c0 < D, c0 >= split};
}

// The state before this thread's first step: h0 (contiguous (B, D), at `offset`), or zeros.
template <typename G, int VEC>
__device__ __forceinline__ void load_initial_state(const G* h0, bool active, int64_t offset, G (&out)[VEC]) {
  if (active && h0 != nullptr) {
    load_widened<G, G, VEC>(h0 + offset, out);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = G(0);
  }
}

// One warp's loads of one forward round: STEPS steps of VEC channels, in storage types.
template <typename G, typename X, int VEC, int STEPS>
struct ForwardLoads {
  Pack<G, VEC> gate[STEPS];
  Pack<X, VEC> input[STEPS];
};

// Issues every load of the round starting at step s0 (all independent, so they are in
// flight together). Steps past T get the identity (gate 1, input 0) and are never stored.
template <typename G, typename X, int VEC, int STEPS>
__device__ __forceinline__ void load_forward_round(ForwardLoads<G, X, VEC, STEPS>& r, const G* a_row,
                                                   const X* x_row, const ForwardParams<G, X>& p,
                                                   int64_t s0, bool active, bool reverse) {
#pragma unroll
  for (int i = 0; i < STEPS; ++i) {
    const int64_t s = s0 + i;
    if (active && s < p.T) {
      const int64_t t = reverse ? p.T - 1 - s : s;
      r.gate[i] = load_pack<G, VEC>(a_row + t * p.a_st);
      r.input[i] = load_pack<X, VEC>(x_row + t * p.x_st);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) r.gate[i].v[v] = G(1);
      r.input[i] = zero_pack<X, VEC>();
    }
  }
}

// PREFETCH: the next round's loads are issued right after this round's local scan, so they
// are in flight during the barrier, the combine and the stores (twice the load registers).
template <typename G, typename X, int VEC, int STEPS, bool PREFETCH>
__global__ void __launch_bounds__(512)
    linear_scan_forward_kernel(const ForwardParams<G, X> p) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const auto [b, c0, active, reverse] = thread_lanes<VEC>(lane, p.D, p.split);
  const G* a_row = p.a + b * p.a_sb + c0;
  const X* x_row = p.x + b * p.x_sb + c0;
  X* h_row = p.h + b * p.T * p.D + c0;

  G carry[VEC];
  load_initial_state<G, VEC>(p.h0, active, b * p.D + c0, carry);

  int buffer = 0;
  const int64_t round_len = int64_t(warps) * STEPS;
  ForwardLoads<G, X, VEC, STEPS> loads;
  if constexpr (PREFETCH) load_forward_round(loads, a_row, x_row, p, int64_t(warp) * STEPS, active, reverse);
  for (int64_t round_start = 0; round_start < p.T; round_start += round_len) {
    const int64_t s0 = round_start + int64_t(warp) * STEPS;
    if constexpr (!PREFETCH) load_forward_round(loads, a_row, x_row, p, s0, active, reverse);
    // Local scan from a zero state: value[i] is the local state after step i, cum[i] the
    // product of the gates up to step i.
    G value[STEPS][VEC], cum[STEPS][VEC];
    G prod[VEC], state[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      prod[v] = G(1);
      state[v] = G(0);
    }
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        state[v] = loads.gate[i].v[v] * state[v] + G(widen(loads.input[i].v[v]));
        prod[v] = prod[v] * loads.gate[i].v[v];
        value[i][v] = state[v];
        cum[i][v] = prod[v];
      }
    }
    if constexpr (PREFETCH) load_forward_round(loads, a_row, x_row, p, s0 + round_len, active, reverse);
    G start[VEC];
    combine_round<G, VEC>(prod, state, carry, start, buffer);
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
      const int64_t s = s0 + i;
      if (active && s < p.T) {
        const int64_t t = reverse ? p.T - 1 - s : s;
        G out[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) out[v] = cum[i][v] * start[v] + value[i][v];
        store_narrowed<X, G, VEC>(h_row + t * p.D, out);
      }
    }
  }
}

// Backward of the scan, fused: for a left-to-right channel with upstream dh,
//   dx_t = dh_t + a_{t+1} dx_{t+1}   (a right-to-left scan with the gates shifted by one)
//   da_t = dx_t * h_{t-1}            (h_{-1} = h0, or 0)
//   dh0  = a_0 * dx_0
// and the mirror image for a right-to-left channel. `u` counts steps in the direction of
// the backward scan, so u = 0 is the last time step of the forward direction.
template <typename G, typename X, int VEC, int STEPS>
__global__ void __launch_bounds__(512)
    linear_scan_backward_kernel(const BackwardParams<G, X> p) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const auto [b, c0, active, reverse] = thread_lanes<VEC>(lane, p.D, p.split);
  // one step later / earlier in the forward direction of this channel
  const int64_t later = reverse ? -1 : 1;
  const G* a_row = p.a + b * p.a_sb + c0;
  const X* h_row = p.h + b * p.h_sb + c0;
  const X* dh_row = p.dh + b * p.dh_sb + c0;
  G* da_row = p.da + b * p.T * p.D + c0;
  X* dx_row = p.dx + b * p.T * p.D + c0;

  G carry[VEC], first_prev[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) carry[v] = G(0);
  load_initial_state<G, VEC>(p.h0, active, b * p.D + c0, first_prev);

  int buffer = 0;
  const int64_t round_len = int64_t(warps) * STEPS;
  for (int64_t round_start = 0; round_start < p.T; round_start += round_len) {
    const int64_t u0 = round_start + int64_t(warp) * STEPS;
    Pack<G, VEC> gate[STEPS];
    Pack<X, VEC> upstream[STEPS], prev[STEPS];
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
      const int64_t u = u0 + i;
      if (active && u < p.T) {
        const int64_t t = reverse ? u : p.T - 1 - u;
        upstream[i] = load_pack<X, VEC>(dh_row + t * p.dh_st);
        if (u >= 1) {
          gate[i] = load_pack<G, VEC>(a_row + (t + later) * p.a_st);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) gate[i].v[v] = G(0);  // nothing comes after the end
        }
        // the state before the first forward step is h0 (first_prev), not a stored state
        prev[i] = u + 1 < p.T ? load_pack<X, VEC>(h_row + (t - later) * p.h_st) : zero_pack<X, VEC>();
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) gate[i].v[v] = G(1);
        upstream[i] = zero_pack<X, VEC>();
        prev[i] = zero_pack<X, VEC>();
      }
    }
    G grad[STEPS][VEC];
    G prod[VEC], state[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      prod[v] = G(1);
      state[v] = G(0);
    }
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        state[v] = gate[i].v[v] * state[v] + G(widen(upstream[i].v[v]));
        prod[v] = prod[v] * gate[i].v[v];
        grad[i][v] = state[v];
        gate[i].v[v] = prod[v];
      }
    }
    G start[VEC];
    combine_round<G, VEC>(prod, state, carry, start, buffer);
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
      const int64_t u = u0 + i;
      if (active && u < p.T) {
        const int64_t t = reverse ? u : p.T - 1 - u;
        G dx[VEC], da[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          dx[v] = gate[i].v[v] * start[v] + grad[i][v];
          da[v] = dx[v] * (u + 1 < p.T ? G(widen(prev[i].v[v])) : first_prev[v]);
        }
        store_narrowed<X, G, VEC>(dx_row + t * p.D, dx);
        store_narrowed<G, G, VEC>(da_row + t * p.D, da);
      }
    }
  }
  if (active) {
    // carry is now dx at the first forward step of this channel
    const int64_t t_first = reverse ? p.T - 1 : 0;
    G a_first[VEC], out[VEC];
    load_widened<G, G, VEC>(a_row + t_first * p.a_st, a_first);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = a_first[v] * carry[v];
    store_narrowed<G, G, VEC>(p.dh0 + b * p.D + c0, out);
  }
}

// ---- host side: tile choice and launch, shared by the torch extension and the check

struct Tile {
  int vec;     // channels per thread (1, 2 or 4)
  int warps;   // warps per block, each taking STEPS time steps per round
  int stages;  // forward only: 1 = load a round, then use it; 2 = prefetch the next round
};

inline int64_t block_count(int64_t B, int64_t D, int vec) {
  return B * ((D + 32 * vec - 1) / (32 * vec));
}

inline bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Widest VEC that the shapes, strides and pointers allow, then narrowed while there are too
// few blocks (a block per (batch row, VEC*32 channels) is the only parallelism): below 1.5
// blocks per multiprocessor for 4- and 8-byte values, below 3 for 2-byte values, which ran
// fastest at VEC = 1 wherever that gave enough blocks (H100 sweep, trainer/scan/NOTES.md).
// requested.vec/warps/stages > 0 override the choice (vec only where legal).
// `ptrs[i]` (nullptr for an absent operand) holds elements of `elem_bytes[i]` bytes.
template <typename G, typename X, size_t N_STRIDES, size_t N_PTRS>
Tile choose_tile_for(int64_t B, int64_t D, int64_t split, const int64_t (&strides)[N_STRIDES],
                     const void* const (&ptrs)[N_PTRS], const int (&elem_bytes)[N_PTRS], int sm_count,
                     Tile requested) {
  constexpr int max_vec = sizeof(G) == 8 ? 2 : 4;  // a pack is at most 16 bytes
  constexpr int value_bytes = int(sizeof(X));
  auto allowed = [&](int v) {
    if (D % v != 0 || split % v != 0) return false;
    for (const int64_t stride : strides)
      if (stride % v != 0) return false;
    for (size_t i = 0; i < N_PTRS; ++i)
      if (ptrs[i] != nullptr && !aligned_to(ptrs[i], int64_t(v) * elem_bytes[i])) return false;
    return true;
  };
  int vec = max_vec;
  while (vec > 1 && !allowed(vec)) vec /= 2;
  if (requested.vec > 0) {
    // an explicit request is honoured only when legal, otherwise the legal width is kept
    if (requested.vec <= max_vec && allowed(requested.vec)) vec = requested.vec;
  } else {
    const int64_t min_blocks_x2 = (value_bytes <= 2 ? 6 : 3) * int64_t(sm_count);  // twice the threshold
    while (vec > 1 && 2 * block_count(B, D, vec) < min_blocks_x2) vec /= 2;
  }
  // 4 warps per block where 4-byte values give at least 1.5 blocks per multiprocessor,
  // else 8; the forward prefetches the next round (stages = 2). Both from the H100 sweep.
  int warps = 8;
  if (requested.warps > 0) {
    warps = requested.warps;
  } else if (value_bytes >= 4 && 2 * block_count(B, D, vec) >= 3 * int64_t(sm_count)) {
    warps = 4;
  }
  const int stages = requested.stages == 1 || requested.stages == 2 ? requested.stages : 2;
  return Tile{vec, warps, stages};
}

template <typename G, typename X>
Tile choose_tile(const ForwardParams<G, X>& p, int sm_count, Tile requested) {
  const int64_t strides[] = {p.a_sb, p.a_st, p.x_sb, p.x_st};
  const void* const ptrs[] = {p.a, p.x, p.h0, p.h};
  const int bytes[] = {sizeof(G), sizeof(X), sizeof(G), sizeof(X)};
  return choose_tile_for<G, X>(p.B, p.D, p.split, strides, ptrs, bytes, sm_count, requested);
}

template <typename G, typename X>
Tile choose_tile(const BackwardParams<G, X>& p, int sm_count, Tile requested) {
  const int64_t strides[] = {p.a_sb, p.a_st, p.h_sb, p.h_st, p.dh_sb, p.dh_st};
  const void* const ptrs[] = {p.a, p.h, p.dh, p.h0, p.da, p.dx, p.dh0};
  const int bytes[] = {sizeof(G), sizeof(X), sizeof(X), sizeof(G), sizeof(G), sizeof(X), sizeof(G)};
  return choose_tile_for<G, X>(p.B, p.D, p.split, strides, ptrs, bytes, sm_count, requested);
}

// Time steps per thread per round: keeps 16 values of each array in registers.
template <int VEC>
constexpr int steps_for_vec() {
  return 16 / VEC;
}

// Checks the tile, then calls launch(std::integral_constant<int, VEC>{}, grid, block, smem)
// with the tile's VEC as a compile-time constant (VEC = 4 only for gates of at most 4 bytes)
// and returns the launch's status.
template <typename G, typename Launch>
cudaError_t launch_tiled(int64_t B, int64_t T, int64_t D, Tile tile, Launch&& launch) {
  if (B == 0 || T == 0 || D == 0) return cudaSuccess;
  if (tile.warps < 1 || tile.warps > 16) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(block_count(B, D, tile.vec)));
  const dim3 block(tile.warps * 32);
  const size_t smem = size_t(2) * 2 * tile.warps * tile.vec * 32 * sizeof(G);  // combine_round's
  switch (tile.vec) {
    case 1:
      launch(std::integral_constant<int, 1>{}, grid, block, smem);
      break;
    case 2:
      launch(std::integral_constant<int, 2>{}, grid, block, smem);
      break;
    case 4:
      if constexpr (sizeof(G) <= 4) {
        launch(std::integral_constant<int, 4>{}, grid, block, smem);
        break;
      }
      return cudaErrorInvalidValue;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename G, typename X>
cudaError_t launch_forward(const ForwardParams<G, X>& p, Tile tile, cudaStream_t stream) {
  return launch_tiled<G>(p.B, p.T, p.D, tile, [&](auto vec, dim3 grid, dim3 block, size_t smem) {
    constexpr int VEC = decltype(vec)::value;
    if (tile.stages == 2) {
      linear_scan_forward_kernel<G, X, VEC, steps_for_vec<VEC>(), true><<<grid, block, smem, stream>>>(p);
    } else {
      linear_scan_forward_kernel<G, X, VEC, steps_for_vec<VEC>(), false><<<grid, block, smem, stream>>>(p);
    }
  });
}

template <typename G, typename X>
cudaError_t launch_backward(const BackwardParams<G, X>& p, Tile tile, cudaStream_t stream) {
  return launch_tiled<G>(p.B, p.T, p.D, tile, [&](auto vec, dim3 grid, dim3 block, size_t smem) {
    constexpr int VEC = decltype(vec)::value;
    linear_scan_backward_kernel<G, X, VEC, steps_for_vec<VEC>()><<<grid, block, smem, stream>>>(p);
  });
}

}  // namespace birdie_scan
