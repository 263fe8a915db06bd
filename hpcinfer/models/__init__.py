"""Model families (one file each), the registry with ``load_model``, and our weight loader.

Public entry points: ``hpcinfer.models.registry.load_model``,
``hpcinfer.models.registry.supported_architectures`` and ``hpcinfer.models.spec.ModelSpec``.
Nothing is imported here so that ``import hpcinfer.models`` stays cheap.
"""
