"""Semantic-segmentation evaluation: aAcc, mAcc and mIoU in percent as mmsegmentation reports
them (single scale, multi-scale + flip, sliding window), per-class IoU and accuracy, FLOPs mean +- std per image, tokens per stage, score MSE, how the score heads
select against the ground truth (per upsampling block), pictures.

Each rank evaluates its share of the validation samples; the confusion matrix and the
per-image lists are summed/gathered across ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dups.models.edges import SCORE_SCALES, token_targets
from dups.models.ratios import RatioPolicy
from dups.models.segmentor import DUPSSegmentor, semantic_probabilities

from dups.config import EvalConfig
from dups.engine.distributed import all_reduce_sum
from dups.evaluation.measure import flop_counter
from dups.engine.progress import ProgressBar


def confusion(pred: torch.Tensor, label: torch.Tensor, classes: int, ignore: int = 255,
              name: str = "?") -> torch.Tensor:
    """classes x classes counts (rows: label, columns: prediction); a label value outside the
    classes (other than ``ignore``) is an error naming the sample ``name``."""
    keep = label != ignore
    bad = label[keep & ((label < 0) | (label >= classes))]
    if bad.numel():
        raise ValueError(f"sample {name}: label values {sorted(set(bad.tolist()))[:10]} are outside "
                         f"the {classes} classes (model.num_classes) and not the ignore value {ignore}")
    idx = label[keep].long() * classes + pred[keep].long()
    return torch.bincount(idx, minlength=classes * classes).reshape(classes, classes)


def scores_from_confusion(conf: torch.Tensor) -> dict:
    """mmsegmentation's metrics, in percent: ``aAcc`` (pixels right of all labelled), per-class
    ``IoU`` and ``Acc`` (right of the class's labelled pixels; nan where the class is in neither
    prediction nor label, resp. not in the label), ``mIoU`` and ``mAcc`` their means over the
    classes that are not nan."""
    conf = conf.double()
    tp, labelled = conf.diag(), conf.sum(1)
    union = conf.sum(0) + labelled - tp
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, 100 * tp / union.clamp(min=1), nan)
    acc = torch.where(labelled > 0, 100 * tp / labelled.clamp(min=1), nan)

    def mean(values: torch.Tensor) -> float:
        return float(values.nanmean()) if (~values.isnan()).any() else float("nan")
    total = float(labelled.sum())
    return {"aAcc": 100 * float(tp.sum()) / total if total else float("nan"),
            "mAcc": mean(acc), "mIoU": mean(iou), "IoU": iou.tolist(), "Acc": acc.tolist()}


@dataclass
class EvalResult:
    mIoU: float  # percent, as every figure of mmsegmentation's table
    mAcc: float
    aAcc: float
    per_class_iou: list[float]
    per_class_acc: list[float]
    images: int
    gflops_mean: float
    gflops_std: float
    tokens_per_stage: list[float]
    score_mse: float
    pictures: list = field(default_factory=list)  # PIL images (rank 0's first ones)
    # Per upsampling block (scales 32, 16, 8), mean over images: the fraction of its
    # candidates it split, and the fraction eq. 1 would split with the ground-truth scores
    # (edge fraction > tau_s): a trained head should come near it. Edge recall: of the
    # candidates whose ground truth exceeds tau_s, the fraction split (all images pooled).
    split_ratio: list[float] = field(default_factory=list)
    oracle_ratio: list[float] = field(default_factory=list)
    edge_recall: list[float] = field(default_factory=list)
    # How selective each block's score head is, over every candidate it scored (all images
    # pooled; evaluate with policy "full" to score every token): the ranking AUC of edge
    # tokens (true fraction > tau_s) above flat ones, and the share of flat tokens it
    # predicts at or under tau_s (eq. 1 leaves them unsplit). A head that predicts the mean
    # everywhere has AUC ~0.5 and keeps no flat token; a selective one has both near 1.
    score_auc: list[float] = field(default_factory=list)
    flat_kept: list[float] = field(default_factory=list)

    def metrics(self, prefix: str = "val/") -> dict[str, float]:
        out = {f"{prefix}mIoU": self.mIoU, f"{prefix}mAcc": self.mAcc, f"{prefix}aAcc": self.aAcc,
               f"{prefix}gflops_mean": self.gflops_mean,
               f"{prefix}gflops_std": self.gflops_std, f"{prefix}score_mse": self.score_mse}
        out.update({f"{prefix}tokens_stage{i + 1}": t for i, t in enumerate(self.tokens_per_stage)})
        for name in ("split_ratio", "oracle_ratio", "edge_recall", "score_auc", "flat_kept"):
            out.update({f"{prefix}{name}_block{i + 1}": v for i, v in enumerate(getattr(self, name))})
        return out

    def table(self, class_names: list[str]) -> str:
        def cell(value: float) -> str:
            return f"{'-' if math.isnan(value) else f'{value:.2f}':>8}"
        names = list(class_names) + [f"class {i}" for i in range(len(class_names), len(self.per_class_iou))]
        lines = [f"{'class':<24}{'IoU':>8}{'Acc':>8}"]
        for name, iou, acc in zip(names, self.per_class_iou, self.per_class_acc):
            lines.append(f"{name[:23]:<24}{cell(iou)}{cell(acc)}")
        lines.append(f"{'aAcc':>8}{'mIoU':>8}{'mAcc':>8}")
        lines.append(f"{cell(self.aAcc)}{cell(self.mIoU)}{cell(self.mAcc)}")
        lines.append(f"GFLOPs per image (multiply-adds): {self.gflops_mean:.2f} +- {self.gflops_std:.2f} "
                     f"over {self.images} images; tokens per stage "
                     + " / ".join(f"{t:.0f}" for t in self.tokens_per_stage))
        if self.split_ratio:
            lines.append(self.selection_line())
        return "\n".join(lines)

    def selection_line(self) -> str:
        """The upsampling blocks' choices against the ground truth, in one line."""
        def row(values: list[float], fmt: str) -> str:
            return " / ".join("-" if math.isnan(v) else format(v, fmt) for v in values)
        line = (f"upsampling blocks (scales 32 / 16 / 8) split {row(self.split_ratio, '.2f')} of their "
                f"candidates; the ground truth (eq. 1 on true edge fractions) would split "
                f"{row(self.oracle_ratio, '.2f')}; edge tokens split {row(self.edge_recall, '.0%')}")
        if self.score_auc:
            line += (f"; score heads rank edge over flat tokens with AUC {row(self.score_auc, '.2f')} "
                     f"and keep {row(self.flat_kept, '.0%')} of flat tokens under tau")
        return line


