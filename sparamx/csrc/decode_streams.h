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

}  // namespace
}  // namespace sparamx
