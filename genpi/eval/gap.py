"""The headline of internalization and its uncertainty: KL gap closed, on-policy reverse KL, collateral damage.

- KL gap closed = (KL_base − KL_system) / KL_base, KL the teacher-forced KL(teacher with P || system without P)
  over the teacher's held-out agent tokens (genpi.eval.fidelity.teacher_forced, summed per dialogue and
  token-weighted over them). 1.0: the system is the teacher on those tokens; 0: no better than serving the base
  without P; negative: further from the teacher than the base is (a system that answers everything the same way
  lands there: its KL is large wherever the teacher varies).
- On-policy reverse KL(system || teacher): the system (no P, its adapter) samples its own first-turn replies
  (temperature 1, seeded), and the teacher (the base with P, adapters disabled) scores exactly those tokens:
  per token, over the full vocabulary, KL(p_system(.|x, y<t) || p_teacher(.|P, x, y<t)), averaged over the
  system's reply tokens. A system that memorized the teacher's texts but puts its mass elsewhere on its own
  continuations cannot fake it.
- Collateral damage KL(base || system): on GENERAL_REQUESTS (nothing to do with any P), the base's own greedy
  replies teacher-forced, both without P: what the adapter changes where it should change nothing. The teacher's
  figure is KL(base || base with P): what P itself changes there.
- 95% bootstrap intervals over dialogues (`bootstrap_ci`): held-out rows resampled with replacement, the
  statistic recomputed on each resample; paired where two systems are compared (the gap resamples (base,
  system) row pairs together). Percentile intervals, a fixed seed: the same rows give the same interval.

Served systems (HTTP) give no logits: their figures are null, and their summary's `not_scored` names them.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence

from tqdm import tqdm

from genpi.catalog import PromptEntry
from genpi.engines import ChatRequest, Sampling
from genpi.eval.systems import BASE, System, prompt_of

GAP_METRICS = ("kl_gap_closed", "reverse_kl", "collateral_kl")  # they need a system's own logits
BOOTSTRAP = {"resamples": 1000, "seed": 0, "level": 0.95}
ONPOLICY_SEED = 0  # the sampled replies' seeds derive from it, the row's sample_id and the sample's index
COLLATERAL_TOKENS = (
    64  # the base's replies to the general requests are cut here (their start shows any damage; it bounds the cost)
)
SCORE_BATCH = 8  # sequences per forward pass when scoring sampled replies ([tokens, vocabulary] logits each)

# Requests unrelated to any agent prompt, for the collateral damage: varied skills a base model should keep.
GENERAL_REQUESTS = (
    "What is 17 times 23? Show the steps.",
    "Give me a simple recipe for pancakes.",
    "Write a haiku about autumn leaves.",
    "What does the word 'photosynthesis' mean?",
    "Translate into German: 'The library opens at nine in the morning.'",
    "Name three planets in our solar system and one fact about each.",
    "Write a Python function that returns the largest of three numbers.",
    "Explain in two sentences why the sky looks blue.",
    "Suggest a name for a new hiking club.",
    "Summarize the story of Romeo and Juliet in three sentences.",
    "What is the capital of Canada, and roughly how many people live there?",
    "Give two tips for sleeping better.",
)


# --- bootstrap ------------------------------------------------------------------------------------------------


def bootstrap_ci(
    rows: Sequence, statistic: Callable[[list], float | None], n: int = 1000, seed: int = 0, level: float = 0.95
) -> list[float] | None:
    """[lo, hi], the percentile bootstrap interval of `statistic` over `rows` (one value per dialogue, of any
    kind: a number, a tuple of a dialogue's sums, a (base, system) pair for a paired statistic): `n` resamples of
    len(rows) rows drawn with replacement, `statistic` of each resampled list. Resamples whose statistic is None
    (undefined) are left out; None when there are no rows or no resample is defined. Deterministic for a seed."""
    if not 0 < level < 1 or n < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1) and n at least 1, got {level} and {n}")
    rows = list(rows)
    if not rows:
        return None
    rng = random.Random(seed)
    values = sorted(
        v for v in (statistic([rows[rng.randrange(len(rows))] for _ in rows]) for _ in range(n)) if v is not None
    )
    if not values:
        return None
    tail = (1 - level) / 2
    return [_quantile(values, tail), _quantile(values, 1 - tail)]


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def mean(values: list) -> float | None:
    """The mean of a list of per-row values (a rate: of booleans), None when empty: a statistic for `bootstrap_ci`."""
    return sum(float(v) for v in values) / len(values) if values else None


def rate_ci(values, **bootstrap) -> list[float] | None:
    """The interval of a per-row rate (None rows, not scored, left out)."""
    return bootstrap_ci([v for v in values if v is not None], mean, **bootstrap)


# --- the figures, from per-row sums ---------------------------------------------------------------------------


def token_mean(rows: list) -> float | None:
    """Σ sums / Σ tokens over (tokens, sum) rows: the per-token mean, every token weighing the same."""
    tokens = sum(t for t, _ in rows)
    return sum(s for _, s in rows) / tokens if tokens else None


def gap_closed(pairs: list) -> float | None:
    """(KL_base − KL_system) / KL_base over (base KL sum, system KL sum) pairs of the same dialogues (the same
    teacher tokens: the token counts cancel). None where the base's KL is 0 (nothing to close)."""
    base = sum(b for b, _ in pairs)
    return 1.0 - sum(s for _, s in pairs) / base if base > 0 else None


def gap_metrics(records: dict[str, list[dict]], bootstrap: dict = BOOTSTRAP) -> dict[str, dict]:
    """Per system: kl_gap_closed (and its paired interval) from the per-reply rows' tf_kl, reverse_kl (and its
    interval) from their onpolicy_tokens / onpolicy_rkl. Rows without a value are left out (a served system:
    all of them, so its figures are null)."""
    options = {"n": bootstrap["resamples"], "seed": bootstrap["seed"], "level": bootstrap["level"]}
    base = records[BASE]
    out = {}
    for name, rows in records.items():
        pairs = [
            (b["tf_kl"], r["tf_kl"]) for b, r in zip(base, rows) if b["tf_kl"] is not None and r["tf_kl"] is not None
        ]
        sampled = [(r["onpolicy_tokens"], r["onpolicy_rkl"]) for r in rows if r.get("onpolicy_tokens")]
        out[name] = {
            "kl_gap_closed": gap_closed(pairs) if pairs else None,
            "kl_gap_closed_ci": bootstrap_ci(pairs, gap_closed, **options),
            "reverse_kl": token_mean(sampled),
            "reverse_kl_ci": bootstrap_ci(sampled, token_mean, **options),
        }
    return out


def collateral_metrics(scored: dict[str, list | None], bootstrap: dict = BOOTSTRAP) -> dict[str, dict]:
    """Per system: collateral_kl, the per-token mean KL(base || system) over the general requests' (tokens, KL
    sum) rows, and its interval over the requests; null where not measured (a served system, or turned off)."""
    options = {"n": bootstrap["resamples"], "seed": bootstrap["seed"], "level": bootstrap["level"]}
    out = {}
    for name, rows in scored.items():
        rows = [r for r in rows or [] if r is not None]
        out[name] = {"collateral_kl": token_mean(rows), "collateral_kl_ci": bootstrap_ci(rows, token_mean, **options)}
    return out


# --- logits ---------------------------------------------------------------------------------------------------


def kl_per_token(p_logits, q_logits):
    """[N] KL(p || q) per row of two [N, V] logit tensors, full vocabulary, in float32."""
    import torch.nn.functional as F

    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits differ in shape: {tuple(p_logits.shape)} vs {tuple(q_logits.shape)}")
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def end_of_turn(engine) -> list[int]:
    """The token that ends a reply the engine stopped at end-of-turn (its completions' token_ids leave it out): the
    chat template's end-of-turn marker where that is one of the engine's EOS tokens, else the only EOS token;
    nothing (content tokens only) when neither tells which one was generated."""
    tokenizer = engine.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False
    )
    marker = tokenizer(text[text.rfind("y") + 1 :].strip(), add_special_tokens=False)["input_ids"][:1]
    if marker and marker[0] in engine.eos_ids:
        return marker
    return list(engine.eos_ids) if len(engine.eos_ids) == 1 else []


