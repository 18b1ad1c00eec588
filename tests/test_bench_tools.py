"""The GPU benchmarks' CPU modes run end to end on 2 forked gloo ranks: tiny shapes, a few seconds each."""
import json

import pytest

from tests.distributed import run_ranks


def _bench_attention(rank, world, out):
    from tools import bench_attention
    result = bench_attention.main(["--device", "cpu", "--seqs", "32,64", "--warmup", "1", "--iters", "2",
                                   "--out", out])
    return result["rows"]


def test_bench_attention_cpu_mode(tmp_path):
    out = str(tmp_path / "attention.json")
    rows = run_ranks(2, _bench_attention, out, timeout=120)[0]
    ok = {(r.get("seq"), r["name"]) for r in rows if "value" in r and r["value"] > 0}
    for seq in (32, 64):
        assert {(seq, "ours ulysses/torch"), (seq, "ours ring/torch"), (seq, "deepspeed ulysses/math"),
                (seq, "single ours torch")} <= ok
    # every measurement is either a rate (each call alone and back to back) or an error line, never missing
    assert all(("value" in r) != ("error" in r) for r in rows)
    assert all(r["value_b2b"] > 0 and r["ms_b2b"] > 0 for r in rows if "value" in r)
    assert {r["name"].split(" ")[0] for r in rows if r["group"] == "ceiling"} == {"matmul", "all_to_all_single",
                                                                                "ring"}
    with open(out) as fh:
        saved = json.load(fh)
    assert saved["meta"]["gpus"] == 2 and len(saved["rows"]) == len(rows)


def _bench_e2e(rank, world, out):
    from tools import bench_e2e
    return bench_e2e.main(["--model", "tiny", "--device", "cpu", "--seq-length", "128", "--backend", "torch",
                           "--zero-stage", "3", "--warmup", "1", "--steps", "2", "--profile", "--out", out])


def test_bench_e2e_cpu_mode(tmp_path):
    out = str(tmp_path / "e2e.json")
    results = run_ranks(2, _bench_e2e, out, timeout=120)
    r = results[0]
    assert r["ms_per_step"] == results[1]["ms_per_step"] > 0  # the slowest rank's median, agreed by both
    assert len(r["step_ms"]) == 2 and r["tokens_per_s"] > 0 and r["model_tflops_per_gpu"] > 0
    # megatron_sp/flops.py for this MHA, SwiGLU, untied shape is 3 * (L * (8h^2 + 6hf + 2hs) + 2hV), written out
    L, h, f, s, V = 2, 64, 176, 128, 256
    assert r["flops_per_token"] == 3 * (L * (8 * h * h + 6 * h * f + 2 * h * s) + 2 * h * V)
    assert set(r["profile"]["ms"]) == {"attention", "matmul", "communication", "other"}
    # the real profile's phases: train_step's three ranges, in order, inside the profiled step
    from megatron_sp.training.loop import PHASES
    phases = r["profile"]["phases"]
    assert [p["name"] for p in phases] == list(PHASES) and all(p["host_ms"] > 0 for p in phases)
    assert sum(p["host_ms"] for p in phases) <= r["profile"]["step_wall_ms"]
    assert r["host_peak_rss_gib"] > 0 and r["planned_gpu_gib"] > 0 and r["host_checkpoints_gib"] == 0
    assert r["last_step_bytes_per_local_token"] == 0  # no CUDA allocator on CPU
    with open(out) as fh:
        assert json.load(fh)[0]["seq_length"] == 128


def _bench_e2e_memory(rank, world, out, step_flags):
    from tools import bench_e2e
    return bench_e2e.main(["--model", "tiny", "--device", "cpu", "--seq-length", "64", "--zero-stage", "1",
                           "--warmup", "1", "--steps", "1", "--memory-breakdown",
                           "--out", out, "--", "--bf16", *step_flags])


