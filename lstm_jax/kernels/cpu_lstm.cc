// A CPU LSTM recurrence for XLA's FFI: the whole time loop of one layer in one call.
//
// Why: at small batch an LSTM step is ~65k multiply-adds (B=1, H=128), so a lax.scan on
// XLA:CPU spends most of each step dispatching its ~8 (forward) and ~14 (backward) thunks,
// 0.4-0.7 us each (benchmarks/cpu-notes.md). Here a step is one register-blocked product
// h @ W_hh plus the fused gate math, with no dispatch between steps.
//
// Contract (the same as lstm_jax._recurrence.recurrence, gate order i, f, g, o):
//   z_t     = xw_t + b + h_{t-1} @ W_hh                   (B, 4H); W_hh is (P, 4H)
//   i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o);  g = tanh(z_g)
//   c_t     = f * c_{t-1} + i * g;   r_t = o * tanh(c_t)
//   h_t     = r_t, or r_t @ W_hr (H, P) with a projection (proj_size; P = H without one)
// xw_t = x_t @ W_ih is either given (the caller's product over all steps) or, with
// has_input, formed here step by step from the layer input x (T, B, D) and W_ih (D, 4H).
// Where mask[t, b] is false the state is carried unchanged and y_t is zero. The forward
// pass saves the activated gates (over xw, in place, when XLA aliases the two) and c_{t-1};
// the backward pass walks time in reverse carrying (dh, dc) and emits dz_t (and, with
// has_input, dx_t = dz_t @ W_ih^T), from which the caller forms the weight gradients as
// large products after the loop.
//
// Every array may carry leading "problem" dimensions (vmap, both directions of a
// bidirectional layer): problems are independent for the whole loop and run one per thread
// with no synchronisation. A single problem large enough is split by hidden units between a
// team of threads, which exchange h (or dz) once per step through a barrier (run_teams).
//
// float32 only. Built on first use by lstm_jax/kernels/cpu_native.py with the host's
// compiler (-O3 -march=native).

#include <algorithm>
#include <chrono>
#include <functional>
#include <atomic>
#include <memory>
#include <new>
#include <string>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vectors of `Lanes` floats: 8 (AVX2's ymm) for the element loops and narrow panels; the
// products use the widest the target has (16 with AVX-512).
template <int Lanes>
struct Vector;
template <>
struct Vector<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vector<16> {
  typedef float type __attribute__((vector_size(64)));
};
template <int Lanes>
using vec = typename Vector<Lanes>::type;

template <int Lanes>
inline vec<Lanes> load(const float* p) {
  vec<Lanes> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int Lanes>
inline void store(float* p, vec<Lanes> v) { std::memcpy(p, &v, sizeof v); }

// The kernel's own float buffers (packed weights, state, scratch) start on a cache line.
// operator new gives 16-byte alignment; a panel 16 bytes off makes every 64-byte load of
// the product span two lines, which Intel's cores pay for: on a Xeon (Cascade Lake) the
// product ran at 84-89 GFLOP/s per core against 112-128 aligned (AMD's Zen 4, which splits
// a 64-byte load in two halves anyway, barely noticed).
template <typename T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
using Floats = std::vector<float, CacheAligned<float>>;

// tanh as a 13/6-degree odd/even rational function (the coefficients of Eigen's
// generic_fast_tanh_float, which XLA:CPU also uses: error <= 3e-7 against tanhf). Clamped
// at +-7.9053, Eigen's later bound, where the rational function is still below 1 (at 9 it
// reaches 1.0000002, and a sigmoid gate built on it would leave [0, 1]).
// Written as plain arithmetic so that the compiler vectorises the loops that call it.
inline float tanh_approx(float x) {
  // Clamped with comparisons that are false for NaN, so NaN propagates (std::min/max
  // would turn it into -9 and hide a diverged run).
  constexpr float kBound = 7.90531110763549805f;
  x = x < -kBound ? -kBound : (x > kBound ? kBound : x);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return (x * p) / q;
}

// The products' right operand is packed once per call into column panels: the panel of
// columns [j, j + width) is stored row by row at offset K * j, so each step streams it
// contiguously (a row-major W_hh read column block by column block strides 16 KiB per row at
// H = 1024 and defeats the prefetcher). Full panels are kPanel wide, the tail 8 wide, and
// the last N % 8 columns one panel of their own.
constexpr int64_t kPanel = 64;

inline int64_t panel_width(int64_t N, int64_t j) {
  if (j + kPanel <= N / kPanel * kPanel) return kPanel;
  if (j + 8 <= N / 8 * 8) return 8;
  return N - j;
}

// packed[K * j + k * width + c] = w[k * ldw + j + c] for every panel [j, j + width) of the
// N columns: K * N floats.
void pack_panels(const float* w, int64_t ldw, int64_t N, int64_t K, float* packed) {
  for (int64_t j = 0; j < N;) {
    const int64_t width = panel_width(N, j);
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(packed + K * j + k * width, w + k * ldw + j, width * sizeof(float));
    j += width;
  }
}

// The product's vector width, accumulator registers and rows per block: with AVX-512,
// 16-float vectors and 24 of its 32 registers, 6 rows x 64 columns; with AVX2, 8 of its 16,
// 4 rows x 16 columns. Single core, 48 x 384 x 512 and 112 x 1024 x 1024: on a Xeon
// (Cascade Lake) 6 rows ran at 127-140 GFLOP/s against 113-125 with 4 (16 accumulators),
// whose loop leaves the two FMA ports idle now and then; AMD's Zen 4 ran both at ~114 (its
// peak, against ~100 with 8-float vectors).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 24;
constexpr int kBlockRows = 6;
#else
constexpr int kLanes = 8;
constexpr int kAccumulators = 8;
constexpr int kBlockRows = 4;
#endif

// Element (r, k) of a product's left operand a: a[r lda + k], or transposed (the weight
// gradients' packed strips of A's columns) a[k lda + r].
template <bool Transposed>
inline float left(const float* a, int64_t lda, int r, int64_t k) {
  return Transposed ? a[k * lda + r] : a[r * lda + k];
}

// z[r, c0 : c0 + L V] += a[r, :K] @ panel[:K, c0 : c0 + L V] for R rows, the R * V
// accumulators (L-float vectors) held in registers across the whole K loop. With S > 1 each
// accumulator is split into S partial sums over k mod S, so that a narrow block (one or two
// rows of an 8-column panel) is not bound by the latency of a single chain of
// multiply-adds.
template <int L, int R, int V, int S = 1, bool Strip = false>
inline void panel_block(const float* a, int64_t lda, const float* panel, int64_t width,
                        int64_t c0, int64_t K, float* z, int64_t ldz) {
  vec<L> acc[S][R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      acc[0][r][v] = load<L>(z + r * ldz + c0 + L * v);
      for (int s = 1; s < S; ++s) acc[s][r][v] = vec<L>{};
    }
  const float* w = panel + c0;
  int64_t k = 0;
  for (; k + S <= K; k += S, w += S * width)
    for (int s = 0; s < S; ++s) {
      vec<L> wv[V];
      for (int v = 0; v < V; ++v) {
        wv[v] = load<L>(w + s * width + L * v);
        // Keep the weight in a register: folded into each row's multiply-add instead, it
        // is loaded R times and the loads, not the multiply-adds, bound the loop.
#if defined(__x86_64__) && defined(__AVX__)
        asm("" : "+v"(wv[v]));
#endif
      }
      for (int r = 0; r < R; ++r) {
        // broadcast (x - 0 is x, even -0)
        const vec<L> ar = left<Strip>(a, lda, r, k + s) - vec<L>{};
        for (int v = 0; v < V; ++v) acc[s][r][v] += ar * wv[v];
      }
    }
  for (; k < K; ++k, w += width)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v)
        acc[0][r][v] += (left<Strip>(a, lda, r, k) - vec<L>{}) * load<L>(w + L * v);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      for (int s = 1; s < S; ++s) acc[0][r][v] += acc[s][r][v];
      store<L>(z + r * ldz + c0 + L * v, acc[0][r][v]);
    }
}

// One panel for R rows: split into column blocks of L V floats with R * V <= kAccumulators.
template <int R, bool Strip = false>
inline void panel_rows(const float* a, int64_t lda, const float* panel, int64_t width, int64_t K,
                       float* z, int64_t ldz) {
  if (width == kPanel) {
    // One or two rows (B = 1: a matrix-vector product, bound by the loads) ran 7-9% faster
    // with 8-float vectors and more accumulators.
    constexpr int L = R >= 4 ? kLanes : 8;
    constexpr int V = std::min<int>(kPanel / L, kAccumulators / R);
    for (int64_t c0 = 0; c0 < kPanel; c0 += L * V)
      panel_block<L, R, V, 1, Strip>(a, lda, panel, width, c0, K, z, ldz);
  } else if (width == 8) {
    panel_block<8, R, 1, (R < 4 ? 4 / R : 1), Strip>(a, lda, panel, width, 0, K, z, ldz);
  } else {
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < width; ++c) {
        float sum = z[r * ldz + c];
        for (int64_t k = 0; k < K; ++k) sum += left<Strip>(a, lda, r, k) * panel[k * width + c];
        z[r * ldz + c] = sum;
      }
  }
}