def _probs(model: DUPSSegmentor, image: torch.Tensor, policy: RatioPolicy, size,
           oracle_maps: dict | None = None) -> tuple[torch.Tensor, object]:
    """Class probabilities of one padded image (1, 3, H, W) at ``size``, and the model output
    (``oracle_maps``: ground-truth edge fractions that choose the tokens, Table 7)."""
    out = model(image, policy, oracle_maps)
    h, w = image.shape[-2:]
    return semantic_probabilities(out.final, (h, w))[..., : size[0], : size[1]], out


def window_starts(length: int, window: int, stride: int = 0) -> list[int]:
    """Where the windows along one side begin. ``stride``: mmseg's slide inference, which
    SegFormer's Cityscapes evaluation uses (1024 windows, stride 768: a 2048-wide image gets
    three, at 0, 768 and 1024); 0: as few windows as cover the side, evenly spread."""
    if length <= window:
        return [0]
    if stride:
        n = (length - window + stride - 1) // stride + 1
        return [min(i * stride, length - window) for i in range(n)]
    n = math.ceil(length / window)
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def sliding_window(model, image, policy, size, window: int, stride: int = 0):
    """Overlapping window x window crops (``window_starts``), probabilities averaged where
    they overlap."""
    h, w = size
    total, count, out = None, torch.zeros(h, w, device=image.device), None
    for top in window_starts(h, window, stride):
        for left in window_starts(w, window, stride):
            crop = image[..., top:top + window, left:left + window]
            ch, cw = min(window, h - top), min(window, w - left)
            crop = F.pad(crop, (0, -crop.shape[-1] % 32, 0, -crop.shape[-2] % 32))
            p, out = _probs(model, crop, policy, (ch, cw))
            if total is None:
                total = torch.zeros(1, p.shape[1], h, w, device=image.device)
            total[..., top:top + ch, left:left + cw] += p
            count[top:top + ch, left:left + cw] += 1
    return total / count, out


