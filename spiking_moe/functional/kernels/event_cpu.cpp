// Event-driven synaptic product for CPU tensors:
//
//   out[r, :] = bias + sum over {i : x[r, i] != 0} of x[r, i] * wt[i, :]
//
// which is F.linear(x, weight, bias) with wt = weight^T; for binary x every term is a plain row
// of wt (no multiply). The maths and the caller's contract are in spiking_moe/functional/event.py.
//
// Layout: x [R, I] contiguous (R rows: all leading dimensions folded), wt [I, O] contiguous, so
// the weight row of one input is one contiguous run of O values; bias [O] or none; out [R, O].
//
// Work is split over tiles of rows (at::parallel_for, so torch.set_num_threads applies).
// Per tile:
//  1. scan: for each row, the increasing list of its nonzero inputs, and whether every nonzero is
//     exactly 1 (a binary row, accumulated without multiplies);
//  2. accumulate: for each chunk of inputs, for each block of NB outputs, for each row of the
//     tile: NB accumulators held in vector registers start from the bias (or 0, or the output so
//     far in a later chunk), add the block of the weight row of each of the row's active inputs
//     in the chunk, in increasing index order, and are stored. Rows innermost: the [chunk, NB]
//     slice of wt they read (at most kSliceBytes) stays in L2 across the tile's rows.
// Every output is summed in the same order whatever the thread count or the instruction set
// (additions in separate vector lanes; -ffp-contract=off keeps x * w + acc as a rounded multiply
// then add), so results are bitwise identical across torch.get_num_threads() and the
// generic/AVX2/AVX-512 builds of the loop.
//
// The build folder is shared between machines, so the extension is compiled without -march; the
// hot loop is compiled a second and third time for AVX2 and AVX-512 (GCC/Clang target attributes)
// and chosen at run time from what the CPU supports.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// Rows per tile: one tile per thread where that keeps within these bounds. A tile reads each
// weight row it touches once per output block; more rows per tile, fewer re-reads from L3.
constexpr int64_t kMinRowTile = 16;
constexpr int64_t kMaxRowTile = 256;
// ... and fewer for very wide inputs: a tile's index lists can hold up to tile_rows * I entries.
constexpr int64_t kMaxTileEntries = int64_t(1) << 22;
constexpr int kVectors = 8;  // accumulator vectors per output block
// The [inputs, block] slice of wt that one output block reads is kept within this many bytes (half
// of a 1 MiB L2) by splitting the inputs into chunks; a later chunk adds to the stored output.
constexpr int64_t kSliceBytes = int64_t(512) << 10;

#if defined(__GNUC__) && defined(__x86_64__)
#define SPIKING_MOE_X86 1
#define SPIKING_MOE_TARGET(isa) __attribute__((target(isa)))
#else
#define SPIKING_MOE_X86 0
#define SPIKING_MOE_TARGET(isa)
#endif

#if defined(__GNUC__)
#define SPIKING_MOE_INLINE inline __attribute__((always_inline))
#else
#define SPIKING_MOE_INLINE inline
#endif

// The inputs of one tile as compact lists: row r's active inputs are idx[offs[r] .. offs[r+1]).
struct TileLists {
  int64_t tile_rows = 0;
  std::vector<int32_t> idx;
  std::vector<int64_t> offs;
  std::vector<uint8_t> binary;
  std::vector<int64_t> lo, hi;  // row r's entries in the current input chunk: idx[lo[r] .. hi[r])
};

// The scan of one row: appends the indices of its nonzero inputs (NaN counts as nonzero, +0 and -0
// do not) to idx in increasing order and returns their number; *binary: whether all of them are
// exactly 1. The x86 versions compare kLanes inputs at a time into a bit mask (AVX-512:
// compress-stored, branch-free; SSE2/AVX2: one iteration per set bit) and may write up to 16
// slots past the last index (the caller leaves room). They carry their own target attributes
// (intrinsics cannot be inlined into code compiled for less), so they are called, not inlined.

// Inputs [k, n_in) one at a time, branch-free; the tail of the vector scans, or all of it.
template <typename T>
SPIKING_MOE_INLINE int64_t scan_scalar(const T* __restrict__ xr, int64_t k, int64_t n_in,
                                       int32_t* __restrict__ idx, int64_t count, bool* other) {
  bool not_binary = *other;
  for (; k < n_in; ++k) {
    const T v = xr[k];
    const bool active = v != T(0);
    idx[count] = static_cast<int32_t>(k);
    count += active;
    not_binary |= active & (v != T(1));
  }
  *other = not_binary;
  return count;
}