// The rows of a product done in blocks of kBlockRows; the rest go in blocks of 4, 2 and 1.
// A remainder of 2 or 3 rows after blocks of 6 is better done as 4 + 4 (+ 1): a block of
// two rows has too few accumulators to keep the FMA ports busy.
inline int64_t block_rows(int64_t rows) {
  int64_t blocks = rows / kBlockRows;
  if (kBlockRows == 6 && blocks > 0 && (rows % 6 == 2 || rows % 6 == 3)) --blocks;
  return blocks * kBlockRows;
}

// z[:rows, :N] += a[:rows, :K] @ w[:K, :N], with w packed by pack_panels (row-major a and z,
// leading dimensions lda and ldz).
void product(const float* a, int64_t lda, const float* packed, int64_t N, int64_t K, float* z,
             int64_t ldz, int64_t rows) {
  const int64_t wide_rows = block_rows(rows);
  for (int64_t j = 0; j < N;) {
    const int64_t width = panel_width(N, j);
    const float* panel = packed + K * j;
    int64_t r = 0;
    for (; r + kBlockRows <= wide_rows; r += kBlockRows)
      panel_rows<kBlockRows>(a + r * lda, lda, panel, width, K, z + r * ldz + j, ldz);
    for (; r + 4 <= rows; r += 4)
      panel_rows<4>(a + r * lda, lda, panel, width, K, z + r * ldz + j, ldz);
    for (; r + 2 <= rows; r += 2)
      panel_rows<2>(a + r * lda, lda, panel, width, K, z + r * ldz + j, ldz);
    for (; r < rows; ++r) panel_rows<1>(a + r * lda, lda, panel, width, K, z + r * ldz + j, ldz);
    j += width;
  }
}

// x <- k tanh(k x) + (1 - k) over n values: tanh for k = 1, the logistic sigmoid for k = 1/2.
inline void activate(float* __restrict x, int64_t n, float k) {
  for (int64_t j = 0; j < n; ++j) x[j] = k * tanh_approx(k * x[j]) + (1.0f - k);
}

// The cell update of one row's n units from its activated gates. The pointers never
// overlap; saying so (restrict) lets the compiler vectorise the loop, which it otherwise
// runs one element at a time behind run-time overlap checks.
inline void cell_update_row(const float* __restrict gi, const float* __restrict gf,
                            const float* __restrict gg, const float* __restrict go,
                            float* __restrict c, float* __restrict h, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float cn = gf[j] * c[j] + gi[j] * gg[j];
    c[j] = cn;
    h[j] = go[j] * tanh_approx(cn);
  }
}

// memcpy of n floats that is defined for n = 0 (an empty part's null vector data).
inline void copy_floats(float* dst, const float* src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, n * sizeof(float));
}

// copy_floats for what the loop saves for the backward pass (read only by a later call):
// whole lines go to memory with streaming stores, which neither read the line first nor push
// W out of the cache. Callers order them with stream_fence() before they signal.
inline void stream_floats(float* dst, const float* src, int64_t n) {
#if defined(__AVX512F__)
  int64_t j = 0;
  while (j < n && reinterpret_cast<uintptr_t>(dst + j) % 64 != 0) dst[j] = src[j], ++j;
  for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
  for (; j < n; ++j) dst[j] = src[j];
#else
  copy_floats(dst, src, n);
#endif
}

