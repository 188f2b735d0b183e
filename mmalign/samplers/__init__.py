"""The maths of sampling steps that guidance (and later SPO) need beside diffusers' schedulers: what a model's
prediction says about the clean sample and the noise, for each family. One algorithm family per module:
`diffusion` (DDPM/DDIM/Euler-style schedulers over a variance-preserving process), `flow` (rectified flow).

These are pure tensor functions; the sampling loops that use them are written out in `mmalign.guidance.sample`.
"""