#if SPIKING_MOE_X86
// Appends k + (index of each set bit of mask), lowest first.
SPIKING_MOE_INLINE int64_t append_bits(uint32_t mask, int64_t k, int32_t* idx, int64_t count) {
  for (; mask != 0; mask &= mask - 1) {
    idx[count++] = static_cast<int32_t>(k + __builtin_ctz(mask));
  }
  return count;
}

template <typename T>
int64_t scan_sse2(const T* __restrict__ xr, int64_t n_in, int32_t* __restrict__ idx,
                  bool* binary) {
  constexpr int64_t kLanes = 16 / sizeof(T);
  int64_t count = 0;
  uint32_t not_binary = 0;
  int64_t k = 0;
  for (; k + kLanes <= n_in; k += kLanes) {
    uint32_t active, not_one;
    if constexpr (std::is_same_v<T, float>) {
      const __m128 v = _mm_loadu_ps(xr + k);
      active = _mm_movemask_ps(_mm_cmpneq_ps(v, _mm_setzero_ps()));
      not_one = _mm_movemask_ps(_mm_cmpneq_ps(v, _mm_set1_ps(1.0f)));
    } else {
      const __m128d v = _mm_loadu_pd(xr + k);
      active = _mm_movemask_pd(_mm_cmpneq_pd(v, _mm_setzero_pd()));
      not_one = _mm_movemask_pd(_mm_cmpneq_pd(v, _mm_set1_pd(1.0)));
    }
    not_binary |= active & not_one;
    count = append_bits(active, k, idx, count);
  }
  bool other = not_binary != 0;
  count = scan_scalar<T>(xr, k, n_in, idx, count, &other);
  *binary = !other;
  return count;
}

template <typename T>
SPIKING_MOE_TARGET("avx2")
int64_t scan_avx2(const T* __restrict__ xr, int64_t n_in, int32_t* __restrict__ idx,
                  bool* binary) {
  constexpr int64_t kLanes = 32 / sizeof(T);
  int64_t count = 0;
  uint32_t not_binary = 0;
  int64_t k = 0;
  for (; k + kLanes <= n_in; k += kLanes) {
    uint32_t active, not_one;
    if constexpr (std::is_same_v<T, float>) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      active = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ));
      not_one = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(1.0f), _CMP_NEQ_UQ));
    } else {
      const __m256d v = _mm256_loadu_pd(xr + k);
      active = _mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_NEQ_UQ));
      not_one = _mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_set1_pd(1.0), _CMP_NEQ_UQ));
    }
    not_binary |= active & not_one;
    count = append_bits(active, k, idx, count);
  }
  bool other = not_binary != 0;
  count = scan_scalar<T>(xr, k, n_in, idx, count, &other);
  *binary = !other;
  return count;
}

template <typename T>
SPIKING_MOE_TARGET("avx512f")
int64_t scan_avx512(const T* __restrict__ xr, int64_t n_in, int32_t* __restrict__ idx,
                    bool* binary) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t count = 0;
  uint32_t not_binary = 0;
  int64_t k = 0;
  for (; k + kLanes <= n_in; k += kLanes) {
    uint32_t active, not_one;
    if constexpr (std::is_same_v<T, float>) {
      const __m512 v = _mm512_loadu_ps(xr + k);
      active = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      not_one = _mm512_cmp_ps_mask(v, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ);
    } else {
      const __m512d v = _mm512_loadu_pd(xr + k);
      active = _mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_NEQ_UQ);
      not_one = _mm512_cmp_pd_mask(v, _mm512_set1_pd(1.0), _CMP_NEQ_UQ);
    }
    not_binary |= active & not_one;
    // Indices k, k + 1, ..., the active ones packed to the front, stored 16 at a time.
    const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(k)), iota);
    _mm512_storeu_si512(idx + count,
                        _mm512_maskz_compress_epi32(static_cast<__mmask16>(active), lanes));
    count += __builtin_popcount(active);
  }
  bool other = not_binary != 0;
  count = scan_scalar<T>(xr, k, n_in, idx, count, &other);
  *binary = !other;
  return count;
}
#endif

