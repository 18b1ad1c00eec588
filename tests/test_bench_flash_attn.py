"""tools/bench_flash_attn.py's modes at tiny sizes on CPU (Triton's interpreter), so a GPU run does not find its bugs."""
import ast

from tools.bench_flash_attn import auto_table, bench, doc_bench, parse_args, sweep_configs

TINY = ["--device", "cpu", "--heads", "1", "--warmup", "0", "--reps", "1", "--causal", "yes"]


def test_table_rows_per_head_dim_and_provider():
    rows = bench(parse_args([*TINY, "--head-dims", "32,80", "--seqlens", "32", "--modes", "fwd_bwd"]))
    ours = [r for r in rows if r["provider"] == "triton"]
    assert [r["head_dim"] for r in ours] == [32, 80] and all(r["fwd_bwd_tflops"] > 0 for r in ours)
    assert {r["provider"] for r in rows} == {"triton", "sdpa_cudnn", "sdpa_flash"}  # cuDNN: an error row on CPU


def test_back_to_back_timing_fills_the_same_rows():
    rows = bench(parse_args([*TINY, "--head-dims", "32", "--seqlens", "32", "--modes", "fwd_bwd", "--back-to-back"]))
    ours = [r for r in rows if r["provider"] == "triton"]
    assert len(ours) == 1 and ours[0]["fwd_bwd_tflops"] > 0 and ours[0]["fwd_bwd_ms"] > 0


def test_doc_len_counts_document_flops():
    rows = doc_bench(parse_args([*TINY, "--head-dims", "32", "--seqlens", "64", "--doc-len", "16", "--modes", "fwd"]))
    dense, docs, one_doc = rows
    assert (dense["seqlen"], docs["doc_len"], one_doc["seqlen"]) == (64, 16, 16)
    # 4 documents of 16: the rate counts 4 x the FLOPs of one 16-token document
    flops = docs["fwd_tflops"] * docs["fwd_ms"] * 1e9
    assert abs(flops - 4 * (4 * 16 * 16 * 32 / 2)) < 1e-6 * flops


def test_auto_table_prints_the_choice_table(capsys):
    auto_table(parse_args([*TINY, "--head-dims", "32", "--seqlens", "32,48", "--auto-table"]))
    text = capsys.readouterr().out
    literal = text[text.index("MEASURED = {") + len("MEASURED = "):]
    table = ast.literal_eval("{" + literal.split("{", 1)[1].split("}", 1)[0] + "}")
    assert list(table) == [(32, "float32", True)]
    assert table[(32, "float32", True)] == ((32, "triton"),)  # cuDNN cannot run on CPU; one winner, one entry


def test_tma_flag_and_the_sweep_candidates_with_tma_flipped():
    rows = bench(parse_args([*TINY, "--head-dims", "32", "--seqlens", "32", "--modes", "fwd_bwd", "--tma"]))
    assert rows[0]["provider"] == "triton" and rows[0]["fwd_bwd_tflops"] > 0
    for tma in (False, True):
        cands = list(sweep_configs(128, tma))
        assert {cfg.tma for _, cfg in cands[:-2]} == {tma}  # --tma: every tiling with descriptors
        assert [(kind, cfg.tma) for kind, cfg in cands[-2:]] == [("fwd", not tma), ("bwd", not tma)]
    dkdv = list(sweep_configs(128, True, ["dkdv"]))[:-2]  # each dk/dv tiling with the dq kernel, then dq added inside
    assert {kind for kind, _ in dkdv} == {"bwd"} and [c.dq_atomic for _, c in dkdv] == [False, True] * (len(dkdv) // 2)
    assert all(a.block_m1 == b.block_m1 and a.block_n1 == b.block_n1 for (_, a), (_, b) in zip(dkdv[::2], dkdv[1::2]))