// What the forward pass saves for the backward: streamed (stream_floats) or copied.
inline void save_floats(float* dst, const float* src, int64_t n, bool stream) {
  if (stream) {
    stream_floats(dst, src, n);
  } else {
    copy_floats(dst, src, n);
  }
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// The weight gradients of a layer, formed after its backward loop from dz over all K = T B
// rows k = t B + b of a problem: [dW_ih; dW_hh] = A^T dz with A's row k = [x_k, h_{k-1}],
// where h_{k-1} is h0[b] at t = 0 and y_{t-1}[b] after (equal to the state wherever dz is
// non-zero: masked steps have dz = 0), and db = the column sums of dz. One product over
// [x, h_{t-1}] that reads x, h0 and ys in place: XLA:CPU copies the concatenation and A's
// transpose before its product. Alone, two threads (benchmark machine): 32,100,128,256
// 13.5 ms (187 GFLOP/s) against XLA's 15.1 ms; 128,50,512,512 143 against 153 ms.
struct WeightGradArgs {
  const float *x, *h0, *ys, *dz;  // x (K, D) or null; h0 (B, P); ys and dz (K, P) and (K, N)
  float *dw_ih, *dw_hh, *db;      // (D, N) or null, (P, N), (N) or null
  int64_t K, B, D, P, N;
};

// A work item is a range of columns of every output row, over all K: a problem's columns
// split between the threads (WeightGradImpl). A block of kGradRows rows k at a time is packed:
// A's rows as strips of kStrip columns, k-major (kGradRows x (D + P) floats; kGradRowsWide
// rows when D + P > 512, so that they stay in L2), then, chunk by chunk, kGradCols of dz's
// columns as panels (kGradColsWide from 4H = 2048). Each strip meets every panel of a chunk.
// The strips are packed once per block for all of an item's columns: with items of one
// chunk, four at 32,100,128,256, A was packed four times, and the packing took a quarter of
// the call (one core, harness: 2.9 ms of 11.8 for one item).
constexpr int64_t kGradRows = 256;
constexpr int64_t kGradRowsWide = 128;
constexpr int64_t kGradCols = 256;
constexpr int64_t kGradColsWide = 512;
constexpr int kStrip = kBlockRows;  // the product's block of rows (6 with AVX-512)

// Columns of dz packed at a time.
inline int64_t grad_chunk(int64_t N) { return N >= 2048 ? kGradColsWide : kGradCols; }

// Floats from one strip to the next: a strip's floats and a cache line more, so that the
// packing's writes (one 16-byte piece of every strip per k) do not all fall in the same
// cache set, as they would at a stride of 4 KiB.
inline int64_t strip_stride(int64_t rows) { return kStrip * rows + 16; }

// Columns [0, width) of A's rows k in [k0, k0 + rows) (row(k): x_k, or h_{k-1}) packed as
// strips of kStrip columns [m, m + kStrip), k-major: strips[m / kStrip * strip_stride(rows) +
// k * kStrip + r] = A[k, m + r]. The last strip is zero-padded.
template <typename Row>
void pack_strips(Row row, int64_t width, int64_t k0, int64_t rows, float* strips) {
  const int64_t full = width / kStrip * kStrip, stride = strip_stride(rows);
  for (int64_t k = 0; k < rows; ++k) {
    const float* src = row(k0 + k);
    float* dst = strips + k * kStrip;
    for (int64_t m = 0; m < full; m += kStrip)
      copy_floats(dst + m / kStrip * stride, src + m, kStrip);
    if (full < width) {
      float* tail = dst + full / kStrip * stride;
      for (int r = 0; r < kStrip; ++r) tail[r] = full + r < width ? src[full + r] : 0.0f;
    }
  }
}

// out[:R, :cols] += strip^T @ the packed block of dz (rows x cols), strip k-major R x rows.
template <int R>
void gradient_strip(const float* strip, int64_t rows, const float* packed, int64_t cols,
                    float* out, int64_t ldo) {
  for (int64_t j = 0; j < cols;) {
    const int64_t width = panel_width(cols, j);
    panel_rows<R, true>(strip, kStrip, packed + rows * j, width, rows, out + j, ldo);
    j += width;
  }
}

// The next block's rows of dz, x and ys, asked for a few cache lines at a time while this
// block's products run: fetched only when packed, they stalled the loop (the packing
// cost 2.4 ms alone but 7.4 ms inside the loop at 32,100,128,256, one core).
class BlockPrefetch {
 public:
  // `rows` rows of `width` floats, `ld` apart (from the start of base's cache line).
  void add(const float* base, int64_t ld, int64_t width, int64_t rows) {
    const int64_t before = reinterpret_cast<uintptr_t>(base) % 64 / sizeof(float);
    if (rows > 0 && width > 0) regions_[count_++] = Region{base - before, ld, width + before, rows};
  }
  // Spreads the lines over `calls` calls of fetch().
  void spread(int64_t calls) {
    int64_t lines = 0;
    for (int i = 0; i < count_; ++i) lines += regions_[i].rows * ((regions_[i].width + 15) / 16);
    per_call_ = (lines + calls - 1) / std::max<int64_t>(1, calls);
  }
  void fetch() {
    for (int64_t n = 0; n < per_call_ && region_ < count_; ++n) {
      const Region& g = regions_[region_];
      __builtin_prefetch(g.base + row_ * g.ld + col_, 0, 2);
      if ((col_ += 16) >= g.width) {
        col_ = 0;
        if (++row_ == g.rows) row_ = 0, ++region_;
      }
    }
  }

 private:
  struct Region {
    const float* base;
    int64_t ld, width, rows;
  };
  Region regions_[3];
  int count_ = 0, region_ = 0;
  int64_t row_ = 0, col_ = 0, per_call_ = 0;
};

// out[:count, :cols] += A's columns (packed by pack_strips) ^T @ the packed block of dz.
void gradient_rows(const float* strips, int64_t count, int64_t rows, const float* packed,
                   int64_t cols, float* out, int64_t ldo, BlockPrefetch& next) {
  const int64_t stride = strip_stride(rows);
  int64_t m = 0;
  for (; m + kStrip <= count; m += kStrip) {
    next.fetch();
    gradient_strip<kStrip>(strips + m / kStrip * stride, rows, packed, cols, out + m * ldo, ldo);
  }
  for (; m < count; ++m)
    gradient_strip<1>(strips + m / kStrip * stride + m % kStrip, rows, packed, cols,
                      out + m * ldo, ldo);
}

inline int64_t grad_strips(int64_t D, int64_t P) {
  return (D + kStrip - 1) / kStrip + (P + kStrip - 1) / kStrip;
}

// Rows k packed at a time: the strips of A (block x (D + P) floats) stay in L2.
inline int64_t grad_block_rows(int64_t D, int64_t P) {
  return D + P > 512 ? kGradRowsWide : kGradRows;
}

// Columns [n0, n0 + cols) of every gradient, grad_chunk(N) columns at a time: each block of
// A's rows is packed once for all of them. `packed` holds grad_block_rows(D, P) *
// grad_chunk(N) floats, `strips` grad_strips(D, P) * strip_stride(grad_block_rows(D, P)).
void weight_grad_columns(const WeightGradArgs& a, int64_t n0, int64_t cols, float* packed,
                         float* strips) {
  const int64_t N = a.N, D = a.x != nullptr ? a.D : 0;
  const int64_t block = grad_block_rows(D, a.P);
  for (int64_t m = 0; m < D; ++m) std::fill_n(a.dw_ih + m * N + n0, cols, 0.0f);
  for (int64_t m = 0; m < a.P; ++m) std::fill_n(a.dw_hh + m * N + n0, cols, 0.0f);
  if (a.db != nullptr) std::fill_n(a.db + n0, cols, 0.0f);
  const auto x_row = [&a](int64_t k) { return a.x + k * a.D; };
  const auto h_row = [&a](int64_t k) { return k < a.B ? a.h0 + k * a.P : a.ys + (k - a.B) * a.P; };
  const int64_t chunk = grad_chunk(N);
  for (int64_t k0 = 0; k0 < a.K; k0 += block) {
    const int64_t rows = std::min(block, a.K - k0);
    // x's strips, then h's from the next whole strip on: once per block for all the columns.
    float* h_strips = strips + (D + kStrip - 1) / kStrip * strip_stride(rows);
    if (D > 0) pack_strips(x_row, D, k0, rows, strips);
    pack_strips(h_row, a.P, k0, rows, h_strips);
    for (int64_t c0 = n0; c0 < n0 + cols; c0 += chunk) {
      const int64_t width = std::min(chunk, n0 + cols - c0);
      const float* dz = a.dz + k0 * N + c0;
      for (int64_t k = 0; k < rows; ++k) {
        const float* __restrict src = dz + k * N;
        for (int64_t j = 0; j < width;) {
          const int64_t w = panel_width(width, j);
          copy_floats(packed + rows * j + k * w, src + j, w);
          j += w;
        }
        if (a.db != nullptr) {
          float* __restrict db = a.db + c0;
          for (int64_t c = 0; c < width; ++c) db[c] += src[c];
        }
      }
      // While this chunk's products run: the next chunk's rows of dz, or after the last
      // chunk the next block's rows of dz, x and ys.
      BlockPrefetch next;
      const int64_t c1 = c0 + chunk;
      if (c1 < n0 + cols) {
        next.add(a.dz + k0 * N + c1, N, std::min(chunk, n0 + cols - c1), rows);
      } else {
        const int64_t k1 = k0 + rows, next_rows = std::min(block, a.K - k1);
        if (next_rows > 0) {
          next.add(a.dz + k1 * N + n0, N, std::min(chunk, cols), next_rows);
          if (D > 0) next.add(a.x + k1 * D, 0, next_rows * D, 1);
          const int64_t h1 = std::max(k1, a.B);  // rows of ys (those of h0 stay cached)
          next.add(a.ys + (h1 - a.B) * a.P, 0, (k1 + next_rows - h1) * a.P, 1);
        }
      }
      next.spread(D / kStrip + a.P / kStrip);  // the calls of fetch(): one per whole strip
      if (D > 0) gradient_rows(strips, D, rows, packed, width, a.dw_ih + c0, N, next);
      gradient_rows(h_strips, a.P, rows, packed, width, a.dw_hh + c0, N, next);
    }
  }
}

// The backward of cell_update_row for one row: from dh (this step's total is dh + dy) and
// dc to dz of the four gates, and dc_{t-1} written over dc. tanh(c_t) is recomputed from
// the activations and c_{t-1}.
inline void cell_update_grad_row(const float* __restrict gi, const float* __restrict gf,
                                 const float* __restrict gg, const float* __restrict go,
                                 const float* __restrict c_prev, const float* __restrict dy,
                                 const float* __restrict dh, float* __restrict dc,
                                 float* __restrict di, float* __restrict df,
                                 float* __restrict dg, float* __restrict d_o, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float i = gi[j], f = gf[j], g = gg[j], o = go[j];
    const float tc = tanh_approx(f * c_prev[j] + i * g);
    const float dr = dh[j] + dy[j];
    const float dct = dc[j] + dr * o * (1.0f - tc * tc);
    di[j] = (dct * g) * ((1.0f - i) * i);
    df[j] = (dct * c_prev[j]) * ((1.0f - f) * f);
    dg[j] = (dct * i) * ((1.0f - g) * (g + 1.0f));
    d_o[j] = (dr * tc) * ((1.0f - o) * o);
    dc[j] = dct * f;
  }
}

// `out` is the size of the state h fed back and emitted: the projection size P with a
// projection (h_t = r_t @ W_hr, Sak et al. 2014), else H.
// `input` is the size D of the layer input x when the kernel forms x_t @ W_ih itself (0 when
// it is given xw = x @ W_ih instead).
struct Dims {
  int64_t problems = 1, steps = 0, batch = 0, hidden = 0, out = 0, input = 0;
  bool projection = false;
};

// A spinning barrier for the threads of one team: one wait per time step, so sleeping in
// the kernel (microseconds) would cost more than the step. After a while it yields, so a
// descheduled partner on a busy machine does not burn the core.
class StepBarrier {
 public:
  explicit StepBarrier(int64_t size) : size_(size) {}
  // `phase` counts the caller's own waits (each member keeps one). False once a member has
  // failed (abort()): the others then stop instead of waiting for it forever.
  bool wait(int64_t& phase) {
    if (size_ == 1) return !aborted_.load(std::memory_order_relaxed);
    const int64_t target = size_ * ++phase;
    arrived_.fetch_add(1, std::memory_order_acq_rel);
    for (int64_t spins = 0; arrived_.load(std::memory_order_acquire) < target; ++spins) {
      if (aborted_.load(std::memory_order_relaxed)) return false;
      if (spins > 4000) std::this_thread::yield();
    }
    return !aborted_.load(std::memory_order_relaxed);
  }
  void abort() { aborted_.store(true, std::memory_order_relaxed); }

 private:
  const int64_t size_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<bool> aborted_{false};
};

// A range [u0, u1) of hidden units (or, with a projection, of the P state columns).
struct Part {
  int64_t u0, u1;
  int64_t width() const { return u1 - u0; }
};

// A problem's hidden units are cut into a fixed number of parts before its loop starts, one
// per team member the call may get. A team of k members gives each a contiguous group of
// parts (member_share), so the calling thread can start alone, owning every part, and hand
// parts over at a step boundary to helpers that arrive later, with nothing to repack.
// Parts are multiples of 8 units (the vector width): members' slices of a row share at most
// the cache line at each edge.
inline int64_t part_chunk(int64_t size, int64_t parts) {
  return ((size + parts - 1) / parts + 7) / 8 * 8;
}

