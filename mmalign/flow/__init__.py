"""Flow-matching (rectified-flow) image and video models: SD3-, Wan-, LTX-class. So far: tiny test pipelines."""
