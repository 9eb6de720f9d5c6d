"""Error feedback: remember what compression dropped and add it to the next input.

Over ``T`` steps the decoded outputs sum to the inputs' sum minus the final residual
(``sum(decoded) = sum(x) - e_T``), so a biased codec such as top-k loses nothing in
the long run. The residual is explicit state that can be checkpointed.
"""

from __future__ import annotations

from typing import Any

import torch

from farflung.compress.codec import Codec, CodecContext, CodecError


class ErrorFeedback:
    """Residual buffer ``e`` for one tensor: ``compensate`` adds it, ``update`` resets it."""

    def __init__(self) -> None:
        self._error: torch.Tensor | None = None

    @property
    def error(self) -> torch.Tensor | None:
        """The current residual (``None`` until the first ``compensate``/``update``)."""
        return self._error

    def compensate(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x + e`` as float32, creating ``e`` as zeros on first use."""
        if self._error is None:
            self._error = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        elif self._error.shape != x.shape:
            raise CodecError(
                f"error feedback holds a residual of shape {tuple(self._error.shape)}, got an "
                f"input of shape {tuple(x.shape)}"
            )
        elif self._error.device != x.device:
            self._error = self._error.to(x.device)  # e.g. after loading a CPU checkpoint
        return x.float() + self._error

    def update(self, sent_input: torch.Tensor, decoded: torch.Tensor) -> None:
        """Set ``e = sent_input - decoded`` (``decoded`` may be flat)."""
        decoded = decoded.detach().reshape(sent_input.shape)
        if self._error is not None and self._error.shape == sent_input.shape:
            torch.sub(sent_input.detach().float(), decoded, out=self._error)
        else:
            self._error = sent_input.detach().float() - decoded

    def reset(self) -> None:
        """Forget the residual."""
        self._error = None

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: ``{"error": tensor or None}`` (a copy)."""
        return {"error": None if self._error is None else self._error.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state from :meth:`state_dict`."""
        if "error" not in state:
            raise CodecError("error feedback state needs an 'error' entry")
        error = state["error"]
        self._error = None if error is None else error.detach().float().clone()


def encode_with_feedback(
    codec: Codec, ef: ErrorFeedback, x: torch.Tensor, ctx: CodecContext | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x + e`` and keep what was lost in ``ef``.

    Returns ``(payload, decoded)``, ``decoded`` shaped like ``x`` -- what every receiver
    will reconstruct, which the sender should apply to itself too.
    """
    compensated = ef.compensate(x)
    payload = codec.encode(compensated, ctx)
    decoded = codec.decode(payload, ctx).view(x.shape)
    ef.update(compensated, decoded)
    return payload, decoded