def reply_tokens(engine, completion, eot: list[int]) -> list[int] | None:
    """The completion's generated tokens, its end-of-turn token included when it stopped there; None on an error."""
    if completion.error or completion.token_ids is None:
        return None
    return list(completion.token_ids) + (eot if completion.finish_reason == "stop" else [])


def _view(prompt_ids: list[int], reply: list[int]):
    """A scoring example: the context, then the reply tokens, which alone carry labels."""
    from genpi.train.examples import IGNORE, Example

    return Example(prompt_ids + reply, [IGNORE] * len(prompt_ids) + reply)


def _logits(engine, adapter: str | None, examples: list) -> list:
    """Each example's [its reply tokens, V] logits under `adapter` (None: the base alone), without gradients."""
    import torch

    from genpi.train.losses import response_logits
    from genpi.train.recipe import collate

    with torch.no_grad(), engine.serving(adapter):
        logits = response_logits(engine.model, collate(examples, engine.pad_id, engine.device)).float()
    return list(logits.split([sum(label != -100 for label in e.labels[1:]) for e in examples]))


def _kl_sums(engine, p_side: tuple[str | None, list], q_side: tuple[str | None, list] | None) -> list[float]:
    """Σ_t KL(p || q) per pair of views (adapter, examples) on the same reply tokens; q_side None: q is p (0)."""
    out = []
    for start in range(0, len(p_side[1]), SCORE_BATCH):
        p = _logits(engine, p_side[0], p_side[1][start : start + SCORE_BATCH])
        q = p if q_side is None else _logits(engine, q_side[0], q_side[1][start : start + SCORE_BATCH])
        out += [float(kl_per_token(a, b).sum()) for a, b in zip(p, q)]
    return out


