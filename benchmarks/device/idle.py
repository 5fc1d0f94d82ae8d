"""Where a GPU waits during a case: kernel busy time, idle gaps, and the host calls that block.

A ratio in the timing table says *that* a case costs more than the plain pipeline, not *why*.
This runs a few cases under ``torch.profiler`` on a CUDA device and prints, per case: wall time,
the host's launch time (how long the host took to queue everything), the kernels' busy time, the
device's idle time inside the run, and the blocking runtime calls (synchronisations, copies)
with the library-or-diffusers operator that issued them. Also times the per-site reduction
kernels of the statistics in isolation, in several formulations.

    python benchmarks/device/idle.py --tokens 1024 4096 --out DIR [--traces]    # CUDA
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cases import CASES, PROMPT, Bench  # noqa: E402
from run import build  # noqa: E402

BLOCKING = ("Synchronize", "Memcpy", "Malloc", "Free", "HostAlloc")


def access_only(b: Bench) -> None:
    """Read every block's image output in an nnsight trace and do nothing with it."""
    tr = b.model.transformer
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    with b.model.generate(PROMPT, **b.kwargs()) as tracer:
        for _ in tracer.iter[: b.steps]:
            for blk in blocks:
                blk.output[1]


def _stats_with(reduce: Callable) -> Callable[[Bench], None]:
    """The statistics case with another reduction function."""
    import massact_nn.stats as st

    def case(b: Bench) -> None:
        saved = st.channel_sums
        st.channel_sums = lambda h, compiled=False: reduce(h)
        try:
            CASES["stats"](b)
        finally:
            st.channel_sums = saved

    return case


def _variants() -> dict:
    """The statistics with each reduction formulation of ``massact_nn.reduce``, to compare."""
    import massact_nn.reduce as red

    return {"stats_abs": _stats_with(red.channel_sums_abs),  # the CPU's kernels
            "stats_norms": _stats_with(red.channel_sums_norms)}  # the GPU default, forced


def _frames(py: list[dict], tid, ts: float, n: int = 8) -> list[str]:
    """The innermost ``n`` Python frames running on thread ``tid`` at time ``ts`` (stack traces)."""
    around = [e for e in py if e["tid"] == tid and e["ts"] <= ts <= e["ts"] + e["dur"]]
    around.sort(key=lambda e: e["ts"])
    return [e["name"].split("site-packages/")[-1][-90:] for e in around[-n:]]


