"""SAM's automatic mask generation as a class-agnostic instance proposer (OVDiff puts it in CutLER's place):
a point grid over one crop, the three multimask outputs per point, the predicted-IoU and stability filters and
box NMS, with transformers' `SamModel` (segment-anything's own package is not a dependency)."""
from __future__ import annotations

import math

import torch
from PIL import Image

from ovss.models.devices import model_device_dtype

#: segment-anything's SamAutomaticMaskGenerator defaults
SAM_POINTS, SAM_IOU, SAM_STABILITY, SAM_NMS = 32, 0.88, 0.95, 0.7
#: its stability score: the mask area at logit > +offset over the area at logit > −offset
STABILITY_OFFSET = 1.0


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(R, H, W) bool -> (R, 4) float boxes x0, y0, x1, y1 (inclusive pixel extents)."""
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(masks.shape[1], dtype=torch.float32)
    ar_w = torch.arange(masks.shape[2], dtype=torch.float32)
    y0 = torch.where(rows, ar_h, math.inf).amin(1)
    y1 = torch.where(rows, ar_h, -math.inf).amax(1)
    x0 = torch.where(cols, ar_w, math.inf).amin(1)
    x1 = torch.where(cols, ar_w, -math.inf).amax(1)
    return torch.stack([x0, y0, x1, y1], 1)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS (torchvision's rule, which is not available here): kept indices by decreasing score."""
    order = torch.argsort(scores, descending=True, stable=True)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep: list[int] = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        iou = inter / (area[i] + area - inter).clamp(min=1e-9)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


@torch.no_grad()
def sam_instances(sam, image: Image.Image, *, points_per_side: int = SAM_POINTS, pred_iou_thresh: float = SAM_IOU,
                  stability_thresh: float = SAM_STABILITY, nms_thresh: float = SAM_NMS, points_batch: int = 64
                  ) -> torch.Tensor:
    """Class-agnostic masks (R, H, W) bool: SAM's automatic mask generation on one crop (a point grid, the
    three multimask outputs per point, predicted-IoU and stability filters, box NMS)."""
    model, proc = sam.model, sam.processor
    device, dtype = model_device_dtype(model)
    inputs = proc(images=image, return_tensors="pt")
    embeddings = model.get_image_embeddings(inputs["pixel_values"].to(device=device, dtype=dtype))
    h, w = image.height, image.width
    rh, rw = (int(v) for v in inputs["reshaped_input_sizes"][0])
    grid = (torch.arange(points_per_side, dtype=torch.float32) + 0.5) / points_per_side
    ys, xs = torch.meshgrid(grid * h, grid * w, indexing="ij")
    points = torch.stack([xs.flatten() * rw / w, ys.flatten() * rh / h], -1)
    masks, scores = [], []
    for s in range(0, len(points), points_batch):
        p = points[s:s + points_batch]
        out = model(image_embeddings=embeddings, input_points=p[None, :, None, :].to(device=device, dtype=dtype),
                    input_labels=torch.ones(1, len(p), 1, dtype=torch.long, device=device), multimask_output=True)
        logits = proc.post_process_masks([out.pred_masks[0].float().cpu()], inputs["original_sizes"],
                                         inputs["reshaped_input_sizes"], binarize=False)[0].flatten(0, 1)
        iou = out.iou_scores[0].float().cpu().flatten()
        stability = ((logits > STABILITY_OFFSET).sum(dim=(1, 2))
                     / (logits > -STABILITY_OFFSET).sum(dim=(1, 2)).clamp(min=1))
        binary = logits > 0
        keep = (iou > pred_iou_thresh) & (stability > stability_thresh) & binary.any(2).any(1)
        masks.append(binary[keep])
        scores.append(iou[keep])
    masks_t, scores_t = torch.cat(masks), torch.cat(scores)
    if len(masks_t) == 0:
        return masks_t
    return masks_t[box_nms(mask_boxes(masks_t), scores_t, nms_thresh)]
