"""The text-to-image latent + text-embedding cache: built once with `--cache-only`, read with `data.cache=true`.

Equivalence (same loss and errors with and without the cache at the same noise), stale caches refused before any
model loads, training never runs the VAE or text encoders from the cache, and exact resume from the cache.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmalign.cli import main
from mmalign.config import load_config
from mmalign.data.cache import StaleCacheError, list_caches
from mmalign.data.transforms import to_pixel_values
from mmalign.t2i.adapter import T2IAdapter, read_cached
from mmalign.t2i.cache import build_cache
from mmalign.t2i.task import T2ITask, T2ITrainConfig, build_adapter
from mmalign.train.metrics import read_metrics
from mmalign.train.trainer import step_generator, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def write_shards(path: Path, schema: str, n: int) -> Path:
    """A small shard set of toy scenes in two shards (the cache joins shard by shard), with two ties for pairs."""
    from mmalign.data.schemas import pair_sample, ranked_sample
    from mmalign.data.writer import ShardSetWriter
    from mmalign.toy.scenes import sample_scene

    with ShardSetWriter(path, schema, max_count=(n + 1) // 2) as w:
        for i in range(n):
            scenes = [sample_scene(100 * i + j) for j in range(3)]
            if schema == "pair":
                label = 0.5 if i in (3, 7) else float(i % 2)
                w.write(pair_sample(f"k{i:03d}", scenes[0].render(), scenes[1].render(),
                                    caption=scenes[0].caption, label_0=label))
            else:
                w.write(ranked_sample(f"k{i:03d}", [sc.render() for sc in scenes], caption=scenes[0].caption,
                                      scores=[0.9, 0.1 * i, 0.5]))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 pairs and a private copy of the tiny SD pipeline (the cache is written next to the shards) + the cache."""
    root = tmp_path_factory.mktemp("cache")
    write_shards(root / "pairs", "pair", 24)
    shutil.copytree(ROOT / "assets" / "tiny" / "sd15", root / "sd15")
    cfg = cfg_for(root, "unused")
    assert main(["train", str(TINY / "t2i_dpo.yaml"), "--cache-only", *overrides(root, "unused")]) == 0
    [info] = list_caches(root / "pairs")
    assert info.producer["resolution"] == 32 and info.producer["model"] == str(root / "sd15")
    assert T2ITask(cfg).producer == info.producer
    return root


def overrides(root, run_name, *extra):
    return [f"data.shards={root / 'pairs'}", f"model.pretrained={root / 'sd15'}",
            f"run.output_dir={root / run_name}", "train.progress=false", "validation.prompts=[]",
            "train.batch_size=2", "data.shuffle_buffer=8", *extra]


def cfg_for(root, run_name, *extra) -> T2ITrainConfig:
    return load_config(T2ITrainConfig, TINY / "t2i_dpo.yaml", overrides(root, run_name, *extra))


def test_a_cached_batch_gives_the_same_errors_and_loss_as_encoding(data):
    plain, cached = cfg_for(data, "x"), cfg_for(data, "x", "data.cache=true")
    adapter = build_adapter(plain, torch.device("cpu"))
    unet = adapter.c.unet
    with torch.no_grad():  # move the policy away from the reference so the loss is not ln 2 by construction
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    b_plain = next(T2ITask(plain).batches(0, 1, 0))
    b_cached = next(T2ITask(cached).batches(0, 1, 0))
    assert b_plain["keys"] == b_cached["keys"] and "pixels" not in b_cached
    assert b_plain["pixels"].dtype == torch.uint8  # the training reader sends uint8 images
    # the cached posteriors are the fresh encode of the same images, [winners; losers]
    posterior, _, sizes, crops = read_cached(b_cached)
    fresh = adapter.encode_images(to_pixel_values(b_plain["pixels"])).view(2, -1, *posterior.shape[2:])
    torch.testing.assert_close(posterior, fresh, rtol=1e-5, atol=1e-5)
    assert torch.equal(sizes, b_plain["original_sizes"]) and torch.equal(crops, b_plain["crop_top_lefts"])
    l_plain, m_plain = T2ITask.compute_loss(plain, adapter, unet, unet, b_plain, step_generator(0, 0, 0, 0))
    l_cached, m_cached = T2ITask.compute_loss(cached, adapter, unet, unet, b_cached, step_generator(0, 0, 0, 0))
    mse_keys = ("mse/policy_chosen", "mse/policy_rejected", "mse/ref_chosen", "mse/ref_rejected")
    for key in mse_keys:
        torch.testing.assert_close(m_cached[key], m_plain[key], rtol=1e-5, atol=1e-7)
    # DPO multiplies error differences by beta/2 = 2500 and logsigmoid is 1-Lipschitz: the loss agrees to
    # 2500 x (4 errors x their 1e-5 relative tolerance). A winner/loser mix-up would be off by far more.
    assert abs(l_plain.item() - 0.6931) > 0.5
    tol = 2500 * 4 * 1e-5 * max(m_plain[k].item() for k in mse_keys)
    assert abs(l_cached.item() - l_plain.item()) <= tol, (l_cached.item(), l_plain.item(), tol)