inline Part unit_part(int64_t size, int64_t parts, int64_t index) {
  const int64_t chunk = part_chunk(size, parts);
  const int64_t u0 = std::min(size, index * chunk);
  return {u0, std::min(size, u0 + chunk)};
}

// The largest count <= n of parts that all get units (rounding the parts up to multiples
// of 8 can leave the last ones of a larger count empty).
inline int64_t parts_with_units(int64_t hidden, int64_t n) {
  while (n > 1 && (n - 1) * part_chunk(hidden, n) >= hidden) --n;
  return n;
}

// The parts [first, last) of member `member` of a team of `team`.
struct Share {
  int64_t first, last;
};

inline Share member_share(int64_t parts, int64_t team, int64_t member) {
  return {member * parts / team, (member + 1) * parts / team};
}

// The transpose of w's rows [rows.u0, rows.u1) (each `width` floats), (width, n), packed by
// pack_panels into `packed`; `scratch` holds the transpose on the way.
void pack_transposed_rows(const float* w, int64_t width, const Part& rows,
                          Floats& scratch, float* packed) {
  const int64_t n = rows.width();
  scratch.resize(width * n);
  for (int64_t u = 0; u < n; ++u)
    for (int64_t j = 0; j < width; ++j) scratch[j * n + u] = w[(rows.u0 + u) * width + j];
  pack_panels(scratch.data(), n, n, width, packed);
}

// Column q * H + u0 + j of a (.., 4H) row is column q * n + j of the part's packed row.
inline void gather_gates(const float* row, int64_t H, const Part& part, float* out) {
  const int64_t n = part.width();
  for (int q = 0; q < 4; ++q) std::memcpy(out + q * n, row + q * H + part.u0, n * sizeof(float));
}

// Asks for the part's columns of rows [row0, row0 + rows) of a (.., width) array (gate
// blocks of H when `gates`) to be fetched into the cache: the next step's inputs, while this
// step's product runs (streamed from memory, they cost ~15 us per step at B=32, H=256).
inline void prefetch_rows(const float* base, int64_t row0, int64_t rows, int64_t width,
                          int64_t H, const Part& part, bool gates) {
  const int64_t n = part.width();
  for (int64_t r = row0; r < row0 + rows; ++r)
    for (int q = 0; q < (gates ? 4 : 1); ++q) {
      const float* p = base + r * width + q * H + part.u0;
      for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(p + j, 0, 2);
    }
}

inline void scatter_gates(const float* packed, int64_t H, const Part& part, float* row,
                          bool stream) {
  const int64_t n = part.width();
  for (int q = 0; q < 4; ++q) save_floats(row + q * H + part.u0, packed + q * n, n, stream);
}

// Saved activations (and c_{t-1}) of at least this many bytes are written with streaming
// stores: by the time the backward pass reads them they have left the caches anyway. A/B
// fwd+bwd (benchmarks/cpu_ab.py, three runs): 8,1000,128,256 (40 MB) 0.95-0.99x,
// 16,500,128,128 0.98-0.99x, 128,50,512,512 0.99-1.00x, 32,100,128,256 (16 MB) 1.00x; with
// streaming at every size 1,1000,32,128 (2.5 MB, read back from the cache) was 1.02x.
constexpr double kStreamSavedBytes = 8 << 20;

// Steps from `t` on while keep_going(t): the caller alone asks before each step whether
// helpers have arrived; a team member never stops early.
using KeepGoing = std::function<bool(int64_t)>;

struct ForwardArgs {
  // xw: (T, B, 4H), or null with x: (T, B, D) and w_ih: (D, 4H); w: (P, 4H); w_hr: (H, P)
  const float *xw, *x, *w_ih, *bias, *w, *w_hr, *h0, *c0;
  const bool* mask;
  float *ys, *h_out, *c_out, *acts, *c_prev;
};

// One problem's forward pass. The calling thread builds what the team shares (W_hh packed
// part by part, the cell state, h); each member then runs its parts of every step. With a
// projection each part also owns a slice of the P state columns: after the team has
// exchanged r_t (one barrier more per step) its member forms h_t[:, slice] = r_t @
// W_hr[:, slice].
class ForwardRun {
 public:
  ForwardRun(const Dims& d, const ForwardArgs& a, int64_t parts)
      : d_(d), a_(a), parts_(parts), w_(d.out * 4 * d.hidden), w_ih_(d.input * 4 * d.hidden),
        bias_(4 * d.hidden),
        c_(a.c0, a.c0 + d.batch * d.hidden), h_(2 * d.batch * d.out),
        r_(d.projection ? d.batch * d.hidden : 0), w_hr_(d.projection ? d.hidden * d.out : 0) {
    const int64_t H = d.hidden, G = 4 * H, P = d.out;
    Floats own;
    for (int64_t i = 0; i < parts; ++i) {
      const Part u = unit_part(H, parts, i);
      const int64_t g = 4 * u.width();
      own.resize(P * g);
      for (int64_t k = 0; k < P; ++k) gather_gates(a.w + k * G, H, u, own.data() + k * g);
      pack_panels(own.data(), g, g, P, w_.data() + P * 4 * u.u0);
      if (d.input > 0) {
        own.resize(d.input * g);
        for (int64_t k = 0; k < d.input; ++k)
          gather_gates(a.w_ih + k * G, H, u, own.data() + k * g);
        pack_panels(own.data(), g, g, d.input, w_ih_.data() + d.input * 4 * u.u0);
      }
      gather_gates(a.bias, H, u, bias_.data() + 4 * u.u0);
      if (d.projection) {
        const Part o = unit_part(P, parts, i);
        pack_panels(a.w_hr + o.u0, P, o.width(), H, w_hr_.data() + H * o.u0);
      }
    }
    copy_floats(h_.data(), a.h0, d.batch * P);
  }

  // Runs steps t, t + 1, ... as member `member` of a team of `team` while keep_going(t);
  // false if the team was aborted.
  bool run(int64_t& t, int64_t member, int64_t team, StepBarrier& barrier,
           const KeepGoing& keep_going) {
    const int64_t B = d_.batch, H = d_.hidden, P = d_.out;
    const Share share = member_share(parts_, team, member);
    Floats z(B * 4 * part_chunk(H, parts_)), h_own(B * P), r_own(r_.size()),
        h_proj(d_.projection ? B * part_chunk(P, parts_) : 0);
    int64_t phase = 0;
    for (; t < d_.steps && keep_going(t); ++t) {
      const float* h = h_.data() + (t % 2) * B * P;
      float* h_next = h_.data() + ((t + 1) % 2) * B * P;
      // The products read h_{t-1} from a private copy: read in place, half of it written by
      // the other core just before, the product ran at 55 GFLOP/s instead of ~100 (kernel
      // timers at 32,100,128,256: 400 -> 255 k cycles per step, copy included).
      copy_floats(h_own.data(), h, B * P);
      for (int64_t p = share.first; p < share.last; ++p)
        step_part(t, unit_part(H, parts_, p), h, h_next, h_own.data(), z.data());
      if (d_.projection) {
        if (!barrier.wait(phase)) {  // r_t complete (false: the team was aborted)
          stream_fence();
          return false;
        }
        copy_floats(r_own.data(), r_.data(), B * H);
        for (int64_t p = share.first; p < share.last; ++p)
          project_part(t, unit_part(P, parts_, p), h, h_next, r_own.data(), h_proj.data());
      }
      if (!barrier.wait(phase)) {  // h_t complete
        stream_fence();
        return false;
      }
    }
    stream_fence();  // the saved activations, before the team's end is signalled
    return true;
  }

  // The final state, once every member is done.
  void finish() {
    const int64_t n = d_.batch * d_.out;
    copy_floats(a_.h_out, h_.data() + (d_.steps % 2) * n, n);
    copy_floats(a_.c_out, c_.data(), d_.batch * d_.hidden);
  }

