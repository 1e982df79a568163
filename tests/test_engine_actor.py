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

pytestmark = pytest.mark.slow  # end to end (conftest)


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


def record_shutdown(marker: Path) -> None:
    """An engine's shutdown, recorded next to its marker (the pids of the processes that shut their engine down)."""
    with open(marker.parent / "shut_down", "a") as f:
        f.write(f"{os.getpid()}\n")


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

            def shutdown(self):
                record_shutdown(marker)

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

            def shutdown(self):  # vLLM's stops its engine core and tensor-parallel workers (processes of their own)
                record_shutdown(marker)

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
        lambda marker: batch_engine(
            marker, "engine: RuntimeError: CUDA error: an illegal memory access was encountered"
        ),
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
    assert (tmp_path / "shut_down").read_text().split() == [str(first_pid)]  # the dead process shut its engine down
    assert [r.text for r in results] == [f"{second_pid}:{t}" for t in texts]  # answered by the restarted process
    ray.kill(handle)


def test_restarts_are_bounded_then_calls_fail_as_retryable(local_ray, tmp_path):
    handle, engine = start(
        batch_engine(tmp_path / "died", "engine: RuntimeError: CUDA error: unknown", doomed_always=True), restarts=1
    )
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


class Recorder:
    """A fake engine that records its shutdown, and this process's exit (os._exit, patched), in order."""

    model_name = "fake"

    def __init__(self, monkeypatch, shutdown=lambda: None):
        import threading

        self.calls, self._shutdown = [], shutdown

        def exit_(status):
            if threading.current_thread() is not threading.main_thread():
                self.calls.append(f"exit {status} (watchdog)")  # its thread ends here
                return
            self.calls.append(f"exit {status}")
            raise SystemExit(status)

        monkeypatch.setattr(os, "_exit", exit_)

    def shutdown(self):
        self.calls.append("shutdown")
        self._shutdown()


def plain_actor(engine):
    """The actor's class itself, in this process (no Ray)."""
    return EngineActor.__ray_metadata__.modified_class(EngineConfig(), False, lambda config: engine)


def test_a_dead_engine_is_shut_down_before_its_process_exits(monkeypatch):
    engine = Recorder(monkeypatch)
    actor = plain_actor(engine)
    actor._exit_if_dead([Completion.failure("context_length: 900 prompt tokens + 200 max tokens > 1024")])
    actor._exit_if_dead([Completion.failure("engine: ValueError: one odd request")])
    assert engine.calls == []  # neither says the engine is dead
    with pytest.raises(SystemExit):
        actor._exit_if_dead([Completion.failure("engine: EngineDeadError: EngineCore encountered an issue.")])
    assert engine.calls == ["shutdown", "exit 1"]


def test_a_shutdown_that_hangs_does_not_keep_a_dead_engine_s_process(monkeypatch):
    import threading

    from genpi.synth import actors

    ended = threading.Event()
    engine = Recorder(monkeypatch, shutdown=lambda: ended.wait(30))
    monkeypatch.setattr(actors, "SHUTDOWN_TIMEOUT_S", 0.2)
    os_exit = os._exit
    monkeypatch.setattr(os, "_exit", lambda status: (ended.set(), os_exit(status)))  # the watchdog's exit ends the wait
    with pytest.raises(SystemExit):
        plain_actor(engine)._exit_if_dead(
            [Completion.failure("engine: RuntimeError: CUDA error: an illegal memory access")]
        )
    assert engine.calls[:2] == ["shutdown", "exit 1 (watchdog)"]
