"""parallel/op_profile.py: each op's own time (nested events subtracted), summed by the kind its name says, from a
real jax.profiler trace."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from fednano_jax.parallel import op_profile


@dataclasses.dataclass
class Event:
    name: str
    start_ns: int
    end_ns: int


@dataclasses.dataclass
class Line:
    events: list


def test_an_ops_own_time_leaves_out_the_events_nested_in_it():
    line = Line([Event("while.3", 0, 100), Event("ynn_fusion.2", 10, 40), Event("copy_fusion", 50, 60),
                 Event("add_fusion", 120, 125)])
    assert op_profile.self_times([line]) == {"while.3": 60, "ynn_fusion.2": 30, "copy_fusion": 10, "add_fusion": 5}


@pytest.mark.parametrize("name, kind", [
    ("ynn_fusion.18", "matmul"), ("dot.352", "matmul"), ("cutlass_gemm_fusion.1", "matmul"),
    ("copy_bitcast_fusion.5", "layout copy"), ("transpose_copy_fusion.6", "layout copy"),
    ("bitcast_dynamic-update-slice_fusion.1", "slice and update"), ("wrapped_broadcast.22", "broadcast"),
    ("add_divide_fusion", "elementwise"), ("wrapped_exponential", "elementwise"), ("while.160", "control flow"),
    ("ThunkExecutor::Execute", "executor"),
])
def test_an_ops_kind_is_read_from_its_name(name, kind):
    assert op_profile.kind_of(name) == kind


def test_a_traced_program_spends_its_time_in_its_matmuls(tmp_path):
    """Large matmuls and one elementwise op: the matmuls' share dominates, the shares sum to one, and the trace is
    kept where asked."""
    a = jnp.ones((512, 512))
    program = jax.jit(lambda a: jnp.tanh(a @ a @ a @ a))
    jax.block_until_ready(program(a))
    report = op_profile.profile(lambda: program(a), runs=3, directory=str(tmp_path))
    shares = {kind: v["share"] for kind, v in report["by_kind"].items()}
    assert shares["matmul"] > 0.5 and sum(shares.values()) == pytest.approx(1.0)
    assert report["busy_seconds_per_run"] > 0 and report["top_ops"][0]["kind"] == "matmul"
    assert list(tmp_path.rglob("*.xplane.pb"))
    assert "| matmul |" in op_profile.profile_table(report)
