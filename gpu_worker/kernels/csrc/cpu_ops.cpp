// Native CPU kernels of the decode hot path, built on first use by gpu_worker/kernels/cpu_ops.py, which
// documents their semantics and holds their torch paths. Ops, namespace npc_cpu_ops:
//   paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale) -> out
//   rotary_embedding_(q, k?, positions, cos, sin)   in place on q and k
//   add_rms_norm_(x, residual, weight, eps)          residual += x; x = rms_norm(residual) * weight
//   select_isa(name) -> the ISA the kernels run with (tests, benchmarks)
//
// Portability: compiled without -march, so a cached build runs on any x86-64. Each kernel is instantiated
// for AVX-512, AVX2+FMA and the baseline through target attributes and picked at load time from cpuid; the
// math is written with GCC vector extensions (Vec<W>), which compile to the registers of the caller's ISA,
// and every helper is always_inline so that it compiles for that ISA too.
// Numerics: fp32, bf16 and fp16 in; fp32 arithmetic; results rounded once to the tensor's dtype (as c10
// rounds: to nearest even, NaN kept).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#define NPC_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define NPC_X86 1
#define NPC_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define NPC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define NPC_X86 0
#endif

namespace {

// ---------------------------------------------------------------- vectors of W fp32 lanes

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};
template <int W>
using VF = typename Vec<W>::f;
template <int W>
using VI = typename Vec<W>::i;
template <int W>
using VU = typename Vec<W>::u;
template <int W>
using VH = typename Vec<W>::h;

template <typename To, typename From>
NPC_INLINE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

// W elements of T from memory (unaligned) as fp32 lanes; W = 1 serves the tails.
template <int W>
NPC_INLINE VF<W> load_float(const float* src) {
  VF<W> v;
  std::memcpy(&v, src, sizeof v);
  return v;
}

template <int W>
NPC_INLINE VF<W> load_float(const c10::BFloat16* src) {
  VH<W> half;
  std::memcpy(&half, src, sizeof half);
  return bit_cast<VF<W>>(__builtin_convertvector(half, VU<W>) << 16);
}

template <int W>
NPC_INLINE VF<W> load_float(const c10::Half* src) {
  // Exact. Normals: exponent and mantissa moved into place, rebiased by 112 (= 127 - 15); subnormals:
  // mantissa * 2^-24 (no denormal operand, so DAZ is harmless); inf/NaN: exponent all ones.
  VH<W> half;
  std::memcpy(&half, src, sizeof half);
  const VU<W> bits = __builtin_convertvector(half, VU<W>);
  const VU<W> magnitude = bits & 0x7fffu;
  const VU<W> normal = (magnitude << 13) + (112u << 23);
  const VU<W> special = (magnitude << 13) | 0x7f800000u;
  const VF<W> subnormal = __builtin_convertvector(magnitude, VF<W>) * 0x1p-24f;
  VU<W> out = magnitude >= 0x7c00u ? special : normal;
  out = magnitude < 0x400u ? bit_cast<VU<W>>(subnormal) : out;
  return bit_cast<VF<W>>(out | ((bits & 0x8000u) << 16));
}

// fp32 lanes rounded to T and written as W elements (unaligned).
template <int W>
NPC_INLINE void store_float(float* dst, VF<W> v) {
  std::memcpy(dst, &v, sizeof v);
}

template <int W>
NPC_INLINE void store_float(c10::BFloat16* dst, VF<W> v) {
  const VU<W> bits = bit_cast<VU<W>>(v);
  VU<W> rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest even
  rounded = v != v ? VU<W>{} + 0x7fc0u : rounded;
  const VH<W> half = __builtin_convertvector(rounded, VH<W>);
  std::memcpy(dst, &half, sizeof half);
}

