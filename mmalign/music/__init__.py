"""Music tokens (MusicGen-class: K EnCodec codebooks generated with the delay pattern), everything that knows that
model family:

- `adapter`: loading (`load_music`), `MusicAdapter` (a batch of codes -> their log-probability exactly as
  generation sees it: the adapter contract; generation that returns codes);
- `codes`: which codes a model can score (`code_problem`) and the shard reader that skips the others;
- `reference_cache`: reference log-probs precomputed into the shards' cache (`reference: precomputed`);
- `task`: the `music` training task, its config and objective (DPO family and SFT through `mmalign.methods`);
- `tiny`: tiny MusicGen models built from configs (tests, tiny recipes).
"""
