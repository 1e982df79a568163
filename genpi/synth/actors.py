"""Engines hosted in Ray actors, batching the calls of many dialogues in flight.

Each dialogue awaits one `generate` call at a time; the actor gathers whatever
calls are pending and hands them to its engine as one batch, so dozens of
dialogues share every forward pass. Actors are created with unlimited restarts
and task retries: when an actor's process dies (killed, out of memory), Ray
starts a new one and re-sends the calls that were in flight.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import ray

from genpi.engines import ChatRequest, Completion, EngineConfig, make_engine


@ray.remote(max_restarts=-1, max_task_retries=-1)
class EngineActor:
    def __init__(self, config: EngineConfig, record: bool = False):
        # One thread runs the engine, always the same: torch's OpenMP pool is per thread.
        self.executor = ThreadPoolExecutor(max_workers=1)
        if config.kind == "transformers":
            import torch

            threads = max(1, int(config.num_cpus))
            self.executor.submit(torch.set_num_threads, threads).result()
        self.config = config
        self.engine = make_engine(config)
        self.pending: list[tuple[ChatRequest, asyncio.Future]] = []
        self.wakeup: asyncio.Event | None = None
        self.busy_s = 0.0  # time spent inside the engine
        self.batches: list[list[ChatRequest]] | None = [] if record else None  # for benchmarks: replay what was served

    def served(self) -> dict:
        return {"busy_s": self.busy_s, "batches": self.batches}

    def describe(self) -> dict:
        return {"model_name": self.engine.model_name, "pid": os.getpid()}

    async def generate(self, request: ChatRequest) -> Completion:
        if self.wakeup is None:
            self.wakeup = asyncio.Event()
            asyncio.get_running_loop().create_task(self._batch_loop())
        future = asyncio.get_running_loop().create_future()
        self.pending.append((request, future))
        self.wakeup.set()
        return await future

    async def _batch_loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            await asyncio.sleep(0.01)  # let the calls of a wave of dialogues arrive together
            batch, self.pending = self.pending, []
            if self.batches is not None:
                self.batches.append([request for request, _ in batch])
            started = time.perf_counter()
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.engine.generate, [request for request, _ in batch]
                )
            except Exception as e:  # engines report per-request errors; this is a safety net
                results = [Completion.failure(f"engine: {type(e).__name__}: {e}")] * len(batch)
            self.busy_s += time.perf_counter() - started
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
            if self.pending:
                self.wakeup.set()


class ActorEngine:
    """An `AsyncEngine` (genpi.synth.pipeline) backed by an engine actor."""

    def __init__(self, handle, model_name: str):
        self.handle = handle
        self.model_name = model_name
        self.generated_tokens = 0  # for progress: tokens/s as they come, not per finished dialogue

    async def complete(self, request: ChatRequest) -> Completion:
        result = await self.handle.generate.remote(request)
        self.generated_tokens += result.completion_tokens
        return result


def start_engine(config: EngineConfig, name: str, record: bool = False) -> tuple[object, ActorEngine]:
    """An engine actor, named (with a unique suffix) so that `ray list actors` tells which is which."""
    name = f"genpi-{name}-{uuid.uuid4().hex[:8]}"
    handle = EngineActor.options(name=name, num_cpus=config.num_cpus, num_gpus=config.num_gpus).remote(config, record)
    info = ray.get(handle.describe.remote())
    return handle, ActorEngine(handle, info["model_name"])
