"""`genpi synth --dry-run` (and genpi run's): the model calls and tokens a synthesis costs, before it is paid.

Nothing is generated: the counts come from the catalog and the settings, the tokens from the models' own tokenizers
(the chat template included, as the engines count them). Two figures per stage and model:

- expected: each dialogue goes like the prompt's shot dialogues (as many agent turns, each reply as long as the
  shots' turns, capped by its role's token limit and the turn limit), pseudo inputs as long as the example inputs,
  one generator round of inputs, a reason of REASON_TOKENS;
- at most: every reply runs to its role's token limit, every dialogue to its turn limit, every generator round is
  used and every pseudo input it writes runs to the input limit (a model that never stops, as a small random one);
  the dialogues' inputs stay as long as the example inputs.

Time is tokens over a throughput: the user's (`--throughput`, generated tokens per second; `--prompt-throughput`,
prompt tokens per second, by default PROMPT_SPEEDUP x the generated one), one per model role if wished
(`generator=300,target=1200`), or one measured here (`--throughput measure`: a short timed generation of each local
model with the transformers engine). A throughput of one GPU makes the time GPU-hours.

Over 400 lines on purpose: one estimate, whose per-role token counts follow the synthesis loop step by step
(genpi.synth.pipeline), so the two are read side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from genpi import InputError
from genpi.catalog import PromptEntry
from genpi.engines import ChatRequest, Message, Sampling
from genpi.engines.openai import PREFIX as OPENAI_PREFIX
from genpi.synth.pipeline import (
    END,
    ENVIRONMENT_OPEN,
    INPUT_LIMIT_FACTOR,
    INPUT_LIMIT_FLOOR,
    INPUT_OVER_ASK,
    SynthSettings,
    environment_messages,
    heldout_ids,
    input_request,
    reason_request,
    stable_seed,
)

REASON_TOKENS = 150  # the reason instruction asks for "about 5 sentences"
PROMPT_SPEEDUP = 10  # prompt tokens are prefilled in parallel: about an order of magnitude faster than decoding
CHARS_PER_TOKEN = 4  # a model with no tokenizer here (a server): its text counted at about 4 characters a token
INPUT_SEEDS = 8  # generator requests tokenized to average the prompt of an input call (the demos differ by seed)


@dataclasses.dataclass(frozen=True)
class Load:
    """Model calls and their tokens."""

    calls: float = 0.0
    prompt_tokens: float = 0.0
    generated_tokens: float = 0.0

    def __add__(self, other: Load) -> Load:
        return Load(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __mul__(self, n: float) -> Load:
        return Load(*(a * n for a in dataclasses.astuple(self)))


@dataclasses.dataclass(frozen=True)
class Cost:
    """One stage's work on one model (role: generator or target, whose throughput times it)."""

    stage: str
    role: str
    model: str
    expected: Load
    most: Load