template <typename T, int BYTES>
SPIKING_MOE_INLINE int64_t scan_row(const T* xr, int64_t n_in, int32_t* idx, bool* binary) {
#if SPIKING_MOE_X86
  if constexpr (BYTES == 64) return scan_avx512<T>(xr, n_in, idx, binary);
  if constexpr (BYTES == 32) return scan_avx2<T>(xr, n_in, idx, binary);
  return scan_sse2<T>(xr, n_in, idx, binary);
#else
  bool other = false;
  const int64_t count = scan_scalar<T>(xr, 0, n_in, idx, 0, &other);
  *binary = !other;
  return count;
#endif
}

// One full block of NB = kVectors * BYTES / sizeof(T) outputs of one row, accumulated in
// registers (GCC/Clang vector extensions: compiled to the enclosing function's instruction set).
// init: the bias, the output itself (a later input chunk), or null (zeros).
template <typename T, int BYTES, bool BINARY>
SPIKING_MOE_INLINE void block_full(const T* __restrict__ wt, int64_t n_out, const int32_t* idx,
                                   int64_t count, const T* __restrict__ xr, const T* init, T* out) {
  typedef T V __attribute__((vector_size(BYTES)));
  typedef T VU __attribute__((vector_size(BYTES), aligned(alignof(T))));  // unaligned access
  constexpr int kLanes = BYTES / sizeof(T);
  V acc[kVectors];
#pragma GCC unroll 16
  for (int v = 0; v < kVectors; ++v) {
    acc[v] = init ? *reinterpret_cast<const VU*>(init + v * kLanes) : V{};
  }
  for (int64_t a = 0; a < count; ++a) {
    const T* __restrict__ w = wt + static_cast<int64_t>(idx[a]) * n_out;
    if constexpr (BINARY) {
#pragma GCC unroll 16
      for (int v = 0; v < kVectors; ++v) acc[v] += *reinterpret_cast<const VU*>(w + v * kLanes);
    } else {
      const T s = xr[idx[a]];
#pragma GCC unroll 16
      for (int v = 0; v < kVectors; ++v) {
        acc[v] += s * *reinterpret_cast<const VU*>(w + v * kLanes);
      }
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < kVectors; ++v) *reinterpret_cast<VU*>(out + v * kLanes) = acc[v];
}

// The last, partial block (len < NB outputs): the same sums, in the same order, in memory.
template <typename T, int BYTES>
SPIKING_MOE_INLINE void block_tail(const T* __restrict__ wt, int64_t n_out, const int32_t* idx,
                                   int64_t count, const T* __restrict__ xr, bool binary,
                                   const T* init, T* out, int64_t len) {
  if (init != out) {
    for (int64_t j = 0; j < len; ++j) out[j] = init ? init[j] : T(0);
  }
  for (int64_t a = 0; a < count; ++a) {
    const T* __restrict__ w = wt + static_cast<int64_t>(idx[a]) * n_out;
    if (binary) {
      for (int64_t j = 0; j < len; ++j) out[j] += w[j];
    } else {
      const T s = xr[idx[a]];
      for (int64_t j = 0; j < len; ++j) out[j] += s * w[j];
    }
  }
}

// Tiles [t_begin, t_end): scan, then accumulate. Inlined into one wrapper per instruction set.
template <typename T, int BYTES>
SPIKING_MOE_INLINE void tiles_impl(const T* x, const T* wt, const T* bias, T* out, int64_t rows,
                                   int64_t n_in, int64_t n_out, int64_t t_begin, int64_t t_end,
                                   TileLists& lists) {
  constexpr int64_t kBlock = kVectors * BYTES / sizeof(T);
  constexpr int64_t chunk = std::max<int64_t>(1, kSliceBytes / (kBlock * sizeof(T)));
  const int64_t full_end = n_out / kBlock * kBlock;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t r0 = t * lists.tile_rows;
    const int64_t n_rows = std::min(lists.tile_rows, rows - r0);
    int64_t* offs = lists.offs.data();
    offs[0] = 0;
    for (int64_t r = 0; r < n_rows; ++r) {
      // Room for a whole row (+16: the scan may write past the last index); grows by
      // doubling, so a sparse tile never holds tile_rows * I slots.
      const size_t need = static_cast<size_t>(offs[r] + n_in + 16);
      if (lists.idx.size() < need) lists.idx.resize(std::max(need, 2 * lists.idx.size()));
      bool binary = true;
      const int64_t count =
          scan_row<T, BYTES>(x + (r0 + r) * n_in, n_in, lists.idx.data() + offs[r], &binary);
      offs[r + 1] = offs[r] + count;
      lists.binary[r] = binary;
    }
    const int32_t* idx = lists.idx.data();
    int64_t* lo = lists.lo.data();
    int64_t* hi = lists.hi.data();
    for (int64_t r = 0; r < n_rows; ++r) hi[r] = offs[r];
    for (int64_t i0 = 0; i0 < std::max<int64_t>(n_in, 1); i0 += chunk) {
      const int64_t i1 = std::min(n_in, i0 + chunk);
      for (int64_t r = 0; r < n_rows; ++r) {
        lo[r] = hi[r];
        while (hi[r] < offs[r + 1] && idx[hi[r]] < i1) ++hi[r];
      }
      for (int64_t n0 = 0; n0 < full_end; n0 += kBlock) {
        for (int64_t r = 0; r < n_rows; ++r) {
          T* o = out + (r0 + r) * n_out + n0;
          const T* init = i0 > 0 ? o : (bias ? bias + n0 : nullptr);
          const T* xr = x + (r0 + r) * n_in;
          if (lists.binary[r]) {
            block_full<T, BYTES, true>(wt + n0, n_out, idx + lo[r], hi[r] - lo[r], xr, init, o);
          } else {
            block_full<T, BYTES, false>(wt + n0, n_out, idx + lo[r], hi[r] - lo[r], xr, init, o);
          }
        }
      }
      if (full_end < n_out) {
        for (int64_t r = 0; r < n_rows; ++r) {
          T* o = out + (r0 + r) * n_out + full_end;
          const T* init = i0 > 0 ? o : (bias ? bias + full_end : nullptr);
          block_tail<T, BYTES>(wt + full_end, n_out, idx + lo[r], hi[r] - lo[r],
                               x + (r0 + r) * n_in, lists.binary[r], init, o, n_out - full_end);
        }
      }
    }
  }
}

