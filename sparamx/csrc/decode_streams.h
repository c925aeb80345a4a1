// The decode kernels' walk over a thread's column groups, shared by every ISA's bf16
// and int8 decode: groups [g_begin, g_end) as GI streams of `span` consecutive groups
// each, block b taking group b of every stream, so that each stream reads one
// contiguous run of values and bitmap words. The last stream may be shorter: its
// missing blocks run the other streams' groups one at a time.
//
// Internal linkage on purpose (as expand_avx512.h): each kernel's translation unit
// keeps its own copy, compiled with its own target flags.
#pragma once
#include <cstdint>

namespace sparamx {
namespace {

// full(g) runs GI groups g[0..GI); one(g) runs the single group g[0].
template <int GI, class Full, class One>
inline void for_stream_blocks(int64_t g_begin, int64_t g_end, Full&& full, One&& one) {
  const int64_t span = (g_end - g_begin + GI - 1) / GI;
  for (int64_t b = 0; b < span; ++b) {
    int64_t g[GI];
    int live = 0;
    for (int gi = 0; gi < GI; ++gi) {
      const int64_t group = g_begin + gi * span + b;
      if (group < g_end) g[live++] = group;
    }
    if (live == GI) {
      full(g);
    } else {
      for (int i = 0; i < live; ++i) one(g + i);
    }
  }
}

template <int N>
struct Rows {
  static constexpr int value = N;
};

// All m rows of x in passes of at most 3 rows (more rows' accumulators do not fit the
// AVX2 registers; 4 rows run as 2 + 2): pass(Rows<R>{}, r0) for R = 1..3. A later pass
// re-reads the groups' weights from L2, where the first pass left them.
template <class Pass>
inline void for_row_passes(int64_t m, Pass&& pass) {
  for (int64_t r0 = 0; r0 < m;) {
    const int64_t left = m - r0;
    const int64_t rows = left == 4 ? 2 : (left < 3 ? left : 3);
    if (rows == 1)
      pass(Rows<1>{}, r0);
    else if (rows == 2)
      pass(Rows<2>{}, r0);
    else
      pass(Rows<3>{}, r0);
    r0 += rows;
  }
}

}  // namespace
}  // namespace sparamx
