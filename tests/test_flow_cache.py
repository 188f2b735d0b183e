"""The flow task's latent + text cache (`mmalign.flow.cache`): built once with `--cache-only`, read with `data.cache`.

The cache holds what a fresh encode gives; a cached tiny Wan run logs exactly the losses of an uncached one with
the same seed (measured: every logged metric bit-identical, float32 on the CPU: the cache stores the float32 posterior
means that `FlowAdapter.encode` computes and nothing of it draws from the step's generator); short clips and ties go
through the same vote as decoded frames; a stale or missing cache is refused before any model loads, naming the
cache and the fix; building it never loads the transformer.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmalign.cli import main
from mmalign.data.cache import StaleCacheError, list_caches
from mmalign.data.transforms import video_to_tensor
from mmalign.flow.adapter import FlowAdapter
from mmalign.flow.cache import build_cache
from mmalign.flow.task import FlowTask, build_adapter, video_pair_batch
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
TIMING = ("samples_per_s", "time/step", "time/data_wait", "time/data_wait_fraction")


def overrides(root: Path, run: str, *extra: str) -> list[str]:
    return [f"data.shards={root / 'pairs'}", f"model.pretrained={root / 'wan'}", f"run.output_dir={root / run}",
            "train.progress=false", *extra]


def wan_cfg(root: Path, run: str, *extra: str):
    return load_train_config(TINY / "flow_dpo_wan.yaml", overrides(root, run, *extra))


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Private copies of the tiny Wan pipeline and the toy video pairs, and the cache `--cache-only` writes next to
    the pairs (the CLI path of a recipe)."""
    root = tmp_path_factory.mktemp("flow_cache")
    shutil.copytree(ROOT / "assets" / "tiny" / "video_pairs", root / "pairs")
    shutil.copytree(ROOT / "assets" / "tiny" / "wan", root / "wan")
    assert main(["train", str(TINY / "flow_dpo_wan.yaml"), "--cache-only",
                 *overrides(root, "unused", "data.cache=true")]) == 0
    [info] = list_caches(root / "pairs")
    assert info.name == "flow" and info.fields == ["frames", "latents", "prompt_embeds"]
    assert info.producer == FlowTask(wan_cfg(root, "unused", "data.cache=true")).producer
    assert (info.producer["family"], info.producer["resolution"], info.producer["num_frames"]) == ("wan", 32, 9)
    return root


def first_batches(root: Path):
    """The first micro-batch of the same config read plainly and from the cache (same seed, same shuffle)."""
    out = []
    for extra in ((), ("data.cache=true",)):
        task = FlowTask(wan_cfg(root, "unused", *extra))
        task.check_inputs()
        out.append(next(task.batches(0, 1, 0)))
    return out


def test_cached_latents_and_embeddings_are_a_fresh_encode(data):
    plain, cached = first_batches(data)
    assert plain["keys"] == cached["keys"] and plain["captions"] == cached["captions"]
    assert "videos" not in cached and "frames_a" not in cached and "videos_a" not in cached  # nothing decoded
    adapter = build_adapter(wan_cfg(data, "unused"), torch.device("cpu"))
    fresh = adapter.encode(plain["videos"])
    assert cached["latents"].shape == fresh.shape == (2 * len(plain["captions"]), 16, 3, 4, 4)
    # Encoded in other batches (every clip of the shards, in stored order) and still equal bit for bit.
    assert torch.equal(cached["latents"], fresh)
    assert torch.equal(cached["prompt_embeds"], adapter.encode_text(plain["captions"]).prompt_embeds)
    latents, cond = adapter.inputs(cached, None, torch.device("cpu"))
    assert torch.equal(latents, fresh.view(2, -1, *fresh.shape[1:])) and cond.pooled is None


def test_a_cached_run_logs_the_losses_of_an_uncached_one_without_running_the_encoders(data, monkeypatch):
    steps = ["train.max_steps=3"]
    train(wan_cfg(data, "plain", *steps))

    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran (or moved to the device) while training from the cache")

    from mmalign.flow.adapter import FlowComponents

    monkeypatch.setattr(FlowAdapter, "encode", boom)
    monkeypatch.setattr(FlowAdapter, "encode_text", boom)
    monkeypatch.setattr(FlowComponents, "move_encoders", boom)
    train(wan_cfg(data, "cached", *steps, "data.cache=true"))
    plain, cached = metrics(data / "plain"), metrics(data / "cached")
    assert len(plain) == 3 and plain[0]["loss"] == pytest.approx(0.693147, abs=1e-6)
    assert plain[1]["loss"] != plain[0]["loss"]  # the policy moved: later steps compare real numbers
    assert cached == plain  # every metric, bit for bit


