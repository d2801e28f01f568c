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
// Where mask[t, b] is false the state is carried unchanged and y_t is zero. The forward
// pass saves the activated gates (over xw, in place, when XLA aliases the two) and c_{t-1};
// the backward pass walks time in reverse carrying (dh, dc) and emits dz_t, from which the
// caller forms the weight gradients as large products after the loop.
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
#include <string>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }

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

// packed[K * j + k * width + c] = w[k * ldw + j + c] for every panel [j, j + width).
std::vector<float> pack_panels(const float* w, int64_t ldw, int64_t N, int64_t K) {
  std::vector<float> packed(N * K);
  for (int64_t j = 0; j < N;) {
    const int64_t width = panel_width(N, j);
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(packed.data() + K * j + k * width, w + k * ldw + j, width * sizeof(float));
    j += width;
  }
  return packed;
}

// Accumulator registers to use: 16 of AVX-512's 32 vector registers, 8 of AVX2's 16.
#if defined(__AVX512F__)
constexpr int kAccumulators = 16;
#else
constexpr int kAccumulators = 8;
#endif

// z[r, c0 : c0 + 8V] += a[r, :K] @ panel[:K, c0 : c0 + 8V] for R rows, the R * V
// accumulators held in registers across the whole K loop.
template <int R, int V>
inline void panel_block(const float* a, int64_t lda, const float* panel, int64_t width,
                        int64_t c0, int64_t K, float* z, int64_t ldz) {
  v8 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = load8(z + r * ldz + c0 + 8 * v);
  const float* w = panel + c0;
  for (int64_t k = 0; k < K; ++k, w += width) {
    v8 wv[V];
    for (int v = 0; v < V; ++v) {
      wv[v] = load8(w + 8 * v);
      // Keep the weight in a register: folded into each row's multiply-add instead, it is
      // loaded R times and the loads, not the multiply-adds, bound the loop.
#if defined(__x86_64__)
      asm("" : "+x"(wv[v]));
#endif
    }
    for (int r = 0; r < R; ++r) {
      const v8 ar = splat8(a[r * lda + k]);
      for (int v = 0; v < V; ++v) acc[r][v] += ar * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store8(z + r * ldz + c0 + 8 * v, acc[r][v]);
}

// One panel for R rows: split into column blocks of 8V with R * V <= kAccumulators.
template <int R>
inline void panel_rows(const float* a, int64_t lda, const float* panel, int64_t width, int64_t K,
                       float* z, int64_t ldz) {
  if (width == kPanel) {
    constexpr int V = std::min<int>(kPanel / 8, kAccumulators / R);
    for (int64_t c0 = 0; c0 < kPanel; c0 += 8 * V)
      panel_block<R, V>(a, lda, panel, width, c0, K, z, ldz);
  } else if (width == 8) {
    panel_block<R, 1>(a, lda, panel, width, 0, K, z, ldz);
  } else {
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < width; ++c) {
        float sum = z[r * ldz + c];
        for (int64_t k = 0; k < K; ++k) sum += a[r * lda + k] * panel[k * width + c];
        z[r * ldz + c] = sum;
      }
  }
}

// z[:rows, :N] += a[:rows, :K] @ w[:K, :N], with w packed by pack_panels (row-major a and z,
// leading dimensions lda and ldz).
void product(const float* a, int64_t lda, const float* packed, int64_t N, int64_t K, float* z,
             int64_t ldz, int64_t rows) {
  for (int64_t j = 0; j < N;) {
    const int64_t width = panel_width(N, j);
    const float* panel = packed + K * j;
    int64_t r = 0;
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
struct Dims {
  int64_t problems = 1, steps = 0, batch = 0, hidden = 0, out = 0;
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

// The hidden units [u0, u1) of one team member. Each member owns these units' four gate
// columns of W_hh (packed contiguously), their cell state and their part of h, so that a
// team splits W_hh between the cores' caches; the members exchange h (forward) or dz
// (backward) once per step.
struct Part {
  int64_t u0, u1;
  int64_t member = 0, team = 1;  // which member of how large a team
  int64_t width() const { return u1 - u0; }
};

// Column q * H + u0 + j of a (.., 4H) row is column q * n + j of the member's packed row.
inline void gather_gates(const float* row, int64_t H, const Part& part, float* out) {
  const int64_t n = part.width();
  for (int q = 0; q < 4; ++q) std::memcpy(out + q * n, row + q * H + part.u0, n * sizeof(float));
}

// Asks for the member's columns of rows [row0, row0 + rows) of a (.., width) array (gate
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

inline void scatter_gates(const float* packed, int64_t H, const Part& part, float* row) {
  const int64_t n = part.width();
  for (int q = 0; q < 4; ++q) std::memcpy(row + q * H + part.u0, packed + q * n, n * sizeof(float));
}

struct ForwardArgs {
  const float *xw, *bias, *w, *w_hr, *h0, *c0;  // w: (P, 4H); w_hr: (H, P) or null
  const bool* mask;
  float *ys, *h_out, *c_out, *acts, *c_prev;
  float* h_shared;  // (2, B, P): h_{t-1} and h_t, alternating, read by the whole team
  float* r_shared;  // (B, H): o * tanh(c_t) of all units, with a projection
};

// A member's share of the projection's outputs: state columns [p0, p1) of P.
inline Part out_part(const Dims& d, const Part& part);

// One team member's share of one problem's forward pass, all steps. With a projection the
// member also owns a slice of the P state columns: after the team has exchanged r_t (one
// barrier more per step) it forms h_t[:, slice] = r_t @ W_hr[:, slice].
void forward_part(const Dims& d, const ForwardArgs& a, const Part& part, StepBarrier& barrier) {
  const int64_t H = d.hidden, G = 4 * H, B = d.batch, P = d.out, n = part.width(), g = 4 * n;
  const Part op = out_part(d, part);
  const int64_t np = op.width();
  const bool proj = d.projection;
  std::vector<float> own(P * g), bias(g), c(B * n), z(B * g), h_own(B * P);
  for (int64_t k = 0; k < P; ++k) gather_gates(a.w + k * G, H, part, own.data() + k * g);
  const std::vector<float> w = pack_panels(own.data(), g, g, P);
  std::vector<float> w_hr, r_own, h_proj;
  if (proj) {
    w_hr = pack_panels(a.w_hr + op.u0, P, np, H);
    r_own.resize(B * H);
    h_proj.resize(B * np);
  }
  gather_gates(a.bias, H, part, bias.data());
  for (int64_t b = 0; b < B; ++b) {
    copy_floats(c.data() + b * n, a.c0 + b * H + part.u0, n);
    copy_floats(a.h_shared + b * P + op.u0, a.h0 + b * P + op.u0, np);
  }
  int64_t phase = 0;
  if (!barrier.wait(phase)) return;  // h_0 complete before any member's first product
  for (int64_t t = 0; t < d.steps; ++t) {
    const float* h = a.h_shared + (t % 2) * B * P;
    float* h_next = a.h_shared + ((t + 1) % 2) * B * P;
    for (int64_t b = 0; b < B; ++b) {
      float* zr = z.data() + b * g;
      gather_gates(a.xw + (t * B + b) * G, H, part, zr);
      for (int64_t j = 0; j < g; ++j) zr[j] += bias[j];
    }
    if (t + 1 < d.steps) prefetch_rows(a.xw, (t + 1) * B, B, G, H, part, true);
    // The product reads h_{t-1} from a private copy: read in place, half of it written by
    // the other core just before, the product ran at 55 GFLOP/s instead of ~100 (kernel
    // timers at 32,100,128,256: 400 -> 255 k cycles per step, copy included).
    copy_floats(h_own.data(), h, B * P);
    product(h_own.data(), P, w.data(), g, P, z.data(), g, B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      const bool valid = a.mask == nullptr || a.mask[row];
      float* zr = z.data() + b * g;
      // sigmoid(x) = 0.5 tanh(x / 2) + 0.5: the same rational tanh for all four gates.
      activate(zr, 2 * n, 0.5f);          // i, f
      activate(zr + 2 * n, n, 1.0f);      // g
      activate(zr + 3 * n, n, 0.5f);      // o
      const float *gi = zr, *gf = zr + n, *gg = zr + 2 * n, *go = zr + 3 * n;
      float* cr = c.data() + b * n;
      if (a.c_prev != nullptr) copy_floats(a.c_prev + row * H + part.u0, cr, n);
      if (proj) {
        // r_t of the member's units for the whole team; masked rows keep their state, and
        // their r is never used.
        if (valid) cell_update_row(gi, gf, gg, go, cr, a.r_shared + b * H + part.u0, n);
      } else if (valid) {
        float* hn = h_next + b * P + part.u0;
        cell_update_row(gi, gf, gg, go, cr, hn, n);
        copy_floats(a.ys + row * P + part.u0, hn, n);
      } else {  // past the sequence's end: carry the state, output zero
        copy_floats(h_next + b * P + part.u0, h + b * P + part.u0, n);
        std::fill(a.ys + row * P + part.u0, a.ys + row * P + part.u1, 0.0f);
      }
      if (a.acts != nullptr) scatter_gates(zr, H, part, a.acts + row * G);
    }
    if (proj) {
      if (!barrier.wait(phase)) return;  // r_t complete
      copy_floats(r_own.data(), a.r_shared, B * H);
      std::fill(h_proj.begin(), h_proj.end(), 0.0f);
      product(r_own.data(), H, w_hr.data(), np, H, h_proj.data(), np, B);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = t * B + b;
        float* hn = h_next + b * P + op.u0;
        float* yr = a.ys + row * P + op.u0;
        if (a.mask == nullptr || a.mask[row]) {
          copy_floats(hn, h_proj.data() + b * np, np);
          copy_floats(yr, hn, np);
        } else {
          copy_floats(hn, h + b * P + op.u0, np);
          std::fill(yr, yr + np, 0.0f);
        }
      }
    }
    if (!barrier.wait(phase)) return;
  }
  const float* h_last = a.h_shared + (d.steps % 2) * B * P;
  for (int64_t b = 0; b < B; ++b) {
    copy_floats(a.h_out + b * P + op.u0, h_last + b * P + op.u0, np);
    copy_floats(a.c_out + b * H + part.u0, c.data() + b * n, n);
  }
}

struct BackwardArgs {
  const float *w, *w_hr, *acts, *c_prev, *dys, *dh_in, *dc_in;
  const bool* mask;
  float *dz, *dh_out, *dc_out;
  float* dh_total;    // (T, B, P): dh_t + dy_t at valid steps, for dW_hr (with a projection)
  float* dht_shared;  // (B, P): this step's dh_t + dy_t, exchanged (with a projection)
};

// One team member's share of one problem's backward pass, all steps in reverse. The member
// forms dz for its units' gate columns, then (after the team's barrier) its slice of
// dh_{t-1} from the whole dz_t row: dh_{t-1}[p] = sum_j dz_t[j] W_hh[p, j]. With a
// projection, dr = (dh_t + dy_t) @ W_hr^T needs the whole state gradient first: one
// exchange (and barrier) more per step.
void backward_part(const Dims& d, const BackwardArgs& a, const Part& part,
                   StepBarrier& barrier) {
  const int64_t H = d.hidden, G = 4 * H, B = d.batch, P = d.out, n = part.width();
  const Part op = out_part(d, part);
  const int64_t np = op.width();
  const bool proj = d.projection;
  // W_hh^T restricted to this member's state columns: (4H, np), so the product has the
  // forward's form.
  std::vector<float> own_t(G * np), dh(B * np), dc(B * n), dh_next(B * np), dz_own(B * G);
  for (int64_t u = 0; u < np; ++u)
    for (int64_t j = 0; j < G; ++j) own_t[j * np + u] = a.w[(op.u0 + u) * G + j];
  const std::vector<float> w_t = pack_panels(own_t.data(), np, np, G);
  std::vector<float> hr_t, dht_own, dr, zeros;
  if (proj) {  // W_hr^T restricted to this member's units: (P, n)
    std::vector<float> t_hr(P * n);
    for (int64_t u = 0; u < n; ++u)
      for (int64_t k = 0; k < P; ++k) t_hr[k * n + u] = a.w_hr[(part.u0 + u) * P + k];
    hr_t = pack_panels(t_hr.data(), n, n, P);
    dht_own.resize(B * P);
    dr.resize(B * n);
    zeros.assign(n, 0.0f);
  }
  for (int64_t b = 0; b < B; ++b) {
    copy_floats(dh.data() + b * np, a.dh_in + b * P + op.u0, np);
    copy_floats(dc.data() + b * n, a.dc_in + b * H + part.u0, n);
  }
  int64_t phase = 0;
  for (int64_t t = d.steps - 1; t >= 0; --t) {
    if (t > 0) {  // the previous step's residuals, while this step runs
      prefetch_rows(a.acts, (t - 1) * B, B, G, H, part, true);
      prefetch_rows(a.c_prev, (t - 1) * B, B, H, 0, part, false);
      prefetch_rows(a.dys, (t - 1) * B, B, P, 0, op, false);
    }
    if (proj) {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = t * B + b;
        float* shared = a.dht_shared + b * P + op.u0;
        const float* dy = a.dys + row * P + op.u0;
        const float* dhr = dh.data() + b * np;
        for (int64_t j = 0; j < np; ++j) shared[j] = dhr[j] + dy[j];
        float* total = a.dh_total + row * P + op.u0;
        if (a.mask == nullptr || a.mask[row])
          copy_floats(total, shared, np);
        else
          std::fill(total, total + np, 0.0f);
      }
      if (!barrier.wait(phase)) return;  // dh_t + dy_t complete
      copy_floats(dht_own.data(), a.dht_shared, B * P);
      std::fill(dr.begin(), dr.end(), 0.0f);
      product(dht_own.data(), P, hr_t.data(), n, P, dr.data(), n, B);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      float* out = a.dz + row * G;
      if (a.mask != nullptr && !a.mask[row]) {  // dh and dc pass through unchanged
        for (int q = 0; q < 4; ++q) std::fill(out + q * H + part.u0, out + q * H + part.u1, 0.0f);
        continue;
      }
      const float* act = a.acts + row * G + part.u0;
      const float *gi = act, *gf = act + H, *gg = act + 2 * H, *go = act + 3 * H;
      const float* cp = a.c_prev + row * H + part.u0;
      // Without a projection dr = dh_t + dy_t of the member's own units (its state slice
      // is its units); with one, dr came from the product above.
      const float* dr_a = proj ? dr.data() + b * n : dh.data() + b * np;
      const float* dr_b = proj ? zeros.data() : a.dys + row * P + part.u0;
      float* dcr = dc.data() + b * n;
      float* dzr = out + part.u0;
      cell_update_grad_row(gi, gf, gg, go, cp, dr_b, dr_a, dcr, dzr, dzr + H, dzr + 2 * H,
                           dzr + 3 * H, n);
    }
    if (!barrier.wait(phase)) return;  // dz_t complete: every member reads the whole row
    std::fill(dh_next.begin(), dh_next.end(), 0.0f);
    // From a private copy of dz_t, as the forward reads h (written partly by other cores).
    copy_floats(dz_own.data(), a.dz + t * B * G, B * G);
    product(dz_own.data(), G, w_t.data(), np, G, dh_next.data(), np, B);
    for (int64_t b = 0; b < B; ++b)
      if (a.mask == nullptr || a.mask[t * B + b])
        copy_floats(dh.data() + b * np, dh_next.data() + b * np, np);
  }
  for (int64_t b = 0; b < B; ++b) {
    copy_floats(a.dh_out + b * P + op.u0, dh.data() + b * np, np);
    copy_floats(a.dc_out + b * H + part.u0, dc.data() + b * n, n);
  }
}

// Hidden units per team member below which splitting a problem does not pay for the
// barrier and the exchange of h or dz at every step (measured at B = 1: H = 64 ran faster
// on one thread, H = 128 on two).
constexpr int64_t kMinTeamUnits = 64;

// Units per member: in multiples of 8 (the vector width), so members never share a cache line.
inline int64_t member_chunk(int64_t hidden, int64_t team) {
  return ((hidden + team - 1) / team + 7) / 8 * 8;
}

inline Part member_part(int64_t hidden, int64_t team, int64_t member) {
  const int64_t chunk = member_chunk(hidden, team);
  const int64_t u0 = std::min(hidden, member * chunk);
  return {u0, std::min(hidden, u0 + chunk), member, team};
}

// Without a projection the state columns are the units themselves; with one, the P
// columns are split between the members the same way (a member may get none).
inline Part out_part(const Dims& d, const Part& part) {
  return d.projection ? member_part(d.out, part.team, part.member) : part;
}

// The largest team size <= n whose members all get units (rounding the parts up to
// multiples of 8 can leave the last members of a larger team with none).
inline int64_t team_with_units(int64_t hidden, int64_t n) {
  while (n > 1 && (n - 1) * member_chunk(hidden, n) >= hidden) --n;
  return n;
}

// What the caller and the helper tasks it schedules on XLA's thread pool share. Held by
// shared pointers: a helper that starts after the work is done only reads this and returns.
struct Crew {
  static constexpr int64_t kClosed = int64_t{1} << 40;
  std::atomic<int64_t> joined{0};    // helpers that joined, | kClosed once the team is fixed
  std::atomic<int64_t> size{0};      // the team's size, published after closing
  std::atomic<int64_t> next{0};      // next problem to take (problem-parallel mode)
  std::atomic<int64_t> finished{0};  // problems done, or team members done
  std::thread::id caller = std::this_thread::get_id();
  std::atomic<bool> failed{false};  // a member threw (out of memory): the call reports it
  std::unique_ptr<StepBarrier> barrier;
  std::function<void(int64_t, const Part&, StepBarrier&)> work;

  // Runs the work; an exception (an allocation) marks the call failed and releases the
  // other members from the barrier instead of escaping through XLA's C interface.
  void guarded(int64_t problem, const Part& part, StepBarrier& step_barrier) {
    try {
      work(problem, part, step_barrier);
    } catch (...) {
      failed.store(true);
      step_barrier.abort();
    }
  }
};

// Runs work(problem, part, barrier) over all problems, with helpers from XLA's intra-op
// thread pool (no threads of our own, so nothing competes with XLA's workers).
//
// Several problems (vmap, both directions of a bidirectional layer): each task takes whole
// problems from a shared counter until none is left; the caller takes part, so this
// finishes even if no helper ever runs. A single problem large enough to pay for a barrier
// per step: its hidden units are split between a team of the caller and the helpers that
// start within a short grace period (XLA may run tasks late, or on the caller's thread);
// the team is fixed before any member starts, so a helper that comes late does nothing.
//
// Returns false if a member failed (the outputs are then incomplete).
template <typename Work>
bool run_teams(const Dims& d, int64_t threads, ffi::ThreadPool& pool, int64_t grace_us,
               Work work) {
  const int64_t pool_threads = std::max<int64_t>(1, pool.num_threads());
  threads = std::max<int64_t>(1, std::min(threads, pool_threads));
  auto crew = std::make_shared<Crew>();
  crew->work = work;
  StepBarrier solo(1);
  const double macs = static_cast<double>(d.steps) * d.batch * d.hidden *
                     (4.0 * d.out + (d.projection ? d.out : 0));
  if (d.problems > 1 && threads > 1) {
    // Whoever takes a problem is running and finishes it, so the caller waits only for
    // problems taken, never for a helper that has not started.
    auto take = [problems = d.problems, hidden = d.hidden](Crew& c) {
      StepBarrier own(1);
      for (int64_t p; (p = c.next.fetch_add(1)) < problems;) {
        c.guarded(p, {0, hidden}, own);
        c.finished.fetch_add(1, std::memory_order_acq_rel);
      }
    };
    for (int64_t i = 1; i < std::min(threads, d.problems); ++i)
      pool.Schedule([crew, take] { take(*crew); });
    take(*crew);
    while (crew->finished.load(std::memory_order_acquire) < d.problems)
      std::this_thread::yield();
    return !crew->failed;
  }
  const int64_t wanted = std::min(threads, d.hidden / kMinTeamUnits);
  if (d.problems > 1 || wanted < 2 || macs < 4e6) {
    for (int64_t p = 0; p < d.problems; ++p) crew->guarded(p, {0, d.hidden}, solo);
    return !crew->failed;
  }
  for (int64_t i = 1; i < wanted; ++i)
    pool.Schedule([crew, hidden = d.hidden] {
      // Run inline by Schedule (no free worker): joining would wait for the caller forever.
      if (std::this_thread::get_id() == crew->caller) return;
      int64_t seen = crew->joined.load(std::memory_order_acquire), index;
      do {
        if (seen & Crew::kClosed) return;  // too late: the team is already fixed
        index = seen + 1;
      } while (!crew->joined.compare_exchange_weak(seen, seen + 1, std::memory_order_acq_rel));
      int64_t team;
      while ((team = crew->size.load(std::memory_order_acquire)) == 0) {
      }
      if (index < team) crew->guarded(0, member_part(hidden, team, index), *crew->barrier);
      crew->finished.fetch_add(1, std::memory_order_acq_rel);
    });
  // Grace period for the helpers to start: an eighth of the loop's single-thread time (at
  // ~25 G multiply-adds per second), 50 us to 1 ms, unless the caller sets one. Measured at
  // 32,100,128,256: helpers joined after a median 30 us, 90% within 56 us; a 200 us wait
  // missed 2-8% of the calls.
  const auto grace = std::chrono::microseconds(
      grace_us > 0 ? grace_us
                   : std::clamp<int64_t>(static_cast<int64_t>(macs / 25e3 / 8), 50, 1000));
  const auto start = std::chrono::steady_clock::now();
  while ((crew->joined.load(std::memory_order_acquire) & ~Crew::kClosed) < wanted - 1 &&
         std::chrono::steady_clock::now() - start < grace) {
  }
  const int64_t joined = crew->joined.fetch_or(Crew::kClosed) & ~Crew::kClosed;
  const int64_t team = team_with_units(d.hidden, joined + 1);
  crew->barrier = std::make_unique<StepBarrier>(team);
  crew->size.store(team, std::memory_order_release);
  crew->guarded(0, member_part(d.hidden, team, 0), *crew->barrier);
  // Every helper that joined is running (or about to): wait for all of them, including any
  // the team had no units for, since they read the crew's barrier.
  while (crew->finished.load(std::memory_order_acquire) < joined) std::this_thread::yield();
  return !crew->failed;
}

// The problem's sizes from xw (..., T, B, 4H), and every other buffer checked against them:
// a mis-shaped buffer would otherwise be read or written out of bounds.
class ShapeCheck {
 public:
  // Sizes from xw (..., T, B, 4H) and w_hh (..., P, 4H); P = H without a projection.
  ShapeCheck(const char* call, ffi::AnyBuffer::Dimensions xw, ffi::AnyBuffer::Dimensions w_hh,
             bool projection)
      : call_(call) {
    const size_t n = xw.size();
    if (n < 3 || xw[n - 1] % 4 != 0 || w_hh.size() != n - 1) {
      error_ = "xw must be (..., T, B, 4H) and w_hh (..., P, 4H)";
      return;
    }
    lead_.assign(xw.begin(), xw.end() - 3);
    d.steps = xw[n - 3];
    d.batch = xw[n - 2];
    d.hidden = xw[n - 1] / 4;
    d.out = projection ? w_hh[n - 3] : d.hidden;
    d.projection = projection;
    d.problems = 1;
    for (int64_t v : lead_) d.problems *= v;
  }

  // Checks that `dims` are the leading problem dimensions followed by `tail`.
  void expect(const char* name, ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> tail) {
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

ffi::Error Forward(ffi::ThreadPool& pool, int64_t threads, int64_t grace_us, bool has_mask,
                   bool has_proj, ffi::Buffer<ffi::F32> xw, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> w_hr,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                   ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> ys,
                   ffi::ResultBuffer<ffi::F32> h_n, ffi::ResultBuffer<ffi::F32> c_n,
                   float* acts, float* c_prev) {
  ShapeCheck check("forward", xw.dimensions(), w_hh.dimensions(), has_proj);
  const Dims& d = check.d;
  const int64_t H = d.hidden, G = 4 * H, B = d.batch, T = d.steps, P = d.out, TB = T * B;
  check.expect("bias", bias.dimensions(), {G});
  check.expect("w_hh", w_hh.dimensions(), {P, G});
  if (has_proj) check.expect("w_hr", w_hr.dimensions(), {H, P});
  check.expect("h0", h0.dimensions(), {B, P});
  check.expect("c0", c0.dimensions(), {B, H});
  if (has_mask) check.expect("mask", mask.dimensions(), {T, B});
  check.expect("ys", ys->dimensions(), {T, B, P});
  check.expect("h_n", h_n->dimensions(), {B, P});
  check.expect("c_n", c_n->dimensions(), {B, H});
  if (auto err = check.result(); !err.success()) return err;
  const bool* m = has_mask ? mask.typed_data() : nullptr;
  std::vector<float> h_shared(d.problems * 2 * B * P), r_shared(has_proj ? d.problems * B * H : 0);
  const bool ok = run_teams(d, threads, pool, grace_us, [&](int64_t p, const Part& part,
                                                            StepBarrier& barrier) {
    ForwardArgs a{xw.typed_data() + p * TB * G, bias.typed_data() + p * G,
                  w_hh.typed_data() + p * P * G,
                  has_proj ? w_hr.typed_data() + p * H * P : nullptr,
                  h0.typed_data() + p * B * P, c0.typed_data() + p * B * H,
                  m == nullptr ? nullptr : m + p * TB, ys->typed_data() + p * TB * P,
                  h_n->typed_data() + p * B * P, c_n->typed_data() + p * B * H,
                  acts == nullptr ? nullptr : acts + p * TB * G,
                  c_prev == nullptr ? nullptr : c_prev + p * TB * H,
                  h_shared.data() + p * 2 * B * P,
                  has_proj ? r_shared.data() + p * B * H : nullptr};
    forward_part(d, a, part, barrier);
  });
  return ok ? ffi::Error::Success() : failed("forward");
}

ffi::Error TrainForwardImpl(ffi::ThreadPool pool, int64_t threads, int64_t grace_us,
                            bool has_mask, bool has_proj, ffi::Buffer<ffi::F32> xw,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_hh,
                            ffi::Buffer<ffi::F32> w_hr, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> mask,
                            ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_n,
                            ffi::ResultBuffer<ffi::F32> c_n, ffi::ResultBuffer<ffi::F32> acts,
                            ffi::ResultBuffer<ffi::F32> c_prev) {
  ShapeCheck check("forward", xw.dimensions(), w_hh.dimensions(), has_proj);
  check.expect("acts", acts->dimensions(), {check.d.steps, check.d.batch, 4 * check.d.hidden});
  check.expect("c_prev", c_prev->dimensions(), {check.d.steps, check.d.batch, check.d.hidden});
  if (auto err = check.result(); !err.success()) return err;
  return Forward(pool, threads, grace_us, has_mask, has_proj, xw, bias, w_hh, w_hr, h0, c0, mask,
                 ys, h_n, c_n, acts->typed_data(), c_prev->typed_data());
}

ffi::Error InferForwardImpl(ffi::ThreadPool pool, int64_t threads, int64_t grace_us,
                            bool has_mask, bool has_proj, ffi::Buffer<ffi::F32> xw,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_hh,
                            ffi::Buffer<ffi::F32> w_hr, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> mask,
                            ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_n,
                            ffi::ResultBuffer<ffi::F32> c_n) {
  return Forward(pool, threads, grace_us, has_mask, has_proj, xw, bias, w_hh, w_hr, h0, c0, mask,
                 ys, h_n, c_n, nullptr, nullptr);
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, int64_t threads, int64_t grace_us, bool has_mask,
                        bool has_proj, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> w_hr,
                        ffi::Buffer<ffi::F32> acts, ffi::Buffer<ffi::F32> c_prev,
                        ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> dh_n,
                        ffi::Buffer<ffi::F32> dc_n, ffi::Buffer<ffi::PRED> mask,
                        ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dh0,
                        ffi::ResultBuffer<ffi::F32> dc0, ffi::ResultBuffer<ffi::F32> dh_total) {
  ShapeCheck check("backward", acts.dimensions(), w_hh.dimensions(), has_proj);
  const Dims& d = check.d;
  const int64_t H = d.hidden, G = 4 * H, B = d.batch, T = d.steps, P = d.out, TB = T * B;
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
  std::vector<float> dht_shared(has_proj ? d.problems * B * P : 0);
  const bool ok = run_teams(d, threads, pool, grace_us, [&](int64_t p, const Part& part,
                                                            StepBarrier& barrier) {
    BackwardArgs a{w_hh.typed_data() + p * P * G,
                   has_proj ? w_hr.typed_data() + p * H * P : nullptr,
                   acts.typed_data() + p * TB * G, c_prev.typed_data() + p * TB * H,
                   dys.typed_data() + p * TB * P, dh_n.typed_data() + p * B * P,
                   dc_n.typed_data() + p * B * H, m == nullptr ? nullptr : m + p * TB,
                   dz->typed_data() + p * TB * G, dh0->typed_data() + p * B * P,
                   dc0->typed_data() + p * B * H,
                   has_proj ? dh_total->typed_data() + p * TB * P : nullptr,
                   has_proj ? dht_shared.data() + p * B * P : nullptr};
    backward_part(d, a, part, barrier);
  });
  return ok ? ffi::Error::Success() : failed("backward");
}

}  // namespace

namespace {

// What every call takes first: XLA's thread pool and the attributes.
auto bind_common() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Attr<int64_t>("threads")
      .Attr<int64_t>("grace_us")
      .Attr<bool>("has_mask")
      .Attr<bool>("has_proj");
}

// Both forward calls: their arguments and the three results they share.
auto bind_forward() {
  return bind_common()
      .Arg<ffi::Buffer<ffi::F32>>()   // xw
      .Arg<ffi::Buffer<ffi::F32>>()   // bias
      .Arg<ffi::Buffer<ffi::F32>>()   // w_hh
      .Arg<ffi::Buffer<ffi::F32>>()   // w_hr
      .Arg<ffi::Buffer<ffi::F32>>()   // h0
      .Arg<ffi::Buffer<ffi::F32>>()   // c0
      .Arg<ffi::Buffer<ffi::PRED>>()  // mask
      .Ret<ffi::Buffer<ffi::F32>>()   // ys
      .Ret<ffi::Buffer<ffi::F32>>()   // h_n
      .Ret<ffi::Buffer<ffi::F32>>();  // c_n
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxTrainForward, TrainForwardImpl,
                              bind_forward()
                                  .Ret<ffi::Buffer<ffi::F32>>()    // acts
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c_prev

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxInferForward, InferForwardImpl, bind_forward());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxBackward, BackwardImpl,
                              bind_common()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_hr
                                  .Arg<ffi::Buffer<ffi::F32>>()   // acts
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c_prev
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dh_n
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dc_n
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dh_total
