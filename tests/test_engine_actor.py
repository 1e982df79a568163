"""Engine actors on a real local Ray: a dead engine restarts its actor and loses no call; restarts are bounded;
calls time out. The engines are fakes built inside the actor (by value, from this module)."""

import asyncio
import os
import sys
from pathlib import Path

import pytest
import ray

from genpi.engines import ChatRequest, Completion, EngineConfig
from genpi.synth.actors import DEAD_AFTER_IDENTICAL_FAILURES, ActorEngine, EngineActor
from genpi.synth.pipeline import is_retryable


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def first_life(marker: Path) -> bool:
    """True in the first process that asks (it leaves a marker), False in every later one."""
    try:
        marker.touch(exist_ok=False)
        return True
    except FileExistsError:
        return False


def batch_engine(marker: Path, error: str, doomed_always: bool = False):
    """An engine with a worker thread (`submit`, as the transformers engine) whose first process answers every
    request with `error`."""

    def build(config):
        from concurrent.futures import ThreadPoolExecutor

        class Engine:
            model_name = "fake"

            def __init__(self):
                self.doomed = first_life(marker) or doomed_always
                self.worker = ThreadPoolExecutor(max_workers=1)

            def submit(self, request):
                return self.worker.submit(self.answer, request)

            def answer(self, request):
                if self.doomed:
                    return Completion.failure(error)
                return Completion(text=f"{os.getpid()}:{request.messages[0]['content']}", finish_reason="stop")

        return Engine()

    return build


def async_engine(marker: Path, hang_on: str = ""):
    """An engine with its own scheduler (`complete`), as vLLM's: its first process's engine core is dead."""

    def build(config):
        class EngineDeadError(Exception):
            pass

        class Engine:
            model_name = "fake-async"

            def __init__(self):
                self.dead = first_life(marker)

            async def complete(self, request):
                if self.dead:
                    return Completion.failure(f"engine: {EngineDeadError.__name__}: EngineCore encountered an issue.")
                if hang_on and hang_on in request.messages[0]["content"]:
                    await asyncio.sleep(3600)
                return Completion(text=f"{os.getpid()}:{request.messages[0]['content']}", finish_reason="stop")

        return Engine()

    return build


def start(build, restarts: int = 2, timeout_s: float = 120) -> tuple[object, ActorEngine]:
    handle = EngineActor.options(max_restarts=restarts, max_task_retries=restarts, num_cpus=0).remote(
        EngineConfig(), False, build
    )
    return handle, ActorEngine(handle, "fake", timeout_s)


async def ask_all(engine: ActorEngine, texts: list[str], retries: int = 0) -> list[Completion]:
    """Every text asked; a retryable failure asked again up to `retries` times, as the pipeline does."""

    async def ask(text: str) -> Completion:
        for _ in range(retries + 1):
            result = await engine.complete(ChatRequest([{"role": "user", "content": text}]))
            if result.error is None or not is_retryable(result.error):
                break
        return result

    return await asyncio.gather(*(ask(t) for t in texts))


def pid_of(handle) -> int:
    return ray.get(handle.describe.remote(), timeout=120)["pid"]


@pytest.mark.parametrize(
    "build",
    [
        lambda marker: batch_engine(marker, "engine: RuntimeError: CUDA error: an illegal memory access was encountered"),
        lambda marker: async_engine(marker),
        lambda marker: batch_engine(marker, "engine: ValueError: something odd"),  # not fatal, but the same every time
    ],
    ids=["cuda-error", "engine-dead", "repeated-failure"],
)
def test_a_dead_engine_restarts_its_actor_and_every_call_is_answered(local_ray, tmp_path, build):
    handle, engine = start(build(tmp_path / "died"))
    first_pid = pid_of(handle)
    texts = [f"request {i}" for i in range(DEAD_AFTER_IDENTICAL_FAILURES + 2)]
    # Calls go to the engine one by one: a non-fatal error is answered as it comes (the engine is not yet known
    # to be dead), and the pipeline's retry of it reaches the restarted process.
    results = asyncio.run(ask_all(engine, texts, retries=1))
    assert (tmp_path / "died").exists()  # the first engine did fail
    assert [r.error for r in results] == [None] * len(texts)  # no call lost, none left with the dead engine's error
    second_pid = pid_of(handle)
    assert second_pid != first_pid
    assert [r.text for r in results] == [f"{second_pid}:{t}" for t in texts]  # answered by the restarted process
    ray.kill(handle)


def test_restarts_are_bounded_then_calls_fail_as_retryable(local_ray, tmp_path):
    handle, engine = start(batch_engine(tmp_path / "died", "engine: RuntimeError: CUDA error: unknown", doomed_always=True), restarts=1)
    results = asyncio.run(ask_all(engine, ["a", "b"]))
    for r in results:
        assert r.finish_reason == "error" and r.error.startswith("engine: ") and "Actor" in r.error
        assert is_retryable(r.error)  # a rerun redoes the dialogue
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.describe.remote(), timeout=60)  # dead for good: no endless restarts


def test_a_call_that_hangs_times_out_and_others_are_answered(local_ray, tmp_path):
    (tmp_path / "died").touch()  # a healthy engine from the start
    handle, engine = start(async_engine(tmp_path / "died", hang_on="stuck"), timeout_s=3)
    stuck, fine = asyncio.run(ask_all(engine, ["stuck", "fine"]))
    assert stuck.error == "engine: fake gave no answer within 3 s" and is_retryable(stuck.error)
    assert fine.error is None and fine.text.endswith(":fine")
    ray.kill(handle)
