"""--sequence-parallel-size auto: every valid (SP size, strategy) scored by memory and a simple time model.

Time per iteration per GPU = compute + the SP communication that is not hidden:
  compute   FLOPs of the GPU's tokens (megatron_sp/flops.py, recompute included) at ACHIEVED_FLOPS; it is
            the same for every P (DP x SP = world, the global batch is fixed), so P is decided by
            communication and memory.
  Ulysses   all-to-all bytes of docs/attention.md, never overlapped.
  ring      p2p bytes of docs/attention.md, overlapped with the attention of the block in hand: only
            max(0, transfer - attention) is exposed.
  hybrid    its Ulysses part exposed, its ring part overlapped.
Bandwidths (measured on H200 NVLink, docs/reference_numbers.md): all-to-all 240 GB/s, p2p 260 GB/s inside a node; a group that
spans nodes runs at the inter-node rate, INTER_NODE_BW.
The smallest P that fits wins unless a larger one is more than 3 % faster.
"""
from dataclasses import dataclass

from megatron_sp.attention import validate_attention_config
from megatron_sp.config import RunConfig
from megatron_sp.plan.activations import kv_heads_seen
from megatron_sp.parallel.pipeline import bubble_fraction
from megatron_sp.plan.fit import HOST_RESERVE, MEMORY_RESERVE, estimate_for, fits
from megatron_sp.plan.memory import GIB, MemoryEstimate, ZeroSetup
from megatron_sp.flops import attention_fwd_flops, flops_per_token

A2A_BW, P2P_BW, INTER_NODE_BW = 240e9, 260e9, 25e9  # bytes/s out per GPU
ACHIEVED_FLOPS = 400e12  # model FLOP/s per GPU a good run reaches (DeepSpeed ALST's 336-401 on H200, docs/reference_numbers.md)
FASTER_BY = 0.97  # a larger P must be > 3 % faster to beat the smallest one that fits


@dataclass
class Candidate:
    sp: int
    strategy: str  # local | ulysses | ring | hybrid
    ulysses_degree: int | None
    memory: MemoryEstimate
    comm_bytes: float  # SP bytes sent per GPU per iteration
    seconds: float  # modelled iteration time
    fits: bool

    @property
    def name(self) -> str:
        if self.strategy == "hybrid":
            return f"SP {self.sp} hybrid (ulysses {self.ulysses_degree} x ring {self.sp // self.ulysses_degree})"
        return f"SP {self.sp} {self.strategy}"


def sp_comm_per_layer(cfg: RunConfig, sp: int, strategy: str, u: int | None, elem: int) -> dict[str, float]:
    """Bytes one GPU sends per layer per micro batch: {'a2a_fwd', 'a2a_bwd', 'p2p_fwd', 'p2p_bwd'}."""
    m, d = cfg.model, cfg.head_dim
    tokens = cfg.training.micro_batch_size * m.seq_length  # b * s
    hq, hkv = m.num_attention_heads, m.num_key_value_heads
    out = dict(a2a_fwd=0.0, a2a_bwd=0.0, p2p_fwd=0.0, p2p_bwd=0.0)
    if strategy in ("ulysses", "hybrid"):
        g = sp if strategy == "ulysses" else u  # q, k, v in; out back (bwd: dout in; dq, dk, dv back)
        out["a2a_fwd"] = out["a2a_bwd"] = (g - 1) / g * tokens / sp * d * (2 * hq + 2 * kv_heads_seen(hq, hkv, g)) * elem
    if strategy in ("ring", "hybrid"):
        r = sp if strategy == "ring" else sp // u
        kv = hkv if strategy == "ring" else kv_heads_seen(hq, hkv, u) / u  # kv heads in each ring block
        kv_elems = (r - 1) * 2 * tokens / r * kv * d  # k and v, r - 1 hops, [s/r] blocks
        out["p2p_fwd"], out["p2p_bwd"] = kv_elems * elem, kv_elems * (elem + 4)  # + fp32 dk, dv
    return out


