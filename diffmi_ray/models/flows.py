"""Normalising flows over a generator's latent vector: VMI's variational distribution q(z).

VMI (Wang et al., NeurIPS 2021, "Variational Model Inversion Attacks") fits, per target class, a
distribution q(z) over the GAN latent so that G(z) is classified as the class while q stays close to
the GAN prior: ``loss = E_q[CE(T(G(z)), y)] + lambda_kl * KL(q || N(0, I))`` (lambda_kl = 1e-3).
q is a Glow-style multi-scale flow on a vector (official run: K = 10 steps per level, L = 3 levels,
hidden width 100, ELU coupling networks, additive coupling, shuffle permutation, actnorm).

Notation (one flow, latent dimension D):

* data side ``z`` (B, D): the generator latent; noise side ``eps`` (B, D) ~ N(0, I).
* ``encode(z) -> (eps, logdet)`` is the bijection z -> eps with ``logdet = log|det d eps / d z|``, so
  ``log q(z) = log N(eps; 0, I) + logdet`` (change of variables).
* ``decode(eps) -> (z, logdet)`` is its inverse with ``logdet = log|det d z / d eps|``.
* Level l (l = 0 .. L-1) works on ``d_l`` numbers: d_0 = D, d_{l+1} = ceil(d_l / 2). It applies K
  :class:`FlowStep` (actnorm -> permutation -> coupling), then -- except at the last level -- factors
  out the last ``d_l - d_{l+1}`` numbers through a learned conditional Gaussian given the kept ones
  (Glow's split prior), which here is written as an affine bijection to standard noise.
* ``eps`` is laid out as ``[level-0 factored part, level-1 factored part, ..., top (d_{L-1})]``.

Every coupling network's last layer and every split prior start at zero, actnorm and affine scales
start at the identity, and permutations / 1x1 mixes are orthogonal, so a freshly built flow is
exactly N(0, I) (KL = 0) -- VMI's starting point of "the GAN prior".

Sampling is reparameterised: ``sample(n, generator)`` draws eps on CPU from the given
``torch.Generator`` (or takes ``eps=`` from the caller, e.g. :func:`diffmi_ray.conventions.per_sample_noise`)
and returns ``(z, log q(z))`` differentiable in the flow's parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)
COUPLINGS = ("additive", "affine")
PERMUTATIONS = ("shuffle", "reverse", "invconv")


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) summed over the last dim: (..., D) -> (...)."""
    return -0.5 * (x.pow(2).sum(-1) + x.shape[-1] * LOG_2PI)


