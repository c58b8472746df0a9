"""Commands about models themselves: ``gptlab presets``, ``gptlab generate``, ``gptlab convert``,
``gptlab visualize``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..atomic import atomic_write_bytes, atomic_write_text
from ..config import PRESETS, GPTConfig
from ..engine import Engine, SamplingParams
from ..errors import UserError
from ..hf import export_hf, hf_dir_from_spec, import_hf, read_json_file
from ..model import GPT
from ..lora import ADAPTER_CONFIG, LoRAConfig, has_lora
from ..runs import copy_recorded, load_run, prepare_out_dir, read_run_config, save_merged, save_model
from ..stages.finetune import hf_head as finetune_head
from ..stages.reward import hf_head as reward_head
from ..serve.offline import standalone_page
from ..visualize import ModelView, ViewConfig
from .args import add_fields, add_group, given, unescape

__all__ = ["COMMANDS"]


def cmd_presets(args: argparse.Namespace) -> None:
    for name in PRESETS:
        c = GPTConfig.from_preset(name)
        print(f"{name} {c.n_layer} {c.n_embd} {c.n_head} {c.block_size} {c.vocab_size} {GPT.count_params(c)} "
              f"{GPT.count_params(c, active=True)}")


def add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list model presets: NAME n_layer n_embd n_head block_size vocab_size params "
                                       "active_params (per token: an MoE's top_k experts only)")
    p.set_defaults(func=cmd_presets)


def cmd_generate(args: argparse.Namespace) -> None:
    engine = Engine.from_spec(args.model, precision=args.precision)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, stop=[unescape(s) for s in args.stop or []],
                            seed=args.seed, stop_at_eos=not args.ignore_eos, slide=args.slide,
                            skip_special_tokens=not args.show_special_tokens)
    completion = None
    for piece, done in engine.stream_pieces(engine.encode(args.prompt), params):
        if args.stream:
            print(piece, end="", flush=True)
        completion = done or completion
    assert completion is not None
    print("" if args.stream else completion.text)
    made = len(completion.token_ids)
    if made < args.max_new_tokens:  # never stop short without saying why
        why = ("a stop string" if completion.stop_token is None and completion.finish_reason == "stop" else
               "the end-of-text token (--ignore-eos goes on)" if completion.finish_reason == "stop" else
               f"the model's context of {engine.config.block_size} tokens (--slide goes on)")
        print(f"gptlab generate: stopped after {made} of {args.max_new_tokens} tokens at {why}", file=sys.stderr)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model (prints only the continuation)")
    p.add_argument("--model", required=True, help="run directory or hf:DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable; \\n, \\t, \\r and \\\\ are read as "
                                                   "the characters they name)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-text token")
    p.add_argument("--show-special-tokens", action="store_true",
                   help="print special tokens (<|endoftext|>, <|end|>, ...) in the text; they are left out by default")
    p.add_argument("--slide", action=argparse.BooleanOptionalAction, default=True,
                   help="past the model's context, go on reading its last block_size tokens, as nanoGPT "
                        "(default: on)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="int8: weights in 8 bits for faster CPU decoding (see docs/BENCHMARKS.md)")
    p.set_defaults(func=cmd_generate)


def cmd_convert(args: argparse.Namespace) -> None:
    out = prepare_out_dir(args.out, args.force)
    if args.from_hf:
        src = args.from_hf.removeprefix("hf:")
        model, tok = import_hf(src)
        save_model(out, model, tok, stage="pretrain", extra={"source": f"hf:{src}"})
        kind = "openai-gpt" if model.config.norm_position == "post" else "gpt2"
        print(f"wrote run directory {out} from {kind} {src} ({model.num_params():,} params, "
              f"tokenizer: {tok.spec if tok is not None else 'none'})")
    else:
        heads = {"finetune": finetune_head, "reward": reward_head}
        section = next((s for s in heads if isinstance(read_run_config(args.to_hf).get(s), dict)), None) \
            if hf_dir_from_spec(args.to_hf) is None else None
        if section is not None:
            backbone, tokenizer, head = heads[section](args.to_hf)
            export_hf(backbone, out, tokenizer, head)
            print(f"wrote transformers directory {out}: {read_json_file(out / 'config.json', '')['architectures'][0]} "
                  f"with the {section} head (docs/TASKS.md: how to feed it)")
            return
        model, tok, config = load_run(args.to_hf, merge=False)
        export_hf(model, out, tok)
        if not has_lora(model):
            print(f"wrote transformers directory {out} (load with from_pretrained({str(out)!r}))")
            return
        copy_recorded(args.to_hf, config[LoRAConfig.section]["adapter"], out / "adapter", "LoRA adapter")
        atomic_write_bytes(out / "adapter" / ADAPTER_CONFIG, (Path(args.to_hf) / ADAPTER_CONFIG).read_bytes())
        print(f"wrote the base model {out} and its LoRA adapter {out / 'adapter'}: PeftModel.from_pretrained("
              f"AutoModelForCausalLM.from_pretrained({str(out)!r}), {str(out / 'adapter')!r}); for one merged model "
              f"run gptlab lora merge first")


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face GPT-2/OpenAI-GPT directory, or export a run to one")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="transformers directory (gpt2 / openai-gpt) to import")
    src.add_argument("--to-hf", metavar="RUN_DIR", help="run directory to export as a transformers directory")
    p.add_argument("--out", required=True, help="output directory (run dir for --from-hf, HF dir for --to-hf)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files are replaced)")
    p.set_defaults(func=cmd_convert)


def cmd_visualize(args: argparse.Namespace) -> None:
    model, tok, _ = load_run(args.model)
    if tok is None:
        raise UserError(f"{args.model} has no tokenizer, so --text cannot be read: use a run directory saved with one")
    config = ViewConfig.from_dict(given(args, ViewConfig), source="flags")
    ids = tok.encode(args.text)
    cut = max(0, len(ids) - model.config.block_size)
    name = Path(str(args.model).removeprefix("hf:")).expanduser().resolve().name
    data = ModelView(model.eval(), tok, config, name=name).view(ids[cut:], cut)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, standalone_page("visualize.html", data))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(ids) - cut} tokens"
          f"{f', the first {cut} cut to fit the context' if cut else ''}): open it in a browser, no server needed")


def add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="the model in 3-D on a text's forward pass, as one HTML file that opens "
                                         "without a server (the /visualize page of gptlab serve)")
    p.add_argument("--model", required=True, help="run directory or hf:DIR")
    p.add_argument("--text", required=True, help="the text to run through the model")
    p.add_argument("--out", required=True, help="the HTML file to write (data and scripts inline)")
    add_fields(p, ViewConfig, title="what is drawn (ViewConfig)")
    p.set_defaults(func=cmd_visualize)


def cmd_lora_merge(args: argparse.Namespace) -> None:
    out = prepare_out_dir(args.out, args.force)
    save_merged(args.model, out)
    print(f"wrote run directory {out}: {args.model} with its LoRA adapters merged into the weights")


def add_lora_merge(lsub: argparse._SubParsersAction) -> None:
    p = lsub.add_parser("merge", help="fold a run's LoRA adapters into its weights: a plain run (heads kept)")
    p.add_argument("--model", required=True, help="run directory trained with --lora-rank")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files are replaced)")
    p.set_defaults(func=cmd_lora_merge)


def add_lora(sub: argparse._SubParsersAction) -> None:
    add_group(sub, "lora", "LoRA adapters of a run", [add_lora_merge])


COMMANDS = [add_presets, add_generate, add_convert, add_visualize, add_lora]
