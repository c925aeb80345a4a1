// sparamx::read_probe(buf): reads every byte of a large buffer once, split across the
// torch threads, and returns an XOR checksum (so the reads cannot be optimised away).
// Benchmarks time it to get the memory read bandwidth that the kernels are compared
// against: a plain streaming read with several independent accumulators per thread,
// which reaches the bandwidth limit (a float reduction such as torch.sum reads slower).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sparamx {
namespace {

at::Tensor read_probe(const at::Tensor& buf) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(),
              "sparamx: read_probe needs a contiguous CPU tensor");
  const auto* base = static_cast<const uint8_t*>(buf.data_ptr());
  const int64_t words = buf.nbytes() / 64;  // whole cache lines; a tail under 64 B is skipped
  std::vector<uint64_t> partial(std::max(1, at::get_num_threads()), 0);
  const auto* words64 = reinterpret_cast<const uint64_t*>(base);  // data_ptr is aligned
  at::parallel_for(0, words, 1 << 14, [&](int64_t begin, int64_t end) {
    // Eight independent accumulators over contiguous words: the compiler vectorises
    // this into wide loads, and no add chain limits the read rate.
    uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = begin * 8; i < end * 8; i += 8) {
      for (int j = 0; j < 8; ++j) acc[j] ^= words64[i + j];
    }
    uint64_t x = 0;
    for (uint64_t a : acc) x ^= a;
    partial[at::get_thread_num()] ^= x;
  });
  uint64_t x = 0;
  for (uint64_t p : partial) x ^= p;
  return at::scalar_tensor(static_cast<int64_t>(x), at::kLong);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparamx, m) { m.def("read_probe(Tensor buf) -> Tensor"); }

TORCH_LIBRARY_IMPL(sparamx, CPU, m) { m.impl("read_probe", &read_probe); }

}  // namespace sparamx