def test_training_from_the_cache_matches_and_never_runs_the_encoders(data, monkeypatch):
    steps = ["train.max_steps=3"]
    plain = train(cfg_for(data, "plain", *steps))

    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran while training from the cache")

    monkeypatch.setattr(T2IAdapter, "encode_images", boom)
    monkeypatch.setattr(T2IAdapter, "encode_text", boom)
    cached = train(cfg_for(data, "cached", *steps, "data.cache=true"))
    assert cached.keys_seen == plain.keys_seen
    rows_p, rows_c = read_metrics(data / "plain"), read_metrics(data / "cached")
    assert rows_c[0]["loss"] == rows_p[0]["loss"] == pytest.approx(0.693147, abs=1e-6)
    for rp, rc in zip(rows_p, rows_c):
        for key in ("mse/policy_chosen", "mse/policy_rejected", "mse/ref_chosen", "mse/ref_rejected"):
            assert rc[key] == pytest.approx(rp[key], rel=1e-4), (rp["step"], key)
        assert rc["loss"] == pytest.approx(rp["loss"], abs=2500 * 4 * 1e-4 * rp["mse/policy_chosen"])


def test_resume_from_the_cache_is_bit_exact(data):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "data.cache=true",
              "data.proportion_empty_prompts=0.5"]  # also exercises the cached "" embedding
    straight = train(cfg_for(data, "ra", *common))
    train(cfg_for(data, "rb", *common, "train.max_steps=2"))
    resumed = train(cfg_for(data, "rb", *common, "run.resume=latest"))
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in read_metrics(data / "ra")] == [r["loss"] for r in read_metrics(data / "rb")]


def test_a_stale_cache_is_refused_before_any_model_loads(data, monkeypatch, capsys):
    import mmalign.t2i.task as t2i

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the cache was checked")

    monkeypatch.setattr(t2i, "load_t2i_components", no_load)
    with pytest.raises(StaleCacheError, match=r"resolution: 48 \(wanted\) vs 32.*--cache-only"):
        train(cfg_for(data, "s1", "data.cache=true", "data.resolution=48"))
    assert main(["train", str(TINY / "t2i_dpo.yaml"), *overrides(data, "s2", "data.cache=true",
                                                                    "train.mixed_precision=bf16")]) == 2
    err = capsys.readouterr().err
    assert "encoder_dtype: 'bfloat16' (wanted) vs 'float32'" in err and "--cache-only" in err


