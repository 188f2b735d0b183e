"""The exported text-to-image model, read the way users read it: a LoRA trained with any alpha, rank, dropout and
target list reloads into plain diffusers (and plain peft) as exactly the trained model; the model card; the hub
upload (offline: up to the point of upload)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmalign.config import ConfigError, load_config
from mmalign.t2i.task import T2ITrainConfig
from mmalign.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "tiny"
LORA = ["model.lora.rank=4", "model.lora.alpha=16", "model.lora.dropout=0.1",
        "model.lora.target_modules=[to_q, to_v, to_out.0, conv1, conv2]"]
# recipe, base model, pipeline class, UNet inputs beside (x, t, encoder_hidden_states)
MODELS = {"sd15": ("t2i_dpo_lora.yaml", "StableDiffusionPipeline", 32, None),
          "sdxl": ("t2i_dpo_sdxl.yaml", "StableDiffusionXLPipeline", 48, 32)}


def run_cfg(recipe, run, *overrides):
    return load_config(T2ITrainConfig, CONFIGS / recipe, [f"run.output_dir={run}", "train.progress=false",
                                                          "validation.prompts=[]", *overrides])


def unet_inputs(cross_dim, pooled_dim):
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]), torch.randn(2, 7, cross_dim, generator=g)
    extra = {} if pooled_dim is None else {"added_cond_kwargs": {
        "text_embeds": torch.randn(2, pooled_dim, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}}
    return x, t, c, extra


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_lora_with_alpha_rank_dropout_and_conv_targets_reloads_as_the_trained_unet(model, precision, tmp_path,
                                                                                   request):
    """rank 4, alpha 16 (scale 4), dropout 0.1, attention and resnet convs: `load_lora_weights(folder)` on the base
    pipeline as loaded (no `.eval()` after it), and plain peft from the file alone, give the trained UNet's
    predictions in eval mode."""
    import diffusers
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    recipe, pipe_name, cross_dim, pooled_dim = MODELS[model]
    if precision != "no":
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # the precision is fixed at the first Accelerator
        request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    result = train(run_cfg(recipe, tmp_path / "run", "train.max_steps=2", "optim.lr=1e-2", "train.batch_size=2",
                           f"train.mixed_precision='{precision}'", *LORA))
    folder = result.outputs["lora"]
    base = str(ROOT / "assets" / "tiny" / model)
    x, t, c, extra = unet_inputs(cross_dim, pooled_dim)

    def predict(unet):
        """The UNet class's forward (past the autocast wrapper training leaves on the module). Under bf16 mixed
        precision the trainer's model is a bf16 base with fp32 LoRA weights under autocast: a loaded one is cast
        the same way, so the comparison is exact in both precisions."""
        if precision == "bf16":
            for name, p in unet.named_parameters():
                p.data = p.data.float() if "lora_" in name else p.data.to(torch.bfloat16)
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), autocast:
            return type(unet).forward(unet, x, t, c, **extra).sample.float()

    want = predict(result.module.eval())
    pipe = getattr(diffusers, pipe_name).from_pretrained(base)
    with torch.no_grad():
        untrained = pipe.unet(x, t, c, **extra).sample
    assert (want - untrained).abs().max() > 1e-3  # training moved the model (a scale error would show)
    pipe.load_lora_weights(folder)  # as users load it: no .eval() after (the LoRA modules come in training mode)
    torch.testing.assert_close(predict(pipe.unet), want, rtol=1e-5, atol=1e-5)

    # plain peft: the LoraConfig from the file's header, the weights with their `unet.` prefix removed
    path = Path(folder) / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    meta = {k.removeprefix("unet."): v for k, v in json.loads(header["lora_adapter_metadata"]).items()
            if k.startswith("unet.")}
    # dropout is training-only: diffusers adds the LoRA modules in training mode, so a stored 0.1 would drop
    # activations while generating
    assert (meta["r"], meta["lora_alpha"], meta["lora_dropout"]) == (4, 16, 0.0)
    assert set(meta["target_modules"]) == {"to_q", "to_v", "to_out.0", "conv1", "conv2"}
    # only what rebuilds the LoRA: fields another peft version lacks would make LoraConfig(**meta) fail there
    assert "peft_version" not in meta and "base_model_name_or_path" not in meta and len(meta) <= 12
    unet = diffusers.UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    unet = inject_adapter_in_model(LoraConfig(**{k: v for k, v in meta.items() if k != "peft_type"}), unet)
    weights = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    assert not set_peft_model_state_dict(unet, weights).unexpected_keys
    torch.testing.assert_close(predict(unet), want, rtol=1e-5, atol=1e-5)


def test_model_card_grid_and_hub_upload_of_a_lora_run(tmp_path, monkeypatch):
    """`RUN/README.md` says what was trained how (diffusers-style front matter and tags), shows the final
    validation grid, and run.push_to_hub uploads the LoRA (at the repo root), the card and the grid in one commit
    (HfApi mocked: no network)."""
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: calls.setdefault(
        "commit", (repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations])) and "https://hub/c/1")
    run = tmp_path / "run"
    result = train(load_config(T2ITrainConfig, CONFIGS / "t2i_dpo_lora.yaml", [
        f"run.output_dir={run}", "train.progress=false", "train.max_steps=2", "train.batch_size=2",
        "validation.prompts=[a red circle]", "validation.images_per_prompt=1", "validation.num_inference_steps=1",
        "run.push_to_hub=true", "run.hub_model_id=me/tiny-dpo-lora", *LORA]))
    card = (run / "README.md").read_text()
    front = card.split("---")[1]
    # a local base folder is named in the body, not as base_model (the Hub refuses a card naming a local path)
    assert "base_model" not in front and "| base model | `assets/tiny/sd15`" in card
    from mmalign.t2i.export import _base_model_line

    assert _base_model_line("stabilityai/stable-diffusion-xl-base-1.0") == [
        'base_model: "stabilityai/stable-diffusion-xl-base-1.0"']
    assert _base_model_line("not a hub id: #1") == []
    assert all(f"- {tag}" in front for tag in ("text-to-image", "diffusers", "lora", "mmalign", "dpo"))
    for fact in ("loss_type `sigmoid`", "β 5000", "rank 4, alpha 16 (scale 4), dropout 0.1 (training only)",
                 "`conv1`", "`assets/tiny/pairs`", "2 optimizer steps", "## Final metrics (step 2)",
                 "| rewards/accuracies |", "![validation grid](validation_grid.png)", "'a red circle'",
                 "pipe.load_lora_weights('me/tiny-dpo-lora')"):
        assert fact in card, fact
    # the grid of the final validation (which runs after the model is saved) is the one next to the card
    assert (run / "validation_grid.png").read_bytes() == Path(result.outputs["grid"]).read_bytes()
    assert result.outputs["card"] == str(run / "README.md") and result.outputs["hub"] == "https://hub/c/1"
    assert calls["repo"] == ("me/tiny-dpo-lora", {"repo_type": "model", "exist_ok": True})
    repo, files = calls["commit"]
    assert repo == "me/tiny-dpo-lora"
    assert sorted(p for p, _ in files) == ["README.md", "pytorch_lora_weights.safetensors", "validation_grid.png"]
    assert dict(files)["pytorch_lora_weights.safetensors"] == str(run / "lora" / "pytorch_lora_weights.safetensors")


def test_full_fine_tune_card_and_offline_upload_fails_clearly(tmp_path, monkeypatch):
    """A full fine-tune's card points at `unet/`; with the hub offline the upload is attempted and fails with an
    error that names the repo and says the run's files are kept."""
    from huggingface_hub import constants

    from mmalign.t2i.export import push_to_hub, write_model_card
    from mmalign.train.trainer import TrainingError

    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    (run / "unet" / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 0.5}) + "\n")
    cfg = load_config(T2ITrainConfig, CONFIGS / "t2i_dpo.yaml", [f"run.output_dir={run}", "train.ema=true",
                                                                 "method.beta=2500"])
    card = write_model_card(cfg, run).read_text()
    assert "- full-fine-tune" in card and "- lora" not in card and "β 2500" in card
    assert "EMA weights" in card and "## Final metrics (step 7)" in card and "| loss | 0.5 |" in card
    assert f"UNet2DConditionModel.from_pretrained({str(run / 'unet')!r})" in card and "## Samples" not in card
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TrainingError, match=r"'me/full'.*saved in"):
        push_to_hub("me/full", run, {"unet": str(run / "unet")})