# --- on-policy ------------------------------------------------------------------------------------------------


def onpolicy_kl(
    entry: PromptEntry,
    rows: list[dict],
    systems: list[System],
    engine,
    max_tokens: int,
    samples: int = 1,
    seed: int = ONPOLICY_SEED,
    progress: bool = False,
) -> dict[str, list]:
    """Per system and row: (sampled replies, reply tokens, Σ reverse KL(system || teacher) over them), over the
    row's `samples` first-turn replies sampled at temperature 1 from the system as it is served (no P, its
    adapter; the teacher: with P); None for a served system or a row none of whose samples could be scored."""
    prompt = entry.messages()
    local = [s for s in systems if not s.served and s.icae is None]  # an ICAE system's: not measured (null)
    eot = end_of_turn(engine)
    requests, adapters, keys = [], [], []
    for s in local:
        for i, row in enumerate(rows):
            messages = prompt_of(entry, s) + [{"role": "user", "content": row["input"]}]
            for k in range(samples):
                sampling = Sampling(temperature=1.0, max_tokens=max_tokens, logprobs=1)  # logprobs: the token ids
                requests.append(
                    ChatRequest(
                        messages,
                        sampling,
                        seed + 1_000_003 * k + int(row["sample_id"]),
                        prefix_messages=len(prompt_of(entry, s)),
                    )
                )
                adapters.append(s.adapter)
                keys.append((s.name, i))
    if progress:
        print(f"genpi eval fidelity: {entry.id}: sampling {len(requests)} on-policy replies", file=sys.stderr)
    completions = engine.generate(requests, adapters=adapters)

    out: dict[str, list] = {s.name: [None] * len(rows) for s in systems}
    found: dict[tuple[str, int], list] = {}
    for key, completion in zip(keys, completions):
        found.setdefault(key, []).append(completion)
    for s in tqdm(local, unit="system", desc=f"{entry.id}: on-policy KL", file=sys.stderr, disable=not progress):
        texts, teacher_views, own_views, owners = {}, [], [], []  # owners: per view, (its row, its reply tokens)
        for i, row in enumerate(rows):
            user = [{"role": "user", "content": row["input"]}]
            texts[i] = []
            for completion in found[(s.name, i)]:
                reply = reply_tokens(engine, completion, eot)
                if not reply:
                    continue
                texts[i].append(completion.text)
                teacher = _view(engine.encode(prompt + user), reply)
                teacher_views.append(teacher)
                own_views.append(teacher if s.with_prompt else _view(engine.encode(prompt_of(entry, s) + user), reply))
                owners.append((i, len(reply)))
        # the system's own distribution first: KL(system || teacher); the teacher's view is its own (0)
        sums = _kl_sums(engine, (s.adapter, own_views), None if s.with_prompt else (None, teacher_views))
        for i in texts:
            mine = [(n, x) for (o, n), x in zip(owners, sums) if o == i]
            if mine:
                out[s.name][i] = (texts[i], sum(n for n, _ in mine), sum(x for _, x in mine))
    return out