template <typename T>
void tiles_generic(const T* x, const T* wt, const T* bias, T* out, int64_t rows, int64_t n_in,
                   int64_t n_out, int64_t t_begin, int64_t t_end, TileLists& lists) {
  tiles_impl<T, 16>(x, wt, bias, out, rows, n_in, n_out, t_begin, t_end, lists);
}

#if SPIKING_MOE_X86
template <typename T>
SPIKING_MOE_TARGET("avx2")
void tiles_avx2(const T* x, const T* wt, const T* bias, T* out, int64_t rows, int64_t n_in,
                int64_t n_out, int64_t t_begin, int64_t t_end, TileLists& lists) {
  tiles_impl<T, 32>(x, wt, bias, out, rows, n_in, n_out, t_begin, t_end, lists);
}

template <typename T>
SPIKING_MOE_TARGET("avx512f")
void tiles_avx512(const T* x, const T* wt, const T* bias, T* out, int64_t rows, int64_t n_in,
                  int64_t n_out, int64_t t_begin, int64_t t_end, TileLists& lists) {
  tiles_impl<T, 64>(x, wt, bias, out, rows, n_in, n_out, t_begin, t_end, lists);
}
#endif

// The instruction sets this CPU can run, best last.
std::vector<std::string> available_isas() {
  std::vector<std::string> isas{"generic"};
#if SPIKING_MOE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) isas.push_back("avx2");
  if (__builtin_cpu_supports("avx512f")) isas.push_back("avx512");
#endif
  return isas;
}

const std::string& best_isa() {
  static const std::string best = available_isas().back();
  return best;
}

template <typename T>
using TilesFn = void (*)(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t,
                         int64_t, TileLists&);

template <typename T>
TilesFn<T> tiles_for(const std::string& isa) {
#if SPIKING_MOE_X86
  if (isa == "avx512") return &tiles_avx512<T>;
  if (isa == "avx2") return &tiles_avx2<T>;
#endif
  return &tiles_generic<T>;
}

