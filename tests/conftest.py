"""Shared fixtures: a tiny random Llama that uses the bundled SmolLM2 tokenizer and chat template, and the small runs
that several test modules read (made once per run, `once_per_run`, also when pytest-xdist's workers share it).

Tests marked `slow` (end to end: the commands as subprocesses, Ray, training, SmolLM2) are left out by
`pytest -m "not slow"`, the inner loop; CI runs everything. Tests marked `alone` use both cores by themselves and
run before the rest, which scripts/test.sh runs on two pytest-xdist workers."""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "agents.yaml"


if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: set before torch and Ray are imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a thread that waits sleeps instead of spinning
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's workers (nice 15 by default) would yield to the other


def once_per_run(tmp_path_factory, name: str, make):
    """make(folder)'s result (picklable), made once per pytest run in the folder NAME: under pytest-xdist by the
    first worker that asks, in the temp folder the workers share, while the others wait for it and read it back."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, result = root / name, root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)  # left by a worker that failed to make it
            folder.mkdir()
            result.write_bytes(pickle.dumps(make(folder)))
    return pickle.loads(result.read_bytes())


def build_tiny_llama(folder: Path, max_positions: int = 1024, seed: int = 0, initializer_range: float = 0.5) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from genpi.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        initializer_range=initializer_range,  # large by default: greedy outputs differ from prompt to prompt
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return once_per_run(tmp_path_factory, "tiny-llama", lambda folder: str(build_tiny_llama(folder)))


@pytest.fixture(scope="session")
def tiny_long_model(tmp_path_factory) -> str:
    """Room for the example catalog's longest prompts (about 1,100 tokens) and a conversation after them."""
    return once_per_run(
        tmp_path_factory, "tiny-llama-4k", lambda folder: str(build_tiny_llama(folder, max_positions=4096))
    )


@pytest.fixture(scope="session")
def tiny_trainable_model(tmp_path_factory) -> str:
    """The usual small init: losses start near log(vocab) and fall fast."""
    return once_per_run(
        tmp_path_factory, "tiny-llama-trainable", lambda folder: str(build_tiny_llama(folder, initializer_range=0.02))
    )


@pytest.fixture(scope="session")
def tiny_finishing_model(tmp_path_factory) -> str:
    """A tiny random Llama that ends about half of its replies within a dozen tokens. A random model almost
    never emits EOS (SmolLM2's EOS is its pad token, whose embedding starts at zero), and synthesis drops
    pseudo inputs cut by the token limit, so a synthesis run needs a model that stops."""
    return once_per_run(tmp_path_factory, "tiny-llama-finishing", make_finishing_model)


def make_finishing_model(folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_llama(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    eos = AutoTokenizer.from_pretrained(folder).eos_token_id
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # tied embeddings: this row is EOS's output logit weights (and its input embedding)
        model.lm_head.weight[eos] = torch.randn(model.config.hidden_size, generator=generator) * 1.5
    model.save_pretrained(folder)
    return str(folder)


# The embedded server on the tiny model with two adapters, for the serving tests (test_serve*.py); modules that
# serve something else define their own `adapters_dir` and `served`, which win over these.
@pytest.fixture(scope="module")
def adapters_dir(tiny_model, tmp_path_factory):
    from test_serve import make_adapters

    return make_adapters(tiny_model, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def served(tiny_model, adapters_dir):
    from test_serve import start

    server, scheduler, base_name = start(tiny_model, adapters_dir)
    yield server.url, scheduler, base_name
    server.close()
    scheduler.close()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs) for a module's in-process runs: starting one costs seconds of CPU each time."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def cli_in_process(capsys, *argv) -> tuple[int, str]:
    """`genpi ARGV` run in this process: (exit status, stderr). For bad-input refusals: a subprocess each costs
    seconds of imports, so a test keeps one refusal as a real subprocess (the command's exit status) and runs the rest
    here. argparse's refusals exit by SystemExit; InputError returns 2 (genpi.exits_2_on_input_error)."""
    from genpi.cli import main

    capsys.readouterr()  # what came before is not this command's
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# Runs that several modules read, made once per session: read-only for the tests that share them. A test that writes
# into one (an evaluation recording its metrics in genpi.json, a report writing into the run) works on a copy.
def copy_into(folder: Path, tmp_path: Path, name: str | None = None) -> Path:
    """A copy of a shared run's folder as tmp_path/NAME (default: its own name), for a test that writes into it."""
    return Path(shutil.copytree(folder, tmp_path / (name or Path(folder).name), symlinks=True))


@pytest.fixture(scope="session")
def calc_dialogues(tmp_path_factory) -> Path:
    """A synthesis folder written by hand: calc has 8 train and 2 held-out dialogues, greet has none."""
    from test_recipe import write_calc_dialogues

    return once_per_run(
        tmp_path_factory, "calc-dialogues", lambda folder: write_calc_dialogues(folder, 10, heldout_from=8)
    )


@pytest.fixture(scope="session")
def calc_genpi_trained(calc_dialogues, tiny_trainable_model, tmp_path_factory):
    """`genpi train` (genpi, λ 0.3 and 0.7, 1 epoch, with progress bars, TensorBoard and MLflow tracking) of
    calc_dialogues on the tiny Llama: (the adapters folder, the finished process). test_train_run checks the
    training, test_tracking its logged figures, test_eval_report reports on it."""
    from test_train_run import train

    def make(folder):
        adapters = folder / "adapters"
        tracking = ("--tracking", "tensorboard,mlflow")
        return adapters, train(
            calc_dialogues, adapters, "--base", tiny_trainable_model, "--lambdas", "0.3,0.7", *tracking, progress=True
        )

    return once_per_run(tmp_path_factory, "calc-genpi", make)


@pytest.fixture(scope="session")
def tiny_run_resumed(tiny_finishing_model, tmp_path_factory):
    """`genpi run` on the tiny Llama (methods sft, genpi and a prompt-prepending variant, a compressed P, Mind2Web
    steps), killed in its second training stage and run again (test_run.killed_then_resumed): (the run folder, (its
    command, the stages at the kill, the sft adapter's mtime then, the second run)). test_run checks the resume,
    test_table1 the report's Table 1 (read-only)."""
    from test_run import killed_then_resumed

    return once_per_run(
        tmp_path_factory,
        "tiny-run",
        lambda folder: (folder / "run", killed_then_resumed(tiny_finishing_model, folder / "run")),
    )


@pytest.fixture(scope="session")
def calc_sft_adapters(tiny_trainable_model, tmp_path_factory) -> Path:
    """An SFT adapter for calc on the tiny Llama, trained in process on 12 rows (λ 0.3 and 0.7 recorded as tried): it
    learns to open with an `Act: ...(...)` action. test_eval and test_eval_leakage evaluate it."""
    from test_eval import train_sft

    return once_per_run(
        tmp_path_factory, "calc-sft", lambda folder: train_sft(tiny_trainable_model, folder, lambdas=[0.3, 0.7])
    )
