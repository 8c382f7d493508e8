"""What XLA says about a compiled program: FLOPs and planned per-device memory."""

from __future__ import annotations


def flops_of(compiled) -> float | None:
    """FLOPs of one execution by XLA's cost analysis (a while loop's body counts once, not per trip)."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def memory_of(compiled) -> dict:
    """Per-device bytes XLA planned for the compiled program."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes",
              "alias_size_in_bytes")
    return {name: int(getattr(stats, name)) for name in fields if hasattr(stats, name)}


def planned_total(memory: dict) -> int:
    """Arguments + outputs + temporaries + code, less what outputs alias (donated) arguments."""
    return sum(v for k, v in memory.items() if k != "alias_size_in_bytes") - memory.get("alias_size_in_bytes", 0)


def device_summary() -> dict:
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}


def write_json(path: str | None, report: dict) -> None:
    """A measurement report as JSON at `path` (nothing without a path)."""
    import json
    import os

    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"Written to {path}")
