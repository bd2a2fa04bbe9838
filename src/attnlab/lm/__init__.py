"""Reference trained long-context language model: a byte-level Llama trained on the Python stdlib source.

``attnlab lm train`` trains it (minutes on one GPU, seconds for the tiny CPU config) and saves an HF folder
that every ``--model PATH`` option loads (tokenizer: transformers' byte-level ``ByT5Tokenizer``).
"""

from .data import ByteCorpus, load_corpus
from .train import LMConfig, PRESETS, TrainResult, load_or_train, train_lm

__all__ = ["ByteCorpus", "load_corpus", "LMConfig", "PRESETS", "TrainResult", "load_or_train", "train_lm"]
