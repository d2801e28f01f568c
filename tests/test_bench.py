"""The benchmark harness runs end to end on a tiny shape (structure only: no timing assertions)."""

from __future__ import annotations

import re

import pytest

from lstm_jax import bench


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]


def _section(text: str, title: str) -> str:
    start = text.index(title)
    body = text[start:].split("\n\n", 2)[1]
    return body


def test_parse_shape():
    assert bench.parse_shape("32,100,128,256") == bench.Shape(32, 100, 128, 256)
    s = bench.parse_shape("32,100,128,256,L2,bi")
    assert (s.layers, s.bidirectional, s.label) == (2, True, "32,100,128,256 L2 bi")
    assert bench.Shape(32, 100, 128, 256).forward_flops() == 2 * 100 * 32 * 4 * 256 * (128 + 256)
    # Layer 2 of a bidirectional stack reads both directions of layer 1.
    assert s.forward_flops() == 2 * 2 * 100 * 32 * 1024 * ((128 + 256) + (512 + 256))
    with pytest.raises(Exception):
        bench.parse_shape("32,100,128")


def test_cpu_family_names_the_vendor_and_family():
    # The benchmark VM came as both; their tables are kept apart.
    assert bench.cpu_family("Intel(R) Xeon(R) Processor @ 2.50GHz") == "intel-xeon"
    assert bench.cpu_family("AMD EPYC") == "amd-epyc"
    assert bench.cpu_family("AMD EPYC 9B14 96-Core Processor") == "amd-epyc"
    assert bench.cpu_family("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz") == "intel-core"
    assert bench.cpu_family("") == ""
    assert re.fullmatch(r"cpu-\d+core(-[a-z0-9]+)*", bench.machine_name())


