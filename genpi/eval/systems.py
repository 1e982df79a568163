"""The systems an evaluation compares, served from one base model.

    teacher   the base model with P            (today's deployment)
    base      the base model without P         (what serving without the prompt gives)
    NAME      the base + NAME's adapter, no P  (one per --adapters folder)
    NAME      a fully fine-tuned model, no P    (an --adapters folder whose genpi.json says kind "model")
    NAME      a served system, no P            (one per --served NAME=openai:BASE_URL/MODEL)
    NAME      the base with a compressed P     (one per --compressed NAME=llmlingua2:RATE; genpi.eval.compressed)
    NAME      the base with P's ICAE slots     (an --adapters folder trained with --method icae)

The base loads once per run; every adapter is loaded on it unmerged (PEFT
`load_adapter`) and switched with `set_adapter`, the base rows with the adapters
disabled: an adapter is evaluated as a LoRA serving engine applies it, on the
unquantized base in the serving dtype (bfloat16 with CUDA, float32 on CPU).

A full fine-tune's model folder (genpi train --full-finetune) is such a system too, under its adapter name: it
loads as a model of its own beside the base (genpi.engines.routed.WithModels), so the evaluations address it as
they address an adapter.

A served system is any OpenAI-compatible server (genpi serve names each adapter by its prompt id, so
MODEL `{prompt_id}` reaches every prompt's adapter). Its replies come over HTTP and are scored like the
local systems'; what needs the model's own logits cannot be, and its summary names it in `not_scored`
(the values null, never 0). The teacher and the base stay local: the evaluated base model still loads.
A served request that gets no answer within SERVED_REQUEST_TIMEOUT_S (every retry included) fails as that
row's error, so a server that stops answering ends the evaluation instead of stalling it.

An evaluation gets its systems per prompt as a `Prompt`: `catalog_prompts` (fidelity, leakage: every catalog
prompt with an adapter) or `task_prompt` (the task evaluations: one prompt); genpi.eval.evaluate runs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from genpi import InputError
from genpi.catalog import PromptEntry
from genpi.data.adapters import AdapterManifest, check_adapter, check_base, is_model
from genpi.engines import ChatRequest, Completion
from genpi.engines.openai import PREFIX, OpenAIEngine, split_spec
from genpi.eval.compressed import Compressed, Compressions, CompressSpec, compressed_note, parse_compressed
from genpi.eval.settings import SystemsSettings

TEACHER, BASE = "teacher", "base"
SYSTEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a Parquet partition value and a table row
PROMPT_ID = "{prompt_id}"
SERVED_REQUEST_TIMEOUT_S = 900.0  # one served request, from its first send to its answer, every retry and wait
# included: room for one full try (the engine's 600 s) and the retries of a short outage


@dataclass(frozen=True)
class System:
    name: str
    adapter: str | None = None  # the PEFT adapter name on the engine; None: the base
    with_prompt: bool = False
    folder: Path | None = None  # ADAPTERS/ID of an adapter system
    manifest: AdapterManifest | None = None
    served: str | None = None  # openai:BASE_URL/MODEL of a served system (its prompt's MODEL)
    compressed: Compressed | None = None  # a compressed system's P (the base given it instead of P)
    # an ICAE folder's system (genpi.train.icae): P's memory slots [k, hidden], given to the base in P's place
    icae: Any = field(default=None, compare=False)
    model: Path | None = None  # a full fine-tune's model folder: loaded as its own model, addressed as `adapter`


def prompt_of(entry: PromptEntry, system: System) -> list:
    """The P a system is given: the catalog's (the teacher), its compressed P (a compressed system), or none."""
    if system.compressed:
        return system.compressed.messages()
    return entry.messages() if system.with_prompt else []


@dataclass(frozen=True)
class Prompt:
    """One prompt's part of an evaluation: its systems, and what the evaluation plays on it."""

    entry: PromptEntry
    systems: list[System]
    missing: list[str] = field(default_factory=list)  # why an adapters folder has no adapter for it
    inputs: Any = None  # read before the model loads (fidelity: the prompt's held-out rows)


