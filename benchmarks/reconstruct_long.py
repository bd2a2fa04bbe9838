"""Reconstruction at long context on the trained causal byte LM: row spectrum vs N and the total-compute frontier.

Trains the `attnlab lm train` preset briefly inside the same process (nothing persists between device calls), or
loads ``--model``; then for every length: fit windows from the training split (proxy moments, row spectrum from
sampled rows), held-out windows from the held-out split (the spread of every TV is across them), one chunk of
query rows at a time (:mod:`attnlab.reconstruct.long`; no N x N array). Target: worst-layer TV <= 0.05 at total
compute <= 0.30 at N >= 8k.

    python benchmarks/reconstruct_long.py --quick                                   # CPU smoke run (tiny preset)
    python benchmarks/reconstruct_long.py --preset gpu --train-seconds 90 --lengths 2048 8192 32768 --device cuda

Prints the tables and writes results/reconstruct_long.json (results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def device_card(device: str) -> dict:
    """Name and software of the device the numbers come from."""
    card = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        card.update({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda})
    else:
        import platform

        card["name"] = platform.processor() or platform.machine()
    return card


def _write(path: str, data: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1))
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny preset, short lengths, few points")
    ap.add_argument("--preset", default="gpu", help="attnlab lm preset to train (gpu | tiny)")
    ap.add_argument("--model", default=None, help="a trained LM folder instead of training")
    ap.add_argument("--train-seconds", type=float, default=90.0, help="training time budget")
    ap.add_argument("--train-seq-len", type=int, default=8192, help="training context (the preset's long phase is 4x)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--n-fit", type=int, default=2)
    ap.add_argument("--n-eval", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=1024)
    ap.add_argument("--spectrum-rows", type=int, default=2048)
    ap.add_argument("--chunk-rows", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-compute", type=float, default=0.6)
    ap.add_argument("--fractions", type=float, nargs="+", default=None, help="pair fractions (default: LongConfig's)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="proxy ranks (default: LongConfig's)")
    ap.add_argument("--families", nargs="+", default=None, help="method families (default: all)")
    ap.add_argument("--out", default="results/reconstruct_long.json", help="JSON output")
    a = ap.parse_args()
    if a.quick:
        a.preset, a.lengths, a.train_seconds, a.n_eval, a.eval_rows, a.spectrum_rows = "tiny", [64, 128], 5.0, 2, 64, 128
        a.train_seq_len, a.chunk_rows, a.device, a.dtype = 64, 32, "cpu", "float64"
    from attnlab.lm.data import load_corpus, windows
    from attnlab.lm.train import config_from, train_lm
    from attnlab.reconstruct.long_run import LongConfig, format_length, study_length
    from attnlab.sources.hf import load_model

    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    train_info = None
    if a.model:
        path = a.model
    else:
        path = str(Path(a.out).with_suffix("")) + "_lm"
        over = dict(max_seconds=a.train_seconds, seq_len=a.train_seq_len, long_seq_len=4 * a.train_seq_len,
                    eval_windows=2, eval_every=0, device=a.device)
        if a.quick:
            over.update(steps=4, max_bytes=300_000, max_positions=4096, long_seq_len=128)
        cfg = config_from(a.preset, **over)
        r = train_lm(cfg, path, log=lambda s: None)
        train_info = {"preset": a.preset, "overrides": {k: v for k, v in over.items()}, "steps": r.steps,
                      "seconds": round(r.seconds, 1), "train_loss": r.train_loss, "heldout_loss": r.heldout_loss,
                      "long": {k: r.meta.get(k) for k in ("long_train_loss", "long_heldout_loss")}}
        log(f"trained {a.preset} for {r.steps} steps in {r.seconds:.0f} s: held-out loss {r.heldout_loss:.3f} nats/byte "
            f"at {cfg.seq_len}, {r.meta.get('long_heldout_loss')} at {cfg.long_seq_len}")
    hf = load_model(path, device=a.device)
    corpus = load_corpus(None, 0.05, 300_000 if a.quick else None, min_heldout_tokens=2 * max(a.lengths))
    out = {"card": device_card(a.device), "model": path, "train": train_info, "lengths": {}}
    for n in a.lengths:
        g = torch.Generator().manual_seed(n)
        fit_w = windows(corpus.train, n, a.n_fit, g)
        ev_w = windows(corpus.heldout, n, a.n_eval, contiguous=True)
        cfg = LongConfig(n_fit=a.n_fit, n_eval=a.n_eval, eval_rows=a.eval_rows, spectrum_rows=a.spectrum_rows,
                         chunk_rows=a.chunk_rows, device=a.device, dtype=a.dtype, max_compute=a.max_compute)
        grid = {k: tuple(v) for k, v in (("fractions", a.fractions), ("ranks", a.ranks), ("families", a.families)) if v}
        cfg = dataclasses.replace(cfg, **grid)
        if a.quick:
            cfg = dataclasses.replace(cfg, fractions=(1 / 8, 1 / 4), ranks=(2,))
        res = study_length(hf, fit_w, ev_w, cfg, log=log)
        out["lengths"][str(n)] = res
        log(format_length(res))
        log(f"memory: {json.dumps(res['memory'])}")
        _write(a.out, out)  # after every length: a run cut short keeps what it measured
    big = [v for k, v in out["lengths"].items() if int(k) >= 8192]
    out["target_met_at_8k_plus"] = any(v.get("meets_target") for v in big) if big else None
    out["seconds"] = round(time.perf_counter() - t0, 1)
    p = _write(a.out, out)
    log(f"target (worst-layer TV <= 0.05 at compute <= 0.30, N >= 8k) met: {out['target_met_at_8k_plus']}; wrote {p} "
        f"in {out['seconds']} s")


if __name__ == "__main__":
    main()
