"""Learner benchmark: training throughput and weight publication against a plain memcpy.

`python entrypoints/bench.py learner [--ranks 1,2] [--steps 3] [--groups 8] [--samples 4]
 [--pub-hidden 768] [--pub-layers 6] [--reps 3] [--receiver-threads N]`

Side by side in one run, on real Ray actors and real DeepSpeed (CPU, ZeRO-2):
  (a) training tokens/s of the learner on the tiny model with 1 and 2 ranks: non-padding tokens of
      the trained sequences per second of `train_step` wall time (after one warm-up step);
  (b) weight publication on a mid-sized model of the same architecture (default ~60M parameters,
      so that bandwidth rather than call latency is measured), end to end into a receiver actor
      standing in for a generator (it copies every tensor into preallocated parameters, as an
      engine's weight loader does, with as many threads as the memcpy): object store (publish =
      gather + fingerprint + put; receiver reads the ref), collective broadcast (gloo group,
      learner rank 0 -> receiver) and shared memory (publish = write into the region's free slot,
      fingerprint hashed beside the copy; the receiver fingerprints the slot's views, then copies
      out of them); each against a plain in-process memcpy of the same bytes. Best of `--reps`;
      the first shared-memory publication, which creates and pre-faults the region, is printed apart.
On this 2-core machine two ranks share the cores with each other (and with any other load), so
(a) shows the cost of data-parallel communication more than any speed-up.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from cir_actors.types import FinishReason, ScoredTrajectory, Trajectory, Verdict, VerdictReason


class PublicationReceiver:
    """A generator stand-in (a Ray actor): receives one publication and copies it into its own
    preallocated parameters. Returns the seconds spent and the fingerprint of what it loaded."""

    def __init__(self, threads: int) -> None:
        self.params: dict[str, torch.Tensor] = {}
        torch.set_num_threads(threads)  # as many as the memcpy baseline (an engine uses all of its own)

    def _copy(self, name: str, t: torch.Tensor) -> None:
        dst = self.params.get(name)
        if dst is None or dst.shape != t.shape or dst.dtype != t.dtype:
            dst = self.params[name] = torch.empty_like(t)
        dst.copy_(t)

    def prepare(self, names_shapes: list[tuple[str, tuple[int, ...], str]]) -> None:
        self.params = {n: torch.empty(s, dtype=getattr(torch, d)) for n, s, d in names_shapes}

    def _verify(self, t0: float) -> tuple[float, float, str]:
        from cir_actors.learning.weight_sync import fingerprint

        t1 = time.perf_counter()
        fp = fingerprint(self.params.items())
        return t1 - t0, time.perf_counter() - t1, fp

    def load_object_store(self, update: Any) -> tuple[float, float, str]:
        """(seconds to get and copy, seconds to fingerprint, fingerprint)."""
        import ray

        t0 = time.perf_counter()
        for name, t in ray.get(update.weights).items():
            self._copy(name, t)
        return self._verify(t0)

    def load_shared(self, update: Any) -> tuple[float, float, str]:
        """From the shared-memory region, as the engine's `cir_load_shared` does: fingerprint the
        slot's views (two threads), then copy out of them; (copy s, fingerprint s, fingerprint)."""
        from cir_actors.learning.shared_weights import fingerprint_views, read_slot

        t0 = time.perf_counter()
        with read_slot(update.shared_memory) as views:
            fp = fingerprint_views(views)
            t1 = time.perf_counter()
            for name, t in views:
                self._copy(name, t)
        return time.perf_counter() - t1, t1 - t0, fp

    def load_broadcast(self, update: Any, rank: int) -> tuple[float, float, str]:
        from cir_actors.learning.weight_sync import receive_broadcast

        t0 = time.perf_counter()
        for name, t in receive_broadcast(update, rank=rank):
            self._copy(name, t)
        return self._verify(t0)


PATHS = ("object_store", "broadcast", "shared_memory")