 private:
  // Step t of the units u: z = xw_t + b + h_{t-1} @ W_hh (xw_t = x_t @ W_ih, formed here
  // when the kernel has x), the gates, c_t and h_t (or r_t).
  void step_part(int64_t t, const Part& u, const float* h, float* h_next, const float* h_own,
                 float* z) {
    const int64_t H = d_.hidden, G = 4 * H, B = d_.batch, P = d_.out, D = d_.input,
                  n = u.width(), g = 4 * n;
    const float* bias = bias_.data() + 4 * u.u0;
    if (a_.x != nullptr) {  // (D = 0 is an empty product)
      for (int64_t b = 0; b < B; ++b) copy_floats(z + b * g, bias, g);
      product(a_.x + t * B * D, D, w_ih_.data() + D * 4 * u.u0, g, D, z, g, B);
      if (t + 1 < d_.steps)
        for (int64_t j = 0; j < B * D; j += 16) __builtin_prefetch(a_.x + (t + 1) * B * D + j, 0, 2);
    } else {
      for (int64_t b = 0; b < B; ++b) {
        float* zr = z + b * g;
        gather_gates(a_.xw + (t * B + b) * G, H, u, zr);
        for (int64_t j = 0; j < g; ++j) zr[j] += bias[j];
      }
      if (t + 1 < d_.steps) prefetch_rows(a_.xw, (t + 1) * B, B, G, H, u, true);
    }
    product(h_own, P, w_.data() + P * 4 * u.u0, g, P, z, g, B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      const bool valid = a_.mask == nullptr || a_.mask[row];
      float* zr = z + b * g;
      // sigmoid(x) = 0.5 tanh(x / 2) + 0.5: the same rational tanh for all four gates.
      activate(zr, 2 * n, 0.5f);      // i, f
      activate(zr + 2 * n, n, 1.0f);  // g
      activate(zr + 3 * n, n, 0.5f);  // o
      const float *gi = zr, *gf = zr + n, *gg = zr + 2 * n, *go = zr + 3 * n;
      float* cr = c_.data() + b * H + u.u0;
      if (a_.c_prev != nullptr) save_floats(a_.c_prev + row * H + u.u0, cr, n, stream_saved_);
      if (d_.projection) {
        // r_t of these units for the whole team; masked rows keep their state, and their
        // r is never used.
        if (valid) cell_update_row(gi, gf, gg, go, cr, r_.data() + b * H + u.u0, n);
      } else if (valid) {
        float* hn = h_next + b * P + u.u0;
        cell_update_row(gi, gf, gg, go, cr, hn, n);
        copy_floats(a_.ys + row * P + u.u0, hn, n);
      } else {  // past the sequence's end: carry the state, output zero
        copy_floats(h_next + b * P + u.u0, h + b * P + u.u0, n);
        std::fill(a_.ys + row * P + u.u0, a_.ys + row * P + u.u1, 0.0f);
      }
      if (a_.acts != nullptr) scatter_gates(zr, H, u, a_.acts + row * G, stream_saved_);
    }
  }

  // h_t[:, o] = r_t @ W_hr[:, o] for the state columns o.
  void project_part(int64_t t, const Part& o, const float* h, float* h_next, const float* r_own,
                    float* h_proj) {
    const int64_t H = d_.hidden, B = d_.batch, P = d_.out, np = o.width();
    std::fill(h_proj, h_proj + B * np, 0.0f);
    product(r_own, H, w_hr_.data() + H * o.u0, np, H, h_proj, np, B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      float* hn = h_next + b * P + o.u0;
      float* yr = a_.ys + row * P + o.u0;
      if (a_.mask == nullptr || a_.mask[row]) {
        copy_floats(hn, h_proj + b * np, np);
        copy_floats(yr, hn, np);
      } else {
        copy_floats(hn, h + b * P + o.u0, np);
        std::fill(yr, yr + np, 0.0f);
      }
    }
  }

  const Dims d_;
  const ForwardArgs a_;
  const int64_t parts_;
  // Not over xw (below batch 4): there each row of the activations was just read.
  const bool stream_saved_ = a_.acts != nullptr && a_.x != nullptr &&
      5.0 * sizeof(float) * d_.steps * d_.batch * d_.hidden >= kStreamSavedBytes;
  Floats w_, w_ih_, bias_;  // W_hh's and W_ih's gate columns and b, part by part
  Floats c_;                // (B, H) cell state
  Floats h_;                // (2, B, P): h_{t-1} and h_t, alternating
  Floats r_;                // (B, H): o * tanh(c_t) of all units, with a projection
  Floats w_hr_;             // W_hr's state columns, part by part
};

struct BackwardArgs {
  const float *w_ih, *w, *w_hr, *acts, *c_prev, *dys, *dh_in, *dc_in;  // w_ih: (D, 4H) or null
  const bool* mask;
  float *dz, *dh_out, *dc_out;
  float* dx;  // (T, B, D): dz_t @ W_ih^T, when the kernel has w_ih
  float* dh_total;  // (T, B, P): dh_t + dy_t at valid steps, for dW_hr (with a projection)
};

// One problem's backward pass, all steps in reverse (step s is time T - 1 - s). A member
// forms dz for its parts' gate columns, then (after the team's barrier) its parts' slices of
// dh_{t-1} from the whole dz_t row: dh_{t-1}[p] = sum_j dz_t[j] W_hh[p, j]. With a
// projection, dr = (dh_t + dy_t) @ W_hr^T needs the whole state gradient first: one
// exchange (and barrier) more per step.
class BackwardRun {
 public:
  BackwardRun(const Dims& d, const BackwardArgs& a, int64_t parts)
      : d_(d), a_(a), parts_(parts), w_t_(4 * d.hidden * d.out), w_ih_t_(4 * d.hidden * d.input),
        hr_t_(d.projection ? d.out * d.hidden : 0), dh_(a.dh_in, a.dh_in + d.batch * d.out),
        dc_(a.dc_in, a.dc_in + d.batch * d.hidden), dht_(d.projection ? d.batch * d.out : 0) {
    const int64_t H = d.hidden, G = 4 * H, P = d.out;
    Floats t;
    for (int64_t i = 0; i < parts; ++i) {
      // W_hh^T restricted to the part's state columns: (4H, np), so the product has the
      // forward's form.
      const Part o = unit_part(P, parts, i);
      pack_transposed_rows(a.w, G, o, t, w_t_.data() + G * o.u0);
      if (d.input > 0) {  // W_ih^T restricted to the part's input columns: (4H, nd)
        const Part x = unit_part(d.input, parts, i);
        pack_transposed_rows(a.w_ih, G, x, t, w_ih_t_.data() + G * x.u0);
      }
      if (d.projection) {  // W_hr^T restricted to the part's units: (P, n)
        const Part u = unit_part(H, parts, i);
        pack_transposed_rows(a.w_hr, P, u, t, hr_t_.data() + P * u.u0);
      }
    }
  }

  bool run(int64_t& s, int64_t member, int64_t team, StepBarrier& barrier,
           const KeepGoing& keep_going) {
    const int64_t H = d_.hidden, G = 4 * H, B = d_.batch, P = d_.out, T = d_.steps;
    const bool proj = d_.projection;
    const Share share = member_share(parts_, team, member);
    const int64_t chunk = part_chunk(H, parts_);
    Floats dh_next(B * part_chunk(P, parts_)), dz_own(B * G),
        dht_own(proj ? B * P : 0), dr(proj ? B * chunk : 0), zeros(proj ? chunk : 0, 0.0f);
    int64_t phase = 0;
    for (; s < T && keep_going(s); ++s) {
      const int64_t t = T - 1 - s;
      for (int64_t p = share.first; p < share.last && t > 0; ++p) {
        // The previous step's residuals, while this step runs.
        const Part u = unit_part(H, parts_, p), o = unit_part(P, parts_, p);
        prefetch_rows(a_.acts, (t - 1) * B, B, G, H, u, true);
        prefetch_rows(a_.c_prev, (t - 1) * B, B, H, 0, u, false);
        prefetch_rows(a_.dys, (t - 1) * B, B, P, 0, o, false);
      }
      if (proj) {
        for (int64_t p = share.first; p < share.last; ++p) share_state_grad(t, unit_part(P, parts_, p));
        if (!barrier.wait(phase)) return false;  // dh_t + dy_t complete
        copy_floats(dht_own.data(), dht_.data(), B * P);
      }
      for (int64_t p = share.first; p < share.last; ++p) {
        const Part u = unit_part(H, parts_, p);
        const int64_t n = u.width();
        if (proj) {
          std::fill(dr.begin(), dr.begin() + B * n, 0.0f);
          product(dht_own.data(), P, hr_t_.data() + P * u.u0, n, P, dr.data(), n, B);
        }
        gates_grad_part(t, u, dr.data(), zeros.data());
      }
      if (!barrier.wait(phase)) return false;  // dz_t complete: every member reads the row
      // From a private copy of dz_t, as the forward reads h (written partly by other cores).
      copy_floats(dz_own.data(), a_.dz + t * B * G, B * G);
      for (int64_t p = share.first; p < share.last; ++p) {
        const Part o = unit_part(P, parts_, p);
        const int64_t np = o.width();
        std::fill(dh_next.begin(), dh_next.begin() + B * np, 0.0f);
        product(dz_own.data(), G, w_t_.data() + G * o.u0, np, G, dh_next.data(), np, B);
        for (int64_t b = 0; b < B; ++b)
          if (a_.mask == nullptr || a_.mask[t * B + b])
            copy_floats(dh_.data() + b * P + o.u0, dh_next.data() + b * np, np);
        if (d_.input > 0) {  // dx_t[:, x] = dz_t @ W_ih^T[:, x] for the part's input columns
          const Part x = unit_part(d_.input, parts_, p);
          float* dx = a_.dx + t * B * d_.input + x.u0;
          for (int64_t b = 0; b < B; ++b) std::fill(dx + b * d_.input, dx + b * d_.input + x.width(), 0.0f);
          product(dz_own.data(), G, w_ih_t_.data() + G * x.u0, x.width(), G, dx, d_.input, B);
        }
      }
    }
    return true;
  }

