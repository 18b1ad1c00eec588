"""validate_attention_config: every impossible attention setup is one readable line; build picks the module."""
import pytest

from megatron_sp.attention import (HybridAttention, LocalAttention, RingAttention, UlyssesAttention,
                                   build_inner_attention, validate_attention_config)
from megatron_sp.parallel.state import ParallelState
from tests.distributed import run_ranks

GOOD = dict(strategy="ulysses", num_heads=16, num_kv_heads=4, sp_size=4, ulysses_degree=None,
            seq_length=1024, world_size=8)


@pytest.mark.parametrize("changes", [
    {},
    dict(strategy="ring", num_heads=6, num_kv_heads=1, seq_length=8 * 3),
    dict(strategy="hybrid", ulysses_degree=2, num_heads=6, num_kv_heads=2, seq_length=8),
    dict(num_kv_heads=2),                                  # kv heads < P: replicated
    dict(strategy="local", sp_size=1, seq_length=7),
    dict(strategy="ulysses", sp_size=1, num_heads=3, num_kv_heads=3, seq_length=5),
])
def test_good_configs_pass(changes):
    validate_attention_config(**{**GOOD, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=6, num_kv_heads=2), "heads 6 are not divisible by the Ulysses degree 4"),
    (dict(num_heads=12, num_kv_heads=6), "key/value heads 6"),
    (dict(num_heads=10, num_kv_heads=4), "not a multiple of key/value heads"),
    (dict(seq_length=1022), "sequence length 1022 must be divisible by 4"),
    (dict(strategy="ring", seq_length=1020), "divisible by 8"),             # zigzag: 2P chunks
    (dict(strategy="hybrid", ulysses_degree=2, seq_length=6), "divisible by 8"),
    (dict(sp_size=16), "sequence-parallel size 16 must be between 1 and the world size 8"),
    (dict(world_size=6, sp_size=4), "world size 6 is not divisible"),
    (dict(strategy="hybrid", ulysses_degree=3), "Ulysses degree 3 must be a positive divisor"),
    (dict(strategy="hybrid", ulysses_degree=None), "hybrid needs --ulysses-degree"),
    (dict(strategy="local"), "strategy 'local' cannot split"),
    (dict(strategy="megatron"), "unknown sequence-parallel strategy 'megatron'"),
])
def test_bad_configs_raise_one_line(changes, message):
    with pytest.raises(ValueError) as err:
        validate_attention_config(**{**GOOD, **changes})
    assert message in str(err.value) and "\n" not in str(err.value)


def built_types(rank, world):
    out = {}
    for strategy, u in (("ulysses", 4), ("ring", 1), ("hybrid", 2)):
        state = ParallelState.build(sp_size=world, ulysses_degree=u)
        out[strategy] = type(build_inner_attention(strategy, state, backend="torch")).__name__
    out["single"] = type(build_inner_attention("ring", ParallelState.build(sp_size=1))).__name__
    return out


def test_build_inner_attention():
    assert isinstance(build_inner_attention("local"), LocalAttention)
    assert isinstance(build_inner_attention("ring", None), LocalAttention)
    with pytest.raises(ValueError, match="unknown"):
        build_inner_attention("zigzag")
    got = run_ranks(4, built_types)[0]
    assert got == {"ulysses": UlyssesAttention.__name__, "ring": RingAttention.__name__,
                   "hybrid": HybridAttention.__name__, "single": LocalAttention.__name__}
