"""Adapters that put dbf_ext into existing detection frameworks.

Each framework has its own submodule, imported explicitly so that ``import dbf_ext`` never pulls
in a framework that is not needed:

* :mod:`dbf_ext.integrations.torchvision`: ``DynamicRoIHeads`` / ``use_dynamic_roi_heads``
  (Dynamic R-CNN with the fused assignment kernel) for torchvision's Faster R-CNN.
"""
