"""Shared fixtures. Tests are hermetic: no network, no hub (HF_HUB_OFFLINE), files under tmp_path."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
