"""Tools around the runtime: ``demo`` (stock transformers and the packed model generating
side by side) and ``random_model`` (random-weight models at real shapes, e.g. Llama-3-8B's,
written as a HF directory: the stand-in for checkpoints the offline hub lacks).
"""