def multi_scale(model, image, policy, size, scales, flip: bool):
    """Average of the probabilities at every short side in ``scales`` (and flipped)."""
    h, w = size
    base = image[..., :h, :w]
    total, out = 0, None
    for short in scales:
        s = short / min(h, w)
        nh, nw = max(32, round(h * s)), max(32, round(w * s))
        resized = F.interpolate(base, size=(nh, nw), mode="bilinear", align_corners=False)
        padded = F.pad(resized, (0, -nw % 32, 0, -nh % 32))
        for flipped in ([False, True] if flip else [False]):
            x = padded.flip(-1) if flipped else padded
            p, o = _probs(model, x, policy, (nh, nw))
            out = out or o
            p = p.flip(-1) if flipped else p
            total = total + F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
    return total, out


@torch.no_grad()
def evaluate(model: DUPSSegmentor, samples, classes: int, policy: RatioPolicy, cfg: EvalConfig,
             crop: int, device: torch.device, dtype=torch.float32, pictures: int = 0,
             oracle: bool | tuple[int, ...] = False, progress: bool = True) -> EvalResult:
    """``samples``: an iterable of ``augment.eval_segmentation`` dicts (this rank's share).
    ``oracle``: the samples' ground-truth edge fractions choose the tokens (Table 7's oracle;
    single scale only), at every block or at the blocks (1, 2, 3) listed, the heads at the
    others. ``progress``: a bar on rank 0."""
    from dups.evaluation.pictures import token_figure

    if oracle and (cfg.sliding_window or cfg.multi_scale or cfg.flip):
        raise ValueError("oracle token selection is single-scale only: turn off sliding_window, "
                         "multi_scale and flip")
    model.eval()
    conf = torch.zeros(classes, classes, dtype=torch.long)
    flops, tokens, mse, figs = [], [], [], []
    selection = []  # per image: [(split, candidates, oracle split, edge tokens split), ...] per block
    scored = []  # per image: [(predicted, true edge fractions), ...] per block that scored
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    bar = ProgressBar(len(samples) if hasattr(samples, "__len__") else None, "eval", "img", disable=rank != 0 or not progress)
    for sample in samples:
        bar.update(1)
        image = sample["image"][None].to(device, dtype)
        label = sample["label"]
        h, w = sample["size"]
        with flop_counter() as counter:  # the model's multiply-adds, as count_gmacs
            if cfg.sliding_window:
                probs, out = sliding_window(model, image, policy, (h, w), crop, cfg.window_stride)
            elif cfg.multi_scale or cfg.flip:
                probs, out = multi_scale(model, image, policy, (h, w),
                                         cfg.scales if cfg.multi_scale else (min(h, w),), cfg.flip)
            else:
                maps = _oracle_maps(sample["scores"], oracle, device)
                probs, out = _probs(model, image, policy, (h, w), maps)
        flops.append(counter.get_total_flops() / 2 / 1e9)
        tokens.append(out.tokens_per_stage)
        full = F.interpolate(probs.float(), size=label.shape, mode="bilinear", align_corners=False)
        pred = full.argmax(1)[0].cpu()
        conf += confusion(pred, label, classes, name=sample.get("key", "?"))
        if not (cfg.sliding_window or cfg.multi_scale or cfg.flip):
            per_block, pairs = [], []
            for block, rec in enumerate(out.records):
                centres, scores, selected = rec.of_image(0)
                target = token_targets(sample["scores"][rec.patch][None].to(device), centres[None], rec.patch)[0]
                if scores is not None and scores.shape[0]:
                    mse.append(float(((scores.float() - target) ** 2).mean()))
                if scores is not None:
                    pairs.append((scores.float().cpu().numpy(), target.cpu().numpy()))
                per_block.append(_selection_counts(selected, target > policy.tau[block]))
            selection.append(per_block)
            scored.append(pairs)
        if len(figs) < pictures:
            seen = F.interpolate(full, size=(h, w), mode="bilinear").argmax(1)[0].cpu().numpy()
            lab = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long().numpy()
            figs.append(token_figure(image[0], lab, seen, out.records, classes))
    bar.close()
    if dist.is_available() and dist.is_initialized():
        conf = all_reduce_sum(conf)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (flops, tokens, mse, selection, scored))
        flops = [f for g in gathered for f in g[0]]
        tokens = [t for g in gathered for t in g[1]]
        mse = [m for g in gathered for m in g[2]]
        selection = [c for g in gathered for c in g[3]]
        scored = [c for g in gathered for c in g[4]]
    scores = scores_from_confusion(conf)
    model.train()
    return EvalResult(
        mIoU=scores["mIoU"], mAcc=scores["mAcc"], aAcc=scores["aAcc"], per_class_iou=scores["IoU"],
        per_class_acc=scores["Acc"], images=len(flops),
        gflops_mean=float(np.mean(flops)) if flops else float("nan"),
        gflops_std=float(np.std(flops)) if flops else float("nan"),
        tokens_per_stage=np.mean(tokens, axis=0).tolist() if tokens else [],
        score_mse=float(np.mean(mse)) if mse else float("nan"), pictures=figs,
        **_selection_summary(selection), **_head_quality(scored, policy.tau))