def test_one_cache_serves_flow_rwr_and_other_dims(data):
    """Winners are decided when a batch is read: Flow-RWR (both clips of every pair, rewards from the shards) and a
    TA-only vote train from the DPO recipe's cache with the losses of their uncached runs."""
    runs = {"rwr": (TINY / "flow_rwr_wan.yaml", []), "ta": (TINY / "flow_dpo_wan.yaml", ["data.dims={TA: 1.0}"])}
    for name, (recipe, extra) in runs.items():
        for mode, cache in (("plain", []), ("cached", ["data.cache=true"])):
            train(load_train_config(recipe, overrides(data, f"{name}_{mode}", "train.max_steps=2", *extra, *cache)))
        assert metrics(data / f"{name}_cached") == metrics(data / f"{name}_plain"), name
    assert len(list_caches(data / "pairs")) == 1  # no second cache was needed


def video_batch(frames_a, frames_b, labels: dict, cache: dict | None = None) -> dict:
    n = len(labels["VQ"])
    batch = {"prompts": [f"p{i}" for i in range(n)], "keys": [f"k{i}" for i in range(n)],
             "labels": {d: torch.tensor(v) for d, v in labels.items()}}
    if cache is None:
        return {**batch, "frames_a": frames_a, "frames_b": frames_b}
    return {**batch, "cache": {"flow": cache}}


def test_cached_pairs_go_through_the_same_vote_ties_and_short_clips():
    """With identity "latents" (the clips themselves, as a pixel-space model's), the cached path picks the same
    winners, drops the same ties and short clips, and gives the same tensors as decoding frames."""
    g = torch.Generator().manual_seed(0)
    clips = [(torch.rand(9, 32, 32, 3, generator=g) * 255).to(torch.uint8) for _ in range(8)]
    frames_a, frames_b = clips[:4], clips[4:]
    frames_b[3] = frames_b[3][:5]  # pair 3: clip B too short
    labels = {"VQ": [1.0, 0.0, 0.5, 1.0], "MQ": [1.0, 0.0, 0.5, 1.0], "TA": [0.0, 1.0, 0.5, 1.0]}  # A, B, tie, A
    latents = [torch.stack([video_to_tensor(a, 9, 16), video_to_tensor(b, 9, 16)]) for a, b in
               zip(frames_a[:3], frames_b[:3])] + [torch.zeros(2, 0)]
    cache = {"latents": latents, "frames": torch.tensor([[9, 9], [9, 9], [9, 9], [9, 5]]),
             "prompt_embeds": torch.arange(4.0).view(4, 1, 1).expand(4, 3, 2)}
    dims = {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}
    plain = video_pair_batch(video_batch(frames_a, frames_b, labels), dims, 9, 16)
    cached = video_pair_batch(video_batch(None, None, labels, cache), dims, 9, 16)
    assert cached["captions"] == plain["captions"] == ["p0", "p1"]
    for key in ("ties_dropped", "short_dropped"):
        assert cached[key] == plain[key] == 1, key
    assert torch.equal(cached["latents"], plain["videos"])
    assert torch.equal(cached["latents"][1], video_to_tensor(frames_b[1], 9, 16))  # B won pair 1
    assert torch.equal(cached["prompt_embeds"][:, 0, 0], torch.tensor([0.0, 1.0]))  # the kept pairs' captions
    assert cached["skip_reasons"]["short_clip"] == plain["skip_reasons"]["short_clip"] == 1
    with pytest.raises(Exception, match="k3: clips of 9 and 5 frames, fewer than data.num_frames 9"):
        video_pair_batch(video_batch(None, None, labels, cache), dims, 9, 16, strict=True)
    ties = video_pair_batch(video_batch(None, None, {d: [0.5] * 4 for d in labels}, cache), dims, 9, 16)
    task = FlowTask(load_train_config(TINY / "flow_dpo_wan.yaml", []))
    assert ties["latents"] is None and task.skip_reason(ties)[0] == "no_decided_pairs"


def test_a_stale_or_missing_cache_is_refused_before_any_model_loads(data, monkeypatch, capsys):
    import mmalign.flow.task as flow_task

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the cache was checked")

    monkeypatch.setattr(flow_task, "load_flow_components", no_load)
    with pytest.raises(StaleCacheError, match=r"no complete 'flow' cache .*resolution: 48 \(wanted\) vs 32.*"
                                              r"mmalign train CONFIG --cache-only"):
        train(wan_cfg(data, "s1", "data.cache=true", "data.resolution=48"))
    assert main(["train", str(TINY / "flow_dpo_wan.yaml"),
                 *overrides(data, "s2", "data.cache=true", "data.num_frames=5")]) == 2
    err = capsys.readouterr().err
    assert "num_frames: 5 (wanted) vs 9" in err and "--cache-only" in err and "flow-" in err
    with pytest.raises(StaleCacheError, match=f"caches in {data / 'nowhere'}.*available 'flow' caches: none"):
        train(wan_cfg(data, "s3", f"data.cache={data / 'nowhere'}"))
    assert not (data / "s1" / "checkpoints").exists() and not (data / "s3").exists()


