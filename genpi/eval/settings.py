"""`genpi eval`'s settings, each flag's default and help text written once, on its field (genpi.flags.setting):
the systems every evaluation compares (`SystemsSettings`), and per evaluation its own flags, its token limit's
default among them. genpi.eval.run generates the subcommands' flags from these and hands the dataclasses to the
evaluations; a new flag of every evaluation is a new field of `SystemsSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from genpi.flags import setting
from genpi.tracking import DEFAULT as TRACKING
from genpi.tracking import HELP as TRACKING_HELP

SERVED_HELP = "a served system, NAME=openai:BASE_URL/MODEL (MODEL may hold {prompt_id}); repeatable"
COMPRESSED_HELP = "the base given P compressed by LLMLingua, NAME=llmlingua2:RATE[:MODEL] (RATE in (0, 1]); repeatable"
BASE_HELP = "base model: local folder, hub id in the local cache, or 'smollm2' (must be the adapters' base)"


@dataclass(frozen=True)
class SystemsSettings:
    """The systems an evaluation compares with the teacher, and how the base model runs them."""

    catalog: str | None = setting(None, "prompt catalog")
    adapters: tuple[str, ...] = setting((), "adapters folders (genpi train --out), or NAME=DIR", metavar="DIR")
    served: tuple[str, ...] = setting((), SERVED_HELP, metavar="NAME=SPEC", repeat=True)
    compressed: tuple[str, ...] = setting((), COMPRESSED_HELP, metavar="NAME=llmlingua2:RATE", repeat=True)
    base: str = setting("smollm2", BASE_HELP)
    max_batch: int = setting(32, "rows per forward pass")


@dataclass(frozen=True)
class CatalogSettings:
    """The evaluations of every prompt of a catalog at once (fidelity, leakage)."""

    prompts: str | None = setting(
        None, "comma-separated prompt ids (default: all with an adapter, or all with --served)"
    )
    record: bool = setting(True, "leave the adapters' genpi.json unchanged", flag="--no-record")
    progress: bool = setting(True, "no progress bars on stderr", flag="--no-progress")
    tracking: str = setting(TRACKING, f"{TRACKING_HELP}; what is recorded in genpi.json, under ADAPTERS/.tracking/")

    @property
    def prompt_ids(self) -> list[str] | None:
        return self.prompts.split(",") if self.prompts else None


@dataclass(frozen=True)
class FidelitySettings(CatalogSettings):
    out: str | None = setting(None, "evaluation folder (default: DATA/eval)")
    limit: int | None = setting(None, "at most this many held-out inputs per prompt")
    max_new_tokens: int | None = setting(None, "per generated turn (default: the synthesis run's)")
    max_turns: int | None = setting(None, "cap the episodes' turn limit (default: the synthesis run's)")
    onpolicy_samples: int = setting(
        1,
        "first-turn replies sampled per input (temperature 1) for the reverse KL(system || teacher); 0: skip it",
        metavar="N",
    )
    collateral: bool = setting(
        True, "skip the collateral damage KL(base || system) on general requests", flag="--no-collateral"
    )


@dataclass(frozen=True)
class LeakageSettings(CatalogSettings):
    out: str | None = setting(None, "evaluation folder")  # required
    max_new_tokens: int | None = setting(
        None, "per reply (default: P's length in tokens + 32, room to write it out whole)"
    )


@dataclass(frozen=True)
class OSTaskSettings:
    prompt: str | None = setting(
        None,
        "the catalog prompt whose P the teacher gets (and the adapters internalize; required unless --replay-examples)",
    )
    scripts: str | None = setting(
        None,
        "folder that script 'file's resolve in (AgentBench's script_dir, e.g. its "
        "data/os_interaction/scripts/dev); default: the tasks file's",
        metavar="DIR",
    )
    replay_examples: bool = setting(
        False,
        "no model: play each task's own example solution (a match task's answer) and a wrong answer, "
        "print how many pass and why the rest fail",
    )
    agent: str | None = setting(
        None, "replay:FILE plays known replies (task index -> list of replies) instead of the model"
    )
    limit: int | None = setting(None, "the first N tasks only")
    parallel: int = setting(4, "tasks played at once (each in its own sandbox)")
    rounds: int = setting(8, "agent replies per task at most")
    max_new_tokens: int = setting(512, "per agent reply")
    input_template: str | None = setting(None, "the task's user turn, with {description} (default: AgentBench's)")
    task_timeout: int = setting(3600, "seconds a task's sandbox lives, model time included (default 3600)")
    out: str = setting("eval", "evaluation folder (default: ./eval)")


@dataclass(frozen=True)
class WebSettings:
    """What Mind2Web and WebShop share: one catalog prompt, how its user turns are laid out, where rows go."""

    prompt: str | None = setting(None, "the catalog prompt's id")  # required
    layout: str = setting(
        "agentbench",
        "the user turns: AgentBench's text, or the layout examples/agents.yaml's prompts show",
        choices=("agentbench", "examples"),
    )
    out: str = setting("eval", "evaluation folder (default: ./eval)")


@dataclass(frozen=True)
class Mind2WebSettings(WebSettings):
    limit: int | None = setting(None, "the first N steps")
    max_new_tokens: int = setting(128, "per answer")


@dataclass(frozen=True)
class WebShopSettings(WebSettings):
    url: str | None = setting(None, "the WebShop web app's address, e.g. http://localhost:3000")
    goals: int = setting(10, "goals 0..N-1 of the server (default 10)")
    max_new_tokens: int = setting(256, "per agent reply")


@dataclass(frozen=True)
class EfficiencySettings:
    catalog: str | None = setting(None, "prompt catalog")  # required
    prompt: str | None = setting(None, "the catalog prompt's id", metavar="ID")  # required
    data: str | None = setting(
        None, "synthesis run: the conversation is its held-out dialogues (default: the shots)", metavar="RUN"
    )
    adapters: str | None = setting(
        None,
        "adapters folder (DIR/ID): the LoRA served unmerged (default: a fresh LoRA of genpi train's default shape)",
        metavar="DIR",
    )
    turns: int = setting(5, "turns of the conversation")
    compressed: tuple[str, ...] = setting((), COMPRESSED_HELP, metavar="NAME=llmlingua2:RATE", repeat=True)
    compressed_prompt: str | None = setting(
        None, "a shortened P (text, used as the system turn) to compare with", metavar="FILE"
    )
    concurrent: int = setting(1, "KV bytes also for C concurrent conversations", metavar="C")
    model_config: str | None = setting(
        None,
        "analytic counts alone for this config (config.json, a folder, or a shipped name: llama-3-8b)",
        metavar="NAME_OR_PATH",
    )
    prompt_tokens: int | None = setting(
        None, "with --model-config: P adds N tokens to every context (over the system without P)", metavar="N"
    )
    base: str = setting("smollm2", "base model: local folder or 'smollm2' (its tokenizer counts the tokens)")
    repeats: int = setting(3, "latency: median of this many runs")
    out: str | None = setting(None, "evaluation folder (rows, efficiency.json, plot)")
