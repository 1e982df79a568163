"""What GenPI synthesizes from a prompt alone, one dialogue at a time.

1. pseudo user inputs: the generator, shown P, writes new inputs after 5 random demonstrations;
2. self role-play: the target model plays the agent *with* P (the teacher) and, with
   the shots' roles swapped and an environment instruction, the environment;
3. the student's AS-IS answer: the target model *without* P;
4. the reason: the generator explains why AS-IS should become the teacher's TO-BE.

Engines are reached through `AsyncEngine` (genpi.engines), so the same code runs against Ray
actors (genpi.synth.run) or an engine in this process (tests).

Over 400 lines on purpose: the four steps above and the requests they send, in the paper's order, read top to
bottom as one algorithm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass

from genpi.catalog import PromptEntry, render_prompt_text
from genpi.data.store import DIALOGUE_COLUMNS
from genpi.engines import CONTEXT_LENGTH_ERROR, AsyncEngine, ChatRequest, Completion, Message, Sampling
from genpi.flags import setting

END = "<<END>>"  # the environment's termination marker

INPUT_INSTRUCTION = (
    "You write realistic user inputs for an AI application. Each time you are asked, write ONE new input of "
    "the same kind, format and length as your earlier ones, about a different concrete case. Reply with the "
    "input only, with no preamble and no explanation."
)
INPUT_ASK = "Write one new input, about a different concrete case."
INPUT_OVER_ASK = 2  # ask for 2N inputs, keep the first N distinct (the paper's reference asks 2,000 for 1,000)
# The input limit (the generator's max_tokens for an input; an input it cuts is dropped), unless --max-input-tokens
# gives one: INPUT_LIMIT_FACTOR x the prompt's longest example input in the target's tokens, at least
# INPUT_LIMIT_FLOOR. A fixed limit dropped most inputs of prompts with long inputs (HTML pages: 13 of 16 cut at
# 256 tokens), and a generous fixed one would let a chatty generator ramble on prompts with one-line inputs.
INPUT_LIMIT_FACTOR = 2
INPUT_LIMIT_FLOOR = 256

ENVIRONMENT_INSTRUCTION = (
    "You are the environment in a role-play with an AI agent. You play the side that the user plays in the "
    "example conversations: the agent sends you its actions and you reply with exactly what the environment "
    "would return (command output, a web page, an observation), in the same format as the examples. Never "
    "solve the task for the agent and never speak as the agent. When the agent takes its final action "
    f"(gives its final answer or completes the task), reply with {END} and nothing else."
)
# The user turn that opens each episode of the environment persona: its shots and the live dialogue start
# with the environment's own line (the task), and chat templates such as Mistral's and Gemma's require the
# first turn after the system message to be the user's and roles to alternate.
ENVIRONMENT_OPEN = "A new episode starts. Give the task."

REASON_INSTRUCTION = (
    "An AI model answered an input twice: once without the prompt below (AS-IS) and once with it (TO-BE). "
    "In about 5 sentences, explain what in the prompt makes the TO-BE output the right one and what the "
    "AS-IS output must change to match it (format, actions, constraints, style). Write only the explanation."
)


@dataclass(frozen=True)
class SynthSettings:
    """The method's settings; what a run's manifest records and a resumed run must repeat."""

    samples: int = setting(1000, "dialogues (pseudo inputs) per prompt")
    heldout: float = setting(0.1, "share of dialogues kept out of training")
    seed: int = setting(0, "seed of the inputs, the held-out split and sampling")
    demos_per_call: int = setting(5, "example inputs shown in each generator request")
    input_temperature: float = setting(1.0, "sampling temperature of the pseudo inputs")
    input_top_p: float = setting(0.9, "top-p of the pseudo inputs")
    input_rounds: int = setting(
        4, f"the most generator rounds per prompt (each asks {INPUT_OVER_ASK} x the inputs missing)"
    )
    reason_temperature: float = setting(0.7, "sampling temperature of the reasons")
    reason_top_p: float = setting(0.9, "top-p of the reasons")
    max_input_tokens: int | None = setting(
        None,
        "per pseudo input; inputs cut by it are dropped (default: per prompt, "
        f"{INPUT_LIMIT_FACTOR} x its longest example input in the target's tokens, at least {INPUT_LIMIT_FLOOR})",
    )
    # one token limit per role: each generated turn of the agent (the teacher, with P), of the environment and of the
    # student (without P), and each reason; --max-new-tokens sets all four
    max_agent_tokens: int = setting(384, "token limit of each agent (teacher) turn")
    max_environment_tokens: int = setting(384, "token limit of each environment turn")
    max_student_tokens: int = setting(384, "token limit of each student output (the reply without P)")
    max_reason_tokens: int = setting(384, "token limit of each reason")
    retries: int = setting(2, "extra tries for an engine error that is not a context overflow")
    max_turns: int | None = setting(None, "cap on every prompt's max_turns (quick runs; default: the catalog's)")
    teacher_topk: int = setting(20, "store the teacher's top-k logprobs of every agent token (0: off)")

    def turn_limit(self, entry: PromptEntry) -> int:
        return min(entry.max_turns, self.max_turns) if self.max_turns else entry.max_turns


class DialogueError(RuntimeError):
    pass


def stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def instruction_texts() -> dict[str, str]:
    """The synthesis instructions, for a run's fingerprint: a resumed run must use the same texts."""
    return {
        "input": INPUT_INSTRUCTION,
        "input_ask": INPUT_ASK,
        "environment": ENVIRONMENT_INSTRUCTION,
        "environment_open": ENVIRONMENT_OPEN,
        "reason": REASON_INSTRUCTION,
        "end": END,
    }


