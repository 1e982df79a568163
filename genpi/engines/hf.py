"""The transformers engine: the embedded default, for one CPU machine.

One worker thread runs the model and schedules continuously: a request joins the running batch as soon as
it arrives and there is room (up to `max_batch` rows), and a row leaves it as soon as it ends, so no row
waits for the slowest and no request waits for a whole batch. Rows of different prefixes (prompts),
adapters and sampling settings share every decode step.

The fixed prefix of a request (the prompt P, marked by `ChatRequest.prefix_messages`) is prefilled once
per engine and adapter and its KV cache kept (LRU), never copied (so are a request's `prefix_embeds`, input
embeddings in front of its tokens in place of a prompt: an ICAE system's memory slots): a row prefills only its
own suffix, and `prefix_attention` attends to the prefix's keys once for all the rows behind it and to each row's
own keys, merging the two by their log-sum-exp (cascade attention). The batch's cache holds the rows' own tokens,
left-padded: the attention mask hides the padding and each row keeps its own position ids, so a row
computes what it would compute alone. Sampling draws from a generator seeded by the request's seed: the
same request gives the same text whatever it was batched with. The worker exits after a second without work
(a new request starts another): an idle thread's OpenMP pool slows every other torch thread of the process.
A request fails alone where it can (a bad request, a failed prefill); an error outside that (out of memory while
joining the batch) fails every request the worker holds, and the next request starts a fresh worker.

Over 400 lines on purpose: one engine class, whose worker, scheduler, prefix cache and batched decode share one
batch's state (rows, cache, mask); a split would cut through that state.
"""

from __future__ import annotations

import atexit
import hashlib
import queue
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Completion, Message, Sampling, text_token_ids
from genpi.models import portable_model

SERVING = object()  # a request's adapter: as `serving` says
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """Attention and its log-sum-exp. q [B, H, L, dim]; k, v [B, H, T, dim]; mask additive, [B, 1, L, T] or None."""
    if q.device.type == "cpu":  # torch's fused CPU kernel returns the log-sum-exp
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    return _attend_math(q, k, v, mask, scale)


def _attend_math(q, k, v, mask, scale):
    scores = torch.matmul(q, k.transpose(2, 3)).float() * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.clamp_min(torch.finfo(lse.dtype).min)[..., None])  # a query that sees nothing: 0
    return torch.matmul(weights.to(v.dtype), v), lse


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefixes=None, **kwargs):
    """Attention over a shared prefix's keys and each row's own keys, merged by their log-sum-exp: a row's cache
    holds only its own tokens, and a prefix's keys are read once per step for all the rows behind it, where a
    batch of copied prefixes reads them once per row. `prefixes`: [(the prefix's cache layers, row indices)];
    without it (every other use of the model) this is SDPA. Queries [B, heads, q, dim]; keys [B, kv heads, T, dim]."""
    if prefixes is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, q_len, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, groups * q_len, dim)  # the query heads of one kv head side by side (GQA)
    if attention_mask is None and q_len > 1:  # no padding: causal over the row's own keys
        attention_mask = torch.ones(q_len, columns, dtype=torch.bool, device=query.device).tril(columns - q_len)
    mask = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, float("-inf")
            )
        mask = attention_mask.expand(batch, 1, q_len, columns).repeat(1, 1, groups, 1)
    out, lse = _attend(q, key, value, mask, scale)
    for layers, rows in prefixes:
        layer, n = layers[module.layer_idx], len(rows)
        # the group's queries side by side against the prefix's one copy of its keys
        p_out, p_lse = _attend(
            q[rows].transpose(0, 1).reshape(1, kv_heads, -1, dim), layer.keys, layer.values, None, scale
        )
        p_out = p_out.reshape(kv_heads, n, -1, dim).transpose(0, 1)
        p_lse = p_lse.reshape(kv_heads, n, -1).transpose(0, 1)
        own_lse = lse[rows]
        both = torch.logaddexp(own_lse, p_lse)
        out[rows] = (out[rows] * torch.exp(own_lse - both)[..., None] + p_out * torch.exp(p_lse - both)[..., None]).to(
            out.dtype
        )
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register("genpi_prefix", prefix_attention)
AttentionMaskInterface.register("genpi_prefix", sdpa_mask)


