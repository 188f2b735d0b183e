"""Vision-language models beyond the adapter (`mmalign.adapters.vlm`):

- `loss`: the VLM preference objective on a `vlm_pair` batch (DPO family, SFT term, rejected images, online BDHS);
- `task`: the `vlm` training task of the one training loop;
- `tiny`: tiny LLaVA / Qwen2-VL models built from configs (tests, the toy VLM, benchmarks);
- `toy`: the toy VLM world (training data, hallucination metrics);
- `proof`: `mmalign eval vlm-toy`, the toy proof over seeds.
"""