def is_retryable(error: str) -> bool:
    """An engine or internal failure, which a rerun may not meet again; a context overflow is final."""
    return f"{CONTEXT_LENGTH_ERROR}:" not in error


def input_request(entry: PromptEntry, seed: int, settings: SynthSettings, limit: int) -> ChatRequest:
    """P in the system message (the paper generates inputs from the prompt), then the demonstrations as
    the generator's own earlier replies: a small generator then writes one input as its next reply, where
    a list of examples in one message drew meta-text ("### Example 6", "Here is a new input: ...") from
    SmolLM2 in most calls."""
    rng = random.Random(seed)
    demos = rng.sample(entry.input_examples, min(settings.demos_per_call, len(entry.input_examples)))
    system = f"{INPUT_INSTRUCTION}\n\n# The prompt of the application\n{render_prompt_text(entry)}"
    messages = [{"role": "system", "content": system}]
    for demo in demos:
        messages += [{"role": "user", "content": INPUT_ASK}, {"role": "assistant", "content": demo}]
    messages.append({"role": "user", "content": INPUT_ASK})
    return ChatRequest(
        messages=messages,
        sampling=Sampling(settings.input_temperature, settings.input_top_p, limit),
        seed=seed,
        prefix_messages=1,
    )


@dataclass(frozen=True)
class InputLimit:
    """The token limit of a prompt's pseudo inputs and where it comes from: "flag" (--max-input-tokens),
    "examples" (INPUT_LIMIT_FACTOR x the longest example input) or "floor" (INPUT_LIMIT_FLOOR: no examples,
    short ones, or a target that could not count them)."""

    tokens: int
    source: str
    longest_example: int | None = None  # the longest example input, in the target's tokens
    note: str | None = None  # why the floor was used where examples exist


async def _text_tokens(target: AsyncEngine, text: str, settings: SynthSettings) -> int:
    """`text`'s tokens as the target counts them: a one-token completion's prompt tokens, less those of an
    empty message (its chat template). Works for every engine kind (a server has no tokenizer here)."""
    result = await _call(
        target, ChatRequest([{"role": "user", "content": text}], Sampling(max_tokens=1)), settings, "counting tokens"
    )
    if result.error:  # longer than the target's context: its count is in the error
        numbers = CONTEXT_NUMBERS.search(result.error)
        if numbers is None:
            raise DialogueError(f"counting tokens: {result.error}")
        return int(numbers[1])
    return result.prompt_tokens


async def input_token_limit(entry: PromptEntry, target: AsyncEngine, settings: SynthSettings) -> InputLimit:
    """The prompt's input limit: --max-input-tokens when given, else derived from its own example inputs."""
    if settings.max_input_tokens is not None:
        return InputLimit(settings.max_input_tokens, "flag")
    if not entry.input_examples:
        return InputLimit(INPUT_LIMIT_FLOOR, "floor", note="the prompt has no example inputs")
    try:
        empty, *counts = await asyncio.gather(*(_text_tokens(target, t, settings) for t in ["", *entry.input_examples]))
    except DialogueError as e:
        return InputLimit(INPUT_LIMIT_FLOOR, "floor", note=f"the target could not count tokens ({e})")
    longest = max(0, max(counts) - empty)
    derived = INPUT_LIMIT_FACTOR * longest
    if derived < INPUT_LIMIT_FLOOR:
        return InputLimit(
            INPUT_LIMIT_FLOOR, "floor", longest, f"{INPUT_LIMIT_FACTOR} x the longest example input is {derived}"
        )
    return InputLimit(derived, "examples", longest)


