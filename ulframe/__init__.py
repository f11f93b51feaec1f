"""ulframe: a declarative, plugin-based framework for training Unified Latents."""

import os

# torch's CPU threads (GNU OpenMP) spin while they wait for work by default. On a CPU shared with
# other processes that spinning starves everyone: measured on 2 cores with other training jobs
# running, a conv + linear step ran at 3.7-6.4 steps/s on 2 threads spinning, 56 passive, 22 on
# one thread. On a quiet machine passive waiting cost 22% (105 vs 135 steps/s): export
# OMP_WAIT_POLICY=ACTIVE there. Set before torch is first imported
# (an `OMP_WAIT_POLICY` the user exports wins); see docs/benchmarks.md, "CPU threads".
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str) -> object:
    """`ulframe.load` (a trained model's exported folder, `ulframe.formats.load`), imported
    on first use so that `import ulframe` stays cheap (PEP 562)."""
    if name == "load":
        import importlib

        return importlib.import_module(f"{__name__}.formats").load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