  void finish() {
    copy_floats(a_.dh_out, dh_.data(), d_.batch * d_.out);
    copy_floats(a_.dc_out, dc_.data(), d_.batch * d_.hidden);
  }

 private:
  // dh_t + dy_t of the state columns o, for the whole team (and dW_hr's after-loop product).
  void share_state_grad(int64_t t, const Part& o) {
    const int64_t B = d_.batch, P = d_.out, np = o.width();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      float* shared = dht_.data() + b * P + o.u0;
      const float* dy = a_.dys + row * P + o.u0;
      const float* dhr = dh_.data() + b * P + o.u0;
      for (int64_t j = 0; j < np; ++j) shared[j] = dhr[j] + dy[j];
      float* total = a_.dh_total + row * P + o.u0;
      if (a_.mask == nullptr || a_.mask[row])
        copy_floats(total, shared, np);
      else
        std::fill(total, total + np, 0.0f);
    }
  }

  // dz_t of the units u, and dc_{t-1}. Without a projection dr = dh_t + dy_t of the units
  // themselves (the state columns are the units); with one, dr came from r's product.
  void gates_grad_part(int64_t t, const Part& u, const float* dr, const float* zeros) {
    const int64_t H = d_.hidden, G = 4 * H, B = d_.batch, P = d_.out, n = u.width();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      float* out = a_.dz + row * G;
      if (a_.mask != nullptr && !a_.mask[row]) {  // dh and dc pass through unchanged
        for (int q = 0; q < 4; ++q) std::fill(out + q * H + u.u0, out + q * H + u.u1, 0.0f);
        continue;
      }
      const float* act = a_.acts + row * G + u.u0;
      const float *gi = act, *gf = act + H, *gg = act + 2 * H, *go = act + 3 * H;
      const float* cp = a_.c_prev + row * H + u.u0;
      const float* dr_a = d_.projection ? dr + b * n : dh_.data() + b * P + u.u0;
      const float* dr_b = d_.projection ? zeros : a_.dys + row * P + u.u0;
      float* dzr = out + u.u0;
      cell_update_grad_row(gi, gf, gg, go, cp, dr_b, dr_a, dc_.data() + b * H + u.u0, dzr,
                           dzr + H, dzr + 2 * H, dzr + 3 * H, n);
    }
  }

  const Dims d_;
  const BackwardArgs a_;
  const int64_t parts_;
  Floats w_t_, w_ih_t_, hr_t_;  // W_hh^T, W_ih^T and W_hr^T, part by part
  Floats dh_, dc_;              // (B, P) and (B, H): the carried gradients
  Floats dht_;                  // (B, P): this step's dh_t + dy_t (with a projection)
};

// Hidden units per part below which splitting a problem does not pay for the barrier and
// the exchange of h or dz at every step (measured at B = 1: H = 64 ran faster on one
// thread, H = 128 on two).
constexpr int64_t kMinTeamUnits = 64;

// Below this many multiply-adds a problem runs on one thread: helpers and (in a team) a
// barrier per step cost more than they save.
constexpr double kMinSharedMacs = 4e6;

// What the caller and the helper tasks it schedules on XLA's thread pool share. Held by
// shared pointers: a helper that starts after the work is done only reads this and returns.
struct Crew {
  static constexpr int64_t kClosed = int64_t{1} << 40;
  std::atomic<int64_t> joined{0};    // helpers that joined, | kClosed once the team is fixed
  std::atomic<int64_t> size{0};      // the team's size, published after closing
  std::atomic<int64_t> finished{0};  // helpers done
  std::thread::id caller = std::this_thread::get_id();
  std::atomic<bool> failed{false};  // a member threw (out of memory): the call reports it
  std::unique_ptr<StepBarrier> barrier;
  // Runs a member's share from step `start` (team mode), or one whole problem.
  std::function<bool(int64_t, int64_t, StepBarrier&)> member;
  std::function<bool(int64_t)> whole;

  // Runs `work`; an exception (an allocation) or an aborted team marks the call failed
  // and releases the other members from the barrier instead of escaping through XLA's C
  // interface.
  template <typename Work>
  void guarded(Work work, StepBarrier* team_barrier) {
    bool ok = false;
    try {
      ok = work();
    } catch (...) {
    }
    if (!ok) {
      failed.store(true);
      if (team_barrier != nullptr) team_barrier->abort();
    }
  }
};

