// One pass over a CPU tensor: (#nonzero, #equal to one), the two counts by which
// energy.counting decides whether a synaptic layer's input is binary (spikes) and how many
// events it carries. PyTorch needs four passes and two temporaries for the same
// (x.bool(), count_nonzero, x == 1, count_nonzero), which made counting 1.2-1.4x a forward.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace {

template <typename scalar_t>
void count_values(const scalar_t* x, int64_t n, int64_t* nonzero, int64_t* ones) {
  // Blocks keep the inner counters 32-bit (so the loop vectorises) and give OpenMP work units.
  constexpr int64_t kBlock = 1 << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  int64_t nz_total = 0, ones_total = 0;
#pragma omp parallel for reduction(+ : nz_total, ones_total) schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
    int32_t nz = 0, one = 0;
    for (int64_t i = begin; i < end; ++i) {
      const float v = static_cast<float>(x[i]);
      // NaN != 0 is true and NaN == 1 false: a NaN is an event that is not a spike, as in
      // x.bool() / x == 1.
      nz += v != 0.0f;
      one += v == 1.0f;
    }
    nz_total += nz;
    ones_total += one;
  }
  *nonzero = nz_total;
  *ones = ones_total;
}

template <>
void count_values<double>(const double* x, int64_t n, int64_t* nonzero, int64_t* ones) {
  int64_t nz_total = 0, ones_total = 0;
#pragma omp parallel for reduction(+ : nz_total, ones_total) schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    nz_total += x[i] != 0.0;
    ones_total += x[i] == 1.0;
  }
  *nonzero = nz_total;
  *ones = ones_total;
}

torch::Tensor value_counts(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "value_counts: needs a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.is_contiguous(), "value_counts: needs a contiguous tensor");
  auto out = torch::empty({2}, torch::dtype(torch::kInt64));
  int64_t* counts = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "value_counts", [&] {
        count_values<scalar_t>(x.data_ptr<scalar_t>(), x.numel(), counts, counts + 1);
      });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("value_counts", &value_counts, "(#nonzero, #ones) of a contiguous CPU float tensor");
}
