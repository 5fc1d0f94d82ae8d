"""Time and memory of massact-nn's interventions against the plain diffusers pipeline.

One script, one table: every case runs on the same tiny-but-shaped FLUX.1 transformers at several
image-token counts, with interleaved repetitions (so drift in machine load hits every case alike)
and medians. Peak memory is measured in a fresh subprocess per case (RSS high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on a GPU), since a process's peak can only grow.

    python benchmarks/run.py --quick        # < 10 minutes on 2 CPU cores
    python benchmarks/run.py --device cuda --width 3072 --dtype bfloat16 --tokens 4096
    python benchmarks/run.py --ops          # operator counts instead of times (deterministic)

The last line reads ``stats/plain at 1024 tokens: <ratio>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, GPU_ONLY, Bench  # noqa: E402


def build(folder: Path, width: int, blocks: tuple[int, int]) -> Path:
    from massact_nn.tracing.testing.tiny import build_flux

    head_dim = 64 if width >= 64 else width // 2
    return build_flux(folder, seed=0, double=blocks[0], single=blocks[1], heads=width // head_dim,
                      head_dim=head_dim)


def measure_memory(args, folder: Path, tokens: int, case: str) -> tuple[float, float] | None:
    """``(added, total)`` peak MiB of one run of ``case`` in a fresh process."""
    cmd = [sys.executable, __file__, "--child", case, "--folder", str(folder), "--tokens", str(tokens),
           "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype]
    # glibc's dynamic mmap threshold lets freed tensors stay in the heap, so RSS peaks depended on
    # the order of frees (±30 MiB between identical runs). A fixed threshold returns every
    # tensor-sized block to the OS when freed: RSS then tracks live memory (±0.3 MiB).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK "):
            return float(line.split()[1]), float(line.split()[2])
    print(f"  memory run of {case} at {tokens} failed: {out.stderr.strip().splitlines()[-1:]}")
    return None


class CallSpan:
    """Host time of a case outside the transformer's calls: before the first, after the last.

    On a GPU nothing is queued then, so this host work idles the device whatever the model's
    size; what runs inside the calls overlaps the blocks' kernels. On a CPU the two parts add up.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self._hooks = [module.register_forward_pre_hook(self._enter),
                       module.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, *_: object) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def _exit(self, *_: object) -> None:
        self.last = time.perf_counter()

    def outside(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` before the first call and after the last (then reset)."""
        first, last = self.first or end, self.last or end
        self.first = self.last = None
        return (first - start) + (end - last)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    """Run one case once in a fresh process and print the peak memory it added.

    On CPU a sampling thread reads the resident set size every millisecond during the case:
    the process-wide high-water mark would also count model loading, which dwarfs the case.
    """
    torch.set_num_threads(1)
    bench = Bench.load(Path(args.folder), args.tokens[0], args.steps, args.device, args.dtype)
    fn = CASES[args.child]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(bench)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        print(f"PEAK {(peak - base) / 2**20:.1f} {peak / 2**20:.1f}")
        return
    import threading

    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn(bench)
    done.set()
    t.join()
    top = max(peak[0], _rss_mib())
    print(f"PEAK {top - base:.1f} {top:.1f}")


def count_ops(bench: Bench, cases: list[str]) -> list[dict]:
    """Per case, one generation's aten operators: all, and the library's own by phase.

    Deterministic where times are not: what the host launches before the transformer's first call
    and after its last is what a GPU cannot overlap with the model's work, and an operator that
    waits for the device stalls it (see ``massact_nn.tracing.testing.dispatch``). On a GPU the
    synchronisations torch reports (``torch.cuda.set_sync_debug_mode``) are counted too.
    """
    import massact_nn.tracing
    from massact_nn.tracing.testing.dispatch import OpLog, SyncReports

    import massact_nn

    roots = [Path(m.__file__).parent for m in (massact_nn, massact_nn.tracing)]
    transformer = bench.model.pipeline.transformer
    rows = []
    for c in cases:
        CASES[c](bench)  # warm-up: first-call work (caches, lazy imports) is not per generation
        with OpLog(roots).follow(transformer) as log:
            CASES[c](bench)
        syncs = {}
        if bench.device.startswith("cuda"):  # a second run, without the operator log's overhead
            with SyncReports(roots) as rep:
                CASES[c](bench)
            syncs = {"syncs": rep.total, "syncs_ours": dict(rep.ours)}
        rows.append({"case": c, "tokens": bench.tokens, "ops": log.total, "calls": log.calls,
                     **{f"ours_{p}": log.ours[p] for p in ("before", "call", "between", "after")},
                     "waits": dict(log.waits), **syncs})
    return rows


def print_ops(rows: list[dict], sites: int) -> None:
    plain = {r["tokens"]: r["ops"] for r in rows if r["case"] == "plain"}
    print(f"  {'case':<24} {'aten ops':>9} {'over plain':>10} | library's own: {'before':>6} "
          f"{'in calls':>8} {'between':>7} {'after':>5} | waits for the device")
    for r in rows:
        over = f"{r['ops'] - plain[r['tokens']]:+10d}" if r["tokens"] in plain else f"{'-':>10}"
        per = r["ours_call"] / max(r["calls"] * sites, 1)
        waits = ", ".join(f"{k} x{v}" for k, v in sorted(r["waits"].items())) or "none"
        if "syncs" in r:
            ours = ", ".join(f"{k} x{v}" for k, v in sorted(r["syncs_ours"].items())) or "none"
            waits += f"; torch-reported syncs {r['syncs']}, the library's: {ours}"
        print(f"  {r['case']:<24} {r['ops']:9d} {over} | {'':>14} {r['ours_before']:6d} "
              f"{r['ours_call']:8d} {r['ours_between']:7d} {r['ours_after']:5d} | {waits}"
              f"   ({per:.1f} per site and call)")


def summarise(rows: list[dict], width: int) -> None:
    """The issue's targets, read off the table (one line per measured token count)."""
    by = {(r["tokens"], r["case"]): r for r in rows}
    print("== against the targets")
    for n in sorted({r["tokens"] for r in rows}):
        parts = []
        st = by.get((n, "stats"))
        if st:
            mem = f", memory x{st['mem_ratio']:.3f} (<= 1.05)" if st.get("mem_ratio") else ""
            parts.append(f"stats x{st['time_ratio']:.3f} (<= 1.03){mem}")
        fu = by.get((n, "stats_fused"))
        if fu:
            parts.append(f"stats with the compiled reduction x{fu['time_ratio']:.3f}")
        tp = by.get((n, "transport_two_pass"))
        if tp and "stored/full" in tp:
            parts.append(f"two-pass stored/full {tp['stored/full']:.5f} (k/channels {4 / width:.5f})")
        # Transport returns images: its baseline is one generation with the VAE decode
        # (the ratios below are to plain_images).
        one = by.get((n, "plain_images"))
        for case, what in (("transport_batched_2row", "batched 2 rows"),
                           ("transport_two_pass_2row", "two-pass 1+1 rows"),
                           ("transport_batched", "batched 3 rows")):
            tb = by.get((n, case))
            if tb and one:
                limit = " (<= 2.05)" if "2 rows" in what or "1+1" in what else ""
                parts.append(f"{what} x{tb['seconds'] / one['seconds']:.3f}{limit}")
        print(f"  {n} tokens: " + "; ".join(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 and 1024 tokens, 3 repetitions")
    p.add_argument("--model", default="tiny", choices=("tiny", "toy"),
                   help="tiny: a random FLUX.1 built at --width/--blocks; toy: the shipped toy model "
                   "(256 tokens, its native size)")
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--blocks", type=int, nargs=2, default=(2, 4), metavar=("DOUBLE", "SINGLE"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cases", nargs="*", default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--ops", action="store_true",
                   help="count each case's aten operators (by phase and origin) instead of timing it")
    p.add_argument("--json", default=None, help="also write the table as JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(1)
    tokens = args.tokens or ([256, 1024] if args.quick else [256, 1024, 4096])
    if args.model == "toy":
        tokens = args.tokens or [256]
    reps = args.reps or (3 if args.quick else 5)
    cases = args.cases or [c for c in CASES if args.device.startswith("cuda") or c not in GPU_ONLY]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "toy":
            from massact_nn.tracing.model import toy_path

            folder = toy_path()
        else:
            folder = build(Path(tmp) / "flux", args.width, tuple(args.blocks))
        for n in tokens:
            bench = Bench.load(folder, n, args.steps, args.device, args.dtype)
            where = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
            shape = ("the toy model" if args.model == "toy"
                     else f"width {args.width}, blocks {tuple(args.blocks)}")
            print(f"== {n} image tokens, {shape}, "
                  f"{args.steps} steps, {bench.sites} sites, {where} {args.dtype}, torch {torch.__version__}")
            if args.ops:
                ops = count_ops(bench, cases)
                print_ops(ops, bench.sites)
                rows += ops
                continue
            for c in cases:  # warm-up
                CASES[c](bench)
            times: dict[str, list[float]] = {c: [] for c in cases}
            outside: dict[str, list[float]] = {c: [] for c in cases}
            span = CallSpan(bench.model.pipeline.transformer)
            for _ in range(reps):
                for c in cases:
                    bench.sync()
                    t0 = time.perf_counter()
                    CASES[c](bench)
                    bench.sync()
                    t1 = time.perf_counter()
                    times[c].append(t1 - t0)
                    outside[c].append(span.outside(t0, t1))
            span.remove()
            plain_t = statistics.median(times["plain"])
            plain_out = statistics.median(outside["plain"])
            mem = {} if args.no_memory else {c: measure_memory(args, folder, n, c) for c in cases}
            for c in cases:
                t = statistics.median(times[c])
                added, total = mem.get(c) or (None, None)
                base = mem.get("plain")
                ratio = total / base[1] if total and base else None
                out = statistics.median(outside[c])
                rows.append({"tokens": n, "case": c, "seconds": t, "time_ratio": t / plain_t,
                             "outside_ms": 1e3 * out,
                             "peak_added_mib": added, "peak_total_mib": total, "mem_ratio": ratio,
                             **bench.extra.get(c, {})})
                mem_txt = (f"peak {total:8.1f} MiB (+{added:6.1f} in the run)  x{ratio:.3f}"
                           if ratio else "peak -")
                extra = "  ".join(f"{k}={v}" for k, v in bench.extra.get(c, {}).items())
                # Milliseconds over plain. With a negligible model (width 64, 16 tokens) they are
                # the case's host work, what a GPU cannot hide (see "Host time" in the README).
                # Outside: host time before the first transformer call and after the last, over
                # plain's (a GPU idles through it; "Host time" in the README).
                print(f"  {c:<24} {t:8.3f}s  x{t / plain_t:6.3f} {1e3 * (t - plain_t):+8.2f} ms  "
                      f"outside {1e3 * (out - plain_out):+7.2f} ms   {mem_txt}  {extra}")
    if args.json:
        from massact_nn._io import save_json

        save_json(args.json, rows)
    if args.ops:
        return
    summarise(rows, bench.width)
    at = [r for r in rows if r["case"] == "stats" and r["tokens"] == 1024]
    if at:
        print(f"stats/plain at 1024 tokens: {at[0]['time_ratio']:.3f}")


if __name__ == "__main__":
    main()
