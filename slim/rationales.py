"""One resumable generation run: prompts for users -> parsed rationale records + a summary.

Teacher (`slim generate-rationales`) and student (`slim generate`) runs share this loop; only the
template, the users and the generator (an endpoint client or in-process batched generation) differ.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from eval.assets import smollm2_path
from eval.config import setting
from eval.dataset import SeqDataset, load_dataset
from eval.errors import InputError
from eval.io import file_hash
from eval.stage import Stage
from prompts import template_path

from .client import ClientConfig, Completion, Generator, Usage
from .grounding import catalogue_of
from .prompts import TEACHER, PromptBuilder, instruction_words, load_template
from .records import RECORDS, RecordLog, parse_steps
from .engine import ENGINES, check_parallel_engine, parallel_names

EMBEDDED = "embedded"  # `serve = "embedded"`: serve the embedded SmolLM2-135M-Instruct


@dataclass(frozen=True)
class GenerationConfig:
    """What every rationale-writing run shares (teacher and student)."""
    template: str = setting(TEACHER, "Prompt version in prompts/, or a template file.")
    users: int | None = setting(None, "Seeded sample of this many users (none: every user).")
    seed: int = setting(42, "Seed of the user sample.")
    history_tokens: int = setting(128, "Token budget of a rendered history (most recent items kept).")
    tokenizer: str | None = setting(None, "Tokenizer that counts history tokens (none: SmolLM2's).")
    client: ClientConfig = setting(factory=ClientConfig)
    format_retries: int = setting(2, "Times an off-format answer is asked again (with another seed) before it "
                                     "is recorded with its error.")
    engine: str = setting("auto", "Engine of a model served or loaded for the run: auto (vLLM where it runs, "
                                  "else transformers) | vllm | transformers.")
    data_parallel_size: int = setting(1, "vLLM engines, each with the whole model, for a model served or loaded "
                                         "for the run (vLLM's data parallelism: one per GPU; on CPU each its share "
                                         "of the cores); above 1 the engine is vLLM.")
    tensor_parallel_size: int = setting(1, "GPUs (on CPU: core groups) each vLLM engine splits the model over "
                                           "(vLLM's tensor parallelism; must divide the attention heads); above 1 "
                                           "the engine is vLLM.")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(f"unknown generation engine '{self.engine}' (choose {', '.join(ENGINES)})")
        check_parallel_engine(self.engine, self.data_parallel_size, self.tensor_parallel_size)

    @property
    def parallel(self) -> bool:
        return self.data_parallel_size * self.tensor_parallel_size > 1

    def check_served(self, served: bool, what: str) -> None:
        """Parallel sizes above 1 only where a model is served or loaded for the run (`served`)."""
        if self.parallel and not served:
            raise InputError(f"{parallel_names(self.data_parallel_size, self.tensor_parallel_size)}: no model is "
                             f"{what} for the run (client.base_url is used); to spread requests over several servers, "
                             f"give client.base_url a list of them")


@dataclass(frozen=True)
class RationaleConfig(GenerationConfig):
    serve: str | None = setting(None, "Model folder to serve locally for the run ('embedded': SmolLM2-135M-"
                                      "Instruct); none: use client.base_url.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_served(self.serve is not None, "served")


def sample_users(num_users: int, n: int | None, seed: int) -> list[int]:
    """Every user, or a reproducible sample of n of them (sorted)."""
    if n is None or n >= num_users:
        return list(range(num_users))
    return sorted(int(u) for u in np.random.default_rng(seed).choice(num_users, n, replace=False))


Job = tuple[int, int]  # (user, prefix): one rationale, written from the user's first `prefix` items


def rationale_jobs(ds: SeqDataset, users: list[int], cuts: int) -> list[Job]:
    """Every rationale asked for, by user then prefix (with one cut: each user's end rationale)."""
    return [(u, p) for u in users for p in ds.rationale_prefixes(u, cuts)]


def cut_of(ds: SeqDataset, job: Job) -> int | None:
    """The `prefix` a job's record carries: None for the end rationale (as records always had)."""
    user, prefix = job
    return None if prefix == len(ds.rationale_history(user)) else prefix


def missing_jobs(ds: SeqDataset, jobs: list[Job], keys: set, version: str, model: str) -> list[Job]:
    """The jobs without a record among `keys` (those of a records file)."""
    return [j for j in jobs if (j[0], version, model, cut_of(ds, j)) not in keys]


def remaining_jobs(data_dir: str | Path, out_dir: str | Path, cfg: GenerationConfig, model: str,
                   cuts: int = 1) -> list[Job]:
    """What `run_generation` would still ask for: with nothing left a stage need not start a model
    (a changed setting that changes no record, e.g. a batch size, reruns the stage)."""
    ds = load_dataset(data_dir)
    jobs = rationale_jobs(ds, sample_users(ds.num_users, cfg.users, cfg.seed), cuts)
    with RecordLog(Path(out_dir) / RECORDS) as log:
        return missing_jobs(ds, jobs, log.keys, load_template(cfg.template).version, model)


def job_prompts(ds: SeqDataset, jobs: list[Job], cfg: GenerationConfig) -> dict[Job, str]:
    """The rendered prompt of each (user, prefix), from that prefix of the history (no target leakage)."""
    build = PromptBuilder(ds.items, cfg.template, cfg.history_tokens, cfg.tokenizer or smollm2_path(), ds.domain)
    return {(u, p): build(ds.sequences[u][:p].tolist()) for u, p in jobs}


def user_prompts(ds: SeqDataset, users: list[int], cfg: GenerationConfig) -> dict[int, str]:
    """The rendered prompt of each user's end rationale, from the history it may see."""
    return {u: prompt for (u, _), prompt in job_prompts(ds, rationale_jobs(ds, users, 1), cfg).items()}


def make_record(ds: SeqDataset, user: int, version: str, model: str, prompt: str, c: Completion,
                prefix: int | None = None) -> dict[str, Any]:
    """The parsed answer with its grounding in the catalogue (the history is what the prompt showed:
    the first `prefix` items for a cut's rationale, else `rationale_history`)."""
    steps, error = parse_steps(c.text, instruction_words(version, ds.domain))
    seen = ds.rationale_history(user) if prefix is None else ds.sequences[user][:prefix]
    grounding = catalogue_of(ds.items).ground(steps, seen.tolist())
    return {"user": user, "raw_user": str(ds.users["raw_id"].iat[user]), "prompt_version": version,
            "model": model, **({} if prefix is None else {"prefix": prefix}), **steps, **grounding,
            "text": c.text, "error": error, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "seconds": round(c.seconds, 3), "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_generation(data_dir: str | Path, out_dir: str | Path, cfg: GenerationConfig, gen: Generator | None,
                   model_label: str | None = None, stage: str = "rationales", cuts: int = 1) -> dict[str, Any]:
    """Write each sampled user's rationales (`cuts` of them, see `SeqDataset.rationale_prefixes`) not
    already in `out_dir/records.jsonl`, keyed by (user, prefix); return the summary.

    A well-formed answer is written as it arrives. An off-format one is asked again up to
    `format_retries` times, and only the last answer is written, with its error; a failed request
    writes nothing, so the next run asks again."""
    ds = load_dataset(data_dir)
    out_dir = Path(out_dir)
    version = load_template(cfg.template).version
    model = model_label or gen.model_name
    users = sample_users(ds.num_users, cfg.users, cfg.seed)
    jobs = rationale_jobs(ds, users, cuts)
    usage = Usage()
    malformed = retried = 0
    with RecordLog(out_dir / RECORDS) as log:
        todo = missing_jobs(ds, jobs, log.keys, version, model)
        prompts = job_prompts(ds, todo, cfg)
        pending = dict(prompts)
        t0 = time.perf_counter()  # generation time only: tokens/s is not diluted by prompt rendering
        with tqdm(total=len(todo), unit="rationale", desc=f"{stage} ({model})") as bar:
            # greedy decoding answers again exactly as before: asking again only costs time
            retries = cfg.format_retries if cfg.client.temperature > 0 else 0
            for attempt in range(retries + 1):
                if not pending:
                    break
                again: dict[Job, str] = {}
                for job, result in gen.stream(pending.items(), attempt):
                    if isinstance(result, Exception):  # the client gave up after its retries: retry next run
                        usage.add(None)
                        tqdm.write(f"user {job[0]} (prefix {job[1]}): {type(result).__name__}: {result}")
                        bar.update()
                        continue
                    usage.add(result)
                    rec = {**make_record(ds, job[0], version, model, prompts[job], result, cut_of(ds, job)),
                           "attempt": attempt}
                    if rec["error"] is not None and attempt < retries:
                        again[job] = prompts[job]
                        continue
                    malformed += rec["error"] is not None
                    log.append(rec)
                    bar.update()
                    bar.set_postfix(tok_s=f"{usage.completion_tokens / (time.perf_counter() - t0):.1f}")
                retried += len(again)
                pending = again
        missing = {u for u, _ in missing_jobs(ds, jobs, log.keys, version, model)}
    seconds = time.perf_counter() - t0
    return {"users": len(users), "done_before": len(jobs) - len(todo), "written": usage.requests - retried,
            "malformed": malformed, "retried": retried, "failed": usage.failures, "complete": len(users) - len(missing),
            "rationales": len(jobs),
            **usage.to_dict(), "seconds": round(seconds, 1),
            "completion_tokens_per_s": round(usage.completion_tokens / seconds, 2) if seconds else 0.0,
            "est_cost_usd": round(usage.cost(cfg.client.price_prompt_per_1m, cfg.client.price_completion_per_1m), 6),
            "model": model, "prompt_version": version, **endpoint_counts(gen)}


def endpoint_counts(gen: Generator | None) -> dict[str, Any]:
    """{"endpoints": answers and failed tries per base URL} for a client of several URLs, else nothing."""
    counts = getattr(gen, "endpoint_counts", None)
    return {"endpoints": counts()} if counts is not None and len(gen.endpoints) > 1 else {}


class RationaleStage(Stage):
    """What the teacher's and the student's rationale stages share: append-only records that resume,
    fingerprinted by the records file; users whose request failed are what is missing."""

    in_place = True
    missing_what = "users have no record (their requests failed)"

    def inputs(self) -> dict[str, Path]:
        return {"data": self.data_dir, "template": template_path(self.config.template)}

    def digest(self, out: Path, counts: dict[str, Any]) -> str:
        return file_hash(out / RECORDS)

    def missing(self, counts: dict[str, Any]) -> int:
        return counts["users"] - counts["complete"]


class TeacherRationalesStage(RationaleStage):
    """Teacher chain-of-thought rationales (3 steps) for a seeded sample of users, through an
    OpenAI-compatible endpoint or a model served for the run; writes RUN/slim-teacher-rationales."""

    name = "slim-teacher-rationales"
    config_class = RationaleConfig

    def build(self, out: Path) -> dict[str, Any]:
        from .serve import endpoint

        cfg = self.config
        serve = str(smollm2_path()) if cfg.serve == EMBEDDED else cfg.serve
        with endpoint(cfg.client, serve, log_path=out / "server.log", engine=cfg.engine,
                      data_parallel_size=cfg.data_parallel_size,
                      tensor_parallel_size=cfg.tensor_parallel_size) as (chat, engine):
            return {**run_generation(self.data_dir, out, cfg, chat, stage=self.name), "engine": engine}