def test_changed_encoder_weights_or_shards_make_the_cache_stale(data, tmp_path):
    other = tmp_path / "sd15"
    shutil.copytree(data / "sd15", other)
    weights = next((other / "text_encoder").glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one flipped bit in the text encoder: every cached embedding may differ
    weights.write_bytes(bytes(blob))
    cfg = cfg_for(data, "t1", "data.cache=true", f"model.pretrained={other}")
    with pytest.raises(StaleCacheError, match="encoders_sha256"):
        T2ITask(cfg).check_inputs()
    pairs = tmp_path / "pairs"
    shutil.copytree(data / "pairs", pairs)
    doc = json.loads((pairs / "manifest.json").read_text())
    doc["shards"][0]["sha256"] = "0" * 64  # the shard set changed since the cache was built
    (pairs / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(StaleCacheError, match="computed from different shards"):
        T2ITask(cfg_for(data, "t2", "data.cache=true", f"data.shards={pairs}")).check_inputs()


def test_cache_only_never_loads_the_unet(data, tmp_path):
    """--cache-only needs the encoders only: a pipeline copy without its unet/ folder builds the same cache."""
    from mmalign.t2i.adapter import load_t2i_components

    no_unet = tmp_path / "sd15"
    shutil.copytree(data / "sd15", no_unet, ignore=shutil.ignore_patterns("unet"))
    comps = load_t2i_components(str(no_unet), load_unet=False)
    assert comps.unet is None and comps.vae is not None
    with pytest.raises(ValueError, match="load_unet=False"):
        T2IAdapter(comps, reference="copy")
    pairs = tmp_path / "pairs"
    shutil.copytree(data / "pairs", pairs, ignore=shutil.ignore_patterns("cache"))
    # The pipeline path is part of the producer, so compare with a cache of the full pipeline at the same path.
    cfg = cfg_for(data, "unused", f"data.shards={pairs}", f"model.pretrained={no_unet}")
    built = build_cache(cfg, device="cpu", progress=False)
    [info] = list_caches(pairs)
    assert info.dir == built and info.producer == T2ITask(cfg).producer
    [reference] = list_caches(data / "pairs")
    for shard in sorted(p.name for p in reference.dir.glob("shard-*.tar")):
        assert (built / shard).read_bytes() == (reference.dir / shard).read_bytes()


def test_a_cache_folder_away_from_the_shards(data, tmp_path):
    """data.cache=DIR: --cache-only writes the cache into DIR, nothing next to the shards, and training reads it."""
    pairs = tmp_path / "pairs"
    shutil.copytree(data / "pairs", pairs, ignore=shutil.ignore_patterns("cache"))
    root = tmp_path / "caches"
    args = [f"data.shards={pairs}", f"data.cache={root}", "train.max_steps=2"]
    assert main(["train", str(TINY / "t2i_dpo.yaml"), "--cache-only", *overrides(data, "unused", *args)]) == 0
    assert list_caches(pairs) == [] and not (pairs / "cache").exists()
    [info] = list_caches(pairs, root)
    assert info.dir.parent == root and info.producer == T2ITask(cfg_for(data, "unused", *args)).producer
    away = train(cfg_for(data, "away", *args))
    beside = train(cfg_for(data, "beside", "train.max_steps=2", "data.cache=true"))  # the fixture's cache
    assert away.keys_seen == beside.keys_seen
    assert [r["loss"] for r in read_metrics(data / "away")] == [r["loss"] for r in read_metrics(data / "beside")]
    with pytest.raises(StaleCacheError, match=f"{pairs}: no complete 't2i' cache"):
        T2ITask(cfg_for(data, "u2", f"data.shards={pairs}", "data.cache=true")).check_inputs()
    with pytest.raises(StaleCacheError, match=f"caches in {tmp_path / 'elsewhere'}"):
        T2ITask(cfg_for(data, "u3", f"data.shards={pairs}", f"data.cache={tmp_path / 'elsewhere'}")).check_inputs()


def test_cache_needs_one_encoding_per_image():
    from mmalign.config import ConfigError

    for bad in ("data.random_flip=true", "data.center_crop=false"):
        with pytest.raises(ConfigError, match="one encoding per image"):
            load_config(T2ITrainConfig, TINY / "t2i_dpo.yaml", ["data.cache=true", bad])


def test_ranked_and_sdxl_caches_round_trip(tmp_path):
    """RankDPO lists (K images in stored order) and SDXL (pooled embeddings, winner sizes) from the cache."""
    write_shards(tmp_path / "ranked", "ranked", 6)
    write_shards(tmp_path / "pairs", "pair", 8)
    for recipe, shards in (("t2i_rankdpo.yaml", "ranked"), ("t2i_dpo_sdxl.yaml", "pairs")):
        over = [f"data.shards={tmp_path / shards}", "train.progress=false", "train.batch_size=2"]
        plain = load_config(T2ITrainConfig, TINY / recipe, over)
        cached = load_config(T2ITrainConfig, TINY / recipe, [*over, "data.cache=true"])
        build_cache(plain, progress=False)
        adapter = build_adapter(plain, torch.device("cpu"))
        unet = adapter.c.unet
        b_plain, b_cached = next(T2ITask(plain).batches(0, 1, 0)), next(T2ITask(cached).batches(0, 1, 0))
        assert b_plain["keys"] == b_cached["keys"]
        _, m_plain = T2ITask.compute_loss(plain, adapter, unet, unet, b_plain, step_generator(0, 0, 0, 0))
        _, m_cached = T2ITask.compute_loss(cached, adapter, unet, unet, b_cached, step_generator(0, 0, 0, 0))
        mse = {"mse/policy", "mse/ref"} if "rankdpo" in recipe else {"mse/policy_chosen", "mse/policy_rejected"}
        assert mse <= set(m_plain) and set(m_cached) == set(m_plain)
        for key in mse:
            torch.testing.assert_close(m_cached[key], m_plain[key], rtol=1e-5, atol=1e-7)
