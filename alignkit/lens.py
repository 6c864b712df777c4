"""What changed, not only where: the activation-difference lens and per-token KL.

* **Difference lens** (after Minder et al. 2025, "Narrow finetuning leaves clearly readable traces
  in activation differences", arXiv:2510.13900): the mean tuned - reference residual difference
  after each layer (``patching.mean_difference``) read as a residual is read at the end of the
  model, ``head(final_norm(d))`` (``lens_logits``), with the reference's norm and head or the
  tuned one's: the tokens it promotes and suppresses (``top_tokens``). RMSNorm makes the reading
  independent of the difference's scale. Whether the difference *does* something is
  ``patching.weight_sweep``'s ``"steer"`` (added back to the reference) against
  ``"steer_shuffled"`` (its coordinates permuted: same norm, random direction).
* **Per-token KL** (``token_kl``): at every position of a text, ``KL(P_tuned || P_reference)``
  between the two models' next-token distributions, float64, in nats: where post-training acts.
  ``rank_positions`` ranks the positions of a probe set.

Memory beyond the decoder is one ``[rows, vocab]`` slice at a time, so Qwen's 151,936-token
vocabulary fits (``chunk_rows``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit.models import (
    check_same_shape,
    check_same_tokenizer,
    decoder,
    head_logits,
    input_device,
    part,
)


def chunk_rows(vocab: int, budget: int = 2**25) -> int:
    """Rows of ``[rows, vocab]`` logits per step so that one step holds ``budget`` floats."""
    return max(1, budget // max(1, vocab))


@torch.no_grad()
def lens_logits(model: torch.nn.Module, diff: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[n, vocab]`` float64: each row of ``diff [n, d_model]`` read through ``model``'s final norm
    and LM head (soft-cap included where the family has one)."""
    p = next(model.parameters())
    d = torch.as_tensor(np.asarray(diff), device=p.device).to(p.dtype)
    if d.ndim != 2 or d.shape[1] != model.config.hidden_size:
        raise ValueError(f"diff must be [n, d_model={model.config.hidden_size}], got "
                         f"{tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("diff contains NaN or Inf")
    out = [head_logits(model, part(model, "norm")(d[i: i + 1])).double()
           for i in range(len(d))]
    return torch.cat(out).cpu().numpy()


def token_text(tokenizer, token_id: int) -> str:
    """A token as text: decoded, or its vocabulary piece where decoding one byte-level token on
    its own gives no character (part of a multi-byte character, shown as U+FFFD)."""
    text = tokenizer.decode([int(token_id)])
    return text if "\ufffd" not in text else tokenizer.convert_ids_to_tokens(int(token_id))


def top_tokens(logits: np.ndarray, tokenizer, k: int = 10) -> list[dict[str, list]]:
    """Per row of ``logits [n, vocab]``: ``{"promoted": [(token, z)], "suppressed": [...]}``, the
    ``k`` highest and lowest tokens with their logits standardised within the row (z-scores:
    how far above the row's other tokens a token stands). Tokens are decoded strings."""
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


@torch.no_grad()
def token_kl(reference: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
             texts: Sequence[str], batch_size: int = 8, tuned_tokenizer=None,
             progress: bool = True) -> list[np.ndarray]:
    """Per text, ``[n_tokens]`` float64: at position ``t``, ``KL(P_tuned || P_reference)`` of the
    next-token distributions given tokens ``0..t`` (the last entry predicts past the text).

    Both models on one device, one architecture and shape; ValueError for mismatched tokenizers,
    an empty text list or an empty text, NaN logits."""
    check_same_shape(reference, tuned, ("reference", "tuned"))
    if tuned_tokenizer is not None:
        check_same_tokenizer(tokenizer, tuned_tokenizer)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("token_kl needs at least one text")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    empty = [i for i, s in enumerate(ids) if not s]
    if empty:
        raise ValueError(f"text {empty[0]} has no tokens")
    device = input_device(reference)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    rows = chunk_rows(reference.config.vocab_size)
    out: list[np.ndarray] = [np.zeros(0)] * len(texts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    modes = [m.training for m in (reference, tuned)]
    try:
        for m in (reference, tuned):
            m.eval()
        for start in tqdm(range(0, len(order), batch_size), desc="token KL", leave=False,
                          disable=not progress):
            idx = order[start: start + batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, i in enumerate(idx):  # right padding: real tokens keep their positions
                x[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            x, mask = x.to(device), mask.to(device)
            hs = [decoder(m)(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
                  for m in (reference, tuned)]
            b, p = mask.nonzero(as_tuple=True)
            kl = torch.empty(len(b), dtype=torch.float64)
            for a in range(0, len(b), rows):
                sl = slice(a, a + rows)
                lq, lp = (torch.log_softmax(head_logits(m, h[b[sl].to(h.device),
                                                             p[sl].to(h.device)]).double(), -1)
                          for m, h in zip((reference, tuned), hs))
                lp = lp.to(lq.device)
                if not (torch.isfinite(lq).all() and torch.isfinite(lp).all()):
                    raise ValueError("NaN or Inf in the models' logits")
                kl[sl] = torch.where(lp > -torch.inf, lp.exp() * (lp - lq), 0.0).sum(-1).cpu()
            b = b.cpu()
            for r, i in enumerate(idx):
                out[i] = kl[b == r].numpy()
    finally:
        for m, t in zip((reference, tuned), modes):
            m.train(t)
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
    out = []
    for v, i, t in sorted(flat, key=lambda r: -r[0])[:top]:
        s = ids[i]
        out.append({"text": i, "pos": t, "kl": v, "token": token_text(tokenizer, s[t]),
                    "next": token_text(tokenizer, s[t + 1]) if t + 1 < len(s) else "",
                    "context": tokenizer.decode(s[max(0, t - context + 1): t + 1])})
    return out
