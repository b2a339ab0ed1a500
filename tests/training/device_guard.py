"""A second device on a CPU-only machine: the model on ``meta``, every op checked for mixed devices.

A tensor left on the CPU while the model runs elsewhere is the bug a GPU run meets first
("Expected all tensors to be on the same device"). CI has no GPU, so the tests put the model on
the ``meta`` device instead and run the real code under :class:`DeviceGuard`, which

* raises :class:`MixedDevices` when one op gets tensors on two devices. ``meta`` alone is not
  enough: some CPU kernels accept a meta weight and answer on the CPU (``F.linear(cpu, meta)``
  and ``conv2d`` do in torch 2.14), so only a check of every op's arguments is reliable. As on
  CUDA, a 0-dim CPU tensor may join an op on another device (PyTorch treats it as a scalar);
* lets the code *read* meta tensors, which have no data: ``float(x)``/``bool(x)``/``x.item()``
  give 0, a copy to the CPU (``.cpu()``, ``.numpy()``) gives zeros of the right shape, and the
  few data-dependent ops (``nonzero``, boolean-mask indexing, ``bincount``, ``multinomial``) give
  empty or zero results; random draws ignore their generator. The numbers are meaningless: the
  placement of every tensor is what is tested.
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

META = torch.device("meta")

# Ops whose purpose is to move data between devices.
_MOVES = {aten._to_copy, aten.to}  # ``.to``/``.cpu()``: ``to`` overloads reach the mode in inference mode
_CROSS_DEVICE_OPS = {aten.copy_.default, aten._copy_from.default, aten.lift_fresh.default}


_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class MixedDevices(AssertionError):
    """One op received tensors on two devices (a tensor was left behind)."""


def _fake_scalar(tensor: torch.Tensor) -> bool | int | float:
    if tensor.dtype == torch.bool:
        return False
    return 0.0 if tensor.is_floating_point() else 0


class DeviceGuard(TorchDispatchMode):
    """Raise on any op mixing devices; answer reads of ``meta`` tensors with zeros (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops_on_meta = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1 and func not in _CROSS_DEVICE_OPS and func.overloadpacket not in _MOVES:
            shapes = ", ".join(f"{tuple(t.shape)}@{t.device}" for t in tensors)
            raise MixedDevices(f"{func} got tensors on {sorted(map(str, devices))}: {shapes}")
        on_meta = any(t.is_meta for t in tensors)
        self.ops_on_meta += on_meta
        if on_meta:
            answer = self._read_meta(func, args, kwargs)
            if answer is not NotImplemented:
                return answer
        return func(*args, **kwargs)

    @staticmethod
    def _read_meta(func, args, kwargs):  # noqa: ANN001, ANN205
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is aten._local_scalar_dense.default:
            return _fake_scalar(source)
        if func.overloadpacket in _MOVES and source is not None and source.is_meta:
            target = kwargs.get("device")
            for arg in args[1:]:
                if isinstance(arg, (torch.device, torch.Tensor)) and target is None:
                    target = arg if isinstance(arg, torch.device) else arg.device
            if target is not None and torch.device(target).type != "meta":
                # The same move, of zeros that stand for the data meta does not have.
                return func(torch.zeros(source.shape, dtype=source.dtype), *args[1:], **kwargs)
        if func in _INDEX_OPS and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            # A boolean mask selects data-dependent rows: on meta, none of them.
            indices = []
            for index in args[1]:
                if index is not None and index.dtype in (torch.bool, torch.uint8):
                    indices += [torch.empty(0, dtype=torch.long, device=index.device)] * index.dim()
                else:
                    indices.append(index)
            return func(args[0], indices, *args[2:], **kwargs)
        if kwargs.get("generator") is not None:
            # Random draws on meta produce no numbers: the generator (a CPU one, see the tests) is not used.
            return func(*args, **{**kwargs, "generator": None})
        if func is aten.nonzero.default:
            return torch.empty((0, source.dim()), dtype=torch.long, device=META)
        if func is aten.bincount.default:
            minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            return torch.zeros(max(1, minlength), dtype=torch.long, device=META)
        if func in (aten.multinomial.default,):
            count = args[1]
            return torch.zeros((*source.shape[:-1], count), dtype=torch.long, device=META)
        if func in (aten.equal.default, aten.is_nonzero.default):
            return False
        return NotImplemented


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` moved to the meta device (parameters and buffers; their values are dropped)."""
    return module.to(META)
