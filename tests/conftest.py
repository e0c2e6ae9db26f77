"""Shared fixtures. Tests are hermetic: no network, no hub (HF_HUB_OFFLINE), files under tmp_path."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest

from tests.helpers import make_texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from data.build_tiny import build_tiny_model

    return build_tiny_model(
        make_texts(200, seed=1), tmp_path_factory.mktemp("models") / "tiny", vocab_size=600
    )
