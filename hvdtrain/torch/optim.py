"""Large-batch optimizers, PyTorch side: LARS (You et al. 2017) and LAMB (You et al. 2019).

Both scale each weight tensor's step by a layer-wise trust ratio ||w|| / ||update||, so that one learning
rate suits layers whose weights and gradients differ by orders of magnitude: what large global batches
(many Horovod ranks) need. Tensors with ndim <= 1 (biases, norm scales and shifts) are excluded, as in the
reference implementations: no trust ratio and no weight decay; LARS gives them momentum SGD, LAMB Adam.

A trust ratio whose numerator or denominator norm is 0 is 1, so a step on zero gradients (Horovod's
`broadcast_optimizer_state` takes one to create a fresh optimizer's state) produces no NaN.

The state lives in `self.state[p]` (LARS: `momentum_buffer`; LAMB: `step`, `exp_avg`, `exp_avg_sq`), so
`state_dict()`/`load_state_dict()` and Horovod's broadcast carry all of it. Every argument has a default
because Horovod's DistributedOptimizer re-creates the class from its param groups alone.
hvdtrain/tf/optim.py implements the same rules for tf-keras; tests/test_optim.py checks them against the
formulas and against each other.
"""
from __future__ import annotations

import torch


def _adapted(p: torch.Tensor) -> bool:
    """Whether a tensor gets the trust ratio and weight decay: matrices and kernels yes, vectors no."""
    return p.ndim > 1


def _trust(numerator: torch.Tensor, denominator: torch.Tensor, w_norm: torch.Tensor,
           u_norm: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, or 1 where the weight's or the update's norm is 0 (a zero gradient, a
    zero-initialised layer). On the device, without a host sync; nothing is divided by 0."""
    defined = (w_norm > 0) & (u_norm > 0)
    return torch.where(defined, numerator / torch.where(defined, denominator, 1.0), 1.0)


def _check(lr: float, weight_decay: float) -> None:
    if lr < 0.0:
        raise ValueError(f"invalid learning rate {lr}")
    if weight_decay < 0.0:
        raise ValueError(f"invalid weight_decay {weight_decay}")


class Lars(torch.optim.Optimizer):
    """LARS: momentum SGD with a layer-wise learning rate (You, Gitman, Ginsburg 2017, arXiv:1708.03888).

    For each tensor w with gradient g, per step (lr, momentum, wd = weight_decay, eta = trust_coefficient):

        if w.ndim > 1:  local_lr = eta * ||w|| / (||g|| + wd * ||w||)   (1 if ||w|| = 0 or ||g|| = 0)
                        d = (g + wd * w) * local_lr
        else:           d = g                                           (no adaptation, no decay)
        v = momentum * v + d          (v starts at 0)
        w = w - lr * v

    This is Algorithm 1 of the paper as the common PyTorch implementations write it (the learning rate
    outside the momentum buffer, as torch.optim.SGD). MLPerf's TensorFlow reference puts lr * local_lr
    inside the buffer instead; the two agree while lr is constant. ||.|| is the Euclidean norm of the
    whole tensor. Zero gradients: with wd = 0 the weights do not move; with wd > 0 an adapted tensor
    decays as SGD's L2 term does (local_lr = 1, so v = momentum * v + wd * w).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3):
        _check(lr, weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"invalid trust_coefficient {trust_coefficient}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lars does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                d = p.grad
                if _adapted(p):
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(d)
                    local_lr = _trust(eta * w_norm, g_norm + wd * w_norm, w_norm, g_norm)
                    d = d.add(p, alpha=wd).mul_(local_lr)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam with a layer-wise trust ratio (You et al. 2019, arXiv:1904.00962, Algorithm 2).

    For each tensor w with gradient g, at step t = 1, 2, ... (lr, betas = (b1, b2), eps, wd = weight_decay):

        m = b1 * m + (1 - b1) * g                 v = b2 * v + (1 - b2) * g * g     (m, v start at 0)
        m_hat = m / (1 - b1 ** t)                 v_hat = v / (1 - b2 ** t)
        r = m_hat / (sqrt(v_hat) + eps)
        if w.ndim > 1:  r = r + wd * w
                        trust = ||w|| / ||r||     (1 if ||w|| = 0 or ||r|| = 0)
        else:           trust = 1                 (no adaptation, no decay: plain Adam)
        w = w - lr * trust * r

    The paper's variant with bias correction and the scaling function phi the identity (no clipping of
    ||w||), as NVIDIA's LAMB; t counts this tensor's steps (`state["step"]`). ||.|| is the Euclidean norm
    of the whole tensor. Zero gradients: with wd = 0 the weights do not move (r = 0 before any real
    gradient); with wd > 0 and no past gradient, r = wd * w and trust = 1 / wd, so an adapted tensor
    shrinks to w * (1 - lr): the trust ratio normalises even a pure decay step.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        _check(lr, weight_decay)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if eps <= 0.0:
            raise ValueError(f"invalid eps {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                r = (m / (1.0 - b1 ** t)).div_((v / (1.0 - b2 ** t)).sqrt_().add_(eps))
                if _adapted(p):
                    r.add_(p, alpha=wd)
                    w_norm, r_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(r)
                    r.mul_(_trust(w_norm, r_norm, w_norm, r_norm))
                p.add_(r, alpha=-group["lr"])
        return loss
