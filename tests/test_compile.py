"""torch.compile of the blocks (train.py's compile=True): a new loop budget M must not
compile anything new, and the compiled model computes what the eager one does."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loopgpt import LoopGPT, LoopGPTConfig, compile_blocks  # noqa: E402


def test_budgets_reuse_the_compiled_blocks():
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=64, block_size=16, n_embd=32, n_head=2, n_loops=3, injection="add")
    eager = LoopGPT(cfg)
    model = LoopGPT(cfg)
    model.load_state_dict(eager.state_dict())
    compile_blocks(model, backend="eager")  # dynamo's graph capture and guards, without a C++ build
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    graphs = []
    for M in (1, 2, 3, 5, 8, 2):
        _, loss = model(x, y, loops=M)
        loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(loss, eager(x, y, loops=M)[1])
    assert graphs[0] > 0 and len(set(graphs)) == 1, graphs  # every M after the first: nothing new


def test_the_blocks_of_a_stack_share_one_compiled_graph():
    # a plain 12-block stack (the GPU check's same-FLOPs baseline is 72 blocks): each block is
    # compiled on its own, but all of them reuse one graph instead of compiling 12
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    dynamo.reset()
    counters.clear()
    cfg = LoopGPTConfig(vocab_size=64, block_size=16, n_embd=32, n_head=2, n_prelude=0, n_core=12, n_coda=0,
                        n_loops=1)
    model = compile_blocks(LoopGPT(cfg), backend="eager")
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    assert counters["stats"]["unique_graphs"] == 1


def test_the_whole_step_compiled_equals_eager():
    # compile_scope=step: train.py's Objective (the loop unrolled, the loss) as one graph.
    # aot_eager traces forward and backward as inductor would, without a C++ build; train.py's
    # own path through inductor was checked by hand (the same losses to the printed digits)
    import torch._dynamo as dynamo
    from train import Objective
    dynamo.reset()
    torch.manual_seed(0)
    cfg = LoopGPTConfig(vocab_size=64, block_size=16, n_embd=32, n_head=2, n_loops=3, injection="full_attn")
    eager, model = LoopGPT(cfg), LoopGPT(cfg)
    model.load_state_dict(eager.state_dict())
    step = torch.compile(Objective(model), dynamic=False, backend="aot_eager")
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for M in (3, 2):  # a new budget compiles again and is still right
        loss, want = step(x, y, loops=M), Objective(eager)(x, y, loops=M)
        loss.backward()
        want.backward()
        torch.testing.assert_close(loss, want)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
