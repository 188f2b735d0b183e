"""Shared fixtures. Nothing here downloads: tiny models are built from configs and saved to temp folders."""

import os

# Before anything imports huggingface_hub: a hub lookup must fail fast, never hang in retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    from mmalign.t2i.tiny import build_tiny_sd

    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "sd15", kind="sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from mmalign.t2i.tiny import build_tiny_sd

    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "sdxl", kind="sdxl"))
