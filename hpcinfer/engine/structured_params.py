"""StructuredOutputsParams: the constraint one request puts on its output (vLLM's names).

Exactly one constraint per request: a JSON schema (``json``), a regular expression
(``regex``), one of a list of strings (``choice``), an EBNF grammar (``grammar``, xgrammar's
GBNF dialect with a ``root`` rule) or any JSON object (``json_object=True``). The engine
compiles it with xgrammar (engine/structured.py); this module is plain data and imports
nothing heavy, so the job-file checks on the login side can use it.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's ``StructuredOutputsParams``. ``json`` is a schema as a dict or JSON text.

    ``disable_any_whitespace`` makes JSON output compact (no free whitespace between
    tokens): with small or untrained models it stops runs of whitespace from filling
    ``max_tokens``. ``disable_additional_properties`` is accepted for compatibility: objects
    without ``additionalProperties`` already take only their listed properties (xgrammar's
    strict mode). ``disable_fallback`` is accepted and has no effect (there is one backend).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    backend: str | None = field(default=None, repr=False)   # GuidedDecodingParams' field

    def __post_init__(self) -> None:
        given = [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError("structured outputs take exactly one constraint (json, regex, "
                             f"choice, grammar or json_object), got {what}")
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    @property
    def kind(self) -> str:
        """Which constraint is set: json, regex, choice, grammar or json_object."""
        return next(k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple:
        """What identifies the compiled grammar: the constraint's text and the options that
        change it (a dict schema keeps its key order: it fixes the order of the output)."""
        value = getattr(self, self.kind)
        if isinstance(value, dict):
            value = _json.dumps(value, ensure_ascii=False)
        elif isinstance(value, list):
            value = tuple(value)
        return (self.kind, value, self.disable_any_whitespace)

    def _problem(self) -> str | None:
        if self.structural_tag is not None:
            return ("structured_outputs.structural_tag is not supported by hpcinfer: use a "
                    "json schema or an EBNF grammar")
        if self.whitespace_pattern is not None:
            return ("structured_outputs.whitespace_pattern is not supported (xgrammar has "
                    "none): use disable_any_whitespace=True for compact JSON")
        if self.backend not in (None, "auto", "xgrammar"):
            return (f"structured outputs backend {self.backend!r} is not available: hpcinfer "
                    "uses xgrammar (leave backend unset)")
        kind, value = self.kind, getattr(self, self.kind)
        if kind == "json" and not isinstance(value, (str, dict, bool)):
            return f"structured_outputs.json must be a dict or JSON text, got {type(value).__name__}"
        if kind in ("regex", "grammar") and not (isinstance(value, str) and value):
            return f"structured_outputs.{kind} must be a non-empty string"
        if kind == "choice" and not (isinstance(value, (list, tuple)) and value and all(
                isinstance(c, str) and c for c in value)):
            return "structured_outputs.choice must be a non-empty list of non-empty strings"
        if kind == "json_object" and value is not True:
            return "structured_outputs.json_object must be True"
        return None


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name (``SamplingParams(guided_decoding=...)``); the same constraint."""

    @classmethod
    def from_optional(cls, json: Any = None, regex: str | None = None,
                      choice: list[str] | None = None, grammar: str | None = None,
                      json_object: bool | None = None, backend: str | None = None,
                      whitespace_pattern: str | None = None,
                      structural_tag: str | None = None) -> GuidedDecodingParams:
        """vLLM's constructor; a pydantic model class as ``json`` gives its JSON schema."""
        if json is not None and hasattr(json, "model_json_schema"):
            json = json.model_json_schema()
        return cls(json=json, regex=regex, choice=choice, grammar=grammar,
                   json_object=json_object, backend=backend,
                   whitespace_pattern=whitespace_pattern, structural_tag=structural_tag)
