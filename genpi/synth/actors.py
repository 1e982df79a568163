"""Engines hosted in Ray actors, batching the calls of many dialogues in flight.

Each dialogue awaits one `generate` call at a time, and every call goes to the
engine as it arrives: engines schedule continuously themselves (vLLM's async
engine, `complete`; the transformers engine's worker thread, `submit`), so
dozens of dialogues share every decode step.

A dead engine (vLLM's engine-dead error, a broken CUDA context, the same
failure over and over) ends its actor's process, so Ray starts a fresh one and
re-sends the calls that were in flight; restarts and retries are bounded, and
every call has a timeout, so a broken engine ends in recorded failures (which a
rerun redoes), never in a hang. The engine is shut down before the process ends:
vLLM's engine core and tensor-parallel workers are processes of their own, which
would keep their GPU memory and fail the restarted actor's memory check. Where
the process dies without that (killed, out of memory), Ray reaps its children
if the cluster enables it (RAY_process_group_cleanup_enabled, see cluster/).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid

import ray

from genpi.engines import CONTEXT_LENGTH_ERROR, ChatRequest, Completion, EngineConfig, make_engine

# Errors after which an engine never recovers in-process.
FATAL_ENGINE_ERRORS = (
    "EngineDeadError",
    "CUDA error",
    "illegal memory access",
    "device-side assert",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "NCCL error",
)
DEAD_AFTER_IDENTICAL_FAILURES = 8  # the same engine error this many calls in a row: treat as dead
SHUTDOWN_TIMEOUT_S = 60.0  # a dead engine's shutdown may hang (a wedged GPU): the process exits after this anyway


@ray.remote
class EngineActor:
    def __init__(self, config: EngineConfig, record: bool = False, build=make_engine):
        self.config = config
        self.engine = build(config)
        self.requests: list[ChatRequest] | None = [] if record else None  # for benchmarks: replay what was served
        self.last_failure, self.repeated_failures = "", 0

    def served(self) -> dict:
        return {"busy_s": getattr(self.engine, "busy_s", None), "requests": self.requests}

    def describe(self) -> dict:
        return {"model_name": self.engine.model_name, "pid": os.getpid()}

    async def generate(self, request: ChatRequest) -> Completion:
        if self.requests is not None:
            self.requests.append(request)
        try:
            if hasattr(self.engine, "submit"):  # its own worker thread
                result = await asyncio.wrap_future(self.engine.submit(request))
            else:
                result = await self.engine.complete(request)
        except Exception as e:  # engines report per-request errors; this is a safety net
            result = Completion.failure(f"engine: {type(e).__name__}: {e}")
        self._exit_if_dead([result])
        return result

    def _exit_if_dead(self, results: list[Completion]) -> None:
        """End the process when the engine cannot recover: Ray restarts the actor and re-sends the calls in flight
        (their answers are never sent from here)."""
        for result in results:
            if result.error is None:
                self.last_failure, self.repeated_failures = "", 0
            elif not result.error.startswith(
                f"{CONTEXT_LENGTH_ERROR}:"
            ):  # a too-long prompt says nothing of the engine
                same = result.error == self.last_failure
                self.last_failure, self.repeated_failures = result.error, self.repeated_failures + 1 if same else 1
                fatal = any(marker in result.error for marker in FATAL_ENGINE_ERRORS)
                if fatal or self.repeated_failures >= DEAD_AFTER_IDENTICAL_FAILURES:
                    why = "fatal error" if fatal else f"the same error {self.repeated_failures} times in a row"
                    print(
                        f"genpi: engine {self.config.model} (pid {os.getpid()}) is dead ({why}: {result.error[:500]}); "
                        "shutting it down and exiting so that Ray restarts it",
                        file=sys.stderr,
                        flush=True,
                    )
                    shut_down_and_exit(self.engine)


def shut_down_and_exit(engine) -> None:
    """End this process, the engine shut down first (its `shutdown`, where it has one: vLLM's stops its engine core
    and tensor-parallel worker processes, which would otherwise keep their GPU memory). A watchdog ends the process
    if the shutdown hangs; os._exit, not sys.exit: the actor must not go on serving from a dead engine."""
    watchdog = threading.Timer(SHUTDOWN_TIMEOUT_S, os._exit, (1,))
    watchdog.daemon = True
    watchdog.start()
    try:
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    except Exception as e:  # exit all the same
        print(f"genpi: the dead engine's shutdown failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
    finally:
        watchdog.cancel()
    os._exit(1)


class ActorEngine:
    """An `AsyncEngine` (genpi.engines) backed by an engine actor."""

    def __init__(self, handle, model_name: str, timeout_s: float):
        self.handle = handle
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.generated_tokens = 0  # for progress: tokens/s as they come, not per finished dialogue

    async def complete(self, request: ChatRequest) -> Completion:
        ref = self.handle.generate.remote(request)
        try:
            result = await asyncio.wait_for(ref, self.timeout_s)
        except TimeoutError:
            ray.cancel(ref)
            result = Completion.failure(f"engine: {self.model_name} gave no answer within {self.timeout_s:g} s")
        except ray.exceptions.RayError as e:  # the actor died for good (restarts used up), or the call raised
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            result = Completion.failure(f"engine: {type(e).__name__}: {first_line}"[:1000])
        self.generated_tokens += result.completion_tokens
        return result


def start_engine(
    config: EngineConfig, name: str, restarts: int, timeout_s: float, record: bool = False
) -> tuple[object, ActorEngine]:
    """An engine actor, named (with a unique suffix) so that `ray list actors` tells which is which."""
    name = f"genpi-{name}-{uuid.uuid4().hex[:8]}"
    handle = EngineActor.options(
        name=name, num_cpus=config.num_cpus, num_gpus=config.num_gpus, max_restarts=restarts, max_task_retries=restarts
    ).remote(config, record)
    info = ray.get(handle.describe.remote())
    return handle, ActorEngine(handle, info["model_name"], timeout_s)
