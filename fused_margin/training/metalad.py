"""MetaLAD: the logit-perturbation loss with meta-learned weights of Ou Wu, "Rethinking Class Imbalance in
Machine Learning" (arXiv 2305.03900), docs/loss.md section 7.

For a row with label ``y`` the non-target logit of class ``c`` is raised by

    P[i, c] = lam[y, 0] log(pi_c / pi_y) + lam[y, 1] V(y, c) + lam[y, 2] log(Dbar / Delta(y, c))

* proportion: ``pi`` the class proportions. The paper prints ``log(pi_y / pi_c)`` (eq. 30) but says the
  loss then reduces to logit adjustment, which needs ``log(pi_c / pi_y)``: with ``lam = 1`` only this sign
  raises the loss of the tail classes, as its own guideline asks (docs/loss.md section 7);
* variance: ``V(y, c) = (w_y - w_c)^T Sigma_y (w_y - w_c) / ||w_y - w_c||^2``, the spread of class ``y``'s
  features along the direction that separates it from ``c`` (``w`` the classifier rows, ``Sigma_y`` the
  running covariance of class ``y``, full or diagonal);
* distance: ``Delta(y, c) = ||mu_y - mu_c||`` between running class means, ``Dbar`` its mean over all
  pairs ``y != c``: classes close to ``y`` get a larger perturbation.

The class statistics are running estimates (:class:`ClassStatistics`, the count-weighted update of ISDA,
Wang et al., NeurIPS 2019). ``lam`` (C x 3, initialised to 1) is learned by the meta step of eqs.
(34)-(36), in the manner of Meta-Weight-Net (Shu et al., NeurIPS 2019):

    (34) theta_hat(lam) = theta - alpha grad_theta L_train(theta; lam)             (virtual SGD step)
    (35) lam <- lam - eta grad_lam L_meta(theta_hat(lam))                            (balanced meta batch)
    (36) theta <- optimizer step on grad_theta L_train(theta; lam)                  (the real step)

with ``L_train`` the perturbed loss on the training batch and ``L_meta`` plain cross-entropy on a small
balanced meta batch. Every loss goes through :func:`fused_margin.margin_cross_entropy`. The virtual step of
(34) needs the derivative of a gradient (``create_graph=True``); the fused kernels give first derivatives
only, so that one loss runs on ``backend="reference"`` (autograd); the meta loss and the real step use
``self.backend`` (``"auto"``: the fused kernels where they exist).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fused_margin.core import builders
from fused_margin.functional import margin_cross_entropy

__all__ = ["ClassStatistics", "MetaLAD", "pair_perturbation_terms"]

#: ``auto`` covariance mode keeps full C x D x D covariances up to this many bytes.
FULL_COVARIANCE_BYTES = 256 * 2**20


class ClassStatistics(nn.Module):
    """Running per-class feature means and covariances (ISDA's estimator, Wang et al., NeurIPS 2019).

    A batch holding ``n_b`` examples of class ``c`` with mean ``m_b`` and (biased) covariance ``S_b`` updates
    the class's count ``N``, mean ``mu`` and covariance ``Sigma`` with ``w = n_b / (N + n_b)``:

        mu <- (1 - w) mu + w m_b
        Sigma <- (1 - w) Sigma + w S_b + w (1 - w) (mu - m_b)(mu - m_b)^T
        N <- N + n_b

    which equals the mean and population covariance (divide by ``N``) of every feature seen so far.
    ``covariance``: ``"full"`` (C x D x D), ``"diag"`` (C x D, the variances) or ``"auto"`` (full when it
    takes at most ``FULL_COVARIANCE_BYTES``).
    """

    def __init__(self, num_classes: int, feature_dim: int, covariance: str = "auto", dtype=torch.float32):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be an int >= 1, got {feature_dim!r}")
        if covariance == "auto":
            size = torch.tensor([], dtype=dtype).element_size() * num_classes * feature_dim**2
            covariance = "full" if size <= FULL_COVARIANCE_BYTES else "diag"
        if covariance not in ("full", "diag"):
            raise ValueError(f"covariance must be 'full', 'diag' or 'auto', got {covariance!r}")
        self.num_classes, self.feature_dim, self.covariance = num_classes, feature_dim, covariance
        cov_shape = (num_classes, feature_dim, feature_dim) if covariance == "full" else (num_classes, feature_dim)
        self.register_buffer("count", torch.zeros(num_classes, dtype=dtype))
        self.register_buffer("mean", torch.zeros(num_classes, feature_dim, dtype=dtype))
        self.register_buffer("cov", torch.zeros(cov_shape, dtype=dtype))

    @torch.no_grad()
    def update(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """Fold a batch (B x D features, B labels; labels outside ``[0, C)`` such as ``ignore_index`` are
        skipped) into the running statistics."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be B x D with D = {self.feature_dim}, got {tuple(features.shape)}")
        if target.dim() != 1 or target.shape[0] != features.shape[0]:
            raise ValueError(f"target must hold one label per feature row, got shape {tuple(target.shape)}")
        kept = (target >= 0) & (target < self.num_classes)
        x = features[kept].to(self.mean.dtype)
        y = target[kept]
        if y.numel() == 0:
            return
        n_b = torch.bincount(y, minlength=self.num_classes).to(x.dtype)
        sums = torch.zeros_like(self.mean).index_add_(0, y, x)
        present = n_b > 0
        batch_mean = torch.where(present[:, None], sums / n_b.clamp_min(1)[:, None], self.mean)
        w = n_b / (self.count + n_b).clamp_min(1)
        shift = self.mean - batch_mean
        centred = x - batch_mean[y]
        if self.covariance == "diag":
            batch_cov = torch.zeros_like(self.cov).index_add_(0, y, centred * centred) / n_b.clamp_min(1)[:, None]
            self.cov.mul_((1 - w)[:, None]).add_(w[:, None] * batch_cov + (w * (1 - w))[:, None] * shift * shift)
        else:
            for c in torch.nonzero(present).flatten().tolist():
                rows = centred[y == c]
                batch_cov = rows.t() @ rows / n_b[c]
                wc = w[c]
                self.cov[c].mul_(1 - wc).add_(wc * batch_cov + wc * (1 - wc) * torch.outer(shift[c], shift[c]))
        self.mean.copy_(torch.where(present[:, None], self.mean - w[:, None] * shift, self.mean))
        self.count.add_(n_b)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, covariance={self.covariance!r}"


