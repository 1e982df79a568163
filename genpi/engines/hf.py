"""The transformers engine: the embedded default, for one CPU machine.

Requests are grouped by sampling settings and by their fixed prefix (the prompt
P, marked by `ChatRequest.prefix_messages`), then generated in batches with
`model.generate`. The prefix of a group is prefilled once and its KV cache kept
(LRU), so a long prompt costs one prefill per engine, not one per dialogue.
A batch is laid out as `prefix | left padding | suffix`: the cached prefix
keeps positions 0..P-1 for every row, and generate derives the suffix positions
from the attention mask.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Completion, Message, Sampling, text_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    def __init__(
        self,
        path: str,
        max_batch: int = 32,
        dtype: str = "auto",
        max_model_len: int | None = None,
        prefix_cache_size: int = 8,
        device: str | None = None,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":  # bf16 matmuls are slow on most CPUs
            torch_dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        self.model_name = Path(path).name
        self.max_batch = max_batch
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        self.prefix_cache_size = prefix_cache_size
        self._prefixes: OrderedDict[tuple, DynamicCache] = OrderedDict()  # key: (adapter served, prefix ids)
        self._serving: str | None = None
        self.prefix_hits = 0
        self.prefix_misses = 0

    def add_adapters(self, adapters: dict[str, str]) -> None:
        """Load LoRA adapters (name: folder) unmerged on the base, for `serving` to switch between."""
        from peft import PeftModel

        for name, folder in adapters.items():
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(folder, adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False).eval()

    @contextmanager
    def serving(self, adapter: str | None):
        """Generate with this loaded adapter, or with the base alone (None: adapters disabled)."""
        previous = self._serving
        self._serving = adapter
        try:
            if adapter is not None:
                self.model.set_adapter(adapter, inference_mode=True)
                yield
            else:
                with self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext():
                    yield
        finally:
            self._serving = previous

    def encode(self, messages: list[Message], generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    def generate(
        self, requests: list[ChatRequest], adapters: list[str | None] | None = None, streams: list | None = None
    ) -> list[Completion]:
        """One completion per request. `adapters`: per request, the loaded adapter that serves it (None: the
        base), rows of different adapters in one batch (PEFT's `adapter_names`); without it every request is
        served as `serving` says. `streams`: per request, None or an object with `on_token(token_id)`, called
        as each token is generated, and `cancelled` (true: stop generating this row)."""
        if adapters is not None and not hasattr(self.model, "peft_config"):  # no adapter loaded: all base
            if any(adapters):
                raise ValueError(f"no adapters are loaded, but requests ask for {sorted(set(filter(None, adapters)))}")
            adapters = None
        results: list[Completion | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        encoded: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            try:
                ids = self.encode(request.messages)
                prefix = self._prefix_ids(request, ids)
            except Exception as e:  # a malformed request
                results[i] = Completion.failure(f"engine: {type(e).__name__}: {e}")
                continue
            limit = self.max_model_len
            if len(ids) + request.sampling.max_tokens > limit:
                results[i] = Completion.failure(
                    f"{CONTEXT_LENGTH_ERROR}: {len(ids)} prompt tokens + {request.sampling.max_tokens} max tokens > {limit}"
                )
                continue
            encoded[i] = ids
            # a prefix's KV cache holds one adapter's keys and values: rows sharing it share their adapter
            adapter = adapters[i] if adapters is not None and prefix else None
            groups.setdefault((request.sampling, prefix, adapter), []).append(i)
        for (sampling, prefix, _), members in groups.items():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start : start + self.max_batch]

                def batch(rows: list[int]) -> list[Completion]:
                    names = None if adapters is None else [adapters[i] for i in rows]
                    args = ([encoded[i] for i in rows], prefix, sampling, requests[rows[0]].seed)
                    listeners = None if streams is None else [streams[i] for i in rows]
                    if names is not None and len(set(names)) == 1:  # one adapter: PEFT's plain forward, not its mixed-batch one
                        with self.serving(names[0]):
                            return self._generate_batch(*args, None, listeners)
                    return self._generate_batch(*args, names, listeners)

                try:
                    outputs = batch(chunk)
                except Exception:  # retry one by one so one bad request fails alone
                    outputs = []
                    for i in chunk:
                        try:
                            outputs += batch([i])
                        except Exception as e:
                            outputs.append(Completion.failure(f"engine: {type(e).__name__}: {e}"))
                for i, completion in zip(chunk, outputs):
                    results[i] = completion
        return results  # type: ignore[return-value]

    def _prefix_ids(self, request: ChatRequest, ids: list[int]) -> tuple[int, ...]:
        if request.prefix_messages <= 0:
            return ()
        prefix = self.encode(request.messages[: request.prefix_messages], generation_prompt=False)
        n = 0  # templates may render a prefix differently alone; keep only the common tokens
        for a, b in zip(prefix, ids):
            if a != b:
                break
            n += 1
        return tuple(ids[: min(n, len(ids) - 1)])  # leave at least one token to feed generate

    def _prefix_cache(self, prefix: tuple[int, ...], adapter_names: list[str] | None = None) -> DynamicCache:
        """The prefix's KV cache, computed with the adapter named (mixed batches) or as `serving` says (None)."""
        # a prefix's KV cache depends on the adapter that computed it
        key = (adapter_names[0] if adapter_names else self._serving, prefix)
        cache = self._prefixes.get(key)
        if cache is not None:
            self._prefixes.move_to_end(key)
            self.prefix_hits += 1
            return cache
        self.prefix_misses += 1
        mixed = {} if adapter_names is None else {"adapter_names": adapter_names[:1]}
        with torch.no_grad():
            cache = self.model(
                input_ids=torch.tensor([prefix], device=self.device), cache=DynamicCache(), use_cache=True, **mixed
            ).cache
        self._prefixes[key] = cache
        if len(self._prefixes) > self.prefix_cache_size:
            self._prefixes.popitem(last=False)
        return cache

    @torch.no_grad()
    def _generate_batch(
        self,
        rows: list[list[int]],
        prefix: tuple[int, ...],
        sampling: Sampling,
        seed: int,
        adapters: list[str | None] | None = None,
        streams: list | None = None,
    ) -> list[Completion]:
        n_prefix = len(prefix)
        suffixes = [ids[n_prefix:] for ids in rows]
        width = max(len(s) for s in suffixes)
        input_ids = [list(prefix) + [self.pad_id] * (width - len(s)) + s for s in suffixes]
        mask = [[1] * n_prefix + [0] * (width - len(s)) + [1] * len(s) for s in suffixes]
        kwargs = {}
        if adapters is not None:  # "__base__": PEFT's name for the base alone
            kwargs["adapter_names"] = [name or "__base__" for name in adapters]
        if streams is not None and any(s is not None for s in streams):
            kwargs.update(streamer=_TokenStreamer(streams, self.eos_ids), stopping_criteria=StoppingCriteriaList([_Cancelled(streams)]))
        if n_prefix:
            cache = copy.deepcopy(self._prefix_cache(prefix, kwargs.get("adapter_names")))
            cache.batch_repeat_interleave(len(rows))
            kwargs["cache"] = cache  # transformers >= 5.24: `past_key_values` in generate is deprecated
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.logprobs:  # raw logits (before temperature / top-p), for the teacher's top-k
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        torch.manual_seed(seed)  # one seed per batch: sampled batches are reproducible as a whole
        output = self.model.generate(
            input_ids=torch.tensor(input_ids, device=self.device),
            attention_mask=torch.tensor(mask, device=self.device),
            max_new_tokens=sampling.max_tokens,
            pad_token_id=self.pad_id,
            **kwargs,
        )
        sequences = output.sequences if sampling.logprobs else output
        topk = None
        if sampling.logprobs:  # top-k step by step: never a [B, steps, vocabulary] copy; only k per token leave the device
            steps = [step.float().log_softmax(-1).topk(sampling.logprobs, dim=-1) for step in output.logits]
            topk = torch.stack([i for _, i in steps], 1).cpu().tolist(), torch.stack([v for v, _ in steps], 1).cpu().tolist()
        completions = []
        for b, (row, ids) in enumerate(zip(sequences[:, n_prefix + width :].tolist(), rows)):
            completion = self._completion(row, len(ids), sampling)
            if topk is not None:
                n = len(completion.token_ids)
                completion.topk_ids, completion.topk_logprobs = topk[0][b][:n], topk[1][b][:n]
            completions.append(completion)
        return completions

    def _completion(self, generated: list[int], prompt_tokens: int, sampling: Sampling) -> Completion:
        finish = "length"
        kept = generated
        for k, token in enumerate(generated):
            if token in self.eos_ids:
                kept, finish = generated[:k], "stop"
                break
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        for stop in sampling.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        n_tokens = len(kept) + (finish == "stop" and len(kept) < len(generated))
        completion = Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=n_tokens, finish_reason=finish)
        if sampling.logprobs:
            completion.token_ids = text_token_ids(self.tokenizer, kept, text) if finish == "stop" else list(kept)
        return completion


class _TokenStreamer(BaseStreamer):
    """Hands each row's new tokens to its stream, step by step, up to its end-of-turn token (generate first puts
    the whole prompt, and pads the rows that have ended)."""

    def __init__(self, streams: list, eos_ids: set[int]):
        self.streams, self.eos_ids, self.started = streams, eos_ids, False
        self.ended = [False] * len(streams)

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the prompt
            self.started = True
            return
        for b, (stream, token) in enumerate(zip(self.streams, value.tolist())):
            if stream is None or self.ended[b] or stream.cancelled:
                continue
            if token in self.eos_ids:
                self.ended[b] = True
            else:
                stream.on_token(token)

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    """Ends the rows whose stream was cancelled (a client that went away), so they stop taking compute."""

    def __init__(self, streams: list):
        self.streams = streams

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        flags = [stream is not None and stream.cancelled for stream in self.streams]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)
