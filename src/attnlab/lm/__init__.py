"""Reference trained long-context language model: a byte-level Llama trained on the Python stdlib source.

``attnlab lm train`` trains it (minutes on one GPU, seconds for the tiny CPU config) and saves an HF folder
that every ``--model PATH`` option loads (tokenizer: transformers' byte-level ``ByT5Tokenizer``).
Names are imported lazily so that ``attnlab --help`` does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_package

lazy_package(__name__, {"ByteCorpus": "data", "load_corpus": "data", "LMConfig": "train", "PRESETS": "train",
                        "TrainResult": "train", "load_or_train": "train", "train_lm": "train"})