def test_push_to_hub_without_a_repo_id_is_a_config_error():
    with pytest.raises(ConfigError, match="run.hub_model_id"):
        run_cfg("t2i_dpo_lora.yaml", "/tmp/unused", "run.push_to_hub=true")
    assert run_cfg("t2i_dpo_lora.yaml", "/tmp/unused", "run.push_to_hub=true",
                   "run.hub_model_id=me/x").run.hub_model_id == "me/x"


def test_push_to_hub_is_refused_before_training_by_tasks_that_do_not_upload(tmp_path):
    from mmalign.train.tasks import load_train_config
    from mmalign.train.trainer import TrainingError, train

    root = Path(__file__).resolve().parents[1]
    cfg = load_train_config(root / "configs" / "reward" / "toy_clip.yaml",
                            [f"run.output_dir={tmp_path / 'run'}", "run.push_to_hub=true", "run.hub_model_id=me/x"])
    with pytest.raises(TrainingError, match="run.push_to_hub: task 'reward' writes no model card"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_attach_lora_freezes_the_base_keeps_lora_float32_and_records_alpha():
    """Under a bf16 base: the base is frozen and cast, the returned parameters are exactly the LoRA A/B weights of
    the targets, in float32; alpha != rank is what the peft config (and so the exported metadata) holds; gaussian
    init starts B at zero (the adapted model starts as the base); alpha None means alpha = rank."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.loaders import PeftAdapterMixin

    from mmalign.models.lora import attach_lora, lora_metadata

    class Tiny(ModelMixin, ConfigMixin, PeftAdapterMixin):  # the mixins diffusers' UNet and transformers carry
        @register_to_config
        def __init__(self):
            super().__init__()
            self.to_q, self.to_v, self.proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    model = Tiny()
    params = attach_lora(model, rank=4, alpha=16.0, dropout=0.1, target_modules=["to_q", "to_v"], device="cpu",
                         weight_dtype=torch.bfloat16)
    named = dict(model.named_parameters())
    lora = {n for n in named if "lora_" in n}
    assert lora == {f"{m}.lora_{ab}.default.weight" for m in ("to_q", "to_v") for ab in "AB"}
    assert {id(p) for p in params} == {id(named[n]) for n in lora}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    base = [p for n, p in named.items() if n not in lora]
    assert len(base) == 6 and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert all(named[f"{m}.lora_B.default.weight"].abs().max() == 0 for m in ("to_q", "to_v"))
    assert named["to_q.lora_A.default.weight"].abs().max() > 0
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (4, 16.0, 0.1, "gaussian")
    assert model.to_q.scaling["default"] == 4.0
    assert (lora_metadata(model)["r"], lora_metadata(model)["lora_alpha"]) == (4, 16.0)

    same = Tiny()
    attach_lora(same, rank=4, alpha=None, dropout=0.0, target_modules=["to_q"], device="cpu",
                weight_dtype=torch.float32)
    assert same.peft_config["default"].lora_alpha == 4 and same.to_q.scaling["default"] == 1.0
