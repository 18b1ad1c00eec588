"""Convert a run's latest checkpoint into a DeepSpeed universal checkpoint, to resume on another number of GPUs.

    python tools/universal_checkpoint.py --load runs/x/checkpoint     # writes global_stepN_universal/
    deepspeed --num_gpus 4 pretrain_gpt.py ... --load runs/x/checkpoint --save runs/x/checkpoint --universal-checkpoint

ZeRO splits the optimizer state into one part per rank, so a ZeRO-1/2 checkpoint only resumes on as many
ranks as saved it. DeepSpeed's ds_to_universal rewrites it per parameter (weights and Adam moments, whole),
which loads on any number of ranks; this tool runs it on the tag in <load>/latest and names the result in
<load>/latest_universal, where --universal-checkpoint looks. The run then saves ordinary checkpoints again.
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_sp.data.cli import InputError, OneLineParser, run_tool  # noqa: E402
from megatron_sp.errors import ConfigError  # noqa: E402
from megatron_sp.training.checkpoint import LATEST, LATEST_UNIVERSAL, latest_tag  # noqa: E402
from megatron_sp.training.checkpoint_files import incomplete_reason  # noqa: E402
from megatron_sp.training.durable import write_atomically  # noqa: E402

# DeepSpeed's converter, run with every torch.load weights-only (it asks for weights_only=False): a crafted file
# in the checkpoint must not run code here either. Its worker processes are forked and inherit the setting.
CONVERTER = """
import sys
from deepspeed.checkpoint import ds_to_universal
from megatron_sp.training.checkpoint_files import weights_only_loads
sys.argv[0] = "ds_to_universal"
with weights_only_loads():
    ds_to_universal.main(ds_to_universal.parse_arguments())
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="the run's checkpoint directory (its --save / --load)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that extract and merge the parameters")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.load, LATEST)):
        raise InputError(f"--load {args.load}: no '{LATEST}' file, so no checkpoint to convert")
    return args


def convert(args: argparse.Namespace) -> str:
    tag = latest_tag(args.load)  # a step directory inside --load, or a ConfigError
    source, target = os.path.join(args.load, tag), os.path.join(args.load, f"{tag}_universal")
    if not os.path.isdir(source):
        raise InputError(f"--load {args.load}: '{LATEST}' names {tag}, which is not there")
    if reason := incomplete_reason(source, 0, 1):
        raise InputError(f"{source} is incomplete ({reason}); point '{LATEST}' at a complete step")
    if os.path.exists(target):
        raise InputError(f"{target} exists already; remove it to convert {tag} again")
    if os.path.isfile(os.path.join(source, "mp_rank_01_model_states.pt")):  # a second pipeline stage's files
        raise InputError(f"{source} was saved by a pipeline (--pipeline-model-parallel-size above 1), whose stages "
                         "ds_to_universal would merge as tensor-parallel slices; resume it on as many ranks per stage")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", CONVERTER, "--input_folder", source, "--output_folder", target,
                          "--num_extract_workers", str(args.workers), "--num_merge_workers",
                          str(max(1, args.workers // 2))], capture_output=True, text=True, env=env)
    if out.returncode != 0:  # DeepSpeed's last line says why (e.g. a ZeRO-3 or half-written checkpoint)
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise InputError(f"ds_to_universal failed on {source}: {lines[-1] if lines else out.returncode}")
    write_atomically(os.path.join(args.load, LATEST_UNIVERSAL), os.path.basename(target))
    return target


def main(argv: list[str] | None = None) -> int:
    def body(a: list[str] | None) -> None:
        args = parse_args(a)
        print(f"wrote {convert(args)}; resume with --load {args.load} --universal-checkpoint", file=sys.stderr)
    return run_tool(body, argv, expected=(ConfigError,))


if __name__ == "__main__":
    sys.exit(main())