def adapter_dirs(specs: list[str]) -> dict[str, Path]:
    """`--adapters` values, `DIR` or `NAME=DIR` (the name defaults to the folder's name), as {name: DIR}."""
    dirs: dict[str, Path] = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(folder)
        name = name or path.resolve().name
        if not path.is_dir():
            raise InputError(f"--adapters {spec}: no such folder")
        if name in (TEACHER, BASE) or name in dirs or not SYSTEM_NAME.fullmatch(name):
            raise InputError(
                f"--adapters {spec}: system name {name!r} is reserved, repeated or not [A-Za-z0-9._+-]; "
                "name it NAME=DIR"
            )
        dirs[name] = path
    return dirs


def compressed_specs(specs: list[str], taken=()) -> list[CompressSpec]:
    """`--compressed NAME=llmlingua2:RATE[:MODEL]` values, their names checked; `taken`: the other systems' names."""
    out = parse_compressed(specs)
    for spec, c in zip(specs, out):
        names = [o.name for o in out]
        if c.name in (TEACHER, BASE) or c.name in taken or names.count(c.name) > 1 or not SYSTEM_NAME.fullmatch(c.name):
            raise InputError(
                f"--compressed {spec}: system name {c.name!r} is reserved, repeated (an --adapters or --served name "
                "too?) or not [A-Za-z0-9._+-]"
            )
    return out


def served_specs(specs: list[str], taken) -> dict[str, str]:
    """`--served NAME=openai:BASE_URL/MODEL` values as {name: spec}; `taken`: the adapter systems' names."""
    served: dict[str, str] = {}
    for spec in specs:
        name, _, target = spec.partition("=")
        if not target.startswith(PREFIX):
            raise InputError(
                f"--served {spec}: expected NAME=openai:BASE_URL/MODEL, e.g. genpi=openai:http://127.0.0.1:8000/v1/{PROMPT_ID}"
            )
        if name in (TEACHER, BASE) or name in taken or name in served or not SYSTEM_NAME.fullmatch(name):
            raise InputError(
                f"--served {spec}: system name {name!r} is reserved, repeated (an --adapters name too?) "
                "or not [A-Za-z0-9._+-]"
            )
        try:
            split_spec(target)
        except ValueError as e:
            raise InputError(f"--served {spec}: {e}") from None
        served[name] = target
    return served


def check_served(systems: list[System]) -> None:
    """Every served system's server answers GET /v1/models and lists its model (before any model loads)."""
    listed: dict[str, list[str] | str] = {}  # base URL -> its models, or why it cannot be asked
    problems = []
    for s in systems:
        if not s.served:
            continue
        url, model = split_spec(s.served)
        if url not in listed:
            try:
                listed[url] = OpenAIEngine(url, "").models()
            except RuntimeError as e:
                listed[url] = str(e)
        if isinstance(listed[url], str):
            problems.append(f"{s.name}: the server does not answer ({listed[url]})")
        elif model not in listed[url]:
            problems.append(
                f"{s.name}: {url} does not serve {model!r} (GET /v1/models lists {', '.join(listed[url]) or 'nothing'})"
            )
    if problems:
        raise InputError("--served: " + "; ".join(problems))


def mark_served(metrics: dict[str, dict], systems: list[System], not_scored: tuple[str, ...] = ()) -> dict[str, dict]:
    """Each served system's metrics say where it was served and which of them HTTP cannot give (left null)."""
    for s in systems:
        if s.served:
            metrics[s.name].update(served=s.served, not_scored=list(not_scored))
        if s.compressed:  # its requested and achieved rate, and which compressor ran
            metrics[s.name].update(compressed=s.compressed.summary())
    return metrics


def served_notes(metrics: dict[str, dict]) -> list[str]:
    """A line per served system (and per compressed system), for the text under a summary's table."""
    return [
        f"served: {name} at {m['served']}" + (f" (not scored: {', '.join(m['not_scored'])})" if m["not_scored"] else "")
        for name, m in metrics.items()
        if m.get("served")
    ] + [compressed_note(name, m["compressed"]) for name, m in metrics.items() if m.get("compressed")]