def _oracle_maps(maps: dict, oracle: bool | tuple[int, ...], device) -> dict | None:
    """A sample's edge fractions for the blocks the oracle chooses at (``evaluate``'s ``oracle``)."""
    if not oracle:
        return None
    sides = SCORE_SCALES if oracle is True else tuple(SCORE_SCALES[b - 1] for b in oracle)
    return {k: maps[k][None].to(device) for k in sides}


def _selection_counts(selected: torch.Tensor, edge: torch.Tensor) -> tuple[int, int, int, int]:
    """(tokens split, candidates, candidates the ground truth would split, of those split)."""
    chosen = torch.zeros_like(edge)
    chosen[selected] = True
    return (int(chosen.sum()), edge.numel(), int(edge.sum()), int((chosen & edge).sum()))


def _selection_summary(selection: list) -> dict[str, list[float]]:
    """Per block: the mean split and ground-truth ratios over the images where the block had
    candidates, and the pooled edge recall (nan where no candidate was an edge token)."""
    if not selection:
        return {}
    split, candidates, oracle, hits = np.moveaxis(np.array(selection, dtype=np.float64), -1, 0)
    seen = candidates > 0  # (images, blocks)

    def mean_ratio(count: np.ndarray) -> list[float]:
        return [float(np.mean(count[seen[:, b], b] / candidates[seen[:, b], b]))
                if seen[:, b].any() else float("nan") for b in range(seen.shape[1])]
    edges, found = oracle.sum(0), hits.sum(0)
    return {"split_ratio": mean_ratio(split), "oracle_ratio": mean_ratio(oracle),
            "edge_recall": [float(f / e) if e else float("nan") for f, e in zip(found, edges)]}


def _head_quality(scored: list, tau) -> dict[str, list[float]]:
    """Per block, over all images' candidates: AUC of edge tokens (true fraction > tau)
    ranked above flat ones (Mann-Whitney U / (n_edge n_flat), ties counted half), and the
    share of flat tokens predicted at or under tau."""
    from scipy.stats import mannwhitneyu

    if not scored or not any(scored):
        return {}
    auc, kept = [], []
    for block in range(max(len(pairs) for pairs in scored)):
        pred = np.concatenate([p[block][0] for p in scored if len(p) > block] or [np.zeros(0)])
        true = np.concatenate([p[block][1] for p in scored if len(p) > block] or [np.zeros(0)])
        edge = true > tau[block]
        flat = ~edge
        both = edge.any() and flat.any()
        auc.append(float(mannwhitneyu(pred[edge], pred[flat]).statistic / (edge.sum() * flat.sum()))
                   if both else float("nan"))
        kept.append(float((pred[flat] <= tau[block]).mean()) if flat.any() else float("nan"))
    return {"score_auc": auc, "flat_kept": kept}


@torch.no_grad()
def evaluate_classification(model, samples, device, dtype=torch.float32, batch: int = 32) -> dict:
    """Top-1 / top-5 accuracy (in percent) over this rank's samples, summed across ranks.
    The random token selection draws from its own seeded generator state: the same weights
    always give the same accuracy, and training's random state is left as it was."""
    from dups.models.ratios import RatioPolicy

    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # top1, top5, n
    policy = RatioPolicy("random", random_ratio=model.schedule[1])  # the end-of-schedule ratio
    buf = []
    def flush():
        images = torch.stack([s["image"] for s in buf]).to(device, dtype)
        labels = torch.stack([s["label"] for s in buf]).to(device)
        top = model(images, policy).float().topk(min(5, model.head[-1].out_features), 1).indices
        counts[0] += float((top[:, 0] == labels).sum())
        counts[1] += float((top == labels[:, None]).any(1).sum())
        counts[2] += len(buf)
        buf.clear()
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(0)
        for s in samples:
            buf.append(s)
            if len(buf) == batch:
                flush()
        if buf:
            flush()
    counts = all_reduce_sum(counts)
    model.train()
    n = max(counts[2].item(), 1)
    return {"val/top1": 100 * counts[0].item() / n, "val/top5": 100 * counts[1].item() / n,
            "val/images": counts[2].item()}
