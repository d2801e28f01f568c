#!/usr/bin/env bash
# One GPU session for lstm_jax (issue 4): environment, correctness against torch cuDNN, benchmark
# table and unroll sweep. Sized for about 6 minutes on an H100 (every part has a timeout; a part
# that fails or times out does not stop the next).
#
#   OUT=/some/folder bash scripts/gpu_check.sh      # from the repository root; on the device
#                                                   # tool $OUT is already set
# Writes into $OUT:
#   log.txt                  everything printed
#   <card>.md                the benchmark table (e.g. nvidia-h100-80gb-hbm3.md): copy to
#                            benchmarks/results/
#   <card>-unroll.md         the unroll sweep (fwd+bwd) that DEFAULT_UNROLL["gpu"] is chosen from
#   <card>-memory.md         training-step memory at T=10,000 (lstm_jax with and without remat, torch)
# Needs only what the GPU machine has: jax (CUDA), flax, torch (CUDA); the repo on PYTHONPATH.
# Knobs (environment): BENCH_SHAPES, SWEEP_SHAPES, SWEEP_UNROLLS, SWEEP_IMPLS, REPEATS, *_TIMEOUT.
set -o pipefail
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and torch share the GPU's memory
LOG="$OUT/log.txt"
: > "$LOG"
START=$SECONDS
status=0

# Most important shapes first: a timeout truncates the end of the list.
BENCH_SHAPES="${BENCH_SHAPES:-64,100,256,256 8,1000,128,256 256,100,1024,1024 32,200,512,512 \
1,500,64,64 16,500,128,128 32,100,128,256 128,50,512,512 1,1000,32,128 32,100,128,256,L2,bi}"
SWEEP_SHAPES="${SWEEP_SHAPES:-64,100,256,256 8,1000,128,256 256,100,1024,1024 32,200,512,512 \
1,500,64,64}"
SWEEP_UNROLLS="${SWEEP_UNROLLS:-4,8,16,32}"
SWEEP_IMPLS="${SWEEP_IMPLS:-lstm_jax,torch}"   # add lstm_jax-bf16,torch-fp16,torch-bf16 for bf16
REPEATS="${REPEATS:-5}"
CHECK_TIMEOUT="${CHECK_TIMEOUT:-75}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-200}"
SWEEP_TIMEOUT="${SWEEP_TIMEOUT:-80}"

part() {  # part NAME TIMEOUT COMMAND...: run, log, record failure, go on
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s, t=$((SECONDS - START))s) ===" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=$?
  echo "=== $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') ===" | tee -a "$LOG"
  ((rc == 0)) || status=1
}

# ----------------------------------------------------------------------------- 1. environment
part environment 30 bash -c '
  nvidia-smi || echo "no nvidia-smi"
  python - <<EOF
import platform, jax
print("python", platform.python_version(), "jax", jax.__version__, "backend", jax.default_backend(),
      "devices", jax.devices())
try:
    import flax; print("flax", flax.__version__)
except ImportError as e: print("flax missing", e)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "",
          "cudnn", torch.backends.cudnn.version())
except ImportError as e: print("torch missing", e)
EOF'

