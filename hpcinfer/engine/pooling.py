"""PoolingEngine: embed, classify, score, reward and encode (vLLM's pooling tasks).

A pooling request needs one forward pass over its whole prompt and nothing after, so there
is no KV cache at all: each step packs whole sequences (in prompt order) under the token
budget ``max_num_batched_tokens`` and ``max_num_seqs``, runs the model with
``kv_caches=[None] * num_layers`` (every attention backend then attends over the step's own
keys: bidirectional for encoders, causal for decoders) and pools each sequence's rows. A
prompt longer than the budget runs alone; one longer than ``max_model_len`` is refused
unless ``truncate_prompt_tokens`` is given. Nothing outlives the step.

``LLM(task=...)`` builds this engine instead of LLMEngine for every task but "generate".
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from hpcinfer.engine.config import EngineConfig
from hpcinfer.engine.model_runner import resolve_device, resolve_dtype
from hpcinfer.engine.outputs import (ClassificationOutput, ClassificationRequestOutput,
                                     EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput,
                                     PoolingRequestOutput, ScoringOutput, ScoringRequestOutput)
from hpcinfer.layers.attention import AttentionMetadata
from hpcinfer.models.pooling import (POOLING_TYPES, DenseProjection, classification_activation,
                                     finish_embedding, pool, read_pooling_config)

log = logging.getLogger(__name__)

TASKS = ("auto", "generate", "embed", "classify", "score", "reward")
POOLING_TASKS = ("embed", "classify", "score", "reward")
ENCODE_TASKS = ("embed", "classify", "token_embed", "token_classify")


@dataclass(frozen=True)
class PoolingParams:
    """Per-call pooling options, as vLLM's: ``dimensions`` truncates embeddings (Matryoshka
    models), ``normalize`` overrides the checkpoint's L2 normalization, ``activation``
    (classify/score) turns softmax/sigmoid off when False. None: the engine's PoolerConfig
    default (then the checkpoint's; activation on)."""

    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None


@dataclass(frozen=True)
class PoolerConfig:
    """Model-level pooling settings, as vLLM's PoolerConfig (``LLM(..., pooler_config=...)``;
    a job file's ``pooling:`` block): ``pooling_type`` (CLS | LAST | MEAN) replaces the
    checkpoint's embedding pooling; ``dimensions``, ``normalize`` and ``use_activation`` are
    the defaults of every call whose PoolingParams leaves them None."""

    pooling_type: str | None = None
    dimensions: int | None = None
    normalize: bool | None = None
    use_activation: bool | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type.upper() not in POOLING_TYPES:
            raise ValueError(f"pooler_config pooling_type={self.pooling_type!r}: use one of "
                             f"{list(POOLING_TYPES)}")
        if self.dimensions is not None and (not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"pooler_config dimensions={self.dimensions!r}: use a positive "
                             "integer (at most the model's embedding size)")


def as_pooler_config(value: Any) -> PoolerConfig:
    """None, a PoolerConfig, a dict, or any object with those attributes (vLLM's
    PoolerConfig) -> PoolerConfig; unknown dict keys are an error naming the known ones."""
    if value is None or isinstance(value, PoolerConfig):
        return value or PoolerConfig()
    names = [f.name for f in dataclasses.fields(PoolerConfig)]
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"pooler_config keys {unknown} are not supported: use {names}")
        return PoolerConfig(**value)
    return PoolerConfig(**{n: getattr(value, n, None) for n in names})


@dataclass
class _Input:
    token_ids: list[int]
    token_type_ids: list[int] | None = None


RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify", "reward")