@pytest.mark.parametrize("step_flags", [[], ["--no-fused-grad-norm"]])
def test_bench_e2e_memory_breakdown_reads_the_zero_1_states(tmp_path, step_flags):
    """bf16 ZeRO-1 on 2 ranks: bf16 weights whole on each rank, the fp32 master weights and AdamW's two
    states a half each, bf16 gradients after backward; DeepSpeed's step (--no-fused-grad-norm) makes an fp32
    gradient partition inside the step, the sync-free one (its AdamW reads the bf16 gradients) none."""
    r = run_ranks(2, _bench_e2e_memory, str(tmp_path / "e2e.json"), step_flags, timeout=120)[0]
    n, moments = r["parameters"], r["memory"]["moments"]
    assert list(moments) == ["after forward", "after backward", "in optimizer step", "after step"]
    for m in moments.values():
        assert m["parameters"] == 2 * n
        assert 4 * n / 2 <= m["fp32 master weights"] <= 4 * n / 2 + 4 * 2 * 64  # + ZeRO's padding per group
        assert m["optimizer states"] == 2 * m["fp32 master weights"] + 2 * 4  # exp_avg, exp_avg_sq, 2 step counters
        assert "allocated" not in m  # CPU: no allocator statistics
    in_step = moments["in optimizer step"]["fp32 gradient partition"]
    assert in_step > 0 if step_flags else in_step == 0
    assert all(moments[k]["fp32 gradient partition"] == 0 for k in ("after forward", "after backward", "after step"))
    assert moments["after backward"]["gradients + buffers"] >= 2 * n / 2
    assert moments["after step"]["gradients + buffers"] < 64  # only scalars (the gradient norm) stay
    # the planner's parts at the moment it predicts the peak (here the optimizer step: no activations then)
    assert set(r["memory"]["planner"]) >= {"parameters", "gradients", "optimizer"}
    assert sum(r["memory"]["planner"].values()) == pytest.approx(r["planned_gpu_gib"] * 2 ** 30, abs=8)
    assert r["memory"]["planner_phase"] == r["planned_peak_phase"]
    assert r["alloc_conf"].endswith("expandable_segments:True")


def test_memory_breakdown_counts_each_storage_once_by_its_first_category():
    import torch
    from tools import memory_breakdown
    flat = torch.zeros(100)
    views = [flat[:60], flat[60:]]  # parameters as views into one flat buffer: 400 bytes once
    grad = torch.zeros(10, dtype=torch.bfloat16)
    tensors = {c: [] for c in memory_breakdown.CATEGORIES}
    tensors["parameters"] = views
    tensors["fp32 master weights"] = [flat[10:20]]  # already claimed by the parameters
    tensors["gradients + buffers"] = [grad, grad.view(2, 5), torch.empty(1000, device="meta")]
    got = memory_breakdown.count_bytes(tensors)
    assert got == {"parameters": 400, "fp32 master weights": 0, "optimizer states": 0, "fp32 gradient partition": 0,
                   "gradients + buffers": 20}


def _bench_e2e_offloaded(rank, world, out):
    from tools import bench_e2e
    return bench_e2e.main(["--model", "tiny", "--device", "cpu", "--seq-length", "128", "--backend", "torch",
                           "--sp", "1", "--zero-stage", "1", "--warmup", "1", "--steps", "1", "--checkpoint-activations",
                           "--memory-snapshot", "--out", out, "--", "--checkpoint-in-cpu", "--mlp-tile-tokens", "32"])


def test_bench_e2e_reports_the_host_memory_of_checkpoints(tmp_path):
    """With --checkpoint-in-cpu the report holds the host bytes the checkpoints use (here plain CPU memory)
    and the planner's estimate of them, which for checkpointed layer inputs is the same number."""
    r = run_ranks(1, _bench_e2e_offloaded, str(tmp_path / "e2e.json"), timeout=120)[0]
    layer_inputs = 2 * 128 * 64 * 4  # 2 layers x [128 tokens, hidden 64] fp32
    assert r["host_checkpoints_gib"] * 2 ** 30 == r["host_copied_per_step_gib"] * 2 ** 30 == layer_inputs
    assert r["planned_host_gib"] == r["host_checkpoints_gib"]


def test_kernel_timeline_separates_hidden_from_exposed_communication():
    from tools import bench_e2e, kernel_timeline
    k = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    trace = {"traceEvents": [
        k("sm90_gemm_bf16", 0, 100),            # compute 0-100
        k("ncclDevKernel_AllToAll", 50, 100),   # comm 50-150: 50 hidden behind the gemm, 50 exposed
        k("cudnn_fmha_fprop", 200, 100),        # compute 200-300, after 50 idle
        k("triton_poi_fused_add", 250, 100),    # other 250-350 overlaps attention by 50
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},  # host op: not device time
    ]}
    t = kernel_timeline.summarize(trace, bench_e2e.categorize)
    assert t["span_ms"] == 0.35 and t["busy_ms"] == 0.3 and t["idle_ms"] == 0.05
    assert t["compute_ms"] == 0.25 and t["exposed_communication_ms"] == 0.05
    assert t["union_ms"] == {"attention": 0.1, "communication": 0.1, "matmul": 0.1, "other": 0.1}
    assert t["top_other"] == [{"ms": 0.1, "count": 1, "name": "triton_poi_fused_add"}]
    assert kernel_timeline.summarize({"traceEvents": []}, bench_e2e.categorize) is None


