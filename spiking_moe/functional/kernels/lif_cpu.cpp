// Fused multi-step LIF for CPU tensors: the loop over T runs inside one call.
//
// The maths (forward, and the BPTT adjoint used by backward) is written out once in
// spiking_moe/functional/kernels/__init__.py. Layout: every [T, N] array is contiguous and
// time-major, N = all neuron dimensions folded together; beta and theta arrive expanded to [N].
//
// Work is split over chunks of neurons (at::parallel_for, so torch.set_num_threads applies);
// inside a chunk the time loop is outermost and the neuron loop innermost, so the state arrays
// stay in L1 and each step streams contiguous rows that the compiler vectorises.
// Built with -ffp-contract=off: h = beta * v + x must round exactly like PyTorch's separate
// mul and add, so spikes match the reference loop bit for bit.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kChunk = 1024;

// The ids live in one Python table, SURROGATE_IDS in protocol.py; cpu_fused.py passes each as
// -DSPIKING_MOE_SURROGATE_<NAME>=<id>, so no number is written here that could drift from it.
#if !defined(SPIKING_MOE_SURROGATE_FAST_SIGMOID) || !defined(SPIKING_MOE_SURROGATE_ATAN) || \
    !defined(SPIKING_MOE_SURROGATE_SIGMOID) || !defined(SPIKING_MOE_SURROGATE_TRIANGLE) ||   \
    !defined(SPIKING_MOE_SURROGATE_BOXCAR)
#error "surrogate ids missing: build through spiking_moe.functional.kernels.cpu_fused"
#endif

enum SurrogateId : int {
  kFastSigmoid = SPIKING_MOE_SURROGATE_FAST_SIGMOID,
  kAtan = SPIKING_MOE_SURROGATE_ATAN,
  kSigmoid = SPIKING_MOE_SURROGATE_SIGMOID,
  kTriangle = SPIKING_MOE_SURROGATE_TRIANGLE,
  kBoxcar = SPIKING_MOE_SURROGATE_BOXCAR,
};

template <int S, typename T>
inline T surrogate_grad(T x, T alpha) {
  if constexpr (S == kFastSigmoid) {
    const T d = alpha * std::abs(x) + T(1);
    return T(1) / (d * d);
  } else if constexpr (S == kAtan) {
    const T u = T(M_PI / 2.0) * alpha * x;
    return (alpha / T(2)) / (T(1) + u * u);
  } else if constexpr (S == kSigmoid) {
    const T sig = T(1) / (T(1) + std::exp(-alpha * x));
    return alpha * sig * (T(1) - sig);
  } else if constexpr (S == kTriangle) {
    return alpha * std::max(T(1) - alpha * std::abs(x), T(0));
  } else {
    static_assert(S == kBoxcar, "surrogate_grad: unknown surrogate id");
    return alpha * static_cast<T>(std::abs(x) <= T(0.5) / alpha);
  }
}

// The membrane after the reset: h (1 - s) for a hard reset, h - theta s for a soft one.
template <bool ZERO, typename T>
inline T reset(T h, T s, T theta) {
  return ZERO ? h * (T(1) - s) : h - theta * s;
}

// body(lo, len) for every chunk [lo, lo + len) of kChunk neurons, chunks spread over the
// threads; chunks are independent (the recurrence runs along T, never across neurons).
template <typename Body>
void for_each_chunk(int64_t n, const Body& body) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t lo = c * kChunk;
      body(lo, std::min(kChunk, n - lo));
    }
  });
}

template <typename T, bool ZERO, bool MEM, bool KEEP_H>
void forward_impl(const T* x, const T* beta, const T* theta, const T* v0, T* s, T* h, T* mem,
                  T* v_final, int64_t steps, int64_t n) {
  for_each_chunk(n, [&](int64_t lo, int64_t len) {
    alignas(64) T v[kChunk];
    const T* b = beta + lo;
    const T* th = theta + lo;
    for (int64_t i = 0; i < len; ++i) v[i] = v0 ? v0[lo + i] : T(0);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t off = t * n + lo;
      const T* xt = x + off;
      T* st = s + off;
      T* ht = KEEP_H ? h + off : nullptr;
      T* mt = MEM ? mem + off : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const T hv = b[i] * v[i] + xt[i];
        const T sv = static_cast<T>((hv - th[i]) > T(0));
        const T vv = reset<ZERO>(hv, sv, th[i]);
        v[i] = vv;
        if constexpr (KEEP_H) ht[i] = hv;
        st[i] = sv;
        if constexpr (MEM) mt[i] = vv;
      }
    }
    for (int64_t i = 0; i < len; ++i) v_final[lo + i] = v[i];
  });
}

