"""What XLA says about a compiled program (FLOPs, planned per-device memory), how long compiling took, and where
compiled programs are kept between runs."""

from __future__ import annotations

import os

import jax


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


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling, summed from its monitoring events, so a
    round's time can be reported without its compilation (`take()` returns and resets the sum)."""

    def __init__(self):
        self.seconds = 0.0
        self.total = 0.0  # since the process started (never reset)
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.total += duration

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


_CLOCK: CompileClock | None = None


def use_compilation_cache(directory: str) -> None:
    """Keep XLA's compiled programs in `directory` (JAX's persistent compilation cache), so that a run repeating an
    earlier run's programs (a second run of a config, a study's next seed) loads them instead of compiling them.
    Every program is kept, however quick its compilation: the small ones add up."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def use_compilation_cache_of(config) -> None:
    """The compilation cache every process of a run shares (the simulation, the split-step server, each client's
    process or Flower ClientApp): beside the config's pretrained backbones' cache, so that a second run of a config
    compiles nothing, and a ClientApp, which Flower starts afresh for each message, compiles its step once."""
    use_compilation_cache(os.path.join(os.path.dirname(os.path.expanduser(config.pretrain.cache_dir)), "xla"))


def compile_clock() -> CompileClock:
    """The process's one clock (JAX listeners cannot be removed, so it is registered once)."""
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = CompileClock()
    return _CLOCK
