"""Vision-language models (LLaVA-1.5/1.6, Qwen2-VL), everything that knows that model family:

- `adapter`: loading (`load_vlm`), `VLMAdapter` (a batch -> response log-probs: the adapter contract; generation);
- `processing`: chat turns, families, processors, a pair batch's rows;
- `logprobs`: response log-probability arithmetic;
- `reference_cache`: reference log-probs precomputed into the shards' cache (`reference: precomputed`);
- `task`: the `vlm` training task, its config and objective (DPO family through `mmalign.methods`, SFT term,
  rejected images, online BDHS);
- `tiny`: tiny LLaVA / Qwen2-VL models built from configs (tests, the toy VLM, benchmarks);
- `toy`: the toy VLM world (training data, hallucination metrics);
- `proof`: `mmalign eval vlm-toy`, the toy proof over seeds.
"""
