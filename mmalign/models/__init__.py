"""Model plumbing every modality shares: reading a model folder or hub id (`loading`, one error class), the
reference model (`reference`: `lora | copy | precomputed | none`), and the adapter contract (`contract`: what an
adapter hands to the method table).

Nothing here imports a modality package; the modality folders (`mmalign.t2i`, `mmalign.vlm`, ...) import this.
"""
