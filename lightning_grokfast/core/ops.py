"""The functional core of the Grokfast filters: stateless ``torch._foreach_*`` updates over lists of tensors.

As ``torch.optim.adam``'s ``_multi_tensor_adam``, these functions know nothing of names, parameters or checkpoints:
every list holds tensors of one device and dtype, state lists are updated in place, and nothing reads a value back
to the host. :class:`~lightning_grokfast.GradientFilter` groups tensors and calls them; so does everything
built on it (the Lightning callback, ``attach_grokfast`` and the drop-in functions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TILE_ELEMENTS",
    "TILE_MIN_BYTES",
    "add_scaled_",
    "all_finite",
    "compiled_ema_amplify",
    "compiled_ma_amplify",
    "ema_amplify_",
    "ema_amplify_tiled_",
    "ema_update_",
    "global_norm",
    "ma_amplify_",
    "ma_amplify_tiled_",
    "ma_resum_",
    "ma_update_",
    "norms",
    "orthogonalize_",
    "squared_norms",
]

#: Elements per block of the tiled CPU path: a block of the gradient and of each state tensor (1 MiB each in
#: float32) stays in cache between the update and the amplification. Chosen by a sweep of 64 Ki to 4 Mi elements
#: on a 2-core EPYC (1 MiB L2 per core, 32 MiB L3): smaller blocks cost more in per-call overhead, larger ones
#: fall out of cache (``docs/benchmarks-overhead.md``).
TILE_ELEMENTS = 262144
#: Gradient bytes of a group from which the CPU path is tiled: below, the tensors stay in the last-level cache
#: between two foreach calls anyway, and one call per tensor would cost more than it saves.
TILE_MIN_BYTES = 32 * 2**20


def squared_norms(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Per-tensor squared L2 norms as one float32 (float64 for float64 input) vector (one foreach call).

    Args:
        tensors: the tensors, all on one device.

    Returns:
        A 1-D tensor on that device with one squared norm per tensor.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import squared_norms
        >>> squared_norms([torch.ones(2), torch.full((3,), 2.0)])
        tensor([ 2.0000, 12.0000])
    """
    if tensors[0].dtype in (torch.float16, torch.bfloat16):
        norms = torch._foreach_norm(tensors, dtype=torch.float32)
    else:
        norms = torch._foreach_norm(tensors)
    return torch.stack(norms).square()


def global_norm(per_tensor_sq: Sequence[Tensor], device: torch.device) -> Tensor:
    """L2 norm over several vectors of squared norms (on ``device``; no synchronization).

    Args:
        per_tensor_sq: vectors of squared norms (from :func:`squared_norms`), possibly on several devices.
        device: where the result goes.

    Returns:
        A 0-dim tensor on ``device``.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import global_norm
        >>> global_norm([torch.tensor([9.0]), torch.tensor([16.0])], torch.device("cpu"))
        tensor(5.)
    """
    return torch.stack([s.to(device, torch.float32).sum() for s in per_tensor_sq]).sum().sqrt()


def all_finite(per_tensor_sq: Sequence[Tensor], device: torch.device) -> Tensor:
    """Whether every squared norm is finite (so every element of every tensor is), as a 0-dim bool tensor.

    Args:
        per_tensor_sq: vectors of squared norms (from :func:`squared_norms`).
        device: where the result goes.

    Returns:
        A 0-dim bool tensor on ``device`` (no host read).

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import all_finite, squared_norms
        >>> all_finite([squared_norms([torch.tensor([1.0, float("inf")])])], torch.device("cpu"))
        tensor(False)
    """
    if len(per_tensor_sq) == 1:
        return per_tensor_sq[0].isfinite().all().to(device)
    return torch.stack([s.to(device).isfinite().all() for s in per_tensor_sq]).all()


