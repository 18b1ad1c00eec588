"""Convert a checkpoint of ours into a Hugging Face model directory, for evaluation and serving.

    python tools/convert_checkpoint.py --load runs/quickstart/checkpoints --to-hf runs/quickstart/hf
    lm_eval --model hf --model_args pretrained=runs/quickstart/hf --tasks hellaswag --batch_size 8

Any ZeRO stage (0-3), any DP x SP layout and any pipeline the run had; its latest step or --step N. Llama-style models
become LlamaForCausalLM, GPT-2-style ones GPT2LMHeadModel; another model is refused in one line saying why.
The other way needs no conversion: pretrain_gpt.py --load-hf DIR starts a run from a Hugging Face directory.
Needs the [hf] extra: pip install -e .[hf]. More in docs/hf.md.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_sp.data.cli import InputError, OneLineParser, run_tool  # noqa: E402

UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def size_in_bytes(text: str) -> int:
    """'5GB' -> 5 * 10**9, '100MiB' -> 100 * 2**20, '4096' -> 4096 (transformers' max_shard_size spelling)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str] | None]:
    """(options, the run's pretrain_gpt.py flags given after -- or None)."""
    argv = sys.argv[1:] if argv is None else argv
    run_flags = argv[argv.index("--") + 1:] if "--" in argv else None
    p = OneLineParser(description=__doc__.splitlines()[0], usage="%(prog)s --load DIR --to-hf OUT [options] "
                      "[-- the run's pretrain_gpt.py flags, for a checkpoint saved without megatron_sp_config.json]")
    p.add_argument("--load", required=True, help="the run's checkpoint directory (its --save)")
    p.add_argument("--to-hf", required=True, metavar="OUT", help="the Hugging Face directory to write (new or empty)")
    p.add_argument("--step", type=int, help="export global_step<STEP> instead of the latest")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype; default the run's precision (fp32 -> float32, bf16 -> bfloat16)")
    p.add_argument("--max-shard-size", type=size_in_bytes, default="5GB",
                   help="split model.safetensors into shards of at most this size, with an index (default 5GB)")
    p.add_argument("--tokenizer-model", help="where the run's --tokenizer-model is now, if it moved")
    p.add_argument("--vocab-file", help="where the run's --vocab-file is now, if it moved")
    p.add_argument("--merge-file", help="where the run's --merge-file is now, if it moved")
    p.add_argument("--no-tokenizer", action="store_true", help="write the model without tokenizer files")
    args = p.parse_args(argv[:argv.index("--")] if run_flags is not None else argv)
    if not os.path.isdir(args.load):
        raise InputError(f"--load {args.load}: no such directory")
    return args, run_flags


def run_record_from_flags(run_flags: list[str]) -> dict:
    """The run record (megatron_sp.training.checkpoint.run_record) of a run given by its command line."""
    from megatron_sp.arguments import parse_args as parse_run_flags
    from megatron_sp.config import fill_defaults
    from megatron_sp.configure import attach_tokenizer
    from megatron_sp.training.checkpoint import run_record
    cfg = parse_run_flags(run_flags)
    fill_defaults(cfg)
    return run_record(cfg, attach_tokenizer(cfg))


def convert(args: argparse.Namespace, run_flags: list[str] | None) -> None:
    from megatron_sp.hf.export import export
    overrides = {k: getattr(args, k) for k in ("tokenizer_model", "vocab_file", "merge_file") if getattr(args, k)}
    done = export(args.load, args.to_hf, args.step, args.dtype, args.max_shard_size, overrides,
                  with_tokenizer=not args.no_tokenizer,
                  record=run_record_from_flags(run_flags) if run_flags is not None else None)
    print(f"wrote {done.out_dir}: {done.arch} from {done.tag} in {done.dtype} ({', '.join(done.files)}, "
          f"config.json, generation_config.json; {done.tokenizer})")
    if done.has_tokenizer:
        print("evaluate it with lm-evaluation-harness (pip install 'lm-eval[hf]'; it downloads the task data):")
        print(f"  lm_eval --model hf --model_args pretrained={done.out_dir} --tasks hellaswag --batch_size 8")
    else:
        print("without tokenizer files, AutoTokenizer and lm_eval need a tokenizer from elsewhere "
              "(lm_eval: --model_args pretrained=...,tokenizer=DIR)")


def main(argv: list[str] | None = None) -> int:
    return run_tool(lambda a: convert(*parse_args(a)), argv, expected=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