def summarise_trace(path: Path, where: int = 5) -> dict:
    """Busy and idle time of the device, blocking calls, and what the host ran in the longest gaps.

    ``where``: for that many of the longest idle gaps, the Python frames (profiles taken with
    stacks) at the gap's middle and at the launch that ended it, on the launching thread.
    """
    ev = json.loads(path.read_text())["traceEvents"]
    device_cats = ("kernel", "gpu_memcpy", "gpu_memset")
    dev = sorted((e for e in ev if e.get("cat") in device_cats), key=lambda e: e["ts"])
    kernels = [(e["ts"], e["dur"]) for e in dev]
    runtime = [e for e in ev if e.get("cat") == "cuda_runtime"]
    ops = [e for e in ev if e.get("cat") == "cpu_op"]
    start = min(e["ts"] for e in ops)
    if not kernels:  # a CPU run (a smoke test of this script)
        return {"wall_ms": (max(e["ts"] + e["dur"] for e in ops) - start) / 1e3}
    end = max(k[0] + k[1] for k in kernels)
    busy, gaps, last = 0.0, [], kernels[0][0]
    for i, (ts, dur) in enumerate(kernels):
        if ts > last:
            gaps.append((ts - last, last, i))
        busy += max(0.0, ts + dur - max(ts, last))
        last = max(last, ts + dur)
    # Triton launches through the driver API (cuLaunchKernel), eager kernels through the runtime.
    launches = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver") and "Launch" in e["name"]]
    launch_end = max(e["ts"] + e["dur"] for e in launches)
    blocking = Counter()
    for e in runtime:
        if any(b in e["name"] for b in BLOCKING) and e["dur"] > 20:
            owner = [o for o in ops if o["tid"] == e["tid"] and o["ts"] <= e["ts"]
                     and o["ts"] + o["dur"] >= e["ts"] + e["dur"]]
            name = min(owner, key=lambda o: o["dur"])["name"] if owner else "?"
            blocking[(e["name"], name)] += e["dur"]
    gaps.sort(reverse=True)
    py = [e for e in ev if e.get("cat") == "python_function"]
    by_corr = {e.get("args", {}).get("correlation"): e for e in ev
               if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    located = []
    for g, gstart, i in gaps[:where if py else 0]:
        launch = by_corr.get(dev[i].get("args", {}).get("correlation"))
        if launch is None:
            continue
        located.append({"at_ms": round((gstart - start) / 1e3, 2), "gap_us": round(g),
                        "next": dev[i]["name"][:60],
                        "host_mid": _frames(py, launch["tid"], gstart + g / 2),
                        "host_launch": _frames(py, launch["tid"], launch["ts"])})
    return {
        "wall_ms": (end - start) / 1e3,
        "launch_ms": (launch_end - start) / 1e3,
        "first_kernel_ms": (kernels[0][0] - start) / 1e3,
        "busy_ms": busy / 1e3,
        "idle_ms": (end - kernels[0][0] - busy) / 1e3,
        "gaps_over_50us": sum(1 for g, *_ in gaps if g > 50),
        "top_gaps_us": [round(g) for g, *_ in gaps[:8]],
        "blocking_ms": {f"{k[0]} in {k[1]}": round(v / 1e3, 3) for k, v in blocking.most_common(8)},
        **({"longest_gaps": located} if located else {}),
    }


def time_cases(b: Bench, names: list[str], table: dict, reps: int) -> dict[str, float]:
    """Median milliseconds per case, repetitions interleaved, before any profiling.

    A profiler session leaves the process slower afterwards (its callbacks), so nothing timed
    here may follow one.
    """
    first = {}
    for c in names:
        for i in range(2):
            b.sync()
            t0 = time.perf_counter()
            table[c](b)
            b.sync()
            if i == 0:
                first[c] = round((time.perf_counter() - t0) * 1e3, 1)
    # The first call of a case includes one-off work: torch.compile's compilation, for one.
    print(f"first calls at {b.tokens} tokens (ms): {first}")
    times: dict[str, list[float]] = {c: [] for c in names}
    for _ in range(reps):
        for c in names:
            t0 = time.perf_counter()
            table[c](b)
            b.sync()
            times[c].append(time.perf_counter() - t0)
    return {c: statistics.median(v) * 1e3 for c, v in times.items()}


def profile_case(b: Bench, name: str, fn, out: Path | None, stack: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.device.startswith("cuda") else [])
    # Stacks slow the host (every Python call is recorded): the times of such a profile say
    # where gaps are, not how long a case takes.
    with profile(activities=acts, with_stack=stack) as prof:
        fn(b)
        b.sync()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "t.json"
        prof.export_chrome_trace(str(raw))
        s = summarise_trace(raw)
        if out is not None:
            with gzip.open(out / f"trace_{name}_{b.tokens}.json.gz", "wb") as f:
                f.write(raw.read_bytes())
    return s


def reductions(tokens: int, width: int, device: str, reps: int = 50) -> dict:
    """Device time of one site's three channel reductions, per formulation (ms)."""
    if not device.startswith("cuda"):
        return {}
    h = torch.randn(1, tokens, width, device=device, dtype=torch.bfloat16)
    f32 = torch.float32
    inf = float("inf")

    def current():
        a = h.abs()
        return torch.sum(h, 1, dtype=f32), torch.sum(a, 1, dtype=f32), torch.amax(a, 1)

    def norms():
        return (torch.sum(h, 1, dtype=f32), torch.linalg.vector_norm(h, 1, dim=1, dtype=f32),
                torch.linalg.vector_norm(h, inf, dim=1))

    def aminmax():
        lo, hi = torch.aminmax(h, dim=1)
        return (torch.sum(h, 1, dtype=f32), torch.linalg.vector_norm(h, 1, dim=1, dtype=f32),
                torch.maximum(-lo, hi))

    from massact_nn.reduce import one_pass

    # Its own compiled function: the library's (used by the generations below) must see only
    # the generations' shapes, or it would be recompiled for dynamic shapes.
    compiled = torch.compile(one_pass, fullgraph=True, dynamic=False)

    def fused():
        return compiled(h)

    def gemv():
        hh = h[0]
        return (hh.t() @ torch.ones(tokens, 1, device="cuda", dtype=h.dtype),
                torch.linalg.vector_norm(h, 1, dim=1, dtype=f32), torch.linalg.vector_norm(h, inf, dim=1))

    ones = torch.ones(1, tokens, device=device, dtype=h.dtype)

    def gemv32():  # the token sum as a GEMV with float32 output (torch >= 2.8 on CUDA)
        return (torch.mm(ones, h[0], out_dtype=f32),
                torch.linalg.vector_norm(h, 1, dim=1, dtype=f32), torch.linalg.vector_norm(h, inf, dim=1))

    def sum_only():
        return torch.sum(h, 1, dtype=f32)

    out = {}
    for name, fn in [("current", current), ("norms", norms), ("aminmax", aminmax), ("gemv", gemv),
                     ("gemv32", gemv32), ("fused", fused), ("sum_only", sum_only)]:
        try:
            for _ in range(5):
                fn()
        except (RuntimeError, TypeError) as e:  # an operator this torch lacks
            out[name] = f"unavailable: {str(e)[:80]}"
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        host = (time.perf_counter() - t0) / reps * 1e3
        # Device time alone: the calls are queued behind a sleeping kernel, so the host's launch
        # cost (large for a compiled function) does not leave gaps between them.
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2e8))
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        out[name] = {"device": round(s.elapsed_time(e) / reps, 4), "wall": round(host, 4)}
    ref = current()
    for name, fn in [("norms", norms), ("aminmax", aminmax), ("fused", fused)] + (
            [("gemv32", gemv32)] if isinstance(out.get("gemv32"), dict) else []):
        got = fn()
        out[f"{name}_maxdiff"] = max(float((x.float() - y.float()).abs().max() / y.float().abs().max())
                                     for x, y in zip(got, ref))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--blocks", type=int, nargs=2, default=[2, 4])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cases", nargs="+",
                   default=["plain", "stats", "stats_fused", "stats_abs"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--traces", action="store_true", help="also keep each profile (Chrome trace, gzip)")
    p.add_argument("--stacks", action="store_true",
                   help="profile with Python stacks and report what the host ran in the longest gaps")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    print(torch.cuda.get_device_name() if cuda else args.device, torch.__version__)
    for t in args.tokens:
        red = reductions(t, args.width, args.device)
        print(f"reductions at {t} tokens (ms per site; device: GPU time, wall: with launches): {red}")
    table = {**CASES, "access_only": access_only, **_variants()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp), args.width, tuple(args.blocks))
        for t in args.tokens:
            b = Bench.load(folder, t, args.steps, args.device, args.dtype)
            medians = time_cases(b, args.cases, table, args.reps)
            plain = medians.get("plain")
            for c, ms in medians.items():
                ratio = f"  x{ms / plain:.3f}" if plain else ""
                print(f"{c}@{t}: median {ms:.2f} ms{ratio}")
            for c in args.cases:
                keep = args.out if args.traces else None
                s = {**profile_case(b, c, table[c], keep, args.stacks), "median_ms": medians[c]}
                results[f"{c}@{t}"] = s
                print(f"{c}@{t} profiled: " + json.dumps(s))
            del b
            if cuda:
                torch.cuda.empty_cache()
    (args.out / "profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
