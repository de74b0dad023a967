"""A probe for what would make the host wait for a GPU, usable on a CPU.

On a CPU every tensor is a host tensor, so the probe marks what would live on the device: the
model's parameters and buffers, anything ``to_device`` hands over, and everything computed from
those (through the dispatcher, forward and backward). It records, on marked tensors only: ops
whose output size depends on values (nonzero, unique, boolean-mask indexing, masked_select), values
read back (item, int(), bool(), tolist(), numpy()), copies to the host (.cpu()) and torch.equal
(a read-back on a GPU). Host-side work on the batch's CPU labels is not a wait. Each wait is
charged to the code that asked for it: the innermost frame outside torch, so that plot_ds's own
waits (``seen``) are told apart from those inside transformers' model code (``elsewhere``).
"""

import traceback
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

VALUE_DEPENDENT = {
    "nonzero",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_select",
    "_local_scalar_dense",
    "equal",
}
READ_BACK = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__")


def caller() -> str:
    """The file of the innermost frame that is not torch's or this probe's."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("host_waits.py"):
            return name
    return "?"


class HostWaits(TorchDispatchMode):
    def __init__(self, *devices):
        super().__init__()
        self.seen: list[str] = []  # waits asked for by plot_ds or the test itself
        self.elsewhere: list[str] = []  # waits inside transformers (or other libraries' code)
        # Marked tensors by identity, held alive for the probe's life so that no id is reused.
        self._marked_ids: set[int] = set()
        self._held: list[torch.Tensor] = []
        for owner in devices:
            for tensor in owner.parameters() if hasattr(owner, "parameters") else [owner]:
                self.mark(tensor)
            for buffer in getattr(owner, "buffers", lambda: [])():
                self.mark(buffer)
        self._saved = {}

    def mark(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in self._marked_ids:
            self._marked_ids.add(id(tensor))
            self._held.append(tensor)
        return tensor

    def record(self, what: str) -> None:
        where = caller()
        if "/plot_ds/" in where or "/tests/" in where:
            self.seen.append(what)
        else:
            self.elsewhere.append(f"{what} in {where.rsplit('/site-packages/', 1)[-1]}")

    def _is_marked(self, value) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self._marked_ids

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, _ = tree_flatten((args, kwargs))
        on_device = any(self._is_marked(t) for t in inputs)
        name = func._schema.name.split("::")[-1]
        if on_device:
            boolean_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
            )
            if name in VALUE_DEPENDENT or boolean_index:
                self.record(name)
        out = func(*args, **kwargs)
        if on_device:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.mark(tensor)
        return out

    def __enter__(self):
        probe = self
        for method in READ_BACK:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def recorded(tensor, *args, _original=original, _method=method, **kwargs):
                if probe._is_marked(tensor):
                    probe.record(_method)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, recorded)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)