// Reverse-time adjoint. a holds dL/dv_t flowing back from step t + 1 (or from v_final).
template <typename T, int S, bool ZERO, bool HAS_GMEM, bool PGRAD>
void backward_impl(const T* gs, const T* gmem, const T* gv_final, const T* h, const T* beta,
                   const T* theta, const T* v0, T alpha, T keep, T* gx, T* gv0, T* gbeta,
                   T* gtheta, int64_t steps, int64_t n) {
  for_each_chunk(n, [&](int64_t lo, int64_t len) {
    alignas(64) T a[kChunk];
    alignas(64) T gb[kChunk];
    alignas(64) T gt[kChunk];
    alignas(64) T vp[kChunk];
    const T* b = beta + lo;
    const T* th = theta + lo;
    for (int64_t i = 0; i < len; ++i) {
      a[i] = gv_final ? gv_final[lo + i] : T(0);
      gb[i] = T(0);
      gt[i] = T(0);
    }
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t off = t * n + lo;
      const T* ht = h + off;
      const T* gst = gs + off;
      const T* gmt = HAS_GMEM ? gmem + off : nullptr;
      if constexpr (PGRAD) {
        // v_{t-1} for dL/dbeta: recomputed from h_{t-1}, or v0 (zeros) at t = 0. A separate
        // simple loop keeps the main loop branch-free, so both vectorise.
        if (t == 0) {
          for (int64_t i = 0; i < len; ++i) vp[i] = v0 ? v0[lo + i] : T(0);
        } else {
          const T* hp = ht - n;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            const T spv = static_cast<T>((hp[i] - th[i]) > T(0));
            vp[i] = reset<ZERO>(hp[i], spv, th[i]);
          }
        }
      }
      T* gxt = gx + off;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const T hv = ht[i];
        const T d = hv - th[i];
        const T sv = static_cast<T>(d > T(0));
        const T sg = surrogate_grad<S, T>(d, alpha);
        T av = a[i];
        if constexpr (HAS_GMEM) av += gmt[i];
        const T gsv = gst[i];
        T gh;
        if constexpr (ZERO) {
          gh = gsv * sg + av * ((T(1) - sv) - keep * hv * sg);
        } else {
          gh = gsv * sg + av * (T(1) - keep * th[i] * sg);
        }
        gxt[i] = gh;
        if constexpr (PGRAD) {
          gb[i] += gh * vp[i];
          gt[i] += av * (T(1) - sv) - gh;
        }
        a[i] = gh * b[i];
      }
    }
    for (int64_t i = 0; i < len; ++i) gv0[lo + i] = a[i];
    if constexpr (PGRAD) {
      for (int64_t i = 0; i < len; ++i) {
        gbeta[lo + i] = gb[i];
        gtheta[lo + i] = gt[i];
      }
    }
  });
}

template <typename T>
const T* ptr_or_null(const c10::optional<torch::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

void check_tn(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), ", expected ",
              like.sizes());
}

// Checks that seq is a contiguous [T, N] CPU tensor and beta, theta and v0 (if given) are [N] like
// one of its steps; returns that step, the layout of every per-neuron argument.
torch::Tensor check_layout(const torch::Tensor& seq, const char* name, const torch::Tensor& beta,
                           const torch::Tensor& theta, const c10::optional<torch::Tensor>& v0) {
  TORCH_CHECK(seq.dim() == 2 && seq.is_contiguous() && seq.device().is_cpu(), name,
              " must be a contiguous CPU tensor [T, N]");
  auto step = seq[0];
  check_tn(beta, step, "beta");
  check_tn(theta, step, "theta");
  if (v0.has_value() && v0->defined()) check_tn(*v0, step, "v0");
  return step;
}

