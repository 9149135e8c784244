"""Training parity with x-transformers 2.0.1: the same model, batches and optimizer give the same loss curve.

Each fixture in tests/fixtures/training was made by scripts/make_training_fixtures.py with the PyPI release: a config,
the release's initial state dict and the losses of 30 Adam steps on fixed batches (fp32). Here our package builds the
same model, loads that state dict with strict=True and runs the same steps. For the curves to stay together every
forward, loss and gradient has to match step after step (a gradient off by a scale would show within a few steps).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "training"
NAMES = sorted(path.stem for path in FIXTURES.glob("*.pt"))


def load_fixture_script():
    """`build` / `train` come from the script that made the fixtures, so both sides run exactly the same loop."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "make_training_fixtures.py"
    module_spec = importlib.util.spec_from_file_location("make_training_fixtures", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


script = load_fixture_script()


def test_fixtures_present():
    assert set(NAMES) == set(script.CONFIGS), "rebuild with scripts/make_training_fixtures.py"


@pytest.mark.parametrize("name", NAMES)
def test_same_loss_curve_as_the_release(name):
    fixture = torch.load(FIXTURES / f"{name}.pt", weights_only=False)
    assert fixture["config"] == script.CONFIGS[name], "the config changed since the fixture was made: rebuild it"
    torch.manual_seed(fixture["seed"])
    model = script.build(fixture["config"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    losses = script.train(model, fixture["config"], fixture["seed"])
    expected = fixture["losses"]
    assert losses[-1] < losses[0] - 0.05, "the run should learn something, else the comparison says little"
    for step, (ours, theirs) in enumerate(zip(losses, expected), 1):
        assert ours == pytest.approx(theirs, rel=2e-5, abs=2e-5), f"step {step}: ours {ours:.6f}, release {theirs:.6f}"
