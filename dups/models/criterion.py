"""Mask2Former's set criterion for semantic segmentation, plus DUPS's score loss.

Hungarian matching (scipy) on costs class 2, mask 5, dice 5 over points sampled uniformly;
losses: cross-entropy with no-object weight 0.1, sigmoid BCE and dice on importance-sampled
points (12544, oversample 3, importance 0.75), for the final prediction and every earlier one
(deep supervision). The upsampling blocks' predictions get an MSE against the edge fractions
of the label (``model.edges``). Random points are drawn in Mask2Former's order, so a seeded
run reproduces the reference implementation's numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dups.models.decoder import Prediction
from dups.models.edges import cell_centres, edge_scores, token_targets
from dups.models.upsampling import UpsampleRecord


@dataclass(frozen=True)
class CriterionConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    score_weight: float = 1000.0  # see dups.config.UpsamplingConfig
    deep_supervision: bool = True
    ignore_index: int = 255
    edge_radius: int = 0  # the score targets' edge band (dups.config.UpsamplingConfig)


@dataclass
class Target:
    classes: Tensor  # (n,) class ids present in the image
    masks: Tensor  # (n, H, W) float binary masks


def semantic_targets(labels: Tensor, num_classes: int, ignore_index: int = 255) -> list[Target]:
    """One binary mask per class present; ignore pixels belong to no mask."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"label value {int(labels[bad][0])} is outside [0, {num_classes}) and is not the "
            f"ignore value {ignore_index}")
    out = []
    for lab in labels:
        classes = lab.unique()
        classes = classes[classes != ignore_index]
        out.append(Target(classes, (lab[None] == classes[:, None, None]).float()))
    return out


def point_sample(x: Tensor, coords: Tensor) -> Tensor:
    """x (N, 1, H, W) at coords (N, P, 2) in [0, 1]^2 -> (N, P), bilinear."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


def pairwise_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """(Q, P) x (T, P) -> (Q, T) mean BCE over points."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ labels.T + neg @ (1 - labels).T) / logits.shape[1]


def pairwise_dice(logits: Tensor, labels: Tensor) -> Tensor:
    p = logits.sigmoid()
    num = 2 * p @ labels.T
    den = p.sum(-1)[:, None] + labels.sum(-1)[None]
    return 1 - (num + 1) / (den + 1)


