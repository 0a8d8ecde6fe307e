"""Importing this module installs dbf_ext's ``mmcv._ext`` shim (:func:`.install`).

For configs, whose ``custom_imports`` can only import modules::

    custom_imports = dict(imports=["dbf_ext.integrations.mmcv_ops.auto"], allow_failed_imports=False)

A working compiled ``mmcv._ext`` is kept (``install()`` raises; call
``install(replace_compiled=True)`` yourself to replace it).
"""

from dbf_ext.integrations.mmcv_ops import install

install()