def iteration_seconds(cfg: RunConfig, world: int, sp: int, strategy: str, u: int | None,
                      gpus_per_node: int, global_batch: int) -> tuple[float, float]:
    """(modelled seconds per iteration per GPU, SP bytes sent per GPU per iteration). With a pipeline every
    stage runs PP times as many micro batches through 1/PP of the layers (the same work per GPU) and the
    step takes 1 / (1 - bubble) as long."""
    m, t = cfg.model, cfg.training
    elem, pp = cfg.elem_bytes, cfg.parallel.pipeline_model_parallel_size
    stage_micro_batches = global_batch * sp * pp // (t.micro_batch_size * world)  # each stage's m per iteration
    micro_batches = stage_micro_batches / pp  # through all layers, per GPU
    stretch = 1 / (1 - bubble_fraction(pp, stage_micro_batches))
    compute = flops_per_token(cfg, True) * global_batch * m.seq_length / world / ACHIEVED_FLOPS
    if sp == 1:
        return stretch * compute, 0.0
    c = sp_comm_per_layer(cfg, sp, strategy, u, elem)
    recompute = 2 if m.checkpoint_activations else 1  # the forward's communication runs again
    crosses = sp > gpus_per_node  # ranks of an SP group are adjacent: it spans nodes iff P > node size
    a2a_bw = INTER_NODE_BW if (strategy == "ulysses" and crosses) else A2A_BW
    p2p_bw = INTER_NODE_BW if crosses else P2P_BW
    # causal attention of one micro batch's local queries, per layer (forward; backward ~2x)
    attention_fwd = attention_fwd_flops(t.micro_batch_size, m.num_attention_heads, m.seq_length, cfg.head_dim,
                                        causal=True) / sp / ACHIEVED_FLOPS
    exposed = ((recompute * c["a2a_fwd"] + c["a2a_bwd"]) / a2a_bw
               + recompute * max(0.0, c["p2p_fwd"] / p2p_bw - attention_fwd)
               + max(0.0, c["p2p_bwd"] / p2p_bw - 2 * attention_fwd))
    sent = (recompute * (c["a2a_fwd"] + c["p2p_fwd"]) + c["a2a_bwd"] + c["p2p_bwd"]) * m.num_layers * micro_batches
    return stretch * (compute + exposed * m.num_layers * micro_batches), sent


def candidates(cfg: RunConfig, world: int, gpus_per_node: int, zero: ZeroSetup, gpu_gib: float,
               host_gib: float) -> list[Candidate]:
    """Every (P, strategy, Ulysses degree) the flags allow, with its memory and modelled time."""
    m, t = cfg.model, cfg.training
    stage_ranks = world // cfg.parallel.pipeline_model_parallel_size  # SP and DP split each pipeline stage
    found = []
    for sp in (p for p in range(1, stage_ranks + 1) if stage_ranks % p == 0):
        # unset global batch (micro x DP) grows with DP: time every P at the P = 1 batch instead
        gb = t.global_batch_size or t.micro_batch_size * stage_ranks
        if gb % (t.micro_batch_size * stage_ranks // sp):
            continue
        options = [("local", None)] if sp == 1 else [("ulysses", None), ("ring", None)] + [
            ("hybrid", u) for u in range(2, min(sp, gpus_per_node + 1)) if sp % u == 0]
        for strategy, u in options:
            try:
                validate_attention_config(strategy=strategy, num_heads=m.num_attention_heads,
                                          num_kv_heads=m.num_key_value_heads, sp_size=sp, ulysses_degree=u,
                                          seq_length=m.seq_length, world_size=stage_ranks)
            except ValueError:
                continue
            memory = estimate_for(cfg, world, sp, strategy, u, zero, gpu_gib)
            seconds, sent = iteration_seconds(cfg, world, sp, strategy, u, gpus_per_node, gb)
            found.append(Candidate(sp, strategy, u, memory, sent, seconds, fits(memory, gpu_gib, host_gib)))
    return found


def choose(cands: list[Candidate]) -> tuple[Candidate, str]:
    """The pick and one sentence why (smallest P that fits, unless a larger P is > 3 % faster)."""
    if not cands:
        raise ValueError("no sequence-parallel size divides the world and satisfies the head, sequence "
                         "and batch constraints; give --sequence-parallel-size explicitly")
    fitting = [c for c in cands if c.fits]
    if not fitting:
        best = min(cands, key=lambda c: c.memory.total)
        return best, (f"nothing fits in {MEMORY_RESERVE:.0%} of GPU memory ({HOST_RESERVE:.0%} of host memory); "
                      f"{best.name} needs the least ({best.memory.total / GIB:.1f} GiB): expect out-of-memory")
    smallest = min(c.sp for c in fitting)
    at_smallest = [c for c in fitting if c.sp == smallest]  # listed ulysses, ring, hybrid: ulysses first
    base = min(at_smallest, key=lambda c: c.seconds)
    if at_smallest[0].seconds * FASTER_BY <= base.seconds:  # within 3 %: keep the simplest strategy
        base = at_smallest[0]
    fastest = min(fitting, key=lambda c: (c.seconds, c.sp))
    if fastest.sp != smallest and fastest.seconds < FASTER_BY * base.seconds:
        return fastest, (f"{fastest.name} fits and is modelled {base.seconds / fastest.seconds:.2f}x faster "
                         f"than {base.name}, the smallest SP size that fits")
    why = f"{base.name} is the smallest SP size that fits ({base.memory.total / GIB:.1f} GiB)"
    if smallest > 1:
        why += "; smaller SP sizes do not fit or break a head/sequence/batch constraint"
    if fastest is not base and fastest.sp != smallest:
        why += f"; {fastest.name} would be at most {(1 - fastest.seconds / base.seconds):.0%} faster"
    return base, why
