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


@pytest.fixture(scope="session")
def toy_video(tmp_path_factory):
    """A tiny toy video pipeline (`ToyVideoPipeline`, one transformer layer, untrained), saved; read-only."""
    from mmalign.toy.video_pipeline import build_toy_video

    folder = tmp_path_factory.mktemp("toy_video")
    build_toy_video(seed=0, num_heads=2, head_dim=8, num_layers=1, ffn_dim=16, text_width=16,
                    shift=3.0).save_pretrained(folder)
    return str(folder)
