"""The framework-independent parts of the integrations: versions, missing frameworks, checkpoint JSON, counting."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

import noisescale as ns
from noisescale.errors import ConfigError
from noisescale.integrations._checkpoint import bundle, from_json, restore, to_json
from noisescale.integrations._examples import count_examples, first_tensor_rows
from noisescale.integrations._versions import FrameworkVersionError, Supported, parse_version

SUPPORTED = Supported("lightning", (2, 2), (3,), "lightning", "the callback")


@pytest.mark.parametrize(
    "text, release",
    [("2.6.0", (2, 6, 0)), ("4.57.1+cpu", (4, 57, 1)), ("2.6.0rc1", (2, 6, 0)), ("v1.2", (1, 2)), ("3", (3,))],
)
def test_parse_version(text, release):
    assert parse_version(text) == release


@pytest.mark.parametrize("version", ["2.2", "2.2.0", "2.6.6", "2.99.1.dev3"])
def test_versions_in_the_range_pass(version):
    SUPPORTED.check(version)


@pytest.mark.parametrize("version", ["2.1.9", "1.9.5", "3.0.0", "3.0.0rc1", "garbage"])
def test_versions_outside_the_range_say_what_to_install(version):
    with pytest.raises(FrameworkVersionError, match=r"supports lightning>=2\.2,<3.*pip install 'lightning>=2\.2,<3'"):
        SUPPORTED.check(version)


def test_importing_the_package_imports_no_framework():
    import noisescale.integrations  # noqa: F401

    # the frameworks may already be loaded by other tests; the package itself must not name any of them
    source = importlib.util.find_spec("noisescale.integrations").origin  # type: ignore[union-attr]
    text = open(source).read()
    assert "import lightning" not in text and "import transformers" not in text and "import accelerate" not in text


@pytest.mark.parametrize(
    "module, blocked, extra",
    [
        ("noisescale.integrations.lightning", ("lightning", "lightning.pytorch"), "lightning"),
        ("noisescale.integrations.huggingface", ("transformers", "transformers.trainer_callback"), "hf"),
        ("noisescale.integrations.accelerate", ("accelerate",), "accelerate"),
    ],
)
def test_a_missing_framework_names_its_extra(monkeypatch, module, blocked, extra):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # import now fails as if it were not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'noisescale\[{extra}\]'"):
        importlib.import_module(module)


def _trained_monitor(sinks=()) -> ns.GNSMonitor:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    monitor = ns.GNSMonitor(net, source="example", sinks=list(sinks))
    for _ in range(3):
        x = torch.randn(8, 3)
        net(x).square().mean().backward()
        monitor.step(batch_size=8)
        net.zero_grad()
    return monitor


def test_checkpoint_bundle_survives_json_exactly():
    rules = ns.alerts.default_rules(channels=[])
    monitor = _trained_monitor([rules])
    state = bundle(monitor, [rules])
    back = from_json(json.loads(json.dumps(to_json(state))))
    assert back["monitor"]["step_count"] == 3 and back["monitor"]["row_names"] == state["monitor"]["row_names"]
    for key in ("sums", "n"):
        assert torch.equal(back["monitor"]["ema"][key], state["monitor"]["ema"][key])  # bit for bit
        assert back["monitor"]["ema"][key].dtype == torch.float64
    monitor.close()

    rules2 = ns.alerts.default_rules(channels=[])
    fresh = _trained_monitor([rules2])
    restore(fresh, [rules2], back)
    assert fresh.state_dict()["examples"] == 24
    assert rules2.state_dict()["history"] == rules.state_dict()["history"]
    fresh.close()


def test_restore_refuses_other_sinks():
    rules = ns.alerts.default_rules(channels=[])
    monitor = _trained_monitor([rules])
    state = bundle(monitor, [rules])
    monitor.close()
    other = _trained_monitor()
    with pytest.raises(ConfigError, match="no state for sink 0"):
        restore(other, [ns.alerts.default_rules(channels=[])], {**state, "sinks": [None]})
    with pytest.raises(ConfigError, match="version"):
        restore(other, [], {"version": 99})
    other.close()


def test_to_json_refuses_what_json_cannot_hold():
    with pytest.raises(ConfigError, match=r"state\.a\[1\]"):
        to_json({"a": [1, object()]})


def test_counting_examples():
    x = torch.zeros(5, 3)
    assert first_tensor_rows((x, torch.zeros(5))) == 5
    assert first_tensor_rows({"ids": [torch.zeros(()), torch.zeros(7, 2)]}) == 7  # a 0-d tensor counts nothing
    assert first_tensor_rows({"meta": "text"}) is None
    assert count_examples([x], None) == 5
    assert count_examples([x], lambda b: 2) == 2
    with pytest.raises(ConfigError, match="batch_size_fn"):
        count_examples({"meta": "text"}, None)
    with pytest.raises(ConfigError, match="positive int"):
        count_examples([x], lambda b: 0)