def test_kernel_timeline_splits_the_step_at_its_profiler_ranges():
    """Kernels belong to the range whose host call launched them, also from another thread (the autograd
    engine's); windows tile the GPU time from the first phase's first kernel; host syncs are counted."""
    from tools import kernel_timeline

    def x(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}
    trace = {"traceEvents": [
        x("user_annotation", "fwd", 0, 100), x("user_annotation", "bwd", 100, 200),
        x("user_annotation", "opt", 300, 50), x("user_annotation", "fwd", 400, 10),  # a second micro batch
        x("cpu_op", "aten::mm", 10, 5),                                            # host op: no device time
        x("cuda_runtime", "cudaMemcpyAsync", -20, 2, correlation=9),               # outside every range
        x("cuda_runtime", "cudaLaunchKernel", 10, 2, correlation=1),
        x("cuda_runtime", "cudaLaunchKernel", 150, 2, tid=2, correlation=2),       # the autograd thread
        x("cuda_driver", "cuLaunchKernel", 310, 2, correlation=3),                 # a Triton launch
        x("cuda_runtime", "cudaStreamSynchronize", 320, 20),
        x("cuda_runtime", "cudaLaunchKernel", 401, 2, correlation=4),
        x("gpu_memcpy", "Memcpy HtoD", 0, 5, correlation=9),
        x("kernel", "sm90_gemm_bf16", 20, 60, correlation=1),                      # fwd 20-80, idle 80-120
        x("kernel", "cudnn_bwd", 120, 130, correlation=2),                         # bwd 120-250, idle 250-330
        x("kernel", "adamw", 330, 10, correlation=3),                              # opt 330-340, idle 340-405
        x("kernel", "sm90_gemm_bf16", 405, 5, correlation=4),                      # fwd again 405-410
        x("gpu_user_annotation", "bwd", 120, 10),                                  # covers only its own thread's
    ]}
    rows = {r["name"]: r for r in kernel_timeline.phases(trace, ["fwd", "bwd", "opt"])}
    assert list(rows) == ["fwd", "bwd", "opt", "outside"]
    ms = lambda us: us / 1e3  # noqa: E731
    assert rows["fwd"]["host_ms"] == ms(110) and rows["fwd"]["kernels_ms"] == ms(65)
    assert rows["fwd"]["gpu_window_ms"] == ms(100 + 5) and rows["fwd"]["gpu_busy_ms"] == ms(65)
    assert rows["fwd"]["gpu_idle_ms"] == ms(40)
    assert rows["bwd"]["gpu_window_ms"] == ms(210) and rows["bwd"]["gpu_busy_ms"] == ms(130)
    assert rows["bwd"]["gpu_annotation_ms"] == ms(10)
    assert rows["opt"]["gpu_window_ms"] == ms(75) and rows["opt"]["gpu_idle_ms"] == ms(65)
    assert (rows["opt"]["host_syncs"], rows["opt"]["host_sync_ms"]) == (1, ms(20))
    assert rows["fwd"]["host_syncs"] == rows["bwd"]["host_syncs"] == 0
    assert rows["outside"]["kernels_ms"] == ms(5) and rows["outside"]["gpu_window_ms"] == 0
    assert rows["fwd"]["top"] == [{"ms": ms(65), "name": "sm90_gemm_bf16"}]
    table = kernel_timeline.phase_table(list(rows.values()))
    assert len(table) == 2 + 4 and table[3].startswith("| bwd | 0.2 | 0.2 | 0.1 | 0.1 | 0.1 | 0 (0.0) | cudnn_bwd 0.1 |")


def test_bench_e2e_refuses_an_out_file_it_cannot_append_to(tmp_path):
    """One error line before any benchmark runs, and the user's file is left as it was."""
    import pathlib
    import subprocess
    import sys
    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_e2e.py"
    for content in ("", "{not json", '{"a": 1}'):
        out = tmp_path / "results.json"
        out.write_text(content)
        proc = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("bench_e2e: error: --out"), proc.stderr
        assert out.read_text() == content