def prompt_systems(
    entry: PromptEntry, dirs: dict[str, Path], base_path: str, served: dict[str, str] | None = None
) -> tuple[list[System], list[str]]:
    """The teacher, the base, each adapter of this prompt (checked) and each served system, and why adapters are
    missing."""
    systems, missing = [System(TEACHER, None, True), System(BASE)], []
    for name, root in dirs.items():
        folder = root / entry.id
        if not folder.is_dir():
            missing.append(f"{name}: no adapter at {folder}")
            continue
        manifest = check_adapter(folder, entry)  # refuses a folder without genpi.json and a stale prompt
        check_base(folder, manifest, base_path)
        if manifest.method == "icae":  # the base with P's slots in front: no adapter on the engine
            from genpi.train.icae import prompt_slots

            systems.append(System(name, None, False, folder, manifest, icae=prompt_slots(folder, entry, base_path)))
            continue
        adapter = f"{name}__{entry.id}".replace(".", "_").replace("-", "_")
        systems.append(System(name, adapter, False, folder, manifest, model=folder if is_model(manifest) else None))
    systems += [System(name, served=spec.replace(PROMPT_ID, entry.id)) for name, spec in (served or {}).items()]
    return systems, missing


def load_engine(base_path: str, systems: list[System], max_batch: int = 32):
    """One TransformersEngine on the base, with every adapter system's adapter loaded."""
    import torch

    from genpi.engines.hf import TransformersEngine

    # float32 on CPU: the teacher-forced NLL and KL are differences of log-probabilities that bf16 would round
    engine = TransformersEngine(
        base_path, max_batch=max_batch, dtype="auto" if torch.cuda.is_available() else "float32"
    )
    engine.add_adapters({s.adapter: str(s.folder) for s in systems if s.adapter and not s.model})
    engine.model.eval()
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")  # the base's: the same arithmetic
    models = {s.adapter: TransformersEngine(str(s.model), max_batch=max_batch, dtype=dtype) for s in systems if s.model}
    if models:  # each full fine-tune as a model of its own beside the base
        from genpi.engines.routed import WithModels

        return WithModels(engine, models)
    return engine


def served_as(engine, systems: list[System]) -> str:
    """How the adapters were evaluated, in words (goes into the output)."""
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    trained_4bit = sorted({s.name for s in systems if s.manifest and s.manifest.lora.get("quantize_4bit")})
    text = f"unmerged LoRA on the unquantized base, {dtype} on {engine.device}"
    full = sorted({s.name for s in systems if s.model})
    text += f"; fully fine-tuned models of their own: {', '.join(full)}" if full else ""
    return text + (f"; trained on a 4-bit NF4 base: {', '.join(trained_4bit)}" if trained_4bit else "")


def generate(engine, system: System, requests: list[ChatRequest]) -> list[Completion]:
    """All requests of one system at once: on the local engine, or on the system's server."""
    if system.served:
        client = OpenAIEngine.from_spec(system.served, request_timeout_s=SERVED_REQUEST_TIMEOUT_S)
        try:
            return client.generate(requests)
        finally:
            client.shutdown()
    with engine.serving(system.adapter):
        return engine.generate([with_slots(system, r) for r in requests])


def with_slots(system: System, request: ChatRequest) -> ChatRequest:
    """The request as the system is asked it: an ICAE system's carries its slots as the prefix embeddings."""
    return request if system.icae is None else dataclasses.replace(request, prefix_embeds=system.icae)


class Batcher:
    """An `AsyncEngine` per system over one engine: every call goes to the engine's worker as it comes, so the
    episodes in flight share its decode steps, as synthesis runs them (rows of different systems together,
    each with its own adapter)."""

    def __init__(self, engine):
        self.engine = engine
        self.clients: dict[str, OpenAIEngine] = {}  # a served system's requests go to its server instead

    def view(self, system: System) -> _View:
        return _View(self, system)

    def run(self, main):
        """`asyncio.run(main)`, the served systems' HTTP sessions closed after it (in its event loop, the one
        they belong to)."""

        async def closing():
            try:
                return await main
            finally:
                for client in self.clients.values():
                    await client.aclose()

        return asyncio.run(closing())