// Number of nonzero entries of x (+0 and -0 count as zero, NaN as nonzero), for the density
// test: a test on the bits without the sign, counted in 32-bit lanes, which vectorises.
template <typename T>
int64_t count_nonzero(const T* x, int64_t numel) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr U kMagnitude = ~U(0) >> 1;
  constexpr int64_t kGrain = int64_t(1) << 16;
  return at::parallel_reduce(
      0, numel, kGrain, int64_t(0),
      [&](int64_t begin, int64_t end, int64_t partial) {
        for (int64_t lo = begin; lo < end; lo += kGrain) {
          const int64_t hi = std::min(end, lo + kGrain);
          uint32_t count = 0;
          for (int64_t i = lo; i < hi; ++i) {
            U u;
            std::memcpy(&u, x + i, sizeof(U));
            count += static_cast<uint32_t>((u & kMagnitude) != 0);
          }
          partial += count;
        }
        return partial;
      },
      [](int64_t a, int64_t b) { return a + b; });
}

}  // namespace

// x [R, I], weight_t [I, O], bias [O] or None, all contiguous CPU tensors of one floating dtype.
// Returns out [R, O]; or None, without computing anything, when the fraction of nonzero entries
// of x exceeds max_density (the caller then runs the dense product). isa: "auto" (the best this
// CPU runs) or one of available_isas().
c10::optional<torch::Tensor> event_linear_forward(const torch::Tensor& x,
                                                  const torch::Tensor& weight_t,
                                                  const c10::optional<torch::Tensor>& bias,
                                                  double max_density, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && weight_t.dim() == 2, "x [R, I] and weight_t [I, O] must be 2-D");
  TORCH_CHECK(x.device().is_cpu() && weight_t.device().is_cpu(), "tensors must be on the CPU");
  TORCH_CHECK(x.is_contiguous() && weight_t.is_contiguous(), "x and weight_t must be contiguous");
  TORCH_CHECK(x.scalar_type() == weight_t.scalar_type(), "x has dtype ", x.scalar_type(),
              ", weight_t ", weight_t.scalar_type());
  TORCH_CHECK(x.size(1) == weight_t.size(0), "x has ", x.size(1), " input features, weight_t ",
              weight_t.size(0));
  TORCH_CHECK(x.size(1) <= INT32_MAX, "at most 2^31 - 1 input features");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous() && bias->dim() == 1 &&
                    bias->size(0) == weight_t.size(1) &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be a contiguous CPU tensor [O] of x's dtype");
  }
  const auto isas = available_isas();
  const std::string chosen = isa == "auto" ? best_isa() : isa;
  TORCH_CHECK(std::find(isas.begin(), isas.end(), chosen) != isas.end(), "instruction set '",
              isa, "' is not available on this CPU");
  const int64_t rows = x.size(0);
  const int64_t n_in = x.size(1);
  const int64_t n_out = weight_t.size(1);
  c10::optional<torch::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "event_linear_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (max_density < 1.0 && x.numel() > 0) {
      const int64_t nonzero = count_nonzero<scalar_t>(xp, x.numel());
      if (static_cast<double>(nonzero) > max_density * static_cast<double>(x.numel())) return;
    }
    auto out = torch::empty({rows, n_out}, x.options());
    if (rows == 0 || n_out == 0) {
      result = out;
      return;
    }
    const scalar_t* wp = weight_t.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const TilesFn<scalar_t> tiles = tiles_for<scalar_t>(chosen);
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t max_tile =
        std::clamp(kMaxTileEntries / std::max<int64_t>(n_in, 1), int64_t(1), kMaxRowTile);
    const int64_t tile_rows =
        std::clamp((rows + threads - 1) / threads, std::min(kMinRowTile, max_tile), max_tile);
    const int64_t n_tiles = (rows + tile_rows - 1) / tile_rows;
    at::parallel_for(0, n_tiles, 1, [&](int64_t t_begin, int64_t t_end) {
      TileLists lists;
      lists.tile_rows = tile_rows;
      lists.offs.resize(tile_rows + 1);
      lists.binary.resize(tile_rows);
      lists.lo.resize(tile_rows);
      lists.hi.resize(tile_rows);
      tiles(xp, wp, bp, op, rows, n_in, n_out, t_begin, t_end, lists);
    });
    result = out;
  });
  return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("event_linear_forward", &event_linear_forward,
        "event-driven x @ weight_t + bias for sparse x (CPU); None above max_density");
  m.def("available_isas", &available_isas,
        "instruction sets of the accumulation loop this CPU runs, best last");
  m.def("best_isa", &best_isa, "the instruction set used by isa='auto'");
}