def _mse(pred: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
    """Mean squared error over the real candidates (``valid``: a packed batch's)."""
    if valid is None:
        return F.mse_loss(pred, target)
    return ((pred - target).square() * valid).sum() / valid.sum().clamp(min=1)


def _target_side(record: UpsampleRecord) -> int:
    """Side of the patches whose edge fractions a block's head predicts: its tokens' or their cells'."""
    return record.patch if record.cells is None else record.patch // math.isqrt(record.cells.shape[-1])


def _block_score_loss(r: UpsampleRecord, maps: dict[int, Tensor]) -> Tensor:
    if not r.scores.numel():  # nothing to score: an exact zero that is still part of the graph
        return r.scores.sum() * 0.0
    if r.cells is None:
        pred, target, valid = r.scores.float(), token_targets(maps[r.patch], r.centres, r.patch), r.valid
    else:
        b, n, c = r.cells.shape
        side = _target_side(r)
        pred = r.cells.float()
        target = token_targets(maps[side], cell_centres(r.centres, r.patch, math.isqrt(c)), side).view(b, n, c)
        valid = None if r.valid is None else r.valid[..., None].expand(b, n, c)
    if r.root:  # predictions are squares (>= 0); the clamp only guards the gradient at exactly 0
        pred, target = pred.clamp(min=1e-12).sqrt(), target.sqrt()
    return _mse(pred, target, valid)


class SegmentationCriterion(nn.Module):
    def __init__(self, num_classes: int, cfg: CriterionConfig | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.cfg = cfg or CriterionConfig()
        weight = torch.ones(num_classes + 1)
        weight[-1] = self.cfg.no_object_weight
        self.register_buffer("class_weights", weight, persistent=False)

    @torch.no_grad()
    def match(self, pred: Prediction, targets: list[Target]) -> list[tuple[Tensor, Tensor]]:
        c = self.cfg
        out = []
        for i, tgt in enumerate(targets):
            probs = pred.logits[i].float().softmax(-1)
            coords = torch.rand(1, c.num_points, 2, device=probs.device)
            pm = point_sample(pred.masks[i][:, None].float(), coords.expand(pred.masks.shape[1], -1, -1))
            tm = point_sample(tgt.masks[:, None], coords.expand(len(tgt.classes), -1, -1))
            cost = (c.mask_weight * pairwise_bce(pm, tm) + c.dice_weight * pairwise_dice(pm, tm)
                    - c.class_weight * probs[:, tgt.classes])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return out

    def _uncertain_points(self, logits: Tensor) -> Tensor:
        """Mask2Former's importance sampling: the most uncertain of 3x oversampled points,
        plus uniform ones."""
        c = self.cfg
        n = logits.shape[0]
        sampled = int(c.num_points * c.oversample_ratio)
        coords = torch.rand(n, sampled, 2, device=logits.device)
        uncertainty = -point_sample(logits, coords).abs()
        k = int(c.importance_sample_ratio * c.num_points)
        idx = uncertainty.topk(k, dim=1).indices
        coords = coords.gather(1, idx[..., None].expand(-1, -1, 2))
        if c.num_points - k > 0:
            coords = torch.cat([coords, torch.rand(n, c.num_points - k, 2, device=logits.device)], 1)
        return coords

    def _losses(self, pred: Prediction, targets: list[Target], num_masks: Tensor) -> dict[str, Tensor]:
        indices = self.match(pred, targets)
        b, q = pred.logits.shape[:2]
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=pred.logits.device)
        target_classes[batch_idx, src_idx] = torch.cat(
            [t.classes[tgt] for t, (_, tgt) in zip(targets, indices)]).to(target_classes.device)
        loss_ce = F.cross_entropy(pred.logits.float().transpose(1, 2), target_classes,
                                  self.class_weights.to(pred.logits.device))
        src_masks = pred.masks[batch_idx, src_idx][:, None].float()
        tgt_masks = torch.cat([t.masks[tgt] for t, (_, tgt) in zip(targets, indices)])[:, None]
        with torch.no_grad():
            coords = self._uncertain_points(src_masks)
            labels = point_sample(tgt_masks, coords)
        logits = point_sample(src_masks, coords)
        loss_mask = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
        p = logits.sigmoid()
        dice = 1 - (2 * (p * labels).sum(-1) + 1) / (p.sum(-1) + labels.sum(-1) + 1)
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": dice.sum() / num_masks}

    def score_loss(self, records: list[UpsampleRecord], labels: Tensor,
                   maps: dict[int, Tensor] | None = None) -> Tensor:
        """MSE of every upsampling block's predicted edge fractions (of its tokens, or of
        their cells where the heads predict cells), summed over blocks. ``maps``: the edge
        fractions {patch: (B, H/p, W/p)} if the loader has them already; the others are
        computed from ``labels``."""
        scored = [r for r in records if r.scores is not None]
        if not scored:
            return labels.new_zeros((), dtype=torch.float32)
        maps = dict(maps or {})
        missing = {_target_side(r) for r in scored} - maps.keys()
        if missing:
            maps.update(edge_scores(labels, missing, self.cfg.ignore_index, self.cfg.edge_radius))
        return sum(_block_score_loss(r, maps) for r in scored)

    def forward(self, predictions: list[Prediction], labels: Tensor,
                records: list[UpsampleRecord] | None = None,
                score_maps: dict[int, Tensor] | None = None) -> dict[str, Tensor]:
        """``predictions``: deep supervision order, the final one last. Returns each term
        (final prediction unprefixed, earlier ones as ``aux{i}_``) and the weighted ``loss``."""
        c = self.cfg
        targets = semantic_targets(labels, self.num_classes, c.ignore_index)
        num_masks = torch.tensor(float(sum(len(t.classes) for t in targets)), device=labels.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            num_masks = num_masks / dist.get_world_size()
        num_masks = num_masks.clamp(min=1)
        terms: dict[str, Tensor] = {}
        total = 0.0
        # the final prediction first, then the earlier ones in order (Mask2Former's order)
        named = [("", predictions[-1])]
        if c.deep_supervision:
            named += [(f"aux{i}_", p) for i, p in enumerate(predictions[:-1])]
        for prefix, pred in named:
            losses = self._losses(pred, targets, num_masks)
            total = total + c.class_weight * losses["loss_ce"] + c.mask_weight * losses["loss_mask"] \
                + c.dice_weight * losses["loss_dice"]
            terms.update({prefix + k: v for k, v in losses.items()})
        if records is not None:
            terms["loss_score"] = self.score_loss(records, labels, score_maps)
            total = total + c.score_weight * terms["loss_score"]
        terms["loss"] = total
        return terms