// Large outputs live on transparent huge pages where Linux allows it (THP "madvise" or
// "always"), and their memory is recycled. Every call writes fresh [T, N] arrays, and the OS
// must zero each new page before the kernel can touch it: a fresh 32 MiB fill takes ~14 ms on
// 4 KiB pages, ~3 ms on huge pages, ~0.8 ms when the memory is reused. So freed outputs go back
// to a small cache keyed by size (a caching allocator for this kernel's outputs only, like
// PyTorch's CUDA allocator), bounded by kCacheBytes; training reuses the same shapes every step.
// Every output is fully overwritten by the kernel, so recycled contents never leak through.
constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kCacheBytes = size_t(1) << 30;

struct BufferCache {
  std::mutex mutex;
  std::unordered_multimap<size_t, void*> free_buffers;  // rounded size -> buffer
  std::unordered_map<void*, size_t> sizes;               // every live or cached buffer
  size_t cached_bytes = 0;
};

BufferCache& cache() {
  static BufferCache* instance = new BufferCache();  // never destroyed: deleters may run at exit
  return *instance;
}

void release_buffer(void* p) {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const size_t size = c.sizes.at(p);
  if (c.cached_bytes + size <= kCacheBytes) {
    c.free_buffers.emplace(size, p);
    c.cached_bytes += size;
  } else {
    c.sizes.erase(p);
    std::free(p);
  }
}

void* acquire_buffer(size_t rounded) {
  auto& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free_buffers.find(rounded);
    if (it != c.free_buffers.end()) {
      void* p = it->second;
      c.free_buffers.erase(it);
      c.cached_bytes -= rounded;
      return p;
    }
  }
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, rounded) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure just means small pages
#endif
  std::lock_guard<std::mutex> lock(c.mutex);
  c.sizes.emplace(p, rounded);
  return p;
}

// Frees every cached (not live) buffer; returns the bytes released.
int64_t empty_cache() {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  int64_t released = 0;
  for (auto& entry : c.free_buffers) {
    c.sizes.erase(entry.second);
    std::free(entry.second);
    released += static_cast<int64_t>(entry.first);
  }
  c.free_buffers.clear();
  c.cached_bytes = 0;
  return released;
}

int64_t cached_bytes() {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return static_cast<int64_t>(c.cached_bytes);
}

torch::Tensor empty_output(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes >= 2 * kHuge) {
    const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
    if (void* p = acquire_buffer(rounded)) {
      return torch::from_blob(p, sizes, release_buffer, options);
    }
  }
  return torch::empty(sizes, options);
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace

// x [T, N]; beta, theta [N]; v0 [N] or None. Returns (spikes, h, v_final[, membrane]).
std::vector<torch::Tensor> lif_forward(const torch::Tensor& x, const torch::Tensor& beta,
                                       const torch::Tensor& theta,
                                       const c10::optional<torch::Tensor>& v0, bool zero_reset,
                                       bool return_membrane, bool keep_h) {
  check_layout(x, "x", beta, theta, v0);
  const int64_t steps = x.size(0);
  const int64_t n = x.size(1);
  auto s = empty_output(x.sizes(), x.options());
  // h is kept for backward only; inference skips writing it.
  auto h = keep_h ? empty_output(x.sizes(), x.options()) : torch::empty({0}, x.options());
  auto v_final = torch::empty({n}, x.options());
  torch::Tensor mem = return_membrane ? empty_output(x.sizes(), x.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lif_forward", [&] {
    with_bool(zero_reset, [&](auto zero) {
      with_bool(return_membrane, [&](auto m) {
        with_bool(keep_h, [&](auto kh) {
          forward_impl<scalar_t, decltype(zero)::value, decltype(m)::value, decltype(kh)::value>(
              x.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), theta.data_ptr<scalar_t>(),
              ptr_or_null<scalar_t>(v0), s.data_ptr<scalar_t>(),
              keep_h ? h.data_ptr<scalar_t>() : nullptr,
              return_membrane ? mem.data_ptr<scalar_t>() : nullptr, v_final.data_ptr<scalar_t>(),
              steps, n);
        });
      });
    });
  });
  if (return_membrane) return {s, h, v_final, mem};
  return {s, h, v_final};
}

