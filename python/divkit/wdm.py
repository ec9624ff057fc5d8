"""The Wasserstein dependency measure (Ozair et al. 2019, "Wasserstein Dependency Measure for
Representation Learning"; also exposed as ``divkit.ot.wasserstein_dependency`` and
``divkit.ot.WassersteinDependency``).

The measure replaces the KL of mutual information, ``I(X; Y) = KL(p(x, y) || p(x) p(y))``, by the
Wasserstein-1 distance between the joint and the product of the marginals, estimated through its
Kantorovich-Rubinstein dual with a critic network f:

    I_W(X; Y) = W_1(p(x, y), p(x) p(y))
              = sup_{||f||_Lip <= 1} E_{p(x, y)}[f(x, y)] - E_{p(x) p(y)}[f(x, y)].

On a batch of pairs (x_i, y_i) the product of the marginals is sampled by pairing each x_i with
y_{s(i)}, s a random cyclic permutation (no pair is kept), and the Lipschitz constraint is
imposed either by a gradient penalty (Gulrajani et al. 2017: ``lambda E[(|grad f(z)| - 1)^2]``
at random interpolates z between joint and product pairs) or by spectral normalization of the
critic's linear layers (Miyato et al. 2018), the two variants of the paper. Both the critic and
the encoders producing x, y maximize the estimate: the loss to minimize is ``-estimate +
penalty``. Pure torch: any float dtype and device; differentiable in x, y and the critic.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import _validate as check

__all__ = ["WDMOutput", "wdm_critic", "wasserstein_dependency", "WassersteinDependency"]

_LIPSCHITZ = ("gradient_penalty", "spectral_norm")


class WDMOutput(NamedTuple):
    """loss = -estimate + penalty (minimize it); estimate: ``mean f(joint) - mean f(product)``;
    penalty: the weighted gradient penalty (0 for ``'spectral_norm'``)."""

    loss: torch.Tensor
    estimate: torch.Tensor
    penalty: torch.Tensor


@check.public("wdm_critic")
def wdm_critic(
    in_dim: int, hidden: Sequence[int] = (128, 128), *, spectral_norm: bool = False
) -> nn.Module:
    """An MLP critic ``[x, y] -> f(x, y)`` (LeakyReLU(0.2), 1-Lipschitz activations); with
    ``spectral_norm=True`` every linear layer is spectrally normalized, which makes the critic
    (approximately, through the power iteration) 1-Lipschitz."""
    fn = "wdm_critic"
    d = check.size(fn, "in_dim", in_dim)
    sizes = [check.size(fn, "hidden", h) for h in hidden]
    sn = check.boolean(fn, "spectral_norm", spectral_norm)

    def linear(a: int, b: int) -> nn.Module:
        lin = nn.Linear(a, b)
        return nn.utils.parametrizations.spectral_norm(lin) if sn else lin

    layers = []
    prev = d
    for h in sizes:
        layers += [linear(prev, h), nn.LeakyReLU(0.2)]
        prev = h
    layers.append(linear(prev, 1))
    return nn.Sequential(*layers)


def _cyclic_permutation(n: int, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """s with s(i) != i for every i: a random n-cycle."""
    order = torch.randperm(n, generator=generator).to(device)
    s = torch.empty_like(order)
    s[order] = order.roll(-1)
    return s


@check.public("wasserstein_dependency", finite_args=("x", "y"))
def wasserstein_dependency(
    critic: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lipschitz: str = "gradient_penalty",
    gp_weight: float = 10.0,
    generator: Optional[torch.Generator] = None,
) -> WDMOutput:
    r"""The dual estimate of ``W_1(p(x, y), p(x) p(y))`` on paired representations x [B, dx],
    y [B, dy] (B >= 2): ``mean_i f(x_i, y_i) - mean_i f(x_i, y_{s(i)})`` with ``f = critic`` on
    the concatenation ``[x, y]`` and s a random cyclic permutation (``generator`` seeds it and
    the interpolation). ``lipschitz='gradient_penalty'`` adds ``gp_weight * mean (|grad f(z)| -
    1)^2`` at ``z = u [x, y] + (1 - u) [x, y_s]``, u ~ U(0, 1) per pair (the critic must then be
    unconstrained); ``'spectral_norm'`` adds nothing (use ``wdm_critic(..., spectral_norm=True)``).
    Returns :class:`WDMOutput`; minimize ``.loss`` for both the critic and the encoders."""
    fn = "wasserstein_dependency"
    if not isinstance(critic, nn.Module) and not callable(critic):
        check.fail_type(fn, f"critic must be a torch.nn.Module, got {check.type_name(critic)}")
    x = check.tensor(fn, "x", x, ndim=(2,), cpu=False)
    y = check.tensor(fn, "y", y, ndim=(2,), cpu=False)
    n = x.shape[0]
    if y.shape[0] != n:
        check.fail(fn, f"y has {y.shape[0]} rows, expected {n} (one per row of x: paired)")
    if n < 2:
        check.fail(fn, f"x must have at least 2 rows (pairs) to form product samples, got {n}")
    if y.device != x.device:
        check.fail(fn, f"y is on {y.device}, x on {x.device}")
    lip = check.string(fn, "lipschitz", lipschitz, choices=_LIPSCHITZ)
    lam = check.nonnegative(fn, "gp_weight", gp_weight)
    s = _cyclic_permutation(n, x.device, generator)
    joint = torch.cat([x, y], 1)
    prod = torch.cat([x, y[s]], 1)
    fj = critic(joint).reshape(n)
    fp = critic(prod).reshape(n)
    est = fj.mean() - fp.mean()
    if lip == "gradient_penalty" and lam > 0:
        u = torch.rand(n, 1, generator=generator, dtype=joint.dtype).to(joint.device)
        z = (u * joint.detach() + (1 - u) * prod.detach()).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(z).sum(), z, create_graph=torch.is_grad_enabled())
        pen = lam * ((g.norm(dim=1) - 1) ** 2).mean()
    else:
        pen = est.new_zeros(())
    return WDMOutput(-est + pen, est, pen)


class WassersteinDependency(nn.Module):
    """The Wasserstein dependency measure as a loss module with its own critic
    (:func:`wdm_critic` on ``x_dim + y_dim`` inputs): ``forward(x, y) -> WDMOutput``, see
    :func:`wasserstein_dependency`. ``lipschitz='spectral_norm'`` builds a spectrally normalized
    critic and no penalty; ``'gradient_penalty'`` an unconstrained critic and the penalty."""

    @check.public("WassersteinDependency")
    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        hidden: Sequence[int] = (128, 128),
        *,
        lipschitz: str = "gradient_penalty",
        gp_weight: float = 10.0,
    ) -> None:
        super().__init__()
        fn = "WassersteinDependency"
        dx = check.size(fn, "x_dim", x_dim)
        dy = check.size(fn, "y_dim", y_dim)
        self.lipschitz = check.string(fn, "lipschitz", lipschitz, choices=_LIPSCHITZ)
        self.gp_weight = check.nonnegative(fn, "gp_weight", gp_weight)
        self.critic = wdm_critic(dx + dy, hidden, spectral_norm=self.lipschitz == "spectral_norm")

    @check.public("WassersteinDependency", finite_args=("x", "y"))
    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> WDMOutput:
        return wasserstein_dependency(
            self.critic,
            x,
            y,
            lipschitz=self.lipschitz,
            gp_weight=self.gp_weight,
            generator=generator,
        )
