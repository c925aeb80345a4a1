// The AMX-BF16 kernel body (bitmap-bf16 and dense-bf16 layouts), written only against
// the tile-op layer of amx_tiles.h. Included once by kernel_amx.cpp (real tiles, exports
// sparamx::linear_amx) and once by kernel_amx_emu.cpp (emulated tiles, exports
// sparamx::linear_amx_emulated), so the emulated tests check this exact tiling code.
//
// The includer defines, before inclusion:
//   SPARAMX_AMX_KERNEL_NAME  the exported function's name,
//   SPARAMX_AMX_EMULATE      or not (picks the amx_tiles.h backend and SPARAMX_AMX_NS),
// and after including amx_tiles.h, in namespace sparamx::SPARAMX_AMX_NS:
//   void decompress_b_tile(const uint32_t* bits, const uint16_t*& v, uint16_t* out);
//     expands the 16 units with bitmaps bits[0..15] whose kept values start at v into
//     out[16][32] (64-byte aligned), zeros where a bit is clear; advances v past them.
//   void store_row(const LinearArgs& a, int64_t g, int64_t r, const float* acc);
//     stores column group g's 16 fp32 results of row r as store_group_row does.
//
// Tiles (AMX palette 1, every tile 64 bytes wide):
//   B tile = K-tile t of one column group = its units p = 16t .. 16t+15, one per row:
//            [16 K-pairs][16 columns x 2 bf16] - exactly the unit layout, so the dense
//            layout is tile-loaded straight from `values` (stride 64 bytes).
//   A tile = up to 16 rows of x, columns 32t .. 32t+31: [rows][16 K-pairs x 2 bf16],
//            stride x_stride * 2 bytes.
//   C tile = [rows][16 fp32]: one column group's outputs for a block of 16 rows of x.
// TDPBF16PS then computes C[r][c] += sum_p,j x[r][2p+j] * W[16g+c][2p+j].
//
// Loop structure, decode (M <= 16, one row block): column groups in sets of up to 4
// (1 A tile, 4 C tiles, 3 B tiles); K is walked in chunks whose sparse units are
// decompressed once into a 32 KiB panel; the C tiles stay in registers for the whole K.
//
// Prefill (M > 16): rows of x in blocks of kPrefillRows, K in chunks of kChunk2 K-tiles
// (512 columns), column groups in pairs, two row blocks at a time (2 A tiles x 2 B tiles
// = 4 C tiles: each loaded tile feeds two products). Each group pair's units of a chunk
// are decompressed once per row block into the L1 panel. The groups are visited in
// passes: while x fits in L2 (<= 1 MiB), a pass is one group pair walking the whole K;
// past that, a pass is kPrefillGroups groups that all go over the same x chunk before
// the next chunk, so x is read from L3 once per pass instead of once per 32 outputs,
// and the pass's C tiles are parked in a per-thread fp32 buffer between chunks.
// Measured on a 2-core AMX Xeon (cache-resident, 1 thread, 4096x4096): the one-pair
// order ran 920 GFLOP/s at M = 64 but 470 at M = 1024; wide passes run ~850 at M = 1024.
// Finally bias and the output conversion go through store_row.
#include "amx_tiles.h"
#include "kernels.h"

