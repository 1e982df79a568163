"""What the embedded engine serves and how requests reach it. `load_adapters` finds ADAPTERS/ID/ per prompt and
refuses any adapter that is stale (trained for another version of the catalog's prompt, `prompt_sha256`) or
foreign (another catalog, another base model). A `Job` is one chat completion on its way through the engine; the
`Scheduler` hands each to the engine's worker thread as it comes, which batches continuously: a request joins the
running batch as it arrives, rows of different adapters together (PEFT's `adapter_names`), and leaves it as it
ends, its tokens streamed as they are generated and its row stopped once its client goes away. `Prefixes` picks
the leading messages whose KV cache the engine computes once and keeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from genpi import InputError
from genpi.catalog import load_catalog
from genpi.data.adapters import AdapterManifest, check_adapter, check_base, read_adapter_manifest
from genpi.engines import ChatRequest, Completion

HISTORY = 1000  # jobs the scheduler remembers


@dataclass
class Adapter:
    prompt_id: str
    folder: Path
    manifest: AdapterManifest

    @property
    def name(self) -> str:  # the PEFT adapter name: no dots (module paths)
        return self.prompt_id.replace(".", "_")


def load_adapters(adapters: str | Path, catalog: str | Path, base: str | None) -> tuple[str, list[Adapter]]:
    """The base model folder and the checked adapters under ADAPTERS/ID/; anything stale or foreign is refused."""
    from genpi.models import resolve_model

    root = Path(adapters)
    if not root.is_dir():
        raise InputError(f"{root}: no such adapters folder")
    entries = {e.id: e for e in load_catalog(catalog)}
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):  # .*: leftovers
        manifest = read_adapter_manifest(folder)
        if folder.name not in entries:
            what = f"an adapter for prompt {manifest.prompt_id!r}" if manifest else "a folder"
            raise InputError(f"{folder}: {what} that the catalog {catalog} does not have; remove it or use its catalog")
        if manifest and manifest.method == "icae":  # slots in P's place, not a LoRA of the served base
            raise InputError(
                f"{folder}: an ICAE system (genpi train --method icae), not a LoRA adapter: genpi serve cannot serve "
                "it; evaluate it with genpi eval --adapters"
            )
        found.append(Adapter(folder.name, folder, check_adapter(folder, entries[folder.name])))
    if not found:
        raise InputError(f"{root}: no adapters (expected one folder ADAPTERS/ID/ per prompt, from genpi train --out)")
    if base is None:  # the base the adapters were trained on
        bases = sorted({a.manifest.base_model for a in found})
        if len(bases) > 1:
            raise InputError(f"{root}: adapters trained on different base models {bases}; serve them apart")
        base = bases[0]
    try:
        base_path = resolve_model(base)
    except FileNotFoundError as e:
        raise InputError(str(e)) from e
    for adapter in found:
        check_base(adapter.folder, adapter.manifest, base_path)
    if len({a.name for a in found}) < len(found):
        raise InputError(f"{root}: prompt ids that differ only by '.' and '_' cannot be served together")
    return base_path, found


class Job:
    """One chat completion on its way through the engine; `on_token` and `cancelled` make it a stream for
    TransformersEngine.submit."""

    def __init__(self, request: ChatRequest, adapter: str | None, stream: bool):
        self.request, self.adapter = request, adapter
        self.loop = asyncio.get_running_loop()
        self.result: asyncio.Future[Completion] = self.loop.create_future()
        self.tokens: asyncio.Queue[int] | None = asyncio.Queue() if stream else None
        self.cancelled = False
        self.first_token_at: float | None = None  # time.perf_counter() at its first token (time to first token)

    def on_token(self, token: int) -> None:  # called from the engine thread
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.tokens is not None:
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, token)

    def finish(self, completion: Completion) -> None:  # called from the engine thread
        self.loop.call_soon_threadsafe(lambda: self.result.done() or self.result.set_result(completion))


class Scheduler:
    """Hands each job to the engine's worker as it comes (the engine batches continuously, rows of different
    adapters together) and remembers the last jobs served."""

    def __init__(self, engine):
        self.engine = engine
        self.served: deque[dict] = deque(maxlen=HISTORY)  # adapter and completion tokens (for tests and benchmarks)

    def submit(self, job: Job) -> Job:
        future = self.engine.submit(job.request, job.adapter, job)  # every job can be cancelled
        future.add_done_callback(lambda f: self._done(job, f))
        return job

    def _done(self, job: Job, future) -> None:
        error = future.exception()  # the engine reports per-request errors; this is a safety net
        completion = Completion.failure(f"engine: {type(error).__name__}: {error}") if error else future.result()
        self.served.append({"adapter": job.adapter, "completion_tokens": completion.completion_tokens})
        job.finish(completion)

    def close(self) -> None:
        self.engine.close()


class Prefixes:
    """Which leading messages are a shared prefix: a run that requests have followed with different next
    messages (the prompt P, before each conversation's own turns), not one that a single conversation repeats
    (its earlier turns). Runs are hashed; the most recent `size` are kept."""

    def __init__(self, size: int = 4096):
        self.next: OrderedDict[bytes, set[bytes]] = OrderedDict()  # run: the first two different next messages
        self.size = size

    def shared(self, model: str, messages: list[dict]) -> int:
        run, n = hashlib.sha256(model.encode()), 0
        for k in range(1, len(messages)):  # the last message is never part of a prefix
            run.update(json.dumps(messages[k - 1], sort_keys=True).encode())
            key, after = run.digest(), hashlib.sha256(json.dumps(messages[k], sort_keys=True).encode()).digest()
            seen = self.next.setdefault(key, set())
            self.next.move_to_end(key)
            if len(seen) < 2:
                seen.add(after)
            if len(seen) == 2:
                n = k
        while len(self.next) > self.size:
            self.next.popitem(last=False)
        return n
