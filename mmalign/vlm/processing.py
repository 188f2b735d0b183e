"""VLM prompt and processor handling: chat turns, model families, processors, a pair batch's rows.

Prompts are chat turns in the parts form (`{"role", "content": [{"type": "image"} | {"type": "text", "text"}]}`);
the model's processor expands each image part into the image's tokens. Families (`FAMILIES`) share module names,
image-token accounting and processor handling.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

from mmalign.models.loading import ModelLoadError

# model_type -> family. Families share module names, image-token accounting and processor handling.
FAMILIES = {"llava": "llava", "llava_next": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl"}


class ImageTokenMismatchError(ValueError):
    """A sample's image tokens do not match what its images need; raised before any forward."""


# -- chat turns ------------------------------------------------------------------------------------------------
def normalize_turns(turns: str | Sequence[dict], n_images: int, key: str = "?") -> list[dict]:
    """Chat turns in the parts form `{"role", "content": [{"type": "image"} | {"type": "text", "text"}]}`.

    A string becomes one user turn. When no turn holds an image part, the `n_images` image parts are put before the
    text of the first user turn (the LLaVA convention). The number of image parts must equal `n_images`.
    """
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    out: list[dict] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"sample {key}: prompt turn {i} must be {{'role', 'content'}}, got {turn!r}")
        content = turn["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]
        for p in parts:
            if p.get("type") not in ("image", "text"):
                raise ValueError(f"sample {key}: prompt turn {i} has a part of type {p.get('type')!r}; valid "
                                 "part types are 'image' and 'text'")
        out.append({"role": turn["role"], "content": parts})
    n_parts = sum(p["type"] == "image" for t in out for p in t["content"])
    if n_parts == 0 and n_images:
        first_user = next((t for t in out if t["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"sample {key}: the prompt has no user turn to attach its {n_images} image(s) to")
        first_user["content"] = [{"type": "image"}] * n_images + first_user["content"]
    elif n_parts != n_images:
        raise ImageTokenMismatchError(f"sample {key}: the prompt has {n_parts} image part(s) but the sample has "
                                      f"{n_images} image(s); give one {{'type': 'image'}} part per image")
    return out



def pair_rows(batch: dict[str, Any], rejected_images: bool = False) -> tuple[list, list, list, list[str]]:
    """A `collate_vlm_pairs` batch -> (prompts, images, responses, keys) stacked as [chosen; rejected]
    (+ [chosen under rejected_images] when asked and present)."""
    prompts, images, chosen, rejected = batch["prompts"], batch["images"], batch["chosen"], batch["rejected"]
    keys = list(batch["keys"])
    out_p, out_i, out_r = prompts + prompts, images + images, chosen + rejected
    out_k = [f"{k}:chosen" for k in keys] + [f"{k}:rejected" for k in keys]
    if rejected_images:
        missing = [k for k, ims in zip(keys, batch["rejected_images"]) if not ims]
        if missing:
            raise ValueError(f"samples {missing[:5]} have no rejected.<i>.<img> images but rejected_images is on")
        out_p, out_i, out_r = out_p + prompts, out_i + batch["rejected_images"], out_r + chosen
        out_k = out_k + [f"{k}:chosen_under_rejected_image" for k in keys]
    return out_p, out_i, out_r, out_k


# -- families and processors -----------------------------------------------------------------------------------
def family_of(model_type: str) -> str:
    if model_type not in FAMILIES:
        raise ModelLoadError(f"model_type {model_type!r} is not a supported VLM; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


@functools.lru_cache(maxsize=None)
def image_only_qwen2_vl_processor_class():
    """`Qwen2VLProcessor` without its video processor, which needs torchvision (a CUDA build on CPU-only
    installs, see ENV-NOTES); its image processor is the PIL backend. Saved folders still name
    `Qwen2VLProcessor`, so they load with `AutoProcessor` where torchvision is installed."""
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def save_pretrained(self, save_directory, **kwargs):
            out = super().save_pretrained(save_directory, **kwargs)
            for name in ("processor_config.json", "tokenizer_config.json"):
                path = Path(save_directory) / name
                if path.is_file():
                    doc = json.loads(path.read_text())
                    if doc.get("processor_class") == type(self).__name__:
                        doc["processor_class"] = "Qwen2VLProcessor"
                        path.write_text(json.dumps(doc, indent=2) + "\n")
            return out

    return Qwen2VLImageOnlyProcessor


def load_processor(pretrained: str, family: str, revision: str | None = None):
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if family == "qwen2_vl" and not is_torchvision_available():
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pretrained, revision=revision)
        image_processor = AutoImageProcessor.from_pretrained(pretrained, revision=revision, backend="pil")
        processor = image_only_qwen2_vl_processor_class()(image_processor, tokenizer,
                                                          chat_template=tokenizer.chat_template)
    else:
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
    tok = processor.tokenizer
    if len(tok) < 3 or tok.eos_token_id is None:
        # Offline, a missing hub tokenizer can come back nearly empty instead of raising.
        raise ModelLoadError(f"{pretrained}: the tokenizer loaded with {len(tok)} tokens and eos "
                           f"{tok.eos_token!r}; the model folder's tokenizer files are missing or broken")
    if processor.chat_template is None:
        raise ModelLoadError(f"{pretrained}: the processor has no chat template (chat_template.jinja or "
                           "chat_template.json in the model folder)")
    return processor
