"""The public surface is curated, and ``import noisescale`` loads only torch and the standard library."""

import json
import subprocess
import sys

import noisescale as ns

EXPECTED_ALL = {
    "ConfigError",
    "GNSMonitor",
    "LayerMeasurement",
    "Measurement",
    "NoiseScaleError",
    "Run",
    "SharedParameterError",
    "StepError",
    "StoreError",
    "TwoBatchEstimate",
    "UnsupportedLayerError",
    "__version__",
    "alerts",
    "list_runs",
    "open_run",
    "plan",
    "register_norm_rule",
    "sinks",
    "two_batch_estimate",
}


def test_all_is_pinned():
    assert set(ns.__all__) == EXPECTED_ALL
    for name in ns.__all__:
        assert hasattr(ns, name), name


PROBE = r"""
import json, sys
import torch, torch.nn
before = set(sys.modules)
watched = [
    (torch.nn.Module, "__call__"),
    (torch.nn.Linear, "forward"),
    (torch.Tensor, "backward"),
    (torch.Tensor, "register_hook"),
    (torch.autograd, "backward"),
]
originals = [getattr(owner, name) for owner, name in watched]
import noisescale
new = sorted(set(sys.modules) - before)
changed = [name for (owner, name), v in zip(watched, originals) if getattr(owner, name) is not v]
print(json.dumps({"new": new, "changed": changed}))
"""


def test_import_loads_only_torch_and_the_standard_library_and_patches_nothing():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    foreign = [
        m
        for m in result["new"]
        if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] not in ("noisescale", "torch")
    ]
    assert foreign == [], foreign
    assert result["changed"] == []
    assert "noisescale.store" not in result["new"]  # exported lazily
    assert "noisescale.alerts" not in result["new"] and "noisescale.sinks" not in result["new"]
    assert "sqlite3" not in result["new"]


def test_plan_is_the_function_and_its_package_imports_every_way():
    # ``ns.plan`` is the function; its package is ``noisescale.planning``, so neither shadows the other.
    import noisescale.planning.schedules as schedules
    from noisescale.planning import Fixed, planner

    assert ns.plan is planner.plan and callable(ns.plan)
    assert schedules.Fixed is Fixed and Fixed(8).batch_size == 8