@dataclass
class GeneratedInputs:
    """A prompt's pseudo inputs and what the generator's other replies were, for the run's account of a shortfall."""

    inputs: list[str]
    limit: int  # the input limit (tokens) they were generated under
    rounds: int = 0  # generator rounds used
    asked: int = 0  # generator calls
    cut: int = 0  # replies cut by the input limit (over it), dropped
    duplicates: int = 0  # replies already kept, or copies of a catalog example (case and spacing ignored), dropped
    empty: int = 0  # empty replies, dropped
    errors: list[str] = dataclasses.field(default_factory=list)  # generator errors, in ask order

    def why_short(self) -> str:
        """What became of the replies not kept, e.g. "13 generated inputs over the 512-token input limit, 2
        duplicates" (only the nonzero parts)."""
        parts = [
            (self.cut, f"generated input{'s' * (self.cut != 1)} over the {self.limit}-token input limit"),
            (self.duplicates, f"duplicate{'s' * (self.duplicates != 1)}"),
            (self.empty, f"empty repl{'ies' if self.empty != 1 else 'y'}"),
            (len(self.errors), f"generator error{'s' * (len(self.errors) != 1)}"),
        ]
        return ", ".join(f"{n} {what}" for n, what in parts if n) or "no replies"


async def generate_inputs(
    entry: PromptEntry, generator: AsyncEngine, settings: SynthSettings, limit: int
) -> GeneratedInputs:
    """Up to `settings.samples` distinct pseudo inputs that fit `limit` tokens: each round (at most
    `settings.input_rounds`) asks INPUT_OVER_ASK times the inputs still missing and keeps the first distinct
    ones in ask order (deterministic). Inputs cut by the limit, duplicates and empty replies are counted and
    dropped."""
    seen = {_normalize(e) for e in entry.input_examples}
    got = GeneratedInputs(inputs=[], limit=limit)
    for _ in range(settings.input_rounds):
        missing = settings.samples - len(got.inputs)
        if missing <= 0:
            break
        seeds = [stable_seed(settings.seed, entry.id, "input", got.asked + k) for k in range(INPUT_OVER_ASK * missing)]
        got.asked += len(seeds)
        got.rounds += 1
        results = await asyncio.gather(*(generator.complete(input_request(entry, s, settings, limit)) for s in seeds))
        for result in results:
            if len(got.inputs) == settings.samples:  # the round's surplus: never looked at, as if not asked
                break
            text = result.text.strip()
            if result.error:
                got.errors.append(result.error)
            elif result.cut:
                got.cut += 1
            elif not text:
                got.empty += 1
            elif _normalize(text) in seen:
                got.duplicates += 1
            else:
                seen.add(_normalize(text))
                got.inputs.append(text)
    return got


def heldout_ids(prompt_id: str, n: int, settings: SynthSettings) -> set[int]:
    count = round(n * settings.heldout)
    if settings.heldout > 0 and n >= 2:
        count = max(count, 1)
    return set(random.Random(stable_seed(settings.seed, prompt_id, "split")).sample(range(n), count))


def environment_messages(entry: PromptEntry) -> list[Message]:
    """The environment persona: an instruction, then the shots with roles swapped and the end marked.
    Each episode opens with ENVIRONMENT_OPEN so that roles alternate from a user turn on; merging the end
    marker into the next task instead would teach the persona to follow END with more text, and would
    change the cached prefix's last message for every live dialogue."""
    system = ENVIRONMENT_INSTRUCTION
    if entry.environment:
        system += "\n\n" + entry.environment
    if entry.system:
        system += "\n\nFor reference, the agent works under these instructions:\n" + entry.system
    messages = [{"role": "system", "content": system}]
    swap = {"user": "assistant", "assistant": "user"}
    for dialogue in entry.shots:
        messages.append({"role": "user", "content": ENVIRONMENT_OPEN})
        messages += [{"role": swap[t["role"]], "content": t["content"]} for t in dialogue]
        messages.append({"role": "assistant", "content": END})
    return messages


