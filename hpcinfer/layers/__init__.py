"""Building blocks of the models: TP-ready linears and embeddings, rotary, norms, activations,
and attention behind one backend interface (``attention.py``). Elementwise ops go through
``ops.py``, the single switch point between torch references and GPU kernels."""
