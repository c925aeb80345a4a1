// The AMX tile-op layer the AMX kernel is written against, with two backends:
//   - SPARAMX_AMX_EMULATE defined before inclusion: a plain-C++ emulation of the tile
//     registers following Intel's documented semantics (LDTILECFG, TILELOADD,
//     TILESTORED, TILEZERO, TDPBF16PS, TILERELEASE); runs on any CPU, used by tests.
//   - otherwise: the real AMX intrinsics. The includer must enable the amx-tile and
//     amx-bf16 targets and include <immintrin.h> first.
// Ops: tile_config(cfg), tile_load<T>(base, stride), tile_store<T>(base, stride),
// tile_zero<T>(), tile_dp_bf16<C, A, B>(), tile_release().
//
// Tile numbers are template parameters: the hardware encodes them in the instruction,
// and GCC's intrinsics even paste them into asm text (#dst), so they must be literal
// tokens. The real backend therefore spells out one explicit specialization per tile
// number (per triple for tile_dp_bf16) with a macro.
//
// Each backend lives in its own namespace (sparamx::amx_hw / sparamx::amx_emu, named by
// SPARAMX_AMX_NS) so that the two translation units never share an inline function: the
// linker keeps one copy of each inline function, and an AMX/AVX-512 copy must never
// replace the plain one (or the reverse).
#pragma once
#include <cstdint>

#ifdef SPARAMX_AMX_EMULATE
#include <cstdio>
#include <cstdlib>
#include <cstring>
#define SPARAMX_AMX_NS amx_emu
#else
#if !defined(_tile_loadd) || !defined(_tile_dpbf16ps)
#error "amx_tiles.h (real backend): include <immintrin.h> (with amx-tile,amx-bf16 enabled) first"
#endif
#define SPARAMX_AMX_NS amx_hw
#endif