template <int W>
NPC_INLINE void store_float(c10::Half* dst, VF<W> v) {
  // c10::detail::fp16_ieee_from_fp32_value lane-wise: the rounding happens in an fp32 add at the right scale.
  const VU<W> bits = bit_cast<VU<W>>(v);
  const VU<W> doubled = bits + bits;  // drops the sign
  VF<W> base = (bit_cast<VF<W>>(bits & 0x7fffffffu) * 0x1p+112f) * 0x1p-110f;
  VU<W> bias = doubled & 0xff000000u;
  bias = bias < 0x71000000u ? VU<W>{} + 0x71000000u : bias;
  base = bit_cast<VF<W>>((bias >> 1) + 0x07800000u) + base;
  const VU<W> base_bits = bit_cast<VU<W>>(base);
  const VU<W> nonsign = ((base_bits >> 13) & 0x7c00u) + (base_bits & 0x0fffu);
  const VU<W> out = ((bits & 0x80000000u) >> 16) | (doubled > 0xff000000u ? VU<W>{} + 0x7e00u : nonsign);
  const VH<W> half = __builtin_convertvector(out, VH<W>);
  std::memcpy(dst, &half, sizeof half);
}

// v rounded to T and back: the value a store and load of T would give.
template <typename T, int W>
NPC_INLINE VF<W> round_to(VF<W> v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T rounded[W];
    store_float<W>(rounded, v);
    return load_float<W>(rounded);
  }
}

// ---------------------------------------------------------------- ISA and dtype dispatch

int best_isa_level() {
#if NPC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return 2;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return 1;
  }
#endif
  return 0;
}

// 2 = AVX-512, 1 = AVX2 + FMA, 0 = baseline. Set when the library loads; select_isa() changes it between calls.
int g_isa_level = best_isa_level();

// Defines `name<T>(params)`, which runs the always_inline template `body<T, W>` compiled for the selected
// ISA, W being its fp32 lane count: 16 for AVX-512, 8 for AVX2, 4 for the baseline (SSE2, NEON).
#if NPC_X86
#define NPC_MULTIVERSION(name, body, params, args)                                         \
  template <typename T> NPC_TARGET_AVX512 void name##_avx512 params { body<T, 16> args; } \
  template <typename T> NPC_TARGET_AVX2 void name##_avx2 params { body<T, 8> args; }      \
  template <typename T> void name##_base params { body<T, 4> args; }                      \
  template <typename T> void name params {                                                 \
    switch (g_isa_level) {                                                                 \
      case 2: return name##_avx512<T> args;                                                \
      case 1: return name##_avx2<T> args;                                                  \
      default: return name##_base<T> args;                                                 \
    }                                                                                      \
  }
#else
#define NPC_MULTIVERSION(name, body, params, args) \
  template <typename T> void name params { body<T, 4> args; }
#endif

