"""Quantized linear layers: one method object per format, chosen from quantization_config.

``config`` (pure Python) reads the checkpoint's config into a QuantSpec and holds the checks the
login side shares; ``base`` the method interface; ``fp8`` and ``int4`` the methods; ``mxfp4`` the
gpt-oss experts' MXFP4, dequantized at load;
``reference`` the torch dequantization every path is checked against; ``apply`` swaps the
methods into a model built on the meta device. Nothing here imports torch at package import.
"""
