"""SLIM: teacher chain-of-thought rationales, LoRA distillation into a small student, rationale vectors.

Stages, each a plain function with a config dataclass (the `slim` CLI wraps them):
  rationales.generate_rationales(data, out, RationaleConfig)        -> out/records.jsonl + manifest.json
  finetune.finetune_student(data, records, out, FinetuneConfig)     -> LoRA adapter folder
  student.generate_student(data, out, StudentConfig)                -> out/records.jsonl (every user)
  encode.encode(data, records, db, EncodeConfig)                    -> LanceDB tables; encode.read_vectors
  serve.Server(model_path, adapter) as a context manager            -> .base_url, .model_name
Modules import their heavy dependencies lazily, so `import slim` stays cheap.
"""
