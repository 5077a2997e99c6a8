"""Shared fixtures: tiny random models of every supported family, on the CPU, with no network.

The hub is switched off before transformers is imported; tiny models are built in-process from a
config with a fixed seed (`lite.model.build_tiny`: 2 layers, hidden 64, 8 query heads, 4 KV heads).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers.utils import logging as hf_logging

from helpers import random_tokens
from lite.archs import ARCHS
from lite.model import build_tiny

# transformers gives its logger a handler bound to whatever sys.stderr is on first use; make that
# the session's stream now, not a capsys stream that is closed after its test.
hf_logging.get_logger("transformers")

# The suite is meant to run on 2 cores; more threads only add contention on small tensors.
torch.set_num_threads(min(2, torch.get_num_threads()))

MODEL_TYPES = sorted(ARCHS)


@pytest.fixture(params=MODEL_TYPES)
def model_type(request) -> str:
    """Every `model_type` in the architecture table, one test each."""
    return request.param


@pytest.fixture
def tiny():
    """`tiny(model_type, **config_overrides)`: a fresh fp32 tiny model, seed 0."""
    return build_tiny


@pytest.fixture
def tiny_model(model_type):
    """A fresh fp32 tiny model of `model_type`, seed 0."""
    return build_tiny(model_type)


@pytest.fixture
def tokens() -> torch.Tensor:
    """Random byte tokens `(4, 32)`, fixed seed."""
    return random_tokens()
