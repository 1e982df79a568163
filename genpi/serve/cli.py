"""`genpi serve ADAPTERS --catalog C`: an OpenAI-compatible server for a catalog's adapters.

The flags, checked before anything loads (a bad one exits 2 naming it), then one of two engines. The embedded
one (transformers + PEFT, for CPU machines) loads every adapter once, unmerged, on one base, and serves them
with `app.build_app` over a `scheduler.Scheduler`; `--merge ID` serves one prompt's adapter merged into the base
weights instead (no LoRA matmuls per token, and no base model to serve beside it). `--engine vllm` runs vLLM's
own OpenAI server (`vllm.run_vllm`). Either way, every adapter is checked first (`scheduler.load_adapters`).
"""

from __future__ import annotations

import argparse
import os
import sys

from genpi import InputError, exits_2_on_input_error
from genpi.data.adapters import is_model
from genpi.flags import add_settings, from_args
from genpi.serve.app import build_app
from genpi.serve.launcher import run_vllm, vllm_command
from genpi.serve.protocol import Limits
from genpi.serve.scheduler import Scheduler, load_adapters


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genpi serve",
        description=__doc__.splitlines()[0],
        epilog="With --engine vllm, arguments after -- go to `vllm serve` (e.g. -- --dtype float32)",
    )
    p.add_argument("adapters", metavar="ADAPTERS", help="adapters folder (genpi train --out): ADAPTERS/ID/ per prompt")
    p.add_argument("--catalog", required=True, help="the prompt catalog the adapters were trained for")
    p.add_argument(
        "--base",
        default=None,
        help="base model: local folder, hub id in the local cache, or 'smollm2' (default: the adapters' base)",
    )
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("GENPI_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $GENPI_API_KEY, which, unlike a command line, "
        "other users cannot see in ps; none: no key)",
    )
    p.add_argument("--max-tokens", type=int, default=512, help="a request's max_tokens when it gives none")
    add_settings(p, Limits)  # --max-body-bytes ... --body-timeout
    p.add_argument("--max-batch", type=int, default=32, help="transformers: rows per forward pass")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="transformers: torch threads (default: torch's)")
    p.add_argument(
        "--merge",
        metavar="ID",
        default=None,
        help="transformers: serve only prompt ID's adapter, merged into the base weights (the base's cost "
        "per token; unmerged LoRA adds two matmuls per layer); the base alone is not served",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="transformers: auto is bfloat16 on CUDA and on CPUs with bf16 dot products, else float32",
    )
    p.add_argument(
        "--vllm-python",
        default=os.environ.get("GENPI_VLLM_PYTHON", sys.executable),
        help="vllm: the Python that has vLLM (default: $GENPI_VLLM_PYTHON, else this one)",
    )
    return p


@exits_2_on_input_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: arguments for `vllm serve`
    args, extra = build_parser().parse_args(argv[:cut]), argv[cut + 1 :]
    if args.max_tokens < 1 or args.max_batch < 1 or not 0 < args.port < 65536:
        raise InputError("--max-tokens and --max-batch must be at least 1, --port in 1..65535")
    limits = from_args(Limits, args)
    for flag, value, least in (
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--max-messages", args.max_messages, 1),
        ("--max-message-chars", args.max_message_chars, 1),
        ("--max-stop-chars", args.max_stop_chars, 1),
        ("--max-waiting", args.max_waiting, 0),
    ):
        if value < least:
            raise InputError(f"{flag} must be at least {least}, got {value}")
    if not limits.body_timeout_s > 0:  # also NaN
        raise InputError(f"--body-timeout must be above 0 seconds, got {limits.body_timeout_s}")
    if args.api_key is not None and not args.api_key.strip():  # for both engines: an empty key is no key at all
        raise InputError("the API key (--api-key or $GENPI_API_KEY) is empty: give one, or neither to serve without")
    base_path, adapters = load_adapters(args.adapters, args.catalog, args.base)
    if args.merge is not None:
        if args.engine == "vllm":
            raise InputError("--merge is for the transformers engine (vLLM batches LoRA adapters with its own kernels)")
        adapters = [a for a in adapters if a.prompt_id == args.merge]
        if not adapters:
            raise InputError(f"--merge {args.merge}: {args.adapters} has no adapter for that prompt")
    names = ", ".join(a.prompt_id for a in adapters)
    full = [a for a in adapters if is_model(a.manifest)]  # full fine-tunes: models of their own (genpi.engines.routed)
    if full and (args.engine == "vllm" or args.merge is not None):
        raise InputError(
            f"{full[0].folder} is a fully fine-tuned model, not an adapter: serve it with the transformers engine "
            f"without --merge, or as its own model (vllm serve {full[0].folder})"
        )
    if args.engine == "vllm":
        command = vllm_command(args.vllm_python, base_path, adapters, args.host, args.port, args.max_model_len, extra)
        print(f"genpi serve: vLLM on http://{args.host}:{args.port}/v1 with {names}", file=sys.stderr, flush=True)
        return run_vllm(command, args.api_key)

    import uvicorn
    from transformers import AutoTokenizer

    from genpi.engines.hf import TransformersEngine

    engine = TransformersEngine(
        base_path, max_batch=args.max_batch, dtype=args.dtype, max_model_len=args.max_model_len, threads=args.threads
    )
    engine.add_adapters({a.name: str(a.folder) for a in adapters if a not in full}, merge=args.merge is not None)
    if full:
        from genpi.engines.routed import WithModels

        dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
        same = dict(max_batch=args.max_batch, dtype=dtype, max_model_len=args.max_model_len, threads=args.threads)
        engine = WithModels(engine, {a.name: TransformersEngine(str(a.folder), **same) for a in full})
    scheduler = Scheduler(engine)
    app = build_app(
        scheduler,
        AutoTokenizer.from_pretrained(base_path),
        engine.model_name,
        adapters,
        args.api_key,
        args.max_tokens,
        merged=args.merge is not None,
        limits=limits,
    )
    names += " (merged into the base)" if args.merge is not None else ""
    print(
        f"genpi serve: {engine.model_name} with {names} on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
