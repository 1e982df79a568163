"""What genpi eval efficiency measures: the conversation in tokens, torch's FLOP counter, wall time.

The conversation (`conversation_pairs`): N (user, agent) turns of the prompt's held-out dialogues, else of its
shots, tokenized once per system (`tokenize`) into a genpi.eval.cost.Conversation. To check the analytic count,
torch's FLOP counter runs the same forwards on a weightless (meta device) copy of the model with eager attention
(`counted_flops`); latency is the wall time of the same forwards on the engine's model (`timed`: the teacher's
reply tokens fed back, so every system decodes the same tokens), median of the repeats. A turn's decode forwards
are the same in every regime (the cache holds the whole context when decoding), so they are counted and timed
once per turn and shared by the regimes (`replay_regimes`).
"""

from __future__ import annotations

import copy
import statistics
import time

from genpi import InputError
from genpi.eval.cost import REGIMES, Conversation, Turn


def conversation_pairs(entry, data: str | None, n_turns: int) -> tuple[list[tuple[str, str]], str]:
    """N (user, agent) turns taken in order from the held-out dialogues of a run, else from the shots."""
    if data:
        from genpi.data.dialogues import prompt_rows  # the prompt's good held-out rows (prompt_rows checks its version)

        rows = prompt_rows(data, entry)[1]
        dialogues = [[{"role": "user", "content": r["input"]}, *r["turns"]] for r in rows]
        source = f"held-out dialogues of {data}"
    else:
        dialogues, source = entry.shots, "the prompt's shots"
    pairs, used = [], 0
    for dialogue in dialogues:
        if len(pairs) == n_turns:
            break
        used += 1
        for user, agent in zip(dialogue[::2], dialogue[1::2]):
            if user["role"] != "user" or agent["role"] != "assistant":
                break
            pairs.append((user["content"], agent["content"]))
            if len(pairs) == n_turns:
                break
    if len(pairs) < n_turns:
        raise InputError(
            f"--turns {n_turns}: {source} hold only {len(pairs)} agent turns of {entry.id!r}; "
            "ask for fewer turns or pass --data RUN with held-out dialogues"
        )
    return pairs, f"{source}: {n_turns} agent turns from {used} dialogue(s), in order"


def tokenize(tokenizer, system: str, prefix_messages: list[dict], pairs: list[tuple[str, str]]) -> Conversation:
    def encode(messages, generation_prompt):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    messages = list(prefix_messages)
    for user, agent in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": agent}]
    ids = encode(messages, False)
    # the tokens every conversation of this system starts with: those two different first user turns share
    a, b = (encode(prefix_messages + [{"role": "user", "content": text}], False) for text in ("a", "b"))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    contexts, generated = [], []
    for k in range(len(pairs)):
        context = encode(messages[: len(prefix_messages) + 2 * k + 1], True)
        if ids[: len(context)] != context:
            raise InputError(
                f"{tokenizer.name_or_path}: the chat template does not render turn {k + 1} as a prefix of "
                "the later turns, so a KV cache cannot be carried across them"
            )
        reply = ids[len(context) :]
        end = next((i for i, t in enumerate(reply) if t == tokenizer.eos_token_id), len(reply) - 1)
        contexts.append(len(context))
        generated.append(end + 1)
    return Conversation(system, ids, prefix, contexts, generated)


class _Timer:
    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.value = time.perf_counter() - self.start


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    class Counter(FlopCounterMode):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            self.value = self.get_total_flops()

    return Counter(display=False)