CONTEXT_NUMBERS = re.compile(r"(\d+) prompt tokens \+ (\d+) max tokens > (\d+)")
MIN_ROOM = 16  # fewer free tokens than this and a shortened answer is not worth having


async def _call(engine: AsyncEngine, request: ChatRequest, settings: SynthSettings, what: str) -> Completion:
    """One engine call, retried where that can help: engine errors, and a context overflow that a
    smaller `max_tokens` avoids. An overflow that cannot be avoided is returned for the caller to handle."""
    for attempt in range(settings.retries + 1):
        result = await engine.complete(request)
        if result.error is None:
            return result
        if result.error.startswith(CONTEXT_LENGTH_ERROR):
            numbers = CONTEXT_NUMBERS.search(result.error)
            room = int(numbers[3]) - int(numbers[1]) if numbers else 0
            if room < MIN_ROOM or room >= request.sampling.max_tokens:
                return result
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=room))
    if result.error.startswith(CONTEXT_LENGTH_ERROR):
        return result
    raise DialogueError(f"{what}: {result.error}")


async def _called(engine: AsyncEngine, request: ChatRequest, settings: SynthSettings, what: str) -> Completion:
    """`_call` whose remaining error (an unavoidable context overflow) fails the dialogue."""
    result = await _call(engine, request, settings, what)
    if result.error:
        raise DialogueError(f"{what}: {result.error}")
    return result


def _record(row: dict, column: str, tokens_column: str, completion: Completion) -> None:
    row[column] = completion.text.strip()
    row[f"{column}_cut"] = completion.cut
    row["prompt_tokens"] += completion.prompt_tokens
    row[tokens_column] = completion.completion_tokens


def reason_request(
    entry: PromptEntry, x: str, as_is: str, to_be: str, seed: int, settings: SynthSettings
) -> ChatRequest:
    return ChatRequest(
        messages=[
            {"role": "system", "content": f"{REASON_INSTRUCTION}\n\n# The prompt\n{render_prompt_text(entry)}"},
            {"role": "user", "content": f"# Input\n{x}\n\n# AS-IS output\n{as_is}\n\n# TO-BE output\n{to_be}\n\n# Why"},
        ],
        sampling=Sampling(settings.reason_temperature, settings.reason_top_p, settings.max_reason_tokens),
        seed=seed,
        prefix_messages=1,
    )


def blank_row(
    entry: PromptEntry, sample: dict, settings: SynthSettings, generator_model: str, target_model: str
) -> dict:
    """A dialogue row before the role-play: the sample's fields, empty turns, zero counters."""
    row = dict.fromkeys(DIALOGUE_COLUMNS)
    row.update(
        prompt_id=entry.id,
        prompt_sha256=entry.sha256,
        sample_id=sample["sample_id"],
        seed=sample["seed"],
        split=sample["split"],
        input=sample["input"],
        turns=[],
        turn_cut=[],
        teacher_topk=[] if settings.teacher_topk > 0 else None,
        generator_model=generator_model,
        target_model=target_model,
        prompt_tokens=0,
        agent_tokens=0,
        environment_tokens=0,
        student_tokens=0,
        reason_tokens=0,
        n_turns=0,
        terminated=False,
        hit_max_turns=False,
        truncated=False,
    )
    return row


async def synthesize_dialogue(
    entry: PromptEntry,
    sample: dict,
    target: AsyncEngine,
    generator: AsyncEngine,
    settings: SynthSettings,
) -> dict:
    """One dialogue row (store.DIALOGUE_SCHEMA). Failures become a row with `error` set."""
    row = blank_row(entry, sample, settings, generator.model_name, target.model_name)
    try:
        await role_play(entry, row, target, settings)
        student = await _called(
            target,
            ChatRequest([{"role": "user", "content": row["input"]}], Sampling(max_tokens=settings.max_student_tokens)),
            settings,
            "student",
        )
        _record(row, "student_output", "student_tokens", student)
        to_be = row["turns"][0]["content"]
        reason_call = reason_request(entry, row["input"], row["student_output"], to_be, row["seed"], settings)
        _record(row, "reason", "reason_tokens", await _called(generator, reason_call, settings, "reason"))
    except DialogueError as e:
        row["error"] = str(e)
    except Exception as e:  # a bug or a dead actor: record it on the row, never lose the sample
        row["error"] = f"internal: {type(e).__name__}: {e}"
    if row["error"] is not None:
        row["terminated_by"] = "error"
    return row