namespace sparamx {
namespace SPARAMX_AMX_NS {

constexpr int kTileVals = 16 * kUnitVals;  // bf16 per B tile (1 KiB)
constexpr int kPanelTiles = 32;            // decompressed B tiles held per chunk (32 KiB)
constexpr int kCTileFloats = 16 * kGroupCols;

// Tile roles for NR row blocks (1 or 2) at a time, group j of the set, row block r:
//   NR = 1: C = tmm0..3 (group j), A = tmm4, B = tmm5..7 (group j -> 5 + j % 3)
//   NR = 2: C = tmm0,1 (block 0), tmm2,3 (block 1), A = tmm4,5, B = tmm6,7
constexpr int groups_per_step(int nr) { return 4 / nr; }
constexpr int c_tile(int nr, int r, int j) { return r * groups_per_step(nr) + j; }
constexpr int a_tile(int r) { return 4 + r; }
constexpr int b_tile(int nr, int j) { return 4 + nr + j % (4 - nr); }

// Compile-time loop: f(Int<0>{}), ..., f(Int<N-1>{}), so tile numbers stay constants.
// (No std:: helpers here: the real backend's translation unit is compiled for AMX and
// AVX-512, and must not emit copies of library inline functions.)
template <int I>
struct Int {
  static constexpr int value = I;
};
template <int N, int I = 0, class F>
inline void unroll(F&& f) {
  if constexpr (I < N) {
    f(Int<I>{});
    unroll<N, I + 1>(f);
  }
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Loads a tile config only when it changes (LDTILECFG zeroes all tiles and is not free).
// The config is a function of the tile roles (NR) and the rows of the row blocks.
class TileConfigCache {
 public:
  void ensure(int nr, int rows0, int rows1) {
    const int key = nr << 16 | rows0 << 8 | rows1;
    if (key == key_) return;
    TileConfig cfg = {};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;  // B tiles: 16 K-pairs
    }
    for (int t = 0; t < 4; ++t) cfg.rows[t] = t / groups_per_step(nr) == 0 ? rows0 : rows1;
    cfg.rows[a_tile(0)] = rows0;
    if (nr == 2) cfg.rows[a_tile(1)] = rows1;
    tile_config(cfg);
    key_ = key;
  }

 private:
  int key_ = -1;
};

// What one step does with its C tiles before the K loop.
enum class CInit { kZero, kLoad, kKeep };

struct Ctx {
  const LinearArgs* a;
  int64_t num_ktiles;  // T = k_pairs / 16
  int64_t num_rblocks;
  int last_rows;       // rows in the last row block (1..16)
  // C tiles parked in memory: [row block - c_rb0][c_groups][16 rows][16] fp32; c_group0
  // is the first group of the current set within the c_groups.
  float* cbuf;
  int64_t c_groups = 0, c_group0 = 0, c_rb0 = 0;
  uint16_t* panel;     // [kPanelTiles][16][32] decompressed B tiles
  TileConfigCache cfg;