namespace sparamx {
namespace SPARAMX_AMX_NS {

constexpr int kNumTiles = 8;       // palette 1: tmm0..tmm7
constexpr int kTileMaxRows = 16;   // palette 1: at most 16 rows ...
constexpr int kTileMaxColsb = 64;  // ... of at most 64 bytes

// The 64-byte memory operand of LDTILECFG (layout fixed by the ISA).
struct alignas(64) TileConfig {
  uint8_t palette_id;      // 1 = 8 tiles of up to 16 x 64 bytes; 0 = release all tiles
  uint8_t start_row;       // restart row of an interrupted load/store; 0 here
  uint8_t reserved0[14];   // must be zero
  uint16_t colsb[16];      // bytes per row of tile i (palette 1 uses 0..7)
  uint8_t rows[16];        // rows of tile i
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG operand is 64 bytes");

#ifndef SPARAMX_AMX_EMULATE
// ---------------------------------------------------------------- real backend

// GCC 12's _tile_loadd and _tile_loadconfig asm statements do not tell the compiler
// which memory they read (no "memory" clobber; the config operand names only its first
// 8 bytes), so plain C++ stores to a buffer that is about to be tile-loaded could be
// sunk past the load or dropped. This barrier hands the address to the compiler as
// escaping and forces all pending stores to memory first.
inline void memory_barrier_for(const void* p) { __asm__ volatile("" : : "r"(p) : "memory"); }

// Primary templates: only tile numbers 0..7 are specialized below.
template <int T>
inline void tile_load(const void* base, int64_t stride) {
  static_assert(T != T, "tile number must be 0..7");
}
template <int T>
inline void tile_store(void* base, int64_t stride) {
  static_assert(T != T, "tile number must be 0..7");
}
template <int T>
inline void tile_zero() {
  static_assert(T != T, "tile number must be 0..7");
}
template <int C, int A, int B>
inline void tile_dp_bf16() {
  static_assert(C != C, "tile numbers must be 0..7");
}

inline void tile_config(const TileConfig& cfg) {
  memory_barrier_for(&cfg);
  _tile_loadconfig(&cfg);
}

inline void tile_release() { _tile_release(); }

#define SPARAMX_AMX_TILE_OPS(T)                                          \
  template <>                                                            \
  inline void tile_load<T>(const void* base, int64_t stride) {           \
    memory_barrier_for(base);                                            \
    _tile_loadd(T, base, stride);                                        \
  }                                                                      \
  template <>                                                            \
  inline void tile_store<T>(void* base, int64_t stride) {                \
    _tile_stored(T, base, stride); /* has a "memory" clobber */          \
  }                                                                      \
  template <>                                                            \
  inline void tile_zero<T>() {                                           \
    _tile_zero(T);                                                       \
  }
SPARAMX_AMX_TILE_OPS(0)
SPARAMX_AMX_TILE_OPS(1)
SPARAMX_AMX_TILE_OPS(2)
SPARAMX_AMX_TILE_OPS(3)
SPARAMX_AMX_TILE_OPS(4)
SPARAMX_AMX_TILE_OPS(5)
SPARAMX_AMX_TILE_OPS(6)
SPARAMX_AMX_TILE_OPS(7)
#undef SPARAMX_AMX_TILE_OPS

// All 8 x 8 x 8 triples (the hardware faults on repeated tiles; the kernel never does that).
#define SPARAMX_AMX_DP(c, a, b) \
  template <>                   \
  inline void tile_dp_bf16<c, a, b>() { _tile_dpbf16ps(c, a, b); }
#define SPARAMX_AMX_DP_B(c, a)                                                         \
  SPARAMX_AMX_DP(c, a, 0) SPARAMX_AMX_DP(c, a, 1) SPARAMX_AMX_DP(c, a, 2)              \
  SPARAMX_AMX_DP(c, a, 3) SPARAMX_AMX_DP(c, a, 4) SPARAMX_AMX_DP(c, a, 5)              \
  SPARAMX_AMX_DP(c, a, 6) SPARAMX_AMX_DP(c, a, 7)
#define SPARAMX_AMX_DP_AB(c)                                                           \
  SPARAMX_AMX_DP_B(c, 0) SPARAMX_AMX_DP_B(c, 1) SPARAMX_AMX_DP_B(c, 2)                 \
  SPARAMX_AMX_DP_B(c, 3) SPARAMX_AMX_DP_B(c, 4) SPARAMX_AMX_DP_B(c, 5)                 \
  SPARAMX_AMX_DP_B(c, 6) SPARAMX_AMX_DP_B(c, 7)
SPARAMX_AMX_DP_AB(0)
SPARAMX_AMX_DP_AB(1)
SPARAMX_AMX_DP_AB(2)
SPARAMX_AMX_DP_AB(3)
SPARAMX_AMX_DP_AB(4)
SPARAMX_AMX_DP_AB(5)
SPARAMX_AMX_DP_AB(6)
SPARAMX_AMX_DP_AB(7)
#undef SPARAMX_AMX_DP_AB
#undef SPARAMX_AMX_DP_B
#undef SPARAMX_AMX_DP

#else
// ---------------------------------------------------------------- emulated backend
//
// State per thread (like the real registers, which belong to the thread): the loaded
// config and 8 tiles of 16 rows x 64 bytes. Every op checks the conditions under which
// the real instruction raises #UD/#GP and aborts with a message instead, so that a
// tiling bug in the kernel shows up here rather than only on AMX hardware.
namespace emu {

struct State {
  bool configured = false;  // palette 1 loaded and not released
  TileConfig cfg = {};
  alignas(64) uint8_t tile[kNumTiles][kTileMaxRows][kTileMaxColsb] = {};
};
inline thread_local State state;

[[noreturn]] inline void fault(const char* op, const char* why, int t) {
  std::fprintf(stderr, "sparamx AMX emulation: %s on tmm%d: %s\n", op, t, why);
  std::abort();
}

inline void check_tile(const char* op, int t) {
  if (!state.configured) fault(op, "tiles not configured (LDTILECFG missing)", t);
  if (state.cfg.rows[t] == 0) fault(op, "tile not configured (rows = 0)", t);
}

// bf16 -> fp32 by shifting into the high half; bf16 denormals read as zero (the
// instruction does not consult MXCSR: DAZ on inputs, FTZ on outputs, round to nearest even).
inline float bf16_in(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  if ((h & 0x7f80u) == 0) h &= 0x8000u;
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float flush_denormal(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0) bits &= 0x80000000u;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline void zero_rows_from(int t, int row) {
  for (int r = row; r < kTileMaxRows; ++r) std::memset(state.tile[t][r], 0, kTileMaxColsb);
}

inline void config(const TileConfig& cfg) {
  if (cfg.palette_id == 0) {  // palette 0 = initialize (release) the tile state
    state = State{};
    return;
  }
  if (cfg.palette_id != 1) fault("ldtilecfg", "unsupported palette", -1);
  if (cfg.start_row != 0) fault("ldtilecfg", "start_row must be 0", -1);
  for (uint8_t b : cfg.reserved0)
    if (b != 0) fault("ldtilecfg", "reserved bytes must be zero", -1);
  for (int t = 0; t < 16; ++t) {
    const bool used = cfg.rows[t] != 0 || cfg.colsb[t] != 0;
    if (!used) continue;
    if (t >= kNumTiles) fault("ldtilecfg", "palette 1 has 8 tiles", t);
    if (cfg.rows[t] == 0 || cfg.colsb[t] == 0) fault("ldtilecfg", "rows/colsb: one is zero", t);
    if (cfg.rows[t] > kTileMaxRows || cfg.colsb[t] > kTileMaxColsb)
      fault("ldtilecfg", "rows > 16 or colsb > 64", t);
  }
  state = State{};  // LDTILECFG zeroes every tile
  state.cfg = cfg;
  state.configured = true;
}

// TILELOADD: row r of the tile = colsb bytes at base + r * stride; the rest of the row
// and the rows past `rows` are zeroed.
inline void load(int t, const void* base, int64_t stride) {
  check_tile("tileloadd", t);
  const int rows = state.cfg.rows[t], colsb = state.cfg.colsb[t];
  for (int r = 0; r < rows; ++r) {
    std::memcpy(state.tile[t][r], static_cast<const uint8_t*>(base) + r * stride, colsb);
    std::memset(state.tile[t][r] + colsb, 0, kTileMaxColsb - colsb);
  }
  zero_rows_from(t, rows);
}

// TILESTORED: writes exactly rows x colsb bytes.
inline void store(int t, void* base, int64_t stride) {
  check_tile("tilestored", t);
  const int rows = state.cfg.rows[t], colsb = state.cfg.colsb[t];
  for (int r = 0; r < rows; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, state.tile[t][r], colsb);
}

inline void zero(int t) {
  check_tile("tilezero", t);
  zero_rows_from(t, 0);
}

// TDPBF16PS tC, tA, tB (Intel SDM pseudo-code):
//   for m < C.rows: for k < A.colsb/4: for n < C.colsb/4:
//     C[m].fp32[n] += fp32(A[m].bf16[2k])   * fp32(B[k].bf16[2n])
//     C[m].fp32[n] += fp32(A[m].bf16[2k+1]) * fp32(B[k].bf16[2n+1])
// i.e. A rows are M x (K pairs), B rows are K-pairs x (N columns x 2 bf16, VNNI order).
// Each bf16 x bf16 product is exact in fp32; each add rounds to nearest even.
inline void dp_bf16(int c, int a, int b) {
  const char* op = "tdpbf16ps";
  check_tile(op, c);
  check_tile(op, a);
  check_tile(op, b);
  if (c == a || c == b || a == b) fault(op, "tile operands must differ", c);
  const TileConfig& cfg = state.cfg;
  const int m_rows = cfg.rows[c], k_pairs = cfg.colsb[a] / 4, n_cols = cfg.colsb[c] / 4;
  if (cfg.colsb[c] % 4 || cfg.colsb[a] % 4 || cfg.colsb[b] % 4) fault(op, "colsb % 4 != 0", c);
  if (cfg.rows[a] != m_rows) fault(op, "A.rows != C.rows", a);
  if (cfg.rows[b] != k_pairs) fault(op, "B.rows != A.colsb / 4", b);
  if (cfg.colsb[b] != cfg.colsb[c]) fault(op, "B.colsb != C.colsb", b);

  float bf[kTileMaxRows][2 * kTileMaxRows];  // B as fp32: [k][2n + j]
  for (int k = 0; k < k_pairs; ++k)
    for (int i = 0; i < 2 * n_cols; ++i) bf[k][i] = bf16_in(state.tile[b][k] + 2 * i);
  for (int m = 0; m < m_rows; ++m) {
    float acc[kTileMaxRows];
    std::memcpy(acc, state.tile[c][m], 4 * n_cols);
    for (int k = 0; k < k_pairs; ++k) {
      const float a0 = bf16_in(state.tile[a][m] + 4 * k);
      const float a1 = bf16_in(state.tile[a][m] + 4 * k + 2);
      for (int n = 0; n < n_cols; ++n) {
        acc[n] = flush_denormal(acc[n] + a0 * bf[k][2 * n]);
        acc[n] = flush_denormal(acc[n] + a1 * bf[k][2 * n + 1]);
      }
    }
    std::memcpy(state.tile[c][m], acc, 4 * n_cols);
    std::memset(state.tile[c][m] + 4 * n_cols, 0, kTileMaxColsb - 4 * n_cols);
  }
  zero_rows_from(c, m_rows);
}

}  // namespace emu

inline void tile_config(const TileConfig& cfg) { emu::config(cfg); }
inline void tile_release() { emu::state = emu::State{}; }

// The emulation takes tile numbers at run time, so one generic definition per op
// serves every tile; the range check keeps the real backend's 0..7 contract.
template <int T>
constexpr bool kValidTile = T >= 0 && T < kNumTiles;

template <int T>
inline void tile_load(const void* base, int64_t stride) {
  static_assert(kValidTile<T>, "tile number must be 0..7");
  emu::load(T, base, stride);
}
template <int T>
inline void tile_store(void* base, int64_t stride) {
  static_assert(kValidTile<T>, "tile number must be 0..7");
  emu::store(T, base, stride);
}
template <int T>
inline void tile_zero() {
  static_assert(kValidTile<T>, "tile number must be 0..7");
  emu::zero(T);
}
template <int C, int A, int B>
inline void tile_dp_bf16() {
  static_assert(kValidTile<C> && kValidTile<A> && kValidTile<B>, "tile numbers must be 0..7");
  static_assert(C != A && C != B && A != B, "tile operands must differ");
  emu::dp_bf16(C, A, B);
}
#endif  // SPARAMX_AMX_EMULATE

}  // namespace SPARAMX_AMX_NS
}  // namespace sparamx
