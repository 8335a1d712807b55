"""Evaluation: code-integrated rollouts of benchmark tasks, scored, aggregated into CIR's metrics.

`evaluate(cfg, model_path, benchmarks, n, tools, out_dir)` samples n responses per task (tool-call
budget `max_tool_calls`, or 0 without tools: the text-only baseline of CIR's capability analysis),
scores each with the scorer (answer = last \\boxed{} outside interpreter output, math-verify), and
writes to `out_dir`:
- `results.json` and `results.md`: per benchmark avg@n (CIR's metric, the mean over all samples),
  unbiased pass@k for k = 1, 2, 4, ... n, mean response length in tokens (interpreter output
  included, as the response limit counts it), mean code blocks written and calls executed per
  response, interpreter error rate (failed or timed-out calls / executed calls), verdict and finish
  reasons; the same per subject where the data has one (MATH500, OlymMATH); the mean over benchmarks;
- `samples.jsonl`: every sample (prompt, response text, gold, verdict, tool calls);
- `config.yaml`: the resolved config.

Where things run. With a Ray session (`ray.is_initialized()`, e.g. under `ray job submit` or after
training) the generators (`generator.num_generators`) and interpreter pools
(`interpreter.num_pools`) are Ray actors with the configured resources, so a GPU node serves the
engine while the driver stays on the head; otherwise, both are local objects in this process (no
Ray needed). `use_ray=` forces either. The scorer is always local: a few worker processes here.
Both settings are driven from one background event loop owned by `EvalRunner`, so `evaluate` is a
plain blocking function, callable from scripts, Ray drivers and tests alike; an `EvalRunner` keeps
its engine between runs (tools and no-tools on one engine start) and `EvalRunner.load` swaps in
another checkpoint of the same model (several checkpoints on one engine start).

The pure parts (`pass_at_k`, `aggregate`, `summarize`, `results_markdown`, and `paired_difference`:
how much one evaluation's samples score above another's on the same problems, with a 95 % interval)
need none of this.
Not covered: training-time evaluation inside the trainer's loop, and greedy decoding as a special
case (use temperature=0 with n=1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from cir_actors.config import Config, dump_config
from cir_actors.types import Task, Trajectory, Verdict

log = logging.getLogger(__name__)
T = TypeVar("T")


class EvalError(ValueError):
    """A problem with an evaluation's input (model, data, options), phrased in one sentence."""


# ------------------------------------------------------------------------------------ pure metrics


@dataclass(frozen=True)
class SampleRecord:
    """What the aggregation needs from one scored sample."""

    task_id: str
    correct: bool
    response_tokens: int
    code_blocks: int
    executed: int
    interp_failures: int  # executed calls that raised or timed out
    reason: str  # VerdictReason
    finish_reason: str  # FinishReason
    subject: str | None = None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a problem with c correct among n samples: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(max(n, 1).bit_length()) if 1 << i <= n]
    return ks if not ks or ks[-1] == n else [*ks, n]


def aggregate(records: Sequence[SampleRecord]) -> dict[str, Any]:
    """Metrics of one set of samples (a benchmark, or one subject of it); see the module docstring."""
    if not records:
        raise ValueError("aggregate needs at least one sample")
    by_task: dict[str, list[bool]] = {}
    for r in records:
        by_task.setdefault(r.task_id, []).append(r.correct)
    n_min = min(len(v) for v in by_task.values())
    pass_k = {
        str(k): sum(pass_at_k(len(v), sum(v), k) for v in by_task.values()) / len(by_task)
        for k in ks_for(n_min)
    }
    executed = sum(r.executed for r in records)
    count = len(records)
    return {
        "problems": len(by_task),
        "samples": count,
        "n": n_min,
        "avg_at_n": sum(r.correct for r in records) / count,
        "pass_at_k": pass_k,
        "mean_response_tokens": sum(r.response_tokens for r in records) / count,
        "mean_code_blocks": sum(r.code_blocks for r in records) / count,
        "mean_executed_calls": sum(r.executed for r in records) / count,
        "interp_error_rate": sum(r.interp_failures for r in records) / executed if executed else None,
        "verdicts": dict(sorted(Counter(r.reason for r in records).items())),
        "finish_reasons": dict(sorted(Counter(r.finish_reason for r in records).items())),
    }