  float* c_ptr(int64_t rblock, int j) const {
    return cbuf + ((rblock - c_rb0) * c_groups + c_group0 + j) * kCTileFloats;
  }
};

// One row-block step: NR row blocks starting at rb0, NG groups, the chunk's nt K-tiles
// starting at K-tile t0; group j's B tile t is at b[j] + t * kTileVals.
template <int NR, int NG>
inline void tile_step(Ctx& cx, int64_t rb0, int rows0, int rows1, const uint16_t* const* b,
                      int64_t t0, int64_t nt, CInit init, bool store) {
  static_assert(NR * NG <= 4 && NG <= groups_per_step(NR), "at most 4 C tiles");
  const LinearArgs& a = *cx.a;
  cx.cfg.ensure(NR, rows0, rows1);
  const int64_t a_stride = a.x_stride * 2;  // bytes between rows of x

  unroll<NR>([&](auto R) {
    unroll<NG>([&](auto J) {
      constexpr int ct = c_tile(NR, decltype(R)::value, decltype(J)::value);
      if (init == CInit::kZero) tile_zero<ct>();
      if (init == CInit::kLoad) tile_load<ct>(cx.c_ptr(rb0 + R.value, J.value), 64);
    });
  });
  for (int64_t t = 0; t < nt; ++t) {
    unroll<NR>([&](auto R) {
      // rows 16 (rb0 + r) .., columns kKAlign (t0 + t) ..: [rows][16 K-pairs x 2 bf16]
      const uint16_t* xa = a.x + (rb0 + R.value) * 16 * a.x_stride + (t0 + t) * kKAlign;
      tile_load<a_tile(decltype(R)::value)>(xa, a_stride);
    });
    unroll<NG>([&](auto J) {
      constexpr int bt = b_tile(NR, decltype(J)::value);
      tile_load<bt>(b[J.value] + t * kTileVals, 64);
      unroll<NR>([&](auto R) {
        constexpr int r = decltype(R)::value, ct = c_tile(NR, r, decltype(J)::value);
        static_assert(ct < 4 && a_tile(r) != bt, "C, A and B tiles must be distinct");
        tile_dp_bf16<ct, a_tile(r), bt>();
      });
    });
  }
  if (store) {
    unroll<NR>([&](auto R) {
      unroll<NG>([&](auto J) {
        constexpr int ct = c_tile(NR, decltype(R)::value, decltype(J)::value);
        tile_store<ct>(cx.c_ptr(rb0 + R.value, J.value), 64);
      });
    });
  }
}

// The B tiles of K-tiles t0 .. t0+nt-1 of groups g0 .. g0+NG-1: the dense layout's own
// bytes, or the sparse units decompressed into the panel (v[j]: group j's next value,
// advanced past the chunk).
template <int NG>
inline void chunk_b_tiles(Ctx& cx, int64_t g0, int64_t t0, int64_t nt, int64_t chunk,
                          const uint16_t** v, const uint16_t** b) {
  const LinearArgs& a = *cx.a;
  const int64_t P = a.k_pairs;
  for (int j = 0; j < NG; ++j) {
    if (a.bitmap) {
      uint16_t* panel_j = cx.panel + j * chunk * kTileVals;  // [chunk][16][32]
      const uint32_t* bits = a.bitmap + (g0 + j) * P + t0 * 16;
      for (int64_t t = 0; t < nt; ++t)
        decompress_b_tile(bits + t * 16, v[j], panel_j + t * kTileVals);
      b[j] = panel_j;
    } else {
      b[j] = a.values + ((g0 + j) * P + t0 * 16) * kUnitVals;  // [G][P][32]
    }
  }
}

// Decode (one row block): column groups g0 .. g0+NG-1, whole K, C tiles in registers.
template <int NG>
inline void decode_set(Ctx& cx, int64_t g0) {
  const LinearArgs& a = *cx.a;
  constexpr int64_t kChunk = kPanelTiles / NG;  // K-tiles per chunk

  const uint16_t* v[NG] = {};  // sparse: next kept value of each group
  if (a.bitmap)
    for (int j = 0; j < NG; ++j) v[j] = a.values + a.offsets[g0 + j];
  cx.c_groups = NG;
  cx.c_group0 = cx.c_rb0 = 0;

  for (int64_t t0 = 0; t0 < cx.num_ktiles; t0 += kChunk) {
    const int64_t nt = min64(kChunk, cx.num_ktiles - t0);
    const uint16_t* b[NG];
    chunk_b_tiles<NG>(cx, g0, t0, nt, kChunk, v, b);
    // The config never changes after the first step, so LDTILECFG does not wipe the C
    // tiles between chunks.
    tile_step<1, NG>(cx, 0, cx.last_rows, 0, b, t0, nt, t0 == 0 ? CInit::kZero : CInit::kKeep,
                     t0 + nt == cx.num_ktiles);
  }
  for (int j = 0; j < NG; ++j)
    for (int i = 0; i < cx.last_rows; ++i)
      store_row(a, g0 + j, i, cx.c_ptr(0, j) + i * kGroupCols);
}

constexpr int64_t kPrefillRows = 256;    // rows of x per pass (16 row blocks)
constexpr int64_t kPrefillGroups = 128;  // column groups per pass over x (2048 outputs)
constexpr int64_t kChunk2 = kPanelTiles / 2;  // K-tiles per chunk, two groups at a time
constexpr int64_t kXInL2Bytes = 1 << 20;
constexpr int64_t kPrefillCFloats = kPrefillRows / 16 * kPrefillGroups * kCTileFloats;

// Row blocks rb_begin .. rb_end-1 of x for the chunk's groups g0 .. g0+NG-1: in pairs (each
// B tile load feeds two products), then a lone last one.
template <int NG>
inline void prefill_rows(Ctx& cx, int64_t rb_begin, int64_t rb_end, const uint16_t* const* b,
                         int64_t t0, int64_t nt, CInit init) {
  const int64_t last = cx.num_rblocks - 1;
  int64_t rb = rb_begin;
  for (; rb + 1 < rb_end; rb += 2)
    tile_step<2, NG>(cx, rb, 16, rb + 1 == last ? cx.last_rows : 16, b, t0, nt, init, true);
  if (rb < rb_end)
    tile_step<1, NG>(cx, rb, rb == last ? cx.last_rows : 16, 0, b, t0, nt, init, true);
}

// One pass: groups gs .. ge-1 (at most kPrefillGroups), row blocks rb_begin .. rb_end-1.
inline void prefill_pass(Ctx& cx, int64_t gs, int64_t ge, int64_t rb_begin, int64_t rb_end) {
  const LinearArgs& a = *cx.a;
  const uint16_t* cursor[kPrefillGroups] = {};  // sparse: each group's next kept value
  if (a.bitmap)
    for (int64_t g = gs; g < ge; ++g) cursor[g - gs] = a.values + a.offsets[g];
  cx.c_groups = ge - gs;
  cx.c_rb0 = rb_begin;

  // Chunks of equal size (K = 576: 9 + 9 K-tiles, not 16 + 2): each chunk costs a load
  // and a store of the parked C tiles, which a short last chunk barely amortises.
  const int64_t chunks = (cx.num_ktiles + kChunk2 - 1) / kChunk2;
  const int64_t chunk = (cx.num_ktiles + chunks - 1) / chunks;
  for (int64_t t0 = 0; t0 < cx.num_ktiles; t0 += chunk) {
    const int64_t nt = min64(chunk, cx.num_ktiles - t0);
    const CInit init = t0 == 0 ? CInit::kZero : CInit::kLoad;
    for (int64_t g0 = gs; g0 < ge; g0 += 2) {
      const uint16_t* b[2];
      cx.c_group0 = g0 - gs;
      if (ge - g0 >= 2) {
        chunk_b_tiles<2>(cx, g0, t0, nt, chunk, cursor + (g0 - gs), b);
        prefill_rows<2>(cx, rb_begin, rb_end, b, t0, nt, init);
      } else {
        chunk_b_tiles<1>(cx, g0, t0, nt, chunk, cursor + (g0 - gs), b);
        prefill_rows<1>(cx, rb_begin, rb_end, b, t0, nt, init);
      }
    }
  }

  cx.c_group0 = 0;
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    const int rows = rb == cx.num_rblocks - 1 ? cx.last_rows : 16;
    for (int64_t g = gs; g < ge; ++g) {
      const float* c = cx.c_ptr(rb, static_cast<int>(g - gs));
      for (int i = 0; i < rows; ++i) store_row(a, g, rb * 16 + i, c + i * kGroupCols);
    }
  }
}

// Per-thread fp32 scratch for the prefill C tiles, allocated on first use and kept
// (kPrefillCFloats: 2 MiB), 64-byte aligned.
inline float* prefill_cbuf() {
  struct Buffer {
    float* raw = nullptr;
    ~Buffer() { delete[] raw; }
  };
  static thread_local Buffer buf;
  if (!buf.raw) buf.raw = new float[kPrefillCFloats + 16];
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.raw);
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
}

