"""Compact vocabulary and masked-LM batches for the small entmax models.

Token ids from the MiniLM tokenizer are mapped to a smaller vocabulary (the ``vocab_size`` most frequent
ids of the fit windows; others -> [UNK]) so that CPU training takes minutes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.transformer import SmallTransformer

PAD, UNK, MASK, CLS, SEP = 0, 1, 2, 3, 4
N_SPECIAL = 5


class VocabMap:
    """Maps tokenizer ids to a compact vocabulary (specials first, then by frequency)."""

    def __init__(self, keep: torch.Tensor, specials: dict[str, int], full_size: int):
        self.keep = keep.long()  # original ids of compact ids N_SPECIAL..
        self.specials = specials  # name -> original id
        self.table = torch.full((full_size,), UNK, dtype=torch.long)
        self.table[self.keep] = torch.arange(N_SPECIAL, N_SPECIAL + len(self.keep))
        for name, compact in (("pad", PAD), ("unk", UNK), ("mask", MASK), ("cls", CLS), ("sep", SEP)):
            if specials.get(name) is not None:
                self.table[specials[name]] = compact

    @classmethod
    def from_windows(cls, windows: torch.Tensor, size: int, tokenizer) -> "VocabMap":
        """The ``size - 5`` most frequent non-special ids of ``windows``."""
        specials = {"pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id, "mask": tokenizer.mask_token_id,
                    "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
        full = max(len(tokenizer), int(windows.max()) + 1)
        counts = torch.bincount(windows.flatten(), minlength=full)
        for v in specials.values():
            if v is not None:
                counts[v] = -1
        order = counts.argsort(descending=True)
        keep = order[: size - N_SPECIAL]
        keep = keep[counts[keep] > 0]
        return cls(keep, specials, full)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Original ids -> compact ids."""
        return self.table[ids.clamp(0, len(self.table) - 1)]

    @property
    def size(self) -> int:
        """Compact vocabulary size."""
        return N_SPECIAL + len(self.keep)


def tokenizer_of(name: str = "minilm"):
    """The tokenizer of a model folder / alias, without loading the weights (ModelError naming --tokenizer)."""
    from ..sources.loading import load_tokenizer

    return load_tokenizer(name, "--tokenizer")


def mlm_batch(ids: torch.Tensor, vocab: int, p: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: inputs and labels (-100 where not predicted); specials are never masked."""
    can = ids >= N_SPECIAL
    pick = (torch.rand(ids.shape, generator=g) < p) & can
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=g)
    inp = ids.clone()
    inp[pick & (r < 0.8)] = MASK
    rnd = pick & (r >= 0.8) & (r < 0.9)
    inp[rnd] = torch.randint(N_SPECIAL, vocab, (int(rnd.sum()),), generator=g)
    return inp, labels


def lm_token_stats(model: SmallTransformer, inp: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (differentiable), correct predictions and number of predicted tokens of one batch
    (labels -100 where nothing is predicted)."""
    dev = next(model.parameters()).device
    logits = model(inp.to(dev)).logits
    labels = labels.to(dev)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                         reduction="sum")
    sel = labels != -100
    return ce, (logits.argmax(-1)[sel] == labels[sel]).sum(), sel.sum()


def lm_loss(model: SmallTransformer, ids: torch.Tensor, objective: str, g: torch.Generator,
            mask_prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and token accuracy (on predicted positions) of one batch of compact ids."""
    if objective == "mlm":
        inp, labels = mlm_batch(ids, model.cfg.vocab_size, mask_prob, g)
    else:
        inp, labels = ids[:, :-1], ids[:, 1:]
    ce, correct, n = lm_token_stats(model, inp, labels)
    acc = correct.float() / n if bool(n > 0) else torch.tensor(float("nan"))
    return ce / n, acc