def summarize(records_by_benchmark: dict[str, Sequence[SampleRecord]]) -> dict[str, Any]:
    """Per benchmark metrics (with per-subject metrics where samples carry a subject) and the mean
    avg@n / pass@1 over benchmarks (CIR's "avg" column)."""
    benchmarks = {}
    for name, records in records_by_benchmark.items():
        metrics = aggregate(records)
        subjects = sorted({r.subject for r in records if r.subject is not None})
        if subjects:
            metrics["subjects"] = {s: aggregate([r for r in records if r.subject == s]) for s in subjects}
        benchmarks[name] = metrics
    mean = (
        {
            key: sum(b[key] if key == "avg_at_n" else b["pass_at_k"]["1"] for b in benchmarks.values())
            / len(benchmarks)
            for key in ("avg_at_n", "pass_at_1")
        }
        if benchmarks
        else {}
    )
    return {"benchmarks": benchmarks, "mean": mean}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _table(rows: dict[str, dict[str, Any]], first: str) -> list[str]:
    ks = sorted({int(k) for m in rows.values() for k in m["pass_at_k"]})
    head = [
        first,
        "problems",
        "n",
        "avg@n",
        *(f"pass@{k}" for k in ks),
        "resp tokens",
        "code blocks",
        "executed",
        "interp err %",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        cells = [
            name,
            str(m["problems"]),
            str(m["n"]),
            _pct(m["avg_at_n"]),
            *(_pct(m["pass_at_k"].get(str(k))) for k in ks),
            f"{m['mean_response_tokens']:.1f}",
            f"{m['mean_code_blocks']:.2f}",
            f"{m['mean_executed_calls']:.2f}",
            _pct(m["interp_error_rate"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def results_markdown(results: dict[str, Any]) -> str:
    """The results table (accuracies in %), then one table per benchmark that has subjects."""
    s = results["settings"]
    tools = f"tools on, at most {s['max_tool_calls']} calls" if s["tools"] else "tools off (text only)"
    lines = [
        f"# Evaluation of `{s['model']}`",
        "",
        (
            f"{tools}; n = {s['n']}, temperature {s['temperature']}, top_p {s['top_p']}, "
            f"response limit {s['max_response_tokens']} tokens; {results['elapsed_s']:.0f} s."
        ),
        "",
        *_table(results["benchmarks"], "benchmark"),
    ]
    if results["mean"]:
        lines += [
            "",
            (
                f"Mean over benchmarks: avg@n {_pct(results['mean']['avg_at_n'])}, "
                f"pass@1 {_pct(results['mean']['pass_at_1'])}."
            ),
        ]
    for name, m in results["benchmarks"].items():
        if "subjects" in m:
            lines += ["", f"## {name} by subject", "", *_table(m["subjects"], "subject")]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- the runner


def check_model_dir(model_path: str | Path) -> Path:
    """A Hugging Face model directory with a config and a loadable tokenizer, or EvalError."""
    p = Path(model_path)
    if not p.is_dir():
        raise EvalError(f"model '{p}' does not exist or is not a directory")
    if not (p / "config.json").is_file():
        raise EvalError(f"model '{p}' is not a Hugging Face model directory (no config.json)")
    return p


def load_tokenizer(model_path: str | Path) -> Any:
    from transformers import AutoTokenizer

    p = check_model_dir(model_path)
    try:
        return AutoTokenizer.from_pretrained(p)
    except Exception as e:  # noqa: BLE001 -- any loader failure is one sentence for the user
        raise EvalError(f"model '{p}': its tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


# Settings in config.json that say nothing about the weights' layout.
_CONFIG_NOT_LAYOUT = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


def model_differences(served: str | Path, other: str | Path) -> str:
    """Why `other`'s weights cannot be loaded into an engine built from `served` ("" if they can):
    a config setting that shapes the model, or a tokenizer file, differs."""
    served, other = Path(served), Path(other)
    a, b = (json.loads((d / "config.json").read_text()) for d in (served, other))
    keys = sorted(k for k in (a.keys() | b.keys()) - _CONFIG_NOT_LAYOUT if a.get(k) != b.get(k))
    if keys:
        return "config.json differs in " + ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys[:3])
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        fa, fb = served / name, other / name
        if fa.is_file() != fb.is_file() or (fa.is_file() and fa.read_bytes() != fb.read_bytes()):
            return f"its {name} differs"
    return ""


def comparison_markdown(results_by_model: dict[str, dict[str, Any]]) -> str:
    """One table, a row per evaluated model: avg@n per benchmark and their mean (`evaluate.py` with
    several --model)."""
    names = list(next(iter(results_by_model.values()))["benchmarks"])
    rows = ["| model | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
    for label, res in results_by_model.items():
        cells = [_pct(res["benchmarks"][n]["avg_at_n"]) for n in names] + [_pct(res["mean"].get("avg_at_n"))]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "# avg@n by model\n\n" + "\n".join(rows) + "\n"


def paired_difference(before: str | Path, after: str | Path) -> dict[str, float]:
    """How much `after` scores above `before` on the same problems, with its uncertainty: two
    evaluations' samples.jsonl, each problem's accuracy the mean over its samples. The difference is
    the mean over problems of (after - before); `half_width_95` is 1.96 standard errors of that mean
    (the spread of the per-problem differences over sqrt(problems)), which counts both the sampling
    of responses and the draw of problems. Only problems in both files count (EvalError if none)."""
    acc = []
    for path in (before, after):
        per: dict[tuple[str, str], list[bool]] = {}
        for line in Path(path).read_text().splitlines():
            s = json.loads(line)
            per.setdefault((s["benchmark"], s["task_id"]), []).append(bool(s["correct"]))
        acc.append({k: sum(v) / len(v) for k, v in per.items()})
    common = sorted(acc[0].keys() & acc[1].keys())
    if not common:
        raise EvalError(f"'{before}' and '{after}' share no problem")
    diffs = [acc[1][k] - acc[0][k] for k in common]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else 0.0
    return {"difference": mean, "half_width_95": 1.96 * math.sqrt(var / len(diffs)), "problems": len(diffs),
            "before": sum(acc[0][k] for k in common) / len(common), "after": sum(acc[1][k] for k in common) / len(common)}


def _read_weights(path: Path) -> dict[str, Any]:
    """{checkpoint name: tensor} from a model directory's safetensors files (sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EvalError(f"model '{path}' has no *.safetensors weights")
    weights: dict[str, Any] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


class EvalRunner:
    """Generators, interpreter pools and a scorer kept up between evaluation runs.

    `with EvalRunner(cfg, model_path) as r: r.run(benchmarks, n=4, tools=True, out_dir=...)`.
    `use_ray`: None picks Ray actors when a Ray session is up, else local objects.
    """

    def __init__(self, cfg: Config, model_path: str | Path, *, use_ray: bool | None = None) -> None:
        import ray

        from cir_actors.scoring.scorer import Scorer

        self.cfg = cfg
        self.model_path = str(check_model_dir(model_path))
        self.use_ray = ray.is_initialized() if use_ray is None else use_ray
        if self.use_ray and not ray.is_initialized():
            raise EvalError("use_ray=True but no Ray session is up (call ray.init first)")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="eval-loop", daemon=True)
        self._thread.start()
        self._local: list[Any] = []  # local objects to close
        self._local_gens: list[Any] = []  # of them, the generators (weights loaded by `load`)
        self._gen_actors: list[Any] = []  # Ray actors to stop
        self._pool_actors: list[Any] = []
        self._version = 0  # of the weights served: `load` counts up
        self.scorer = Scorer(cfg.scorer, name="eval-scorer")
        try:
            self._generators = self._call(self._start())
        except BaseException:
            self.close()
            raise
        self.scorer.warmup()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start(self) -> list[Any]:
        """Rollout callables `(task, sample_index, budget) -> awaitable Trajectory`, one per engine."""
        cfg = self.cfg
        from cir_actors.control.failures import ReplicatedInterpreter
        from cir_actors.generation.generator import Generator
        from cir_actors.sandbox.pool import InterpreterPool

        if not self.use_ray:
            # The pool in this process, called through the adapter training uses: a call unanswered
            # past its limit plus recovery.interpreter_call_s is retried, then fails the evaluation.
            pool = InterpreterPool(cfg.interpreter)
            self._local.append(pool)
            calls = ReplicatedInterpreter([pool], retries=cfg.recovery.call_retries,
                                          timeout_s=cfg.recovery.interpreter_call_s)
            gen = Generator(cfg, self.model_path, calls, name="eval-generator-0")
            self._local.insert(0, gen)
            self._local_gens.append(gen)
            return [gen.rollout]

        import ray

        from cir_actors.ops.cluster import Role, actor_options

        def options(role: Role, i: int) -> dict[str, Any]:
            opts = actor_options(role, cfg, i)
            opts.pop("name")  # anonymous: a training run's named actors may be alive beside us
            opts.pop("namespace")
            return opts

        pools = [
            ray.remote(InterpreterPool).options(**options(Role.INTERPRETER, i)).remote(cfg.interpreter)
            for i in range(cfg.interpreter.num_pools)
        ]
        self._pool_actors += pools

        def interpreter(i: int) -> ReplicatedInterpreter:
            """Generator i's pool first, the others for retries; a call unanswered past its limit plus
            recovery.interpreter_call_s is retried, as in training, then fails the evaluation saying so."""
            k = i % len(pools)
            return ReplicatedInterpreter(pools[k:] + pools[:k], retries=cfg.recovery.call_retries,
                                         timeout_s=cfg.recovery.interpreter_call_s)

        gens = [
            ray.remote(Generator)
            .options(**options(Role.GENERATOR, i))
            .remote(cfg, self.model_path, interpreter(i), name=f"eval-generator-{i}")
            for i in range(cfg.generator.num_generators)
        ]
        self._gen_actors += gens
        await asyncio.gather(*(g.served_version.remote() for g in gens))  # engines up (or their error)

        def remote_rollout(gen: Any) -> Any:
            return lambda task, i, budget: gen.rollout.remote(task, i, budget)

        return [remote_rollout(g) for g in gens]

    def load(self, model_path: str | Path) -> str:
        """Serve another checkpoint of the same model on the running engines, without restarting
        them (the demo's evaluations before and after RL, `evaluate.py --model A B ...`): its
        weights are read here and loaded into every engine, each checking their fingerprint.
        Refused (EvalError, the current weights still served) when its architecture or tokenizer
        differs from the served model's. Returns the fingerprint."""
        from cir_actors.learning.weight_sync import fingerprint
        from cir_actors.types import PolicyUpdate

        path = check_model_dir(model_path)
        differs = model_differences(Path(self.model_path), path)
        if differs:
            raise EvalError(f"model '{path}' cannot be loaded into engines serving '{self.model_path}': "
                            f"{differs}; evaluate it with its own EvalRunner")
        weights = _read_weights(path)
        checksum = fingerprint(weights.items())
        self._version += 1
        if self.use_ray:
            import ray

            weights = ray.put(weights)  # once for every engine
        served = self._call(self._update_engines(PolicyUpdate(self._version, 0, weights, checksum)))
        wrong = [p.checksum for p in served if p.checksum != checksum]
        if wrong:
            raise EvalError(f"model '{path}': an engine reports weights {wrong[0]} after loading {checksum}")
        log.info("evaluation engines now serve %s (fingerprint %s)", path, checksum)
        self.model_path = str(path)
        return checksum

    async def _update_engines(self, update: Any) -> list[Any]:
        if self.use_ray:
            return await asyncio.gather(*(g.update_weights.remote(update) for g in self._gen_actors))
        return await asyncio.gather(*(g.update_weights(update) for g in self._local_gens))

    def run(
        self,
        benchmarks: dict[str, list[Task]],
        n: int,
        tools: bool,
        out_dir: str | Path,
        *,
        max_tool_calls: int | None = None,
    ) -> dict[str, Any]:
        """Evaluate every task of every benchmark n times; write the outputs; return the results."""
        if n < 1:
            raise EvalError(f"n (samples per problem) must be >= 1, got {n}")
        if not benchmarks or not any(benchmarks.values()):
            raise EvalError("no tasks to evaluate")
        budget_max = self.cfg.scheduler.budget_schedule[-1][1] if max_tool_calls is None else max_tool_calls
        if budget_max < 0:
            raise EvalError(f"max_tool_calls must be >= 0, got {budget_max}")
        budget = budget_max if tools else 0
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        scored = self._call(self._rollouts(benchmarks, n, budget))
        elapsed = time.perf_counter() - t0

        records: dict[str, list[SampleRecord]] = {}
        with (out / "samples.jsonl").open("w") as f:
            for name, tasks in benchmarks.items():
                for task, samples in zip(tasks, scored[name], strict=True):
                    for traj, verdict in samples:
                        records.setdefault(name, []).append(_record(task, traj, verdict))
                        f.write(json.dumps(_sample_json(name, task, traj, verdict)) + "\n")
        results = summarize(records)
        g = self.cfg.generator
        results = {
            "settings": {
                "model": self.model_path,
                "tools": tools,
                "max_tool_calls": budget,
                "n": n,
                "temperature": g.temperature,
                "top_p": g.top_p,
                "max_response_tokens": g.max_response_tokens,
                "use_chat_template": self.cfg.model.use_chat_template,
                "ray": self.use_ray,
            },
            **results,
            "elapsed_s": elapsed,
        }
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "results.md").write_text(results_markdown(results))
        (out / "config.yaml").write_text(dump_config(self.cfg))
        log.info("evaluation written to %s (%.0f s)", out, elapsed)
        return results

    async def _rollouts(
        self, benchmarks: dict[str, list[Task]], n: int, budget: int
    ) -> dict[str, list[list[tuple[Trajectory, Verdict]]]]:
        # Bounded so an engine holds at most its max_inflight_trajectories (a MATH500 x 16 run would
        # otherwise queue 8000 trajectories at once); samples are spread round-robin over engines.
        limit = asyncio.Semaphore(self.cfg.generator.max_inflight_trajectories * len(self._generators))
        jobs = [
            (name, t, i) for name, tasks in benchmarks.items() for t in range(len(tasks)) for i in range(n)
        ]
        done = 0
        last_report = time.perf_counter()

        async def one(j: int, name: str, t: int, i: int) -> tuple[Trajectory, Verdict]:
            nonlocal done, last_report
            task = benchmarks[name][t]
            async with limit:
                traj = await self._generators[j % len(self._generators)](task, i, budget)
            verdict = await self.scorer.score_async(traj.sampled_text, task.gold)
            done += 1
            if time.perf_counter() - last_report > 30 or done == len(jobs):
                last_report = time.perf_counter()
                log.info("evaluation: %d / %d samples", done, len(jobs))
            return traj, verdict

        results = await asyncio.gather(*(one(j, *job) for j, job in enumerate(jobs)))
        out: dict[str, list[list[tuple[Trajectory, Verdict]]]] = {
            name: [[] for _ in tasks] for name, tasks in benchmarks.items()
        }
        for (name, t, _), res in zip(jobs, results, strict=True):
            out[name][t].append(res)
        return out

    def close(self) -> None:
        """Stop the engines, pools and scorer (idempotent)."""
        import ray

        # Engines and pools first stop their own children (vLLM's engine core, the sandbox zygote),
        # then the actors go.
        stops = [g.shutdown.remote() for g in self._gen_actors] + [
            p.close.remote() for p in self._pool_actors
        ]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=60)
        for handle in self._gen_actors + self._pool_actors:
            ray.kill(handle)
        self._gen_actors, self._pool_actors = [], []
        if self._local and self._loop.is_running():
            self._call(self._close_local())
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self.scorer.close()

    async def _close_local(self) -> None:
        # In the loop thread: the engine's client was made there.
        for obj in self._local:
            (obj.shutdown if hasattr(obj, "shutdown") else obj.close)()
        self._local = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record(task: Task, traj: Trajectory, verdict: Verdict) -> SampleRecord:
    return SampleRecord(
        task_id=task.task_id,
        correct=verdict.correct,
        response_tokens=traj.response_len,
        code_blocks=traj.num_code_blocks,
        executed=traj.num_executed,
        interp_failures=traj.num_interp_errors + traj.num_interp_timeouts,
        reason=verdict.reason.value,
        finish_reason=traj.finish_reason.value,
        subject=task.subject,
    )


def _sample_json(benchmark: str, task: Task, traj: Trajectory, verdict: Verdict) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "task_id": task.task_id,
        "sample_index": traj.sample_index,
        "subject": task.subject,
        "prompt": task.prompt_text,
        "response": traj.response_text,
        "gold": task.gold,
        "predicted": verdict.predicted,
        "correct": verdict.correct,
        "reason": verdict.reason.value,
        "finish_reason": traj.finish_reason.value,
        "response_tokens": traj.response_len,
        "budget": traj.budget,
        "num_code_blocks": traj.num_code_blocks,
        "num_executed": traj.num_executed,
        "num_interp_errors": traj.num_interp_errors,
        "num_interp_timeouts": traj.num_interp_timeouts,
        "tool_calls": list(traj.tool_calls),
    }


def evaluate(
    cfg: Config,
    model_path: str | Path,
    benchmarks: dict[str, list[Task]],
    n: int,
    tools: bool,
    out_dir: str | Path,
    *,
    max_tool_calls: int | None = None,
    use_ray: bool | None = None,
) -> dict[str, Any]:
    """One evaluation run (starts and stops its own engines; see EvalRunner to keep them).

    `max_tool_calls`: the budget with tools (default: the last budget of scheduler.budget_schedule).
    """
    with EvalRunner(cfg, model_path, use_ray=use_ray) as runner:
        return runner.run(benchmarks, n, tools, out_dir, max_tool_calls=max_tool_calls)


def benchmark_tasks_for(
    cfg: Config, tokenizer: Any, data: str | Path, limit: int | None = None
) -> dict[str, list[Task]]:
    """{benchmark name: tasks} from a file or a directory of jsonl/parquet files, prompts built with
    the model's tokenizer (data.problem_field / data.answer_field name the fields when not inferred)."""
    from cir_actors.data.loaders import benchmark_tasks, load_benchmarks

    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    rows_by_name = load_benchmarks(data, cfg.data.problem_field, cfg.data.answer_field)
    return {
        name: benchmark_tasks(
            rows[:limit], tokenizer, cfg.model.use_chat_template, cfg.generator.max_prompt_tokens, source=name
        )
        for name, rows in rows_by_name.items()
    }