// Runs work(item) for every item in [0, count) on the calling thread and up to threads - 1
// helper tasks on XLA's pool, each taking items from a shared counter until none is left.
// The caller takes part, so this finishes even if no helper ever runs, and it waits only
// for items taken: a helper that starts after the last one is taken touches nothing but
// the counter. Returns false if an item failed (returned false, or threw: out of memory).
bool run_items(ffi::ThreadPool& pool, int64_t threads, int64_t count,
               const std::function<bool(int64_t)>& work) {
  struct Items {
    std::atomic<int64_t> next{0}, finished{0};
    std::atomic<bool> failed{false};
  };
  auto items = std::make_shared<Items>();
  const auto take = [count, &work](Items& it) {
    for (int64_t i; (i = it.next.fetch_add(1)) < count;) {
      bool ok = false;
      try {
        ok = work(i);
      } catch (...) {
      }
      if (!ok) it.failed.store(true);
      it.finished.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  const int64_t helpers =
      std::min({threads, std::max<int64_t>(1, pool.num_threads()), count}) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([items, take] { take(*items); });
  take(*items);
  while (items->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
  return !items->failed;
}

// Runs every problem's time loop (Run: ForwardRun or BackwardRun, made by make_run(problem,
// parts)), with helpers from XLA's intra-op thread pool (no threads of our own, so nothing
// competes with XLA's workers).
//
// Several problems (vmap, both directions of a bidirectional layer): each task takes whole
// problems from a shared counter until none is left; the caller takes part, so this
// finishes even if no helper ever runs. A single problem large enough to pay for a barrier
// per step: the caller starts at once, alone, owning every part; helpers that have arrived
// by a step boundary (XLA may run tasks late: in the benchmark a third of them came more
// than 1 ms after they were scheduled) join the team there and take over their share of
// the parts; any helper that comes later does nothing. `grace_us` > 0 makes the caller wait
// that long for all helpers at step `join_step` (tests use it to fix where the team forms).
//
// Returns false if a member failed (the outputs are then incomplete).
template <typename Run, typename MakeRun>
bool run_teams(const Dims& d, int64_t threads, ffi::ThreadPool& pool, int64_t grace_us,
               int64_t join_step, MakeRun make_run) {
  const int64_t pool_threads = std::max<int64_t>(1, pool.num_threads());
  threads = std::max<int64_t>(1, std::min(threads, pool_threads));
  auto crew = std::make_shared<Crew>();
  const KeepGoing always = [](int64_t) { return true; };
  crew->whole = [&make_run, &always](int64_t problem) {
    std::unique_ptr<Run> run = make_run(problem, 1);
    StepBarrier solo(1);
    int64_t step = 0;
    if (!run->run(step, 0, 1, solo, always)) return false;
    run->finish();
    return true;
  };
  const double macs = static_cast<double>(d.steps) * d.batch * d.hidden *
                      (4.0 * (d.out + d.input) + (d.projection ? d.out : 0));
  if (d.problems > 1 && threads > 1) return run_items(pool, threads, d.problems, crew->whole);
  const int64_t parts = parts_with_units(d.hidden, std::min(threads, d.hidden / kMinTeamUnits));
  if (d.problems > 1 || parts < 2 || macs < kMinSharedMacs) {
    for (int64_t p = 0; p < d.problems; ++p) crew->guarded([&] { return crew->whole(p); }, nullptr);
    return !crew->failed;
  }
  for (int64_t i = 1; i < parts; ++i)
    pool.Schedule([crew] {
      // Run inline by Schedule (no free worker): joining would wait for the caller forever.
      if (std::this_thread::get_id() == crew->caller) return;
      int64_t seen = crew->joined.load(std::memory_order_acquire), index;
      do {
        if (seen & Crew::kClosed) return;  // too late: the team is already fixed
        index = seen + 1;
      } while (!crew->joined.compare_exchange_weak(seen, seen + 1, std::memory_order_acq_rel));
      // The caller fixes the team at its next step boundary.
      int64_t team;
      for (int64_t spins = 0; (team = crew->size.load(std::memory_order_acquire)) == 0; ++spins)
        if (spins > 4000) std::this_thread::yield();
      if (index < team)
        crew->guarded([&] { return crew->member(index, team, *crew->barrier); },
                      crew->barrier.get());
      crew->finished.fetch_add(1, std::memory_order_acq_rel);
    });
  std::unique_ptr<Run> run;
  int64_t step = 0;
  bool ok = false;
  try {
    run = make_run(0, parts);
    const auto grace = std::chrono::microseconds(grace_us);
    const KeepGoing alone = [&](int64_t s) {
      if (s < join_step) return true;
      if (s == join_step && grace_us > 0) {
        const auto start = std::chrono::steady_clock::now();
        while ((crew->joined.load(std::memory_order_acquire) & ~Crew::kClosed) < parts - 1 &&
               std::chrono::steady_clock::now() - start < grace) {
        }
      }
      return (crew->joined.load(std::memory_order_acquire) & ~Crew::kClosed) == 0;
    };
    StepBarrier solo(1);
    ok = run->run(step, 0, 1, solo, alone);
  } catch (...) {
    ok = false;
  }
  // Fix the team: the caller and every helper that joined, unless the loop is over (or
  // failed); helpers outside the team (index >= size) return at once.
  const int64_t joined = crew->joined.fetch_or(Crew::kClosed) & ~Crew::kClosed;
  int64_t team = ok && step < d.steps ? std::min(parts, 1 + joined) : 1;
  if (team > 1) {
    try {
      crew->barrier = std::make_unique<StepBarrier>(team);
      crew->member = [&run, start = step](int64_t member, int64_t size, StepBarrier& barrier) {
        int64_t s = start;
        return run->run(s, member, size, barrier, [](int64_t) { return true; });
      };
    } catch (...) {  // out of memory: the caller finishes alone
      team = 1;
    }
  }
  crew->size.store(team, std::memory_order_release);
  if (team > 1) {
    crew->guarded([&] { return run->run(step, 0, team, *crew->barrier, always); },
                  crew->barrier.get());
  } else if (ok && step < d.steps) {
    StepBarrier solo(1);
    crew->guarded([&] { return run->run(step, 0, 1, solo, always); }, nullptr);
  }
  // Every helper that joined is running (or about to): wait for all of them, including any
  // outside the team, since they read the crew.
  while (crew->finished.load(std::memory_order_acquire) < joined) std::this_thread::yield();
  if (!ok || crew->failed) return false;
  run->finish();
  return true;
}

// The problem's sizes from its first buffer (xw (..., T, B, 4H), or the layer input x
// (..., T, B, D) with the input product inside) and w_hh (..., P, 4H), and every other buffer
// checked against them: a mis-shaped buffer would otherwise be read or written out of bounds.
// `roles` names the two buffers in the error when they are others of those shapes.
class ShapeCheck {
 public:
  ShapeCheck(const char* call, ffi::AnyBuffer::Dimensions first,
             ffi::AnyBuffer::Dimensions w_hh, bool projection, bool input,
             const char* roles = nullptr)
      : call_(call) {
    const size_t n = first.size();
    if (n < 3 || w_hh.size() != n - 1 || w_hh[n - 2] % 4 != 0 ||
        (!input && first[n - 1] != w_hh[n - 2])) {
      error_ = roles != nullptr ? roles
               : input          ? "x must be (..., T, B, D) and w_hh (..., P, 4H)"
                                : "xw must be (..., T, B, 4H) and w_hh (..., P, 4H)";
      return;
    }
    lead_.assign(first.begin(), first.end() - 3);
    d.steps = first[n - 3];
    d.batch = first[n - 2];
    d.hidden = w_hh[n - 2] / 4;
    d.out = projection ? w_hh[n - 3] : d.hidden;
    d.input = input ? first[n - 1] : 0;
    d.projection = projection;
    d.problems = 1;
    for (int64_t v : lead_) d.problems *= v;
  }

  // Checks that `dims` are the leading problem dimensions followed by `tail`.
  void expect(const char* name, ffi::AnyBuffer::Dimensions dims,
              std::initializer_list<int64_t> tail) {
    if (!error_.empty()) return;
    std::vector<int64_t> want(lead_), got(dims.begin(), dims.end());
    want.insert(want.end(), tail);
    if (got != want)
      error_ = std::string(name) + " has shape " + shape(got) + ", expected " + shape(want);
  }

  ffi::Error result() const {
    if (error_.empty()) return ffi::Error::Success();
    return ffi::Error::InvalidArgument(std::string("lstm_jax cpu kernel (") + call_ + "): " +
                                       error_);
  }

  Dims d{};

 private:
  static std::string shape(const std::vector<int64_t>& dims) {
    std::string out = "(";
    for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
    return out + ")";
  }

  const char* call_;
  std::vector<int64_t> lead_;
  std::string error_;
};

ffi::Error failed(const char* call) {
  return ffi::Error::Internal(std::string("lstm_jax cpu kernel (") + call +
                              "): a thread failed (out of memory?)");
}

// Every call's attributes: how to thread it and which optional buffers it has.
struct Flags {
  int64_t threads, grace_us, join_step;
  bool has_mask, has_proj, has_input;
};

using F32 = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(ffi::ThreadPool& pool, const Flags& f, F32 first, F32 bias, F32 w_ih,
                   F32 w_hh, F32 w_hr, F32 h0, F32 c0, ffi::Buffer<ffi::PRED> mask, Out ys,
                   Out h_n, Out c_n, Out* acts, Out* c_prev) {
  ShapeCheck check("forward", first.dimensions(), w_hh.dimensions(), f.has_proj, f.has_input);
  const Dims& d = check.d;
  const int64_t H = d.hidden, G = 4 * H, B = d.batch, T = d.steps, P = d.out, D = d.input,
                TB = T * B;
  check.expect("bias", bias.dimensions(), {G});
  if (f.has_input) check.expect("w_ih", w_ih.dimensions(), {D, G});
  check.expect("w_hh", w_hh.dimensions(), {P, G});
  if (f.has_proj) check.expect("w_hr", w_hr.dimensions(), {H, P});
  check.expect("h0", h0.dimensions(), {B, P});
  check.expect("c0", c0.dimensions(), {B, H});
  if (f.has_mask) check.expect("mask", mask.dimensions(), {T, B});
  check.expect("ys", ys->dimensions(), {T, B, P});
  check.expect("h_n", h_n->dimensions(), {B, P});
  check.expect("c_n", c_n->dimensions(), {B, H});
  if (acts != nullptr) {
    check.expect("acts", (*acts)->dimensions(), {T, B, G});
    check.expect("c_prev", (*c_prev)->dimensions(), {T, B, H});
  }
  if (auto err = check.result(); !err.success()) return err;
  const bool* m = f.has_mask ? mask.typed_data() : nullptr;
  const bool ok = run_teams<ForwardRun>(
      d, f.threads, pool, f.grace_us, f.join_step, [&](int64_t p, int64_t parts) {
        const float* in = first.typed_data() + p * TB * (f.has_input ? D : G);
        ForwardArgs a{f.has_input ? nullptr : in, f.has_input ? in : nullptr,
                      f.has_input ? w_ih.typed_data() + p * D * G : nullptr,
                      bias.typed_data() + p * G, w_hh.typed_data() + p * P * G,
                      f.has_proj ? w_hr.typed_data() + p * H * P : nullptr,
                      h0.typed_data() + p * B * P, c0.typed_data() + p * B * H,
                      m == nullptr ? nullptr : m + p * TB, ys->typed_data() + p * TB * P,
                      h_n->typed_data() + p * B * P, c_n->typed_data() + p * B * H,
                      acts == nullptr ? nullptr : (*acts)->typed_data() + p * TB * G,
                      c_prev == nullptr ? nullptr : (*c_prev)->typed_data() + p * TB * H};
        return std::make_unique<ForwardRun>(d, a, parts);
      });
  return ok ? ffi::Error::Success() : failed("forward");
}

ffi::Error TrainForwardImpl(ffi::ThreadPool pool, int64_t threads, int64_t grace_us,
                            int64_t join_step, bool has_mask, bool has_proj, bool has_input,
                            F32 first, F32 bias, F32 w_ih, F32 w_hh, F32 w_hr, F32 h0, F32 c0,
                            ffi::Buffer<ffi::PRED> mask, Out ys, Out h_n, Out c_n, Out acts,
                            Out c_prev) {
  const Flags f{threads, grace_us, join_step, has_mask, has_proj, has_input};
  return Forward(pool, f, first, bias, w_ih, w_hh, w_hr, h0, c0, mask, ys, h_n, c_n, &acts,
                 &c_prev);
}

ffi::Error InferForwardImpl(ffi::ThreadPool pool, int64_t threads, int64_t grace_us,
                            int64_t join_step, bool has_mask, bool has_proj, bool has_input,
                            F32 first, F32 bias, F32 w_ih, F32 w_hh, F32 w_hr, F32 h0, F32 c0,
                            ffi::Buffer<ffi::PRED> mask, Out ys, Out h_n, Out c_n) {
  const Flags f{threads, grace_us, join_step, has_mask, has_proj, has_input};
  return Forward(pool, f, first, bias, w_ih, w_hh, w_hr, h0, c0, mask, ys, h_n, c_n, nullptr,
                 nullptr);
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, int64_t threads, int64_t grace_us,
                        int64_t join_step, bool has_mask, bool has_proj, bool has_input,
                        F32 w_ih, F32 w_hh, F32 w_hr, F32 acts, F32 c_prev, F32 dys, F32 dh_n,
                        F32 dc_n, ffi::Buffer<ffi::PRED> mask, Out dz, Out dh0, Out dc0,
                        Out dh_total, Out dx) {
  ShapeCheck check("backward", acts.dimensions(), w_hh.dimensions(), has_proj, false);
  Dims d = check.d;
  const size_t n = acts.dimensions().size();
  if (has_input) d.input = n >= 3 && w_ih.dimensions().size() == n - 1 ? w_ih.dimensions()[n - 3] : -1;
  const int64_t H = d.hidden, G = 4 * H, B = d.batch, T = d.steps, P = d.out, D = d.input,
                TB = T * B;
  if (has_input) {
    check.expect("w_ih", w_ih.dimensions(), {D, G});
    check.expect("dx", dx->dimensions(), {T, B, D});
  }
  check.expect("w_hh", w_hh.dimensions(), {P, G});
  if (has_proj) check.expect("w_hr", w_hr.dimensions(), {H, P});
  check.expect("c_prev", c_prev.dimensions(), {T, B, H});
  check.expect("dys", dys.dimensions(), {T, B, P});
  check.expect("dh_n", dh_n.dimensions(), {B, P});
  check.expect("dc_n", dc_n.dimensions(), {B, H});
  if (has_mask) check.expect("mask", mask.dimensions(), {T, B});
  check.expect("dz", dz->dimensions(), {T, B, G});
  check.expect("dh0", dh0->dimensions(), {B, P});
  check.expect("dc0", dc0->dimensions(), {B, H});
  if (has_proj) check.expect("dh_total", dh_total->dimensions(), {T, B, P});
  if (auto err = check.result(); !err.success()) return err;
  const bool* m = has_mask ? mask.typed_data() : nullptr;
  const bool ok = run_teams<BackwardRun>(
      d, threads, pool, grace_us, join_step, [&](int64_t p, int64_t parts) {
        BackwardArgs a{has_input ? w_ih.typed_data() + p * D * G : nullptr,
                       w_hh.typed_data() + p * P * G,
                       has_proj ? w_hr.typed_data() + p * H * P : nullptr,
                       acts.typed_data() + p * TB * G, c_prev.typed_data() + p * TB * H,
                       dys.typed_data() + p * TB * P, dh_n.typed_data() + p * B * P,
                       dc_n.typed_data() + p * B * H, m == nullptr ? nullptr : m + p * TB,
                       dz->typed_data() + p * TB * G, dh0->typed_data() + p * B * P,
                       dc0->typed_data() + p * B * H,
                       has_input ? dx->typed_data() + p * TB * D : nullptr,
                       has_proj ? dh_total->typed_data() + p * TB * P : nullptr};
        return std::make_unique<BackwardRun>(d, a, parts);
      });
  return ok ? ffi::Error::Success() : failed("backward");
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, int64_t threads, bool has_input, bool has_bias,
                          F32 x, F32 h0, F32 ys, F32 dz, Out dw_ih, Out dw_hh, Out db) {
  // dz (..., T, B, 4H) and dW_hh (..., P, 4H) have the shapes of xw and W_hh.
  ShapeCheck check("weight_grad", dz.dimensions(), dw_hh->dimensions(), true, false,
                   "dz must be (..., T, B, 4H) and dw_hh (..., P, 4H)");
  const Dims& d = check.d;
  const size_t n = dz.dimensions().size();
  const int64_t N = 4 * d.hidden, B = d.batch, T = d.steps, P = d.out, K = T * B;
  const int64_t D = has_input && x.dimensions().size() == n ? x.dimensions()[n - 1] : 0;
  if (has_input) {
    check.expect("x", x.dimensions(), {T, B, D});
    check.expect("dw_ih", dw_ih->dimensions(), {D, N});
  }
  check.expect("dw_hh", dw_hh->dimensions(), {P, N});
  check.expect("h0", h0.dimensions(), {B, P});
  check.expect("ys", ys.dimensions(), {T, B, P});
  if (has_bias) check.expect("db", db->dimensions(), {N});
  if (auto err = check.result(); !err.success()) return err;
  // Each problem's columns in as many items as there are threads for it (whole chunks).
  const int64_t chunk = grad_chunk(N), chunks = (N + chunk - 1) / chunk;
  const int64_t per_problem =
      std::clamp<int64_t>((threads + d.problems - 1) / d.problems, 1, chunks);
  const int64_t width = (chunks + per_problem - 1) / per_problem * chunk;
  const int64_t columns = (N + width - 1) / width;
  const std::function<bool(int64_t)> work = [&](int64_t item) {
    const int64_t p = item / columns, n0 = item % columns * width;
    const WeightGradArgs a{has_input ? x.typed_data() + p * K * D : nullptr,
                           h0.typed_data() + p * B * P, ys.typed_data() + p * K * P,
                           dz.typed_data() + p * K * N,
                           has_input ? dw_ih->typed_data() + p * D * N : nullptr,
                           dw_hh->typed_data() + p * P * N,
                           has_bias ? db->typed_data() + p * N : nullptr, K, B, D, P, N};
    // Each thread keeps its buffers for later calls: fresh ones (up to 1.5 MiB) would be
    // mapped and faulted in by every call.
    static thread_local Floats scratch;
    const int64_t block = grad_block_rows(D, P), packed_size = block * chunk;
    scratch.resize(std::max<size_t>(scratch.size(),
                                    packed_size + grad_strips(D, P) * strip_stride(block)));
    weight_grad_columns(a, n0, std::min(width, N - n0), scratch.data(),
                        scratch.data() + packed_size);
    return true;
  };
  const double macs = static_cast<double>(K) * (D + P) * N;
  const bool ok = run_items(pool, macs < kMinSharedMacs ? 1 : threads,
                            d.problems * columns, work);
  return ok ? ffi::Error::Success() : failed("weight_grad");
}

}  // namespace

namespace {

// What every call takes first: XLA's thread pool and the attributes.
auto bind_common() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Attr<int64_t>("threads")
      .Attr<int64_t>("grace_us")
      .Attr<int64_t>("join_step")
      .Attr<bool>("has_mask")
      .Attr<bool>("has_proj")
      .Attr<bool>("has_input");
}

// Both forward calls: their arguments and the three results they share. With has_input
// the first argument is the layer input x and w_ih is used; without, it is xw and w_ih is
// a placeholder (as w_hr is without a projection and mask without has_mask).
auto bind_forward() {
  return bind_common()
      .Arg<F32>()                     // xw, or x
      .Arg<F32>()                     // bias
      .Arg<F32>()                     // w_ih
      .Arg<F32>()                     // w_hh
      .Arg<F32>()                     // w_hr
      .Arg<F32>()                     // h0
      .Arg<F32>()                     // c0
      .Arg<ffi::Buffer<ffi::PRED>>()  // mask
      .Ret<F32>()                     // ys
      .Ret<F32>()                     // h_n
      .Ret<F32>();                    // c_n
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxTrainForward, TrainForwardImpl,
                              bind_forward()
                                  .Ret<F32>()    // acts
                                  .Ret<F32>());  // c_prev

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxInferForward, InferForwardImpl, bind_forward());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxBackward, BackwardImpl,
                              bind_common()
                                  .Arg<F32>()                     // w_ih
                                  .Arg<F32>()                     // w_hh
                                  .Arg<F32>()                     // w_hr
                                  .Arg<F32>()                     // acts
                                  .Arg<F32>()                     // c_prev
                                  .Arg<F32>()                     // dys
                                  .Arg<F32>()                     // dh_n
                                  .Arg<F32>()                     // dc_n
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Ret<F32>()                     // dz
                                  .Ret<F32>()                     // dh0
                                  .Ret<F32>()                     // dc0
                                  .Ret<F32>()                     // dh_total
                                  .Ret<F32>());                   // dx

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxWeightGrad, WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("has_input")
                                  .Attr<bool>("has_bias")
                                  .Arg<F32>()    // x
                                  .Arg<F32>()    // h0
                                  .Arg<F32>()    // ys
                                  .Arg<F32>()    // dz
                                  .Ret<F32>()    // dw_ih
                                  .Ret<F32>()    // dw_hh
                                  .Ret<F32>());  // db
