"""What changed, not only where: the activation-difference lens (after Minder et al. 2025,
arXiv:2510.13900) and per-token KL, one ``[rows, vocab]`` slice of logits at a time.
Formulas, controls and pitfalls: docs/measures.md#difference-lens-and-per-token-kl"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit import models
from alignkit.evaluate import answer_logp


def chunk_rows(vocab: int, budget: int = 2**25) -> int:
    """Rows of ``[rows, vocab]`` logits per step so that one step holds ``budget`` floats."""
    return max(1, budget // max(1, vocab))


@torch.no_grad()
def lens_logits(model: torch.nn.Module, diff: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[n, vocab]`` float64: each row of ``diff [n, d_model]`` through the final norm and head."""
    p = next(model.parameters())
    d = torch.as_tensor(np.asarray(diff), device=p.device).to(p.dtype)
    if d.ndim != 2 or d.shape[1] != model.config.hidden_size:
        raise ValueError(f"diff must be [n, d_model={model.config.hidden_size}], got "
                         f"{tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("diff contains NaN or Inf")
    out = [models.head_logits(model, models.part(model, "norm")(d[i: i + 1])).double()
           for i in range(len(d))]
    return torch.cat(out).cpu().numpy()


def token_text(tokenizer, token_id: int) -> str:
    """A token as text: decoded, or its vocabulary piece where decoding alone gives U+FFFD."""
    text = tokenizer.decode([int(token_id)])
    return text if "\ufffd" not in text else tokenizer.convert_ids_to_tokens(int(token_id))


def top_tokens(logits: np.ndarray, tokenizer, k: int = 10) -> list[dict[str, list]]:
    """Per row of ``logits [n, vocab]``: ``{"promoted": [(token, z)], "suppressed": [...]}``, the
    ``k`` highest and lowest tokens (decoded) with their logits' z-scores within the row."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2 * k:
        raise ValueError(f"logits must be [n, vocab >= {2 * k}], got {logits.shape}")
    n_tok = len(tokenizer)
    out = []
    for row in logits:
        row = row[:n_tok]  # padded vocabulary rows map to no token
        z = (row - row.mean()) / row.std()
        order = np.argsort(-z, kind="stable")
        pick = {"promoted": order[:k], "suppressed": order[::-1][:k]}
        out.append({side: [(token_text(tokenizer, i), float(z[i])) for i in idx]
                    for side, idx in pick.items()})
    return out


def token_kl(reference: torch.nn.Module, tuned: torch.nn.Module, tokenizer, texts: Sequence[str],
             batch_size: int = 8, progress: bool = True) -> list[np.ndarray]:
    """Per text, ``[n_tokens]`` float64: at position ``t``, ``KL(P_tuned || P_reference)`` of the
    next-token distributions given tokens ``0..t``. ValueError unless both models share device,
    class and shape; for no text, an empty text, or NaN logits."""
    models.check_same_shape(reference, tuned, ("reference", "tuned"))
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("token_kl needs at least one text")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    empty = [i for i, s in enumerate(ids) if not s]
    if empty:
        raise ValueError(f"text {empty[0]} has no tokens")
    device = models.input_device(reference)
    rows = chunk_rows(reference.config.vocab_size)
    out: list[np.ndarray] = [np.zeros(0)] * len(texts)
    batches = models.by_length([len(s) for s in ids], batch_size)
    with models.eval_mode(reference, tuned):
        for idx in tqdm(batches, desc="token KL", leave=False, disable=not progress):
            x, mask = models.pad([ids[i] for i in idx], models.pad_id(tokenizer))
            x, mask = x.to(device), mask.long().to(device)
            hs = [models.decoder(m)(input_ids=x, attention_mask=mask,
                                    use_cache=False).last_hidden_state for m in (reference, tuned)]
            b, p = mask.nonzero(as_tuple=True)
            kl = torch.empty(len(b), dtype=torch.float64)
            for a in range(0, len(b), rows):
                sl = slice(a, a + rows)
                lq, lp = (answer_logp(m, h, b[sl], p[sl]) for m, h in zip((reference, tuned), hs))
                lp = lp.to(lq.device)
                if not (torch.isfinite(lq).all() and torch.isfinite(lp).all()):
                    raise ValueError("NaN or Inf in the models' logits")
                kl[sl] = torch.where(lp > -torch.inf, lp.exp() * (lp - lq), 0.0).sum(-1).cpu()
            b = b.cpu()
            for r, i in enumerate(idx):
                out[i] = kl[b == r].numpy()
    return out


def rank_positions(kls: Sequence[np.ndarray], tokenizer, texts: Sequence[str], top: int = 20,
                   context: int = 6) -> list[dict]:
    """The ``top`` positions of a probe set by per-token KL, largest first: ``text`` (index),
    ``pos``, ``kl``, ``token`` (the token read there), ``next`` (the token that follows, or ""),
    ``context`` (the ``context`` tokens up to and including it)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    flat = [(float(v), i, t) for i, k in enumerate(kls) for t, v in enumerate(k)]
    if len(kls) != len(ids) or any(len(k) != len(s) for k, s in zip(kls, ids)):
        raise ValueError("kls do not match the texts' tokenisation: pass token_kl's output for "
                         "these texts and this tokenizer")
    return [{"text": i, "pos": t, "kl": v, "token": token_text(tokenizer, ids[i][t]),
             "next": token_text(tokenizer, ids[i][t + 1]) if t + 1 < len(ids[i]) else "",
             "context": tokenizer.decode(ids[i][max(0, t - context + 1): t + 1])}
            for v, i, t in sorted(flat, key=lambda r: -r[0])[:top]]
