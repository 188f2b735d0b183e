"""Flow matching (`task: flow`) on 2 CPU processes (gloo, torchrun): the tiny Wan recipe trains on disjoint video
pairs per process, starts at ln 2, keeps the LoRA identical on both processes and saves it once."""

import json
import math
from pathlib import Path

import pytest
import torch
from dist_helpers import torchrun2

ROOT = Path(__file__).resolve().parents[1]

DIST_SCRIPT = """
import hashlib, json, sys
import torch
from mmalign.train.tasks import load_train_config
from mmalign.train.trainer import train

cfg = load_train_config(sys.argv[1], sys.argv[2:])
res = train(cfg)
trainable = [p for p in res.module.parameters() if p.requires_grad]
digest = hashlib.sha256(b"".join(p.detach().float().numpy().tobytes() for p in trainable)).hexdigest()
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
json.dump({"rank": rank, "world": world, "step": res.global_step, "keys": res.keys_seen, "digest": digest,
           "outputs": res.outputs, "nonfinite": res.nonfinite_steps},
          open(f"{cfg.run.output_dir}/rank{rank}.json", "w"))
"""


@pytest.mark.distributed
def test_two_process_wan_flow_dpo_starts_at_ln2_syncs_and_saves_the_lora(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    run = tmp_path / "run"
    torchrun2(script, ROOT / "configs" / "tiny" / "flow_dpo_wan.yaml", f"run.output_dir={run}", "train.max_steps=2",
              "train.batch_size=2", "train.progress=false", "train.checkpoint_every=0", timeout=600)
    r0, r1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2  # both processes ran
    assert r0["step"] == r1["step"] == 2 and r0["nonfinite"] == r1["nonfinite"] == 0  # the run finished
    assert len(r0["keys"]) == len(r1["keys"]) == 4 and not set(r0["keys"]) & set(r1["keys"])  # disjoint pairs
    assert r0["digest"] == r1["digest"]  # the LoRA gradients were synchronised
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0, on both
    assert all(math.isfinite(r["loss"]) for r in rows)
    # The LoRA is written once, by the main process, and it trained away from its zero-initialised up-projections.
    assert r0["outputs"] == {"lora": str(run / "lora")} and r1["outputs"] == {}
    weights = load_file(str(next((run / "lora").glob("*.safetensors"))))
    ups = [v for k, v in weights.items() if "lora_B" in k]
    assert ups and all(torch.isfinite(v).all() for v in weights.values())
    assert max(float(v.abs().max()) for v in ups) > 0


@pytest.mark.distributed
@pytest.mark.parametrize("min_gap", [0.0, 100.0])
def test_two_process_online_flow_dpo_deals_prompts_refreshes_and_never_hangs_on_empty_groups(tmp_path, min_gap):
    """Online Flow-DPO on 2 processes: each samples its own prompts, the LoRA and the refreshed reference stay in
    step. With a reward gap no group can reach (min_gap 100) every process still runs its passes with the loss
    times 0, so DDP cannot hang on a process that had nothing to train."""
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    run = tmp_path / "run"
    torchrun2(script, ROOT / "configs" / "tiny" / "flow_dpo_online_toy_video.yaml", f"run.output_dir={run}",
              "train.max_steps=2", "train.batch_size=2", "train.progress=false", "train.checkpoint_every=0",
              "online.num_samples=2", "online.steps=2", "online.ref_update_every=1", f"online.min_gap={min_gap}",
              timeout=600)
    r0, r1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] == 2 and r0["nonfinite"] == r1["nonfinite"] == 0
    assert not set(r0["keys"]) & set(r1["keys"])  # the processes drew different prompts
    assert r0["digest"] == r1["digest"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if min_gap == 0.0:  # ln 2 at the start and again after the reference moved to the policy
        assert [r["loss"] for r in rows] == pytest.approx([math.log(2)] * 2, abs=1e-6)
        assert all(r["online/groups_skipped"] == 0 for r in rows)
    else:
        assert all(r["loss"] == 0.0 and r["online/groups_skipped"] == 2 for r in rows)