template <typename F>
void dispatch_dtype(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    case c10::ScalarType::Half: return f(c10::Half{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (want float32, bfloat16 or float16)");
  }
}

// ---------------------------------------------------------------- lane reductions

// Index vectors as compile-time constants (a loop at the use makes gcc assemble them lane by lane).
template <int W, typename Lane>
struct IndexTable {
  static constexpr std::array<int32_t, W> lanes = [] {
    std::array<int32_t, W> out{};
    for (int i = 0; i < W; ++i) out[i] = Lane{}(i);
    return out;
  }();
  NPC_INLINE static VI<W> get() {
    VI<W> v;
    std::memcpy(&v, lanes.data(), sizeof v);
    return v;
  }
};

struct Identity {
  constexpr int32_t operator()(int i) const { return i; }
};

template <int Seg, int Offset>
struct FoldLane {  // lane i of a fold: segment i / Seg of the pair (a, b), its lane i % Seg, plus Offset
  constexpr int32_t operator()(int i) const { return i / Seg * 2 * Seg + i % Seg + Offset; }
};

template <int Mask>
struct XorLane {
  constexpr int32_t operator()(int i) const { return i ^ Mask; }
};

struct AddLanes {
  template <typename V>
  NPC_INLINE V operator()(V a, V b) const { return a + b; }
};

struct MaxLanes {
  template <typename V>
  NPC_INLINE V operator()(V a, V b) const { return a > b ? a : b; }
};

template <int W>
NPC_INLINE VI<W> lane_index() {
  return IndexTable<W, Identity>::get();
}

// Reduces the W lanes with `op` by a butterfly (lane i meets lane i ^ Mask); every lane ends with the result.
template <int W, int Mask = W / 2, typename Op>
NPC_INLINE float reduce_lanes(VF<W> v, Op op) {
  if constexpr (Mask == 0) {
    return v[0];
  } else {
    return reduce_lanes<W, Mask / 2>(op(v, __builtin_shuffle(v, IndexTable<W, XorLane<Mask>>::get())), op);
  }
}

// a holds partial sums of token i in segments of 2 Seg lanes, b those of token i + 1; returns each
// segment summed down to Seg lanes, a's first.
template <int W, int Seg>
NPC_INLINE VF<W> fold_pair(VF<W> a, VF<W> b) {
  return __builtin_shuffle(a, b, IndexTable<W, FoldLane<Seg, 0>>::get()) +
         __builtin_shuffle(a, b, IndexTable<W, FoldLane<Seg, Seg>>::get());
}

// parts[t] holds W partial sums of token t's dot product; leaves the W totals, in token order, in parts[0].
// A transposing tree: W - 1 folds for W tokens instead of one horizontal sum per token.
template <int W, int Seg>
NPC_INLINE void fold_tokens(VF<W>* parts) {
#pragma GCC unroll 16
  for (int i = 0; i < Seg; ++i) parts[i] = fold_pair<W, Seg>(parts[2 * i], parts[2 * i + 1]);
  if constexpr (Seg > 1) fold_tokens<W, Seg / 2>(parts);
}

// 2^x lane-wise for x <= 0 within 2 ulp (Cephes exp2f). Below -126 it gives 2^-126 instead of a subnormal
// or 0; callers zero the lanes that must be 0.
template <int W>
NPC_INLINE VF<W> exp2_nonpositive(VF<W> x) {
  x = x < -126.0f ? VF<W>{} - 126.0f : x;        // keeps NaN
  const VF<W> n = (x + 12582912.0f) - 12582912.0f;  // round to nearest (|x| < 2^22)
  const VF<W> f = x - n;                            // exact, in [-0.5, 0.5]
  VF<W> p = VF<W>{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  const VI<W> exponent = (__builtin_convertvector(n, VI<W>) + 127) << 23;
  return (p * f + 1.0f) * bit_cast<VF<W>>(exponent);
}

// ---------------------------------------------------------------- paged decode attention

// Lane t = q . keys[t] for tokens t < n <= W, keys[t] at keys + t * stride (fp32, D floats); lanes past n
// are -inf. kFull (n == W) drops the per-token test from the inner loop.
template <int W, bool kFull>
NPC_INLINE VF<W> score_tokens(const float* q, const float* keys, int64_t stride, int64_t n, int64_t D) {
  VF<W> parts[W];
#pragma GCC unroll 16
  for (int t = 0; t < W; ++t) parts[t] = VF<W>{};
  for (int64_t c = 0; c < D; c += W) {
    const VF<W> q_chunk = load_float<W>(q + c);
#pragma GCC unroll 16
    for (int t = 0; t < W; ++t) {
      if (kFull || t < n) parts[t] += q_chunk * load_float<W>(keys + t * stride + c);
    }
  }
  fold_tokens<W, W / 2>(parts);
  if constexpr (kFull) return parts[0];
  return lane_index<W>() < int32_t(n) ? parts[0] : -INFINITY;
}

// probs[:n] = 2^(scores[:n] - max(scores[:n])) in place (scores in log2 units); returns their sum.
// probs has room for n rounded up to W.
template <int W>
NPC_INLINE float softmax_numerators(float* probs, int64_t n) {
  const VI<W> lanes = lane_index<W>();
  VF<W> running_max = VF<W>{} - INFINITY;
  for (int64_t t = 0; t < n; t += W) {
    running_max = MaxLanes{}(running_max, lanes < int32_t(n - t) ? load_float<W>(probs + t) : -INFINITY);
  }
  const float max = reduce_lanes<W>(running_max, MaxLanes{});
  VF<W> sum = VF<W>{};
  for (int64_t t = 0; t < n; t += W) {
    const VF<W> p = lanes < int32_t(n - t) ? exp2_nonpositive<W>(load_float<W>(probs + t) - max) : 0.0f;
    store_float<W>(probs + t, p);
    sum += p;
  }
  return reduce_lanes<W>(sum, AddLanes{});
}

// acc[:D] += sum_t probs[t] * values[t] over t < n, values[t] at values + t * stride (fp32).
// Tiles of 4 vectors of D, each with two accumulators (even and odd tokens): eight independent FMA chains,
// one broadcast per four FMAs. D past the last full tile takes one vector at a time.
template <int W>
NPC_INLINE void accumulate_values(float* acc, const float* probs, const float* values, int64_t stride,
                                  int64_t n, int64_t D) {
  int64_t c = 0;
  for (; c + 4 * W <= D; c += 4 * W) {
    VF<W> even[4] = {}, odd[4] = {};
    const float* v = values + c;
    int64_t t = 0;
    for (; t + 2 <= n; t += 2, v += 2 * stride) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        even[i] += probs[t] * load_float<W>(v + i * W);
        odd[i] += probs[t + 1] * load_float<W>(v + stride + i * W);
      }
    }
    if (t < n) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) even[i] += probs[t] * load_float<W>(v + i * W);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      store_float<W>(acc + c + i * W, load_float<W>(acc + c + i * W) + even[i] + odd[i]);
    }
  }
  for (; c < D; c += W) {
    VF<W> sum = VF<W>{};
    for (int64_t t = 0; t < n; ++t) sum += probs[t] * load_float<W>(values + t * stride + c);
    store_float<W>(acc + c, load_float<W>(acc + c) + sum);
  }
}

