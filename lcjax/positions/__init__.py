"""Position encodings and length extension.

* ``rope``: rotary embeddings and their scalings (PI, NTK, dynamic NTK, YaRN,
  Llama 3, ABF), float32 / float64-accurate angles.
* ``augment``: E²-LLM training-time augmentation, V2PE position increments.
* ``dca``: Dual Chunk Attention (training-free extrapolation), prefill and decode.

See docs/positions.md.
"""
