"""The Megatron-DeepSpeed command line: flags -> RunConfig (checked afterwards by megatron_sp.validation).

Flags come from the config dataclasses (``num_layers`` -> ``--num-layers``). Megatron flags that
mean nothing here are accepted and listed in ``RunConfig.ignored`` so recipes run unchanged.
"""
import argparse
import dataclasses
import typing
from typing import NamedTuple

from megatron_sp.config import SECTIONS, RunConfig
from megatron_sp.validation import flag as _flag


class Ignored(NamedTuple):
    """A Megatron-DeepSpeed flag that changes nothing here: accepted so recipes run unchanged, and named in
    one note at start (`why`), or silently when a launcher sets it (`why` None)."""
    flag: str
    takes_value: bool
    why: str | None
    aliases: tuple[str, ...] = ()


IGNORED_FLAGS = [Ignored(*entry) for entry in [
    ("--no-async-tensor-model-parallel-allreduce", False, "no tensor parallelism"),
    ("--no-gradient-accumulation-fusion", False, "no tensor parallelism"),
    ("--sequence-parallel", False, "Megatron's tensor-parallel sequence split; use --sequence-parallel-size"),
    ("--no-masked-softmax-fusion", False, "attention runs in fused kernels"),
    ("--no-bias-gelu-fusion", False, "no separate fusion switch"),
    ("--no-bias-dropout-fusion", False, "no separate fusion switch"),
    ("--apply-query-key-layer-scaling", False, "softmax runs in fp32 inside the kernel"),
    ("--no-query-key-layer-scaling", False, "softmax runs in fp32 inside the kernel"),
    ("--fp16-lm-cross-entropy", False, "cross-entropy always accumulates in fp32"),
    ("--use-cpu-initialization", False, "parameters are initialised on the host already"),
    ("--use-distributed-optimizer", False, "optimizer state sharding is ZeRO (--zero-stage)"),
    ("--override-opt_param-scheduler", False, "the schedule always comes from the flags"),
    ("--partition-activations", False, "no tensor parallelism"),
    ("--contigious-checkpointing", False, "torch.utils.checkpoint needs no buffer"),
    ("--synchronize-each-layer", False, "not needed"),
    ("--log-timers-to-tensorboard", False, "timings are always logged"),
    ("--log-batch-size-to-tensorboard", False, "batch size is always logged"),
    ("--log-validation-ppl-to-tensorboard", False, "validation perplexity is always logged"),
    ("--log-optimizer-states-to-tensorboard", False, "not logged"),
    ("--checkpoint-num-layers", True, "every layer is checkpointed"),
    ("--data-impl", True, "data is always memory-mapped"),
    ("--tensorboard-queue-size", True, "not needed"),
    ("--tensorboard-log-interval", True, "TensorBoard scalars are written at every --log-interval"),
    ("--DDP-impl", True, "DeepSpeed reduces gradients"),
    ("--empty-unused-memory-level", True, "not needed"),
    ("--timing-log-level", True, "not needed"),
    ("--recompute-method", True, "every layer is checkpointed"),
    ("--recompute-num-layers", True, "every layer is checkpointed"),
    ("--log-params-norm", False, "not logged"),
    ("--log-num-zeros-in-grad", False, "not logged"),
    ("--log-memory-to-tensorboard", False, "peak memory is always logged"),
    ("--log-world-size-to-tensorboard", False, "the layout is printed at start"),
    ("--group-query-attention", False, "implied by --num-query-groups / --num-key-value-heads"),
    ("--deepspeed", False, "training always runs on DeepSpeed"),
    ("--no-pipeline-parallel", False, "stages come from --pipeline-model-parallel-size alone"),
    ("--num-workers", True, "batches are read in-process from memory-mapped files"),
    ("--local-rank", True, None, ("--local_rank",)),  # the deepspeed launcher's; LOCAL_RANK says the same
]]

# Megatron switches with a counterpart here: flag -> (section, field, value, note).
MAPPED_FLAGS = {
    "--use-flash-attn-triton": ("parallel", "attention_backend", "triton", "our Triton FlashAttention"),
    "--use-flash-attn": ("parallel", "attention_backend", "auto", "the fastest kernel available"),
    "--use-flash-attn-v1": ("parallel", "attention_backend", "auto", "the fastest kernel available"),
    "--use-flash-attn-v2": ("parallel", "attention_backend", "auto", "the fastest kernel available"),
    "--deepspeed-activation-checkpointing": ("model", "checkpoint_activations", True, "layer recompute"),
    "--ds-sequence-parallel-fpdt": ("model", "mlp_tile_tokens", None, "FPDT's sequence chunks, for the MLP; "
                                    "attention needs no chunks: its inputs fit up to 1M tokens per GPU"),
    "--ds-sequence-parallel-fpdt-offloading": ("model", "checkpoint_in_cpu", True,
                                               "FPDT's offloading: activation checkpoints in host memory"),
}
# --ds-sequence-parallel-fpdt's chunk size (Megatron-DeepSpeed's default); a value flag, read with that switch.
FPDT_CHUNK_FLAG, FPDT_CHUNK_DEFAULT = "--ds-sequence-parallel-fpdt-chunk-size", 65536


