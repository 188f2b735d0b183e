"""Tiny LLaVA-style (1.5 and 1.6/NeXT) and Qwen2-VL-style models built from configs, for tests, the toy VLM and
CPU benchmarks.

They are the real transformers classes (`LlavaForConditionalGeneration` + `LlavaProcessor`,
`LlavaNextForConditionalGeneration` + `LlavaNextProcessor`, `Qwen2VLForConditionalGeneration` +
`Qwen2VLProcessor`) with small widths, a byte-level BPE tokenizer trained in code (it round-trips any text;
toy-world words become single tokens) and a chat template in the family's style.
`save_pretrained` writes a folder that `mmalign.vlm.adapter.load_vlm` loads through the same
`from_pretrained` code a real checkpoint uses. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch

# Text the tokenizer's merges are learnt from: the toy world's captions and the prompts mmalign ships.
TOY_CORPUS = (
    "a red green blue yellow circle square triangle on the left center right",
    "describe the image describe the image in detail step by step what is in the image",
    "image description yes no there is the scene shows",
)

# LLaVA-1.5 style: "USER: <image>\n{text} ASSISTANT: {answer}</s>" (images of a turn first, then its text).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2-VL style (ChatML with vision markers).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAVA_SPECIAL = ("<pad>", "<s>", "</s>", "<image>")
QWEN2_VL_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>")


def bpe_tokenizer(special: Iterable[str], corpus: Iterable[str] = TOY_CORPUS, vocab_size: int = 400,
                  **special_roles: str):
    """A byte-level BPE `PreTrainedTokenizerFast` trained in memory on `corpus` (deterministic).

    The 256 byte symbols are all in the vocabulary, so any text round-trips; frequent corpus words (with their
    leading space) become single tokens. `special` are added as special tokens first (ids 0..), and
    `special_roles` (e.g. `eos_token="</s>"`) name their roles.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = list(special)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Each word is also seen with a leading space, as it appears inside sentences.
    lines = [line for text in corpus for line in (text, " " + text)]
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_roles)


def _llava_parts(image_size: int, patch_size: int, vision_width: int, text_width: int, vision_layers: int,
                 text_layers: int, heads: int, corpus: Iterable[str], max_positions: int):
    """(tokenizer, CLIP vision config, Llama text config) shared by the tiny LLaVA and LLaVA-NeXT builders."""
    from transformers import CLIPVisionConfig, LlamaConfig

    tokenizer = bpe_tokenizer(LLAVA_SPECIAL, corpus, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.padding_side = "left"
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_width)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer, vision, text


def _seeded_model(model_class, config, tokenizer, seed: int):
    """`model_class(config)` initialised under `seed`, in eval mode, generating with the tokenizer's pad / eos."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_llava(image_size: int = 32, patch_size: int = 4, vision_width: int = 64, text_width: int = 128,
               vision_layers: int = 2, text_layers: int = 2, heads: int = 4, seed: int = 0,
               corpus: Iterable[str] = TOY_CORPUS):
    """(model, processor): a tiny `LlavaForConditionalGeneration` and its `LlavaProcessor`.

    The CLIP tower sees `image_size` px in `(image_size / patch_size)^2` patches; every patch becomes one image
    token (`vision_feature_select_strategy="default"` drops CLS). With a 2-layer tower the features come from the
    last layer (`vision_feature_layer=-1`; the default -2 would pick layer 1).
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer, vision, text = _llava_parts(image_size, patch_size, vision_width, text_width, vision_layers,
                                           text_layers, heads, corpus, max_positions=512)
    n_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=n_tokens,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _seeded_model(LlavaForConditionalGeneration, config, tokenizer, seed)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    return model, processor


def tiny_llava_next(image_size: int = 32, patch_size: int = 8, vision_width: int = 32, text_width: int = 64,
                    vision_layers: int = 2, text_layers: int = 2, heads: int = 4, seed: int = 0,
                    corpus: Iterable[str] = TOY_CORPUS):
    """(model, processor): a tiny `LlavaNextForConditionalGeneration` (LLaVA-1.6 style: any-resolution tiling
    over the grid pinpoints 1x1, 1x2, 2x1, 2x2 tiles of `image_size`) and its `LlavaNextProcessor`."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer, vision, text = _llava_parts(image_size, patch_size, vision_width, text_width, vision_layers,
                                           text_layers, heads, corpus, max_positions=1024)
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size],
                 [2 * image_size, 2 * image_size]]
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                             vision_feature_select_strategy="default",
                             image_seq_length=(image_size // patch_size) ** 2)
    model = _seeded_model(LlavaNextForConditionalGeneration, config, tokenizer, seed)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                                   num_additional_image_tokens=1)
    return model, processor


def tiny_qwen2_vl(image_size: int = 56, patch_size: int = 14, merge_size: int = 2, vision_width: int = 32,
                  text_width: int = 64, vision_layers: int = 1, text_layers: int = 2, heads: int = 4,
                  seed: int = 0, corpus: Iterable[str] = TOY_CORPUS):
    """(model, processor): a tiny `Qwen2VLForConditionalGeneration` and its `Qwen2VLProcessor`.

    Images are resized to exactly `image_size`^2 pixels (min_pixels = max_pixels), giving
    `(image_size / patch_size / merge_size)^2` image tokens. The image processor is the PIL backend, so no
    torchvision is needed (see ENV-NOTES: torchvision is a CUDA build on the CPU-only install).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmalign.vlm.processing import image_only_qwen2_vl_processor_class

    tokenizer = bpe_tokenizer(QWEN2_VL_SPECIAL, corpus, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.padding_side = "left"
    ids = tokenizer.convert_tokens_to_ids
    head_dim = text_width // heads
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}),
        vision_config=dict(depth=vision_layers, embed_dim=vision_width, hidden_size=text_width, mlp_ratio=2,
                           num_heads=heads, patch_size=patch_size, spatial_merge_size=merge_size,
                           temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    model = _seeded_model(Qwen2VLForConditionalGeneration, config, tokenizer, seed)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size,
                                               merge_size=merge_size, temporal_patch_size=2)
    processor = image_only_qwen2_vl_processor_class()(image_processor, tokenizer,
                                                      chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return model, processor


def build_tiny_vlm(out_dir: str | Path, family: Literal["llava", "llava_next", "qwen2_vl"] = "llava",
                   **kwargs) -> Path:
    """Build a tiny model of `family` and `save_pretrained` it (model + processor) into `out_dir`."""
    builders = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl}
    if family not in builders:
        raise ValueError(f"family {family!r}: valid families are {sorted(builders)}")
    model, processor = builders[family](**kwargs)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