def norms(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Per-tensor L2 norms as one float32 (float64 for float64 input) vector: one read pass, one foreach call.

    A norm is finite exactly when every element of its tensor is (barring overflow of the sum of squares), so this
    is also the finiteness check of a step.

    Args:
        tensors: the tensors (one device, one dtype).

    Returns:
        A vector with one norm per tensor.

    Example::

        norms([torch.ones(4), torch.zeros(2)])  # tensor([2., 0.])
    """
    if tensors[0].dtype in (torch.float16, torch.bfloat16):
        return torch.stack(torch._foreach_norm(tensors, dtype=torch.float32))
    return torch.stack(torch._foreach_norm(tensors))


def ema_update_(ema: list[Tensor], grads: list[Tensor], weight: float | list[float]) -> None:
    """``ema <- ema + weight * (grad - ema)`` in place; ``weight`` 1.0 starts an EMA at its gradient.

    ``grads`` must have the dtype of ``ema`` (cast them first for a narrower state).

    Args:
        ema: the EMA tensors, updated in place.
        grads: the gradients, one per EMA tensor.
        weight: ``1 - alpha``, one for all or one per tensor.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import ema_update_
        >>> ema = [torch.zeros(2)]
        >>> ema_update_(ema, [torch.ones(2)], 0.25)
        >>> ema[0]
        tensor([0.2500, 0.2500])
    """
    torch._foreach_lerp_(ema, grads, weight)


def ema_amplify_(ema: list[Tensor], grads: list[Tensor], weight: Tensor, coef: Tensor) -> None:
    """``ema <- lerp(ema, grad, weight)``, then ``grad <- grad + coef * ema``, one tensor at a time.

    The EMA step and its amplification as one loop body, written for ``torch.compile`` (see
    :func:`compiled_ema_amplify`), which fuses each tensor's body into one kernel: the gradient and the state are
    read once and written once (4 memory passes instead of the 6 of two foreach calls). ``weight`` and ``coef``
    are 0-dim float32 tensors, so that changing ``alpha`` or ``lamb`` does not recompile. Eager, it is correct but
    slower than :func:`ema_update_` followed by :func:`add_scaled_`.

    Args:
        ema: the EMA tensors, updated in place.
        grads: the gradients, amplified in place.
        weight: ``1 - alpha`` as a 0-dim float32 tensor.
        coef: the amplification ``lamb`` as a 0-dim float32 tensor.

    Example::

        compiled_ema_amplify()(ema, grads, torch.tensor(0.02), torch.tensor(2.0))
    """
    for state, grad in zip(ema, grads):
        state.add_((grad.to(state.dtype) - state) * weight)
        grad.add_(state * coef)


_COMPILED: dict[str, Any] = {}


def compiled_ema_amplify() -> Any:
    """:func:`ema_amplify_` compiled by ``torch.compile`` (``fullgraph=True``), built once per process.

    Compilation happens at the first call for each list of shapes (seconds; on CPU up to a minute, with a C++
    compiler).

    Returns:
        The compiled function, with the signature of :func:`ema_amplify_`.

    Raises:
        RuntimeError: What ``torch.compile`` raises when no backend is available (at the first call).

    Example::

        fused = compiled_ema_amplify()
        fused(ema, grads, torch.tensor(1 - alpha), torch.tensor(lamb))
    """
    fn = _COMPILED.get("ema_amplify_")
    if fn is None:
        fn = _COMPILED["ema_amplify_"] = torch.compile(
            ema_amplify_, fullgraph=True, options={"emulate_precision_casts": True}
        )
    return fn


def ma_amplify_(ma_sum: list[Tensor], oldest: list[Tensor], grads: list[Tensor], coef: Tensor) -> None:
    """:func:`ma_update_` then ``grad <- grad + coef * sum``, one tensor at a time, for ``torch.compile``.

    Compiled (:func:`compiled_ma_amplify`), each tensor's body is one kernel: the gradient, the oldest slot and the
    sum are read once, the sum, the slot and the gradient written once (the 6 passes of the memory floor, instead
    of the 11 of four foreach calls). The same operations in the same order as the foreach path, so the running sum
    still adds exactly what the slot keeps. ``coef`` is a 0-dim float32 tensor (no recompilation when it changes).

    Args:
        ma_sum: the running sums, updated in place.
        oldest: the ring-buffer slots the gradients replace, overwritten.
        grads: the gradients, amplified in place.
        coef: ``lamb`` (over the window size for a mean) as a 0-dim float32 tensor.

    Example::

        compiled_ma_amplify()(sums, [w[slot] for w in windows], grads, torch.tensor(lamb / window_size))
    """
    for total, slot, grad in zip(ma_sum, oldest, grads):
        total.sub_(slot)
        slot.copy_(grad)
        total.add_(slot)
        grad.add_(total * coef)


def compiled_ma_amplify() -> Any:
    """:func:`ma_amplify_` compiled by ``torch.compile`` (``fullgraph=True``), built once per process.

    Returns:
        The compiled function, with the signature of :func:`ma_amplify_`.

    Example::

        fused = compiled_ma_amplify()
        fused(sums, slots, grads, torch.tensor(lamb / window_size))
    """
    fn = _COMPILED.get("ma_amplify_")
    if fn is None:
        # emulate_precision_casts: the sum must add the slot's rounded (e.g. bfloat16) value, not the float32
        # gradient that Inductor would otherwise keep in registers
        fn = _COMPILED["ma_amplify_"] = torch.compile(
            ma_amplify_, fullgraph=True, options={"emulate_precision_casts": True}
        )
    return fn


def _tiles(tensors: Sequence[Sequence[Tensor]], block: int) -> tuple[list[list[Tensor]], list[tuple[Tensor, ...]]]:
    """Split parallel lists of same-shape tensors into small ones (kept whole) and blocks of the large ones.

    Returns:
        The small or non-contiguous tensors, as one list per input list (for foreach calls), and the blocks of the
        large contiguous ones: tuples of same-range flat views, one view per input list.
    """
    small: list[list[Tensor]] = [[] for _ in tensors]
    blocks: list[tuple[Tensor, ...]] = []
    for same in zip(*tensors):
        if same[0].numel() <= block or not all(t.is_contiguous() for t in same):
            for whole, tensor in zip(small, same):
                whole.append(tensor)
        else:
            blocks.extend(zip(*(t.view(-1).split(block) for t in same)))
    return small, blocks


def ema_amplify_tiled_(
    ema: list[Tensor], grads: list[Tensor], weight: float, coef: float, block: int | None = None
) -> None:
    """:func:`ema_update_` then :func:`add_scaled_` (``coef`` a float), block by block for large tensors.

    The same operations on the same values as the two foreach calls, so the result is bitwise the same; but each
    block of a large gradient and its state is still in cache when it is amplified, so main memory sees 4 passes
    (read the gradient and the state, write both) instead of 6. For CPU tensors much larger than the last-level
    cache; small tensors go through the foreach calls whole.

    Args:
        ema: the EMA tensors (started), updated in place.
        grads: the gradients, amplified in place.
        weight: ``1 - alpha``.
        coef: the amplification ``lamb``.
        block: elements per block (default :data:`TILE_ELEMENTS`).

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import ema_amplify_tiled_
        >>> ema, grads = [torch.zeros(4)], [torch.ones(4)]
        >>> ema_amplify_tiled_(ema, grads, 0.5, 2.0, block=2)
        >>> ema[0], grads[0]
        (tensor([0.5000, 0.5000, 0.5000, 0.5000]), tensor([2., 2., 2., 2.]))
    """
    (small_ema, small_grads), blocks = _tiles((ema, grads), block or TILE_ELEMENTS)
    if small_ema:
        cast = small_ema[0].dtype != small_grads[0].dtype
        ema_update_(small_ema, [g.to(s.dtype) for s, g in zip(small_ema, small_grads)] if cast else small_grads, weight)
        add_scaled_(small_grads, small_ema, coef)
    for state, grad in blocks:
        state.lerp_(grad if grad.dtype == state.dtype else grad.to(state.dtype), weight)
        grad.add_(state, alpha=coef)


def ma_amplify_tiled_(
    ma_sum: list[Tensor], oldest: list[Tensor], grads: list[Tensor], coef: float, block: int | None = None
) -> None:
    """:func:`ma_update_` then :func:`add_scaled_` of the sums (``coef`` a float), block by block for large tensors.

    The same operations in the same order as the four foreach calls (bitwise the same result, and the running sum
    still adds exactly what the slot keeps), but each block of the sum, the slot and the gradient stays in cache
    through the four of them: 6 passes over main memory instead of 11. For CPU tensors much larger than the
    last-level cache; small tensors go through the foreach calls whole.

    Args:
        ma_sum: the running sums, updated in place.
        oldest: the ring-buffer slots the gradients replace, overwritten.
        grads: the gradients, amplified in place.
        coef: ``lamb`` (over the window size for a mean).
        block: elements per block (default :data:`TILE_ELEMENTS`).

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import ma_amplify_tiled_
        >>> window, total, grads = torch.zeros(2, 4), torch.zeros(4), [torch.ones(4)]
        >>> ma_amplify_tiled_([total], [window[0]], grads, 0.5, block=2)
        >>> total, grads[0]
        (tensor([1., 1., 1., 1.]), tensor([1.5000, 1.5000, 1.5000, 1.5000]))
    """
    (small_sum, small_slot, small_grads), blocks = _tiles((ma_sum, oldest, grads), block or TILE_ELEMENTS)
    if small_sum:
        ma_update_(small_sum, small_slot, small_grads)
        add_scaled_(small_grads, small_sum, coef)
    for total, slot, grad in blocks:
        total.sub_(slot)
        slot.copy_(grad)
        total.add_(slot)
        grad.add_(total, alpha=coef)


def ma_update_(ma_sum: list[Tensor], oldest: list[Tensor], grads: list[Tensor]) -> None:
    """Slide a window by one: ``sum <- sum - oldest + grad`` and overwrite the oldest slot with ``grad``.

    Three in-place foreach calls, no temporary: the oldest slot is subtracted, overwritten with the gradient
    (rounded to the window's dtype, e.g. bfloat16) and then added back from the slot. ``ma_sum`` may be wider than
    the window (float32 for a bfloat16 window): what is added is exactly the value the slot keeps, so it is exactly
    what is subtracted ``window`` steps later, and the sum drifts only by its own float32 rounding.

    Args:
        ma_sum: the running sums, updated in place.
        oldest: the ring-buffer slots the gradients replace (views into the windows), overwritten.
        grads: the new gradients.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import ma_update_
        >>> window, total = torch.zeros(2, 3), torch.zeros(3)
        >>> ma_update_([total], [window[0]], [torch.ones(3)])
        >>> total, window[0]
        (tensor([1., 1., 1.]), tensor([1., 1., 1.]))
    """
    torch._foreach_sub_(ma_sum, oldest)
    torch._foreach_copy_(oldest, grads)
    torch._foreach_add_(ma_sum, oldest)


def ma_resum_(ma_sum: list[Tensor], windows: list[Tensor]) -> None:
    """Recompute each running sum exactly from its window.

    Args:
        ma_sum: the running sums, overwritten.
        windows: the windows, ``windows[i]`` of shape ``(window, *shape)``.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import ma_resum_
        >>> total = torch.zeros(3)
        >>> ma_resum_([total], [torch.ones(4, 3)])
        >>> total
        tensor([4., 4., 4.])
    """
    for total, window in zip(ma_sum, windows):
        torch.sum(window, dim=0, dtype=total.dtype, out=total)


def add_scaled_(grads: list[Tensor], state: list[Tensor], coef: float | Tensor) -> None:
    """``grad <- grad + coef * state`` in place (``coef`` a float or a 0-dim tensor; dtypes may differ).

    With a float ``coef`` this is one foreach call and no temporary, also when the state is wider or narrower
    than the gradient (the sum is computed in the wider dtype and rounded once to the gradient's).

    Args:
        grads: the gradients, updated in place.
        state: the slow terms (EMA or window sum), one per gradient.
        coef: the amplification (``lamb``, or ``lamb / window`` for a mean).

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import add_scaled_
        >>> grads = [torch.ones(2)]
        >>> add_scaled_(grads, [torch.full((2,), 0.5)], 2.0)
        >>> grads[0]
        tensor([2., 2.])
    """
    if isinstance(coef, float) and coef == 0.0:
        return
    if not isinstance(coef, Tensor):
        torch._foreach_add_(grads, state, alpha=coef)
    else:
        _add_in_grad_dtype_(grads, torch._foreach_mul(state, coef))


def add_guarded_(grads: list[Tensor], state: list[Tensor], coef: float, scale: Tensor) -> None:
    """``grad <- grad + scale * coef * state`` in place, adding nothing at all where ``scale`` is 0.

    The divergence guard's path: ``scale`` (a 0-dim tensor) is 0 when the slow term is not finite, and ``0 * inf``
    would be NaN, so the product is selected away on the device (no host read) instead of multiplied by 0.
    """
    keep = scale > 0
    scaled = torch._foreach_mul(state, scale * coef)
    _add_in_grad_dtype_(grads, [torch.where(keep, t, 0.0) for t in scaled])


def _add_in_grad_dtype_(grads: list[Tensor], terms: Sequence[Tensor]) -> None:
    """``grad <- grad + term`` in place, casting each term to its gradient's dtype when the two differ."""
    cast = terms[0].dtype != grads[0].dtype
    torch._foreach_add_(grads, [t.to(g.dtype) for t, g in zip(terms, grads)] if cast else list(terms))


def orthogonalize_(grads: list[Tensor], params: list[Tensor], eps: float = 1e-30) -> None:
    """⊥Grad in place: ``g <- |g| * u / |u|`` with ``u = g - (<g, w> / <w, w>) w`` for each gradient ``g`` of ``w``.

    The inner products come from L1 norms (``<g, w> = 2 |max(g*w, 0)|_1 - |g*w|_1``), so all work is foreach calls
    and nothing is read back to the host. Low-precision gradients are projected in float32. A parameter of zero norm
    keeps its gradient; a gradient (numerically) parallel to its parameter becomes zero.

    Args:
        grads: the gradients, updated in place.
        params: their parameters, one per gradient.
        eps: the smallest squared norm treated as non-zero.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.ops import orthogonalize_
        >>> grads = [torch.tensor([1.0, 1.0])]
        >>> orthogonalize_(grads, [torch.tensor([1.0, 0.0])])
        >>> grads[0]
        tensor([0.0000, 1.4142])
    """
    work_dtype = torch.float32 if grads[0].dtype in (torch.float16, torch.bfloat16) else grads[0].dtype
    g = grads if grads[0].dtype == work_dtype else [t.to(work_dtype) for t in grads]
    w = [p.detach().to(work_dtype) for p in params]  # no autograd history through the parameters
    products = torch._foreach_mul(g, w)
    total = torch.stack(torch._foreach_norm(products, 1))
    torch._foreach_clamp_min_(products, 0.0)
    dots = 2.0 * torch.stack(torch._foreach_norm(products, 1)) - total
    param_sq = torch.stack(torch._foreach_norm(w)).square()
    grad_norms = torch.stack(torch._foreach_norm(g))
    coefs = torch.where(param_sq > 0, -dots / param_sq.clamp_min(eps), torch.zeros_like(dots))
    perp = torch._foreach_add(g, torch._foreach_mul(w, list(coefs.unbind())))
    perp_norms = torch.stack(torch._foreach_norm(perp))
    tiny = perp_norms <= 4.0 * torch.finfo(work_dtype).eps * grad_norms
    scales = torch.where(tiny, torch.zeros_like(perp_norms), grad_norms / perp_norms.clamp_min(eps))
    torch._foreach_mul_(perp, list(scales.unbind()))
    torch._foreach_copy_(grads, perp)