struct DecodeArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  const int32_t* block_tables;  // [B, max_blocks], contiguous
  const int32_t* context_lens;
  int64_t q_row, q_head, out_row, out_head;  // strides, in elements
  int64_t k_block, k_slot, k_head, v_block, v_slot, v_head;
  int64_t max_blocks, group, head_dim, block_size;  // group: query heads per kv head
  int64_t max_context_len;
  float scale;

  // Row length of the scores scratch: a group of up to 16 lanes may start at any token.
  int64_t scores_stride() const { return max_context_len + 16; }
  // fp32 scratch per worker: q and acc [G, D], scores [G, scores_stride], inv_sums [G], and for half types
  // one block of keys or values [block, D].
  int64_t scratch_floats() const {
    return 2 * group * head_dim + group * scores_stride() + group + block_size * head_dim;
  }
};

// Asks for rows [0, n) of a block (D elements each, `stride` apart) to be brought into the cache.
template <typename T>
NPC_INLINE void prefetch_rows(const T* rows, int64_t stride, int64_t n, int64_t D) {
  for (int64_t r = 0; r < n; ++r) {
    const char* row = reinterpret_cast<const char*>(rows + r * stride);
    for (int64_t offset = 0; offset < D * int64_t(sizeof(T)); offset += 64) __builtin_prefetch(row + offset);
  }
}

// rows [n, D] of T with a row stride -> dense fp32 [n, D].
template <typename T, int W>
NPC_INLINE void convert_rows(const T* src, int64_t stride, int64_t n, int64_t D, float* dst) {
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t d = 0; d < D; d += W) store_float<W>(dst + t * D + d, load_float<W>(src + t * stride + d));
  }
}

// A block's rows [0, valid) as fp32: the cache itself for fp32, else converted into `converted` ([S, D]).
// Returns the rows and sets `stride` to their row stride.
template <typename T, int W>
NPC_INLINE const float* block_as_float(const T* rows, int64_t slot_stride, int64_t valid, int64_t D,
                                       float* converted, int64_t& stride) {
  if constexpr (std::is_same_v<T, float>) {
    stride = slot_stride;
    return rows;
  } else {
    convert_rows<T, W>(rows, slot_stride, valid, D, converted);
    stride = D;
    return converted;
  }
}

