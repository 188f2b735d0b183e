"""`mmalign bench toy-music` end to end at a tiny size (data, both conditions, evaluation, the report; finished stages
reused, other settings refused), its parts (the annotator's best vs worst, equal seeds, drift), and the toy music
pretraining script (teacher forcing as the adapter scores, exact resume, a loadable model under 3 MB)."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.cli import main
from mmalign.music.proof import best_and_worst, code_drift, compare, generate_codes, ground_truth

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from mmalign.music.tiny import build_tiny_musicgen

    return str(build_tiny_musicgen(tmp_path_factory.mktemp("toy_music_base") / "musicgen"))


def test_bench_toy_music_runs_every_stage_and_reuses_finished_ones(base, tmp_path, capsys):
    from mmalign.data.dataset import MusicPairDataset
    from mmalign.data.manifest import load_manifest
    from mmalign.train.metrics import read_metrics

    out = tmp_path / "bench"
    args = ["bench", "toy-music", "--out", str(out), "--base", base, "--seeds", "1", "--prompts", "10",
            "--samples-per-prompt", "3", "--eval-prompts", "6", "--gen-batch", "8", "--no-progress",
            "--rm-steps", "4", "train.max_steps=2", "train.batch_size=2"]
    assert main(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [(r["condition"], r["seed"]) for r in report["runs"]] == [("dpo", 0), ("sft", 0), ("rankdpo", 0)]
    for run in report["runs"]:
        assert set(run["gain"]) == {"pattern", "quality", "in_key", "sounding", "timbre"}
        assert 0 <= run["drift"]["codes"] <= 1 and 0 <= run["drift"]["notes"] <= 1
        for d in ("pattern", "quality"):
            w = run["win_rate"][d]
            assert 0 <= w["ci95"][0] <= w["value"] <= w["ci95"][1] <= 1 and w["n"] == 6
    # DPO starts at ln 2 (the LoRA starts at zero: policy == reference); SFT logs the chosen codes' NLL
    dpo = read_metrics(out / "runs" / "dpo-seed0" / "train")
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "sft/nll" in read_metrics(out / "runs" / "sft-seed0" / "train")[0]
    # rankdpo: each prompt's 3 samples as one list scored by their round-robin wins; ln 2 at step 0
    rank = read_metrics(out / "runs" / "rankdpo-seed0" / "train")
    assert rank[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rank[0]["ranked/num_pairs"] > 0
    from mmalign.data.dataset import MusicRankedDataset

    lists = list(MusicRankedDataset(str(out / "data" / "ranked"), shuffle=False, rank=0, world_size=1))
    assert len(lists) == report["data"]["train"]["ranked_lists"] > 0
    assert all(len(x["codes"]) == 3 and float(x["scores"].sum()) == 3.0 for x in lists)  # 3 games, 1 point each

    # the data stage: every prompt's pair is written or counted as a tie, and its numbers are the shards'
    data = report["data"]["train"]
    assert data["prompts"] == 10 and data["pairs_written"] + data["ties_dropped"] == 10
    manifest = load_manifest(out / "data" / "pairs")
    assert manifest.num_samples == data["pairs_written"] > 0
    assert manifest.conversion["ties_dropped"] == data["ties_dropped"]
    samples = list(MusicPairDataset(str(out / "data" / "pairs"), shuffle=False, rank=0, world_size=1))
    prompts = [s["prompt"] for s in samples]
    chosen = ground_truth(np.stack([s["chosen_codes"].numpy() for s in samples]), prompts)["pattern"]
    rejected = ground_truth(np.stack([s["rejected_codes"].numpy() for s in samples]), prompts)["pattern"]
    assert data["chosen_pattern"] == pytest.approx(chosen.mean())
    assert data["annotator_agrees_with_truth"] == pytest.approx((chosen > rejected).mean())
    # the learned reward model: trained on the annotator pairs, its accuracy measured on held-out annotator pairs
    rm, heldout = report["data"]["reward_model"], report["data"]["heldout"]
    assert "skipped" not in rm and rm["heldout_pairs"] == heldout["pairs_written"] > 0
    # ... trained on every pair of the round robin the annotator decided, which include each prompt's written pair
    rm_pairs = list(MusicPairDataset(str(out / "data" / "rm_pairs"), shuffle=False, rank=0, world_size=1))
    assert len(rm_pairs) == data["all_pairs_written"] and data["all_pairs_written"] + data["all_pairs_same"] == 30
    as_set = {(s["prompt"], s["chosen_codes"].numpy().tobytes(), s["rejected_codes"].numpy().tobytes())
              for s in rm_pairs}
    assert all((s["prompt"], s["chosen_codes"].numpy().tobytes(), s["rejected_codes"].numpy().tobytes()) in as_set
               for s in samples)
    assert rm["steps"] == 4 and json.loads((Path(rm["model"]) / "mmalign_scorer.json").read_text()
                                           )["config"]["codebooks"] == [0]
    assert load_manifest(out / "data" / "heldout_pairs").num_samples == rm["heldout_pairs"]
    assert 0 <= rm["heldout_accuracy"] <= 1 and (rm["heldout_accuracy"] * rm["heldout_pairs"] * 2) % 1 == 0
    from mmalign.rewards.registry import load_scorer

    held = list(MusicPairDataset(str(out / "data" / "heldout_pairs"), shuffle=False, rank=0, world_size=1))
    scorer = load_scorer(rm["model"])
    with torch.no_grad():
        r_w = scorer.score(torch.stack([s["chosen_codes"] for s in held]), [s["prompt"] for s in held])
        r_l = scorer.score(torch.stack([s["rejected_codes"] for s in held]), [s["prompt"] for s in held])
    assert rm["heldout_accuracy"] == pytest.approx(float(((r_w > r_l).double() + 0.5 * (r_w == r_l).double()).mean()))

    table = (out / "bench.md").read_text()
    assert "| dpo |" in table and "| sft |" in table and "Learned reward model: held-out pairwise accuracy" in table
    # a second call reuses every finished stage; other settings over the same folder are refused
    stamps = [(out / p).stat().st_mtime_ns for p in ("runs/dpo-seed0/eval.json", "eval/base_codes.npy",
                                                      "data/data.json")]
    assert main(args) == 0
    assert [(out / p).stat().st_mtime_ns for p in ("runs/dpo-seed0/eval.json", "eval/base_codes.npy",
                                                    "data/data.json")] == stamps
    with pytest.raises(SystemExit, match="other settings"):
        main([a if a != "10" else "12" for a in args])


def test_bench_toy_music_refuses_unknown_conditions_and_missing_bases(tmp_path, capsys):
    assert main(["bench", "toy-music", "--out", str(tmp_path), "--conditions", "flow_dpo"]) == 2
    assert "valid are dpo, sft" in capsys.readouterr().err
    assert main(["bench", "toy-music", "--out", str(tmp_path), "--base", str(tmp_path / "none")]) == 2
    assert "no base model" in capsys.readouterr().err
    assert main(["bench", "toy-music", "--out", str(tmp_path), "--samples-per-prompt", "1"]) == 2


def test_an_unchanged_model_reproduces_the_base_at_equal_seeds(base):
    from mmalign.music.adapter import apply_lora, load_music
    from mmalign.toy.music import music_prompt_seed_pairs

    pairs = music_prompt_seed_pairs("heldout", 6)
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    adapter = load_music(base)
    codes = generate_codes(adapter, prompts, seeds, batch=4, progress=False)
    assert codes.shape == (6, 4, 32) and codes.dtype == np.int64
    np.testing.assert_array_equal(generate_codes(adapter, prompts, seeds, batch=4, progress=False), codes)
    lora = load_music(base)
    lora.model = apply_lora(lora.model, rank=4)  # LoRA starts at zero: the same function
    same = generate_codes(lora, prompts, seeds, batch=4, progress=False)
    np.testing.assert_array_equal(same, codes)
    ev = compare(codes, same, prompts)
    assert ev["drift"] == {"codes": 0.0, "notes": 0.0} and ev["gain"]["pattern"] == 0.0
    assert ev["win_rate"]["pattern"]["value"] == 0.5 and ev["win_rate"]["pattern"]["ties"] == 6
    other = generate_codes(adapter, prompts, [s + 1 for s in seeds], batch=4, progress=False)
    assert code_drift(codes, other)["codes"] > 0.5  # other seeds, other codes: the check above can fail


def test_code_drift_counts_codes_and_notes():
    from mmalign.toy.music import sample_phrases

    a = np.stack([p.render() for p in sample_phrases(2, 0)])
    b = a.copy()
    b[0, 2, 5] = (b[0, 2, 5] + 1) % 64  # one timbre token
    assert code_drift(a, b) == {"codes": pytest.approx(1 / 256), "notes": 0.0}
    b[1, 0, 8:11] = (b[1, 0, 8:11] % 63) + 1  # three of note 2's four frames: that note changes
    assert code_drift(a, b) == {"codes": pytest.approx(4 / 256), "notes": pytest.approx(1 / 16)}
    with pytest.raises(ValueError, match="same shape"):
        code_drift(a, b[:1])


def test_best_and_worst_picks_the_annotators_winner_and_loser_and_orients_its_label():
    pattern = np.array([[0.1, 0.9, 0.5, 0.3],    # best 1, worst 0: the pair (0, 1)'s label is flipped
                        [0.5, 0.5, 0.5, 0.5],    # all tied: first and last, "same"
                        [0.2, 0.2, 1.0, 0.0]])   # best 2, worst 3
    quality = np.array([[0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3]])
    best, worst, labels = best_and_worst({"pattern": pattern, "quality": quality}, rng=0)
    assert best.tolist() == [1, 0, 2] and worst.tolist() == [0, 3, 3]
    assert [lab["pattern"] for lab in labels] == ["A", "same", "A"]
    # quality labels are oriented the same way: prompt 1's best (0.9) against worst (0.2)
    assert [lab["quality"] for lab in labels] == ["same", "A", "same"]


# ------------------------------------------------------------------------------------------------------ pretraining
def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_toy_music", REPO / "scripts" / "pretrain_toy_music.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretraining_loss_is_the_adapters_code_nll_and_unconditional_rows_ignore_the_text():
    from mmalign.music.adapter import MusicAdapter
    from mmalign.music.tiny import tiny_musicgen

    code_nll = _pretrain_module().code_nll
    model, tok = tiny_musicgen(width=32, layers=1, heads=2, text_width=16, text_layers=1)
    with torch.no_grad():  # sharpen the random heads so that what the decoder reads shows in the loss
        for head in model.decoder.lm_heads:
            head.weight.mul_(100.0)
    adapter = MusicAdapter(model, tok, "musicgen", "tiny")
    codes, captions, _ = _pretrain_module().phrase_batch(np.random.default_rng(0), 3, 0.5, 0.0)
    with torch.no_grad():
        direct = -adapter.logps(model, adapter.encode(captions, codes)).mean.mean()
        torch.testing.assert_close(code_nll(adapter, captions, codes), direct, rtol=0, atol=1e-6)
        torch.testing.assert_close(code_nll(adapter, captions, codes, torch.tensor([True] * 3)), direct, rtol=0,
                                   atol=1e-6)
        other = ["a descending flute melody in g minor"]
        with_text = [code_nll(adapter, c, codes[:1]).item() for c in (captions[:1], other)]
        without = [code_nll(adapter, c, codes[:1], torch.tensor([False])).item() for c in (captions[:1], other)]
        assert abs(with_text[0] - with_text[1]) > 1e-4 and without[0] == without[1]


def test_pretraining_resumes_exactly_and_saves_a_loadable_model_under_3_mb(tmp_path):
    from mmalign.music.adapter import load_music
    from mmalign.music.tiny import tiny_musicgen

    pretrain = _pretrain_module().main
    small = ["--batch-size", "4", "--eval-prompts", "4", "--eval-batch", "4", "--eval-every", "0", "--threads", "1",
             "--warmup", "2"]
    assert pretrain(["--steps", "2", "--out", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "ck"), *small]) == 0
    assert pretrain(["--steps", "3", "--resume", "--out", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "ck"),
                     *small]) == 0
    assert pretrain(["--steps", "3", "--out", str(tmp_path / "b"), "--ckpt-dir", str(tmp_path / "ck2"), *small]) == 0
    with pytest.raises(SystemExit):  # another model over the same checkpoint is refused, not silently mixed
        pretrain(["--steps", "4", "--resume", "--width", "64", "--out", str(tmp_path / "c"), "--ckpt-dir",
                  str(tmp_path / "ck"), *small])
    ra, rb = (json.loads((tmp_path / d / "pretrain.json").read_text()) for d in ("a", "b"))
    assert ra["steps_done"] == rb["steps_done"] == 3
    resumed, straight = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("ck", "ck2"))
    assert resumed["losses"] == straight["losses"] and len(straight["losses"]) == 3
    for k, v in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][k], v, atol=0, rtol=0)
    assert straight["losses"][0] == pytest.approx(math.log(64), abs=0.1)  # a fresh model: about uniform codes
    assert ra["saved_bytes"] < 3_000_000
    h = ra["heldout"]
    assert all(0 <= h[k] <= 1 for k in ("pattern", "quality", "in_key", "sounding", "timbre", "pattern_chance"))
    assert 0.45 < ra["reference_pattern"]["data"] < 0.6 and 0.2 < ra["reference_pattern"]["chance"] < 0.35
    adapter = load_music(str(tmp_path / "a"))
    assert (adapter.num_codebooks, adapter.vocab_size, adapter.decoder.config.num_hidden_layers) == (4, 64, 3)
    assert adapter.model.generation_config.top_k == 0  # generate samples from π itself by default
    fresh, _ = tiny_musicgen(width=96, layers=3, heads=4, ffn_dim=192, text_width=32, text_layers=1, seed=0)
    for k, v in fresh.text_encoder.state_dict().items():  # the text encoder stays frozen
        torch.testing.assert_close(adapter.model.text_encoder.state_dict()[k], v, atol=0, rtol=0)
    assert not torch.equal(adapter.decoder.lm_heads[0].weight, fresh.decoder.lm_heads[0].weight)
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "Ground truth on held-out prompts" in card and "| guidance 3 |" in card
    assert np.load(tmp_path / "a" / "samples.npy").shape == (4, 4, 32)
