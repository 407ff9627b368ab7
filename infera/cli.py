"""The ``infera`` command line: serve, generate, chat, and the tools built on the engine."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from infera.sampling_params import SamplingParams

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str) -> Callable:
    """Register ``fn(parser)`` as the configurator of subcommand ``name``."""
    def register(fn: Callable[[argparse.ArgumentParser], None]) -> Callable:
        COMMANDS[name] = (help, fn)
        return fn
    return register


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", "-m", default=None,
                   help="a GGUF file or an HF model directory (config.json + safetensors); "
                        "default: the bundled SmolLM2-135M-Instruct")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = bfloat16 on CUDA or a CPU with AVX512-BF16/AMX, else float32")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="token budget per engine step (prefill chunks + decodes)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--kv-cache-memory", default="2GiB", help="memory for the KV cache, e.g. 2GiB or 512MB")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    g.add_argument("--seed", type=int, default=0, help="seed for requests that bring none")
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                enable_prefix_caching=not args.no_prefix_caching, seed=args.seed)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--sample-seed", type=int, default=None, help="seed of this request's sampling")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.sample_seed, max_tokens=args.max_tokens, stop=args.stop,
                          ignore_eos=args.ignore_eos)


@command("generate", "complete prompts with the model and print the results")
def _generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user chat message")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from infera import LLM

    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    if args.chat_template:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for prompt, out in zip(args.prompts, outputs):
        for c in out.outputs:
            header = f"--- {prompt!r}" + (f" [{c.index}]" if len(out.outputs) > 1 else "")
            print(f"{header} ({len(c.token_ids)} tokens, {c.finish_reason})")
            print(c.text)


@command("chat", "talk to the model in the terminal; replies stream as they are generated (Ctrl-D quits)")
def _chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="a system prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(run=run_chat, temperature=0.7, max_tokens=512)


def run_chat(args: argparse.Namespace) -> None:
    from infera.engine.llm_engine import LLMEngine

    engine = LLMEngine(**engine_kwargs(args))
    params = sampling_params(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            user = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        request_id = engine.add_request(prompt, params)
        shown = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    text = out.outputs[0].text
                    print(text[len(shown):], end="", flush=True)
                    shown = text
        except KeyboardInterrupt:
            engine.abort_request(request_id)
        print()
        history.append({"role": "assistant", "content": shown})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infera", description="infera: an LLM inference engine. Run `infera COMMAND --help` for details.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, configure) in COMMANDS.items():
        configure(sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.run(args)
    except (ValueError, OSError) as e:  # bad model file, bad option value: one line, no traceback
        print(f"infera {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