class Counter:
    """A model's token counts: a chat request's prompt as its engine counts it (template and generation prompt
    included) and a text's tokens alone. Without a tokenizer here (an OpenAI-compatible server), characters / 4."""

    def __init__(self, model: str, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer

    def chat(self, messages: list[Message]) -> int:
        if self.tokenizer is None:
            return sum(4 + len(m["content"]) // CHARS_PER_TOKEN for m in messages) + 4
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text) // CHARS_PER_TOKEN
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def counter(model: str) -> Counter:
    """The token counter of a synthesis model (a local folder, 'smollm2', or openai:URL/MODEL)."""
    if model.startswith(OPENAI_PREFIX):
        return Counter(model)
    from transformers import AutoTokenizer

    from genpi.models import resolve_model

    try:
        path = resolve_model(model)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    return Counter(model, AutoTokenizer.from_pretrained(path))


@dataclasses.dataclass(frozen=True)
class Episode:
    """The token lengths of one dialogue: its input, each agent reply and each environment reply (as many as agent
    replies: the last one answers the final action, with the end marker or not)."""

    input: float
    agent: tuple[float, ...]
    environment: tuple[float, ...]


def episode_load(entry: PromptEntry, count: Counter, episode: Episode, with_prompt: bool = True) -> tuple[Load, Load]:
    """(the agent's calls, the environment's calls) of one role-play as genpi.synth.pipeline.role_play makes them:
    agent call j sees P, the input and j earlier (reply, observation) pairs; environment call j sees its persona,
    the input, the same pairs and the agent's reply j."""
    agent_start = (entry.messages() if with_prompt else []) + [{"role": "user", "content": ""}]
    pair = [{"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
    agent0 = count.chat(agent_start) + episode.input
    agent_pair = count.chat(agent_start + pair) - count.chat(agent_start)  # the template's tokens around a pair
    env_start = environment_messages(entry) + [
        {"role": "user", "content": ENVIRONMENT_OPEN},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
    ]
    env0 = count.chat(env_start) + episode.input
    env_pair = count.chat(env_start + [{"role": "assistant", "content": ""}, {"role": "user", "content": ""}])
    env_pair -= count.chat(env_start)
    agent, environment, history = Load(), Load(), 0.0
    for j, (reply, observation) in enumerate(zip(episode.agent, episode.environment)):
        agent += Load(1, agent0 + history + j * agent_pair, reply)
        environment += Load(1, env0 + history + j * env_pair + reply, observation)
        history += reply + observation
    return agent, environment


def input_limit(entry: PromptEntry, settings: SynthSettings, target: Counter) -> int:
    """The pseudo inputs' token limit as genpi.synth.pipeline.input_token_limit derives it."""
    if settings.max_input_tokens is not None:
        return settings.max_input_tokens
    longest = max((target.text(t) for t in entry.input_examples), default=0)
    return max(INPUT_LIMIT_FLOOR, INPUT_LIMIT_FACTOR * longest)


def shot_episodes(
    entry: PromptEntry, count: Counter, turns: int, agent_limit: int, env_limit: int, input_tokens: float
) -> list[Episode]:
    """A dialogue like each shot dialogue: its agent replies and observations (each capped by its limit) up to the
    turn limit; the environment's last reply is the end marker."""
    episodes = []
    for shot in entry.shots:
        agent = [min(agent_limit, count.text(t["content"])) for t in shot if t["role"] == "assistant"][:turns]
        observed = [min(env_limit, count.text(t["content"])) for t in shot[1:] if t["role"] == "user"]
        if agent:
            end = min(env_limit, count.text(END))
            episodes.append(Episode(input_tokens, tuple(agent), tuple(observed[: len(agent) - 1] + [end])))
    return episodes


def mean_load(loads: list[Load]) -> Load:
    return sum(loads, Load()) * (1 / len(loads)) if loads else Load()


def synth_costs(entries: list[PromptEntry], settings: SynthSettings, generator: Counter, target: Counter) -> list[Cost]:
    """What synthesizing `settings.samples` dialogues for each prompt costs, per stage and model (summed over the
    prompts), as genpi.synth.pipeline makes its calls."""
    stages: dict[str, list] = {}

    def add(stage: str, role: str, model: str, expected: Load, most: Load) -> None:
        before = stages.get(stage, [role, model, Load(), Load()])
        stages[stage] = [role, model, before[2] + expected, before[3] + most]

    n = settings.samples
    for entry in entries:
        turns = settings.turn_limit(entry)
        limit = input_limit(entry, settings, target)
        if settings.max_input_tokens is None and entry.input_examples:  # the target counts each example (1 token)
            counting = Load(1, target.chat([{"role": "user", "content": ""}]), 1)
            for text in entry.input_examples:
                counting += Load(1, target.chat([{"role": "user", "content": text}]), 1)
            add("synth input limit", "target", target.model, counting, counting)
        examples = [generator.text(t) for t in entry.input_examples] or [limit]
        prompt = statistics.mean(
            generator.chat(
                input_request(entry, stable_seed(settings.seed, entry.id, "input", k), settings, limit).messages
            )
            for k in range(INPUT_SEEDS)
        )
        asked = INPUT_OVER_ASK * n
        add(
            "synth inputs",
            "generator",
            generator.model,
            Load(asked, asked * prompt, asked * min(limit, statistics.mean(examples))),
            Load(
                asked * settings.input_rounds,
                asked * settings.input_rounds * prompt,
                asked * settings.input_rounds * limit,
            ),
        )
        x = statistics.mean([target.text(t) for t in entry.input_examples]) if entry.input_examples else limit
        expected = shot_episodes(entry, target, turns, settings.max_agent_tokens, settings.max_environment_tokens, x)
        most = Episode(x, (settings.max_agent_tokens,) * turns, (settings.max_environment_tokens,) * turns)
        if not expected:
            expected = [most]
        played = [episode_load(entry, target, e) for e in expected]
        agent_most, env_most = episode_load(entry, target, most)
        add("synth agent", "target", target.model, mean_load([a for a, _ in played]) * n, agent_most * n)
        add("synth environment", "target", target.model, mean_load([e for _, e in played]) * n, env_most * n)
        # the student: the input alone, as long as the teacher's first reply (expected) or its limit
        first = statistics.mean(e.agent[0] for e in expected)
        student = target.chat([{"role": "user", "content": ""}]) + x
        student_tokens = min(settings.max_student_tokens, first)
        add(
            "synth student",
            "target",
            target.model,
            Load(n, n * student, n * student_tokens),
            Load(n, n * student, n * settings.max_student_tokens),
        )
        # the reason: the input, the student's reply (AS-IS) and the teacher's first reply (TO-BE) in its request
        reason = generator.chat(reason_request(entry, "", "", "", 0, settings).messages) + x
        most_reason = reason + settings.max_student_tokens + settings.max_agent_tokens
        add(
            "synth reason",
            "generator",
            generator.model,
            Load(n, n * (reason + student_tokens + first), n * min(settings.max_reason_tokens, REASON_TOKENS)),
            Load(n, n * most_reason, n * settings.max_reason_tokens),
        )
    return [Cost(stage, role, model, expected, most) for stage, (role, model, expected, most) in stages.items()]


def heldout_count(entry: PromptEntry, settings: SynthSettings) -> int:
    return len(heldout_ids(entry.id, settings.samples, settings))


# -- time ----------------------------------------------------------------------------------------------------------


def parse_throughput(spec: str | None, flag: str = "--throughput") -> dict[str, float] | None:
    """`N` (every model) or `ROLE=N,...` (generator, target) as {role: tokens per second}; None stays None."""
    if spec is None or spec == "measure":
        return None
    rates: dict[str, float] = {}
    for part in (p for p in spec.split(",") if p):
        role, _, value = part.rpartition("=")
        if role and role not in ("generator", "target"):
            raise InputError(f"{flag} {spec}: {role!r} is not a model role; expected generator=N or target=N")
        try:
            rate = float(value)
        except ValueError:
            raise InputError(f"{flag} {spec}: {value!r} is not a number of tokens per second") from None
        if rate <= 0:
            raise InputError(f"{flag} {spec}: a throughput must be above 0 tokens per second")
        for r in [role] if role else ["generator", "target"]:
            rates[r] = rate
    missing = {"generator", "target"} - set(rates)
    if missing:
        raise InputError(f"{flag} {spec}: no throughput for {', '.join(sorted(missing))}")
    return rates


def measure_throughput(model: str, entry: PromptEntry, requests: int = 4, tokens: int = 32) -> tuple[float, float]:
    """(generated, prompt) tokens per second of `model` on this machine with the transformers engine: `requests`
    agent requests of `entry` at once, a one-token reply (the prefill) then `tokens` (the decode)."""
    from genpi.engines.hf import TransformersEngine
    from genpi.models import resolve_model

    engine = TransformersEngine(resolve_model(model), max_batch=requests)
    try:
        batch = [
            ChatRequest(entry.messages() + [{"role": "user", "content": text}], Sampling(max_tokens=1), seed=i)
            for i, text in enumerate((entry.input_examples or ["Hello."]) * requests)
        ][:requests]
        engine.generate(batch[:1])  # warm up
        t0 = time.perf_counter()
        prefill = engine.generate(batch)
        prefill_s = time.perf_counter() - t0
        longer = [dataclasses.replace(r, sampling=Sampling(max_tokens=tokens)) for r in batch]
        t0 = time.perf_counter()
        done = engine.generate(longer)
        decode_s = max(time.perf_counter() - t0 - prefill_s, 1e-6)
    finally:
        engine.close()
    generated = sum(c.completion_tokens for c in done) - len(done)
    return max(generated, 1) / decode_s, sum(c.prompt_tokens for c in prefill) / max(prefill_s, 1e-6)


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Tokens per second per model role: generated, and prompt (prefill)."""

    generated: dict[str, float]
    prompt: dict[str, float]
    source: str  # how it was chosen, for the printed line

    def seconds(self, cost: Cost, load: Load) -> float:
        return load.generated_tokens / self.generated[cost.role] + load.prompt_tokens / self.prompt[cost.role]


def throughput(args: argparse.Namespace, models: dict[str, str], entry: PromptEntry | None) -> Throughput | None:
    """The throughput the flags give, or measured here (`--throughput measure`); None without --throughput."""
    if args.throughput is None:
        return None
    if args.throughput == "measure":
        if entry is None:
            raise InputError("--throughput measure needs a prompt to measure with")
        generated, prompt, measured = {}, {}, {}
        for role, model in models.items():
            if model.startswith(OPENAI_PREFIX):
                raise InputError(f"--throughput measure: the {role} {model} is a server; give its --throughput")
            if model not in measured:
                print(f"genpi: measuring the throughput of {model} here ...", file=sys.stderr)
                measured[model] = measure_throughput(model, entry)
            generated[role], prompt[role] = measured[model]
        shown = ", ".join(f"{r} {generated[r]:.0f} generated, {prompt[r]:.0f} prompt tok/s" for r in models)
        return Throughput(generated, prompt, f"the throughput measured here, transformers engine ({shown})")
    generated = parse_throughput(args.throughput)
    prompt = parse_throughput(args.prompt_throughput, "--prompt-throughput") or {
        role: rate * PROMPT_SPEEDUP for role, rate in generated.items()
    }
    source = f"{args.throughput} generated tok/s"
    source += f", {args.prompt_throughput} prompt tok/s" if args.prompt_throughput else f" (prompt: x{PROMPT_SPEEDUP})"
    return Throughput(generated, prompt, source)


def add_flags(p: argparse.ArgumentParser) -> None:
    """--dry-run and its throughput flags (genpi synth's and genpi run's)."""
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the model calls, prompt and generated tokens (and with --throughput the time) per stage and "
        "model, then stop: nothing is generated or written",
    )
    p.add_argument(
        "--throughput",
        default=None,
        metavar="TOK_S",
        help="--dry-run's generated tokens per second: N for every model, generator=N,target=M per model, or "
        "'measure' (a short timed generation here); one GPU's makes the time GPU-hours",
    )
    p.add_argument(
        "--prompt-throughput",
        default=None,
        metavar="TOK_S",
        help=f"--dry-run's prompt (prefill) tokens per second, as --throughput (default: {PROMPT_SPEEDUP} x it)",
    )


# -- the table -----------------------------------------------------------------------------------------------------


def _n(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:.1f}G"
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    return f"{x:.0f}"


def _time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def format_costs(costs: list[Cost], rate: Throughput | None, notes: list[str] = ()) -> str:
    """The table: per stage and model, calls, prompt and generated tokens (and time), expected (at most)."""
    header = ["stage", "model", "calls", "prompt tokens", "generated tokens"] + (["time"] if rate else [])
    rows = []
    total_expected, total_most = 0.0, 0.0
    for c in costs:
        row = [c.stage, c.model]
        for field in ("calls", "prompt_tokens", "generated_tokens"):
            row.append(f"{_n(getattr(c.expected, field))} ({_n(getattr(c.most, field))})")
        if rate and c.role in rate.generated:
            expected_s, most_s = rate.seconds(c, c.expected), rate.seconds(c, c.most)
            total_expected, total_most = total_expected + expected_s, total_most + most_s
            row.append(f"{_time(expected_s)} ({_time(most_s)})")
        elif rate:
            row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("expected (at most: every reply at its token limit, every dialogue to its turn limit)")
    if rate:
        lines.append(
            f"time at {rate.source}: about {_time(total_expected)} (at most {_time(total_most)}); "
            f"{total_expected / 3600:.2f} GPU-hours when that is one GPU's throughput"
        )
    else:
        lines.append("give --throughput TOK_S (or 'measure') for the time")
    return "\n".join([*lines, *notes])


def dry_run(args: argparse.Namespace) -> int:
    """genpi synth --dry-run: the table on stdout; nothing loaded but the tokenizers, nothing written."""
    from genpi.catalog import load_catalog
    from genpi.flags import from_args

    entries = load_catalog(args.catalog, args.prompts.split(",") if args.prompts else None)
    settings = from_args(SynthSettings, args)
    generator, target = counter(args.generator), counter(args.target)
    rate = throughput(args, {"generator": args.generator, "target": args.target}, entries[0])
    costs = synth_costs(entries, settings, generator, target)
    print(f"genpi synth --dry-run: {len(entries)} prompt{'s' * (len(entries) != 1)}, {settings.samples} dialogues each")
    print(format_costs(costs, rate))
    return 0
