"""The seed study's four observations on constructed results with a known answer: the study's
pattern planted (every item agrees), its opposite (disagrees), seeds of opposite sign and one
seed (inconclusive)."""

from types import SimpleNamespace

import numpy as np
import pytest

from alignkit.analyses import observations as obs
from alignkit.stats import Band

L = 12
LABELS = ["embed", *map(str, range(L))]


def _cka(curve, matrix, noise=0.01):
    """A stand-in CKAResult: the final layerwise curve over embed + 12 layers, the cross-layer
    matrix and a flat permutation baseline."""
    curve = np.asarray(curve, dtype=float)
    return SimpleNamespace(labels=LABELS, final=lambda: curve, noise_classic=np.full(L + 1, noise),
                           matrix=np.asarray(matrix, dtype=float), chance=np.full((L + 1,) * 2, 0.1))


def _seed_pattern(jitter):
    """Stable through layer 3, a drop into layer 5, then a steady fall; early rows diagonal,
    later base rows matching the tuned layer above them best."""
    curve = np.r_[1.0, [1.0 - jitter / 5] * 4, 0.97, np.r_[0.8, 0.78, 0.75, 0.7, 0.65, 0.6,
                                                           0.55] - jitter]
    m = np.full((L + 1, L + 1), 0.3)
    for i in range(L + 1):
        m[i, i] = 0.9 if i <= 4 else 0.6
        if i > 4:
            m[i, min(i + 1, L)] = 0.8 + jitter
    return curve, m


def _spectral(delta):
    d = np.asarray(delta, dtype=float)
    return SimpleNamespace(labels=LABELS, delta=lambda metric: Band(d, d, d))


def _patching(flips_frac, control_frac, n=8, gap=2.0):
    def sweep(set_="flips"):
        f = np.asarray(flips_frac if set_ == "flips" else control_frac, dtype=float)
        return SimpleNamespace(delta=np.tile(f * gap, (n, 1)), lp_donor=np.full(n, gap),
                               lp_receiver=np.zeros(n))
    return SimpleNamespace(sweep=sweep)


def _seeds(n, sign=+1):
    out = []
    for s in range(n):
        j = 0.01 * s
        curve, m = _seed_pattern(j)
        rank = sign * np.r_[0.0, [0.1] * 4, [0.5] * 4, [2.0 + j] * 4]
        frac = sign * np.r_[[0.05 + j] * 4, [-0.2 - j] * 4, [0.9] * 4]
        out.append((_cka(curve, m), _spectral(rank), _patching(frac, 0.8 * frac)))
    return [list(x) for x in zip(*out)]


def test_thirds_split_the_decoder():
    early, mid, late = obs.thirds(12)
    assert (early.tolist(), mid.tolist(), late.tolist()) == ([0, 1, 2, 3], [4, 5, 6, 7],
                                                             [8, 9, 10, 11])
    assert [len(t) for t in obs.thirds(30)] == [10, 10, 10]
    with pytest.raises(ValueError, match="thirds"):
        obs.thirds(2)


def test_the_planted_seed_pattern_agrees_item_by_item():
    rows = obs.table(*_seeds(3))
    assert {r.item.name: r.verdict for r in rows} == {r.item.name: "agrees" for r in rows}
    assert obs.observation_verdicts(rows) == {1: "agrees", 2: "agrees", 3: "agrees",
                                              4: "agrees"}
    late = next(r for r in rows if r.item.value is obs.late_patch)
    assert late.per_seed == pytest.approx([0.9] * 3) and np.mean(late.controls) == \
        pytest.approx(0.72)
    text = obs.summarize(rows)
    assert "| 1. Early layers stable" in text and "4. **agrees**" in text
    assert text.count("| agrees |") == len(obs.ITEMS)


def test_the_opposite_pattern_disagrees_and_one_seed_decides_nothing():
    rows = obs.table(*_seeds(3, sign=-1))
    verdicts = {r.item.value.__name__: r.verdict for r in rows}
    assert verdicts["late_rank_rise"] == verdicts["late_patch"] == "disagrees"
    assert verdicts["mid_dip"] == "disagrees"
    assert obs.observation_verdicts(rows)[3] == "disagrees"
    one = obs.table(*[x[:1] for x in _seeds(3)])
    assert {r.verdict for r in one} == {"inconclusive (1 seed)"}
    assert "inconclusive (1 seed)" in obs.summarize(one)


def test_seeds_of_opposite_sign_are_inconclusive():
    up, down = _seeds(2), _seeds(1, sign=-1)
    rows = obs.table(*[a + b for a, b in zip(up, down)])
    r = next(r for r in rows if r.item.value is obs.late_rank_rise)
    assert r.verdict == "inconclusive (3 seeds)"
    assert r.per_seed == pytest.approx([2.0, 2.01, -2.0])


def test_an_early_transition_is_not_a_mid_one():
    """The embedded model's pattern: the steepest drop is into layer 0."""
    cka, spec, pat = _seeds(3)
    for c in cka:
        curve = c.final().copy()
        curve[1:] -= 0.3  # everything drops into layer 0
        c.final = lambda curve=curve: curve
    rows = obs.table(cka, spec, pat)
    verdicts = {r.item.value.__name__: r.verdict for r in rows}
    assert verdicts["mid_transition"] == "disagrees"
    assert verdicts["early_within_noise"] == "disagrees"


def test_table_needs_one_result_of_each_per_seed():
    cka, spec, pat = _seeds(2)
    with pytest.raises(ValueError, match="one CKA, spectral and patching result per seed"):
        obs.table(cka, spec, pat[:1])
