"""Text-to-image diffusion (SD 1.x/2.x, SDXL, the toy world's pixel-space pipeline), everything that knows that
model family:

- `adapter`: components loading and `T2IAdapter`, a batch -> per-sample denoising errors (the adapter contract);
- `task`: the `t2i` training task and its config (Diffusion-DPO, MaPO, RankDPO, SFT through `mmalign.methods`);
- `cache`: the latent + text-embedding cache (`mmalign train CONFIG --cache-only`);
- `export`: the trained UNet / LoRA in the format diffusers reads, validation grids;
- `tiny`: tiny SD-1.x / SDXL pipelines built from configs.
"""