def kl_to_standard_normal(z: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo KL(q || N(0, I)) from samples z (B, D) ~ q and their log q(z) (B,): a scalar.

    ``mean_i [log q(z_i) - log N(z_i; 0, I)]`` -- unbiased, differentiable through reparameterised z.
    """
    return (log_q - standard_normal_log_prob(z)).mean()


def _seeded_linear(d_in: int, d_out: int, g: torch.Generator, zero: bool = False) -> nn.Linear:
    """nn.Linear with PyTorch's default init drawn from ``g`` (or all zeros), independent of global RNG."""
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        if zero:
            lin.weight.zero_()
            lin.bias.zero_()
        else:
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
            bound = 1.0 / math.sqrt(d_in)
            nn.init.uniform_(lin.bias, -bound, bound, generator=g)
    return lin


class ActNorm(nn.Module):
    """Per-dimension affine ``y = (x + loc) * exp(log_scale)``; starts as the identity. logdet = sum(log_scale)."""

    def __init__(self, dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ld = self.log_scale.sum().expand(x.size(0))
        return (x + self.loc) * torch.exp(self.log_scale), ld

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ld = -self.log_scale.sum().expand(y.size(0))
        return y * torch.exp(-self.log_scale) - self.loc, ld


class Permutation(nn.Module):
    """Fixed permutation of the D dimensions (volume preserving): random ('shuffle') or reversal."""

    def __init__(self, dim: int, shuffle: bool, g: torch.Generator):
        super().__init__()
        perm = torch.randperm(dim, generator=g) if shuffle else torch.arange(dim - 1, -1, -1)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.size(0))

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y[:, self.inv_perm], y.new_zeros(y.size(0))


class InvertibleLinear(nn.Module):
    """Glow's invertible 1x1 convolution on a vector: ``y = x W^T``, W = P L (U + diag(sign * exp(log_s))).

    LU-parameterised (P fixed), initialised from a random orthogonal matrix, logdet = sum(log_s).
    """

    def __init__(self, dim: int, g: torch.Generator):
        super().__init__()
        w0, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
        p, lower, upper = torch.linalg.lu(w0)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        self.register_buffer("eye", torch.eye(dim))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper  # (D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x @ self.weight().T, self.log_s.sum().expand(x.size(0))

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.linalg.solve(self.weight(), y.T).T
        return x, -self.log_s.sum().expand(y.size(0))


class Coupling(nn.Module):
    """Coupling layer: the first ``d_a = D // 2`` numbers condition a map of the other ``d_b``.

    additive: ``y_b = x_b + t(x_a)``;
    affine:   ``y_b = (x_b + t(x_a)) * s(x_a)`` with ``s = sigmoid(r(x_a) + 2) / sigmoid(2)`` -- Glow's
    bounded scale, divided by sigmoid(2) so that a zero network is the identity. ``y_a = x_a``.
    Network: Linear(d_a, H) - ELU - Linear(H, H) - ELU - Linear(H, out), last layer zero-initialised.
    """

    def __init__(self, dim: int, hidden: int, kind: str, g: torch.Generator):
        super().__init__()
        if kind not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {kind!r}")
        self.kind = kind
        self.d_a = dim // 2
        self.d_b = dim - self.d_a
        out = self.d_b * (2 if kind == "affine" else 1)
        self.net = nn.Sequential(
            _seeded_linear(self.d_a, hidden, g), nn.ELU(),
            _seeded_linear(hidden, hidden, g), nn.ELU(),
            _seeded_linear(hidden, out, g, zero=True),
        )

    def _shift_logscale(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.net(xa)
        if self.kind == "additive":
            return h, None
        shift, raw = h[:, : self.d_b], h[:, self.d_b:]
        log_s = F.logsigmoid(raw + 2.0) - F.logsigmoid(torch.tensor(2.0, dtype=h.dtype, device=h.device))
        return shift, log_s

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x[:, : self.d_a], x[:, self.d_a:]
        shift, log_s = self._shift_logscale(xa)
        if log_s is None:
            return torch.cat([xa, xb + shift], 1), x.new_zeros(x.size(0))
        return torch.cat([xa, (xb + shift) * torch.exp(log_s)], 1), log_s.sum(1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ya, yb = y[:, : self.d_a], y[:, self.d_a:]
        shift, log_s = self._shift_logscale(ya)
        if log_s is None:
            return torch.cat([ya, yb - shift], 1), y.new_zeros(y.size(0))
        return torch.cat([ya, yb * torch.exp(-log_s) - shift], 1), -log_s.sum(1)


class FlowStep(nn.Module):
    """One Glow step on a vector: [actnorm] -> permutation (shuffle | reverse | invconv) -> coupling."""

    def __init__(self, dim: int, hidden: int, coupling: str, permutation: str, actnorm: bool, g: torch.Generator):
        super().__init__()
        if permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
        layers: list[nn.Module] = [ActNorm(dim)] if actnorm else []
        if permutation == "invconv":
            layers.append(InvertibleLinear(dim, g))
        else:
            layers.append(Permutation(dim, shuffle=permutation == "shuffle", g=g))
        layers.append(Coupling(dim, hidden, coupling, g))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ld = x.new_zeros(x.size(0))
        for layer in self.layers:
            x, d = layer(x)
            ld = ld + d
        return x, ld

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ld = y.new_zeros(y.size(0))
        for layer in reversed(self.layers):
            y, d = layer.inverse(y)
            ld = ld + d
        return y, ld


class SplitPrior(nn.Module):
    """Glow's factor-out: keep ``h[:, :d_keep]``; the rest is N(mean(keep), exp(log_std(keep))^2).

    As a bijection to noise: ``eps = (h_out - mean) * exp(-log_std)``, logdet = -sum(log_std).
    The linear map keep -> (mean, log_std) starts at zero (a standard normal).
    """

    def __init__(self, d_keep: int, d_out: int, g: torch.Generator):
        super().__init__()
        self.d_keep, self.d_out = d_keep, d_out
        self.net = _seeded_linear(d_keep, 2 * d_out, g, zero=True)

    def _params(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(keep)
        return h[:, : self.d_out], h[:, self.d_out:]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, d_keep + d_out) -> (keep (B, d_keep), eps (B, d_out), logdet (B,))."""
        keep, out = h[:, : self.d_keep], h[:, self.d_keep:]
        mean, log_std = self._params(keep)
        return keep, (out - mean) * torch.exp(-log_std), -log_std.sum(1)

    def inverse(self, keep: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep (B, d_keep), eps (B, d_out)) -> (h (B, d_keep + d_out), logdet (B,))."""
        mean, log_std = self._params(keep)
        return torch.cat([keep, mean + torch.exp(log_std) * eps], 1), log_std.sum(1)


class GlowVectorFlow(nn.Module):
    """Multi-scale Glow-style flow q(z) on vectors z (B, dim); see the module docstring for the layout.

    Args:
        dim: D, the latent dimension (e.g. 100 for the GMI/KED-MI DCGAN); needs ceil-halving D
            (L - 1) times to leave at least 2 numbers.
        K: flow steps per level (VMI: 10).
        L: levels (VMI: 3).
        hidden: width of the coupling networks (VMI: 100).
        coupling: "additive" (VMI's official runs) or "affine".
        permutation: "shuffle" (VMI's official runs), "reverse" or "invconv" (LU 1x1 mix).
        actnorm: put an ActNorm first in each step (VMI: yes).
        seed: seeds every random choice of construction (permutations, 1x1 init, hidden layers),
            so two flows built with the same arguments are identical whatever the global RNG state.
    """

    def __init__(self, dim: int, K: int = 10, L: int = 3, hidden: int = 100, coupling: str = "additive",
                 permutation: str = "shuffle", actnorm: bool = True, seed: int = 0):
        super().__init__()
        if K < 1 or L < 1:
            raise ValueError(f"K and L must be >= 1, got K={K}, L={L}")
        dims = [dim]
        for _ in range(L - 1):
            dims.append(dims[-1] - dims[-1] // 2)
        if dims[-1] < 2:
            raise ValueError(f"dim={dim} is too small for L={L} levels (the last level would have {dims[-1]} < 2)")
        self.dim, self.K, self.L, self.dims = dim, K, L, dims
        g = torch.Generator().manual_seed(int(seed))
        self.levels = nn.ModuleList(
            nn.ModuleList(FlowStep(d, hidden, coupling, permutation, actnorm, g) for _ in range(K)) for d in dims)
        self.splits = nn.ModuleList(SplitPrior(dims[l + 1], dims[l] - dims[l + 1], g) for l in range(L - 1))
        # eps layout: factored-out part of each level, then the top.
        self._sizes = [dims[l] - dims[l + 1] for l in range(L - 1)] + [dims[-1]]

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, D) -> (eps (B, D), log|det d eps/d z| (B,))."""
        h, ld, parts = z, z.new_zeros(z.size(0)), []
        for l, steps in enumerate(self.levels):
            for step in steps:
                h, d = step(h)
                ld = ld + d
            if l < self.L - 1:
                h, e, d = self.splits[l](h)
                parts.append(e)
                ld = ld + d
        return torch.cat(parts + [h], 1), ld

    def decode(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eps (B, D) -> (z (B, D), log|det d z/d eps| (B,)); the inverse of :meth:`encode`."""
        parts = list(torch.split(eps, self._sizes, dim=1))
        h, ld = parts[-1], eps.new_zeros(eps.size(0))
        for l in reversed(range(self.L)):
            if l < self.L - 1:
                h, d = self.splits[l].inverse(h, parts[l])
                ld = ld + d
            for step in reversed(self.levels[l]):
                h, d = step.inverse(h)
                ld = ld + d
        return h, ld

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Exact log q(z) (B,) for z (B, D)."""
        eps, ld = self.encode(z)
        return standard_normal_log_prob(eps) + ld

    def forward(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised map of given noise eps (B, D) ~ N(0, I): returns (z (B, D), log q(z) (B,))."""
        z, ld = self.decode(eps)
        return z, standard_normal_log_prob(eps) - ld

    def sample(self, n: int, generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n samples: ``(z (n, D), log q(z) (n,))``, differentiable in the flow's parameters.

        eps (n, D) is drawn on CPU from ``generator`` (reproducible) unless given, scaled by
        ``temperature``, and moved to the flow's device/dtype. log q is always the density of the
        flow itself (temperature 1) at the returned z.
        """
        p = next(self.parameters())
        if eps is None:
            eps = torch.randn(n, self.dim, generator=generator)
        eps = eps.to(device=p.device, dtype=p.dtype) * temperature
        return self(eps)


class ClassConditionalFlows(nn.Module):
    """One independent :class:`GlowVectorFlow` per class (VMI fits q_y separately for each target class).

    ``flows[c]`` is class c's flow (built with ``seed + c``). Batched calls route each row to its
    class's flow. Memory grows linearly in num_classes (about 0.49M parameters per class at D = 100,
    K = 10, L = 3, hidden 100); an attack that handles one class at a time can build single flows instead.
    """

    def __init__(self, num_classes: int, dim: int, seed: int = 0, **flow_kw):
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.flows = nn.ModuleList(GlowVectorFlow(dim, seed=seed + c, **flow_kw) for c in range(num_classes))

    def __getitem__(self, c: int) -> GlowVectorFlow:
        return self.flows[c]

    def _route(self, fn, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros_like(x)
        val = x.new_zeros(x.size(0))
        for c in torch.unique(y).tolist():
            idx = (y == c).nonzero(as_tuple=True)[0]
            o, v = fn(self.flows[c], x[idx])
            out = out.index_copy(0, idx, o)
            val = val.index_copy(0, idx, v)
        return out, val

    def forward(self, eps: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eps (B, D), y (B,) long -> (z (B, D), log q_{y_i}(z_i) (B,))."""
        return self._route(lambda f, e: f(e), eps, y.to(eps.device))

    def sample(self, y: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample per label: y (B,) long -> (z (B, D), log q_y(z) (B,)); eps (B, D) drawn row by row in
        batch order from ``generator`` unless given."""
        p = next(self.parameters())
        if eps is None:
            eps = torch.randn(len(y), self.dim, generator=generator)
        eps = eps.to(device=p.device, dtype=p.dtype) * temperature
        return self(eps, y)

    def log_prob(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log q_{y_i}(z_i) (B,) for z (B, D), y (B,) long."""
        return self._route(lambda f, v: (v, f.log_prob(v)), z, y.to(z.device))[1]