@dataclass
class _View:
    batcher: Batcher
    system: System

    @property
    def model_name(self) -> str:
        return self.system.name

    async def complete(self, request: ChatRequest) -> Completion:
        served, clients = self.system.served, self.batcher.clients
        if served:
            if served not in clients:
                clients[served] = OpenAIEngine.from_spec(served, request_timeout_s=SERVED_REQUEST_TIMEOUT_S)
            return await clients[served].complete(request)
        return await asyncio.wrap_future(
            self.batcher.engine.submit(with_slots(self.system, request), self.system.adapter)
        )


@dataclass(frozen=True)
class Given:
    """The systems flags, checked: --adapters folders, --served specs, --compressed specs, the base's path."""

    dirs: dict[str, Path]
    served: dict[str, str]
    compressions: Compressions
    base_path: str

    @classmethod
    def check(cls, systems: SystemsSettings) -> Given:
        from genpi.models import resolve_model

        dirs = adapter_dirs(systems.adapters)
        served = served_specs(list(systems.served), dirs)
        specs = compressed_specs(list(systems.compressed), [*dirs, *served])
        base_path = resolve_model(systems.base)
        return cls(dirs, served, Compressions(specs, base_path), base_path)

    def compressed(self, entry: PromptEntry) -> list[System]:
        """The compressed systems of a prompt, once every check is done (the compressing model loads once)."""
        return [System(c.name, compressed=c) for c in self.compressions(entry)]


def catalog_prompts(
    systems: SystemsSettings,
    prompt_ids: list[str] | None = None,
    inputs: Callable[[PromptEntry], tuple[Any, str | None]] | None = None,
    verb: str = "evaluate",
) -> tuple[list[Prompt], list[dict], str]:
    """Every catalog prompt with an adapter (or a served or compressed system) to compare, checked before a model
    loads: (the prompts, {prompt_id, skipped: why} of the others, the base model's path). `inputs(entry)`: what the
    evaluation plays on the prompt, and why it is skipped when there is nothing (None: it is not)."""
    from genpi.catalog import load_catalog

    given = Given.check(systems)
    prompts, skipped = [], []
    for entry in load_catalog(systems.catalog, prompt_ids):
        found, missing = prompt_systems(entry, given.dirs, given.base_path, given.served)
        plays, empty = inputs(entry) if inputs else (None, None)
        if empty:
            skipped.append({"prompt_id": entry.id, "skipped": empty})
        elif len(found) == 2 and not systems.compressed:
            skipped.append({"prompt_id": entry.id, "skipped": "no adapter: " + "; ".join(missing)})
        else:
            prompts.append(Prompt(entry, found, missing, plays))
    if not prompts:
        raise InputError(f"nothing to {verb}: " + "; ".join(f"{r['prompt_id']}: {r['skipped']}" for r in skipped))
    check_served([s for p in prompts for s in p.systems])
    prompts = [replace(p, systems=p.systems + given.compressed(p.entry)) for p in prompts]
    return prompts, skipped, given.base_path


def task_prompt(systems: SystemsSettings, prompt_id: str) -> tuple[Prompt, str]:
    """One catalog prompt's systems for a task evaluation (`--catalog C --prompt ID [--adapters DIR ...] [--served
    NAME=SPEC ...] [--compressed NAME=SPEC ...]`): (the prompt, the base model's path). Every check runs before a
    model loads."""
    from genpi.catalog import load_catalog

    entries = {e.id: e for e in load_catalog(systems.catalog)}
    if prompt_id not in entries:
        raise InputError(f"--prompt {prompt_id}: not in {systems.catalog} (it has {', '.join(entries)})")
    given = Given.check(systems)
    found, missing = prompt_systems(entries[prompt_id], given.dirs, given.base_path, given.served)
    if systems.adapters and not any(s.folder for s in found):
        raise InputError(f"--adapters: no adapter for prompt {prompt_id}: " + "; ".join(missing))
    check_served(found)
    return Prompt(entries[prompt_id], found + given.compressed(entries[prompt_id]), missing), given.base_path
