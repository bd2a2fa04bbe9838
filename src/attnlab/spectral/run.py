"""`attnlab spectrum`: capture scores over a corpus and analyse their eigen structure (resumable, torchrun-ready)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..capture.corpus import select_windows  # noqa: F401  (re-exported)
from ..attention import check_heads, check_layers
from ..capture.run import Model, resolve_model, stream_attention
from ..config import fingerprint
from ..distributed import barrier, device_for, init_distributed
from ..errors import ConfigError, ResultsError
from ..io import RunDir, checkpoint_written, read_tensors, write_tensors
from ..validate import check_fields
from .analysis import summarise
from .collector import SpectrumCollector
from .files import TENSORS  # noqa: F401  (re-exported)



@dataclass
class SpectrumConfig:
    """Settings of a spectrum run (CLI flags and TOML keys have the same names)."""

    model: str = "minilm"  # HF hub id, local folder, or 'minilm' (packaged all-MiniLM-L6-v2)
    corpus: Optional[str] = None  # file, directory, .jsonl, or None for stdlib docstrings
    seq_len: int = 128  # tokens per window (special tokens included)
    n_sequences: int = 256  # windows analysed
    layers: Optional[list[int]] = None  # None = all
    heads: Optional[list[int]] = None  # None = all
    batch_size: int = 8
    sketch_size: int = 16  # whole-matrix sketch rows per head when not exact (0 disables the whole-matrix analysis)
    full_exact: int = 256  # whole-matrix spectra exactly (Gram of the kept samples) when n_sequences <= this
    head_chunk: int = 4  # heads scored at once (bounds peak memory)
    basis_k: Optional[int] = None  # basis size for overlaps (None = seq_len // 8)
    split: str = "fit"  # fit | heldout | all: which documents (held-out ones are kept for evaluation)
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 8  # batches between checkpoints (resume)
    text_field: str = "text"  # JSON-lines field holding the text
    spread_groups: int = 8  # window groups for the 95% interval of k90/k95/k99 (memory: row statistics x this; 0: none)

    def validate(self) -> None:
        """Raise ConfigError on bad values."""
        check_fields(self)
        for name in ("seq_len", "n_sequences", "batch_size", "head_chunk", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.spread_groups < 0 or self.spread_groups == 1:
            raise ConfigError(f"--spread-groups must be 0 (no interval) or >= 2 (got {self.spread_groups})")
        if self.full_exact < 0:
            raise ConfigError(f"--full-exact must be >= 0 (got {self.full_exact})")
        if self.sketch_size < 0 or self.sketch_size == 1:
            raise ConfigError(f"--sketch-size must be 0 (off) or >= 2 (got {self.sketch_size})")
        if self.basis_k is not None and not 1 <= self.basis_k <= self.seq_len:
            raise ConfigError(f"--basis-k must be in [1, --seq-len {self.seq_len}] (got {self.basis_k})")


def spectrum(out: str | Path, model: str | Model = "minilm", windows: Optional[torch.Tensor] = None,
             resume: bool = False, progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Run the spectral analysis and write it into run directory ``out``; returns the results section.

    ``settings`` are :class:`SpectrumConfig` fields. Pass ``windows`` (M, seq_len) to bypass the corpus
    (e.g. for our own small transformer). Under torchrun each rank takes a shard of the windows and
    statistics are merged by all-reduce; rank 0 writes.
    """
    cfg = SpectrumConfig(model=model if isinstance(model, str) else type(model).__name__, **settings)
    cfg.validate()
    info = init_distributed(cfg.device)
    device = device_for(info, cfg.device)
    run = RunDir(out)
    m = resolve_model(model, device, cfg.seq_len)
    from ..sources.inputs import fixed_seq_len, input_windows, is_image

    if fixed_seq_len(m, cfg.seq_len) != cfg.seq_len:  # vision encoders: every image is patches + CLS tokens
        import dataclasses

        logging.getLogger("attnlab.spectral").warning("%s sees %d tokens per image: --seq-len %d replaced by %d", m.name,
                                                      m.fixed_len, cfg.seq_len, m.fixed_len)
        cfg = dataclasses.replace(cfg, seq_len=m.fixed_len)
    layers = check_layers(cfg.layers, m.n_layers)
    heads = check_heads(cfg.heads, m.n_heads)
    if windows is None:
        windows = input_windows(m, cfg.seq_len, cfg.corpus, cfg.n_sequences, cfg.split, cfg.seed, cfg.text_field)
    elif not isinstance(windows, torch.Tensor):
        raise ConfigError(f"windows must be a (M, seq_len) tensor of token ids, got {type(windows).__name__}")
    elif not is_image(m) and (windows.is_floating_point() or windows.is_complex()):
        raise ConfigError(f"windows must hold integer token ids, got dtype {windows.dtype} (use windows.long())")
    elif not is_image(m) and (windows.dim() != 2 or windows.shape[1] != cfg.seq_len):
        raise ConfigError(f"windows must be (M, seq_len={cfg.seq_len}), got {tuple(windows.shape)}")
    from ..distributed import require_work_per_rank

    require_work_per_rank(len(windows), info, "--n-sequences")
    mine = windows[info.rank::info.world_size]
    # Exact whole matrices keep every matrix (float32, M N^2 per head): only when the run is small and on one process.
    exact = bool(cfg.sketch_size) and info.world_size == 1 and len(windows) <= cfg.full_exact
    from .spread import window_groups

    groups = window_groups(len(windows), cfg.spread_groups, info.rank, info.world_size) if cfg.spread_groups else None
    col = SpectrumCollector(layers, heads, cfg.seq_len, cfg.sketch_size, cfg.head_chunk, device=device,
                            full_exact=exact, spread_groups=cfg.spread_groups, window_group=groups)
    conf = asdict(cfg)
    fp = fingerprint({**_settings_id(conf), "windows": windows_digest(windows)})  # corpus content, not only its path
    ckpt = run.file(f"spectrum.ckpt.rank{info.rank}.safetensors")
    start = 0
    done = run.section("spectrum") if resume and not ckpt.exists() and run.file(TENSORS).exists() else None
    # both files must carry this run's fingerprint: after a failed write the tensors can be new and the
    # results section old (or the reverse), and resume must not return another run's numbers
    if done is not None and done.get("fingerprint") == fp and read_tensors(run.file(TENSORS))[1].get("fingerprint") == fp:
        if progress and info.is_main:
            logging.getLogger("attnlab.spectral").warning("%s: spectrum already complete with these settings (resume); "
                                                          "nothing to do", run.path)
        return done
    if resume and ckpt.exists():
        state, meta = read_tensors(ckpt)
        if meta.get("fingerprint") != fp:
            raise ResultsError(f"{ckpt}: checkpoint is from different settings; use a new --out or drop --resume")
        col.load_state(state)
        start = int(meta["batches_done"])

    def checkpoint(batch: int) -> None:
        if (batch + 1) % cfg.checkpoint_every == 0:
            write_tensors(ckpt, col.state(), {"fingerprint": fp, "batches_done": batch + 1})
            checkpoint_written()

    t0 = time.perf_counter()
    n_batches = stream_attention(m, mine, col, layers, cfg.batch_size, start_batch=start, on_batch_end=checkpoint,
                                 desc="spectrum", show_progress=progress and info.is_main)
    if info.enabled:
        col.all_reduce()
    elapsed = time.perf_counter() - t0
    col.cpu()
    results, tensors = summarise(col, cfg.basis_k)
    results.update({
        "config": conf, "model": m.describe(),
        "n_sequences": int(len(windows)), "world_size": info.world_size, "seconds": round(elapsed, 3),
        "batches": n_batches, "fingerprint": fp})
    if info.is_main:
        write_tensors(run.file(TENSORS), tensors, {"fingerprint": fp, "seq_len": cfg.seq_len, "model": cfg.model})
        run.write_config("spectrum", conf)
        run.write_section("spectrum", results)
        from .plots import plot_spectrum

        plot_spectrum(run, results)
        from ..report.views import save_views

        if is_image(m):  # the views show tokens; images have none
            pass
        elif "views" in run.config():  # views of the user's own text (attnlab views) are not replaced
            logging.getLogger("attnlab.spectral").info("%s holds views of your own text; kept (the spectrum's window "
                                                       "is not drawn)", run.path)
        else:
            save_views(run, m, windows[0], layers, heads)
    barrier(info)
    if ckpt.exists():
        ckpt.unlink()
    return results


def _settings_id(conf: dict[str, Any]) -> dict[str, Any]:
    """The settings that name a run: fields added later are left out at their defaults, so a run made before
    they existed keeps its fingerprint (resume across the upgrade, same results.json)."""
    return {k: v for k, v in conf.items() if not (k in _LATER and v == _LATER[k])}


_LATER = {"spread_groups": SpectrumConfig.spread_groups}


def windows_digest(windows: torch.Tensor) -> str:
    """A short hash of the token windows (so that a resume refuses a changed corpus)."""
    import hashlib

    data = windows.float() if windows.is_floating_point() else windows.to(torch.int64)  # pixels keep their values
    return hashlib.sha256(data.contiguous().numpy().tobytes()).hexdigest()[:16]


def load_bases(run_dir: str | Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Per-layer row bases of a finished spectrum run, with their metadata (model, seq_len)."""
    run = RunDir(run_dir, create=False)
    tensors, meta = read_tensors(run.file(TENSORS))
    bases = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith("rows.basis.layer.")}
    if not bases:
        raise ResultsError(f"{run.file(TENSORS)}: no per-layer bases (is this a spectrum run?)")
    return bases, meta
