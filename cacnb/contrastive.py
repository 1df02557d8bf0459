"""The directional contrastive loss of CAC (Lai et al., CVPR 2021, Eq. 3-5), computed exactly and streamed.

For an overlap position ``i`` seen as ``q = feat_a[i]`` in crop a and ``k = feat_b[i]`` in crop b, with
negatives ``n_j`` (features of other positions) and temperature ``T``::

    l_i = -log( exp(q·k/T) / (exp(q·k/T) + Σ_j M_ij exp(q·n_j/T)) )          (InfoNCE with the positive k)
    M_ij = [label_j != label_a[i]]                                           (false-negative filter)
    w_i  = [conf_b[i] > γ  and  conf_b[i] > conf_a[i]]                       (directional mask, γ = pos_thresh)
    loss_a = Σ_i w_i l_i / Σ_i w_i   (0 when no w_i is set)

``k`` is a stop-gradient target, so ``loss_a`` only pulls the less confident crop a towards crop b; ``loss_b``
is the same with a and b swapped. Negatives receive no gradient.

Two ablations switch one rule off each (config keys ``loss.directional`` / ``loss.neg_filter``, default on):

* ``directional=False``: ``w_i = 1`` for every position in both directions, so each side is pulled towards the
  other (its counterpart still a stop-gradient target) whatever the confidences;
* ``neg_filter=False``: ``M_ij = 1``, negatives carrying the anchor's pseudo-label are kept.

How the fast path works (:class:`_DirectionalInfoNCE`):

* Only anchors with ``w_i = 1`` contribute to value or gradient. Since ``conf_b > conf_a`` and
  ``conf_a > conf_b`` exclude each other, at most ``n`` of the ``2n`` anchors of both directions are active
  (all ``2n`` with ``directional=False``); they are stacked into one ``[m, c]`` matrix so each block of
  negatives costs one matmul for both directions.
* Anchors and negatives are sorted by label. Within a block of negatives that all carry class ``c``, the anchors
  the filter excludes are one contiguous range of the sorted anchors, so the filter is two row slices: no mask,
  no wasted products. (Subtracting per-class sums from the full sum instead would cancel catastrophically when
  most of an anchor's mass sits in its own class; a masked fill costs two extra passes per block.) With
  ``neg_filter=False`` the blocks are plain chunks and every anchor meets every negative.
* The log-sum-exp is accumulated block by block. With a static shift (an upper bound of every logit from
  Cauchy-Schwarz, used when the logit range cannot underflow fp32) the blocks just add; otherwise a running max
  rescales the accumulators whenever it grows. Either way the sum is exact.
* The forward also accumulates ``Σ_j p_ij n_j`` (as flash attention accumulates its output), which gives the
  anchor gradient ``∂l_i/∂q_i = (Σ_j p_ij n_j − (1 − p_pos,i) k_i) / T`` in closed form. Backward only scales
  the saved ``[n, c]`` gradients: no second pass over the negatives, and the ``[n, N]`` matrix never exists.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
STABILIZERS = ("auto", "bound", "running")
# Largest logit range (max - min, in nats) for which a static shift keeps the dominant term far above fp32
# underflow (exp(-40) ~ 4e-18 vs the smallest normal 1e-38), so the shifted sum stays exact.
_STATIC_RANGE = 40.0


@dataclass
class _Anchors:
    """The active anchors of both directions, sorted by label. All tensors have ``m`` rows."""
    q: torch.Tensor          # [m, c] anchor features / T
    k: torch.Tensor          # [m, c] positive features (stop-grad)
    label: torch.Tensor      # [m] pseudo-labels, ascending
    pos: torch.Tensor        # [m] q·k/T
    src: torch.Tensor        # [m] row of the anchor in [feat_a; feat_b] (direction b: n + its row)
    is_b: torch.Tensor       # [m] bool: anchor belongs to direction b


def direction_weights(conf_a, conf_b, pos_thresh, directional=True):
    """``(w_a, w_b)`` bool ``[n]``: w_a[i] = conf_b[i] > γ and conf_b[i] > conf_a[i]; w_b symmetric.

    ``directional=False`` (the ablation ``loss.directional=false``): every position is active in both directions.
    """
    if not directional:
        every = torch.ones_like(conf_a, dtype=torch.bool)
        return every, every.clone()
    w_a = (conf_b > pos_thresh) & (conf_b > conf_a)
    w_b = (conf_a > pos_thresh) & (conf_a > conf_b)
    return w_a, w_b


@dataclass
class _Plan:
    """The host-side numbers that shape the stream, read from the device in one transfer (see :func:`_plan`)."""
    n_a: int                 # active anchors of direction a
    n_b: int                 # active anchors of direction b
    q_norm_max: float        # largest ||q / T|| over the active anchors (0 without any)
    k_norm_max: float        # largest ||k|| over the active anchors (0 without any)
    neg_norm_max: float      # largest ||n_j|| (0 without negatives)
    neg_counts: list         # negatives per label (empty with neg_filter=False)
    anchor_counts: list      # active anchors per label (empty with neg_filter=False)

    @property
    def m(self) -> int:
        return self.n_a + self.n_b


def _plan(feat_a, feat_b, label_a, label_b, w_a, w_b, neg_feat, neg_label, inv_t, neg_filter, num_classes):
    """Everything the block loop must know on the host, in one device read.

    The label-sorted stream slices anchors and negatives by label, so the sizes of those slices (and the count
    of active anchors, and the norms that choose the stabiliser) have to reach Python: this ``tolist`` is the
    loss's one inherent host sync. Counting per label needs the number of classes; without ``num_classes`` it
    is read from the labels first (a second sync).
    """
    dtype = _work_dtype(feat_a)
    w = torch.cat([w_a, w_b])                                                      # [2n] active anchors
    q_norm = (torch.cat([feat_a, feat_b]).to(dtype) * inv_t).norm(dim=1)           # as the anchors compute it
    k_norm = torch.cat([feat_b, feat_a]).to(dtype).norm(dim=1)
    zero = q_norm.new_zeros(1)                                                     # the max of nothing is 0
    parts = [w_a.sum(0, keepdim=True).to(torch.float64), w_b.sum(0, keepdim=True).to(torch.float64),
             torch.cat([zero, q_norm * w]).max().reshape(1).to(torch.float64),
             torch.cat([zero, k_norm * w]).max().reshape(1).to(torch.float64),
             torch.cat([zero, neg_feat.to(dtype).norm(dim=1)]).max().reshape(1).to(torch.float64)]
    if neg_filter:
        if num_classes is None:  # an extra sync; callers that know the class count pass it
            labels = torch.cat([label_a, label_b, neg_label, label_a.new_zeros(1)])
            num_classes = int(labels.max()) + 1
        label = torch.cat([label_a, label_b]).long()
        neg_counts = torch.zeros(num_classes, dtype=torch.float64, device=neg_label.device)
        neg_counts.index_add_(0, neg_label.long(), torch.ones_like(neg_label, dtype=torch.float64))
        anchor_counts = torch.zeros(num_classes, dtype=torch.float64, device=label.device)
        anchor_counts.index_add_(0, label, w.to(torch.float64))
        parts += [neg_counts, anchor_counts.to(neg_counts.device)]
    values = torch.cat([t.to(parts[0].device) for t in parts]).tolist()           # the one read
    counts = [int(v) for v in values[5:]]
    k = len(counts) // 2
    return _Plan(n_a=int(values[0]), n_b=int(values[1]), q_norm_max=values[2], k_norm_max=values[3],
                 neg_norm_max=values[4], neg_counts=counts[:k], anchor_counts=counts[k:])


def _active_anchors(feat_a, feat_b, label_a, label_b, w_a, w_b, inv_t, m) -> _Anchors:
    """The ``m`` active anchors of both directions, sorted by label (ties: direction a first, then position).

    Sorting puts the inactive ones last, so no boolean mask selects them (a mask's size is a host sync).
    """
    n = len(label_a)
    label = torch.cat([label_a, label_b])                                          # [2n]
    last = torch.full_like(label, torch.iinfo(label.dtype).max)
    order = torch.argsort(torch.where(torch.cat([w_a, w_b]), label, last), stable=True)[:m]
    dtype = _work_dtype(feat_a)
    q = torch.cat([feat_a, feat_b])[order].to(dtype) * inv_t                       # [m, c]
    k = torch.cat([feat_b, feat_a])[order].to(dtype)                               # [m, c]
    return _Anchors(q=q, k=k, label=label[order], pos=(q * k).sum(1), src=order, is_b=order >= n)


def _work_dtype(t):
    """fp32 for half/bf16/fp32 inputs (sums of exponentials need it), fp64 stays fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def _label_blocks(plan: _Plan, n_neg, chunk_size, neg_filter=True):
    """Yield ``(n0, n1, exclude0, exclude1)``: negatives ``[n0, n1)`` all share one label, and the anchors
    ``[exclude0, exclude1)`` carry that label (so the false-negative filter removes exactly that pair block).
    Without ``neg_filter`` the blocks are plain chunks and no anchor is excluded (``exclude0 = exclude1 = 0``)."""
    if not neg_filter:
        for n0 in range(0, n_neg, chunk_size):
            yield n0, min(n0 + chunk_size, n_neg), 0, 0
        return
    start = a0 = 0
    for count, a_count in zip(plan.neg_counts, plan.anchor_counts):
        for n0 in range(start, start + count, chunk_size):
            yield n0, min(n0 + chunk_size, start + count), a0, a0 + a_count
        start, a0 = start + count, a0 + a_count


class _Accumulators:
    """Per-anchor shift ``m``, ``s = Σ_j exp(logit_ij - m_i)`` and ``acc = Σ_j exp(logit_ij - m_i) n_j``.

    Two folds save whole passes over each ``[rows, block]`` matrix: the shift rides in the first matmul as an
    extra column (``[q/T, -m] · [n, 1] = q·n/T - m``), and the row sum in the second (``e @ [n, 1]`` gives
    ``acc`` and ``s`` at once). ``m`` is kept integral, so it is exact in bf16 too.
    """

    def __init__(self, anchors: _Anchors, plan: _Plan, stabilizer: str):
        self.running = _needs_running_max(plan, stabilizer)
        neg_norm_max = plan.neg_norm_max
        if self.running:
            shift = anchors.pos  # the positive is always in the sum, so the running max starts there
        else:
            # >= every logit by Cauchy-Schwarz (q is already divided by T)
            shift = anchors.q.norm(dim=1) * torch.clamp(anchors.k.norm(dim=1), min=neg_norm_max)
        self.q_aug = torch.cat([anchors.q, -torch.ceil(shift)[:, None]], 1)    # [m, c + 1]
        self.sums = torch.zeros_like(self.q_aug)                               # [m, c + 1]: acc | s

    @property
    def m(self):
        return -self.q_aug[:, -1]

    @property
    def s(self):
        return self.sums[:, -1]

    @property
    def acc(self):
        return self.sums[:, :-1]

    def positive_term(self, anchors):
        return torch.exp(anchors.pos - self.m)

    def per_anchor_loss(self, anchors):
        """``l_i = log(1 + Σ_j e^{s_ij} / e^{pos_i})``, via log1p so that l_i is exactly 0 without negatives."""
        p = self.positive_term(anchors)
        direct = torch.log(self.s + p) + self.m - anchors.pos
        return torch.where(p > 1e-20, torch.log1p(self.s / p.clamp(min=1e-20)), direct)

    def update(self, r0, r1, negs_aug, mm_dtype):
        """Add the block of sorted anchors ``[r0, r1)`` against ``negs_aug`` ``[b, c + 1]`` to the sums."""
        if r1 <= r0:
            return
        logits = _mm(self.q_aug[r0:r1], negs_aug.T, mm_dtype)                 # [r, b] logit - m
        if self.running:
            grow = torch.ceil(logits.amax(1)).clamp_(min=0)                    # how far the max moved
            logits.sub_(grow[:, None])
            self.sums[r0:r1].mul_(torch.exp(-grow)[:, None])
            self.q_aug[r0:r1, -1].sub_(grow)
        logits.exp_()
        if mm_dtype is torch.bfloat16:
            self.sums[r0:r1].add_(_mm(logits, negs_aug, mm_dtype))
        else:
            self.sums[r0:r1].addmm_(logits, negs_aug)


def _needs_running_max(plan: _Plan, stabilizer):
    if stabilizer != "auto":
        return stabilizer == "running"
    if plan.m == 0:
        return False
    widest = plan.q_norm_max * max(plan.k_norm_max, plan.neg_norm_max)
    return 2.0 * widest + 1.0 > _STATIC_RANGE  # logits lie in [-widest, widest]; ceil adds < 1


def _mm(a, b, dtype):
    """``a @ b`` in the inputs' dtype, or with bf16 inputs and a result in ``a``'s dtype."""
    if dtype is torch.bfloat16:
        return (a.to(dtype) @ b.to(dtype)).to(a.dtype)
    return a @ b


@contextlib.contextmanager
def _matmul_precision(precision: str, device: torch.device):
    """TF32 matmuls for the duration (CUDA only; a no-op elsewhere and for fp32/bf16)."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _sorted_negatives(neg_feat, neg_label, dtype):
    """Negatives sorted by label, with a column of ones appended: ``([N, c + 1], [N])``."""
    order = torch.argsort(neg_label, stable=True)
    negs_aug = neg_feat.new_ones((len(order), neg_feat.shape[1] + 1), dtype=dtype)
    negs_aug[:, :-1] = neg_feat[order]
    return negs_aug, neg_label[order]


def _stream(anchors, plan, neg_feat, neg_label, chunk_size, stabilizer, precision, neg_filter=True):
    """Run the block loop; return the accumulators."""
    negs_aug, neg_label = _sorted_negatives(neg_feat, neg_label, anchors.q.dtype)
    accu = _Accumulators(anchors, plan, stabilizer)
    mm_dtype = torch.bfloat16 if precision == "bf16" else anchors.q.dtype
    with _matmul_precision(precision, negs_aug.device):
        for n0, n1, a0, a1 in _label_blocks(plan, len(neg_label), chunk_size, neg_filter):
            block = negs_aug[n0:n1]
            accu.update(0, a0, block, mm_dtype)          # anchors with a smaller label
            accu.update(a1, plan.m, block, mm_dtype)     # anchors with a larger label
    return accu


def _direction_means(anchors, per_anchor, n_a, n_b):
    """Mean of ``per_anchor`` over each direction's active anchors (0 for an empty direction)."""
    # Each direction summed on its own: ``total - sum_b`` loses fp32 precision when one direction dominates.
    sum_a, sum_b = per_anchor.new_zeros(2).index_add_(0, anchors.is_b.long(), per_anchor)
    return sum_a / max(n_a, 1), sum_b / max(n_b, 1)


class _DirectionalInfoNCE(torch.autograd.Function):
    """Both directions' losses in one pass; backward scales the anchor gradients saved by the forward."""

    @staticmethod
    def forward(ctx, feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg_feat, neg_label, opts):
        temperature = opts["temperature"]
        w_a, w_b = direction_weights(conf_a, conf_b, opts["pos_thresh"], opts["directional"])
        neg_feat, neg_label = neg_feat.to(feat_a.device), neg_label.to(feat_a.device)
        plan = _plan(feat_a, feat_b, label_a, label_b, w_a, w_b, neg_feat, neg_label, 1.0 / temperature,
                     opts["neg_filter"], opts["num_classes"])
        anchors = _active_anchors(feat_a, feat_b, label_a, label_b, w_a, w_b, 1.0 / temperature, plan.m)
        accu = _stream(anchors, plan, neg_feat, neg_label, opts["chunk_size"], opts["stabilizer"],
                       opts["precision"], opts["neg_filter"])
        per_anchor = accu.per_anchor_loss(anchors)                        # [m] l_i
        loss_a, loss_b = _direction_means(anchors, per_anchor, plan.n_a, plan.n_b)
        ctx.save_for_backward(*_anchor_grads(anchors, accu, feat_a, plan.n_a, plan.n_b, temperature))
        ctx.feat_dtypes = (feat_a.dtype, feat_b.dtype)
        return loss_a, loss_b                          # fp32 (fp64 for fp64 inputs), whatever the feature dtype

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        unit_a, unit_b = ctx.saved_tensors
        dtype_a, dtype_b = ctx.feat_dtypes
        return ((grad_a * unit_a).to(dtype_a), (grad_b * unit_b).to(dtype_b)) + (None,) * 7


def _anchor_grads(anchors, accu, feat_a, n_a, n_b, temperature):
    """d loss_a / d feat_a and d loss_b / d feat_b, each ``[n, c]``:
    ``w_i / Σw × (Σ_j p_ij n_j − (1 − p_pos,i) k_i) / T``."""
    total = accu.s + accu.positive_term(anchors)                         # [m], shifted by e^{-m}
    # Σ_j p_ij n_j = acc / total and 1 - p_pos = s / total (no cancellation when p_pos is close to 1)
    grad = (accu.acc - accu.s[:, None] * anchors.k) / (total[:, None] * temperature)   # [m, c]
    # 0-d tensors in the gradient's dtype: Python floats would make a default-dtype (fp32) weight, whose rounding of
    # 1 / n (~6e-8) fp64 runs would carry; filled on the device, so no host-to-device copy either
    weight = torch.where(anchors.is_b, grad.new_full((), 1.0 / max(n_b, 1)), grad.new_full((), 1.0 / max(n_a, 1)))
    grad = grad * weight[:, None]
    n = len(feat_a)
    units = grad.new_zeros((2 * n, feat_a.shape[1])).index_copy_(0, anchors.src, grad)   # [feat_a; feat_b] rows
    return units[:n], units[n:]


def directional_contrastive_loss(feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg_feat, neg_label,
                                 temperature=0.1, pos_thresh=0.75, *, chunk_size=4096, precision="fp32",
                                 stabilizer="auto", directional=True, neg_filter=True, num_classes=None):
    """CAC's directional contrastive loss for both directions: ``(loss_a, loss_b)``.

    ``feat_*`` ``[n, c]`` L2-normalised features of the same overlap positions in crops a and b, ``conf_*``
    ``[n]`` max-softmax confidences, ``label_*`` ``[n]`` pseudo-labels, ``neg_feat`` ``[N, c]`` and
    ``neg_label`` ``[N]`` the negatives (no gradient).

    With ``q = feat_a[i]``, ``k = feat_b[i]``::

        l_i    = -log( e^{q·sg(k)/T} / (e^{q·sg(k)/T} + Σ_{j: neg_label_j ≠ label_a[i]} e^{q·n_j/T}) )
        w_i    = [conf_b[i] > pos_thresh ∧ conf_b[i] > conf_a[i]]
        loss_a = Σ_i w_i l_i / Σ_i w_i        (0 if every w_i is 0)

    and ``loss_b`` with a and b swapped. Gradients: loss_a reaches only feat_a, loss_b only feat_b.

    Options: ``chunk_size`` negatives per block (memory is ``O(n × chunk_size)``); ``precision`` "fp32"
    (default, exact), "tf32" (TF32 matmuls on CUDA, fp32 elsewhere) or "bf16" (bf16 matmul inputs, fp32
    sums); ``stabilizer`` "auto" (static Cauchy-Schwarz shift when the logit range is safe, else running max),
    "bound" or "running"; ``num_classes`` bounds the labels (``[0, num_classes)``): the loss then reads the
    device once (the sizes of its label blocks), else twice. Ablations (module docstring): ``directional=False``
    drops the confidence rule, ``neg_filter=False`` keeps same-label negatives.
    """
    _check_inputs(feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg_feat, neg_label)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r} (config key loss.precision)")
    if stabilizer not in STABILIZERS:
        raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size} (config key loss.chunk_size)")
    opts = dict(temperature=float(temperature), pos_thresh=float(pos_thresh), chunk_size=int(chunk_size),
                precision=precision, stabilizer=stabilizer, directional=bool(directional),
                neg_filter=bool(neg_filter), num_classes=None if num_classes is None else int(num_classes))
    # autocast would silently run the fp32 matmuls in low precision; `precision` is the explicit switch
    with torch.autocast(device_type=feat_a.device.type, enabled=False):
        return _DirectionalInfoNCE.apply(feat_a, feat_b, conf_a.detach(), conf_b.detach(), label_a, label_b,
                                         neg_feat.detach(), neg_label, opts)


