"""Side-by-side benchmark: alignkit.cka.cka_matrix against a naive loop and PyPI peers.

Problem: two stacks of L = 28 layers x n = 512 examples x d = 1024 features (float32, CPU),
correlated across depth and between the stacks, the size of a Qwen3-0.6B comparison. Every
implementation runs in this one process with ``torch.set_num_threads(2)``: other jobs may share
the machine, so the ratios within one run are what count, not the absolute seconds.

Timing: after a warm-up of every implementation on a 2-layer slice, ``--repeats`` (default 7)
interleaved rounds, each running every implementation once in an order shuffled with a fixed-seed
RNG (``time.perf_counter``), so that load from other jobs falls on a whole round alike. Reported
for each implementation: time = median of N interleaved rounds (min–max); time relative to ours
for the same estimator = median over rounds of the per-round ratio (min–max); and max |error|
against a float64 reference matrix computed once with an independent direct formula (explicit
centring matrix ``H K H`` for the biased estimator; Song et al.'s unbiased HSIC written out for
the debiased one). A target counts as met only when the whole min–max range of the per-round
ratio clears it ("not shown met (range a–b)" otherwise). Then small checks of each peer's known
defects: scale invariance, clamping of negative debiased values, and what the object-style APIs
do with several batches.

Peers (benchmark-only extras, see benchmarks/requirements.txt): ``pytorch-cka`` (module ``cka``),
``torch-cka`` (module ``torch_cka``), ``ckatorch``. The object-style APIs want models and
dataloaders; they get a trivial ``nn.Module`` whose submodule ``layers.i`` returns the stored
activations of layer ``i`` for the example indices in the batch.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_cka.py [--repeats 7]

It prints a markdown report and writes it to benchmarks/RESULTS_cka.md (``--no-write`` to skip).
``--quick`` shrinks the problem to L = 3, n = 64, d = 32 on one thread (a check that the script
runs, not a measurement; it never writes the file).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alignkit import cka as ak

L, N, D = 28, 512, 1024
QUICK = 3, 64, 32  # --quick: L, n, d
RESULTS = Path(__file__).with_name("RESULTS_cka.md")
KEPT = "\n## Measured by hand"


# ------------------------------------------------------------------------------------------
# Data and reference
# ------------------------------------------------------------------------------------------


def make_acts(n_layers: int = L, n: int = N, d: int = D, seed: int = 0):
    """Two correlated float32 stacks ``[n_layers, n, d]``: an AR(1) walk over depth for the base,
    and base + noise growing with depth for the 'tuned' model."""
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(n_layers, n, d)
    a[0] = torch.randn(n, d, generator=g)
    for layer in range(1, n_layers):
        a[layer] = 0.8 * a[layer - 1] + 0.6 * torch.randn(n, d, generator=g)
    noise = torch.linspace(0.2, 1.5, n_layers)[:, None, None]
    b = a + noise * torch.randn(n_layers, n, d, generator=g)
    return a.contiguous(), b.contiguous()


def reference_matrix(a: torch.Tensor, b: torch.Tensor, debiased: bool) -> np.ndarray:
    """Float64 numpy reference, written directly from the definitions (independent of alignkit).

    Biased: ``<H K H, H L H> / (||H K H|| ||H L H||)`` with the explicit centring matrix ``H``.
    Debiased: Song et al. (2012)
    ``HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
    """
    n = a.shape[1]
    h = np.eye(n) - np.ones((n, n)) / n

    def grams(stack):
        out = []
        for x in stack.numpy().astype(np.float64):
            k = x @ x.T
            if debiased:
                np.fill_diagonal(k, 0.0)
            else:
                k = h @ k @ h
            out.append(k)
        return np.stack(out)

    ka, kb = grams(a), grams(b)
    fa, fb = ka.reshape(len(ka), -1), kb.reshape(len(kb), -1)
    if not debiased:
        cross = fa @ fb.T
        return cross / np.sqrt(np.outer((fa * fa).sum(1), (fb * fb).sum(1)))

    def hsic1(fx, fy, rx, ry, tx, ty):
        tr = fx @ fy.T
        return (tr + np.outer(tx, ty) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rx @ ry.T)) / (
            n * (n - 3))

    ra, rb = ka.sum(2), kb.sum(2)  # K~ 1, [L, n]
    ta, tb = ra.sum(1), rb.sum(1)  # 1' K~ 1
    cross = hsic1(fa, fb, ra, rb, ta, tb)
    self_a = np.diag(hsic1(fa, fa, ra, ra, ta, ta))
    self_b = np.diag(hsic1(fb, fb, rb, rb, tb, tb))
    return cross / np.sqrt(np.outer(self_a, self_b))


# ------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------


def naive_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Straightforward per-pair biased linear CKA: Grams recomputed for every pair (fp32 torch)."""
    k, l = x @ x.T, y @ y.T

    def centre(g):
        return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()

    kc, lc = centre(k), centre(l)
    return float((kc * lc).sum() / (kc.norm() * lc.norm()))