def _groups(num_groups: int, n: int, vocab: int, seed: int) -> list[list[ScoredTrajectory]]:
    """Synthetic groups with mixed rewards (none zero-advantage), ~100-250 tokens each, an
    interpreter segment in the middle; behaviour log-probs near a uniform policy."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(num_groups):
        rewards = [1.0 if i % 2 == 0 else -1.0 for i in range(n)]
        group = []
        for i, r in enumerate(rewards):
            T, p = int(rng.integers(100, 250)), 40
            ids = rng.integers(3, vocab - 1, T).astype(np.int32)
            mask = np.zeros(T, np.int8)
            mask[p:] = 1
            mask[p + 20 : p + 40] = 0
            lp = np.where(mask > 0, -np.log(vocab) + 0.1 * rng.standard_normal(T), 0).astype(np.float32)
            traj = Trajectory(f"b{g}", i, ids, mask, lp, np.where(mask > 0, 0, -1).astype(np.int32), p,
                              FinishReason.STOP, 2)  # fmt: skip
            group.append(ScoredTrajectory(traj, Verdict(r > 0, None, VerdictReason.CORRECT), r))
        groups.append(group)
    return groups


def _memcpy_s(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def run(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="bench learner")
    ap.add_argument("--ranks", default="1,2", help="rank counts to measure training throughput with")
    ap.add_argument("--steps", type=int, default=3, help="timed train steps per rank count (after 1 warm-up)")
    ap.add_argument("--groups", type=int, default=8, help="prompt groups per step")
    ap.add_argument("--samples", type=int, default=4, help="samples per group")
    ap.add_argument("--pub-hidden", type=int, default=768, help="hidden size of the publication model")
    ap.add_argument("--pub-layers", type=int, default=6, help="layers of the publication model")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each publication (best kept)")
    ap.add_argument("--receiver-threads", type=int, default=0,
                    help="torch threads of the receiver actor (0: as many as the memcpy baseline uses)")
    args = ap.parse_args(argv)

    import ray

    from cir_actors.config import TinyModelConfig, load_config
    from cir_actors.data.tiny_model import build_tiny_model
    from cir_actors.learning.learner import Learner

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 namespace="cir-bench-learner")
    results: dict[str, Any] = {"train": {}, "publish": {}}
    try:
        tiny = build_tiny_model()
        base = [f"learner.prompts_per_step={args.groups}", f"learner.mini_batch_prompts={args.groups}",
                f"generator.samples_per_prompt={args.samples}", "learner.micro_batch_tokens=4096"]  # fmt: skip
        batches = [_groups(args.groups, args.samples, 400, seed) for seed in range(args.steps + 1)]
        print(f"{'ranks':>5} {'tokens/step':>11} {'s/step':>8} {'tokens/s':>9} {'start s':>8}")
        for ranks in [int(r) for r in args.ranks.split(",") if r.strip()]:
            cfg = load_config(None, [*base, f"learner.num_ranks={ranks}"])
            t0 = time.perf_counter()
            learner = Learner(cfg, tiny, name=f"bench-learner-{ranks}")
            start_s = time.perf_counter() - t0
            try:
                learner.train_step(batches[0])  # warm-up
                metrics = [learner.train_step(b) for b in batches[1:]]
            finally:
                learner.shutdown()
            tokens = sum(m["seq_tokens"] for m in metrics)
            secs = sum(m["time_s"] for m in metrics)
            row = {"tokens_per_s": tokens / secs, "s_per_step": secs / len(metrics),
                   "tokens_per_step": tokens / len(metrics), "start_s": start_s}  # fmt: skip
            results["train"][ranks] = row
            print(f"{ranks:>5} {row['tokens_per_step']:>11.0f} {row['s_per_step']:>8.3f} "
                  f"{row['tokens_per_s']:>9.0f} {start_s:>8.1f}")  # fmt: skip

        mid = build_tiny_model(
            TinyModelConfig(
                hidden_size=args.pub_hidden,
                num_layers=args.pub_layers,
                num_heads=12,
                num_kv_heads=4,
                intermediate_size=4 * args.pub_hidden,
            )
        )
        cfg = load_config(None, ["learner.num_ranks=1", "generator.num_generators=1"])
        learner = Learner(cfg, mid, name="bench-learner-pub", num_receivers=1)
        receiver = ray.remote(PublicationReceiver).options(num_cpus=0.5, name="bench-receiver").remote(
            args.receiver_threads or torch.get_num_threads())
        try:
            first = learner.publish(via="object_store")
            state = ray.get(first.weights)
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            ray.get(
                receiver.prepare.remote([(n, tuple(t.shape), str(t.dtype)[6:]) for n, t in state.items()])
            )
            del state, first
            memcpy = _memcpy_s(nbytes, args.reps)
            print(
                f"\npublication of {nbytes / 1e6:.1f} MB ({learner.num_params / 1e6:.1f}M parameters), best of {args.reps}"
            )
            hdr = f"{'path':>13} {'publish s':>10} {'load s':>8} {'verify s':>9} {'end-to-end s':>13} {'GB/s':>7}"
            print(hdr + f" {'x memcpy':>9}")
            print(f"{'memcpy':>13} {'':>30} {memcpy:>13.4f} {nbytes / memcpy / 1e9:>7.2f} {1.0:>9.2f}")
            results["publish"] = {"bytes": nbytes, "memcpy_s": memcpy, "memcpy_GBps": nbytes / memcpy / 1e9}
            for via in PATHS:
                runs = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    update = learner.publish(via=via)
                    t_pub = time.perf_counter() - t0
                    if via == "object_store":
                        load_s, verify_s, fp = ray.get(receiver.load_object_store.remote(update))
                    elif via == "shared_memory":
                        load_s, verify_s, fp = ray.get(receiver.load_shared.remote(update))
                    else:
                        load_s, verify_s, fp = ray.get(receiver.load_broadcast.remote(update, 1))
                        learner.wait_published()
                    e2e = time.perf_counter() - t0
                    if fp != update.checksum:
                        raise RuntimeError(f"{via}: receiver loaded fingerprint {fp}, not {update.checksum}")
                    runs.append((e2e, t_pub, load_s, verify_s, dict(learner.last_publish)))
                first_e2e = runs[0][0]  # for shared memory: the region is created by this one
                e2e, t_pub, load_s, verify_s, parts = min(runs, key=lambda r: r[0])
                learner_fp = parts.get("fingerprint_s", 0.0)
                transport = e2e - learner_fp - verify_s
                row = {"publish_s": t_pub, "load_s": load_s, "verify_s": verify_s, "end_to_end_s": e2e,
                       "GBps": nbytes / e2e / 1e9, "x_memcpy": memcpy / e2e, "learner_side": parts,
                       "first_end_to_end_s": first_e2e,
                       "without_checksums_s": transport, "x_memcpy_without_checksums": memcpy / transport}  # fmt: skip
                results["publish"][via] = row
                print(f"{via:>13} {t_pub:>10.4f} {load_s:>8.4f} {verify_s:>9.4f} {e2e:>13.4f} {row['GBps']:>7.2f} "
                      f"{row['x_memcpy']:>9.3f}")  # fmt: skip
            print("learner side:", "; ".join(
                f"{via}: " + ", ".join(f"{k} {v:.4f}" for k, v in results["publish"][via]["learner_side"].items()
                                       if isinstance(v, float))
                for via in PATHS))  # fmt: skip
            print(f"first shared-memory publication (creates and pre-faults the region): "
                  f"{results['publish']['shared_memory']['first_end_to_end_s']:.3f} s end to end")
            # shared memory: the learner's fingerprint overlaps its copy (inside write_s): only the
            # receiver's is taken out of its figure.
            print("without the two fingerprints (learner's and receiver's; shared memory: the receiver's only):", ", ".join(
                f"{via} {results['publish'][via]['without_checksums_s']:.4f} s = "
                f"{results['publish'][via]['x_memcpy_without_checksums']:.3f} x memcpy"
                for via in PATHS))  # fmt: skip
        finally:
            ray.kill(receiver)
            learner.shutdown()
    finally:
        if started_ray:
            ray.shutdown()
    return results