def _check_inputs(feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg_feat, neg_label):
    n, c = feat_a.shape
    if feat_b.shape != (n, c):
        raise ValueError(f"feat_a {tuple(feat_a.shape)} and feat_b {tuple(feat_b.shape)} must both be [n, c]")
    for name, t in (("conf_a", conf_a), ("conf_b", conf_b), ("label_a", label_a), ("label_b", label_b)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if neg_feat.dim() != 2 or neg_feat.shape[1] != c or neg_label.shape != (neg_feat.shape[0],):
        raise ValueError(f"neg_feat must be [N, {c}] and neg_label [N], got {tuple(neg_feat.shape)} and "
                         f"{tuple(neg_label.shape)}")


def directional_contrastive_loss_reference(feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg_feat,
                                           neg_label, temperature=0.1, pos_thresh=0.75, *, directional=True,
                                           neg_filter=True):
    """The plain formula with the whole ``[n, N]`` similarity matrix (for tests, benchmarks, the notebook)."""
    w_a, w_b = direction_weights(conf_a, conf_b, pos_thresh, directional)
    loss_a = _plain_direction(feat_a, feat_b, label_a, w_a, neg_feat, neg_label, temperature, neg_filter)
    loss_b = _plain_direction(feat_b, feat_a, label_b, w_b, neg_feat, neg_label, temperature, neg_filter)
    return loss_a, loss_b


def _plain_direction(q, k, label, w, neg_feat, neg_label, temperature, neg_filter=True):
    pos = (q * k.detach()).sum(1, keepdim=True) / temperature            # [n, 1]
    neg = q @ neg_feat.detach().T / temperature                            # [n, N]
    if neg_filter:
        neg = neg.masked_fill(label[:, None] == neg_label[None, :], -math.inf)
    per_anchor = torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]  # l_i
    w = w.to(per_anchor.dtype)
    return (w * per_anchor).sum() / w.sum().clamp(min=1.0)