def test_changed_model_files_make_the_cache_stale_and_building_never_loads_the_transformer(data, tmp_path):
    """A pipeline copy without its transformer weights (its config.json only) builds the cache, byte-identical to the
    full pipeline's; one flipped bit in its VAE weights then makes that cache stale."""
    model = tmp_path / "wan"

    def transformer_weights(folder, names):
        return [n for n in names if Path(folder).name == "transformer" and n != "config.json"]

    shutil.copytree(data / "wan", model, ignore=transformer_weights)
    assert [p.name for p in (model / "transformer").iterdir()] == ["config.json"]
    caches = tmp_path / "caches"
    cfg = wan_cfg(data, "unused", f"model.pretrained={model}", f"data.cache={caches}")
    built = build_cache(cfg, device="cpu", progress=False)
    [reference] = list_caches(data / "pairs")
    assert built.parent == caches and built.name != reference.dir.name  # the model path is in the key
    for shard in ("shard-000000.tar", "shard-000001.tar"):
        assert (built / shard).read_bytes() == (reference.dir / shard).read_bytes()
    FlowTask(cfg).check_inputs()  # current
    weights = next((model / "vae").glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(StaleCacheError, match="encoders_sha256: .*--cache-only"):
        FlowTask(wan_cfg(data, "unused", f"model.pretrained={model}", f"data.cache={caches}")).check_inputs()


def test_sd3_cache_only_cli_and_a_cached_image_batch(tmp_path):
    """`--cache-only` on the SD3 recipe (image pairs, pooled embeddings) into a folder away from the shards; the
    cached batch is the fresh encode reordered to [winners; losers], and two training steps log the same losses."""
    caches = tmp_path / "caches"
    common = [f"run.output_dir={tmp_path / 'run'}", "train.progress=false", "train.max_steps=2"]
    assert main(["train", str(TINY / "flow_dpo_sd3.yaml"), "--cache-only", f"data.cache={caches}", *common]) == 0
    assert not (ROOT / "assets" / "tiny" / "pairs" / "cache").exists()
    [info] = list_caches(ROOT / "assets" / "tiny" / "pairs", caches)
    assert info.fields == ["latents", "pooled", "prompt_embeds"] and info.producer["num_frames"] is None
    batches = []
    for extra in ((), (f"data.cache={caches}",)):
        task = FlowTask(load_train_config(TINY / "flow_dpo_sd3.yaml", [*common, *extra]))
        task.check_inputs()
        batches.append(next(task.batches(0, 1, 0)))
    plain, cached = batches
    assert plain["keys"] == cached["keys"] and "pixel_values" not in cached
    adapter = build_adapter(load_train_config(TINY / "flow_dpo_sd3.yaml", common), torch.device("cpu"))
    assert torch.equal(cached["latents"], adapter.encode(plain["pixel_values"]))
    fresh = adapter.encode_text(plain["captions"])
    assert torch.equal(cached["prompt_embeds"], fresh.prompt_embeds) and torch.equal(cached["pooled"], fresh.pooled)
    for name, extra in (("plain", ()), ("cached", (f"data.cache={caches}",))):
        train(load_train_config(TINY / "flow_dpo_sd3.yaml", [*common, f"run.output_dir={tmp_path / name}", *extra]))
    assert metrics(tmp_path / "cached") == metrics(tmp_path / "plain")


def test_cache_needs_shards():
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="data.cache holds encodings of data.shards"):
        load_train_config(TINY / "flow_dpo_wan.yaml", ["data.shards=null", "data.cache=true"])


def test_loading_for_the_cache_reads_no_transformer_and_transformer_path_takes_effect_for_wan(tmp_path):
    """`load_transformer=False` builds the transformer on the meta device (no weights read); the pipeline's own class
    loads it, so `transformer_path` replaces Wan's optional transformer (`DiffusionPipeline.from_pretrained` loaded
    the folder's instead)."""
    from diffusers import WanTransformer3DModel

    from mmalign.flow.adapter import load_flow_components

    wan = str(ROOT / "assets" / "tiny" / "wan")
    comps = load_flow_components(wan, load_transformer=False)
    assert next(comps.transformer.parameters()).device.type == "meta" and comps.vae is not None
    other = WanTransformer3DModel.from_pretrained(f"{wan}/transformer")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.save_pretrained(tmp_path / "transformer")
    loaded = load_flow_components(wan, transformer_path=str(tmp_path / "transformer")).transformer
    for a, b in zip(loaded.parameters(), other.parameters()):
        assert torch.equal(a, b)