def replay(model, ids, turns: list[Turn], measure, decode: bool = True, affine: bool = False) -> list[tuple]:
    """Run one regime's forwards over the conversation: per turn (prefill measure, decode measure, cache bytes
    at the turn's end). `measure()` gives a context manager with `.value` after it exits. decode=False feeds
    the generated tokens in one unmeasured forward instead (decode measure None): the decode forwards are the
    same in every regime, as the cache holds the whole context when decoding, so they are measured once.
    affine=True (FLOP counts only): a decode forward's count is affine in the cache's length (the projections are
    fixed, attention reads each cached key once), so the first two decode forwards are counted and the sum over the
    turn follows exactly; the rest are fed in one uncounted forward. Counting each of them dispatched every op of
    the model through the counter, minutes per conversation on SmolLM2."""
    import torch
    from transformers import DynamicCache

    def forward(cache, start, stop):
        model(input_ids=ids[:, start:stop], cache=cache, use_cache=True, logits_to_keep=1)

    shared, cache, out = None, None, []
    with torch.no_grad():
        if turns[0].cached:  # shared-prefix: the server prefilled P once, before any conversation
            shared = DynamicCache()
            forward(shared, 0, turns[0].cached)
        for turn in turns:
            if turn.cached == 0:
                cache = DynamicCache()
            elif cache is None:
                cache = copy.deepcopy(shared)
            assert cache.get_seq_length() == turn.cached, (cache.get_seq_length(), turn)
            start = turn.cached + turn.prefill
            with measure() as prefill:
                forward(cache, turn.cached, start)
            steps, decoded = turn.generated - 1, None
            if decode and affine and steps > 2:
                with measure() as first:
                    forward(cache, start, start + 1)
                with measure() as second:
                    forward(cache, start + 1, start + 2)
                forward(cache, start + 2, start + steps)
                decoded = steps * first.value + (second.value - first.value) * steps * (steps - 1) // 2
            elif decode:
                with measure() as measured:
                    for j in range(steps):
                        forward(cache, start + j, start + j + 1)
                decoded = measured.value
            elif steps > 0:
                forward(cache, start, start + steps)
            held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
            out.append((prefill.value, decoded, held))
    return out


def replay_regimes(model, ids, conv: Conversation, measure, affine: bool = False) -> dict[str, list[tuple]]:
    """`replay` in every regime, the decode forwards measured in the first (no-cache) and shared by the others."""
    out = {REGIMES[0]: replay(model, ids, conv.turns(REGIMES[0]), measure, affine=affine)}
    for regime in REGIMES[1:]:
        runs = replay(model, ids, conv.turns(regime), measure, decode=False)
        out[regime] = [(p, first[1], held) for (p, _, held), first in zip(runs, out[REGIMES[0]])]
    return out


def meta_model(config: dict, lora: tuple[int, list[str]] | None):
    """A weightless copy of the model (meta device, eager attention), with an unmerged LoRA if given."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora[0], target_modules=list(lora[1])))
    return model.eval()


def counted_flops(config: dict, conv: Conversation) -> dict[str, list[tuple[int, int]]]:
    """Per regime, per turn: torch's FLOP counter over the prefill's forward and the decode's forwards."""
    import torch

    ids = torch.zeros(1, len(conv.ids), dtype=torch.long, device="meta")
    return {
        r: [(int(p), int(d)) for p, d, _ in runs]
        for r, runs in replay_regimes(meta_model(config, conv.lora), ids, conv, _flop_counter, affine=True).items()
    }


def timed(engine, conv: Conversation, repeats: int) -> dict[str, list[tuple[float, float, int]]]:
    """Per regime, per turn: median prefill and decode seconds on the engine's model (decode timed once per turn,
    see `replay`), and the cache's bytes."""
    import torch

    ids = torch.tensor([conv.ids], device=engine.device)
    with engine.serving(conv.adapter):
        runs = [replay_regimes(engine.model, ids, conv, lambda: _Timer(engine.device)) for _ in range(repeats)]
    return {
        regime: [
            (
                statistics.median(r[regime][k][0] for r in runs),
                statistics.median(r[regime][k][1] for r in runs),
                runs[0][regime][k][2],
            )
            for k in range(len(conv.contexts))
        ]
        for regime in REGIMES
    }


def add_fresh_lora(engine, lora: tuple[int, list[str]]) -> str:
    """Time an unmerged LoRA of the adapter's shape without a trained one (the weights do not change the cost)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=lora[0], target_modules=list(lora[1]))
    if isinstance(engine.model, PeftModel):
        engine.model.add_adapter("fresh_lora", config)
    else:
        engine.model = get_peft_model(engine.model, config, adapter_name="fresh_lora").eval()
    return "fresh_lora"