# ----------------------------------------------------------------------------- 2. correctness
part correctness "$CHECK_TIMEOUT" python - <<'EOF'
"""lstm_jax vs torch.nn.LSTM (cuDNN, float32, TF32 off) forward and gradients; bf16 vs f32."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import lstm_jax

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda" if torch.cuda.is_available() else "cpu"
print("jax backend", jax.default_backend(), "torch device", dev)
failures = []


def check(name, got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    ok = err <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max err {err:.2e} (tol {tol:g})")
    if not ok:
        failures.append(name)


def torch_grads_as_params(model, grads):
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    # lstm_jax has one bias b = b_ih + b_hh, so its gradient is torch's gradient of either one.
    return lstm_jax.from_torch(
        {n: (torch.zeros_like(g) if n.startswith("bias_hh") else g) for n, g in named.items()}
    )


for B, T, D, H, L, bi, lengths in [
    (4, 20, 16, 32, 1, False, False),
    (3, 50, 8, 64, 2, True, False),
    (5, 30, 16, 32, 2, True, True),
    (1, 200, 32, 64, 1, False, False),
]:
    t0 = time.perf_counter()
    name = f"B={B} T={T} D={D} H={H} L={L}{' bi' if bi else ''}{' lengths' if lengths else ''}"
    print(name)
    torch.manual_seed(0)
    model = torch.nn.LSTM(D, H, num_layers=L, bidirectional=bi, batch_first=True).to(dev)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((B, T, D)).astype(np.float32)
    dy_np = rng.standard_normal((B, T, (2 if bi else 1) * H)).astype(np.float32)
    lens = np.array([T - 3 * b for b in range(B)], np.int64) if lengths else None
    x_t = torch.from_numpy(x_np).to(dev).requires_grad_(True)
    if lengths:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x_t, torch.from_numpy(lens), batch_first=True, enforce_sorted=False)
        y_p, (h_t, c_t) = model(packed)
        y_t, _ = torch.nn.utils.rnn.pad_packed_sequence(y_p, batch_first=True, total_length=T)
    else:
        y_t, (h_t, c_t) = model(x_t)
    params_t = list(model.parameters())
    grads_t = torch.autograd.grad((y_t * torch.from_numpy(dy_np).to(dev)).sum(), params_t + [x_t])
    params = lstm_jax.from_torch(model.state_dict())
    x, dy = jnp.asarray(x_np), jnp.asarray(dy_np)
    seq = None if lens is None else jnp.asarray(lens, jnp.int32)

    def run(p, xx, **kw):
        return lstm_jax.lstm(p, xx, seq_lengths=seq, **kw)

    y, state = jax.jit(lambda p, xx: run(p, xx, precision="highest"))(params, x)
    check("y", y, y_t.detach().cpu(), 1e-4)
    check("h_n", state.h, h_t.detach().cpu(), 1e-4)
    check("c_n", state.c, c_t.detach().cpu(), 1e-4)
    want_p = torch_grads_as_params(model, grads_t[:-1])
    for custom in (True, False):
        def loss(p, xx):
            return jnp.sum(run(p, xx, precision="highest", custom_grad=custom)[0] * dy)
        gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        tag = "custom VJP" if custom else "autodiff"
        check(f"dx ({tag})", gx, grads_t[-1].cpu(), 1e-4)
        for path, got, want in zip(
            jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(gp), jax.tree.leaves(want_p)
        ):
            check(f"d{jax.tree_util.keystr(path[0])} ({tag})", got, want, 1e-4)
    # Mixed precision: bf16 products, f32 cell state, against f32.
    y16, s16 = jax.jit(lambda p, xx: run(p, xx, compute_dtype=jnp.bfloat16))(params, x)
    check("y bf16 vs f32", y16, y, 3e-2)
    check("c_n bf16 vs f32", s16.c, state.c, 5e-2)

    def loss16(p, xx):
        return jnp.sum(run(p, xx, compute_dtype=jnp.bfloat16)[0] * dy)

    gp16, gx16 = jax.jit(jax.grad(loss16, argnums=(0, 1)))(params, x)
    check("dx bf16 vs f32", gx16, grads_t[-1].cpu(), 5e-2)
    check("dW_hh[0] bf16 vs f32", gp16.layers[0][0].w_hh, want_p.layers[0][0].w_hh, 5e-2)
    print(f"  ({time.perf_counter() - t0:.1f} s)")

print("correctness:", "FAILED " + ", ".join(failures) if failures else "all ok")
raise SystemExit(1 if failures else 0)
EOF

# ----------------------------------------------------------------------------- 3. benchmark
# shellcheck disable=SC2086  # the shape lists are meant to split
part benchmark "$BENCH_TIMEOUT" python scripts/bench.py --shapes $BENCH_SHAPES ${BENCH_IMPLS:+--impls "$BENCH_IMPLS"} \
  --repeats "$REPEATS" --warmup 1 --min-time 0.02 --max-seconds $((BENCH_TIMEOUT - 40)) --out "$OUT"

# shellcheck disable=SC2086
part unroll-sweep "$SWEEP_TIMEOUT" python scripts/bench.py --shapes $SWEEP_SHAPES \
  --only fwdbwd --unroll "$SWEEP_UNROLLS" --impls "$SWEEP_IMPLS" \
  --repeats "$REPEATS" --warmup 1 --min-time 0.02 --max-seconds $((SWEEP_TIMEOUT - 30)) --out "$OUT"

# ----------------------------------------------------------------------------- 4. memory
# Training-step memory at T=10,000 (XLA's buffer plan; torch's CUDA peak): a few seconds.
part memory "${MEMORY_TIMEOUT:-60}" python scripts/bench.py --memory --out "$OUT"

ls -l "$OUT" | tee -a "$LOG"
echo "=== done in $((SECONDS - START))s, status $status ===" | tee -a "$LOG"
exit $status