def naive_loop(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([[naive_cka(a[i], b[j]) for j in range(len(b))] for i in range(len(a))])


class _Emit(nn.Module):
    """A 'layer' that returns stored activations ``acts[idx]`` (optionally as ``[1, n, d]``)."""

    def __init__(self, acts: torch.Tensor, unsqueeze: bool):
        super().__init__()
        self.acts, self.unsqueeze = acts, unsqueeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.acts[x]
        return out.unsqueeze(0) if self.unsqueeze else out


class ActsModel(nn.Module):
    """Trivial model for hook-based CKA libraries: ``layers.i`` emits layer ``i``'s activations
    for the example indices ``x`` of the batch."""

    def __init__(self, stack: torch.Tensor, unsqueeze: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(_Emit(s, unsqueeze) for s in stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer(x)
        return x

    def names(self) -> list[str]:
        return [f"layers.{i}" for i in range(len(self.layers))]


def index_loader(n: int, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=False)


@contextlib.contextmanager
def quiet():
    """Silences the peers' tqdm bars, prints and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def peer_pytorch_cka_functional(a, b):
    import cka as pcka  # pytorch-cka
    return pcka.cka_from_features(a, b).numpy().astype(np.float64)


def peer_pytorch_cka_object(a, b, batch_size=None):
    import cka as pcka
    m1, m2 = ActsModel(a), ActsModel(b)
    with quiet():
        out = pcka.compute_cka(m1, m2, index_loader(a.shape[1], batch_size or a.shape[1]),
                               layers=m1.names(), model2_layers=m2.names(), device="cpu",
                               progress=False)[0]
    return out.numpy().astype(np.float64)


def peer_torch_cka(a, b, batch_size=None):
    from torch_cka import CKA
    m1, m2 = ActsModel(a), ActsModel(b)
    with quiet():
        obj = CKA(m1, m2, model1_name="base", model2_name="tuned", model1_layers=m1.names(),
                  model2_layers=m2.names(), device="cpu")
        obj.compare(index_loader(a.shape[1], batch_size or a.shape[1]))
    return obj.export()["CKA"].numpy().astype(np.float64)


def peer_ckatorch_object(a, b, batch_size=None):
    from ckatorch import CKA
    m1, m2 = ActsModel(a, unsqueeze=True), ActsModel(b, unsqueeze=True)
    with quiet():
        obj = CKA(m1, m2, layers=m1.names(), first_name="base", second_name="tuned",
                  device="cpu")
        out = obj(index_loader(a.shape[1], batch_size or a.shape[1]), epochs=1)
    return out.numpy().astype(np.float64)


def peer_ckatorch_base_loop(a, b, unbiased=False):
    from ckatorch import cka_base
    return np.array([[float(cka_base(a[i], b[j], unbiased=unbiased)) for j in range(len(b))]
                     for i in range(len(a))])


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


def interleaved(fns: dict, repeats: int, seed: int = 0) -> tuple[dict, dict]:
    """Seconds of every ``fns[key]()`` in each of ``repeats`` rounds, and its last output.

    A round runs every function once, in an order shuffled with a fixed-seed RNG, so that load from
    other jobs falls on all implementations of a round alike (per-round ratios cancel it)."""
    rng = random.Random(seed)
    order = list(fns)
    times: dict = {key: [] for key in fns}
    outs: dict = {}
    for _ in range(repeats):
        rng.shuffle(order)
        for key in order:
            t0 = time.perf_counter()
            outs[key] = fns[key]()
            times[key].append(time.perf_counter() - t0)
    return times, outs


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def per_round(times: list[float], ref: list[float]) -> list[float]:
    """Ratio of two implementations' times round by round."""
    return [t / r for t, r in zip(times, ref)]


def fmt_spread(xs: list[float], spec: str = ".3f") -> str:
    """``median (min–max)`` of per-round values."""
    return f"{median(xs):{spec}} ({min(xs):{spec}}–{max(xs):{spec}})"


def verdict(ratios: list[float], threshold: float) -> str:
    """'met' only when every round's ratio is at least ``threshold``, with the range either way."""
    met = "met" if min(ratios) >= threshold else "not shown met"
    return f"{met} (range {min(ratios):.2f}–{max(ratios):.2f})"


def fmt_err(e: float) -> str:
    return f"{e:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS_cka.md")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true",
                        help=f"L, n, d = {QUICK} on one thread, to check that it runs (no write)")
    args = parser.parse_args()

    threads = 1 if args.quick else 2
    n_layers, n, d = QUICK if args.quick else (L, N, D)
    torch.set_num_threads(threads)
    load0 = os.getloadavg()
    a, b = make_acts(n_layers, n, d)
    t0 = time.perf_counter()
    ref = {False: reference_matrix(a, b, False), True: reference_matrix(a, b, True)}
    t_ref = time.perf_counter() - t0

    peers = {"cka": "pytorch-cka", "torch_cka": "torch-cka", "ckatorch": "ckatorch"}
    have = {mod: available(mod) for mod in peers}
    versions = {}
    for mod, dist in peers.items():
        if have[mod]:
            from importlib.metadata import version
            versions[dist] = version(dist)

    # name, estimator, entry point, fn, run?
    impls = [
        ("alignkit `cka_matrix`", "biased", "`cka_matrix(a, b)` (fp32 Grams, fp64 HSIC)",
         lambda x, y: ak.cka_matrix(x, y), True),
        ("alignkit `cka_matrix`", "debiased", "`cka_matrix(a, b, debiased=True)`",
         lambda x, y: ak.cka_matrix(x, y, debiased=True), True),
        ("alignkit `cka_matrix`, fp64 Grams", "biased", "`gram_dtype=torch.float64`",
         lambda x, y: ak.cka_matrix(x, y, gram_dtype=torch.float64), True),
        ("naive double loop", "biased", "per-pair fp32 CKA, Grams recomputed each pair",
         naive_loop, True),
        ("pytorch-cka", "debiased", "`cka.cka_from_features(a, b)`",
         peer_pytorch_cka_functional, have["cka"]),
        ("pytorch-cka", "debiased", "`cka.compute_cka(m1, m2, loader)` (hooks, 1 batch)",
         peer_pytorch_cka_object, have["cka"]),
        ("torch-cka", "debiased", "`torch_cka.CKA(m1, m2).compare(loader)` (1 batch)",
         peer_torch_cka, have["torch_cka"]),
        ("ckatorch", "debiased", "`ckatorch.CKA(m1, m2, layers)(loader, epochs=1)` (1 batch)",
         peer_ckatorch_object, have["ckatorch"]),
        ("ckatorch", "biased", f"`ckatorch.cka_base(x, y)` in a {n_layers} x {n_layers} loop",
         peer_ckatorch_base_loop, have["ckatorch"]),
    ]
    rows = time_all(impls, a, b, ref, args.repeats)

    targets = summarise_targets(rows)
    defects = defect_checks(have)
    load1 = os.getloadavg()

    lines = [
        "# CKA benchmark: alignkit vs a naive loop vs PyPI peers",
        "",
        f"Produced by `benchmarks/bench_cka.py` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, `torch.set_num_threads({threads})`, Python "
        f"{platform.python_version()}. Peers: "
        + (", ".join(f"{k} {v}" for k, v in versions.items()) or "none installed") + ".",
        f"Load average {load0[0]:.1f} at start, {load1[0]:.1f} at end (other jobs share the "
        "2 cores: read the ratios, not the seconds).",
        "",
        f"Problem: L = {n_layers} layers x n = {n} examples x d = {d} features, two correlated "
        f"float32 stacks, full {n_layers} x {n_layers} CKA matrix. Time = median of "
        f"{args.repeats} interleaved rounds (min–max) after a warm-up; each round runs every "
        "implementation once, in a shuffled order. 'x ours' = median over rounds of time / "
        "alignkit's time for the same estimator in the same round (min–max): load that hits a "
        "whole round cancels. A target counts as met only when the whole min–max range clears "
        "it. Error = max |CKA - float64 reference| over the "
        f"{n_layers * n_layers} entries (reference: explicit "
        f"`H K H` / Song et al. formula in numpy float64, computed once in {t_ref:.1f} s).",
        "",
        f"The debiased reference has {int((ref[True] < 0).sum())} of {ref[True].size} entries "
        f"below 0 (min {ref[True].min():.4f}: distant layers are nearly unrelated), hence the "
        "last column, which leaves them out.",
        "",
        "| implementation | estimator | entry point | time (s), median (min–max) "
        "| x ours, median (min–max) | max abs error | max abs error where ref >= 0 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, est, entry, t, ratio, err, err_pos in rows:
        if t is None:
            lines.append(f"| {name} | {est} | {entry} | not installed | | | |")
        else:
            lines.append(f"| {name} | {est} | {entry} | {fmt_spread(t)} | "
                         f"{fmt_spread(ratio, '.2f')} | {fmt_err(err)} | {fmt_err(err_pos)} |")
    lines += [""] + targets + ["", "## Defect checks", ""] + defects
    report = "\n".join(lines) + "\n"
    print(report)
    if not (args.no_write or args.quick):  # sections from KEPT on were written by hand: keep them
        old = RESULTS.read_text() if RESULTS.exists() else ""
        RESULTS.write_text(report + NOTES + (old[old.index(KEPT):] if KEPT in old else ""))


def time_all(impls: list, a, b, ref: dict, repeats: int) -> list[tuple]:
    """Rows ``(name, estimator, entry, times, ratios, err, err_pos)`` of every implementation:
    per-round seconds, per-round time / ours for the same estimator, and the errors of the last
    round's output against the reference (``None`` fields for peers that are not installed)."""
    fns = {i: (lambda fn=fn: fn(a, b)) for i, (*_, fn, run) in enumerate(impls) if run}
    for i in fns:
        impls[i][3](a[:2], b[:2])  # warm-up on a 2-layer slice (allocator, kernels, lazy imports)
    times, outs = interleaved(fns, repeats)
    ours = {impls[i][1]: times[i] for i in fns if impls[i][0] == "alignkit `cka_matrix`"}
    rows = []
    for i, (name, est, entry, _, run) in enumerate(impls):
        if not run:
            rows.append((name, est, entry, None, None, None, None))
            continue
        out, r = np.asarray(outs[i], dtype=np.float64), ref[est == "debiased"]
        err = float(np.abs(out - r).max())
        err_pos = float(np.abs(out - r)[r >= 0].max())
        rows.append((name, est, entry, times[i], per_round(times[i], ours[est]), err, err_pos))
        print(f"  {name} [{est}]: {fmt_spread(times[i])} s, err {err:.1e}", file=sys.stderr)
    return rows


def summarise_targets(rows: list) -> list[str]:
    """The brief's targets, checked on this run's per-round numbers: a target is met only when
    every round's ratio clears it; a peer 'fastest' by its median time."""
    ours = {r[1]: r for r in rows if r[0] == "alignkit `cka_matrix`"}
    naive = next((r for r in rows if r[0] == "naive double loop"), None)
    peers = [r for r in rows if r[3] is not None and not r[0].startswith(("alignkit", "naive"))
             and "diagnostic" not in r[0]]
    correct = [r for r in peers if r[5] <= 1e-6]
    out = ["**Targets on this run** (ratios: median over rounds (min–max)).", ""]
    if naive is not None:
        speedup = naive[4]  # naive / ours (biased), round by round
        out.append(f"- ours vs the naive loop (biased): median {median(speedup):.2f}x faster; "
                   f">= 2x target: {verdict(speedup, 2.0)}.")
    if correct:
        best = min(correct, key=lambda r: median(r[3]))
        out.append(f"- fastest correct peer (max error <= 1e-6): {best[0]} ({best[1]}, "
                   f"{best[2]}) at {fmt_spread(best[3])} s = {fmt_spread(best[4], '.1f')}x our "
                   "time for that estimator.")
    if peers:
        fastest = min(peers, key=lambda r: median(r[3]))
        out.append(f"- fastest peer regardless of error: {fastest[0]} ({fastest[2]}) at "
                   f"{fmt_spread(fastest[3])} s = {fmt_spread(fastest[4], '.2f')}x our time, max "
                   f"error {fmt_err(fastest[5])}.")
    worst = max(r[5] for r in ours.values())
    out.append(f"- our max error against the float64 reference: {fmt_err(worst)} "
               f"({'meets' if worst <= 1e-6 else 'misses'} the <= 1e-6 target).")
    return out


def _cell(fn: Callable[[], np.ndarray], base: np.ndarray) -> str:
    """max |fn() - base| formatted, or what went wrong."""
    try:
        with quiet():
            out = fn()
    except Exception as exc:  # a peer failing is a result here, not a crash of the benchmark
        return f"fails ({type(exc).__name__})"
    if not np.isfinite(out).all():
        return "NaN/Inf"
    return fmt_err(float(np.abs(out - base).max()))


SCALES = (1e-3, 1e3, 1e-12, 1e9)


def defect_checks(have: dict[str, bool]) -> list[str]:
    """Scale invariance, clamping, and multi-batch behaviour of every implementation."""
    a, b = make_acts(3, 256, 64, seed=1)
    g = torch.Generator().manual_seed(2)
    ind_a, ind_b = torch.randn(4, 64, 32, generator=g), torch.randn(4, 64, 32, generator=g)
    funcs = {"alignkit `cka_matrix` (debiased)": lambda x, y: ak.cka_matrix(x, y, debiased=True),
             "alignkit `cka_matrix` (biased)": lambda x, y: ak.cka_matrix(x, y)}
    batched = {}
    if have["cka"]:
        funcs["pytorch-cka `cka_from_features`"] = peer_pytorch_cka_functional
        batched["pytorch-cka `compute_cka`"] = peer_pytorch_cka_object
    if have["torch_cka"]:
        funcs["torch-cka `CKA.compare`"] = peer_torch_cka
        batched["torch-cka `CKA.compare`"] = peer_torch_cka
    if have["ckatorch"]:
        funcs["ckatorch `CKA.__call__`"] = peer_ckatorch_object
        batched["ckatorch `CKA.__call__`"] = peer_ckatorch_object
        funcs["ckatorch `cka_base` (biased)"] = peer_ckatorch_base_loop
        funcs["ckatorch `cka_base` (debiased)"] = lambda x, y: peer_ckatorch_base_loop(x, y, True)
    ref_ind = reference_matrix(ind_a, ind_b, True)
    lines = [
        "**Scale and clamping.** Scale columns: max |CKA(s * a, b) - CKA(a, b)| on float32 "
        "activations (L = 3, n = 256, d = 64); exact scale invariance gives round-off only. "
        "'min on independent data': smallest entry of the 4 x 4 debiased matrix of two "
        f"independent Gaussian stacks (n = 64, d = 32), where the float64 reference has "
        f"{int((ref_ind < 0).sum())} of 16 entries below 0 (min {ref_ind.min():.4f}); a value "
        "of exactly 0 there means negatives were clamped.",
        "",
        "| implementation | " + " | ".join(f"scale {s:.0e}" for s in SCALES)
        + " | min on independent data |",
        "|---|" + "---:|" * (len(SCALES) + 1),
    ]
    for name, fn in funcs.items():
        base = fn(a, b)
        cells = [_cell(lambda s=s: fn(a * s, b), base) for s in SCALES]
        with quiet():
            low = float(np.min(fn(ind_a, ind_b)))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {low:.4f} |")
    lines += [
        "",
        "**Batches.** The batched entry points fed the same 256 rows as 2 batches of 128: "
        "'diff to full' = max |batched - one batch of all 256 rows|, 'diff to last batch' = "
        "max |batched - the second batch alone|. 0 in the last column means only the last "
        "batch counts.",
        "",
        "| implementation | diff to full | diff to last batch |",
        "|---|---:|---:|",
    ]
    for name, fn in batched.items():
        with quiet():
            full = fn(a, b)
            two = fn(a, b, batch_size=128)
            last = fn(a[:, 128:], b[:, 128:])
        lines.append(f"| {name} | {fmt_err(float(np.abs(two - full).max()))} | "
                     f"{fmt_err(float(np.abs(two - last).max()))} |")
    return lines


NOTES = """
## What each implementation does (from reading its source) and the defects found

- **alignkit** (`alignkit.cka.cka_matrix`): one Gram matrix per layer, formed and stored in fp32
  on column-centred data (the symmetric product skips a quarter of the flops; the diagonal is
  zeroed for the debiased estimator). Each HSIC comes from four sums: the traces `tr(KL)` of all
  pairs as one `[L_a, n*n] x [n*n, L_b]` product accumulated in float64 (column chunks), and
  `1'K1`, `1'KL1` from float64 row sums. Its Grams take about as long as pytorch-cka's single fp32
  `bmm`; the float64 accumulation is what it pays for an error of ~1e-8 instead of ~1e-6 plus
  clamping. With `gram_dtype=torch.float64` the Grams are float64 too: error ~1e-14 for roughly
  2x the time. No clamp, no epsilon; activations far from unit scale are rescaled before the fp32
  matmul, so the scale columns stay at round-off.
- **naive double loop**: a straightforward per-pair fp32 CKA that recomputes both Grams for each
  of the 784 pairs (centring the fp32 Gram rather than the data costs it ~1e-5 of accuracy).
- **pytorch-cka 1.1.3** (module `cka`): always the debiased (Song et al.) estimator.
  `cka_from_features(a, b)` takes activation stacks directly and is the fastest peer. Results
  are **clamped to [0, 1]** (`torch.clamp(hsic_xy / denom, min=0.0, max=1.0)`): every negative
  debiased value comes out as exactly 0, which is where its large max error comes from (the
  negative entries of the 28 x 28 matrix). On the other entries its error is fp32 round-off of
  a different kind from ours: the Grams are `X X^T` of *uncentred* features and the HSIC terms
  are fp32 `einsum`s over the n^2 = 262,144 entries with the (dominant) diagonal subtracted
  afterwards, with no float64 accumulation anywhere. The denominator gets an **epsilon**,
  `torch.where(denom == 0, 1e-6, denom)`: it only bites when the fp32 product of the two
  self-HSICs underflows to 0 (activations of scale <= ~1e-11, the scale-1e-12 column), where it
  returns values off by ~1; at ordinary scales scale invariance holds to fp32 round-off. The
  hook-based `compute_cka` sums per-batch HSICs over batches (the minibatch CKA of Nguyen et
  al.), which differs from full-data CKA.
- **torch-cka 0.21**: only an object API that wants two models and dataloaders (driven here by a
  trivial module whose submodule `layers.i` returns the stored activations of layer `i` for the
  batch's example indices). For every pair (i, j) it recomputes model 2's Gram and evaluates
  the unbiased HSIC with `K @ L` and `L @ L`, n^3 matmuls, in fp32: accurate (~1e-7) but slow.
  HSICs are averaged over batches (minibatch CKA, not full-data CKA). No clamp, no epsilon, but
  fp32 overflows: NaN (its own assertion fires) at activation scale 1e9 and Inf at 1e-12. Its
  hooks are registered at construction and never removed.
- **ckatorch 1.0.3**: `CKA.__call__` assigns `cka_epoch[i, j] = cka_batch(x, y)` inside the
  batch loop, so it **keeps only the last batch** (batch table: the two-batch result equals the
  last batch alone). `cka_batch` expects features `[batch, tokens, hidden]` and builds one Gram
  over dim 1 per leading index, so the wrapper emits `[1, n, d]` (the whole probe set as one
  "sequence") to get CKA across examples. Everything runs in float64 with three n^3 `bmm`s per
  pair: accurate, and the slowest here. `cka_base(x, y, unbiased=...)` is a correct per-pair
  float64 function (Kornblith et al.'s centring) that recomputes both Grams for every pair.

All three peers could be made to produce the 28 x 28 matrix from precomputed activations.
Matching the known defects listed in NOTES.md: the object that keeps only the last batch is
ckatorch's `CKA`; the clamp to [0, 1] is pytorch-cka's; the scale-breaking epsilon is also
pytorch-cka's (a fallback that only fires on fp32 underflow). Averaging per-batch HSICs
(pytorch-cka `compute_cka`, torch-cka) is a documented minibatch estimator, but it is not the
full-data CKA.
"""

if __name__ == "__main__":
    main()