def pair_perturbation_terms(
    rows: torch.Tensor,
    log_prior: torch.Tensor,
    classifier: torch.Tensor,
    means: torch.Tensor,
    cov: torch.Tensor,
    seen: Optional[torch.Tensor] = None,
    chunk_elements: int = 2**24,
) -> torch.Tensor:
    """The three terms of docs/loss.md section 7 for the labels ``rows`` (R ints) against every class: R x C x 3.

    ``[..., 0] = log pi_c - log pi_y``, ``[..., 1] = V(y, c)``, ``[..., 2] = log(Dbar / Delta(y, c))`` with
    ``log_prior`` (C) = ``log pi``, ``classifier`` (C x D) the rows ``w``, ``means`` (C x D), ``cov`` (C x D x D
    full or C x D diagonal). Entries with ``c = y`` are 0 (the loss ignores them). Classes not yet ``seen``
    (bool C; count 0) have no statistics: their variance and distance terms are 0 and they are left out of
    ``Dbar``. Computed without gradient, in the dtype of ``means``.
    """
    with torch.no_grad():
        dtype = means.dtype
        C = log_prior.shape[0]
        W = classifier.detach().to(dtype)
        if seen is None:
            seen = torch.ones(C, dtype=torch.bool, device=means.device)
        proportion = log_prior.to(dtype)[None, :] - log_prior.to(dtype)[rows][:, None]

        # V(y, c) = d^T Sigma_y d / ||d||^2, d = w_y - w_c, expanded so no R x C x D difference is formed
        w_rows = W[rows]
        sq_dist_w = (w_rows * w_rows).sum(1)[:, None] + (W * W).sum(1)[None, :] - 2.0 * w_rows @ W.t()
        if cov.dim() == 2:
            var = cov[rows]
            quad = (var * w_rows * w_rows).sum(1)[:, None] - 2.0 * (var * w_rows) @ W.t() + var @ (W * W).t()
        else:
            quad = torch.empty(rows.shape[0], C, dtype=dtype, device=means.device)
            step = max(1, chunk_elements // max(1, C * W.shape[1]))
            for start in range(0, rows.shape[0], step):
                sigma = cov[rows[start : start + step]]  # r x D x D
                sw = torch.einsum("rde,ce->rcd", sigma, W)  # Sigma_y w_c
                wr = w_rows[start : start + step]
                quad[start : start + step] = (
                    (sw * W[None]).sum(-1)
                    - 2.0 * (sw * wr[:, None, :]).sum(-1)
                    + torch.einsum("rd,rde,re->r", wr, sigma, wr)[:, None]
                )
        variance = quad / sq_dist_w.clamp_min(torch.finfo(dtype).tiny)

        # log(Dbar / Delta(y, c)) over the classes with statistics
        distance_all = torch.cdist(means[None], means[None])[0]
        pair = seen[:, None] & seen[None, :] & ~torch.eye(C, dtype=torch.bool, device=means.device)
        if bool(pair.any()):
            dbar = distance_all[pair].mean()
            delta = distance_all[rows].clamp_min(torch.finfo(dtype).tiny)
            distance = torch.where(pair[rows], torch.log(dbar / delta), torch.zeros_like(delta))
        else:
            distance = torch.zeros(rows.shape[0], C, dtype=dtype, device=means.device)
        unseen = ~(seen[rows][:, None] & seen[None, :])
        variance = variance.masked_fill(unseen, 0.0)

        terms = torch.stack([proportion, variance, distance], dim=-1)
        diagonal = rows[:, None] == torch.arange(C, device=means.device)[None, :]
        return terms.masked_fill(diagonal[..., None], 0.0)


class MetaLAD(nn.Module):
    """The MetaLAD loss with its statistics, its learnable ``lam`` (C x 3) and its meta step.

    Args:
        class_counts: training examples per class (C); ``pi = n / sum n``.
        feature_dim: ``D``, the size of the features entering the classifier.
        scale: ``s`` of the loss (the logits are ``s z + P``).
        head: ``"cosine"`` (features and classifier rows are normalised, as the loss's cosine head; the
            statistics are kept on normalised features) or ``"linear"``.
        covariance: ``"full"``, ``"diag"`` or ``"auto"`` (:class:`ClassStatistics`).
        warmup_epochs: epochs of plain cross-entropy (statistics are still gathered) before the meta steps.
        meta_lr: the step size ``eta`` of (35); ``meta_optimizer`` ``"adam"`` (default) or ``"sgd"``.
        virtual_lr: ``alpha`` of (34); ``None`` takes the current learning rate of the model's optimizer.
        weight_name: the name, inside the model, of the C x D classifier parameter fed to the loss.
        backend: backend of the meta loss and the real step (the virtual step always uses the reference).

    The model's ``forward(x)`` must return the B x D features entering the classifier; the classifier
    weight (``weight_name``, e.g. ``"head.weight"`` of a :class:`fused_margin.CosineClassifier`) is taken
    from the model's parameters, so the loss fuses the classifier GEMM. Buffers updated in ``forward``
    (batch norm) are updated by the virtual forward too, as in Meta-Weight-Net.
    """

    def __init__(
        self,
        class_counts,
        feature_dim: int,
        scale: float = 30.0,
        head: str = "cosine",
        covariance: str = "auto",
        warmup_epochs: int = 0,
        meta_lr: float = 1e-2,
        meta_optimizer: str = "adam",
        virtual_lr: Optional[float] = None,
        lam_init: float = 1.0,
        weight_name: str = "head.weight",
        backend: str = "auto",
    ):
        super().__init__()
        counts = builders.as_class_counts(class_counts)
        if head not in ("cosine", "linear"):
            raise ValueError(f"head must be 'cosine' or 'linear', got {head!r}")
        for name, value in (("scale", scale), ("meta_lr", meta_lr), ("lam_init", lam_init)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if scale <= 0 or meta_lr <= 0:
            raise ValueError(f"scale and meta_lr must be > 0, got scale={scale}, meta_lr={meta_lr}")
        if meta_optimizer not in ("adam", "sgd"):
            raise ValueError(f"meta_optimizer must be 'adam' or 'sgd', got {meta_optimizer!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        self.num_classes = int(counts.size)
        self.scale, self.head, self.backend = float(scale), head, backend
        self.warmup_epochs, self.meta_lr, self.meta_optimizer = warmup_epochs, float(meta_lr), meta_optimizer
        self.virtual_lr, self.weight_name = virtual_lr, weight_name
        self.class_counts = counts
        self._log_priors: Dict[tuple, torch.Tensor] = {}
        self.lam = nn.Parameter(torch.full((self.num_classes, 3), float(lam_init)))
        self.stats = ClassStatistics(self.num_classes, feature_dim, covariance)
        self._lam_optimizer: Optional[torch.optim.Optimizer] = None

    # ----- the loss ------------------------------------------------------------------------------------
    def _stat_features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.detach(), dim=1) if self.head == "cosine" else features.detach()

    def _classifier_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return F.normalize(weight.detach(), dim=1) if self.head == "cosine" else weight.detach()

    def update_statistics(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """Fold a batch's features (as the classifier sees them) into the running class statistics."""
        self.stats.update(self._stat_features(features), target)

    def log_prior(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """``log pi`` (C), built in float64 from the counts and cast (cached per dtype and device)."""
        key = (dtype, torch.device(device) if device is not None else torch.device("cpu"))
        if key not in self._log_priors:
            self._log_priors[key] = builders.log_prior(self.class_counts, dtype=torch.float64).to(key[1], dtype)
        return self._log_priors[key]

    def perturbation_terms(self, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """B x C x 3 terms (proportion, variance, distance) for the batch's labels (0 on ignored rows)."""
        kept = (target >= 0) & (target < self.num_classes)
        safe = torch.where(kept, target, torch.zeros_like(target))
        rows, inverse = torch.unique(safe, return_inverse=True)
        log_prior = self.log_prior(self.stats.mean.dtype, self.stats.mean.device)
        table = pair_perturbation_terms(
            rows, log_prior, self._classifier_rows(weight), self.stats.mean, self.stats.cov, self.stats.count > 0
        )
        return table[inverse].masked_fill(~kept[:, None, None], 0.0)

    def perturbation(
        self, target: torch.Tensor, weight: torch.Tensor, lam: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``P`` (B x C): ``sum_k lam[y_i, k] terms[i, c, k]``; differentiable in ``lam``."""
        lam = self.lam if lam is None else lam
        terms = self.perturbation_terms(target, weight)
        safe = target.clamp(0, self.num_classes - 1)
        return (lam[safe].to(terms.dtype)[:, None, :] * terms).sum(-1)

    def loss(
        self,
        features: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor,
        lam: Optional[torch.Tensor] = None,
        perturb: bool = True,
        backend: Optional[str] = None,
        **options,
    ) -> torch.Tensor:
        """The perturbed loss ``CE(s z + P)`` (plain ``CE(s z)`` with ``perturb=False``) through
        :func:`fused_margin.margin_cross_entropy`; ``options`` pass through (e.g. ``reduction``)."""
        if perturb:
            P = self.perturbation(target, weight, lam)  # kept in fp32 (or wider) for low-precision input
            options["pair_perturbation"] = P.to(torch.promote_types(P.dtype, features.dtype))
        return margin_cross_entropy(
            features,
            target,
            weight,
            head=self.head,
            scale=self.scale,
            backend=self.backend if backend is None else backend,
            **options,
        )

    # ----- the meta step of eqs. (34)-(36) --------------------------------------------------------------
    def _virtual_lr(self, optimizer: Optional[torch.optim.Optimizer]) -> float:
        if self.virtual_lr is not None:
            return float(self.virtual_lr)
        if optimizer is None:
            raise ValueError("virtual_lr is None and no optimizer was given to read the learning rate from")
        return float(optimizer.param_groups[0]["lr"])

    def virtual_meta_loss(
        self,
        model: nn.Module,
        x,
        target: torch.Tensor,
        meta_x,
        meta_target: torch.Tensor,
        virtual_lr: float,
        lam: Optional[torch.Tensor] = None,
        create_graph: bool = True,
    ) -> torch.Tensor:
        """``L_meta(theta_hat(lam))`` of eqs. (34)-(35): the balanced meta batch's cross-entropy after a
        virtual SGD step ``theta_hat = theta - virtual_lr grad_theta L_train(theta; lam)``. Differentiable in
        ``lam`` (with ``create_graph``). The statistics are not updated here."""
        params: Dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.weight_name not in params:
            raise ValueError(f"weight_name={self.weight_name!r} is not a trainable parameter of the model")
        buffers = dict(model.named_buffers())
        features = functional_call(model, {**params, **buffers}, (x,))
        weight = params[self.weight_name]
        # differentiated twice (eq. 36's gradient in lam): double_backward routes it to the reference
        train_loss = self.loss(
            features,
            target,
            weight,
            lam=lam,
            double_backward=create_graph,
            backend="reference" if create_graph else None,
        )
        names = list(params)
        grads = torch.autograd.grad(
            train_loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True
        )
        fast = {n: params[n] if g is None else params[n] - virtual_lr * g for n, g in zip(names, grads)}
        meta_features = functional_call(model, {**fast, **buffers}, (meta_x,))
        return self.loss(meta_features, meta_target, fast[self.weight_name], perturb=False)

    def _lam_step(self, grad: torch.Tensor) -> None:
        if self._lam_optimizer is None:
            cls = torch.optim.Adam if self.meta_optimizer == "adam" else torch.optim.SGD
            self._lam_optimizer = cls([self.lam], lr=self.meta_lr)
        self.lam.grad = grad
        self._lam_optimizer.step()
        self.lam.grad = None

    def meta_step(
        self,
        model: nn.Module,
        x,
        target: torch.Tensor,
        meta_x,
        meta_target: torch.Tensor,
        optimizer: torch.optim.Optimizer,
    ) -> Dict[str, float]:
        """One MetaLAD step: update the statistics with the batch, update ``lam`` through the virtual step
        (eqs. 34-35), then take the real step (36) with the updated ``lam``. Returns the losses."""
        with torch.no_grad():
            self.update_statistics(model(x), target)
        meta_loss = self.virtual_meta_loss(model, x, target, meta_x, meta_target, self._virtual_lr(optimizer))
        (lam_grad,) = torch.autograd.grad(meta_loss, self.lam)
        self._lam_step(lam_grad)
        loss = self.loss(model(x), target, model.get_parameter(self.weight_name), lam=self.lam.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "meta_loss": meta_loss.item()}

    def train_step(
        self,
        model: nn.Module,
        x,
        target: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        meta_x=None,
        meta_target: Optional[torch.Tensor] = None,
    ) -> Dict[str, float]:
        """Plain cross-entropy during the warm-up epochs (gathering statistics), then :meth:`meta_step`."""
        if epoch >= self.warmup_epochs:
            if meta_x is None or meta_target is None:
                raise ValueError("after the warm-up MetaLAD needs a balanced meta batch (meta_x, meta_target)")
            return self.meta_step(model, x, target, meta_x, meta_target, optimizer)
        features = model(x)
        self.update_statistics(features, target)
        loss = self.loss(features, target, model.get_parameter(self.weight_name), perturb=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, scale={self.scale}, head={self.head!r}, "
            f"warmup_epochs={self.warmup_epochs}, meta_lr={self.meta_lr}, "
            f"meta_optimizer={self.meta_optimizer!r}, backend={self.backend!r}"
        )
