"""The balancer axis (``--balancer``): multi-task balancers over the k cluster losses (ANT, Go et al., NeurIPS 2023).

A balancer turns the vector of cluster losses ``L`` (shape ``(k,)``) into gradients on the model:

* :class:`UncertaintyWeighting` (Kendall et al. 2018): Σ_i ½ (exp(−s_i) L_i + s_i) with learnable s_i;
  one backward pass. s has its own optimizer and learning rate; its gradient is averaged over ranks.
* :class:`PCGrad` (Yu et al. 2020): one gradient per cluster, each projected off the others it conflicts
  with (negative dot product), summed. k gradient computations per step.
* :class:`NashMTL` (Navon et al. 2022): every ``update_every`` steps solve the Nash bargaining problem
  G α = 1/α on the clusters' Gram matrix G and reuse α in between (plain weighted backward).

The pure math (``pcgrad_project``, ``nash_weights``, ``uncertainty_weighted_loss``) is separate from the
stateful wrappers and tested directly. Per-cluster gradients are taken with ``torch.autograd.grad`` and
averaged over data-parallel ranks by the balancer itself, so the script runs the forward pass of such
steps under ``accelerator.no_sync`` (see :meth:`Balancer.needs_manual_sync`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

BALANCERS = ("none", "uw", "pcgrad", "nash")
# Balancers that form gradients themselves (k backward passes, p.grad written by hand).
SELF_FORMED = ("pcgrad", "nash")


# ---- pure functions ---------------------------------------------------------------------------------------
def uncertainty_weighted_loss(cluster_losses: torch.Tensor, log_variances: torch.Tensor) -> torch.Tensor:
    """Σ_i ½ (exp(−s_i) L_i + s_i) (Kendall et al. 2018, as used by ANT)."""
    return 0.5 * (torch.exp(-log_variances) * cluster_losses + log_variances).sum()


def pcgrad_project(grads: torch.Tensor, order: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """PCGrad on ``grads`` of shape (k, P): for each i, project g_i off every g_j (in ``order[i]``, default
    j = 0..k-1) with g_i·g_j < 0: g_i ← g_i − (g_i·g_j / ‖g_j‖²) g_j. Returns the sum of projected gradients."""
    k = grads.shape[0]
    projected = grads.clone()
    for i in range(k):
        for j in (order[i] if order is not None else range(k)):
            if j == i:
                continue
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= dot / grads[j].pow(2).sum().clamp_min(1e-20) * grads[j]
    return projected.sum(0)


def nash_weights(gram: torch.Tensor, iterations: int = 50, tol: float = 1e-10) -> torch.Tensor:
    """α > 0 with G α = 1/α (the Nash bargaining solution of Navon et al. 2022) for a PSD Gram matrix G.

    α is the unique minimiser of the strictly convex φ(α) = ½ αᵀGα − Σ log α_i (∇φ = Gα − 1/α), found by
    damped Newton steps that keep α positive. G is normalised by its norm first, as in the reference code,
    so α does not depend on the gradients' scale. The k×k solve runs on the CPU whatever ``gram``'s device
    (a GPU gains nothing on it, and every Newton step would wait on it); α is returned on the CPU.
    """
    G = gram.detach().double().cpu()
    G = G / G.norm().clamp_min(1e-20)
    k = G.shape[0]
    alpha = torch.ones(k, dtype=torch.float64)
    for _ in range(iterations):
        grad = G @ alpha - 1 / alpha
        if grad.abs().max() < tol:
            break
        hessian = G + torch.diag(1 / alpha**2)
        step = torch.linalg.solve(hessian, grad)
        t = 1.0
        while torch.any(alpha - t * step <= 0):  # stay inside α > 0
            t *= 0.5
        alpha = alpha - t * step
    return alpha.to(gram.dtype)


# ---- stateful balancers -----------------------------------------------------------------------------------
def _flat_grads(loss: torch.Tensor, params: List[torch.nn.Parameter], retain_graph: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _add_flat_grad(params: List[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += n


class Balancer:
    """Base: plain sum of the cluster losses, one backward pass."""

    name = "sum"

    def needs_manual_sync(self, step: int) -> bool:
        """True when this step's gradients are formed by the balancer (per-cluster autograd.grad), so the
        script must run the forward pass under ``accelerator.no_sync(model)``."""
        return False

    def backward(self, accelerator, cluster_losses: torch.Tensor, present: torch.Tensor, model, step: int) -> torch.Tensor:
        loss = cluster_losses[present].sum()
        accelerator.backward(loss)
        return loss.detach()

    def on_step_end(self, accelerator) -> Dict[str, float]:
        return {}

    def describe(self) -> Dict[str, Any]:
        return {"method": self.name}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def _cluster_grads(self, accelerator, cluster_losses, present, model) -> tuple:
        """Per-cluster flat gradients (k, P), averaged over ranks; zeros for clusters absent locally."""
        params = [p for p in model.parameters() if p.requires_grad]
        rows = []
        for i in range(cluster_losses.shape[0]):
            if present[i]:
                rows.append(_flat_grads(cluster_losses[i], params, retain_graph=True))
            else:
                rows.append(torch.zeros(sum(p.numel() for p in params), device=cluster_losses.device))
        grads = torch.stack(rows).float()
        if accelerator.num_processes > 1:
            grads = accelerator.reduce(grads, reduction="mean")
        return grads / accelerator.gradient_accumulation_steps, params


class UncertaintyWeighting(Balancer):
    name = "uw"

    def __init__(self, k: int, lr: float = 0.025, device=None):
        self.log_variances = torch.zeros(k, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_variances], lr=lr)
        self.lr = lr

    def backward(self, accelerator, cluster_losses, present, model, step):
        s = self.log_variances.to(cluster_losses.device)
        loss = uncertainty_weighted_loss(cluster_losses[present], s[present])
        accelerator.backward(loss)
        return loss.detach()

    def on_step_end(self, accelerator) -> Dict[str, float]:
        if self.log_variances.grad is not None:
            if accelerator.num_processes > 1:  # s is not part of the DDP model: average its gradient here
                self.log_variances.grad = accelerator.reduce(self.log_variances.grad, reduction="mean")
            self.optimizer.step()
            self.optimizer.zero_grad()
        return {f"uw_s{i}": float(v) for i, v in enumerate(self.log_variances.detach())}

    def describe(self):
        return {"method": self.name, "uw_lr": self.lr}

    def state_dict(self):
        return {"log_variances": self.log_variances.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.log_variances.copy_(state["log_variances"])
        self.optimizer.load_state_dict(state["optimizer"])


class PCGrad(Balancer):
    name = "pcgrad"

    def __init__(self, k: int, seed: int = 0):
        self.k = k
        # projection order, identical on every rank; salted away from the regime's timestep generator
        self.generator = torch.Generator().manual_seed(seed + 0x5851F42D)

    def needs_manual_sync(self, step: int) -> bool:
        return True

    def backward(self, accelerator, cluster_losses, present, model, step):
        grads, params = self._cluster_grads(accelerator, cluster_losses, present, model)
        order = [torch.randperm(self.k, generator=self.generator).tolist() for _ in range(self.k)]
        _add_flat_grad(params, pcgrad_project(grads, order))
        return cluster_losses[present].sum().detach()

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class NashMTL(Balancer):
    name = "nash"

    def __init__(self, k: int, update_every: int = 25):
        self.k, self.update_every = k, update_every
        self.alpha = torch.ones(k)

    def needs_manual_sync(self, step: int) -> bool:
        return step % self.update_every == 0

    def backward(self, accelerator, cluster_losses, present, model, step):
        if self.needs_manual_sync(step):
            grads, params = self._cluster_grads(accelerator, cluster_losses, present, model)
            self.alpha = nash_weights(grads.double() @ grads.double().T).float()
            _add_flat_grad(params, (self.alpha.to(grads.device)[:, None] * grads).sum(0))
            return (self.alpha.to(cluster_losses.device) * cluster_losses).sum().detach()
        loss = (self.alpha.to(cluster_losses.device)[present] * cluster_losses[present]).sum()
        accelerator.backward(loss)
        return loss.detach()

    def on_step_end(self, accelerator):
        return {f"nash_alpha{i}": float(a) for i, a in enumerate(self.alpha)}

    def describe(self):
        return {"method": self.name, "nash_update_every": self.update_every}

    def state_dict(self):
        return {"alpha": self.alpha.clone()}

    def load_state_dict(self, state):
        self.alpha = state["alpha"].clone()


def build_balancer(method: str, k: int, uw_lr: float = 0.025, nash_update_every: int = 25, seed: int = 0,
                   device=None) -> Optional[Balancer]:
    """The balancer ``method`` over ``k`` clusters; ``None`` for ``"none"`` (a plain mean over the batch)."""
    if method == "none":
        return None
    if method == "uw":
        return UncertaintyWeighting(k, uw_lr, device)
    if method == "pcgrad":
        return PCGrad(k, seed)
    if method == "nash":
        return NashMTL(k, nash_update_every)
    raise ValueError(f"unknown MTL method {method!r}; choose one of {BALANCERS}")
