"""The maths of sampling steps that guidance (and later SPO) need beside diffusers' schedulers: what a model's
prediction says about the clean sample and the noise, for each family. One algorithm family per module:
`diffusion` (DDPM/DDIM/Euler-style schedulers over a variance-preserving process), `flow` (rectified flow).

Stochastic steps as Gaussian transitions with their log-densities, for SPO / RL on single steps (`gaussian` holds
the shared return type `GaussianStep` and the log-density convention, mean over elements): `ddim`
(`ddim_step_with_logprob`, a `DDIMScheduler` step) and `flow_sde` (`sde_step_with_logprob`, Flow-GRPO's SDE).

These are pure tensor functions; the sampling loops that use them are written out in `mmalign.guidance.sample`.
"""