inline void linear(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  if (g_begin >= g_end || a.m <= 0) return;
  const int64_t num_ktiles = a.k_pairs / 16;  // k_pairs is a multiple of 16 (Kp % 32 == 0)
  if (num_ktiles == 0) {  // K = 0: the output is the bias
    const float zeros[kGroupCols] = {};
    for (int64_t g = g_begin; g < g_end; ++g)
      for (int64_t r = 0; r < a.m; ++r) store_group_row(a, g, r, zeros);
    return;
  }

  Ctx cx;
  cx.a = &a;
  cx.num_ktiles = num_ktiles;
  cx.num_rblocks = (a.m + 15) / 16;
  cx.last_rows = static_cast<int>(a.m - (cx.num_rblocks - 1) * 16);
  alignas(64) uint16_t panel[kPanelTiles * kTileVals];
  cx.panel = panel;

  if (cx.num_rblocks == 1) {
    alignas(64) float cbuf[4 * kCTileFloats];
    cx.cbuf = cbuf;
    for (int64_t g0 = g_begin; g0 < g_end; g0 += 4) {
      switch (min64(4, g_end - g0)) {
        case 1: decode_set<1>(cx, g0); break;
        case 2: decode_set<2>(cx, g0); break;
        case 3: decode_set<3>(cx, g0); break;
        default: decode_set<4>(cx, g0); break;
      }
    }
  } else {
    cx.cbuf = prefill_cbuf();
    // While all of x fits in L2 with room to spare, one pair of groups per pass is
    // faster (no large C buffer to cycle through); beyond that, wide passes.
    const int64_t x_bytes = a.m * a.k_pairs * 4;
    const int64_t pass_groups = x_bytes <= kXInL2Bytes ? 2 : kPrefillGroups;
    constexpr int64_t rb_step = kPrefillRows / 16;
    for (int64_t gs = g_begin; gs < g_end; gs += pass_groups)
      for (int64_t rb = 0; rb < cx.num_rblocks; rb += rb_step)
        prefill_pass(cx, gs, min64(gs + pass_groups, g_end), rb,
                     min64(rb + rb_step, cx.num_rblocks));
  }
  tile_release();
}

}  // namespace SPARAMX_AMX_NS

void SPARAMX_AMX_KERNEL_NAME(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  SPARAMX_AMX_NS::linear(a, g_begin, g_end);
}

}  // namespace sparamx
