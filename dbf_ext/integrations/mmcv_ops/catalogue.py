"""The names of ``mmcv._ext`` the shim does not compute, and who needs them.

mmcv's ``ext_loader.load_ext`` asserts at import time that every function an ``mmcv.ops``
module will call exists, so ``import mmcv.ops`` (and with it ``mmdet.models``) needs all of
them. The shim defines each of these names as a function raising ``NotImplementedError`` that
names the op and the models needing it. The lists are the union of the names that mmcv 1.7.2
and mmcv 2.1.0 check (a test compares them with the installed mmcv).
"""

from __future__ import annotations

# (mmcv op, the models / components that need it) -> the _ext functions behind it
_UNSUPPORTED_FAMILIES: dict[tuple[str, str], tuple[str, ...]] = {
    ("nms_match", "PISA's ScoreHLRSampler (mmdet)"): ("nms_match",),
    ("softmax_focal_loss", "SoftmaxFocalLoss (no standard mmdet detector)"): (
        "softmax_focal_loss_forward", "softmax_focal_loss_backward"),
    ("bbox_overlaps", "mmcv.ops.bbox_overlaps callers (mmdet uses its own bbox_overlaps)"): (
        "bbox_overlaps",),
    ("nms_quadri / box_iou_quadri", "quadrilateral-box detectors (mmrotate 1.x)"): (
        "nms_quadri", "box_iou_quadri"),
    ("DeformConv2d / ModulatedDeformConv2d", "DCN / DCNv2 backbones and heads (dcn configs, "
     "RepPoints, Deformable DETR's box refinement, S2A-Net's AlignConv, Oriented RepPoints)"): (
        "deform_conv_forward", "deform_conv_backward_input", "deform_conv_backward_parameters",
        "modulated_deform_conv_forward", "modulated_deform_conv_backward"),
    ("DeformRoIPool", "deformable RoI pooling heads"): (
        "deform_roi_pool_forward", "deform_roi_pool_backward"),
    ("RoIPool", "RoIPool-based RoI extractors (legacy Fast R-CNN configs)"): (
        "roi_pool_forward", "roi_pool_backward"),
    ("RoIAlignRotated (rotation-invariant)", "ReDet (mmrotate)"): (
        "riroi_align_rotated_forward", "riroi_align_rotated_backward"),
    ("active_rotated_filter / rotated_feature_align", "S2A-Net and R3Det (mmrotate)"): (
        "active_rotated_filter_forward", "active_rotated_filter_backward",
        "rotated_feature_align_forward", "rotated_feature_align_backward"),
    ("convex_iou / min_area_polygons / points_in_polygons / chamfer_distance",
     "Oriented RepPoints, CFA, SASM and G-Rep (mmrotate)"): (
        "convex_iou", "convex_giou", "min_area_polygons", "points_in_polygons_forward",
        "chamfer_distance_forward", "chamfer_distance_backward"),
    ("diff_iou_rotated_2d", "RotatedIoULoss (mmrotate)"): (
        "diff_iou_rotated_sort_vertices_forward",),
    ("CARAFE", "CARAFE FPN (mmdet)"): (
        "carafe_naive_forward", "carafe_naive_backward", "carafe_forward", "carafe_backward"),
    ("MaskedConv2d", "Guided Anchoring (mmdet)"): (
        "masked_im2col_forward", "masked_col2im_forward"),
    ("MultiScaleDeformableAttention", "Deformable DETR, DINO (mmdet)"): (
        "ms_deform_attn_forward", "ms_deform_attn_backward"),
    ("BorderAlign", "BorderDet"): ("border_align_forward", "border_align_backward"),
    ("PrRoIPool", "precise RoI pooling (IoU-Net style heads)"): (
        "prroi_pool_forward", "prroi_pool_backward", "prroi_pool_coor_backward"),
    ("SyncBatchNorm (mmcv's)", "configs with norm_cfg type 'MMSyncBN' (torch's SyncBN works)"): (
        "sync_bn_forward_mean", "sync_bn_forward_var", "sync_bn_forward_output",
        "sync_bn_backward_param", "sync_bn_backward_data"),
    ("PSAMask", "PSANet (mmsegmentation)"): ("psamask_forward", "psamask_backward"),
    ("pixel_group / contour_expand", "PANet / PSENet (mmocr)"): ("pixel_group", "contour_expand"),
    ("BezierAlign", "ABCNet (mmocr)"): ("bezier_align_forward", "bezier_align_backward"),
    ("TINShift", "TIN (mmaction2)"): ("tin_shift_forward", "tin_shift_backward"),
    ("Correlation", "optical flow models (mmflow)"): ("correlation_forward", "correlation_backward"),
    ("upfirdn2d / fused_bias_leakyrelu / bias_act / filtered_lrelu",
     "StyleGAN generators (mmagic)"): (
        "upfirdn2d", "fused_bias_leakyrelu", "bias_act", "filtered_lrelu", "filtered_lrelu_act_"),
    ("point-cloud ops", "3D detectors (mmdetection3d)"): (
        "assign_score_withk_forward", "assign_score_withk_backward", "ball_query_forward",
        "stack_ball_query_forward", "furthest_point_sampling_forward",
        "furthest_point_sampling_with_dist_forward", "gather_points_forward",
        "gather_points_backward", "group_points_forward", "group_points_backward",
        "stack_group_points_forward", "stack_group_points_backward", "knn_forward",
        "three_interpolate_forward", "three_interpolate_backward", "three_nn_forward",
        "iou3d_boxes_overlap_bev_forward", "iou3d_nms3d_forward", "iou3d_nms3d_normal_forward",
        "points_in_boxes_part_forward", "points_in_boxes_cpu_forward",
        "points_in_boxes_all_forward", "roiaware_pool3d_forward", "roiaware_pool3d_backward",
        "roipoint_pool3d_forward", "dynamic_point_to_voxel_forward",
        "dynamic_point_to_voxel_backward", "dynamic_voxelize_forward", "hard_voxelize_forward",
        "get_indice_pairs_2d_forward", "get_indice_pairs_3d_forward",
        "get_indice_pairs_4d_forward", "get_indice_pairs_2d_backward",
        "get_indice_pairs_3d_backward", "indice_conv_forward", "indice_conv_backward",
        "fused_indice_conv_forward", "indice_maxpool_forward", "indice_maxpool_backward"),
}

#: _ext function name -> (mmcv op, who needs it)
UNSUPPORTED: dict[str, tuple[str, str]] = {
    name: family for family, names in _UNSUPPORTED_FAMILIES.items() for name in names
}


def unsupported_message(name: str) -> str:
    """The one-line error of an unsupported ``_ext`` function."""
    op, users = UNSUPPORTED[name]
    return (
        f"mmcv._ext.{name} ({op}) is not provided by dbf_ext's mmcv._ext shim; needed by "
        f"{users}. Those models need a compiled mmcv (mmcv-full 1.x / mmcv 2.x built with ops)"
    )
