"""`sparsity run` says when its numbers are not meaningful (issue 29 item 1)."""

from __future__ import annotations

from attnlab.sparsity.run import TARGET, finetune_made_worse, gold_below_target


def test_gold_below_the_operating_point_warns():
    msg = gold_below_target([0.83, 0.5], TARGET)  # sparsity 0.17 and 0.5: the default small model's case
    assert msg and "layer 0: 0.170" in msg and f"sparsity {TARGET:g}" in msg
    assert gold_below_target([0.05, 0.04], 0.9) is None  # 0.95 / 0.96 sparse: fine
    assert gold_below_target([0.02, 0.15], 0.9)  # overall 0.915 but layer 1 at 0.85: still said


def test_finetuning_that_made_the_probe_loss_worse_warns():
    mlm = {"softmax_original": {"loss": 3.1, "loss_se": 0.05}, "entmax_no_finetune": {"loss": 6.364, "loss_se": 0.05},
           "entmax_finetuned": {"loss": 6.376, "loss_se": 0.05}}
    msg = finetune_made_worse(mlm)
    assert msg and "6.376" in msg and "6.364" in msg
    assert finetune_made_worse({**mlm, "entmax_finetuned": {"loss": 4.0, "loss_se": 0.05}}) is None
    assert finetune_made_worse({"skipped": "clm"}) is None
