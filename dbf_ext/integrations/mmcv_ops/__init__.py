"""dbf_ext's and torchvision's kernels behind ``mmcv.ops``: a shim for the ``mmcv._ext`` module.

mmcv's Python package (mmcv 1.x built with ``MMCV_WITH_OPS=0``, or ``mmcv-lite`` 2.x) installs
next to any torch, but without the compiled ``mmcv._ext`` module ``import mmcv.ops`` fails,
and with it ``import mmdet.models`` and ``import mmrotate.models``. :func:`install` puts a
module of that name in place whose functions compute with dbf_ext and torchvision, following
the call conventions of mmcv's C++ functions (:mod:`.kernels`)::

    from dbf_ext.integrations import mmcv_ops
    mmcv_ops.install()          # before mmcv.ops / mmdet.models / mmrotate.models is imported
    import mmrotate.models

Nothing happens on import of this module. For a config (mmengine, mmdet 3.x)::

    custom_imports = dict(imports=["dbf_ext.integrations.mmcv_ops.auto"], allow_failed_imports=False)

For a script that imports ``mmdet.models`` before reading its config (mmdet 2.x's and
mmrotate's ``tools/train.py``)::

    python -m dbf_ext.integrations.mmcv_ops tools/train.py CONFIG [ARGS...]

Provided (:data:`PROVIDED`): ``nms``, ``softnms``, ``nms_rotated``, ``box_iou_rotated``,
``roi_align_forward`` / ``_backward`` (average mode), ``roi_align_rotated_forward`` /
``_backward``, ``sigmoid_focal_loss_forward`` / ``_backward``, ``get_compiler_version``,
``get_compiling_cuda_version``: what mmdet's Faster R-CNN and RetinaNet and mmrotate's Rotated
RetinaNet, Rotated Faster R-CNN, Oriented R-CNN and RoI Transformer need. Every other name mmcv
checks exists and raises ``NotImplementedError`` naming the op and the models that need it
(:mod:`.catalogue`). Tested with mmcv 1.7.2 (+ mmdet 2.28.2, mmrotate 0.3.4) and mmcv-lite
2.1.0 (+ mmengine 0.10, mmdet 3.3.0).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import types

from . import kernels
from .catalogue import UNSUPPORTED, unsupported_message

__all__ = ["PROVIDED", "UNSUPPORTED", "install", "is_installed"]

logger = logging.getLogger(__name__)

MODULE_NAME = "mmcv._ext"

#: The ``mmcv._ext`` functions the shim computes.
PROVIDED: tuple[str, ...] = tuple(kernels.__all__)


class _ShimLoader(importlib.abc.Loader):
    """Lets ``importlib.util.find_spec`` / ``pkgutil.find_loader('mmcv._ext')`` see the shim
    (mmcv's ``check_ops_exist`` and mmengine's ``mmcv_full_available`` ask them)."""

    def __init__(self, module: types.ModuleType):
        self._module = module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._module

    def exec_module(self, module: types.ModuleType) -> None:
        """The shim is complete when created: nothing to execute."""


def _unsupported(name: str):
    def unsupported(*args, **kwargs):
        raise NotImplementedError(unsupported_message(name))

    unsupported.__name__ = unsupported.__qualname__ = name
    unsupported.__doc__ = unsupported_message(name)
    return unsupported


def _build_shim() -> types.ModuleType:
    shim = types.ModuleType(MODULE_NAME, "mmcv's compiled ops, replaced by dbf_ext's kernels "
                                         "(dbf_ext.integrations.mmcv_ops)")
    shim.__spec__ = importlib.machinery.ModuleSpec(MODULE_NAME, _ShimLoader(shim),
                                                   origin="dbf_ext.integrations.mmcv_ops")
    shim.__loader__ = shim.__spec__.loader
    shim.__dbf_ext_shim__ = True
    for name in PROVIDED:
        setattr(shim, name, getattr(kernels, name))
    for name in UNSUPPORTED:
        setattr(shim, name, _unsupported(name))
    return shim


def is_installed() -> bool:
    """True when ``mmcv._ext`` is this shim."""
    return getattr(sys.modules.get(MODULE_NAME), "__dbf_ext_shim__", False)


def install(replace_compiled: bool = False) -> types.ModuleType:
    """Makes ``mmcv._ext`` the shim; returns it. Idempotent.

    Call it before ``mmcv.ops`` is imported (mmcv's op modules bind ``mmcv._ext`` when they are
    first imported).

    Args:
        replace_compiled: an mmcv with a working compiled ``mmcv._ext`` (mmcv-full) keeps it
            unless this is True; a compiled module that fails to load (the usual symptom of an
            mmcv-full built for another torch) is replaced either way, with a log message.

    Raises:
        ImportError: mmcv is not installed.
        RuntimeError: a working compiled ``mmcv._ext`` exists and ``replace_compiled`` is False,
            or ``mmcv.ops`` was already imported with it.
    """
    if is_installed():
        return sys.modules[MODULE_NAME]
    try:
        import mmcv
    except ImportError as error:
        raise ImportError(
            "dbf_ext's mmcv._ext shim needs mmcv's Python package: mmcv 1.x built with "
            "MMCV_WITH_OPS=0, or mmcv-lite 2.x (see the README's OpenMMLab section)"
        ) from error
    try:
        compiled = importlib.import_module(MODULE_NAME)
    except ImportError as error:
        if not isinstance(error, ModuleNotFoundError) or error.name != MODULE_NAME:
            logger.warning("mmcv's compiled mmcv._ext does not load (%s): dbf_ext's shim "
                           "replaces it", error)
    else:
        location = getattr(compiled, "__file__", MODULE_NAME)
        if not replace_compiled:
            raise RuntimeError(
                f"mmcv {mmcv.__version__} has a working compiled mmcv._ext ({location}); "
                "dbf_ext's shim does not replace it unless install(replace_compiled=True)"
            )
        loaded_ops = sorted(name for name in sys.modules if name.startswith("mmcv.ops"))
        if loaded_ops:
            raise RuntimeError(
                f"{loaded_ops[0]} is already imported with the compiled mmcv._ext ({location}); "
                "call install(replace_compiled=True) before anything imports mmcv.ops"
            )
        logger.info("dbf_ext's shim replaces mmcv's compiled mmcv._ext (%s)", location)
    shim = _build_shim()
    sys.modules[MODULE_NAME] = shim
    mmcv._ext = shim
    logger.info("mmcv._ext is dbf_ext's shim (mmcv %s)", mmcv.__version__)
    return shim
