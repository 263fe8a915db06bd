"""Pipeline parallelism on the model side: keep only this stage's layers.

``prune_to_stage(model, stage)`` runs on the meta-device model, before any memory is
allocated: decoder layers outside ``[start_layer, end_layer)`` become ``MissingLayer`` (no
parameters), an untied embedding leaves every stage but the first and an untied LM head every
stage but the last. The model's layer container gets ``start_layer``/``end_layer`` (its
forward runs only those layers and, except on the last stage, returns the intermediate
tensors), and ``model.pp_owns_tensor(name)`` tells the loader which checkpoint tensors to read.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from hpcinfer.distributed.groups import PipelineStage


class MissingLayer(nn.Module):
    """A layer that lives on another pipeline stage."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer belongs to another pipeline stage")


def layer_container(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the module that holds the decoder ``layers`` ModuleList."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            return name, module
    raise ValueError(f"{type(model).__name__} has no decoder `layers` list: pipeline "
                     "parallelism does not support it")


def prune_to_stage(model: nn.Module, stage: PipelineStage) -> None:
    name, container = layer_container(model)
    prefix = f"{name}." if name else ""
    pruned: list[str] = []
    for i in range(len(container.layers)):
        if not stage.start_layer <= i < stage.end_layer:
            container.layers[i] = MissingLayer()
            pruned.append(f"{prefix}layers.{i}")
    container.start_layer, container.end_layer = stage.start_layer, stage.end_layer
    tied = getattr(model.config, "tie_word_embeddings", False)
    if not tied:  # a tied head needs the embedding's weight on the last stage too
        if not stage.is_first:
            container.embed_tokens = MissingLayer()
            pruned.append(f"{prefix}embed_tokens")
        if not stage.is_last:
            model.lm_head = MissingLayer()
            pruned.append("lm_head")
    prefixes = tuple(p + "." for p in pruned)
    model.pp_owns_tensor = lambda tensor_name: not tensor_name.startswith(prefixes)
    model.pp_stage = stage


def stage_spec(spec, stage: PipelineStage):
    """The ModelSpec of one stage: ``num_layers`` is the layers this rank holds KV for."""
    return dataclasses.replace(spec, num_layers=stage.end_layer - stage.start_layer)