// One (row, kv head), for the G query heads of that kv head, in three passes over the row's blocks:
// scores (keys), softmax over the whole row, weighted sum of values. Cache slots past the row's context are
// never read. D is a multiple of W. `next_keys`: the first key block of the next task, to prefetch.
template <typename T, int W>
NPC_INLINE void decode_task(const DecodeArgs& a, int64_t row, int64_t kv_head, float* scratch,
                            const T* next_keys, int64_t next_valid) {
  const int64_t G = a.group, D = a.head_dim, S = a.block_size, L = a.scores_stride();
  float* q = scratch;                // [G, D], scaled by scale * log2(e): scores in log2 units
  float* acc = q + G * D;            // [G, D], unnormalized output
  float* scores = acc + G * D;       // [G, L], scores, then softmax numerators
  float* inv_sums = scores + G * L;  // [G], 1 / softmax denominators
  float* converted = inv_sums + G;   // [S, D], one block in fp32 (half types)

  const T* q_row = static_cast<const T*>(a.q) + row * a.q_row + kv_head * G * a.q_head;
  const float q_scale = a.scale * 1.4426950408889634f;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; d += W) {
      store_float<W>(q + g * D + d, load_float<W>(q_row + g * a.q_head + d) * q_scale);
    }
  }
  std::fill(acc, acc + G * D, 0.0f);

  const int64_t n = a.context_lens[row];
  const int32_t* table = a.block_tables + row * a.max_blocks;
  const T* k_head = static_cast<const T*>(a.k_cache) + kv_head * a.k_head;
  const T* v_head = static_cast<const T*>(a.v_cache) + kv_head * a.v_head;
  for (int64_t start = 0; start < n; start += S) {
    const int64_t valid = std::min(S, n - start);
    // The caches are read once per step, mostly from DRAM: ask early for this block's values (third pass)
    // and for the next block's keys.
    prefetch_rows(v_head + table[start / S] * a.v_block, a.v_slot, valid, D);
    if (start + S < n) {
      prefetch_rows(k_head + table[start / S + 1] * a.k_block, a.k_slot, std::min(S, n - start - S), D);
    }
    int64_t stride;
    const float* keys = block_as_float<T, W>(k_head + table[start / S] * a.k_block, a.k_slot, valid, D,
                                             converted, stride);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t t = 0; t < valid; t += W) {
        const float* first = keys + t * stride;
        const VF<W> lane_scores = valid - t >= W
                                      ? score_tokens<W, true>(q + g * D, first, stride, W, D)
                                      : score_tokens<W, false>(q + g * D, first, stride, valid - t, D);
        store_float<W>(scores + g * L + start + t, lane_scores);
      }
    }
  }

  for (int64_t g = 0; g < G; ++g) inv_sums[g] = 1.0f / softmax_numerators<W>(scores + g * L, n);
  if (next_keys != nullptr) prefetch_rows(next_keys, a.k_slot, next_valid, D);

  for (int64_t start = 0; start < n; start += S) {
    const int64_t valid = std::min(S, n - start);
    int64_t stride;
    const float* values = block_as_float<T, W>(v_head + table[start / S] * a.v_block, a.v_slot, valid, D,
                                               converted, stride);
    for (int64_t g = 0; g < G; ++g) {
      accumulate_values<W>(acc + g * D, scores + g * L + start, values, stride, valid, D);
    }
  }

  T* out = static_cast<T*>(a.out) + row * a.out_row + kv_head * G * a.out_head;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; d += W) {
      store_float<W>(out + g * a.out_head + d, load_float<W>(acc + g * D + d) * inv_sums[g]);
    }
  }
}

