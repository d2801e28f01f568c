"""Compiles the Pallas LSTM kernels for an H100 (sm_90) without a GPU and reports their cost.

    pip install triton==3.8.0        # not a project dependency: a scratch tool for issue 7
    PYTHONPATH=. python benchmarks/triton_compile.py

Cross-lowers ``pallas_recurrence`` (forward and backward kernels) for CUDA on this CPU, takes
the Triton IR out of the custom calls, compiles it with the installed Triton for sm_90 and
runs its ``ptxas -v`` on the PTX. Prints, per kernel: shared memory, registers per thread,
spills, and what one time step of the loop executes per thread (PTX instructions, barriers,
shuffles, loads, tensor-core instructions). The GPU machine's jaxlib bundles its own Triton,
so the numbers are indicative; timings need the GPU (``scripts/gpu_kernels.py``).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from lstm_jax.kernels import pallas_recurrence

CASES = [  # (hidden, batch, dtype, product)
    (64, 1, jnp.float32, "mma"),
    (64, 1, jnp.float32, "fma"),
    (64, 1, jnp.bfloat16, "fma"),
    (128, 16, jnp.bfloat16, "mma"),
]


def _unescape(text: str) -> bytes:
    """The bytes of an MLIR string attribute as HLO text prints it (\\XX escapes)."""
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] == "\\":
            pair = text[i + 1:i + 3]
            if len(pair) == 2 and all(c in "0123456789ABCDEFabcdef" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out.append(ord(text[i + 1]))
            i += 2
            continue
        out.append(ord(text[i]))
        i += 1
    return bytes(out)


def kernels(hidden, batch, dtype, product):
    """[(name, num_warps, Triton IR bytecode)] of the forward and backward kernels."""
    steps = 7
    xw = jnp.ones((steps, batch, 4 * hidden))
    w_hh = jnp.ones((hidden, 4 * hidden), dtype)
    h0, c0 = jnp.ones((batch, hidden), dtype), jnp.ones((batch, hidden))

    def grads(xw, w_hh, h0, c0):
        run = lambda *a: pallas_recurrence(a[0], a[1], None, a[2], a[3], None, product=product)
        return jax.grad(lambda *a: jnp.sum(run(*a)[0].astype(jnp.float32)),
                        argnums=(0, 1))(xw, w_hh, h0, c0)

    text = jax.jit(grads).trace(xw, w_hh, h0, c0).lower(lowering_platforms=("cuda",)).as_text()
    found = []
    for m in re.finditer(r"mhlo.backend_config = \{(.*?num_warps = \d+ : i32)\}", text, re.S):
        config = m.group(1)
        ir = re.search(r'ir = "((?:[^"\\]|\\.)*)"', config).group(1)
        name = re.search(r'name = "([^"]*)"', config).group(1)
        warps = int(re.search(r"num_warps = (\d+)", config).group(1))
        found.append((name, warps, _unescape(ir)))
    return found


def loop_profile(ptx: str) -> dict[str, int]:
    """Instruction counts between the time loop's first block and its back edge."""
    lines = ptx.split("\n")
    starts = [i for i, line in enumerate(lines) if "Inner Loop Header" in line]
    ends = [i for i, line in enumerate(lines) if re.search(r"bra(\.uni)?\s+\$L__BB0_\d+;", line)]
    entry = [i for i, line in enumerate(lines) if "bra.uni" in line and "BB0_1;" in line]
    first = min(entry + starts)
    body = [x.strip() for x in lines[first:max(ends) + 1]
            if x.strip() and not x.strip().startswith(("//", "$"))]
    ops = collections.Counter(re.split(r"[\s.]", x.lstrip("@!%p0123456789 "))[0] for x in body)
    return {"instr": len(body), **{k: ops[k] for k in ("bar", "shfl", "ld", "ldmatrix", "mma")}}


def main() -> None:
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    print(f"triton {triton.__version__}, target sm_90")
    print("| H, B, dtype | product | kernel | warps | shared KiB | registers | spills | "
          "loop: PTX instr | bar | shfl | ld | ldmatrix | mma |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, batch, dtype, product in CASES:
            for name, warps, blob in kernels(hidden, batch, dtype, product):
                bytecode = os.path.join(tmp, f"{name}.mlirbc")
                with open(bytecode, "wb") as f:
                    f.write(blob)
                context = ir.context()
                ir.load_dialects(context)
                triton.compiler.make_backend(target).load_dialects(context)
                source = os.path.join(tmp, f"{name}.ttir")
                with open(source, "w") as f:
                    f.write(str(ir.parse_mlir_module(bytecode, context)))
                compiled = triton.compile(source, target=target, options={"num_warps": warps})
                ptx_path = os.path.join(tmp, f"{name}.ptx")
                with open(ptx_path, "w") as f:
                    f.write(compiled.asm["ptx"])
                report = subprocess.run(
                    [ptxas, "-v", "--gpu-name", "sm_90a", ptx_path, "-o", ptx_path + ".cubin"],
                    capture_output=True, text=True).stderr
                regs = re.search(r"Used (\d+) registers", report)
                spills = re.search(r"(\d+) bytes spill stores", report)
                loop = loop_profile(compiled.asm["ptx"])
                print(f"| {hidden}, {batch}, {jnp.dtype(dtype).name} | {product} | {name} | "
                      f"{warps} | {compiled.metadata.shared / 1024:.0f} | "
                      f"{regs.group(1) if regs else '?'} | {spills.group(1) if spills else '?'} | "
                      + " | ".join(str(loop[k]) for k in
                                   ("instr", "bar", "shfl", "ld", "ldmatrix", "mma")) + " |")


if __name__ == "__main__":
    main()