def resolve_task(model_path: str, task: str = "auto", runner: str = "auto",
                 convert: str = "auto") -> str:
    """The task an ``LLM`` runs, from vLLM's ``task`` (older API) or ``runner``/``convert``
    (newer API) and config.json's ``architectures``.

    "auto" is the model class's ``default_task``: embed for BertModel/LlamaModel..., classify
    for *ForSequenceClassification, generate for causal LMs. A causal LM may also run as a
    last-token embedding model (``task="embed"`` or ``runner="pooling"``), as vLLM does for
    Qwen3-Embedding, whose checkpoints say ``Qwen3ForCausalLM``.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported: use one of {list(TASKS)}")
    if runner not in RUNNERS or convert not in CONVERTS:
        raise ValueError(f"runner={runner!r}, convert={convert!r}: use runner in "
                         f"{list(RUNNERS)} and convert in {list(CONVERTS)}")
    if task == "auto" and runner == "pooling":
        task = convert if convert not in ("auto", "none") else "pooling"
    elif task == "auto" and runner == "generate":
        task = "generate"
    from hpcinfer.models.registry import architecture_of, load_config, model_class
    cls = model_class(architecture_of(load_config(model_path)))
    natural = getattr(cls, "default_task", "generate")
    if task == "auto":
        return natural
    if task == "pooling":  # runner="pooling" without convert: the model's own pooling task
        return "embed" if natural == "generate" else natural
    if natural == "generate" and task not in ("generate", "embed"):
        raise ValueError(f"task={task!r} does not fit {model_path}: {cls.__name__} is a causal "
                         "LM (it can run task='generate' or, pooling its last token, "
                         "task='embed'); use a *ForSequenceClassification checkpoint")
    if natural != "generate" and task == "generate":
        raise ValueError(f"task='generate' does not fit {model_path}: {cls.__name__} is a "
                         f"pooling model ({natural}); use task='auto' or task={natural!r}")
    if task == "reward" and getattr(cls, "is_encoder", False):
        raise ValueError(f"task='reward' needs a decoder with a score head "
                         f"(*ForSequenceClassification); {cls.__name__} is an encoder")
    return task


class PoolingEngine:
    """Loads a pooling model and runs whole-sequence forward passes batched by tokens."""

    def __init__(self, config: EngineConfig, task: str, tokenizer=None, pooler_config=None):
        from transformers import AutoTokenizer

        from hpcinfer.models.registry import load_config, load_model
        ranks = config.tensor_parallel_size * getattr(config, "pipeline_parallel_size", 1)
        if ranks != 1:
            raise ValueError(f"task={task!r} runs on one device: use tensor_parallel_size=1 and "
                             "pipeline_parallel_size=1 (pooling models are small; run one "
                             "replica per GPU instead)")
        if config.skip_tokenizer_init:
            raise ValueError(f"task={task!r} with skip_tokenizer_init=True is not supported: "
                             "pooling inputs are tokenized here; leave skip_tokenizer_init off")
        self.config, self.task = config, task
        self.pooler_config = as_pooler_config(pooler_config)
        self.device = resolve_device(config.device)
        self.tokenizer = (tokenizer if tokenizer is not None else
                          AutoTokenizer.from_pretrained(config.tokenizer or config.model))
        hf_config = load_config(config.model)
        dtype = resolve_dtype(config.dtype, getattr(hf_config, "dtype", None), self.device)
        torch.manual_seed(config.seed)
        self.model = load_model(config.model, dtype=dtype, device=self.device,
                                attention_backend=config.attention_backend)
        self.spec = self.model.spec
        # A causal LM running as an embedding model pools its last token (vLLM's default).
        self.pooling = read_pooling_config(
            config.model, getattr(self.model, "default_pooling_type", "LAST"))
        if self.pooler_config.pooling_type:
            self.pooling = dataclasses.replace(
                self.pooling, pooling_type=self.pooler_config.pooling_type.upper(),
                source="pooler_config")
        self.dense = [DenseProjection(d, self.device) for d in self.pooling.dense_dirs]
        self.max_model_len = self._resolve_max_model_len()
        # the model's own count: a head made from classifier_from_token sets it (heads.py)
        self.num_labels = getattr(self.model, "num_labels", getattr(hf_config, "num_labels", None))
        log.info("pooling engine: %s, task %s, pooling %s (from %s), max_model_len %d",
                 self.spec.architecture, task, self.pooling.pooling_type, self.pooling.source,
                 self.max_model_len)

    def _resolve_max_model_len(self) -> int:
        body = getattr(self.model, "body", self.model)
        limit = self.spec.max_position_embeddings - getattr(body, "position_offset", 0)
        wanted = self.config.max_model_len
        if wanted is not None and wanted > limit:
            raise ValueError(f"max_model_len={wanted} is larger than the model's {limit} "
                             "positions: lower max_model_len")
        # The user's max_model_len wins over sentence_bert_config.json's max_seq_length.
        return wanted or min(limit, self.pooling.max_seq_length or limit)

    # --- inputs ---
    def tokenize(self, prompt: Any, index: int, truncate: int | None = None) -> _Input:
        """A string, a list of token ids or a {"prompt"/"prompt_token_ids"} dict."""
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise ValueError(f"prompt {index}: unknown keys {sorted(unknown)}; use 'prompt' "
                                 "or 'prompt_token_ids'")
            prompt = prompt.get("prompt_token_ids") or prompt.get("prompt")
        if isinstance(prompt, str):
            return self._encode_text(index, prompt, None, truncate)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)[-self._truncation(truncate):] if truncate else list(prompt)
            return self._checked(index, _Input(ids))
        raise ValueError(f"prompt {index}: expected a string, a list of token ids or a dict, "
                         f"got {type(prompt).__name__}")

    def tokenize_pair(self, text_1: str, text_2: str, index: int,
                      truncate: int | None = None) -> _Input:
        """One cross-encoder input: the tokenizer's pair template (BERT: token types 0/1)."""
        return self._encode_text(index, text_1, text_2, truncate)

    def _encode_text(self, index, text, text_pair, truncate) -> _Input:
        kwargs = {"truncation": True, "max_length": self._truncation(truncate)} if truncate else {}
        enc = self.tokenizer(text, text_pair, **kwargs)
        return self._checked(index, _Input(list(enc["input_ids"]), enc.get("token_type_ids")))

    def _truncation(self, truncate: int) -> int:
        return self.max_model_len if truncate == -1 else min(truncate, self.max_model_len)

    def _checked(self, index: int, item: _Input) -> _Input:
        n = len(item.token_ids)
        if n == 0:
            raise ValueError(f"prompt {index}: the prompt is empty (0 tokens)")
        if n > self.max_model_len:
            raise ValueError(f"prompt {index}: {n} tokens, more than max_model_len="
                             f"{self.max_model_len}; shorten it or pass "
                             "truncate_prompt_tokens=-1 to cut it to max_model_len")
        bad = [t for t in item.token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt {index}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.spec.vocab_size})")
        return item

    # --- the step loop ---
    def batches(self, items: Sequence[_Input]) -> Iterator[list[int]]:
        """Indices of ``items`` per step: in order, under the token and sequence budgets."""
        batch, num_tokens = [], 0
        for i, item in enumerate(items):
            n = len(item.token_ids)
            if batch and (num_tokens + n > self.config.max_num_batched_tokens
                          or len(batch) == self.config.max_num_seqs):
                yield batch
                batch, num_tokens = [], 0
            batch.append(i)
            num_tokens += n
        if batch:
            yield batch

    @torch.inference_mode()
    def forward(self, items: Sequence[_Input]) -> tuple[torch.Tensor, list[int]]:
        """One step over whole sequences -> (hidden [T, H], cu_seqlens as a list)."""
        lens = [len(it.token_ids) for it in items]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        dev = self.device
        input_ids = torch.tensor([t for it in items for t in it.token_ids], device=dev)
        lens_t = torch.tensor(lens)
        # positions restart at 0 in every sequence: [0..n0-1, 0..n1-1, ...]
        positions = (torch.arange(cu[-1]) - torch.repeat_interleave(
            torch.tensor(cu[:-1]), lens_t)).to(dev)
        meta = AttentionMetadata(
            slot_mapping=torch.full((cu[-1],), -1, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((len(lens), 1), dtype=torch.int32, device=dev),
            max_seqlen_q=max(lens), max_seqlen_k=max(lens), is_decode=False)
        kwargs = {}
        if getattr(self.model, "is_encoder", False):
            kwargs["token_type_ids"] = torch.tensor(
                [t for it in items for t in (it.token_type_ids or [0] * len(it.token_ids))],
                device=dev)
        hidden = self.model(input_ids, positions, [None] * self.spec.num_layers, meta, **kwargs)
        return hidden, cu

    def with_defaults(self, params: PoolingParams) -> PoolingParams:
        """``params`` with every None filled from the PoolerConfig (activation: on)."""
        default = self.pooler_config
        pick = (lambda mine, theirs: theirs if mine is None else mine)
        return PoolingParams(dimensions=pick(params.dimensions, default.dimensions),
                             normalize=pick(params.normalize, default.normalize),
                             activation=pick(params.activation,
                                             pick(default.use_activation, True)))

    def run(self, items: Sequence[_Input], pooling_task: str,
            params: PoolingParams) -> list[torch.Tensor]:
        """The pooled result of every item (on the CPU, float32), in order."""
        params = self.with_defaults(params)
        results: list[torch.Tensor] = []
        for batch in self.batches(items):
            hidden, cu = self.forward([items[i] for i in batch])
            results.extend(self._pool(hidden, cu, pooling_task, params))
        return results

    def _pool(self, hidden, cu, pooling_task, params) -> list[torch.Tensor]:
        if pooling_task == "embed":
            pooled = pool(hidden, cu, self.pooling.pooling_type)
            for dense in self.dense:  # sentence-transformers Dense modules, in order
                pooled = dense(pooled)
            normalize = self.pooling.normalize if params.normalize is None else params.normalize
            out = finish_embedding(pooled, normalize=normalize, dimensions=params.dimensions)
            return list(out.cpu())
        if pooling_task == "classify":
            logits = self._scores(pool(hidden, cu, self.model.classifier_pooling_type))
            out = classification_activation(logits) if params.activation else logits
            return list(out.cpu())
        rows = [hidden[s:e] for s, e in zip(cu[:-1], cu[1:])]
        if pooling_task == "token_embed":
            normalize = self.pooling.normalize if params.normalize is None else params.normalize
            return [finish_embedding(r.float(), normalize=normalize,
                                     dimensions=params.dimensions).cpu() for r in rows]
        if pooling_task == "token_classify":
            return [self._scores(r.float()).cpu() for r in rows]
        raise ValueError(f"pooling_task={pooling_task!r}: use one of {list(ENCODE_TASKS)}")

    def _scores(self, pooled: torch.Tensor) -> torch.Tensor:
        compute = getattr(self.model, "compute_scores", None)
        if compute is None:
            raise ValueError(f"{self.spec.architecture} has no classification head: classify, "
                             "score with a cross-encoder and reward need a "
                             "*ForSequenceClassification checkpoint")
        return compute(pooled.to(self.spec.dtype))

    # --- the task methods behind LLM.embed/classify/score/reward/encode ---
    def _inputs(self, prompts, truncate) -> list[_Input]:
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, (list, tuple)) and prompts
                and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if prompts and all(isinstance(p, str) for p in prompts):
            return self._encode_texts(prompts, truncate)  # one tokenizer call: much faster
        return [self.tokenize(p, i, truncate) for i, p in enumerate(prompts)]

    def _encode_texts(self, texts: list[str], truncate: int | None) -> list[_Input]:
        kwargs = {"truncation": True, "max_length": self._truncation(truncate)} if truncate else {}
        enc = self.tokenizer(list(texts), **kwargs)
        types = enc.get("token_type_ids") or [None] * len(texts)
        return [self._checked(i, _Input(list(ids), tt))
                for i, (ids, tt) in enumerate(zip(enc["input_ids"], types))]

    def _ids(self, n: int) -> list[str]:
        start = getattr(self, "_next_request", 0)
        self._next_request = start + n
        return [str(start + i) for i in range(n)]

    def embed(self, prompts, params: PoolingParams, truncate=None) -> list[EmbeddingRequestOutput]:
        items = self._inputs(prompts, truncate)
        results = self.run(items, "embed", params)
        return [EmbeddingRequestOutput(rid, EmbeddingOutput(r.tolist()), it.token_ids)
                for rid, it, r in zip(self._ids(len(items)), items, results)]

    def classify(self, prompts, params: PoolingParams,
                 truncate=None) -> list[ClassificationRequestOutput]:
        items = self._inputs(prompts, truncate)
        results = self.run(items, "classify", params)
        return [ClassificationRequestOutput(rid, ClassificationOutput(r.tolist()), it.token_ids)
                for rid, it, r in zip(self._ids(len(items)), items, results)]

    def encode(self, prompts, params: PoolingParams, pooling_task: str | None = None,
               truncate=None) -> list[PoolingRequestOutput]:
        pooling_task = pooling_task or {"embed": "embed", "classify": "classify",
                                        "score": "classify", "reward": "token_classify"}[self.task]
        if pooling_task not in ENCODE_TASKS:
            raise ValueError(f"pooling_task={pooling_task!r}: use one of {list(ENCODE_TASKS)}")
        items = self._inputs(prompts, truncate)
        results = self.run(items, pooling_task, params)
        return [PoolingRequestOutput(rid, PoolingOutput(r), it.token_ids)
                for rid, it, r in zip(self._ids(len(items)), items, results)]

    def score(self, data_1, data_2, params: PoolingParams,
              truncate=None) -> list[ScoringRequestOutput]:
        """One-to-one (equal lengths) or one-to-many (a single text_1). Cross-encoders score
        each (text_1, text_2) pair; embedding models give the cosine of the embeddings."""
        params = self.with_defaults(params)
        texts_1 = [data_1] if isinstance(data_1, str) else list(data_1)
        texts_2 = [data_2] if isinstance(data_2, str) else list(data_2)
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        if len(texts_1) != len(texts_2) or not texts_2:
            raise ValueError(f"score(): got {len(texts_1)} text_1 and {len(texts_2)} text_2; "
                             "pass one text_1 for many text_2, or equally many of each")
        if hasattr(self.model, "compute_scores"):
            items = [self.tokenize_pair(a, b, i, truncate)
                     for i, (a, b) in enumerate(zip(texts_1, texts_2))]
            scores = self._cross_encoder_scores(items, params)
            token_ids = [it.token_ids for it in items]
        else:
            emb_params = PoolingParams(dimensions=params.dimensions, normalize=True)
            e1 = self.run([self.tokenize(t, i, truncate) for i, t in enumerate(texts_1)],
                          "embed", emb_params)
            items_2 = [self.tokenize(t, i, truncate) for i, t in enumerate(texts_2)]
            e2 = self.run(items_2, "embed", emb_params)
            scores = [float(torch.dot(a, b)) for a, b in zip(e1, e2)]
            token_ids = [it.token_ids for it in items_2]
        return [ScoringRequestOutput(rid, ScoringOutput(s), ids)
                for rid, s, ids in zip(self._ids(len(scores)), scores, token_ids)]

    def _cross_encoder_scores(self, items: list[_Input], params: PoolingParams) -> list[float]:
        if self.num_labels != 1:
            raise ValueError(f"score() with a cross-encoder needs num_labels=1 in config.json "
                             f"(found {self.num_labels}): use classify() for multi-class heads")
        logits = self.run(items, "classify", PoolingParams(activation=False))
        return [float(torch.sigmoid(x[0]) if params.activation else x[0]) for x in logits]

    def reward(self, prompts, params: PoolingParams, truncate=None) -> list[PoolingRequestOutput]:
        """Per-token values of the score head (``data``: [num_tokens, num_labels]), no
        activation, as vLLM's reward models."""
        return self.encode(prompts, params, "token_classify", truncate)