// Tasks [begin, end) of the (row, kv head) grid, row-major. D is a multiple of 8 (checked): of W too, or of
// 8 where W is 16.
template <typename T, int W>
NPC_INLINE void decode_tasks_body(const DecodeArgs& a, int64_t kv_heads, int64_t begin, int64_t end,
                                  float* scratch) {
  if constexpr (W > 8) {
    if (a.head_dim % W != 0) return decode_tasks_body<T, W / 2>(a, kv_heads, begin, end, scratch);
  }
  for (int64_t task = begin; task < end; ++task) {
    const T* next_keys = nullptr;
    int64_t next_valid = 0;
    if (task + 1 < end) {
      const int64_t next_row = (task + 1) / kv_heads, next_kv_head = (task + 1) % kv_heads;
      next_keys = static_cast<const T*>(a.k_cache) + next_kv_head * a.k_head +
                  a.block_tables[next_row * a.max_blocks] * a.k_block;
      next_valid = std::min<int64_t>(a.block_size, a.context_lens[next_row]);
    }
    decode_task<T, W>(a, task / kv_heads, task % kv_heads, scratch, next_keys, next_valid);
  }
}

NPC_MULTIVERSION(decode_tasks, decode_tasks_body,
                 (const DecodeArgs& a, int64_t kv_heads, int64_t begin, int64_t end, float* scratch),
                 (a, kv_heads, begin, end, scratch))

// Checks every context length and every block id the kernel will read (contiguous tensors); returns the
// longest context. Cheap next to the attention, and it keeps a bad table from reading outside the cache.
int64_t check_tables(const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                     int64_t num_blocks) {
  const int64_t batch = block_tables.size(0), max_blocks = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  int64_t longest = 0;
  for (int64_t row = 0; row < batch; ++row) {
    const int64_t n = lens[row];
    TORCH_CHECK(n >= 1 && n <= max_blocks * block_size, "paged_decode_attention: context_lens[", row, "] = ", n,
                " is outside [1, max_blocks * block_size = ", max_blocks * block_size, "]");
    longest = std::max(longest, n);
    for (int64_t b = 0; b < (n + block_size - 1) / block_size; ++b) {
      const int64_t id = tables[row * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_decode_attention: block_tables[", row, ", ", b, "] = ", id,
                  " is not a block of the cache (", num_blocks, " blocks)");
    }
  }
  return longest;
}

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables_in, const at::Tensor& context_lens_in,
                                  double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: want q [B, H, D], caches [N, block, Hkv, D]; got ", q_in.sizes(), ", ",
              k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t batch = q_in.size(0), heads = q_in.size(1), head_dim = q_in.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && kv_heads > 0 && heads % kv_heads == 0,
              "paged_decode_attention: q ", q_in.sizes(), " does not fit cache ", k_cache.sizes(),
              " (D, H % Hkv)");
  TORCH_CHECK(q_in.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_decode_attention: dtypes differ");
  TORCH_CHECK(head_dim % 8 == 0, "paged_decode_attention: head_dim ", head_dim, " is not a multiple of 8");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_decode_attention: caches need unit stride on D");
  TORCH_CHECK(block_tables_in.dim() == 2 && block_tables_in.size(0) == batch && context_lens_in.dim() == 1 &&
                  context_lens_in.size(0) == batch,
              "paged_decode_attention: want block_tables [", batch, ", max_blocks], context_lens [", batch,
              "]");
  TORCH_CHECK(block_tables_in.scalar_type() == at::kInt && context_lens_in.scalar_type() == at::kInt,
              "paged_decode_attention: block_tables and context_lens must be int32");
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor block_tables = block_tables_in.contiguous();
  const at::Tensor context_lens = context_lens_in.contiguous();
  const int64_t max_context_len = check_tables(block_tables, context_lens, block_size, num_blocks);

  at::Tensor out = at::empty({batch, heads, head_dim}, q.options());
  if (batch == 0 || heads == 0 || head_dim == 0) return out;
  const DecodeArgs a{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                     block_tables.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(),
                     q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                     k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                     block_tables.size(1), heads / kv_heads, head_dim, block_size, max_context_len,
                     float(scale)};
  dispatch_dtype(q.scalar_type(), "paged_decode_attention", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(a.scratch_floats());
      decode_tasks<T>(a, kv_heads, begin, end, scratch.data());
    });
  });
  return out;
}

// ---------------------------------------------------------------- rotary embedding (neox layout)

