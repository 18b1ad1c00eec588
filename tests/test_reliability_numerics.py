"""A diverging run (--lr 1e6) on forked CPU ranks: every non-finite iteration said with its number and counted in
the log line, no checkpoint of the broken state, a stop with one line after --max-nonfinite-iterations in a row,
and a perplexity of nan for a nan loss. Resumes at the default dropout are exact: tests/test_checkpoints.py."""
import os
import re
import subprocess
import sys

import pytest

from tests.runs import flags, train

STOPPED = re.compile(r"iterations (\d+)-(\d+): the loss or gradient norm was not finite 3 times in a row "
                     r"\(--max-nonfinite-iterations 3\): training stopped, nothing of it saved; ")


@pytest.mark.parametrize("precision", [["--zero-stage", "0"], ["--bf16", "--zero-stage", "1", "--no-fused-grad-norm"],
                                       ["--bf16", "--zero-stage", "2"]],
                         ids=["fp32", "bf16-deepspeed-norm", "bf16"])
def test_a_diverging_run_stops_without_saving_its_broken_state(corpus, tmp_path, capfd, precision):
    """fp32 without ZeRO applies the inf gradients (the weights, then the loss become nan); bf16 under ZeRO
    skips each such update (DeepSpeed counts it), so the loss stays finite while nothing is learnt any more;
    so does the fused gradient norm (the default), whose norm (inf for any inf/nan gradient) replaces DeepSpeed's inf/nan scan.
    Both stop at the limit, with every checkpoint before the first non-finite iteration and none after."""
    ckpt = str(tmp_path / "ckpt")
    argv = flags(corpus, "--sequence-parallel-size", "2", "--lr", "1e6", "--save", ckpt, "--save-interval", "1",
                 "--max-nonfinite-iterations", "3", "--log-interval", "1", "--eval-interval", "1", "--eval-iters", "1",
                 *precision, iters=30)
    with pytest.raises(AssertionError) as failed:
        train(2, argv)
    stopped = STOPPED.search(str(failed.value))
    assert stopped, str(failed.value)[-2000:]
    first, last = int(stopped.group(1)), int(stopped.group(2))
    assert last == first + 2  # at the limit: three in a row
    saved = sorted(int(n.removeprefix("global_step")) for n in os.listdir(ckpt) if n.startswith("global_step"))
    assert saved == list(range(1, first))  # every step before the first non-finite one, none after
    assert f"the newest checkpoint is {ckpt}/global_step{first - 1}: resume from it" in str(failed.value)
    out = capfd.readouterr().out
    for n in range(first, last + 1):
        assert re.search(rf"warning: iteration {n}: the (loss|gradient norm|loss and the gradient norm) (is|are) not "
                         rf"finite \({n - first + 1} such iterations? in a row; the run stops at 3\)", out)
    assert f"warning: not saving at iteration {first}: its loss or gradient norm is not finite" in out
    skipped = 1 if "--bf16" in precision else 0
    assert re.search(rf" iteration +{first}/ +30 \|.*\| number of skipped iterations: +{skipped} \| "
                     r"number of nan iterations: +1 \|", out)
    if not skipped:  # the loss became nan: its perplexity is nan, not a finite e^20
        assert re.search(r"validation loss at iteration \d+ \| lm loss value: NAN \| lm loss PPL: NAN \|", out)


def test_a_diverging_run_is_one_error_line_and_exit_code_2(corpus, tmp_path):
    out = subprocess.run([sys.executable, "pretrain_gpt.py", *flags(corpus, "--lr", "1e6", "--max-nonfinite-iterations",
                                                                    "3", "--log-interval", "1", iters=30)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert STOPPED.match(out.stderr.strip().splitlines()[-1].removeprefix("error: ")), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "--save was not given" in out.stderr


def test_the_check_can_be_turned_off(corpus):
    """--no-check-for-nan-in-loss-and-grad: the run goes on to its last iteration (as before the check)."""
    losses = train(1, flags(corpus, "--lr", "1e6", "--no-check-for-nan-in-loss-and-grad", iters=8))
    assert len(losses) == 8 and losses[-1] != losses[-1]  # nan
