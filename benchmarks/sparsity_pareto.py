"""Sparsefinder Pareto benchmark: train (or load a cached) entmax model on the corpus, fit every sparsity
predictor, and print sparsity / recall / cost per method and operating point, recall at sparsity 0.9
(interpolated on each Pareto front) and the downstream loss change with attention restricted to predicted
graphs. Writes the run directory and a JSON summary under results/ (git-ignored).

    python benchmarks/sparsity_pareto.py            # default: small MLM encoder, ~10 min on 2 idle CPU cores
    python benchmarks/sparsity_pareto.py --quick    # seconds-to-a-minute smoke run
    python benchmarks/sparsity_pareto.py --device cuda --size large   # bigger model on a GPU
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZES = {  # name: (seq_len, vocab, d_model, n_heads, n_layers, steps, batch, lr, n_fit, n_eval, n_down, epochs)
    "quick": (32, 512, 32, 2, 2, 40, 16, 3e-3, 24, 12, 16, 3),
    "small": (64, 2048, 64, 4, 2, 300, 32, 3e-3, 96, 48, 96, 15),
    "large": (128, 8192, 256, 4, 4, 4000, 64, 1e-3, 256, 128, 256, 20),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and data (smoke test)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="model / data size preset")
    ap.add_argument("--objective", choices=["mlm", "clm"], default="mlm", help="masked LM encoder or causal decoder")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default from --size)")
    ap.add_argument("--device", default="cpu", help="torch device for training and the model (cpu, cuda)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of methods (default all)")
    ap.add_argument("--tokenizer", default="minilm", help="model folder / alias whose tokenizer reads the corpus")
    ap.add_argument("--corpus", default=None, help="text file / folder / .jsonl (default: stdlib docstrings)")
    ap.add_argument("--results", "--out", dest="results", default=str(ROOT / "results"),
                    help="results folder (checkpoints are cached here)")
    ap.add_argument("--no-resume", action="store_true", help="recompute even if a finished run exists")
    ap.add_argument("--loss", choices=["sum", "pair"], default="sum", help="projection loss (sum = Sparsefinder's)")
    ap.add_argument("--force-window", type=int, default=-1, help="forced window edges for every predictor (-1 = off)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from attnlab.sparsity.run import pareto_table, sparsity
    from attnlab.sparsity.train_entmax import EntmaxTrainConfig

    size = "quick" if args.quick else args.size
    seq, vocab, d, h, L, steps, bs, lr, n_fit, n_eval, n_down, epochs = SIZES[size]
    steps = args.steps if args.steps is not None else steps
    cfg = EntmaxTrainConfig(objective=args.objective, seq_len=seq, vocab_size=vocab, d_model=d, n_heads=h, n_layers=L,
                            steps=steps, batch_size=bs, lr=lr, max_windows=max(4000, 20 * bs) if size != "quick" else 200,
                            corpus=args.corpus, device=args.device, seed=args.seed)
    results = Path(args.results)
    tag = f"{size}_{args.objective}_s{steps}_seed{args.seed}"
    ckpt = results / f"sparsity_entmax_{tag}.safetensors"
    out = results / f"sparsity_pareto_{tag}{'' if args.loss == 'sum' else '_' + args.loss}"
    out = out.with_name(out.name + (f"_fw{args.force_window}" if args.force_window >= 0 else ""))
    if not ckpt.exists() or args.no_resume:
        from attnlab.sparsity.train_entmax import save_small, tokenizer_of, train_small

        print(f"training entmax model ({size}: {L}x{h}, d={d}, N={seq}, {steps} steps, {args.device})", flush=True)
        model, vmap, hist = train_small(cfg, tokenizer=tokenizer_of(args.tokenizer), log_every=max(steps // 10, 1))
        save_small(ckpt, model, vmap, cfg, hist)
    t0 = time.time()
    methods = args.methods.split(",") if args.methods else None
    info = sparsity(out, checkpoint=str(ckpt), train=cfg, methods=methods, n_fit=n_fit, n_eval=n_eval, n_down=n_down,
                    epochs=epochs, seed=args.seed, resume=not args.no_resume, tokenizer=args.tokenizer,
                    loss=args.loss, force_window=args.force_window)
    wall = time.time() - t0

    gold = info["gold"]
    print(f"\nentmax model: {gold['n_layers']} layers x {gold['n_heads']} heads, N={gold['seq_len']}; "
          f"gold graph sparsity {gold['sparsity']:.3f} (per layer "
          f"{', '.join(f'{1 - x:.3f}' for x in gold['density_per_layer'])})")
    print(f"\n{'method':14s} {'knob':18s} {'sparsity':>8s} {'recall':>7s} {'exact':>6s} {'cost':>7s}  front")
    for r in pareto_table(info):
        print(f"{r['method']:14s} {r['knob']:18s} {r['sparsity']:8.3f} {r['recall']:7.3f} {r['exact']:6.3f} "
              f"{r['cost']:7.3f}  {'*' if r['front'] else ''}")
    print("\nrecall at sparsity 0.9 (linear interpolation on each method's Pareto front):")
    for m, v in info["recall_at_0.9"].items():
        print(f"  {m:14s} {'not reached' if v is None else f'{v:.3f}'}")
    down = info.get("downstream")
    if down:
        base = down["full_entmax"]
        print(f"\ndownstream ({info['model']['objective']}, held-out): full entmax loss {base['loss']:.4f} acc "
              f"{base['acc']:.4f}; restricted to gold graph loss {down['gold_graph']['loss']:.4f}")
        print(f"{'method':14s} {'knob':>6s} {'sparsity':>8s} {'recall':>7s} {'loss':>8s} {'dloss':>8s} {'dacc':>8s}")
        for m, rows in down["methods"].items():
            for r in rows:
                print(f"{m:14s} {str(r['knob']):>6s} {r['sparsity']:8.3f} {r['recall']:7.3f} {r['loss']:8.4f} "
                      f"{r['delta_loss']:+8.4f} {r['delta_acc']:+8.4f}")
    summary = {"size": size, "train_config": asdict(cfg), "checkpoint": str(ckpt), "run_dir": str(out),
               "gold": gold, "recall_at_0.9": info["recall_at_0.9"], "pareto": pareto_table(info),
               "downstream": down, "wall_s_eval": wall, "device": args.device, "host": platform.node(),
               "train_seconds": info["model"].get("train_history", {}).get("seconds")}
    results.mkdir(parents=True, exist_ok=True)
    from attnlab.io import write_json

    path = write_json(results / f"{out.name}.json", summary)
    print(f"\nwrote {path} and {out}/ (results.json, plots) in {wall:.0f}s")
    return summary


if __name__ == "__main__":
    main()