# LLM method -> the tasks whose engine can serve it
_METHOD_TASKS = {"embed": ("embed", "score"), "classify": ("classify", "score", "reward"),
                 "score": ("score", "embed", "classify"), "reward": ("reward", "classify"),
                 "encode": POOLING_TASKS}


def engine_for(llm, method: str) -> PoolingEngine:
    """The PoolingEngine of an ``LLM`` if ``method`` fits its task; else a ValueError that
    says which task to load the model with."""
    engine = llm.llm_engine
    if not isinstance(engine, PoolingEngine) or engine.task not in _METHOD_TASKS[method]:
        task = getattr(llm, "task", "generate")
        raise ValueError(f"LLM.{method}() is not available for task={task!r}: create the LLM "
                         f"with task={_METHOD_TASKS[method][0]!r} (or 'auto') and a model that "
                         "supports it")
    if method == "reward" and getattr(engine.model, "is_encoder", False):
        raise ValueError("LLM.reward() needs a decoder with a score head "
                         "(*ForSequenceClassification); this model is an encoder")
    return engine


def as_pooling_params(pooling_params) -> PoolingParams:
    """None, a PoolingParams, or a dict of its fields; one for all prompts."""
    if pooling_params is None:
        return PoolingParams()
    if isinstance(pooling_params, PoolingParams):
        return pooling_params
    if isinstance(pooling_params, dict):
        return PoolingParams(**pooling_params)
    raise ValueError(f"pooling_params must be a PoolingParams (one for all prompts), got "
                     f"{type(pooling_params).__name__}")