struct RotaryArgs {
  void* x;
  int64_t x_token, x_head, heads;
  const void* cos;
  const void* sin;
  int64_t table_row;  // row stride of cos and sin
  const int64_t* positions;
  int64_t head_dim;
};

// Lanes [d, d + W) of both halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin of each half.
template <typename T, int W>
NPC_INLINE void rotate_lanes(T* x, const T* cos, const T* sin, int64_t d, int64_t half) {
  const VF<W> x1 = load_float<W>(x + d), x2 = load_float<W>(x + d + half);
  store_float<W>(x + d, x1 * load_float<W>(cos + d) - x2 * load_float<W>(sin + d));
  store_float<W>(x + d + half, x2 * load_float<W>(cos + d + half) + x1 * load_float<W>(sin + d + half));
}

template <typename T, int W>
NPC_INLINE void rotary_body(const RotaryArgs& a, int64_t begin, int64_t end) {
  const int64_t half = a.head_dim / 2;
  for (int64_t t = begin; t < end; ++t) {
    const T* cos = static_cast<const T*>(a.cos) + a.positions[t] * a.table_row;
    const T* sin = static_cast<const T*>(a.sin) + a.positions[t] * a.table_row;
    for (int64_t h = 0; h < a.heads; ++h) {
      T* x = static_cast<T*>(a.x) + t * a.x_token + h * a.x_head;
      int64_t d = 0;
      for (; d + W <= half; d += W) rotate_lanes<T, W>(x, cos, sin, d, half);
      for (; d < half; ++d) rotate_lanes<T, 1>(x, cos, sin, d, half);
    }
  }
}

NPC_MULTIVERSION(rotary, rotary_body, (const RotaryArgs& a, int64_t begin, int64_t end), (a, begin, end))

void rotate_in_place(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                     const at::Tensor& sin, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == positions.size(0) && x.size(2) == cos.size(1),
              "rotary_embedding_: want ", name, " [T, heads, D] with T = ", positions.size(0), " and D = ",
              cos.size(1), "; got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == cos.scalar_type(), "rotary_embedding_: ", name, " and cos/sin dtypes differ");
  TORCH_CHECK(x.stride(2) == 1, "rotary_embedding_: ", name, " needs unit stride on D");
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2);
  if (tokens == 0 || heads == 0) return;
  const RotaryArgs a{x.data_ptr(), x.stride(0), x.stride(1), heads, cos.data_ptr(), sin.data_ptr(),
                     cos.stride(0), positions.data_ptr<int64_t>(), head_dim};
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, heads * head_dim));
  dispatch_dtype(x.scalar_type(), "rotary_embedding_", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) { rotary<T>(a, begin, end); });
  });
}

void rotary_embedding_(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& positions_in,
                       const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(positions_in.dim() == 1, "rotary_embedding_: want positions [T]");
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(1) % 2 == 0 && cos.stride(1) == 1 &&
                  sin.strides() == cos.strides() && sin.scalar_type() == cos.scalar_type(),
              "rotary_embedding_: want cos and sin [P, D] alike, D even, unit stride on D");
  const at::Tensor positions = positions_in.to(at::kLong).contiguous();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.size(0); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rotary_embedding_: positions[", t, "] = ", pos[t],
                " is outside the table [0, ", cos.size(0), ")");
  }
  rotate_in_place(q, positions, cos, sin, "q");
  if (k.has_value()) rotate_in_place(*k, positions, cos, sin, "k");
}

// ---------------------------------------------------------------- residual add + RMSNorm

struct NormArgs {
  void* x;
  void* residual;
  const void* weight;
  int64_t x_row, residual_row, hidden;
  float eps;
};

// Pass 1 on lanes [i, i + W): residual = round(residual + x); adds the rounded sums' squares to `squares`.
template <typename T, int W>
NPC_INLINE void add_lanes(T* x, T* residual, int64_t i, VF<W>& squares) {
  store_float<W>(residual + i, load_float<W>(residual + i) + load_float<W>(x + i));
  const VF<W> sum = load_float<W>(residual + i);
  squares += sum * sum;
}