class _Row:
    """A request in the engine: waiting, then a row of the running batch."""

    def __init__(self, request: ChatRequest, adapter: str | None, stream, future: Future):
        self.request, self.adapter, self.stream, self.future = request, adapter, stream, future
        self.sampling: Sampling = request.sampling
        self.ids: list[int] = []
        self.prefix: tuple[int, ...] = ()
        self.offset = 0  # positions taken by the request's prefix_embeds, before its tokens
        self.prefix_layers: list | None = None  # the prefix's cached keys and values, per layer
        self.generated: list[int] = []
        self.position = 0  # the position id of the next token fed
        self.generator: torch.Generator | None = None
        self.topk_ids: list[list[int]] = []
        self.topk_logprobs: list[list[float]] = []


class _Layer(DynamicLayer):
    """A cache layer that appends in place, into room kept after its columns: DynamicLayer concatenates, which
    copies the whole batch's cache at every decode step. `keys` and `values` are views of the buffers."""

    ROOM = 128  # columns of room made at a time

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.fill([key_states[:, :, :0]], [value_states[:, :, :0]], 0)

    def fill(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int, room: int = ROOM) -> _Layer:
        """Hold these blocks of rows stacked, each left-padded with zeros to `width` columns, and `room` after."""
        first = keys[0]
        k = first.new_zeros(sum(block.shape[0] for block in keys), first.shape[1], width + room, first.shape[3])
        v = k.clone()
        row = 0
        for key_block, value_block in zip(keys, values):
            rows, columns = key_block.shape[0], key_block.shape[2]
            k[row : row + rows, :, width - columns : width] = key_block
            v[row : row + rows, :, width - columns : width] = value_block
            row += rows
        self._k, self._v = k, v
        self.keys, self.values = k[:, :, :width], v[:, :, :width]
        self.device, self.is_initialized = first.device, True
        return self

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, added = self.keys.shape[2], key_states.shape[2]
        if n + added > self._k.shape[2]:
            self.fill([self.keys], [self.values], n, room=added + self.ROOM)
        self._k[:, :, n : n + added] = key_states
        self._v[:, :, n : n + added] = value_states
        self.keys, self.values = self._k[:, :, : n + added], self._v[:, :, : n + added]
        return self.keys, self.values


IDLE_EXIT_S = 1.0  # an idle worker exits: its OpenMP pool, idle, would slow the other pools of the process
_running: weakref.WeakSet = weakref.WeakSet()  # engines whose worker runs
WORKER_THREAD = "genpi-engine"


@atexit.register
def _stop_workers() -> None:
    """A worker alive at interpreter exit can abort the process (torch's thread pool torn down under it)."""
    for engine in list(_running):
        engine.close(abandon=True)
    for thread in threading.enumerate():  # and workers that were exiting by themselves (idle) meanwhile
        if thread.name == WORKER_THREAD:
            thread.join()


def _settle(row: _Row, completion: Completion) -> None:
    """Give the row's future its completion, unless its caller cancelled it meanwhile (an awaiting asyncio task
    that was cancelled cancels the future it wraps): set_result would raise in the worker."""
    try:
        row.future.set_result(completion)
    except InvalidStateError:
        pass


def _failure(error: Exception) -> Completion:
    message = str(error)
    return Completion.failure(
        message
        if message.startswith(f"{CONTEXT_LENGTH_ERROR}:") or message == "cancelled"
        else f"engine: {type(error).__name__}: {message}"
    )


def _similar_lengths(rows: list[_Row], slack: float = 1.25) -> list[list[_Row]]:
    """The rows in groups of similar suffix length, prefilled one group per forward: padding a short suffix to a
    long one costs the compute of the padding (the linear layers and the attention over the prefix)."""
    groups: list[list[_Row]] = []
    total = 0
    for row in sorted(rows, key=lambda r: len(r.ids) - len(r.prefix)):
        n = len(row.ids) - len(row.prefix)
        if groups and (len(groups[-1]) + 1) * n <= slack * (total + n) + 32:
            groups[-1].append(row)
            total += n
        else:
            groups.append([row])
            total = n
    return groups