def _base_type(annotation):
    """int | None -> int;  list[str] | None -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    inner = args[0]
    return typing.get_args(inner)[0] if typing.get_origin(inner) is list else inner


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one line pointing at --help, not the 100-line usage first."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add_section(parser: argparse.ArgumentParser, section: str, cls) -> None:
    """One flag per field of a config dataclass; an on-by-default switch is turned off Megatron's way: --no-X."""
    group = parser.add_argument_group(section)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, _base_type(hints[f.name])
        names = [_flag(f.name), *meta["flags"]]
        common = dict(dest=f"{section}.{f.name}", help=meta["help"], default=f.default)
        if kind is bool and f.default:  # other spellings of an on-by-default switch say the default explicitly
            group.add_argument("--no-" + names[0][2:], action="store_false", **common)
            if meta["flags"]:
                group.add_argument(*meta["flags"], action="store_true", **{**common, "help": "On by default."})
        elif kind is bool:
            group.add_argument(*names, action="store_true", **common)
        else:
            group.add_argument(*names, type=meta["type"] or kind, choices=meta["choices"],
                               nargs=meta["nargs"], metavar=None if meta["choices"] else f.name.upper(), **common)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain_gpt.py", allow_abbrev=False,
                     description="Pretrain a GPT with sequence parallelism on DeepSpeed (Megatron-DeepSpeed flags).")
    for section, cls in SECTIONS.items():
        _add_section(parser, section, cls)
    group = parser.add_argument_group("compatibility (accepted, reported once at start)")
    group.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "none"), default=None,
                       help="Megatron-core spelling: rope = --use-rotary-position-embeddings, "
                            "none = --no-position-embedding.")
    for flag, (_, _, _, note) in MAPPED_FLAGS.items():
        group.add_argument(flag, action="store_true", dest=f"mapped.{flag}", help=f"Mapped: {note}.")
    group.add_argument(FPDT_CHUNK_FLAG, type=int, default=None, metavar="TOKENS", dest="fpdt_chunk",
                       help=f"With --ds-sequence-parallel-fpdt: the --mlp-tile-tokens it maps to "
                            f"(default {FPDT_CHUNK_DEFAULT}).")
    for ignored in IGNORED_FLAGS:
        kwargs = dict(metavar="X") if ignored.takes_value else dict(action="store_true")
        why = ignored.why or "set by the launcher; LOCAL_RANK is read instead"
        group.add_argument(ignored.flag, *ignored.aliases, dest=f"ignored.{ignored.flag}", default=None,
                           help=f"Ignored: {why}.", **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Command line -> RunConfig (not yet validated against the world size: see validate)."""
    ns = vars(build_parser().parse_args(argv))
    values = {section: {} for section in SECTIONS}
    for dest, value in ns.items():
        kind, _, name = dest.partition(".")
        if kind in values:
            values[kind][name] = value
    notes = [f"{i.flag} ({i.why})" for i in IGNORED_FLAGS if i.why and ns[f"ignored.{i.flag}"] not in (None, False)]
    for flag, (section, name, value, note) in MAPPED_FLAGS.items():
        if flag == "--ds-sequence-parallel-fpdt":
            value = ns["fpdt_chunk"] or FPDT_CHUNK_DEFAULT
        if ns[f"mapped.{flag}"]:
            values[section][name] = value
            notes.append(f"{flag} -> {_flag(name)} {value} ({note})")
    if ns["fpdt_chunk"] is not None and not ns["mapped.--ds-sequence-parallel-fpdt"]:
        notes.append(f"{FPDT_CHUNK_FLAG} (only read with --ds-sequence-parallel-fpdt)")
    if ns["position_embedding_type"] == "rope":
        values["model"]["use_rotary_position_embeddings"] = True
    elif ns["position_embedding_type"] == "none":
        values["model"]["position_embedding"] = False
    sections = {s: cls(**values[s]) for s, cls in SECTIONS.items()}
    cfg = RunConfig(**sections, ignored=notes)
    if cfg.training.load_hf:  # its config.json gives the model flags the command line leaves out
        from megatron_sp.hf.start import apply_hf_config
        apply_hf_config(cfg, given_fields(argv))
    return cfg


def given_fields(argv: list[str] | None) -> set[str]:
    """The config fields the command line sets explicitly ('model.num_layers'), defaults left out."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    ns = vars(parser.parse_args(argv))
    given = {dest for dest in ns if dest.partition(".")[0] in SECTIONS}
    kind = ns.get("position_embedding_type")
    if kind in ("rope", "none"):
        given.add("model.use_rotary_position_embeddings" if kind == "rope" else "model.position_embedding")
    return given
