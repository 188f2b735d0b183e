"""`mmalign bench toy-video` end to end at a tiny size: data, the learned video reward model, offline and online
conditions, the report, the table and the clips; finished stages are reused, other settings refused."""

import json

import pytest

from mmalign.cli import main


def test_bench_toy_video_runs_every_stage_and_reuses_finished_ones(toy_video, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "toy-video", "--out", str(out), "--base", toy_video, "--conditions",
            "flow_dpo,flow_rwr,online_learned", "--seeds", "1", "--pairs", "12", "--eval-prompts", "6",
            "--sample-steps", "3", "--rm-steps", "2", "--online-steps", "2", "--no-progress", "train.max_steps=2"]
    assert main(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["condition"] for r in report["runs"]] == ["flow_dpo", "flow_rwr", "online_learned"]
    for run in report["runs"]:
        assert set(run["gain"]) >= {"VQ", "MQ", "TA", "color", "total"} and run["drift"] >= 0
        lo, hi = run["win_rate"]["total"]["ci95"]
        assert 0 <= lo <= run["win_rate"]["total"]["value"] <= hi <= 1
    assert report["data"]["train"]["pairs"] == 12
    assert set(report["data"]["reward_model"]["heldout_accuracy"]) >= {"VQ", "MQ", "TA"}
    # the learned model drove the online run
    rows = [json.loads(line) for line in
            (out / "runs" / "online_learned-seed0" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("online/toy_video_rm/") for k in rows[0])
    table = (out / "bench.md").read_text()
    assert "| flow_dpo |" in table and "| online_learned |" in table
    assert (out / "samples.gif").stat().st_size > 0 and (out / "samples.png").is_file()
    # a second call reuses every finished run; other settings over the same folder are refused
    before = (out / "runs" / "flow_dpo-seed0" / "eval.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "runs" / "flow_dpo-seed0" / "eval.json").stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match="other settings"):
        main([a if a != "12" else "16" for a in args])


def test_bench_toy_video_refuses_unknown_conditions_and_missing_bases(tmp_path, capsys):
    assert main(["bench", "toy-video", "--out", str(tmp_path), "--conditions", "dpo"]) == 2
    assert "valid are flow_dpo" in capsys.readouterr().err
    assert main(["bench", "toy-video", "--out", str(tmp_path), "--base", str(tmp_path / "none")]) == 2
    assert "no base model" in capsys.readouterr().err