def _cache(layers: list[_Layer] | None = None) -> Cache:
    return Cache(layers=layers) if layers is not None else Cache(layer_class_to_replicate=_Layer)


class TransformersEngine:
    def __init__(
        self,
        path: str,
        max_batch: int = 32,
        dtype: str = "auto",
        max_model_len: int | None = None,
        prefix_cache_size: int = 8,
        device: str | None = None,
        threads: int | None = None,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":  # bf16 where the hardware has bf16 dot products (CUDA; AVX512-BF16 or AMX CPUs, where it
            # runs ~2x faster than float32, as vLLM-CPU chooses too); elsewhere bf16 is emulated and slow
            fast_bf16 = self.device == "cuda" or (self.device == "cpu" and torch.cpu._is_avx512_bf16_supported())
            torch_dtype = torch.bfloat16 if fast_bf16 else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="genpi_prefix")
        self.model = self.model.to(self.device).eval()
        self.model_name = portable_model(path)  # a hub snapshot's folder is a commit hash: its id instead
        self.max_batch = max_batch
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        self.prefix_cache_size = prefix_cache_size
        self._prefixes: OrderedDict[tuple, Cache] = OrderedDict()  # key: (adapter, prefix ids)
        self._serving: str | None | object = SERVING  # the adapter `serving` set (None: the base); SERVING: none set
        self.prefix_hits = 0
        self.prefix_misses = 0
        self.threads = threads  # torch threads of the worker (its OpenMP pool is its own)
        self.busy_s = 0.0  # time the worker spent running the model
        self.steps: deque[tuple[int, tuple[str, ...]]] = deque(maxlen=1000)  # the last decode steps: rows, adapters
        self._queue: queue.Queue[_Row | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._abandon = False
        # the running batch: its rows (None: a row that ended), their KV cache and attention mask ([rows, columns])
        self._rows: list[_Row | None] = []
        self._cache: Cache | None = None
        self._mask: torch.Tensor | None = None
        self._admitting: list[_Row] = []  # the rows `_admit` took out of the waiting ones and has not yet batched

    def add_adapters(self, adapters: dict[str, str], merge: bool = False) -> None:
        """Load LoRA adapters (name: folder) unmerged on the base, for `serving` to switch between. `merge` (one
        adapter, before any request): fold it into the base weights instead, so the model is the internalized
        model at the base's cost (an unmerged LoRA adds two matmuls per adapted layer and token); the base alone
        is then gone."""
        from peft import PeftModel

        if merge and (len(adapters) != 1 or isinstance(self.model, PeftModel) or self._worker is not None):
            raise ValueError("merge: one adapter, into a base that has none and has served no request yet")
        for name, folder in adapters.items():
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(folder, adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False).eval()
        if merge:
            self.model = self.model.merge_and_unload()

    def remove_adapters(self, names: list[str]) -> None:
        """Unload adapters loaded by `add_adapters` (their weights and cached prefixes), when no request in flight
        uses them: on-policy training loads a fresh adapter at every refresh and drops the previous one."""
        unknown = sorted(set(names) - set(getattr(self.model, "peft_config", {})))
        if unknown:
            raise ValueError(f"no adapters named {unknown} are loaded")
        kept = [name for name in self.model.peft_config if name not in names]
        if kept and self.model.active_adapter in names:  # PEFT would warn, and pick one itself
            self.model.set_adapter(kept[-1], inference_mode=True)
        for name in names:
            self.model.delete_adapter(name)
        for key in [key for key in self._prefixes if key[0] in names]:
            del self._prefixes[key]

    @contextmanager
    def serving(self, adapter: str | None):
        """Requests submitted meanwhile without an adapter of their own are served with this loaded adapter, or
        with the base alone (None); direct calls of `self.model` run with it too. One caller at a time."""
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

    def submit(self, request: ChatRequest, adapter: str | None | object = SERVING, stream=None) -> Future:
        """Queue one request; the future gets its Completion. `adapter`: the loaded adapter that serves it, None
        for the base alone (default: as `serving` says, else the active adapter). `stream`: None or an object
        with `on_token(token_id)`, called from the worker as each token is generated, and `cancelled` (true:
        stop generating this row)."""
        if adapter is SERVING:
            adapter = self._serving
        if adapter is SERVING:  # outside `serving`: the model as it is, its active adapter if it has one
            adapter = self.model.active_adapters[0] if hasattr(self.model, "peft_config") else None
        elif adapter is not None and not hasattr(self.model, "peft_config"):
            raise ValueError(f"no adapters are loaded, but a request asks for {adapter!r}")
        future: Future = Future()
        with self._lock:  # the worker exits when idle, only with the lock held and nothing queued
            self._queue.put(_Row(request, adapter, stream, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=WORKER_THREAD, daemon=True)
                self._worker.start()
                _running.add(self)
        return future

    def generate(
        self, requests: list[ChatRequest], adapters: list[str | None] | None = None, streams: list | None = None
    ) -> list[Completion]:
        """One completion per request, in order (see `submit`)."""
        if adapters is not None and not hasattr(self.model, "peft_config") and any(adapters):
            raise ValueError(f"no adapters are loaded, but requests ask for {sorted(set(filter(None, adapters)))}")
        futures = [
            self.submit(r, SERVING if adapters is None else adapters[i], None if streams is None else streams[i])
            for i, r in enumerate(requests)
        ]
        return [f.result() for f in futures]

    def close(self, abandon: bool = False) -> None:
        """Stop the worker once the requests already queued are done; `abandon`: at once, failing them."""
        with self._lock:
            worker = self._worker
            if worker is None:
                return
            self._abandon = abandon
            self._queue.put(None)
        worker.join()

    # ------------------------------------------------------------ the worker: continuous batching

    def _work(self) -> None:
        waiting: deque[_Row] = deque()
        try:
            self._schedule(waiting)
        except Exception as e:  # outside the per-row handling (out of memory joining or compacting the batch, ...):
            # the thread would die still registered as the worker, so none would start again and every future would
            # wait forever. Fail what it held, and let the next submit start a fresh worker on an empty batch.
            print(
                f"genpi: the transformers engine's worker failed; its requests fail, the next one starts a new worker\n"
                f"{traceback.format_exc()}",
                file=sys.stderr,
                end="",
                flush=True,
            )
            self._exit(waiting, error=e)

    def _schedule(self, waiting: deque[_Row]) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            block = not self._rows and not waiting
            try:
                while True:  # everything queued now; when idle, wait a while for the next request
                    row = self._queue.get(block=block, timeout=IDLE_EXIT_S if block else None)
                    block = False
                    if row is None:
                        if self._abandon or (not waiting and not self._rows and self._queue.empty()):
                            self._exit(waiting)
                            return
                        self._queue.put(None)  # close once the rest is done
                        break
                    waiting.append(row)
            except queue.Empty:
                if block:  # idle that long: exit, unless a request came in meanwhile
                    if self._exit(waiting, only_if_idle=True):
                        return
                    continue
            if not waiting and not self._rows:
                time.sleep(0.001)  # only a close is pending, behind work not yet queued
                continue
            started = time.perf_counter()
            with torch.no_grad():
                if waiting and self._live() < self.max_batch:
                    self._admit(waiting)
                if self._rows:
                    self._step()
            self.busy_s += time.perf_counter() - started

    def _exit(self, waiting: deque[_Row], only_if_idle: bool = False, error: Exception | None = None) -> bool:
        """The worker's end (its OpenMP pool goes with its thread), unless `only_if_idle` and a request came in;
        requests still here (waiting, being admitted, running, queued) fail with `error`, else as cancelled. Under
        the lock, so that `submit` sees a worker that takes its row."""
        with self._lock:
            if only_if_idle and not self._queue.empty():
                return False
            self._worker = None
            _running.discard(self)
            left = [*waiting, *self._admitting, *filter(None, self._rows)]
            while not self._queue.empty():
                left.append(self._queue.get())
            # cleared before the lock goes: a worker started by the next submit builds its own batch in these
            self._rows, self._cache, self._mask, self._admitting = [], None, None, []
        failure = _failure(error if error is not None else ValueError("cancelled"))
        for row in filter(None, left):  # outside the lock: a future's callbacks may submit again
            if not row.future.done():  # rows being admitted may have their completion already
                _settle(row, failure)
        return True

    def _admit(self, waiting: deque[_Row]) -> None:
        """Prefill waiting requests in one forward, each row on its prefix's cached keys, and add them to the batch."""
        rows = self._admitting = []  # out of `waiting` and not yet in the batch: failed with the worker if it fails
        while waiting and self._live() + len(rows) < self.max_batch:
            row = waiting.popleft()
            try:
                if (row.stream is not None and row.stream.cancelled) or row.future.cancelled():  # its client went away
                    raise ValueError("cancelled")
                self._prepare(row)
            except Exception as e:  # a malformed or over-long request fails alone
                _settle(row, _failure(e))
                continue
            rows.append(row)
        if not rows:
            return
        prefilled = []  # (rows, cache, mask)
        for group in _similar_lengths(rows):
            try:
                prefilled.append((group, *self._prefill(group)))
            except Exception:  # one bad row must not fail the others: one by one
                for row in group:
                    try:
                        prefilled.append(([row], *self._prefill([row])))
                    except Exception as e:
                        _settle(row, _failure(e))
        self._join(
            [
                (group, cache, mask, [b for b, row in enumerate(group) if not self._ended(row)])
                for group, cache, mask in prefilled
            ]
        )
        self._admitting = []

    def _prepare(self, row: _Row) -> None:
        request = row.request
        row.ids = self.encode(request.messages)
        embeds = request.prefix_embeds
        if embeds is not None:
            hidden = self.model.get_input_embeddings().weight.shape[1]
            if request.prefix_messages or embeds.dim() != 2 or embeds.shape[1] != hidden or not len(embeds):
                raise ValueError(
                    f"prefix_embeds: expected [k >= 1, {hidden}] embeddings and no prefix_messages, "
                    f"got {list(embeds.shape)} and {request.prefix_messages}"
                )
            row.offset = embeds.shape[0]
        if row.offset + len(row.ids) + row.sampling.max_tokens > self.max_model_len:
            raise ValueError(
                f"{CONTEXT_LENGTH_ERROR}: {row.offset + len(row.ids)} prompt tokens + {row.sampling.max_tokens} "
                f"max tokens > {self.max_model_len}"
            )
        row.prefix = self._prefix_ids(request, row.ids)
        row.prefix_layers = self._prefix_cache(row.prefix, row.adapter).layers if row.prefix else None
        if embeds is not None:
            row.prefix_layers = self._prefix_cache((), row.adapter, embeds).layers
        if row.sampling.temperature > 0:
            row.generator = torch.Generator(self.device).manual_seed(request.seed)

    def _prefill(self, rows: list[_Row]) -> tuple[Cache, torch.Tensor]:
        """The rows' KV cache over their prompts after their prefixes (whose cached keys they attend to) and its
        attention mask, each row's suffix left-padded; picks each row's first token."""
        width = max(len(row.ids) - len(row.prefix) for row in rows)
        input_ids, mask, positions = [], [], []
        for row in rows:
            p, suffix = len(row.prefix), row.ids[len(row.prefix) :]
            gap = width - len(suffix)
            input_ids.append([self.pad_id] * gap + suffix)
            mask.append([0] * gap + [1] * len(suffix))
            positions.append([0] * gap + list(range(row.offset + p, row.offset + len(row.ids))))
            row.position = row.offset + len(row.ids)
        mask = torch.tensor(mask, device=self.device)
        cache = _cache()
        out = self.model(
            input_ids=torch.tensor(input_ids, device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **self._row_args(rows),
        )
        self._pick(rows, out.logits[:, -1])
        return cache, mask

    def _join(self, prefilled: list[tuple[list[_Row], Cache, torch.Tensor, list[int]]]) -> None:
        """The running batch's live rows and the prefilled rows that go on (`keep` of each group) as one batch,
        every row's keys left-padded to the longest: one copy per layer."""
        prefilled = [(rows, cache, mask, keep) for rows, cache, mask, keep in prefilled if keep]
        if not prefilled:
            return
        if not self._rows and len(prefilled) == 1 and len(prefilled[0][3]) == len(prefilled[0][0]):
            self._rows, self._cache, self._mask, _ = prefilled[0]
            self._rows = list(self._rows)
            return
        blocks = [(cache, mask, torch.tensor(keep, device=self.device)) for _, cache, mask, keep in prefilled]
        if self._rows:
            live = torch.tensor([b for b, row in enumerate(self._rows) if row is not None], device=self.device)
            blocks.insert(0, (self._cache, self._mask, live))
        width = max(m.shape[1] for _, m, _ in blocks)
        self._cache = _cache(
            [
                _Layer().fill(
                    [c.layers[i].keys[index] for c, _, index in blocks],
                    [c.layers[i].values[index] for c, _, index in blocks],
                    width,
                )
                for i in range(len(blocks[0][0].layers))
            ]
        )
        self._mask = torch.cat([F.pad(m[index], (width - m.shape[1], 0)) for _, m, index in blocks])
        self._rows = [row for row in self._rows if row is not None] + [
            rows[b] for rows, _, _, keep in prefilled for b in keep
        ]

    def _live(self) -> int:
        return sum(row is not None for row in self._rows)

    def _step(self) -> None:
        """One decode step of the running batch. A row that ends leaves a hole that computes on until the holes
        are a quarter of the batch, or rows join: compacting copies the whole cache."""
        rows = self._rows
        live = [b for b, row in enumerate(rows) if row is not None]
        try:
            self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], 1)
            out = self.model(
                input_ids=torch.tensor(
                    [[row.generated[-1] if row else self.pad_id] for row in rows], device=self.device
                ),
                attention_mask=self._mask,
                position_ids=torch.tensor([[row.position if row else 0] for row in rows], device=self.device),
                cache=self._cache,
                use_cache=True,
                logits_to_keep=1,
                **self._row_args(rows),
            )
            for b in live:
                rows[b].position += 1
            self._pick([rows[b] for b in live], out.logits[live, -1])
            self.steps.append((len(live), tuple(sorted({rows[b].adapter or "__base__" for b in live}))))
        except Exception as e:  # the whole batch shared the failed step
            for b in live:
                _settle(rows[b], _failure(e))
            self._rows, self._cache, self._mask = [], None, None
            return
        for b in live:
            if self._ended(rows[b]):
                rows[b] = None
        holes = len(rows) - self._live()
        if holes and (holes * 4 >= len(rows) or holes == len(rows)):
            self._compact()

    def _compact(self) -> None:
        """Drop the holes, and the columns that are padding in every row left."""
        keep = [b for b, row in enumerate(self._rows) if row is not None]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        start = int(mask.any(0).nonzero()[0])
        width = mask.shape[1] - start
        self._cache = _cache(
            [
                _Layer().fill([layer.keys[index, :, start:]], [layer.values[index, :, start:]], width)
                for layer in self._cache.layers
            ]
        )
        self._mask = mask[:, start:]
        self._rows = [self._rows[b] for b in keep]

    def _row_args(self, rows: list[_Row | None]) -> dict:
        """The forward's arguments for these rows: the prefixes they attend to (prefix_attention) and, with
        adapters loaded, each row's adapter (PEFT's mixed batches; "__base__": none)."""
        groups: dict[int, tuple[list, list[int]]] = {}
        for b, row in enumerate(rows):
            if row is not None and row.prefix_layers is not None:
                groups.setdefault(id(row.prefix_layers), (row.prefix_layers, []))[1].append(b)
        args = {"prefixes": [(layers, torch.tensor(b, device=self.device)) for layers, b in groups.values()]}
        if hasattr(self.model, "peft_config"):
            args["adapter_names"] = [row.adapter if row and row.adapter else "__base__" for row in rows]
        return args

    def _pick(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits (greedy, or sampled with its own generator)."""
        logits = logits.float()
        tokens = logits.argmax(-1).tolist()
        for b, row in enumerate(rows):
            sampling = row.sampling
            if sampling.logprobs:  # raw logits (before temperature / top-p), for the teacher's top-k
                values, ids = logits[b].log_softmax(-1).topk(sampling.logprobs)
                row.topk_ids.append(ids.tolist())
                row.topk_logprobs.append(values.tolist())
            if sampling.temperature > 0:
                probs = (logits[b] / sampling.temperature).softmax(-1)
                if sampling.top_p < 1:  # the smallest set of tokens whose mass reaches top_p
                    sorted_probs, order = probs.sort(descending=True)
                    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p] = 0
                    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
                tokens[b] = int(torch.multinomial(probs, 1, generator=row.generator))
            row.generated.append(tokens[b])

    def _ended(self, row: _Row) -> bool:
        """Whether the row is done after its last token; a done row gets its completion."""
        token, sampling = row.generated[-1], row.sampling
        if row.stream is not None and token not in self.eos_ids and not row.stream.cancelled:
            row.stream.on_token(token)
        done = (
            token in self.eos_ids
            or len(row.generated) >= sampling.max_tokens
            or (row.stream is not None and row.stream.cancelled)
            or row.future.cancelled()  # its caller stopped waiting: free the row
            or (sampling.stop and self._stopped(row.generated, sampling.stop))
        )
        if done:
            completion = self._completion(row.generated, row.offset + len(row.ids), sampling)
            if sampling.logprobs:
                n = len(completion.token_ids)
                completion.topk_ids, completion.topk_logprobs = row.topk_ids[:n], row.topk_logprobs[:n]
            _settle(row, completion)
        return done

    def _stopped(self, generated: list[int], stop: tuple[str, ...]) -> bool:
        """Whether a stop string appears in the text, checked at every token: a new match ends with the last token,
        so only the last tokens are decoded (4 per character: byte-level tokens may carry a quarter of one)."""
        tail = generated[-(4 * max(map(len, stop)) + 8) :]
        return any(s in self.tokenizer.decode(tail, skip_special_tokens=True) for s in stop)

    def _prefix_ids(self, request: ChatRequest, ids: list[int]) -> tuple[int, ...]:
        if request.prefix_messages <= 0:
            return ()
        prefix = self.encode(request.messages[: request.prefix_messages], generation_prompt=False)
        n = 0  # templates may render a prefix differently alone; keep only the common tokens
        for a, b in zip(prefix, ids):
            if a != b:
                break
            n += 1
        return tuple(ids[: min(n, len(ids) - 1)])  # leave at least one token to prefill

    def _prefix_cache(self, prefix: tuple[int, ...], adapter: str | None, embeds: torch.Tensor | None = None) -> Cache:
        """The prefix's KV cache as computed with this adapter (None: the base). `embeds`: input embeddings instead
        of the prefix's ids (a request's prefix_embeds), put on the model's device and dtype and kept by their
        values' digest (the same slots from two requests share one cache)."""
        if embeds is None:
            key, inputs = (adapter, prefix), {"input_ids": torch.tensor([prefix], device=self.device)}
        else:
            weight = self.model.get_input_embeddings().weight
            embeds = embeds.detach().to(device=weight.device, dtype=weight.dtype)
            digest = hashlib.sha256(embeds.float().cpu().numpy().tobytes()).hexdigest()
            key, inputs = (adapter, ("embeds", tuple(embeds.shape), digest)), {"inputs_embeds": embeds[None]}
        cache = self._prefixes.get(key)
        if cache is not None:
            self._prefixes.move_to_end(key)
            self.prefix_hits += 1
            return cache
        self.prefix_misses += 1
        cache = _cache()
        adapters = {"adapter_names": [adapter or "__base__"]} if hasattr(self.model, "peft_config") else {}
        self.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1, **adapters)
        self._prefixes[key] = cache
        if len(self._prefixes) > self.prefix_cache_size:
            self._prefixes.popitem(last=False)
        return cache

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
        completion = Completion(
            text=text, prompt_tokens=prompt_tokens, completion_tokens=n_tokens, finish_reason=finish
        )
        if sampling.logprobs:
            completion.token_ids = text_token_ids(self.tokenizer, kept, text) if finish == "stop" else list(kept)
        return completion