def onpolicy_columns(scored) -> dict:
    """The per-reply row's on-policy columns (EVAL_SCHEMA), null where not measured."""
    return {
        "onpolicy_replies": scored[0] if scored else None,
        "onpolicy_tokens": scored[1] if scored else None,
        "onpolicy_rkl": scored[2] if scored else None,
    }


# --- collateral -----------------------------------------------------------------------------------------------


class Collateral:
    """The base's greedy replies to GENERAL_REQUESTS (made once per engine) and each system's KL(base || system)
    on them."""

    def __init__(self, engine, max_tokens: int, requests: Sequence[str] = GENERAL_REQUESTS):
        self.engine, self.requests = engine, list(requests)
        asks = [
            ChatRequest([{"role": "user", "content": r}], Sampling(max_tokens=max_tokens, logprobs=1))
            for r in self.requests
        ]
        eot = end_of_turn(engine)
        with engine.serving(None):
            self.replies = [reply_tokens(engine, c, eot) for c in engine.generate(asks)]

    def score(self, entry: PromptEntry, systems: list[System], progress: bool = False) -> dict[str, list | None]:
        """Per system: (tokens, Σ KL(base || system)) per general request; None for a served system. The base:
        0; the teacher: the base with P in front of each request (what P itself changes). The base's logits of a
        batch of replies are computed once for every system."""
        engine = self.engine
        kept = [(r, ids) for r, ids in zip(self.requests, self.replies) if ids]
        base = [_view(engine.encode([{"role": "user", "content": r}]), ids) for r, ids in kept]
        unmeasured = {s.name for s in systems if s.served or s.icae is not None}  # no logits here / an ICAE's: null
        views = {}  # per system that can differ from the base: (its adapter, its views of the base's replies)
        for s in systems:
            if s.name in unmeasured:
                continue
            own = prompt_of(entry, s)
            if own:  # the teacher, or a compressed P: what its P changes
                views[s.name] = (
                    None,
                    [_view(engine.encode(own + [{"role": "user", "content": r}]), ids) for r, ids in kept],
                )
            elif s.adapter:
                views[s.name] = (s.adapter, base)
        sums = {name: [] for name in views}
        batches = range(0, len(base), SCORE_BATCH) if views else ()
        for start in tqdm(batches, unit="batch", desc=f"{entry.id}: collateral", file=sys.stderr, disable=not progress):
            p = _logits(engine, None, base[start : start + SCORE_BATCH])
            for name, (adapter, examples) in views.items():
                q = _logits(engine, adapter, examples[start : start + SCORE_BATCH])
                sums[name] += [float(kl_per_token(a, b).sum()) for a, b in zip(p, q)]
        return {
            s.name: None
            if s.name in unmeasured
            else [(len(ids), x) for (_, ids), x in zip(kept, sums.get(s.name, [0.0] * len(kept)))]  # the base: 0
            for s in systems
        }


# --- text -----------------------------------------------------------------------------------------------------


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _with_ci(value, ci, show) -> str:
    return show(value) + (f" [{show(ci[0])}, {show(ci[1])}]" if ci else "")


def gap_lines(systems: dict[str, dict]) -> list[str]:
    """The headline table under a prompt's heading in `genpi eval fidelity`'s text: gap closed, reverse KL and
    collateral per system, with their 95% intervals."""
    lines = [f"{'system':<14}{'gap closed [95% CI]':>28}{'rev KL [95% CI]':>28}{'collateral':>12}"]
    for name, m in systems.items():
        if "kl_gap_closed" not in m:
            continue
        lines.append(
            f"{name:<14}{_with_ci(m['kl_gap_closed'], m.get('kl_gap_closed_ci'), _pct):>28}"
            f"{_with_ci(m.get('reverse_kl'), m.get('reverse_kl_ci'), _num):>28}{_num(m.get('collateral_kl')):>12}"
        )
    return lines if len(lines) > 1 else []


__all__ = [
    "BOOTSTRAP",
    "GAP_METRICS",
    "GENERAL_REQUESTS",
    "Collateral",
    "bootstrap_ci",
    "collateral_metrics",
    "gap_closed",
    "gap_lines",
    "gap_metrics",
    "kl_per_token",
    "mean",
    "onpolicy_columns",
    "onpolicy_kl",
    "rate_ci",
    "token_mean",
]