// Returns (grad_x [T, N], grad_v0 [N][, grad_beta [N], grad_theta [N]]), the parameter
// gradients summed over T only (the caller reduces them to the parameters' shapes).
std::vector<torch::Tensor> lif_backward(const torch::Tensor& grad_spikes,
                                        const c10::optional<torch::Tensor>& grad_membrane,
                                        const c10::optional<torch::Tensor>& grad_v_final,
                                        const torch::Tensor& h, const torch::Tensor& beta,
                                        const torch::Tensor& theta,
                                        const c10::optional<torch::Tensor>& v0, int64_t surrogate,
                                        double alpha, bool zero_reset, bool detach_reset,
                                        bool param_grads) {
  const auto step = check_layout(h, "h", beta, theta, v0);
  const int64_t steps = h.size(0);
  const int64_t n = h.size(1);
  check_tn(grad_spikes, h, "grad_spikes");
  const bool has_gmem = grad_membrane.has_value() && grad_membrane->defined();
  if (has_gmem) check_tn(*grad_membrane, h, "grad_membrane");
  if (grad_v_final.has_value() && grad_v_final->defined())
    check_tn(*grad_v_final, step, "grad_v_final");
  auto gx = empty_output(h.sizes(), h.options());
  auto gv0 = torch::empty({n}, h.options());
  torch::Tensor gbeta = param_grads ? torch::empty({n}, h.options()) : torch::Tensor();
  torch::Tensor gtheta = param_grads ? torch::empty({n}, h.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lif_backward", [&] {
    const auto run = [&](auto sid) {
      with_bool(zero_reset, [&](auto zero) {
        with_bool(has_gmem, [&](auto gm) {
          with_bool(param_grads, [&](auto pg) {
            backward_impl<scalar_t, decltype(sid)::value, decltype(zero)::value,
                          decltype(gm)::value, decltype(pg)::value>(
                grad_spikes.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(grad_membrane),
                ptr_or_null<scalar_t>(grad_v_final), h.data_ptr<scalar_t>(),
                beta.data_ptr<scalar_t>(), theta.data_ptr<scalar_t>(),
                ptr_or_null<scalar_t>(v0), static_cast<scalar_t>(alpha),
                detach_reset ? scalar_t(0) : scalar_t(1), gx.data_ptr<scalar_t>(),
                gv0.data_ptr<scalar_t>(), param_grads ? gbeta.data_ptr<scalar_t>() : nullptr,
                param_grads ? gtheta.data_ptr<scalar_t>() : nullptr, steps, n);
          });
        });
      });
    };
    switch (surrogate) {
      case kFastSigmoid: run(std::integral_constant<int, kFastSigmoid>{}); break;
      case kAtan: run(std::integral_constant<int, kAtan>{}); break;
      case kSigmoid: run(std::integral_constant<int, kSigmoid>{}); break;
      case kTriangle: run(std::integral_constant<int, kTriangle>{}); break;
      case kBoxcar: run(std::integral_constant<int, kBoxcar>{}); break;
      default: TORCH_CHECK(false, "unknown surrogate id ", surrogate);
    }
  });
  if (param_grads) return {gx, gv0, gbeta, gtheta};
  return {gx, gv0};
}

// The ids this binary was compiled with, checked against SURROGATE_IDS when it is loaded.
std::map<std::string, int64_t> surrogate_ids() {
  return {{"fast_sigmoid", kFastSigmoid},
          {"atan", kAtan},
          {"sigmoid", kSigmoid},
          {"triangle", kTriangle},
          {"boxcar", kBoxcar}};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_forward", &lif_forward, "fused multi-step LIF forward (CPU)");
  m.def("lif_backward", &lif_backward, "fused multi-step LIF backward (CPU)");
  m.def("empty_cache", &empty_cache, "free the cached output buffers; returns bytes freed");
  m.def("cached_bytes", &cached_bytes, "bytes held in freed, cached output buffers");
  m.def("surrogate_ids", &surrogate_ids, "surrogate name -> id compiled into this kernel");
}
