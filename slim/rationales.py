"""One resumable generation run: prompts for users -> parsed rationale records + a summary.

Teacher (`slim generate-rationales`) and student (`slim generate`) runs share this loop; only the
template, the users and the generator (an endpoint client or in-process batched generation) differ.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from eval.assets import smollm2_path
from eval.dataset import SeqDataset, load_dataset
from eval.io import file_hash, manifest, write_json

from .client import ClientConfig, Completion, Generator, Usage
from .prompts import TEACHER, PromptBuilder, load_template
from .records import RecordLog, parse_steps

RECORDS = "records.jsonl"


@dataclass
class RationaleConfig:
    template: str = TEACHER               # prompt version in prompts/, or a template file
    users: int | None = None              # seeded sample size; None = every user
    seed: int = 42
    history_tokens: int = 128             # token budget of the rendered history (most recent items kept)
    tokenizer: str | None = None          # counts history tokens; default: the SmolLM2 tokenizer
    client: ClientConfig = field(default_factory=ClientConfig)
    serve: str | None = None              # model folder to serve locally for the run (instead of client.base_url)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_users(num_users: int, n: int | None, seed: int) -> list[int]:
    """Every user, or a reproducible sample of n of them (sorted)."""
    if n is None or n >= num_users:
        return list(range(num_users))
    return sorted(int(u) for u in np.random.default_rng(seed).choice(num_users, n, replace=False))


def user_prompts(ds: SeqDataset, users: list[int], cfg: RationaleConfig) -> dict[int, str]:
    """The rendered prompt of each user, from the history a rationale may see (no target leakage)."""
    build = PromptBuilder(ds.items, cfg.template, cfg.history_tokens, cfg.tokenizer or smollm2_path())
    return {u: build(ds.rationale_history(u).tolist()) for u in users}


def make_record(ds: SeqDataset, user: int, version: str, model: str, prompt: str, c: Completion) -> dict[str, Any]:
    steps, error = parse_steps(c.text)
    return {"user": user, "raw_user": str(ds.users["raw_id"].iat[user]), "prompt_version": version,
            "model": model, **steps, "text": c.text, "error": error, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "seconds": round(c.seconds, 3), "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_generation(data_dir: str | Path, out_dir: str | Path, cfg: RationaleConfig, gen: Generator,
                   model_label: str | None = None, stage: str = "generate-rationales") -> dict[str, Any]:
    """Write one record per sampled user not already in `out_dir/records.jsonl`; return the summary."""
    ds = load_dataset(data_dir)
    out_dir = Path(out_dir)
    template = load_template(cfg.template)
    version = template.version
    model = model_label or gen.model_name
    users = sample_users(ds.num_users, cfg.users, cfg.seed)
    usage = Usage()
    malformed = 0
    with RecordLog(out_dir / RECORDS) as log:
        todo = [u for u in users if (u, version, model) not in log.keys]
        prompts = user_prompts(ds, todo, cfg)
        t0 = time.perf_counter()  # generation time only: tokens/s is not diluted by prompt rendering
        with tqdm(total=len(todo), unit="user", desc=f"{stage} ({model})") as bar:
            for user, result in gen.stream(prompts.items()):
                if isinstance(result, Exception):  # the client gave up after its retries: retry next run
                    usage.add(None)
                    tqdm.write(f"user {user}: {type(result).__name__}: {result}")
                else:
                    usage.add(result)
                    rec = make_record(ds, user, version, model, prompts[user], result)
                    malformed += rec["error"] is not None
                    log.append(rec)
                bar.update()
                bar.set_postfix(tok_s=f"{usage.completion_tokens / (time.perf_counter() - t0):.1f}")
        done = sum(1 for u in users if (u, version, model) in log.keys)
    seconds = time.perf_counter() - t0
    summary = {"users": len(users), "done_before": len(users) - len(todo), "written": usage.requests,
               "malformed": malformed, "failed": usage.failures, "complete": done, **usage.to_dict(),
               "seconds": round(seconds, 1),
               "completion_tokens_per_s": round(usage.completion_tokens / seconds, 2) if seconds else 0.0,
               "est_cost_usd": round(usage.cost(cfg.client.price_prompt_per_1m, cfg.client.price_completion_per_1m), 6)}
    write_json(out_dir / "manifest.json", manifest(
        stage, inputs={"data": ds.fingerprint, "template": file_hash(template.path)},
        config={**cfg.to_dict(), "model": model, "prompt_version": version}, seed=cfg.seed, counts=summary))
    return summary


def generate_rationales(data_dir: str | Path, out_dir: str | Path, cfg: RationaleConfig) -> dict[str, Any]:
    """Teacher rationales for a seeded sample of users through an OpenAI-compatible endpoint."""
    from .serve import endpoint

    with endpoint(cfg.client, cfg.serve, log_path=Path(out_dir) / "server.log") as client:
        return run_generation(data_dir, out_dir, cfg, client)