def test_bench_main_tiny(tmp_path, capsys):
    out = tmp_path / "tiny.md"
    assert bench.main(["--shapes", "2,3,3,4", "--repeats", "1", "--warmup", "0",
                       "--min-time", "0", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# lstm_jax benchmark: ")
    assert "- command: `" in text and "- versions: " in text and "jax " in text
    assert "## Details" in capsys.readouterr().out  # the table is printed too

    rows = _rows(_section(text, "## Details"))
    assert rows[0] == ["shape B,T,D,H", "mode", "impl", "ms", "vs torch", "us/step", "GFLOP",
                       "GFLOP/s", "compile s", "others' CPU"]
    assert set(rows[1]) == {"---"}
    table = {(r[1], r[2]): r for r in rows[2:]}
    impls = {impl for _, impl in table}
    assert {"lstm_jax", "lstm_jax-autodiff", "flax"} <= impls
    for mode in ("fwd+bwd", "fwd"):
        row = table[(mode, "lstm_jax")]
        assert row[0] == "2,3,3,4"
        assert float(row[3]) > 0 and float(row[5]) > 0 and float(row[8]) > 0
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    for mode in ("fwd+bwd", "fwd"):
        torch_row = table[(mode, "torch")]
        assert float(torch_row[3]) > 0 and torch_row[4] == "1.00x" and torch_row[8] == "-"
        assert re.fullmatch(r"\d+\.\d\dx", table[(mode, "lstm_jax")][4])
    summary = _rows(_section(text, "## Summary"))
    assert summary[0][:3] == ["shape B,T,D,H", "mode", "torch ms"]
    assert len(summary) == 4  # header, rule, fwd+bwd, fwd


def test_ratio_pairs_the_bursts_of_each_round():
    shape = bench.Shape(2, 3, 3, 4)
    # The machine ran at half speed in round 1: torch and lstm_jax both took twice as long.
    torch_row = bench.Result(shape, "fwd", "torch", 10.0, bursts=((0, 10.0), (1, 20.0), (2, 10.0)))
    ours = bench.Result(shape, "fwd", "lstm_jax", 9.0,
                        bursts=((0, 8.0), (1, 16.0), (2, 9.0), (3, 50.0)))  # round 3: no torch
    rows = [ours, torch_row]
    assert bench.paired_ratios(ours, torch_row) == [0.8, 0.8, 0.9]
    assert bench.ratio(ours, rows) == pytest.approx(0.8)  # not 9.0 / 10.0
    median, q1, q3, n = bench.ratio_spread(ours, rows)
    assert (median, n) == (pytest.approx(0.8), 3)
    assert q1 == pytest.approx(0.8) and q3 == pytest.approx(0.85)  # inclusive quartiles
    assert bench.ratio(torch_row, rows) == 1.0
    # Without bursts in common, or with fewer than 3, the ratio of the medians.
    lone = bench.Result(shape, "fwd", "flax", 15.0, bursts=((7, 15.0),))
    assert bench.ratio(lone, rows + [lone]) == pytest.approx(1.5)
    assert bench.ratio_spread(lone, rows + [lone]) is None
    two = bench.Result(shape, "fwd", "flax", 12.0, bursts=((0, 5.0), (1, 10.0), (5, 14.0)))
    assert bench.ratio_spread(two, rows + [two])[3] == 2
    assert bench.ratio(two, rows + [two]) == pytest.approx(1.2)
    assert "| 2,3,3,4 | fwd | flax | 12 | 1.20x |" in bench.detail_table(rows + [two])
    # Half-precision rows pair with torch's faster half precision (fp16 here: 5 ms against 6).
    fp16 = bench.Result(shape, "fwd", "torch-fp16", 5.0, half=True,
                        bursts=((0, 4.0), (1, 8.0), (2, 4.0)))
    bf16 = bench.Result(shape, "fwd", "torch-bf16", 6.0, half=True,
                        bursts=((0, 1.0), (1, 1.0), (2, 1.0)))
    ours16 = bench.Result(shape, "fwd", "lstm_jax-bf16", 5.0, half=True,
                          bursts=((0, 2.0), (1, 8.0), (2, 3.0)))
    half_rows = [ours16, fp16, bf16, torch_row]
    assert bench.ratio(ours16, half_rows) == pytest.approx(0.75)  # 0.5, 1.0, 0.75; not 5 / 5
    assert bench.ratio(fp16, half_rows) == pytest.approx(0.4)  # torch's halves against fp32
    assert "| 2,3,3,4 | fwd | lstm_jax | 9 | 0.80x (0.80-0.85) |" in bench.detail_table(rows)


def test_a_burst_timed_again_is_paired_with_torch(monkeypatch):
    # Other processes disturb lstm_jax's burst in round 1: it is timed again in an extra
    # round, and torch is timed there too, so that every kept burst has a partner.
    timed = []

    def impl(label):
        def build(shape, mode):
            return bench.Prepared(lambda: timed.append(label), None)
        return bench.Impl(label, build)

    busy = iter([0.0, 0.0, 0.0, 0.9] + [0.0] * 10)  # one value per burst, in order
    monkeypatch.setattr(bench, "_wait_until_quiet", lambda *a, **k: None)
    monkeypatch.setattr(bench, "_others_cpu", lambda start, end: next(busy))
    rows = bench.bench_case(bench.Shape(2, 3, 3, 4), "fwd", [impl("lstm_jax"), impl("torch")],
                            repeats=2, warmup=0, min_time=0.0, quiet=0.5, max_wait=60)
    ours, torch_row = rows
    # Round 0 times lstm_jax then torch, round 1 torch then lstm_jax, whose burst (the fourth)
    # was disturbed: round 2 times both again.
    assert [r for r, _ in ours.bursts] == [0, 2]
    assert [r for r, _ in torch_row.bursts] == [0, 1, 2]
    assert len(bench.paired_ratios(ours, torch_row)) == 2
    assert ours.note == "2 undisturbed bursts of 3"


def test_rejected_variant_is_skipped():
    impls = [bench.lstm_jax_impl(bench.Variant("lstm_jax-bogus", {"no_such_argument": 1})),
             bench.lstm_jax_impl(bench.Variant("lstm_jax u=2", {"unroll": 2}))]
    logged = []
    results = bench.run_benchmarks([bench.Shape(2, 3, 3, 4)], impls, ("fwd",), repeats=1,
                                   warmup=0, min_time=0.0, log=logged.append)
    assert [r.status for r in results] == ["skip", "ok"]
    assert "no_such_argument" in results[0].note
    assert any("skip lstm_jax-bogus" in line for line in logged)
    assert "lstm_jax-bogus" in bench.summary_table(results)
    sweep = bench.unroll_table(results)
    assert "| 2,3,3,4 | fwd | lstm_jax |" in sweep


def test_select_impls():
    cpu = [i.label for i in bench.select_impls(bench.default_impls("cpu"), None, "cpu")]
    assert "lstm_jax-bf16" not in cpu and "jax.experimental.rnn" not in cpu and "torch" in cpu
    gpu = [i.label for i in bench.select_impls(bench.default_impls("gpu"), None, "gpu")]
    assert {"lstm_jax-bf16", "jax.experimental.rnn", "torch-fp16", "torch-bf16"} <= set(gpu)
    sweep = bench.select_impls(bench.default_impls("cpu", [1, 4]), ["lstm_jax", "torch"], "cpu")
    assert [i.label for i in sweep] == ["lstm_jax u=1", "lstm_jax u=4", "torch"]
    # Remat variants only when named exactly, not by a wildcard or by default.
    assert not {label for label in cpu + gpu if "remat" in label}
    star = [i.label for i in bench.select_impls(bench.default_impls("cpu"), ["lstm_jax*"], "cpu")]
    assert "lstm_jax-scan" in star and not [label for label in star if "remat" in label]
    named = bench.select_impls(bench.default_impls("cpu"), ["lstm_jax-cpu-remat"], "cpu")
    assert [i.label for i in named] == ["lstm_jax-cpu-remat"]


def test_memory_mode_reports_the_residuals_and_remat_saves(tmp_path):
    """--memory: the working memory of jit(grad) holds at least the residuals the custom VJP
    keeps (a formula), and remat keeps less of them at a long sequence."""
    shape = bench.Shape(2, 400, 3, 8)
    out = tmp_path / "mem.md"
    assert bench.main(["--memory", "--shapes", "2,400,3,8", "--out", str(out)]) == 0
    text = out.read_text()
    rows = _rows(text[text.index("| shape B,T,D,H"):].split("\n\n", 1)[0])
    assert rows[0][:4] == ["shape B,T,D,H", "impl", "working memory MiB", "total MiB"]
    mib = {r[1]: float(r[2]) for r in rows[2:] if r[2] != "-"}
    assert {"lstm_jax", "lstm_jax remat", "lstm_jax-autodiff", "flax"} <= set(mib)
    # Saved per step: the gate activations (B, 4H), c_{t-1} and y_t (B, H), float32.
    residuals = shape.T * shape.B * (4 + 1 + 1) * shape.H * 4 / 2**20
    assert mib["lstm_jax"] >= residuals
    assert mib["lstm_jax remat"] < mib["lstm_jax"]


def test_forcing_in_place_residuals_changes_the_buffer_plan_and_is_undone():
    # The GPU benchmark compares the in-place activations (CPU's default) with the stacked
    # ones; forcing them off here must cost about one (T, B, 4H) float32 buffer of XLA memory.
    import jax
    import jax.numpy as jnp

    import lstm_jax
    from lstm_jax import _recurrence

    T, B, D, H = 200, 4, 8, 32
    params = lstm_jax.init_lstm(jax.random.key(0), D, H)
    x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    library_choice = _recurrence.in_place_residuals
    temps = {}
    for flag in (True, False):
        grad = jax.grad(lambda p, xx: jnp.sum(lstm_jax.lstm(p, xx, backend="scan")[0]),
                        argnums=(0, 1))
        with bench._in_place_residuals(flag):
            temps[flag] = bench._xla_memory(grad, params, x)[0]
    assert _recurrence.in_place_residuals is library_choice
    buffer = T * B * 4 * H * 4
    assert 0.5 * buffer <= temps[False] - temps[True] <= 1.5 * buffer


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc",
                    reason="mallopt's settings are glibc's")
def test_steady_malloc_reuses_a_freed_block_above_the_mmap_threshold():
    # Run in a child: the allocator settings are process-wide. A 48 MiB block (above glibc's
    # largest mmap threshold, as XLA's temporaries at 32,100,128,256) freed and taken again on
    # another thread must come back resident: one page fault per 4 KiB page the first time
    # (12,288), next to none the second.
    import subprocess
    import sys

    child = r"""
import ctypes, resource, threading
import lstm_jax
assert lstm_jax.keep_freed_memory()  # the public name of _host_memory.steady_malloc
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 48 * 2**20
faults = []
def touch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
for _ in range(2):
    worker = threading.Thread(target=touch)
    worker.start()
    worker.join()
print(*faults)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    first, second = (int(v) for v in out.stdout.split())
    assert first >= 12_288 * 0.9
    assert second < 200