def is_final(entry: PromptEntry, action: str) -> bool:
    return bool(entry.final_action and re.search(entry.final_action, action.strip()))


async def role_play(
    entry: PromptEntry,
    row: dict,
    target: AsyncEngine,
    settings: SynthSettings,
    agent: AsyncEngine | None = None,
    with_prompt: bool = True,
    agent_prompt: list[Message] | None = None,
) -> None:
    """The agent (with P) and the environment take turns until the environment emits its end marker or the
    turn limit is reached, as the reference role-plays: a final action does not end the dialogue (the environment
    is told to answer it with END), so `terminated` (it emitted END) is measured on every dialogue, after the last
    allowed turn too, and `hit_max_turns` says that the limit, not the marker, ended it. Whether the last agent
    turn is a final action (`actions.final`) is `final_action_valid`: Table 4's "% invalid final action".

    `target` plays the environment, and the agent unless `agent` is given; `with_prompt=False` serves the
    agent without P (genpi.eval plays whole episodes with each system this way); `agent_prompt`, when given, is the
    agent's P instead (a compressed P)."""
    agent_engine = agent or target
    prompt = agent_prompt if agent_prompt is not None else entry.messages() if with_prompt else []
    agent = prompt + [{"role": "user", "content": row["input"]}]
    env_prefix = environment_messages(entry)
    env = env_prefix + [{"role": "user", "content": ENVIRONMENT_OPEN}, {"role": "assistant", "content": row["input"]}]
    turns = row["turns"]
    limit = settings.turn_limit(entry)
    agent_sampling = Sampling(max_tokens=settings.max_agent_tokens, logprobs=settings.teacher_topk)
    env_sampling = Sampling(max_tokens=settings.max_environment_tokens)
    for turn in range(limit):
        request = ChatRequest(agent, agent_sampling, row["seed"], prefix_messages=len(prompt))
        reply = await _call(agent_engine, request, settings, f"agent turn {turn + 1}")
        if reply.error:  # context overflow
            if turn == 0:
                raise DialogueError(f"agent turn 1: {reply.error}")
            row["truncated"] = True
            row["terminated_by"] = "truncated"
            break
        action = reply.text.strip()
        row["prompt_tokens"] += reply.prompt_tokens
        row["agent_tokens"] += reply.completion_tokens
        turns.append({"role": "assistant", "content": action})
        row["turn_cut"].append(reply.cut)
        if row["teacher_topk"] is not None:
            if reply.topk_ids is None:
                raise DialogueError(f"agent turn {turn + 1}: the engine returned no top-k log-probabilities")
            row["teacher_topk"].append(
                {"token_ids": reply.token_ids, "topk_ids": reply.topk_ids, "topk_logprobs": reply.topk_logprobs}
            )
        agent = agent + [turns[-1]]
        last = turn == limit - 1
        env = env + [{"role": "user", "content": action}]
        request = ChatRequest(env, env_sampling, row["seed"], prefix_messages=len(env_prefix))
        observation = await _call(target, request, settings, f"environment turn {turn + 1}")
        if observation.error:  # context overflow: after the last allowed turn the limit ended it, unmeasured
            row["truncated"] = not last
            row["terminated_by"] = "max_turns" if last else "truncated"
            break
        row["prompt_tokens"] += observation.prompt_tokens
        row["environment_tokens"] += observation.completion_tokens
        text = observation.text.strip()
        row["terminated"] = END in text
        if row["terminated"] or last:  # the last ask only measures termination: its reply is not a turn
            row["terminated_by"] = "environment" if row["terminated"] else "max_turns"
            break
        turns.append({"role": "user", "content": text})
        row["turn_cut"].append(observation.cut)
        agent = agent + [turns[-1]]
        env = env + [{"role": "assistant", "content": text}]
    row["n_turns"] = sum(t["role"] == "assistant" for t in turns)
    row["hit_max_turns"] = row["terminated_by"] == "max_turns"
    last = next(t["content"] for t in reversed(turns) if t["role"] == "assistant")
    row["final_action"] = last
    if entry.final_action:
        row["final_action_valid"] = is_final(entry, last)
    elif entry.valid_action:
        row["final_action_valid"] = entry.in_action_space(last)