// Pass 2: x = round(round(residual * rstd) * weight) for half types (RMSNorm.forward's roundings; a product
// of two half values is exact in fp32), round(residual * rstd * weight) for fp32.
template <typename T, int W>
NPC_INLINE void normalize_lanes(T* x, const T* residual, const T* weight, float rstd, int64_t i) {
  const VF<W> normed = round_to<T, W>(load_float<W>(residual + i) * rstd);
  store_float<W>(x + i, normed * load_float<W>(weight + i));
}

template <typename T, int W>
NPC_INLINE void add_rms_norm_body(const NormArgs& a, int64_t begin, int64_t end) {
  const int64_t N = a.hidden;
  const T* weight = static_cast<const T*>(a.weight);
  for (int64_t t = begin; t < end; ++t) {
    T* x = static_cast<T*>(a.x) + t * a.x_row;
    T* residual = static_cast<T*>(a.residual) + t * a.residual_row;
    VF<W> squares = VF<W>{};
    VF<1> tail_squares = VF<1>{};
    int64_t i = 0;
    for (; i + W <= N; i += W) add_lanes<T, W>(x, residual, i, squares);
    for (; i < N; ++i) add_lanes<T, 1>(x, residual, i, tail_squares);
    const float sum_sq = reduce_lanes<W>(squares, AddLanes{}) + tail_squares[0];
    const float rstd = 1.0f / std::sqrt(sum_sq / float(N) + a.eps);
    for (i = 0; i + W <= N; i += W) normalize_lanes<T, W>(x, residual, weight, rstd, i);
    for (; i < N; ++i) normalize_lanes<T, 1>(x, residual, weight, rstd, i);
  }
}

NPC_MULTIVERSION(add_rms_norm, add_rms_norm_body, (const NormArgs& a, int64_t begin, int64_t end),
                 (a, begin, end))

void add_rms_norm_(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && weight.dim() == 1 && weight.size(0) == x.size(1),
              "add_rms_norm_: want x and residual [T, N], weight [N]; got ", x.sizes(), ", ", residual.sizes(),
              ", ", weight.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "add_rms_norm_: dtypes differ");
  TORCH_CHECK(x.stride(1) == 1 && residual.stride(1) == 1 && weight.stride(0) == 1,
              "add_rms_norm_: x, residual and weight need unit stride on N");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  if (tokens == 0 || hidden == 0) return;
  const NormArgs a{x.data_ptr(), residual.data_ptr(), weight.data_ptr(), x.stride(0), residual.stride(0),
                   hidden, float(eps)};
  dispatch_dtype(x.scalar_type(), "add_rms_norm_", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / hidden),
                     [&](int64_t begin, int64_t end) { add_rms_norm<T>(a, begin, end); });
  });
}

// ---------------------------------------------------------------- ISA selection

const char* const kIsaNames[] = {"base", "avx2", "avx512"};

// "auto": the best this CPU has; "current": no change; else one of kIsaNames the CPU supports.
std::string select_isa(const std::string& name) {
  const int best = best_isa_level();
  if (name == "auto") {
    g_isa_level = best;
  } else if (name != "current") {
    const auto* found = std::find(std::begin(kIsaNames), std::end(kIsaNames), name);
    TORCH_CHECK(found != std::end(kIsaNames), "select_isa: unknown ISA '", name,
                "' (want auto, current, base, avx2 or avx512)");
    TORCH_CHECK(found - std::begin(kIsaNames) <= best, "select_isa: this CPU does not support ", name);
    g_isa_level = int(found - std::begin(kIsaNames));
  }
  return kIsaNames[g_isa_level];
}

}  // namespace

TORCH_LIBRARY(npc_cpu_ops, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
  m.def("rotary_embedding_(Tensor(a!) q, Tensor(b!)? k, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("select_isa(str name) -> str", &select_isa);
}

TORCH_LIBRARY_IMPL(npc_cpu_ops, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rotary_embedding_", &rotary_embedding_);
  m.impl("add_rms_norm_", &add_rms_norm_);
}