@pytest.mark.parametrize("argv, message", [
    (["--seq-length", "1"], "error: --seq-length must be at least 2"),
    (["--mode", "ddp"], "argument --mode: invalid choice: 'ddp'"),
    (["--out", "{bad}"], "bench_torchtitan: error: --out"),
])
def test_torchtitan_peer_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    """The peer script (tools/peers; torchtitan is not installed here) says what is wrong before it imports
    torchtitan or touches a device."""
    import pathlib
    import subprocess
    import sys
    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "peers" / "bench_torchtitan.py"
    bad = tmp_path / "results.json"
    bad.write_text('{"a": 1}')
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    proc = subprocess.run([sys.executable, str(tool), "--device", "cpu", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert bad.read_text() == '{"a": 1}'


@pytest.mark.parametrize("argv, message", [
    (["--backends", "cudnn,foo"], "argument --backends: unknown foo"),
    (["--skip", "cpp"], "argument --skip: unknown cpp"),
    (["--seqs", "16k"], "argument --seqs: invalid int_list value: '16k'"),
])
def test_bench_attention_rejects_bad_lists_in_one_line(argv, message):
    import pathlib
    import subprocess
    import sys
    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_attention.py"
    proc = subprocess.run([sys.executable, str(tool), "--device", "cpu", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_bench_attention_never_overwrites_its_out_file(tmp_path):
    import pathlib
    import subprocess
    import sys
    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_attention.py"
    out = tmp_path / "attention.json"
    out.write_text('{"earlier": "results"}')
    proc = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"bench_attention: error: --out {out} already exists; choose another --out"
    assert out.read_text() == '{"earlier": "results"}'


def _bench_documents(rank, world, out_dir):
    from tools import bench_attention, bench_e2e
    common = ["--device", "cpu", "--warmup", "1", "--doc-len", "12"]
    attention = bench_attention.main([*common, "--seqs", "48", "--iters", "1", "--skip", "deepspeed,cp,single,ceilings",
                                      "--ulysses-head-groups", "1", "--out", f"{out_dir}/attention.json"])
    e2e = bench_e2e.main([*common, "--model", "tiny", "--seq-length", "48", "--backend", "torch", "--zero-stage", "1",
                          "--strategy", "ring", "--steps", "1", "--out", f"{out_dir}/e2e.json"])
    return attention["rows"], e2e


def test_benchmarks_pack_documents_with_doc_len(tmp_path):
    """--doc-len: the attention benchmark runs every strategy with the document mask beside the full causal run
    (rate by pairs inside documents: 48 tokens in 12-token documents are 1/4 of the full square), and bench_e2e
    trains on mock samples with an EOD every 12 tokens under --reset-attention-mask."""
    rows, e2e = run_ranks(2, _bench_documents, str(tmp_path), timeout=120)[0]
    by_name = {r["name"]: r for r in rows}
    for strategy in ("ulysses", "ring"):
        full, docs = by_name[f"ours {strategy}/torch"], by_name[f"ours {strategy}/torch docs"]
        assert docs["documents"] == 4 and docs["speedup"] == full["ms"] / docs["ms"]
        assert abs(docs["value"] * docs["ms"] * 4 - full["value"] * full["ms"]) < 1e-9 * full["value"] * full["ms"]
    assert e2e["documents_per_sample"] == 4 and e2e["doc_len"] == 12 and e2e["tokens_per_s"] > 0
    # attention inside documents only: s = 48 in 2hs becomes sum(L^2)/s = 4 * 12^2 / 48 = 12
    L, h, f, attended, V = 2, 64, 176, 12, 256
    assert e2e["flops_per_token"] == 3 * (L * (8 * h * h + 6 * h * f + 2 * h * attended) + 2 * h * V)


def test_packed_mock_samples_end_each_document_with_one_eod():
    import numpy as np
    from tools.bench_e2e import PackedMock
    from tools.doc_lengths import document_lengths
    eod = 7
    mock = [{"text": np.full(21, eod, dtype=np.int64)}]  # every token an eod: only the placed ones stay
    text = PackedMock(mock, document_lengths(6, 20), eod)[0]["text"]
    assert np.flatnonzero(text == eod).tolist() == [5, 11, 17, 19]
    assert document_lengths(6, 20) == [6, 6, 6, 2] and (mock[0]["text"] == eod).all()  # the dataset is untouched


def test_bench_adamw_runs_both_steps_and_the_sweep_on_cpu(tmp_path, monkeypatch):
    """--device cpu (Triton's interpreter): both ways and every tiling run, one JSON line is appended, and the
    kernel's default tiling is left as it was."""
    from megatron_sp.kernels import adamw
    from tools import bench_adamw
    default = (adamw.BLOCK, adamw.NUM_WARPS)
    out = tmp_path / "adamw.json"
    result = bench_adamw.main(["--device", "cpu", "--numel", "3000", "--warmup", "0", "--reps", "1", "--sweep",
                               "--out", str(out)])
    assert result["deepspeed"]["ms"] > 0 and result["ours"]["ms"] > 0 and len(result["sweep"]) == 12
    assert json.loads(out.read_text())["numel"] == 3000
    assert (adamw.BLOCK, adamw.NUM_WARPS) == default
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="set TRITON_INTERPRET=1"):
        bench_adamw.main(["--device", "cpu"])
