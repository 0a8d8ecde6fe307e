"""Rotated RoI Align (CPU and CUDA kernels in csrc/roi_align_rotated/) and its feature-pyramid
pooler :class:`MultiScaleRoIAlignRotated`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dbf_ext import _ext
from dbf_ext._validation import (
    as_integer,
    check_feature_map,
    check_positive_number,
    check_rotated_boxes,
    check_rotated_rois,
    check_same_device,
    check_size_pair,
)

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def roi_align_rotated(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
    clockwise: bool = True,
) -> Tensor:
    """Rotated RoI Align: bilinear samples of ``features`` averaged over each rotated RoI's bins.

    The operation of mmcv's ``RoIAlignRotated`` (the one mmrotate's Oriented R-CNN uses):

    * RoI ``(b, cx, cy, w, h, theta)`` is scaled by ``spatial_scale`` (centre and sides; theta
      in radians is kept). With ``aligned`` the centre then moves by -0.5 px, so that pixel
      centres sit at integer coordinates; without it ``w`` and ``h`` are raised to at least 1.
    * The RoI is cut into ``output_size`` bins along its own axes; a point ``(xx, yy)`` of the
      RoI frame (origin at the centre, ``w`` along ``xx``) lies at
      ``(cx + xx cos t - yy sin t, cy + xx sin t + yy cos t)``, ``t = theta`` with ``clockwise``
      (the ``w`` edge points along ``(cos theta, sin theta)`` in image coordinates, y down: the
      convention of :func:`box_iou_rotated`), ``t = -theta`` without.
    * Each bin averages a ``g_h x g_w`` grid of samples at bin-relative positions
      ``(i + 0.5) / g``: ``g = sampling_ratio``, or with 0 (adaptive) ``ceil(bin side)`` in map
      pixels. A RoI of zero size (possible with ``aligned``) gives 0.
    * A sample outside ``[-1, H] x [-1, W]`` contributes 0; the others are clamped to the map
      and interpolated bilinearly (as in ``torchvision.ops.roi_align``). With ``theta = 0`` and
      ``aligned=True`` the result is ``torchvision.ops.roi_align(..., aligned=True)``'s.

    Args:
        features: ``(B, C, H, W)`` feature map, float16, bfloat16, float32 or float64; any
            strides (read in place).
        rois: ``(K, 6)`` RoIs ``(batch_index, cx, cy, w, h, theta)`` in input-image pixels,
            theta in radians; the batch index an integer in ``[0, B)``, ``w, h >= 0``, every
            value finite.
            Same dtype as ``features``, or float32 with float16 / bfloat16 features (mixed
            precision keeps proposals in float32).
        output_size: ``oh`` = ``ow``, or ``(oh, ow)``: bins per RoI side.
        spatial_scale: map pixels per input pixel (``1 / stride``), > 0.
        sampling_ratio: samples per bin side, ``>= 0``; 0: adaptive, as above.
        aligned: the half-pixel shift of current detectors (mmrotate's configs: ``True``).
        clockwise: the angle convention, as above (mmrotate's configs: ``True``).

    Returns:
        ``(K, C, oh, ow)`` in the dtype of ``features`` (float16 / bfloat16 / float32 computed
        in float32, float64 in float64).

    Autograd: gradient w.r.t. ``features`` (and second order, the operation being linear in
    them); none w.r.t. ``rois`` (as in mmcv). The CPU backward pass is deterministic. The CUDA
    backward adds with float atomics, so the last bits of the gradient may vary between runs;
    with ``torch.use_deterministic_algorithms(True)`` it runs a deterministic kernel instead
    (one thread per channel: the same sums, far less parallel).

    Raises ``ValueError`` / ``TypeError`` for wrong shapes, dtypes, mismatched devices, and RoIs
    that are not finite, have a negative side, or whose batch index is not an integer in
    ``[0, B)``. Checking the RoIs' values reads three flags back from the GPU (one host
    synchronisation per call on CUDA). Under ``torch.compile`` that check is skipped; the
    kernels still never read outside the map (a non-finite RoI or one with a batch index out of
    range gives zeros).
    """
    options = _check_arguments(features, rois, output_size, spatial_scale, sampling_ratio)
    if not torch.compiler.is_compiling():
        _raise_for_roi_problems(_roi_problems(rois, features.shape[0]).tolist(), features.shape[0])
    return _roi_align_rotated_op(features, rois, *options, bool(aligned), bool(clockwise))


def _check_arguments(
    features: Tensor, rois: Tensor, output_size, spatial_scale, sampling_ratio
) -> tuple[int, int, float, int]:
    """Checks everything but the RoIs' values; returns (oh, ow, spatial_scale, sampling_ratio)."""
    check_feature_map("features", features)
    check_rotated_rois("rois", rois)
    check_same_device(features=features, rois=rois)
    _check_roi_dtype(rois.dtype, features.dtype)
    pooled_height, pooled_width = check_size_pair("output_size", output_size)
    scale = check_positive_number("spatial_scale", spatial_scale)
    ratio = as_integer("sampling_ratio", sampling_ratio, 0, "0: adaptive")
    return pooled_height, pooled_width, scale, ratio


def _check_roi_dtype(roi_dtype: torch.dtype, feature_dtype: torch.dtype) -> None:
    if roi_dtype == feature_dtype or (roi_dtype == torch.float32 and feature_dtype in _HALF_DTYPES):
        return
    raise TypeError(
        f"rois must have the features' dtype ({feature_dtype}), or float32 with float16 / "
        f"bfloat16 features; got {roi_dtype}"
    )


def _roi_problems(rois: Tensor, batch_size: int) -> Tensor:
    """``(3,)`` bool on the RoIs' device: (a value is not finite, a batch index is not an
    integer in [0, batch_size), a side is negative); no host synchronisation by itself."""
    batch_index = rois[:, 0]
    bad_index = (batch_index < 0) | (batch_index >= batch_size) | (batch_index != batch_index.floor())
    return torch.stack((~torch.isfinite(rois).all(), bad_index.any(), (rois[:, 3:5] < 0).any()))


def _raise_for_roi_problems(problems: list[bool], batch_size: int) -> None:
    not_finite, bad_index, negative_side = problems
    if not_finite:
        raise ValueError("rois must be finite: found NaN or infinity")
    if bad_index:
        raise ValueError(
            f"rois[:, 0] must be batch indices: integers in [0, {batch_size}) for a feature map "
            f"of batch size {batch_size}"
        )
    if negative_side:
        raise ValueError("rois: w and h (columns 3 and 4) must be >= 0")


def _geometry(rois: Tensor, map_shape, pooled_height, pooled_width, spatial_scale,
              sampling_ratio, aligned, clockwise):
    """The kernels' RoiAlignRotatedGeometry for contiguous compute-dtype ``rois``."""
    geometry = _ext.extension().RoiAlignRotatedGeometry()
    geometry.rois = rois.data_ptr()
    geometry.num_rois = rois.shape[0]
    geometry.batch, geometry.channels, geometry.height, geometry.width = map_shape
    geometry.pooled_height, geometry.pooled_width = pooled_height, pooled_width
    geometry.spatial_scale = spatial_scale
    geometry.sampling_ratio = sampling_ratio
    geometry.aligned = aligned
    geometry.clockwise = clockwise
    return geometry


@torch.library.custom_op("dbf_ext::roi_align_rotated", mutates_args=())
def _roi_align_rotated_op(
    features: Tensor,
    rois: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
) -> Tensor:
    compute = _ext.compute_dtype(features.dtype)
    shape = (rois.shape[0], features.shape[1], pooled_height, pooled_width)
    if features.numel() == 0:  # nothing to sample: every bin averages zeros
        return features.new_zeros(shape)
    output = torch.empty(shape, dtype=compute, device=features.device)
    if output.numel() == 0:
        return output.to(features.dtype)
    rois = rois.to(compute).contiguous()
    _ext.launch(
        "roi_align_rotated_forward",
        features.device,
        _geometry(rois, features.shape, pooled_height, pooled_width, spatial_scale,
                  sampling_ratio, aligned, clockwise),
        features.data_ptr(),
        _ext.dtype_code(features.dtype),
        features.stride(),
        output.data_ptr(),
    )
    return output.to(features.dtype)


@_roi_align_rotated_op.register_fake
def _(features, rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned,
      clockwise):
    return features.new_empty((rois.shape[0], features.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("dbf_ext::roi_align_rotated_backward", mutates_args=())
def _roi_align_rotated_backward_op(
    grad_output: Tensor,
    rois: Tensor,
    batch: int,
    height: int,
    width: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
) -> Tensor:
    """The gradient w.r.t. the ``(batch, C, height, width)`` map, in grad_output's dtype."""
    num_rois, channels, pooled_height, pooled_width = grad_output.shape
    compute = _ext.compute_dtype(grad_output.dtype)
    grad_features = torch.zeros(
        (batch, channels, height, width), dtype=compute, device=grad_output.device
    )
    if grad_output.numel() == 0 or grad_features.numel() == 0:
        return grad_features.to(grad_output.dtype)
    rois = rois.to(compute).contiguous()
    grad_output = grad_output.to(compute).contiguous()
    _ext.launch(
        "roi_align_rotated_backward",
        grad_output.device,
        _geometry(rois, grad_features.shape, pooled_height, pooled_width, spatial_scale,
                  sampling_ratio, aligned, clockwise),
        _ext.dtype_code(compute),
        grad_output.data_ptr(),
        grad_features.data_ptr(),
        cuda_args=(torch.are_deterministic_algorithms_enabled(),),
    )
    return grad_features.to(grad_output.dtype)


@_roi_align_rotated_backward_op.register_fake
def _(grad_output, rois, batch, height, width, spatial_scale, sampling_ratio, aligned, clockwise):
    return grad_output.new_empty((batch, grad_output.shape[1], height, width))


def _setup_forward_context(ctx, inputs, output) -> None:
    features, rois, pooled_height, pooled_width, *options = inputs
    ctx.save_for_backward(rois)
    ctx.map_extent = (features.shape[0], features.shape[2], features.shape[3])
    ctx.options = options


def _forward_backward(ctx, grad_output):
    (rois,) = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad_features = _roi_align_rotated_backward_op(
            grad_output, rois, *ctx.map_extent, *ctx.options
        )
    return (grad_features,) + (None,) * 7


# The backward pass is linear in grad_output and its adjoint is the forward pass: second-order
# gradients (gradgradcheck, double backward) come from the forward kernel.
def _setup_backward_context(ctx, inputs, output) -> None:
    grad_output, rois, _batch, _height, _width, *options = inputs
    ctx.save_for_backward(rois)
    ctx.pooled = (grad_output.shape[2], grad_output.shape[3])
    ctx.options = options


def _backward_backward(ctx, grad_grad_features):
    (rois,) = ctx.saved_tensors
    grad_grad_output = None
    if ctx.needs_input_grad[0]:
        grad_grad_output = _roi_align_rotated_op(grad_grad_features, rois, *ctx.pooled, *ctx.options)
    return (grad_grad_output,) + (None,) * 8


_roi_align_rotated_op.register_autograd(_forward_backward, setup_context=_setup_forward_context)
_roi_align_rotated_backward_op.register_autograd(
    _backward_backward, setup_context=_setup_backward_context
)


class MultiScaleRoIAlignRotated(nn.Module):
    """Rotated RoI Align over a feature pyramid: each RoI is pooled from one level, chosen by its
    size as mmdetection's ``SingleRoIExtractor`` (mmrotate's ``RotatedSingleRoIExtractor``) does.

    The call mirrors ``torchvision.ops.MultiScaleRoIAlign``: ``pool(features, rois,
    image_shapes)`` with the backbone's ``OrderedDict`` of maps, the RoIs of each image, and the
    images' ``(height, width)`` after resizing (before batching pads them).

    Level of a RoI ``(cx, cy, w, h, theta)`` (input pixels):
    ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))``, clamped to ``[0, levels - 1]``; with
    the default 56, RoIs below 112 px go to the finest level, below 224 px to the next, ...

    Strides: with ``strides=None`` each level's scale is inferred as torchvision does, from the
    ratio of its size to the largest image height and width, rounded to a power of 2 (both
    sides must agree); ``strides`` gives them instead (then ``image_shapes`` is not needed).
    Levels must go from finest to coarsest.

    Args:
        featmap_names: keys of the levels in ``features``, finest first (e.g.
            ``["0", "1", "2", "3"]`` for torchvision's FPN at strides 4 to 32).
        output_size: bins per RoI side, ``int`` or ``(oh, ow)``.
        sampling_ratio: samples per bin side; 0: adaptive (see :func:`roi_align_rotated`).
            mmrotate's Oriented R-CNN uses 2 (``sample_num=2``), its other configs 0.
        finest_scale: mmdetection's ``finest_scale`` (56).
        strides: optional per-level strides in input pixels, finest first.
        aligned, clockwise: as in :func:`roi_align_rotated` (mmrotate: both True).

    Forward:
        features: mapping from name to ``(B, C, H_l, W_l)`` maps (one dtype, device and ``C``).
        rois: a list of ``B`` tensors ``(K_i, 5)`` = ``(cx, cy, w, h, theta)`` (one per image),
            or one ``(K, 6)`` tensor ``(batch_index, cx, cy, w, h, theta)``.
        image_shapes: ``B`` pairs ``(height, width)``; needed unless ``strides`` was given.

    Returns ``(K, C, oh, ow)``, rows in the order of the RoIs (image by image for a list).
    Gradients reach every level given (zeros where no RoI was pooled), as for
    :func:`roi_align_rotated`. One read-back per call (the RoIs per level, with the check of the
    RoIs' values).
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int | tuple[int, int],
        sampling_ratio: int = 0,
        *,
        finest_scale: float = 56.0,
        strides: Sequence[int] | None = None,
        aligned: bool = True,
        clockwise: bool = True,
    ) -> None:
        super().__init__()
        names = list(featmap_names) if not isinstance(featmap_names, str) else None
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError(f"featmap_names must be a non-empty list of distinct str, got {featmap_names!r}")
        self.featmap_names = names
        self.output_size = check_size_pair("output_size", output_size)
        self.sampling_ratio = as_integer("sampling_ratio", sampling_ratio, 0, "0: adaptive")
        self.finest_scale = check_positive_number("finest_scale", finest_scale)
        self.strides = None if strides is None else self._check_strides(strides)
        self.aligned = bool(aligned)
        self.clockwise = bool(clockwise)

    def _check_strides(self, strides: Sequence[int]) -> tuple[int, ...]:
        values = tuple(as_integer(f"strides[{i}]", s, 1) for i, s in enumerate(strides))
        if len(values) != len(self.featmap_names):
            raise ValueError(
                f"strides must give one stride per level ({len(self.featmap_names)}), got {values}"
            )
        _check_finest_first(values)
        return values

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, finest_scale={self.finest_scale}, "
            f"strides={self.strides}, aligned={self.aligned}, clockwise={self.clockwise}"
        )

    def map_levels(self, rois: Tensor) -> Tensor:
        """``(K,)`` int64 level of each ``(K, 6)`` RoI (mmdetection's ``map_roi_levels``; a NaN
        size gives level 0, to be refused by the forward pass's check)."""
        sides = rois[:, 3:5].to(torch.promote_types(rois.dtype, torch.float32))
        scale = torch.sqrt(sides[:, 0] * sides[:, 1])
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.nan_to_num(0.0).clamp(0, len(self.featmap_names) - 1).long()

    def forward(
        self,
        features: Mapping[str, Tensor],
        rois: Sequence[Tensor] | Tensor,
        image_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        maps = self._levels(features)
        batch_size = maps[0].shape[0]
        rois = _batched_rois(rois, batch_size, maps[0])
        pooled_height, pooled_width = self.output_size
        for name, level in zip(self.featmap_names, maps):
            _check_arguments(level, rois, self.output_size, 1.0, self.sampling_ratio)
            if level.shape[:2] != maps[0].shape[:2] or level.dtype != maps[0].dtype:
                raise ValueError(
                    f"every level must have the batch size, channels and dtype of "
                    f"{self.featmap_names[0]!r} {tuple(maps[0].shape[:2])} {maps[0].dtype}; "
                    f"{name!r} has {tuple(level.shape[:2])} {level.dtype}"
                )
        scales = self._scales(maps, image_shapes)
        levels = self.map_levels(rois)
        order = torch.argsort(levels, stable=True)
        counts = torch.bincount(levels, minlength=len(maps))
        # The one read-back: RoIs per level and the check of the RoIs' values.
        *counts, not_finite, bad_index, negative_side = torch.cat(
            (counts, _roi_problems(rois, batch_size).long())
        ).tolist()
        _raise_for_roi_problems([not_finite, bad_index, negative_side], batch_size)
        pooled = [
            _roi_align_rotated_op(level, level_rois, pooled_height, pooled_width, scale,
                                  self.sampling_ratio, self.aligned, self.clockwise)
            for level, level_rois, scale in zip(maps, rois[order].split(counts), scales)
        ]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0], device=order.device)
        return torch.cat(pooled).index_select(0, inverse)

    def _levels(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        if not isinstance(features, Mapping):
            raise TypeError(
                f"features must be a mapping from level name to (B, C, H, W) maps, got "
                f"{type(features).__name__}"
            )
        missing = [name for name in self.featmap_names if name not in features]
        if missing:
            raise ValueError(f"features has no level {missing} (it has {list(features)})")
        return [check_feature_map(f"features[{name!r}]", features[name]) for name in self.featmap_names]

    def _scales(self, maps: list[Tensor], image_shapes) -> list[float]:
        if self.strides is not None:
            return [1.0 / s for s in self.strides]
        if image_shapes is None or len(image_shapes) == 0:
            raise ValueError(
                "image_shapes (the (height, width) of each image) is needed to infer the levels' "
                "strides; or give strides= to MultiScaleRoIAlignRotated"
            )
        image_height = max(int(shape[0]) for shape in image_shapes)
        image_width = max(int(shape[1]) for shape in image_shapes)
        scales = []
        for name, level in zip(self.featmap_names, maps):
            # torchvision's rule: the nearest power of 2 to the map-to-image size ratio.
            by_height, by_width = (
                2.0 ** round(math.log2(size / image)) if size > 0 else 0.0
                for size, image in ((level.shape[2], image_height), (level.shape[3], image_width))
            )
            if by_height != by_width or by_height == 0.0:
                raise ValueError(
                    f"cannot infer the stride of level {name!r}: map {tuple(level.shape[2:])} for "
                    f"images up to {(image_height, image_width)} gives scales {by_height} and "
                    f"{by_width}; give strides= to MultiScaleRoIAlignRotated"
                )
            scales.append(by_height)
        _check_finest_first([1.0 / s for s in scales])
        return scales


def _check_finest_first(strides: Sequence[float]) -> None:
    if any(a >= b for a, b in zip(strides, strides[1:])):
        raise ValueError(f"levels must go from finest to coarsest (increasing strides), got strides {tuple(strides)}")


def _batched_rois(rois: Sequence[Tensor] | Tensor, batch_size: int, features: Tensor) -> Tensor:
    """``(K, 6)`` RoIs from per-image ``(K_i, 5)`` boxes (or as given when already ``(K, 6)``);
    an empty batch has no RoIs (of the features' dtype and device)."""
    if isinstance(rois, Tensor):
        return check_rotated_rois("rois", rois)
    if not isinstance(rois, Sequence):
        raise TypeError(f"rois must be a list of (K_i, 5) tensors or a (K, 6) tensor, got {type(rois).__name__}")
    if len(rois) != batch_size:
        raise ValueError(f"rois must hold one (K_i, 5) tensor per image ({batch_size}), got {len(rois)}")
    for i, boxes in enumerate(rois):
        check_rotated_boxes(f"rois[{i}]", boxes)
    if len({(b.dtype, b.device) for b in rois}) > 1:
        raise ValueError("the rois of all images must have one dtype and device")
    if batch_size == 0:
        return features.new_zeros((0, 6))
    batch_index = torch.cat([
        torch.full((boxes.shape[0], 1), i, dtype=boxes.dtype, device=boxes.device)
        for i, boxes in enumerate(rois)
    ])
    return torch.cat((batch_index, torch.cat(list(rois))), dim=1)
