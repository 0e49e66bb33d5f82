"""
Muon (Jordan et al. 2024; used by nanochat and by the FLT paper's training): for each
weight matrix, the update is the momentum of its gradient made (nearly) orthogonal, i.e.
G = U S V^T is replaced by about U V^T, computed with a few Newton-Schulz iterations
instead of an SVD. Every direction of the matrix then moves by the same amount, whatever
the gradient's spectrum. Embeddings, the head and vectors are not hidden-layer matrices:
they keep AdamW, in the same optimizer object (one state dict for checkpoints).

DDP: DDP averages the gradients before step(), and this update is a deterministic
function of the gradient and the optimizer state, so every rank computes the same update
(the orthogonalisation is repeated on each rank rather than sharded, as nanochat does:
simpler, and the cost is small next to a forward and backward pass).
"""

import torch

# the quintic's coefficients from Muon: they push every singular value of the normalised
# matrix into about [0.7, 1.2] in 5 steps (fast, not exactly 1: Muon does not need exact)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5):
    """About U V^T for G = U S V^T (2-D), by the quintic Newton-Schulz iteration
    X <- a X + (b A + c A^2) X, A = X X^T, from X = G / ||G||_F (so that ||X||_2 <= 1)."""
    a, b, c = NS_COEFFS
    # bf16 on GPU (as Muon does: fast and good enough); fp32 on CPU, where bf16 is slow
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the short side: A is min(rows, cols) square
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


def muon_momentum(step, warmup, start=0.85, end=0.95):
    """Muon's momentum at `step`: linear from `start` to `end` over `warmup` steps, then
    `end` (FLT's and nanochat's schedule, warmup 300); warmup 0 = `end` throughout."""
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return (1 - frac) * start + frac * end


class MuonAdamW(torch.optim.Optimizer):
    """
    One optimizer, two rules. Groups with use_muon=True: SGD momentum (Nesterov), the
    momentum orthogonalised, scaled by sqrt(max(1, rows / cols)) so a tall matrix's
    update has the RMS of a square one's, decoupled weight decay. Other groups: AdamW.
    """

    def __init__(self, groups, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_steps=5):
        super().__init__(groups, dict(lr=0.0, weight_decay=0.0, use_muon=False, betas=betas, eps=eps,
                                      momentum=momentum, ns_steps=ns_steps))
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * wd)  # decoupled weight decay, as in AdamW
                if group["use_muon"]:
                    if not state:
                        state["momentum"] = torch.zeros_like(p)
                    # buf <- mu buf + g, update from g + mu buf. FLT's (nanochat's) Muon keeps
                    # an EMA instead: buf <- lerp(buf, g, 1 - mu), update from lerp(g, buf, mu).
                    # With mu constant, theirs is (1 - mu) times ours at every step, and
                    # Newton-Schulz first divides by the norm: the same orthogonalised update.
                    # (While mu warms up the two differ slightly in how past steps are weighted.)
                    buf, mu = state["momentum"], group["momentum"]
                    buf.mul_(mu).add_(p.grad)
                    update = orthogonalize(p.grad.add(buf, alpha=mu), group["ns_steps"])  # Nesterov
                    p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                    continue
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                beta1, beta2 = group["betas"]
                state["step"] += 1
                t = state["step"].item()
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
