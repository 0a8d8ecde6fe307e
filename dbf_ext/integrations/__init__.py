"""Adapters that put dbf_ext into existing detection frameworks.

Each framework has its own submodule, imported explicitly so that ``import dbf_ext`` never pulls
in a framework that is not needed:

* :mod:`dbf_ext.integrations.torchvision`: ``DynamicRoIHeads`` / ``use_dynamic_roi_heads``
  (Dynamic R-CNN with the fused assignment kernel) for torchvision's Faster R-CNN.
* :mod:`dbf_ext.integrations.mmcv_ops`: ``install()`` puts dbf_ext's and torchvision's kernels
  behind ``mmcv.ops`` (a ``mmcv._ext`` module), so mmdet / mmrotate run without compiled mmcv.
* :mod:`dbf_ext.integrations.mmcv` / :mod:`dbf_ext.integrations.mmengine`: ``DBFHook`` for mmcv
  1.x runners / mmengine's ``Runner`` (registered in their ``HOOKS`` when imported), both built
  on :mod:`dbf_ext.integrations.openmmlab`'s ``DBFHookCore``.
"""
