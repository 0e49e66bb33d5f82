"""loopgpt.py reads core first: a plain looped model's forward, backward and cached decoding run
only Part 1 of the file; the papers' extensions (Part 2) and the appendix run only for the models
and the training that use them."""

import importlib
import os
import sys
from dataclasses import fields

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import loopgpt  # noqa: E402
from loopgpt import LoopGPT, LoopGPTConfig  # noqa: E402


def part_two_line():
    lines = open(loopgpt.__file__).read().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if line.startswith("# Part 2"))


def lines_run(name):
    """The lines of loopgpt.py that a forward + backward, a cached prefill and decode and a
    generate run, for configs/NAME.py's model (at a small vocabulary and context)."""
    module = importlib.import_module(f"configs.{name}")
    keys = {f.name for f in fields(LoopGPTConfig)}
    model_keys = {k: getattr(module, k) for k in dir(module) if k in keys}
    torch.manual_seed(0)
    model = LoopGPT(LoopGPTConfig(**{**model_keys, "vocab_size": 64, "block_size": 16}))
    idx = torch.randint(0, 64, (2, 8))
    run = set()

    def trace(frame, event, arg):
        if frame.f_code.co_filename != loopgpt.__file__:
            return None
        if event == "line":
            run.add(frame.f_lineno)
        return trace
    sys.settrace(trace)
    try:
        model(idx, idx)[1].backward()
        model.eval()
        cache = model.new_cache(model.config.n_loops)
        with torch.no_grad():
            model(idx[:, :4], cache=cache)
            model(idx[:, 4:5], cache=cache)
        model.generate(idx[:, :3], 3, temperature=0)
    finally:
        sys.settrace(None)
    return run


@pytest.mark.parametrize("name", ["tiny", "lti_tiny", "flt_tiny", "base_loop_3x8_tiny", "loopformer_3x8_tiny"])
def test_a_plain_looped_model_runs_only_part_one(name):
    start = part_two_line()
    run = lines_run(name)
    assert len(run) > 100  # the trace saw the model
    assert sorted(line for line in run if line >= start) == []


@pytest.mark.parametrize("name", ["mor_tiny", "relaxed_tiny", "loopus_tiny"])
def test_an_extension_runs_its_section(name):
    assert any(line >= part_two_line() for line in lines_run(name))  # (so the test above has teeth)
